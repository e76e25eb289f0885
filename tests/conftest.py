"""Test setup: Triton runs through its interpreter on CPU machines (on GPU machines TF32 is off, so
fp32 references are fp32), every test is seeded, and transformers never reaches for the network."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit import
else:  # fp32 means fp32 on a GPU too: eager baselines without cuDNN's default TF32 convolutions
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny ops on a shared 2-core machine: threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """The bad-input cases by outcome; the ten tightest comparisons (err / bound) of this run, all of
    them to $UNISPEECH_MARGINS_JSON."""
    from tests.bad_inputs import OUTCOMES
    from tests.tolerances import MARGINS
    if OUTCOMES:
        terminalreporter.section(f"bad-input cases by outcome ({sum(OUTCOMES.values())} in all)")
        for outcome, n in sorted(OUTCOMES.items()):
            terminalreporter.write_line(f"{n:5d}  {outcome}")
    if not MARGINS:
        return
    path = os.environ.get("UNISPEECH_MARGINS_JSON")
    if path:
        import json
        with open(path, "w") as f:
            json.dump({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "margins": MARGINS}, f, indent=1)
    tightest = sorted(MARGINS, key=lambda m: -m["ratio"])[:10]
    terminalreporter.section(f"tightest of {len(MARGINS)} numerical comparisons "
                             f"(CPU capability {torch.backends.cpu.get_cpu_capability()})")
    for m in tightest:
        flag = "  <- above 0.8" if m["ratio"] > 0.8 else ""
        terminalreporter.write_line(f"{m['ratio']:6.3f}  err {m['err']:.3e}  bound {m['bound']:.3e}  {m['dtype']:8s} "
                                    f"{m['name']:24s} {m['test']}{flag}")
