"""Turn benchmark result files into a markdown report (ratios of ours vs every baseline) and a PNG.

    python -m bench.report bench/results/2026-11-24_nvidia-h100-80gb-hbm3.json [more.json ...]
        [--out DIR] [--summary] [--no-plot] [--readme README.md]

For each X.json it writes X.md and X.png next to it (or into --out) and prints the markdown;
--summary prints only the short table (what `make gpu-check` shows last); --readme puts a GPU run's
summary into the README's latest-results section. Speed-up = baseline median
time / our median time, so > 1 means ours is faster. "Ours" are the impls triton, cuda, ours and
hf_patched (OUR_IMPLS); every other impl of the same op, dtype and shape is a baseline. Format:
bench/results/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

OUR_IMPLS = ("triton", "cuda", "ours", "hf_patched")  # the harness verifies these; a failure fails the run
OP_ORDER = ("attention_fwd", "attention_bwd", "attention_packed_fwd", "attention_packed_bwd",
            "first_conv_layer_fwd", "feature_encoder_fwd", "pos_conv_fwd",
            "pos_conv_fwd_bwd", "e2e_inference", "e2e_ctc_train_step", "forced_align", "align_e2e",
            "rel_pos_attention_fwd", "rel_pos_attention_fwd_bwd", "wavlm_inference", "wavlm_attention_layer")


def load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    for key in ("device", "rows"):
        if key not in doc:
            raise ValueError(f"{path}: not a benchmark result file (no {key!r})")
    return doc


def groups(rows):
    """OrderedDict (op, shape, dtype) -> {impl: row}, ops in pipeline order, shapes as run."""
    out = OrderedDict()
    rank = {op: i for i, op in enumerate(OP_ORDER)}
    for row in sorted(rows, key=lambda r: rank.get(r["op"], len(OP_ORDER))):
        out.setdefault((row["op"], row["shape"], row["dtype"]), OrderedDict())[row["impl"]] = row
    return out


def ok(row) -> bool:
    return row is not None and not row.get("error") and row.get("median_ms")


def _f(value, fmt="{:.3g}"):
    return "–" if value is None else fmt.format(value)


def graph_ms(row) -> str:
    """The CUDA-graph replay time of a row, "–" where the op could not be captured."""
    return _f(row.get("graph_median_ms"), "{:.3f}")


def header(doc) -> str:
    peak = doc.get("peak")
    ceil = (f"ceilings {peak['tensor_tflops']:g} TFLOP/s bf16/fp16, {peak['tbps']:g} TB/s ({peak['source']})"
            if peak else "no ceiling known for this device: times and ratios only")
    if peak and peak.get("datasheet_tflops"):
        ceil += f", datasheet {peak['datasheet_tflops']:g} TFLOP/s, {peak['datasheet_tbps']:g} TB/s"
    measured = doc.get("measured_ceilings")
    if measured:
        ceil += (f"; this run measured {measured['bf16_matmul_tflops']:g} TFLOP/s bf16 matmul, "
                 f"{measured['copy_tbps']:g} TB/s copy")
    timers = sorted({r["timer"] for r in doc["rows"] if r.get("timer")})
    dry = ("**DRY RUN: estimated times, nothing was measured** · " if doc.get("dry_run") else "")
    return (f"{dry}**{doc['device']}** · {doc.get('date', '?')} · commit `{doc.get('commit', '?')}` · torch "
            f"{doc.get('torch')} · triton {doc.get('triton')} · CUDA {doc.get('cuda')} · transformers "
            f"{doc.get('transformers')} · profile {doc.get('profile')} · {ceil}"
            + (f" · timed with {', '.join(timers)}" if timers else ""))


def summary_table(doc) -> str:
    """One line per (op, shape, dtype, our impl): our time, the fastest baseline, the speed-up."""
    lines = ["| op | shape | dtype | ours | ms | graph ms | fastest baseline | ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (op, shape, dtype), impls in groups(doc["rows"]).items():
        baselines = [(r["median_ms"], i) for i, r in impls.items() if i not in OUR_IMPLS and ok(r)]
        best = min(baselines) if baselines else None
        for impl in OUR_IMPLS:
            row = impls.get(impl)
            if row is None or (row.get("error") or "").startswith("unavailable"):
                continue
            if not ok(row):
                lines.append(f"| {op} | {shape} | {dtype} | {impl} | FAILED: {row['error'][:80]} | | | | |")
                continue
            b_name, b_ms = (best[1], best[0]) if best else ("–", None)
            speed = f"{b_ms / row['median_ms']:.2f}x" if b_ms else "–"
            lines.append(f"| {op} | {shape} | {dtype} | {impl} | {row['median_ms']:.3f} | {graph_ms(row)} | {b_name} | "
                         f"{_f(b_ms, '{:.3f}')} | {speed} |")
    if len(lines) == 2:
        lines.append("| (no implementation of ours ran) | | | | | | | | |")
    return "\n".join(lines)


def ratio_tables(doc) -> str:
    out = []
    by_op = OrderedDict()
    for key, impls in groups(doc["rows"]).items():
        by_op.setdefault(key[0], []).append((key, impls))
    for op, entries in by_op.items():
        if not any(ok(impls.get(i)) for _, impls in entries for i in OUR_IMPLS):
            out.append(f"### {op}\n\nno implementation of ours ran (see every row below).\n")
            continue
        baselines = sorted({i for _, impls in entries for i, r in impls.items() if i not in OUR_IMPLS})
        out.append(f"### {op}\n")
        out.append("| shape | dtype | ours | ms | graph ms | TFLOP/s | % of floor | peak MB | "
                   + " | ".join(f"vs {b}" for b in baselines) + " |")
        out.append("|---" * (8 + len(baselines)) + "|")
        for (_, shape, dtype), impls in entries:
            for impl in OUR_IMPLS:
                row = impls.get(impl)
                if not ok(row):
                    continue
                ratios = [f"{impls[b]['median_ms'] / row['median_ms']:.2f}x" if ok(impls.get(b)) else "–"
                          for b in baselines]
                out.append(f"| {shape} | {dtype} | {impl} | {row['median_ms']:.3f} | {graph_ms(row)} | "
                           f"{_f(row.get('tflops'))} | "
                           f"{_f(row.get('pct_of_peak'), '{:.0f}')} | {_f(row.get('peak_mem_mb'), '{:.0f}')} | "
                           + " | ".join(ratios) + " |")
        out.append("")
    return "\n".join(out)


def all_rows_table(doc) -> str:
    lines = ["| op | shape | dtype | impl | median ms (p20–p80) | graph ms | TFLOP/s | GB/s | % of floor | peak MB | "
             "SDPA | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, shape, dtype), impls in groups(doc["rows"]).items():
        for impl, r in impls.items():
            if ok(r):
                t = f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}–{r['p80_ms']:.3f})"
                note = ""
                if r.get("rel_diff") is not None:
                    note = f"vs {r.get('vs')}: rel diff {r['rel_diff']:.1e}"
                    if r.get("max_abs_diff") is not None:  # recorded by the e2e comparisons only
                        note += f", max abs {r['max_abs_diff']:.1e}"
                    if r.get("outputs_match") is not None:
                        note += " (equal)" if r["outputs_match"] else " (DIFFERENT)"
                if r.get("graph_error"):
                    note += ("; " if note else "") + f"no graph: {r['graph_error']}"
            else:
                t, note = "–", (r.get("error") or "")
            note = note.replace("|", "/")[:240]
            lines.append(f"| {op} | {shape} | {dtype} | {impl} | {t} | {graph_ms(r)} | {_f(r.get('tflops'))} | "
                         f"{_f(r.get('gbps'))} | {_f(r.get('pct_of_peak'), '{:.0f}')} | "
                         f"{_f(r.get('peak_mem_mb'), '{:.0f}')} | "
                         f"{r.get('sdpa_backend') or '–'} | {note} |")
    return "\n".join(lines)


def autotune_table(doc) -> str:
    """How often each config won, per autotuned kernel ("" when the run autotuned nothing)."""
    lines = []
    for name, entry in sorted((doc.get("autotune") or {}).items()):
        wins = OrderedDict()
        for pick in entry["picks"]:
            cfg = ", ".join(f"{k}={v}" for k, v in pick["config"].items())
            wins[cfg] = wins.get(cfg, 0) + 1
        for cfg, n in sorted(wins.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {cfg} | {n} of {len(entry['picks'])} |")
    if not lines:
        return ""
    return "\n".join(["### Autotune picks", "",
                      "Which config won per key met (key: " + "; ".join(
                          f"{n} = {', '.join(e['key_names'])} + dtypes" for n, e in sorted(doc["autotune"].items()))
                      + ").", "", "| kernel | config | keys won |", "|---|---|---|", *lines])


def markdown(doc) -> str:
    return "\n\n".join(part for part in [
        f"## Benchmark results: {doc['device']}", header(doc),
        "Speed-up = baseline median / our median (> 1: ours faster). % of floor = max(FLOPs / peak, "
        "bytes / bandwidth) / measured time, on real (unpadded) work (bench/physics.py). graph ms: the "
        "same calls replayed as CUDA graphs (no launch overhead; – where the op cannot be captured, the "
        "reason in the row's note). SDPA: the scaled_dot_product_attention backends the call ran.",
        "### Summary", summary_table(doc), ratio_tables(doc), "### Every row", all_rows_table(doc),
        autotune_table(doc)] if part) + "\n"


IMPL_COLORS = dict(triton="tab:blue", cuda="tab:purple", ours="tab:blue", torch="tab:gray", sdpa="tab:orange",
                   flex="tab:green", flex_keys="tab:brown", compile="tab:red", hf_sdpa="tab:orange",
                   hf_compile="tab:red", hf_patched="tab:cyan")


def plot(doc, path: str) -> str:
    """One panel per op; per shape a bar per impl: its time over the fastest baseline's (1 = as fast,
    lower is better), labelled with its median ms. Returns a status line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib not importable ({e})"
    by_op = OrderedDict()
    for (op, shape, dtype), impls in groups(doc["rows"]).items():
        good = OrderedDict((i, r) for i, r in impls.items() if ok(r))
        if good:
            by_op.setdefault(op, []).append((f"{shape}\n{dtype}", good))
    if not by_op:
        return "plot skipped: no successful rows"
    fig, axes = plt.subplots(len(by_op), 1, figsize=(12, 3.4 * len(by_op)), squeeze=False)
    for ax, (op, entries) in zip(axes[:, 0], by_op.items()):
        names = list(OrderedDict.fromkeys(i for _, impls in entries for i in impls))
        width = 0.8 / len(names)
        for k, (_, impls) in enumerate(entries):
            base = [r["median_ms"] for i, r in impls.items() if i not in OUR_IMPLS] or \
                [r["median_ms"] for r in impls.values()]
            for j, impl in enumerate(names):
                if impl not in impls:
                    continue
                ms = impls[impl]["median_ms"]
                y = ms / min(base)
                ax.bar(k + j * width, y, width, color=IMPL_COLORS.get(impl, "tab:olive"),
                       hatch="//" if impl in OUR_IMPLS else None, edgecolor="black", linewidth=0.3,
                       label=impl if k == next(n for n, (_, i) in enumerate(entries) if impl in i) else None)
                ax.text(k + j * width, y, f"{ms:.3g}", ha="center", va="bottom", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle="--")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(entries))])
        ax.set_xticklabels([label for label, _ in entries], fontsize=7)
        ax.set_ylabel("time / fastest baseline", fontsize=8)
        ax.set_title(f"{op} (bar labels: median ms; lower is better)", fontsize=9)
        ax.legend(fontsize=7, ncol=len(names))
    fig.suptitle(f"{doc['device']} · {doc.get('date', '')} · {str(doc.get('commit', ''))[:12]}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


README_START, README_END = "<!-- latest-gpu-results -->", "<!-- /latest-gpu-results -->"


def update_readme(doc, results_path: str, readme: str) -> None:
    """Replace the README's section between README_START and README_END with this GPU run's
    header and summary table (what the README shows), naming the results file."""
    if doc.get("device_type") != "cuda" or doc.get("dry_run"):
        raise ValueError(f"{results_path}: not a GPU run (device_type {doc.get('device_type')!r}"
                         + (", a dry run" if doc.get("dry_run") else "") + ")")
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} section to replace")
    rel = os.path.relpath(results_path, os.path.dirname(os.path.abspath(readme)))
    section = (f"{README_START}\nLatest GPU results (`{rel}`, full tables in the `.md` next to it):\n\n"
               f"{header(doc)}\n\n{summary_table(doc)}\n{README_END}")
    head, rest = text.split(README_START, 1)
    with open(readme, "w") as f:
        f.write(head + section + rest.split(README_END, 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="result JSON files (bench/results/*.json)")
    ap.add_argument("--out", help="directory for the .md and .png (default: next to each file)")
    ap.add_argument("--summary", action="store_true", help="print only the short summary table")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    ap.add_argument("--readme", metavar="README",
                    help="also put a GPU run's summary into README's latest-results section")
    args = ap.parse_args(argv)
    for path in args.files:
        doc = load(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        directory = args.out or os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        md = markdown(doc)
        with open(os.path.join(directory, stem + ".md"), "w") as f:
            f.write(md)
        status = "plot skipped (--no-plot)" if args.no_plot else plot(doc, os.path.join(directory, stem + ".png"))
        if args.summary:
            print(f"{header(doc)}\n\n{summary_table(doc)}")
            failed = [r for r in doc["rows"] if r.get("error") and not r["error"].startswith("unavailable")]
            if failed:
                print(f"\n{len(failed)} row(s) failed or were skipped: see {os.path.join(directory, stem + '.md')}")
        else:
            print(md)
        print(status, file=sys.stderr)
        if args.readme:
            update_readme(doc, path, args.readme)
            print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
