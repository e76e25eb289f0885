"""Facts about this process that backends check: is Triton importable, are we interpreting,
which GPU is this. Each helper returns ``None`` when fine, else a reason string."""
from __future__ import annotations

import os
from typing import Optional

import torch


def _read_interpret_mode() -> bool:
    try:  # Triton's own reading of TRITON_INTERPRET (1 / true / on / yes, any case)
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - a Triton without knobs, or none
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Read once, with the package: Triton decides at @triton.jit time (when our kernels are defined)
# whether they run interpreted, so a later change of the variable must not change our answer.
_INTERPRET = _read_interpret_mode()


def interpret_mode() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET set when
    the package was imported)."""
    return _INTERPRET


def _import_triton() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton not importable ({type(e).__name__}: {e})"
    return None


_TRITON_IMPORT_REASON = _import_triton()  # once per process; a plain value so torch.compile traces it


def triton_import_reason() -> Optional[str]:
    return _TRITON_IMPORT_REASON


def triton_device_reason(*tensors: torch.Tensor, min_capability=(8, 0)) -> Optional[str]:
    """Can Triton kernels run on the device of these tensors?"""
    reason = triton_import_reason()
    if reason:
        return reason
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    (device,) = devices
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
