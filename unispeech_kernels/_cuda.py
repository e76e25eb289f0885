"""Lazy loader of the compiled CUDA extension ``unispeech_kernels._C`` (built from csrc/ by setup.py).

Nothing here imports the extension at package import time. ``cuda_reason(device)`` returns None
when the extension's kernels can run on ``device``, else why not ("CUDA extension not built", "no
CUDA device", "extension built for sm_80,sm_90,compute_90, device is sm_75", ...), so the
dispatcher can list it. The kernels' limits come from the extension itself (``kernel_limits``,
``fits_shared_memory``: csrc/first_conv_layer.cuh through csrc/bindings.cpp); the backends that
run them live beside their ops (ops/first_conv_layer.py).
"""
from __future__ import annotations

import functools
import importlib
import json
import os
from typing import Optional

import torch

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


@functools.lru_cache(None)
def load():
    """(module, None) once the extension is imported, or (None, reason)."""
    try:
        module = importlib.import_module("unispeech_kernels._C")
    except ModuleNotFoundError as e:
        if e.name == "unispeech_kernels._C":
            return None, "CUDA extension not built"
        return None, f"CUDA extension failed to load ({e})"
    except (ImportError, OSError) as e:
        return None, f"CUDA extension failed to load ({e})"
    return module, None


def extension_reason() -> Optional[str]:
    """None if the compiled extension imports, else why not."""
    return load()[1]


def built_archs() -> Optional[list]:
    """The architectures the extension was compiled for (e.g. ['sm_80', 'sm_90', 'compute_90']),
    as recorded by setup.py at build time; None if unknown."""
    try:
        with open(BUILD_INFO) as f:
            return list(json.load(f)["archs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def archs_cover(archs, capability) -> bool:
    """Can a binary holding ``archs`` run on a device of ``capability`` (major, minor)? A cubin
    sm_XY runs on the same major with minor >= Y; PTX compute_XY is JIT-compiled for any cc >= XY."""
    cc = capability[0] * 10 + capability[1]
    for arch in archs:
        kind, _, number = arch.partition("_")
        number = int("".join(ch for ch in number if ch.isdigit()) or 0)
        if kind == "sm" and number // 10 == capability[0] and number <= cc:
            return True
        if kind == "compute" and number <= cc:
            return True
    return False


@functools.lru_cache(None)
def _device_reason(index: int) -> Optional[str]:
    cap = torch.cuda.get_device_capability(index)
    archs = built_archs()
    if archs is not None and not archs_cover(archs, cap):
        return f"extension built for {','.join(archs)}, device is sm_{cap[0]}{cap[1]}"
    with torch.cuda.device(index):
        status = torch.ops.unispeech_cuda.kernel_image_info()[0]
    if status != 0:
        return f"extension has no kernel image for sm_{cap[0]}{cap[1]} (cudaError {status})"
    return None


def cuda_reason(device=None) -> Optional[str]:
    """None if the extension's kernels can run on ``device`` (default: the current CUDA device)."""
    reason = extension_reason()
    if reason:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device"
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return f"cuda backend needs CUDA tensors, got {device.type}"
    return _device_reason(device.index if device.index is not None else torch.cuda.current_device())


def kernel_limits() -> tuple:
    """((size name, largest value), ...) the first conv layer's CUDA kernel takes, as the built
    extension reports them (csrc/first_conv_layer.cuh); () when it is not built."""
    module, _ = load()
    if module is None:
        return ()
    channels, kernel, batch = torch.ops.unispeech_cuda.kernel_limits()
    return ("channels", channels), ("kernel size", kernel), ("batch (a grid axis)", batch)


def fits_shared_memory(kernel_size: int, stride: int) -> bool:
    """Does the CUDA kernel's shared-memory sample tile hold a frame chunk at this kernel size and
    stride (the extension's own answer)?"""
    return bool(torch.ops.unispeech_cuda.fits_shared_memory(int(kernel_size), int(stride)))
