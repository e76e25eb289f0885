"""Attention of sequences stored back to back (the model's packed real frames).

Shapes: q, k, v [N, H, D] rows (any strides; views of one fused projection), ``lengths`` host ints
summing to N (sequence b owns the next lengths[b] rows; zeros allowed); output [N, H, D]. Every row
is real, so nothing is padded, masked or scattered: the padded-batch op (``attention.py``) on
[B, S, H, D] plus a key-padding mask computes the same values on real rows, at the cost of copying
the packed rows into a zeroed [B, S, ...] buffer and back.

A variant of ``attention`` with no kernels of its own. Backends: "triton", attention's kernels with
PACKED=True (sequence b's rows start at seq_start_ptr[b]; its length is the loop bound; dropout
draws the same (batch*head, query, key) counters as the padded op with S = max(lengths)); "torch",
SDPA per sequence on its rows.

File order: contract (inputs, checks) -> launch tables -> torch.library ops + autograd -> backends
-> functional entry point.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Optional, Sequence

import torch

from ..dispatch import Op
from ..padding import host_to_device, sequence_starts
from .attention import (FEATURES, SPAN, TRITON_CAPABILITIES, AttentionCall, attn_bwd, attn_fwd, check_dropout_and_scale,
                        check_qkv, draw_dropout_seed, sdpa_unmasked, triton_attention)


@dataclasses.dataclass(frozen=True)
class PackedAttentionInputs(AttentionCall):
    q: torch.Tensor  # [N, H, D]
    k: torch.Tensor
    v: torch.Tensor
    lengths: tuple  # host ints summing to N
    dropout_p: float = 0.0
    softmax_scale: Optional[float] = None

    @property
    def tensors(self):
        return self.q, self.k, self.v

    @property
    def sizes(self):
        longest = max(self.lengths, default=0)
        return {"head_dim": self.q.shape[-1], "batch*heads (a grid axis)": len(self.lengths) * self.q.shape[1],
                "seq": longest, SPAN: self.sequence_span(longest)}


def check_packed_inputs(q, k, v, lengths, dropout_p, softmax_scale) -> list:
    """The lengths as a list of ints, after checking every argument."""
    check_qkv(q, k, v, ("rows", "heads", "head_dim"), "attention_packed")
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1:
            raise ValueError(f"attention_packed: lengths must be a sequence of ints, got a tensor of shape "
                             f"{tuple(lengths.shape)}")
        if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
            raise TypeError(f"attention_packed: lengths must be integers, got a {lengths.dtype} tensor")
        if lengths.device.type == "meta":
            raise ValueError("attention_packed: lengths on meta hold no values: give host ints")
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or any(isinstance(n, bool) for n in lengths):
        raise TypeError(f"attention_packed: lengths must be integers, got {lengths!r}")
    try:
        lengths = [operator.index(n) for n in lengths]
    except TypeError:
        raise TypeError(f"attention_packed: lengths must be integers, got {list(lengths)}") from None
    if sum(lengths) != q.shape[0] or any(n < 0 for n in lengths):
        raise ValueError(f"attention_packed: lengths {lengths} must be >= 0 and sum to the {q.shape[0]} rows")
    check_dropout_and_scale(dropout_p, softmax_scale, "attention_packed")
    return lengths


@functools.lru_cache(maxsize=16)
def _sequence_table(lengths: tuple, device: torch.device):
    """(starts, lengths) as [B] int32 on ``device``, copied once per distinct lengths (every layer
    of a forward reuses them) and without a host sync."""
    table = host_to_device(torch.tensor(sequence_starts(lengths) + list(lengths), dtype=torch.int32), device)
    return table[:len(lengths)], table[len(lengths):]


@torch.library.custom_op("unispeech_kernels::attention_packed_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, int[] lengths, float dropout_p, float softmax_scale) "
                                "-> (Tensor, Tensor, Tensor)")
def attention_packed_fwd_op(q, k, v, lengths, dropout_p, softmax_scale):
    """Triton forward on packed rows: (out [N, H, D], lse [B, H, max_len], seed)."""
    starts, lens = _sequence_table(tuple(lengths), q.device)
    seed = (draw_dropout_seed(q.device) if dropout_p > 0.0
            else torch.zeros(1, dtype=torch.int64, device=q.device))
    out, lse = attn_fwd(q, k, v, None, lens, seed, dropout_p, softmax_scale, seq_start=starts,
                        max_len=max(lengths))
    return out, lse, seed


@attention_packed_fwd_op.register_fake
def _(q, k, v, lengths, dropout_p, softmax_scale):
    return (q.new_empty(q.shape), q.new_empty((len(lengths), q.shape[1], max(lengths)), dtype=torch.float32),
            q.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("unispeech_kernels::attention_packed_bwd", mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor seed, "
                                "int[] lengths, float dropout_p, float softmax_scale) -> (Tensor, Tensor, Tensor)")
def attention_packed_bwd_op(dout, q, k, v, out, lse, seed, lengths, dropout_p, softmax_scale):
    """Triton backward on packed rows: (dq, dk, dv), each [N, H, D]."""
    starts, lens = _sequence_table(tuple(lengths), q.device)
    return attn_bwd(dout, q, k, v, out, lse, seed, None, lens, dropout_p, softmax_scale, seq_start=starts)


@attention_packed_bwd_op.register_fake
def _(dout, q, k, v, out, lse, seed, lengths, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lengths, dropout_p, softmax_scale = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.lengths, ctx.dropout_p, ctx.softmax_scale = lengths, dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, dout, _dlse, _dseed):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = attention_packed_bwd_op(dout, q, k, v, out, lse, seed, ctx.lengths, ctx.dropout_p,
                                         ctx.softmax_scale)
    return dq, dk, dv, None, None, None


attention_packed_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# a variant of "attention": UNISPEECH_KERNELS_BACKEND=attention=... switches both
attention_packed_op = Op("attention_packed", features=FEATURES, env_alias="attention")


@attention_packed_op.backend("torch", features=tuple(FEATURES))
def attention_packed_torch(inputs: PackedAttentionInputs):
    """SDPA without a mask (its fast path): one batched call when every length is the same (the rows
    are then a [B, n, H, D] view), else one call per sequence."""
    q, k, v = inputs.tensors
    lengths, dropout_p, softmax_scale = list(inputs.lengths), inputs.dropout_p, inputs.softmax_scale
    if len(set(lengths)) == 1 and lengths[0] > 0:
        shape = (len(lengths), lengths[0], *q.shape[1:])
        return sdpa_unmasked(*(t.view(shape) for t in (q, k, v)), dropout_p, softmax_scale).reshape(q.shape)
    parts = [sdpa_unmasked(*(x[None] for x in t), dropout_p, softmax_scale)[0] if n else t[0]
             for n, *t in zip(lengths, q.split(lengths), k.split(lengths), v.split(lengths))]
    return torch.cat(parts) if parts else q.clone()


@attention_packed_op.backend("triton", **TRITON_CAPABILITIES)
def attention_packed_triton(inputs: PackedAttentionInputs):
    """The flash-style Triton kernels on packed rows."""
    if torch.compiler.is_compiling():
        return attention_packed_fwd_op(inputs.q, inputs.k, inputs.v, list(inputs.lengths), float(inputs.dropout_p),
                                       float(inputs.scale))[0]
    starts, lens = _sequence_table(inputs.lengths, inputs.q.device)
    return triton_attention(inputs, None, lens, starts, max(inputs.lengths))


def attention_packed(q, k, v, lengths: Sequence[int], *, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, backend: Optional[str] = None, fallback: bool = False):
    """Bidirectional attention within each of the sequences stored back to back in q, k, v [N, H, D];
    ``lengths`` their host lengths (sum N). Returns [N, H, D]; differentiable in q, k, v. Under
    torch.compile the lengths are constants of the graph (a new list recompiles); the model layer
    packs only in eager mode. ``backend`` / ``fallback``: as for ``attention``."""
    lengths = check_packed_inputs(q, k, v, lengths, dropout_p, softmax_scale)
    inputs = PackedAttentionInputs(q, k, v, tuple(lengths), dropout_p, softmax_scale)
    return attention_packed_op(inputs, backend, fallback)


@attention_packed_op.example
def _example(device, dtype):
    """UniSpeech-base: utterances of 499 and 249 frames packed, 12 heads of 64."""
    q, k, v = (torch.empty(748, 12, 64, device=device, dtype=dtype) for _ in range(3))
    return PackedAttentionInputs(q, k, v, (499, 249))
