"""First layer of the feature encoder: 1-channel Conv1d + bias + norm + activation.

Shapes: input_values [B, L] -> [B, T, C] channels-last, T = (L - K) // stride + 1.
weight [C, 1, K], bias [C] or None. norm_mode "group": GroupNorm(C, C) (per channel over time,
statistics over the whole output, or over each utterance's real frames when batch_invariant);
"layer": LayerNorm over channels per frame; "none": no norm (reserved for stacks without one).
Memory-bound (C outputs per K-sample window), so it has its own kernels instead of a GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..activations import get_activation
from ..dispatch import Op

NORM_MODES = ("group", "layer", "none")


def first_conv_layer_reference(input_values, weight, bias, stride, norm_mode, norm_weight, norm_bias,
                               *, eps=1e-5, activation="gelu", input_lengths=None,
                               batch_invariant=False, upcast=False):
    dtype = input_values.dtype
    cast = (lambda t: t.double() if t is not None else None) if upcast else (lambda t: t)
    y = F.conv1d(cast(input_values)[:, None, :], cast(weight), cast(bias), stride=stride)  # [B, C, T]
    if norm_mode == "group":
        if batch_invariant and input_lengths is not None:
            lengths = torch.div(input_lengths - weight.shape[-1], stride, rounding_mode="floor") + 1
            valid = (torch.arange(y.shape[-1], device=y.device)[None] < lengths[:, None])[:, None].to(y.dtype)
            count = valid.sum(-1, keepdim=True).clamp_min(1)
            mean = (y * valid).sum(-1, keepdim=True) / count
            var = (((y - mean) * valid) ** 2).sum(-1, keepdim=True) / count
            y = (y - mean) * torch.rsqrt(var + eps) * cast(norm_weight)[:, None] + cast(norm_bias)[:, None]
        else:
            y = F.group_norm(y, y.shape[1], cast(norm_weight), cast(norm_bias), eps)
        y = y.transpose(1, 2)
    else:
        y = y.transpose(1, 2)
        if norm_mode == "layer":
            y = F.layer_norm(y, (y.shape[-1],), cast(norm_weight), cast(norm_bias), eps)
    y = get_activation(activation)(y)
    return y if upcast else y.to(dtype)


first_conv_layer_op = Op("first_conv_layer")


@first_conv_layer_op.register("torch", check=lambda *a, **k: None)
def first_conv_layer_torch(input_values, weight, bias, stride, norm_mode, norm_weight, norm_bias, *,
                           eps=1e-5, activation="gelu", input_lengths=None, batch_invariant=False):
    return first_conv_layer_reference(input_values, weight, bias, stride, norm_mode, norm_weight,
                                      norm_bias, eps=eps, activation=activation,
                                      input_lengths=input_lengths, batch_invariant=batch_invariant)


def first_conv_layer(input_values, weight, bias, stride: int, norm_mode: str,
                     norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], *,
                     eps: float = 1e-5, activation: str = "gelu",
                     input_lengths: Optional[torch.Tensor] = None, batch_invariant: bool = False,
                     backend: Optional[str] = None):
    """Layer 0 of the feature encoder; returns [B, T, C]. Inputs are checked by feature_encoder."""
    if norm_mode not in NORM_MODES:
        raise ValueError(f"first_conv_layer: norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
    return first_conv_layer_op(input_values, weight, bias, stride, norm_mode, norm_weight, norm_bias,
                               eps=eps, activation=activation, input_lengths=input_lengths,
                               batch_invariant=batch_invariant, backend=backend)
