"""The feature encoder's first layer alone (1 -> 512 channels, kernel 10, stride 5, + norm + GELU),
where the CUDA extension competes with Triton (CUDA becomes a default only if it wins here).

Shapes: audio [B, L] padded with zeros past each utterance's length -> [B, T, 512].
base: GroupNorm (statistics over time), no conv bias; large: LayerNorm over channels, conv bias.
Impls: cuda / triton / torch = unispeech_kernels.ops.first_conv_layer.first_conv_layer(backend=...)
(torch: eager cuDNN conv + norm + GELU).
FLOPs: 2 C K per real output frame (0.33 GFLOP per 10 s); bytes: audio, weights and the [T, C] output
once -- the output dominates: this layer is memory-bound. See physics.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench import cases, physics
from bench.harness import Case, input_set_count, verify_real_frames

CASES = cases.expand("first_conv_layer_fwd")


def _id(c):
    return f"{c[0]}-{c[1]}s-{c[3]}"


def make_layer(model, dtype, device):
    cfg = cases.MODELS[model]
    c, k, stride = cfg["conv_dim"][0], cfg["conv_kernel"][0], cfg["conv_stride"][0]
    weight = torch.randn(c, 1, k, device=device, dtype=dtype) / k ** 0.5
    bias = 0.1 * torch.randn(c, device=device, dtype=dtype) if cfg["conv_bias"] else None
    norm_w = 1 + 0.1 * torch.randn(c, device=device, dtype=dtype)
    norm_b = 0.1 * torch.randn(c, device=device, dtype=dtype)
    return dict(weight=weight, bias=bias, stride=stride, norm_mode=cfg["feat_extract_norm"], norm_weight=norm_w,
                norm_bias=norm_b)


def make_impl(impl, layer):
    from unispeech_kernels.ops.first_conv_layer import first_conv_layer
    return lambda audio: first_conv_layer(audio, **layer, backend=impl)


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_first_conv_layer_fwd(benchmark, recorder, device, case, dtype):
    model, seconds, batch, impl, lengths = case
    cfg = cases.MODELS[model]
    layer = make_layer(model, dtype, device)
    c_out, k, stride = cfg["conv_dim"][0], cfg["conv_kernel"][0], cfg["conv_stride"][0]
    longest = max(lengths)
    frames = [physics.conv_out_len(n, k, stride) for n in lengths]  # real output frames per utterance
    elem = torch.finfo(dtype).bits // 8
    sets = [cases.padded_audio(lengths, dtype, device)[:1]
            for _ in range(input_set_count(batch * max(frames) * c_out * elem, device))]
    c = Case("first_conv_layer_fwd", impl, dtype, f"{model} B{batch} L{longest} T{max(frames)} C{c_out}",
             dict(model=model, seconds=seconds, batch=batch, norm=cfg["feat_extract_norm"], samples=lengths),
             flops=physics.feature_encoder_flops(lengths, [c_out], [k], [stride]),
             nbytes=physics.feature_encoder_bytes(lengths, [c_out], [k], [stride], elem))
    fn = make_impl(impl, layer)
    verify = functools.partial(verify_real_frames, fn, make_impl("torch", layer), sets[0], frames)  # vs eager
    with torch.no_grad():
        recorder.run(benchmark, c, fn, sets, device, verify=verify)
