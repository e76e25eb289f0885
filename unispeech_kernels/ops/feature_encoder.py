"""Convolutional feature encoder: a stack of Conv1d (+ norm) + activation layers.

Shapes: input_values [B, L] (raw audio) -> features [B, T, C] (channels-last, what the model wants).
Layer i: conv_weights[i] [C_out, C_in, K_i] (C_in = 1 for layer 0), stride conv_strides[i],
optional bias [C_out]. norm_mode "group": GroupNorm(C, C) (each channel over time) after layer 0
only, norm_weights/norm_biases hold one tensor each; "layer": LayerNorm over channels after every
layer, one tensor per layer. Activation after every layer.

input_lengths (samples, [B]) is used with batch_invariant=True: the group-norm statistics are then
taken over each utterance's real frames, so a padded batch equals single-utterance runs; and with
trim_padding=True: frames past an utterance's real length (conv_output_length of its samples) may
be left uncomputed (the torch backend runs layers 1..N per utterance on its real frames and leaves
zeros there; real frames never depend on padding, so they are unchanged).

Triton backend: layer 0 is first_conv_layer's Triton kernel (memory-bound, recomputed in its
backward), layers 1..N are conv_layer's implicit GEMMs over channels-last [B, T, C] with the norm
and GELU fused in, so nothing is transposed between layers. One torch.library op per layer, each
with its autograd formula; a frozen encoder (no input or parameter requiring grad, or no_grad)
saves nothing for backward.

CUDA backend (opt-in): layer 0 on the CUDA extension's fused kernel (forward only: rejected with a
reason when a gradient is needed), layers 1..N on the same Triton kernels.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .._cuda import first_conv_layer_cuda, first_conv_layer_cuda_check
from .._runtime import triton_device_reason
from ..activations import get_activation
from ..dispatch import Op
from .conv_layer import conv_layer, conv_layer_check
from .first_conv_layer import first_conv_layer_triton, first_conv_layer_triton_check, group_norm_over_lengths


def conv_output_length(length, kernel_sizes: Sequence[int], strides: Sequence[int]):
    """Frames after the conv stack (no padding): floor((L - K) / S) + 1 per layer; ints or tensors."""
    for k, s in zip(kernel_sizes, strides):
        length = torch.div(length - k, s, rounding_mode="floor") + 1 if torch.is_tensor(length) \
            else (length - k) // s + 1
    return length


def receptive_field(kernel_sizes: Sequence[int], strides: Sequence[int]) -> int:
    """Fewest input samples that give one output frame."""
    field, jump = 1, 1
    for k, s in zip(kernel_sizes, strides):
        field += (k - 1) * jump
        jump *= s
    return field


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
                              input_lengths=None, batch_invariant=False, upcast=False):
    """Eager torch implementation (channels-first internally, like transformers)."""
    cast = (lambda t: t.double() if t is not None else None) if upcast else (lambda t: t)
    x = _run_layers(cast(input_values)[:, None, :], range(len(conv_weights)), conv_weights, conv_biases,
                    conv_strides, norm_mode, norm_weights, norm_biases, eps, get_activation(activation, True),
                    input_lengths, batch_invariant, cast).transpose(1, 2)
    return x if upcast else x.to(input_values.dtype)


def check_feature_encoder_inputs(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                                 norm_weights, norm_biases, input_lengths=None):
    if not isinstance(input_values, torch.Tensor) or input_values.dim() != 2:
        raise ValueError("feature_encoder: input_values must be a [batch, samples] tensor, got "
                         f"{tuple(input_values.shape) if isinstance(input_values, torch.Tensor) else type(input_values)}")
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
    if input_lengths is not None and tuple(input_lengths.shape) != (input_values.shape[0],):
        raise ValueError(f"feature_encoder: input_lengths must have shape [batch], got {tuple(input_lengths.shape)}")
    if input_lengths is not None and input_lengths.device != input_values.device:
        raise ValueError(f"feature_encoder: input_lengths on {input_lengths.device}, input_values on "
                         f"{input_values.device}")


feature_encoder_op = Op("feature_encoder")


@feature_encoder_op.register("torch", check=lambda *a, **k: None)
def feature_encoder_torch(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                          norm_weights, norm_biases, *, eps=1e-5, activation="gelu",
                          input_lengths=None, batch_invariant=False, trim_padding=False):
    """cuDNN / oneDNN convs; with trim_padding, layers 1..N run per utterance on its real frames."""
    kernels = [w.shape[-1] for w in conv_weights]
    frames = None
    if trim_padding and input_lengths is not None and len(conv_weights) > 1:
        frames = conv_output_length(input_lengths, kernels, conv_strides).tolist()  # one host sync
        total = conv_output_length(input_values.shape[1], kernels, conv_strides)
        if min(frames) == total:  # nothing padded at the output: one batched pass
            frames = None
    if frames is None:
        return feature_encoder_reference(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                                         norm_weights, norm_biases, eps=eps, activation=activation,
                                         input_lengths=input_lengths, batch_invariant=batch_invariant)
    args = (conv_weights, conv_biases, conv_strides, norm_mode, norm_weights, norm_biases, eps,
            get_activation(activation, True), input_lengths, batch_invariant, lambda t: t)
    first = _run_layers(input_values[:, None, :], [0], *args)  # [B, C, T0]: group stats need all of it
    first_frames = conv_output_length(input_lengths, kernels[:1], conv_strides[:1]).tolist()
    out = first.new_zeros(first.shape[0], total, conv_weights[-1].shape[0])
    rest = range(1, len(conv_weights))
    for b, (n0, n) in enumerate(zip(first_frames, frames)):
        if n > 0:
            out[b, :n] = _run_layers(first[b:b + 1, :, :n0], rest, *args)[0].transpose(0, 1)
    return out


def _triton_layers_check(input_values, conv_weights, conv_biases, norm_mode, norm_weights,
                         norm_biases, activation) -> Optional[str]:
    """Can Triton run layers 1..N (exact GELU, device and one dtype for every tensor, limits)?"""
    if activation != "gelu":
        return f"activation {activation!r} not implemented in the kernels (only 'gelu')"
    tensors = [input_values, *conv_weights, *conv_biases, *norm_weights, *norm_biases]
    reason = triton_device_reason(*tensors)
    if reason:
        return reason
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1:
        return f"mixed dtypes {sorted(map(str, dtypes))}"
    if norm_mode == "layer" and any(t is None for t in (*norm_weights, *norm_biases)):
        return "LayerNorm without an affine weight or bias (None) is not implemented in the kernels"
    for i, w in enumerate(conv_weights[1:], 1):  # shapes and the channel chain: check_feature_encoder_inputs
        norm = (norm_weights[i], norm_biases[i]) if norm_mode == "layer" else (None, None)
        reason = conv_layer_check(input_values, w, conv_biases[i], *norm)
        if reason:
            return f"layer {i}: {reason}"
    return None


def feature_encoder_triton_check(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                                 norm_weights, norm_biases, *, eps=1e-5, activation="gelu",
                                 input_lengths=None, batch_invariant=False, trim_padding=False):
    reason = _triton_layers_check(input_values, conv_weights, conv_biases, norm_mode, norm_weights,
                                  norm_biases, activation)
    if reason:
        return reason
    reason = first_conv_layer_triton_check(
        input_values, conv_weights[0], conv_biases[0], conv_strides[0], norm_mode, norm_weights[0],
        norm_biases[0], eps=eps, activation=activation, input_lengths=input_lengths,
        batch_invariant=batch_invariant)
    return f"layer 0: {reason}" if reason else None


def _kernel_stack(first_layer, input_values, conv_weights, conv_biases, conv_strides, norm_mode, norm_weights,
                  norm_biases, *, eps=1e-5, activation="gelu", input_lengths=None, batch_invariant=False,
                  trim_padding=False):
    """Layer 0 through ``first_layer`` (Triton or CUDA), layers 1..N through conv_layer's Triton
    GEMMs. trim_padding is a hint these backends do not take: they compute every frame."""
    x = first_layer(input_values, conv_weights[0], conv_biases[0], conv_strides[0], norm_mode,
                    norm_weights[0], norm_biases[0], eps=eps, input_lengths=input_lengths,
                    batch_invariant=batch_invariant)
    for i in range(1, len(conv_weights)):
        norm = ("layer", norm_weights[i], norm_biases[i]) if norm_mode == "layer" else ("none", None, None)
        x = conv_layer(x, conv_weights[i], conv_biases[i], conv_strides[i], *norm, eps=eps)
    return x


@feature_encoder_op.register("triton", check=feature_encoder_triton_check, auto=False)
def feature_encoder_triton(*args, **kwargs):
    return _kernel_stack(first_conv_layer_triton, *args, **kwargs)


def feature_encoder_cuda_check(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                               norm_weights, norm_biases, *, eps=1e-5, activation="gelu",
                               input_lengths=None, batch_invariant=False, trim_padding=False):
    reason = first_conv_layer_cuda_check(
        input_values, conv_weights[0], conv_biases[0], conv_strides[0], norm_mode, norm_weights[0],
        norm_biases[0], eps=eps, activation=activation, input_lengths=input_lengths,
        batch_invariant=batch_invariant)
    if reason:
        return f"layer 0: {reason}"
    reason = _triton_layers_check(input_values, conv_weights, conv_biases, norm_mode, norm_weights,
                                  norm_biases, activation)
    return f"layers 1..{len(conv_weights) - 1} (Triton): {reason}" if reason else None


@feature_encoder_op.register("cuda", check=feature_encoder_cuda_check, auto=False)
def feature_encoder_cuda(*args, **kwargs):
    """Layer 0 on the CUDA extension (forward only), layers 1..N on the Triton kernels. Opt-in
    until a GPU benchmark shows the CUDA first layer faster than Triton's (bench first_conv_layer_fwd)."""
    return _kernel_stack(first_conv_layer_cuda, *args, **kwargs)


def feature_encoder(input_values, conv_weights, conv_biases, conv_strides, norm_mode, norm_weights,
                    norm_biases, *, eps: float = 1e-5, activation: str = "gelu",
                    input_lengths: Optional[torch.Tensor] = None, batch_invariant: bool = False,
                    trim_padding: bool = False, backend: Optional[str] = None):
    """Run the whole conv feature encoder; returns [B, T, C]. See the module docstring."""
    check_feature_encoder_inputs(input_values, conv_weights, conv_biases, conv_strides, norm_mode,
                                 norm_weights, norm_biases, input_lengths)
    return feature_encoder_op(input_values, list(conv_weights), list(conv_biases), list(conv_strides),
                              norm_mode, list(norm_weights), list(norm_biases), eps=eps,
                              activation=activation, input_lengths=input_lengths,
                              batch_invariant=batch_invariant, trim_padding=trim_padding, backend=backend)
