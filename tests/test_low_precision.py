"""fp16 and bf16 without overflow: fp32 statistics in the norms and the CTC log-softmax, fp16 with no
inf / NaN (CPU: a base-shaped model on 3 s; GPU: a large-shaped one on 60 s), and fp16 autocast CTC
training that stays finite. The differences to fp32 are printed (``-s``)."""
import pytest
import torch
import torch.nn.functional as F

import unispeech
from tests.test_batch_invariance import TINY, _padded_batch
from tests.tolerances import assert_error_within
from unispeech_kernels.ops.first_conv_layer import group_norm_over_lengths

BASE_SHAPED = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
LARGE_SHAPED = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_masked_group_norm_keeps_fp32_statistics(dtype):
    """Conv outputs of size ~1000 (squares past fp16's 65504): the statistics over each utterance's
    frames are taken in fp32, as F.group_norm takes them (the eager baseline, run per utterance)."""
    x = (1000 * torch.randn(2, 8, 300)).to(dtype)
    weight, bias = (1 + 0.1 * torch.randn(8)).to(dtype), (0.1 * torch.randn(8)).to(dtype)
    lengths = torch.tensor([300, 170])
    out = group_norm_over_lengths(x, weight, bias, 1e-5, lengths)
    for b, n in enumerate(lengths.tolist()):
        row = x[b:b + 1, :, :n]
        reference = F.group_norm(row.double(), 8, weight.double(), bias.double(), 1e-5)
        eager = F.group_norm(row, 8, weight, bias, 1e-5)
        assert torch.isfinite(eager).all()
        assert_error_within(out[b:b + 1, :, :n], reference, eager, dtype, f"utterance {b}", reduction=n)


def test_ctc_loss_of_fp16_logits_is_finite():
    """fp16 logits up to fp16's limit: the CTC head's log-softmax runs in fp32 (in fp16, exp and the
    sum overflow), so the loss is that of the logits in fp64 within fp32's error."""
    model = unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**TINY))
    logits = (6e4 * torch.rand(2, 30, TINY["vocab_size"]) - 3e4).half()
    labels = torch.tensor([[1, 2, 3], [4, -100, -100]])
    loss = model.ctc_loss(logits, labels, None, torch.zeros(2, 620))  # 620 samples: 30 frames
    assert loss.dtype == torch.float32 and torch.isfinite(loss)

    def manual(dtype):
        log_probs = F.log_softmax(logits.to(dtype), dim=-1).transpose(0, 1)
        return F.ctc_loss(log_probs, torch.tensor([1, 2, 3, 4]), torch.tensor([30, 30]), torch.tensor([3, 1]))

    assert_error_within(loss, manual(torch.float64), manual(torch.float32), torch.float32, "loss", reduction=30)


def _fp16_vs_fp32(config, seconds, device):
    """(max |fp16 - fp32|, max |fp32|) of the last hidden state of a random model on ``seconds`` of
    unit-variance audio, after asserting the fp16 run has no inf / NaN."""
    model = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**config)).eval().to(device)
    audio = torch.randn(1, 16000 * seconds, device=device)
    with torch.no_grad():
        want = model(audio).last_hidden_state
        got = model.half()(audio.half()).last_hidden_state
    assert torch.isfinite(got).all(), "inf / NaN in fp16"
    return (got.double() - want.double()).abs().max().item(), want.abs().max().item()


def test_base_shaped_fp16_cpu(one_thread):
    """Base-shaped (768 x 12, seven 512-channel convs) in fp16 on the CPU, 3 s: CPU fp16 convolutions
    have no fast kernel (~7 s of compute per second of audio on one core), so the long-audio case is
    the GPU test below (60 s)."""
    diff, size = _fp16_vs_fp32(dict(BASE_SHAPED, kernel_backend="torch"), 3, "cpu")
    print(f"\nbase-shaped fp16 on 3 s (CPU): max |fp16 - fp32| = {diff:.3g}, max |fp32| = {size:.3g}")


@pytest.mark.gpu
def test_large_shaped_fp16_60s_gpu():
    """Large-shaped (1024 x 24, layer-norm conv stack, stable layer norm) in fp16 on 60 s, default backends."""
    diff, size = _fp16_vs_fp32(LARGE_SHAPED, 60, "cuda")
    print(f"\nlarge-shaped fp16 on 60 s (GPU): max |fp16 - fp32| = {diff:.3g}, max |fp32| = {size:.3g}")


def test_fp16_autocast_ctc_training_stays_finite(one_thread):
    """200 steps of fp16 autocast training (GradScaler, AdamW) of the tiny CTC model on a padded batch:
    every loss is finite, the parameters stay finite, and the loss falls (CPU autocast in fp16, the
    recipe the training loop runs on a GPU with --precision fp16)."""
    model = unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**TINY, kernel_backend="torch")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu")
    generator = torch.Generator().manual_seed(0)
    audio, mask = (t.cpu() for t in _padded_batch([2000, 1400, 2000, 700], generator=generator))
    labels = torch.randint(1, TINY["vocab_size"], (4, 12), generator=generator)
    labels[3, 6:] = -100
    losses = []
    for _ in range(200):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(audio, attention_mask=mask, labels=labels)
        assert out.logits.dtype == torch.float16
        losses.append(out.loss.item())
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses))), "a non-finite CTC loss"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]
    print(f"\nfp16 autocast CTC training: loss {losses[0]:.3g} -> {losses[-1]:.3g} in 200 steps")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_follow_autocast(backend):
    """Under autocast, pos_conv_embed and feature_encoder take fp32 inputs and parameters, compute in
    autocast's dtype (the result of the same call on cast inputs) and return gradients to the fp32
    parameters; integer lengths pass unchanged."""
    from unispeech_kernels import feature_encoder, pos_conv_embed
    hidden = torch.randn(1, 20, 16)
    weight = (0.2 * torch.randn(16, 4, 4)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pos_conv_embed(hidden, weight, None, groups=4, backend=backend)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, pos_conv_embed(hidden.bfloat16(), weight.bfloat16(), None, groups=4, backend=backend))
    out.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32
    audio, lengths = torch.randn(2, 200), torch.tensor([200, 120])
    convs = [0.3 * torch.randn(8, 1, 10), 0.3 * torch.randn(8, 8, 3)]
    norms = [torch.ones(8)], [torch.zeros(8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = feature_encoder(audio, convs, [None, None], [5, 2], "group", *norms, input_lengths=lengths,
                                   backend=backend)
    cast = [[t.bfloat16() for t in ts] for ts in (convs, *norms)]
    want = feature_encoder(audio.bfloat16(), cast[0], [None, None], [5, 2], "group", cast[1], cast[2],
                           input_lengths=lengths, backend=backend)
    assert features.dtype == torch.bfloat16 and torch.equal(features, want)
