"""The one tolerance table, and the comparison every kernel test uses.

A kernel's result is compared with a float64 reference. Its error may be at most
``ERROR_FACTOR`` times the error of eager PyTorch run in the same low precision, plus a small
per-dtype floor (flash-attention's rule): the kernel may not be much worse than PyTorch itself.
"""
import torch

ERROR_FACTOR = 2.0
# absolute error floor added on top of ERROR_FACTOR x eager's error, per dtype
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# plain allclose tolerances, for comparisons with no eager baseline (model-level parity)
ALLCLOSE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_error_within(actual, reference, eager, dtype, name="output"):
    """|actual - reference| <= ERROR_FACTOR * |eager - reference| + FLOOR[dtype] (max norms)."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = max_error(actual, reference)
    bound = ERROR_FACTOR * max_error(eager, reference) + FLOOR[dtype]
    assert err <= bound, f"{name} ({dtype}): max error {err:.3e} > bound {bound:.3e}"
