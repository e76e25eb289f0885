"""Every torch.library op of the package through torch.library.opcheck: schema, autograd
registration, fake (meta) kernels that give exactly the real outputs' sizes and strides (Inductor
asserts them), and torch.compile's aot dispatch with gradients. Inputs are deliberately awkward:
non-contiguous views, a kernel size that is not a power of two, an empty sequence. The Triton
kernels run through TRITON_INTERPRET=1 on CPU machines: tiny shapes."""
import pytest
import torch

from unispeech_kernels._runtime import interpret_mode
from unispeech_kernels.ops._common import NORM_GROUP, NORM_LAYER, NORM_NONE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.unispeech_kernels
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpret_mode(), reason="Triton kernels need the interpreter")


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()


def _check(op, args):
    torch.library.opcheck(op, args)


def _forward(op, args):
    """A forward op's outputs (no autograd history) for checking its backward op."""
    with torch.no_grad():
        return op(*args)


def _detached(*tensors):
    return [t.detach() if t is not None else None for t in tensors]


def _qkv(*shape):
    """q, k, v as non-contiguous views of one [..., 3, H, D] projection, leaves of autograd."""
    qkv = _leaf(*shape[:-2], 3, *shape[-2:])
    return list(qkv.unbind(-3))


def test_attention():
    q, k, v = _qkv(2, 19, 2, 24)
    mask = torch.arange(19, device=DEVICE)[None] < torch.tensor([19, 7], device=DEVICE)[:, None]
    lengths = torch.tensor([19, 7], device=DEVICE)
    for mask_args in ((mask, None), (None, lengths)):  # a mask, or a prefix mask's lengths
        _check(OPS.attention_fwd, (q, k, v, *mask_args, 0.0, 0.2))
        out, lse, seed = _forward(OPS.attention_fwd, (q, k, v, *mask_args, 0.0, 0.2))
        dout = torch.randn_like(out).transpose(0, 1).contiguous().transpose(0, 1)  # any strides
        _check(OPS.attention_bwd, (dout, *_detached(q, k, v), out, lse, seed, *mask_args, 0.0, 0.2))


def test_attention_packed():
    lengths = [9, 0, 4]
    q, k, v = _qkv(13, 2, 24)
    _check(OPS.attention_packed_fwd, (q, k, v, lengths, 0.0, 0.2))
    out, lse, seed = _forward(OPS.attention_packed_fwd, (q, k, v, lengths, 0.0, 0.2))
    _check(OPS.attention_packed_bwd, (torch.randn_like(out), *_detached(q, k, v), out, lse, seed, lengths, 0.0, 0.2))


@pytest.mark.parametrize("norm", [NORM_NONE, NORM_LAYER])
def test_conv_layer(norm):
    x = _leaf(2, 16, 23).transpose(1, 2)  # [B, T, C] with channel stride T
    w, b = _leaf(16, 16, 3), _leaf(16)
    g, beta = (_leaf(16), _leaf(16)) if norm else (None, None)
    _check(OPS.conv_layer_fwd, (x, w, b, g, beta, 2, norm, 1e-5, True))
    out, y, mean, rstd = _forward(OPS.conv_layer_fwd, (x, w, b, g, beta, 2, norm, 1e-5, True))
    x, w, g, beta = _detached(x, w, g, beta)
    _check(OPS.conv_layer_bwd, (torch.randn_like(out), x, w, y, mean, rstd, g, beta, 2, norm, True, True, True))


@pytest.mark.parametrize("norm", [NORM_GROUP, NORM_LAYER])
def test_first_conv_layer(norm):
    x = _leaf(400, 2).t()  # [B, L] with sample stride B
    w, b = _leaf(16, 1, 10), (_leaf(16) if norm == NORM_LAYER else None)  # K 10: dW kept in 16 taps inside
    g, beta = _leaf(16), _leaf(16)
    _check(OPS.first_conv_layer_fwd, (x, w, b, g, beta, None, 5, norm, 1e-5))
    out, mean, rstd = _forward(OPS.first_conv_layer_fwd, (x, w, b, g, beta, None, 5, norm, 1e-5))
    _check(OPS.first_conv_layer_bwd, (torch.randn_like(out), *_detached(x, w, b, g, beta), None, mean, rstd, 5, norm,
                                      1e-5, True))


def test_pos_conv():
    x = _leaf(2, 16, 21).transpose(1, 2)  # [B, T, C] with channel stride T
    w, b = _leaf(16, 4, 7), _leaf(16)
    _check(OPS.pos_conv_fwd, (x, w, b, 4, True, True))
    out, pre = _forward(OPS.pos_conv_fwd, (x, w, b, 4, True, True))
    _check(OPS.pos_conv_bwd, (torch.randn_like(out), *_detached(x, w), pre, 4, True, True, True, True))
