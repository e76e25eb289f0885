"""from_pretrained / save_pretrained in transformers' folder format, from local folders only.

Reads config.json + model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin or
pytorch_model.bin.index.json, first found in that order. The positional conv's weight norm loads
from either spelling (``conv.weight_g``/``conv.weight_v`` or
``conv.parametrizations.weight.original0``/``original1``) and is saved in the second, which is
what transformers 5.x saves. The base-model prefix ``unispeech.`` is handled both ways as in
transformers: a base checkpoint loads into a head model (the head stays freshly initialised, with
a warning) and a head checkpoint into the base model (head weights ignored, with a warning).
Everything else is strict by default: one error lists missing, unexpected and mismatched keys.
``torch_dtype``: None keeps float32 parameters, "auto" takes config.json's dtype (else the
checkpoint's), or a torch dtype / its name. The model comes back in eval mode.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict

import torch

from .configuration import CONFIG_NAME, UniSpeechConfig

SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_NORM_SPELLINGS = {"conv.weight_g": "conv.parametrizations.weight.original0",
                         "conv.weight_v": "conv.parametrizations.weight.original1"}


def _read_file(path: str) -> Dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a checkpoint at all
        raise ValueError(f"could not read checkpoint file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint file {path} does not hold a dict of tensors")
    return state


def _read_index(folder: str, index_name: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(folder, index_name)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid shard index (needs a 'weight_map'): {e}") from None
    state: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise OSError(f"{path} names shard {shard!r}, which is missing from {folder}")
        state.update(_read_file(shard_path))
    return state


def read_state_dict(folder: str) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors with the weight norm in transformers 5.x's spelling."""
    for name, reader in ((SAFE_NAME, _read_file), (SAFE_INDEX, None), (BIN_NAME, _read_file), (BIN_INDEX, None)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            state = reader(path) if reader else _read_index(folder, name)
            break
    else:
        raise OSError(f"no weights in {folder}: expected one of {SAFE_NAME}, {SAFE_INDEX}, {BIN_NAME}, {BIN_INDEX}")
    out = {}
    for key, value in state.items():
        for old, new in WEIGHT_NORM_SPELLINGS.items():
            if key.endswith("pos_conv_embed." + old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def _align_prefix(model, state: Dict[str, torch.Tensor], expected) -> tuple:
    """Add or strip the base-model prefix; returns (state, keys allowed to be missing, ignored keys)."""
    prefix = model.base_model_prefix + "."
    has_base = hasattr(model, model.base_model_prefix)
    ckpt_prefixed = any(k.startswith(prefix) for k in state)
    if has_base and not ckpt_prefixed:  # base checkpoint -> head model
        head_keys = {k for k in expected if not k.startswith(prefix)}
        return {prefix + k: v for k, v in state.items()}, head_keys, set()
    if not has_base and ckpt_prefixed:  # head checkpoint -> base model
        ignored = {k for k in state if not k.startswith(prefix)}
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, set(), ignored
    return state, set(), set()


def _resolve_dtype(torch_dtype, config, state):
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        if config.dtype is not None:
            return _resolve_dtype(str(config.dtype).replace("torch.", ""), config, state)
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        return floats[0] if floats else None
    dtype = getattr(torch, str(torch_dtype), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype {torch_dtype!r} is not a floating torch dtype (or 'auto')")
    return dtype


def load_pretrained(cls, folder, attn_implementation=None, kernel_backend=None, torch_dtype=None,
                    strict=True, **config_overrides):
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise OSError(f"{folder!r} is not a local folder. There is no model hub access here: download the "
                      f"checkpoint and pass the folder holding {CONFIG_NAME} and the weights")
    config = UniSpeechConfig.from_pretrained(folder, **config_overrides)
    state = read_state_dict(folder)
    model = cls(config, attn_implementation=attn_implementation, kernel_backend=kernel_backend)
    expected = model.state_dict()
    state, may_miss, ignored = _align_prefix(model, state, expected)
    missing = sorted(set(expected) - set(state) - may_miss)
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                        for k, v in state.items() if k in expected and v.shape != expected[k].shape)
    problems = [f"{name} keys ({len(keys)}): {keys}" for name, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
    if problems:
        message = f"checkpoint in {folder} does not fit {cls.__name__}: " + "; ".join(problems)
        if strict:
            raise ValueError(message + " (strict=False loads the matching weights and keeps the rest)")
        warnings.warn(message, stacklevel=2)
    fresh = sorted(may_miss - set(state))
    if fresh:
        warnings.warn(f"{cls.__name__}: newly initialised (not in the checkpoint): {fresh}", stacklevel=2)
    if ignored:
        warnings.warn(f"{cls.__name__}: checkpoint weights not used by this model: {sorted(ignored)}",
                      stacklevel=2)
    bad = {k.split(":")[0] for k in mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k in expected and k not in bad}, strict=False)
    dtype = _resolve_dtype(torch_dtype, config, state)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_pretrained(model, folder):
    from safetensors.torch import save_file
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    config = model.config.copy()
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).replace("torch.", "")
    config.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, SAFE_NAME), metadata={"format": "pt"})
