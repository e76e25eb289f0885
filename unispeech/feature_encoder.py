"""Feature encoder (conv stack over raw audio) and feature projection.

Shapes: input_values [B, L] -> features [B, T, C] (channels-last, straight from the
``unispeech_kernels.feature_encoder`` op, no transposes) -> projection [B, T, hidden].
Parameter names equal transformers': ``conv_layers.{i}.conv.{weight,bias}``,
``conv_layers.{i}.layer_norm.{weight,bias}`` (GroupNorm on layer 0 in "group" mode, LayerNorm on
every layer in "layer" mode); ``feature_projection.{layer_norm,projection}``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import unispeech_kernels
from unispeech_kernels.activations import get_activation
from unispeech_kernels.padding import receptive_field

NORM_EPS = 1e-5  # transformers' conv layers use the nn default eps, not config.layer_norm_eps


def kernel_backend(config, op: str) -> Optional[str]:
    """The backend ``config.kernel_backend`` forces on ``op``: "auto" -> None (the dispatcher picks);
    "cuda" -> the CUDA extension where the op has one, Triton where not (the positional conv)."""
    return unispeech_kernels.resolve_backend(op, config.kernel_backend)


class ConvLayer(nn.Module):
    """One conv of the stack; holds parameters only, the whole stack runs as one op."""

    def __init__(self, config, layer_id: int, norm: Optional[str]):
        super().__init__()
        c_in = config.conv_dim[layer_id - 1] if layer_id > 0 else 1
        c_out = config.conv_dim[layer_id]
        self.conv = nn.Conv1d(c_in, c_out, kernel_size=config.conv_kernel[layer_id],
                              stride=config.conv_stride[layer_id], bias=config.conv_bias)
        if norm == "group":
            self.layer_norm = nn.GroupNorm(c_out, c_out, eps=NORM_EPS, affine=True)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(c_out, eps=NORM_EPS)


class UniSpeechFeatureEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        get_activation(config.feat_extract_activation)  # an unknown name fails here, not at the first forward
        mode = config.feat_extract_norm
        self.conv_layers = nn.ModuleList(
            ConvLayer(config, i, mode if (mode == "layer" or i == 0) else None)
            for i in range(config.num_feat_extract_layers))
        self.receptive_field = receptive_field(config.conv_kernel, config.conv_stride)
        self._requires_grad = True
        self.trim_padding = True  # skip frames past each utterance's length (see forward)

    def _freeze_parameters(self):
        for p in self.parameters():
            p.requires_grad = False
        self._requires_grad = False

    def forward(self, input_values: torch.Tensor, input_lengths: Optional[torch.Tensor] = None,
                host_lengths: Optional[list] = None) -> torch.Tensor:
        """[B, L] audio -> [B, T, C]. input_lengths: real samples per row (batch-invariant group norm,
        and padded frames left uncomputed: zero or unspecified, see the op; never under torch.compile);
        host_lengths: the same on the host, when the caller has read them (no host sync here)."""
        cfg = self.config
        layers = self.conv_layers
        normed = layers if cfg.feat_extract_norm == "layer" else layers[:1]
        return unispeech_kernels.feature_encoder(
            input_values, [l.conv.weight for l in layers], [l.conv.bias for l in layers],
            list(cfg.conv_stride), cfg.feat_extract_norm, [l.layer_norm.weight for l in normed],
            [l.layer_norm.bias for l in normed], eps=NORM_EPS, activation=cfg.feat_extract_activation,
            input_lengths=input_lengths, batch_invariant=cfg.batch_invariant_group_norm,
            trim_padding=self.trim_padding and not torch.compiler.is_compiling(), host_lengths=host_lengths,
            backend=kernel_backend(cfg, "feature_encoder"))


class UniSpeechFeatureProjection(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.conv_dim[-1], eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.conv_dim[-1], config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, features: torch.Tensor):
        """Returns (projected [B, T, hidden], normalised features [B, T, C] for the quantizer)."""
        normed = self.layer_norm(features)
        return self.dropout(self.projection(normed)), normed
