"""Activation functions by the names transformers' configs use (``feat_extract_activation``,
``hidden_act``). Kernels implement ``gelu`` (exact erf form); the torch path takes them all."""
import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}
_IN_PLACE = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": torch.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
    "tanh": torch.tanh_,
}


def get_activation(name: str, overwrite_temporaries: bool = False):
    """The activation called ``name``. ``overwrite_temporaries=True``: the function overwrites its
    input when that input takes no part in autograd (for callers passing a fresh temporary, e.g. a
    conv or GEMM output in inference): a large out-of-place activation costs an allocation whose
    page faults take ~5x the arithmetic on CPU."""
    try:
        fn = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None
    if not overwrite_temporaries:
        return fn
    in_place = _IN_PLACE[name]
    return lambda x: fn(x) if x.requires_grad else in_place(x)
