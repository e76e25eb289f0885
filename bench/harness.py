"""Timing, memory and result rows shared by every benchmark file.

How a case is timed (``Recorder.run``; the device-specific parts are a runtime, bench/runtime.py):
1. one untimed call (module load, autotuning, torch.compile) -- a backend that cannot run the input
   raises BackendUnavailableError here and becomes an "unavailable" row;
2. one untimed round to size the run: rounds = target time / round time, clamped (cases.TIMING)
   (on a CPU, when the first call alone already exceeds the target, its time sizes the run);
3. warm-up rounds, then the timed rounds, driven by pytest-benchmark's ``pedantic`` (its table in
   the console; the rows' numbers are the runtime's clock, read by ``time_rounds``). One round calls
   the op once on EACH of k pre-made input sets (rotating inputs: together they are larger than the
   GPU's L2, so no call finds its inputs in cache), starting on an idle device and waited for; on
   CUDA the round is timed by events around its k calls (device time, launch gaps the GPU waited
   through included). Per-call time = round time / k; we report its median, p20 and p80;
4. one more call each for the peak memory and for the SDPA backends it ran (profiler op names);
5. ours only: the untimed check of the result against a baseline (``verify``);
6. the same rounds as CUDA-graph replays of the calls, one graph per input set (``graph_*_ms``),
   or ``graph_error`` saying why the op cannot be captured (a host sync, a CPU, a failed capture).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import torch

from . import physics
from .cases import TIMING
from .runtime import RUNTIMES, GraphUnavailable, first_line
from .report import OUR_IMPLS  # ours (verified; a failure fails the run), everything else a baseline


def unavailable_errors() -> tuple:
    """Our dispatcher's BackendUnavailableError once our package is loaded (the cases import it; until
    then nothing can raise it), so the harness times baselines even where it does not import, and a
    dry run never loads it."""
    dispatch = sys.modules.get("unispeech_kernels.dispatch")
    return (dispatch.BackendUnavailableError,) if dispatch is not None else ()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit(root: str) -> str:
    """HEAD (+ "-dirty"); UNISPEECH_COMMIT when set (a GPU machine gets the working tree without .git)."""
    if os.environ.get("UNISPEECH_COMMIT"):
        return os.environ["UNISPEECH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _version(package: str) -> Optional[str]:
    """The installed version, read without importing the package."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_info(root: str) -> dict:
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else cpu_name()
    info = {
        "device": name, "device_type": "cuda" if cuda else "cpu", "device_slug": slug(name),
        "torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(), "commit": git_commit(root),
        "threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["measured_ceilings"] = measure_ceilings(torch.device("cuda"))
        info["capability"] = f"{props.major}.{props.minor}"
        info["l2_bytes"] = getattr(props, "L2_cache_size", None)
        peak = physics.peak_for(name)
        info["peak"] = None if peak is None else dataclasses.asdict(peak)
    return info


@functools.lru_cache(None)  # once per process: every Recorder of a session shares it
def measure_ceilings(device: torch.device, reps: int = 10) -> dict:
    """This run's own ceilings (a few seconds): an 8192^3 bf16 matmul on random data (TFLOP/s) and a
    1 GiB device-to-device copy counting bytes read + written (TB/s), each the mean of ``reps`` after
    3 warm-ups. Recorded next to the table's ceilings (physics.PEAKS), which ``pct_of_peak`` uses so
    that runs stay comparable; a card far below the table is worth a note in the results."""
    def mean_s(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / reps

    def matmul_tflops(n=8192):
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        return 2 * n ** 3 / mean_s(lambda: a @ b) / 1e12

    def copy_tbps():
        src = torch.randn(1 << 28, device=device)  # 1 GiB of fp32
        dst = torch.empty_like(src)
        return 2 * src.numel() * src.element_size() / mean_s(lambda: dst.copy_(src)) / 1e12

    tflops, tbps = matmul_tflops(), copy_tbps()  # their buffers are freed on return
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": round(tflops, 1), "copy_tbps": round(tbps, 2),
            "method": f"8192^3 bf16 matmul, 1 GiB copy (read + write), mean of {reps} after 3 warm-ups"}


# ours vs a baseline at the benchmarked shape, both in the benchmark dtype: ||ours - base|| / ||base||
# over real frames. Within the bound the row says outputs_match; outside it the row is an error (a fast
# wrong answer is no result). fp32 allows for TF32 in cuDNN's convolutions (torch's default).
MATCH_REL_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}


def rel_diff(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in fp64 over tensors (or matching lists of tensors)."""
    if isinstance(actual, torch.Tensor):
        actual, expected = [actual], [expected]
    num = sum(float((a.double() - e.double()).norm()) ** 2 for a, e in zip(actual, expected))
    den = sum(float(e.double().norm()) ** 2 for e in expected)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def verify_same(fn: Callable, reference: Callable, inputs: tuple, vs: str = "torch") -> dict:
    """``verify`` for ops whose every output element is defined: fn vs reference on ``inputs``."""
    return {"rel_diff": rel_diff(fn(*inputs), reference(*inputs)), "vs": vs}


def verify_real_frames(fn: Callable, reference: Callable, inputs: tuple, frames: Sequence[int],
                       vs: str = "torch") -> dict:
    """``verify`` for ops with [B, T, ...] outputs: fn vs reference on ``inputs`` over each
    utterance's real frames (frames[b] of row b; what lies past them is each backend's own)."""
    ours, ref = fn(*inputs), reference(*inputs)
    return {"rel_diff": rel_diff([ours[b, :n] for b, n in enumerate(frames)],
                                 [ref[b, :n] for b, n in enumerate(frames)]), "vs": vs}


def time_rounds(call_all: Callable[[], None], rounds: int, runtime, drive=None) -> list:
    """Seconds of each of ``rounds`` rounds of ``call_all()``, read with the runtime's clock (CUDA
    events on a GPU) around the calls; every round starts on a synchronised device and is waited for
    (so pytest-benchmark's own wall times, printed in its table, cover the device work too).
    ``drive(one_round, rounds)`` runs the rounds (pytest-benchmark's pedantic), a plain loop by
    default. The one timing function of the suite: eager calls and graph replays alike."""
    marks = []

    def one_round():
        start = runtime.mark()
        call_all()
        end = runtime.mark()
        runtime.sync()
        marks.append((start, end))

    runtime.sync()
    if drive is None:
        for _ in range(rounds):
            one_round()
    else:
        drive(one_round, rounds)
    return [runtime.seconds(start, end) for start, end in marks]


def per_call_ms(round_seconds: Sequence[float], calls_per_round: int) -> tuple:
    """(median, p20, p80) milliseconds per call of timed rounds."""
    per_call = 1e3 * np.asarray(round_seconds) / calls_per_round
    return float(np.median(per_call)), float(np.percentile(per_call, 20)), float(np.percentile(per_call, 80))


def await_extension_build(rc_path: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Block until bench/gpu_check.py's background build of the CUDA extension has written its return
    code to ``rc_path`` (at most ``timeout_s``), then forget a load that failed before it finished
    (the loader remembers "not built"), so the extension's rows find what was built."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(rc_path) and time.monotonic() < deadline:
        time.sleep(poll_s)
    importlib.invalidate_caches()
    from unispeech_kernels import _cuda
    _cuda.load.cache_clear()


def input_set_count(set_bytes: float, device: torch.device, max_sets: int = 32) -> int:
    """How many input sets to rotate so that together they exceed twice the cache."""
    cache = TIMING[device.type]["cache_bytes"]
    if cache is None:
        props = torch.cuda.get_device_properties(device)
        cache = 2 * (getattr(props, "L2_cache_size", 0) or 50 << 20)
    return int(min(max_sets, max(1, math.ceil(cache / max(set_bytes, 1)))))


@dataclass
class Case:
    """One benchmarked (op, impl, dtype, shape). flops / nbytes: real work, see physics.py."""
    op: str
    impl: str
    dtype: torch.dtype
    shape: str
    params: dict
    flops: Optional[float] = None
    nbytes: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def row(self, **values) -> dict:
        row = {"op": self.op, "impl": self.impl, "dtype": self.dtype_name, "shape": self.shape,
               "params": self.params, "median_ms": None, "p20_ms": None, "p80_ms": None, "tflops": None,
               "gbps": None, "pct_of_peak": None, "peak_mem_mb": None, "error": None}
        row.update(self.extra)
        row.update(values)
        return row


class Recorder:
    """Session state: collected rows, device facts, the time budget and progress lines.
    ``runtime``: the device runtime for every case (default: the one of each case's device; the dry
    run's DryRuntime). ``extension_ready``: called before the first row of the CUDA extension's
    kernels (impl "cuda"), which waits for bench/gpu_check.py's background build of it."""

    def __init__(self, root: str, budget_s: Optional[float], total_cases: int,
                 emit: Callable[[str], None] = lambda line: print(line, file=sys.__stderr__, flush=True),
                 runtime=None, extension_ready: Optional[Callable[[], None]] = None):
        self.root = root
        self.emit = emit  # writes one progress line past pytest's output capture
        self.runtime = runtime
        self.clock = runtime.now if runtime is not None else time.monotonic
        self.extension_ready = extension_ready
        self.info = device_info(root)
        self.peak = physics.peak_for(self.info["device"]) if self.info["device_type"] == "cuda" else None
        self.rows: list[dict] = []
        self.start = self.clock()
        self.budget_s = budget_s
        self.total = total_cases
        self.done = 0
        self.tier = None  # the profile tier of the case being run (bench/conftest.py sets it)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def add(self, case: Case, row: dict) -> None:
        if self.tier is not None:
            row["tier"] = self.tier
        self.rows.append(row)
        self.done += 1
        if row["error"]:
            what = row["error"]
        else:
            what = f"{row['median_ms']:.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})"
            if row.get("graph_median_ms") is not None:
                what += f", graph {row['graph_median_ms']:.3f} ms"
            if row["tflops"] is not None:
                what += f", {row['tflops']:.3g} TFLOP/s"
            if row["pct_of_peak"] is not None:
                what += f", {row['pct_of_peak']:.0f}% of floor"
            if row["peak_mem_mb"] is not None:
                what += f", {row['peak_mem_mb']:.0f} MB"
            if row.get("sdpa_backend"):
                what += f", SDPA {row['sdpa_backend']}"
            if row.get("rel_diff") is not None:
                what += f", rel diff {row['rel_diff']:.1e} vs {row['vs']}"
        line = (f"[{self.done:>3}/{self.total} {self.elapsed():6.0f}s] {case.op} {case.shape} {case.dtype_name} "
                f"{case.impl}: {what}")
        self.emit(line[:300])

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed() > self.budget_s

    def run(self, benchmark, case: Case, fn: Callable, input_sets: Sequence[tuple], device: torch.device,
            verify: Optional[Callable[[], dict]] = None):
        """Time fn(*s) over the rotating input sets; record a row. Unavailable backends and failing
        baselines become error rows and skip the test; a failing implementation of ours fails it.
        ``verify``: () -> {"rel_diff", "vs" (the baseline's name), optional "tol" (default MATCH_REL_TOL
        of the dtype), anything else to record}, run once untimed after the timing for OUR_IMPLS
        (baselines pass it too and it is skipped); a result over the tolerance turns the row into an
        error and fails the test."""
        if self.over_budget():
            self.add(case, case.row(error=f"skipped: time budget of {self.budget_s:.0f} s used up"))
            pytest.skip("benchmark time budget used up")
        if case.impl == "cuda" and self.extension_ready is not None:
            self.extension_ready()
            self.extension_ready = None
        rt = self.runtime or RUNTIMES[device.type]()
        knobs = rt.knobs
        benchmark.group = f"{case.op} {case.dtype_name} {case.shape}"
        benchmark.extra_info.update(op=case.op, impl=case.impl, calls_per_round=len(input_sets))

        def call_all():
            for s in input_sets:
                fn(*s)

        try:
            t0 = rt.now()
            if rt.measures_first_call:  # seconds per call: the warm-up call is measured too
                mem = rt.peak_memory_mb(lambda: fn(*input_sets[0]))
            else:
                fn(*input_sets[0])  # compile / autotune / load, untimed
                rt.sync()
            round_s = (rt.now() - t0) * len(input_sets)
            if not rt.measures_first_call or round_s < knobs["target_s"]:
                t0 = rt.now()
                call_all()
                rt.sync()
                round_s = rt.now() - t0
            rounds = int(min(knobs["max_rounds"], max(knobs["min_rounds"], math.ceil(knobs["target_s"] / round_s))))
            for _ in range(knobs["warmup_rounds"]):
                call_all()
                rt.sync()
            eager = time_rounds(call_all, rounds, rt, drive=lambda one_round, n: benchmark.pedantic(
                one_round, setup=rt.sync, rounds=n))
            if not rt.measures_first_call:
                mem = rt.peak_memory_mb(lambda: fn(*input_sets[0]))
            sdpa = rt.sdpa_backend(lambda: fn(*input_sets[0]))
            if verify is not None and case.impl in OUR_IMPLS:
                result = dict(verify())
                tol = result.pop("tol", MATCH_REL_TOL[case.dtype_name])
                case.extra.update(result, match_tol=tol, outputs_match=result["rel_diff"] <= tol)
            graph = self.graph_times(rt, fn, input_sets, rounds)
        except unavailable_errors() as e:
            self.add(case, case.row(error=f"unavailable: {e}"))
            pytest.skip(f"unavailable: {e}")
        except Exception as e:  # a failed implementation is a row, not a crash of the suite
            msg = f"error: {first_line(e)}"
            self.add(case, case.row(error=msg))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if case.impl in OUR_IMPLS:
                raise
            pytest.skip(f"baseline {case.impl} failed: {msg}")
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        median, p20, p80 = per_call_ms(eager, len(input_sets))
        row = case.row(median_ms=median, p20_ms=p20, p80_ms=p80, peak_mem_mb=mem, timer=rt.timer,
                       rounds=len(eager), calls_per_round=len(input_sets), sdpa_backend=sdpa, **graph,
                       **physics.roofline(case.flops, case.nbytes, median / 1e3, self.peak, case.dtype_name))
        if case.extra.get("outputs_match") is False:  # keeps its times, but no speed-up is claimed
            row["error"] = (f"wrong result: rel diff {case.extra['rel_diff']:.2e} vs {case.extra['vs']} "
                            f"> {case.extra['match_tol']:g}")
        self.add(case, row)
        if row["error"]:
            pytest.fail(f"{case.op} {case.impl} {case.shape}: {row['error']}")

    @staticmethod
    def graph_times(rt, fn: Callable, input_sets: Sequence[tuple], rounds: int) -> dict:
        """graph_median_ms / graph_p20_ms / graph_p80_ms of the calls replayed as CUDA graphs, the
        same rounds as the eager timing, and graph_error: None, or why there are no graph times."""
        none = dict(graph_median_ms=None, graph_p20_ms=None, graph_p80_ms=None)
        try:
            replay = rt.capture(fn, input_sets)
            times = time_rounds(replay, rounds, rt)
        except GraphUnavailable as e:
            return dict(none, graph_error=str(e))
        except Exception as e:  # the capture or a replay failed: the eager row stands
            return dict(none, graph_error=f"capture failed: {first_line(e)}"[:200])
        finally:
            replay = None  # the graphs and their memory pool go
            if rt.name == "cuda" and torch.cuda.is_available():
                torch.cuda.empty_cache()
        median, p20, p80 = per_call_ms(times, len(input_sets))
        return dict(graph_median_ms=median, graph_p20_ms=p20, graph_p80_ms=p80, graph_error=None)
