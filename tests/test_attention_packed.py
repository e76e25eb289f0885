"""Attention on packed rows [N, H, D] (sequences back to back) against the masked padded op and the
fp64 reference: every output and gradient, both backends, dropout, dispatch, errors, torch.compile.
The Triton kernels run through TRITON_INTERPRET=1 on CPU machines."""
import pytest
import torch

from tests.test_attention import N_GPU_TILES, gpu_tiles
from tests.tolerances import assert_close, assert_error_within
from unispeech_kernels import BackendUnavailableError, attention, attention_packed
from unispeech_kernels import _runtime
from unispeech_kernels._runtime import interpret_mode
from unispeech_kernels.ops.attention import attention_reference
from unispeech_kernels.ops.attention_packed import PackedAttentionInputs, attention_packed_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENGTHS = [37, 0, 19, 1, 16]  # odd, empty, length 1, exactly one interpreter block


def _packed_qkv(lengths, H, D, dtype):
    """q, k, v [N, H, D] as views of one [N, 3, H, D] projection output, as the model makes them."""
    qkv = torch.randn(sum(lengths), 3, H, D, device=DEVICE, dtype=dtype)
    return [t.requires_grad_() for t in qkv.unbind(1)]


def _padded(x, lengths):
    """[N, ...] rows -> ([B, S, ...] zero padded, mask [B, S]); differentiable."""
    S = max(lengths)
    mask = torch.arange(S, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
    out = x.new_zeros(len(lengths), S, *x.shape[1:]).masked_scatter(mask.view(*mask.shape, *[1] * (x.dim() - 1)), x)
    return out, mask


def _masked_reference(q, k, v, lengths, **kw):
    """The padded masked reference, on the packed rows: [N, H, D]."""
    (qp, mask), (kp, _), (vp, _) = (_padded(t, lengths) for t in (q, k, v))
    return attention_reference(qp, kp, vp, mask, **kw)[mask]


def _out_and_grads(fn, q, k, v, grad):
    out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), grad)


def _assert_matches_reference(out, grads, q, k, v, grad, lengths):
    """out and dq, dk, dv within the tolerance of the fp64 masked reference (eager same-dtype error
    as the baseline)."""
    ref, ref_grads = _out_and_grads(lambda *t: _masked_reference(*(x.double() for x in t), lengths, upcast=True),
                                    q, k, v, grad)
    eager, eager_grads = _out_and_grads(lambda *t: _masked_reference(*t, lengths), q, k, v, grad)
    n = max(max(lengths), q.shape[-1])  # softmax over a sequence's keys, scores over D
    assert_error_within(out, ref, eager, q.dtype, "out", reduction=n)
    for name, g, rg, eg in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert_error_within(g, rg, eg, q.dtype, name, reduction=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [24, 64])
def test_triton_matches_fp64_reference(dtype, head_dim):
    q, k, v = _packed_qkv(LENGTHS, 2, head_dim, dtype)
    grad = torch.randn_like(q)
    out, grads = _out_and_grads(lambda *t: attention_packed(*t, LENGTHS, backend="triton"), q, k, v, grad)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_matches_reference(out, grads, q, k, v, grad, LENGTHS)


@pytest.mark.skipif(not interpret_mode(), reason="tiles are forced under the interpreter; GPUs autotune")
@pytest.mark.parametrize("i", range(N_GPU_TILES))
def test_every_gpu_tile_config(i):
    """Each GPU config's tiles on packed rows: sequences start mid-block, one is longer than 128."""
    lengths = [150, 0, 77, 1]
    q, k, v = _packed_qkv(lengths, 2, 64, torch.float16)
    grad = torch.randn_like(q)
    with gpu_tiles(i):
        out, grads = _out_and_grads(lambda *t: attention_packed(*t, lengths, backend="triton"), q, k, v, grad)
    _assert_matches_reference(out, grads, q, k, v, grad, lengths)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_equals_padded_masked_op_with_dropout(backend):
    """Packed rows give the padded op's real rows and gradients; for Triton even with dropout (the
    same seed draws the same (batch*head, query, key) keep-mask with S = max(lengths))."""
    p = 0.3 if backend == "triton" else 0.0
    q, k, v = _packed_qkv(LENGTHS, 2, 16, torch.float32)
    grad = torch.randn_like(q)
    torch.manual_seed(7)
    out, grads = _out_and_grads(lambda *t: attention_packed(*t, LENGTHS, dropout_p=p, backend=backend),
                                q, k, v, grad)

    def padded(q, k, v):
        (qp, mask), (kp, _), (vp, _) = (_padded(t, LENGTHS) for t in (q, k, v))
        return attention(qp, kp, vp, mask, dropout_p=p, backend=backend)[mask]

    torch.manual_seed(7)
    want, want_grads = _out_and_grads(padded, q, k, v, grad)
    assert_close(out, want, torch.float32, "out")
    for name, g, w in zip("qkv", grads, want_grads):
        assert_close(g, w, torch.float32, "d" + name)
    if p:
        torch.manual_seed(8)
        assert not torch.equal(attention_packed(q, k, v, LENGTHS, dropout_p=p, backend=backend), out)


@pytest.mark.parametrize("lengths", [LENGTHS, [13, 13, 13]], ids=["ragged", "equal"])
def test_torch_backend_exact_in_fp64(lengths):
    """Per-sequence SDPA calls (ragged) and one batched call on a [B, n, H, D] view (equal lengths)."""
    q, k, v = _packed_qkv(lengths, 2, 16, torch.float64)
    grad = torch.randn_like(q)
    out, grads = _out_and_grads(lambda *t: attention_packed(*t, lengths, softmax_scale=0.3, backend="torch"),
                                q, k, v, grad)
    ref, ref_grads = _out_and_grads(lambda *t: _masked_reference(*t, lengths, softmax_scale=0.3), q, k, v, grad)
    assert_close(out, ref, torch.float64, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, torch.float64, "d" + name)


def test_no_rows():
    """Nothing to attend: the torch backend runs (Triton declines an empty sequence axis)."""
    q, k, v = _packed_qkv([0, 0], 2, 16, torch.float32)
    assert attention_packed_op.select(PackedAttentionInputs(q, k, v, (0, 0))).name == "torch"
    assert attention_packed(q, k, v, [0, 0]).shape == (0, 2, 16)
    assert attention_packed(q, k, v, []).shape == (0, 2, 16)


def test_dispatch_and_env_alias(monkeypatch):
    q, k, v = _packed_qkv([5, 3], 1, 16, torch.float32)
    assert attention_packed_op.select(PackedAttentionInputs(q, k, v, (5, 3))).name == "triton"
    assert attention_packed_op.select(PackedAttentionInputs(q, k, v, (0, 0, 8))).name == "triton"
    doubles = [t.double() for t in (q, k, v)]
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64"):
        attention_packed(*doubles, [5, 3], backend="triton")
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "attention=torch")  # the padded op's switch
    assert attention_packed_op.select(PackedAttentionInputs(q, k, v, (5, 3))).name == "torch"
    for value in ("attention=torch,attention_packed=triton", "attention_packed=triton,attention=torch"):
        monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", value)  # its own entry beats its alias's
        assert attention_packed_op.select(PackedAttentionInputs(q, k, v, (5, 3))).name == "triton", value
    monkeypatch.setattr(_runtime, "_INTERPRET", False)  # as if imported without TRITON_INTERPRET
    monkeypatch.delenv("UNISPEECH_KERNELS_BACKEND")
    with pytest.raises(BackendUnavailableError, match="triton: CPU tensors need TRITON_INTERPRET=1"):
        attention_packed(q, k, v, [5, 3], backend="triton")


@pytest.mark.parametrize("args,lengths,err,match", [
    (dict(k=torch.randn(9, 2, 16)), [5, 3], ValueError, "shapes differ"),
    (dict(v=torch.randn(8, 2, 16, dtype=torch.float16)), [5, 3], TypeError, "dtypes differ"),
    (dict(q=torch.randn(1, 8, 2, 16)), [5, 3], ValueError, r"\[rows, heads, head_dim\]"),
    (dict(q=torch.randn(8, 1, 264), k=torch.randn(8, 1, 264), v=torch.randn(8, 1, 264)), [5, 3], ValueError,
     "head_dim 264"),
    ({}, [5, 2], ValueError, "sum to the 8 rows"),
    ({}, [9, -1], ValueError, ">= 0"),
    ({}, [5, 3], ValueError, "dropout_p"),
    ({}, [5.5, 2.5], TypeError, "lengths must be integers"),
    (dict(q=torch.randn(8, 2, 0), k=torch.randn(8, 2, 0), v=torch.randn(8, 2, 0)), [5, 3], ValueError,
     "head_dim must be at least 1"),
])
def test_bad_input_errors(args, lengths, err, match):
    t = dict(q=torch.randn(8, 2, 16), k=torch.randn(8, 2, 16), v=torch.randn(8, 2, 16))
    t.update(args)
    with pytest.raises(err, match=match):
        attention_packed(t["q"], t["k"], t["v"], lengths, dropout_p=1.0 if "dropout" in match else 0.0)


def test_torch_compile_fullgraph_no_graph_break():
    q, k, v = _packed_qkv([11, 5], 1, 16, torch.float32)

    def fn(q, k, v):
        return attention_packed(q, k, v, [11, 5], backend="triton").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = fn(q, k, v)
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads, torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_with_lengths_as_an_argument(backend):
    """The lengths as an input of the compiled function: a second list of the same total (which
    Dynamo then traces as dynamic ints) recompiles and computes its own answer."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(12, 2, 16, device=DEVICE) for _ in range(3))

    def fn(q, k, v, lengths):
        return attention_packed(q, k, v, lengths, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for lengths in ([5, 7], [3, 9], [12, 0]):
        torch.testing.assert_close(compiled(q, k, v, lengths), fn(q, k, v, lengths))


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_model_shape_bf16(dropout_p):
    """Autotuned kernels at a UniSpeech-like shape (head_dim 64, 12 heads, 10 s and 7 s of audio):
    packed == the padded masked op on real rows, output and gradients, with the same seed."""
    lengths = [499, 349]
    q, k, v = _packed_qkv(lengths, 12, 64, torch.bfloat16)
    grad = torch.randn_like(q)
    torch.manual_seed(3)
    out, grads = _out_and_grads(lambda *t: attention_packed(*t, lengths, dropout_p=dropout_p, backend="triton"),
                                q, k, v, grad)

    def padded(q, k, v):
        (qp, mask), (kp, _), (vp, _) = (_padded(t, lengths) for t in (q, k, v))
        return attention(qp, kp, vp, mask, dropout_p=dropout_p, backend="triton")[mask]

    torch.manual_seed(3)
    want, want_grads = _out_and_grads(padded, q, k, v, grad)
    # the same math in the same order per tile: differences only from block configs autotuned apart
    assert_close(out, want, torch.bfloat16, "out")
    for name, g, w in zip("qkv", grads, want_grads):
        assert_close(g, w, torch.bfloat16, "d" + name)
    if dropout_p == 0.0:
        _assert_matches_reference(out, grads, q, k, v, grad, lengths)
