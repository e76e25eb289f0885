"""`make gpu-check` (`bash bench/gpu_check.sh`): validate everything on a fresh CUDA machine with torch
preinstalled and no network, in one command.

Sized for how this project gets GPUs: one command may run 10 minutes and a session has about 15
minutes of device time in all, the machine's start included. The whole check keeps to
GPU_CHECK_BUDGET_S (default 540 s: one call with timeout_s=590) and spends it in this order, every
step under a hard cap (SIGINT at the cap, SIGKILL KILL_GRACE_S later) that also keeps REPORT_S free
for the report:
  1. facts (GPU, versions, commit); the CUDA extension build starts in the background (CPU only);
  2. "goal": the benchmarks' goal tier (bench/cases.py: the rows that decide the speed goals,
     one shape each, ~250 s; the extension's rows last, waiting for its build);
  3. "tests": the kernel tests on CUDA, every test file whose tensors live on the GPU, spread over CPU
     workers with pytest-xdist when it is there (Triton compiles are CPU-bound);
  4. "cuda-tests": once the build is done, backend info and the extension's own GPU tests;
  5. "rest": the matrix and compile-heavy tiers with the time that is left (the budget cuts from the
     end; cases past it become "skipped: time budget" rows), added to the same results file;
  6. the report (results JSON in $OUT when set, markdown + PNG beside it) and a summary table last.
Every step's output also goes to gpu_check.log ($OUT/gpu_check.log when $OUT is set).

Knobs: GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (default "goal,tests,cuda-tests,rest"; "bench" = goal and
rest; e.g. "rest" for a second call), BENCH_PROFILE, BENCH_SELECT (a pytest -k expression for the
benchmarks), UNISPEECH_COMMIT (the commit measured: the device gets the working tree without .git).
Exit status: non-zero when the build, a test or one of OUR benchmarked implementations failed (wrong
results included), or no results file was written; a failing baseline is a row, not a failure.

``--dry-run`` (CI: tests/test_gpu_check_dry_run.py) runs the same orchestration without a GPU: a fake
clock, shared with the benchmark sessions through a file, advances by each step's estimate
(bench/estimates.py); the benchmark sessions run for real on the CPU (collection, order, tiers, the
harness's sizing, rounds and budget) with every case replaced by a stand-in costing its estimate;
``--worst-case`` charges every step its full cap instead and runs nothing.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from . import estimates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 540
GOAL_BUDGET_S = 250        # the goal tier's benchmark budget (its cases start within it)
IN_FLIGHT_S = 60           # past a benchmark budget: the case in flight and the results file
TESTS_CAP_S, EXT_TESTS_CAP_S, INFO_CAP_S, FACTS_CAP_S, BUILD_CAP_S = 150, 60, 60, 60, 300
REPORT_S = 40              # kept free by every step before the report
KILL_GRACE_S = 15
MIN_BENCH_S = 30           # a benchmark session with less than this is not started
GPU_TEST_FILES = ["tests/test_attention.py", "tests/test_attention_packed.py", "tests/test_pos_conv.py",
                  "tests/test_feature_encoder.py", "tests/test_first_conv_layer.py",
                  "tests/test_transformers_attention.py", "tests/test_gpu_model.py", "tests/test_autotune_path.py",
                  "tests/test_op_registration.py", "tests/test_padding.py", "tests/test_forced_align.py",
                  "tests/test_alignment.py", "tests/test_batch_invariance.py", "tests/test_low_precision.py",
                  "tests/test_rel_pos_attention.py"]
STEP_NAMES = ("goal", "tests", "cuda-tests", "rest")
FACTS = ("import os, shutil, subprocess, sys, torch, triton\n"
         "if shutil.which('nvidia-smi'): subprocess.run(['nvidia-smi', '-L'])\n"
         "print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__,"
         " '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0),"
         " '| sm %d%d' % torch.cuda.get_device_capability(), '| cores', os.cpu_count(),"
         " '| commit', os.environ['UNISPEECH_COMMIT'])")


@dataclass
class Step:
    name: str
    start_s: float
    end_s: float = 0.0
    rc: Optional[int] = None
    note: str = ""

    def line(self) -> str:
        word = "ok" if self.rc == 0 else ("skipped" if self.rc is None else f"FAILED (rc {self.rc}"
                                          + (", timed out)" if self.rc == 124 else ")"))
        return (f"{self.name + ':':<30} {word} in {self.end_s - self.start_s:.0f} s"
                + (f" ({self.note})" if self.note else ""))


@dataclass
class Background:
    """A step running beside the others: its thread, and when it ended (or, dry, will end)."""
    thread: Optional[threading.Thread] = None
    done_s: Optional[float] = None


class Log:
    """Lines to stdout and to the log file."""

    def __init__(self, path: str):
        self.file = open(path, "a")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.file.write(text)
            self.file.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")


class Runner:
    """Runs commands for real, each in its own process group, killed at its cap."""

    def __init__(self, log: Log):
        self.log = log
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def run(self, cmd, cap_s: float, env: dict, estimate_s: float = 0.0, out=None) -> int:
        """The command's return code; 124 when it ran into ``cap_s`` (then SIGINT, SIGKILL later)."""
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", **group)
        sink = out.write if out is not None else self.log.write
        pump = threading.Thread(target=lambda: [sink(line) for line in proc.stdout], daemon=True)
        pump.start()
        try:
            rc = proc.wait(timeout=max(1.0, cap_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
        pump.join(timeout=5)
        return rc

    def background(self, cmd, cap_s: float, env: dict, log_path: str, rc_path: str, estimate_s: float) -> Background:
        """Start ``cmd``; its output goes to ``log_path`` and its return code to ``rc_path`` at the end."""
        job = Background()

        def build():
            with open(log_path, "w") as f:
                rc = self.run(cmd, cap_s, env, out=f)
            with open(rc_path, "w") as f:
                f.write(str(rc))
            job.done_s = self.elapsed()

        job.thread = threading.Thread(target=build, daemon=True)
        job.thread.start()
        return job

    def wait(self, job: Background) -> None:
        job.thread.join()


class DryRunner(Runner):
    """Runs nothing but the benchmark sessions (themselves dry: BENCH_DRY_RUN) and the report; every
    other step costs its estimate (at most its cap) on a fake clock kept in ``clock_file``.
    ``worst_case``: every step costs its cap and the grace after it, and nothing runs."""

    def __init__(self, log: Log, clock_file: str, worst_case: bool = False):
        super().__init__(log)
        self.clock_file, self.worst_case = clock_file, worst_case
        self.advance(0.0)

    def elapsed(self) -> float:
        with open(self.clock_file) as f:
            return float(f.read() or 0.0)

    def advance(self, seconds: float) -> None:
        now = self.elapsed() if os.path.exists(self.clock_file) else 0.0
        with open(self.clock_file, "w") as f:
            f.write(repr(now + seconds))

    def run(self, cmd, cap_s: float, env: dict, estimate_s: float = 0.0, out=None) -> int:
        if self.worst_case:
            self.advance(cap_s + KILL_GRACE_S)
            return 124
        if env.get("BENCH_DRY_RUN") or "bench.report" in cmd:
            start = self.elapsed()
            rc = super().run(cmd, cap_s, env, out=out)  # real time here is the CPU's, not the check's
            if self.elapsed() - start > cap_s:  # it would have been killed at its cap
                self.advance(start + cap_s + KILL_GRACE_S - self.elapsed())
                return 124
            if "bench.report" in cmd:
                self.advance(estimate_s)
            return rc
        self.advance(min(estimate_s, cap_s + KILL_GRACE_S))
        return 0 if estimate_s <= cap_s else 124

    def background(self, cmd, cap_s: float, env: dict, log_path: str, rc_path: str, estimate_s: float) -> Background:
        return Background(done_s=self.elapsed() + (cap_s if self.worst_case else min(estimate_s, cap_s)))

    def wait(self, job: Background) -> None:
        self.advance(max(0.0, job.done_s - self.elapsed()))


@dataclass
class Check:
    runner: Runner
    log: Log
    out_dir: str      # logs (and the dry run's clock)
    results_dir: str  # the results file, its report and plot
    env: dict
    dry_run: bool = False
    budget_s: float = BUDGET_S
    steps_wanted: tuple = STEP_NAMES
    steps: list = field(default_factory=list)
    failed: bool = False

    def left(self) -> float:
        return self.budget_s - self.runner.elapsed()

    def cap(self, nominal: float) -> float:
        """A step's cap: its own, or what is left before the report's reserve."""
        return min(nominal, self.left() - REPORT_S)

    def step(self, name: str, cmd, cap_s: float, env=None, estimate_s: float = 0.0, fails: bool = True,
             out=None, note: str = "") -> Optional[int]:
        """Run one step under ``cap_s`` (skipped below 1 s); ``estimate_s`` is what a dry run charges."""
        step = Step(name, self.runner.elapsed(), note=note)
        self.steps.append(step)
        if cap_s < 1:
            step.end_s, step.note = step.start_s, "no time left"
            self.log.line(f"\n=== [{step.start_s:.0f} s] {name}: skipped, no time left")
            return None
        self.log.line(f"\n=== [{step.start_s:.0f} s] {name} (cap {cap_s:.0f} s)")
        step.rc = self.runner.run(cmd, cap_s, dict(self.env, **(env or {})), estimate_s, out=out)
        if step.rc == 5 and "pytest" in cmd:
            step.rc, step.note = 0, "no test collected"
        step.end_s = self.runner.elapsed()
        self.failed |= fails and step.rc != 0
        return step.rc

    def bench(self, name: str, tiers: str, budget_s: float, extra_env: dict) -> None:
        """One benchmark session of ``tiers``; cases start while ``budget_s`` lasts."""
        if budget_s < MIN_BENCH_S:
            self.step(f"benchmarks: {name}", [], 0)
            return
        select = ["-k", self.env["BENCH_SELECT"]] if self.env.get("BENCH_SELECT") else []
        env = dict(extra_env, BENCH_TIERS=tiers, BENCH_BUDGET_S=f"{budget_s:.0f}")
        self.step(f"benchmarks: {name}", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                          "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name",
                                          *select, "bench/"], budget_s + IN_FLIGHT_S, env, budget_s)

    def run(self) -> int:
        env = self.env
        py = sys.executable
        self.log.line(f"=== gpu-check at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, budget "
                      f"{self.budget_s:.0f} s, steps {','.join(self.steps_wanted)}"
                      + (" (DRY RUN)" if self.dry_run else ""))
        if not self.dry_run and not self.preflight():
            return 2
        self.step("facts", [py, "-c", FACTS], FACTS_CAP_S, estimate_s=estimates.STEP_S["facts"], fails=False)
        if self.env["UNISPEECH_COMMIT"] == "unknown":
            self.log.line("gpu-check: no .git here: set UNISPEECH_COMMIT=<sha> so the results name what they measured")
        rc_file = os.path.join(tempfile.mkdtemp(), "build.rc")
        arch = env.get("TORCH_CUDA_ARCH_LIST") or self.query(
            "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
        build_env = dict(env, TORCH_CUDA_ARCH_LIST=arch or "9.0", MAX_JOBS=env.get("MAX_JOBS", "4"), FORCE_CUDA="1")
        build_t0 = self.runner.elapsed()
        build = self.runner.background([py, "setup.py", "-q", "build_ext", "--inplace"], BUILD_CAP_S, build_env,
                                       os.path.join(self.out_dir, "build.log"), rc_file,
                                       estimates.STEP_S["build extension"])
        bench_env = dict(BENCH_PROFILE=env.get("BENCH_PROFILE", "check"), BENCH_RESULTS_DIR=self.results_dir,
                         BENCH_RUN_ID=f"gpu-check-{os.getpid()}-{int(time.time())}")
        if self.dry_run:
            bench_env.update(BENCH_DRY_RUN=self.runner.clock_file, BENCH_DRY_BUILD_DONE_S=repr(build.done_s))
        else:
            bench_env.update(BENCH_CUDA_BUILD_RC=rc_file, BENCH_CUDA_BUILD_TIMEOUT_S=str(BUILD_CAP_S))
        marker = time.time()
        if "goal" in self.steps_wanted:
            self.bench("goal tier", "goal", min(GOAL_BUDGET_S, self.left() - REPORT_S - IN_FLIGHT_S), bench_env)
        if "tests" in self.steps_wanted:
            xdist = ["-n", str(min(12, os.cpu_count() or 1))] if self.query("import xdist") is not None else []
            self.step("kernel tests on CUDA", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                                               "--durations=10", *xdist, *GPU_TEST_FILES],
                      self.cap(TESTS_CAP_S), estimate_s=TESTS_CAP_S)
        if "cuda-tests" in self.steps_wanted:
            build_ok = self.build_result(build, rc_file, build_t0)
            self.step("backend info", [py, "-m", "unispeech_kernels.info"], self.cap(INFO_CAP_S),
                      estimate_s=estimates.STEP_S["backend info"], fails=False)
            if build_ok:
                self.step("extension tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                                              "tests/test_cuda_ext.py"], self.cap(EXT_TESTS_CAP_S),
                          env=dict(UNISPEECH_REQUIRE_CUDA_EXT="1"), estimate_s=estimates.STEP_S["extension tests"])
        if "rest" in self.steps_wanted:
            self.bench("matrix and compile tiers", "matrix,compile", self.left() - REPORT_S - IN_FLIGHT_S, bench_env)
        if "cuda-tests" not in self.steps_wanted:  # its end, for the record (the benchmarks waited where they had to)
            self.build_result(build, rc_file, build_t0)
        shutil.rmtree(os.path.dirname(rc_file), ignore_errors=True)
        return self.finish(marker)

    def preflight(self) -> bool:
        """A CUDA GPU and pytest-benchmark (installed from .wheels/ when missing)."""
        if self.query("import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)") is None:
            self.log.line(f"gpu-check: {sys.executable} sees no CUDA GPU (torch.cuda.is_available() is False); "
                          "nothing to check")
            return False
        if self.query("import pytest, pytest_benchmark") is None:
            if not os.path.isdir(os.path.join(ROOT, ".wheels")):
                self.log.line("gpu-check: pytest / pytest-benchmark missing and no .wheels/ here: run 'make wheels' "
                              "on a machine with network and carry .wheels/ along")
                return False
            self.step("install test deps", [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                            "--find-links", ".wheels", "pytest-benchmark", "py-cpuinfo"], 60)
        return True

    def query(self, code: str) -> Optional[str]:
        """stdout of ``python -c code`` (None when it fails); in a dry run, what a GPU machine answers."""
        if self.dry_run:
            return "9.0" if "capability" in code else ""
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=self.env, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def build_result(self, build: Background, rc_file: str, t0: float) -> bool:
        """Wait for the background build; record it as a step."""
        self.runner.wait(build)
        step = Step("build extension", t0, build.done_s, note="background, build.log")
        self.steps.append(step)
        if self.dry_run:
            step.rc = 0
            return True
        try:
            with open(rc_file) as f:
                step.rc = int(f.read())
        except (OSError, ValueError):
            step.rc = 1
        if step.rc == 0 and not glob.glob(os.path.join(ROOT, "unispeech_kernels", "_C*.so")):
            step.rc, step.note = 3, "setup.py built no extension: see build.log"
        self.failed |= step.rc != 0
        return step.rc == 0

    def finish(self, marker: float) -> int:
        """The report of the run's results file (+ .md, .png), the steps and the summary table last."""
        summary = "(no benchmarks run)"
        found = sorted(p for p in glob.glob(os.path.join(self.results_dir, "*.json")) if os.path.getmtime(p) >= marker)
        if {"goal", "rest"} & set(self.steps_wanted):
            if not found and not getattr(self.runner, "worst_case", False):
                now = self.runner.elapsed()
                self.steps.append(Step("results", now, now, 1, "no results file written"))
                self.failed = True
            else:
                cmd = [sys.executable, "-m", "bench.report", "--summary", *found[-1:],
                       *(["--no-plot"] if self.dry_run else [])]
                text = io.StringIO()
                rc = self.step("report", cmd, REPORT_S, estimate_s=estimates.STEP_S["report"], out=text,
                               note=" ".join(found[-1:]))
                summary = text.getvalue().strip() if rc == 0 else f"(no summary: the report failed)\n{text.getvalue()}"
        self.log.line(f"\n=== gpu-check done in {self.runner.elapsed():.0f} s (commit {self.env['UNISPEECH_COMMIT']})")
        for step in self.steps:
            self.log.line(step.line())
        self.log.line()
        self.log.line(summary)
        return 1 if self.failed else 0


def commit(env: dict) -> str:
    if env.get("UNISPEECH_COMMIT"):
        return env["UNISPEECH_COMMIT"]
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def make_check(dry_run: bool = False, worst_case: bool = False, out_dir: Optional[str] = None,
               environ: Optional[dict] = None) -> Check:
    environ = dict(os.environ if environ is None else environ)
    dry_run = dry_run or worst_case
    given = out_dir or environ.get("OUT")
    out_dir = given or tempfile.mkdtemp()
    # results: BENCH_RESULTS_DIR, else $OUT (on the lent machine they come back with the reply), else
    # bench/results; a dry run's beside its log only (they are not measurements)
    results_dir = out_dir if dry_run else (environ.get("BENCH_RESULTS_DIR") or given
                                           or os.path.join(ROOT, "bench", "results"))
    os.makedirs(out_dir, exist_ok=True)
    log = Log(os.path.join(out_dir, "gpu_check.log"))
    env = dict(environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["UNISPEECH_COMMIT"] = commit(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    if not env.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    steps = environ.get("GPU_CHECK_STEPS", ",".join(STEP_NAMES)).replace("bench", "goal,rest").split(",")
    unknown = sorted(set(steps) - set(STEP_NAMES))
    if unknown:
        raise SystemExit(f"GPU_CHECK_STEPS: unknown steps {unknown}; valid: {list(STEP_NAMES)} and 'bench'")
    runner = DryRunner(log, os.path.join(out_dir, "clock"), worst_case) if dry_run else Runner(log)
    return Check(runner, log, out_dir, results_dir, env, dry_run=dry_run,
                 budget_s=float(environ.get("GPU_CHECK_BUDGET_S", BUDGET_S)), steps_wanted=tuple(steps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: a fake clock, estimates, dry benchmark sessions")
    ap.add_argument("--worst-case", action="store_true", help="dry, with every step at its cap; nothing runs")
    ap.add_argument("--out", help="output folder (default $OUT, else a temporary one)")
    args = ap.parse_args(argv)
    return make_check(args.dry_run, args.worst_case, args.out).run()


if __name__ == "__main__":
    sys.exit(main())
