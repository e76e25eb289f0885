"""Benchmark session: the cases in the profile's order, one Recorder collecting a row per case
(harness.py) into bench/results/<YYYY-MM-DD>_<device-slug>.json, rewritten after every case.

Environment: BENCH_PROFILE (cases.py), BENCH_TIERS (keep only these tiers of the profile, e.g.
"goal"), BENCH_BUDGET_S (skip the cases left once this many seconds have passed; bench/gpu_check.py
sets it), BENCH_RESULTS_DIR (default bench/results), BENCH_RUN_ID (sessions of one check run with the
same id write one results file: a later session adds its rows to the earlier one's),
BENCH_CUDA_BUILD_RC + BENCH_CUDA_BUILD_TIMEOUT_S (the CUDA extension's rows wait for its background
build to write its return code there), BENCH_DRY_RUN (the check's dry run: a file holding its fake
clock; no case runs, the harness charges each its estimate, bench/estimates.py; with
BENCH_DRY_BUILD_DONE_S, when the background build ends on that clock).
Triton is never interpreted here: on a CPU the Triton backends report themselves unavailable.
"""
from __future__ import annotations

import datetime
import functools
import glob
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import cases, estimates  # noqa: E402
from bench.harness import Case, Recorder, await_extension_build  # noqa: E402
from bench.runtime import DryRuntime  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN = os.environ.get("BENCH_DRY_RUN")
_STATE = {"tiers": {}}


def pytest_configure(config):
    # every torch.compile'd case is one more specialisation of the same code objects (a dry run compiles nothing)
    if DRY_RUN:
        return
    try:
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = 256
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = 1024
    except Exception:
        pass


def item_case(item) -> tuple:
    """(op, its case tuple or None) of a benchmark item: test_<op>, parametrised by "case"."""
    op = item.originalname[len("test_"):] if item.originalname.startswith("test_") else item.originalname
    case = item.callspec.params.get("case") if hasattr(item, "callspec") else None
    return op, case if isinstance(case, tuple) else None


def pytest_collection_modifyitems(session, config, items):
    """The profile's order: by tier, then by the entry that makes the case (cases.place), collection
    order within an entry; a benchmark the profile does not list runs after the matrix entries.
    BENCH_TIERS deselects the other tiers."""
    wanted = [t for t in os.environ.get("BENCH_TIERS", "").split(",") if t] or list(cases.TIERS)
    unknown = sorted(set(wanted) - set(cases.TIERS))
    if unknown:
        raise pytest.UsageError(f"BENCH_TIERS: unknown tiers {unknown}; valid: {list(cases.TIERS)}")
    after_matrix = ("matrix", len(cases.entries()))
    keyed = []
    for index, item in enumerate(items):
        tier, entry = cases.place(*item_case(item)) or after_matrix
        _STATE["tiers"][item.nodeid] = tier
        keyed.append(((cases.TIERS.index(tier), entry, index), item))
    keyed.sort(key=lambda pair: pair[0])
    items[:] = [item for _, item in keyed if _STATE["tiers"][item.nodeid] in wanted]
    dropped = [item for _, item in keyed if _STATE["tiers"][item.nodeid] not in wanted]
    if dropped:
        config.hook.pytest_deselected(items=dropped)


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


def _runtime_and_build_wait():
    """(the runtime every case uses or None for each device's own, what the extension's rows wait on)."""
    if DRY_RUN:
        runtime = DryRuntime(DRY_RUN)
        runtime.advance(estimates.SESSION_START_S)
        done = float(os.environ.get("BENCH_DRY_BUILD_DONE_S", "0"))
        return runtime, lambda: runtime.advance(max(0.0, done - runtime.now()))
    rc_path = os.environ.get("BENCH_CUDA_BUILD_RC")
    if rc_path:
        timeout = float(os.environ.get("BENCH_CUDA_BUILD_TIMEOUT_S", "300"))
        return None, functools.partial(await_extension_build, rc_path, timeout)
    return None, None


def pytest_collection_finish(session):
    budget = os.environ.get("BENCH_BUDGET_S")
    runtime, build_wait = _runtime_and_build_wait()
    _STATE["recorder"] = Recorder(ROOT, float(budget) if budget else None, len(session.items),
                                  emit=_emitter(session.config), runtime=runtime, extension_ready=build_wait)
    _STATE["estimates"] = estimates.Estimates() if DRY_RUN else None
    rec = _STATE["recorder"]
    print(f"\nbench: profile {cases.profile()}, {len(session.items)} cases on {rec.info['device']} "
          f"(torch {rec.info['torch']}, triton {rec.info['triton']}, commit {rec.info['commit']})"
          + (f", budget {rec.budget_s:.0f} s" if rec.budget_s else "") + (", DRY RUN" if DRY_RUN else ""),
          flush=True)


def pytest_runtest_setup(item):
    if "recorder" in _STATE:
        _STATE["recorder"].tier = _STATE["tiers"].get(item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Dry run: the case is not run; the harness times a stand-in that costs its estimate."""
    if not DRY_RUN:
        return None
    op, case = item_case(pyfuncitem)
    params = pyfuncitem.callspec.params if hasattr(pyfuncitem, "callspec") else {}
    entry = next((part for part in case or () if isinstance(part, dict)), None)
    dtype = params.get("dtype", torch.float32 if entry is not None else torch.bfloat16)
    if case is None:  # a benchmark with its own shape (the pre-training pair)
        c = Case(op, "ours", dtype, "own shape", {})
        first_s, round_s = _STATE["estimates"].case(op, "ours")
    elif entry is None:  # an expand() case: a model shape
        model, seconds, batch, impl, lengths = case
        c = Case(op, impl, dtype, f"{model} B{batch} {seconds}s", dict(model=model, seconds=seconds, samples=lengths))
        first_s, round_s = _STATE["estimates"].case(op, impl, model, lengths)
    else:  # (entry, ..., impl): a benchmark with its own fields
        impl, model = case[-1], next((p for p in case[1:-1] if isinstance(p, str)), None)
        fields = {k: v for k, v in entry.items() if k not in ("op", "tier", "impls")}
        c = Case(op, impl, dtype, " ".join(f"{k}={v}" for k, v in fields.items()), fields)
        first_s, round_s = _STATE["estimates"].case(op, impl, model, entry=entry)
    rec = _STATE["recorder"]
    rec.run(pyfuncitem.funcargs["benchmark"], c, rec.runtime.op(first_s, round_s), [()], torch.device("cpu"))
    return True


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


def earlier_session(directory: str, run_id: str):
    """(path, document) of the results file an earlier session of this run wrote, or (None, {})."""
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("run_id") == run_id:
            return path, doc
    return None, {}


def merged_autotune(earlier: dict, now: dict) -> dict:
    out = {name: dict(entry, picks=list(entry["picks"])) for name, entry in (earlier or {}).items()}
    for name, entry in now.items():
        picks = out.setdefault(name, dict(entry, picks=[]))["picks"]
        picks.extend(p for p in entry["picks"] if p not in picks)
    return out


def _write_results():
    """(Re)write this session's results file with every row so far: after each case, so that a run
    killed from outside keeps what it measured, and at the end."""
    rec = _STATE.get("recorder")
    if rec is None or not rec.rows:
        return None
    run_id = os.environ.get("BENCH_RUN_ID")
    if "path" not in _STATE:  # the file is named once, at the session's first row
        directory = os.environ.get("BENCH_RESULTS_DIR") or os.path.join(ROOT, "bench", "results")
        os.makedirs(directory, exist_ok=True)
        path, _STATE["earlier"] = earlier_session(directory, run_id) if run_id else (None, {})
        _STATE["path"] = path or results_path(rec.info, directory)
    helpers = sys.modules.get("unispeech_kernels.ops._common")  # no autotuning without it loaded
    earlier = _STATE["earlier"]
    doc = dict(rec.info, date=earlier.get("date") or datetime.datetime.now().isoformat(timespec="seconds"),
               profile=cases.profile(), wall_s=round(earlier.get("wall_s", 0.0) + rec.elapsed(), 1),
               rows=earlier.get("rows", []) + rec.rows,
               autotune=merged_autotune(earlier.get("autotune"), helpers.tuned_choices() if helpers else {}))
    if run_id:
        doc["run_id"] = run_id
    if DRY_RUN:
        doc["dry_run"] = True
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
