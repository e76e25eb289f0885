"""Triton masked attention (forward + backward) against the fp64 reference, dropout, dispatch,
torch.compile. Shapes [B, S, H, D]; the kernels run through TRITON_INTERPRET=1 on CPU machines."""
import contextlib
import re

import pytest
import torch

from tests.tolerances import assert_close, assert_error_within
from unispeech_kernels import BackendUnavailableError
from unispeech_kernels import _runtime
from unispeech_kernels._runtime import interpret_mode
from unispeech_kernels.ops._common import forced_tiles
from unispeech_kernels.ops.attention import (AttentionInputs, aot_specs, attention, attention_op, attention_reference,
                                             draw_dropout_seed, dropout_keep_mask, kv_end_from_mask,
                                             mask_args)
from unispeech_kernels.ops.attention_kernels import (BWD_DKDV_CONFIGS, BWD_DQ_CONFIGS, FWD_CONFIGS, _dkdv_tuned,
                                                     _dq_tuned, _fwd_tuned)
from unispeech_kernels.padding import prefix_lengths

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _prefix_mask(lengths, seq):
    return torch.arange(seq, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]


def _inputs(B, S, H, D, dtype, qkv_views=False):
    if qkv_views:  # non-contiguous views of one projection output, as models produce them
        qkv = torch.randn(B, S, 3, H, D, device=DEVICE, dtype=dtype)
        return list(qkv.unbind(2))
    return [torch.randn(B, S, H, D, device=DEVICE, dtype=dtype) for _ in range(3)]


def _run(fn, q, k, v, grad, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def check_against_reference(q, k, v, mask, *, lengths=None, dropout_p=0.0, dropout_mask=None, softmax_scale=None,
                            rng_seed=None):
    """Output (real query rows) and dq, dk, dv within the tolerance of eager same-dtype vs fp64.
    ``lengths``: the op gets them (a prefix mask's lengths) instead of ``mask``, the references their
    mask. ``rng_seed``: torch.manual_seed right before the op (so it draws a known dropout seed)."""
    dtype = q.dtype
    B, S, H, D = q.shape
    op_mask = dict(key_padding_mask=mask) if lengths is None else dict(lengths=lengths)
    if lengths is not None:
        mask = torch.arange(S, device=q.device)[None, :] < lengths[:, None]
    real = mask if mask is not None else torch.ones(B, S, dtype=torch.bool, device=q.device)
    grad = torch.randn(B, S, H, D, device=q.device, dtype=dtype) * real[:, :, None, None]
    kw = dict(softmax_scale=softmax_scale, dropout_p=dropout_p)
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    out, grads = _run(lambda *t: attention(*t, backend="triton", **op_mask, **kw), q, k, v, grad)
    ref_kw = dict(kw, dropout_mask=dropout_mask)
    ref, ref_grads = _run(lambda *t: attention_reference(*t, mask, upcast=True, **ref_kw),
                          q.double(), k.double(), v.double(), grad.double())
    eager, eager_grads = _run(lambda *t: attention_reference(*t, mask, **ref_kw), q, k, v, grad)
    rows = real[:, :, None, None].expand_as(out)
    n = max(S, D)  # softmax and PV over S keys, scores over D
    assert_error_within(out[rows], ref[rows], eager[rows], dtype, "out", reduction=n)
    assert (out[~rows] == 0).all(), "padded query rows must be zero"
    for name, g, rg, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert_error_within(g, rg, eg, dtype, name, reduction=n)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_padded_odd_lengths(dtype):
    """S not a multiple of the block, odd lengths, a length-1 sequence, head_dim 24."""
    q, k, v = _inputs(3, 37, 2, 24, dtype)
    check_against_reference(q, k, v, _prefix_mask([37, 19, 1], 37))


def test_fully_padded_sequence_gives_zeros():
    q, k, v = _inputs(2, 21, 2, 16, torch.float16)
    out = check_against_reference(q, k, v, _prefix_mask([0, 17], 21))
    assert (out[0] == 0).all()


@pytest.mark.parametrize("dtype,D", [(torch.float16, 80), (torch.bfloat16, 256), (torch.float32, 64)])
def test_head_dims(dtype, D):
    q, k, v = _inputs(2, 20, 1, D, dtype)
    check_against_reference(q, k, v, _prefix_mask([20, 13], 20))


def test_non_contiguous_qkv_views():
    q, k, v = _inputs(2, 33, 2, 64, torch.bfloat16, qkv_views=True)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, _prefix_mask([33, 30], 33))


def test_batch1_no_mask_custom_scale():
    q, k, v = _inputs(1, 40, 3, 16, torch.float32)
    check_against_reference(q, k, v, None, softmax_scale=0.37)


def test_non_prefix_mask():
    """Holes in the mask (not an audio case, but supported): masked keys and rows are excluded."""
    mask = torch.rand(2, 35, device=DEVICE) < 0.6
    mask[:, 3] = True
    mask[1, 30:] = False
    q, k, v = _inputs(2, 35, 2, 16, torch.float32)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("prefix", [True, False])
def test_torch_backend_real_rows_and_grads(prefix):
    """The torch backend: prefix masks run SDPA per sequence on real frames (padded query rows
    zero), other masks one masked SDPA; real rows and gradients equal the fp64 reference."""
    q, k, v = (t.requires_grad_() for t in _inputs(3, 23, 2, 16, torch.float32))
    mask = _prefix_mask([23, 9, 0], 23)
    if not prefix:
        mask[0, 4] = False
    out = attention(q, k, v, mask, backend="torch")
    ref = attention_reference(q, k, v, mask, upcast=True)
    real = mask.any(1)[:, None] & (mask if prefix else torch.ones_like(mask))
    assert_close(out[real].double(), ref[real], torch.float32, "out")
    if prefix:
        assert (out[~mask] == 0).all()
    grad = torch.randn_like(out) * real[:, :, None, None]
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, a, b in zip("qkv", got, want):  # the reference's empty row (2) has NaN gradients
        assert_close(a[:2], b[:2], torch.float32, "d" + name)
        assert (a[2] == 0).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lengths_instead_of_a_prefix_mask(dtype):
    """A prefix mask given by its lengths (no mask loads in the kernels): odd lengths, block edges
    (32, 33), an empty sequence and a length past S (clamped: every frame real); with dropout too;
    the torch backend takes them as well."""
    S = 37
    lengths = torch.tensor([37, 32, 33, 0, 1, 60], device=DEVICE)
    q, k, v = _inputs(6, S, 2, 24, dtype)
    check_against_reference(q, k, v, None, lengths=lengths)
    torch.manual_seed(7)
    keep = dropout_keep_mask(draw_dropout_seed(q.device), 6, 2, S, 0.3)
    check_against_reference(q, k, v, None, lengths=lengths, dropout_p=0.3, dropout_mask=keep, rng_seed=7)
    mask = torch.arange(S, device=DEVICE)[None, :] < lengths[:, None]
    assert torch.equal(attention(q, k, v, lengths=lengths, backend="torch"), attention(q, k, v, mask, backend="torch"))


def test_prefix_lengths():
    prefix = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert prefix_lengths(prefix) == [2, 0, 3]
    holey = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    assert prefix_lengths(holey) is None


def test_kv_end_from_mask():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert kv_end_from_mask(mask).tolist() == [2, 0, 3, 4]
    assert kv_end_from_mask(mask).dtype == torch.int32


def test_mask_args_reuse_kv_end_until_the_mask_changes():
    """kv_end is computed once for the mask every layer gets, again for a new or modified mask."""
    mask = _prefix_mask([5, 3], 8)
    mask_u8, kv_end = mask_args(mask)
    assert mask_u8.dtype == torch.uint8 and kv_end.tolist() == [5, 3]
    assert mask_args(mask)[1] is kv_end
    assert mask_args(_prefix_mask([5, 3], 8))[1] is not kv_end
    mask[1, 6] = True
    assert mask_args(mask)[1].tolist() == [5, 7]
    assert mask_args(None) == (None, None)
    with torch.inference_mode():  # inference tensors have no version counter: computed every time
        frozen = _prefix_mask([4, 2], 8)
        assert mask_args(frozen)[1].tolist() == [4, 2]
        frozen[1, 3] = True
        assert mask_args(frozen)[1].tolist() == [4, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_run_then_holes_and_block_edges(dtype):
    """A mask real on its first 21 frames then with holes, a prefix ending exactly on a key-block
    edge (32) and one just past it (33), an unpadded row; with and without dropout."""
    S = 53
    mask = torch.zeros(4, S, dtype=torch.bool, device=DEVICE)
    mask[0, :21] = True
    mask[0, 21:] = torch.rand(S - 21, device=DEVICE) < 0.5
    mask[1, :32] = True
    mask[2, :33] = True
    mask[3] = True
    q, k, v = _inputs(4, S, 2, 32, dtype)
    check_against_reference(q, k, v, mask)
    torch.manual_seed(5)
    seed = draw_dropout_seed(q.device)
    keep = dropout_keep_mask(seed, 4, 2, S, 0.3)
    check_against_reference(q, k, v, mask, dropout_p=0.3, dropout_mask=keep, rng_seed=5)


def gpu_tiles(i):
    """The i-th autotune config of each attention kernel (cycling through the shorter lists) forced
    on the interpreter: the tile sizes the GPU may pick (warps and stages change no arithmetic)."""
    tiles = [(tuned, configs[i % len(configs)].kwargs) for tuned, configs in
             ((_fwd_tuned, FWD_CONFIGS), (_dkdv_tuned, BWD_DKDV_CONFIGS), (_dq_tuned, BWD_DQ_CONFIGS))]
    stack = contextlib.ExitStack()
    for tuned, kw in tiles:
        stack.enter_context(forced_tiles(tuned, kw))
    return stack


N_GPU_TILES = max(map(len, (FWD_CONFIGS, BWD_DKDV_CONFIGS, BWD_DQ_CONFIGS)))


@pytest.mark.skipif(not interpret_mode(), reason="tiles are forced under the interpreter; GPUs autotune")
@pytest.mark.parametrize("i", range(N_GPU_TILES))
def test_every_gpu_tile_config(i):
    """Each GPU config's tiles, with dropout: S 200 spans several 128 / 64 / 32 blocks, one length
    (131) ends inside a block, one sequence has every frame."""
    B, S, H = 2, 200, 2
    q, k, v = _inputs(B, S, H, 64, torch.float16)
    torch.manual_seed(3)
    keep = dropout_keep_mask(draw_dropout_seed(DEVICE), B, H, S, 0.2)
    with gpu_tiles(i):
        check_against_reference(q, k, v, _prefix_mask([S, 131], S), dropout_p=0.2, dropout_mask=keep, rng_seed=3)


def test_dropout_rate_within_binomial_bound():
    p, B, H, S = 0.3, 2, 2, 64
    keep = dropout_keep_mask(draw_dropout_seed(DEVICE), B, H, S, p)
    n = keep.numel()
    dropped = (~keep).sum().item() / n
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped - p) < 5 * sigma, f"drop rate {dropped:.4f}, expected {p} +- {5 * sigma:.4f}"
    other = dropout_keep_mask(draw_dropout_seed(DEVICE), B, H, S, p)
    assert (keep != other).any(), "a new seed must give a new mask"


def test_dropout_neighbours_independent():
    """Four keys share a Philox draw (one uniform each): neighbouring keys, keys a draw apart and
    neighbouring queries must agree only at the independent rate p^2 + (1-p)^2; a lane mix-up (a
    uniform used twice) would make them agree always."""
    p, S = 0.5, 256
    keep = dropout_keep_mask(draw_dropout_seed(DEVICE), 2, 2, S, p)
    rate = p * p + (1 - p) * (1 - p)
    for name, a, b in [(f"keys {d} apart", keep[..., :-d], keep[..., d:]) for d in (1, 2, 3, 4)] + \
                      [("neighbouring queries", keep[..., :-1, :], keep[..., 1:, :])]:
        n = a.numel()
        agree = (a == b).sum().item() / n
        sigma = (rate * (1 - rate) / n) ** 0.5
        assert abs(agree - rate) < 5 * sigma, f"{name}: agree {agree:.4f}, expected {rate} +- {5 * sigma:.4f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_forward_backward_match_reference_with_kernel_mask(dtype):
    """The mask regenerated from the seed the op drew reproduces its output and all gradients."""
    p, B, S, H, D = 0.25, 2, 29, 2, 16
    q, k, v = _inputs(B, S, H, D, dtype)
    mask = _prefix_mask([29, 18], S)
    torch.manual_seed(1234)
    seed = draw_dropout_seed(DEVICE)
    keep = dropout_keep_mask(seed, B, H, S, p)
    check_against_reference(q, k, v, mask, dropout_p=p, dropout_mask=keep, rng_seed=1234)


def test_dropout_reproducible_with_manual_seed():
    q, k, v = _inputs(1, 18, 1, 16, torch.float32)
    outs = []
    for s in (5, 5, 6):
        torch.manual_seed(s)
        outs.append(attention(q, k, v, dropout_p=0.5, backend="triton"))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def _bad(**over):
    q, k, v = _inputs(2, 8, 2, 16, torch.float32)
    args = dict(q=q, k=k, v=v, key_padding_mask=None)
    args.update(over)
    return args


@pytest.mark.parametrize("args,err,match", [
    (dict(k=torch.randn(2, 9, 2, 16)), ValueError, "shapes differ"),
    (dict(v=torch.randn(2, 8, 2, 16, dtype=torch.float16)), TypeError, "dtypes differ"),
    (dict(k=torch.randn(2, 8, 2, 16, device="meta")), ValueError, "devices differ"),
    (dict(q=torch.randn(1, 2, 1, 264), k=torch.randn(1, 2, 1, 264), v=torch.randn(1, 2, 1, 264)),
     ValueError, "head_dim 264"),
    (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, "shape"),
    (dict(key_padding_mask=torch.ones(2, 8)), TypeError, "bool"),
    (dict(q=torch.randn(2, 8, 16)), ValueError, r"\[batch, seq, heads, head_dim\]"),
    (dict(q=torch.randn(2, 8, 2, 0), k=torch.randn(2, 8, 2, 0), v=torch.randn(2, 8, 2, 0)), ValueError,
     "head_dim must be at least 1"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be positive and finite"),
    (dict(softmax_scale=3e38), ValueError, "softmax_scale must be positive and finite"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be positive and finite"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale must be positive and finite"),
])
def test_bad_input_errors(args, err, match):
    a = _bad(**args)
    with pytest.raises(err, match=match):
        attention(a["q"], a["k"], a["v"], a["key_padding_mask"], softmax_scale=a.get("softmax_scale"),
                  backend="triton")


@pytest.mark.parametrize("mask,lengths,err,match", [
    (torch.ones(2, 8, dtype=torch.bool), torch.tensor([8, 3]), ValueError, "not both"),
    (None, torch.tensor([8.0, 3.0]), TypeError, "integer tensor"),
    (None, [8, 3], TypeError, "integer tensor"),
    (None, torch.tensor([8, 3, 1]), ValueError, r"shape \[batch\]"),
    (None, torch.tensor([8, 3], device="meta"), ValueError, "lengths on meta"),
])
def test_bad_lengths_errors(mask, lengths, err, match):
    q, k, v = _inputs(2, 8, 2, 16, torch.float32)
    with pytest.raises(err, match=match):
        attention(q, k, v, mask, lengths=lengths, backend="triton")


def test_forced_triton_on_cpu_without_interpreter_lists_reasons(monkeypatch):
    monkeypatch.setattr(_runtime, "_INTERPRET", False)  # as if imported without TRITON_INTERPRET
    q, k, v = (torch.randn(1, 4, 1, 16) for _ in range(3))
    with pytest.raises(BackendUnavailableError, match="triton: CPU tensors need TRITON_INTERPRET=1"):
        attention(q, k, v, backend="triton")
    assert attention_op.select(AttentionInputs(q, k, v, None)).name == "torch"  # auto selection falls back


def test_dispatch_choices_and_env_override(monkeypatch):
    q, k, v = _inputs(1, 4, 1, 16, torch.float32)
    assert attention_op.select(AttentionInputs(q, k, v, None)).name == "triton"
    doubles = [t.double() for t in (q, k, v)]
    assert attention_op.select(AttentionInputs(*doubles, None)).name == "torch"
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64"):
        attention(*doubles, backend="triton")
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "attention=torch")
    assert attention_op.select(AttentionInputs(q, k, v, None)).name == "torch"
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v))
    for value in ("attention=triton,torch", "torch,attention=triton"):  # the op's entry beats the bare one
        monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", value)
        assert attention_op.select(AttentionInputs(q, k, v, None)).name == "triton", value
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "cuda")  # the whole model: Triton where no CUDA kernel
    assert attention_op.select(AttentionInputs(q, k, v, None)).name == "triton"
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "attention=cuda")  # this op, explicitly: it has none
    with pytest.raises(BackendUnavailableError, match="cuda: not implemented for this op"):
        attention_op.select(AttentionInputs(q, k, v, None))


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("yes", True),
                                            ("0", False), ("off", False), ("", False)])
def test_interpreter_setting_read_as_triton_reads_it(monkeypatch, value, expected):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _runtime._read_interpret_mode() is expected


def test_torch_compile_fullgraph_no_graph_break():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 16, 1, 16, torch.float32))
    mask = _prefix_mask([11], 16)

    def fn(q, k, v):
        return attention(q, k, v, mask, backend="triton").sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v).backward()
    torch.testing.assert_close(loss, fn(q, k, v))
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_aot_specs_cover_model_shapes():
    specs = aot_specs()
    names = {s["name"] for s in specs}
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for variant in ("", "_dropout", "_packed", "_dropout_packed"):  # UniSpeech shapes: head_dim 64, bf16
            pattern = rf"attn_{kernel}_bf16_d64_m\d+_n\d+_w\d+_s\d+{variant}"
            assert any(re.fullmatch(pattern, n) for n in names), (kernel, variant)
    for s in specs:
        assert set(s["signature"]) == set(s["fn"].arg_names)
        assert all(s["signature"][c] == "constexpr" for c in s["constexprs"])


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80])
def test_gpu_model_shape_bf16(D):
    """Real kernels with autotuning at a model-like shape."""
    S = 300
    q, k, v = _inputs(2, S, 4, D, torch.bfloat16)
    check_against_reference(q, k, v, _prefix_mask([S, 173], S), dropout_p=0.0)
