"""Triton kernels of the positional convolutional embedding (host side: ``pos_conv.py``).

Shapes: x, dy, pre, dpre [B, T, C] channels-last; W [C, CG, K] with CG = C / G channels per group,
P = K // 2, reorganised by the launcher to [G, K * CG, CG]. Forward: pre = conv(x) + b,
out = x + gelu(pre). Backward:
  dpre = dy * gelu'(pre)                                  (``_gelu_bwd_kernel``, elementwise)
  dx = dy + transposed conv of dpre                       (``_pos_conv_conv_kernel`` with FLIP)
  dW[g*CG + co, ci, k] = sum_{b,t} x[b, t + k - P, g*CG + ci] * dpre[b, t, g*CG + co]
  db[c] = sum_{b,t} dpre[b, t, c]                         (both in ``_pos_conv_dw_kernel``)
The conv is an implicit GEMM per group over the reduction index r = k * CG + ci; dW is a GEMM per
group with M = K * CG rows, N = CG, reduced over the B * T frames (whole in each program, split into
fp32 partials only when there are too few programs to fill the GPU).
"""
import triton
import triton.language as tl

from ._common import autotuned
from ._common_kernels import dot, gelu, gelu_grad, to_out


@triton.jit
def _pos_conv_conv_kernel(
    a_ptr,       # [B, T, C] GEMM input, channel stride 1: x (forward) or dpre (dX)
    w_ptr,       # [G, KS * CG, CG] reorganised weight: rows k*CG + ci, cols co (FLIP: k*CG + co, ci)
    bias_ptr,    # [C] bias (read when HAS_BIAS)
    res_ptr,     # [B, T, C] residual added in the epilogue, channel stride 1: x (forward) or dy (dX)
    out_ptr,     # [B, T, C] contiguous result
    pre_ptr,     # [B, T, C] contiguous pre-activation (written when STORE_PRE)
    T,           # frames
    C,           # channels (row stride of out and pre)
    KS,          # kernel size
    PAD,         # KS // 2: tap k of output frame t reads t + k - PAD (FLIP: t - k + PAD)
    stride_ab,   # a batch stride (elements)
    stride_at,   # a frame stride (elements)
    stride_rb,   # residual batch stride (elements)
    stride_rt,   # residual frame stride (elements)
    T_BUCKET,    # T rounded to a power of two: autotune key only, unused in the body
    CG: tl.constexpr,          # channels per group
    FLIP: tl.constexpr,        # transposed conv (dX = dy + conv^T(dpre)) instead of the forward
    HAS_BIAS: tl.constexpr,    # add bias before the activation
    APPLY_GELU: tl.constexpr,  # out = res + gelu(pre) (forward) instead of res + pre (dX)
    STORE_PRE: tl.constexpr,   # save pre for GELU's backward (training forward)
    ADD_RES: tl.constexpr,     # add the residual (res_ptr) in the epilogue
    UPCAST: tl.constexpr,      # interpreter + bf16: dot operands in fp32
    DOT_PREC: tl.constexpr,    # tl.dot input_precision ("ieee" keeps fp32 inputs exact)
    EVEN_R: tl.constexpr,      # KS * CG % BLOCK_R == 0: no mask on the reduction index
    BLOCK_T: tl.constexpr,     # frames per program (GEMM M)
    BLOCK_N: tl.constexpr,     # output channels per program (GEMM N, >= 16, CG padded)
    BLOCK_R: tl.constexpr,     # reduction step over r = k * CG + ci (GEMM K)
):
    N_NB: tl.constexpr = (CG + BLOCK_N - 1) // BLOCK_N
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2) // N_NB
    nb = tl.program_id(2) % N_NB
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CG
    R = KS * CG
    a_base = a_ptr + b * stride_ab + g * CG
    w_base = w_ptr + g * R * CG
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for i in range(0, tl.cdiv(R, BLOCK_R)):
        offs_r = i * BLOCK_R + tl.arange(0, BLOCK_R)
        k = offs_r // CG  # tap
        c_in = offs_r % CG  # channel inside the group
        if FLIP:
            src = offs_t[:, None] - k[None, :] + PAD
        else:
            src = offs_t[:, None] + k[None, :] - PAD
        a_mask = (src >= 0) & (src < T)
        w_mask = n_mask[None, :]
        if not EVEN_R:
            a_mask = a_mask & (offs_r < R)[None, :]
            w_mask = w_mask & (offs_r < R)[:, None]
        a = tl.load(a_base + src * stride_at + c_in[None, :], mask=a_mask, other=0.0)
        w = tl.load(w_base + offs_r[:, None] * CG + offs_n[None, :], mask=w_mask, other=0.0)
        acc = dot(a, w, acc, DOT_PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * CG + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (offs_t < T)[:, None] & n_mask[None, :]
    out_off = (b * T + offs_t[:, None]) * C + g * CG + offs_n[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out_off, to_out(acc, pre_ptr), mask=mask)
    if APPLY_GELU:
        acc = gelu(acc)
    out = acc
    if ADD_RES:
        out += tl.load(res_ptr + b * stride_rb + offs_t[:, None] * stride_rt + g * CG + offs_n[None, :],
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, to_out(out, out_ptr), mask=mask)


# Autotune candidates (BLOCK_T, BLOCK_R, num_warps, num_stages), keyed on (T bucket, CG, K, dtype).
# BLOCK_N is CG rounded up (48 -> 64 base, 64 large), so a program owns one group's channels; at
# B 8, T 500, 16 groups BLOCK_T 64 gives 8 * 8 * 16 = 1024 programs for 132 SMs.
CONV_CONFIGS = [(64, 64, 4, 4), (128, 64, 8, 3), (128, 32, 8, 4)]
CONV_TILES_INTERPRET = dict(BLOCK_T=32, BLOCK_R=32)  # under TRITON_INTERPRET (see ``launch_tuned``)


def _prune_conv_configs(configs, named_args, **kwargs):
    """Tiles taller than the (bucketed) sequence only waste work: drop them when others remain."""
    fitting = [c for c in configs if c.kwargs["BLOCK_T"] <= named_args["T_BUCKET"]]
    return fitting or configs[:1]


def _even_r(args):
    return args["KS"] * args["CG"] % args["BLOCK_R"] == 0


_pos_conv_conv = autotuned(
    "pos_conv_conv",
    [triton.Config(dict(BLOCK_T=bt, BLOCK_R=br), num_warps=w, num_stages=s) for bt, br, w, s in CONV_CONFIGS],
    ["T_BUCKET", "CG", "KS"], _prune_conv_configs,
)(triton.heuristics({"EVEN_R": _even_r})(_pos_conv_conv_kernel))


@triton.jit
def _gelu_bwd_kernel(
    dy_ptr,    # [N] contiguous gradient of the output
    pre_ptr,   # [N] contiguous pre-activation saved by the forward
    dpre_ptr,  # [N] contiguous output: dy * gelu'(pre)
    N,         # number of elements B * T * C
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dpre_ptr + offs, to_out(dy * gelu_grad(z), dpre_ptr), mask=mask)


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
    UPCAST: tl.constexpr,      # interpreter + bf16: dot operands in fp32
    DOT_PREC: tl.constexpr,    # tl.dot input_precision ("ieee" keeps fp32 inputs exact)
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
        acc = dot(tl.trans(xa), dp, acc, DOT_PREC, UPCAST)
    co = g * CG + offs_n
    dw_off = split * C * CG * KS + co[None, :] * (CG * KS) + ci[:, None] * KS + k[:, None]
    tl.store(dw_ptr + dw_off, to_out(acc, dw_ptr), mask=r_mask[:, None] & n_mask[None, :])
    if COMPUTE_DB:
        if pid_m == 0:
            tl.store(db_ptr + split * C + co, to_out(db, db_ptr), mask=n_mask)


# dW tile: (BLOCK_M rows r = k*CG + ci, BLOCK_S frames per step, num_warps, num_stages)
DW_CONFIG = dict(BLOCK_M=128, BLOCK_S=64, num_warps=8, num_stages=3)
DW_CONFIG_INTERPRET = dict(BLOCK_M=32, BLOCK_S=32, num_warps=4, num_stages=1)
GELU_BWD_BLOCK = 1024
