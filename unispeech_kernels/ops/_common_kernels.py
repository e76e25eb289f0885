"""``@triton.jit`` helpers several ops' kernels share: exact (erf) GELU and its derivative, the one
rounding policy for stores, the GEMM step with the precision flags every kernel takes
(``_runtime.dot_flags``), and the LayerNorm + GELU backward of a row. Imported by the
``ops/*_kernels.py`` files only, so nothing imports Triton before a kernel is needed."""
import triton
import triton.language as tl

from .._runtime import interpret_mode

if hasattr(triton, "knobs") and bool(triton.knobs.runtime.interpret) != interpret_mode():
    raise RuntimeError("TRITON_INTERPRET changed after unispeech_kernels was imported: the kernels would run "
                       "one way and the launchers plan for the other; set it before importing the package")


@triton.jit
def gelu(x):
    """Exact GELU on fp32: x * Phi(x)."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_grad(x):
    """d GELU / dx on fp32: Phi(x) + x * phi(x)."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def to_out(x, ptr):
    """fp32 -> the element type of ``ptr``, rounded to nearest even: every store of a computed value
    goes through here. For bf16 the rounding is done on the bits (the Triton interpreter truncates
    fp32 -> bf16, which biases every sum downstream); the result is then exact in bf16, so GPUs give
    the same bits as their own rounding."""
    if ptr.dtype.element_ty == tl.bfloat16:
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
