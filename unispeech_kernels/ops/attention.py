"""Masked bidirectional attention.

Shapes: q, k, v [B, S, H, D] (any strides); key_padding_mask bool [B, S], True = real frame;
output [B, S, H, D]. Rows whose sequence has no real frame return zeros.

Triton backend: a flash-style forward (online softmax in exp2, fp32 accumulation, log-sum-exp saved)
and a deterministic bidirectional backward (``attention_bwd.py``). Masks: any bool mask works; the
kernels load it per key block, and loop only up to ``kv_end`` = last real position + 1 (computed on
the device, no host sync), so for audio's prefix masks key blocks past a sequence's length are
skipped and query blocks past it exit early. With PACKED the same kernels read sequences stored back
to back in [N, H, D] rows (``attention_packed.py``). The Triton op defines padded query rows as zeros:
gradients through them are zero (the torch backend returns attention over real keys there; both
are within the contract "any finite value").
Dropout: a uniform per (batch*head, query, key), one Philox draw (four uniforms) per four consecutive
keys of a query, from a seed drawn on the device with torch's generator (``torch.manual_seed``
reproduces it), saved for the backward, which regenerates the mask.

File order: torch reference -> Triton kernels -> launchers -> torch.library ops + autograd ->
backends -> functional entry point -> ``aot_specs``.
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._runtime import interpret_upcast_bf16, triton_device_reason
from ..dispatch import Op
from ._triton_helpers import autotuned, launch_tuned
from .attention_bwd import (BWD_DKDV_CONFIGS, BWD_DQ_CONFIGS, INTERPRET_TILES, SM90_SMEM, _attn_bwd_dkdv_kernel,
                            _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel, _device_smem, _dropout_keep,
                            _dropout_mask_kernel, _head_dim_mask, _sequence_extent, attn_bwd, dot_precision,
                            prune_by_budget, strides)

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


def check_qkv(q, k, v, dims: tuple, op: str = "attention"):
    """q, k, v tensors of one floating dtype, shape and device, with the ``dims`` named."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(dims):
            raise ValueError(f"{op}: {name} must be [{', '.join(dims)}], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head_dim must be at least 1, got shape {tuple(q.shape)}")


MAX_SOFTMAX_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)  # kernels take scale * log2(e) as fp32


def check_dropout_and_scale(dropout_p, softmax_scale, op: str = "attention"):
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not 0 < softmax_scale <= MAX_SOFTMAX_SCALE:
        raise ValueError(f"{op}: softmax_scale must be positive and finite (at most {MAX_SOFTMAX_SCALE:.3g}), "
                         f"got {softmax_scale}")


def check_attention_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    """Raise a clear error for anything no backend should be asked to compute."""
    check_qkv(q, k, v, ("batch", "seq", "heads", "head_dim"))
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("attention: key_padding_mask must be a bool tensor (True = real frame), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (q.shape[0], q.shape[1]):
            raise ValueError(f"attention: key_padding_mask must have shape [batch, seq] = "
                             f"{(q.shape[0], q.shape[1])}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")
    check_dropout_and_scale(dropout_p, softmax_scale)



@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # [B, S, H, D] inputs, any strides
    Out,  # [B, S, H, D] contiguous out; padded query rows get zeros
    Lse,  # [B, H, S] fp32 out: log2-sum-exp2 of the scaled scores per row, +inf on padded rows
    Mask,  # [B, S] uint8 key-padding mask (1 = real); unused unless HAS_MASK
    KvEnd,  # [B] int32 last real position + 1 (the loop bound; packed: the length); unused unless HAS_MASK or PACKED
    SeqStart,  # [B] int32 packed row where sequence b starts; unused unless PACKED
    Seed,  # [1] int64 dropout seed on the device; unused unless HAS_DROPOUT
    stride_qb, stride_qs, stride_qh, stride_qd,  # strides of Q (packed: batch stride 0)
    stride_kb, stride_ks, stride_kh, stride_kd,  # strides of K
    stride_vb, stride_vs, stride_vh, stride_vd,  # strides of V
    stride_ob, stride_os, stride_oh, stride_od,  # strides of Out
    stride_mb, stride_ms,  # strides of Mask
    H, S,  # heads, sequence length (runtime: no recompile per length)
    qk_scale,  # softmax_scale * log2(e)
    dropout_p,  # drop probability
    S_BUCKET,  # next_power_of_2(S): autotune key only
    HEAD_DIM: tl.constexpr,  # real head_dim
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_DIM), >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_MASK: tl.constexpr,  # a key-padding mask is given
    PACKED: tl.constexpr,  # sequences back to back in [N, H, D] rows (SeqStart, lengths in KvEnd)
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    DOT_PREC: tl.constexpr,  # tl.dot input_precision ("ieee" keeps fp32 inputs exact)
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_end, n_rows, row0 = _sequence_extent(KvEnd, SeqStart, b, S, HAS_MASK, PACKED)
    o_rows = Out + b * stride_ob + h * stride_oh + row0 * stride_os  # row 0 of this sequence and head
    lse_ptrs = Lse + bh.to(tl.int64) * S + rows
    if start_m >= kv_end:  # the whole query block is padding: zeros, no work
        o_ptrs = o_rows + rows[:, None] * stride_os + offs_d[None, :] * stride_od
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=Out.dtype.element_ty), mask=(rows[:, None] < n_rows) & d_ok)
        tl.store(lse_ptrs, tl.full([BLOCK_M], float("inf"), tl.float32), mask=rows < S)
        return
    row_ok = rows < kv_end
    q_rows = Q + b * stride_qb + h * stride_qh + row0 * stride_qs  # row 0 of this sequence and head
    q = tl.load(q_rows + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_MASK:
        row_ok = row_ok & (tl.load(Mask + b * stride_mb + rows * stride_ms, mask=row_ok, other=0) != 0)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        keep_scale = 1.0 / (1.0 - dropout_p)
    k_base = K + b * stride_kb + h * stride_kh + row0 * stride_ks + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + row0 * stride_vs + offs_d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):  # key blocks past kv_end are skipped
        cols = start_n + offs_n
        col_ok = cols < kv_end
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=col_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if HAS_MASK:
            col_ok = col_ok & (tl.load(Mask + b * stride_mb + cols * stride_ms, mask=col_ok, other=0) != 0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # unscaled: the scale is folded in below
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # running max in the scaled log2 domain
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no real key yet: no NaN
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(qk * qk_scale - m_ref[:, None])  # one FMA per score, not a multiply and a subtract
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, S, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p * keep_scale, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=col_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    row_ok = row_ok & (l_i > 0.0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    o_ptrs = o_rows + rows[:, None] * stride_os + offs_d[None, :] * stride_od  # after the loop: not live in it
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(rows[:, None] < n_rows) & d_ok)
    tl.store(lse_ptrs, tl.where(row_ok, m_i + tl.math.log2(l_safe), float("inf")), mask=rows < S)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): H100-oriented, pruned per head_dim / device / length.
# (128, 128, 8, 3): no spills in any variant on triton 3.6 and 3.9 (packed rows ~180 registers on
# sm_90a, a padded batch with a mask 255); the budget prunes it under dropout. Not kept (AOT,
# head_dim 64 bf16): (128, 128, 8, 2) and (64, 64, 4, 3) spill on sm_80 in some variants.
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 4), (64, 32, 4, 2),
                         (32, 32, 4, 2)]
]


def _fwd_prune(configs, named_args, **kwargs):
    q = named_args["Q"]
    return prune_by_budget(configs, resident="BLOCK_M", n_acc=1, n_score=1, block_d=kwargs["BLOCK_D"],
                           elem_size=q.element_size(), s_bucket=named_args["S_BUCKET"],
                           max_smem=_device_smem(q.device.index), dropout=kwargs["HAS_DROPOUT"])


_fwd_tuned = autotuned("attention_fwd", FWD_CONFIGS, ["S_BUCKET", "HEAD_DIM", "HAS_MASK", "PACKED", "HAS_DROPOUT"],
                       _fwd_prune)(_attn_fwd_kernel)


def prefix_lengths(mask: torch.Tensor) -> Optional[List[int]]:
    """Host lengths of a bool [B, S] mask if every row is a prefix of real frames (audio padding),
    else None; one host sync."""
    lengths = mask.sum(1)
    prefix = (mask == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all()
    *host, prefix = torch.cat([lengths, prefix[None].long()]).tolist()
    return host if prefix else None


def kv_end_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B] int32: last real position + 1 of each row of a bool [B, S] mask (0 for no real frame)."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int32)
    return torch.where(mask, pos, 0).amax(dim=1).to(torch.int32)


def draw_dropout_seed(device) -> torch.Tensor:
    """[1] int64 seed from torch's generator of ``device`` (what the op uses; tests redraw it)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def attn_fwd(q, k, v, mask_u8, kv_end, seed, dropout_p: float, softmax_scale: float, seq_start=None,
             max_len: int = 0):
    """Launch the forward; returns out [B, S, H, D] and lse [B, H, S] (log2 domain). Packed
    (``seq_start`` [B] int32 first rows, ``kv_end`` the lengths): q, k, v and out are [N, H, D] rows
    and S = ``max_len``."""
    packed = seq_start is not None
    (B, S), (H, D) = ((seq_start.numel(), max_len) if packed else q.shape[:2]), q.shape[-2:]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    has_mask = mask_u8 is not None
    args = (q, k, v, out, lse, mask_u8 if has_mask else lse, kv_end if kv_end is not None else lse,
            seq_start if packed else lse, seed,
            *strides(q), *strides(k), *strides(v), *strides(out),
            *(strides(mask_u8) if has_mask else (0, 0)),
            H, S, softmax_scale * 1.4426950408889634, float(dropout_p), triton.next_power_of_2(S))
    flags = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_MASK=has_mask, PACKED=packed,
                 HAS_DROPOUT=dropout_p > 0.0, UPCAST=interpret_upcast_bf16(q.dtype), DOT_PREC=dot_precision(q.dtype))
    launch_tuned(_fwd_tuned, lambda m: (triton.cdiv(S, m["BLOCK_M"]), B * H), *args, **flags,
                 interpret=INTERPRET_TILES)
    return out, lse


def _mask_args(key_padding_mask):
    if key_padding_mask is None:
        return None, None
    return key_padding_mask.view(torch.uint8), kv_end_from_mask(key_padding_mask)


@torch.library.custom_op("unispeech_kernels::attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float dropout_p, "
                                "float softmax_scale) -> (Tensor, Tensor, Tensor)")
def attention_fwd_op(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    """Triton forward as a torch.library op: (out, lse, seed)."""
    seed = (draw_dropout_seed(q.device) if dropout_p > 0.0
            else torch.zeros(1, dtype=torch.int64, device=q.device))
    out, lse = attn_fwd(q, k, v, *_mask_args(key_padding_mask), seed, dropout_p, softmax_scale)
    return out, lse, seed


@attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    B, S, H, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32),
            q.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("unispeech_kernels::attention_bwd", mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor seed, "
                                "Tensor? key_padding_mask, float dropout_p, float softmax_scale) "
                                "-> (Tensor, Tensor, Tensor)")
def attention_bwd_op(dout, q, k, v, out, lse, seed, key_padding_mask, dropout_p, softmax_scale):
    """Triton backward as a torch.library op: (dq, dk, dv)."""
    return attn_bwd(dout, q, k, v, out, lse, seed, *_mask_args(key_padding_mask), dropout_p, softmax_scale)


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, seed, key_padding_mask, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, dropout_p, softmax_scale = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed, key_padding_mask)
    ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, dout, _dlse, _dseed):
    q, k, v, out, lse, seed, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, seed, key_padding_mask, ctx.dropout_p,
                                  ctx.softmax_scale)
    return dq, dk, dv, None, None, None


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


attention_op = Op("attention")


def _torch_check(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None):
    return None  # runs everything that passed check_attention_inputs


def sdpa_unmasked(q, k, v, dropout_p, softmax_scale):
    """SDPA of unmasked sequences in the [B, S, H, D] layout (any strides) -> [B, S, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=softmax_scale).transpose(1, 2)


@attention_op.register("torch", check=_torch_check)
def attention_torch(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None):
    """torch SDPA. A prefix mask (audio padding) runs SDPA per sequence on its real frames, with no
    mask (SDPA's fast path, no padded work; padded query rows are zero); any other mask goes to
    SDPA as a boolean mask. Fully padded sequences give zeros."""
    if key_padding_mask is not None and not torch.compiler.is_compiling():
        lengths = prefix_lengths(key_padding_mask)  # one host sync
        if lengths is not None:
            out = torch.zeros_like(q)
            for b, n in enumerate(lengths):
                if n:
                    out[b:b + 1, :n] = sdpa_unmasked(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], dropout_p,
                                                     softmax_scale)
            return out
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


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_attention_reason(tensors, dtype, head_dim: int, batch_heads: int, seq: int) -> Optional[str]:
    """Why the Triton kernels cannot run (None if they can): device, dtype, head_dim, grid size."""
    reason = triton_device_reason(*tensors)
    if reason:
        return reason
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} not in {_TRITON_DTYPES}"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    if batch_heads > 65535:
        return f"batch*heads {batch_heads} > 65535 (grid axis limit)"
    if seq == 0:
        return "empty sequence axis"
    return None


def _triton_check(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None):
    B, S, H, D = q.shape
    return triton_attention_reason((q, k, v, key_padding_mask), q.dtype, D, B * H, S)


@attention_op.register("triton", check=_triton_check)
def attention_triton(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None):
    """Flash-style Triton kernels; padded query rows return zeros."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return attention_fwd_op(q, k, v, key_padding_mask, float(dropout_p), float(scale))[0]


def attention(q, k, v, key_padding_mask: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0,
              softmax_scale: Optional[float] = None, backend: Optional[str] = None):
    """Masked bidirectional attention; see the module docstring for shapes."""
    check_attention_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    return attention_op(q, k, v, key_padding_mask, dropout_p=dropout_p, softmax_scale=softmax_scale,
                        backend=backend)


# UniSpeech base and large both have head_dim 64; fp16 compiles to the same tiles as bf16
_AOT_DTYPES = {torch.bfloat16: "bf16"}
_AOT_HEAD_DIMS = (64,)
_AOT_SEQ = 1024  # bucketed length of UniSpeech's 10-20 s utterances (499-999 frames)
_POINTER_TYPES = {"Lse": "*fp32", "Delta": "*fp32", "Mask": "*u8", "Keep": "*u8", "KvEnd": "*i32", "SeqStart": "*i32",
                  "Seed": "*i64"}
_FLOAT_ARGS = ("qk_scale", "sm_scale", "dropout_p")
_INT_ARGS = ("H", "S", "S_BUCKET")


def _aot_signature(fn, elem: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTER_TYPES:
            sig[name] = _POINTER_TYPES[name]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in _INT_ARGS or name.startswith("stride_"):
            sig[name] = "i32"
        else:
            sig[name] = "*" + elem
    return sig


def _aot_spec(name, fn, elem, constexprs, num_warps, num_stages, mma):
    # the last dim is contiguous at real shapes: Triton specialises those strides to the constant 1
    constexprs = {**{a: 1 for a in fn.arg_names if a.startswith("stride_") and a.endswith("d")}, **constexprs}
    sig = _aot_signature(fn, elem, constexprs)
    # what the JIT's specialisation sees at model shapes (D 64/80/128, H 16): 16-aligned pointers and
    # strides divisible by 16. Without these hints loads compile unvectorised and unpipelined.
    divisible = [a for a in fn.arg_names
                 if sig[a].startswith("*") or (sig[a] == "i32" and (a.startswith("stride_") or a in ("H", "S_BUCKET")))]
    return {"name": name, "fn": fn, "signature": sig, "constexprs": constexprs, "divisible_by_16": divisible,
            "num_warps": num_warps, "num_stages": num_stages, "mma": mma}


def aot_specs():
    """Every kernel config shipped for UniSpeech shapes (B 8, H 16, D 64, bf16), as an sm_90 device
    keeps after pruning (padded with a mask and packed rows, with and without dropout), for
    ahead-of-time compile checks. Other head dims and fp16 are covered by the interpreter tests."""
    specs = []
    tuned = (("fwd", _attn_fwd_kernel, FWD_CONFIGS, "BLOCK_M", 1, 1),
             ("bwd_dkdv", _attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS, "BLOCK_N", 2, 2),
             ("bwd_dq", _attn_bwd_dq_kernel, BWD_DQ_CONFIGS, "BLOCK_M", 1, 2))
    for dtype, elem in _AOT_DTYPES.items():
        for d in _AOT_HEAD_DIMS:
            block_d = max(16, triton.next_power_of_2(d))
            for kname, fn, configs, resident, n_acc, n_score in tuned:
                for dropout in (False, True):
                    kept = prune_by_budget(configs, resident=resident, n_acc=n_acc, n_score=n_score,
                                           block_d=block_d, elem_size=torch.finfo(dtype).bits // 8, s_bucket=_AOT_SEQ,
                                           max_smem=SM90_SMEM, dropout=dropout)
                    # padded batches with a mask (transformers' models) and packed rows (ours)
                    for packed, c in itertools.product((False, True), kept):
                        flags = dict(HEAD_DIM=d, BLOCK_D=block_d, HAS_MASK=not packed, PACKED=packed,
                                     HAS_DROPOUT=dropout, UPCAST=False, DOT_PREC=dot_precision(dtype), **c.kwargs)
                        tag = f"attn_{kname}_{elem}_d{d}_m{c.kwargs['BLOCK_M']}_n{c.kwargs['BLOCK_N']}" \
                              f"_w{c.num_warps}_s{c.num_stages}" + "_dropout" * dropout + "_packed" * packed
                        specs.append(_aot_spec(tag, fn, elem, flags, c.num_warps, c.num_stages, True))
            for packed in (False, True):
                specs.append(_aot_spec(f"attn_bwd_preprocess_{elem}_d{d}" + "_packed" * packed,
                                       _attn_bwd_preprocess_kernel, elem,
                                       dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_D=block_d, PACKED=packed), 4, 1, False))
    specs.append(_aot_spec("attn_dropout_mask", _dropout_mask_kernel, "u8", dict(BLOCK=64), 4, 1, False))
    return specs
