"""Positional convolutional embedding with its residual: out = x + act(trim(conv(x))).
(``residual=False`` returns act(trim(conv(x))) alone, for callers that add the residual themselves.)

Shapes: hidden x [B, T, C] -> [B, T, C]. weight W [C, CG, K] with CG = C / G channels per group
(weight norm already folded, see ``fold_weight_norm``), bias [C] or None; padding P = K // 2 on
both sides, and for even K the last output frame is dropped so T is kept. Padded frames must
already be zero in ``hidden`` (the encoder zeroes them, as transformers does), so the kernels need
no padding mask; only frames outside [0, T) are masked (the convolution's zero padding). Under
autocast the op casts its inputs to autocast's dtype and runs in it (``follows_autocast``).

Triton backend (kernels: ``pos_conv_kernels.py``): per group an implicit GEMM
    pre[b, t, g*CG + co] = sum_{k, ci} x[b, t + k - P, g*CG + ci] * W[g*CG + co, ci, k] + bias
over the reduction index r = k * CG + ci (length K * CG: 6144 base, 8192 large) against W
reorganised to [G, K * CG, CG] once per weight version (``weight_norm.WeightLayouts``);
tensor-core dots with fp32 accumulation; epilogue bias, erf GELU, residual add of x, one store.
The dX backward is the same kernel on the flipped taps (FLIP); dW, db and GELU's derivative have
kernels of their own.
The post-norm encoder's LayerNorm after this op is not fused in: it needs all C channels of a frame,
a program owns one group's CG. Owning every group would cut the grid 16x (1024 -> 64 programs at
B 8, T 500 on 132 SMs) to save one memory-bound pass of ~12 MB (a few microseconds next to a conv
of ~37 GFLOP), so the norm stays a separate op.
File order: reference -> contract (inputs, checks) -> launchers -> torch.library ops + autograd ->
backends -> entry point -> aot_specs.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from .._runtime import dot_flags, target_programs
from ..activations import get_activation
from ..dispatch import Inputs, Op
from ._common import (KERNEL_DTYPES, aot_spec, cdiv, follows_autocast, launch_tuned, length_bucket, next_power_of_2,
                      tile_config)


def fold_weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v||, the norm over every dim but the kernel one (weight_norm dim=2).
    weight_g [1, 1, K], weight_v [C, C / groups, K]. Differentiable in g and v."""
    norm = weight_v.norm(dim=(0, 1), keepdim=True)
    return weight_v * (weight_g / norm)


def pos_conv_reference(hidden, weight, bias, *, groups, activation="gelu", residual=True, upcast=False):
    dtype = hidden.dtype
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = bias.double() if bias is not None else None
    if hidden.shape[1] == 0:  # no frame: the empty output, zero parameter gradients (conv1d rejects it)
        out = hidden + sum(t.sum() * 0.0 for t in (weight, bias) if t is not None)
        return out if upcast else out.to(dtype)
    k = weight.shape[-1]
    y = F.conv1d(hidden.transpose(1, 2), weight, bias, padding=k // 2, groups=groups)
    if k % 2 == 0:
        y = y[:, :, :-1]
    out = get_activation(activation, overwrite_temporaries=True)(y).transpose(1, 2)
    if residual:
        out = hidden + out
    return out if upcast else out.to(dtype)


def check_pos_conv_inputs(hidden, weight, bias, groups):
    """Raise a clear error for anything no backend should be asked to compute."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"pos_conv_embed: hidden must be [batch, frames, channels], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)}")
    if not hidden.is_floating_point():
        raise TypeError(f"pos_conv_embed: hidden must be floating point, got {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"pos_conv_embed: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"pos_conv_embed: groups must be an int, got {groups!r}")
    c = hidden.shape[-1]
    if groups < 1 or c % groups:
        raise ValueError(f"pos_conv_embed: channels {c} not divisible by groups {groups}")
    if weight.dim() != 3 or weight.shape[0] != c or weight.shape[1] != c // groups:
        raise ValueError(f"pos_conv_embed: weight must be [{c}, {c // groups}, K], got {tuple(weight.shape)}")
    if weight.shape[-1] < 1:
        raise ValueError("pos_conv_embed: kernel size (weight.shape[-1]) must be >= 1")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"pos_conv_embed: bias must be [{c}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"pos_conv_embed: {name} is {t.dtype} on {t.device}, hidden is "
                            f"{hidden.dtype} on {hidden.device}")


@dataclasses.dataclass(frozen=True)
class PosConvInputs(Inputs):
    hidden: torch.Tensor  # [B, T, C], padded frames zero
    weight: torch.Tensor  # [C, C / groups, K], weight norm folded
    bias: Optional[torch.Tensor]  # [C]
    groups: int
    activation: str = "gelu"
    residual: bool = True

    @property
    def tensors(self):
        return self.hidden, self.weight, self.bias

    @property
    def sizes(self):
        h = self.hidden
        extent = sum((n - 1) * st for n, st in zip(h.shape, h.stride())) + 1
        return {"batch (a grid axis)": h.shape[0],
                "elements spanned (int32 offsets)": max(extent, h.numel(), self.weight.numel())}


# ----------------------------------------------------------------------------------------- launchers

def _kernels():
    from . import pos_conv_kernels

    return pos_conv_kernels


def block_n(cg: int) -> int:
    """Output channels per program: CG rounded up to a power of two, 16 (tl.dot) .. 128."""
    return min(128, max(16, next_power_of_2(cg)))


@functools.lru_cache(None)
def _layouts():
    from ..weight_norm import WeightLayouts  # weight_norm imports this module

    return WeightLayouts()


def _reorganised(weight, groups, flip: bool):
    """[C, CG, K] -> [G, K * CG, CG]: row k*CG + ci, column co (forward), or row k*CG + co, column ci
    (``flip``, for dX); a copy (9-17 MB at model shapes) made once per weight version."""
    def make():
        c, cg, k = weight.shape
        order = (0, 3, 1, 2) if flip else (0, 3, 2, 1)
        return weight.reshape(groups, cg, cg, k).permute(*order).contiguous().view(groups, k * cg, cg)
    return _layouts().get(weight, ("pos_conv", groups, flip), make)


def _channels_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_conv(a, w_r, bias, res, kernel_size, *, flip, store_pre, add_res):
    kern = _kernels()
    bsz, t, c = a.shape
    groups, cg = w_r.shape[0], w_r.shape[-1]
    out = torch.empty((bsz, t, c), device=a.device, dtype=a.dtype)
    pre = torch.empty_like(out) if store_pre else out
    bn = block_n(cg)

    def grid(meta):
        return cdiv(t, meta["BLOCK_T"]), bsz, groups * cdiv(cg, bn)
    launch_tuned(
        kern._pos_conv_conv, grid, a, w_r, bias if bias is not None else w_r, res, out, pre, t, c, kernel_size,
        kernel_size // 2, a.stride(0), a.stride(1), res.stride(0), res.stride(1), length_bucket(t, 16, 4096),
        CG=cg, FLIP=flip, HAS_BIAS=bias is not None, APPLY_GELU=not flip, STORE_PRE=store_pre, ADD_RES=add_res,
        **dot_flags(a.dtype), BLOCK_N=bn, interpret=kern.CONV_TILES_INTERPRET)
    return out, (pre if store_pre else None)


def gelu_bwd(dy: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """dpre = dy * gelu'(pre), [B, T, C] contiguous in dy's dtype."""
    kern = _kernels()
    dy = dy.contiguous()
    dpre = torch.empty_like(pre)
    n = dy.numel()
    kern._gelu_bwd_kernel[(cdiv(n, kern.GELU_BWD_BLOCK),)](dy, pre, dpre, n, BLOCK=kern.GELU_BWD_BLOCK)
    return dpre


def pos_conv_dw(x, dpre, kernel_size: int, groups: int, compute_db: bool, split=None):
    """dW [C, CG, K] and db [C] (or None) in x's dtype. x [B, T, C] with channel stride 1, dpre
    contiguous. ``split``: frame-block partials (None = enough programs for the device)."""
    kern = _kernels()
    bsz, t, c = x.shape
    cg = c // groups
    cfg = tile_config(kern._pos_conv_dw_kernel, gpu=kern.DW_CONFIG, interpret=kern.DW_CONFIG_INTERPRET)
    bn = block_n(cg)
    m_tiles = cdiv(kernel_size * cg, cfg["BLOCK_M"])
    programs = m_tiles * groups * cdiv(cg, bn)
    n_iters = bsz * cdiv(t, cfg["BLOCK_S"])
    if split is None:
        split = cdiv(target_programs(x.device) // 2, programs)  # 2 per SM
    split = max(1, min(split, n_iters))
    iters_per_split = cdiv(n_iters, split)
    split = cdiv(n_iters, iters_per_split)  # no empty programs
    acc_dtype = x.dtype if split == 1 else torch.float32
    dw = torch.empty((split, c, cg, kernel_size), device=x.device, dtype=acc_dtype)
    db = torch.empty((split, c), device=x.device, dtype=acc_dtype) if compute_db else dw
    grid = (m_tiles, groups * cdiv(cg, bn), split)
    kern._pos_conv_dw_kernel[grid](
        x, dpre, dw, db, t, c, kernel_size, kernel_size // 2, x.stride(0), x.stride(1), n_iters,
        iters_per_split, CG=cg, COMPUTE_DB=compute_db, **dot_flags(x.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn,
        BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dw = dw[0] if split == 1 else dw.sum(0).to(x.dtype)
    if not compute_db:
        return dw, None
    return dw, (db[0] if split == 1 else db.sum(0).to(x.dtype))


def pos_conv_fwd(hidden, weight, bias, groups: int, save_pre: bool, residual: bool = True):
    """(out, pre) with out = hidden + gelu(conv(hidden) + bias) (without ``hidden +`` when not
    residual); pre [B, T, C] when save_pre, else an empty tensor. Inputs already checked."""
    x = _channels_last(hidden)
    if x.numel() == 0:
        return x.clone(), (x.clone() if save_pre else x.new_empty(0))
    out, pre = _launch_conv(x, _reorganised(weight, groups, flip=False), bias, x, weight.shape[-1],
                            flip=False, store_pre=save_pre, add_res=residual)
    return out, (pre if save_pre else x.new_empty(0))


def pos_conv_bwd(grad, hidden, weight, pre, groups: int, need_dx: bool, need_dw: bool,
                 need_db: bool, residual: bool = True, dw_split=None):
    """(dx, dW, db); a gradient that is not needed comes back as an empty tensor."""
    x = _channels_last(hidden)
    dy = grad.contiguous()
    none = lambda: x.new_empty(0)  # noqa: E731  (a fresh one per slot: custom-op outputs may not alias)
    if x.numel() == 0:
        dx = (dy.clone() if residual else torch.zeros_like(dy)) if need_dx else none()
        return (dx, torch.zeros_like(weight) if need_dw else none(),
                x.new_zeros(x.shape[-1]) if need_db else none())
    dpre = gelu_bwd(dy, pre)
    dx = none()
    if need_dx:
        dx, _ = _launch_conv(dpre, _reorganised(weight, groups, flip=True), None, dy, weight.shape[-1],
                             flip=True, store_pre=False, add_res=residual)
    dw, db = none(), none()
    if need_dw:
        dw, db = pos_conv_dw(x, dpre, weight.shape[-1], groups, need_db, split=dw_split)
    elif need_db:
        db = dpre.sum((0, 1), dtype=torch.float32).to(x.dtype)
    return dx, dw, (db if need_db else none())


# ------------------------------------------------------- torch.library ops (torch.compile-safe)

@torch.library.custom_op("unispeech_kernels::pos_conv_fwd", mutates_args=(),
                         schema="(Tensor hidden, Tensor weight, Tensor? bias, int groups, "
                                "bool save_pre, bool residual) -> (Tensor, Tensor)")
def _pos_conv_fwd_op(hidden, weight, bias, groups, save_pre, residual):
    return pos_conv_fwd(hidden, weight, bias, groups, save_pre, residual)


@_pos_conv_fwd_op.register_fake
def _pos_conv_fwd_fake(hidden, weight, bias, groups, save_pre, residual):
    out = hidden.new_empty(hidden.shape)
    return out, (hidden.new_empty(hidden.shape) if save_pre else hidden.new_empty(0))


@torch.library.custom_op("unispeech_kernels::pos_conv_bwd", mutates_args=(),
                         schema="(Tensor grad, Tensor hidden, Tensor weight, Tensor pre, int groups, "
                                "bool need_dx, bool need_dw, bool need_db, bool residual) "
                                "-> (Tensor, Tensor, Tensor)")
def _pos_conv_bwd_op(grad, hidden, weight, pre, groups, need_dx, need_dw, need_db, residual):
    return pos_conv_bwd(grad, hidden, weight, pre, groups, need_dx, need_dw, need_db, residual)


@_pos_conv_bwd_op.register_fake
def _pos_conv_bwd_fake(grad, hidden, weight, pre, groups, need_dx, need_dw, need_db, residual):
    return (hidden.new_empty(hidden.shape) if need_dx else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else weight.new_empty(0),
            hidden.new_empty(hidden.shape[-1]) if need_db else hidden.new_empty(0))


def _fwd_setup_context(ctx, inputs, output):
    # GELU's backward needs the pre-activation: the forward writes it (one extra [B, T, C] store,
    # ~6 MB at base B 8 T 500) rather than the backward recomputing the whole conv GEMM.
    hidden, weight, bias, groups, save_pre, residual = inputs
    ctx.groups = groups
    ctx.residual = residual
    ctx.has_bias = bias is not None
    ctx.saved_pre = save_pre
    if save_pre:
        ctx.save_for_backward(hidden, weight, output[1])


def _fwd_backward(ctx, grad_out, grad_pre):
    if not ctx.saved_pre:
        raise RuntimeError("pos_conv_embed (triton): backward through a forward run without "
                           "gradients enabled (nothing was saved)")
    hidden, weight, pre = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    dx, dw, db = _pos_conv_bwd_op(grad_out, hidden, weight, pre, ctx.groups, need_dx, need_dw, need_db,
                                  ctx.residual)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None, None)


_pos_conv_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------ backends

pos_conv_op = Op("pos_conv", features={"training": "has no backward"})


@pos_conv_op.backend("torch", features=("training",))
def pos_conv_torch(inputs: PosConvInputs):
    return pos_conv_reference(inputs.hidden, inputs.weight, inputs.bias, groups=inputs.groups,
                              activation=inputs.activation, residual=inputs.residual)


@pos_conv_op.backend("triton", runtime="triton", dtypes=KERNEL_DTYPES, activations=("gelu",), features=("training",),
                     limits=(("batch (a grid axis)", 65535), ("elements spanned (int32 offsets)", 2**31 - 1)),
                     auto=False)
def pos_conv_triton(inputs: PosConvInputs):
    out, _ = _pos_conv_fwd_op(inputs.hidden, inputs.weight, inputs.bias, inputs.groups, inputs.needs_grad,
                              inputs.residual)
    return out


@follows_autocast
def pos_conv_embed(hidden, weight, bias=None, *, groups: int, activation: str = "gelu",
                   residual: bool = True, backend: Optional[str] = None):
    """hidden + act(conv(hidden)) with same padding (act(conv(hidden)) when not ``residual``);
    see the module docstring."""
    check_pos_conv_inputs(hidden, weight, bias, groups)
    get_activation(activation)  # an unknown name fails here, whichever backend runs
    return pos_conv_op(PosConvInputs(hidden, weight, bias, groups, activation, residual), backend)


@pos_conv_op.example
def _example(device, dtype):
    """UniSpeech-base: 2 x 499 frames of 768 channels, kernel 128 in 16 groups."""
    e = dict(device=device, dtype=dtype)
    return PosConvInputs(torch.empty(2, 499, 768, **e), torch.empty(768, 48, 128, **e), torch.empty(768, **e), 16)


# ---------------------------------------------------------------------------------------- aot specs

_AOT_SHAPES = {"base": (768, 16, 128), "large": (1024, 16, 128)}  # (C, groups, K) of UniSpeech
_DIVISIBLE_16 = ("C", "N", "KS", "PAD", "T_BUCKET", "stride_ab", "stride_at", "stride_rb", "stride_rt",
                 "stride_xb", "stride_xt")  # K 128 and its half, the power-of-two bucket, multiples of C


def _spec(name, fn, types, constexprs, num_warps, num_stages, mma):
    divisible = [n for n in _DIVISIBLE_16 if n in fn.arg_names]
    return aot_spec(name, fn, types, constexprs, num_warps, num_stages, mma, divisible)


def aot_specs():
    """Every kernel config launched at UniSpeech base / large shapes, bf16, for the
    ahead-of-time compile check (registers, spills, tensor-core instructions). ``divisible_by_16``:
    the arguments the JIT sees 16-divisible at those shapes (pointers, C and strides); without them
    loads compile scalar and register counts are not representative."""
    kern = _kernels()
    specs = []
    variants = {"fwd": dict(FLIP=False, HAS_BIAS=True, APPLY_GELU=True, STORE_PRE=False, ADD_RES=True),
                "fwd_train": dict(FLIP=False, HAS_BIAS=True, APPLY_GELU=True, STORE_PRE=True, ADD_RES=True),
                "dx": dict(FLIP=True, HAS_BIAS=False, APPLY_GELU=False, STORE_PRE=False, ADD_RES=True)}
    dot = dict(UPCAST=False, DOT_PREC="tf32")
    for dt in ("bf16",):  # fp16 compiles to the same tiles
        def ptrs(*names):
            return {n: f"*{dt}" for n in names}

        def ints(*names):
            return {n: "i32" for n in names}
        for size, (c, groups, ks) in _AOT_SHAPES.items():
            cg = c // groups
            conv_types = {**ptrs("a_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "pre_ptr"),
                          **ints("T", "C", "KS", "PAD", "stride_ab", "stride_at", "stride_rb", "stride_rt",
                                 "T_BUCKET")}
            for variant, flags in variants.items():
                for bt, br, warps, stages in kern.CONV_CONFIGS:
                    cx = dict(CG=cg, **flags, **dot, EVEN_R=ks * cg % br == 0, BLOCK_T=bt, BLOCK_N=block_n(cg),
                              BLOCK_R=br)
                    specs.append(_spec(f"pos_conv_{variant}_{size}_{dt}_t{bt}_r{br}", kern._pos_conv_conv_kernel,
                                       conv_types, cx, warps, stages, mma=True))
            cfg = kern.DW_CONFIG
            cx = dict(CG=cg, COMPUTE_DB=True, **dot, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n(cg),
                      BLOCK_S=cfg["BLOCK_S"])
            dw_types = {**ptrs("x_ptr", "dp_ptr", "dw_ptr", "db_ptr"),
                        **ints("T", "C", "KS", "PAD", "stride_xb", "stride_xt", "n_iters", "iters_per_split")}
            specs.append(_spec(f"pos_conv_dw_{size}_{dt}", kern._pos_conv_dw_kernel, dw_types, cx,
                               cfg["num_warps"], cfg["num_stages"], mma=True))
        specs.append(_spec(f"pos_conv_gelu_bwd_{dt}", kern._gelu_bwd_kernel, {**ptrs("dy_ptr", "pre_ptr", "dpre_ptr"),
                                                                              "N": "i32"},
                           dict(BLOCK=kern.GELU_BWD_BLOCK), 4, 1, mma=False))
    return specs
