"""Attention on packed rows (sequences back to back, the layout our model's encoder uses), forward
and backward, side by side.

Shapes: q, k, v [N, H, D] rows of the batch's real frames (N = sum of the lengths), views of one
[N, 3, H, D] projection output as the model makes them. Impls: triton = unispeech_kernels.
attention_packed(backend="triton"); sdpa = its torch backend, F.scaled_dot_product_attention per
sequence on its rows (no mask: SDPA's fastest path); flex = torch.compile'd FlexAttention over all
rows as one sequence with a document mask (query and key in the same utterance), its own varlen
recipe, the block mask built once per shape outside the timing. FLOPs and bytes as
bench/test_attention.py (real work only).
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench import cases
from bench.harness import input_set_count, rel_diff, verify_same
from bench.test_attention import _case, _flex, _id, _raise, attention_dims

FWD = cases.expand("attention_packed_fwd")
BWD = cases.expand("attention_packed_bwd")


def make_impl(impl: str, lengths: list, device):
    """fn(q, k, v) -> out [N, H, D] for one implementation."""
    if impl in ("triton", "sdpa"):  # sdpa: the op's torch backend, unmasked SDPA per sequence
        import unispeech_kernels
        backend = "triton" if impl == "triton" else "torch"
        return lambda q, k, v: unispeech_kernels.attention_packed(q, k, v, lengths, backend=backend)
    if impl == "flex":
        flex, create_block_mask = _flex()
        n = sum(lengths)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
        block_mask = create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, n, n, device=device)
        return lambda q, k, v: flex(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                    block_mask=block_mask)[0].transpose(0, 1)
    raise ValueError(f"unknown packed attention impl {impl!r}")


def make_inputs(model, lengths, dtype, device, backward):
    frames, heads, dim = attention_dims(model, lengths)
    n = sum(frames)
    per_set = (8 if backward else 4) * n * heads * dim * torch.finfo(dtype).bits // 8
    sets = []
    for _ in range(input_set_count(per_set, device)):
        qkv = torch.randn(n, 3, heads, dim, device=device, dtype=dtype, requires_grad=backward)
        sets.append(tuple(qkv.unbind(1)))  # [N, H, D] views, as the model's projection gives them
    shape = f"{model} B{len(frames)} N{n} H{heads} D{dim}"
    return sets, frames, heads, dim, shape


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", FWD, ids=_id)
def test_attention_packed_fwd(benchmark, recorder, device, case, dtype):
    model, seconds, _, impl, lengths = case
    sets, frames, heads, dim, shape = make_inputs(model, lengths, dtype, device, backward=False)
    c = _case("attention_packed_fwd", model, seconds, impl, dtype, frames, heads, dim, shape, False)
    try:
        fn = make_impl(impl, frames, device)
    except Exception as e:  # e.g. FlexAttention missing from this torch
        fn = functools.partial(_raise, e)
    with torch.no_grad():
        verify = functools.partial(verify_same, fn, make_impl("sdpa", frames, device), sets[0], vs="sdpa")
        recorder.run(benchmark, c, fn, sets, device, verify=verify)


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", BWD, ids=_id)
def test_attention_packed_bwd(benchmark, recorder, device, case, dtype):
    """Times the backward alone: each input set's forward graph is built once (untimed) and kept."""
    model, seconds, _, impl, lengths = case
    sets, frames, heads, dim, shape = make_inputs(model, lengths, dtype, device, backward=True)
    c = _case("attention_packed_bwd", model, seconds, impl, dtype, frames, heads, dim, shape, True)
    try:
        fwd = make_impl(impl, frames, device)
        graphs = []
        for q, k, v in sets:
            out = fwd(q, k, v)
            graphs.append((out, torch.randn_like(out), (q, k, v)))

        def fn(out, grad, leaves):
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)
    except Exception as e:  # a backend that cannot run: its first timed call reports it
        graphs, fn = [(None, None, None)], functools.partial(_raise, e)
    recorder.run(benchmark, c, fn, graphs, device, verify=functools.partial(verify_bwd, fwd, frames, device, *sets[0]))


def verify_bwd(fwd, frames, device, q, k, v):
    grad = torch.randn_like(q)

    def grads(f):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return list(torch.autograd.grad(f(*leaves), leaves, grad))

    return {"rel_diff": rel_diff(grads(fwd), grads(make_impl("sdpa", frames, device))), "vs": "sdpa"}
