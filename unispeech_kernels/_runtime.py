"""Facts about this process that backends check: is Triton importable, are we interpreting, which
GPU is this, how much shared memory and how many SMs it has. Each ``*_reason`` helper returns
``None`` when fine, else a reason string. Nothing here imports Triton at package import: it is
imported the first time a backend asks whether it can run (``triton_import_reason``)."""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

# Triton's own reading of TRITON_INTERPRET (its knob parser accepts these, in any case)
_TRUE_VALUES = ("1", "true", "on", "yes", "y")


def _read_interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in _TRUE_VALUES


# Read once, with the package: Triton decides at @triton.jit time (when our kernels are defined)
# whether they run interpreted, so a later change of the variable must not change our answer.
_INTERPRET = _read_interpret_mode()


def interpret_mode() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET set when
    the package was imported)."""
    return _INTERPRET


def _find_triton() -> Optional[str]:
    """Is there a Triton to import (without importing it)?"""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as e:  # ValueError: sys.modules["triton"] is None (blocked)
        return f"triton not importable ({type(e).__name__}: {e})"
    return None if found else "triton not importable (no module named 'triton')"


_TRITON_REASON = _find_triton()  # None: found, not yet imported; a plain value torch.compile traces
_TRITON_IMPORTED = False


def triton_import_reason() -> Optional[str]:
    """None if Triton imports (imported here, once, the first time a backend asks), else why not."""
    global _TRITON_REASON, _TRITON_IMPORTED
    if _TRITON_REASON is None and not _TRITON_IMPORTED:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the install
            _TRITON_REASON = f"triton not importable ({type(e).__name__}: {e})"
        _TRITON_IMPORTED = True
    return _TRITON_REASON


def several_devices_reason(tensors) -> Optional[str]:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    return None


def triton_device_reason(*tensors: torch.Tensor, min_capability=(8, 0)) -> Optional[str]:
    """Can Triton kernels run on the device of these tensors?"""
    reason = triton_import_reason() or several_devices_reason(tensors)
    if reason:
        return reason
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cpu":
        return None if interpret_mode() else "CPU tensors need TRITON_INTERPRET=1 for Triton"
    if device.type != "cuda":
        return f"device {device.type} is not supported by Triton kernels"
    cap = torch.cuda.get_device_capability(device)
    if cap < min_capability:
        return f"compute capability {cap[0]}.{cap[1]} < {min_capability[0]}.{min_capability[1]}"
    return None


def interpret_upcast_bf16(dtype: torch.dtype) -> bool:
    """Under the interpreter ``tl.dot`` on bf16 operands is wrong: kernels upcast them to fp32."""
    return interpret_mode() and dtype == torch.bfloat16


def dot_flags(dtype: torch.dtype) -> dict:
    """The precision constexprs every GEMM kernel takes: UPCAST (interpreter + bf16: dot operands in
    fp32) and DOT_PREC (``tl.dot`` input_precision: "ieee" keeps fp32 inputs exact, "tf32" is
    Triton's default and changes nothing for fp16 / bf16)."""
    return {"UPCAST": interpret_upcast_bf16(dtype), "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32"}


SM90_SHARED_MEMORY = 232448  # bytes of shared memory per block on H100 (sm_90): the budget without a GPU


@functools.lru_cache(None)
def shared_memory_per_block(index: int) -> int:
    """Bytes of shared memory one block may use on CUDA device ``index`` (Triton's driver query)."""
    import triton

    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that fill the device a few times over (small under the interpreter)."""
    if device.type != "cuda" or interpret_mode():
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
