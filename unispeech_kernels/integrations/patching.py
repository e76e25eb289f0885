"""Accelerate loaded transformers models in place: ``patch_model(model)`` / ``unpatch_model(model)``.

Supported: UniSpeech, UniSpeechSat, Wav2Vec2, HuBERT and WavLM (base models and every head). Patched:
- the feature encoder (``*FeatureEncoder``) -> ``unispeech_kernels.feature_encoder`` (it returns
  [B, T, C]; transformers wants [B, C, T], so a transposed view is returned and transformers'
  own transpose back is free); one fused op, so with gradient checkpointing on it is recomputed
  whole in the backward pass instead of conv layer by conv layer;
- the positional conv (``*PositionalConvEmbedding``) -> ``unispeech_kernels.pos_conv_embed``
  with the weight norm folded once in inference (transformers adds the residual itself, so the
  op runs without it);
- attention -> ``attn_implementation="triton"`` (registered with transformers on import; unless
  ``config.output_attentions`` is set: transformers then allows eager attention only, which stays); WavLM's
  ``WavLMAttention`` (gated relative-position bias, outside transformers' attention interface) ->
  ``unispeech_kernels.rel_pos_attention`` with the layer's own projections and gate. The first
  layer passes its ``RelativePositionBias`` (the shared bucket table, no [B*H, T, T] tensor) down
  as transformers passes its ``position_bias``; given a tensor ``position_bias`` or asked for
  attention weights, a layer runs transformers' forward (the latter with a warning, once).

Padded batches: batched equals alone, as in unispeech's own classes. transformers' feature encoder
is called with the audio only, so the base model (``*Model``, the one holding the feature encoder)
gets a forward pre-hook that hands the ``attention_mask`` the model receives to its patched feature
encoder as utterance lengths (held on the encoder for that one call, dropped by a forward hook):
the group norm of "group" checkpoints then takes its statistics over each utterance's real frames.
``model.config.batch_invariant_group_norm = False`` before patching keeps transformers' padded
numerics (statistics over the padded length). transformers' ``Wav2Vec2FeatureExtractor`` returns no
mask for group-norm checkpoints: call it with ``return_attention_mask=True`` and pass the mask on.
Without a mask every sample is real, as in transformers: a padded row is computed as one
utterance of the padded length, padding included, and its output depends on that padding.

How: a patched module keeps its identity, parameters, buffers and hooks; only its class becomes
a subclass of its own (``Patched<Name>``) whose ``forward`` runs the op on ``self``'s parameters,
with its few settings (backend, activation, the weight-norm cache) in one attribute of the module.
Nothing refers to another module, so a patched model is an ordinary model: ``copy.deepcopy``
computes with the copy's weights, state_dict keys are unchanged, isinstance checks hold, and
``.to`` / ``.half``, train / eval, hooks and ``torch.compile`` act as on the original. Pickles
(``torch.save`` of the whole model) name transformers' class and remake the patched subclass
when loaded, in any process that can import unispeech_kernels. ``save_pretrained`` writes what
the unpatched model writes. ``unpatch_model`` restores the classes and the attention
implementation, so outputs are bit for bit the original ones.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.checkpoint

from ..dispatch import BACKEND_NAMES, resolve_backend
from ..ops.feature_encoder import feature_encoder
from ..ops.pos_conv import pos_conv_embed
from ..ops.rel_pos_attention import RelativePositionBias, bias_reference, rel_pos_attention
from ..weight_norm import FoldedWeightNorm

SUPPORTED_MODEL_TYPES = ("unispeech", "unispeech-sat", "wav2vec2", "hubert", "wavlm")
REL_POS_MODEL_TYPES = ("wavlm",)  # attention outside transformers' attention interface, patched as a module
_SETTINGS = "_unispeech_kernels"  # attribute of a patched module: its KernelSettings
_STATE = "_unispeech_kernels_patch"  # attribute of a patched model: what patch_model changed
_LENGTHS = "_unispeech_kernels_lengths"  # attribute of a patched feature encoder during a forward: [B] samples


@dataclass
class KernelSettings:
    """What a patched module's forward needs besides its own parameters."""
    backend: Optional[str]  # forced backend (patch_model's argument), None: the dispatcher picks
    activation: str  # config.feat_extract_activation
    norm_mode: Optional[str] = None  # feature encoder: "group" (layer 0 only) or "layer" (every layer)
    batch_invariant: bool = True  # feature encoder: group statistics over each utterance's real frames
    fold: Optional[FoldedWeightNorm] = None  # positional conv: its weight-norm cache (a copy starts empty)


class PatchedModule:
    """Base of the patched classes; ``unpatched_class`` is the transformers class they extend."""
    unpatched_class: type

    def __reduce_ex__(self, protocol):
        # pickle / deepcopy: name transformers' class, so loading needs no dynamically made name
        return _new_patched, (self.unpatched_class,), self.__getstate__()


class PatchedFeatureEncoder(PatchedModule):
    """A transformers ``*FeatureEncoder`` running as one ``unispeech_kernels.feature_encoder`` op."""

    def forward(self, input_values):
        lengths = getattr(self, _LENGTHS, None)  # [B] samples, from the base model's attention_mask
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            # non-reentrant: the parameters get gradients although the audio needs none
            return torch.utils.checkpoint.checkpoint(self._kernel_forward, input_values, lengths,
                                                     use_reentrant=False)
        return self._kernel_forward(input_values, lengths)

    def _kernel_forward(self, input_values, input_lengths):
        settings = getattr(self, _SETTINGS)
        layers = self.conv_layers
        norms = [l.layer_norm for l in (layers if settings.norm_mode == "layer" else layers[:1])]
        features = feature_encoder(
            input_values, [l.conv.weight for l in layers], [l.conv.bias for l in layers],
            [l.conv.stride[0] for l in layers], settings.norm_mode, [n.weight for n in norms],
            [n.bias for n in norms], eps=norms[0].eps, activation=settings.activation, input_lengths=input_lengths,
            batch_invariant=settings.batch_invariant, backend=resolve_backend("feature_encoder", settings.backend))
        return features.transpose(1, 2)  # [B, C, T], as transformers returns it


class PatchedPositionalConvEmbedding(PatchedModule):
    """A transformers ``*PositionalConvEmbedding`` running as one ``unispeech_kernels.pos_conv_embed`` op."""

    def forward(self, hidden_states):
        settings = getattr(self, _SETTINGS)
        batch_norm = getattr(self, "batch_norm", None)  # HuBERT's conv_pos_batch_norm variant
        if batch_norm is not None:
            hidden_states = batch_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return pos_conv_embed(hidden_states, self._conv_weight(settings.fold), self.conv.bias,
                              groups=self.conv.groups, activation=settings.activation, residual=False,
                              backend=resolve_backend("pos_conv", settings.backend))

    def _conv_weight(self, fold: FoldedWeightNorm) -> torch.Tensor:
        conv = self.conv
        if hasattr(conv, "parametrizations"):  # nn.utils.parametrizations.weight_norm
            p = conv.parametrizations.weight
            return fold(p.original0, p.original1)
        if hasattr(conv, "weight_g"):  # the older nn.utils.weight_norm
            return fold(conv.weight_g, conv.weight_v)
        return conv.weight


def _hand_lengths_to_feature_encoder(model, args, kwargs):
    """Forward pre-hook of a base model: its attention_mask [B, L] -> [B] sample lengths, held on its
    patched feature encoder for this call."""
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    setattr(model.feature_extractor, _LENGTHS, None if mask is None else mask.sum(-1))


def _drop_lengths(model, args, output):
    """Forward hook of a base model (also called when the forward raises)."""
    setattr(model.feature_extractor, _LENGTHS, None)


def _base_models(model):
    """The modules whose forward calls a patched feature encoder (``feature_extractor``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "feature_extractor", None), PatchedFeatureEncoder)]


class PatchedRelPosAttention(PatchedModule):
    """A transformers ``WavLMAttention`` running as one ``unispeech_kernels.rel_pos_attention`` op
    between its own projections. Returns (output, None, the ungated bias to pass down)."""

    def forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
        if _attention_weights_requested(kwargs) or isinstance(position_bias, torch.Tensor):
            if isinstance(position_bias, RelativePositionBias):  # the tensor transformers passes down
                B, S = hidden_states.shape[:2]
                bias = bias_reference(position_bias.table, S, position_bias.num_buckets, position_bias.max_distance)
                position_bias = bias[None].expand(B, -1, -1, -1).reshape(B * self.num_heads, S, S)
            return self.unpatched_class.forward(self, hidden_states, attention_mask, position_bias, index, **kwargs)
        settings = getattr(self, _SETTINGS)
        B, S, _ = hidden_states.shape
        heads = hidden_states.view(B, S, self.num_heads, self.head_dim)
        if position_bias is None:  # the first layer: its table serves every layer
            position_bias = RelativePositionBias(self.rel_attn_embed.weight, self.num_buckets, self.max_distance)
        # gate [B, S, H] from each head's slice of the layer input: two sums of 4 projections
        projected = self.gru_rel_pos_linear(heads).view(B, S, self.num_heads, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(projected).unbind(-1)
        gate = gate_a * (gate_b * self.gru_rel_pos_const.view(self.num_heads) - 1.0) + 2.0
        q, k, v = (proj(hidden_states).view(B, S, self.num_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = rel_pos_attention(q, k, v, position_bias.gated(gate),
                                attention_mask == 1 if attention_mask is not None else None,
                                dropout_p=self.dropout if self.training else 0.0, softmax_scale=self.scaling,
                                backend=resolve_backend("rel_pos_attention", settings.backend), fallback=True)
        return self.out_proj(out.reshape(B, S, self.embed_dim)), None, position_bias


def _attention_weights_requested(kwargs) -> bool:
    """output_attentions asked for, as a keyword or through transformers' output recorder (a config
    default); warns once that the layer runs transformers' forward for them."""
    requested = bool(kwargs.get("output_attentions"))
    if not requested:
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:
            return False
        requested = "attentions" in (_active_collector.get() or {})
    if requested and "output_attentions" not in _WARNED:
        _WARNED.add("output_attentions")
        warnings.warn("patch_model: attention weights were asked for (output_attentions=True): WavLM attention "
                      "runs transformers' eager forward for them", stacklevel=3)
    return requested


_WARNED: set = set()
_PATCHED_CLASSES: dict = {}  # transformers class -> its patched subclass
_PATCHED_BASES = (("FeatureEncoder", PatchedFeatureEncoder),  # (transformers class name suffix, patched base)
                  ("PositionalConvEmbedding", PatchedPositionalConvEmbedding), ("Attention", PatchedRelPosAttention))


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        base = next(patched for suffix, patched in _PATCHED_BASES if cls.__name__.endswith(suffix))
        _PATCHED_CLASSES[cls] = type(f"Patched{cls.__name__}", (base, cls),
                                     {"unpatched_class": cls, "__module__": __name__})
    return _PATCHED_CLASSES[cls]


def _new_patched(cls: type):
    """An empty patched instance of transformers' ``cls`` (unpickling and deepcopy fill in its state)."""
    return object.__new__(_patched_class(cls))


def _model_type(model) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _check_model(model) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        PreTrainedModel = ()
    model_type = _model_type(model)
    if isinstance(model, PreTrainedModel) and model_type in SUPPORTED_MODEL_TYPES:
        return
    hint = ""
    if type(model).__module__.split(".")[0] == "unispeech":
        hint = (": this is unispeech's own model class, which runs on unispeech_kernels already "
                "(choose its backends with kernel_backend= and attn_implementation=)")
    raise TypeError(f"patch_model supports transformers models of type {SUPPORTED_MODEL_TYPES}; "
                    f"got {type(model).__name__} (model_type={model_type!r}){hint}")


def _feature_encoder_settings(module, activation: str, backend) -> KernelSettings:
    """The settings of a supported feature encoder; raises ValueError naming what is unsupported."""
    layers = list(module.conv_layers)
    names = [type(l).__name__ for l in layers]
    if names[0].endswith("GroupNormConvLayer"):  # group mode: GroupNorm on layer 0 only
        norm_mode, ok = "group", all(n.endswith("NoLayerNormConvLayer") for n in names[1:])
    else:  # layer mode: LayerNorm after every conv ("NoLayerNorm..." also ends in "LayerNorm...")
        norm_mode = "layer"
        ok = all(n.endswith("LayerNormConvLayer") and not n.endswith("NoLayerNormConvLayer") for n in names)
    if not ok:
        raise ValueError(f"unsupported conv layer mix {names}")
    for l in layers:
        c = l.conv
        if c.padding not in (0, (0,)) or c.dilation != (1,) or c.groups != 1:
            raise ValueError("conv layers with padding, dilation or groups are not supported")
        norm = getattr(l, "layer_norm", None)
        if norm is not None and (norm.weight is None or norm.bias is None):
            raise ValueError("norm layers without affine parameters are not supported")
    return KernelSettings(backend, activation, norm_mode=norm_mode)


def _pos_conv_settings(module, activation: str, backend) -> KernelSettings:
    return KernelSettings(backend, activation, fold=FoldedWeightNorm())


def _rel_pos_attention_settings(module, activation: str, backend) -> KernelSettings:
    return KernelSettings(backend, activation)


def _patch_targets(model):
    """(name, module, settings maker) of every module patch_model replaces."""
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("FeatureEncoder") and hasattr(module, "conv_layers"):
            yield name, module, _feature_encoder_settings
        elif cls.endswith("PositionalConvEmbedding") and hasattr(module, "conv"):
            yield name, module, _pos_conv_settings
        elif cls.endswith("Attention") and hasattr(module, "gru_rel_pos_linear"):
            yield name, module, _rel_pos_attention_settings


def patch_model(model, backend: Optional[str] = None):
    """Route a transformers UniSpeech / UniSpeechSat / Wav2Vec2 / HuBERT / WavLM model's hot spots
    through unispeech_kernels. ``backend`` forces one backend for the feature encoder, positional
    conv and WavLM's attention, which falls back with a warning where it cannot run (None: the
    dispatcher picks per input; "cuda": the CUDA extension where the op has it, else Triton, see
    ``dispatch.resolve_backend``). Returns the model. Patching a patched model again
    changes nothing and warns; with another ``backend`` it raises (unpatch it first)."""
    _check_model(model)
    if backend not in (None, "auto", *BACKEND_NAMES):
        raise ValueError(f"patch_model: unknown backend {backend!r}; valid: None, 'auto', {', '.join(BACKEND_NAMES)}")
    state = getattr(model, _STATE, None)
    if state is not None:
        if state["backend"] != backend:
            raise ValueError(f"the model is already patched with backend={state['backend']!r}; call "
                             f"unpatch_model(model) before patching it with backend={backend!r}")
        warnings.warn(f"patch_model: the model is already patched (backend={backend!r}); nothing changed",
                      stacklevel=2)
        return model
    inner = [name for name, m in model.named_modules() if isinstance(m, PatchedModule) or hasattr(m, _STATE)]
    if inner:
        raise ValueError(f"part of the model is already patched ({', '.join(inner)}): call unpatch_model(model) "
                         "before patching the whole model")
    from .transformers import register_transformers_attention

    register_transformers_attention()
    activation = model.config.feat_extract_activation
    batch_invariant = getattr(model.config, "batch_invariant_group_norm", True)
    patched, skipped = [], {}
    for name, module, make_settings in list(_patch_targets(model)):
        try:
            settings = make_settings(module, activation, backend)
        except ValueError as e:
            skipped[name] = str(e)
            warnings.warn(f"patch_model: {name} keeps transformers' forward ({e})", stacklevel=2)
            continue
        settings.batch_invariant = batch_invariant
        setattr(module, _SETTINGS, settings)
        module.__class__ = _patched_class(type(module))
        patched.append(name)
    for base in _base_models(model):
        base.register_forward_pre_hook(_hand_lengths_to_feature_encoder, with_kwargs=True)
        base.register_forward_hook(_drop_lengths, always_call=True)
    original_attn = None  # WavLM: its attention modules are patched instead
    if _model_type(model) not in REL_POS_MODEL_TYPES:
        original_attn = model.config._attn_implementation
        if model.config.output_attentions:  # transformers allows only eager then; triton returns no weights
            warnings.warn(f"patch_model: attention keeps attn_implementation={original_attn!r}: "
                          "config.output_attentions=True needs transformers' eager attention weights", stacklevel=2)
        else:
            model.set_attn_implementation("triton")
    setattr(model, _STATE, {"backend": backend, "attn_implementation": original_attn, "patched": patched,
                            "skipped": skipped})
    return model


def unpatch_model(model):
    """Undo patch_model: the original classes and attention implementation come back. Works
    through wrappers (``torch.compile``'s) and on patched modules on their own (a deep copy of
    one submodule, say)."""
    for base in _base_models(model):
        _remove_hook(base, "_forward_pre_hooks", _hand_lengths_to_feature_encoder)
        _remove_hook(base, "_forward_hooks", _drop_lengths)
    for module in model.modules():
        if isinstance(module, PatchedModule):
            module.__class__ = module.unpatched_class
            delattr(module, _SETTINGS)
        state = module.__dict__.pop(_STATE, None)
        if state is not None and state["attn_implementation"] is not None:
            module.set_attn_implementation(state["attn_implementation"])
    return model


def _remove_hook(module, hooks: str, fn) -> None:
    """Remove ``fn`` from one of the module's hook dicts (and the flags torch keeps by hook id)."""
    for key, hook in list(getattr(module, hooks).items()):
        if hook is fn:
            for flags in (hooks, hooks + "_with_kwargs", hooks + "_always_called"):
                getattr(module, flags, {}).pop(key, None)
