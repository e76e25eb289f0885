"""``@triton.jit`` helpers several ops' kernels share: erf GELU and its derivative, the one
rounding policy for stores, the GEMM step with the precision flags every kernel takes
(``_runtime.dot_flags``), and the LayerNorm + GELU backward of a row. Imported by the
``ops/*_kernels.py`` files only, so nothing imports Triton before a kernel is needed."""
import triton
import triton.language as tl

from .._runtime import interpret_mode

if hasattr(triton, "knobs") and bool(triton.knobs.runtime.interpret) != interpret_mode():
    raise RuntimeError("TRITON_INTERPRET changed after unispeech_kernels was imported: the kernels would run "
                       "one way and the launchers plan for the other; set it before importing the package")


# the interpreter converts fp32 -> bf16 by truncation, GPUs round to nearest even in one instruction
BF16_ROUND_ON_BITS = tl.constexpr(interpret_mode())


@triton.jit
def normal_cdf(x):
    """Phi(x) on fp32 in one range, without libdevice's erf (~28 instructions, two ranges): erfc(z),
    z = |x| / sqrt 2, as t * exp(-z^2 + P(t)) with t = 1 / (1 + z / 2) and P the degree-9 Chebyshev
    fit of Press et al. (Numerical Recipes, erfcc; relative error < 1.2e-7 everywhere, so the GELU's
    negative tail keeps its relative accuracy); in fp32 |error| < 2.3e-7."""
    z = tl.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277 * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    half_erfc = 0.5 * t * tl.exp(p - z * z)
    return tl.where(x >= 0.0, 1.0 - half_erfc, half_erfc)


@triton.jit
def gelu(x):
    """GELU on fp32: x * Phi(x) (``normal_cdf``)."""
    return x * normal_cdf(x)


@triton.jit
def gelu_grad(x):
    """d GELU / dx on fp32: Phi(x) + x * phi(x)."""
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return normal_cdf(x) + x * pdf


@triton.jit
def to_out(x, ptr):
    """fp32 -> the element type of ``ptr``, rounded to nearest even: every store of a computed value
    goes through here. On a GPU that is the hardware conversion; under the interpreter, which
    truncates fp32 -> bf16 (biasing every sum downstream), bf16 is rounded on the bits first, to the
    same values."""
    if BF16_ROUND_ON_BITS and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST: bf16 operands -> fp32 first (interpreter only)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def layer_norm_gelu_bwd(do, xhat, rstd, g, beta, C):
    """Backward of gelu(xhat * g + beta) with xhat the LayerNorm of each row over its C channels:
    (dy, dz), dy the gradient of the pre-norm row, dz that of the GELU input (whose sums over rows
    give the norm weight's and bias's gradients). do, xhat [ROWS, BLOCK_C] fp32 (xhat 0 on padding
    lanes), rstd [ROWS], g, beta [BLOCK_C]."""
    dz = do * gelu_grad(xhat * g[None, :] + beta[None, :])
    gdz = dz * g[None, :]
    c1 = tl.sum(gdz, axis=1) / C
    c2 = tl.sum(gdz * xhat, axis=1) / C
    return (gdz - c1[:, None] - xhat * c2[:, None]) * rstd[:, None], dz
