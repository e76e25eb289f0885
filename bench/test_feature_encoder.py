"""Convolutional feature encoder forward (7 convs, 512 channels), every implementation side by side.

Shapes: audio [B, L] padded with zeros past each utterance's length -> features [B, T, 512].
base: group norm after the first conv, no conv bias; large: layer norm after every conv, conv bias.
Impls: triton / cuda / torch = unispeech_kernels.feature_encoder(backend=...) (torch: eager convs,
cuDNN on a GPU); compile = torch.compile(dynamic=False) of the eager reference.
FLOPs: 2 C_out C_in K per real output frame of every conv (49 GFLOP per 10 s); bytes: audio, weights
and the final features once. See physics.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench import cases, physics
from bench.harness import Case, input_set_count, verify_real_frames

CASES = cases.expand("feature_encoder_fwd")


def _id(c):
    return f"{c[0]}-{c[1]}s-{c[3]}"


def make_weights(model, dtype, device):
    cfg = cases.MODELS[model]
    c_in, weights, biases = 1, [], []
    for c_out, k in zip(cfg["conv_dim"], cfg["conv_kernel"]):
        weights.append(torch.randn(c_out, c_in, k, device=device, dtype=dtype) / (c_in * k) ** 0.5)
        biases.append(torch.randn(c_out, device=device, dtype=dtype) * 0.1 if cfg["conv_bias"] else None)
        c_in = c_out
    n_norms = 1 if cfg["feat_extract_norm"] == "group" else len(weights)
    norm_w = [1 + 0.1 * torch.randn(c, device=device, dtype=dtype) for c in cfg["conv_dim"][:n_norms]]
    norm_b = [0.1 * torch.randn(c, device=device, dtype=dtype) for c in cfg["conv_dim"][:n_norms]]
    return dict(conv_weights=weights, conv_biases=biases, conv_strides=cfg["conv_stride"],
                norm_mode=cfg["feat_extract_norm"], norm_weights=norm_w, norm_biases=norm_b)


@functools.lru_cache(None)
def _compiled_reference():
    from unispeech_kernels.ops.feature_encoder import feature_encoder_reference
    return torch.compile(feature_encoder_reference, dynamic=False)


def make_impl(impl, weights):
    if impl in ("triton", "cuda", "torch"):
        import unispeech_kernels
        return lambda audio, lengths: unispeech_kernels.feature_encoder(
            audio, **weights, input_lengths=lengths, backend=impl)
    if impl == "compile":
        ref = _compiled_reference()
        w = dict(weights, conv_weights=list(weights["conv_weights"]), conv_biases=list(weights["conv_biases"]))
        return lambda audio, lengths: ref(audio, **w, input_lengths=lengths)
    raise ValueError(f"unknown feature encoder impl {impl!r}")


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_feature_encoder_fwd(benchmark, recorder, device, case, dtype):
    model, seconds, batch, impl, lengths = case
    cfg = cases.MODELS[model]
    weights = make_weights(model, dtype, device)
    n = torch.tensor(lengths, device=device)
    longest = max(lengths)
    elem = torch.finfo(dtype).bits // 8
    frames = cases.frame_lengths(lengths, cfg)
    sets = []
    # rotation sized by the largest activation (conv 0's output), what a cache could otherwise hold
    conv0_frames = physics.conv_out_len(longest, cfg["conv_kernel"][0], cfg["conv_stride"][0])
    for _ in range(input_set_count(batch * conv0_frames * cfg["conv_dim"][0] * elem, device)):
        sets.append((cases.padded_audio(lengths, dtype, device)[0], n))
    conv = (cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"])
    c = Case("feature_encoder_fwd", impl, dtype, f"{model} B{batch} L{longest} T{max(frames)}",
             dict(model=model, seconds=seconds, batch=batch, norm=cfg["feat_extract_norm"], samples=lengths),
             flops=physics.feature_encoder_flops(lengths, *conv),
             nbytes=physics.feature_encoder_bytes(lengths, *conv, elem))
    fn = make_impl(impl, weights)
    verify = functools.partial(verify_real_frames, fn, make_impl("torch", weights), sets[0], frames)  # vs eager
    with torch.no_grad():
        recorder.run(benchmark, c, fn, sets, device, verify=verify)
