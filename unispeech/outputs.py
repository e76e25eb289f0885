"""Model outputs with transformers' class and field names.

Each behaves like transformers' ModelOutput: a dataclass that is also an OrderedDict of its fields
that are not None (in field order as built; a field set later goes last). Attribute access (``out.logits``), key access
(``out["logits"]``, ``out.get("loss")``, ``"loss" in out``), index access over the fields that are
not None (``out[0]``, ``out[:2]``), ``keys()`` / ``values()`` / ``items()``, ``dict(out)`` and
``to_tuple()`` (what ``return_dict=False`` returns). Setting a field, as an attribute or an item,
updates both views (None removes the key); keys other than the fields, ``pop``, ``update``,
``setdefault``, ``clear`` and ``del`` are refused. Every class is a torch pytree node (torch.compile,
DistributedDataParallel) and can be rebuilt from (name, value) pairs, as DataParallel's gather
and ``type(out)(out.items())`` do.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch
import torch.utils._pytree as pytree


def _flatten(out: "ModelOutput"):
    return list(out.values()), list(out.keys())


def _flatten_with_keys(out: "ModelOutput"):
    return [(pytree.MappingKey(k), v) for k, v in out.items()], list(out.keys())


def _unflatten(cls, values, keys) -> "ModelOutput":
    return cls(**dict(zip(keys, values)))


class ModelOutput(OrderedDict):
    """Base of the @dataclass outputs below (see the module docstring)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(cls, _flatten, functools.partial(_unflatten, cls),
                                    serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
                                    flatten_with_keys_fn=_flatten_with_keys)

    def __post_init__(self):
        names = [f.name for f in fields(self)]
        first = getattr(self, names[0])
        if first is None or isinstance(first, torch.Tensor) or any(getattr(self, n) is not None for n in names[1:]):
            return
        try:  # the only argument may hold the fields as (name, value) pairs or a mapping
            pairs = list(first.items() if isinstance(first, dict) else first)
        except TypeError:
            return
        if not pairs or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
            return  # a plain value of the first field
        unknown = [name for name, _ in pairs if name not in names]
        if unknown:
            raise TypeError(f"{type(self).__name__} takes its fields or (name, value) pairs with names among "
                            f"{names}; got {unknown}")
        setattr(self, names[0], None)
        for name, value in pairs:
            setattr(self, name, value)

    def __setattr__(self, name, value):
        if name in self.__dataclass_fields__:
            if value is None:
                OrderedDict.pop(self, name, None)
            else:
                OrderedDict.__setitem__(self, name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        if key not in self.__dataclass_fields__:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: {list(self.__dataclass_fields__)}")
        setattr(self, key, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self:
                raise KeyError(f"{type(self).__name__} has no field {key!r} set; set fields: {list(self.keys())}")
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} keys follow its fields: set a field (to None to drop it) instead")

    pop = update = setdefault = popitem = clear = __delitem__ = _refuse

    def __reduce__(self):  # pickle / deepcopy through the fields
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self) -> tuple:
        return tuple(self.values())


@dataclass
class Wav2Vec2BaseModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    extract_features: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


UniSpeechBaseModelOutput = Wav2Vec2BaseModelOutput


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
