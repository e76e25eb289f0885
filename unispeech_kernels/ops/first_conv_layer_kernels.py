"""Triton kernels of the first feature-encoder layer (1-channel Conv1d + norm + GELU); the launchers,
autograd, torch.library ops and the CUDA extension's backend are in first_conv_layer.py.

Shapes: x [B, L] audio; weight [C, K] (the [C, 1, K] conv weight, contiguous); outputs and output
gradients [B, T, C] channels-last; statistics [B, C] fp32. The conv is recomputed in every pass
(K FMAs per output) rather than stored.
"""
import triton
import triton.language as tl

from ._common import NORM_CODES
from ._common_kernels import gelu, gelu_grad, layer_norm_gelu_bwd, to_out

# the NORM constexpr (``_common.NORM_CODES``)
NONE: tl.constexpr = tl.constexpr(NORM_CODES["none"])
LAYER: tl.constexpr = tl.constexpr(NORM_CODES["layer"])
GROUP: tl.constexpr = tl.constexpr(NORM_CODES["group"])


@triton.jit
def _conv1_tile(x_row, w_ptr, b_ptr, t, c, t_mask, c_mask, stride, stride_xl,
                KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """fp32 [BLOCK_T, BLOCK_C] tile of conv(x) (+ bias) for frames t and channels c of one utterance."""
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(KSIZE):
        xk = tl.load(x_row + (t * stride + k) * stride_xl, mask=t_mask, other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + c * KSIZE + k, mask=c_mask, other=0.0).to(tl.float32)
        acc += xk[:, None] * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _first_conv_fwd_kernel(
    x_ptr,  # [B, L] audio, any strides
    w_ptr,  # [C, KSIZE] conv weight, contiguous
    b_ptr,  # [C] conv bias (read only if HAS_BIAS)
    g_ptr,  # [C] norm weight (NORM != NONE)
    beta_ptr,  # [C] norm bias (NORM != NONE)
    mean_ptr,  # [B, C] fp32 group-norm mean (NORM == GROUP)
    rstd_ptr,  # [B, C] fp32 group-norm 1/sqrt(var + eps) (NORM == GROUP)
    out_ptr,  # [B, T, C] output, contiguous
    T,  # output frames
    C,  # channels
    stride,  # conv stride in samples
    stride_xb, stride_xl,  # strides of x
    eps,  # LayerNorm epsilon (NORM == LAYER)
    KSIZE: tl.constexpr,  # conv kernel size
    HAS_BIAS: tl.constexpr,  # conv has a bias
    NORM: tl.constexpr,  # NONE, LAYER (over channels, BLOCK_C >= C), GROUP (GroupNorm(C, C))
    BLOCK_T: tl.constexpr,  # frames per program
    BLOCK_C: tl.constexpr,  # channels per program
):
    b = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = t < T
    c_mask = c < C
    y = _conv1_tile(x_ptr + b.to(tl.int64) * stride_xb, w_ptr, b_ptr, t, c, t_mask, c_mask, stride,
                    stride_xl, KSIZE, HAS_BIAS, BLOCK_T, BLOCK_C)
    if NORM == LAYER:
        mean = tl.sum(tl.where(c_mask[None, :], y, 0.0), axis=1) / C
        d = tl.where(c_mask[None, :], y - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(d * d, axis=1) / C + eps)
        g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * g[None, :] + beta[None, :]
    if NORM == GROUP:
        mean = tl.load(mean_ptr + b * C + c, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + c, mask=c_mask, other=0.0)
        g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        y = (y - mean[None, :]) * (rstd * g)[None, :] + beta[None, :]
    y = gelu(y)
    out = out_ptr + (b.to(tl.int64) * T + t[:, None]) * C + c[None, :]
    tl.store(out, to_out(y, out_ptr), mask=t_mask[:, None] & c_mask[None, :])


@triton.jit
def _first_conv_group_stats_kernel(
    x_ptr,  # [B, L] audio, any strides
    w_ptr,  # [C, KSIZE] conv weight, contiguous
    b_ptr,  # [C] conv bias (read only if HAS_BIAS)
    len_ptr,  # [B] int32 real frames per utterance, in [0, T] (HAS_LENGTHS)
    stats_ptr,  # [SPLITS, B, C, 3] fp32 out: (count, mean, M2) of this split's real frames
    T, C, stride, stride_xb, stride_xl,  # frames, channels, conv stride, strides of x
    tiles_per_prog,  # BLOCK_T tiles of frames per split
    KSIZE: tl.constexpr,  # conv kernel size
    HAS_BIAS: tl.constexpr,  # conv has a bias
    HAS_LENGTHS: tl.constexpr,  # statistics over len_ptr[b] frames instead of all T
    BLOCK_T: tl.constexpr,  # frames per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    split = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n_valid = T
    if HAS_LENGTHS:
        n_valid = tl.load(len_ptr + b)
    x_row = x_ptr + b.to(tl.int64) * stride_xb
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(tiles_per_prog):
        t0 = (split * tiles_per_prog + i) * BLOCK_T
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < n_valid
        y = _conv1_tile(x_row, w_ptr, b_ptr, t, c, t_mask, c_mask, stride, stride_xl, KSIZE, HAS_BIAS,
                        BLOCK_T, BLOCK_C)
        n_tile = tl.minimum(tl.maximum(n_valid - t0, 0), BLOCK_T).to(tl.float32)
        tile_mean = tl.sum(tl.where(t_mask[:, None], y, 0.0), axis=0) / tl.maximum(n_tile, 1.0)
        d = tl.where(t_mask[:, None], y - tile_mean[None, :], 0.0)
        total = count + n_tile
        delta = tile_mean - mean
        frac = n_tile / tl.maximum(total, 1.0)
        mean += delta * frac
        m2 += tl.sum(d * d, axis=0) + delta * delta * count * frac
        count = total
    out = stats_ptr + ((split * tl.num_programs(1) + b) * C + c) * 3
    tl.store(out, count, mask=c_mask)
    tl.store(out + 1, mean, mask=c_mask)
    tl.store(out + 2, m2, mask=c_mask)


@triton.jit
def _first_conv_group_bwd_reduce_kernel(
    dout_ptr,  # [B, T, C] gradient of the output, any strides
    x_ptr,  # [B, L] audio, any strides
    w_ptr,  # [C, KSIZE] conv weight, contiguous
    b_ptr,  # [C] conv bias (read only if HAS_BIAS)
    g_ptr, beta_ptr,  # [C] group-norm weight and bias
    mean_ptr, rstd_ptr,  # [B, C] fp32 group-norm statistics of the forward
    part_ptr,  # [SPLITS, B, C, 2] fp32 out: this split's sums of dz and dz * xhat
    T, C, stride, stride_xb, stride_xl,  # frames, channels, conv stride, strides of x
    stride_ob, stride_ot, stride_oc,  # strides of dout
    tiles_per_prog,  # BLOCK_T tiles of frames per split
    KSIZE: tl.constexpr,  # conv kernel size
    HAS_BIAS: tl.constexpr,  # conv has a bias
    BLOCK_T: tl.constexpr,  # frames per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    split = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x_row = x_ptr + b.to(tl.int64) * stride_xb
    mean = tl.load(mean_ptr + b * C + c, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + b * C + c, mask=c_mask, other=0.0)
    g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    sum_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dzx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(tiles_per_prog):
        t = (split * tiles_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        mask = t_mask[:, None] & c_mask[None, :]
        y = _conv1_tile(x_row, w_ptr, b_ptr, t, c, t_mask, c_mask, stride, stride_xl, KSIZE, HAS_BIAS,
                        BLOCK_T, BLOCK_C)
        xhat = (y - mean[None, :]) * rstd[None, :]
        do = tl.load(dout_ptr + b.to(tl.int64) * stride_ob + t[:, None] * stride_ot + c[None, :] * stride_oc,
                     mask=mask, other=0.0).to(tl.float32)
        dz = do * gelu_grad(xhat * g[None, :] + beta[None, :])
        sum_dz += tl.sum(dz, axis=0)
        sum_dzx += tl.sum(dz * xhat, axis=0)
    out = part_ptr + ((split * tl.num_programs(1) + b) * C + c) * 2
    tl.store(out, sum_dz, mask=c_mask)
    tl.store(out + 1, sum_dzx, mask=c_mask)


@triton.jit
def _first_conv_bwd_kernel(
    dout_ptr,  # [B, T, C] gradient of the output, any strides
    x_ptr,  # [B, L] audio, any strides
    w_ptr,  # [C, KSIZE] conv weight, contiguous
    b_ptr,  # [C] conv bias (read only if HAS_BIAS)
    g_ptr, beta_ptr,  # [C] norm weight and bias (NORM != NONE)
    mean_ptr, rstd_ptr,  # [B, C] fp32 group-norm statistics of the forward (NORM == GROUP)
    sdz_ptr, sdzx_ptr,  # [B, C] fp32 sums over all frames of dz and dz * xhat (NORM == GROUP)
    len_ptr,  # [B] int32 real frames (NORM == GROUP and HAS_LENGTHS)
    dw_ptr,  # [SPLITS, B, C, KPAD] fp32 out: partial dW
    dvec_ptr,  # [SPLITS, B, 3, C] fp32 out: partial d(conv bias), d(norm weight), d(norm bias)
    gx_ptr,  # [B, T, KSIZE] fp32 out: sum_c dy[t, c] * W[c, k] (NEED_DX), overlap-added later
    T, C, stride, stride_xb, stride_xl,  # frames, channels, conv stride, strides of x
    stride_ob, stride_ot, stride_oc,  # strides of dout
    eps,  # LayerNorm epsilon (NORM == LAYER)
    tiles_per_prog,  # BLOCK_T tiles of frames per split
    KSIZE: tl.constexpr,  # conv kernel size
    KPAD: tl.constexpr,  # next power of two >= KSIZE
    HAS_BIAS: tl.constexpr,  # conv has a bias
    NORM: tl.constexpr,  # NONE, LAYER (over channels), GROUP (GroupNorm(C, C))
    HAS_LENGTHS: tl.constexpr,  # group statistics were over len_ptr[b] frames
    NEED_DX: tl.constexpr,  # write gx for the audio gradient
    BLOCK_T: tl.constexpr,  # frames per tile
    BLOCK_C: tl.constexpr,  # channels: >= C, a program owns all of them
):
    split = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    kk = tl.arange(0, KPAD)
    x_row = x_ptr + b.to(tl.int64) * stride_xb
    if NORM != NONE:
        g = tl.load(g_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    if NORM == GROUP:
        mean = tl.load(mean_ptr + b * C + c, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + c, mask=c_mask, other=0.0)
        sdz = tl.load(sdz_ptr + b * C + c, mask=c_mask, other=0.0)
        sdzx = tl.load(sdzx_ptr + b * C + c, mask=c_mask, other=0.0)
        n_valid = T
        if HAS_LENGTHS:
            n_valid = tl.load(len_ptr + b)
        inv_n = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)
    acc_dw = tl.zeros((BLOCK_C, KPAD), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dg = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dbeta = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(tiles_per_prog):
        t = (split * tiles_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        mask = t_mask[:, None] & c_mask[None, :]
        y = _conv1_tile(x_row, w_ptr, b_ptr, t, c, t_mask, c_mask, stride, stride_xl, KSIZE, HAS_BIAS,
                        BLOCK_T, BLOCK_C)
        do = tl.load(dout_ptr + b.to(tl.int64) * stride_ob + t[:, None] * stride_ot + c[None, :] * stride_oc,
                     mask=mask, other=0.0).to(tl.float32)
        if NORM == NONE:
            dy = do * gelu_grad(y)
        if NORM == LAYER:
            mu = tl.sum(tl.where(c_mask[None, :], y, 0.0), axis=1) / C
            d = tl.where(c_mask[None, :], y - mu[:, None], 0.0)
            r = tl.math.rsqrt(tl.sum(d * d, axis=1) / C + eps)
            xhat = d * r[:, None]
            dy, dz = layer_norm_gelu_bwd(do, xhat, r, g, beta, C)
            acc_dg += tl.sum(dz * xhat, axis=0)
            acc_dbeta += tl.sum(dz, axis=0)
        if NORM == GROUP:
            xhat = (y - mean[None, :]) * rstd[None, :]
            dz = do * gelu_grad(xhat * g[None, :] + beta[None, :])
            valid = tl.where(t < n_valid, inv_n, 0.0)
            corr = valid[:, None] * (sdz[None, :] + sdzx[None, :] * xhat)
            dy = (dz - corr) * (rstd * g)[None, :]
        dy = tl.where(mask, dy, 0.0)
        acc_db += tl.sum(dy, axis=0)
        for k in tl.static_range(KSIZE):
            xk = tl.load(x_row + (t * stride + k) * stride_xl, mask=t_mask, other=0.0).to(tl.float32)
            acc_dw += tl.where(kk[None, :] == k, tl.sum(dy * xk[:, None], axis=0)[:, None], 0.0)
            if NEED_DX:
                wk = tl.load(w_ptr + c * KSIZE + k, mask=c_mask, other=0.0).to(tl.float32)
                tl.store(gx_ptr + (b.to(tl.int64) * T + t) * KSIZE + k, tl.sum(dy * wk[None, :], axis=1),
                         mask=t_mask)
    base = split * tl.num_programs(1) + b
    tl.store(dw_ptr + (base * C + c[:, None]) * KPAD + kk[None, :], acc_dw, mask=c_mask[:, None])
    tl.store(dvec_ptr + base * 3 * C + c, acc_db, mask=c_mask)
    tl.store(dvec_ptr + (base * 3 + 1) * C + c, acc_dg, mask=c_mask)
    tl.store(dvec_ptr + (base * 3 + 2) * C + c, acc_dbeta, mask=c_mask)
