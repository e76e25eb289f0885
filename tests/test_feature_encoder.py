"""Triton feature encoder (layer 0 + implicit-GEMM conv layers with fused norm + GELU), forward and
backward, against the fp64 reference with eager same-dtype PyTorch as the error baseline.
Shapes: audio [B, L] -> features [B, T, C]. Under TRITON_INTERPRET=1 on CPU: small channel counts
(32 -> 32 -> 24 -> 16, so GEMM tiles of 16 see several and partial channel chunks)."""
import contextlib
import copy

import pytest
import torch

from tests.tolerances import assert_close, assert_error_within, first_conv_bias_terms
from unispeech_kernels._runtime import interpret_mode
from unispeech_kernels.dispatch import BackendUnavailableError
from unispeech_kernels.ops._common import forced_tiles
from unispeech_kernels.ops import conv_layer as conv_layer_module
from unispeech_kernels.ops import conv_layer_kernels
from unispeech_kernels.ops.conv_layer import aot_specs
from unispeech_kernels.ops.feature_encoder import (FeatureEncoderInputs, feature_encoder, feature_encoder_op,
                                                   feature_encoder_reference)
from unispeech_kernels.padding import conv_output_length, receptive_field

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIMS, KERNELS, STRIDES = (32, 32, 24, 16), (10, 3, 3, 2), (5, 2, 2, 2)
FIELD = receptive_field(KERNELS, STRIDES)


def _params(norm_mode, conv_bias, dtype, dims=DIMS, kernels=KERNELS):
    ws, bs, c_in = [], [], 1
    for c, k in zip(dims, kernels):
        ws.append(torch.randn(c, c_in, k) / (c_in * k) ** 0.5)
        bs.append(0.3 * torch.randn(c) if conv_bias else None)
        c_in = c
    n_norm = len(dims) if norm_mode == "layer" else 1
    gs = [1 + 0.2 * torch.randn(dims[i]) for i in range(n_norm)]
    betas = [0.2 * torch.randn(dims[i]) for i in range(n_norm)]
    to = [lambda t: t.to(DEVICE, dtype) if t is not None else None][0]
    return [to(t) for t in ws], [to(t) for t in bs], [to(t) for t in gs], [to(t) for t in betas]


def _run(fn, x, params, dtype, grad, strides=STRIDES, **kw):
    """Output and gradients of every input / parameter (fresh leaves of ``dtype``)."""
    ws, bs, gs, betas = ([t.detach().to(dtype).requires_grad_() if t is not None else None for t in group]
                         for group in params)
    xl = x.detach().to(dtype).requires_grad_()
    out = fn(xl, ws, bs, list(strides), kw.pop("norm_mode"), gs, betas, **kw)
    leaves = [t for t in [xl, *ws, *bs, *gs, *betas] if t is not None]
    return out.detach(), torch.autograd.grad(out, leaves, grad.to(out.dtype))


def _names(params):
    ws, bs, gs, betas = params
    names = ["input"] + [f"weight{i}" for i in range(len(ws))]
    names += [f"bias{i}" for i, b in enumerate(bs) if b is not None]
    return names + [f"norm_weight{i}" for i in range(len(gs))] + [f"norm_bias{i}" for i in range(len(betas))]


def _check(norm_mode, conv_bias, dtype, B=2, L=1001, dims=DIMS, kernels=KERNELS, strides=STRIDES, **kw):
    x = torch.randn(B, L, device=DEVICE, dtype=dtype)
    params = _params(norm_mode, conv_bias, dtype, dims, kernels)
    T = conv_output_length(L, kernels, strides)
    grad = torch.randn(B, T, dims[-1], device=DEVICE, dtype=torch.float64)
    kw = dict(kw, norm_mode=norm_mode, strides=strides)
    out, grads = _run(lambda *a, **k: feature_encoder(*a, backend="triton", **k), x, params, dtype, grad,
                      **dict(kw))
    gold, gold_grads = _run(feature_encoder_reference, x, params, torch.float64, grad, **dict(kw))
    eager, eager_grads = _run(feature_encoder_reference, x, params, dtype, grad, **dict(kw))
    assert out.shape == (B, T, dims[-1]) and out.dtype == dtype
    taps = max(k * c for k, c in zip(kernels, (1, *dims[:-1])))
    assert_error_within(out, gold, eager, dtype, "output", reduction=max(taps, L, dims[0]))
    names = _names(params)
    assert len(names) == len(grads)
    cancels = {}
    if norm_mode == "group" and conv_bias:
        gold_params = [[t.double() if t is not None else None for t in group] for group in params]
        cancels["bias0"] = first_conv_bias_terms(lambda: feature_encoder_reference(
            x.double(), *gold_params[:2], list(strides), norm_mode, *gold_params[2:],
            **{k: v for k, v in kw.items() if k not in ("norm_mode", "strides")}), grad)
    for name, g, ref, e in zip(names, grads, gold_grads, eager_grads):
        assert g.dtype == dtype, name
        assert_error_within(g, ref, e, dtype, f"d_{name}", reduction=B * L, magnitude=cancels.get(name))


@pytest.mark.parametrize("norm_mode", ["group", "layer"])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fp32_forward_backward(norm_mode, conv_bias):
    _check(norm_mode, conv_bias, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_mode,conv_bias", [("group", False), ("layer", True)])
def test_low_precision_forward_backward(dtype, norm_mode, conv_bias):
    _check(norm_mode, conv_bias, dtype, L=601)



def _conv_layer_reference(x, w, b, stride, norm_mode, g, beta):
    """One 512-style layer on channels-last x [B, T, C_in]: conv + bias (+ LayerNorm) + GELU."""
    y = torch.nn.functional.conv1d(x.transpose(1, 2), w, b, stride=stride).transpose(1, 2)
    if norm_mode == "layer":
        y = torch.nn.functional.layer_norm(y, y.shape[-1:], g, beta)
    return torch.nn.functional.gelu(y)


def check_conv_layer(norm_mode):
    """The Triton conv layer (output, d_input, d_weight, d_bias, d_norm_*) vs the fp64 reference, fp16:
    160 channels (a 256-wide tile masks 96, a 64-wide one takes three chunks), K * C_in = 480
    (7.5 K-steps of 64), B * T 2 x 99 rows (a partial second 128-row tile)."""
    tensors = [torch.randn(2, 199, 160), torch.randn(160, 160, 3) / 20, 0.3 * torch.randn(160)]
    if norm_mode == "layer":
        tensors += [1 + 0.2 * torch.randn(160), 0.2 * torch.randn(160)]
    grad = torch.randn(2, 99, 160, dtype=torch.float64)

    def run(fn, dtype):
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in tensors]
        out = fn(*leaves[:3], 2, norm_mode, *(leaves[3:] or [None, None]))
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    got = run(conv_layer_module.conv_layer, torch.float16)
    gold, eager = run(_conv_layer_reference, torch.float64), run(_conv_layer_reference, torch.float16)
    names = ["output", "d_input", "d_weight", "d_bias", "d_norm_weight", "d_norm_bias"]
    assert len(got) == len(tensors) + 1
    for name, a, r, e in zip(names, got, gold, eager):
        assert_error_within(a, r, e, torch.float16, name, reduction=3 * 160)  # K * C_in taps; dW over 2 x 99 frames


@pytest.mark.skipif(not interpret_mode(), reason="tiles are forced under the interpreter; GPUs autotune")
@pytest.mark.parametrize("norm_mode", ["none", "layer"])
@pytest.mark.parametrize("i", range(4))
def test_every_gpu_tile_config(i, norm_mode):
    """The i-th autotune config of each GEMM kernel (forward, LayerNorm forward, dX, dW; cycling
    through the shorter lists) forced on the interpreter: the GPU's tile sizes (warps and stages
    change no arithmetic)."""
    with contextlib.ExitStack() as stack:
        for gemm in ("fwd", "fwd_norm", "bwd_dx", "bwd_dw"):
            tuned = getattr(conv_layer_kernels, f"_conv_{gemm}")
            stack.enter_context(forced_tiles(tuned, tuned.configs[i % len(tuned.configs)].kwargs))
        check_conv_layer(norm_mode)


def test_receptive_field_gives_one_frame():
    _check("group", False, torch.float32, L=FIELD)
    _check("layer", True, torch.float32, B=1, L=FIELD + 1)


@pytest.mark.parametrize("norm_mode", ["group", "layer"])
def test_matches_transformers_feature_encoder(norm_mode):
    """Model-level parity: transformers' UniSpeechFeatureEncoder weights through the Triton backend."""
    from transformers import UniSpeechConfig
    from transformers.models.unispeech.modeling_unispeech import UniSpeechFeatureEncoder
    cfg = UniSpeechConfig(conv_dim=DIMS, conv_kernel=KERNELS, conv_stride=STRIDES,
                          feat_extract_norm=norm_mode, conv_bias=norm_mode == "layer")
    hf = UniSpeechFeatureEncoder(cfg).to(DEVICE)
    x = torch.randn(2, 700, device=DEVICE)
    layers = hf.conv_layers
    normed = layers if norm_mode == "layer" else layers[:1]
    out = feature_encoder(x, [l.conv.weight for l in layers], [l.conv.bias for l in layers], STRIDES,
                          norm_mode, [l.layer_norm.weight for l in normed],
                          [l.layer_norm.bias for l in normed],
                          backend="triton")
    eager = hf(x).transpose(1, 2)
    cotangent, weights = torch.randn_like(eager), [layers[0].conv.weight, layers[-1].conv.weight]
    gold = copy.deepcopy(hf).double()  # transformers' module in fp64: the reference
    ref = gold(x.double()).transpose(1, 2)
    gold_weights = [gold.conv_layers[0].conv.weight, gold.conv_layers[-1].conv.weight]
    taps = max(k * c for k, c in zip(KERNELS, (1, *DIMS[:-1])))
    assert_error_within(out, ref, eager, torch.float32, "output", reduction=max(taps, x.shape[1]))
    results = [torch.autograd.grad(y, w, cotangent.to(y.dtype)) for y, w in
               ((out, weights), (ref, gold_weights), (eager, weights))]
    for name, g, r, e in zip(("d_weight0", "d_weight_last"), *results):
        assert_error_within(g, r, e, torch.float32, name, reduction=x.numel())


def test_stride_larger_than_kernel():
    """A stride above the kernel size leaves input frames no output sees (zero gradient there)."""
    _check("layer", True, torch.float32, L=700, dims=(16, 16, 16), kernels=(10, 2, 3), strides=(5, 3, 1))


def test_batch_invariant_equals_single_utterances():
    params = _params("group", False, torch.float32)
    lengths = [801, 600, 433]
    x = torch.zeros(3, lengths[0], device=DEVICE)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, device=DEVICE)
    ws, bs, gs, betas = params
    batched = feature_encoder(x, ws, bs, STRIDES, "group", gs, betas, backend="triton",
                              input_lengths=torch.tensor(lengths, device=DEVICE), batch_invariant=True)
    for i, n in enumerate(lengths):
        single = feature_encoder(x[i:i + 1, :n], ws, bs, STRIDES, "group", gs, betas, backend="triton")
        torch.testing.assert_close(batched[i:i + 1, :single.shape[1]], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_mode,batch_invariant", [("group", False), ("group", True), ("layer", False)])
def test_torch_trim_padding_skips_padded_frames(norm_mode, batch_invariant):
    """trim_padding: real frames equal the full computation (and their gradients), padded ones are 0."""
    params = _params(norm_mode, True, torch.float64)
    lengths = torch.tensor([801, 433, 801, 60], device=DEVICE)  # 60: shorter than the receptive field
    x = torch.randn(4, 801, device=DEVICE, dtype=torch.float64)
    frames = conv_output_length(lengths, KERNELS, STRIDES).clamp_min(0)
    grad = torch.randn(4, conv_output_length(801, KERNELS, STRIDES), DIMS[-1], device=DEVICE, dtype=torch.float64)
    grad[torch.arange(grad.shape[1], device=DEVICE)[None, :] >= frames[:, None]] = 0.0  # a loss on real frames
    kw = dict(norm_mode=norm_mode, input_lengths=lengths, batch_invariant=batch_invariant)
    full, full_grads = _run(lambda *a, **k: feature_encoder(*a, backend="torch", **k), x, params,
                            torch.float64, grad, **dict(kw))
    trim, trim_grads = _run(lambda *a, **k: feature_encoder(*a, backend="torch", trim_padding=True, **k), x,
                            params, torch.float64, grad, **dict(kw))
    real = torch.arange(full.shape[1], device=DEVICE)[None, :] < frames[:, None]
    assert_close(trim[real], full[real], torch.float64)
    assert (trim[~real] == 0).all()
    for name, a, b in zip(_names(params), trim_grads, full_grads):
        assert_close(a, b, torch.float64, name)


def test_frozen_encoder_saves_nothing(monkeypatch):
    """Frozen parameters (or no_grad) run the no-grad path: no pre-activations computed or saved."""
    params = _params("layer", True, torch.float32)
    x = torch.randn(1, 500, device=DEVICE)
    saved, save_flags = [], []
    real_fwd = conv_layer_module.conv_layer_fwd

    def spy(*args):
        save_flags.append(args[-1])
        return real_fwd(*args)
    monkeypatch.setattr(conv_layer_module, "conv_layer_fwd", spy)

    def run(*groups):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            return feature_encoder(x, *groups, STRIDES, "layer", *params[2:], backend="triton")
    run(*params[:2])
    with torch.no_grad():
        run([w.clone().requires_grad_() for w in params[0]], params[1])
    assert saved == [] and save_flags == [False] * 6
    out = run([w.clone().requires_grad_() for w in params[0]], params[1])
    assert saved and save_flags[6:] == [True] * 3 and out.requires_grad


def test_bad_input_raises_clear_errors():
    ws, bs, gs, betas = _params("group", False, torch.float32)
    with pytest.raises(ValueError, match="receptive field"):
        feature_encoder(torch.randn(2, FIELD - 1, device=DEVICE), ws, bs, STRIDES, "group", gs, betas,
                        backend="triton")
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        feature_encoder(torch.randn(2, 1, 900, device=DEVICE), ws, bs, STRIDES, "group", gs, betas,
                        backend="triton")
    with pytest.raises(TypeError, match="floating point"):
        feature_encoder(torch.ones(2, 900, dtype=torch.int32, device=DEVICE), ws, bs, STRIDES, "group", gs,
                        betas, backend="triton")
    with pytest.raises(TypeError, match="does not match"):
        feature_encoder(torch.randn(2, 900, device=DEVICE, dtype=torch.float64), ws, bs, STRIDES, "group",
                        gs, betas, backend="triton")
    with pytest.raises(BackendUnavailableError, match="activation"):
        feature_encoder(torch.randn(2, 900, device=DEVICE), ws, bs, STRIDES, "group", gs, betas,
                        activation="relu", backend="triton")


def test_dispatch_is_opt_in_until_benchmarked():
    ws, bs, gs, betas = _params("group", False, torch.float32)
    args = (torch.randn(1, 900, device=DEVICE), ws, bs, list(STRIDES), "group", gs, betas)
    assert feature_encoder_op.reasons(FeatureEncoderInputs(*args))["triton"] is None
    assert feature_encoder_op.select(FeatureEncoderInputs(*args)).name != "triton"


def test_torch_compile_fullgraph():
    params = _params("group", True, torch.float32)
    ws, bs, gs, betas = ([t.clone().requires_grad_() for t in group] for group in params)
    x = torch.randn(2, 500, device=DEVICE)

    def encode(x, ws, bs, gs, betas):
        return feature_encoder(x, ws, bs, STRIDES, "group", gs, betas, backend="triton")
    compiled = torch.compile(encode, fullgraph=True, backend="aot_eager")
    out = compiled(x, ws, bs, gs, betas)
    grads = torch.autograd.grad(out.sum(), [*ws, *bs])
    ref = encode(x, ws, bs, gs, betas)
    ref_grads = torch.autograd.grad(ref.sum(), [*ws, *bs])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_aot_specs_cover_the_gemms():
    specs = aot_specs()
    gemms = {s["name"] for s in specs if s["mma"]}
    assert gemms == {f"conv_{k}_{dt}" for k in ("fwd_gelu", "fwd_layer", "fwd_gelu_save", "fwd_layer_save",
                                                "bwd_dx", "bwd_dw") for dt in ("bf16",)}
    saves = {s["name"]: s["constexprs"]["SAVE"] for s in specs if "SAVE" in s["constexprs"]}
    assert saves == {n: n.endswith("_save_bf16") for n in saves}  # inference and training forwards
    for s in specs:
        assert list(s["signature"]) == list(s["fn"].arg_names)
        assert s["constexprs"].get("UPCAST") in (False, None)


@pytest.mark.parametrize("norm_mode", ["group", "layer"])
def test_bad_parameter_shapes_and_strides_raise(norm_mode):
    """Every backend gets the same clear error (the kernels would read past a short tensor)."""
    ws, bs, gs, betas = _params(norm_mode, True, torch.float32)
    x = torch.randn(2, 900, device=DEVICE)

    def call(ws=ws, bs=bs, gs=gs, betas=betas, strides=STRIDES, **kw):
        feature_encoder(x, ws, bs, list(strides), norm_mode, gs, betas, backend="triton", **kw)

    with pytest.raises(ValueError, match=r"layer 1 conv bias must be \[32\]"):
        call(bs=[bs[0], bs[1][:8], *bs[2:]])
    with pytest.raises(ValueError, match=r"layer 0 norm weight must be \[32\]"):
        call(gs=[gs[0][:8], *gs[1:]])
    with pytest.raises(ValueError, match=r"layer 2 conv weight must be \[C_out, 32, K >= 1\]"):
        call(ws=[ws[0], ws[1], ws[2][:, :16], ws[3]])
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="layer 1 stride must be a positive int"):
            call(strides=[5, bad, 2, 2])
    with pytest.raises(ValueError, match="input_lengths on meta"):
        call(input_lengths=torch.tensor([900, 800], device="meta"))


@pytest.mark.parametrize("norm_mode", ["group", "layer"])
def test_norm_without_affine_parameters_falls_back(norm_mode):
    """Norms without weight / bias (None): the kernels say why not and the torch path computes it."""
    ws, bs, gs, betas = _params(norm_mode, True, torch.float32)
    x = torch.randn(2, 900, device=DEVICE)
    none = [None] * len(gs)
    reasons = feature_encoder_op.reasons(FeatureEncoderInputs(x, ws, bs, list(STRIDES), norm_mode, none, none))
    assert "affine weight or bias (None)" in reasons["triton"]
    with pytest.raises(BackendUnavailableError, match="affine"):
        feature_encoder(x, ws, bs, list(STRIDES), norm_mode, none, none, backend="triton")
    got = feature_encoder(x, ws, bs, list(STRIDES), norm_mode, none, none)
    want = feature_encoder_reference(x, ws, bs, list(STRIDES), norm_mode, none, none)
    assert_close(got, want)
