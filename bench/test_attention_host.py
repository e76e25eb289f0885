"""Host time of one attention call, the kernel launch stubbed: what Python and torch cost on top of
the kernels, on any machine (CPU tensors; no GPU, no interpreter). Goal: <= 25 us per call, against
a forward kernel of ~70-85 us at S 1000 (perf_model.md): above it, a layer's launches would leave the
GPU waiting for the host.

Stubbed: the autotuned launch (``launch_tuned``, where Triton's own launch cost would begin) and
the dispatcher's device probe (CPU tensors are not Triton's without the interpreter). Everything
else runs as in a model: the input checks, the dispatcher, kv_end of the mask, allocations, and for
``training`` the autograd graph of the forward (inputs requiring grad). Shapes: UniSpeech-large,
B 8 x 10 s (S 499, H 16, D 64) bf16; padded = ``attention(q, k, v, mask)`` with the batch's prefix
mask, the same mask object each call (as every layer of a forward gets it); packed =
``attention_packed(q, k, v, lengths)`` on [N, H, D] views of one projection.
Run: ``python -m pytest bench/test_attention_host.py --benchmark-columns=min,median,max,rounds``.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import cases

pytestmark = pytest.mark.skipif(bool(os.environ.get("BENCH_DRY_RUN")), reason="host timing, not a device case")

MODEL, SECONDS, BATCH = "large", 10, 8


@pytest.fixture
def stubbed_launch(monkeypatch):
    from unispeech_kernels import dispatch
    from unispeech_kernels.ops import attention

    monkeypatch.setattr(attention, "launch_tuned", lambda *args, **kwargs: None)
    monkeypatch.setattr(dispatch, "triton_device_reason", lambda *tensors, **kwargs: None)


def _projections(rows_shape, heads, head_dim, requires_grad):
    """q, k, v as views of one [..., 3, H, D] bf16 projection (a leaf when ``requires_grad``)."""
    qkv = torch.randn(*rows_shape, 3, heads, head_dim, dtype=torch.bfloat16, requires_grad=requires_grad)
    return qkv.unbind(-3)


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_attention_host(benchmark, stubbed_launch, layout, mode):
    import unispeech_kernels

    cfg = cases.MODELS[MODEL]
    lengths = cases.frame_lengths(cases.batch_lengths(SECONDS, BATCH), cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg["hidden_size"] // heads
    training = mode == "training"
    if layout == "padded":
        seq = max(lengths)
        q, k, v = _projections((BATCH, seq), heads, head_dim, training)
        mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]

        def call():
            return unispeech_kernels.attention(q, k, v, mask, backend="triton")
    else:
        q, k, v = _projections((sum(lengths),), heads, head_dim, training)

        def call():
            return unispeech_kernels.attention_packed(q, k, v, lengths, backend="triton")
    with torch.set_grad_enabled(training):
        out = benchmark(call)
    assert out.shape == q.shape and out.requires_grad == training
