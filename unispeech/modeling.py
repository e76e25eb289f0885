"""UniSpeechPreTrainedModel (shared base) and UniSpeechModel, drop-ins for transformers' classes.

Data path (shapes): input_values [B, L] -> feature encoder op [B, T, C] -> feature projection
[B, T, E] -> SpecAugment (training / mask_time_indices) -> encoder (positional conv op, N x
(attention op + FFN)) -> last_hidden_state [B, T, E]. ``attention_mask`` [B, L] (1 = real sample,
right padding) becomes the frame mask [B, T] from the conv output lengths, computed once. With it,
a padded batch gives every utterance the output it gets alone (config.batch_invariant_group_norm);
without it every sample is real, as in transformers: a padded row is one utterance of the padded
length, padding included.

Input contract: input_values must be a floating tensor [B, L] with B >= 1 of the model's dtype
(a 1-D [L] tensor is rejected, as in transformers: pass input_values[None]); L must reach the
receptive field of the conv stack. NaN in the audio is not checked: it propagates to the outputs.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from unispeech_kernels.padding import conv_output_length, mask_from_lengths

from .checkpoint import load_pretrained, save_pretrained
from .configuration import UniSpeechConfig, check_attn_implementation, check_kernel_backend, to_unispeech_config
from .encoder import UniSpeechEncoder
from .feature_encoder import UniSpeechFeatureEncoder, UniSpeechFeatureProjection
from .masking import compute_mask_indices
from .outputs import Wav2Vec2BaseModelOutput
from .quantizer import UniSpeechGumbelVectorQuantizer


class UniSpeechPreTrainedModel(nn.Module):
    """Config handling, weight init, length/mask helpers, checkpoint I/O, activation checkpointing
    and transformers' small model API (base_model, num_parameters), shared by every class."""

    config_class = UniSpeechConfig
    base_model_prefix = "unispeech"
    main_input_name = "input_values"
    supports_gradient_checkpointing = True

    def __init__(self, config: UniSpeechConfig, attn_implementation: Optional[str] = None,
                 kernel_backend: Optional[str] = None):
        """``config``: ours, or transformers' UniSpeechConfig (converted)."""
        super().__init__()
        config = to_unispeech_config(config, type(self).__name__)
        if attn_implementation is not None or kernel_backend is not None:
            config = config.copy()
            if attn_implementation is not None:
                config.attn_implementation = check_attn_implementation(attn_implementation)
            if kernel_backend is not None:
                config.kernel_backend = check_kernel_backend(kernel_backend)
        self.config = config

    def post_init(self):
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, UniSpeechGumbelVectorQuantizer):
            nn.init.normal_(module.weight_proj.weight, mean=0.0, std=1.0)
            nn.init.zeros_(module.weight_proj.bias)
            nn.init.uniform_(module.codevectors)
        elif isinstance(module, UniSpeechFeatureProjection):
            k = math.sqrt(1 / module.projection.in_features)
            nn.init.uniform_(module.projection.weight, a=-k, b=k)
            nn.init.uniform_(module.projection.bias, a=-k, b=k)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                k = math.sqrt(module.groups / (module.in_channels * module.kernel_size[0]))
                nn.init.uniform_(module.bias, a=-k, b=k)
        elif isinstance(module, UniSpeechModel) and hasattr(module, "masked_spec_embed"):
            nn.init.uniform_(module.masked_spec_embed)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _get_feat_extract_output_lengths(self, input_lengths):
        """Frames the conv stack makes from input_lengths samples (int or tensor)."""
        return conv_output_length(input_lengths, self.config.conv_kernel, self.config.conv_stride)

    def _get_feature_vector_attention_mask(self, feature_vector_length: int, attention_mask: torch.Tensor):
        """Frame mask bool [B, T] (True = real frame) from a sample mask [B, L] (right padding)."""
        return mask_from_lengths(self._get_feat_extract_output_lengths(attention_mask.sum(-1)), feature_vector_length)

    @property
    def base_model(self) -> nn.Module:
        """The UniSpeechModel inside a head model (the model itself for UniSpeechModel)."""
        return getattr(self, self.base_model_prefix, self)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (only those with requires_grad if only_trainable); the model has no
        embedding tables, so exclude_embeddings changes nothing."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1):
        """Recompute every ``every_n_layers``-th encoder layer in the backward pass of training
        instead of keeping its activations; the kwargs go to torch.utils.checkpoint.checkpoint
        (default ``{"use_reentrant": False}``)."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        kwargs = activation_checkpointing_kwargs
        kwargs = {"use_reentrant": False} if kwargs is None else kwargs
        self.base_model.encoder.checkpointing = (functools.partial(torch.utils.checkpoint.checkpoint, **kwargs),
                                                 every_n_layers)

    def activation_checkpointing_disable(self):
        self.base_model.encoder.checkpointing = None

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base_model.encoder.checkpointing is not None

    # transformers' earlier names for the three above
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers: int = 1):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, every_n_layers)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    @classmethod
    def from_pretrained(cls, folder, **kwargs):
        """Load config.json + weights from a local folder; keyword arguments: unispeech.checkpoint.load_pretrained."""
        return load_pretrained(cls, folder, **kwargs)

    def save_pretrained(self, folder, state_dict=None, safe_serialization: bool = True, max_shard_size="50GB"):
        """Write config.json + weights that transformers' classes load: model.safetensors (or
        pytorch_model.bin with safe_serialization=False), sharded with an index json past
        ``max_shard_size`` (bytes, or a string such as "5GB"); ``state_dict`` replaces the model's."""
        save_pretrained(self, folder, state_dict=state_dict, safe_serialization=safe_serialization,
                        max_shard_size=max_shard_size)


def check_input_values(input_values, attention_mask, receptive_field: int, dtype: torch.dtype):
    """Raise a clear error for input the model cannot run (see the module docstring)."""
    if not isinstance(input_values, torch.Tensor):
        raise TypeError(f"input_values must be a torch.Tensor, got {type(input_values).__name__}")
    if input_values.dim() != 2:
        raise ValueError(f"input_values must be [batch, samples], got shape {tuple(input_values.shape)}"
                         + (" (for one utterance pass input_values[None])" if input_values.dim() == 1 else ""))
    if not input_values.is_floating_point():
        raise TypeError(f"input_values must be floating point audio, got {input_values.dtype}")
    if input_values.dtype != dtype:
        raise TypeError(f"input_values are {input_values.dtype} but the model is {dtype}: cast one of them")
    if input_values.shape[0] == 0:
        raise ValueError("input_values is an empty batch (batch size 0)")
    if input_values.shape[1] < receptive_field:
        raise ValueError(f"audio of {input_values.shape[1]} samples is shorter than the receptive field of "
                         f"the conv feature encoder ({receptive_field} samples)")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_values.shape:
            raise ValueError(f"attention_mask must have the shape of input_values {tuple(input_values.shape)}, "
                             f"got {tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")


class UniSpeechModel(UniSpeechPreTrainedModel):
    def __init__(self, config: UniSpeechConfig, attn_implementation=None, kernel_backend=None):
        super().__init__(config, attn_implementation, kernel_backend)
        config = self.config
        self.feature_extractor = UniSpeechFeatureEncoder(config)
        self.feature_projection = UniSpeechFeatureProjection(config)
        if config.mask_time_prob > 0.0 or config.mask_feature_prob > 0.0:
            self.masked_spec_embed = nn.Parameter(torch.rand(config.hidden_size))
        self.encoder = UniSpeechEncoder(config)
        self.post_init()

    def freeze_feature_encoder(self):
        self.feature_extractor._freeze_parameters()

    def _mask_hidden_states(self, hidden, mask_time_indices=None, frame_mask=None):
        """SpecAugment: given or random time spans -> masked_spec_embed; random channel spans -> 0."""
        cfg = self.config
        if not cfg.apply_spec_augment:
            return hidden
        b, t, e = hidden.shape
        if mask_time_indices is not None:
            if not hasattr(self, "masked_spec_embed"):
                raise ValueError("mask_time_indices needs masked_spec_embed, which exists only when "
                                 "config.mask_time_prob > 0 or config.mask_feature_prob > 0")
            mask_time_indices = torch.as_tensor(mask_time_indices, device=hidden.device)
            if tuple(mask_time_indices.shape) != (b, t):
                raise ValueError(f"mask_time_indices must have shape [batch, frames] = {(b, t)}, got "
                                 f"{tuple(mask_time_indices.shape)}")
            hidden = torch.where(mask_time_indices.bool()[:, :, None], self.masked_spec_embed.to(hidden.dtype), hidden)
        elif cfg.mask_time_prob > 0 and self.training:
            spans = compute_mask_indices((b, t), cfg.mask_time_prob, cfg.mask_time_length,
                                         attention_mask=frame_mask, min_masks=cfg.mask_time_min_masks)
            spans = torch.from_numpy(spans).to(hidden.device)
            hidden = torch.where(spans[:, :, None], self.masked_spec_embed.to(hidden.dtype), hidden)
        if cfg.mask_feature_prob > 0 and self.training:
            spans = compute_mask_indices((b, e), cfg.mask_feature_prob, cfg.mask_feature_length,
                                         min_masks=cfg.mask_feature_min_masks)
            hidden = hidden.masked_fill(torch.from_numpy(spans).to(hidden.device)[:, None, :], 0.0)
        return hidden

    def forward(self, input_values, attention_mask=None, mask_time_indices=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        check_input_values(input_values, attention_mask, self.feature_extractor.receptive_field, self.dtype)

        # the lengths, once: samples on the device and (the forward's one host sync) on the host, frames
        # from them; everything below takes them from here
        sample_lengths = host_samples = host_frames = frame_mask = None
        if attention_mask is not None:
            sample_lengths = attention_mask.sum(-1)
            if not torch.compiler.is_compiling():
                host_samples = sample_lengths.tolist()
        features = self.feature_extractor(input_values, sample_lengths, host_samples)  # [B, T, C]
        frames = features.shape[1]
        if attention_mask is not None:
            frame_mask = mask_from_lengths(self._get_feat_extract_output_lengths(sample_lengths), frames)
        hidden, extract_features = self.feature_projection(features)
        hidden = self._mask_hidden_states(hidden, mask_time_indices, frame_mask)
        encoder_mask = frame_mask
        if host_samples is not None:
            host_frames = [min(max(self._get_feat_extract_output_lengths(n), 0), frames) for n in host_samples]
            if min(host_frames) == frames:  # no padded frame: drop the mask (attention's fast path)
                encoder_mask = host_frames = None
        last, hidden_states, attentions = self.encoder(hidden, encoder_mask, output_attentions,
                                                       output_hidden_states, host_frames)
        out = Wav2Vec2BaseModelOutput(last_hidden_state=last, extract_features=extract_features,
                                      hidden_states=hidden_states, attentions=attentions)
        return out if return_dict else out.to_tuple()
