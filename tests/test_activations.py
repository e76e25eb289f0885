"""Activations by config name, and the in-place variant used on fresh temporaries in inference."""
import pytest
import torch

from unispeech_kernels.activations import ACTIVATIONS, get_activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_overwrite_temporaries_matches_and_respects_autograd(name):
    x = torch.randn(4, 33)
    want = ACTIVATIONS[name](x)
    act = get_activation(name, overwrite_temporaries=True)
    tmp = x.clone()
    out = act(tmp)
    torch.testing.assert_close(out, want)
    assert out.data_ptr() == tmp.data_ptr(), "a tensor outside autograd is overwritten in place"
    leaf = x.clone().requires_grad_()
    out = act(leaf)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), x)
    out.sum().backward()
    ref = x.clone().requires_grad_()
    ACTIVATIONS[name](ref).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="gelu"):
        get_activation("nope")
