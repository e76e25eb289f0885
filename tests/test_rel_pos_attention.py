"""Attention with WavLM's gated relative-position bias: buckets (against transformers' and by hand),
the Triton kernels (interpreter, small shapes) and the torch backend against the fp64 reference
written from the formula (output and dq, dk, dv, d table, d gate), dropout, the GPU tiles,
torch.compile, opcheck, dispatch and bad inputs. Shapes [B, S, H, D]."""
import pytest
import torch

from tests.tolerances import assert_close, assert_error_within
from unispeech_kernels import RelativePositionBias, rel_pos_attention
from unispeech_kernels.dispatch import OPT_IN
from unispeech_kernels.ops._common import forced_tiles
from unispeech_kernels.ops import rel_pos_attention as rel_pos_attention_module
from unispeech_kernels.ops.attention import draw_dropout_seed, dropout_keep_mask
from unispeech_kernels.ops.rel_pos_attention import (_rows_bias, bias_reference, distance_table,
                                                     rel_pos_attention_bwd_op, rel_pos_attention_fwd_op,
                                                     rel_pos_attention_op, rel_pos_attention_reference,
                                                     relative_position_bucket)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NB, MD = 16, 20  # 16 buckets up to distance 20: sequences of 37 frames reach past max_distance


def _prefix_mask(lengths, seq):
    return torch.arange(seq, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]


def _inputs(B, S, H, D, dtype, gated=True, nb=NB):
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE, dtype=dtype) for _ in range(3))
    table = torch.randn(nb, H, device=DEVICE) * 2  # fp32, as WavLM's rel_attn_embed
    gate = torch.rand(B, S, H, device=DEVICE) * 3 if gated else None  # WavLM's gates lie in (1, 3) at const 1
    return q, k, v, table, gate


def _grads(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check_against_reference(q, k, v, table, gate, mask, *, backend="triton", nb=NB, md=MD, dropout_p=0.0,
                            rng_seed=None, softmax_scale=None):
    """Output (real rows) and every gradient within the tolerance of eager same-dtype vs fp64."""
    B, S, H, D = q.shape
    real = mask if mask is not None else torch.ones(B, S, dtype=torch.bool, device=q.device)
    grad = torch.randn(B, S, H, D, device=q.device, dtype=q.dtype) * real[:, :, None, None]
    dropout_mask = None
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
        dropout_mask = dropout_keep_mask(draw_dropout_seed(q.device), B, H, S, dropout_p)
        torch.manual_seed(rng_seed)
    ours, ours_grads = _grads(lambda q, k, v, t, g: rel_pos_attention(
        q, k, v, RelativePositionBias(t, nb, md, g), mask, dropout_p=dropout_p, softmax_scale=softmax_scale,
        backend=backend), (q, k, v, table, gate), grad)
    kw = dict(num_buckets=nb, max_distance=md, dropout_p=dropout_p, dropout_mask=dropout_mask,
              softmax_scale=softmax_scale)
    ref, ref_grads = _grads(lambda *t: rel_pos_attention_reference(*t, mask, upcast=True, **kw),
                            (q, k, v, table, gate), grad.double())
    # eager: the formula in the inputs' dtype (table and gate too: that is where its bias rounds)
    eager, eager_grads = _grads(lambda *t: rel_pos_attention_reference(*t, mask, **kw),
                                (q, k, v, table.to(q.dtype), gate.to(q.dtype) if gate is not None else None), grad)
    rows = real[:, :, None, None].expand_as(ours)
    n = max(S, D)
    assert_error_within(ours[rows], ref[rows], eager[rows], q.dtype, "out", reduction=n)
    if backend == "triton":
        assert (ours[~rows] == 0).all(), "padded query rows must be zero"
    for name, g, rg, eg in zip(("dq", "dk", "dv"), ours_grads, ref_grads, eager_grads):
        assert_error_within(g, rg, eg, q.dtype, name, reduction=n)
    # d table sums over every (b, i, j) of a bucket; d gate over a row's keys
    assert_error_within(ours_grads[3], ref_grads[3], eager_grads[3].float(), q.dtype, "dtable", reduction=B * S * S)
    if gate is not None:
        gate_rows = real[:, :, None].expand_as(gate)
        assert_error_within(ours_grads[4][gate_rows], ref_grads[4][gate_rows], eager_grads[4].float()[gate_rows],
                            q.dtype, "dgate", reduction=S)
    return ours, ours_grads


# ------------------------------------------------------------------------------------------- buckets

@pytest.mark.parametrize("nb,md", [(320, 800), (NB, MD), (32, 128)])
def test_buckets_match_transformers(nb, md):
    wavlm = pytest.importorskip("transformers.models.wavlm.modeling_wavlm")
    attn = wavlm.WavLMAttention(8, 2, num_buckets=nb, max_distance=md)
    rel = torch.arange(-2000, 2001)
    assert torch.equal(relative_position_bucket(rel, nb, md), attn._relative_positions_bucket(rel))
    assert torch.equal(bias_reference(attn.rel_attn_embed.weight, 50, nb, md), attn.compute_bias(50, 50))


def test_bucket_edge_cases_by_hand():
    """320 buckets, distance 800: 160 per direction (keys after the query: 160..319), exact below 80."""
    rel = torch.tensor([0, 1, -1, 79, -79, 80, -80, 713, 799, 800, -800, 5000, -5000])
    want = [0, 161, 1, 239, 79, 240, 80, 315, 319, 319, 159, 319, 159]
    assert relative_position_bucket(rel, 320, 800).tolist() == want  # 713: 2.4 ulps below bucket 156 + 160


@pytest.mark.parametrize("seq", [9, 21, 37])  # below, at (L = max_distance + 1) and past max_distance
def test_distance_table_gives_the_bias(seq):
    table, gate = torch.randn(NB, 3, dtype=torch.float64), torch.rand(seq, 3, dtype=torch.float64)
    by_distance = distance_table(table, NB, MD, seq)
    assert by_distance.shape == (3, 2, min(seq, MD + 1))
    want = bias_reference(table, seq, NB, MD) * gate.t()[:, :, None]
    assert torch.equal(_rows_bias(by_distance, gate, 0, seq, seq, torch.float64), want)
    assert torch.equal(_rows_bias(by_distance, gate[3:7], 3, 4, seq, torch.float64), want[:, 3:7])


# --------------------------------------------------------------------------------- Triton kernels

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_padded_past_max_distance(dtype):
    """S 37 > max_distance 20, odd lengths, a length-1 sequence, head_dim 24."""
    check_against_reference(*_inputs(3, 37, 2, 24, dtype), _prefix_mask([37, 23, 1], 37))


def test_triton_ungated_no_mask_custom_scale():
    check_against_reference(*_inputs(1, 30, 3, 16, torch.float32, gated=False), None, softmax_scale=0.37)


def test_triton_non_prefix_mask_and_empty_sequence():
    mask = torch.rand(3, 29, device=DEVICE) < 0.6
    mask[:2, 3] = True
    mask[2] = False
    out, grads = check_against_reference(*_inputs(3, 29, 2, 16, torch.float32), mask)
    assert (out[2] == 0).all() and all((g[2] == 0).all() for g in grads[:3] + grads[4:])


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 256), (torch.float16, 80)])
def test_triton_head_dims(dtype, D):
    check_against_reference(*_inputs(2, 20, 1, D, dtype), _prefix_mask([20, 13], 20))


def test_triton_default_buckets_long_sequence():
    """WavLM's 320 buckets / distance 800 past max_distance would need S > 800: the buckets' far end
    is covered by the small config; here the exact and first logarithmic buckets at S 100."""
    check_against_reference(*_inputs(1, 100, 1, 16, torch.float32, nb=320), _prefix_mask([97], 100), nb=320,
                            md=800)


def test_triton_dropout_matches_reference_with_the_kernels_mask():
    check_against_reference(*_inputs(2, 33, 2, 16, torch.float32), _prefix_mask([33, 21], 33), dropout_p=0.3,
                            rng_seed=7)


@pytest.mark.parametrize("dq_tiles", [dict(BLOCK_M=64, BLOCK_N=64), dict(BLOCK_M=32, BLOCK_N=64),
                                      dict(BLOCK_M=64, BLOCK_N=16)])
def test_triton_gpu_tiles(dq_tiles):
    """The dQ kernel's diagonal sums with the GPU's tiles (and non-square ones), several blocks."""
    from unispeech_kernels.ops import attention_kernels as kern
    with forced_tiles(kern._attn_bwd_dq_kernel, dq_tiles), forced_tiles(kern._fwd_bias_tuned,
                                                                         dict(BLOCK_M=64, BLOCK_N=32)):
        check_against_reference(*_inputs(2, 70, 1, 16, torch.float32), _prefix_mask([70, 45], 70))


def test_triton_table_gradient_is_deterministic():
    q, k, v, table, gate = _inputs(2, 40, 2, 16, torch.float32)
    mask = _prefix_mask([40, 31], 40)
    grad = torch.randn_like(q)
    args = (q, k, v, table, gate, mask, NB, MD, 0.0, 0.25)
    out, lse, seed = rel_pos_attention_fwd_op(*args)
    first, second = (rel_pos_attention_bwd_op(grad, q, k, v, out, lse, seed, table, gate, mask, NB, MD, 0.0, 0.25)
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------- torch backend

@pytest.mark.parametrize("mask_kind", ["prefix", "holes", "none"])
def test_torch_backend_matches_reference(mask_kind, monkeypatch):
    """Queries in pieces of 16 (the backend's QUERY_ROWS, made small): several pieces, a short last one."""
    monkeypatch.setattr(rel_pos_attention_module, "QUERY_ROWS", 16)
    q, k, v, table, gate = _inputs(3, 37, 2, 16, torch.float32)
    mask = {"prefix": _prefix_mask([37, 20, 5], 37), "holes": torch.rand(3, 37, device=DEVICE) < 0.7,
            "none": None}[mask_kind]
    check_against_reference(q, k, v, table, gate, mask, backend="torch")


def test_torch_backend_empty_sequence_is_zero_and_half_precision():
    q, k, v, table, gate = _inputs(2, 25, 2, 16, torch.bfloat16)
    check_against_reference(q, k, v, table, gate, _prefix_mask([25, 11], 25), backend="torch")
    out = rel_pos_attention(q, k, v, RelativePositionBias(table, NB, MD, gate), _prefix_mask([0, 11], 25),
                            backend="torch")
    assert (out[0] == 0).all()


# ----------------------------------------------------------------------------- compile, ops, dispatch

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    q, k, v, table, gate = (t.requires_grad_() for t in _inputs(2, 24, 2, 16, torch.float32))
    mask = _prefix_mask([24, 15], 24)

    def fn(q, k, v, table, gate):
        out = rel_pos_attention(q, k, v, RelativePositionBias(table, NB, MD, gate), mask, backend=backend)
        return (out * mask[:, :, None, None]).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = (q, k, v, table, gate)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(fn(*leaves), leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dtable", "dgate"), got, want):
        assert_close(a, b, name=name)


def test_opcheck():
    q, k, v, table, gate = (t.requires_grad_() for t in _inputs(1, 18, 2, 16, torch.float32))
    mask = _prefix_mask([13], 18)
    torch.library.opcheck(rel_pos_attention_fwd_op, (q, k, v, table, gate, mask, NB, MD, 0.0, 0.25))
    torch.library.opcheck(rel_pos_attention_fwd_op, (q, k, v, table, None, None, NB, MD, 0.0, 0.25))


def test_triton_is_opt_in_and_reports_why():
    q, k, v, table, gate = _inputs(1, 8, 2, 16, torch.float32)
    rel_pos_attention(q, k, v, RelativePositionBias(table, NB, MD, gate))
    assert rel_pos_attention_op.last_reasons["triton"] == OPT_IN
    assert rel_pos_attention_op.last_reasons["torch"] is None


@pytest.mark.parametrize("change,error,match", [
    (dict(table=torch.zeros(NB, 3)), ValueError, r"table must be \[num_buckets, heads\]"),
    (dict(table=torch.zeros(NB + 2, 2)), ValueError, r"table must be"),
    (dict(gate=torch.zeros(2, 8, 3)), ValueError, r"gate must be \[batch, seq, heads\]"),
    (dict(gate=torch.zeros(2, 7, 2)), ValueError, r"gate must be"),
    (dict(num_buckets=15), ValueError, "num_buckets must be an even integer"),
    (dict(num_buckets=0), ValueError, "num_buckets must be an even integer"),
    (dict(num_buckets=2), ValueError, "num_buckets must be an even integer >= 4"),
    (dict(max_distance=4), ValueError, "max_distance must be an integer above"),
    (dict(table=torch.zeros(NB, 2, dtype=torch.long)), TypeError, "table must be a floating-point tensor"),
])
def test_bad_inputs(change, error, match):
    q, k, v, table, gate = _inputs(2, 8, 2, 16, torch.float32)
    rel_pos = RelativePositionBias(**{**dict(table=table, num_buckets=NB, max_distance=MD, gate=gate), **change})
    with pytest.raises(error, match=match):
        rel_pos_attention(q, k, v, rel_pos)


def test_rel_pos_must_be_the_public_type():
    q, k, v, table, _ = _inputs(1, 8, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="RelativePositionBias"):
        rel_pos_attention(q, k, v, table)
