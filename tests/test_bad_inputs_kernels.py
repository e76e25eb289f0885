"""Bad input to the kernel ops, on the torch and Triton backends alike: every case ends in a clear
error naming the argument, or in the documented result (padding and NaN/Inf in the feature encoder
and the positional conv: their module docstrings), checked against the fp64 reference. Tiny shapes:
Triton runs interpreted."""
import dataclasses
import math

import pytest
import torch

from tests.bad_inputs import documented, raises
from unispeech_kernels import attention, attention_packed, feature_encoder, forced_align, pos_conv_embed
from unispeech_kernels.dispatch import BackendUnavailableError
from unispeech_kernels.ops.attention import AttentionInputs, attention_op, attention_reference
from unispeech_kernels.ops.pos_conv import pos_conv_reference

BACKENDS = ("torch", "triton")
NAN, INF = float("nan"), float("inf")


def qkv(B=2, S=7, H=2, D=8, dtype=torch.float32):
    return [torch.randn(B, S, H, D, dtype=dtype) for _ in range(3)]


def prefix_mask(lengths, S):
    return torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------------------- argument checks

def _attention_cases():
    q, k, v = qkv()
    m = prefix_mask([7, 4], 7)
    return {
        "q not a tensor": (lambda: attention(q.tolist(), k, v), TypeError, "q must be a torch.Tensor, got list"),
        "q 3-D": (lambda: attention(q[0], k[0], v[0]), ValueError, r"q must be \[batch, seq, heads, head_dim\]"),
        "q int": (lambda: attention(q.long(), k, v), TypeError, "q must be floating point"),
        "k shape": (lambda: attention(q, k[:, :6], v), ValueError, "shapes differ"),
        "v dtype": (lambda: attention(q, k, v.double()), TypeError, "dtypes differ"),
        "head_dim 0": (lambda: attention(q[..., :0], k[..., :0], v[..., :0]), ValueError, "head_dim must be at least"),
        "head_dim 300": (lambda: attention(*(torch.zeros(1, 2, 1, 300) for _ in range(3))), ValueError,
                         "head_dim 300 > 256"),
        "mask float": (lambda: attention(q, k, v, m.float()), TypeError, "key_padding_mask must be a bool tensor"),
        "mask int": (lambda: attention(q, k, v, m.long()), TypeError, "key_padding_mask must be a bool tensor"),
        "mask shape": (lambda: attention(q, k, v, m[:, :5]), ValueError, r"key_padding_mask must have shape"),
        "mask meta": (lambda: attention(q, k, v, m.to("meta")), ValueError, "key_padding_mask on meta"),
        "dropout 1": (lambda: attention(q, k, v, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        "dropout -0.1": (lambda: attention(q, k, v, dropout_p=-0.1), ValueError, r"dropout_p must be in"),
        "dropout nan": (lambda: attention(q, k, v, dropout_p=NAN), ValueError, r"dropout_p must be in"),
        "scale 0": (lambda: attention(q, k, v, softmax_scale=0.0), ValueError, "softmax_scale must be positive"),
        "scale inf": (lambda: attention(q, k, v, softmax_scale=INF), ValueError, "softmax_scale must be positive"),
        "scale nan": (lambda: attention(q, k, v, softmax_scale=NAN), ValueError, "softmax_scale must be positive"),
        "scale -1": (lambda: attention(q, k, v, softmax_scale=-1.0), ValueError, "softmax_scale must be positive"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_attention_cases()))
def test_attention_arguments(case, backend):
    fn, error, pattern = _attention_cases()[case]
    raises(lambda: _with_backend(fn, backend), error, pattern)


def _with_backend(fn, backend):
    """Run ``fn`` with ``backend`` forced (the checks run before any backend is chosen)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNISPEECH_KERNELS_BACKEND", backend)
        return fn()


def test_attention_unknown_backend():
    q, k, v = qkv()
    raises(lambda: attention(q, k, v, backend="cudnn"), ValueError, "unknown backend 'cudnn'")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_empty_sequence_axis(backend):
    """S = 0: the torch backend returns the empty output; Triton says it has no sequence to launch on."""
    q, k, v = qkv(S=0)
    if backend == "torch":
        out = attention(q, k, v, prefix_mask([0, 0], 0), backend="torch")
        documented(out.shape == q.shape, "empty output")
    else:
        raises(lambda: attention(q, k, v, backend="triton"), BackendUnavailableError, "empty sequence axis")


@pytest.mark.parametrize("packed", [False, True])
def test_triton_int32_offset_limits(packed):
    """The Triton kernels index within a sequence with int32 offsets: inputs whose rows span more
    than 2^31 - 1 elements are declined with that reason (the dispatcher falls back to torch)."""
    big = torch.empty_strided((1, 2 ** 31, 1, 16), (0, 16, 16, 1), device="meta")
    inputs = AttentionInputs(big, big, big)
    limits = dict(attention_op.backends["triton"].limits)
    name = "elements one sequence spans (int32 offsets)"
    assert inputs.sizes[name] > limits[name]
    on_cpu = dataclasses.replace(attention_op.backends["triton"], runtime="torch")  # past the device check
    reason = on_cpu.reason(inputs)
    if packed:
        from unispeech_kernels.ops.attention_packed import PackedAttentionInputs
        rows = torch.empty_strided((2 ** 31, 1, 16), (16, 16, 1), device="meta")
        reason = on_cpu.reason(PackedAttentionInputs(rows, rows, rows, (2 ** 31,)))
    documented(reason == f"{name} 34359738368 > 2147483647", reason)


def _packed_cases():
    q = torch.randn(6, 2, 8)
    return {
        "bool lengths": (lambda: attention_packed(q, q, q, [True, True]), TypeError, "lengths must be integers"),
        "bool tensor": (lambda: attention_packed(q, q, q, torch.tensor([True, True])), TypeError,
                        "lengths must be integers"),
        "float lengths": (lambda: attention_packed(q, q, q, [2.0, 4.0]), TypeError, "lengths must be integers"),
        "float tensor": (lambda: attention_packed(q, q, q, torch.tensor([2.0, 4.0])), TypeError,
                         "lengths must be integers"),
        "meta lengths": (lambda: attention_packed(q, q, q, torch.tensor([3, 3], device="meta")), ValueError,
                         "lengths on meta"),
        "2-D lengths": (lambda: attention_packed(q, q, q, torch.tensor([[3, 3]])), ValueError,
                        "lengths must be a sequence of ints"),
        "negative": (lambda: attention_packed(q, q, q, [7, -1]), ValueError, "must be >= 0 and sum to the 6 rows"),
        "sum": (lambda: attention_packed(q, q, q, [3, 2]), ValueError, "sum to the 6 rows"),
        "string": (lambda: attention_packed(q, q, q, "33"), TypeError, "lengths must be integers"),
        "q 4-D": (lambda: attention_packed(q[None], q[None], q[None], [6]), ValueError,
                  r"q must be \[rows, heads, head_dim\]"),
        "dropout": (lambda: attention_packed(q, q, q, [6], dropout_p=2.0), ValueError, "dropout_p"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_packed_cases()))
def test_attention_packed_arguments(case, backend):
    fn, error, pattern = _packed_cases()[case]
    raises(lambda: _with_backend(fn, backend), error, pattern)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_packed_int_tensor_lengths(backend):
    q = torch.randn(6, 2, 8)
    out = attention_packed(q, q, q, torch.tensor([2, 4]), backend=backend)
    documented(torch.equal(out, attention_packed(q, q, q, [2, 4], backend=backend)), "int tensor lengths read as ints")


def _stack(C=8, dtype=torch.float32):
    ws = [torch.randn(C, 1, 10, dtype=dtype), torch.randn(C, C, 3, dtype=dtype)]
    return ws, [torch.randn(C, dtype=dtype), None], [5, 2]


def _encoder_cases():
    ws, bs, strides = _stack()
    norm = ([torch.ones(8)], [torch.zeros(8)])
    x = torch.randn(2, 400)

    def run(x=x, ws=ws, bs=bs, strides=strides, mode="group", norm=norm, **kw):
        return lambda: feature_encoder(x, ws, bs, strides, mode, *norm, **kw)
    return {
        "1-D audio": (run(x[0]), ValueError, r"input_values must be a \[batch, samples\] tensor"),
        "int audio": (run(x.long()), TypeError, "input_values must be floating point"),
        "T = 0": (run(x[:, :0]), ValueError, "audio of 0 samples is shorter than the receptive field"),
        "too short": (run(x[:, :12]), ValueError, "shorter than the receptive field"),
        "layers": (run(bs=bs[:1]), ValueError, "one entry per layer"),
        "norm mode": (run(mode="batch"), ValueError, "norm_mode must be 'group' or 'layer'"),
        "norm count": (run(mode="layer"), ValueError, "needs 2 norm weight/bias tensors"),
        "stride float": (run(strides=[5.0, 2]), ValueError, "layer 0 stride must be a positive int, got 5.0"),
        "stride 0": (run(strides=[5, 0]), ValueError, "layer 1 stride must be a positive int"),
        "weight shape": (run(ws=[ws[0], ws[1][:, :4]]), ValueError, r"layer 1 conv weight must be \[C_out, 8"),
        "weight dtype": (run(ws=[ws[0], ws[1].double()]), TypeError, "conv weight torch.float64"),
        "bias shape": (run(bs=[torch.zeros(3), None]), ValueError, r"layer 0 conv bias must be \[8\]"),
        "norm shape": (run(norm=([torch.ones(3)], [torch.zeros(8)])), ValueError, r"norm weight must be \[8\]"),
        "lengths float": (run(input_lengths=torch.tensor([400.0, 200.0])), TypeError,
                          "input_lengths must hold integers, got torch.float32"),
        "lengths shape": (run(input_lengths=torch.tensor([400])), ValueError, r"input_lengths must have shape"),
        "lengths meta": (run(input_lengths=torch.tensor([400, 1], device="meta")), ValueError,
                         "input_lengths on meta"),
        "lengths list": (run(input_lengths=[400, 200]), TypeError, "input_lengths must be a tensor"),
        "activation": (run(activation="swish2"), ValueError, "swish2"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_encoder_cases()))
def test_feature_encoder_arguments(case, backend):
    fn, error, pattern = _encoder_cases()[case]
    raises(lambda: _with_backend(fn, backend), error, pattern)


def _pos_conv_cases():
    h = torch.randn(2, 9, 8)
    w, b = torch.randn(8, 2, 5), torch.randn(8)
    return {
        "groups float": (lambda: pos_conv_embed(h, w, b, groups=4.0), TypeError, "groups must be an int, got 4.0"),
        "groups 0": (lambda: pos_conv_embed(h, w, b, groups=0), ValueError, "not divisible by groups 0"),
        "groups 3": (lambda: pos_conv_embed(h, w, b, groups=3), ValueError, "channels 8 not divisible by groups 3"),
        "2-D hidden": (lambda: pos_conv_embed(h[0], w, b, groups=4), ValueError,
                       r"hidden must be \[batch, frames, channels\]"),
        "int hidden": (lambda: pos_conv_embed(h.long(), w, b, groups=4), TypeError, "floating point"),
        "weight shape": (lambda: pos_conv_embed(h, w[:, :1], b, groups=4), ValueError, r"weight must be \[8, 2, K\]"),
        "kernel 0": (lambda: pos_conv_embed(h, w[..., :0], b, groups=4), ValueError, "kernel size"),
        "bias shape": (lambda: pos_conv_embed(h, w, b[:3], groups=4), ValueError, r"bias must be \[8\]"),
        "weight dtype": (lambda: pos_conv_embed(h, w.double(), b, groups=4), TypeError, "weight is torch.float64"),
        "weight not a tensor": (lambda: pos_conv_embed(h, w.tolist(), b, groups=4), TypeError,
                                "weight must be a torch.Tensor"),
        "activation": (lambda: pos_conv_embed(h, w, b, groups=4, activation="swish2"), ValueError, "swish2"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_pos_conv_cases()))
def test_pos_conv_arguments(case, backend):
    fn, error, pattern = _pos_conv_cases()[case]
    raises(lambda: _with_backend(fn, backend), error, pattern)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_conv_no_frames(backend):
    """T = 0: the empty output, and zero gradients for the weight and bias."""
    h, w, b = (torch.randn(*s, requires_grad=True) for s in ((2, 0, 8), (8, 2, 5), (8,)))
    out = pos_conv_embed(h, w, b, groups=4, backend=backend)
    out.sum().backward()
    documented(out.shape == h.shape and not w.grad.any() and not b.grad.any(), "empty output")


def _align_cases():
    lp = torch.randn(2, 6, 5).log_softmax(-1)
    t = torch.tensor([[1, 2], [3, 3]])
    bad = lp.clone()
    bad[1, 2, 0] = NAN
    return {
        "NaN log_probs": (lambda: forced_align(bad, t), ValueError, r"log_probs\[1, 2, 0\] = nan"),
        "+inf log_probs": (lambda: forced_align(bad.nan_to_num(posinf=INF, nan=INF), t), ValueError, "= inf"),
        "float targets": (lambda: forced_align(lp, t.float()), TypeError, "targets must hold integer label ids"),
        "blank 5": (lambda: forced_align(lp, t, blank=5), ValueError, "blank must be a class of log_probs"),
        "blank target": (lambda: forced_align(lp, t * 0), ValueError, "is the blank id 0"),
        "target 9": (lambda: forced_align(lp, t + 6), ValueError, "is no class of log_probs"),
        "lengths > T": (lambda: forced_align(lp, t, input_lengths=[7, 6]), ValueError, r"input_lengths\[0\] = 7"),
        "float lengths": (lambda: forced_align(lp, t, input_lengths=torch.tensor([6.0, 6.0])), TypeError,
                          "must hold integers"),
        "infeasible mode": (lambda: forced_align(lp, t, infeasible="skip"), ValueError, "infeasible must be one of"),
        "star": (lambda: forced_align(lp, t, star=2), ValueError, "star must be None or an id >="),
        "penalty": (lambda: forced_align(lp, t, star=5, star_penalty=NAN), ValueError, "star_penalty must be"),
        "int log_probs": (lambda: forced_align(lp.long(), t), TypeError, "log_probs must be fp32"),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(_align_cases()))
def test_forced_align_arguments(case, backend):
    fn, error, pattern = _align_cases()[case]
    raises(lambda: _with_backend(fn, backend), error, pattern)


# --------------------------------------------------------------------------- non-finite contract

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,invariant", [("group", False), ("group", True), ("layer", False)])
def test_feature_encoder_padding_never_reaches_real_frames(mode, invariant, backend):
    """NaN/Inf in samples past input_lengths: the real frames are those of zero padding."""
    ws, bs, strides = _stack()
    layers = 2 if mode == "layer" else 1
    norm = [torch.randn(8) for _ in range(layers)], [torch.randn(8) for _ in range(layers)]
    x = torch.randn(2, 400)
    lengths = torch.tensor([400, 203])
    clean = x.clone()
    clean[1, 203:] = 0.0
    x[1, 203:] = NAN
    x[1, 300] = INF
    kw = dict(input_lengths=lengths, batch_invariant=invariant, backend=backend)
    out = feature_encoder(x, ws, bs, strides, mode, *norm, **kw)
    want = feature_encoder(clean, ws, bs, strides, mode, *norm, **kw)
    real = 19  # frames of 203 samples
    documented(torch.isfinite(out[1, :real]).all() and torch.allclose(out[:, :real], want[:, :real], atol=1e-5),
               "padding read as zeros")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_conv_nan_reaches_its_receptive_field_only(backend):
    h = torch.randn(2, 20, 8)
    w, b = torch.randn(8, 2, 5), torch.randn(8)
    h[0, 10, 3] = NAN
    out = pos_conv_embed(h, w, b, groups=4, backend=backend)
    ref = pos_conv_reference(h, w, b, groups=4, upcast=True)
    documented(torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[0, 8:13]).any()
               and torch.isfinite(out[1]).all() and torch.isfinite(out[0, :7]).all(), "NaN within its window")


def test_reference_contract_matches_ieee_where_defined():
    """Where IEEE softmax is defined (finite scores), the reference is plain softmax attention."""
    q, k, v = qkv(dtype=torch.float64)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
    plain = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    documented(torch.allclose(attention_reference(q, k, v), plain), "plain softmax on finite input")


# ------------------------------------------------------------------------------------ fuzz sample

@pytest.mark.parametrize("backend,cases", [("torch", 40), ("triton", 4)])
def test_fuzz_sample(backend, cases):
    """A sample of ``python -m bench.fuzz_kernels``: every kernel's numerical cases, and the
    non-finite ones of pos_conv and feature_encoder."""
    from bench import fuzz_kernels
    results = fuzz_kernels.run(cases, seed=3, backends=(backend,))
    assert all(c["cases"] == cases for c in results.values())
    assert not any(c["mismatches"] for c in results.values()), {k: c["first"] for k, c in results.items()}


def test_fuzz_flags_a_wrong_answer(monkeypatch):
    """The fuzz target can fail: a kernel off by a little, or one that drops a NaN, is a mismatch."""
    from bench import fuzz_kernels
    monkeypatch.setitem(fuzz_kernels.CASES, "pos_conv", fuzz_kernels.pos_conv_case)
    real = fuzz_kernels.pos_conv_embed
    monkeypatch.setattr(fuzz_kernels, "pos_conv_embed", lambda *a, **k: real(*a, **k).nan_to_num() * 1.05)
    results = fuzz_kernels.run(12, seed=0, backends=("torch",), kernels=("pos_conv",))
    assert results[("pos_conv", "torch")]["mismatches"] == 12
