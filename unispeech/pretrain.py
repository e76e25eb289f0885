"""UniSpeech pre-training: ``python -m unispeech.pretrain --help``; under ``torchrun`` on many GPUs / nodes.

The full UniSpeech objective (contrastive + diversity on masked frames, phonetic CTC: see
unispeech.pretraining). Data: a folder of audio files (``--audio-dir``: unlabeled, so no CTC
term; long files are cropped at random to --max-seconds), a manifest whose utterances carry
phonemes (``--train``: labelled, the CTC branch learns them; the phoneme inventory is saved as
phonemes.json), or synthetic tone "phonemes" (``--synthetic N``). Model: a config.json
(``--config``) or a small model from the size flags. The mask and the negatives of an utterance
are drawn from (seed, step, utterance), so they do not depend on its batch, rank or world size;
the Gumbel temperature decays with the authors' schedule. The loss is normalised by the global
number of masked frames (unispeech.training.loop). The output folder (and every checkpoint-<step>)
holds a ``save_pretrained`` checkpoint that UniSpeechForPreTraining.from_pretrained and
``python -m unispeech.finetune --checkpoint`` load.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List

import numpy as np
import torch

from .configuration import UniSpeechConfig
from .heads import UniSpeechForPreTraining
from .masking import compute_mask_indices
from .pretraining import gumbel_temperature, sample_negative_indices
from .training.audio import RATE
from .training.checkpoint import seed_everything
from .training.cli import add_training_arguments, apply_overrides, check_training_arguments
from .training.data import (Checks, Utterance, UtteranceDataset, check_utterances, phoneme_labeler,
                            phoneme_vocabulary, read_utterances, samples_for_frames)
from .training.loop import Recipe, StepResult, derived_seed, run_recipe
from .training.sampler import BucketBatchSampler

PHONEMES_NAME = "phonemes.json"
PHONEME_SECONDS = 0.08  # synthetic phoneme duration


def synthetic(count: int, num_phonemes: int, seconds: float, rng: np.random.Generator) -> List[Utterance]:
    """Utterances of random tone "phonemes" t1, t2, ... (tone p at 200 + 60 p Hz) with their labels."""
    step = int(PHONEME_SECONDS * RATE)
    t = np.arange(step) / RATE
    out = []
    for i in range(count):
        labels = rng.integers(1, num_phonemes, size=max(2, int(seconds / PHONEME_SECONDS * rng.uniform(0.5, 1.0))))
        audio = np.concatenate([np.sin(2 * np.pi * (200.0 + 60.0 * p) * t) for p in labels])
        audio = (audio + 0.05 * rng.standard_normal(len(audio))).astype(np.float32)
        out.append(Utterance(f"synthetic utterance {i}", None, phonemes=[f"t{p}" for p in labels], audio=audio))
    return out


def small_config(args) -> UniSpeechConfig:
    """A small model: 7 convs of --conv-dim channels, --layers x --hidden-size, 4 heads."""
    return UniSpeechConfig(
        hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=4,
        intermediate_size=4 * args.hidden_size, conv_dim=(args.conv_dim,) * 7, num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=4, num_codevectors_per_group=32, num_codevector_groups=2,
        codevector_dim=64, proj_codevector_dim=64, num_negatives=20, mask_time_prob=0.5, mask_time_length=5,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
        pad_token_id=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unispeech.pretrain", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data").add_mutually_exclusive_group(required=True)
    data.add_argument("--audio-dir", help="folder of .wav files (unlabeled: no CTC term)")
    data.add_argument("--train", help="manifest (.tsv / .jsonl) whose utterances carry phonemes (labelled)")
    data.add_argument("--synthetic", type=int, metavar="N", help="N synthetic labelled utterances")
    m = p.add_argument_group("model")
    m.add_argument("--config", default=None, help="config.json (or its folder) of the model (default: the size flags)")
    m.add_argument("--hidden-size", type=int, default=64, help="small model: width (4 heads)")
    m.add_argument("--layers", type=int, default=2, help="small model: transformer layers")
    m.add_argument("--conv-dim", type=int, default=64, help="small model: channels of the 7 feature-encoder convs")
    m.add_argument("--ctc-weight", type=float, default=0.5, help="alpha: weight of the phonetic CTC term")
    m.add_argument("--num-phonemes", type=int, default=12, help="--synthetic: tone phonemes (blank included)")
    m.add_argument("--synthetic-seconds", type=float, default=2.0, help="--synthetic: longest utterance")
    m.add_argument("--gumbel-start", type=float, default=2.0, help="Gumbel temperature at step 0")
    m.add_argument("--gumbel-decay", type=float, default=0.999995, help="Gumbel temperature decay per step")
    m.add_argument("--gumbel-min", type=float, default=0.5, help="lowest Gumbel temperature")
    add_training_arguments(p, steps=200, lr=5e-4, batch_size=4, warmup=0.1, hold=0.0,
                           freeze_feature_encoder_steps=0)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_training_arguments(p, args)
    if not 0.0 <= args.ctc_weight <= 1.0:
        p.error("--ctc-weight must be in [0, 1]")
    if args.synthetic is not None and args.synthetic < 1:
        p.error("--synthetic must be >= 1 utterances")
    if args.hidden_size < 4 or args.hidden_size % 4 or args.layers < 0 or args.conv_dim < 1:
        p.error("--hidden-size must be a positive multiple of 4 (4 heads), --layers >= 0, --conv-dim >= 1")
    return args


def draw_masks(model, batch, seed: int, step: int):
    """Per-utterance mask [B, T] and negatives [B, T, K] (flat indices), each from (seed, step, index)."""
    cfg = model.config
    lengths = model._get_feat_extract_output_lengths(batch.attention_mask.sum(-1)).tolist()
    frames = int(model._get_feat_extract_output_lengths(batch.input_values.shape[1]))
    mask = torch.zeros(len(lengths), frames, dtype=torch.bool)
    negatives = torch.arange(len(lengths) * frames).view(-1, frames, 1).repeat(1, 1, cfg.num_negatives)
    for row, (index, n) in enumerate(zip(batch.indices.tolist(), lengths)):
        random_state = np.random.RandomState(derived_seed(seed, step, index, 3) % 2 ** 32)
        spans = compute_mask_indices((1, n), cfg.mask_time_prob, cfg.mask_time_length,
                                     min_masks=cfg.mask_time_min_masks, random_state=random_state)
        mask[row, :n] = torch.from_numpy(spans[0])
        generator = torch.Generator().manual_seed(derived_seed(seed, step, index, 4))
        negatives[row, :n] = sample_negative_indices(mask[row:row + 1, :n], cfg.num_negatives, generator=generator)[0]
        negatives[row, :n] += row * frames
    return mask, negatives


def build(args, runtime):
    """(recipe, dataset, sampler) of a run, for ``Trainer``; BadInput for bad data."""
    say = print if runtime.main else (lambda _: None)
    seed_everything(args.seed)
    if args.synthetic:
        utterances = synthetic(args.synthetic, args.num_phonemes, args.synthetic_seconds,
                               np.random.default_rng(args.seed))
    else:
        utterances = read_utterances(args.audio_dir or args.train)
    labelled = args.audio_dir is None
    phonemes = phoneme_vocabulary(utterances) if labelled else None
    config = UniSpeechConfig.from_pretrained(args.config) if args.config else small_config(args)
    config.update(dict(pretraining_ctc_weight=args.ctc_weight, num_ctc_classes=len(phonemes) if labelled else 2,
                       pretraining_ctc_blank_id=0, architectures=None))
    apply_overrides(config, args.config_overrides)
    if args.kernel_backend is not None:
        config.kernel_backend = args.kernel_backend
    if not config.mask_time_prob > 0:
        raise SystemExit("pre-training needs masked frames: the config's mask_time_prob must be > 0")
    model = UniSpeechForPreTraining(config)
    if not labelled:  # no CTC term: its projection gets no gradient, which DDP must not wait for
        model.ctc_proj.requires_grad_(False)
    max_samples = None if args.max_seconds is None else int(args.max_seconds * RATE)
    checks = Checks(frames=lambda n: int(model._get_feat_extract_output_lengths(n)),
                    min_samples=samples_for_frames(config, config.mask_time_length),
                    labeler=phoneme_labeler(phonemes) if labelled else None,
                    max_samples=max_samples if labelled else None, resample=args.resample)
    utterances = check_utterances(utterances, checks, args.on_bad_input, say)
    say(f"{len(utterances)} utterances, {sum(u.samples for u in utterances) / RATE / 3600:.2f} h; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    def before_step(step):
        model.set_gumbel_temperature(gumbel_temperature(step - 1, args.gumbel_start, args.gumbel_decay,
                                                        args.gumbel_min))

    def step(wrapped, batch, step_number):
        mask, negatives = draw_masks(model, batch, args.seed, step_number)
        out = wrapped(batch.input_values, attention_mask=batch.attention_mask, labels=batch.labels,
                      mask_time_indices=mask.to(batch.input_values.device),
                      sampled_negative_indices=negatives.to(batch.input_values.device))
        real = model._get_feature_vector_attention_mask(mask.shape[1], batch.attention_mask.cpu())
        masked = float((mask & real).sum())
        logs = dict(contrastive=(out.contrastive_loss.item(), masked),
                    diversity=(out.diversity_loss.item() * len(batch.indices), len(batch.indices)))
        if out.ctc_loss is not None:
            logs["ctc"] = (out.ctc_loss.item(), len(batch.indices))
        return StepResult(out.loss, masked, logs)

    def write_model(folder, state):
        model.save_pretrained(folder, state_dict=state)
        if labelled:
            with open(os.path.join(folder, PHONEMES_NAME), "w", encoding="utf-8") as f:
                json.dump(phonemes, f, indent=1, ensure_ascii=False)

    recipe = Recipe(model, step, write_model, before_step=before_step)
    sampler = BucketBatchSampler([u.samples for u in utterances], args.batch_size, runtime.world, runtime.rank,
                                 args.seed, args.shard_batches)
    return recipe, UtteranceDataset(utterances, None if labelled else max_samples, args.seed), sampler


def main(argv=None) -> dict:
    return run_recipe(parse_args, build, argv)


if __name__ == "__main__":
    main()
