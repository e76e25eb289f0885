"""Transformer encoder: positional conv embedding, attention, feed-forward, both layer variants.

Shapes: hidden [B, T, E] (E = hidden_size = H heads x D head_dim); ``mask`` bool [B, T], True =
real frame, or None when no frame is padded. Parameter names equal transformers'
(``encoder.pos_conv_embed.conv.{bias, parametrizations.weight.original0/original1}``,
``encoder.layers.{i}.attention.{q,k,v,out}_proj``, ``.feed_forward.{intermediate,output}_dense``...).

Hot spots: ``unispeech_kernels.pos_conv_embed`` (conv + activation + residual in one op) and
``unispeech_kernels.attention`` (q/k/v passed as [B, T, H, D] views of one fused projection).

Padded batches run unpadded: after the positional conv the real frames are packed into rows
[N, E] (``FramePacking``), so projections, feed-forward and norms do only real work; attention
runs on the packed rows themselves (``unispeech_kernels.attention_packed``, with the host frame
lengths the model read once per forward) when the mask is a prefix mask, as audio padding always is; the eager path, and
any other mask, scatter q/k/v back to [B, T, H, D] for the masked op. Real frames are computed
exactly as in transformers; frames past an utterance's length are zero in the layer outputs
(transformers leaves values there that depend on the padding and that nothing real attends to).
Activation checkpointing (``checkpointing``, set by the model's activation_checkpointing_enable)
recomputes whole layers in the backward pass of training.
LayerDrop draws from the global torch generator, as transformers does, or from
``layerdrop_generator`` when one is set: the training recipes seed it by step on every rank, so all
ranks drop the same layers, and then a dropped layer's parameters get zero gradients (not none),
so DDP finds every parameter used without ``find_unused_parameters``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

import unispeech_kernels
from unispeech_kernels.activations import get_activation
from unispeech_kernels.padding import pack, pack_index, prefix_lengths, unpack
from unispeech_kernels.weight_norm import FoldedWeightNorm

from .feature_encoder import kernel_backend


class _WeightNorm(nn.Module):
    """weight = g * v / ||v|| (norm over all but the kernel dim), stored as transformers stores it."""

    def __init__(self, channels: int, per_group: int, kernel: int):
        super().__init__()
        v = torch.randn(channels, per_group, kernel) * (2 * math.sqrt(1.0 / (kernel * channels)))
        self.original0 = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))  # g [1, 1, K]
        self.original1 = nn.Parameter(v)  # v [C, C / groups, K]


class _PosConv(nn.Module):
    def __init__(self, config):
        super().__init__()
        c, groups = config.hidden_size, config.num_conv_pos_embedding_groups
        self.bias = nn.Parameter(torch.zeros(c))
        self.parametrizations = nn.Module()
        self.parametrizations.weight = _WeightNorm(c, c // groups, config.num_conv_pos_embeddings)


class UniSpeechPositionalConvEmbedding(nn.Module):
    """out = hidden + act(conv(hidden)) over time, same length (odd and even kernels)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = _PosConv(config)
        self._fold = FoldedWeightNorm()  # cached without grad, recomputed with autograd in training

    def weight(self) -> torch.Tensor:
        w = self.conv.parametrizations.weight
        return self._fold(w.original0, w.original1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return unispeech_kernels.pos_conv_embed(
            hidden, self.weight(), self.conv.bias, groups=cfg.num_conv_pos_embedding_groups,
            activation=cfg.feat_extract_activation, backend=kernel_backend(cfg, "pos_conv"))


class _ZeroGradients(torch.autograd.Function):
    """Identity on ``hidden``; zero gradients for ``params`` (the parameters of a dropped layer)."""

    @staticmethod
    def forward(ctx, hidden, *params):
        ctx.params = params
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + tuple(torch.zeros_like(p) for p in ctx.params)


class FramePacking:
    """The real frames of a [B, T] batch as rows: pack [B, T, ...] -> [N, ...], unpack back with
    zeros at padded frames (``unispeech_kernels.padding``). ``mask`` None (nothing padded): both are
    free reshapes. ``lengths``: the host frame lengths of a prefix mask, when the caller has them;
    else they are read from the mask (one host sync)."""

    def __init__(self, batch: int, frames: int, mask: Optional[torch.Tensor], lengths: Optional[List[int]] = None):
        self.batch, self.frames, self.mask = batch, frames, mask
        # packing needs the real-frame count on the host: under torch.compile keep the padded layout
        self.index: Optional[torch.Tensor] = None  # [N] padded position of each packed row
        self.lengths: Optional[List[int]] = None  # host lengths when the mask is a prefix mask
        if mask is None or torch.compiler.is_compiling():
            return
        # a prefix mask (audio padding always is one): utterance b owns the next lengths[b] rows, so
        # attention can run on the packed rows directly
        self.lengths = lengths if lengths is not None else prefix_lengths(mask)
        if self.lengths is None:
            self.index = mask.reshape(-1).nonzero().squeeze(1)
        else:
            self.index = pack_index(self.lengths, frames, mask.device)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return pack(x, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return unpack(x, self.index, self.batch, self.frames)


def attention_backend(config) -> Tuple[str, bool]:
    """(backend, fallback) of the non-eager attention (``configuration.attention_implementation``):
    "sdpa" -> torch; "triton" set as attn_implementation -> Triton preferred (falls back to SDPA
    with a warning where it cannot run); "triton" from kernel_backend -> Triton forced, as
    kernel_backend forces the other hot spots."""
    if config.attn_implementation == "sdpa":
        return "torch", False
    if config._attn_implementation == "triton":
        return "triton", True
    return unispeech_kernels.resolve_backend("attention", config.kernel_backend), False


class UniSpeechAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        e = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = e // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(e, e)
        self.v_proj = nn.Linear(e, e)
        self.q_proj = nn.Linear(e, e)
        self.out_proj = nn.Linear(e, e)

    def forward(self, hidden: torch.Tensor, frames: FramePacking, output_attentions: bool = False):
        """hidden [N, E] packed real frames -> (output [N, E], weights [B, H, T, T] or None)."""
        # q, k and v as one GEMM (a bigger GEMM parallelises better); the [3E, E] concatenation is
        # rebuilt per call (a few MB) rather than cached next to the weights it duplicates
        projs = (self.q_proj, self.k_proj, self.v_proj)
        qkv = nn.functional.linear(hidden, torch.cat([p.weight for p in projs]), torch.cat([p.bias for p in projs]))
        p = self.dropout if self.training else 0.0
        impl = self.config.attn_implementation
        if output_attentions and impl != "eager":
            warnings.warn(f"attn_implementation={impl!r} returns no attention weights: this call runs the "
                          "eager attention for output_attentions=True", stacklevel=2)
            impl = "eager"
        backend, fallback = attention_backend(self.config) if impl != "eager" else (None, False)
        if impl != "eager" and frames.lengths is not None:  # attention on the packed rows themselves
            q, k, v = qkv.view(-1, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, D] views
            out = unispeech_kernels.attention_packed(q, k, v, frames.lengths, dropout_p=p, softmax_scale=self.scaling,
                                                     backend=backend, fallback=fallback)
            return self.out_proj(out.reshape(out.shape[0], -1)), None
        qkv = frames.unpack(qkv).view(frames.batch, frames.frames, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # [B, T, H, D] views
        mask = frames.mask
        weights = None
        if impl == "eager":
            out, weights = self._eager(q, k, v, mask, p)
        else:
            out = unispeech_kernels.attention(q, k, v, mask, dropout_p=p, softmax_scale=self.scaling,
                                              backend=backend, fallback=fallback)
        return self.out_proj(frames.pack(out.reshape(frames.batch, frames.frames, -1))), weights

    def _eager(self, q, k, v, mask, p):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if mask is not None:  # additive mask of the dtype's minimum, as transformers' eager path
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = nn.functional.dropout(torch.softmax(scores, dim=-1), p=p, training=self.training)
        return torch.matmul(weights, v).transpose(1, 2), weights


class UniSpeechFeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.intermediate_dense = nn.Linear(config.hidden_size, config.intermediate_size)
        get_activation(config.hidden_act)  # an unknown name fails here, not at the first forward
        self.hidden_act = config.hidden_act  # a name, not a closure: the module stays picklable
        self.output_dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden):
        act = get_activation(self.hidden_act, overwrite_temporaries=True)
        hidden = self.intermediate_dropout(act(self.intermediate_dense(hidden)))
        return self.output_dropout(self.output_dense(hidden))


class UniSpeechAttnAdapterLayer(nn.Module):
    """Optional adapter of the stable-layer-norm layers (config.adapter_attn_dim)."""

    def __init__(self, config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size)
        self.linear_1 = nn.Linear(config.hidden_size, config.adapter_attn_dim)
        self.act_fn = nn.ReLU()
        self.linear_2 = nn.Linear(config.adapter_attn_dim, config.hidden_size)

    def forward(self, hidden):
        return self.linear_2(self.act_fn(self.linear_1(self.norm(hidden))))


class UniSpeechEncoderLayer(nn.Module):
    """Post-norm layer (do_stable_layer_norm=False); ``stable=True`` gives the pre-norm layer."""

    def __init__(self, config, stable: bool = False):
        super().__init__()
        self.stable = stable
        self.attention = UniSpeechAttention(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = UniSpeechFeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if stable and getattr(config, "adapter_attn_dim", None) is not None:
            self.adapter_layer = UniSpeechAttnAdapterLayer(config)
        else:
            self.adapter_layer = None

    def forward(self, hidden, frames: FramePacking, output_attentions=False):
        """hidden [N, E] packed real frames (row-wise ops only; attention unpacks)."""
        if self.stable:
            attn, weights = self.attention(self.layer_norm(hidden), frames, output_attentions)
            hidden = hidden + self.dropout(attn)
            hidden = hidden + self.feed_forward(self.final_layer_norm(hidden))
            if self.adapter_layer is not None:
                hidden = hidden + self.adapter_layer(hidden)
            return hidden, weights
        attn, weights = self.attention(hidden, frames, output_attentions)
        hidden = self.layer_norm(hidden + self.dropout(attn))
        hidden = self.final_layer_norm(hidden + self.feed_forward(hidden))
        return hidden, weights


class UniSpeechEncoder(nn.Module):
    """Both variants: post-norm (norm after the positional conv) or stable (norm at the end)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stable = bool(config.do_stable_layer_norm)
        self.pos_conv_embed = UniSpeechPositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(UniSpeechEncoderLayer(config, self.stable)
                                    for _ in range(config.num_hidden_layers))
        # True (set by the weighted-layer-sum head): a layer skipped by LayerDrop records its
        # unchanged input, so hidden_states always has num_hidden_layers + 1 entries
        self.record_skipped_layers = False
        # (checkpoint function, every n-th layer) while activation checkpointing is on, else None
        self.checkpointing: Optional[Tuple[Callable, int]] = None
        # LayerDrop's generator, the same on every rank (see the module docstring); None: global
        self.layerdrop_generator: Optional[torch.Generator] = None

    def forward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor], output_attentions=False,
                output_hidden_states=False, lengths: Optional[List[int]] = None
                ) -> Tuple[torch.Tensor, Optional[tuple], Optional[tuple]]:
        """Returns (last_hidden_state, hidden_states, attentions); ``lengths``: the host frame lengths
        of ``mask`` when the caller has them (``FramePacking``). hidden_states as transformers 5.x:
        the input of the first layer that runs, then each layer's output (before the final norm of
        the stable variant); layers skipped by LayerDrop record nothing."""
        if mask is not None:  # padded frames are zero before the positional conv, as transformers
            hidden = hidden.masked_fill(~mask[:, :, None], 0.0)
        hidden = self.pos_conv_embed(hidden)
        if not self.stable:
            hidden = self.layer_norm(hidden)
        hidden = self.dropout(hidden)
        frames = FramePacking(hidden.shape[0], hidden.shape[1], mask, lengths)
        first = hidden  # [B, T, E]: hidden_states[0] keeps transformers' values on padded frames
        hidden = frames.pack(hidden)  # [N, E]
        all_hidden: List[torch.Tensor] = []
        all_attn: List[torch.Tensor] = []
        layerdrop = self.config.layerdrop if self.training else 0.0
        recompute = self.checkpointing if self.training and torch.is_grad_enabled() else None
        for i, layer in enumerate(self.layers):
            if layerdrop > 0.0 and torch.rand([], generator=self.layerdrop_generator) < layerdrop:
                if self.layerdrop_generator is not None:
                    hidden = _ZeroGradients.apply(hidden, *(p for p in layer.parameters() if p.requires_grad))
                if output_hidden_states and self.record_skipped_layers:
                    all_hidden.extend([first if not all_hidden else all_hidden[-1]] * (2 - bool(all_hidden)))
                continue
            if output_hidden_states and not all_hidden:
                all_hidden.append(first)  # no layer ran yet: hidden is still the packed `first`
            if recompute is not None and i % recompute[1] == 0:
                hidden, weights = recompute[0](layer, hidden, frames, output_attentions)
            else:
                hidden, weights = layer(hidden, frames, output_attentions)
            if output_hidden_states:
                all_hidden.append(frames.unpack(hidden))
            if output_attentions:
                all_attn.append(weights)
        last = frames.unpack(self.layer_norm(hidden) if self.stable else hidden)
        return (last, tuple(all_hidden) if output_hidden_states else None,
                tuple(all_attn) if output_attentions else None)
