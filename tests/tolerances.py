"""The one tolerance table, the comparisons every numerical test uses, and the margin record.

Kernel results (``assert_error_within``) are compared with a float64 reference computed from the
same low-precision inputs, so rounding the inputs is no error source; what a kernel may add is:

1. ``ERROR_FACTOR`` x the error of eager PyTorch run in the same precision (flash-attention's rule):
   intermediate roundings eager makes too (a bf16 softmax, a bf16 activation between two layers) are
   allowed at twice eager's cost, and no more;
2. a floor that eager may happen to undercut on some CPU (its vectorised kernels change summation
   order and rounding with AVX2 / AVX-512 / AMX), scaled to the values:
   - ``OUTPUT_ULPS`` units of the dtype's epsilon at max|reference|: the final rounding of an fp32
     accumulator to the output dtype costs half an ulp, one ulp at max|reference| is 1 to 2 ulps of
     every element, so a kernel that rounds once uses at most half of it;
   - ``sqrt(reduction) x eps(fp32)`` at max|reference|: the rounding error of an fp32 accumulator
     over ``reduction`` terms (random-walk growth); ``reduction`` is the longest sum that feeds one
     element (a dot's K, a softmax's keys, a weight gradient's frames);
   - the dtype's subnormal spacing, so that an exact zero may come back as a denormal.

| dtype | eps      | floor for reduction n, values of size m               |
|-------|----------|-------------------------------------------------------|
| fp32  | 1.19e-7  | m * (1.19e-7 + 1.19e-7 * sqrt(n))                     |
| fp16  | 9.77e-4  | m * (9.77e-4 + 1.19e-7 * sqrt(n))                     |
| bf16  | 7.81e-3  | m * (7.81e-3 + 1.19e-7 * sqrt(n))                     |

A kernel that accumulates in fp16 or bf16 instead of fp32 exceeds it (its error grows as
sqrt(n) ulps of the output dtype; tests/test_tolerances.py shows that at the suite's sizes).

Model-level comparisons with no eager baseline in the same precision (our model vs transformers,
patched vs unpatched) use ``assert_close`` with ``ALLCLOSE``: both sides compute in fp32 with
different association orders, over several layers.

Every comparison that passes records err / bound in ``MARGINS`` (a failing one fails its test);
tests/conftest.py prints the tightest at the end of the run (and writes them all to $UNISPEECH_MARGINS_JSON when set).
"""
import math
import os
from unittest import mock

import torch
import torch.nn.functional as F

ERROR_FACTOR = 2.0
OUTPUT_ULPS = 1.0
ACCUMULATOR = torch.float32
# allclose tolerances of comparisons with no fp64 reference: model-level parity (both sides in the
# dtype, different summation orders over several layers) and one result computed two ways
ALLCLOSE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float64: dict(atol=1e-10, rtol=1e-10),  # one fp64 computation arranged two ways
}

MARGINS: list = []  # one dict per comparison: test, name, dtype, err, bound, ratio


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def floor(dtype: torch.dtype, magnitude: float, reduction: int = 1) -> float:
    """The error a correctly rounded fp32-accumulating kernel may show at values of size
    ``magnitude`` after a ``reduction``-term sum (see the module docstring)."""
    accumulation = math.sqrt(max(1, reduction)) * torch.finfo(ACCUMULATOR).eps
    subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the spacing below the smallest normal
    return magnitude * (OUTPUT_ULPS * torch.finfo(dtype).eps + accumulation) + subnormal


def _record(name, dtype, err, bound):
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    MARGINS.append(dict(test=test, name=name, dtype=str(dtype).replace("torch.", ""), err=err, bound=bound,
                        ratio=err / bound if bound > 0 else (0.0 if err == 0 else math.inf)))


def assert_error_within(actual, reference, eager, dtype, name="output", reduction=1, magnitude=None):
    """|actual - reference| <= ERROR_FACTOR * |eager - reference| + floor(dtype, magnitude,
    reduction), in max norms; ``reference`` is the fp64 result of the same inputs.
    ``magnitude`` is max|reference| unless given: a sum that cancels exactly (a conv bias's gradient
    before a norm over the frames it sums is 0) has no size of its own, and is judged at the
    root-sum-square of its terms, the size its partial sums reach."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if magnitude is None:
        magnitude = reference.double().abs().max().item() if reference.numel() else 0.0
    err = max_error(actual, reference)
    bound = ERROR_FACTOR * max_error(eager, reference) + floor(dtype, magnitude, reduction)
    assert err <= bound, f"{name} ({dtype}): max error {err:.3e} > bound {bound:.3e}"
    _record(name, dtype, err, bound)


def assert_close(actual, expected, dtype=torch.float32, name="output"):
    """torch.testing.assert_close with ``ALLCLOSE[dtype]``, recording the margin:
    max |actual - expected| / (atol + rtol |expected|)."""
    tol = ALLCLOSE[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel():
        a, e = actual.detach().double(), expected.detach().double()
        ratio = ((a - e).abs() / (tol["atol"] + tol["rtol"] * e.abs())).nan_to_num(nan=0.0).max().item()
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name}: {m}")
    if actual.numel():
        _record(name, dtype, ratio, 1.0)


def first_conv_bias_terms(reference, grad) -> float:
    """The magnitude at which the first conv bias's gradient is judged when a group norm follows it
    (the gradient is then 0 in exact arithmetic: the norm removes a per-channel shift): the root-sum-
    square over batch and frames of d loss / d conv output, max over channels, in fp64.
    ``reference()`` computes the fp64 reference output (its first F.conv1d is the layer); ``grad``
    the cotangent of that output."""
    outputs, conv1d = [], F.conv1d

    def conv1d_as_leaf(*args, **kwargs):  # the first output [B, C, T]: a leaf to differentiate at
        out = conv1d(*args, **kwargs)
        if not outputs:
            outputs.append(out.detach().requires_grad_())
            return outputs[0]
        return out

    with mock.patch.object(F, "conv1d", conv1d_as_leaf):
        out = reference()
    (terms,) = torch.autograd.grad(out, outputs[0], grad.to(out.dtype))
    return terms.double().pow(2).sum((0, 2)).sqrt().max().item()


def key_bias_terms(name: str, reference_grads: dict):
    """The magnitude at which a parameter's gradient is judged, for the one that attention zeroes:
    softmax ignores a shift shared by every key, so ``*.k_proj.bias`` gets 0 in exact arithmetic, a
    sum of terms the size of those of ``k_proj.weight``'s gradient (the hidden states it multiplies
    are LayerNorm-scaled, of size ~1). None (max|reference|) for every other parameter."""
    if not name.endswith("k_proj.bias"):
        return None
    return reference_grads[name[:-len("bias")] + "weight"].abs().max().item()
