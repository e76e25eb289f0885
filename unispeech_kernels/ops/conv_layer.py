"""One channels-last Conv1d layer of the feature encoder (layers 1..N): conv + bias + optional
LayerNorm over channels + GELU, as implicit GEMMs on tensor cores, forward and backward.

Shapes: x [B, T_in, C_in] (any strides) -> out [B, T_out, C_out] contiguous,
T_out = (T_in - K) // stride + 1; weight [C_out, C_in, K] (torch Conv1d layout), bias [C_out] or
None; norm "layer": LayerNorm(C_out) weight/bias [C_out]; "none": GELU only (group-norm stacks
after layer 0). Kernels: conv_layer_kernels.py. The weight is reorganised once per call to
[K * C_in, C_out] (1.5 MB at 512 channels, k 3): negligible next to the GEMM.

Backward: the forward saves the layer input and the pre-norm / pre-GELU values y (and the LayerNorm
row statistics) only when autograd needs them; nothing when the layer is frozen or under no_grad.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .._runtime import interpret_upcast_bf16, triton_device_reason
from ._triton_helpers import TORCH_TO_TRITON, aot_spec, autotuned, bucket, launch_tuned, target_programs
from .conv_layer_kernels import (_conv_bwd_dw_kernel, _conv_bwd_dx_kernel, _conv_fwd_kernel,
                                 _norm_act_bwd_kernel)

NORMS = {"none": 0, "layer": 1}
MAX_CHANNELS = 8192  # the LayerNorm backward holds a whole row per program

# ----------------------------------------------------------------------------- autotune configs (data)
# GEMM tiles for H100/A100: M = B * T_out (10^4..10^5 rows), N = C_out (512), K = k * C_in (1024-1536).


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Every config below compiles without register spills for sm_80 and sm_90 at 512 channels (the JIT's
# 16-divisible C_in / C_out / strides: vectorised, cp.async-pipelined loads). The fp32 accumulator is
# BLOCK_M * BLOCK_N / (32 * num_warps) registers per thread: 64 leaves room for the operand pipeline
# and the GELU / LayerNorm epilogue; 128 (128 x 256 at 8 warps, 128 x 128 at 4) spills there (the dX /
# dW GEMMs, a plain store, fit 128 x 256 at 8 warps), and 16 warps cap a thread at 128 registers.
FWD_CONFIGS = [_cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
               _cfg(64, 256, 64, 8, 3)]
# LayerNorm epilogue: a program loops over all C_out channels of its BLOCK_M rows, BLOCK_N at a time
FWD_NORM_CONFIGS = [_cfg(128, 128, 64, 8, 4), _cfg(64, 256, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                    _cfg(64, 128, 64, 4, 4)]
DX_CONFIGS = [_cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
DW_CONFIGS = [_cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
# under TRITON_INTERPRET (see ``launch_tuned``): several N chunks and K blocks at test sizes
INTERPRET_TILES = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)
KEY = ["M_BUCKET", "C_in", "C_out", "KSIZE"]


def _prune(configs, named_args, **kwargs):
    n = triton.next_power_of_2(named_args["C_out"])  # positional in every launch
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(n, 128)]
    return kept or configs[:1]


_conv_fwd = autotuned("conv_layer_fwd", FWD_CONFIGS, KEY, _prune)(_conv_fwd_kernel)
_conv_fwd_norm = autotuned("conv_layer_fwd_norm", FWD_NORM_CONFIGS, KEY, _prune)(_conv_fwd_kernel)
_conv_bwd_dx = autotuned("conv_layer_bwd_dx", DX_CONFIGS, KEY, _prune)(_conv_bwd_dx_kernel)
_conv_bwd_dw = autotuned("conv_layer_bwd_dw", DW_CONFIGS, KEY, _prune)(_conv_bwd_dw_kernel)


# ----------------------------------------------------------------------------- launchers

def _out_frames(T_in: int, K: int, stride: int) -> int:
    return (T_in - K) // stride + 1


def _reorganise(weight):
    """[C_out, C_in, K] -> [K * C_in, C_out] contiguous (row k * C_in + ci = W[:, ci, k])."""
    C_out, C_in, K = weight.shape
    return weight.permute(2, 1, 0).reshape(K * C_in, C_out).contiguous()


def _dot_flags(dtype):
    return {"IEEE": dtype == torch.float32, "UPCAST": interpret_upcast_bf16(dtype)}


def conv_layer_fwd(x, weight, bias, norm_weight, norm_bias, stride, norm, eps, save):
    """Returns (out [B, T_out, C_out], y, mean, rstd); y / mean / rstd are empty unless save."""
    B, T_in, C_in = x.shape
    C_out, _, K = weight.shape
    T_out = _out_frames(T_in, K, stride)
    M = B * T_out
    w = _reorganise(weight)
    out = torch.empty(B, T_out, C_out, dtype=x.dtype, device=x.device)
    y = torch.empty_like(out) if save else x.new_empty(0)
    n_stats = M if save and norm else 0
    mean = torch.empty(n_stats, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_stats, dtype=torch.float32, device=x.device)
    dummy = w
    kernel = _conv_fwd_norm if norm else _conv_fwd
    def grid(meta):  # 1-D, N tiles x row tiles (with the norm one program owns all N tiles of its rows)
        return ((1 if norm else triton.cdiv(C_out, meta["BLOCK_N"])) * triton.cdiv(M, meta["BLOCK_M"]),)
    launch_tuned(
        kernel, grid, x, w, bias if bias is not None else dummy, norm_weight if norm else dummy,
        norm_bias if norm else dummy, out, y if save else out, mean if n_stats else dummy,
        rstd if n_stats else dummy, M, T_out, C_in, C_out, stride, *x.stride(), eps, bucket(M),
        KSIZE=K, HAS_BIAS=bias is not None, NORM=bool(norm), SAVE=save, **_dot_flags(x.dtype),
        interpret=INTERPRET_TILES)
    return out, y, mean, rstd


def conv_layer_bwd(dout, x, weight, y, mean, rstd, norm_weight, norm_bias, stride, norm, has_bias,
                   need_dx, need_dw):
    """Returns (dx, dweight, dbias, dnorm_weight, dnorm_bias); empty where not needed / absent."""
    B, T_in, C_in = x.shape
    C_out, _, K = weight.shape
    T_out = dout.shape[1]
    M = B * T_out
    dout2 = dout.reshape(M, C_out)
    w = _reorganise(weight)
    dummy = w
    # 1. GELU (+ LayerNorm) backward: dy and partial reductions for the bias and norm parameters
    block_c = triton.next_power_of_2(C_out)
    block_m = max(1, min(32, 8192 // block_c))
    programs = max(1, min(triton.cdiv(M, block_m), 4 * target_programs(x.device)))
    rows = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = triton.cdiv(M, rows)
    dy = torch.empty(M, C_out, dtype=x.dtype, device=x.device)
    dvec = torch.empty(programs, 3, C_out, dtype=torch.float32, device=x.device)
    _norm_act_bwd_kernel[(programs,)](
        dout2, y, mean if norm else dummy, rstd if norm else dummy, norm_weight if norm else dummy,
        norm_bias if norm else dummy, dy, dvec, M, C_out, *dout2.stride(), rows, NORM=bool(norm),
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=8 if block_c >= 512 else 4)
    dvec = dvec.sum(0)
    dbias = dvec[0].to(x.dtype, copy=True) if has_bias else x.new_empty(0)
    dg = dvec[1].to(norm_weight.dtype, copy=True) if norm else x.new_empty(0)
    dbeta = dvec[2].to(norm_bias.dtype, copy=True) if norm else x.new_empty(0)
    # 2. dX: one dense GEMM per stride phase
    dx = x.new_empty(0)
    if need_dx:
        dx = torch.empty(B, T_in, C_in, dtype=x.dtype, device=x.device)
        J = triton.cdiv(T_in, stride)
        launch_tuned(
            _conv_bwd_dx, lambda meta: (triton.cdiv(C_in, meta["BLOCK_N"]) * triton.cdiv(B * J, meta["BLOCK_M"]),
                                        stride),
            dy, w, dx, B, T_in, T_out, C_in, C_out, J, stride, bucket(B * J), KSIZE=K,
            **_dot_flags(x.dtype), interpret=INTERPRET_TILES)
    # 3. dW: split over rows m, partials summed in fp32 (deterministic)
    dweight = x.new_empty(0)
    if need_dw:
        tiles = triton.cdiv(K * C_in, 128) * triton.cdiv(C_out, 128)
        splits = max(1, min(triton.cdiv(target_programs(x.device), tiles), triton.cdiv(M, 1024)))
        per = triton.cdiv(triton.cdiv(M, splits), 128) * 128
        splits = triton.cdiv(M, per)
        part = torch.empty(splits, K * C_in, C_out, dtype=torch.float32, device=x.device)
        launch_tuned(
            _conv_bwd_dw, lambda meta: (triton.cdiv(C_out, meta["BLOCK_N"]), triton.cdiv(K * C_in, meta["BLOCK_M"]),
                                        splits),
            x, dy, part, M, T_out, C_in, C_out, stride, *x.stride(), per, bucket(per), KSIZE=K,
            **_dot_flags(x.dtype), interpret=INTERPRET_TILES)
        dweight = part.sum(0).reshape(K, C_in, C_out).permute(2, 1, 0).to(weight.dtype).contiguous()
    return dx, dweight, dbias, dg, dbeta


# ----------------------------------------------------------------------------- torch.library ops + autograd

@torch.library.custom_op(
    "unispeech_kernels::conv_layer_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, int stride, "
           "int norm, float eps, bool save) -> (Tensor, Tensor, Tensor, Tensor)")
def _conv_layer_fwd_op(x, weight, bias, norm_weight, norm_bias, stride, norm, eps, save):
    return conv_layer_fwd(x, weight, bias, norm_weight, norm_bias, stride, norm, eps, save)


@_conv_layer_fwd_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, stride, norm, eps, save):
    B, T_in, _ = x.shape
    shape = (B, _out_frames(T_in, weight.shape[-1], stride), weight.shape[0])
    n_stats = shape[0] * shape[1] if save and norm else 0
    return (x.new_empty(shape), x.new_empty(shape if save else (0,)),
            x.new_empty(n_stats, dtype=torch.float32), x.new_empty(n_stats, dtype=torch.float32))


@torch.library.custom_op(
    "unispeech_kernels::conv_layer_bwd", mutates_args=(),
    schema="(Tensor dout, Tensor x, Tensor weight, Tensor y, Tensor mean, Tensor rstd, Tensor? norm_weight, "
           "Tensor? norm_bias, int stride, int norm, bool has_bias, bool need_dx, bool need_dw) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _conv_layer_bwd_op(dout, x, weight, y, mean, rstd, norm_weight, norm_bias, stride, norm, has_bias,
                       need_dx, need_dw):
    return conv_layer_bwd(dout, x, weight, y, mean, rstd, norm_weight, norm_bias, stride, norm, has_bias,
                          need_dx, need_dw)


@_conv_layer_bwd_op.register_fake
def _(dout, x, weight, y, mean, rstd, norm_weight, norm_bias, stride, norm, has_bias, need_dx, need_dw):
    C_out = weight.shape[0]
    return (x.new_empty(x.shape if need_dx else (0,)), weight.new_empty(weight.shape if need_dw else (0,)),
            x.new_empty(C_out if has_bias else 0), x.new_empty(C_out if norm else 0),
            x.new_empty(C_out if norm else 0))


def _setup(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, stride, norm, eps, save = inputs
    _, y, mean, rstd = output
    ctx.save_for_backward(x, weight, y, mean, rstd, norm_weight, norm_bias)
    ctx.stride, ctx.norm, ctx.has_bias = stride, norm, bias is not None


def _backward(ctx, dout, _dy, _dmean, _drstd):
    x, weight, y, mean, rstd, norm_weight, norm_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.unispeech_kernels.conv_layer_bwd(
        dout, x, weight, y, mean, rstd, norm_weight, norm_bias, ctx.stride, ctx.norm, ctx.has_bias,
        need[0], need[1])
    dx, dw, db, dg, dbeta = (g if n else None for g, n in zip(grads, need[:5]))
    return dx, dw, db, dg, dbeta, None, None, None, None


_conv_layer_fwd_op.register_autograd(_backward, setup_context=_setup)


def conv_layer_check(x, weight, bias, norm_weight, norm_bias):
    """None if the Triton conv layer can run these tensors, else the reason."""
    reason = triton_device_reason(x, weight, bias, norm_weight, norm_bias)
    if reason:
        return reason
    if x.dtype not in TORCH_TO_TRITON:
        return f"dtype {x.dtype} not supported (fp32, fp16, bf16)"
    if weight.shape[0] > MAX_CHANNELS:
        return f"{weight.shape[0]} output channels > {MAX_CHANNELS}"
    return None


def conv_layer(x, weight, bias, stride: int, norm_mode: str, norm_weight: Optional[torch.Tensor],
               norm_bias: Optional[torch.Tensor], eps: float = 1e-5):
    """Triton conv + bias + (LayerNorm) + GELU on channels-last x [B, T_in, C_in] -> [B, T_out, C_out].
    Shapes and dtypes are checked by feature_encoder (the public entry point)."""
    norm = NORMS[norm_mode]
    tensors = (x, weight, bias, norm_weight, norm_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, _, _, _ = _conv_layer_fwd_op(x, weight, bias, norm_weight if norm else None,
                                      norm_bias if norm else None, int(stride), norm, float(eps), save)
    return out


def aot_specs():
    """Ahead-of-time compile specs at UniSpeech-base shapes (512 channels, k 3, stride 2), bf16,
    with the first (default) GPU config of each kernel. Unit channel strides are constexpr 1, and
    the sizes / strides that are multiples of 16 at these shapes (channels, frame and utterance strides,
    the power-of-two buckets) carry the divisibility hint, as the JIT specialises them at run time."""
    specs = []
    for dt in ("bf16",):  # fp16 compiles to the same tiles
        dot = dict(IEEE=False, UPCAST=False)
        sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "g_ptr": f"*{dt}",
               "beta_ptr": f"*{dt}", "out_ptr": f"*{dt}", "y_ptr": f"*{dt}", "mean_ptr": "*fp32",
               "rstd_ptr": "*fp32", "M": "i32", "T_out": "i32", "C_in": "i32", "C_out": "i32",
               "stride": "i32", "stride_xb": "i32", "stride_xt": "i32", "eps": "fp32", "M_BUCKET": "i32"}
        for norm, cfg in ((False, FWD_CONFIGS[0]), (True, FWD_NORM_CONFIGS[0])):
            consts = dict(stride_xc=1, KSIZE=3, HAS_BIAS=True, NORM=norm, SAVE=True, **dot, **cfg.kwargs)
            name = f"conv_fwd_{'layer' if norm else 'gelu'}_{dt}"
            specs.append(aot_spec(name, _conv_fwd_kernel, sig, consts, cfg.num_warps, cfg.num_stages,
                                  mma=True, divisible=("C_in", "C_out", "stride_xb", "stride_xt", "M_BUCKET")))
        sig = {"dout_ptr": f"*{dt}", "y_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
               "g_ptr": f"*{dt}", "beta_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "dvec_ptr": "*fp32", "M": "i32",
               "C": "i32", "stride_om": "i32", "rows_per_prog": "i32"}
        for norm in (False, True):
            name = f"norm_act_bwd_{'layer' if norm else 'gelu'}_{dt}"
            consts = dict(stride_oc=1, NORM=norm, BLOCK_M=16, BLOCK_C=512)
            specs.append(aot_spec(name, _norm_act_bwd_kernel, sig, consts, 8, divisible=("C", "stride_om")))
        sig = {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "B": "i32", "T_in": "i32",
               "T_out": "i32", "C_in": "i32", "C_out": "i32", "J": "i32", "stride": "i32", "M_BUCKET": "i32"}
        cfg = DX_CONFIGS[0]
        specs.append(aot_spec(f"conv_bwd_dx_{dt}", _conv_bwd_dx_kernel, sig,
                              dict(KSIZE=3, **dot, **cfg.kwargs), cfg.num_warps, cfg.num_stages, mma=True,
                              divisible=("C_in", "C_out", "M_BUCKET")))
        sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "dw_ptr": "*fp32", "M": "i32", "T_out": "i32",
               "C_in": "i32", "C_out": "i32", "stride": "i32", "stride_xb": "i32", "stride_xt": "i32",
               "m_per_split": "i32", "M_BUCKET": "i32"}
        cfg = DW_CONFIGS[0]
        specs.append(aot_spec(f"conv_bwd_dw_{dt}", _conv_bwd_dw_kernel, sig,
                              dict(stride_xc=1, KSIZE=3, **dot, **cfg.kwargs), cfg.num_warps, cfg.num_stages,
                              mma=True, divisible=("C_in", "C_out", "stride_xb", "stride_xt", "m_per_split",
                                                   "M_BUCKET")))
    return specs
