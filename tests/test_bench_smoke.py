"""Quick CPU checks of the benchmark tooling (no timing claims): the FLOP counts against design.md's
numbers, a result row from the harness, error rows for failing implementations, the report turning a
canned results file into markdown ratios and a PNG, and `python -m unispeech.run` on a tiny model."""
import json
import os
import pathlib
import re

import pytest
import torch

from bench import cases, harness, physics, report
from unispeech_kernels import BackendUnavailableError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
            hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_conv_pos_embeddings=128,
            num_conv_pos_embedding_groups=16, vocab_size=32)


def test_flop_counts_match_design_table():
    ten_s = [160000]  # 10 s of 16 kHz audio -> 499 frames
    by_hand = 2 * 512 * 10 * 31999 + 2 * 512 * 512 * (3 * (15999 + 7999 + 3999 + 1999) + 2 * (999 + 499))
    assert by_hand == pytest.approx(49e9, rel=0.01)  # design.md: 49 GFLOP per 10 s
    assert physics.feature_encoder_flops(ten_s, BASE["conv_dim"], BASE["conv_kernel"], BASE["conv_stride"]) == by_hand
    assert physics.pos_conv_flops([499], 768, 16, 128) == pytest.approx(4.71e9, rel=1e-2)
    assert physics.attention_flops([499], 12, 64) == pytest.approx(0.765e9, rel=1e-2)
    assert physics.attention_flops([499], 12, 64, backward=True) == 2.5 * physics.attention_flops([499], 12, 64)
    total, fe = physics.model_forward_flops(ten_s, BASE)
    per_layer = (total - fe - physics.pos_conv_flops([499], 768, 16, 128) - 499 * 2 * (512 + 32) * 768) / 12
    assert per_layer == pytest.approx(7.07e9 + 0.765e9, rel=1e-2)  # projections + FFN + attention core
    # padding adds no work: a 7 s utterance counts 7 s whatever the batch is padded to
    assert physics.attention_flops([499, 349], 12, 64) == physics.attention_flops([499], 12, 64) \
        + physics.attention_flops([349], 12, 64)


def test_roofline_uses_the_larger_floor():
    h100 = physics.peak_for("NVIDIA H100 80GB HBM3")
    assert h100.tensor_tflops == 790.0 and h100.tbps == 3.0
    compute_bound = physics.roofline(790e9, 1e6, 2e-3, h100, "bfloat16")  # 1 ms of tensor work in 2 ms
    assert compute_bound["pct_of_peak"] == pytest.approx(50.0)
    assert compute_bound["tflops"] == pytest.approx(395.0)
    memory_bound = physics.roofline(1e9, 3e9, 1e-3, h100, "bfloat16")  # 1 ms of HBM traffic in 1 ms
    assert memory_bound["pct_of_peak"] == pytest.approx(100.0)
    assert physics.peak_for("AMD EPYC") is None
    assert physics.peak_for("NVIDIA H100 PCIe").tbps == 2.0  # not the SXM card's ceilings
    assert physics.roofline(1e9, None, 1.0, None, "float32")["pct_of_peak"] is None


def _case(impl="torch"):
    return harness.Case("attention_fwd", impl, torch.float32, "tiny", {"batch": 2}, flops=2e6, nbytes=1e5)


def test_harness_row_from_pytest_benchmark(benchmark):
    rec = harness.Recorder(ROOT, None, 1)
    sets = [(torch.randn(64, 64), torch.randn(64, 64)) for _ in range(3)]
    rec.run(benchmark, _case(), torch.mm, sets, torch.device("cpu"))
    (row,) = rec.rows
    assert row["error"] is None and row["calls_per_round"] == 3 and row["rounds"] >= 5
    assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert row["tflops"] == pytest.approx(2e6 / (row["median_ms"] * 1e-3) / 1e12)
    assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0
    assert benchmark.group == "attention_fwd float32 tiny"


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
def test_harness_unavailable_backend_is_a_row(benchmark):
    rec = harness.Recorder(ROOT, None, 1)

    def refuse(x):
        raise BackendUnavailableError("attention: backend 'triton' cannot run this input (triton: no GPU)")

    with pytest.raises(pytest.skip.Exception):
        rec.run(benchmark, _case("triton"), refuse, [(torch.ones(1),)], torch.device("cpu"))
    assert rec.rows[0]["error"].startswith("unavailable: attention: backend 'triton'")
    assert rec.rows[0]["median_ms"] is None


@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
@pytest.mark.parametrize("ours", report.OUR_IMPLS)
def test_harness_failing_baseline_is_skipped_but_ours_fails(benchmark, ours):
    rec = harness.Recorder(ROOT, None, 2)

    def broken(x):
        raise RuntimeError("kernel exploded")

    with pytest.raises(pytest.skip.Exception):
        rec.run(benchmark, _case("flex"), broken, [(torch.ones(1),)], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="kernel exploded"):
        rec.run(benchmark, _case(ours), broken, [(torch.ones(1),)], torch.device("cpu"))
    assert [r["error"] for r in rec.rows] == ["error: RuntimeError: kernel exploded"] * 2


def test_harness_verify_records_a_match(benchmark, monkeypatch):
    monkeypatch.setenv("UNISPEECH_COMMIT", "0123abc")
    rec = harness.Recorder(ROOT, None, 1)
    assert rec.info["commit"] == "0123abc"  # a GPU machine gets the tree without .git
    sets = [(torch.randn(32, 32), torch.randn(32, 32))]
    def close():
        return {"rel_diff": harness.rel_diff([torch.ones(4) * 1.0005], [torch.ones(4)]), "vs": "torch"}
    rec.run(benchmark, _case("triton"), torch.mm, sets, torch.device("cpu"), verify=close)
    row = rec.rows[0]
    assert row["error"] is None and row["vs"] == "torch" and row["outputs_match"] is True
    assert row["rel_diff"] == pytest.approx(5e-4, rel=1e-3) and row["match_tol"] == harness.MATCH_REL_TOL["float32"]


def test_harness_wrong_result_is_an_error_row_and_a_failure(benchmark):
    rec = harness.Recorder(ROOT, None, 1)
    def wrong():
        return {"rel_diff": 0.5, "vs": "sdpa"}
    with pytest.raises(pytest.fail.Exception, match="wrong result: rel diff 5.00e-01 vs sdpa"):
        rec.run(benchmark, _case("triton"), torch.mm, [(torch.randn(8, 8), torch.randn(8, 8))],
                torch.device("cpu"), verify=wrong)
    (row,) = rec.rows
    assert row["median_ms"] is not None and row["outputs_match"] is False and row["error"].startswith("wrong result")


def test_harness_does_not_verify_baselines(benchmark):
    rec = harness.Recorder(ROOT, None, 1)
    rec.run(benchmark, _case("sdpa"), torch.mm, [(torch.randn(8, 8), torch.randn(8, 8))], torch.device("cpu"),
            verify=lambda: {"rel_diff": 0.5, "vs": "torch"})
    (row,) = rec.rows
    assert row["error"] is None and "rel_diff" not in row


def test_check_profile_covers_every_goal_shape():
    """gpu-check's profile measures the project's goal shapes, the goal rows first: attention at
    S 1000 (H 16, D 64), padded and packed, fwd and bwd, against SDPA (FlexAttention, masking queries
    too, in the compile tier) and at S 250/500/1500 after; pos conv at T 1500 (T 500 and base after);
    the feature encoder at 10 s against eager (30 s and torch.compile after); the model against
    transformers, large and base, and a fine-tuning step; the first layer's CUDA kernel next to
    Triton; forced alignment and align() end to end."""
    goal = [e for e in cases.entries(name="check") if e["tier"] == "goal"]
    goal_ops = [e["op"] for e in goal]
    assert goal_ops.index("first_conv_layer_fwd") == len(goal) - 1  # the extension's rows last: it builds meanwhile
    large = cases.MODELS["large"]
    assert (large["num_attention_heads"], large["hidden_size"] // large["num_attention_heads"]) == (16, 64)
    def tier(op, case):
        return cases.place(op, case, "check")[0]

    for op in ("attention_fwd", "attention_bwd", "attention_packed_fwd", "attention_packed_bwd"):
        made = cases.expand(op, "check")
        goal_rows = [(max(cases.frame_lengths(c[4], large)), c[3]) for c in made if tier(op, c) == "goal"]
        assert goal_rows == [(999, "triton"), (999, "sdpa")], op
        assert {999, 249, 499, 1499} == {max(cases.frame_lengths(c[4], large)) for c in made}
        assert cases.place(op, ("large", 20, 8, "flex", None), "check")[0] == "compile"
    assert {max(cases.frame_lengths(c[4])) for c in cases.expand("pos_conv_fwd", "check")} == {499, 1499}
    assert {c[0] for c in cases.expand("pos_conv_fwd_bwd", "check")} == {"base", "large"}
    first = cases.expand("first_conv_layer_fwd", "check")
    assert {"cuda", "triton", "torch"} <= {c[3] for c in first if tier("first_conv_layer_fwd", c) == "goal"}
    fe = {(c[1], c[3]): tier("feature_encoder_fwd", c) for c in cases.expand("feature_encoder_fwd", "check")}
    assert fe[(10, "triton")] == fe[(10, "torch")] == "goal" and fe[(10, "compile")] == fe[(30, "compile")] == "compile"
    assert fe[(30, "triton")] == fe[(30, "torch")] == "matrix"
    e2e = {(c[0], c[3]): tier("e2e_inference", c) for c in cases.expand("e2e_inference", "check")}
    assert all(e2e[(m, i)] == "goal" for m in ("base", "large") for i in ("ours", "hf_sdpa"))
    assert e2e[("base", "hf_compile")] == e2e[("large", "hf_compile")] == "compile"
    train = {(c[0], c[3]) for c in cases.expand("e2e_ctc_train_step", "check")}
    assert train == {("base", "ours"), ("base", "hf_sdpa")}
    assert {"forced_align", "align_e2e"} <= set(goal_ops)
    for name, profile in cases.PROFILES.items():  # tiers in order, every entry names an op and impls
        tiers = [cases.TIERS.index(e.get("tier", "matrix")) for e in profile["entries"]]
        assert tiers == sorted(tiers), name
        assert all("impls" in e or e["op"] in ("encoder_forward", "pretraining_loss") for e in profile["entries"]), name


def test_place_finds_the_entry_of_every_case():
    """expand() cases by their shape and impl, (entry, ..., impl) cases by the entry they hold, other
    ops by their first entry; an op the profile does not list has no place."""
    check = cases.entries(name="check")
    for op in {e["op"] for e in check}:
        for c in cases.expand(op, "check"):
            tier, index = cases.place(op, c, "check")
            assert check[index]["op"] == op and cases.made_by(check[index], c)
    align = cases.entries("forced_align", "check")
    assert [cases.place("forced_align", (e, "triton"), "check")[0] for e in align] == ["goal", "matrix"]
    assert cases.place("encoder_forward", None, "check")[0] == "matrix"
    assert cases.place("no_such_op", None, "check") is None
    assert cases.expand("attention_fwd", "cpu") == []


def _row(op, impl, shape, ms, **kw):
    row = dict(op=op, impl=impl, dtype="bfloat16", shape=shape, params={}, median_ms=ms,
               p20_ms=None if ms is None else 0.9 * ms, p80_ms=None if ms is None else 1.1 * ms,
               tflops=None, gbps=None, pct_of_peak=None, peak_mem_mb=None, error=None)
    row.update(kw)
    return row


CANNED = dict(device="NVIDIA H100 80GB HBM3", date="2026-11-24T10:00:00", commit="abc123", torch="2.11.0",
              triton="3.6.0", cuda="13.0", transformers="5.17.0", profile="check",
              measured_ceilings=dict(bf16_matmul_tflops=781.5, copy_tbps=2.98, method="..."),
              peak=dict(name="H100", tensor_tflops=790.0, fp32_tflops=67.0, tbps=3.0, source="measured (design.md)",
                        datasheet_tflops=989.0, datasheet_tbps=3.35),
              rows=[_row("attention_fwd", "triton", "base S499", 1.0, tflops=300.0, pct_of_peak=38.0,
                         graph_median_ms=0.8, timer="CUDA events"),
                    _row("attention_fwd", "sdpa", "base S499", 2.0, sdpa_backend="EFFICIENT_ATTENTION",
                         graph_error="not capturable, the call synchronises with the host: RuntimeError: x"),
                    _row("attention_fwd", "flex", "base S499", 1.5),
                    _row("attention_fwd", "torch", "base S499", 4.0),
                    _row("attention_fwd", "cuda", "base S499", None, error="unavailable: not built"),
                    _row("feature_encoder_fwd", "triton", "base L160000", None,
                         error="error: RuntimeError: out of resources"),
                    _row("feature_encoder_fwd", "torch", "base L160000", 3.0),
                    _row("e2e_inference", "ours", "base B8 10s", 10.0, rel_diff=1e-3, max_abs_diff=2e-3,
                         vs="hf_sdpa"),
                    _row("e2e_inference", "hf_sdpa", "base B8 10s", 12.0),
                    _row("e2e_inference", "hf_compile", "base B8 10s", 11.0)],
              autotune={"attention_fwd": {"key_names": ["S_BUCKET", "HEAD_DIM"], "picks": [
                  {"key": ["512", "64", "torch.bfloat16"], "config": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)},
                  {"key": ["1024", "64", "torch.bfloat16"], "config": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)},
                  {"key": ["2048", "64", "torch.bfloat16"], "config": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4)}]}})


def test_report_markdown_ratios_and_png(tmp_path, capsys):
    path = tmp_path / "2026-11-24_nvidia-h100-80gb-hbm3.json"
    path.write_text(json.dumps(CANNED))
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    md = (out / (path.stem + ".md")).read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "790" in md and "this run measured 781.5 TFLOP/s" in md
    assert "datasheet 989 TFLOP/s, 3.35 TB/s" in md
    # summary: ours vs the fastest baseline
    assert "| attention_fwd | base S499 | bfloat16 | triton | 1.000 | 0.800 | flex | 1.500 | 1.50x |" in md
    assert "| e2e_inference | base B8 10s | bfloat16 | ours | 10.000 | – | hf_compile | 11.000 | 1.10x |" in md
    assert re.search(r"\| feature_encoder_fwd \| base L160000 \| bfloat16 \| triton \| FAILED: error: RuntimeError", md)
    # per-op ratio table: one column per baseline
    assert "| base S499 | bfloat16 | triton | 1.000 | 0.800 | 300 | 38 | – | 1.50x | 2.00x | 4.00x |" in md
    assert "| base B8 10s | bfloat16 | ours | 10.000 | – | – | – | – | 1.10x | 1.20x |" in md
    # every row: the graph column, the SDPA backend, why a row has no graph; the clock in the header
    assert ("| attention_fwd | base S499 | bfloat16 | sdpa | 2.000 (1.800–2.200) | – | – | – | – | – | "
            "EFFICIENT_ATTENTION | no graph: not capturable, the call synchronises with the host: "
            "RuntimeError: x |") in md
    assert "| attention_fwd | base S499 | bfloat16 | triton | 1.000 (0.900–1.100) | 0.800 | 300 |" in md
    assert "timed with CUDA events" in md and "DRY RUN" not in md
    assert "unavailable: not built" in md and "rel diff 1.0e-03" in md
    assert "### Autotune picks" in md and "attention_fwd = S_BUCKET, HEAD_DIM + dtypes" in md
    assert "| attention_fwd | BLOCK_M=128, BLOCK_N=64, num_warps=8 | 2 of 3 |" in md
    assert "| attention_fwd | BLOCK_M=64, BLOCK_N=32, num_warps=4 | 1 of 3 |" in md
    png = (out / (path.stem + ".png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert md.strip() in capsys.readouterr().out

    assert report.main([str(path), "--out", str(out), "--summary", "--no-plot"]) == 0
    summary = capsys.readouterr().out
    assert "1.50x" in summary and "### Every row" not in summary and "1 row(s) failed" in summary


def test_tuned_choices_reports_what_each_autotuner_picked():
    """Every autotuned kernel is registered, and a pick in an autotuner's cache (as a GPU run leaves
    it) comes back with its key and config; a report of a run that tuned nothing has no section."""
    from unispeech_kernels.ops import conv_layer_kernels, pos_conv_kernels  # noqa: F401  (their autotuners)
    from unispeech_kernels.ops.attention_kernels import FWD_CONFIGS
    from unispeech_kernels.ops._common import AUTOTUNED, tuned_choices
    assert set(AUTOTUNED) == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "conv_layer_fwd",
                              "conv_layer_fwd_norm", "conv_layer_bwd_dx", "conv_layer_bwd_dw", "pos_conv_conv",
                              "rel_pos_attention_fwd", "rel_pos_attention_bwd_dkdv"}
    tuned, key = AUTOTUNED["attention_fwd"], (1024, 64, True, True, False, False, "torch.bfloat16")
    tuned.cache[key] = FWD_CONFIGS[1]
    try:
        got = tuned_choices()["attention_fwd"]
    finally:
        del tuned.cache[key]
    assert got["key_names"] == ["S_BUCKET", "HEAD_DIM", "HAS_MASK", "PREFIX_MASK", "PACKED", "HAS_DROPOUT"]
    assert {"key": ["1024", "64", "True", "True", "False", "False", "torch.bfloat16"],
            "config": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)} in got["picks"]
    assert report.autotune_table(dict(CANNED, autotune={})) == ""


def test_report_puts_a_gpu_summary_into_the_readme(tmp_path):
    path = tmp_path / "results" / "2026-11-24_nvidia-h100-80gb-hbm3.json"
    path.parent.mkdir()
    path.write_text(json.dumps(dict(CANNED, device_type="cuda")))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold text\n{report.README_END}\noutro\n")
    assert report.main([str(path), "--summary", "--no-plot", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old text" not in text
    assert "`results/2026-11-24_nvidia-h100-80gb-hbm3.json`" in text and "NVIDIA H100 80GB HBM3" in text
    assert "| attention_fwd | base S499 | bfloat16 | triton | 1.000 | 0.800 | flex | 1.500 | 1.50x |" in text
    assert report.main([str(path), "--summary", "--no-plot", "--readme", str(readme)]) == 0
    assert readme.read_text() == text  # replacing the section again changes nothing
    cpu = tmp_path / "results" / "cpu.json"
    cpu.write_text(json.dumps(dict(CANNED, device_type="cpu")))
    with pytest.raises(ValueError, match="not a GPU run"):
        report.main([str(cpu), "--no-plot", "--readme", str(readme)])
    with pytest.raises(ValueError, match="a dry run"):
        report.update_readme(dict(CANNED, device_type="cuda", dry_run=True), str(path), str(readme))
    assert "DRY RUN: estimated times" in report.header(dict(CANNED, dry_run=True))
    with pytest.raises(ValueError, match="no <!-- latest-gpu-results -->"):
        report.update_readme(dict(CANNED, device_type="cuda"), str(path), str(path))


def test_readme_has_the_latest_gpu_results_section():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert text.count(report.README_START) == 1 and text.count(report.README_END) == 1


def test_report_rejects_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a benchmark result file"):
        report.load(str(path))


def test_run_main_job_on_a_tiny_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from unispeech import run

    cfg = transformers.UniSpeechConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=48, conv_dim=(32, 32), conv_kernel=(10, 3),
                                       conv_stride=(5, 2), num_conv_pos_embeddings=15,
                                       num_conv_pos_embedding_groups=4, vocab_size=12)
    torch.manual_seed(0)
    transformers.UniSpeechForCTC(cfg).save_pretrained(str(tmp_path))
    assert run.main(["--checkpoint", str(tmp_path), "--seconds", "0.2", "--batch", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch 3, lengths [0.2, 0.16, 0.12] s" in out
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"^(eager|sdpa|triton|cuda) ", line)}
    assert set(rows) == {"eager", "sdpa", "triton", "cuda"}
    for name in ("eager", "sdpa"):
        time_ms, diff = rows[name].split()[3:5]
        assert float(time_ms) > 0 and float(diff) <= 1e-5
    assert "unavailable" in rows["cuda"] or float(rows["cuda"].split()[4]) <= 1e-5
    match = re.search(r"vs transformers .*-> ours ([\d.]+)x as fast, max \|diff\| ([\d.e+-]+)", out)
    assert match and float(match.group(2)) <= 1e-5


# test files with GPU tensors that gpu_check leaves to other steps: the extension's tests run in their
# own step; the benchmarks verify every implementation themselves at the benchmarked shapes
GPU_CHECK_ELSEWHERE = {"test_cuda_ext.py", "test_bench_verify.py"}


def test_gpu_check_runs_every_gpu_test_file():
    """A new test file that puts tensors on the GPU must not be forgotten by gpu_check's test step."""
    from bench import gpu_check
    tests_dir = os.path.join(ROOT, "tests")
    gpu_tensors = re.compile(r"^DEVICE = .*cuda\.is_available\(\)|pytest\.mark\.gpu", re.M)
    on_gpu = {name for name in os.listdir(tests_dir) if name.startswith("test_") and name.endswith(".py")
              and gpu_tensors.search(pathlib.Path(tests_dir, name).read_text())}
    listed = {os.path.basename(path) for path in gpu_check.GPU_TEST_FILES}
    missing = sorted(on_gpu - GPU_CHECK_ELSEWHERE - listed)
    assert not missing, f"not run by gpu_check: {missing}"
    assert all(os.path.exists(os.path.join(ROOT, path)) for path in gpu_check.GPU_TEST_FILES)
    with open(os.path.join(ROOT, "bench", "gpu_check.py")) as f:
        assert "tests/test_cuda_ext.py" in f.read()  # its own step
