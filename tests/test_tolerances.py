"""The tolerance model itself: a correctly rounded fp32-accumulating result passes with room to
spare, a result accumulated in the low precision fails, at the sizes the kernel tests use."""
import pytest
import torch

from tests.tolerances import MARGINS, assert_error_within, floor


@pytest.fixture(autouse=True)
def _made_up_numbers_stay_out_of_the_margin_report():
    """These tests compare constructed numbers, not results of the library."""
    recorded = len(MARGINS)
    yield
    del MARGINS[recorded:]


def _sum_in(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row sums of x [R, n], accumulated left to right in ``dtype`` (every partial rounded)."""
    acc = torch.zeros(x.shape[0], dtype=dtype)
    for column in x.to(dtype).unbind(1):
        acc = (acc + column).to(dtype)
    return acc


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [256, 480, 1024])
def test_low_precision_accumulation_fails_and_fp32_passes(dtype, n):
    x = torch.randn(64, n).to(dtype)  # the inputs as the kernel sees them
    reference = x.double().sum(1)
    eager = x.float().sum(1).to(dtype)  # eager: fp32 accumulation, one rounding
    kernel = x.float().sum(1).to(dtype)
    assert_error_within(kernel, reference, eager, dtype, "fp32 accumulator", reduction=n)
    assert MARGINS[-1]["ratio"] <= 0.5
    with pytest.raises(AssertionError, match="max error"):
        assert_error_within(_sum_in(x, dtype), reference, eager, dtype, f"{dtype} accumulator", reduction=n)


def test_fp32_accumulation_of_many_terms_within_its_floor():
    x = torch.randn(8, 100_000)
    reference = x.double().sum(1)
    assert (x.sum(1).double() - reference).abs().max() <= floor(torch.float32, reference.abs().max().item(), 100_000)


def test_floor_scales_with_magnitude():
    assert floor(torch.float16, 1000.0) == pytest.approx(1000 * floor(torch.float16, 1.0), rel=1e-3)
    assert floor(torch.float32, 1.0, 10_000) > floor(torch.float32, 1.0, 1)
    assert floor(torch.float16, 0.0) > 0, "an exact zero may come back as a denormal"


def test_eager_error_widens_the_bound_and_non_finite_fails():
    ref = torch.ones(4, dtype=torch.float64)
    eager = ref + 0.1
    assert_error_within(ref + 0.15, ref, eager, torch.float32, "within 2 x eager")
    with pytest.raises(AssertionError, match="max error"):
        assert_error_within(ref + 0.25, ref, eager, torch.float32, "beyond 2 x eager")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_error_within(torch.full((4,), float("nan")), ref, ref, torch.float32)
