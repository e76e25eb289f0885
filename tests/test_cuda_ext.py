"""The CUDA extension backend (csrc/ via unispeech_kernels._cuda).

CPU: the package works without the extension and every path reports "CUDA extension not built".
GPU (@pytest.mark.gpu, needs the built extension: see csrc/README.md): the fused first conv layer
against the fp64 torch reference, and the bindings' errors for bad input.
"""
import dataclasses
import json
import os

import pytest
import torch

from test_feature_encoder import DEVICE as FE_DEVICE, STRIDES as FE_STRIDES, _params as fe_params
from tests.tolerances import assert_error_within
from unispeech_kernels import _cuda
from unispeech_kernels.dispatch import BackendUnavailableError, Op, resolve_backend
from unispeech_kernels.ops.feature_encoder import (FeatureEncoderInputs, feature_encoder, feature_encoder_op,
                                                   feature_encoder_reference)
from unispeech_kernels.ops.first_conv_layer import (FirstConvLayerInputs, first_conv_layer_cuda, first_conv_layer_op,
                                                    first_conv_layer_reference)

NOT_BUILT = _cuda.extension_reason() is not None
needs_ext = pytest.mark.skipif(NOT_BUILT and os.environ.get("UNISPEECH_REQUIRE_CUDA_EXT") != "1",
                               reason="CUDA extension not built (UNISPEECH_REQUIRE_CUDA_EXT=1 makes this a failure)")


def cuda_check(*args, **kwargs):
    """The CUDA backend's reason for these first_conv_layer arguments (None: it runs them)."""
    return first_conv_layer_op.backends["cuda"].reason(FirstConvLayerInputs(*args, **kwargs))


def run_cuda(*args, **kwargs):
    return first_conv_layer_cuda(FirstConvLayerInputs(*args, **kwargs))


def make_inputs(B, L, C, K, dtype, device, *, bias=True, norm_affine=True):
    g = dict(dtype=dtype, device=device)
    x = torch.randn(B, L, **g)
    w = torch.randn(C, 1, K, **g) / K ** 0.5
    b = torch.randn(C, **g) * 0.1 if bias else None
    nw = 1 + 0.1 * torch.randn(C, **g) if norm_affine else None
    nb = 0.1 * torch.randn(C, **g) if norm_affine else None
    return x, w, b, nw, nb


# ---- CPU: the extension is optional -------------------------------------------------------------
@pytest.mark.skipif(not NOT_BUILT, reason="the extension is built here")
def test_reasons_without_extension():
    assert _cuda.extension_reason() == "CUDA extension not built"
    assert _cuda.cuda_reason() == "CUDA extension not built"
    x, w, b, nw, nb = make_inputs(1, 50, 8, 10, torch.float32, "cpu")
    assert cuda_check(x, w, b, 5, "group", nw, nb) == "CUDA extension not built"
    with pytest.raises(RuntimeError, match="CUDA extension not built"):
        run_cuda(x, w, b, 5, "group", nw, nb)


def test_check_rejects_inputs_that_need_grad():
    x, w, b, nw, nb = make_inputs(1, 50, 8, 10, torch.float32, "cpu")
    w.requires_grad_(True)
    assert cuda_check(x, w, b, 5, "layer", nw, nb) == "cuda first_conv_layer has no backward"
    with torch.no_grad():
        assert cuda_check(x, w, b, 5, "layer", nw, nb) != "cuda first_conv_layer has no backward"


@pytest.mark.skipif(not NOT_BUILT, reason="the extension is built here")
def test_dispatcher_lists_the_reason_when_cuda_is_forced():
    op = Op("first_conv_layer_probe")
    op.backends["cuda"] = dataclasses.replace(first_conv_layer_op.backends["cuda"], op=op.name)
    op.backend("torch")(lambda inputs: "torch ran")
    x, w, b, nw, nb = make_inputs(2, 64, 16, 10, torch.float32, "cpu")
    assert op(FirstConvLayerInputs(x, w, b, 5, "group", nw, nb)) == "torch ran"
    with pytest.raises(BackendUnavailableError, match="cuda: CUDA extension not built"):
        op(FirstConvLayerInputs(x, w, b, 5, "group", nw, nb), backend="cuda")


@pytest.mark.skipif("cuda" not in first_conv_layer_op.backends or not NOT_BUILT,
                    reason="cuda backend not registered for first_conv_layer, or the extension is built")
def test_first_conv_layer_op_reports_extension_not_built():
    x, w, b, nw, nb = make_inputs(2, 64, 16, 10, torch.float32, "cpu")
    assert first_conv_layer_op.reasons(FirstConvLayerInputs(x, w, b, 5, "group", nw, nb))["cuda"] == \
        "CUDA extension not built"


def encoder_inputs(dtype, norm_mode):
    """feature_encoder arguments: test_feature_encoder's conv stack (conv bias in layer mode) on its
    DEVICE (the GPU where there is one), 2 utterances of 1001 samples."""
    ws, bs, gs, betas = fe_params(norm_mode, norm_mode == "layer", dtype)
    return torch.randn(2, 1001, device=FE_DEVICE, dtype=dtype), ws, bs, list(FE_STRIDES), norm_mode, gs, betas


def test_model_wide_cuda_choice_per_op():
    """kernel_backend="cuda" / patch_model(backend="cuda"): CUDA where an op has it, Triton elsewhere."""
    assert resolve_backend("feature_encoder", "cuda") == "cuda"
    assert resolve_backend("first_conv_layer", "cuda") == "cuda"
    assert resolve_backend("pos_conv", "cuda") == "triton" and resolve_backend("attention", "cuda") == "triton"
    assert resolve_backend("pos_conv", "auto") is None and resolve_backend("pos_conv", None) is None
    assert resolve_backend("pos_conv", "torch") == "torch"


@pytest.mark.skipif(not NOT_BUILT, reason="the extension is built here")
def test_feature_encoder_cuda_backend_reasons():
    args = encoder_inputs(torch.float32, "group")
    assert feature_encoder_op.reasons(FeatureEncoderInputs(*args))["cuda"] == "layer 0: CUDA extension not built"
    with pytest.raises(BackendUnavailableError, match="cuda: layer 0: CUDA extension not built"):
        feature_encoder(*args, backend="cuda")
    args[1][0].requires_grad_(True)
    assert feature_encoder_op.reasons(FeatureEncoderInputs(*args))["cuda"] == \
        "layer 0: cuda first_conv_layer has no backward"


@pytest.mark.parametrize("archs, cap, ok", [
    (["sm_80", "sm_90", "compute_90"], (8, 0), True),
    (["sm_80", "sm_90", "compute_90"], (8, 6), True),   # same major, newer minor: cubin compatible
    (["sm_80", "sm_90", "compute_90"], (10, 0), True),  # PTX JIT
    (["sm_80", "sm_90", "compute_90"], (7, 5), False),
    (["sm_86"], (8, 0), False),
    (["sm_90"], (10, 0), False),
])
def test_archs_cover(archs, cap, ok):
    assert _cuda.archs_cover(archs, cap) is ok


def test_built_archs_reads_build_info(tmp_path, monkeypatch):
    path = tmp_path / "_build_info.json"
    monkeypatch.setattr(_cuda, "BUILD_INFO", str(path))
    assert _cuda.built_archs() is None
    path.write_text(json.dumps({"archs": ["sm_80", "sm_90", "compute_90"]}))
    assert _cuda.built_archs() == ["sm_80", "sm_90", "compute_90"]
    path.write_text("not json")
    assert _cuda.built_archs() is None


# ---- GPU: the kernel against the reference ------------------------------------------------------
def run_and_compare(x, w, b, stride, norm_mode, nw, nb, *, input_lengths=None, batch_invariant=False):
    kw = dict(eps=1e-5, activation="gelu", input_lengths=input_lengths, batch_invariant=batch_invariant)
    assert cuda_check(x, w, b, stride, norm_mode, nw, nb, **kw) is None
    out = run_cuda(x, w, b, stride, norm_mode, nw, nb, **kw)
    ref = first_conv_layer_reference(x, w, b, stride, norm_mode, nw, nb, upcast=True, **kw)
    eager = first_conv_layer_reference(x, w, b, stride, norm_mode, nw, nb, **kw)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_error_within(out, ref, eager, x.dtype, f"first_conv_layer[{norm_mode}]")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_mode", ["group", "layer", "none"])
@pytest.mark.parametrize("B, L, C, K, S", [
    (2, 1603, 512, 10, 5),     # UniSpeech layer 0, odd length
    (1, 10, 512, 10, 5),       # a single frame
    (3, 777, 40, 3, 2),        # channels not a multiple of a warp
    (2, 16000, 512, 10, 5),    # 1 s of audio: many chunks
    (1, 160000, 512, 10, 5),   # 10 s: several tiles per chunk (statistics merged across tiles)
])
def test_first_conv_layer_matches_reference(dtype, norm_mode, B, L, C, K, S):
    x, w, b, nw, nb = make_inputs(B, L, C, K, dtype, "cuda")
    run_and_compare(x, w, b, S, norm_mode, nw, nb)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_conv_layer_batch_invariant_lengths(dtype):
    x, w, b, nw, nb = make_inputs(4, 4001, 512, 10, dtype, "cuda")
    lengths = torch.tensor([4001, 2500, 7, 10], device="cuda")  # full, partial, no frame, one frame
    run_and_compare(x, w, b, 5, "group", nw, nb, input_lengths=lengths, batch_invariant=True)
    single = run_cuda(x[1:2, :2500], w, b, 5, "group", nw, nb, eps=1e-5,
                                         input_lengths=lengths[1:2], batch_invariant=True)
    padded = run_cuda(x, w, b, 5, "group", nw, nb, eps=1e-5,
                                         input_lengths=lengths, batch_invariant=True)
    torch.testing.assert_close(padded[1, :single.shape[1]], single[0])  # padding does not leak in


@pytest.mark.gpu
@needs_ext
def test_first_conv_layer_views_and_missing_parameters():
    base, w, b, nw, nb = make_inputs(3, 2100, 512, 10, torch.float16, "cuda")
    run_and_compare(base[:, 37:37 + 1999], w, b, 5, "layer", nw, nb)   # batch stride != samples
    run_and_compare(base[:, ::2], w, b, 5, "group", nw, nb)            # strided samples
    run_and_compare(base.t().contiguous().t(), w, None, 5, "group", None, None)  # column-major, no bias/affine


@pytest.mark.skipif(NOT_BUILT, reason="CUDA extension not built")
def test_first_conv_layer_meta_shapes():  # Meta implementation: no GPU needed
    x = torch.empty(3, 1603, device="meta", dtype=torch.bfloat16)
    w = torch.empty(512, 1, 10, device="meta", dtype=torch.bfloat16)
    out = torch.ops.unispeech_cuda.first_conv_layer(x, w, None, 5, 2, None, None, 1e-5, None)
    assert out.shape == (3, 319, 512) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@pytest.mark.gpu
@needs_ext
def test_cuda_reason_and_check_on_gpu():
    assert _cuda.cuda_reason() is None
    x, w, b, nw, nb = make_inputs(1, 50, 8, 10, torch.float32, "cuda")
    assert cuda_check(x, w, b, 5, "group", nw, nb, activation="relu").startswith(
        "cuda first_conv_layer implements only exact gelu")
    assert "CUDA tensors" in cuda_check(x.cpu(), w.cpu(), b.cpu(), 5, "group", nw.cpu(), nb.cpu())
    assert "several devices" in cuda_check(x, w.cpu(), b, 5, "group", nw, nb)


def _bad_inputs():
    x, w, b, nw, nb = make_inputs(2, 100, 16, 10, torch.float32, "cuda")
    good = dict(x=x, w=w, b=b, stride=5, norm=2, nw=nw, nb=nb, eps=1e-5, lengths=None)
    cases = [
        (dict(x=x.cpu()), "must be a CUDA tensor"),
        (dict(w=w.cpu()), "weight is on cpu"),
        (dict(x=x.half()), "weight is Float, input_values is Half"),
        (dict(x=x.long(), w=w.long()), "must be float32, float16 or bfloat16"),
        (dict(x=x[0]), r"must be \[batch, samples\]"),
        (dict(w=torch.randn(16, 2, 10, device="cuda")), r"weight must be \[channels, 1, kernel\]"),
        (dict(w=torch.randn(32, 1, 10, device="cuda")[::2]), "weight must be contiguous"),
        (dict(w=torch.randn(2048, 1, 10, device="cuda"), b=None, nw=None, nb=None), "channels must be in"),
        (dict(w=torch.randn(16, 1, 17, device="cuda")), "kernel size must be in"),
        (dict(x=x[:, :9]), "shorter than the kernel"),
        (dict(x=torch.randn(2, 200, device="cuda")[:, ::2]), "contiguous samples"),
        (dict(b=b[:8]), r"bias must be \[16\]"),
        (dict(nw=nw.half()), "norm_weight is Half"),
        (dict(stride=0), "stride must be >= 1"),
        (dict(norm=5), "norm_mode must be 0"),
        (dict(lengths=torch.tensor([100], device="cuda")), r"input_lengths must be \[2\]"),
        (dict(lengths=torch.tensor([100.0, 50.0], device="cuda")), "input_lengths must be int64 or int32"),
        (dict(lengths=torch.tensor([100, 50]), ), "input_lengths is on cpu"),
        (dict(norm=1, lengths=torch.tensor([100, 50], device="cuda")), "only used with group norm"),
    ]
    return good, cases


@pytest.mark.gpu
@needs_ext
def test_bindings_reject_bad_input_with_clear_errors():
    good, cases = _bad_inputs()
    op = torch.ops.unispeech_cuda.first_conv_layer
    op(*good.values())  # the baseline is accepted
    for change, message in cases:
        args = dict(good, **change)
        with pytest.raises(RuntimeError, match=message):
            op(*args.values())
    torch.cuda.synchronize()  # no launch was made with bad input: the context is healthy


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_mode", ["group", "layer"])
def test_feature_encoder_cuda_backend_matches_reference(dtype, norm_mode):
    """Layer 0 on the extension, layers 1..6 on Triton, against the fp64 reference."""
    args = encoder_inputs(dtype, norm_mode)
    with torch.no_grad():
        out = feature_encoder(*args, backend="cuda")
        ref = feature_encoder_reference(*args, upcast=True)
        eager = feature_encoder_reference(*args)
    assert feature_encoder_op.last_reasons["cuda"] is None
    assert_error_within(out, ref, eager, dtype, f"feature_encoder[cuda, {norm_mode}]")


@pytest.mark.skipif(NOT_BUILT, reason="CUDA extension not built")
def test_python_limits_are_the_extensions():
    """The backend's limits are what the built extension exports from csrc/first_conv_layer.cuh, and
    its shared-memory answer flips where the bindings' own check does (Meta tensors: no GPU)."""
    from tests.test_dispatch import _header_constants

    h = _header_constants()
    assert dict(_cuda.kernel_limits()) == {"channels": h["FCL_MAX_C"], "kernel size": h["FCL_MAX_K"],
                                           "batch (a grid axis)": h["FCL_MAX_BATCH"]}
    k = 10
    largest = (h["FCL_MAX_SMEM_BYTES"] // 4 - k - 2 * 32 * h["FCL_T_TILE"]) // (h["FCL_T_TILE"] - 1)
    w = torch.empty(8, 1, k, device="meta")
    for stride in (largest, largest + 1):
        x = torch.empty(1, k + stride, device="meta")
        fits = _cuda.fits_shared_memory(k, stride)
        assert fits == (stride == largest)
        if fits:
            torch.ops.unispeech_cuda.first_conv_layer(x, w, None, stride, 0, None, None, 1e-5, None)
        else:
            with pytest.raises(RuntimeError, match="shared-memory sample tile"):
                torch.ops.unispeech_cuda.first_conv_layer(x, w, None, stride, 0, None, None, 1e-5, None)
