"""The benchmark cases of our kernels run end to end on tiny inputs (Triton through the interpreter
on CPU machines): inputs, the timed call, and the untimed check of our result against the baseline
(bench/harness.py ``verify``), so a GPU run never spends its minutes on a broken benchmark. No
timing claims: one round each."""
import os

import pytest
import torch

from bench import (cases, harness, report, test_attention, test_attention_packed, test_feature_encoder,
                   test_first_conv_layer, test_pos_conv)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [1680, 1200]  # samples: 5 and 3 frames after the conv stack, 335 / 239 after layer 0
TINY = dict(cases.CONV, conv_dim=[32] * 7, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32)
MODELS = {"tiny-group": dict(TINY, feat_extract_norm="group", conv_bias=False),
          "tiny-layer": dict(TINY, feat_extract_norm="layer", conv_bias=True)}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def recorder(monkeypatch):
    for name, cfg in MODELS.items():
        monkeypatch.setitem(cases.MODELS, name, cfg)
    monkeypatch.setitem(harness.TIMING, DEVICE.type, dict(harness.TIMING[DEVICE.type], target_s=0.0, cache_bytes=1,
                                                          min_rounds=1, max_rounds=1, warmup_rounds=0))
    return harness.Recorder(ROOT, None, 1)


def _rendered(rec, row):
    """The report of the row and a baseline copy of it; its every-row line shows the graph time (or
    why there is none) and the SDPA backend the call ran."""
    baseline = dict(row, impl="torch", rel_diff=None, vs=None, outputs_match=None)
    text = report.markdown(dict(rec.info, date="today", profile="check", rows=[row, baseline]))
    line = next(line for line in text.splitlines() if line.startswith(f"| {row['op']} | {row['shape']} ")
                and f"| {row['impl']} | {row['median_ms']:.3f} (" in line)
    if DEVICE.type == "cpu":
        assert row["graph_median_ms"] is None and "no graph: CUDA graphs need a CUDA device" in line
    else:
        assert (row["graph_median_ms"] is None) == bool(row["graph_error"]), row
    assert f"| {row['sdpa_backend'] or '–'} |" in line
    return text


def _check(rec):
    """The case's one row: no error, ours matches the baseline, and the report renders it."""
    (row,) = rec.rows
    assert row["error"] is None, row["error"]
    assert row["outputs_match"] is True and row["rel_diff"] < row["match_tol"], row
    assert f"rel diff {row['rel_diff']:.1e}" in _rendered(rec, row)
    return row


@pytest.mark.parametrize("bench", [test_attention.test_attention_fwd, test_attention.test_attention_bwd])
def test_attention_cases(benchmark, recorder, bench):
    bench(benchmark, recorder, DEVICE, ("tiny-group", 0.1, 2, "triton", LENGTHS), torch.float32)
    assert _check(recorder)["vs"] == "sdpa"


@pytest.mark.parametrize("impl", ["triton", "sdpa", "flex"])
@pytest.mark.parametrize("bench", [test_attention_packed.test_attention_packed_fwd,
                                   test_attention_packed.test_attention_packed_bwd])
def test_attention_packed_cases(benchmark, recorder, bench, impl):
    """Every impl runs (FlexAttention has no CPU backward: that case skips with its reason); ours is
    verified against per-sequence SDPA."""
    bench(benchmark, recorder, DEVICE, ("tiny-group", 0.1, 2, impl, LENGTHS), torch.float32)
    (row,) = recorder.rows
    assert row["error"] is None, row["error"]
    if impl == "triton":
        assert _check(recorder)["vs"] == "sdpa" and row["sdpa_backend"] is None
    else:  # per-sequence SDPA names the kernel it ran; FlexAttention is not SDPA
        assert (row["sdpa_backend"] is not None) == (impl == "sdpa"), row["sdpa_backend"]
        _rendered(recorder, row)


def test_attention_packed_baselines_compute_the_same():
    """FlexAttention's document mask over all rows == SDPA per sequence: the baselines do equal work."""
    lengths = [37, 5, 22]
    q, k, v = torch.randn(sum(lengths), 3, 2, 16, device=DEVICE).unbind(1)
    want = test_attention_packed.make_impl("sdpa", lengths, DEVICE)(q, k, v)
    torch.testing.assert_close(test_attention_packed.make_impl("flex", lengths, DEVICE)(q, k, v), want,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bench", [test_pos_conv.test_pos_conv_fwd, test_pos_conv.test_pos_conv_fwd_bwd])
def test_pos_conv_cases(benchmark, recorder, bench):
    bench(benchmark, recorder, DEVICE, ("tiny-group", 0.1, 2, "triton", LENGTHS), torch.float32)
    assert _check(recorder)["vs"] == "torch"


@pytest.mark.parametrize("model", MODELS)
def test_first_conv_layer_case(benchmark, recorder, model):
    test_first_conv_layer.test_first_conv_layer_fwd(benchmark, recorder, DEVICE, (model, 0.1, 2, "triton", LENGTHS),
                                                    torch.float32)
    _check(recorder)


@pytest.mark.parametrize("model", MODELS)
def test_feature_encoder_case(benchmark, recorder, model):
    test_feature_encoder.test_feature_encoder_fwd(benchmark, recorder, DEVICE, (model, 0.1, 2, "triton", LENGTHS),
                                                  torch.float32)
    _check(recorder)
