"""The UniSpeech pre-training objective's cost next to the encoder forward it rides on.

Cases (same model, weights and batch, side by side in one run):
- encoder_forward: UniSpeechModel forward in training mode with autograd on and the time mask
  given (what a pre-training step runs before the loss), impl "ours".
- pretraining_loss: ``unispeech.pretraining.pretraining_losses`` forward AND backward (into its
  inputs and the head's weights): negative sampling, the [B, T, T] similarity GEMM + gathers +
  log-softmax of the contrastive loss, the soft code distribution (weight_proj recomputed) for the
  diversity loss, replacement + ctc_proj + CTC. Its row carries ``fraction_of_encoder_forward``
  (median loss time / median encoder-forward time): the objective must be a small fraction.
Shapes: on a GPU, the large model (1024 x 24) at batch 8 x 10 s (one utterance of 10 s, the others
in [5, 10] s) in bf16 with transformers' pre-training defaults (100 negatives, 2 x 320 codevectors)
and the authors' mask_time_prob 0.5 / length 10. On a CPU (2 shared cores here) the large model's
forward takes minutes per round, so the CPU case is the base model (768 x 12) at batch 2 x 10 s
in fp32 (PRETRAIN_BENCH_MODEL=large: the large model at batch 2 x 10 s in fp32, a few minutes; batch 8
needs more than the 24 GB of our CPU machines for the fp32 training activations)
-- a CPU number says nothing about the GPU ratio, only that the code runs.
FLOPs: not reported (the loss is memory- and launch-bound; the ratio is the figure of merit).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from bench import cases
from bench.harness import Case

_MEDIANS = {}  # encoder_forward median ms per device type, for the loss row's ratio


def _setting(device):
    if device.type == "cuda":
        return "large", 8, torch.bfloat16
    if os.environ.get("PRETRAIN_BENCH_MODEL") == "large":  # the large model on a CPU: minutes
        return "large", 2, torch.float32
    return "base", 2, torch.float32


def _build(device):
    from unispeech import UniSpeechConfig, UniSpeechForPreTraining

    model_name, batch, dtype = _setting(device)
    fields = dict(cases.MODELS[model_name], layerdrop=0.0, mask_time_prob=0.5, mask_time_length=10,
                  num_ctc_classes=80)
    fields.pop("vocab_size")
    config = UniSpeechConfig(**fields, attn_implementation="triton" if device.type == "cuda" else "sdpa")
    with torch.device(device):
        model = UniSpeechForPreTraining(config)
    model = model.to(dtype).train()
    lengths = cases.batch_lengths(10, batch)
    audio, attention = cases.padded_audio(lengths, dtype, device)
    attention = attention.long()
    np.random.seed(cases.SEED)
    from unispeech.pretraining import pretraining_mask

    mask = pretraining_mask(model, audio, attention)
    phones = [max(1, int(12 * n / cases.SAMPLE_RATE)) for n in lengths]  # ~12 phones per second
    labels = torch.full((batch, max(phones)), -100, device=device, dtype=torch.long)
    for i, n in enumerate(phones):
        labels[i, :n] = torch.randint(1, config.num_ctc_classes, (n,), device=device)
    return model, audio, attention, mask, labels, lengths, dtype, model_name


_BUILT = {}


def _get(device):
    if device.type not in _BUILT:
        _BUILT[device.type] = _build(device)
    return _BUILT[device.type]


def _case(op, device):
    model, audio, attention, mask, labels, lengths, dtype, name = _get(device)
    shape = f"{name} B{len(lengths)} 10s"
    params = dict(model=name, seconds=10, batch=len(lengths), samples=lengths,
                  frames=cases.frame_lengths(lengths, cases.MODELS[name]), masked_frames=int(mask.sum()),
                  num_negatives=model.config.num_negatives)
    return Case(op, "ours", dtype, shape, params)


def test_encoder_forward(benchmark, recorder, device):
    model, audio, attention, mask, *_ = _get(device)
    case = _case("encoder_forward", device)

    def forward(a, m, t):
        return model.unispeech(a, attention_mask=m, mask_time_indices=t).last_hidden_state

    recorder.run(benchmark, case, forward, [(audio, attention, mask)], device)
    if benchmark.stats is not None:
        _MEDIANS[device.type] = recorder.rows[-1]["median_ms"]


def test_pretraining_loss(benchmark, recorder, device):
    from unispeech.pretraining import pretraining_losses

    model, audio, attention, mask, labels, *_ = _get(device)
    case = _case("pretraining_loss", device)
    with torch.no_grad():
        out = model.unispeech(audio, attention_mask=attention, mask_time_indices=mask)
        quantized, _ = model.quantizer(out.extract_features)
        quantized = model.project_hid(model.project_q(quantized))
    leaves = [t.detach().clone().requires_grad_() for t in (out.last_hidden_state, out.extract_features, quantized)]

    def loss_fwd_bwd(hidden, features, targets):
        losses = pretraining_losses(model, audio, attention, hidden, features, targets, mask, None, labels)
        losses.loss.backward()
        for t in (hidden, features, targets):
            t.grad = None
        model.zero_grad(set_to_none=True)
        return losses.loss.detach()

    encoder = _MEDIANS.get(device.type)
    if encoder is None:
        pytest.skip("needs test_encoder_forward's timing first (run the whole file)")
    recorder.run(benchmark, case, loss_fwd_bwd, [tuple(leaves)], device)
    if benchmark.stats is not None:
        fraction = recorder.rows[-1]["median_ms"] / encoder
        recorder.rows[-1].update(encoder_forward_ms=encoder, fraction_of_encoder_forward=fraction)
        print(f"pretraining loss (fwd+bwd) = {100 * fraction:.1f}% of the encoder forward", flush=True)
