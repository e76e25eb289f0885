"""Weight norm of the positional conv, folded once for inference, and the kernels' layouts of weights.

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


_ALL_CACHES: "weakref.WeakSet" = weakref.WeakSet()  # every FoldedWeightNorm and WeightLayouts


def clear_weight_caches() -> None:
    """Forget every cached fold and weight layout in this process (our models' and patched
    transformers models'), e.g. after writing a positional conv's g or v through ``.data``."""
    for fold in list(_ALL_CACHES):
        fold.clear()


def _identity(t: torch.Tensor) -> tuple:
    """What the cache keys a tensor on: its storage, where in it, its version, dtype and device."""
    return StorageWeakRef(t.untyped_storage()), t.data_ptr(), t._version, t.dtype, t.device


class WeightLayouts:
    """Copies of weights in the layout a kernel reads (e.g. the positional conv's permuted taps),
    each made once per weight version: keyed as the fold is (``_identity``) and on what is made. An
    entry goes when its weight's storage is freed; at most ``size`` are kept. Not cached: under
    torch.compile (untraceable keys) and for inference tensors (no version counter)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._entries: list = []  # [(key, layout)], the newest last
        _ALL_CACHES.add(self)

    def clear(self) -> None:
        self._entries = []

    def get(self, weight: torch.Tensor, what, make):
        """``make()``, or what it returned before for the same ``what`` of this weight version."""
        if torch.compiler.is_compiling() or weight.is_inference():
            return make()
        key = (what, _identity(weight))
        self._entries = [e for e in self._entries if not e[0][1][0].expired()]
        for entry_key, layout in self._entries:
            if entry_key == key:
                return layout
        layout = make()
        self._entries = (self._entries + [(key, layout)])[-self.size:]
        return layout


class FoldedWeightNorm:
    """Callable returning the folded weight of (g, v), cached while they are unchanged."""

    def __init__(self):
        self.clear()
        _ALL_CACHES.add(self)

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
