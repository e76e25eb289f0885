"""Triton kernels of a channels-last strided Conv1d layer (layers 1..N of the feature encoder) as
implicit GEMMs on tensor cores, forward with a fused bias + LayerNorm + GELU epilogue, and the
backward (norm/GELU backward, dX, dW), with their autotune configs. Host side: conv_layer.py.

Shapes: x [B, T_in, C_in] (any strides); weight reorganised once per call to w [K * C_in, C_out]
(row k * C_in + ci holds W[:, ci, k]); rows of the output m = b * T_out + t; out / y / dy
[B * T_out, C_out] contiguous; mean / rstd [B * T_out] fp32.
  forward  out[m, co] = sum_{k, ci} x[b, t * stride + k, ci] * w[k * C_in + ci, co]  (M x N x K GEMM,
           M = B * T_out, N = C_out, K = KSIZE * C_in)
  dX       dx[b, r + stride * j, :] = sum_i dy[b, j - i, :] @ w[(r + stride * i) * C_in + :, :]^T for
           each phase r < stride (a dense GEMM per phase: no masked-out taps)
  dW       dw[k * C_in + ci, co] = sum_m x[b, t * stride + k, ci] * dy[m, co]  (split over m)
"""
import triton
import triton.language as tl

from ._common import autotuned, next_power_of_2
from ._common_kernels import dot, gelu, gelu_grad, layer_norm_gelu_bwd, to_out


@triton.jit
def _conv_gemm_tile(x_rows, m_mask, w_ptr, n, n_mask, C_in, C_out, stride_xt, stride_xc,
                    KSIZE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] conv tile: one flattened (tap, input-channel block) loop, pipelined."""
    rk = tl.arange(0, BLOCK_K)
    n_cblk = tl.cdiv(C_in, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(KSIZE * n_cblk):
        k = it // n_cblk
        ci = (it - k * n_cblk) * BLOCK_K + rk
        ci_mask = ci < C_in
        a = tl.load(x_rows[:, None] + k * stride_xt + ci[None, :] * stride_xc,
                    mask=m_mask[:, None] & ci_mask[None, :], other=0.0)
        w = tl.load(w_ptr + (k * C_in + ci)[:, None] * C_out + n[None, :],
                    mask=ci_mask[:, None] & n_mask[None, :], other=0.0)
        acc = dot(a, w, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr,  # [B, T_in, C_in] layer input, channels-last, any strides
    w_ptr,  # [KSIZE * C_in, C_out] reorganised weight, contiguous
    b_ptr,  # [C_out] conv bias (read only if HAS_BIAS)
    g_ptr, beta_ptr,  # [C_out] LayerNorm weight and bias (NORM)
    out_ptr,  # [M, C_out] output
    y_ptr,  # [M, C_out] pre-norm / pre-GELU values: saved for backward (SAVE), else NORM scratch = out
    mean_ptr, rstd_ptr,  # [M] fp32 LayerNorm statistics (NORM and SAVE)
    M,  # B * T_out output rows
    T_out,  # output frames per utterance
    C_in, C_out,  # channels
    stride,  # conv stride in frames
    stride_xb, stride_xt, stride_xc,  # strides of x
    eps,  # LayerNorm epsilon
    M_BUCKET,  # autotune key only: M rounded up to a power of two
    KSIZE: tl.constexpr,  # conv kernel size
    HAS_BIAS: tl.constexpr,  # conv has a bias
    NORM: tl.constexpr,  # LayerNorm over channels: a program owns all C_out channels of its rows
    SAVE: tl.constexpr,  # write y (and mean, rstd) for the backward
    DOT_PREC: tl.constexpr,  # tl.dot input_precision ("ieee" keeps fp32 inputs exact)
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile sizes
):
    # 1-D grid (no 65535 cap on the rows): the N tiles of the same rows are consecutive programs, so
    # they run together (x reuse in L2); with NORM a program loops over every N tile itself
    n_tiles = 1 if NORM else tl.cdiv(C_out, BLOCK_N)
    pid_n = tl.program_id(0) % n_tiles
    rm = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    bi = rm // T_out
    x_rows = x_ptr + bi.to(tl.int64) * stride_xb + ((rm - bi * T_out) * stride).to(tl.int64) * stride_xt
    rn = tl.arange(0, BLOCK_N)
    if not NORM:
        n = pid_n * BLOCK_N + rn
        n_mask = n < C_out
        acc = _conv_gemm_tile(x_rows, m_mask, w_ptr, n, n_mask, C_in, C_out, stride_xt, stride_xc, KSIZE,
                              DOT_PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        offs = rm.to(tl.int64)[:, None] * C_out + n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if SAVE:
            tl.store(y_ptr + offs, to_out(acc, y_ptr), mask=mask)
        tl.store(out_ptr + offs, to_out(gelu(acc), out_ptr), mask=mask)
    else:
        # pass 1: pre-norm tiles to y, Chan-merged row statistics in fp32
        count = tl.zeros((BLOCK_M,), dtype=tl.float32)
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, C_out, BLOCK_N):
            n = n0 + rn
            n_mask = n < C_out
            acc = _conv_gemm_tile(x_rows, m_mask, w_ptr, n, n_mask, C_in, C_out, stride_xt, stride_xc,
                                  KSIZE, DOT_PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm.to(tl.int64)[:, None] * C_out + n[None, :], to_out(acc, y_ptr),
                     mask=m_mask[:, None] & n_mask[None, :])
            n_chunk = tl.minimum(C_out - n0, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(tl.where(n_mask[None, :], acc, 0.0), axis=1) / n_chunk
            d = tl.where(n_mask[None, :], acc - chunk_mean[:, None], 0.0)
            total = count + n_chunk
            delta = chunk_mean - mean
            mean += delta * (n_chunk / total)
            m2 += tl.sum(d * d, axis=1) + delta * delta * (count * n_chunk / total)
            count = total
        rstd = tl.math.rsqrt(m2 / C_out + eps)
        if SAVE:
            tl.store(mean_ptr + rm, mean, mask=m_mask)
            tl.store(rstd_ptr + rm, rstd, mask=m_mask)
        tl.debug_barrier()  # pass 2 reads tiles other threads of this program wrote
        for n0 in range(0, C_out, BLOCK_N):
            n = n0 + rn
            n_mask = n < C_out
            offs = rm.to(tl.int64)[:, None] * C_out + n[None, :]
            mask = m_mask[:, None] & n_mask[None, :]
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
            beta = tl.load(beta_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
            z = (y - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
            tl.store(out_ptr + offs, to_out(gelu(z), out_ptr), mask=mask)


@triton.jit
def _norm_act_bwd_kernel(
    dout_ptr,  # [M, C] gradient of the layer output, any strides
    y_ptr,  # [M, C] saved pre-norm (NORM) or pre-GELU values, contiguous
    mean_ptr, rstd_ptr,  # [M] fp32 LayerNorm statistics (NORM)
    g_ptr, beta_ptr,  # [C] LayerNorm weight and bias (NORM)
    dy_ptr,  # [M, C] out: gradient of the conv output (+ bias), contiguous
    dvec_ptr,  # [PROGRAMS, 3, C] fp32 out: partial d(conv bias), d(norm weight), d(norm bias)
    M, C,  # rows, channels
    stride_om, stride_oc,  # strides of dout
    rows_per_prog,  # rows per program, a multiple of BLOCK_M
    NORM: tl.constexpr,  # LayerNorm over channels before the GELU
    BLOCK_M: tl.constexpr,  # rows per step
    BLOCK_C: tl.constexpr,  # >= C: a program owns whole rows
):
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    if NORM:
        g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    acc_db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dg = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dbeta = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_end = tl.minimum(M, (pid + 1) * rows_per_prog)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        rm = pid * rows_per_prog + r0 + tl.arange(0, BLOCK_M)
        m_mask = rm < row_end
        mask = m_mask[:, None] & c_mask[None, :]
        rows = rm.to(tl.int64)
        do = tl.load(dout_ptr + rows[:, None] * stride_om + c[None, :] * stride_oc, mask=mask,
                     other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM:
            mean = tl.load(mean_ptr + rm, mask=m_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rm, mask=m_mask, other=0.0)
            xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
            dy, dz = layer_norm_gelu_bwd(do, xhat, rstd, g, beta, C)
            acc_dg += tl.sum(dz * xhat, axis=0)
            acc_dbeta += tl.sum(dz, axis=0)
        else:
            dy = do * gelu_grad(y)
        dy = tl.where(mask, dy, 0.0)
        acc_db += tl.sum(dy, axis=0)
        tl.store(dy_ptr + rows[:, None] * C + c[None, :], to_out(dy, dy_ptr), mask=mask)
    tl.store(dvec_ptr + pid * 3 * C + c, acc_db, mask=c_mask)
    tl.store(dvec_ptr + (pid * 3 + 1) * C + c, acc_dg, mask=c_mask)
    tl.store(dvec_ptr + (pid * 3 + 2) * C + c, acc_dbeta, mask=c_mask)


@triton.jit
def _conv_bwd_dx_kernel(
    dy_ptr,  # [B * T_out, C_out] gradient of the conv output, contiguous
    w_ptr,  # [KSIZE * C_in, C_out] reorganised weight, contiguous
    dx_ptr,  # [B, T_in, C_in] out: input gradient, contiguous
    B, T_in, T_out, C_in, C_out,  # sizes
    J,  # rows per utterance and phase: cdiv(T_in, stride)
    stride,  # conv stride
    M_BUCKET,  # autotune key only: B * J rounded up to a power of two
    KSIZE: tl.constexpr,  # conv kernel size
    DOT_PREC: tl.constexpr,  # tl.dot input_precision ("ieee" keeps fp32 inputs exact)
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile sizes
):
    n_tiles = tl.cdiv(C_in, BLOCK_N)  # axis 0: N tiles x row tiles, N fastest (no 65535 cap on rows)
    ci = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    phase = tl.program_id(1)
    bi = rm // J
    j = rm - bi * J
    t_in = phase + j * stride
    row_mask = (bi < B) & (t_in < T_in)
    ci_mask = ci < C_in
    rk = tl.arange(0, BLOCK_K)
    n_cblk = tl.cdiv(C_out, BLOCK_K)
    n_taps = tl.cdiv(KSIZE - phase, stride)  # taps k = phase + stride * i < KSIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(n_taps * n_cblk):
        i = it // n_cblk
        co = (it - i * n_cblk) * BLOCK_K + rk
        co_mask = co < C_out
        t = j - i
        a_mask = row_mask & (t >= 0) & (t < T_out)
        a = tl.load(dy_ptr + (bi.to(tl.int64) * T_out + t)[:, None] * C_out + co[None, :],
                    mask=a_mask[:, None] & co_mask[None, :], other=0.0)
        w = tl.load(w_ptr + ((phase + i * stride) * C_in + ci)[None, :] * C_out + co[:, None],
                    mask=co_mask[:, None] & ci_mask[None, :], other=0.0)
        acc = dot(a, w, acc, DOT_PREC, UPCAST)
    out = dx_ptr + (bi.to(tl.int64) * T_in + t_in)[:, None] * C_in + ci[None, :]
    tl.store(out, to_out(acc, dx_ptr), mask=row_mask[:, None] & ci_mask[None, :])


@triton.jit
def _conv_bwd_dw_kernel(
    x_ptr,  # [B, T_in, C_in] layer input, any strides
    dy_ptr,  # [M, C_out] gradient of the conv output, contiguous
    dw_ptr,  # [SPLITS, KSIZE * C_in, C_out] fp32 out: partial weight gradient per split of m
    M, T_out, C_in, C_out,  # sizes (M = B * T_out)
    stride,  # conv stride
    stride_xb, stride_xt, stride_xc,  # strides of x
    m_per_split,  # rows m reduced by one split, a multiple of BLOCK_K
    M_BUCKET,  # autotune key only: m_per_split rounded up to a power of two
    KSIZE: tl.constexpr,  # conv kernel size
    DOT_PREC: tl.constexpr,  # tl.dot input_precision ("ieee" keeps fp32 inputs exact)
    UPCAST: tl.constexpr,  # interpreter + bf16: dot operands in fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile sizes
):
    co = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows k * C_in + ci of dw
    split = tl.program_id(2)
    r_mask = rr < KSIZE * C_in
    k = rr // C_in
    row_off = k.to(tl.int64) * stride_xt + (rr - k * C_in).to(tl.int64) * stride_xc
    co_mask = co < C_out
    m_lo = split * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_K):
        mk = m0 + tl.arange(0, BLOCK_K)
        mk_mask = mk < m_hi
        bi = mk // T_out
        col_off = bi.to(tl.int64) * stride_xb + ((mk - bi * T_out) * stride).to(tl.int64) * stride_xt
        a = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=r_mask[:, None] & mk_mask[None, :],
                    other=0.0)
        d = tl.load(dy_ptr + mk.to(tl.int64)[:, None] * C_out + co[None, :],
                    mask=mk_mask[:, None] & co_mask[None, :], other=0.0)
        acc = dot(a, d, acc, DOT_PREC, UPCAST)
    out = dw_ptr + (split * KSIZE * C_in + rr).to(tl.int64)[:, None] * C_out + co[None, :]
    tl.store(out, acc, mask=r_mask[:, None] & co_mask[None, :])


# ----------------------------------------------------------------------------- autotune configs (data)
# GEMM tiles for H100/A100: M = B * T_out (10^4..10^5 rows), N = C_out (512), K = k * C_in (1024-1536).


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Every config below compiles without register spills for sm_80 and sm_90 at 512 channels (the JIT's
# 16-divisible C_in / C_out / strides: vectorised, cp.async-pipelined loads). The fp32 accumulator is
# BLOCK_M * BLOCK_N / (32 * num_warps) registers per thread: 64 leaves room for the operand pipeline
# and the GELU / LayerNorm epilogue; 128 (128 x 256 at 8 warps, 128 x 128 at 4) spills there (the dX /
# dW GEMMs, a plain store, fit 128 x 256 at 8 warps), and 16 warps cap a thread at 128 registers.
FWD_CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4),
               _cfg(64, 256, 64, 8, 3)]
# LayerNorm epilogue: a program loops over all C_out channels of its BLOCK_M rows, BLOCK_N at a time
FWD_NORM_CONFIGS = [_cfg(128, 128, 64, 8, 4), _cfg(64, 256, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                    _cfg(64, 128, 64, 4, 4)]
DX_CONFIGS = [_cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
DW_CONFIGS = [_cfg(128, 128, 64, 8, 4), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
# under TRITON_INTERPRET (see ``launch_tuned``): several N chunks and K blocks at test sizes
INTERPRET_TILES = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)
KEY = ["M_BUCKET", "C_in", "C_out", "KSIZE"]


def _prune(configs, named_args, **kwargs):
    n = next_power_of_2(named_args["C_out"])  # positional in every launch
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(n, 128)]
    return kept or configs[:1]


_conv_fwd = autotuned("conv_layer_fwd", FWD_CONFIGS, KEY, _prune)(_conv_fwd_kernel)
_conv_fwd_norm = autotuned("conv_layer_fwd_norm", FWD_NORM_CONFIGS, KEY, _prune)(_conv_fwd_kernel)
_conv_bwd_dx = autotuned("conv_layer_bwd_dx", DX_CONFIGS, KEY, _prune)(_conv_bwd_dx_kernel)
_conv_bwd_dw = autotuned("conv_layer_bwd_dw", DW_CONFIGS, KEY, _prune)(_conv_bwd_dw_kernel)
