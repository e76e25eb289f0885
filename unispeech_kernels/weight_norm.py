"""Weight norm of the positional conv, folded once for inference.

``weight = g * v / ||v||`` (norm over every dim but the kernel one; weight_norm(dim=2)).
In training (grad enabled and g or v requiring grad) the fold is recomputed every call so autograd
reaches g and v; otherwise the folded weight is cached until g or v change: in place (their
version counters), replaced (their storage: ``load_state_dict(assign=True)``, ``.to`` / ``.half``),
or cast. Storages are told apart by weak references, which keep a freed storage's address from
being reused, so a new tensor at an old tensor's address is seen too. A fold made under
``torch.inference_mode`` is reused only there (autograd may not save such a tensor);
inference-tensor parameters are never cached. Writes through ``.data`` cannot be seen (PyTorch
gives them no version bump; ``with torch.no_grad(): p.copy_(...)`` is the tracked spelling): after
one, call ``clear_weight_caches()``. A copy (``copy.deepcopy``, pickle, ``torch.save``) starts with
an empty cache of its own: it never shares a fold with its source.
"""
from __future__ import annotations

import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .ops.pos_conv import fold_weight_norm


_ALL_FOLDS: "weakref.WeakSet[FoldedWeightNorm]" = weakref.WeakSet()


def clear_weight_caches() -> None:
    """Forget every cached fold in this process (our models' and patched transformers models'), e.g.
    after writing a positional conv's g or v through ``.data``."""
    for fold in list(_ALL_FOLDS):
        fold.clear()


def _identity(t: torch.Tensor) -> tuple:
    """What the cache keys a tensor on: its storage, where in it, its version, dtype and device."""
    return StorageWeakRef(t.untyped_storage()), t.data_ptr(), t._version, t.dtype, t.device


class FoldedWeightNorm:
    """Callable returning the folded weight of (g, v), cached while they are unchanged."""

    def __init__(self):
        self.clear()
        _ALL_FOLDS.add(self)

    def __reduce__(self):  # copies and unpickled models get a fresh, empty, registered cache
        return FoldedWeightNorm, ()

    def clear(self) -> None:
        """Forget the cached fold (after changing g or v in a way the cache cannot see)."""
        self._key = None
        self._weight = None

    def __call__(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the cache key (storages) is not traceable
            return fold_weight_norm(weight_g, weight_v)
        training = torch.is_grad_enabled() and (weight_g.requires_grad or weight_v.requires_grad)
        # training: autograd must see the fold; inference tensors: no version counter to key on
        if training or weight_g.is_inference() or weight_v.is_inference():
            self.clear()
            return fold_weight_norm(weight_g, weight_v)
        key = (torch.is_inference_mode_enabled(), _identity(weight_g), _identity(weight_v))
        if key != self._key:
            with torch.no_grad():
                self._weight = fold_weight_norm(weight_g, weight_v)
            self._key = key
        return self._weight
