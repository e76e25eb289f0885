"""Masked bidirectional attention with WavLM's gated relative-position bias.

Shapes: q, k, v [B, S, H, D] (any strides); key_padding_mask bool [B, S], True = real frame;
``RelativePositionBias``: table [num_buckets, H] (transformers' ``rel_attn_embed.weight``), gate
[B, S, H] or None (1); output [B, S, H, D]. Scores:
    q_i . k_j * scale + gate[b, i, h] * table[bucket(j - i), h]
with bucket() WavLM's (T5-style, bidirectional): half of the buckets per direction, exact below
num_buckets // 4, logarithmic up to max_distance, the last bucket beyond. Rows whose sequence has
no real frame return zeros; padded query rows return any finite value (the torch backend: zeros).

The bias never exists as [B, H, S, S] (the torch backend makes [H, 256, n] pieces of it). The
buckets are computed once per call with torch's own fp32 arithmetic (``relative_position_bucket``,
the formula transformers uses) and folded into a per-head table over distances
(``distance_table``, [H, 2, L]: bias of key-before-or-at / key-after distance d < L, L =
min(S, max_distance + 1), every larger distance sharing the last bucket). A kernel then needs one
gather per score from a few KB per head, and its buckets are bit for bit transformers', which an
in-kernel fp32 log would not give: at the default 320 buckets / 800 distance, distance 713 lies
2.4 ulps below a bucket boundary.

Backends: "torch", the bias of one sequence and 256 queries at a time (a float mask) into SDPA, on
the real frames (audio's prefix masks) or with the key-padding mask folded in; autograd gives every
gradient.
"triton": attention's own flash-style forward and deterministic backward kernels with their
HAS_BIAS path (``attention_kernels.py``, helpers in ``rel_pos_attention_kernels.py``), the bias
gathered per score; the backward gives dq, dk, dv, d(gate) (a row sum in the dQ kernel) and
d(table) (per-program diagonal sums of dS * gate, summed per bucket on the host: no atomics);
extra memory O(B * H * S * (BLOCK_N + 2 S / BLOCK_M)) fp32 in the backward only, no [B, H, S, S]
(B 8, H 16, S 1500: 120 MB, against 1.15 GB of an fp32 bias). Opt-in (``auto=False``) until a GPU
run shows it faster than the torch backend. Padded query rows are zeros, dropout as attention's
(the same Philox stream).

File order: torch reference -> contract (inputs, checks) -> launchers -> torch.library ops + autograd
-> backends -> functional entry point -> ``aot_specs``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..dispatch import Op
from ..padding import prefix_lengths
from .attention import (_AOT_SEQ, SPAN, TRITON_CAPABILITIES, AttentionCall, _aot_spec, _block_d, attn_bwd,
                        attn_fwd, check_attention_inputs, fake_forward, forward_seed, mask_args)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """WavLM's bucket of each relative position (key - query), int64, computed in fp32 as
    transformers does: keys after the query use the upper half of the buckets."""
    half = num_buckets // 2
    max_exact = half // 2
    distance = relative_position.abs()
    scaled = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    logarithmic = (max_exact + scaled).to(torch.long).clamp(max=half - 1)
    return (relative_position > 0).long() * half + torch.where(distance < max_exact, distance, logarithmic)


def bias_reference(table, seq: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """[H, S, S] ungated bias table[bucket(j - i), h] (transformers' ``compute_bias``)."""
    pos = torch.arange(seq, device=table.device)
    return table[relative_position_bucket(pos[None, :] - pos[:, None], num_buckets, max_distance)].permute(2, 0, 1)


def rel_pos_attention_reference(q, k, v, table, gate=None, key_padding_mask=None, *, num_buckets: int,
                                max_distance: int, dropout_p=0.0, softmax_scale=None, upcast=False, dropout_mask=None):
    """softmax(QK^T * scale + gate * bias + mask) V from the formula; ``upcast`` computes in fp64.
    ``dropout_mask`` [B, H, S, S] bool (True = keep) replaces random dropout when given."""
    dtype = q.dtype
    if upcast:
        q, k, v, table = q.double(), k.double(), v.double(), table.double()
        gate = gate.double() if gate is not None else None
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    bias = bias_reference(table.to(q.dtype), q.shape[1], num_buckets, max_distance)[None]  # [1, H, S, S]
    if gate is not None:
        bias = bias * gate.to(q.dtype).permute(0, 2, 1)[..., None]  # gate [B, S, H] -> [B, H, S, 1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # rows with no real key -> zeros
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out if upcast else out.to(dtype)


def distance_table(table, num_buckets: int, max_distance: int, seq: int) -> torch.Tensor:
    """[H, 2, L] bias by distance d < L = min(seq, max_distance + 1): [:, 0, d] of key j = i - d,
    [:, 1, d] of j = i + d (d = 0 lies in [:, 0]); distances >= L read L - 1 (the last bucket)."""
    distance = torch.arange(max(1, min(seq, max_distance + 1)), device=table.device)
    buckets = relative_position_bucket(torch.stack([-distance, distance]), num_buckets, max_distance)  # [2, L]
    return table.t()[:, buckets]


# ------------------------------------------------------------------------------------------ contract

@dataclasses.dataclass(frozen=True)
class RelativePositionBias:
    """WavLM's relative-position bias of one layer: the shared ``table`` [num_buckets, H] and this
    layer's ``gate`` [B, S, H] (None: ungated, as a gate of ones)."""
    table: torch.Tensor
    num_buckets: int = 320
    max_distance: int = 800
    gate: Optional[torch.Tensor] = None

    def gated(self, gate: Optional[torch.Tensor]) -> "RelativePositionBias":
        return dataclasses.replace(self, gate=gate)


def check_rel_pos_inputs(q, k, v, rel_pos, key_padding_mask, dropout_p, softmax_scale):
    """Raise a clear error for anything no backend should be asked to compute."""
    check_attention_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    if not isinstance(rel_pos, RelativePositionBias):
        raise TypeError(f"rel_pos_attention: rel_pos must be a RelativePositionBias, got {type(rel_pos).__name__}")
    B, S, H, _ = q.shape
    nb, md, table, gate = rel_pos.num_buckets, rel_pos.max_distance, rel_pos.table, rel_pos.gate
    if not isinstance(nb, int) or nb < 4 or nb % 2:
        raise ValueError(f"rel_pos_attention: num_buckets must be an even integer >= 4 (half per direction, "
                         f"an exact range of num_buckets // 4 >= 1), got {nb!r}")
    if not isinstance(md, int) or md <= nb // 4:
        raise ValueError(f"rel_pos_attention: max_distance must be an integer above the exact range "
                         f"num_buckets // 4 = {nb // 4}, got {md!r}")
    for name, t, shape in (("table", table, (nb, H)), ("gate", gate, (B, S, H))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"rel_pos_attention: {name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            what = "[num_buckets, heads]" if name == "table" else "[batch, seq, heads]"
            raise ValueError(f"rel_pos_attention: {name} must be {what} = {shape}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"rel_pos_attention: {name} on {t.device}, q on {q.device}")


@dataclasses.dataclass(frozen=True)
class RelPosAttentionInputs(AttentionCall):
    q: torch.Tensor  # [B, S, H, D]
    k: torch.Tensor
    v: torch.Tensor
    rel_pos: RelativePositionBias
    key_padding_mask: Optional[torch.Tensor] = None  # bool [B, S], True = real frame
    dropout_p: float = 0.0
    softmax_scale: Optional[float] = None  # None: 1 / sqrt(D)

    @property
    def tensors(self):
        return self.q, self.k, self.v, self.rel_pos.table, self.rel_pos.gate, self.key_padding_mask

    @property
    def float_tensors(self):
        return self.q, self.k, self.v

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.tensors[:5])

    @property
    def sizes(self):
        B, S, H, D = self.q.shape
        return {"head_dim": D, "batch*heads (a grid axis)": B * H, "seq": S, SPAN: self.sequence_span(S)}


FEATURES = {"dropout": "has no dropout", "training": "has no backward"}


# ----------------------------------------------------------------------------------------- launchers

def _bias_args(table, gate, num_buckets, max_distance, batch, seq):
    """The kernels' bias: contiguous fp32 table by distance [H, 2, L] and gate [B, S, H] (ones without one)."""
    by_distance = distance_table(table.detach().float(), num_buckets, max_distance, seq).contiguous()
    if gate is None:
        return by_distance, torch.ones((batch, seq, table.shape[1]), dtype=torch.float32, device=table.device)
    return by_distance, gate.detach().float().contiguous()


def table_grad(ddiag, heads: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """[num_buckets, H] d(table) from the dQ kernel's diagonal sums: rows summed, then each
    relative position's sum added to its bucket (a one-hot product: deterministic)."""
    S = ddiag.shape[-1] // 2
    per_position = ddiag.view(-1, heads, ddiag.shape[1], 2 * S).sum((0, 2))[:, :2 * S - 1]  # [H, 2S - 1]
    rel = torch.arange(1 - S, S, device=ddiag.device)
    one_hot = F.one_hot(relative_position_bucket(rel, num_buckets, max_distance), num_buckets).to(per_position.dtype)
    return (per_position @ one_hot).t()


_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor table, Tensor? gate, Tensor? key_padding_mask, int num_buckets, "
               "int max_distance, float dropout_p, float softmax_scale) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("unispeech_kernels::rel_pos_attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def rel_pos_attention_fwd_op(q, k, v, table, gate, key_padding_mask, num_buckets, max_distance, dropout_p,
                             softmax_scale):
    """Triton forward as a torch.library op: (out, lse, seed)."""
    seed = forward_seed(dropout_p, q.device)
    bias = _bias_args(table, gate, num_buckets, max_distance, *q.shape[:2])
    out, lse = attn_fwd(q, k, v, *mask_args(key_padding_mask), seed, dropout_p, softmax_scale, bias=bias)
    return out, lse, seed


@rel_pos_attention_fwd_op.register_fake
def _(q, k, v, table, gate, key_padding_mask, num_buckets, max_distance, dropout_p, softmax_scale):
    return fake_forward(q)


@torch.library.custom_op("unispeech_kernels::rel_pos_attention_bwd", mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor seed, "
                                "Tensor table, Tensor? gate, Tensor? key_padding_mask, int num_buckets, "
                                "int max_distance, float dropout_p, float softmax_scale) "
                                "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def rel_pos_attention_bwd_op(dout, q, k, v, out, lse, seed, table, gate, key_padding_mask, num_buckets,
                             max_distance, dropout_p, softmax_scale):
    """Triton backward as a torch.library op: (dq, dk, dv, d table, d gate (empty without a gate))."""
    bias = _bias_args(table, gate, num_buckets, max_distance, *q.shape[:2])
    dq, dk, dv, ddiag, dgate = attn_bwd(dout, q, k, v, out, lse, seed, *mask_args(key_padding_mask), dropout_p,
                                        softmax_scale, bias=bias)
    dtable = table_grad(ddiag, q.shape[2], num_buckets, max_distance).to(table.dtype)
    return dq, dk, dv, dtable, (dgate.to(gate.dtype) if gate is not None else table.new_empty(0))


@rel_pos_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, seed, table, gate, key_padding_mask, num_buckets, max_distance, dropout_p,
      softmax_scale):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), table.new_empty(table.shape),
            gate.new_empty(gate.shape) if gate is not None else table.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, table, gate, key_padding_mask, num_buckets, max_distance, dropout_p, softmax_scale = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed, table, gate, key_padding_mask)
    ctx.settings = (num_buckets, max_distance, dropout_p, softmax_scale)
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, dout, _dlse, _dseed):
    q, k, v, out, lse, seed, table, gate, key_padding_mask = ctx.saved_tensors
    dq, dk, dv, dtable, dgate = rel_pos_attention_bwd_op(dout, q, k, v, out, lse, seed, table, gate,
                                                         key_padding_mask, *ctx.settings)
    return dq, dk, dv, dtable, (dgate if gate is not None else None), None, None, None, None, None


rel_pos_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ backends

rel_pos_attention_op = Op("rel_pos_attention", features=FEATURES)


QUERY_ROWS = 256  # queries per SDPA call of the torch backend: its bias is [H, 256, n], not [H, n, n]


def _rows_bias(by_distance, gate, first: int, rows: int, keys: int, dtype) -> torch.Tensor:
    """[H, rows, keys] gated bias of queries first.. of one sequence; ``gate`` [rows, H] or None."""
    rel = torch.arange(keys, device=by_distance.device)[None, :] - torch.arange(
        first, first + rows, device=by_distance.device)[:, None]  # key - query
    index = (rel > 0).long() * by_distance.shape[2] + rel.abs().clamp(max=by_distance.shape[2] - 1)
    bias = by_distance.flatten(1)[:, index].to(dtype)
    return bias if gate is None else bias * gate.t().to(dtype)[:, :, None]


@rel_pos_attention_op.backend("torch", features=tuple(FEATURES))
def rel_pos_attention_torch(inputs: RelPosAttentionInputs):
    """SDPA with the gated bias as a float mask, one sequence and ``QUERY_ROWS`` queries at a time
    (softmax rows are independent: the bias is never [H, n, n], let alone [B, H, S, S]); a prefix mask
    (audio padding) runs each sequence on its real frames (padded query rows are zero), any other
    mask is folded into the bias as -inf on padded keys. Fully padded sequences give zeros."""
    q, k, v, table, gate, key_padding_mask = inputs.tensors
    B, S = q.shape[:2]
    rel_pos, dropout_p, scale = inputs.rel_pos, inputs.dropout_p, inputs.softmax_scale
    by_distance = distance_table(table, rel_pos.num_buckets, rel_pos.max_distance, S)
    lengths = [S] * B
    if key_padding_mask is not None:
        lengths = None if torch.compiler.is_compiling() else prefix_lengths(key_padding_mask)  # one host sync
    outs = []
    for b in range(B):
        n = lengths[b] if lengths is not None else S
        if n == 0:
            outs.append(torch.zeros_like(q[b]))
            continue
        kb, vb = (t[b, :n].transpose(0, 1)[None] for t in (k, v))  # [1, H, n, D]
        if lengths is None:  # any mask: padded keys to -inf, except in a sequence with no real key (zeroed below)
            padded_keys = ~(key_padding_mask[b] | ~key_padding_mask[b].any())
        chunks = []
        for first in range(0, n, QUERY_ROWS):
            rows = min(QUERY_ROWS, n - first)
            bias = _rows_bias(by_distance, gate[b, first:first + rows] if gate is not None else None, first, rows, n,
                              q.dtype)
            if lengths is None:
                bias = bias.masked_fill(padded_keys[None, None, :], float("-inf"))
            qb = q[b, first:first + rows].transpose(0, 1)[None]  # [1, H, rows, D]
            chunks.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias[None], dropout_p=dropout_p,
                                                         scale=scale)[0].transpose(0, 1))  # [rows, H, D]
        out = torch.cat(chunks)
        if lengths is None:
            out = out * key_padding_mask[b].any().to(out.dtype)
        outs.append(F.pad(out, (0, 0, 0, 0, 0, S - n)))
    return torch.stack(outs)


@rel_pos_attention_op.backend("triton", **TRITON_CAPABILITIES, auto=False)
def rel_pos_attention_triton(inputs: RelPosAttentionInputs):
    """Flash-style Triton kernels with the bias made per score; padded query rows return zeros."""
    rel_pos = inputs.rel_pos
    return rel_pos_attention_fwd_op(inputs.q, inputs.k, inputs.v, rel_pos.table, rel_pos.gate,
                                    inputs.key_padding_mask, rel_pos.num_buckets, rel_pos.max_distance,
                                    float(inputs.dropout_p), float(inputs.scale))[0]


def rel_pos_attention(q, k, v, rel_pos: RelativePositionBias, key_padding_mask: Optional[torch.Tensor] = None, *,
                      dropout_p: float = 0.0, softmax_scale: Optional[float] = None, backend: Optional[str] = None,
                      fallback: bool = False):
    """Masked bidirectional attention with WavLM's gated relative-position bias ``rel_pos``; see the
    module docstring for shapes. ``backend`` / ``fallback`` as for ``attention``."""
    check_rel_pos_inputs(q, k, v, rel_pos, key_padding_mask, dropout_p, softmax_scale)
    inputs = RelPosAttentionInputs(q, k, v, rel_pos, key_padding_mask, dropout_p, softmax_scale)
    return rel_pos_attention_op(inputs, backend, fallback)


@rel_pos_attention_op.example
def _example(device, dtype):
    """WavLM-base: 2 utterances of 499 frames (one half padded), 12 heads of 64, 320 buckets."""
    q, k, v = (torch.empty(2, 499, 12, 64, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(2, 499, dtype=torch.bool, device=device)
    mask[1, 250:] = False
    rel_pos = RelativePositionBias(torch.empty(320, 12, device=device), 320, 800,
                                   torch.empty(2, 499, 12, device=device))
    return RelPosAttentionInputs(q, k, v, rel_pos, mask)


# ---------------------------------------------------------------------------------------- aot specs

def aot_specs():
    """The HAS_BIAS kernels at WavLM's shapes (head_dim 64, bf16, a padded batch with a mask), with
    and without dropout: forward and dK/dV in every config an sm_90 device keeps after pruning at
    the bucketed length, dQ in its fixed tiles; for ahead-of-time compile checks."""
    from .._runtime import SM90_SHARED_MEMORY
    from . import attention_kernels as kern

    d, elem = 64, "bf16"
    specs = []
    tuned = (("fwd", kern._attn_fwd_kernel, kern.FWD_BIAS_CONFIGS, "BLOCK_M", 1, 1),
             ("bwd_dkdv", kern._attn_bwd_dkdv_kernel, kern.BWD_DKDV_CONFIGS, "BLOCK_N", 2, 2))
    t = kern.DQ_BIAS_TILES
    for dropout in (False, True):
        flags = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_MASK=True, PREFIX_MASK=False, PACKED=False,
                     HAS_DROPOUT=dropout, HAS_BIAS=True, UPCAST=False, DOT_PREC="tf32")
        for kname, fn, configs, resident, n_acc, n_score in tuned:
            for c in kern.prune_by_budget(configs, resident=resident, n_acc=n_acc, n_score=n_score,
                                          block_d=_block_d(d), elem_size=2, s_bucket=_AOT_SEQ,
                                          max_smem=SM90_SHARED_MEMORY, dropout=dropout, bias=True):
                tag = f"rel_pos_{kname}_{elem}_d{d}_m{c.kwargs['BLOCK_M']}_n{c.kwargs['BLOCK_N']}" \
                      f"_w{c.num_warps}_s{c.num_stages}" + "_dropout" * dropout
                specs.append(_aot_spec(tag, fn, elem, {**flags, **c.kwargs}, c.num_warps, c.num_stages, True))
        specs.append(_aot_spec(f"rel_pos_bwd_dq_{elem}_d{d}_m{t['BLOCK_M']}_n{t['BLOCK_N']}" + "_dropout" * dropout,
                               kern._attn_bwd_dq_kernel, elem,
                               {**flags, "BLOCK_M": t["BLOCK_M"], "BLOCK_N": t["BLOCK_N"]}, t["num_warps"],
                               t["num_stages"], True))
    return specs
