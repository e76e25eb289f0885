"""Masked bidirectional attention, forward and backward, every implementation side by side.

Shapes: q, k, v [B, S, H, D] (the model's layout; sdpa / flex / eager get the [B, H, S, D] transposed
views, as transformers passes them); key-padding mask [B, S] from the batch's lengths.
Impls: triton / cuda = unispeech_kernels.attention(backend=...); sdpa = F.scaled_dot_product_attention
with a bool mask [B, 1, 1, S]; flex = torch.compile'd FlexAttention with a block mask built from the
lengths over queries and keys (blocks of padded queries are skipped, as ours skips them), flex_keys =
the same with keys masked only (how a key-padding mask is usually written); block masks are built once
per shape, outside the timing, as a model builds one for all layers; torch = the eager reference
(materialised scores, softmax, PV).
FLOPs: 4 n^2 H D per sequence of n real frames (bwd 2.5x); bytes: q, k, v, o over real frames
(bwd: q, k, v, o, dO, dQ, dK, dV). See physics.py.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench import cases, physics
from bench.harness import Case, input_set_count, rel_diff

FWD = cases.expand("attention_fwd")
BWD = cases.expand("attention_bwd")


def _id(c):
    return f"{c[0]}-{c[1]}s-{c[3]}"


@functools.lru_cache(None)
def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def make_impl(impl: str, lengths: torch.Tensor, seq: int):
    """fn(q, k, v, mask) -> out [B, S, H, D] for one implementation."""
    if impl in ("triton", "cuda"):
        import unispeech_kernels
        return lambda q, k, v, m: unispeech_kernels.attention(q, k, v, m, dropout_p=0.0, backend=impl)
    if impl == "sdpa":
        return lambda q, k, v, m: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m[:, None, None, :]).transpose(1, 2)
    if impl == "torch":
        from unispeech_kernels.ops.attention import attention_reference
        return lambda q, k, v, m: attention_reference(q, k, v, m)
    if impl in ("flex", "flex_keys"):
        flex, create_block_mask = _flex()
        if impl == "flex":  # padded query rows skipped too, as our kernel skips them
            def mask_mod(b, h, qi, ki):
                return (qi < lengths[b]) & (ki < lengths[b])
        else:
            def mask_mod(b, h, qi, ki):
                return ki < lengths[b]
        block_mask = create_block_mask(mask_mod, lengths.shape[0], None, seq, seq, device=lengths.device)
        return lambda q, k, v, m: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       block_mask=block_mask).transpose(1, 2)
    raise ValueError(f"unknown attention impl {impl!r}")


def attention_dims(model, lengths):
    """(frames per utterance after the conv stack, heads, head_dim) of a model case."""
    cfg = cases.MODELS[model]
    heads = cfg["num_attention_heads"]
    return cases.frame_lengths(lengths, cfg), heads, cfg["hidden_size"] // heads


def make_inputs(model, lengths, dtype, device, backward):
    frames, heads, dim = attention_dims(model, lengths)
    b, s = len(frames), max(frames)
    n = torch.tensor(frames, device=device)
    mask = torch.arange(s, device=device)[None, :] < n[:, None]
    per_set = (8 if backward else 4) * b * s * heads * dim * torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(input_set_count(per_set, device)):
        q, k, v = (torch.randn(b, s, heads, dim, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
        sets.append((q, k, v, mask))
    shape = f"{model} B{b} S{s} H{heads} D{dim}"
    return sets, n, frames, heads, dim, shape


def _case(op, model, seconds, impl, dtype, frames, heads, dim, shape, backward):
    elem = torch.finfo(dtype).bits // 8
    return Case(op, impl, dtype, shape,
                dict(model=model, seconds=seconds, batch=len(frames), heads=heads, head_dim=dim, frames=frames),
                flops=physics.attention_flops(frames, heads, dim, backward),
                nbytes=physics.attention_bytes(frames, heads, dim, elem, backward))


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", FWD, ids=_id)
def test_attention_fwd(benchmark, recorder, device, case, dtype):
    model, seconds, _, impl, lengths = case
    sets, n, frames, heads, dim, shape = make_inputs(model, lengths, dtype, device, backward=False)
    c = _case("attention_fwd", model, seconds, impl, dtype, frames, heads, dim, shape, False)
    try:
        fn = make_impl(impl, n, max(frames))
    except Exception as e:  # e.g. FlexAttention missing from this torch
        fn = functools.partial(_raise, e)
    with torch.no_grad():
        recorder.run(benchmark, c, fn, sets, device, verify=functools.partial(verify_fwd, fn, *sets[0]))


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", BWD, ids=_id)
def test_attention_bwd(benchmark, recorder, device, case, dtype):
    """Times the backward alone: each input set's forward graph is built once (untimed) and kept."""
    model, seconds, _, impl, lengths = case
    sets, n, frames, heads, dim, shape = make_inputs(model, lengths, dtype, device, backward=True)
    c = _case("attention_bwd", model, seconds, impl, dtype, frames, heads, dim, shape, True)
    try:
        fwd = make_impl(impl, n, max(frames))
        graphs = []
        for q, k, v, m in sets:
            out = fwd(q, k, v, m)
            graphs.append((out, torch.randn_like(out), (q, k, v)))

        def fn(out, grad, leaves):
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)
    except Exception as e:  # a backend that cannot run: its first timed call reports it
        graphs, fn = [(None, None, None)], functools.partial(_raise, e)
    recorder.run(benchmark, c, fn, graphs, device, verify=functools.partial(verify_bwd, fwd, *sets[0]))


def verify_fwd(fn, q, k, v, mask):
    """Our output vs SDPA's on real query rows (padded rows are ours to define)."""
    with torch.no_grad():
        return {"rel_diff": rel_diff(fn(q, k, v, mask)[mask], make_impl("sdpa", None, None)(q, k, v, mask)[mask]),
                "vs": "sdpa"}


def verify_bwd(fwd, q, k, v, mask):
    """Our dq, dk, dv vs SDPA's for an upstream gradient on real query rows."""
    grad = torch.randn_like(q) * mask[:, :, None, None]

    def grads(f):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return [g[mask] for g in torch.autograd.grad(f(*leaves, mask), leaves, grad)]

    return {"rel_diff": rel_diff(grads(fwd), grads(make_impl("sdpa", None, None))), "vs": "sdpa"}


def _raise(error, *args):
    raise error
