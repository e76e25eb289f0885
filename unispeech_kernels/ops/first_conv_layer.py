"""First layer of the feature encoder: 1-channel Conv1d + bias + norm + activation.

Shapes: input_values [B, L] -> [B, T, C] channels-last, T = (L - K) // stride + 1.
weight [C, 1, K], bias [C] or None. norm_mode "group": GroupNorm(C, C) (per channel over time,
statistics over the whole output, or over each utterance's real frames when batch_invariant);
"layer": LayerNorm over channels per frame; "none": no norm (reserved for stacks without one).
Memory-bound (C outputs per K-sample window), so it has its own kernels instead of a GEMM.

Triton backend (kernels: ``first_conv_layer_kernels.py``): the conv is recomputed wherever it is
needed instead of being stored (K FMAs per output are cheaper than a round trip through memory), so
the forward writes its output once and the backward saves nothing but the audio, the parameters and,
in group mode, the [B, C] statistics.
  forward  "layer"/"none": one pass (a program owns all C channels of its frames for LayerNorm).
           "group": a statistics pass (per-split Welford/Chan partials of each (b, c) over time,
           merged in torch: deterministic) then the output pass (conv, normalise, GELU).
  backward "group": a reduction pass (sum over time of dz and dz * xhat per (b, c)), then one pass
           that forms dy and reduces it into db, dW (per-split partials) and dx (per-frame taps,
           overlap-added in torch); "layer"/"none": that last pass alone.
CUDA backend (opt-in, forward only): csrc/first_conv_layer.cu through the extension (``_cuda.py``
loads it); its limits are the extension's own (``kernel_limits``, csrc/first_conv_layer.cuh).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _cuda
from ..activations import get_activation
from ..dispatch import Inputs, Op
from ..padding import conv_output_length
from ._common import (KERNEL_DTYPES, NORM_CODES, NORM_GROUP, NORM_LAYER, NORM_NONE, aot_spec, cdiv, next_power_of_2,
                      split_work)


def group_norm_over_lengths(x, weight, bias, eps, lengths):
    """GroupNorm(C, C) on x [B, C, T] with statistics over the first lengths[b] frames, in at least
    fp32 (as F.group_norm keeps them: fp16 squares overflow past 256), the result in x's dtype."""
    stats = torch.promote_types(x.dtype, torch.float32)
    t = torch.arange(x.shape[-1], device=x.device)
    valid = (t[None, :] < lengths[:, None]).to(stats)[:, None, :]  # [B, 1, T]
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    xs = x.to(stats)
    mean = (xs * valid).sum(-1, keepdim=True) / count
    var = (((xs - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    y = (xs - mean) * torch.rsqrt(var + eps)
    return (y * weight[None, :, None] + bias[None, :, None]).to(x.dtype)


def first_conv_layer_reference(input_values, weight, bias, stride, norm_mode, norm_weight, norm_bias,
                               *, eps=1e-5, activation="gelu", input_lengths=None,
                               batch_invariant=True, upcast=False):
    dtype = input_values.dtype
    cast = (lambda t: t.double() if t is not None else None) if upcast else (lambda t: t)
    y = F.conv1d(cast(input_values)[:, None, :], cast(weight), cast(bias), stride=stride)  # [B, C, T]
    if norm_mode == "group":
        if batch_invariant and input_lengths is not None:
            lengths = conv_output_length(input_lengths, [weight.shape[-1]], [stride])
            y = group_norm_over_lengths(y, cast(norm_weight), cast(norm_bias), eps, lengths)
        else:
            y = F.group_norm(y, y.shape[1], cast(norm_weight), cast(norm_bias), eps)
        y = y.transpose(1, 2)
    else:
        y = y.transpose(1, 2)
        if norm_mode == "layer":
            y = F.layer_norm(y, (y.shape[-1],), cast(norm_weight), cast(norm_bias), eps)
    y = get_activation(activation)(y)
    return y if upcast else y.to(dtype)


@dataclasses.dataclass(frozen=True)
class FirstConvLayerInputs(Inputs):
    input_values: torch.Tensor  # [B, L] audio
    weight: torch.Tensor  # [C, 1, K]
    bias: Optional[torch.Tensor]  # [C]
    stride: int
    norm_mode: str  # "group", "layer" or "none"
    norm_weight: Optional[torch.Tensor]  # [C]
    norm_bias: Optional[torch.Tensor]
    eps: float = 1e-5
    activation: str = "gelu"
    input_lengths: Optional[torch.Tensor] = None  # [B] real samples (group statistics when batch_invariant)
    batch_invariant: bool = True

    @property
    def float_tensors(self):
        return self.input_values, self.weight, self.bias, self.norm_weight, self.norm_bias

    @property
    def tensors(self):
        return (*self.float_tensors, self.input_lengths)

    @property
    def sizes(self):
        return {"batch (a grid axis)": self.input_values.shape[0], "channels": self.weight.shape[0],
                "kernel size": self.weight.shape[-1]}

    @property
    def frame_lengths(self) -> Optional[torch.Tensor]:
        """[B] int32 real frames of each utterance, where the group statistics need them (else None)."""
        if self.norm_mode != "group" or not self.batch_invariant or self.input_lengths is None:
            return None
        frames = conv_output_length(self.input_values.shape[1], [self.weight.shape[-1]], [self.stride])
        lengths = conv_output_length(self.input_lengths, [self.weight.shape[-1]], [self.stride])
        return lengths.clamp(0, frames).to(torch.int32)


# ----------------------------------------------------------------------------------------- launchers

def _kernels():
    from . import first_conv_layer_kernels

    return first_conv_layer_kernels


_FWD_WARPS = 8
_BWD_WARPS = 16
MAX_TILE = 4096  # fp32 elements of a [BLOCK_T, BLOCK_C] tile (larger ones spill on sm_90)
# The backward keeps ~10 live [BLOCK_T, BLOCK_C] fp32 tiles (conv recompute, dout, xhat, dz, dy, the
# tap products) next to ~10 per-channel vectors and the [BLOCK_C, KPAD] dW accumulator, and 16 warps
# cap a thread at 128 registers: 1024-element tiles (2 frames x 512 channels) fit with and without
# NEED_DX on sm_80 and sm_90; 4096 (8 x 512) spill 150-240 B.
_BWD_TILE = 1024
_STATS_BLOCK_T = 32  # frames per tile of the group-statistics passes (with <= 128 channels)


def _tiles(C: int, norm: int, max_tile: int = MAX_TILE):
    """(BLOCK_T, BLOCK_C): LayerNorm and the backward need every channel in one program (C <= 4096)."""
    block_c = next_power_of_2(C) if norm == NORM_LAYER else min(128, next_power_of_2(C))
    return max(1, min(64, max_tile // block_c)), block_c


def _group_stats(x, w, bias, frame_lengths, T, stride, eps):
    """Per-(b, c) mean and 1/std over time of conv(x) (+ bias): [B, C] fp32 each."""
    kern = _kernels()
    B, C, K = x.shape[0], w.shape[0], w.shape[1]
    block_t, block_c = _STATS_BLOCK_T, min(128, next_power_of_2(C))
    splits, per = split_work(cdiv(T, block_t), B * cdiv(C, block_c), x.device)
    stats = torch.empty(splits, B, C, 3, dtype=torch.float32, device=x.device)
    kern._first_conv_group_stats_kernel[(splits, B, cdiv(C, block_c))](
        x, w, bias if bias is not None else w, frame_lengths if frame_lengths is not None else w, stats,
        T, C, stride, x.stride(0), x.stride(1), per, KSIZE=K, HAS_BIAS=bias is not None,
        HAS_LENGTHS=frame_lengths is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_FWD_WARPS)
    count, part_mean, part_m2 = stats.unbind(-1)  # Chan's parallel merge of the splits
    n = count.sum(0).clamp_min(1.0)
    mean = (count * part_mean).sum(0) / n
    m2 = (part_m2 + count * (part_mean - mean) ** 2).sum(0)
    return mean.contiguous(), torch.rsqrt(m2 / n + eps).contiguous()


def first_conv_fwd(x, weight, bias, norm_weight, norm_bias, frame_lengths, stride, norm, eps):
    """Launch the forward; returns (out [B, T, C], mean [B, C] fp32, rstd [B, C] fp32) where the
    statistics are empty unless norm is group."""
    kern = _kernels()
    B, L = x.shape
    C, _, K = weight.shape
    T = conv_output_length(L, [K], [stride])
    w = weight.reshape(C, K).contiguous()
    mean, rstd = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    if norm == NORM_GROUP:
        mean, rstd = _group_stats(x, w, bias, frame_lengths, T, stride, eps)
    out = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    block_t, block_c = _tiles(C, norm)
    kern._first_conv_fwd_kernel[(cdiv(T, block_t), B, cdiv(C, block_c))](
        x, w, bias if bias is not None else w, norm_weight if norm_weight is not None else w,
        norm_bias if norm_bias is not None else w, mean if norm == NORM_GROUP else w,
        rstd if norm == NORM_GROUP else w, out, T, C, stride, x.stride(0), x.stride(1), eps,
        KSIZE=K, HAS_BIAS=bias is not None, NORM=norm, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=_FWD_WARPS)
    return out, mean, rstd


def first_conv_bwd(dout, x, weight, bias, norm_weight, norm_bias, frame_lengths, mean, rstd, stride,
                   norm, eps, need_dx):
    """Gradients (dx or empty, dW, db or empty, d norm weight or empty, d norm bias or empty)."""
    kern = _kernels()
    B, L = x.shape
    C, _, K = weight.shape
    T = dout.shape[1]
    w = weight.reshape(C, K).contiguous()
    dummy = w
    sdz = sdzx = dummy
    dg = dbeta = None
    if norm == NORM_GROUP:
        block_c = min(128, next_power_of_2(C))
        splits, per = split_work(cdiv(T, _STATS_BLOCK_T), B * cdiv(C, block_c), x.device)
        part = torch.empty(splits, B, C, 2, dtype=torch.float32, device=x.device)
        kern._first_conv_group_bwd_reduce_kernel[(splits, B, cdiv(C, block_c))](
            dout, x, w, bias if bias is not None else dummy, norm_weight, norm_bias, mean, rstd, part,
            T, C, stride, x.stride(0), x.stride(1), *dout.stride(), per, KSIZE=K,
            HAS_BIAS=bias is not None, BLOCK_T=_STATS_BLOCK_T, BLOCK_C=block_c, num_warps=_FWD_WARPS)
        sums = part.sum(0)  # [B, C, 2]
        sdz, sdzx = sums[..., 0].contiguous(), sums[..., 1].contiguous()
        dbeta, dg = sdz.sum(0), sdzx.sum(0)
    block_t, block_c = _tiles(C, NORM_LAYER, _BWD_TILE)
    splits, per = split_work(cdiv(T, block_t), B, x.device)
    kpad = next_power_of_2(K)
    dw = torch.empty(splits, B, C, kpad, dtype=torch.float32, device=x.device)
    dvec = torch.empty(splits, B, 3, C, dtype=torch.float32, device=x.device)
    gx = torch.empty(B, T, K, dtype=torch.float32, device=x.device) if need_dx else dw
    has_norm = norm != NORM_NONE
    kern._first_conv_bwd_kernel[(splits, B)](
        dout, x, w, bias if bias is not None else dummy, norm_weight if has_norm else dummy,
        norm_bias if has_norm else dummy, mean if norm == NORM_GROUP else dummy,
        rstd if norm == NORM_GROUP else dummy, sdz, sdzx,
        frame_lengths if frame_lengths is not None else dummy, dw, dvec, gx,
        T, C, stride, x.stride(0), x.stride(1), *dout.stride(), eps, per, KSIZE=K, KPAD=kpad,
        HAS_BIAS=bias is not None, NORM=norm, HAS_LENGTHS=frame_lengths is not None,
        NEED_DX=need_dx, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_BWD_WARPS)
    dvec = dvec.sum((0, 1))  # [3, C]
    if norm == NORM_LAYER:
        dg, dbeta = dvec[1], dvec[2]
    dx = x.new_empty(0)
    if need_dx:
        dx = torch.zeros(B, L, dtype=torch.float32, device=x.device)
        span = stride * (T - 1) + 1
        for k in range(K):  # overlap-add of the K taps of every frame
            dx[:, k:k + span:stride] += gx[:, :, k]
        dx = dx.to(x.dtype)
    dweight = dw.sum((0, 1))[:, :K].reshape(C, 1, K).to(weight.dtype).contiguous()  # K < KPAD: a view
    def grad(g, like):  # a fresh tensor each (custom-op outputs may not alias one another)
        return g.to(like.dtype, copy=True) if g is not None else x.new_empty(0)
    return dx, dweight, grad(dvec[0] if bias is not None else None, bias), grad(dg, norm_weight), \
        grad(dbeta, norm_bias)


# ----------------------------------------------------------------------------- torch.library ops

@torch.library.custom_op(
    "unispeech_kernels::first_conv_layer_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, "
           "Tensor? frame_lengths, int stride, int norm, float eps) -> (Tensor, Tensor, Tensor)")
def _first_conv_fwd_op(x, weight, bias, norm_weight, norm_bias, frame_lengths, stride, norm, eps):
    return first_conv_fwd(x, weight, bias, norm_weight, norm_bias, frame_lengths, stride, norm, eps)


@_first_conv_fwd_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, frame_lengths, stride, norm, eps):
    T = conv_output_length(x.shape[1], [weight.shape[-1]], [stride])
    stats = (x.shape[0], weight.shape[0]) if norm == NORM_GROUP else (0,)
    return (x.new_empty(x.shape[0], T, weight.shape[0]), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op(
    "unispeech_kernels::first_conv_layer_bwd", mutates_args=(),
    schema="(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, "
           "Tensor? norm_bias, Tensor? frame_lengths, Tensor mean, Tensor rstd, int stride, int norm, "
           "float eps, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _first_conv_bwd_op(dout, x, weight, bias, norm_weight, norm_bias, frame_lengths, mean, rstd, stride,
                       norm, eps, need_dx):
    return first_conv_bwd(dout, x, weight, bias, norm_weight, norm_bias, frame_lengths, mean, rstd,
                          stride, norm, eps, need_dx)


@_first_conv_bwd_op.register_fake
def _(dout, x, weight, bias, norm_weight, norm_bias, frame_lengths, mean, rstd, stride, norm, eps,
      need_dx):
    def like(t, cond):  # contiguous, as the real gradients are (whatever the inputs' strides)
        return t.new_empty(t.shape) if cond and t is not None else x.new_empty(0)
    return (like(x, need_dx), like(weight, True), like(bias, True),
            like(norm_weight, norm != NORM_NONE), like(norm_bias, norm != NORM_NONE))


def _first_conv_setup(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, frame_lengths, stride, norm, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias, frame_lengths, mean, rstd)
    ctx.stride, ctx.norm, ctx.eps = stride, norm, eps


def _first_conv_backward(ctx, dout, _dmean, _drstd):
    x, weight, bias, norm_weight, norm_bias, frame_lengths, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.unispeech_kernels.first_conv_layer_bwd(
        dout, x, weight, bias, norm_weight, norm_bias, frame_lengths, mean, rstd, ctx.stride, ctx.norm,
        ctx.eps, need[0])
    dx, dw, db, dg, dbeta = (g if n else None for g, n in zip(grads, need[:5]))
    return dx, dw, db, dg, dbeta, None, None, None, None


_first_conv_fwd_op.register_autograd(_first_conv_backward, setup_context=_first_conv_setup)


# ------------------------------------------------------------------------------------------ backends

first_conv_layer_op = Op("first_conv_layer", features={"training": "has no backward"})


@first_conv_layer_op.backend("torch", features=("training",))
def first_conv_layer_torch(inputs: FirstConvLayerInputs):
    i = inputs
    return first_conv_layer_reference(i.input_values, i.weight, i.bias, i.stride, i.norm_mode, i.norm_weight,
                                      i.norm_bias, eps=i.eps, activation=i.activation, input_lengths=i.input_lengths,
                                      batch_invariant=i.batch_invariant)


def _cuda_shapes(inputs: FirstConvLayerInputs) -> list:
    """A stride whose sample tile fits the kernel's shared memory (the extension's answer); audio of at
    least one kernel."""
    k = inputs.weight.shape[-1]
    if not _cuda.fits_shared_memory(k, inputs.stride):
        return [f"stride {inputs.stride} not supported (the shared-memory sample tile)"]
    if inputs.input_values.shape[1] < k:
        return [f"input of {inputs.input_values.shape[1]} samples is shorter than the kernel ({k})"]
    return []


# csrc/first_conv_layer.cu, forward only; opt-in until a GPU benchmark shows it beats Triton
@first_conv_layer_op.backend("cuda", runtime="cuda", dtypes=KERNEL_DTYPES, activations=("gelu",),
                             limits=_cuda.kernel_limits, not_supported_reasons=_cuda_shapes, auto=False)
def first_conv_layer_cuda(inputs: FirstConvLayerInputs):
    """Runs csrc/first_conv_layer.cu (forward only): [B, L] -> [B, T, C] in the input dtype."""
    module, reason = _cuda.load()
    if module is None:
        raise RuntimeError(f"first_conv_layer cuda backend unavailable: {reason}")
    i = inputs
    lengths = i.input_lengths if (i.norm_mode == "group" and i.batch_invariant) else None
    x = i.input_values if i.input_values.stride(-1) == 1 else i.input_values.contiguous()
    norm = (i.norm_weight, i.norm_bias) if i.norm_mode != "none" else (None, None)
    bias, norm_weight, norm_bias = (None if t is None else t.contiguous() for t in (i.bias, *norm))
    return torch.ops.unispeech_cuda.first_conv_layer(x, i.weight.contiguous(), bias, int(i.stride),
                                                     NORM_CODES[i.norm_mode], norm_weight, norm_bias, float(i.eps),
                                                     lengths)


def _triton_shapes(inputs: FirstConvLayerInputs) -> list:
    """A [C, 1, K] weight; a norm with its weight and bias."""
    weight, norm_mode = inputs.weight, inputs.norm_mode
    if weight.dim() != 3 or weight.shape[1] != 1:
        return [f"weight must be [C, 1, K], got {tuple(weight.shape)}"]
    if norm_mode != "none" and (inputs.norm_weight is None or inputs.norm_bias is None):
        return [f"{norm_mode} norm without an affine weight or bias (None) is not implemented in the kernels"]
    return []


@first_conv_layer_op.backend("triton", runtime="triton", dtypes=KERNEL_DTYPES, activations=("gelu",),
                             features=("training",), not_supported_reasons=_triton_shapes, auto=False,
                             limits=(("batch (a grid axis)", 65535), ("channels", MAX_TILE)))
def first_conv_layer_triton(inputs: FirstConvLayerInputs):
    i = inputs
    norm = NORM_CODES[i.norm_mode]
    out, _, _ = _first_conv_fwd_op(i.input_values, i.weight, i.bias, i.norm_weight if norm else None,
                                   i.norm_bias if norm else None, i.frame_lengths, int(i.stride), norm,
                                   float(i.eps))
    return out


def first_conv_layer(input_values, weight, bias, stride: int, norm_mode: str,
                     norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], *,
                     eps: float = 1e-5, activation: str = "gelu",
                     input_lengths: Optional[torch.Tensor] = None, batch_invariant: bool = True,
                     backend: Optional[str] = None):
    """Layer 0 of the feature encoder; returns [B, T, C]. Inputs are checked by feature_encoder."""
    if norm_mode not in NORM_CODES:
        raise ValueError(f"first_conv_layer: norm_mode must be one of {tuple(NORM_CODES)}, got {norm_mode!r}")
    inputs = FirstConvLayerInputs(input_values, weight, bias, stride, norm_mode, norm_weight, norm_bias, eps,
                                  activation, input_lengths, batch_invariant)
    return first_conv_layer_op(inputs, backend)


@first_conv_layer_op.example
def _example(device, dtype):
    """UniSpeech-base layer 0: 2 utterances of 10 s at 16 kHz, 512 channels, kernel 10, stride 5, GroupNorm."""
    e = dict(device=device, dtype=dtype)
    return FirstConvLayerInputs(torch.empty(2, 160000, **e), torch.empty(512, 1, 10, **e), None, 5, "group",
                                torch.empty(512, **e), torch.empty(512, **e))


# ---------------------------------------------------------------------------------------- aot specs

_GRAD_DIVISIBLE = ("C", "stride_ob", "stride_ot")  # dout [B, T, C] contiguous


def aot_specs():
    """Ahead-of-time compile specs at UniSpeech-base shapes (C 512, K 10, stride 5), bf16.
    Unit strides are constexpr 1 and C and the output's frame / batch strides (multiples of C) carry
    the divisibility hint, as the JIT specialises them at run time; the audio's batch stride (its
    padded length) and the frame counts are any value."""
    kern = _kernels()
    specs = []
    unit = {"stride_xl": 1}
    for dt in ("bf16",):  # fp16 compiles to the same tiles
        common = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "T": "i32", "C": "i32",
                  "stride": "i32", "stride_xb": "i32"}
        for norm, name in ((NORM_GROUP, "group"), (NORM_LAYER, "layer")):
            block_t, block_c = _tiles(512, norm)
            sig = dict(common, g_ptr=f"*{dt}", beta_ptr=f"*{dt}", mean_ptr="*fp32", rstd_ptr="*fp32",
                       out_ptr=f"*{dt}", eps="fp32")
            consts = dict(unit, KSIZE=10, HAS_BIAS=name == "layer", NORM=norm, BLOCK_T=block_t,
                          BLOCK_C=block_c)
            specs.append(aot_spec(f"first_conv_fwd_{name}_{dt}", kern._first_conv_fwd_kernel, sig, consts,
                                  _FWD_WARPS, divisible=("C",)))
        sig = dict(common, len_ptr="*i32", stats_ptr="*fp32", tiles_per_prog="i32")
        specs.append(aot_spec(f"first_conv_group_stats_{dt}", kern._first_conv_group_stats_kernel, sig,
                           dict(unit, KSIZE=10, HAS_BIAS=False, HAS_LENGTHS=False, BLOCK_T=_STATS_BLOCK_T,
                                BLOCK_C=128),
                           _FWD_WARPS, divisible=("C",)))
        grad = {"dout_ptr": f"*{dt}", "stride_ob": "i32", "stride_ot": "i32",
                "g_ptr": f"*{dt}", "beta_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                "tiles_per_prog": "i32"}
        sig = dict(common, **grad, part_ptr="*fp32")
        specs.append(aot_spec(f"first_conv_group_bwd_reduce_{dt}", kern._first_conv_group_bwd_reduce_kernel, sig,
                           dict(unit, stride_oc=1, KSIZE=10, HAS_BIAS=False, BLOCK_T=_STATS_BLOCK_T,
                                BLOCK_C=128),
                           _FWD_WARPS, divisible=_GRAD_DIVISIBLE))
        # the audio gradient (NEED_DX) is rare: checked once, with the LayerNorm (the larger body)
        for norm, name, need_dx in ((NORM_GROUP, "group", False), (NORM_LAYER, "layer", False),
                                    (NORM_LAYER, "layer_dx", True)):
            block_t, block_c = _tiles(512, NORM_LAYER, _BWD_TILE)
            sig = dict(common, **grad, sdz_ptr="*fp32", sdzx_ptr="*fp32", len_ptr="*i32", dw_ptr="*fp32",
                       dvec_ptr="*fp32", gx_ptr="*fp32", eps="fp32")
            consts = dict(unit, stride_oc=1, KSIZE=10, KPAD=16, HAS_BIAS=norm == NORM_LAYER, NORM=norm,
                          HAS_LENGTHS=False, NEED_DX=need_dx, BLOCK_T=block_t, BLOCK_C=block_c)
            specs.append(aot_spec(f"first_conv_bwd_{name}_{dt}", kern._first_conv_bwd_kernel, sig, consts,
                                  _BWD_WARPS, divisible=_GRAD_DIVISIBLE))
    return specs


