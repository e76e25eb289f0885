"""python -m unispeech_kernels.info: it runs, prints every section, and names a backend per op."""
import os
import subprocess
import sys

import torch

from unispeech_kernels import info
from unispeech_kernels.dispatch import BACKEND_NAMES, Op
from unispeech_kernels.ops import registered_ops

SECTIONS = ("== versions", "== device", "== CUDA extension (unispeech_kernels._C)", "== ops: backend for")
OPS = tuple(op.name for op in registered_ops())


def test_info_module_runs_and_prints_sections():
    proc = subprocess.run([sys.executable, "-m", "unispeech_kernels.info"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for section in SECTIONS:
        assert section in out
    assert f"torch              {torch.__version__}" in out
    assert "TRITON_INTERPRET" in out and "built " in out and "archs " in out
    for name in OPS:
        assert f"\n{name:<18} -> " in out


def test_every_op_is_discovered_and_explained():
    ops = {op.name: op for op in registered_ops()}
    assert set(OPS) <= set(ops)
    device, dtype = torch.device("cpu"), torch.float32
    for name in OPS:
        chosen, reasons = info.backend_report(ops[name], device, dtype)
        assert chosen in BACKEND_NAMES, (name, reasons)
        assert reasons[chosen] is None
        assert set(reasons) == set(BACKEND_NAMES)
        # every backend preferred over the chosen one says why it was not taken
        for better in BACKEND_NAMES[:BACKEND_NAMES.index(chosen)]:
            assert isinstance(reasons[better], str) and reasons[better], (name, better)


def test_report_reflects_forced_backend(monkeypatch):
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "torch")
    text = info.report()
    assert "UNISPEECH_KERNELS_BACKEND=torch" in text
    for name in OPS:
        assert f"{name:<18} -> torch (forced: torch)" in text
    assert "CUDA extension not built" in text or "built              yes" in text


def test_unknown_op_has_no_example():
    chosen, reasons = info.backend_report(Op("not_a_real_op"), torch.device("cpu"), torch.float32)
    assert chosen is None
    assert all(r == "no representative input declared (Op.example)" for r in reasons.values())
