"""transformers integration: ``attn_implementation="triton"`` for transformers' own models.

Registered with transformers 5.x as soon as both exist, whichever is imported first, without our
import importing transformers: on ``import unispeech_kernels`` the interfaces already imported are
registered at once, and an import hook (``register_when_imported``) registers each of the others
right after transformers imports its module (``transformers.modeling_utils``, where
``AttentionInterface`` lives, and ``transformers.masking_utils``, ``AttentionMaskInterface``).
``register_transformers_attention()`` registers both explicitly (importing transformers). Registered:
- an attention function under ``AttentionInterface``: transformers calls it with query/key/value
  [B, H, S, D] and expects ([B, S, H, D], None) back; we pass [B, S, H, D] views (no copies) to
  ``unispeech_kernels.attention`` with Triton asked for: where it cannot run (a CPU without
  TRITON_INTERPRET, an old GPU) SDPA runs instead, with a warning naming the reason, once;
- a mask function under ``AttentionMaskInterface``. Without one, transformers skips mask creation
  for unknown implementations and the padding mask silently disappears. Ours returns the bool
  [B, S] key-padding mask itself (True = real frame), which the kernels consume directly.
Only bidirectional self-attention is supported (the wav2vec2-family encoders); causal or
cross-attention raise a clear error. A 4-D mask prepared by the caller is handed to transformers'
SDPA function (logged once).
"""
from __future__ import annotations

import importlib.abc
import logging
import sys

import torch

from ..ops.attention import attention

log = logging.getLogger("unispeech_kernels.integrations.transformers")

ATTN_IMPLEMENTATION = "triton"
_warned = set()


def _log_once(key: str, msg: str, level=logging.WARNING):
    if key not in _warned:
        _warned.add(key)
        log.log(level, msg)


def triton_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, **kwargs):
    """transformers mask-interface function: the bool [B, kv_length] key-padding mask, or None."""
    from transformers.masking_utils import bidirectional_mask_function
    if mask_function is not None and mask_function is not bidirectional_mask_function:
        raise ValueError(f'attn_implementation="{ATTN_IMPLEMENTATION}" supports bidirectional attention with a '
                         "key-padding mask only, got mask function "
                         f"{getattr(mask_function, '__name__', mask_function)}")
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def triton_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers attention-interface function (see the module docstring)."""
    if kwargs.get("output_attentions"):
        _log_once("output_attentions", f'attn_implementation="{ATTN_IMPLEMENTATION}" does not return attention '
                  'weights (output_attentions=True); use attn_implementation="eager" for them')
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if is_causal:
        raise ValueError(f'attn_implementation="{ATTN_IMPLEMENTATION}" is bidirectional only (is_causal=True given)')
    if key.shape[2] != query.shape[2]:
        raise ValueError(f'attn_implementation="{ATTN_IMPLEMENTATION}" needs self-attention: query length '
                         f"{query.shape[2]} != key length {key.shape[2]}")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if attention_mask is not None and attention_mask.dim() == 4:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _log_once("mask4d", "a prepared 4-D attention mask is not a key-padding mask: using transformers' sdpa")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=False, **kwargs)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                    dropout_p=dropout, softmax_scale=scaling, backend="triton", fallback=True)
    return out, None


def _register_attention(modeling_utils) -> None:
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, triton_attention_forward)


def _register_mask(masking_utils) -> None:
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, triton_mask)


# transformers' module -> what registers with it, once it is imported
_REGISTER = {"transformers.modeling_utils": _register_attention, "transformers.masking_utils": _register_mask}


def register_transformers_attention() -> bool:
    """Register the attention and mask functions with transformers under "triton" now (importing
    transformers). Idempotent; returns False (and logs at debug level) when transformers is not
    installed."""
    try:
        from transformers import masking_utils, modeling_utils
    except ImportError as e:
        log.debug("transformers not available, attention not registered (%s)", e)
        return False
    _register_attention(modeling_utils)
    _register_mask(masking_utils)
    return True


class _RegisteringLoader(importlib.abc.Loader):
    """The loader of one of ``_REGISTER``'s modules: runs the module, then registers with it."""

    def __init__(self, loader, register):
        self._loader, self._register = loader, register

    def __getattr__(self, name):  # get_source, resource readers...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._register(module)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds ``_REGISTER``'s modules through the other finders and wraps their loaders."""

    def find_spec(self, name, path=None, target=None):
        if name not in _REGISTER:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, _REGISTER[name])
                return spec
        return None


def register_when_imported() -> None:
    """Register with the transformers modules imported already; hook the import of the others."""
    waiting = False
    for name, register in _REGISTER.items():
        module = sys.modules.get(name)
        if module is not None:
            register(module)
        else:
            waiting = True
    if waiting and not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
