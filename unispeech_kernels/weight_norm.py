"""Weight norm of the positional conv, folded once for inference.

``weight = g * v / ||v||`` (norm over every dim but the kernel one; weight_norm(dim=2)).
In training (grad enabled and g or v requiring grad) the fold is recomputed every call so autograd
reaches g and v; otherwise the folded weight is cached until g or v change (in place or replaced).
"""
from __future__ import annotations

import torch

from .ops.pos_conv import fold_weight_norm


class FoldedWeightNorm:
    """Callable returning the folded weight of (g, v), cached while they are unchanged."""

    def __init__(self):
        self._key = None
        self._weight = None

    def __call__(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the cache key (data pointers) is not traceable
            return fold_weight_norm(weight_g, weight_v)
        if torch.is_grad_enabled() and (weight_g.requires_grad or weight_v.requires_grad):
            self._key = self._weight = None
            return fold_weight_norm(weight_g, weight_v)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (weight_g, weight_v))
        if key != self._key:
            with torch.no_grad():
                self._weight = fold_weight_norm(weight_g, weight_v)
            self._key = key
        return self._weight
