"""What this machine can run: ``python -m unispeech_kernels.info``.

Prints versions (python, torch, triton, CUDA), the GPU and its compute capability, TRITON_INTERPRET,
whether the CUDA extension is built and for which architectures, and for each op found in
unispeech_kernels.ops.* which backend would run a representative UniSpeech-base input here and why
the others would not (from the dispatcher's own checks, ``Op.select`` / ``Op.last_reasons``).
Representative inputs (inference, no grad): 2 utterances of 10 s at 16 kHz (160000 samples, 499
frames), hidden 768, 12 heads of 64, conv feature encoder 512 channels (kernels 10,3,3,3,3,2,2,
strides 5,2,2,2,2,2,2), positional conv kernel 128 in 16 groups; bf16 on a GPU, fp32 on the CPU.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import re
import subprocess
import sys

import torch

from . import _cuda, _runtime
from .dispatch import BACKEND_NAMES, BackendUnavailableError, Op, env_override

BATCH, SAMPLES, FRAMES, HIDDEN, HEADS, CONV_DIM = 2, 160000, 499, 768, 12, 512
CONV_KERNELS, CONV_STRIDES = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
POS_KERNEL, POS_GROUPS = 128, 16


def _example_first_conv_layer(device, dtype):
    e = dict(device=device, dtype=dtype)
    args = (torch.empty(BATCH, SAMPLES, **e), torch.empty(CONV_DIM, 1, CONV_KERNELS[0], **e), None,
            CONV_STRIDES[0], "group", torch.empty(CONV_DIM, **e), torch.empty(CONV_DIM, **e))
    return args, dict(eps=1e-5, activation="gelu")


def _example_feature_encoder(device, dtype):
    e = dict(device=device, dtype=dtype)
    weights = [torch.empty(CONV_DIM, 1 if i == 0 else CONV_DIM, k, **e) for i, k in enumerate(CONV_KERNELS)]
    args = (torch.empty(BATCH, SAMPLES, **e), weights, [None] * len(weights), list(CONV_STRIDES), "group",
            [torch.empty(CONV_DIM, **e)], [torch.empty(CONV_DIM, **e)])
    return args, dict(eps=1e-5, activation="gelu")


def _example_pos_conv(device, dtype):
    e = dict(device=device, dtype=dtype)
    args = (torch.empty(BATCH, FRAMES, HIDDEN, **e), torch.empty(HIDDEN, HIDDEN // POS_GROUPS, POS_KERNEL, **e),
            torch.empty(HIDDEN, **e))
    return args, dict(groups=POS_GROUPS, activation="gelu")


def _example_attention(device, dtype):
    e = dict(device=device, dtype=dtype)
    q, k, v = (torch.empty(BATCH, FRAMES, HEADS, HIDDEN // HEADS, **e) for _ in range(3))
    mask = torch.ones(BATCH, FRAMES, dtype=torch.bool, device=device)
    mask[1, FRAMES // 2:] = False
    return (q, k, v, mask), dict(dropout_p=0.0, softmax_scale=None)


def _example_attention_packed(device, dtype):
    e = dict(device=device, dtype=dtype)
    lengths = [FRAMES, FRAMES // 2]
    q, k, v = (torch.empty(sum(lengths), HEADS, HIDDEN // HEADS, **e) for _ in range(3))
    return (q, k, v, lengths), dict(dropout_p=0.0, softmax_scale=None)


def _example_forced_align(device, dtype):
    """CTC log-probs of the two utterances (vocab 32), transcripts of 15 characters per second."""
    e = dict(device=device)
    frames, labels = torch.tensor([FRAMES, FRAMES // 2], **e), torch.tensor([150, 75], **e)
    return (torch.empty(BATCH, FRAMES, 32, dtype=dtype, **e), torch.ones(BATCH, 150, dtype=torch.long, **e), frames,
            labels, 0, None, -1.0, True), {}


EXAMPLES = {"attention": _example_attention, "attention_packed": _example_attention_packed,
            "feature_encoder": _example_feature_encoder, "forced_align": _example_forced_align,
            "first_conv_layer": _example_first_conv_layer, "pos_conv": _example_pos_conv}


def discover_ops() -> list:
    """Every ``Op`` defined in unispeech_kernels.ops.*, in module order."""
    package = importlib.import_module("unispeech_kernels.ops")
    ops, seen = [], set()
    for mod in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        module = importlib.import_module(f"unispeech_kernels.ops.{mod}")
        for value in vars(module).values():
            if isinstance(value, Op) and id(value) not in seen:
                seen.add(id(value))
                ops.append(value)
    return ops


def backend_report(op: Op, device, dtype) -> tuple:
    """(chosen backend or None, {backend: reason or None}) for the op's representative input."""
    example = EXAMPLES.get(op.name)
    if example is None:
        return None, {n: "no representative input known to info.py" for n in BACKEND_NAMES}
    args, kwargs = example(device, dtype)
    try:
        chosen = op.select(None, *args, **kwargs).name
    except BackendUnavailableError:
        chosen = None
    return chosen, dict(op.last_reasons)


def _nvcc_version() -> str:
    nvcc = os.path.join(_cuda_home(), "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"not found ({nvcc})"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return f"{m.group(1) if m else out.strip()[-40:]} ({nvcc})"


def _cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or "/usr/local/cuda"


def _triton_version() -> str:
    reason = _runtime.triton_import_reason()
    if reason:
        return reason
    import triton

    return triton.__version__


def report() -> str:
    lines = ["== versions",
             f"python             {platform.python_version()}",
             f"torch              {torch.__version__} (built with CUDA {torch.version.cuda or 'none'})",
             f"triton             {_triton_version()}",
             f"CUDA toolkit       {_nvcc_version()}",
             "== device"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}             {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}")
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        lines.append("GPU                none (torch.cuda.is_available() is False)")
        device, dtype = torch.device("cpu"), torch.float32
    lines.append(f"TRITON_INTERPRET   {os.environ.get('TRITON_INTERPRET', '(unset)')}"
                 f"{' (Triton kernels run on the CPU interpreter)' if _runtime.interpret_mode() else ''}")
    lines.append("== CUDA extension (unispeech_kernels._C)")
    ext_reason = _cuda.extension_reason()
    lines.append(f"built              {'yes' if ext_reason is None else 'no: ' + ext_reason}")
    archs = _cuda.built_archs()
    lines.append(f"archs              {','.join(archs) if archs else 'unknown (no _build_info.json)'}")
    usable = _cuda.cuda_reason(device if device.type == "cuda" else None)
    lines.append(f"usable here        {'yes' if usable is None else 'no: ' + usable}")
    lines.append(f"== ops: backend for a UniSpeech-base input ({device.type}, {str(dtype).replace('torch.', '')})")
    forced = os.environ.get("UNISPEECH_KERNELS_BACKEND")
    if forced:
        lines.append(f"UNISPEECH_KERNELS_BACKEND={forced}")
    for op in discover_ops():
        chosen, reasons = backend_report(op, device, dtype)
        override = env_override(op.name, op.env_alias)
        lines.append(f"{op.name:<18} -> {chosen or 'NONE'}" + (f" (forced: {override})" if override else ""))
        for name in BACKEND_NAMES:
            if name != chosen:
                lines.append(f"    {name:<8} {reasons.get(name) or 'ok (lower preference)'}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
