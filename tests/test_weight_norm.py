"""The folded weight-norm cache of the positional conv (unispeech_kernels/weight_norm.py): reused
while g and v are unchanged, refolded after every change it can see, never handing autograd a
tensor made under inference mode."""
import torch

from unispeech_kernels.ops.pos_conv import fold_weight_norm
from unispeech_kernels import clear_weight_caches
from unispeech_kernels.weight_norm import FoldedWeightNorm


def _params(requires_grad=True):
    g = torch.nn.Parameter(torch.rand(1, 1, 7) + 0.5, requires_grad=requires_grad)
    v = torch.nn.Parameter(torch.randn(8, 2, 7), requires_grad=requires_grad)
    return g, v


def test_cached_without_grad_and_refolded_after_tracked_changes():
    fold, (g, v) = FoldedWeightNorm(), _params()
    with torch.no_grad():
        w = fold(g, v)
        assert fold(g, v) is w
        v.mul_(2.0)  # in place: a version bump
        assert fold(g, v) is not w
        w = fold(g, v)
        g.data = g.data * 3.0  # replaced storage
        assert fold(g, v) is not w
    torch.testing.assert_close(fold(g, v).detach(), fold_weight_norm(g, v).detach())


def test_training_refolds_every_call_with_gradients():
    fold, (g, v) = FoldedWeightNorm(), _params()
    a, b = fold(g, v), fold(g, v)
    assert a is not b and a.requires_grad
    a.sum().backward()
    assert g.grad is not None and v.grad is not None


def test_inference_mode_fold_is_not_reused_for_autograd():
    """Frozen parameters, a forward under inference_mode, then an input that requires grad: the
    fold must be a normal tensor that autograd can save."""
    fold, (g, v) = FoldedWeightNorm(), _params(requires_grad=False)
    with torch.inference_mode():
        assert fold(g, v).is_inference()
        assert fold(g, v) is fold(g, v)
    w = fold(g, v)
    assert not w.is_inference()
    x = torch.randn(w.shape, requires_grad=True)
    (w * x).sum().backward()  # autograd saves w
    torch.testing.assert_close(x.grad, w)


def test_data_writes_need_clear_weight_caches():
    """Writes through .data bump no version counter: documented, and clear_weight_caches() makes
    every fold of the process refold."""
    folds, (g, v) = [FoldedWeightNorm(), FoldedWeightNorm()], _params()
    with torch.no_grad():
        stale = [fold(g, v) for fold in folds]
        v.data.mul_(2.0)
        v.data.add_(1.0)
        assert all(fold(g, v) is w for fold, w in zip(folds, stale))  # the limitation this test documents
        clear_weight_caches()
        for fold in folds:
            torch.testing.assert_close(fold(g, v), fold_weight_norm(g, v))


def test_inference_tensor_parameters_are_never_cached():
    fold = FoldedWeightNorm()
    with torch.inference_mode():
        g, v = _params(requires_grad=False)
        w = fold(g, v)
        v.mul_(2.0)  # no version counter on inference tensors: the fold must not be stale
        torch.testing.assert_close(fold(g, v), fold_weight_norm(g, v))
        assert fold(g, v) is not w
