"""Benchmark session: one Recorder collects a row per case (from pytest-benchmark's own timings, see
harness.py) into bench/results/<YYYY-MM-DD>_<device-slug>.json, rewritten after every case.

Environment: BENCH_PROFILE (cases.py), BENCH_BUDGET_S (skip the cases left once this many seconds
have passed; `make gpu-check` sets it), BENCH_RESULTS_DIR (default bench/results).
Triton is never interpreted here: on a CPU the Triton backends report themselves unavailable.
"""
from __future__ import annotations

import datetime
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import cases  # noqa: E402
from bench.harness import Recorder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATE = {}


def pytest_configure(config):
    # every torch.compile'd case is one more specialisation of the same code objects
    try:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = 1024
    except Exception:
        pass


def _emitter(config):
    """Print one progress line per case while pytest captures the tests' output."""
    capman = config.pluginmanager.getplugin("capturemanager")

    def emit(line):
        if capman is None:
            print(line, flush=True)
            return
        with capman.global_and_fixture_disabled():
            print(line, flush=True)

    return emit


def pytest_collection_finish(session):
    budget = os.environ.get("BENCH_BUDGET_S")
    _STATE["recorder"] = Recorder(ROOT, float(budget) if budget else None, len(session.items),
                                  emit=_emitter(session.config))
    rec = _STATE["recorder"]
    print(f"\nbench: profile {cases.profile()}, {len(session.items)} cases on {rec.info['device']} "
          f"(torch {rec.info['torch']}, triton {rec.info['triton']}, commit {rec.info['commit']})"
          + (f", budget {rec.budget_s:.0f} s" if rec.budget_s else ""), flush=True)


@pytest.fixture(scope="session")
def recorder():
    return _STATE["recorder"]


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(cases.SEED)
    yield


def results_path(info: dict, directory: str) -> str:
    stem = f"{datetime.date.today().isoformat()}_{info['device_slug']}"
    path, n = os.path.join(directory, stem + ".json"), 2
    while os.path.exists(path):  # one file per run: never overwrite an earlier run of the same day
        path, n = os.path.join(directory, f"{stem}_{n}.json"), n + 1
    return path


def _write_results():
    """(Re)write this session's results file with every row so far: after each case, so that a run
    killed from outside keeps what it measured, and at the end."""
    rec = _STATE.get("recorder")
    if rec is None or not rec.rows:
        return None
    if "path" not in _STATE:  # the file is named once, at the session's first row
        directory = os.environ.get("BENCH_RESULTS_DIR") or os.path.join(ROOT, "bench", "results")
        os.makedirs(directory, exist_ok=True)
        _STATE["path"] = results_path(rec.info, directory)
    from unispeech_kernels.ops._common import tuned_choices
    doc = dict(rec.info, date=datetime.datetime.now().isoformat(timespec="seconds"), profile=cases.profile(),
               wall_s=round(rec.elapsed(), 1), rows=rec.rows, autotune=tuned_choices())
    tmp = _STATE["path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, _STATE["path"])  # never a half-written file
    return _STATE["path"]


def pytest_runtest_logfinish(nodeid, location):
    _write_results()


def pytest_sessionfinish(session, exitstatus):
    path = _write_results()
    if path:
        rows = len(_STATE["recorder"].rows)
        print(f"\nbench: wrote {rows} rows to {os.path.relpath(path, ROOT)}", flush=True)
