"""Masked bidirectional attention.

Shapes: q, k, v [B, S, H, D] (any strides); key_padding_mask bool [B, S], True = real frame;
output [B, S, H, D]. Rows whose sequence has no real frame return zeros.

File order: torch reference -> (Triton kernels, launchers, autograd.Function, torch.library op:
added by the Triton backend) -> backends -> functional entry point.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..dispatch import Op

MAX_HEAD_DIM = 256


def attention_reference(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None,
                        upcast=False, dropout_mask=None):
    """Plain softmax(QK^T * scale + mask) V. ``upcast`` computes in fp64 (tests' ground truth).
    ``dropout_mask`` [B, H, S, S] bool (True = keep) replaces random dropout when given."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no real key -> zeros
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out if upcast else out.to(dtype)


def check_attention_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    """Raise a clear error for anything no backend should be asked to compute."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be floating point, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("attention: key_padding_mask must be a bool tensor (True = real frame), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (q.shape[0], q.shape[1]):
            raise ValueError(f"attention: key_padding_mask must have shape [batch, seq] = "
                             f"{(q.shape[0], q.shape[1])}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"attention: softmax_scale must be positive, got {softmax_scale}")


attention_op = Op("attention")


def _torch_check(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None):
    return None  # runs everything that passed check_attention_inputs


@attention_op.register("torch", check=_torch_check)
def attention_torch(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None):
    """torch SDPA with a boolean key-padding mask; fully padded sequences give zeros."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    mask = None
    if key_padding_mask is not None:
        empty = ~key_padding_mask.any(dim=1)  # sequences with no real frame
        # let empty rows attend to everything (finite), then zero them below
        mask = (key_padding_mask | empty[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p,
                                         scale=softmax_scale).transpose(1, 2)
    if key_padding_mask is not None:
        out = out * (~empty).to(out.dtype)[:, None, None, None]
    return out


def attention(q, k, v, key_padding_mask: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0,
              softmax_scale: Optional[float] = None, backend: Optional[str] = None):
    """Masked bidirectional attention; see the module docstring for shapes."""
    check_attention_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    return attention_op(q, k, v, key_padding_mask, dropout_p=dropout_p, softmax_scale=softmax_scale,
                        backend=backend)
