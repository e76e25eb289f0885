"""The UniSpeech pre-training objective: negatives, contrastive, diversity and phonetic CTC losses.

transformers' ``UniSpeechForPreTraining`` stops at ``loss=None``; this module is the missing part,
written as model-independent functions that ``unispeech.heads.UniSpeechForPreTraining`` calls.

Shapes: B batch, T feature frames (after the convolutional encoder), D hidden size, K negatives,
G codevector groups, V codevectors per group, C CTC classes, L label length.

    loss = alpha * CTC + (1 - alpha) * (contrastive + diversity_loss_weight * M * diversity)

* contrastive: at every masked frame (M of them) the positive is that frame's projected quantized
  target ``project_hid(project_q(q))``; K negatives are other frames' targets from the same
  utterance; logits are cosine similarities / ``contrastive_logits_temperature``; a negative
  identical to the positive gets -inf; cross-entropy with the positive as class 0, SUMMED over masked
  frames.
* diversity: (G*V - perplexity) / (G*V), the perplexity of the mean softmax over masked real frames.
  It is a per-frame quantity, so the total counts it once per masked frame (M), as the authors'
  criterion does (``sample_size`` scaling) and transformers' ``Wav2Vec2ForPreTraining`` does; the
  ``diversity_loss`` field of the output is the unscaled value.
* CTC: per frame, with probability ``replace_prob``, the transformer output is replaced by the
  projected quantized vector; then dropout, ``ctc_proj``, float32 log-softmax and CTC (summed over
  utterances) against phoneme labels padded with -100. No labels: no CTC term, ``ctc_loss`` None.

Deliberate deviations from the authors' code (microsoft/UniSpeech, fairseq-based), and why:

1. Mask counts are not trimmed per batch. fairseq cuts every utterance's masked frames down to the
   batch minimum so the targets fit one dense [B, M_min, D] tensor; we keep every masked frame and
   carry a [B, T] boolean mask, so an utterance's loss does not depend on its batch neighbours.
2. One quantization, not two. fairseq quantizes the masked frames for the contrastive targets and
   quantizes all frames a second time (a second Gumbel draw) for the CTC replacement; we quantize
   every frame once (as transformers' model does) and use the same codes for both, so the CTC branch
   sees exactly the targets the contrastive loss scores.
3. Contrastive space. The authors compare ``final_proj(c_t)`` with ``project_q(q_t)``;
   transformers' ``UniSpeechForPreTraining`` has no ``final_proj`` (its checkpoints carry none), so
   the transformer output is compared with ``project_hid(project_q(q_t))`` in the hidden space.
   The CTC replacement also uses ``project_hid(project_q(q))`` where the authors apply their
   ``q2h_proj`` to the raw codevectors (the transformers layout, which checkpoints follow).
4. Negatives. Sampled per utterance from its other masked frames (the authors' default), never
   from padding, with no bias towards any frame; an utterance with fewer than two masked frames has
   no possible negative: its frames' negatives point at the positive itself and are scored -inf,
   so such a frame adds 0 instead of crashing the step (fairseq asserts).
5. Logits stay in float32 (the authors round cosine similarities to the model dtype first).
6. Perplexity covers masked real frames only (the authors': masked frames; transformers':
   every frame, padding included); under ``torch.distributed`` in training the marginal code
   distribution is all-reduced, so the diversity term is that of the global batch and DDP
   gradients equal single-process ones (see ``codevector_perplexity``).
7. No ``features_pen`` (the authors' L2 penalty on the convolutional features, weight 10):
   transformers' checkpoints and configs have no such term.
8. Random replacement in the CTC branch happens in training only; in eval the CTC branch sees the
   transformer output, so eval losses are deterministic (the authors replace in eval too).
9. CTC is summed over utterances (the authors' criterion) whatever ``ctc_loss_reduction`` says
   (that field configures ``UniSpeechForCTC``); the blank id is ``pretraining_ctc_blank_id``
   (default ``pad_token_id``), since the authors' phone dictionaries put it elsewhere.

Distributed training: every term is a SUM over the local shard (the global perplexity share is
``M_local * diversity_global``), so the per-rank losses add up to the whole batch's loss; DDP
AVERAGES gradients, so DDP gradients are the whole-batch gradients divided by the world size.
Scale the learning rate (or the loss) by the world size / the global number of masked frames,
as fairseq does, to get per-frame updates. An unlabeled batch leaves ``ctc_proj`` unused: mixing
labelled and unlabeled batches under DDP needs ``find_unused_parameters=True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .masking import compute_mask_indices
from .modeling import check_input_values
from .outputs import ModelOutput

IGNORE_LABEL = -100  # label padding, as in transformers' CTC heads


def gumbel_temperature(step: int, start: float = 2.0, decay: float = 0.999995, minimum: float = 0.1) -> float:
    """The authors' Gumbel-softmax temperature schedule: max(start * decay**step, minimum)."""
    if step < 0:
        raise ValueError(f"gumbel_temperature: step must be >= 0, got {step}")
    return max(start * decay**step, minimum)


def _check_mask(mask: torch.Tensor, name: str, shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [batch, frames], got shape {tuple(mask.shape)}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask.bool()


def sample_negative_indices(
    mask_time_indices: torch.Tensor,
    num_negatives: int,
    attention_mask: Optional[torch.Tensor] = None,
    from_all_frames: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw ``num_negatives`` negatives for every masked frame, vectorised (no loop over frames).

    mask_time_indices: [B, T] bool, the positives (masked frames). attention_mask: [B, T], 1 on real
    frames. Candidates are the other masked real frames of the same utterance (``from_all_frames``:
    every other real frame), drawn uniformly with replacement, never the positive itself.
    Returns [B, T, K] int64 FLAT indices into the B*T frames (transformers' convention). Frames that
    are not positives, and positives of an utterance with fewer than two candidates, get their own
    index, which the contrastive loss scores -inf (no negative).
    """
    if not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be a positive int, got {num_negatives!r}")
    positives = _check_mask(mask_time_indices, "mask_time_indices")
    batch, frames = positives.shape
    real = (
        torch.ones_like(positives)
        if attention_mask is None
        else _check_mask(attention_mask, "attention_mask", (batch, frames)).to(positives.device)
    )
    positives = positives & real
    candidates = real if from_all_frames else positives
    counts = candidates.sum(1)  # [B]
    rank = candidates.long().cumsum(1) - 1  # rank of a frame among its utterance's candidates
    # candidate positions first, in order: order[b, r] = frame of rank r
    order = torch.sort((~candidates).to(torch.uint8), dim=1, stable=True).indices
    others = (counts - 1).clamp(min=1).view(batch, 1, 1)
    u = torch.rand((batch, frames, num_negatives), generator=generator, device=positives.device)
    draw = torch.minimum((u * others).long(), others - 1)  # uniform in [0, others)
    draw = draw + (draw >= rank.unsqueeze(-1)).long()  # skip the positive's own rank
    draw = draw.clamp(max=frames - 1)
    local = order.gather(1, draw.view(batch, -1)).view(batch, frames, num_negatives)
    own = torch.arange(frames, device=positives.device).view(1, frames, 1)
    usable = (positives & (counts >= 2).unsqueeze(1)).unsqueeze(-1)
    local = torch.where(usable, local, own.expand_as(local))
    offset = torch.arange(batch, device=positives.device).view(batch, 1, 1) * frames
    return local + offset


def _local_negatives(negative_indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, K] flat indices -> indices within each utterance; checks they stay in it."""
    batch, frames = mask.shape
    if negative_indices.dim() != 3 or tuple(negative_indices.shape[:2]) != (batch, frames):
        raise ValueError(
            f"sampled_negative_indices must be [batch, frames, num_negatives] = [{batch}, {frames}, K], "
            f"got shape {tuple(negative_indices.shape)}"
        )
    if negative_indices.dtype.is_floating_point or negative_indices.dtype == torch.bool:
        raise ValueError(f"sampled_negative_indices must be integers, got {negative_indices.dtype}")
    offset = torch.arange(batch, device=mask.device).view(batch, 1, 1) * frames
    local = negative_indices.to(device=mask.device, dtype=torch.long) - offset
    outside = ((local < 0) | (local >= frames)) & mask.unsqueeze(-1)
    if bool(outside.any()):
        raise ValueError(
            "sampled_negative_indices must point at frames of the same utterance (flat index "
            "b*T + t); some masked frames' negatives fall outside their utterance"
        )
    own = torch.arange(frames, device=mask.device).view(1, frames, 1)
    return torch.where(mask.unsqueeze(-1), local, own.expand_as(local))


def _identity_keys(targets: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, T] int64: equal keys exactly where target vectors are bitwise equal rows."""
    flat = targets.detach().reshape(-1, targets.shape[-1])
    keys = torch.unique(flat, dim=0, return_inverse=True)[1]
    return keys.view(targets.shape[:2])


def contrastive_logits(
    predicted: torch.Tensor,
    targets: torch.Tensor,
    mask_time_indices: torch.Tensor,
    negative_indices: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """[B, T, 1 + K] float32 logits: cosine(predicted, [positive, negatives]) / temperature.

    predicted, targets: [B, T, D]. Negatives identical to the positive get -inf. Rows of frames
    that are not masked are computed but meaningless. One batched [B, T, T] similarity GEMM per
    call instead of gathering B*T*K target vectors (the gather moves K*D values per frame).
    """
    if predicted.shape != targets.shape or predicted.dim() != 3:
        raise ValueError(
            f"predicted and targets must both be [batch, frames, dim], got {tuple(predicted.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"contrastive temperature must be > 0, got {temperature}")
    mask = _check_mask(mask_time_indices, "mask_time_indices", predicted.shape[:2]).to(predicted.device)
    local = _local_negatives(negative_indices, mask)  # [B, T, K]
    pred = F.normalize(predicted.float(), dim=-1, eps=1e-8)
    targ = F.normalize(targets.float(), dim=-1, eps=1e-8)
    sim = torch.bmm(pred, targ.transpose(1, 2))  # [B, T, T]: sim[b, t, s] = cos(c_bt, q_bs)
    positive = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # [B, T, 1]
    negative = sim.gather(2, local)  # [B, T, K]
    keys = _identity_keys(targets)  # [B, T]
    same = keys.unsqueeze(-1) == keys.gather(1, local.flatten(1)).view_as(local)
    negative = negative.masked_fill(same, float("-inf"))
    return torch.cat([positive, negative], dim=-1) / temperature


def contrastive_loss(
    predicted: torch.Tensor,
    targets: torch.Tensor,
    mask_time_indices: torch.Tensor,
    negative_indices: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """InfoNCE summed over masked frames (float32 scalar): sum_t -log softmax(logits_t)[0]."""
    logits = contrastive_logits(predicted, targets, mask_time_indices, negative_indices, temperature)
    per_frame = torch.logsumexp(logits, dim=-1) - logits[..., 0]
    mask = mask_time_indices.to(device=per_frame.device, dtype=torch.bool)
    return per_frame.masked_fill(~mask, 0.0).sum()


def codevector_perplexity(
    probs: torch.Tensor, mask: Optional[torch.Tensor] = None, all_reduce: bool = False
) -> torch.Tensor:
    """Perplexity of the mean code distribution, summed over groups.

    probs: [N, G, V] per-frame probabilities (softmax of the quantizer logits); mask: [N] bool,
    frames to average over (None: all). ``all_reduce``: average over the frames of every
    ``torch.distributed`` rank (sum of probabilities and frame count are all-reduced with autograd
    support), so each rank gets the global perplexity.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be [frames, groups, codevectors], got shape {tuple(probs.shape)}")
    probs = probs.float()
    if mask is None:
        total = probs.sum(0)
        count = torch.tensor(float(probs.shape[0]), device=probs.device)
    else:
        if mask.shape != probs.shape[:1]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({probs.shape[0]},)")
        weight = mask.to(device=probs.device, dtype=probs.dtype)
        total = (probs * weight.view(-1, 1, 1)).sum(0)
        count = weight.sum()
    if all_reduce:
        import torch.distributed.nn.functional as dist_fn

        total = dist_fn.all_reduce(total)
        count = dist_fn.all_reduce(count.detach())
    marginal = total / count.clamp(min=1.0)
    return torch.exp(-torch.xlogy(marginal, marginal).sum(-1)).sum()


def diversity_loss(perplexity: torch.Tensor, num_codevectors: int) -> torch.Tensor:
    """(G*V - perplexity) / (G*V): 0 when every codevector is used equally, near 1 at collapse."""
    if num_codevectors < 1:
        raise ValueError(f"num_codevectors must be >= 1, got {num_codevectors}")
    return (num_codevectors - perplexity) / num_codevectors


def replace_with_quantized(
    transformer_features: torch.Tensor,
    quantized_features: torch.Tensor,
    replace_prob: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """[B, T, D]: each frame independently takes the quantized vector with probability replace_prob."""
    if transformer_features.shape != quantized_features.shape:
        raise ValueError(
            f"transformer and quantized features differ in shape: {tuple(transformer_features.shape)} "
            f"vs {tuple(quantized_features.shape)}"
        )
    if not 0.0 <= replace_prob <= 1.0:
        raise ValueError(f"replace_prob must be in [0, 1], got {replace_prob}")
    batch, frames = transformer_features.shape[:2]
    u = torch.rand((batch, frames, 1), generator=generator, device=transformer_features.device)
    return torch.where(u < replace_prob, quantized_features.to(transformer_features.dtype), transformer_features)


def ctc_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_lengths: torch.Tensor,
    blank: int,
    zero_infinity: bool = False,
) -> torch.Tensor:
    """CTC summed over utterances (float32 scalar).

    logits: [B, T, C]; labels: [B, L] class ids padded with -100; input_lengths: [B] real frames.
    The log-softmax runs in float32. Raises ValueError for labels outside [0, C), labels equal to
    the blank id, or lengths outside [0, T].
    """
    if logits.dim() != 3:
        raise ValueError(f"CTC logits must be [batch, frames, classes], got shape {tuple(logits.shape)}")
    batch, frames, classes = logits.shape
    if not 0 <= blank < classes:
        raise ValueError(f"CTC blank id {blank} is outside the {classes} CTC classes")
    if labels.dim() != 2 or labels.shape[0] != batch:
        raise ValueError(f"labels must be [batch={batch}, length], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")
    labels = labels.to(logits.device)
    real = labels != IGNORE_LABEL
    if bool((real & ((labels < 0) | (labels >= classes))).any()):
        raise ValueError(
            f"labels must be in [0, num_ctc_classes={classes}) or {IGNORE_LABEL} (padding); got values "
            f"from {int(labels[real].min())} to {int(labels[real].max())}"
        )
    if bool((real & (labels == blank)).any()):
        raise ValueError(f"labels contain the CTC blank id {blank}")
    input_lengths = input_lengths.to(device=logits.device, dtype=torch.long)
    if input_lengths.shape != (batch,) or bool(((input_lengths < 0) | (input_lengths > frames)).any()):
        raise ValueError(f"input_lengths must be [batch={batch}] values in [0, {frames}], got {input_lengths}")
    target_lengths = real.sum(-1)
    targets = labels.masked_select(real)
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [T, B, C]
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's CTC needs int32 CPU targets, blank 0
        return F.ctc_loss(
            log_probs, targets, input_lengths, target_lengths, blank=blank,
            reduction="sum", zero_infinity=zero_infinity,
        )


def total_loss(
    contrastive: torch.Tensor,
    diversity: torch.Tensor,
    num_masked: torch.Tensor,
    ctc: Optional[torch.Tensor],
    alpha: float,
    diversity_weight: float,
) -> torch.Tensor:
    """alpha * ctc + (1 - alpha) * (contrastive + diversity_weight * num_masked * diversity).

    Without CTC (``ctc`` None: an unlabeled batch) the loss is the contrastive part alone."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"pretraining_ctc_weight (alpha) must be in [0, 1], got {alpha}")
    self_supervised = contrastive + diversity_weight * num_masked * diversity
    if ctc is None:
        return self_supervised
    return alpha * ctc + (1.0 - alpha) * self_supervised


@dataclass
class UniSpeechForPreTrainingOutput(ModelOutput):
    """transformers' ``UniSpeechForPreTrainingOutput`` fields plus the loss terms.

    loss: the total (None when there is neither a masked frame nor a label); projected_states:
    [B, T, D] transformer output; projected_quantized_states: [B, T, D]
    ``project_hid(project_q(quantized))``; codevector_perplexity: the quantizer's (transformers'
    definition: every frame); contrastive_loss, diversity_loss: None without masked frames;
    ctc_loss: None for an unlabeled batch."""

    loss: Optional[torch.Tensor] = None
    projected_states: Optional[torch.Tensor] = None
    projected_quantized_states: Optional[torch.Tensor] = None
    codevector_perplexity: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    contrastive_loss: Optional[torch.Tensor] = None
    diversity_loss: Optional[torch.Tensor] = None
    ctc_loss: Optional[torch.Tensor] = None


def _distributed_training(model) -> bool:
    dist = torch.distributed
    return model.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class PreTrainingLosses(NamedTuple):
    loss: Optional[torch.Tensor]
    contrastive_loss: Optional[torch.Tensor]
    diversity_loss: Optional[torch.Tensor]
    ctc_loss: Optional[torch.Tensor]


def _frame_mask(model, input_values: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, T] bool, True on real frames."""
    frames = int(model._get_feat_extract_output_lengths(input_values.shape[-1]))
    if attention_mask is None:
        return torch.ones(input_values.shape[0], frames, dtype=torch.bool, device=input_values.device)
    return model._get_feature_vector_attention_mask(frames, attention_mask.to(input_values.device))


def pretraining_mask(model, input_values, attention_mask=None, mask_time_indices=None) -> Optional[torch.Tensor]:
    """The masked frames of a pre-training forward: [B, T] bool or None.

    ``mask_time_indices`` if given (checked), else in training SpecAugment spans drawn from
    mask_time_prob / mask_time_length / mask_time_min_masks over the real frames (None in eval or
    with SpecAugment off: no contrastive or diversity term then)."""
    cfg = model.config
    check_input_values(input_values, attention_mask, model.unispeech.feature_extractor.receptive_field, model.dtype)
    real = _frame_mask(model, input_values, attention_mask)
    if mask_time_indices is not None:
        return _check_mask(torch.as_tensor(mask_time_indices, device=input_values.device),
                           "mask_time_indices", real.shape)
    if model.training and cfg.apply_spec_augment and cfg.mask_time_prob > 0:
        spans = compute_mask_indices(real.shape, cfg.mask_time_prob, cfg.mask_time_length,
                                     attention_mask=None if attention_mask is None else real,
                                     min_masks=cfg.mask_time_min_masks)
        return torch.from_numpy(spans).to(input_values.device)
    return None


def pretraining_losses(
    model,
    input_values: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    transformer_features: torch.Tensor,
    extract_features: torch.Tensor,
    quantized: torch.Tensor,
    mask_time_indices: Optional[torch.Tensor],
    sampled_negative_indices: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
) -> PreTrainingLosses:
    """The objective of ``UniSpeechForPreTraining`` (``model``: its config, quantizer, dropout,
    ctc_proj and length helpers) from its forward's tensors: transformer output [B, T, D], the
    (dropped-out) features fed to the quantizer [B, T, C], ``project_hid(project_q(quantized))``
    [B, T, D], the mask from ``pretraining_mask``, optional negatives [B, T, K] and labels [B, L]."""
    cfg = model.config
    real = _frame_mask(model, input_values, attention_mask)
    batch, frames = real.shape
    contrastive = diversity = num_masked = None
    if mask_time_indices is not None:
        masked = mask_time_indices.to(real.device).bool() & real
        if sampled_negative_indices is None:
            sampled_negative_indices = sample_negative_indices(masked, cfg.num_negatives, real)
        contrastive = contrastive_loss(transformer_features, quantized, masked, sampled_negative_indices,
                                       cfg.contrastive_logits_temperature)
        # the soft code distribution (the quantizer returns only its all-frame perplexity)
        groups, per_group = cfg.num_codevector_groups, cfg.num_codevectors_per_group
        code_logits = model.quantizer.weight_proj(extract_features).view(batch * frames, groups, per_group)
        soft_perplexity = codevector_perplexity(torch.softmax(code_logits.float(), dim=-1), masked.flatten(),
                                                all_reduce=_distributed_training(model))
        diversity = diversity_loss(soft_perplexity, groups * per_group)
        num_masked = masked.sum()

    ctc = None
    if labels is not None:
        mixed = transformer_features
        if model.training:
            mixed = replace_with_quantized(transformer_features, quantized, cfg.replace_prob)
        ctc_logits = model.ctc_proj(model.dropout(mixed))
        blank = cfg.pad_token_id if cfg.pretraining_ctc_blank_id is None else cfg.pretraining_ctc_blank_id
        ctc = ctc_loss(ctc_logits, labels, real.sum(-1), blank, zero_infinity=cfg.ctc_zero_infinity)

    alpha = cfg.pretraining_ctc_weight
    if contrastive is not None:
        loss = total_loss(contrastive, diversity, num_masked, ctc, alpha, cfg.diversity_loss_weight)
    else:
        loss = None if ctc is None else alpha * ctc
    return PreTrainingLosses(loss, contrastive, diversity, ctc)
