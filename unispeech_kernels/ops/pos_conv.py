"""Positional convolutional embedding with its residual: out = x + act(trim(conv(x))).

Shapes: hidden [B, T, C] -> [B, T, C]. weight [C, C / groups, K] (weight norm already folded, see
``fold_weight_norm``), bias [C] or None; padding K // 2 on both sides, and for even K the last
output frame is dropped so T is kept. Padded frames must already be zero in ``hidden``
(the encoder zeroes them, as transformers does).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..activations import get_activation
from ..dispatch import Op


def fold_weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v||, the norm over every dim but the kernel one (weight_norm dim=2).
    weight_g [1, 1, K], weight_v [C, C / groups, K]. Differentiable in g and v."""
    norm = weight_v.norm(dim=(0, 1), keepdim=True)
    return weight_v * (weight_g / norm)


def pos_conv_reference(hidden, weight, bias, *, groups, activation="gelu", upcast=False):
    dtype = hidden.dtype
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = bias.double() if bias is not None else None
    k = weight.shape[-1]
    y = F.conv1d(hidden.transpose(1, 2), weight, bias, padding=k // 2, groups=groups)
    if k % 2 == 0:
        y = y[:, :, :-1]
    out = hidden + get_activation(activation)(y).transpose(1, 2)
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
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"pos_conv_embed: bias must be [{c}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"pos_conv_embed: {name} is {t.dtype} on {t.device}, hidden is "
                            f"{hidden.dtype} on {hidden.device}")


pos_conv_op = Op("pos_conv")


@pos_conv_op.register("torch", check=lambda *a, **k: None)
def pos_conv_torch(hidden, weight, bias, *, groups, activation="gelu"):
    return pos_conv_reference(hidden, weight, bias, groups=groups, activation=activation)


def pos_conv_embed(hidden, weight, bias=None, *, groups: int, activation: str = "gelu",
                   backend: Optional[str] = None):
    """hidden + act(conv(hidden)) with same padding; see the module docstring."""
    check_pos_conv_inputs(hidden, weight, bias, groups)
    return pos_conv_op(hidden, weight, bias, groups=groups, activation=activation, backend=backend)
