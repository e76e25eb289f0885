"""Convolutional feature encoder: a stack of Conv1d (+ norm) + activation layers.

Shapes: input_values [B, L] (raw audio) -> features [B, T, C] (channels-last, what the model wants).
Layer i: conv_weights[i] [C_out, C_in, K_i] (C_in = 1 for layer 0), stride conv_strides[i],
optional bias [C_out]. norm_mode "group": GroupNorm(C, C) (each channel over time) after layer 0
only, norm_weights/norm_biases hold one tensor each; "layer": LayerNorm over channels after every
layer, one tensor per layer. Activation after every layer.

input_lengths (samples, [B]) is used with batch_invariant=True (the default): the group-norm
statistics are then taken over each utterance's real frames, so a padded batch equals
single-utterance runs (batch_invariant=False: over the padded length, as transformers; no
input_lengths: every sample is real); and with trim_padding=True: frames past an utterance's real
length (conv_output_length of its samples) may be left uncomputed (the torch backend runs layers
1..N per utterance on its real frames and leaves zeros there; real frames never depend on padding,
so they are unchanged). ``host_lengths``: the same lengths as host ints, when the caller has read
them (the trim then needs no host sync). Under autocast the op casts its inputs to autocast's dtype
and runs in it (``follows_autocast``).
Padding and non-finite input (the same in every backend): a real frame reads only real samples
through its conv windows, so padding reaches it only through group-norm statistics taken over the
padded length (batch_invariant=False, transformers' numerics); with input_lengths, a NaN or Inf
sample past them is read as zero there, so it cannot poison the real frames, and with
batch_invariant=True (the default: statistics over the real frames) no padded value reaches a real
frame at all. A NaN or Inf among the real samples reaches the frames whose windows hold it and,
through the group-norm statistics, every frame of its utterance.

Triton backend: layer 0 is first_conv_layer's Triton kernel (memory-bound, recomputed in its
backward), layers 1..N are conv_layer's implicit GEMMs over channels-last [B, T, C] with the norm
and GELU fused in, so nothing is transposed between layers. One torch.library op per layer, each
with its autograd formula; a frozen encoder (no input or parameter requiring grad, or no_grad)
saves nothing for backward.

CUDA backend (opt-in): layer 0 on the CUDA extension's fused kernel (forward only: rejected with a
reason when a gradient is needed), layers 1..N on the same Triton kernels.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..activations import get_activation
from ..dispatch import Inputs, Op
from ..padding import conv_output_length, mask_from_lengths, receptive_field
from ._common import follows_autocast
from .conv_layer import CONV_LAYER_TRITON, ConvLayerInputs, conv_layer
from .first_conv_layer import FirstConvLayerInputs, first_conv_layer_op, group_norm_over_lengths


def _run_layers(x, layers, conv_weights, conv_biases, conv_strides, norm_mode, norm_weights, norm_biases,
                eps, act, input_lengths, batch_invariant, cast):
    """x [B, C_in, T] channels-first through the given layer indices; returns [B, C, T']."""
    for i in layers:
        w, b, s = conv_weights[i], conv_biases[i], conv_strides[i]
        x = F.conv1d(x, cast(w), cast(b), stride=s)
        if norm_mode == "layer":
            x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), cast(norm_weights[i]),
                             cast(norm_biases[i]), eps).transpose(1, 2)
        elif i == 0:
            if batch_invariant and input_lengths is not None:
                lengths = conv_output_length(input_lengths, [w.shape[-1]], [s])
                x = group_norm_over_lengths(x, cast(norm_weights[0]), cast(norm_biases[0]), eps, lengths)
            else:
                x = F.group_norm(x, x.shape[1], cast(norm_weights[0]), cast(norm_biases[0]), eps)
        x = act(x)
    return x


def feature_encoder_reference(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                              norm_weights, norm_biases, *, eps=1e-5, activation="gelu",
                              input_lengths=None, batch_invariant=True, upcast=False):
    """Eager torch implementation (channels-first internally, like transformers)."""
    cast = (lambda t: t.double() if t is not None else None) if upcast else (lambda t: t)
    x = _run_layers(cast(input_values)[:, None, :], range(len(conv_weights)), conv_weights, conv_biases,
                    conv_strides, norm_mode, norm_weights, norm_biases, eps, get_activation(activation, True),
                    input_lengths, batch_invariant, cast).transpose(1, 2)
    return x if upcast else x.to(input_values.dtype)


@dataclasses.dataclass(frozen=True)
class FeatureEncoderInputs(Inputs):
    input_values: torch.Tensor  # [B, L] audio
    conv_weights: tuple  # [C_out, C_in, K_i] per layer
    conv_biases: tuple  # [C_out] or None per layer
    conv_strides: tuple
    norm_mode: str  # "group" (layer 0 only) or "layer" (every layer)
    norm_weights: tuple
    norm_biases: tuple
    eps: float = 1e-5
    activation: str = "gelu"
    input_lengths: Optional[torch.Tensor] = None  # [B] real samples
    batch_invariant: bool = True
    trim_padding: bool = False
    host_lengths: Optional[tuple] = None  # input_lengths as host ints, when the caller has them

    @property
    def float_tensors(self):
        return (self.input_values, *self.conv_weights, *self.conv_biases, *self.norm_weights, *self.norm_biases)

    @property
    def tensors(self):
        return (*self.float_tensors, self.input_lengths)

    def first_layer(self) -> list:
        """[("layer 0", the first layer's inputs)]."""
        return [("layer 0", FirstConvLayerInputs(
            self.input_values, self.conv_weights[0], self.conv_biases[0], self.conv_strides[0], self.norm_mode,
            self.norm_weights[0], self.norm_biases[0], self.eps, self.activation, self.input_lengths,
            self.batch_invariant))]

    def later_layers(self) -> list:
        """[("layer i", layer i's inputs), ...] for i >= 1 (the audio stands for their input tensor)."""
        layer = self.norm_mode == "layer"
        return [(f"layer {i}", ConvLayerInputs(self.input_values, w, self.conv_biases[i], "layer" if layer else "none",
                                               self.norm_weights[i] if layer else None,
                                               self.norm_biases[i] if layer else None, self.activation))
                for i, w in enumerate(self.conv_weights) if i > 0]


def check_feature_encoder_inputs(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                                 norm_weights, norm_biases, input_lengths=None):
    """Raise a clear error for anything no backend should be asked to compute."""
    if not isinstance(input_values, torch.Tensor) or input_values.dim() != 2:
        got = tuple(input_values.shape) if isinstance(input_values, torch.Tensor) else type(input_values)
        raise ValueError(f"feature_encoder: input_values must be a [batch, samples] tensor, got {got}")
    if not input_values.is_floating_point():
        raise TypeError(f"feature_encoder: input_values must be floating point, got {input_values.dtype}")
    if not (len(conv_weights) == len(conv_biases) == len(conv_strides)) or not conv_weights:
        raise ValueError("feature_encoder: conv_weights, conv_biases and conv_strides need one entry per layer")
    if norm_mode not in ("group", "layer"):
        raise ValueError(f"feature_encoder: norm_mode must be 'group' or 'layer', got {norm_mode!r}")
    need = 1 if norm_mode == "group" else len(conv_weights)
    if len(norm_weights) != need or len(norm_biases) != need:
        raise ValueError(f"feature_encoder: norm_mode {norm_mode!r} needs {need} norm weight/bias tensors, "
                         f"got {len(norm_weights)}/{len(norm_biases)}")
    c_in = 1
    for i, (w, b, s) in enumerate(zip(conv_weights, conv_biases, conv_strides)):
        if w.dim() != 3 or w.shape[1] != c_in or w.shape[2] < 1:
            raise ValueError(f"feature_encoder: layer {i} conv weight must be [C_out, {c_in}, K >= 1], "
                             f"got {tuple(w.shape)}")
        if w.dtype != input_values.dtype or w.device != input_values.device:
            raise TypeError(f"feature_encoder: conv weight {w.dtype} on {w.device} does not match input "
                            f"{input_values.dtype} on {input_values.device}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"feature_encoder: layer {i} conv bias must be [{w.shape[0]}], got {tuple(b.shape)}")
        if not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"feature_encoder: layer {i} stride must be a positive int, got {s!r}")
        c_in = w.shape[0]
    for i in range(need):
        for name, t in (("norm weight", norm_weights[i]), ("norm bias", norm_biases[i])):
            if t is not None and tuple(t.shape) != (conv_weights[i].shape[0],):
                raise ValueError(f"feature_encoder: layer {i} {name} must be [{conv_weights[i].shape[0]}], "
                                 f"got {tuple(t.shape)}")
    kernels = [w.shape[-1] for w in conv_weights]
    field = receptive_field(kernels, conv_strides)
    if input_values.shape[1] < field:
        raise ValueError(f"feature_encoder: audio of {input_values.shape[1]} samples is shorter than the "
                         f"receptive field of the conv stack ({field} samples)")
    if input_lengths is not None and not isinstance(input_lengths, torch.Tensor):
        raise TypeError(f"feature_encoder: input_lengths must be a tensor of sample counts, got "
                        f"{type(input_lengths).__name__}")
    if input_lengths is not None and (input_lengths.is_floating_point() or input_lengths.dtype == torch.bool):
        raise TypeError(f"feature_encoder: input_lengths must hold integers, got {input_lengths.dtype}")
    if input_lengths is not None and tuple(input_lengths.shape) != (input_values.shape[0],):
        raise ValueError(f"feature_encoder: input_lengths must have shape [batch], got {tuple(input_lengths.shape)}")
    if input_lengths is not None and input_lengths.device != input_values.device:
        raise ValueError(f"feature_encoder: input_lengths on {input_lengths.device}, input_values on "
                         f"{input_values.device}")


feature_encoder_op = Op("feature_encoder", features={"training": "has no backward"})


@feature_encoder_op.backend("torch", features=("training",))
def feature_encoder_torch(inputs: FeatureEncoderInputs):
    """cuDNN / oneDNN convs; with trim_padding, layers 1..N run per utterance on its real frames."""
    i = inputs
    layers = (i.conv_weights, i.conv_biases, i.conv_strides, i.norm_mode, i.norm_weights, i.norm_biases)
    kernels = [w.shape[-1] for w in i.conv_weights]
    frames = None
    if i.trim_padding and i.input_lengths is not None and len(kernels) > 1:
        samples = i.host_lengths if i.host_lengths is not None else i.input_lengths.tolist()  # one host sync
        frames = [conv_output_length(n, kernels, i.conv_strides) for n in samples]
        total = conv_output_length(i.input_values.shape[1], kernels, i.conv_strides)
        if min(frames) == total:  # nothing padded at the output: one batched pass
            frames = None
    if frames is None:
        return feature_encoder_reference(i.input_values, *layers, eps=i.eps, activation=i.activation,
                                         input_lengths=i.input_lengths, batch_invariant=i.batch_invariant)
    args = (*layers, i.eps, get_activation(i.activation, True), i.input_lengths, i.batch_invariant, lambda t: t)
    first = _run_layers(i.input_values[:, None, :], [0], *args)  # [B, C, T0]: group stats need all of it
    first_frames = [conv_output_length(n, kernels[:1], i.conv_strides[:1]) for n in samples]
    out = first.new_zeros(first.shape[0], total, i.conv_weights[-1].shape[0])
    rest = range(1, len(kernels))
    for b, (n0, n) in enumerate(zip(first_frames, frames)):
        if n > 0:
            out[b, :n] = _run_layers(first[b:b + 1, :, :n0], rest, *args)[0].transpose(0, 1)
    return out


def _kernel_stack(first_layer, inputs: FeatureEncoderInputs):
    """Layer 0 through the first conv layer's ``first_layer`` backend (Triton or CUDA), layers 1..N
    through conv_layer's Triton GEMMs. trim_padding is a hint these backends do not take: they
    compute every frame."""
    (_, first), = inputs.first_layer()
    x = first_conv_layer_op.backends[first_layer].impl(first)
    for i, (_, layer) in enumerate(inputs.later_layers(), 1):
        x = conv_layer(x, layer.weight, layer.bias, inputs.conv_strides[i], layer.norm_mode, layer.norm_weight,
                       layer.norm_bias, eps=inputs.eps)
    return x


def _parts(first_layer: str) -> tuple:
    """A kernel backend's parts: the first conv layer's ``first_layer`` backend on layer 0, then the
    Triton layer on each later one."""
    return (("layer 0", first_conv_layer_op.backends[first_layer], FeatureEncoderInputs.first_layer),
            ("layers 1..N", CONV_LAYER_TRITON, FeatureEncoderInputs.later_layers))


@feature_encoder_op.backend("triton", parts=_parts("triton"), auto=False)
def feature_encoder_triton(inputs: FeatureEncoderInputs):
    return _kernel_stack("triton", inputs)


@feature_encoder_op.backend("cuda", parts=_parts("cuda"), auto=False)
def feature_encoder_cuda(inputs: FeatureEncoderInputs):
    """Layer 0 on the CUDA extension (forward only), layers 1..N on the Triton kernels. Opt-in
    until a GPU benchmark shows the CUDA first layer faster than Triton's (bench first_conv_layer_fwd)."""
    return _kernel_stack("cuda", inputs)


@follows_autocast
def feature_encoder(input_values, conv_weights, conv_biases, conv_strides, norm_mode, norm_weights,
                    norm_biases, *, eps: float = 1e-5, activation: str = "gelu",
                    input_lengths: Optional[torch.Tensor] = None, batch_invariant: bool = True,
                    trim_padding: bool = False, host_lengths: Optional[Sequence[int]] = None,
                    backend: Optional[str] = None):
    """Run the whole conv feature encoder; returns [B, T, C]. See the module docstring."""
    check_feature_encoder_inputs(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                                 norm_weights, norm_biases, input_lengths)
    get_activation(activation)  # an unknown name fails here, whichever backend runs
    if input_lengths is not None:  # non-finite padding reads as zeros (see the module docstring)
        real = mask_from_lengths(input_lengths, input_values.shape[1])
        input_values = torch.where(real | torch.isfinite(input_values), input_values, 0.0)
    inputs = FeatureEncoderInputs(input_values, tuple(conv_weights), tuple(conv_biases), tuple(conv_strides),
                                  norm_mode, tuple(norm_weights), tuple(norm_biases), eps, activation, input_lengths,
                                  batch_invariant, trim_padding, None if host_lengths is None else tuple(host_lengths))
    return feature_encoder_op(inputs, backend)


@feature_encoder_op.example
def _example(device, dtype):
    """UniSpeech-base: 2 utterances of 10 s at 16 kHz, 7 convs of 512 channels, GroupNorm after layer 0."""
    e = dict(device=device, dtype=dtype)
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    weights = tuple(torch.empty(512, 1 if i == 0 else 512, k, **e) for i, k in enumerate(kernels))
    return FeatureEncoderInputs(torch.empty(2, 160000, **e), weights, (None,) * len(weights), strides, "group",
                                (torch.empty(512, **e),), (torch.empty(512, **e),))
