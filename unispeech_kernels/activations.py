"""Activation functions by the names transformers' configs use (``feat_extract_activation``,
``hidden_act``): every parameter-free entry of transformers' ACT2FN, with its formula. Kernels
implement ``gelu`` (exact erf form); the torch path takes them all."""
import math

import torch
import torch.nn.functional as F

_SQRT2 = math.sqrt(2.0)
_LAPLACE_MU, _LAPLACE_SIGMA = 0.707107, 0.282095


def _tanh_gelu(x):
    return F.gelu(x, approximate="tanh")


def _tanh_gelu_(x):
    return torch.ops.aten.gelu_(x, approximate="tanh")


# name -> (out-of-place function, in-place function writing into its argument and returning it)
_TABLE = {
    "gelu": (F.gelu, torch.ops.aten.gelu_),
    "gelu_python": (F.gelu, torch.ops.aten.gelu_),
    "gelu_10": (lambda x: F.gelu(x).clamp(-10.0, 10.0), lambda x: torch.ops.aten.gelu_(x).clamp_(-10.0, 10.0)),
    # the tanh approximation under its several names (transformers' formulas agree to rounding)
    "gelu_new": (_tanh_gelu, _tanh_gelu_),
    "gelu_fast": (_tanh_gelu, _tanh_gelu_),
    "gelu_accurate": (_tanh_gelu, _tanh_gelu_),
    "gelu_pytorch_tanh": (_tanh_gelu, _tanh_gelu_),
    "gelu_python_tanh": (_tanh_gelu, _tanh_gelu_),
    "quick_gelu": (lambda x: x * torch.sigmoid(1.702 * x), lambda x: x.mul_(torch.sigmoid(1.702 * x))),
    "hardswish": (F.hardswish, lambda x: F.hardswish(x, inplace=True)),
    "laplace": (lambda x: 0.5 * (1.0 + torch.erf((x - _LAPLACE_MU) / (_LAPLACE_SIGMA * _SQRT2))),
                lambda x: x.sub_(_LAPLACE_MU).div_(_LAPLACE_SIGMA * _SQRT2).erf_().add_(1.0).mul_(0.5)),
    "leaky_relu": (F.leaky_relu, lambda x: F.leaky_relu(x, inplace=True)),
    "linear": (torch.clone, lambda x: x),  # out of place means a fresh tensor, as for the others
    "mish": (F.mish, lambda x: F.mish(x, inplace=True)),
    "relu": (F.relu, torch.relu_),
    "relu2": (lambda x: F.relu(x).square(), lambda x: torch.relu_(x).square_()),
    "relu6": (F.relu6, lambda x: F.relu6(x, inplace=True)),
    "sigmoid": (torch.sigmoid, torch.sigmoid_),
    "silu": (F.silu, lambda x: F.silu(x, inplace=True)),
    "swish": (F.silu, lambda x: F.silu(x, inplace=True)),
    "sqrtsoftplus": (lambda x: F.softplus(x).sqrt(), lambda x: x.copy_(F.softplus(x)).sqrt_()),
    "tanh": (torch.tanh, torch.tanh_),
}
ACTIVATIONS = {name: fns[0] for name, fns in _TABLE.items()}
# transformers' activations with learnable parameters: they would add weights to the checkpoint
LEARNABLE = ("prelu", "xielu")


def get_activation(name: str, overwrite_temporaries: bool = False):
    """The activation called ``name``. ``overwrite_temporaries=True``: the function overwrites its
    input when that input takes no part in autograd (for callers passing a fresh temporary, e.g. a
    conv or GEMM output in inference): a large out-of-place activation costs an allocation whose
    page faults take ~5x the arithmetic on CPU."""
    if name in LEARNABLE:
        raise ValueError(f"activation {name!r} has learnable parameters, which this model does not hold; "
                         f"parameter-free activations: {sorted(ACTIVATIONS)}")
    try:
        fn, in_place = _TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None
    if not overwrite_temporaries:
        return fn
    return lambda x: fn(x) if x.requires_grad else in_place(x)
