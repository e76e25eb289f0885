"""One channels-last Conv1d layer of the feature encoder (layers 1..N): conv + bias + optional
LayerNorm over channels + GELU, as implicit GEMMs on tensor cores, forward and backward. Not an op
of its own: the feature encoder's Triton and CUDA backends run it (``CONV_LAYER_TRITON`` says what
it takes).

Shapes: x [B, T_in, C_in] (any strides) -> out [B, T_out, C_out] contiguous,
T_out = (T_in - K) // stride + 1; weight [C_out, C_in, K] (torch Conv1d layout), bias [C_out] or
None; norm "layer": LayerNorm(C_out) weight/bias [C_out]; "none": GELU only (group-norm stacks
after layer 0). Kernels: conv_layer_kernels.py. The weight is reorganised once per call to
[K * C_in, C_out] (1.5 MB at 512 channels, k 3): negligible next to the GEMM.

Backward: the forward saves the layer input and the pre-norm / pre-GELU values y (and the LayerNorm
row statistics) only when autograd needs them; nothing when the layer is frozen or under no_grad.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import torch

from .._runtime import dot_flags, target_programs
from ..dispatch import Backend, Inputs
from ..padding import conv_output_length
from ._common import KERNEL_DTYPES, NORM_CODES, aot_spec, cdiv, launch_tuned, length_bucket, next_power_of_2

MAX_CHANNELS = 8192  # the LayerNorm backward holds a whole row per program


def _kernels():
    from . import conv_layer_kernels

    return conv_layer_kernels


@dataclasses.dataclass(frozen=True)
class ConvLayerInputs(Inputs):
    x: torch.Tensor  # [B, T_in, C_in] (the feature encoder checks it with its audio: device and dtype)
    weight: torch.Tensor  # [C_out, C_in, K]
    bias: Optional[torch.Tensor]  # [C_out]
    norm_mode: str  # "layer" or "none"
    norm_weight: Optional[torch.Tensor]  # [C_out]
    norm_bias: Optional[torch.Tensor]
    activation: str = "gelu"

    @property
    def tensors(self):
        return self.x, self.weight, self.bias, self.norm_weight, self.norm_bias

    @property
    def sizes(self):
        return {"output channels": self.weight.shape[0]}


def _affine_norm(inputs: ConvLayerInputs) -> list:
    """A LayerNorm with its weight and bias."""
    if inputs.norm_mode == "layer" and (inputs.norm_weight is None or inputs.norm_bias is None):
        return ["LayerNorm without an affine weight or bias (None) is not implemented in the kernels"]
    return []


# what the Triton layer takes (a part of the feature encoder's kernel backends)
CONV_LAYER_TRITON = Backend("triton", None, runtime="triton", dtypes=KERNEL_DTYPES, activations=("gelu",),
                            features=("training",), limits=(("output channels", MAX_CHANNELS),),
                            not_supported_reasons=_affine_norm, op="conv_layer")


# ----------------------------------------------------------------------------- launchers

def _reorganise(weight):
    """[C_out, C_in, K] -> [K * C_in, C_out] contiguous (row k * C_in + ci = W[:, ci, k])."""
    C_out, C_in, K = weight.shape
    return weight.permute(2, 1, 0).reshape(K * C_in, C_out).contiguous()


def conv_layer_fwd(x, weight, bias, norm_weight, norm_bias, stride, norm, eps, save):
    """Returns (out [B, T_out, C_out], y, mean, rstd); y / mean / rstd are empty unless save."""
    kern = _kernels()
    B, T_in, C_in = x.shape
    C_out, _, K = weight.shape
    T_out = conv_output_length(T_in, [K], [stride])
    M = B * T_out
    w = _reorganise(weight)
    out = torch.empty(B, T_out, C_out, dtype=x.dtype, device=x.device)
    y = torch.empty_like(out) if save else x.new_empty(0)
    n_stats = M if save and norm else 0
    mean = torch.empty(n_stats, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_stats, dtype=torch.float32, device=x.device)
    dummy = w
    kernel = kern._conv_fwd_norm if norm else kern._conv_fwd
    def grid(meta):  # 1-D, N tiles x row tiles (with the norm one program owns all N tiles of its rows)
        return ((1 if norm else cdiv(C_out, meta["BLOCK_N"])) * cdiv(M, meta["BLOCK_M"]),)
    launch_tuned(
        kernel, grid, x, w, bias if bias is not None else dummy, norm_weight if norm else dummy,
        norm_bias if norm else dummy, out, y if save else out, mean if n_stats else dummy,
        rstd if n_stats else dummy, M, T_out, C_in, C_out, stride, *x.stride(), eps, length_bucket(M, 1024),
        KSIZE=K, HAS_BIAS=bias is not None, NORM=bool(norm), SAVE=save, **dot_flags(x.dtype),
        interpret=kern.INTERPRET_TILES)
    return out, y, mean, rstd


def conv_layer_bwd(dout, x, weight, y, mean, rstd, norm_weight, norm_bias, stride, norm, has_bias,
                   need_dx, need_dw):
    """Returns (dx, dweight, dbias, dnorm_weight, dnorm_bias); empty where not needed / absent."""
    kern = _kernels()
    B, T_in, C_in = x.shape
    C_out, _, K = weight.shape
    T_out = dout.shape[1]
    M = B * T_out
    dout2 = dout.reshape(M, C_out)
    w = _reorganise(weight)
    dummy = w
    # 1. GELU (+ LayerNorm) backward: dy and partial reductions for the bias and norm parameters
    block_c = next_power_of_2(C_out)
    block_m = max(1, min(32, 8192 // block_c))
    programs = max(1, min(cdiv(M, block_m), 4 * target_programs(x.device)))
    rows = cdiv(cdiv(M, programs), block_m) * block_m
    programs = cdiv(M, rows)
    dy = torch.empty(M, C_out, dtype=x.dtype, device=x.device)
    dvec = torch.empty(programs, 3, C_out, dtype=torch.float32, device=x.device)
    kern._norm_act_bwd_kernel[(programs,)](
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
        J = cdiv(T_in, stride)
        launch_tuned(
            kern._conv_bwd_dx, lambda meta: (cdiv(C_in, meta["BLOCK_N"]) * cdiv(B * J, meta["BLOCK_M"]),
                                        stride),
            dy, w, dx, B, T_in, T_out, C_in, C_out, J, stride, length_bucket(B * J, 1024), KSIZE=K,
            **dot_flags(x.dtype), interpret=kern.INTERPRET_TILES)
    # 3. dW: split over rows m, partials summed in fp32 (deterministic)
    dweight = x.new_empty(0)
    if need_dw:
        tiles = cdiv(K * C_in, 128) * cdiv(C_out, 128)
        splits = max(1, min(cdiv(target_programs(x.device), tiles), cdiv(M, 1024)))
        per = cdiv(cdiv(M, splits), 128) * 128
        splits = cdiv(M, per)
        part = torch.empty(splits, K * C_in, C_out, dtype=torch.float32, device=x.device)
        launch_tuned(
            kern._conv_bwd_dw, lambda meta: (cdiv(C_out, meta["BLOCK_N"]), cdiv(K * C_in, meta["BLOCK_M"]),
                                        splits),
            x, dy, part, M, T_out, C_in, C_out, stride, *x.stride(), per, length_bucket(per, 1024), KSIZE=K,
            **dot_flags(x.dtype), interpret=kern.INTERPRET_TILES)
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
    shape = (B, conv_output_length(T_in, [weight.shape[-1]], [stride]), weight.shape[0])
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


def conv_layer(x, weight, bias, stride: int, norm_mode: str, norm_weight: Optional[torch.Tensor],
               norm_bias: Optional[torch.Tensor], eps: float = 1e-5):
    """Triton conv + bias + (LayerNorm) + GELU on channels-last x [B, T_in, C_in] -> [B, T_out, C_out].
    Shapes and dtypes are checked by feature_encoder (the public entry point)."""
    norm = NORM_CODES[norm_mode]
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
    kern = _kernels()
    specs = []
    for dt in ("bf16",):  # fp16 compiles to the same tiles
        dot = dict(DOT_PREC="tf32", UPCAST=False)
        sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "g_ptr": f"*{dt}",
               "beta_ptr": f"*{dt}", "out_ptr": f"*{dt}", "y_ptr": f"*{dt}", "mean_ptr": "*fp32",
               "rstd_ptr": "*fp32", "M": "i32", "T_out": "i32", "C_in": "i32", "C_out": "i32",
               "stride": "i32", "stride_xb": "i32", "stride_xt": "i32", "eps": "fp32", "M_BUCKET": "i32"}
        # inference, and training (SAVE: y, mean, rstd written for the backward)
        for (norm, cfg), save in itertools.product(((False, kern.FWD_CONFIGS[0]), (True, kern.FWD_NORM_CONFIGS[0])),
                                                   (False, True)):
            consts = dict(stride_xc=1, KSIZE=3, HAS_BIAS=True, NORM=norm, SAVE=save, **dot, **cfg.kwargs)
            name = f"conv_fwd_{'layer' if norm else 'gelu'}{'_save' * save}_{dt}"
            specs.append(aot_spec(name, kern._conv_fwd_kernel, sig, consts, cfg.num_warps, cfg.num_stages,
                                  mma=True, divisible=("C_in", "C_out", "stride_xb", "stride_xt", "M_BUCKET")))
        sig = {"dout_ptr": f"*{dt}", "y_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
               "g_ptr": f"*{dt}", "beta_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "dvec_ptr": "*fp32", "M": "i32",
               "C": "i32", "stride_om": "i32", "rows_per_prog": "i32"}
        for norm in (False, True):
            name = f"norm_act_bwd_{'layer' if norm else 'gelu'}_{dt}"
            consts = dict(stride_oc=1, NORM=norm, BLOCK_M=16, BLOCK_C=512)
            specs.append(aot_spec(name, kern._norm_act_bwd_kernel, sig, consts, 8,
                                  divisible=("C", "stride_om", "rows_per_prog")))
        sig = {"dy_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "B": "i32", "T_in": "i32",
               "T_out": "i32", "C_in": "i32", "C_out": "i32", "J": "i32", "stride": "i32", "M_BUCKET": "i32"}
        cfg = kern.DX_CONFIGS[0]
        specs.append(aot_spec(f"conv_bwd_dx_{dt}", kern._conv_bwd_dx_kernel, sig,
                              dict(KSIZE=3, **dot, **cfg.kwargs), cfg.num_warps, cfg.num_stages, mma=True,
                              divisible=("C_in", "C_out", "M_BUCKET")))
        sig = {"x_ptr": f"*{dt}", "dy_ptr": f"*{dt}", "dw_ptr": "*fp32", "M": "i32", "T_out": "i32",
               "C_in": "i32", "C_out": "i32", "stride": "i32", "stride_xb": "i32", "stride_xt": "i32",
               "m_per_split": "i32", "M_BUCKET": "i32"}
        cfg = kern.DW_CONFIGS[0]
        specs.append(aot_spec(f"conv_bwd_dw_{dt}", kern._conv_bwd_dw_kernel, sig,
                              dict(stride_xc=1, KSIZE=3, **dot, **cfg.kwargs), cfg.num_warps, cfg.num_stages,
                              mma=True, divisible=("C_in", "C_out", "stride_xb", "stride_xt", "m_per_split",
                                                   "M_BUCKET")))
    return specs
