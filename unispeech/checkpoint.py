"""from_pretrained / save_pretrained in transformers' folder format, from local folders only (the
files themselves: unispeech.checkpoint_files).

Keys are matched as transformers matches them, across the head classes: the base-model prefix
``unispeech.`` is added or stripped (a base checkpoint loads into a head model, a head checkpoint
into the base model); the model's own head weights missing from a checkpoint saved by another class
(pre-training -> CTC, CTC -> classification...) are newly initialised, with a warning naming them;
the checkpoint's weights of other heads are ignored, with a warning; so is ``masked_spec_embed``,
which exists only when mask_time_prob or mask_feature_prob is > 0. Everything else is strict by
default: missing or unknown base weights, head weights missing from a checkpoint of this very
class (config.json's ``architectures``), and shape mismatches raise one error listing them
(``strict=False`` loads what fits and warns; ``ignore_mismatched_sizes=True`` newly initialises
mismatched weights with a warning).

dtype (``dtype=``, or ``torch_dtype=`` as older transformers spell it): None means "auto", as in
transformers 5: config.json's dtype, else the checkpoint's (the shard index's, else its first
floating tensor's); or a floating torch dtype / its name. The model comes back in eval mode.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from .checkpoint_files import CheckpointTensors, write_weights
from .configuration import CONFIG_NAME, UniSpeechConfig, to_unispeech_config

SPEC_EMBED = "masked_spec_embed"
# transformers' from_pretrained arguments this loader cannot honour, and why
UNSUPPORTED = {
    **dict.fromkeys(("cache_dir", "force_download", "proxies", "revision", "subfolder", "token",
                     "trust_remote_code"), "it concerns the model hub; this loader reads local folders only"),
    **dict.fromkeys(("device_map", "max_memory", "offload_folder", "tp_plan"),
                    "the model loads on the CPU: move it with model.to(device)"),
    "quantization_config": "quantized loading is not supported",
    "variant": "weight-file variants are not supported",
    "gguf_file": "GGUF files are not supported",
}


@dataclass
class _Plan:
    """How the checkpoint's keys (renamed to the model's names) meet the model's."""
    load: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key
    fresh: List[str] = field(default_factory=list)  # newly initialised, by design
    ignored: List[str] = field(default_factory=list)  # checkpoint keys of other heads
    missing: List[str] = field(default_factory=list)  # strict errors from here on
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, torch.Size, torch.Size]] = field(default_factory=list)


def _plan(model, tensors: CheckpointTensors, same_class: bool) -> _Plan:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    prefix = model.base_model_prefix + "."
    is_head = hasattr(model, model.base_model_prefix)
    base_prefix = prefix if is_head else ""  # of the model's base weights
    ckpt_prefixed = any(k.startswith(prefix) for k in tensors)
    names, ckpt_base = {}, set()  # model-side name -> checkpoint key; model-side names of base weights
    for key in tensors:
        if is_head and not ckpt_prefixed:  # base checkpoint -> head model
            name, base = prefix + key, True
        elif not is_head and ckpt_prefixed:  # head checkpoint -> base model
            base = key.startswith(prefix)
            name = key[len(prefix):] if base else key
        else:
            name, base = key, key.startswith(base_prefix)
        names[name] = key
        if base:
            ckpt_base.add(name)
    spec_embed = base_prefix + SPEC_EMBED
    plan = _Plan()
    for name, shape in expected.items():
        if name in names:
            ckpt_shape = tensors.shape(names[name])
            if ckpt_shape != shape:
                plan.mismatched.append((name, ckpt_shape, shape))
            else:
                plan.load[name] = names[name]
        elif name == spec_embed or (not name.startswith(base_prefix) and not same_class):
            plan.fresh.append(name)
        else:
            plan.missing.append(name)
    for name in names:
        if name not in expected:
            (plan.unexpected if name in ckpt_base and name != spec_embed else plan.ignored).append(name)
    return plan


def _resolve_dtype(requested, argument: str, config: UniSpeechConfig, tensors: CheckpointTensors) -> torch.dtype:
    if isinstance(requested, torch.dtype):
        dtype = requested
    elif requested == "auto":
        if config.dtype is not None:
            return _resolve_dtype(str(config.dtype).replace("torch.", ""), "config.json's dtype", config, tensors)
        dtype = tensors.dtype()
    else:
        dtype = getattr(torch, str(requested), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{argument} {requested!r} is not a floating torch dtype (or 'auto')")
    return dtype


def _load_config(folder, config, overrides) -> UniSpeechConfig:
    """config.json of ``folder``, or ``config`` (a config object or a folder / file path), with overrides."""
    if config is None or isinstance(config, (str, os.PathLike)):
        return UniSpeechConfig.from_pretrained(os.fspath(folder if config is None else config), **overrides)
    config = to_unispeech_config(config, "from_pretrained(config=...)").copy()
    config.update(overrides)
    return config


def load_pretrained(cls, folder, *, config=None, attn_implementation=None, kernel_backend=None, dtype=None,
                    torch_dtype=None, strict=True, ignore_mismatched_sizes=False, output_loading_info=False,
                    use_safetensors=None, local_files_only=False, low_cpu_mem_usage=None, **config_overrides):
    """Build ``cls`` from the local checkpoint folder ``folder``. ``config``: a config (ours or
    transformers') or a path to use instead of the folder's config.json; other keyword arguments
    not named here override config fields. ``output_loading_info=True`` returns (model, {"missing_keys",
    "unexpected_keys", "mismatched_keys", "error_msgs"}) as transformers does. ``local_files_only``
    and ``low_cpu_mem_usage`` hold whatever their value: nothing is ever downloaded and tensors are
    always read one at a time."""
    for name in config_overrides:
        if name in UNSUPPORTED:
            raise ValueError(f"from_pretrained does not support {name}=: {UNSUPPORTED[name]}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise OSError(f"{folder!r} is not a local folder. There is no model hub access here: download the "
                      f"checkpoint and pass the folder holding {CONFIG_NAME} and the weights")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass one of them")
    argument = "dtype" if dtype is not None or torch_dtype is None else "torch_dtype"
    requested = next((d for d in (dtype, torch_dtype) if d is not None), "auto")
    config = _load_config(folder, config, config_overrides)
    tensors = CheckpointTensors(folder, use_safetensors)
    resolved = _resolve_dtype(requested, argument, config, tensors)
    model = cls(config, attn_implementation=attn_implementation, kernel_backend=kernel_backend).to(resolved)
    model.config.dtype = str(resolved).replace("torch.", "")
    plan = _plan(model, tensors, same_class=cls.__name__ in (config.architectures or ()))
    _report(cls.__name__, folder, plan, strict, ignore_mismatched_sizes)
    targets = model.state_dict()
    with torch.no_grad():
        for name, key in plan.load.items():
            tensor = tensors[key]
            if tensor.is_floating_point() != targets[name].is_floating_point():
                raise TypeError(f"checkpoint in {folder}: {key} is {tensor.dtype}, the model's {name} is "
                                f"{targets[name].dtype}: the checkpoint does not hold this model's weights")
            targets[name].copy_(tensor)
    model.eval()
    if not output_loading_info:
        return model
    return model, {"missing_keys": set(plan.fresh + plan.missing),
                   "unexpected_keys": set(plan.ignored + plan.unexpected),
                   "mismatched_keys": set(plan.mismatched), "error_msgs": []}


def _report(cls_name: str, folder: str, plan: _Plan, strict: bool, ignore_mismatched_sizes: bool):
    """Raise (strict) or warn about what does not fit; warn about what is initialised or ignored."""
    mismatched = sorted(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in plan.mismatched)
    problems = [f"{what} keys ({len(keys)}): {keys}" for what, keys in
                (("missing", sorted(plan.missing)), ("unexpected", sorted(plan.unexpected)),
                 ("shape-mismatched", [] if ignore_mismatched_sizes else mismatched)) if keys]
    if problems:
        message = f"checkpoint in {folder} does not fit {cls_name}: " + "; ".join(problems)
        if strict:
            raise ValueError(message + " (strict=False loads the matching weights and keeps the rest; "
                             "ignore_mismatched_sizes=True newly initialises shape-mismatched ones)")
        warnings.warn(message, stacklevel=4)
    if plan.fresh:
        warnings.warn(f"{cls_name}: newly initialised (not in the checkpoint): {sorted(plan.fresh)}", stacklevel=4)
    if ignore_mismatched_sizes and mismatched:
        warnings.warn(f"{cls_name}: newly initialised (shape differs from the checkpoint's): {mismatched}",
                      stacklevel=4)
    if plan.ignored:
        warnings.warn(f"{cls_name}: checkpoint weights not used by this model: {sorted(plan.ignored)}",
                      stacklevel=4)


def save_pretrained(model, folder, state_dict=None, safe_serialization=True, max_shard_size="50GB"):
    """config.json (architectures and dtype set) + the weights (unispeech.checkpoint_files.write_weights)."""
    state = model.state_dict() if state_dict is None else state_dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError("state_dict must be a dict of tensors")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    config = model.config.copy()
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).replace("torch.", "")
    config.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_weights(folder, state, safe_serialization=safe_serialization, max_shard_size=max_shard_size)
