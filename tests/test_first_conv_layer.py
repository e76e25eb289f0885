"""Triton first feature-encoder layer (1-channel conv + norm + GELU), forward and backward, against
the fp64 reference with eager same-dtype PyTorch as the error baseline. Shapes: audio [B, L],
output [B, T, C]. Kernels run through TRITON_INTERPRET=1 on CPU machines: small shapes."""
import pytest
import torch

from tests.tolerances import assert_close, assert_error_within, first_conv_bias_terms
from unispeech_kernels.dispatch import BackendUnavailableError
from unispeech_kernels.ops.first_conv_layer import (FirstConvLayerInputs, aot_specs, first_conv_layer,
                                                    first_conv_layer_op,
                                                    first_conv_layer_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, STRIDE = 10, 5


def _params(C, norm_mode, conv_bias, dtype):
    p = {"weight": torch.randn(C, 1, K) * 0.3, "bias": torch.randn(C) * 0.5 if conv_bias else None,
         "norm_weight": 1 + 0.2 * torch.randn(C) if norm_mode != "none" else None,
         "norm_bias": 0.2 * torch.randn(C) if norm_mode != "none" else None}
    return {k: v.to(DEVICE, dtype) if v is not None else None for k, v in p.items()}


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]


def _fwd_bwd(fn, x, p, dtype, grad, **kw):
    leaves = _leaves([x, p["weight"], p["bias"], p["norm_weight"], p["norm_bias"]], dtype)
    out = fn(leaves[0], leaves[1], leaves[2], STRIDE, kw.pop("norm_mode"), leaves[3], leaves[4], **kw)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad.to(out.dtype))
    return out.detach(), grads


def _check(norm_mode, conv_bias, dtype, B=2, L=333, C=24, input_lengths=None, batch_invariant=False,
           x=None):
    x = torch.randn(B, L, device=DEVICE, dtype=dtype) if x is None else x
    p = _params(C, norm_mode, conv_bias, dtype)
    kw = dict(norm_mode=norm_mode, input_lengths=input_lengths, batch_invariant=batch_invariant)
    T = (L - K) // STRIDE + 1
    grad = torch.randn(B, T, C, device=DEVICE, dtype=torch.float64)
    out, grads = _fwd_bwd(lambda *a, **k: first_conv_layer(*a, backend="triton", **k), x, p, dtype, grad,
                          **dict(kw))
    gold, gold_grads = _fwd_bwd(first_conv_layer_reference, x, p, torch.float64, grad, **dict(kw))
    eager, eager_grads = _fwd_bwd(first_conv_layer_reference, x, p, dtype, grad, **dict(kw))
    assert out.dtype == dtype and out.shape == (B, T, C)
    assert_error_within(out, gold, eager, dtype, "output", reduction=max(K, T, C))
    names = ["d_input", "d_weight", "d_bias", "d_norm_weight", "d_norm_bias"]
    names = [n for n, t in zip(names, [x, p["weight"], p["bias"], p["norm_weight"], p["norm_bias"]])
             if t is not None]
    assert len(grads) == len(names)
    cancels = {}
    if norm_mode == "group" and p["bias"] is not None:
        leaves = [t.double() if t is not None else None for t in (x, *p.values())]
        cancels["d_bias"] = first_conv_bias_terms(lambda: first_conv_layer_reference(
            leaves[0], *leaves[1:3], STRIDE, norm_mode, *leaves[3:], input_lengths=input_lengths,
            batch_invariant=batch_invariant), grad)
    for name, g, ref, e in zip(names, grads, gold_grads, eager_grads):
        assert g.dtype == dtype
        assert_error_within(g, ref, e, dtype, name, reduction=B * T, magnitude=cancels.get(name))
    return out


@pytest.mark.parametrize("norm_mode", ["group", "layer", "none"])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fp32_forward_backward(norm_mode, conv_bias):
    _check(norm_mode, conv_bias, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_mode,conv_bias", [("group", False), ("layer", True)])
def test_low_precision_forward_backward(dtype, norm_mode, conv_bias):
    _check(norm_mode, conv_bias, dtype, L=256)


def test_many_channels_in_chunks():
    """Group mode splits channels over programs (> 128 channels) and time over several splits."""
    _check("group", True, torch.float32, B=1, L=1200, C=160)


@pytest.mark.parametrize("norm_mode,conv_bias", [("group", False), ("layer", True)])
def test_model_channel_count(norm_mode, conv_bias):
    """UniSpeech's 512 channels, so the tiles are the ones the GPU runs at model shapes (their size
    follows the channel count): LayerNorm over a 512-wide tile of 8 frames, 2-frame backward tiles,
    group statistics in four 128-channel chunks."""
    _check(norm_mode, conv_bias, torch.bfloat16, B=2, L=400, C=512)


def test_one_frame_and_odd_lengths():
    """The exact kernel length gives one frame (group norm over one value: variance 0; torch's
    group_norm refuses a single value in total, so batch 2 there)."""
    for L in (K, K + STRIDE - 1, 1001):
        _check("group", True, torch.float32, B=2, L=L, C=8)
        _check("layer", False, torch.float32, B=1, L=L, C=8)


def test_non_contiguous_audio():
    wide = torch.randn(2, 2 * 301, device=DEVICE)
    _check("group", True, torch.float32, L=301, x=wide[:, ::2])


@pytest.mark.parametrize("norm_mode", ["group", "layer"])
def test_batch_invariant_statistics(norm_mode):
    """Group statistics over each utterance's real frames (layer mode ignores the lengths)."""
    lengths = torch.tensor([333, 120, 61], device=DEVICE)
    _check(norm_mode, True, torch.float32, B=3, L=333, input_lengths=lengths, batch_invariant=True)


def test_batch_invariant_utterance_without_frames():
    """An utterance shorter than the kernel has no real frame: zero statistics, as the reference."""
    p = _params(8, "group", True, torch.float32)
    x = torch.randn(2, 100, device=DEVICE)
    args = (x, p["weight"], p["bias"], STRIDE, "group", p["norm_weight"], p["norm_bias"])
    kw = dict(input_lengths=torch.tensor([100, 4], device=DEVICE), batch_invariant=True)
    out = first_conv_layer(*args, backend="triton", **kw)
    assert_close(out, first_conv_layer_reference(*args, **kw), torch.float32)


def test_batch_invariant_equals_single_utterance():
    p = _params(16, "group", True, torch.float32)
    x = torch.randn(2, 400, device=DEVICE)
    x[1, 250:] = 0.0
    lengths = torch.tensor([400, 250], device=DEVICE)
    args = (p["weight"], p["bias"], STRIDE, "group", p["norm_weight"], p["norm_bias"])
    batched = first_conv_layer(x, *args, input_lengths=lengths, batch_invariant=True, backend="triton")
    single = first_conv_layer(x[1:, :250], *args, backend="triton")
    frames = single.shape[1]
    assert_close(batched[1:, :frames], single, torch.float32)
    padded = first_conv_layer(x, *args, input_lengths=lengths, batch_invariant=False, backend="triton")
    assert (padded[1:, :frames] - single).abs().max() > 1e-3  # transformers' statistics include padding


def test_no_grad_saves_nothing():
    p = _params(8, "group", True, torch.float32)
    x = torch.randn(1, 100, device=DEVICE)
    saved = []

    def run(weight):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            return first_conv_layer(x, weight, p["bias"], STRIDE, "group", p["norm_weight"], p["norm_bias"],
                                    backend="triton")
    run(p["weight"])
    assert saved == []
    run(p["weight"].clone().requires_grad_())
    assert saved, "a trainable layer must save its inputs"


def test_activation_other_than_gelu_rejected():
    p = _params(8, "layer", True, torch.float32)
    x = torch.randn(1, 100, device=DEVICE)
    args = (x, p["weight"], p["bias"], STRIDE, "layer", p["norm_weight"], p["norm_bias"])
    assert "activation" in first_conv_layer_op.reasons(FirstConvLayerInputs(*args, activation="relu"))["triton"]
    with pytest.raises(BackendUnavailableError, match="activation"):
        first_conv_layer(*args, activation="relu", backend="triton")
    assert first_conv_layer_op.reasons(FirstConvLayerInputs(*args))["triton"] is None


def test_aot_specs_name_every_argument():
    specs = aot_specs()
    assert {s["name"] for s in specs} >= {"first_conv_fwd_group_bf16", "first_conv_bwd_layer_bf16"}
    for s in specs:
        assert list(s["signature"]) == list(s["fn"].arg_names)
        assert all(s["signature"][k] == "constexpr" for k in s["constexprs"])
