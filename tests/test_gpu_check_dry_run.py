"""The GPU check's whole orchestration on a CPU, on a fake clock (bench/gpu_check.py --dry-run): its
order (the goal tier first and whole, the GPU tests after it, the matrix before the compile-heavy
baselines) and that its budget fits one 10-minute device command with a margin, on the expected
times (bench/estimates.py says where each comes from) and with every step at its cap.

The benchmark sessions run for real (collection, the profile's order, tiers, the harness's rounds,
graphs and budget, the results file, the report); only the cases themselves are stand-ins that cost
their estimate. The first call is the documented one, the second the documented follow-up that runs
the rest (bench/results/README.md)."""
import json
import os
import sys

import pytest

from bench import cases, gpu_check

COMMAND_LIMIT_S = 600    # the device tool's limit for one command
TIMEOUT_S = 590          # the timeout_s the results README gives the call
GOAL_WITHIN_S = 260      # "the first ~250 s are the goal rows"


def dry_check(tmp_path_factory, **env):
    out = tmp_path_factory.mktemp("check")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "GPU_CHECK_"))}
    check = gpu_check.make_check(dry_run=True, out_dir=str(out), environ=dict(environ, UNISPEECH_COMMIT="dry", **env))
    rc = check.run()
    (results,) = [p for p in out.iterdir() if p.suffix == ".json"]
    return check, rc, json.loads(results.read_text())


@pytest.fixture(scope="module")
def first_call(tmp_path_factory):
    return dry_check(tmp_path_factory)


@pytest.fixture(scope="module")
def second_call(tmp_path_factory):
    """The follow-up call in the minutes a session has left after the first (bench/results/README.md)."""
    return dry_check(tmp_path_factory, GPU_CHECK_STEPS="rest", GPU_CHECK_BUDGET_S="300")


def steps_by_name(check):
    return {step.name: step for step in check.steps}


def test_first_call_runs_the_goal_tier_first_and_whole(first_call):
    check, rc, doc = first_call
    assert rc == 0 and doc["dry_run"] is True and doc["profile"] == "check"
    goal = [e for e in cases.entries(name="check") if e["tier"] == "goal"]
    shaped = sum(1 for op in {e["op"] for e in goal} for c in cases.expand(op, "check")
                 if cases.place(op, c, "check")[0] == "goal")
    own = sum(len(e["impls"]) * len(e.get("models", [None])) for e in goal if "batch" not in e)
    rows = doc["rows"]
    assert {r["tier"] for r in rows} == {"goal"} and all(r["error"] is None for r in rows)  # none skipped
    assert len(rows) == shaped + own and {"forced_align", "align_e2e"} <= {r["op"] for r in rows}
    assert [r["op"] for r in rows][-3:] == ["first_conv_layer_fwd"] * 3  # the extension's rows last
    steps = steps_by_name(check)
    goal, tests = steps["benchmarks: goal tier"], steps["kernel tests on CUDA"]
    assert [s.name for s in check.steps][:3] == ["facts", "benchmarks: goal tier", "kernel tests on CUDA"]
    assert goal.end_s <= GOAL_WITHIN_S and goal.end_s <= tests.start_s
    assert steps["build extension"].end_s < goal.end_s  # built before the extension's rows: they do not wait
    assert steps["extension tests"].start_s >= tests.end_s


def test_first_call_fits_its_command(first_call):
    check, _, _ = first_call
    assert check.runner.elapsed() <= check.budget_s <= TIMEOUT_S - 40
    assert check.steps[-1].name == "report" and check.steps[-1].rc == 0
    for step in check.steps:  # every step within its cap (the report's own reserve included)
        assert step.end_s <= check.budget_s, step.line()


def test_worst_case_every_step_at_its_cap_still_ends_before_the_timeout(tmp_path):
    check = gpu_check.make_check(worst_case=True, out_dir=str(tmp_path), environ=dict(UNISPEECH_COMMIT="dry"))
    check.run()
    assert check.runner.elapsed() <= TIMEOUT_S - 10 < COMMAND_LIMIT_S
    ran = [s for s in check.steps if s.rc is not None and s.name != "build extension"]
    assert [s.name for s in ran][:3] == ["facts", "benchmarks: goal tier", "kernel tests on CUDA"]
    assert all(s.end_s - s.start_s <= gpu_check.GOAL_BUDGET_S + gpu_check.IN_FLIGHT_S + gpu_check.KILL_GRACE_S
               for s in ran)


def test_second_call_runs_the_matrix_then_the_compile_heavy_baselines(second_call):
    check, rc, doc = second_call
    assert rc == 0
    tiers = [r["tier"] for r in doc["rows"]]
    assert tiers[0] == "matrix" and "compile" in tiers and tiers == sorted(tiers, key=cases.TIERS.index)
    assert "goal" not in tiers and "kernel tests on CUDA" not in steps_by_name(check)
    compiled = {r["impl"] for r in doc["rows"] if r["tier"] == "compile"}
    assert compiled <= {"flex", "flex_keys", "compile", "hf_compile"} and "flex" in compiled
    assert check.runner.elapsed() <= check.budget_s


def test_a_real_step_is_stopped_at_its_cap_and_a_background_step_reports_its_return_code(tmp_path):
    """What runs the steps on the GPU machine: SIGINT at the cap (rc 124), output into the log; the
    background build's return code lands in its file, which the extension's rows wait for."""
    log = gpu_check.Log(str(tmp_path / "log"))
    runner = gpu_check.Runner(log)
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    assert runner.run(sleeper, cap_s=2, env=dict(os.environ)) == 124
    assert runner.elapsed() < 30 and "started" in (tmp_path / "log").read_text()
    job = runner.background([sys.executable, "-c", "print('built'); raise SystemExit(3)"], 30, dict(os.environ),
                            str(tmp_path / "build.log"), str(tmp_path / "build.rc"), estimate_s=0.0)
    runner.wait(job)
    assert (tmp_path / "build.rc").read_text() == "3" and "built" in (tmp_path / "build.log").read_text()
    assert job.done_s is not None and job.done_s <= runner.elapsed()
