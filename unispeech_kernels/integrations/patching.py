"""Accelerate loaded transformers models in place: ``patch_model(model)`` / ``unpatch_model(model)``.

Supported: UniSpeech, UniSpeechSat, Wav2Vec2 and HuBERT (base models and every head). Patched:
- the feature encoder (``*FeatureEncoder``) -> ``unispeech_kernels.feature_encoder`` (it returns
  [B, T, C]; transformers wants [B, C, T], so a transposed view is returned and transformers'
  own transpose back is free);
- the positional conv (``*PositionalConvEmbedding``) -> ``unispeech_kernels.pos_conv_embed``
  with the weight norm folded once in inference (transformers adds the residual itself, so the
  op runs without it);
- attention -> ``attn_implementation="triton"`` (registered with transformers on import).
Only instance attributes are added (``forward`` overrides and a record of what was patched), so
parameters stay shared, state_dict keys and values are unchanged, and ``unpatch_model`` restores
the original behaviour bit for bit.
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from ..dispatch import resolve_backend
from ..ops.feature_encoder import feature_encoder
from ..ops.pos_conv import pos_conv_embed
from ..weight_norm import FoldedWeightNorm

SUPPORTED_MODEL_TYPES = ("unispeech", "unispeech-sat", "wav2vec2", "hubert")
_STATE = "_unispeech_kernels_patch"  # attribute on the model: what patch_model changed


def _model_type(model) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _feature_encoder_forward(module, activation: str, backend):
    layers = list(module.conv_layers)
    group_mode = type(layers[0]).__name__.endswith("GroupNormConvLayer")
    norm_mode = "group" if group_mode else "layer"
    norms = [layers[0].layer_norm] if group_mode else [layer.layer_norm for layer in layers]

    def forward(self, input_values):
        return feature_encoder(
            input_values, [l.conv.weight for l in layers], [l.conv.bias for l in layers],
            [l.conv.stride[0] for l in layers], norm_mode, [n.weight for n in norms],
            [n.bias for n in norms], eps=norms[0].eps, activation=activation,
            backend=resolve_backend("feature_encoder", backend),
        ).transpose(1, 2)

    return forward


def _feature_encoder_reason(module) -> Optional[str]:
    layers = list(module.conv_layers)
    names = [type(l).__name__ for l in layers]
    if names[0].endswith("GroupNormConvLayer"):  # group mode: GroupNorm on layer 0 only
        ok = all(n.endswith("NoLayerNormConvLayer") for n in names[1:])
    else:  # layer mode: LayerNorm after every conv ("NoLayerNorm..." also ends in "LayerNorm...")
        ok = all(n.endswith("LayerNormConvLayer") and not n.endswith("NoLayerNormConvLayer") for n in names)
    if not ok:
        return f"unsupported conv layer mix {names}"
    for l in layers:
        c = l.conv
        if c.padding not in (0, (0,)) or c.dilation != (1,) or c.groups != 1:
            return "conv layers with padding, dilation or groups are not supported"
        norm = getattr(l, "layer_norm", None)
        if norm is not None and (norm.weight is None or norm.bias is None):
            return "norm layers without affine parameters are not supported"
    return None


def _pos_conv_forward(module, activation: str, backend):
    fold = FoldedWeightNorm()
    conv = module.conv
    groups = conv.groups
    batch_norm = getattr(module, "batch_norm", None)  # HuBERT's conv_pos_batch_norm variant

    def weight():
        if hasattr(conv, "parametrizations"):
            p = conv.parametrizations.weight
            return fold(p.original0, p.original1)
        if hasattr(conv, "weight_g"):
            return fold(conv.weight_g, conv.weight_v)
        return conv.weight

    def forward(self, hidden_states):
        if batch_norm is not None:
            hidden_states = batch_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return pos_conv_embed(hidden_states, weight(), conv.bias, groups=groups, activation=activation,
                              residual=False, backend=resolve_backend("pos_conv", backend))

    return forward


def patch_model(model, backend: Optional[str] = None):
    """Route a transformers UniSpeech / UniSpeechSat / Wav2Vec2 / HuBERT model's hot spots through
    unispeech_kernels. ``backend`` forces one backend for the feature encoder and positional conv
    (None: the dispatcher picks per input; "cuda": the CUDA extension where the op has it, else
    Triton, see ``dispatch.resolve_backend``). Returns the model; patching twice is a no-op."""
    model_type = _model_type(model)
    if not isinstance(model, torch.nn.Module) or model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"patch_model supports transformers models of type {SUPPORTED_MODEL_TYPES}; "
                        f"got {type(model).__name__} (model_type={model_type!r})")
    if getattr(model, _STATE, None) is not None:
        return model
    from .transformers import register_transformers_attention

    register_transformers_attention()
    activation = model.config.feat_extract_activation
    patched, skipped = [], {}
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("FeatureEncoder") and hasattr(module, "conv_layers"):
            reason = _feature_encoder_reason(module)
            make = _feature_encoder_forward
        elif cls.endswith("PositionalConvEmbedding") and hasattr(module, "conv"):
            reason = None
            make = _pos_conv_forward
        else:
            continue
        if reason:
            skipped[name] = reason
            continue
        module.forward = types.MethodType(make(module, activation, backend), module)
        patched.append(module)
    original_attn = model.config._attn_implementation
    model.set_attn_implementation("triton")
    setattr(model, _STATE, {"modules": patched, "attn_implementation": original_attn, "skipped": skipped})
    return model


def unpatch_model(model):
    """Undo patch_model: the original forwards and attention implementation come back."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for module in state["modules"]:
        del module.forward  # the class's forward shows through again
    model.set_attn_implementation(state["attn_implementation"])
    delattr(model, _STATE)
    return model
