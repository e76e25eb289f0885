"""Backward kernels of the positional convolutional embedding (see ``pos_conv.py``).

Shapes: x, dy, pre, dpre [B, T, C] channels-last; W [C, CG, K] with CG = C / G channels per group,
P = K // 2. Forward: pre = conv(x) + b, out = x + gelu(pre). Backward:
  dpre = dy * gelu'(pre)                                  (``_gelu_bwd_kernel``, elementwise)
  dW[g*CG + co, ci, k] = sum_{b,t} x[b, t + k - P, g*CG + ci] * dpre[b, t, g*CG + co]
  db[c] = sum_{b,t} dpre[b, t, c]                         (both in ``_pos_conv_dw_kernel``)
  dx = dy + transposed conv of dpre                       (the conv kernel of pos_conv.py, FLIP)
dW is a GEMM per group: M = K * CG rows r = k * CG + ci, N = CG, reduced over the B * T frames.
At UniSpeech shapes M alone gives G * K * CG / BLOCK_M = 768 (base) .. 1024 (large) programs, so the
reduction runs whole in each program (deterministic, no atomics); it is split over frame blocks into
fp32 partials (summed afterwards) only when there are too few programs to fill the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import interpret_upcast_bf16
from ._triton_helpers import target_programs, tile_config

# dW tile: (BLOCK_M rows r = k*CG + ci, BLOCK_S frames per step, num_warps, num_stages)
_DW_CONFIG = dict(BLOCK_M=128, BLOCK_S=64, num_warps=8, num_stages=3)
_DW_CONFIG_INTERPRET = dict(BLOCK_M=32, BLOCK_S=32, num_warps=4, num_stages=1)
_GELU_BWD_BLOCK = 1024


@triton.jit
def round_bf16_rtne(v):
    """fp32 -> the nearest bf16 value (ties to even), still fp32. The Triton interpreter's fp32 ->
    bf16 cast truncates where the GPU rounds: kernels call this first under the interpreter."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gelu_bwd_kernel(
    dy_ptr,    # [N] contiguous gradient of the output
    pre_ptr,   # [N] contiguous pre-activation saved by the forward
    dpre_ptr,  # [N] contiguous output: dy * gelu'(pre)
    N,         # number of elements B * T * C
    INTERP_BF16: tl.constexpr,  # bf16 under the Triton interpreter: round stores by hand
    BLOCK: tl.constexpr,        # elements per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    dpre = dy * (cdf + z * pdf)
    if INTERP_BF16:
        dpre = round_bf16_rtne(dpre)
    tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pos_conv_dw_kernel(
    x_ptr,       # [B, T, C] forward input, channel stride 1
    dp_ptr,      # [B, T, C] contiguous dpre
    dw_ptr,      # [SPLIT, C, CG, KS] weight gradient (fp32 partials when SPLIT > 1)
    db_ptr,      # [SPLIT, C] bias gradient (written when COMPUTE_DB)
    T,           # frames
    C,           # channels (row stride of dpre)
    KS,          # kernel size
    PAD,         # KS // 2: tap k of output frame t reads input frame t + k - PAD
    stride_xb,   # x batch stride (elements)
    stride_xt,   # x frame stride (elements)
    n_iters,     # B * cdiv(T, BLOCK_S): frame blocks to reduce over
    iters_per_split,  # frame blocks handled by one program along the split axis
    CG: tl.constexpr,          # channels per group
    COMPUTE_DB: tl.constexpr,  # also reduce dpre into db
    INTERP_BF16: tl.constexpr,  # bf16 under the Triton interpreter: fp32 dots, stores rounded by hand
    IEEE: tl.constexpr,        # fp32 inputs: exact fp32 dot, no tf32
    BLOCK_M: tl.constexpr,     # rows r = k * CG + ci per program
    BLOCK_N: tl.constexpr,     # output channels co per program (>= 16, CG padded)
    BLOCK_S: tl.constexpr,     # frames per reduction step
):
    N_NB: tl.constexpr = (CG + BLOCK_N - 1) // BLOCK_N
    pid_m = tl.program_id(0)
    g = tl.program_id(1) // N_NB
    nb = tl.program_id(1) % N_NB
    split = tl.program_id(2)
    R = KS * CG
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = offs_r // CG
    ci = offs_r % CG
    r_mask = offs_r < R
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CG
    n_tb = tl.cdiv(T, BLOCK_S)
    it_end = tl.minimum(n_iters, (split + 1) * iters_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for it in range(split * iters_per_split, it_end):
        b = it // n_tb
        offs_s = (it % n_tb) * BLOCK_S + tl.arange(0, BLOCK_S)
        src = offs_s[:, None] + k[None, :] - PAD  # [BLOCK_S, BLOCK_M] input frame of (s, r)
        x_mask = (src >= 0) & (src < T) & r_mask[None, :]
        x_off = b * stride_xb + src * stride_xt + g * CG + ci[None, :]
        xa = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)
        dp_mask = (offs_s < T)[:, None] & n_mask[None, :]
        dp_off = (b * T + offs_s[:, None]) * C + g * CG + offs_n[None, :]
        dp = tl.load(dp_ptr + dp_off, mask=dp_mask, other=0.0)
        if COMPUTE_DB:
            db += tl.sum(dp.to(tl.float32), axis=0)
        if INTERP_BF16:
            xa = xa.to(tl.float32)
            dp = dp.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(xa), dp, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(xa), dp, acc)
    co = g * CG + offs_n
    if INTERP_BF16:
        if dw_ptr.dtype.element_ty == tl.bfloat16:
            acc = round_bf16_rtne(acc)
            db = round_bf16_rtne(db)
    dw_off = split * C * CG * KS + co[None, :] * (CG * KS) + ci[:, None] * KS + k[:, None]
    tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])
    if COMPUTE_DB:
        if pid_m == 0:
            tl.store(db_ptr + split * C + co, db.to(db_ptr.dtype.element_ty), mask=n_mask)


def block_n(cg: int) -> int:
    """Output channels per program: CG rounded up to a power of two, 16 (tl.dot) .. 128."""
    return min(128, max(16, triton.next_power_of_2(cg)))


def gelu_bwd(dy: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """dpre = dy * gelu'(pre), [B, T, C] contiguous in dy's dtype."""
    dy = dy.contiguous()
    dpre = torch.empty_like(pre)
    n = dy.numel()
    _gelu_bwd_kernel[(triton.cdiv(n, _GELU_BWD_BLOCK),)](
        dy, pre, dpre, n, INTERP_BF16=interpret_upcast_bf16(dy.dtype), BLOCK=_GELU_BWD_BLOCK)
    return dpre


def pos_conv_dw(x, dpre, kernel_size: int, groups: int, compute_db: bool, split=None):
    """dW [C, CG, K] and db [C] (or None) in x's dtype. x [B, T, C] with channel stride 1, dpre
    contiguous. ``split``: frame-block partials (None = enough programs for the device)."""
    bsz, t, c = x.shape
    cg = c // groups
    cfg = tile_config(_pos_conv_dw_kernel, gpu=_DW_CONFIG, interpret=_DW_CONFIG_INTERPRET)
    bn = block_n(cg)
    m_tiles = triton.cdiv(kernel_size * cg, cfg["BLOCK_M"])
    programs = m_tiles * groups * triton.cdiv(cg, bn)
    n_iters = bsz * triton.cdiv(t, cfg["BLOCK_S"])
    if split is None:
        split = triton.cdiv(target_programs(x.device) // 2, programs)  # 2 per SM
    split = max(1, min(split, n_iters))
    iters_per_split = triton.cdiv(n_iters, split)
    split = triton.cdiv(n_iters, iters_per_split)  # no empty programs
    acc_dtype = x.dtype if split == 1 else torch.float32
    dw = torch.empty((split, c, cg, kernel_size), device=x.device, dtype=acc_dtype)
    db = torch.empty((split, c), device=x.device, dtype=acc_dtype) if compute_db else dw
    grid = (m_tiles, groups * triton.cdiv(cg, bn), split)
    _pos_conv_dw_kernel[grid](
        x, dpre, dw, db, t, c, kernel_size, kernel_size // 2, x.stride(0), x.stride(1), n_iters,
        iters_per_split, CG=cg, COMPUTE_DB=compute_db, INTERP_BF16=interpret_upcast_bf16(x.dtype),
        IEEE=x.dtype == torch.float32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, BLOCK_S=cfg["BLOCK_S"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dw = dw[0] if split == 1 else dw.sum(0).to(x.dtype)
    if not compute_db:
        return dw, None
    return dw, (db[0] if split == 1 else db.sum(0).to(x.dtype))
