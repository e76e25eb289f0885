"""What this machine can run: ``python -m unispeech_kernels.info``; what every backend can run:
``python -m unispeech_kernels.info --matrix`` (``--readme README.md`` writes it into the README).

Prints versions (python, torch, triton, CUDA), the GPU and its compute capability, TRITON_INTERPRET,
whether the CUDA extension is built and for which architectures, and for each registered op
(``unispeech_kernels.ops.OP_MODULES``) which backend would run a representative UniSpeech-base input here and why
the others would not (from the dispatcher's own checks, ``Op.select`` / ``Op.reasons``).
Representative inputs (each op's ``Op.example``; inference, no grad): UniSpeech-base, 2 utterances
of 10 s at 16 kHz (160000 samples, 499 frames), hidden 768, 12 heads of 64, conv feature encoder
512 channels, positional conv kernel 128 in 16 groups; bf16 on a GPU, fp32 on the CPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys

import torch

from . import _cuda, _runtime
from .dispatch import BACKEND_NAMES, OPT_IN, BackendUnavailableError, Op, env_override
from .matrix import support_matrix, write_readme
from .ops import registered_ops


def backend_report(op: Op, device, dtype) -> tuple:
    """(chosen backend or None, {backend: reason or None}) for the op's representative input."""
    if op.example_inputs is None:
        return None, {n: "no representative input declared (Op.example)" for n in BACKEND_NAMES}
    inputs = op.example_inputs(device, dtype)
    try:
        chosen = op.select(inputs).name
    except BackendUnavailableError:
        chosen = None
    reasons = op.reasons(inputs)
    for name, reason in reasons.items():
        if reason is None and name != chosen and not op.backends[name].auto:
            reasons[name] = OPT_IN
    return chosen, reasons


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
    for op in registered_ops():
        chosen, reasons = backend_report(op, device, dtype)
        override = env_override(op.name, op.env_alias)
        lines.append(f"{op.name:<18} -> {chosen or 'NONE'}" + (f" (forced: {override})" if override else ""))
        for name in BACKEND_NAMES:
            if name != chosen:
                lines.append(f"    {name:<8} {reasons.get(name) or 'ok (lower preference)'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="What this machine can run, and what every backend can.")
    parser.add_argument("--matrix", action="store_true", help="print the support matrix of every op's backends "
                        "(from their declared capabilities) instead of this machine's report")
    parser.add_argument("--readme", metavar="PATH", help="with --matrix: write it into PATH's support-matrix section")
    args = parser.parse_args(argv)
    if args.readme and not args.matrix:
        parser.error("--readme goes with --matrix")
    if not args.matrix:
        print(report())
    elif args.readme:
        write_readme(args.readme)
        print(f"{args.readme}: support matrix written")
    else:
        print(support_matrix())
    return 0


if __name__ == "__main__":
    sys.exit(main())
