"""Positional convolutional embedding with its residual (x + GELU(grouped conv(x))), forward and
forward+backward, every implementation side by side.

Shapes: hidden [B, T, C] with padded frames zeroed (as the encoder hands it over); weight
[C, C / 16, 128] (weight norm folded), bias [C]. base C = 768, large C = 1024.
Impls: triton / cuda / torch = unispeech_kernels.pos_conv_embed(backend=...) (torch: eager cuDNN);
compile = torch.compile(dynamic=False) of the eager reference.
FLOPs: 2 T C (C / G) K per real frame (fwd+bwd: 3x); bytes: hidden, weight, out (fwd+bwd adds dOut,
hidden again, dHidden, dW). See physics.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench import cases, physics
from bench.harness import Case, input_set_count, verify_same

FWD = cases.expand("pos_conv_fwd")
FWD_BWD = cases.expand("pos_conv_fwd_bwd")


def _id(c):
    return f"{c[0]}-{c[1]}s-{c[3]}"


@functools.lru_cache(None)
def _compiled_reference():
    from unispeech_kernels.ops.pos_conv import pos_conv_reference
    return torch.compile(pos_conv_reference, dynamic=False)


def make_impl(impl, groups):
    if impl in ("triton", "cuda", "torch"):
        import unispeech_kernels
        return lambda h, w, b: unispeech_kernels.pos_conv_embed(h, w, b, groups=groups, backend=impl)
    if impl == "compile":
        ref = _compiled_reference()
        return lambda h, w, b: ref(h, w, b, groups=groups)
    raise ValueError(f"unknown pos conv impl {impl!r}")


def setup_case(op, case, dtype, device, backward):
    model, seconds, batch, impl, lengths = case
    cfg = cases.MODELS[model]
    ch, groups, k = cfg["hidden_size"], cfg["num_conv_pos_embedding_groups"], cfg["num_conv_pos_embeddings"]
    frames = cases.frame_lengths(lengths, cfg)
    t = max(frames)
    valid = (torch.arange(t, device=device)[None, :] < torch.tensor(frames, device=device)[:, None])[..., None]
    weight = (torch.randn(ch, ch // groups, k, device=device, dtype=dtype) / (ch // groups * k) ** 0.5)
    bias = 0.1 * torch.randn(ch, device=device, dtype=dtype)
    weight.requires_grad_(backward)
    bias.requires_grad_(backward)
    elem = torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(input_set_count((3 if backward else 2) * batch * t * ch * elem, device)):
        hidden = (torch.randn(batch, t, ch, device=device, dtype=dtype) * valid).requires_grad_(backward)
        grad = (torch.randn(batch, t, ch, device=device, dtype=dtype),) if backward else ()
        sets.append((hidden, weight, bias) + grad)
    c = Case(op, impl, dtype, f"{model} B{batch} T{t} C{ch} G{groups} K{k}",
             dict(model=model, seconds=seconds, batch=batch, channels=ch, groups=groups, kernel=k, frames=frames),
             flops=physics.pos_conv_flops(frames, ch, groups, k, backward),
             nbytes=physics.pos_conv_bytes(frames, ch, groups, k, elem, backward))
    return c, make_impl(impl, groups), sets


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", FWD, ids=_id)
def test_pos_conv_fwd(benchmark, recorder, device, case, dtype):
    c, fn, sets = setup_case("pos_conv_fwd", case, dtype, device, backward=False)
    verify = functools.partial(verify_same, fn, make_impl("torch", c.params["groups"]), sets[0])
    with torch.no_grad():
        recorder.run(benchmark, c, fn, sets, device, verify=verify)


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", FWD_BWD, ids=_id)
def test_pos_conv_fwd_bwd(benchmark, recorder, device, case, dtype):
    c, fwd, sets = setup_case("pos_conv_fwd_bwd", case, dtype, device, backward=True)

    def grads(f, hidden, weight, bias, grad):
        return torch.autograd.grad(f(hidden, weight, bias), (hidden, weight, bias), grad)

    fn = functools.partial(grads, fwd)
    ref = functools.partial(grads, make_impl("torch", c.params["groups"]))
    recorder.run(benchmark, c, fn, sets, device, verify=functools.partial(verify_same, fn, ref, sets[0]))
