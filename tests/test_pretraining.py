"""The pre-training objective's building blocks (unispeech.pretraining), against float64 references.

Model-level tests (gradients through the model, training, DDP) are in test_pretraining_model.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_error_within
from unispeech.pretraining import (
    codevector_perplexity,
    contrastive_logits,
    contrastive_loss,
    ctc_loss,
    diversity_loss,
    gumbel_temperature,
    replace_with_quantized,
    sample_negative_indices,
    total_loss,
)


def test_gumbel_temperature_schedule():
    assert gumbel_temperature(0) == 2.0
    assert gumbel_temperature(1) == pytest.approx(2 * 0.999995)
    assert gumbel_temperature(100_000) == pytest.approx(2 * 0.999995**100_000)
    # 2 * 0.999995**s reaches 0.1 at s = ln(20) / -ln(0.999995) ~ 599_145
    assert gumbel_temperature(599_000) > 0.1
    assert gumbel_temperature(600_000) == 0.1
    assert gumbel_temperature(10**7) == 0.1
    assert gumbel_temperature(10, start=1.0, decay=0.5, minimum=0.0) == pytest.approx(0.5**10)
    with pytest.raises(ValueError, match="step"):
        gumbel_temperature(-1)


def _masks(lengths, frames, prob=0.4):
    attention = torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]
    masked = (torch.rand(len(lengths), frames) < prob) & attention
    return masked, attention


@pytest.mark.parametrize("from_all_frames", [False, True])
def test_negatives_never_hit_the_positive_or_padding(from_all_frames):
    lengths = [37, 1, 20, 37, 2]
    masked, attention = _masks(lengths, 37)
    masked[1, 0] = True  # an utterance with a single masked frame: no negative possible
    masked[4, :2] = True  # two real frames, both masked: each is the other's only negative
    masked[2, 25] = True  # a "masked" padded frame must be ignored
    neg = sample_negative_indices(masked, 9, attention, from_all_frames=from_all_frames)
    batch, frames = masked.shape
    assert neg.shape == (batch, frames, 9) and neg.dtype == torch.long
    utterance, local = neg // frames, neg % frames
    candidates = attention if from_all_frames else masked & attention
    for b in range(batch):
        for t in range(frames):
            if not (masked[b, t] and attention[b, t]) or candidates[b].sum() < 2:
                assert (neg[b, t] == b * frames + t).all()  # "no negative": the loss scores it -inf
                continue
            assert (utterance[b, t] == b).all()
            assert (local[b, t] != t).all(), "a negative hit its own positive"
            assert candidates[b, local[b, t]].all(), "a negative hit padding or a non-candidate"
    assert (neg[4, 0] == 4 * frames + 1).all() and (neg[4, 1] == 4 * frames).all()


def test_negatives_are_uniform_over_the_other_candidates():
    masked = torch.zeros(1, 11, dtype=torch.bool)
    masked[0, [0, 3, 4, 9, 10]] = True
    gen = torch.Generator().manual_seed(1)
    neg = sample_negative_indices(masked, 4000, generator=gen)
    hits = torch.bincount(neg[0, 4], minlength=11).double()
    assert hits[[4, 1, 2, 5, 6, 7, 8]].sum() == 0
    assert ((hits[[0, 3, 9, 10]] / 4000 - 0.25).abs() < 0.03).all()
    again = sample_negative_indices(masked, 4000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(neg, again)


def test_negative_sampling_rejects_bad_input():
    masked = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_negatives"):
        sample_negative_indices(masked, 0)
    with pytest.raises(ValueError, match="mask_time_indices"):
        sample_negative_indices(masked[0], 3)
    with pytest.raises(ValueError, match="attention_mask"):
        sample_negative_indices(masked, 3, torch.ones(2, 4))


def _leaf(x, dtype, compute_dtype=None):
    """A fresh leaf: x rounded to dtype, then (optionally) widened to compute_dtype."""
    return x.detach().to(dtype).to(compute_dtype or dtype).clone().requires_grad_()


def _reference_logits(pred, targ, mask, neg, temperature):
    """The direct formulation: gather every negative vector, cosine in float64."""
    batch, frames, dim = targ.shape
    negatives = targ.reshape(-1, dim)[neg.reshape(-1)].view(batch, frames, -1, dim)
    candidates = torch.cat([targ.unsqueeze(2), negatives], dim=2)
    logits = torch.cosine_similarity(pred.unsqueeze(2), candidates, dim=-1) / temperature
    same = (negatives == targ.unsqueeze(2)).all(-1)
    logits[..., 1:] = logits[..., 1:].masked_fill(same, float("-inf"))
    return logits


def _reference_loss(pred, targ, mask, neg, temperature):
    logits = _reference_logits(pred, targ, mask, neg, temperature)
    target = torch.where(mask, 0, -100).flatten()
    return F.cross_entropy(logits.flatten(0, 1), target, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contrastive_loss_matches_float64_reference(dtype):
    batch, frames, dim, k = 3, 23, 24, 6
    masked, attention = _masks([23, 11, 5], frames, prob=0.5)
    masked[2, :3] = True
    pred = torch.randn(batch, frames, dim)
    targ = torch.randn(batch, frames, dim)
    targ[0, 5] = targ[0, 7]  # identical targets (a low-usage codebook): those negatives get -inf
    targ[1, 2] = targ[1, 3] = targ[1, 4]
    masked[0, [5, 7]] = True
    masked[1, [2, 3, 4]] = True
    neg = sample_negative_indices(masked, k, attention)
    temperature = 0.1

    p, t = _leaf(pred, dtype), _leaf(targ, dtype)
    loss = contrastive_loss(p, t, masked, neg, temperature)
    loss.backward()
    p64, t64 = _leaf(pred, dtype, torch.float64), _leaf(targ, dtype, torch.float64)
    ref = _reference_loss(p64, t64, masked, neg, temperature)
    ref.backward()
    pe, te = _leaf(pred, dtype), _leaf(targ, dtype)
    eager = _reference_loss(pe.float(), te.float(), masked, neg, temperature)
    eager.backward()

    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    n = batch * frames * (k + 1) * dim  # the loss sums every frame's k + 1 cosines of dim terms
    assert_error_within(loss.detach(), ref.detach(), eager.detach(), torch.float32, "contrastive loss", reduction=n)
    assert_error_within(p.grad.float(), p64.grad, pe.grad.float(), dtype, "d predicted", reduction=(k + 1) * dim)
    assert_error_within(t.grad.float(), t64.grad, te.grad.float(), dtype, "d targets", reduction=n)

    logits = contrastive_logits(p.detach(), t.detach(), masked, neg, temperature)
    ref_logits = _reference_logits(p64.detach(), t64.detach(), masked, neg, temperature)
    rows = masked.unsqueeze(-1).expand_as(logits)
    assert torch.equal(torch.isinf(logits[rows]), torch.isinf(ref_logits[rows]))
    assert torch.isinf(ref_logits[rows]).any(), "the identical targets were never drawn: test is vacuous"


def test_contrastive_loss_on_views_batch_one_and_length_one():
    pred, targ = torch.randn(1, 13, 16)[..., ::2], torch.randn(1, 8, 13).transpose(1, 2)
    assert not pred.is_contiguous() and not targ.is_contiguous()
    masked = torch.rand(1, 13) < 0.6
    masked[0, :2] = True
    neg = sample_negative_indices(masked, 5)
    loss = contrastive_loss(pred, targ, masked, neg, 0.1)
    ref = _reference_loss(pred.double(), targ.double(), masked, neg, 0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # a single frame has no negative at all: its loss is 0, not NaN
    one = torch.ones(1, 1, dtype=torch.bool)
    neg1 = sample_negative_indices(one, 4)
    assert torch.equal(neg1, torch.zeros(1, 1, 4, dtype=torch.long))
    assert contrastive_loss(pred[:, :1], targ[:, :1], one, neg1, 0.1).item() == 0.0


def test_contrastive_loss_ignores_unmasked_frames_and_rejects_bad_negatives():
    pred, targ = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    masked = torch.zeros(2, 9, dtype=torch.bool)
    masked[:, 2:6] = True
    neg = sample_negative_indices(masked, 3)
    base = contrastive_loss(pred, targ, masked, neg, 0.5)
    pred2 = pred.clone()
    pred2[:, 7] += 10  # unmasked frames are not scored
    assert torch.equal(contrastive_loss(pred2, targ, masked, neg, 0.5), base)
    across = neg.clone()
    across[0, 3, 0] = 9 + 4  # a negative from the next utterance
    with pytest.raises(ValueError, match="same utterance"):
        contrastive_loss(pred, targ, masked, across, 0.5)
    with pytest.raises(ValueError, match="num_negatives"):
        contrastive_loss(pred, targ, masked, neg[:, :, 0], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(pred, targ, masked, neg, 0.0)
    with pytest.raises(ValueError, match="dim"):
        contrastive_loss(pred, targ[..., :4], masked, neg, 0.5)
    none = torch.zeros_like(masked)
    assert contrastive_loss(pred, targ, none, neg, 0.5).item() == 0.0


def test_perplexity_of_a_known_distribution():
    # group 0: every frame uniform over 4 codes -> marginal uniform -> perplexity 4
    # group 1: frames one-hot on codes 0, 1, 0, 1 -> marginal [.5, .5, 0, 0] -> perplexity 2
    probs = torch.zeros(5, 2, 4)
    probs[:, 0] = 0.25
    probs[[0, 2], 1, 0] = 1.0
    probs[[1, 3], 1, 1] = 1.0
    probs[4, 1, 3] = 1.0  # excluded by the mask below
    mask = torch.tensor([True, True, True, True, False])
    ppl = codevector_perplexity(probs, mask)
    assert ppl.item() == pytest.approx(6.0, rel=1e-6)
    assert diversity_loss(ppl, 8).item() == pytest.approx(0.25, rel=1e-6)
    # all five frames: group 1 marginal [.4, .4, 0, .2] -> exp(-(2 * .4 ln .4 + .2 ln .2))
    expected = 4 + math.exp(-(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)))
    assert codevector_perplexity(probs).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="mask"):
        codevector_perplexity(probs, mask[:3])
    with pytest.raises(ValueError, match="num_codevectors"):
        diversity_loss(ppl, 0)


def _reference_ctc(logits, labels, lengths, blank):
    """CTC summed over utterances, one torch call each, in the logits' dtype."""
    log_probs = torch.log_softmax(logits, -1)
    total = 0.0
    for b in range(logits.shape[0]):
        target = labels[b][labels[b] != -100]
        total = total + F.ctc_loss(
            log_probs[b, : lengths[b]].unsqueeze(1), target.unsqueeze(0), lengths[b : b + 1],
            torch.tensor([len(target)]), blank=blank, reduction="sum",
        )
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ctc_loss_matches_per_utterance_float64_reference(dtype):
    classes, blank = 11, 7  # the authors' dictionaries put the blank away from 0
    logits = torch.randn(3, 17, classes)
    lengths = torch.tensor([17, 9, 1])
    labels = torch.tensor([[1, 2, 2, 3, -100], [4, 0, 10, 5, 6], [3, -100, -100, -100, -100]])
    x = _leaf(logits, dtype)
    loss = ctc_loss(x, labels, lengths, blank)
    loss.backward()
    x64 = _leaf(logits, dtype, torch.float64)
    ref = _reference_ctc(x64, labels, lengths, blank)
    ref.backward()
    xe = _leaf(logits, dtype, torch.float32)
    eager = _reference_ctc(xe, labels, lengths, blank).float()
    eager.backward()
    assert loss.dtype == torch.float32
    n = logits.shape[1] * (2 * labels.shape[1] + 1)  # the forward-backward recursion: frames x states
    assert_error_within(loss.detach(), ref.detach(), eager.detach(), torch.float32, "ctc loss", reduction=n)
    assert_error_within(x.grad.float(), x64.grad, xe.grad, dtype, "d logits", reduction=n)
    assert (x.grad[1, 9:] == 0).all(), "padded frames must get no gradient"


def test_ctc_loss_rejects_bad_labels():
    logits = torch.randn(2, 8, 6)
    lengths = torch.tensor([8, 5])
    with pytest.raises(ValueError, match="num_ctc_classes=6"):
        ctc_loss(logits, torch.tensor([[1, 6], [2, -100]]), lengths, blank=0)
    with pytest.raises(ValueError, match="num_ctc_classes"):
        ctc_loss(logits, torch.tensor([[1, -3], [2, -100]]), lengths, blank=0)
    with pytest.raises(ValueError, match="blank id 0"):
        ctc_loss(logits, torch.tensor([[1, 0], [2, -100]]), lengths, blank=0)
    with pytest.raises(ValueError, match="blank id 6"):
        ctc_loss(logits, torch.tensor([[1, 2]] * 2), lengths, blank=6)
    with pytest.raises(ValueError, match="integer"):
        ctc_loss(logits, torch.ones(2, 2), lengths, blank=0)
    with pytest.raises(ValueError, match="input_lengths"):
        ctc_loss(logits, torch.tensor([[1, 2]] * 2), torch.tensor([9, 5]), blank=0)
    # a target longer than the input is infinite unless zero_infinity
    short = torch.tensor([[1, 2, 3], [1, -100, -100]])
    assert torch.isinf(ctc_loss(logits, short, torch.tensor([2, 5]), blank=0))
    assert torch.isfinite(ctc_loss(logits, short, torch.tensor([2, 5]), blank=0, zero_infinity=True))


def test_replacement_with_quantized_vectors():
    hidden, quantized = torch.zeros(4, 300, 3), torch.ones(4, 300, 3)
    assert torch.equal(replace_with_quantized(hidden, quantized, 0.0), hidden)
    assert torch.equal(replace_with_quantized(hidden, quantized, 1.0), quantized)
    mixed = replace_with_quantized(hidden, quantized, 0.3)
    assert (mixed == mixed[..., :1]).all(), "a frame is replaced as a whole"
    assert abs(mixed[..., 0].mean().item() - 0.3) < 0.04
    with pytest.raises(ValueError, match="replace_prob"):
        replace_with_quantized(hidden, quantized, 1.5)
    with pytest.raises(ValueError, match="shape"):
        replace_with_quantized(hidden, quantized[:, :5], 0.5)


def test_total_loss_formula():
    c, d, m, ctc = torch.tensor(30.0), torch.tensor(0.25), torch.tensor(12), torch.tensor(40.0)
    assert total_loss(c, d, m, ctc, 0.5, 0.1).item() == pytest.approx(0.5 * 40 + 0.5 * (30 + 0.1 * 12 * 0.25))
    assert total_loss(c, d, m, ctc, 0.0, 0.1).item() == pytest.approx(30 + 0.3)
    assert total_loss(c, d, m, None, 0.5, 0.1).item() == pytest.approx(30 + 0.3)
    with pytest.raises(ValueError, match="alpha"):
        total_loss(c, d, m, ctc, 1.5, 0.1)
