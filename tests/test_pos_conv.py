"""Triton positional conv embedding (forward + backward) against the fp64 reference: output and the
gradients of x, g and v (through fold_weight_norm) and bias; awkward shapes, views, dispatch,
torch.compile, bad input, ahead-of-time compile. Shapes x [B, T, C], weight [C, C / G, K]; the
kernels run through TRITON_INTERPRET=1 on CPU machines."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.tolerances import assert_close, assert_error_within
from unispeech_kernels import BackendUnavailableError
from unispeech_kernels._runtime import interpret_mode
from unispeech_kernels.ops import pos_conv_kernels
from unispeech_kernels.ops._common import forced_tiles
from unispeech_kernels.ops.pos_conv import (PosConvInputs, aot_specs, fold_weight_norm, pos_conv_bwd, pos_conv_dw,
                                            pos_conv_embed, pos_conv_fwd, pos_conv_op, pos_conv_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(C, G, K, dtype, bias=True):
    g = (torch.rand(1, 1, K, device=DEVICE) + 0.5).to(dtype)
    v = torch.randn(C, C // G, K, device=DEVICE).to(dtype)
    b = torch.randn(C, device=DEVICE).to(dtype) if bias else None
    return g, v, b


def _run(fn, x, g, v, b, dy, cast=None):
    """fn(x, weight, bias) with weight = fold_weight_norm(g, v); returns the output and the
    gradients of x, g, v, bias (in fp64 when cast is torch.float64)."""
    leaves = [None if t is None else t.detach().to(cast or t.dtype).requires_grad_() for t in (x, g, v, b)]
    xl, gl, vl, bl = leaves
    out = fn(xl, fold_weight_norm(gl, vl), bl)
    out.backward(dy.to(out.dtype))
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def check_against_reference(x, g, v, b, groups, residual=True):
    dtype = x.dtype
    dy = torch.randn(x.shape, device=DEVICE).to(dtype)
    triton_fn = lambda x, w, b: pos_conv_embed(x, w, b, groups=groups, residual=residual,  # noqa: E731
                                               backend="triton")
    eager_fn = lambda x, w, b: pos_conv_reference(x, w, b, groups=groups, residual=residual)  # noqa: E731
    got = _run(triton_fn, x, g, v, b, dy)
    eager = _run(eager_fn, x, g, v, b, dy)
    ref = _run(eager_fn, x, g, v, b, dy, cast=torch.float64)
    (B, T, C), (K, CG) = x.shape, (v.shape[2], v.shape[1])
    # conv taps K * CG; dW sums B * T frames, dg then C * CG weights, dv adds the norm's C * CG sum
    reductions = dict(out=K * CG, dx=K * CG, dg=B * T * C * CG, dv=B * T + C * CG, dbias=B * T)
    for name, a, r, e in zip(("out", "dx", "dg", "dv", "dbias"), got, ref, eager):
        if r is None:
            assert a is None, f"{name}: gradient for a missing input"
            continue
        assert a.dtype == dtype, f"{name}: dtype {a.dtype} != {dtype}"
        assert_error_within(a, r, e, dtype, name, reduction=reductions[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,T", [(16, 37), (7, 50), (16, 1), (16, 5), (7, 3)])  # even/odd K, T < K
def test_matches_reference(dtype, K, T):
    C, G = 32, 4
    x = torch.randn(2, T, C, device=DEVICE).to(dtype)
    check_against_reference(x, *_params(C, G, K, dtype), G)


@pytest.mark.skipif(not interpret_mode(), reason="tiles are forced under the interpreter; GPUs autotune")
@pytest.mark.parametrize("config", pos_conv_kernels._pos_conv_conv.configs,
                         ids=lambda c: "t{BLOCK_T}_r{BLOCK_R}".format(**c.kwargs))
def test_every_gpu_tile_config(config):
    """Each GPU config's tiles for the conv kernel (forward and, flipped, dX) with the GPU's dW tiles,
    forced on the interpreter (warps and stages change no arithmetic): CG 48 as in UniSpeech-base
    (a 64-wide channel tile, 16 masked), K * CG = 768 reduction rows, T 200 over 64 / 128-frame tiles."""
    x = torch.randn(2, 200, 96, device=DEVICE).to(torch.float16)
    with forced_tiles(pos_conv_kernels._pos_conv_conv, config.kwargs), \
            forced_tiles(pos_conv_kernels._pos_conv_dw_kernel, pos_conv_kernels.DW_CONFIG):
        check_against_reference(x, *_params(96, 2, 16, torch.float16), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_bias_batch_one(dtype):
    x = torch.randn(1, 29, 32, device=DEVICE).to(dtype)
    check_against_reference(x, *_params(32, 4, 16, dtype, bias=False), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_residual(dtype):
    """residual=False (callers that add the residual themselves, e.g. patched transformers models)."""
    x = torch.randn(2, 31, 32, device=DEVICE).to(dtype)
    check_against_reference(x, *_params(32, 4, 16, dtype), 4, residual=False)


@pytest.mark.parametrize("layout", ["frame_stride", "channels_first"])
def test_non_contiguous_input(layout):
    C, G, T = 32, 4, 23
    if layout == "frame_stride":  # every other frame of a longer sequence
        x = torch.randn(2, 2 * T, C, device=DEVICE)[:, ::2]
    else:  # a [B, C, T] tensor seen as [B, T, C] (channel stride != 1)
        x = torch.randn(2, C, T, device=DEVICE).transpose(1, 2)
    assert not x.is_contiguous()
    check_against_reference(x.to(torch.float16), *_params(C, G, 16, torch.float16), G)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,T", [(768, 499), (1024, 173)])
def test_model_shapes_gpu(dtype, C, T):
    """UniSpeech base / large (16 groups, K 128) through the compiled, autotuned kernels."""
    x = torch.randn(2, T, C, device=DEVICE).to(dtype)
    check_against_reference(x, *_params(C, 16, 128, dtype), 16)


def test_one_group_wide_channels():
    """G 1, CG 160 > 128: the output channels of a group span two program tiles (the last masked)."""
    x = torch.randn(2, 6, 160, device=DEVICE)
    check_against_reference(x, *_params(160, 1, 3, torch.float32), 1)


def test_empty_sequence():
    x = torch.randn(2, 0, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, 8, 16, device=DEVICE, requires_grad=True)
    b = torch.randn(32, device=DEVICE, requires_grad=True)
    out = pos_conv_embed(x, w, b, groups=4, backend="triton")
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 3])
def test_dw_accumulates_in_fp32_and_rounds_once(dtype, split):
    """The weight gradient in fp16 / bf16 is the fp64 sum rounded once to the dtype (within the fp32
    accumulator's error): no low-precision partials, no double rounding, whole or split over frames."""
    B, T, C, G, K = 2, 50, 32, 4, 7
    x, dpre = torch.randn(B, T, C, device=DEVICE).to(dtype), torch.randn(B, T, C, device=DEVICE).to(dtype)
    dw, _ = pos_conv_dw(x, dpre, K, G, False, split=split)
    # dW[g*CG + co, ci, k] = sum_{b,t} x[b, t + k - K//2, g*CG + ci] * dpre[b, t, g*CG + co], in fp64
    shifted = torch.nn.functional.pad(x.double(), (0, 0, K // 2, K // 2)).unfold(1, T, 1)  # [B, K, C, T]
    grouped = (B, K, G, C // G, T)
    ref = torch.einsum("bkgit,btgo->goik", shifted.reshape(grouped), dpre.double().view(B, T, G, C // G))
    ref = ref.reshape(C, C // G, K)
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(ref.abs())))
    in_ulps = ((dw.double() - ref).abs() / ulp).max().item()
    assert in_ulps <= 0.5 + 1e-3, f"dW is {in_ulps:.3f} ulps from the fp64 sum (one rounding: <= 0.5)"


@pytest.mark.parametrize("split", [2, 3])
def test_dw_split_reduction_matches_unsplit(split):
    """dW/db reduced over frame blocks in fp32 partials equals the one-program reduction."""
    C, G, K, T = 32, 4, 7, 70
    x = torch.randn(2, T, C, device=DEVICE)
    w = torch.randn(C, C // G, K, device=DEVICE) * 0.2
    b = torch.randn(C, device=DEVICE)
    _, pre = pos_conv_fwd(x, w, b, G, True)
    dy = torch.randn_like(x)
    _, dw1, db1 = pos_conv_bwd(dy, x, w, pre, G, False, True, True, dw_split=1)
    _, dws, dbs = pos_conv_bwd(dy, x, w, pre, G, False, True, True, dw_split=split)
    assert_close(dws, dw1, torch.float32, "dw")
    assert_close(dbs, db1, torch.float32, "db")


def test_only_some_gradients():
    C, G, K = 32, 4, 16
    x = torch.randn(2, 20, C, device=DEVICE)
    w = torch.randn(C, C // G, K, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE)
    pos_conv_embed(x, w, b, groups=G, backend="triton").sum().backward()
    w_ref, w_eager = w.detach().double().requires_grad_(), w.detach().clone().requires_grad_()
    pos_conv_reference(x.double(), w_ref, b.double(), groups=G).sum().backward()
    pos_conv_reference(x, w_eager, b, groups=G).sum().backward()
    assert_error_within(w.grad, w_ref.grad, w_eager.grad, torch.float32, "dw", reduction=2 * 20)


def test_nothing_saved_without_grad():
    x = torch.randn(2, 20, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, 8, 16, device=DEVICE, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = pos_conv_embed(x, w, None, groups=4, backend="triton")
        assert out.grad_fn is None
        out = pos_conv_embed(x.detach(), w.detach(), None, groups=4, backend="triton")
        assert out.grad_fn is None
        assert not packed
        pos_conv_embed(x, w, None, groups=4, backend="triton")
        assert len(packed) == 3  # x, weight, pre-activation


def test_torch_compile_fullgraph():
    C, G, K = 32, 4, 7
    x = torch.randn(2, 13, C, device=DEVICE, requires_grad=True)
    g, v, b = (t.requires_grad_() for t in _params(C, G, K, torch.float32))

    def fn(x, g, v, b):
        return pos_conv_embed(x, fold_weight_norm(g, v), b, groups=G, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, g, v, b)
    grads = torch.autograd.grad(out.square().sum(), (x, g, v, b))
    eager_out = fn(x, g, v, b)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), (x, g, v, b))
    torch.testing.assert_close(out, eager_out)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e)


def test_dispatch_reasons():
    x = torch.randn(1, 8, 32, device=DEVICE)
    w = torch.randn(32, 8, 16, device=DEVICE)
    reasons = pos_conv_op.reasons(PosConvInputs(x, w, None, 4, activation="relu"))
    assert "gelu" in reasons["triton"]
    reasons = pos_conv_op.reasons(PosConvInputs(x.double(), w.double(), None, 4))
    assert "float64" in reasons["triton"]
    assert pos_conv_op.reasons(PosConvInputs(x, w, None, 4))["triton"] is None
    with pytest.raises(BackendUnavailableError, match="gelu"):
        pos_conv_embed(x, w, None, groups=4, activation="relu", backend="triton")
    torch.testing.assert_close(pos_conv_embed(x, w, None, groups=4, activation="relu", backend="torch"),
                               pos_conv_reference(x, w, None, groups=4, activation="relu"))


@pytest.mark.parametrize("case,error,match", [
    ("hidden_2d", ValueError, "batch, frames, channels"),
    ("int_hidden", TypeError, "floating point"),
    ("groups", ValueError, "not divisible by groups"),
    ("weight_shape", ValueError, "weight must be"),
    ("bias_shape", ValueError, "bias must be"),
    ("weight_dtype", TypeError, "weight is"),
    ("kernel_size_0", ValueError, "kernel size"),
])
def test_bad_input(case, error, match):
    x = torch.randn(2, 10, 32, device=DEVICE)
    w = torch.randn(32, 8, 16, device=DEVICE)
    b = torch.randn(32, device=DEVICE)
    groups = 4
    if case == "hidden_2d":
        x = x[0]
    elif case == "int_hidden":
        x = x.long()
    elif case == "groups":
        groups = 5
    elif case == "weight_shape":
        w = w[:, :4]
    elif case == "bias_shape":
        b = b[:16]
    elif case == "weight_dtype":
        w = w.half()
    elif case == "kernel_size_0":
        w = w[..., :0]
    with pytest.raises(error, match=match):
        pos_conv_embed(x, w, b, groups=groups, backend="triton")


def test_aot_specs_cover_model_shapes():
    specs = aot_specs()
    names = {s["name"] for s in specs}
    for size in ("base", "large"):
        for kind in ("fwd", "fwd_train", "dx", "dw"):
            assert any(n.startswith(f"pos_conv_{kind}_{size}_bf16") for n in names), (kind, size)
    for s in specs:
        arg_names = s["fn"].arg_names
        assert list(s["signature"]) == arg_names, s["name"]
        assert all(s["signature"][n] == "constexpr" for n in s["constexprs"]), s["name"]
        assert set(s["divisible_by_16"]) <= set(s["signature"]), s["name"]


_AOT_SCRIPT = textwrap.dedent("""
    import re, triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from unispeech_kernels.ops.pos_conv import aot_specs
    for s in aot_specs():
        if s["name"] not in ("pos_conv_fwd_base_bf16_t64_r64", "pos_conv_dw_large_bf16"):
            continue
        names = s["fn"].arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in s["divisible_by_16"]}
        k = triton.compile(ASTSource(s["fn"], s["signature"], s["constexprs"], attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=s["num_warps"], num_stages=s["num_stages"]))
        ptx = k.asm["ptx"]
        assert "wgmma.mma_async" in ptx, s["name"] + ": no wgmma"
        assert "cp.async" in ptx, s["name"] + ": loads not pipelined"
        assert ".local" not in ptx, s["name"] + ": local memory"
        print(s["name"], "ok")
""")


def test_aot_compiles_for_sm90():
    """A forward and a dW spec compile ahead of time for sm_90 with wgmma and pipelined loads."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(" ok") == 2, run.stdout
