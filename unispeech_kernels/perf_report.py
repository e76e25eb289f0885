"""Tables of the static performance model (``perf_model.py``): the markdown file, before / after
deltas (``--compare``), and the fit of its constants to a GPU's benchmark results (``--fit``)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from typing import Optional

from .perf_model import TERMS, Constants, kernel_time

REFERENCE_SECONDS = {"attention": 20}  # the reference shape of a kernel's row (S 999); others 10 s
FIT_ROUNDS = 8  # attribution rounds of ``fit`` (it stops earlier once the scales settle)


def dumps(doc: dict) -> str:
    """The model JSON: indented, with each build, launch and op on one line (short diffs, small file)."""
    lines = []

    def compact(entry):
        lines.append(json.dumps(entry, separators=(",", ":")))
        return f"@@{len(lines) - 1}@@"

    out = dict(doc, ops=[compact(op) for op in doc["ops"]],
               kernels=[dict(k, builds={v: compact(b) for v, b in k["builds"].items()},
                             launches=[compact(x) for x in k["launches"]]) for k in doc["kernels"]])
    return re.sub(r'"@@(\d+)@@"', lambda m: lines[int(m.group(1))], json.dumps(out, indent=1)) + "\n"


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _num(x, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant digits (whole numbers above), None as "-"."""
    if x is None:
        return "-"
    if not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def reference_launch(kernel: dict) -> Optional[dict]:
    """The launch a kernel's row shows: its first op's 20 s (attention) or 10 s shape, large model first."""
    launches = kernel["launches"]
    if not launches:
        return None
    op = launches[0]["op"]
    seconds = next((s for prefix, s in REFERENCE_SECONDS.items() if op.startswith(prefix)), 10)
    same = [x for x in launches if x["op"] == op and x["seconds"] == seconds] or launches
    return next((x for x in same if x["model"] == "large"), same[0])


def ops_table(doc: dict) -> str:
    header = ["op", "shape", "floor H200 µs"]
    for v in doc["toolchains"]:
        header += [f"{v} H100 µs", f"{v} H200 µs", f"{v} TFLOP/s", f"{v} GB/s", f"{v} % of floor"]
    rows = []
    for op in doc["ops"]:
        row = [op["op"], op["shape"], _num(next(iter(op["predicted"].values()), {}).get("H200", {}).get("floor_us"))]
        for v in doc["toolchains"]:
            p = op["predicted"].get(v, {})
            h100, h200 = p.get("H100", {}), p.get("H200", {})
            row += [_num(h100.get("time_us")), _num(h200.get("time_us")), _num(h200.get("tflops")),
                    _num(h200.get("gbps")), _num(h200.get("pct_of_floor"))]
        rows.append(row)
    return _table(header, rows)


def _loop(build: dict) -> dict:
    sass = build.get("sass")
    main = sass["loops"][sass["main"]] if sass and sass["main"] is not None else {}
    return {"instr": main.get("instructions"), "mma": main.get("mma"), "gld": main.get("global_loads"),
            "gld_bytes": main.get("global_load_bytes"), "gst": main.get("global_stores"),
            "shared": None if not main else f"{main['shared_loads']}/{main['shared_stores']}",
            "bar": main.get("barriers"), "outside": sass["outside_loops"] if sass else None,
            "loops": len(sass["loops"]) if sass else None}


def kernels_table(doc: dict) -> str:
    header = ["kernel", "triton", "warps/stages", "regs", "smem KB", "blocks/SM", "spills B", "loops",
              "loop instr", "mma", "global ld (B/warp)", "global st", "shared ld/st", "barriers", "outside loops",
              "reference shape", "H200 µs", "bound"]
    rows = []
    for kernel in doc["kernels"]:
        ref = reference_launch(kernel)
        for v in doc["toolchains"]:
            b = kernel["builds"][v]
            if "sass" not in b:
                rows.append([kernel["name"], v, f"{b['num_warps']}/{b['num_stages']}", b["status"]] + ["-"] * 14)
                continue
            loop, p = _loop(b), (ref or {}).get("predicted", {}).get(v, {}).get("H200", {})
            rows.append([kernel["name"], v, f"{b['num_warps']}/{b['num_stages']}", b["regs"], _num(b["smem"] / 1024),
                         f"{b['blocks_per_sm']} ({b['occupancy_limit']})", f"{b['spill_stores']}/{b['spill_loads']}",
                         loop["loops"], _num(loop["instr"]), _num(loop["mma"]),
                         "-" if loop["gld"] is None else f"{loop['gld']} ({loop['gld_bytes']})", _num(loop["gst"]),
                         loop["shared"] or "-", _num(loop["bar"]), loop["outside"],
                         ref["shape"] if ref else "static only", _num(p.get("time_us")), p.get("bound", "-")])
    return _table(header, rows)


def markdown(doc: dict) -> str:
    k, devices = doc["constants"], doc["devices"]
    dev = ", ".join(f"{d['name']} ({d['tensor_tflops']:.0f} TFLOP/s bf16 datasheet, {d['tbps']} TB/s measured, "
                    f"{d['sms']} SMs)" for d in devices.values())
    return "\n".join([
        f"# Static performance model ({doc['arch']}, no GPU)", "",
        "Written by `python -m unispeech_kernels.perf_model` (`make check-kernels`): predictions from the compiler's",
        "output, not measurements. The model, its terms and the sources of its constants: the docstring of",
        "`unispeech_kernels/perf_model.py`; the shapes: `unispeech_kernels/perf_workloads.py`.", "",
        f"Triton: {', '.join(doc['toolchains'])}. Devices: {dev}.",
        "Constants (guesses until a GPU run fits them: `--fit`): "
        + ", ".join(f"{name} {value:g}" for name, value in k.items()) + ".", "",
        "## Ops at the benchmark shapes", "",
        "The sum of each op's kernels, each at the tile config the model predicts fastest; TFLOP/s and GB/s of the",
        "real work (`bench/physics.py`) on the H200; % of floor = the physics floor / the predicted time.", "",
        ops_table(doc), "",
        "## Kernels", "",
        "Per build: occupancy (limiter), spills (stores/loads, bytes), and per iteration of the main loop (per",
        "warp): instructions, tensor-core instructions, global loads (bytes requested), global stores, shared",
        "loads/stores, barriers; instructions outside loops; the predicted time at the reference shape.", "",
        kernels_table(doc), ""])


# ---- before / after ---------------------------------------------------------------------------------
def _delta(a, b, unit: str = "") -> str:
    """"a → b (+x%)", or b alone when equal."""
    if a == b:
        return f"{_num(b)}{unit}"
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
        return f"{_num(a)} → {_num(b)}{unit} ({100 * (b - a) / a:+.0f}%)"
    return f"{_num(a)} → {_num(b)}{unit}"


def _kernel_facts(kernel: dict, version: str) -> Optional[dict]:
    b = kernel["builds"].get(version)
    if b is None:
        return None
    ref = reference_launch(kernel)
    p = (ref or {}).get("predicted", {}).get(version, {}).get("H200", {})
    loop = _loop(b)
    return {"status": b["status"], "regs": b.get("regs"), "blocks/SM": b.get("blocks_per_sm"),
            "spills": None if "spill_stores" not in b else b["spill_stores"] + b["spill_loads"],
            "loop instr": loop["instr"], "mma": loop["mma"], "barriers": loop["bar"], "H200 µs": p.get("time_us")}


def compare(old: dict, new: dict) -> str:
    """Before / after tables: every op (H100 and H200 time), and the kernels whose builds changed."""
    out = ["## Before / after (static model)", ""]
    old_ops = {(o["op"], o["model"], o["seconds"]): o for o in old["ops"]}
    rows = []
    for op in new["ops"]:
        before = old_ops.get((op["op"], op["model"], op["seconds"]))
        for v in new["toolchains"]:
            after = op["predicted"].get(v, {})
            prev = (before or {}).get("predicted", {}).get(v, {})
            rows.append([op["op"], op["shape"], v] + [
                _delta(prev.get(d, {}).get("time_us"), after.get(d, {}).get("time_us"), " µs")
                if prev else f"new: {_num(after.get(d, {}).get('time_us'))} µs" for d in ("H100", "H200")])
    out += [_table(["op", "shape", "triton", "H100", "H200"], rows), ""]
    old_kernels = {k["name"]: k for k in old["kernels"]}
    rows, fields = [], ["status", "regs", "blocks/SM", "spills", "loop instr", "mma", "barriers", "H200 µs"]
    for kernel in new["kernels"]:
        for v in new["toolchains"]:
            after = _kernel_facts(kernel, v)
            before = _kernel_facts(old_kernels[kernel["name"]], v) if kernel["name"] in old_kernels else None
            if before == after:
                continue
            rows.append([kernel["name"], v] + [_delta(before[f], after[f]) if before else _num(after[f])
                                               for f in fields])
    gone = sorted(set(old_kernels) - {k["name"] for k in new["kernels"]})
    out += ["Kernels whose build changed:", "", _table(["kernel", "triton", *fields], rows) if rows else "(none)"]
    if gone:
        out += ["", "Kernels no longer shipped: " + ", ".join(gone)]
    return "\n".join(out)


# ---- fit to a GPU's benchmark results ---------------------------------------------------------------
def fit(results: dict, doc: dict) -> dict:
    """Predicted vs measured for our Triton rows of a benchmark results file (bench/results/README.md)
    at the model's device and nearest Triton version, and the term scales that explain them.

    A row is attributed to the term that contributes most of its predicted time (each part's binding
    term, or the launches); the row's scale is the factor on that term that makes the prediction equal
    the measurement; a term's scale is the geometric mean over its rows. Attribution is repeated with
    the new scales until it settles. Terms no row is attributed to keep scale 1 (one row cannot tell
    which term was wrong: the model's own bound is blamed). Fitted constants: the document's divided
    (launch_us multiplied) by the scales."""
    from bench import physics

    peak = physics.peak_for(results.get("device") or "")
    if peak is None or peak.name not in doc["devices"]:
        raise ValueError(f"--fit: the model covers {sorted(doc['devices'])}, the results are from "
                         f"{results.get('device')!r}")
    version = nearest_version(results.get("triton") or "", doc["toolchains"])
    candidates = {}  # (op, model, seconds) -> {part: [terms of each spec]}
    for kernel in doc["kernels"]:
        for launch in kernel["launches"]:
            p = launch["predicted"].get(version, {}).get(peak.name)
            if p is not None:
                key = (launch["op"], launch["model"], launch["seconds"])
                candidates.setdefault(key, {}).setdefault(launch["part"], []).append(p["terms"])
    pairs = []
    for row in results.get("rows", []):
        params = row.get("params") or {}
        key = (row.get("op"), params.get("model"), params.get("seconds"))
        if row.get("impl") == "triton" and not row.get("error") and row.get("median_ms") and key in candidates:
            pairs.append((key, row["shape"], 1e3 * row["median_ms"]))
    scales = {t: 1.0 for t in (*TERMS, "launch")}
    for _ in range(FIT_ROUNDS):
        implied = {}
        for key, _, measured in pairs:
            _, contributions = op_time(candidates[key], scales)
            term = max(contributions, key=lambda t: contributions[t])
            implied.setdefault(term, []).append(_solve_scale(candidates[key], scales, term, measured))
        new = {t: math.exp(sum(map(math.log, implied[t])) / len(implied[t])) if t in implied else 1.0
               for t in scales}
        settled = all(abs(math.log(new[t] / scales[t])) < 1e-6 for t in scales)
        scales = new
        if settled:
            break
    k = Constants(**doc["constants"])
    fitted = Constants(clock_hz=k.clock_hz, issue_per_clock=k.issue_per_clock / scales["issue"],
                       warps_per_scheduler=k.warps_per_scheduler,
                       mma_efficiency_wgmma=k.mma_efficiency_wgmma / scales["mma"],
                       mma_efficiency_mma_sync=k.mma_efficiency_mma_sync / scales["mma"],
                       dram_efficiency=k.dram_efficiency / scales["dram"], l2_tbps=k.l2_tbps / scales["l2"],
                       launch_us=k.launch_us * scales["launch"])
    rows = [{"op": key[0], "model": key[1], "seconds": key[2], "shape": shape, "measured_us": _sig(measured),
             "predicted_us": _sig(op_time(candidates[key])[0]), "fitted_us": _sig(op_time(candidates[key], scales)[0])}
            for key, shape, measured in pairs]
    return {"device": peak.name, "results_triton": results.get("triton"), "model_triton": version,
            "rows": rows, "scales": {t: _sig(s) for t, s in scales.items()}, "constants": asdict(fitted)}


def op_time(parts: dict, scales: Optional[dict] = None) -> tuple:
    """(µs, {term: µs contributed}) of an op: per part the fastest spec's time under ``scales``."""
    total, contributions = 0.0, {}
    for options in parts.values():
        t, bound = min(kernel_time(terms, scales) for terms in options)
        launch = (options[0]["launch"]) * (scales or {}).get("launch", 1.0)
        contributions[bound] = contributions.get(bound, 0.0) + t - launch
        contributions["launch"] = contributions.get("launch", 0.0) + launch
        total += t
    return total, contributions


def _solve_scale(parts: dict, scales: dict, term: str, measured: float) -> float:
    """The factor on ``term`` (others as in ``scales``) that makes the op's time ``measured``
    (bisection on its logarithm; the time grows with it)."""
    lo, hi = math.log(scales[term]) - 8.0, math.log(scales[term]) + 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if op_time(parts, dict(scales, **{term: math.exp(mid)}))[0] < measured:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def nearest_version(version: str, versions: list) -> str:
    """The model's Triton version equal to ``version``, else the one closest to it."""
    def as_tuple(v):
        return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split(".")[:3])

    if version in versions:
        return version
    return min(versions, key=lambda v: sum(abs(a - b) * 100 ** (2 - i)
                                           for i, (a, b) in enumerate(zip(as_tuple(v), as_tuple(version or "0")))))


def fit_report(result: dict) -> str:
    rows = [[r["op"], r["shape"], _num(r["measured_us"]), _num(r["predicted_us"]),
             f"{100 * (r['predicted_us'] / r['measured_us'] - 1):+.0f}%", _num(r["fitted_us"]),
             f"{100 * (r['fitted_us'] / r['measured_us'] - 1):+.0f}%"] for r in result["rows"]]
    head = (f"## Model vs {result['device']} (results: triton {result['results_triton']}; model: triton "
            f"{result['model_triton']})")
    if not rows:
        return head + "\n\nNo Triton row of the results matches a modelled op (op, model, seconds)."
    return "\n".join([head, "", _table(["op", "shape", "measured µs", "predicted µs", "error", "fitted µs",
                                        "error"], rows), "",
                      "Term scales (time multipliers): " + ", ".join(f"{t} {s:g}" for t, s in result["scales"].items()),
                      "Fitted constants (perf_model.Constants): "
                      + ", ".join(f"{n}={v:.4g}" for n, v in result["constants"].items())])
