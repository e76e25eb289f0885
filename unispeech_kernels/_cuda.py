"""Lazy loader of the compiled CUDA extension ``unispeech_kernels._C`` (built from csrc/ by setup.py).

Nothing here imports the extension at package import time. ``cuda_reason(device)`` returns None
when the extension's kernels can run on ``device``, else why not ("CUDA extension not built", "no
CUDA device", "extension built for sm_80,sm_90,compute_90, device is sm_75", ...), so the
dispatcher can list it. The wrappers below are what the op modules register as backend "cuda".

Shapes of first_conv_layer: input_values [B, L] -> [B, T, C], weight [C, 1, K]; see
unispeech_kernels/ops/first_conv_layer.py and csrc/first_conv_layer.cuh.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
from typing import Optional

import torch

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
FCL_NORM_MODES = {"none": 0, "layer": 1, "group": 2}  # csrc FclNorm
FCL_MAX_C, FCL_MAX_K, FCL_T_TILE = 1024, 16, 8  # csrc/first_conv_layer.cuh limits
FCL_SMEM_LIMIT = 48 * 1024
FCL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(None)
def _load():
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
    return _load()[1]


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


def first_conv_layer_cuda_check(input_values, weight, bias, stride, norm_mode, norm_weight, norm_bias, *,
                                eps=1e-5, activation="gelu", input_lengths=None, batch_invariant=False):
    """Why the CUDA first_conv_layer kernel cannot run these inputs, or None."""
    if torch.compiler.is_compiling():  # the loader and device probes below are eager-only code
        return "not selectable under torch.compile (the extension is probed eagerly only)"
    tensors = [t for t in (input_values, weight, bias, norm_weight, norm_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "cuda first_conv_layer has no backward"
    reason = extension_reason()
    if reason:
        return reason
    devices = {t.device for t in tensors}
    if input_lengths is not None:
        devices.add(input_lengths.device)
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    reason = cuda_reason(input_values.device)
    if reason:
        return reason
    if activation != "gelu":
        return f"cuda first_conv_layer implements only exact gelu, got {activation!r}"
    if norm_mode not in FCL_NORM_MODES:
        return f"unknown norm_mode {norm_mode!r}"
    if input_values.dtype not in FCL_DTYPES or any(t.dtype != input_values.dtype for t in tensors):
        return f"needs one dtype among {FCL_DTYPES} for all tensors, got {sorted({str(t.dtype) for t in tensors})}"
    if input_values.dim() != 2 or weight.dim() != 3 or weight.shape[1] != 1:
        return f"needs input [B, L] and weight [C, 1, K], got {tuple(input_values.shape)}, {tuple(weight.shape)}"
    c, k = weight.shape[0], weight.shape[2]
    if not (1 <= c <= FCL_MAX_C and 1 <= k <= FCL_MAX_K):
        return f"channels {c} > {FCL_MAX_C} or kernel {k} > {FCL_MAX_K} not supported"
    if not 1 <= stride or 4 * ((FCL_T_TILE - 1) * stride + k + 64 * FCL_T_TILE) > FCL_SMEM_LIMIT:
        return f"stride {stride} not supported"
    if input_values.shape[1] < k:
        return f"input of {input_values.shape[1]} samples is shorter than the kernel ({k})"
    if input_values.shape[0] > 65535:
        return f"batch {input_values.shape[0]} > 65535"
    return None


def first_conv_layer_cuda(input_values, weight, bias, stride, norm_mode, norm_weight, norm_bias, *,
                          eps=1e-5, activation="gelu", input_lengths=None, batch_invariant=False):
    """Runs csrc/first_conv_layer.cu (forward only): [B, L] -> [B, T, C] in the input dtype."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"first_conv_layer cuda backend unavailable: {reason}")
    lengths = input_lengths if (norm_mode == "group" and batch_invariant) else None
    x = input_values if input_values.stride(-1) == 1 else input_values.contiguous()
    vec = (lambda t: None if t is None else t.contiguous())
    use_norm = norm_mode != "none"
    return torch.ops.unispeech_cuda.first_conv_layer(
        x, weight.contiguous(), vec(bias), int(stride), FCL_NORM_MODES[norm_mode],
        vec(norm_weight) if use_norm else None, vec(norm_bias) if use_norm else None, float(eps), lengths)
