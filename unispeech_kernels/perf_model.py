"""Static performance model of every shipped Triton kernel on an H100 / H200, without a GPU:
``python -m unispeech_kernels.perf_model`` (run by ``make check-kernels``).

What it reads. Every ``aot_specs()`` entry (``check_kernels.spec_tasks``) compiled for sm_90a by this
interpreter's Triton and by each ``--triton-python`` interpreter's (``make check-kernels`` passes the
GPU machine's Triton 3.6 in ``.venv-triton36``), through ``check_kernels.compile_spec`` (builds are
reused from ``--cache``): registers, shared memory and spills (ptxas' report), and the SASS of the
cubin (``sass.py``: instructions, tensor-core instructions, global / shared loads and stores and
barriers per iteration of the main loop and of the other loops, instructions outside loops). Each
spec's launches at the benchmark shapes come from ``perf_workloads.py`` (grid, loop trips, FLOPs,
minimum bytes).

Occupancy: resident blocks per SM = the least of 32 blocks, 64 warps / warps per block, registers
(per warp: regs x 32 rounded up to 256, a scheduler's quarter of the 65536 holding a whole number of
warps) and shared memory (the block's, rounded up to 128 B, plus 1 KB reserved, out of 228 KB); the
limiter is named.

Time of one launch on device d (``predict``), all terms in seconds:
  busiest    = ceil(P / SMs) / (P / SMs): the busiest SM's share of the P working programs over the
               average (>= 1: partial waves and grids smaller than the GPU)
  resident   = min(occupancy, ceil(P / SMs)) x warps per block: warps an SM holds at once
  warp_rate  = min(1, resident / (4 schedulers x WARPS_PER_SCHEDULER)): how often a scheduler finds a
               warp ready to issue (latency hiding)
  I          = warp-instructions issued: warps x (main-loop instructions x trips + each other loop's
               instructions x its trips + the instructions outside loops, once per program)
  t_issue    = I x busiest / (SMs x 4 x ISSUE_PER_CLOCK x CLOCK_HZ x warp_rate)
  t_mma      = tensor FLOPs the SASS issues (HGMMA / HMMA shapes x trips; padding included)
               x busiest / (datasheet dense bf16 TFLOP/s x MMA_EFFICIENCY[wgmma | mma.sync])
  t_dram     = minimum bytes of the launch / (measured bandwidth x DRAM_EFFICIENCY)
  t_l2       = bytes the global loads request (load width x 32 lanes x trips) x busiest / L2_TBPS
  time       = max(t_issue, t_mma, t_dram, t_l2) + LAUNCH_US; ``bound`` names the largest term.
An op (a benchmark row: bench/results/README.md) is the sum of its parts (``perf_workloads.Launch.part``),
each taking the spec (tile config) the model predicts fastest, as autotuning would; its TFLOP/s and
GB/s use the op's own counts (``bench/physics.py``), and ``pct_of_floor`` = the physics floor
(max(FLOPs / measured TFLOP/s, bytes / measured TB/s)) / predicted time, as the benchmark's pct_of_peak.

Constants (``Constants``): every one but the device numbers is a starting guess, to be FITTED BY THE
FIRST GPU RUN (``--fit``):
  CLOCK_HZ            1.755 GHz: H100 / H200 SXM boost is 1.98 GHz, lower under sustained tensor load
  ISSUE_PER_CLOCK     1 warp-instruction per scheduler per clock (a Hopper SM has 4 schedulers)
  WARPS_PER_SCHEDULER 4: dependent FP32 math waits ~4 cycles, MUFU and shared-memory results tens, so a
                      scheduler needs a few ready warps to issue every clock
  MMA_EFFICIENCY      wgmma 0.80 (790 of the datasheet's 989 TFLOP/s: the bf16 matmul measured on our
                      machines, design.md); mma.sync 0.60 (Hopper runs Ampere-style mma.sync well below
                      wgmma's rate)
  DRAM_EFFICIENCY     1.0 of the measured copy bandwidth (H100 3.0 TB/s, H200 4.3; datasheet 3.35 / 4.8)
  L2_TBPS             10: no datasheet number; published microbenchmarks put an H100 SXM's L2 at roughly
                      7-12 TB/s (a 128 x 128-tile bf16 GEMM requests one byte per 64 FLOPs: 10 TB/s caps
                      it at 640 TFLOP/s)
  LAUNCH_US           3: one kernel's launch and ramp, back to back on one stream
Device numbers: ``bench/physics.py`` (PEAKS: tensor rate and bandwidth; SM90: SMs and per-SM limits).

What it does not see: memory latency beyond the warp_rate term, bank conflicts, L2 hit rates (t_dram
assumes each byte once, t_l2 every request), dependent-instruction stalls, clocks under power limits,
the host. Early-exit programs (padding) cost nothing. It ranks and tracks changes; the GPU's numbers
decide (``--fit`` measures its error).

Outputs: ``bench/results/perf_model.json`` (per kernel and Triton version: the build and each launch's
terms and prediction on H100 and H200; per op: the sums) and ``bench/results/perf_model.md``;
``--compare OLD.json`` prints before / after; ``--fit RESULTS.json`` compares a benchmark results
file with the predictions and fits the constants. Exit status 1 when any build fails or spills under
any Triton version.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

from . import check_kernels as ck
from .sass import SassStats, analyse, disassemble

ARCH = 90
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "bench", "results", "perf_model.json")
DEVICES = ("H100", "H200")
TERMS = ("issue", "mma", "dram", "l2")


@dataclass(frozen=True)
class Constants:
    clock_hz: float = 1.755e9
    issue_per_clock: float = 1.0
    warps_per_scheduler: float = 4.0
    mma_efficiency_wgmma: float = 0.80
    mma_efficiency_mma_sync: float = 0.60
    dram_efficiency: float = 1.0
    l2_tbps: float = 10.0
    launch_us: float = 3.0


def device(name: str) -> dict:
    """Ceilings of an H100 / H200 (bench/physics.py): datasheet tensor rate, measured bandwidth, SM."""
    from bench import physics

    peak = physics.peak_for(name)
    return dict(physics.SM90, name=peak.name, tensor_tflops=peak.datasheet_tflops, measured_tflops=peak.tensor_tflops,
                tbps=peak.tbps)


def occupancy(regs: int, smem: int, warps: int, limits: dict) -> tuple:
    """(resident blocks per SM, what limits it: "blocks" | "warps" | "registers" | "smem")."""
    per_warp = math.ceil(max(regs, 1) * 32 / limits["reg_unit"]) * limits["reg_unit"]
    quarter = limits["regs"] // limits["schedulers"]
    by_regs = (quarter // per_warp) * limits["schedulers"] // warps
    block_smem = math.ceil(smem / limits["smem_unit"]) * limits["smem_unit"] + limits["smem_reserved"]
    bounds = {"blocks": limits["blocks"], "warps": limits["warps"] // warps, "registers": by_regs,
              "smem": limits["smem"] // block_smem}
    limiter = min(bounds, key=lambda k: bounds[k])
    return bounds[limiter], limiter


def predict(build: dict, launch: dict, dev: dict, k: Constants) -> dict:
    """Terms (µs), time and bound of one launch (see the module docstring); its TFLOP/s and GB/s
    are the launch's flops and nbytes over that time."""
    sass = SassStats.from_json(build["sass"])
    warps, sms, work = build["num_warps"], dev["sms"], max(launch["work_blocks"], 1)
    busiest = math.ceil(work / sms) / (work / sms)
    resident = min(build["blocks_per_sm"], math.ceil(work / sms)) * warps
    warp_rate = min(1.0, resident / (dev["schedulers"] * k.warps_per_scheduler))
    instr = sass.outside_loops * work
    mma_flops = l2_bytes = 0.0
    for i, loop in enumerate(sass.loops):  # a loop the workload has no trips for runs once per program
        trips = launch["trips"] if i == sass.main and launch["trips"] else launch["outer_trips"] * work
        instr += loop.instructions * trips
        mma_flops += loop.mma_flops * trips
        l2_bytes += loop.global_load_bytes * trips
    efficiency = k.mma_efficiency_wgmma if sass.mma_kind == "wgmma" else k.mma_efficiency_mma_sync
    terms = {"issue": instr * warps * busiest / (sms * dev["schedulers"] * k.issue_per_clock * k.clock_hz * warp_rate),
             "mma": mma_flops * warps * busiest / (dev["tensor_tflops"] * 1e12 * efficiency),
             "dram": launch["nbytes"] / (dev["tbps"] * 1e12 * k.dram_efficiency),
             "l2": l2_bytes * warps * busiest / (k.l2_tbps * 1e12)}
    terms = {name: t * 1e6 for name, t in terms.items()}
    terms["launch"] = k.launch_us
    time_us, bound = kernel_time(terms)
    return {"time_us": _sig(time_us), "bound": bound, "terms": {t: _sig(v) for t, v in terms.items()}}


def kernel_time(terms: dict, scales: Optional[dict] = None) -> tuple:
    """(µs, bound) of a launch from its terms, each scaled (``fit``) by ``scales[term]``."""
    s = scales or {}
    scaled = {t: terms[t] * s.get(t, 1.0) for t in TERMS}
    bound = max(scaled, key=lambda t: scaled[t])
    return scaled[bound] + terms["launch"] * s.get("launch", 1.0), bound


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")



# ---- builds ----------------------------------------------------------------------------------------
def static_build(module: str, index: int, cache_dir: Optional[str]) -> dict:
    """Worker task: spec ``index`` of ``module`` compiled for sm_90a and read (registers, SASS loops)."""
    spec = ck.spec_at(module, index)
    build = ck.compile_spec(spec, ARCH, cache_dir)
    row = ck.judge(spec, build)
    out = {"name": build.name, "kernel": spec["fn"].__name__, "triton": build.triton,
           "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "status": row.status}
    if build.error:
        return out
    out.update(regs=row.regs, smem=row.smem or 0, spill_stores=row.spill_stores, spill_loads=row.spill_loads,
               tensor_core=row.tensor_core)
    try:
        out["sass"] = analyse(disassemble(build.cubin, cache_dir)).to_json()
    except Exception as e:  # no nvdisasm / a listing it cannot read: the build's failure in the table
        out["status"] = f"FAIL: SASS: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
    return out


def collect_builds(tasks: list, jobs: int, cache_dir: Optional[str]) -> list:
    return ck.parallel_map(static_build, [(m, i, cache_dir) for m, i in tasks], jobs)


def start_other_toolchain(python: str, out_json: str, jobs: int, cache_dir: Optional[str], specs_from):
    """This tool's builds under another interpreter (another Triton), in the background."""
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [python, "-m", "unispeech_kernels.perf_model", "--builds-only", "--json", out_json, "--jobs", str(jobs)]
    cmd += ["--cache", cache_dir] if cache_dir else []
    cmd += ["--specs-from", *specs_from] if specs_from else []
    return subprocess.Popen(cmd, env=env, cwd=ROOT)


# ---- the model document -----------------------------------------------------------------------------
def model_document(specs: list, builds: dict, k: Constants = Constants()) -> dict:
    """{constants, devices, toolchains, kernels, ops}; ``builds`` = {triton version: [build per spec]}."""
    from . import perf_workloads

    devices = {name: device(name) for name in DEVICES}
    kernels = []
    for i, spec in enumerate(specs):
        entry = {"name": spec["name"], "kernel": spec["fn"].__name__, "num_warps": spec["num_warps"],
                 "num_stages": spec["num_stages"], "builds": {}, "launches": []}
        for version, version_builds in builds.items():
            b = dict(version_builds[i])
            if "sass" in b:
                b["blocks_per_sm"], b["occupancy_limit"] = occupancy(b["regs"], b["smem"], b["num_warps"],
                                                                     devices["H100"])
            entry["builds"][version] = b
        launches = perf_workloads.launches(spec)
        entry["workload"] = None if launches is not None else \
            perf_workloads.NO_WORKLOAD.get(entry["kernel"], "no workload in perf_workloads.py")
        for launch in launches or ():
            row = asdict(launch)
            row["predicted"] = {v: {d: predict(b, row, dev, k) for d, dev in devices.items()}
                                for v, b in entry["builds"].items() if "sass" in b}
            entry["launches"].append(row)
        kernels.append(entry)
    doc = {"arch": f"sm_{ARCH}a", "constants": asdict(k), "devices": devices,
           "toolchains": sorted(builds), "kernels": kernels}
    doc["ops"] = aggregate_ops(doc)
    return doc


def aggregate_ops(doc: dict, scales: Optional[dict] = None) -> list:
    """Per (op, model, seconds): the sum over its parts of the fastest spec's time, per Triton version
    and device (terms scaled by ``scales``, see ``kernel_time``)."""
    from . import perf_workloads

    groups = {}
    for kernel in doc["kernels"]:
        for launch in kernel["launches"]:
            key = (launch["op"], launch["model"], launch["seconds"])
            groups.setdefault(key, []).append((kernel["name"], launch))
    ops = []
    for (op, model, seconds), members in groups.items():
        first = members[0][1]
        shapes = {launch["shape"] for _, launch in members}
        entry = {"op": op, "model": model, "seconds": seconds,
                 "shape": shapes.pop() if len(shapes) == 1 else f"{model} {seconds}s B{perf_workloads.BATCH}",
                 "flops": first["op_flops"], "nbytes": first["op_bytes"], "predicted": {}}
        for version in doc["toolchains"]:
            entry["predicted"][version] = {}
            for dname, dev in doc["devices"].items():
                best = {}
                for name, launch in members:
                    p = launch["predicted"].get(version, {}).get(dname)
                    if p is None:
                        continue
                    t, _ = kernel_time(p["terms"], scales)
                    if launch["part"] not in best or t < best[launch["part"]][1]:
                        best[launch["part"]] = (name, t)
                if not best:
                    continue
                total = sum(t for _, t in best.values())
                floor = max(entry["flops"] / (dev["measured_tflops"] * 1e6), entry["nbytes"] / (dev["tbps"] * 1e6))
                entry["predicted"][version][dname] = {
                    "time_us": _sig(total), "tflops": _sig(entry["flops"] / total / 1e6),
                    "gbps": _sig(entry["nbytes"] / total / 1e3), "floor_us": _sig(floor),
                    "pct_of_floor": _sig(100 * floor / total, 3),
                    "parts": [[part, name, _sig(t)] for part, (name, t) in best.items()]}
        ops.append(entry)
    return ops


def failures(doc: dict) -> list:
    return [f"{kernel['name']} [triton {version}]: {b['status']}" for kernel in doc["kernels"]
            for version, b in kernel["builds"].items() if b["status"].startswith("FAIL")]


def main(argv=None) -> int:
    from . import perf_report

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=DEFAULT_JSON, help="model JSON to write (default %(default)s)")
    parser.add_argument("--markdown", help="markdown table to write (default: the JSON's name, .md)")
    parser.add_argument("--triton-python", nargs="*", default=[], metavar="PYTHON",
                        help="also build under these interpreters' Triton (e.g. .venv-triton36/bin/python)")
    parser.add_argument("--compare", metavar="OLD_JSON", help="print before / after against an earlier model JSON")
    parser.add_argument("--fit", metavar="RESULTS_JSON",
                        help="compare a benchmark results file (bench/results/) with the model JSON and fit "
                             "the constants; reads --json, compiles nothing")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--cache", metavar="DIR", help="reuse / keep builds here (check_kernels --cache)")
    parser.add_argument("--specs-from", nargs="+", metavar="MODULE", help="aot_specs() of these modules only")
    parser.add_argument("--builds-only", action="store_true", help=argparse.SUPPRESS)  # a toolchain's worker
    args = parser.parse_args(argv)
    if args.fit:
        with open(args.fit) as f, open(args.json) as g:
            print(perf_report.fit_report(perf_report.fit(json.load(f), json.load(g))))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        return ck.rerun_without_interpreter("unispeech_kernels.perf_model", argv)
    cache_dir = os.path.abspath(args.cache) if args.cache else None
    tasks, notes = ck.spec_tasks(args.specs_from)
    if args.builds_only:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "builds": collect_builds(tasks, args.jobs, cache_dir)}, f)
        return 0
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        others = [(py, os.path.join(tmp, f"builds_{n}.json")) for n, py in enumerate(args.triton_python)]
        procs = [start_other_toolchain(py, out, args.jobs, cache_dir, args.specs_from) for py, out in others]
        builds = {triton.__version__: collect_builds(tasks, args.jobs, cache_dir)}
        for (py, out), proc in zip(others, procs):
            if proc.wait() != 0:
                print(f"perf_model: the build under {py} failed (exit {proc.returncode})")
                return 1
            with open(out) as f:
                other = json.load(f)
            builds[other["triton"]] = other["builds"]
    for note in notes:
        print(note)
    doc = model_document([ck.spec_at(m, i) for m, i in tasks], builds)
    markdown = args.markdown or os.path.splitext(args.json)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        f.write(perf_report.dumps(doc))
    with open(markdown, "w") as f:
        f.write(perf_report.markdown(doc))
    print(perf_report.ops_table(doc))
    if args.compare:
        with open(args.compare) as f:
            print(perf_report.compare(json.load(f), doc))
    bad = failures(doc)
    print("\n".join(bad))
    print(f"perf_model: {len(doc['kernels'])} kernels x triton {', '.join(doc['toolchains'])}, {len(bad)} failed; "
          f"wrote {os.path.relpath(args.json)} and {os.path.relpath(markdown)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
