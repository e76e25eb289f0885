"""Timing, memory and result rows shared by every benchmark file.

How a case is timed (pytest-benchmark is the timer and the single source of the numbers):
1. one untimed call (module load, autotuning, torch.compile) -- a backend that cannot run the input
   raises BackendUnavailableError here and becomes an "unavailable" row;
2. one untimed round to size the run: rounds = target time / round time, clamped (cases.TIMING)
   (on a CPU, when the first call alone already exceeds the target, its time sizes the run);
3. ``benchmark.pedantic``: warm-up rounds, then the timed rounds. One round calls the op once on
   EACH of k pre-made input sets (rotating inputs: together they are larger than the GPU's L2, so no
   call finds its inputs in cache) and then synchronizes the device; the setup before each round
   synchronizes too, so a round's wall time is exactly its k calls' device time plus launch overhead
   that does not overlap. Per-call time = round time / k; we report its median, p20 and p80.
4. peak memory of one more call (on a CPU: of the first call, sparing a multi-second forward): on
   CUDA ``torch.cuda.max_memory_allocated`` during the call minus
   what was allocated before it (inputs, weights and the other input sets excluded); on CPU the
   growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs before the
   call) over the resident set before it (after malloc_trim, so pages freed by earlier cases do not
   hide this call's growth) -- tracemalloc does not see torch's allocations. Where the
   reset is refused, ru_maxrss growth is used, which reads 0 when an earlier case peaked higher.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
import platform
import re
import resource
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
from .report import OUR_IMPLS  # ours (verified; a failure fails the run), everything else a baseline

try:
    from unispeech_kernels import BackendUnavailableError
except Exception:  # the suite still times the baselines when our package does not import
    class BackendUnavailableError(RuntimeError):
        pass


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


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS so the resident set before a call is its live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Extra memory one call needs at its peak (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - before) / 2**20
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _proc_status_mb("VmRSS")
        out = fn()
        peak = _proc_status_mb("VmHWM")
        del out
        if before is not None and peak is not None:
            return max(0.0, peak - before)
    except OSError:
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = fn()
    del out
    return max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - before)


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
    """Session state: collected rows, device facts, the time budget and progress lines."""

    def __init__(self, root: str, budget_s: Optional[float], total_cases: int,
                 emit: Callable[[str], None] = lambda line: print(line, file=sys.__stderr__, flush=True)):
        self.root = root
        self.emit = emit  # writes one progress line past pytest's output capture
        self.info = device_info(root)
        self.peak = physics.peak_for(self.info["device"]) if self.info["device_type"] == "cuda" else None
        self.rows: list[dict] = []
        self.start = time.time()
        self.budget_s = budget_s
        self.total = total_cases
        self.done = 0

    def elapsed(self) -> float:
        return time.time() - self.start

    def add(self, case: Case, row: dict) -> None:
        self.rows.append(row)
        self.done += 1
        if row["error"]:
            what = row["error"]
        else:
            what = f"{row['median_ms']:.3f} ms (p20 {row['p20_ms']:.3f}, p80 {row['p80_ms']:.3f})"
            if row["tflops"] is not None:
                what += f", {row['tflops']:.3g} TFLOP/s"
            if row["pct_of_peak"] is not None:
                what += f", {row['pct_of_peak']:.0f}% of floor"
            if row["peak_mem_mb"] is not None:
                what += f", {row['peak_mem_mb']:.0f} MB"
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
        benchmark.group = f"{case.op} {case.dtype_name} {case.shape}"
        benchmark.extra_info.update(op=case.op, impl=case.impl, calls_per_round=len(input_sets))
        knobs = TIMING[device.type]

        def one_round():
            for s in input_sets:
                fn(*s)
            sync(device)

        try:
            t0 = time.perf_counter()
            if device.type == "cpu":  # a CPU forward takes seconds: the warm-up call is measured too
                mem = peak_memory_mb(lambda: fn(*input_sets[0]), device)
            else:
                fn(*input_sets[0])  # compile / autotune / load, untimed
                sync(device)
            round_s = (time.perf_counter() - t0) * len(input_sets)
            if device.type == "cuda" or round_s < knobs["target_s"]:
                t0 = time.perf_counter()
                one_round()
                round_s = time.perf_counter() - t0
            rounds = int(min(knobs["max_rounds"], max(knobs["min_rounds"], math.ceil(knobs["target_s"] / round_s))))
            benchmark.pedantic(one_round, setup=lambda: sync(device), rounds=rounds,
                               warmup_rounds=knobs["warmup_rounds"])
            if device.type == "cuda":
                mem = peak_memory_mb(lambda: fn(*input_sets[0]), device)
            if verify is not None and case.impl in OUR_IMPLS:
                result = dict(verify())
                tol = result.pop("tol", MATCH_REL_TOL[case.dtype_name])
                case.extra.update(result, match_tol=tol, outputs_match=result["rel_diff"] <= tol)
        except BackendUnavailableError as e:
            self.add(case, case.row(error=f"unavailable: {e}"))
            pytest.skip(f"unavailable: {e}")
        except Exception as e:  # a failed implementation is a row, not a crash of the suite
            msg = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.add(case, case.row(error=msg))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if case.impl in OUR_IMPLS:
                raise
            pytest.skip(f"baseline {case.impl} failed: {msg}")
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        per_call = np.asarray(benchmark.stats.stats.data) / len(input_sets)
        median = float(np.median(per_call))
        row = case.row(median_ms=1e3 * median, p20_ms=1e3 * float(np.percentile(per_call, 20)),
                       p80_ms=1e3 * float(np.percentile(per_call, 80)), peak_mem_mb=mem,
                       rounds=len(per_call), calls_per_round=len(input_sets),
                       **physics.roofline(case.flops, case.nbytes, median, self.peak, case.dtype_name))
        if case.extra.get("outputs_match") is False:  # keeps its times, but no speed-up is claimed
            row["error"] = (f"wrong result: rel diff {case.extra['rel_diff']:.2e} vs {case.extra['vs']} "
                            f"> {case.extra['match_tol']:g}")
        self.add(case, row)
        if row["error"]:
            pytest.fail(f"{case.op} {case.impl} {case.shape}: {row['error']}")
