"""Positional convolutional embedding with its residual: out = x + act(trim(conv(x))).
(``residual=False`` returns act(trim(conv(x))) alone, for callers that add the residual themselves.)

Shapes: hidden x [B, T, C] -> [B, T, C]. weight W [C, CG, K] with CG = C / G channels per group
(weight norm already folded, see ``fold_weight_norm``), bias [C] or None; padding P = K // 2 on
both sides, and for even K the last output frame is dropped so T is kept. Padded frames must
already be zero in ``hidden`` (the encoder zeroes them, as transformers does), so the kernels need
no padding mask; only frames outside [0, T) are masked (the convolution's zero padding).

Triton backend: per group an implicit GEMM
    pre[b, t, g*CG + co] = sum_{k, ci} x[b, t + k - P, g*CG + ci] * W[g*CG + co, ci, k] + bias
over the reduction index r = k * CG + ci (length K * CG: 6144 base, 8192 large) against W
reorganised once per call to [G, K * CG, CG]; tensor-core dots with fp32 accumulation; epilogue
bias, exact-erf GELU, residual add of x, one store. The dX backward is the same kernel on the
flipped taps (FLIP); dW, db and GELU's derivative live in ``pos_conv_bwd.py``.
The post-norm encoder's LayerNorm after this op is not fused in: it needs all C channels of a frame,
a program owns one group's CG. Owning every group would cut the grid 16x (1024 -> 64 programs at
B 8, T 500 on 132 SMs) to save one memory-bound pass of ~12 MB (a few microseconds next to a conv
of ~37 GFLOP), so the norm stays a separate op.
File order: reference -> kernel -> launchers -> torch.library ops + autograd -> backends -> entry
point -> aot_specs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._runtime import interpret_upcast_bf16, triton_device_reason
from ..activations import get_activation
from ..dispatch import Op
from ._triton_helpers import autotuned, launch_tuned
from .pos_conv_bwd import block_n, gelu_bwd, pos_conv_dw, round_bf16_rtne


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
    k = weight.shape[-1]
    y = F.conv1d(hidden.transpose(1, 2), weight, bias, padding=k // 2, groups=groups)
    if k % 2 == 0:
        y = y[:, :, :-1]
    out = get_activation(activation, overwrite_temporaries=True)(y).transpose(1, 2)
    if residual:
        out = hidden + out
    return out if upcast else out.to(dtype)


def check_pos_conv_inputs(hidden, weight, bias, groups):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"pos_conv_embed: hidden must be [batch, frames, channels], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)}")
    if not hidden.is_floating_point():
        raise TypeError(f"pos_conv_embed: hidden must be floating point, got {hidden.dtype}")
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


# ---------------------------------------------------------------- Triton: the conv GEMM kernel

@triton.jit
def _pos_conv_conv_kernel(
    a_ptr,       # [B, T, C] GEMM input, channel stride 1: x (forward) or dpre (dX)
    w_ptr,       # [G, KS * CG, CG] reorganised weight: rows k*CG + ci, cols co (FLIP: k*CG + co, ci)
    bias_ptr,    # [C] bias (read when HAS_BIAS)
    res_ptr,     # [B, T, C] residual added in the epilogue, channel stride 1: x (forward) or dy (dX)
    out_ptr,     # [B, T, C] contiguous result
    pre_ptr,     # [B, T, C] contiguous pre-activation (written when STORE_PRE)
    T,           # frames
    C,           # channels (row stride of out and pre)
    KS,          # kernel size
    PAD,         # KS // 2: tap k of output frame t reads t + k - PAD (FLIP: t - k + PAD)
    stride_ab,   # a batch stride (elements)
    stride_at,   # a frame stride (elements)
    stride_rb,   # residual batch stride (elements)
    stride_rt,   # residual frame stride (elements)
    T_BUCKET,    # T rounded to a power of two: autotune key only, unused in the body
    CG: tl.constexpr,          # channels per group
    FLIP: tl.constexpr,        # transposed conv (dX = dy + conv^T(dpre)) instead of the forward
    HAS_BIAS: tl.constexpr,    # add bias before the activation
    APPLY_GELU: tl.constexpr,  # out = res + gelu(pre) (forward) instead of res + pre (dX)
    STORE_PRE: tl.constexpr,   # save pre for GELU's backward (training forward)
    ADD_RES: tl.constexpr,     # add the residual (res_ptr) in the epilogue
    INTERP_BF16: tl.constexpr,  # bf16 under the Triton interpreter: fp32 dots, stores rounded by hand
    IEEE: tl.constexpr,        # fp32 inputs: exact fp32 dot, no tf32
    EVEN_R: tl.constexpr,      # KS * CG % BLOCK_R == 0: no mask on the reduction index
    BLOCK_T: tl.constexpr,     # frames per program (GEMM M)
    BLOCK_N: tl.constexpr,     # output channels per program (GEMM N, >= 16, CG padded)
    BLOCK_R: tl.constexpr,     # reduction step over r = k * CG + ci (GEMM K)
):
    N_NB: tl.constexpr = (CG + BLOCK_N - 1) // BLOCK_N
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2) // N_NB
    nb = tl.program_id(2) % N_NB
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CG
    R = KS * CG
    a_base = a_ptr + b * stride_ab + g * CG
    w_base = w_ptr + g * R * CG
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for i in range(0, tl.cdiv(R, BLOCK_R)):
        offs_r = i * BLOCK_R + tl.arange(0, BLOCK_R)
        k = offs_r // CG  # tap
        c_in = offs_r % CG  # channel inside the group
        if FLIP:
            src = offs_t[:, None] - k[None, :] + PAD
        else:
            src = offs_t[:, None] + k[None, :] - PAD
        a_mask = (src >= 0) & (src < T)
        w_mask = n_mask[None, :]
        if not EVEN_R:
            a_mask = a_mask & (offs_r < R)[None, :]
            w_mask = w_mask & (offs_r < R)[:, None]
        a = tl.load(a_base + src * stride_at + c_in[None, :], mask=a_mask, other=0.0)
        w = tl.load(w_base + offs_r[:, None] * CG + offs_n[None, :], mask=w_mask, other=0.0)
        if INTERP_BF16:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * CG + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (offs_t < T)[:, None] & n_mask[None, :]
    out_off = (b * T + offs_t[:, None]) * C + g * CG + offs_n[None, :]
    if STORE_PRE:
        pre = round_bf16_rtne(acc) if INTERP_BF16 else acc
        tl.store(pre_ptr + out_off, pre.to(pre_ptr.dtype.element_ty), mask=mask)
    if APPLY_GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out = acc
    if ADD_RES:
        out += tl.load(res_ptr + b * stride_rb + offs_t[:, None] * stride_rt + g * CG + offs_n[None, :],
                       mask=mask, other=0.0).to(tl.float32)
    if INTERP_BF16:
        out = round_bf16_rtne(out)
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=mask)


# Autotune candidates (BLOCK_T, BLOCK_R, num_warps, num_stages), keyed on (T bucket, CG, K, dtype).
# BLOCK_N is CG rounded up (48 -> 64 base, 64 large), so a program owns one group's channels; at
# B 8, T 500, 16 groups BLOCK_T 64 gives 8 * 8 * 16 = 1024 programs for 132 SMs.
_CONV_CONFIGS = [(64, 64, 4, 4), (128, 64, 8, 3), (128, 32, 8, 4)]
_CONV_TILES_INTERPRET = dict(BLOCK_T=32, BLOCK_R=32)  # under TRITON_INTERPRET (see ``launch_tuned``)


def _prune_conv_configs(configs, named_args, **kwargs):
    """Tiles taller than the (bucketed) sequence only waste work: drop them when others remain."""
    fitting = [c for c in configs if c.kwargs["BLOCK_T"] <= named_args["T_BUCKET"]]
    return fitting or configs[:1]


def _even_r(args):
    return args["KS"] * args["CG"] % args["BLOCK_R"] == 0


_pos_conv_conv = autotuned(
    "pos_conv_conv",
    [triton.Config(dict(BLOCK_T=bt, BLOCK_R=br), num_warps=w, num_stages=s) for bt, br, w, s in _CONV_CONFIGS],
    ["T_BUCKET", "CG", "KS"], _prune_conv_configs,
)(triton.heuristics({"EVEN_R": _even_r})(_pos_conv_conv_kernel))


def _t_bucket(t: int) -> int:
    return min(max(triton.next_power_of_2(t), 16), 4096)


def _forward_weight(weight, groups):
    """[C, CG, K] -> [G, K * CG, CG] with row k*CG + ci, column co."""
    c, cg, k = weight.shape
    return weight.reshape(groups, cg, cg, k).permute(0, 3, 2, 1).contiguous().view(groups, k * cg, cg)


def _flipped_weight(weight, groups):
    """[C, CG, K] -> [G, K * CG, CG] with row k*CG + co, column ci (for dX)."""
    c, cg, k = weight.shape
    return weight.reshape(groups, cg, cg, k).permute(0, 3, 1, 2).contiguous().view(groups, k * cg, cg)


def _channels_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_conv(a, w_r, bias, res, kernel_size, *, flip, store_pre, add_res):
    bsz, t, c = a.shape
    groups, cg = w_r.shape[0], w_r.shape[-1]
    out = torch.empty((bsz, t, c), device=a.device, dtype=a.dtype)
    pre = torch.empty_like(out) if store_pre else out
    bn = block_n(cg)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), bsz, groups * triton.cdiv(cg, bn))  # noqa: E731
    launch_tuned(
        _pos_conv_conv, grid, a, w_r, bias if bias is not None else w_r, res, out, pre, t, c, kernel_size,
        kernel_size // 2, a.stride(0), a.stride(1), res.stride(0), res.stride(1), _t_bucket(t), CG=cg, FLIP=flip,
        HAS_BIAS=bias is not None, APPLY_GELU=not flip, STORE_PRE=store_pre, ADD_RES=add_res,
        INTERP_BF16=interpret_upcast_bf16(a.dtype), IEEE=a.dtype == torch.float32, BLOCK_N=bn,
        interpret=_CONV_TILES_INTERPRET)
    return out, (pre if store_pre else None)


def pos_conv_fwd(hidden, weight, bias, groups: int, save_pre: bool, residual: bool = True):
    """(out, pre) with out = hidden + gelu(conv(hidden) + bias) (without ``hidden +`` when not
    residual); pre [B, T, C] when save_pre, else an empty tensor. Inputs already checked."""
    x = _channels_last(hidden)
    if x.numel() == 0:
        return x.clone(), (x.clone() if save_pre else x.new_empty(0))
    out, pre = _launch_conv(x, _forward_weight(weight, groups), bias, x, weight.shape[-1],
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
        dx, _ = _launch_conv(dpre, _flipped_weight(weight, groups), None, dy, weight.shape[-1],
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


# ---------------------------------------------------------------------------------- backends

pos_conv_op = Op("pos_conv")


@pos_conv_op.register("torch", check=lambda *a, **k: None)
def pos_conv_torch(hidden, weight, bias, *, groups, activation="gelu", residual=True):
    return pos_conv_reference(hidden, weight, bias, groups=groups, activation=activation, residual=residual)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_check(hidden, weight, bias, *, groups, activation="gelu", residual=True):
    if activation != "gelu":
        return f"activation {activation!r}: the kernel fuses only exact-erf 'gelu'"
    reason = triton_device_reason(hidden, weight, bias)
    if reason:
        return reason
    if hidden.dtype not in _TRITON_DTYPES:
        return f"dtype {hidden.dtype} (supported: fp32, fp16, bf16)"
    extent = sum((n - 1) * st for n, st in zip(hidden.shape, hidden.stride())) + 1
    if max(extent, hidden.numel(), weight.numel()) >= 2 ** 31:
        return "tensor spanning 2^31 or more elements (kernels use int32 offsets)"
    if hidden.shape[0] > 65535:
        return f"batch {hidden.shape[0]} > 65535 (grid axis limit)"
    return None


@pos_conv_op.register("triton", check=_triton_check, auto=False)
def pos_conv_triton(hidden, weight, bias, *, groups, activation="gelu", residual=True):
    save_pre = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    out, _ = _pos_conv_fwd_op(hidden, weight, bias, groups, save_pre, residual)
    return out


def pos_conv_embed(hidden, weight, bias=None, *, groups: int, activation: str = "gelu",
                   residual: bool = True, backend: Optional[str] = None):
    """hidden + act(conv(hidden)) with same padding (act(conv(hidden)) when not ``residual``);
    see the module docstring."""
    check_pos_conv_inputs(hidden, weight, bias, groups)
    return pos_conv_op(hidden, weight, bias, groups=groups, activation=activation, residual=residual,
                       backend=backend)


# ------------------------------------------------------------------- ahead-of-time compile specs

def _spec(name, fn, types, constexprs, num_warps, num_stages, mma):
    """One aot_specs entry; ``types`` gives the runtime arguments, constexprs complete the signature."""
    types = {**types, **{n: "constexpr" for n in constexprs}}
    return dict(name=name, fn=fn, signature={n: types[n] for n in fn.arg_names}, constexprs=constexprs,
                num_warps=num_warps, num_stages=num_stages, mma=mma,
                divisible_by_16=[n for n in fn.arg_names if n.endswith("_ptr") or n in _DIVISIBLE_16])


_AOT_SHAPES = {"base": (768, 16, 128), "large": (1024, 16, 128)}  # (C, groups, K) of UniSpeech
_DIVISIBLE_16 = ("C", "N", "stride_ab", "stride_at", "stride_rb", "stride_rt", "stride_xb", "stride_xt")


def aot_specs():
    """Every kernel config launched at UniSpeech base / large shapes, bf16, for the
    ahead-of-time compile check (registers, spills, tensor-core instructions). Extra key
    ``divisible_by_16``: the arguments the JIT sees 16-divisible at those shapes (pointers, C and
    strides); pass them as ``tt.divisibility`` attrs to compile what runs (vector loads, cp.async
    pipelining), without them loads compile scalar and register counts are not representative."""
    from . import pos_conv_bwd as bwd

    specs = []
    variants = {"fwd": dict(FLIP=False, HAS_BIAS=True, APPLY_GELU=True, STORE_PRE=False, ADD_RES=True),
                "fwd_train": dict(FLIP=False, HAS_BIAS=True, APPLY_GELU=True, STORE_PRE=True, ADD_RES=True),
                "dx": dict(FLIP=True, HAS_BIAS=False, APPLY_GELU=False, STORE_PRE=False, ADD_RES=True)}
    for dt in ("bf16",):  # fp16 compiles to the same tiles
        for size, (c, groups, ks) in _AOT_SHAPES.items():
            cg = c // groups
            ptrs = lambda *names: {n: f"*{dt}" for n in names}  # noqa: E731
            ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
            conv_types = {**ptrs("a_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr", "pre_ptr"),
                          **ints("T", "C", "KS", "PAD", "stride_ab", "stride_at", "stride_rb", "stride_rt",
                                 "T_BUCKET")}
            for variant, flags in variants.items():
                for bt, br, warps, stages in _CONV_CONFIGS:
                    cx = dict(CG=cg, **flags, INTERP_BF16=False, IEEE=False, EVEN_R=ks * cg % br == 0,
                              BLOCK_T=bt, BLOCK_N=block_n(cg), BLOCK_R=br)
                    specs.append(_spec(f"pos_conv_{variant}_{size}_{dt}_t{bt}_r{br}", _pos_conv_conv_kernel,
                                       conv_types, cx, warps, stages, mma=True))
            cfg = bwd._DW_CONFIG
            cx = dict(CG=cg, COMPUTE_DB=True, INTERP_BF16=False, IEEE=False, BLOCK_M=cfg["BLOCK_M"],
                      BLOCK_N=block_n(cg), BLOCK_S=cfg["BLOCK_S"])
            dw_types = {**ptrs("x_ptr", "dp_ptr", "dw_ptr", "db_ptr"),
                        **ints("T", "C", "KS", "PAD", "stride_xb", "stride_xt", "n_iters", "iters_per_split")}
            specs.append(_spec(f"pos_conv_dw_{size}_{dt}", bwd._pos_conv_dw_kernel, dw_types, cx,
                               cfg["num_warps"], cfg["num_stages"], mma=True))
        specs.append(_spec(f"pos_conv_gelu_bwd_{dt}", bwd._gelu_bwd_kernel,
                           {"dy_ptr": f"*{dt}", "pre_ptr": f"*{dt}", "dpre_ptr": f"*{dt}", "N": "i32"},
                           dict(INTERP_BF16=False, BLOCK=bwd._GELU_BWD_BLOCK), 4, 1, mma=False))
    return specs
