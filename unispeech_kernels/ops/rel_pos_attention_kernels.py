"""Triton kernels of attention with WavLM's gated relative-position bias (host side:
``rel_pos_attention.py``): the forward and the dK/dV and dQ backward kernels of
``attention_kernels.py`` (whose helpers, dropout RNG, tile configs and register budget they share),
with the bias of each score made in the kernel: table[h, side(j - i), min(|j - i|, L - 1)] times the
query row's gate.

Shapes: q, k, v, out, dout [B, S, H, D] (any strides); table [H, 2, L] fp32 contiguous (the bias by
distance, ``distance_table``); gate [B, S, H] fp32 contiguous; lse, delta [B, H, S] fp32; dq, dk,
dv new contiguous [B, S, H, D]; dgate [B, S, H] fp32.

The table's gradient is a sum over all (b, i, j) of one distance, which the dQ kernel forms without
atomics: each program sums its [BLOCK_M, BLOCK_N] tiles of dS * gate along their diagonals (a tile
stored to the program's own scratch slot and read back skewed), adds them into its own row of
``ddiag`` [B*H, cdiv(S, BLOCK_M), 2S] (relative position r at column r + S - 1), tile after tile in
a fixed order; the host sums the rows and the diagonals of each bucket.
"""
import triton
import triton.language as tl

from ._common import autotuned
from ._common_kernels import to_out
from .attention_kernels import (BWD_DKDV_CONFIGS, FWD_CONFIGS, _dropout_keep, _head_dim_mask, _sequence_extent,
                                budget_pruner)

LOG2E = tl.constexpr(1.4426950408889634)  # the bias enters the kernels' log2-domain scores


@triton.jit
def _distance_bias(table_ptr, rel, L):
    """Bias of relative positions ``rel`` (key - query, any shape) from one head's [2, L] table."""
    return tl.load(table_ptr + tl.where(rel > 0, L, 0) + tl.minimum(tl.abs(rel), L - 1))


@triton.jit
def _row_gate(gate_ptr, b, h, rows, S, H, HAS_GATE: tl.constexpr):
    """[BLOCK] gates of query rows ``rows`` of batch b, head h (1 without a gate)."""
    if HAS_GATE:
        g = tl.load(gate_ptr + (b * S + rows) * H + h, mask=rows < S, other=0.0)
    else:
        g = tl.full(rows.shape, 1.0, tl.float32)
    return g


@triton.jit
def _rel_pos_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, S, H, D] inputs, any strides
    out_ptr,  # [B, S, H, D] contiguous out; padded query rows get zeros
    lse_ptr,  # [B, H, S] fp32 out: log2-sum-exp2 of the scores per row, +inf on padded rows
    table_ptr,  # [H, 2, L] fp32 bias by distance (key before-or-at / after the query)
    gate_ptr,  # [B, S, H] fp32 gate of each query row; unused unless HAS_GATE
    mask_ptr,  # [B, S] uint8 key-padding mask (1 = real); unused unless HAS_MASK
    kv_end_ptr,  # [B] int32 last real position + 1 (loop bound); unused unless HAS_MASK
    seed_ptr,  # [1] int64 dropout seed on the device; unused unless HAS_DROPOUT
    stride_qb, stride_qs, stride_qh, stride_qd,  # strides of q_ptr
    stride_kb, stride_ks, stride_kh, stride_kd,  # strides of k_ptr
    stride_vb, stride_vs, stride_vh, stride_vd,  # strides of v_ptr
    stride_ob, stride_os, stride_oh, stride_od,  # strides of out_ptr
    stride_mb, stride_ms,  # strides of mask_ptr
    H, S, L,  # heads, sequence length, distances in the table
    qk_scale,  # softmax_scale * log2(e)
    dropout_p,  # drop probability
    S_BUCKET,  # next_power_of_2(S): autotune key only
    HEAD_DIM: tl.constexpr,  # real head_dim
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_DIM), >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_GATE: tl.constexpr,  # a gate is given
    HAS_MASK: tl.constexpr,  # a key-padding mask is given
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    DOT_PREC: tl.constexpr,  # tl.dot input_precision
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_end, _, _ = _sequence_extent(kv_end_ptr, kv_end_ptr, b, S, HAS_MASK, False)
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :] * stride_od
    lse_ptrs = lse_ptr + bh.to(tl.int64) * S + rows
    if start_m >= kv_end:  # the whole query block is padding: zeros, no work
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=out_ptr.dtype.element_ty), mask=(rows[:, None] < S) & d_ok)
        tl.store(lse_ptrs, tl.full([BLOCK_M], float("inf"), tl.float32), mask=rows < S)
        return
    row_ok = rows < kv_end
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + b * stride_mb + rows * stride_ms, mask=row_ok, other=0) != 0)
    gate = _row_gate(gate_ptr, b, h, rows, S, H, HAS_GATE) * LOG2E  # the bias in the log2 domain
    head_table = table_ptr + h * 2 * L
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep_scale = 1.0 / (1.0 - dropout_p)
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
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
            col_ok = col_ok & (tl.load(mask_ptr + b * stride_mb + cols * stride_ms, mask=col_ok, other=0) != 0)
        bias = _distance_bias(head_table, cols[None, :] - rows[:, None], L)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + bias * gate[:, None]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no real key yet: no NaN
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
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
    tl.store(o_ptrs, to_out(out, out_ptr), mask=(rows[:, None] < S) & d_ok)
    tl.store(lse_ptrs, tl.where(row_ok, m_i + tl.math.log2(l_safe), float("inf")), mask=rows < S)


@triton.jit
def _rel_pos_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,  # [B, S, H, D] forward inputs and output gradient, any strides
    dk_ptr, dv_ptr,  # [B, S, H, D] contiguous out
    lse_ptr, delta_ptr,  # [B, H, S] fp32: forward log2-sum-exp2 (+inf on padded rows), rowsum(dout * out)
    table_ptr,  # [H, 2, L] fp32 bias by distance
    gate_ptr,  # [B, S, H] fp32 gates; unused unless HAS_GATE
    mask_ptr,  # [B, S] uint8 key-padding mask (1 = real); unused unless HAS_MASK
    kv_end_ptr,  # [B] int32 last real position + 1; unused unless HAS_MASK
    seed_ptr,  # [1] int64 dropout seed; unused unless HAS_DROPOUT
    stride_qb, stride_qs, stride_qh, stride_qd,  # strides of q_ptr
    stride_kb, stride_ks, stride_kh, stride_kd,  # strides of k_ptr
    stride_vb, stride_vs, stride_vh, stride_vd,  # strides of v_ptr
    stride_gb, stride_gs, stride_gh, stride_gd,  # strides of dout_ptr
    stride_xb, stride_xs, stride_xh, stride_xd,  # strides of dk_ptr and dv_ptr (same layout)
    stride_mb, stride_ms,  # strides of mask_ptr
    H, S, L,  # heads, sequence length, distances in the table
    qk_scale,  # softmax_scale * log2(e)
    sm_scale,  # softmax_scale
    dropout_p,  # drop probability
    S_BUCKET,  # next_power_of_2(S): autotune key only
    HEAD_DIM: tl.constexpr,  # real head_dim
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_DIM), >= 16
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    HAS_GATE: tl.constexpr,  # a gate is given
    HAS_MASK: tl.constexpr,  # a key-padding mask is given
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    DOT_PREC: tl.constexpr,  # tl.dot input_precision
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_end, _, _ = _sequence_extent(kv_end_ptr, kv_end_ptr, b, S, HAS_MASK, False)
    x_off = b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xs + offs_d[None, :] * stride_xd
    store_ok = (offs_n[:, None] < S) & d_ok
    if start_n >= kv_end:  # padded keys: zero gradient, no work
        zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=dk_ptr.dtype.element_ty)
        tl.store(dk_ptr + x_off, zero, mask=store_ok)
        tl.store(dv_ptr + x_off, zero, mask=store_ok)
        return
    load_ok = (offs_n[:, None] < kv_end) & d_ok
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=load_ok, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=load_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    head_table = table_ptr + h * 2 * L
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep_scale = 1.0 / (1.0 - dropout_p)
    q_base = q_ptr + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd
    g_base = dout_ptr + b * stride_gb + h * stride_gh + offs_d[None, :] * stride_gd
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
        lse = tl.load(lse_ptr + bh.to(tl.int64) * S + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + bh.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
        gate = _row_gate(gate_ptr, b, h, rows, S, H, HAS_GATE) * LOG2E
        bias_t = _distance_bias(head_table, offs_n[:, None] - rows[None, :], L)  # [BLOCK_N, BLOCK_M]
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale + bias_t * gate[None, :]
        # padding keys: meaningless values confined to their own dK/dV rows (zeroed or dropped below)
        p_t = tl.math.exp2(s_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = tl.trans(_dropout_keep(seed, bh, S, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N))
            pd_t = tl.where(keep, p_t * keep_scale, 0.0)
            dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
        else:
            pd_t = p_t
        dv += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    if HAS_MASK:  # padded keys (past kv_end or masked) get zero gradients
        key_ok = offs_n < kv_end
        key_ok = key_ok & (tl.load(mask_ptr + b * stride_mb + offs_n * stride_ms, mask=key_ok, other=0) != 0)
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    tl.store(dk_ptr + x_off, to_out(dk * sm_scale, dk_ptr), mask=store_ok)
    tl.store(dv_ptr + x_off, to_out(dv, dv_ptr), mask=store_ok)


@triton.jit
def _diagonal_sums(scratch_ptr, x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """[BLOCK_T] sums of tile x [BLOCK_M, BLOCK_N] along its diagonals: entry t sums x[a, t - (BLOCK_M - 1) + a]
    (column - row = t - BLOCK_M + 1), through this program's scratch slot of BLOCK_M * BLOCK_N fp32."""
    a = tl.arange(0, BLOCK_M)[:, None]
    tl.store(scratch_ptr + a * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], x)
    tl.debug_barrier()
    c = tl.arange(0, BLOCK_T)[None, :] - (BLOCK_M - 1) + a
    skewed = tl.load(scratch_ptr + a * BLOCK_N + c, mask=(c >= 0) & (c < BLOCK_N), other=0.0)
    tl.debug_barrier()  # every read done before the next tile overwrites the slot
    return tl.sum(skewed, 0)


@triton.jit
def _rel_pos_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,  # [B, S, H, D] forward inputs and output gradient, any strides
    dq_ptr,  # [B, S, H, D] contiguous out
    dgate_ptr,  # [B, S, H] fp32 out: d loss / d gate; unused unless HAS_GATE
    ddiag_ptr,  # [B*H, cdiv(S, BLOCK_M), 2S] fp32 zeros in, this program's diagonal sums of dS * gate out
    scratch_ptr,  # [programs, BLOCK_M * BLOCK_N] fp32 scratch (one slot per program)
    lse_ptr, delta_ptr,  # [B, H, S] fp32: forward log2-sum-exp2 (+inf on padded rows), rowsum(dout * out)
    table_ptr,  # [H, 2, L] fp32 bias by distance
    gate_ptr,  # [B, S, H] fp32 gates; unused unless HAS_GATE
    mask_ptr,  # [B, S] uint8 key-padding mask (1 = real); unused unless HAS_MASK
    kv_end_ptr,  # [B] int32 last real position + 1; unused unless HAS_MASK
    seed_ptr,  # [1] int64 dropout seed; unused unless HAS_DROPOUT
    stride_qb, stride_qs, stride_qh, stride_qd,  # strides of q_ptr
    stride_kb, stride_ks, stride_kh, stride_kd,  # strides of k_ptr
    stride_vb, stride_vs, stride_vh, stride_vd,  # strides of v_ptr
    stride_gb, stride_gs, stride_gh, stride_gd,  # strides of dout_ptr
    stride_xb, stride_xs, stride_xh, stride_xd,  # strides of dq_ptr
    stride_mb, stride_ms,  # strides of mask_ptr
    H, S, L,  # heads, sequence length, distances in the table
    qk_scale,  # softmax_scale * log2(e)
    sm_scale,  # softmax_scale
    dropout_p,  # drop probability
    HEAD_DIM: tl.constexpr,  # real head_dim
    BLOCK_D: tl.constexpr,  # next_power_of_2(HEAD_DIM), >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_T: tl.constexpr,  # next_power_of_2(BLOCK_M + BLOCK_N - 1): diagonals of a tile
    HAS_GATE: tl.constexpr,  # a gate is given
    HAS_MASK: tl.constexpr,  # a key-padding mask is given
    HAS_DROPOUT: tl.constexpr,  # dropout_p > 0
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    DOT_PREC: tl.constexpr,  # tl.dot input_precision
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(offs_d, HEAD_DIM, BLOCK_D)
    kv_end, _, _ = _sequence_extent(kv_end_ptr, kv_end_ptr, b, S, HAS_MASK, False)
    x_off = b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd
    store_ok = (rows[:, None] < S) & d_ok
    dgate_ptrs = dgate_ptr + (b * S + rows) * H + h
    if start_m >= kv_end:  # padded query rows: zero gradients, no work (their ddiag row stays zero)
        tl.store(dq_ptr + x_off, tl.zeros([BLOCK_M, BLOCK_D], dtype=dq_ptr.dtype.element_ty), mask=store_ok)
        if HAS_GATE:
            tl.store(dgate_ptrs, tl.zeros([BLOCK_M], tl.float32), mask=rows < S)
        return
    row_ok = rows < kv_end
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok, other=0.0)
    do = tl.load(dout_ptr + b * stride_gb + h * stride_gh + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=row_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * S + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S + rows, mask=row_ok, other=0.0)
    gate = _row_gate(gate_ptr, b, h, rows, S, H, HAS_GATE)
    head_table = table_ptr + h * 2 * L
    scratch = scratch_ptr + (bh.to(tl.int64) * tl.num_programs(0) + pid_m) * (BLOCK_M * BLOCK_N)
    ddiag_row = ddiag_ptr + (bh.to(tl.int64) * tl.num_programs(0) + pid_m) * 2 * S + S - 1  # column of r = 0
    offs_t = tl.arange(0, BLOCK_T)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep_scale = 1.0 / (1.0 - dropout_p)
    k_base = k_ptr + b * stride_kb + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = v_ptr + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dgate = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):  # key blocks past kv_end are skipped
        cols = start_n + offs_n
        col_ok = cols < kv_end
        k = tl.load(k_base + cols[:, None] * stride_ks, mask=col_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs, mask=col_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_MASK:
            col_ok = col_ok & (tl.load(mask_ptr + b * stride_mb + cols * stride_ms, mask=col_ok, other=0) != 0)
        bias = _distance_bias(head_table, cols[None, :] - rows[:, None], L)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + bias * (gate * LOG2E)[:, None]
        p = tl.where(col_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, S, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])  # d loss / d score (natural units)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        dgate += tl.sum(ds * bias, 1)
        # diagonal t of this tile is relative position r = start_n - start_m - (BLOCK_M - 1) + t
        sums = _diagonal_sums(scratch, ds * gate[:, None], BLOCK_M, BLOCK_N, BLOCK_T)
        r = start_n - start_m - (BLOCK_M - 1) + offs_t
        r_ok = (offs_t < BLOCK_M + BLOCK_N - 1) & (r > -S) & (r < S)
        tl.store(ddiag_row + r, tl.load(ddiag_row + r, mask=r_ok, other=0.0) + sums, mask=r_ok)
        tl.debug_barrier()  # the next tile's diagonals overlap these: stored before it reads them
    tl.store(dq_ptr + x_off, to_out(dq * sm_scale, dq_ptr), mask=store_ok)
    if HAS_GATE:
        tl.store(dgate_ptrs, dgate, mask=rows < S)


# attention's configs, pruned with the bias tile counted; (32, 32, 4, 2) left out of the forward's:
# with dropout it spills 20 B on sm_90a (ptxas caps it at 128 registers)
FWD_REL_POS_CONFIGS = [c for c in FWD_CONFIGS if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (32, 32)]
_KEY = ["S_BUCKET", "HEAD_DIM", "HAS_GATE", "HAS_MASK", "HAS_DROPOUT"]
_fwd_tuned = autotuned("rel_pos_attention_fwd", FWD_REL_POS_CONFIGS, _KEY,
                       budget_pruner("BLOCK_M", 1, 1, bias=True))(_rel_pos_fwd_kernel)
_dkdv_tuned = autotuned("rel_pos_attention_bwd_dkdv", BWD_DKDV_CONFIGS, _KEY,
                        budget_pruner("BLOCK_N", 2, 2, bias=True))(_rel_pos_bwd_dkdv_kernel)
# the dQ kernel's ddiag and scratch buffers are sized by its tiles: fixed, not tuned. The one of
# (64|32, 64|32, 4|8 warps) with no spill on sm_80 and sm_90a (ptxas): 32 rows, so mma.sync, no wgmma
DQ_TILES = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
