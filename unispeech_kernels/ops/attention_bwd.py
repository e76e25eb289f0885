"""Backward of the Triton masked bidirectional attention (see ``attention.py``), and the dropout RNG
that forward and backward share.

Shapes: q, k, v, out, dout [B, S, H, D] (any strides); lse, delta [B, H, S] fp32; dq, dk, dv are new
contiguous [B, S, H, D] (PACKED: every tensor is [N, H, D] rows, see ``attention_packed.py``). ``lse``
is the forward's log2-sum-exp2 of the scaled scores per query row, +inf on rows that are padded
(their output is zero, so every gradient through them is zero).

Three deterministic kernels (no atomics): delta = rowsum(dout * out); dK/dV, one program per key
block looping over the query blocks of the sequence's real range; dQ, one program per query block
looping over the key blocks. P is recomputed from lse; dropout keep-masks are regenerated from the
same (seed, batch*head, query, key) counter as in the forward.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._runtime import interpret_upcast_bf16
from ._triton_helpers import launch_tuned


@triton.jit
def _dropout_keep(seed, bh, S, q_idx, k_idx, dropout_p):
    """Keep-mask (True = kept) for query indices ``q_idx`` and key indices ``k_idx`` (broadcastable
    int tensors) of batch*head ``bh``: one Philox draw per unique (bh, q, k), int64 counter."""
    offs = (bh.to(tl.int64) * S + q_idx) * S + k_idx
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _head_dim_mask(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[1, BLOCK_D] lanes holding a real head_dim entry; a constant when D is a power of two, so
    loads and stores stay vectorised."""
    if HEAD_DIM == BLOCK_D:
        ok = tl.full([1, BLOCK_D], 1, tl.int1)
    else:
        ok = offs_d[None, :] < HEAD_DIM
    return ok


@triton.jit
def _sequence_extent(KvEnd, SeqStart, b, S, HAS_MASK: tl.constexpr, PACKED: tl.constexpr):
    """(kv_end, n_rows, row0) of sequence ``b``: the loop bound over keys (last real position + 1),
    the rows it owns in the tensors (S padded, its length packed), and the row where it starts
    (0 padded; SeqStart[b] packed, where every batch stride is 0)."""
    if PACKED:
        kv_end = tl.load(KvEnd + b)
        n_rows = kv_end
        row0 = tl.load(SeqStart + b).to(tl.int64)
    else:
        if HAS_MASK:
            kv_end = tl.load(KvEnd + b)
        else:
            kv_end = S
        n_rows = S
        row0 = 0
    return kv_end, n_rows, row0


@triton.jit
def _dropout_mask_kernel(
    Keep,  # [B*H, S, S] uint8 out: 1 where the kernels keep the probability
    Seed,  # [1] int64 dropout seed (device)
    S,  # sequence length
    dropout_p,  # drop probability
    BLOCK: tl.constexpr,  # tile edge
):
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(tl.load(Seed), bh, S, rows[:, None], cols[None, :], dropout_p)
    ptrs = Keep + bh.to(tl.int64) * S * S + rows[:, None] * S + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(rows[:, None] < S) & (cols[None, :] < S))


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, seq: int, dropout_p: float):
    """Debug/test helper: the bool keep-mask [B, H, S, S] the kernels use for ``seed`` ([1] int64)."""
    keep = torch.empty((batch * heads, seq, seq), dtype=torch.uint8, device=seed.device)
    grid = (triton.cdiv(seq, 64), triton.cdiv(seq, 64), batch * heads)
    _dropout_mask_kernel[grid](keep, seed, seq, float(dropout_p), BLOCK=64)
    return keep.view(batch, heads, seq, seq).bool()


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DOut,  # [B, S, H, D] forward output and its gradient
    Delta,  # [B, H, S] fp32 out: rowsum(dout * out)
    KvEnd, SeqStart,  # [B] int32 lengths and first packed rows; unused unless PACKED
    stride_ob, stride_os, stride_oh, stride_od,  # strides of Out (packed: batch stride 0)
    stride_gb, stride_gs, stride_gh, stride_gd,  # strides of DOut
    H, S,  # heads, sequence length
    HEAD_DIM: tl.constexpr,  # real head_dim
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_DIM)
    PACKED: tl.constexpr,  # sequences back to back in [N, H, D] rows
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    _, n_rows, row0 = _sequence_extent(KvEnd, SeqStart, b, S, False, PACKED)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    o_rows = Out + b * stride_ob + h * stride_oh + row0 * stride_os  # row 0 of this sequence and head
    o = tl.load(o_rows + rows[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    g_rows = DOut + b * stride_gb + h * stride_gh + row0 * stride_gs  # row 0 of this sequence and head
    do = tl.load(g_rows + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * S + rows, tl.sum(o * do, axis=1), mask=rows < S)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut,  # [B, S, H, D] forward inputs and output gradient, any strides
    DK, DV,  # [B, S, H, D] contiguous out
    Lse, Delta,  # [B, H, S] fp32: forward log2-sum-exp2 (+inf on padded rows), rowsum(dout * out)
    Mask,  # [B, S] uint8 key-padding mask (1 = real); unused unless HAS_MASK
    KvEnd,  # [B] int32 last real position + 1 (packed: the length); unused unless HAS_MASK or PACKED
    SeqStart,  # [B] int32 packed row where sequence b starts; unused unless PACKED
    Seed,  # [1] int64 dropout seed; unused unless HAS_DROPOUT
    stride_qb, stride_qs, stride_qh, stride_qd,  # strides of Q (packed: batch stride 0)
    stride_kb, stride_ks, stride_kh, stride_kd,  # strides of K
    stride_vb, stride_vs, stride_vh, stride_vd,  # strides of V
    stride_gb, stride_gs, stride_gh, stride_gd,  # strides of DOut
    stride_xb, stride_xs, stride_xh, stride_xd,  # strides of DK and DV (same layout)
    stride_mb, stride_ms,  # strides of Mask
    H, S,  # heads, sequence length (runtime: no recompile per length)
    qk_scale,  # softmax_scale * log2(e)
    sm_scale,  # softmax_scale
    dropout_p,  # drop probability
    S_BUCKET,  # next_power_of_2(S): autotune key only
    HEAD_DIM: tl.constexpr,  # real head_dim
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_DIM), >= 16
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    HAS_MASK: tl.constexpr,  # a key-padding mask is given
    PACKED: tl.constexpr,  # sequences back to back in [N, H, D] rows (SeqStart, lengths in KvEnd)
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    DOT_PREC: tl.constexpr,  # tl.dot input_precision ("ieee" keeps fp32 inputs exact)
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_end, n_rows, row0 = _sequence_extent(KvEnd, SeqStart, b, S, HAS_MASK, PACKED)
    x_rows = b * stride_xb + h * stride_xh + row0 * stride_xs  # element offsets built at the stores
    store_ok = (offs_n[:, None] < n_rows) & d_ok
    if start_n >= kv_end:  # padded keys: zero gradient, no work
        x_off = x_rows + offs_n[:, None] * stride_xs + offs_d[None, :] * stride_xd
        zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=DK.dtype.element_ty)
        tl.store(DK + x_off, zero, mask=store_ok)
        tl.store(DV + x_off, zero, mask=store_ok)
        return
    load_ok = (offs_n[:, None] < kv_end) & d_ok
    k_rows = K + b * stride_kb + h * stride_kh + row0 * stride_ks  # row 0 of this sequence and head
    k = tl.load(k_rows + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=load_ok, other=0.0)
    v_rows = V + b * stride_vb + h * stride_vh + row0 * stride_vs  # row 0 of this sequence and head
    v = tl.load(v_rows + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=load_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        keep_scale = 1.0 / (1.0 - dropout_p)
    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_qs + offs_d[None, :] * stride_qd
    g_base = DOut + b * stride_gb + h * stride_gh + row0 * stride_gs + offs_d[None, :] * stride_gd
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, kv_end, BLOCK_M):  # query rows past kv_end are padded: skipped
        rows = start_m + offs_m
        row_ok = rows < kv_end
        q = tl.load(q_base + rows[:, None] * stride_qs, mask=row_ok[:, None] & d_ok, other=0.0)
        do = tl.load(g_base + rows[:, None] * stride_gs, mask=row_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(Lse + bh.to(tl.int64) * S + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        # padding keys get meaningless values here (inf possible), confined to their own dK/dV rows,
        # which the store drops (past n_rows) or zeroes (HAS_MASK): no per-score select in the loop
        p_t = tl.math.exp2(qk_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, S, rows[None, :], offs_n[:, None], dropout_p)
            pd_t = tl.where(keep, p_t * keep_scale, 0.0)
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            pd_t = p_t
        dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    if HAS_MASK:  # padded keys (past kv_end or masked) get zero gradients
        key_ok = offs_n < kv_end
        key_ok = key_ok & (tl.load(Mask + b * stride_mb + offs_n * stride_ms, mask=key_ok, other=0) != 0)
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    x_off = x_rows + offs_n[:, None] * stride_xs + offs_d[None, :] * stride_xd  # after the loop: not live in it
    tl.store(DK + x_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + x_off, dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOut,  # [B, S, H, D] forward inputs and output gradient, any strides
    DQ,  # [B, S, H, D] contiguous out
    Lse, Delta,  # [B, H, S] fp32: forward log2-sum-exp2 (+inf on padded rows), rowsum(dout * out)
    Mask,  # [B, S] uint8 key-padding mask (1 = real); unused unless HAS_MASK
    KvEnd,  # [B] int32 last real position + 1 (packed: the length); unused unless HAS_MASK or PACKED
    SeqStart,  # [B] int32 packed row where sequence b starts; unused unless PACKED
    Seed,  # [1] int64 dropout seed; unused unless HAS_DROPOUT
    stride_qb, stride_qs, stride_qh, stride_qd,  # strides of Q (packed: batch stride 0)
    stride_kb, stride_ks, stride_kh, stride_kd,  # strides of K
    stride_vb, stride_vs, stride_vh, stride_vd,  # strides of V
    stride_gb, stride_gs, stride_gh, stride_gd,  # strides of DOut
    stride_xb, stride_xs, stride_xh, stride_xd,  # strides of DQ
    stride_mb, stride_ms,  # strides of Mask
    H, S,  # heads, sequence length (runtime: no recompile per length)
    qk_scale,  # softmax_scale * log2(e)
    sm_scale,  # softmax_scale
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
    x_rows = b * stride_xb + h * stride_xh + row0 * stride_xs  # element offsets built at the stores
    store_ok = (rows[:, None] < n_rows) & d_ok
    if start_m >= kv_end:  # padded query rows: zero gradient, no work
        x_off = x_rows + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd
        tl.store(DQ + x_off, tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty), mask=store_ok)
        return
    row_ok = rows < kv_end
    q_rows = Q + b * stride_qb + h * stride_qh + row0 * stride_qs  # row 0 of this sequence and head
    q = tl.load(q_rows + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok, other=0.0)
    g_rows = DOut + b * stride_gb + h * stride_gh + row0 * stride_gs  # row 0 of this sequence and head
    do = tl.load(g_rows + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=row_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + bh.to(tl.int64) * S + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        keep_scale = 1.0 / (1.0 - dropout_p)
    k_base = K + b * stride_kb + h * stride_kh + row0 * stride_ks + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + row0 * stride_vs + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):  # key blocks past kv_end are skipped
        cols = start_n + offs_n
        col_ok = cols < kv_end
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=col_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=col_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_MASK:
            col_ok = col_ok & (tl.load(Mask + b * stride_mb + cols * stride_ms, mask=col_ok, other=0) != 0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.where(col_ok[None, :], tl.math.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, S, rows[:, None], cols[None, :], dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    x_off = x_rows + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd  # after the loop: not live in it
    tl.store(DQ + x_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=store_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages); dK/dV: BLOCK_N keys per program, dQ: BLOCK_M rows.
BWD_DKDV_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 8, 3),
                         (32, 64, 4, 2), (32, 32, 4, 2)]
]
BWD_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
]
INTERPRET_TILES = dict(BLOCK_M=16, BLOCK_N=16)  # under TRITON_INTERPRET (see ``launch_tuned``)
PREPROCESS_BLOCK_M = 64


SM90_SMEM = 232448  # bytes of shared memory per block on H100 (sm_90); used when no GPU is queried
# per-thread budget of resident fp32 tile values (see ``prune_by_budget``); set from ptxas on sm_80
# and sm_90 (aot_specs checks both): above it, 255 registers and spills.
MAX_FP32_PER_THREAD = 112
MMA_ROWS = 16  # rows of one tensor-core (mma.sync m16 / wgmma m64 per 4 warps) tile per warp


@functools.lru_cache(None)
def _device_smem(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def prune_by_budget(configs, *, resident: str, n_acc: int, n_score: int, block_d: int, elem_size: int,
                    s_bucket: int, max_smem: int, dropout: bool):
    """Keep the configs whose resident fp32 tiles (``n_acc`` accumulators of [``resident`` block,
    BLOCK_D] plus the [BLOCK_M, BLOCK_N] score tile) fit the register budget and whose pipelined
    streamed tiles fit shared memory; prefer blocks no larger than the bucketed length.

    The score tile's rows are the resident block; it feeds the next dot as its A operand, which
    only the warps along those rows split (``MMA_ROWS`` rows each): warps beyond resident / MMA_ROWS
    split the columns and each holds its rows' whole score row. Without dropout the compiler streams
    the score tile through its elementwise steps (one register per element); with dropout the keep
    mask is drawn (Philox) before the kernel's ``n_score`` score-sized fp32 tiles (forward: P;
    backward: P and dP) are consumed, so those tiles and the draw are all live: ``n_score + 1``
    registers per element (ptxas, sm_80 and sm_90: a 1-register estimate keeps configs that spill
    up to 424 B on sm_80)."""
    def regs(c):
        r, bm, bn = c.kwargs[resident], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        row_warps = max(1, min(c.num_warps, r // MMA_ROWS))
        score = bm * bn / (32 * row_warps) * (n_score + 1 if dropout else 1)
        return n_acc * r * block_d / (32 * c.num_warps) + score

    def smem(c):
        r = c.kwargs[resident]
        other = c.kwargs["BLOCK_N" if resident == "BLOCK_M" else "BLOCK_M"]
        return (c.num_stages * 2 * other + 2 * r) * block_d * elem_size

    fits = [c for c in configs if regs(c) <= MAX_FP32_PER_THREAD and smem(c) <= max_smem]
    short = [c for c in fits if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(s_bucket, 16)]
    return short or fits or [min(configs, key=regs)]


def _bwd_prune(resident: str, n_acc: int):
    """Autotune pruner of a backward kernel (see ``prune_by_budget``): P and dP are live together."""
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        return prune_by_budget(configs, resident=resident, n_acc=n_acc, n_score=2, block_d=kwargs["BLOCK_D"],
                               elem_size=q.element_size(), s_bucket=named_args["S_BUCKET"],
                               max_smem=_device_smem(q.device.index), dropout=kwargs["HAS_DROPOUT"])
    return prune


_KEY = ["S_BUCKET", "HEAD_DIM", "HAS_MASK", "PACKED", "HAS_DROPOUT"]
_dkdv_tuned = triton.autotune(BWD_DKDV_CONFIGS, key=_KEY,
                              prune_configs_by={"early_config_prune": _bwd_prune("BLOCK_N", 2)})(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(BWD_DQ_CONFIGS, key=_KEY,
                            prune_configs_by={"early_config_prune": _bwd_prune("BLOCK_M", 1)})(_attn_bwd_dq_kernel)


def strides(t):
    """A tensor's strides as the kernels take them; packed [N, H, D] rows get the batch stride 0 of
    [B, S, H, D] (the kernels find a sequence's rows from SeqStart)."""
    return (0, *t.stride()) if t.dim() == 3 else tuple(t.stride())


@functools.lru_cache(None)
def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def attn_bwd(dout, q, k, v, out, lse, seed, mask_u8, kv_end, dropout_p: float, softmax_scale: float,
             seq_start=None):
    """Launch preprocess, dK/dV and dQ. ``mask_u8`` / ``kv_end`` are None without a padding mask.
    Packed (``seq_start`` given, ``kv_end`` the lengths): every tensor is [N, H, D] rows, S = lse's."""
    B, H, S = lse.shape
    D = q.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    packed = seq_start is not None
    _attn_bwd_preprocess_kernel[(triton.cdiv(S, PREPROCESS_BLOCK_M), B * H)](
        out, dout, delta, kv_end if packed else delta, seq_start if packed else delta, *strides(out),
        *strides(dout), H, S, HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=block_d, PACKED=packed)
    has_mask = mask_u8 is not None
    mask_arg = mask_u8 if has_mask else delta
    mask_strides = strides(mask_u8) if has_mask else (0, 0)
    kv_arg = kv_end if kv_end is not None else delta
    start_arg = seq_start if packed else delta
    common = (*strides(q), *strides(k), *strides(v), *strides(dout))
    scalars = (H, S, softmax_scale * 1.4426950408889634, softmax_scale, float(dropout_p),
               triton.next_power_of_2(S))
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d, HAS_MASK=has_mask, PACKED=packed, HAS_DROPOUT=dropout_p > 0.0,
                 UPCAST=interpret_upcast_bf16(q.dtype), DOT_PREC=dot_precision(q.dtype))
    dkdv_args = (q, k, v, dout, dk, dv, lse, delta, mask_arg, kv_arg, start_arg, seed, *common, *strides(dk),
                 *mask_strides, *scalars)
    dq_args = (q, k, v, dout, dq, lse, delta, mask_arg, kv_arg, start_arg, seed, *common, *strides(dq),
               *mask_strides, *scalars)
    launch_tuned(_dkdv_tuned, lambda m: (triton.cdiv(S, m["BLOCK_N"]), B * H), *dkdv_args, **flags,
                 interpret=INTERPRET_TILES)
    launch_tuned(_dq_tuned, lambda m: (triton.cdiv(S, m["BLOCK_M"]), B * H), *dq_args, **flags,
                 interpret=INTERPRET_TILES)
    return dq, dk, dv
