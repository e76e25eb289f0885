"""CTC fine-tuning: ``python -m unispeech.finetune --help``; under ``torchrun`` on many GPUs / nodes.

From a checkpoint folder (config.json + weights, ours or transformers'-saved; a pre-training
checkpoint gets a new CTC head), on a manifest or a folder of .wav + .txt pairs
(unispeech.training.data). The character vocabulary is --vocab, else the checkpoint's vocab.json,
else built from the training transcripts. SpecAugment, LayerDrop and dropouts are the config's
(``--set mask_time_prob=0.05 ...`` overrides them); the CTC loss is summed and normalised by the
global number of label tokens (unispeech.training.loop). Evaluation (--eval) decodes greedily and
reports CER and WER on held-out data. The output folder (and every checkpoint-<step>) holds the
model and the processor files (preprocessor_config.json, vocab.json, tokenizer_config.json,
special_tokens_map.json) that transformers' ``pipeline("automatic-speech-recognition")`` loads.
``--implementation transformers`` trains transformers' UniSpeechForCTC with the same recipe.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from .configuration import UniSpeechConfig
from .feature_extraction import UniSpeechFeatureExtractor, read_json_object
from .heads import UniSpeechForCTC
from .processing import UniSpeechProcessor
from .tokenization import VOCAB_NAME, UniSpeechCTCTokenizer
from .training.checkpoint import seed_everything
from .training.cli import add_training_arguments, apply_overrides, autocast_dtype, check_training_arguments
from .training.data import (Checks, UtteranceDataset, character_labeler, character_vocabulary,
                            check_utterances, collate, read_utterances, samples_for_frames)
from .training.distributed import Runtime, all_reduce_sum
from .training.loop import Recipe, StepResult, run_recipe
from .training.metrics import error_counts, error_rates, greedy_decode
from .training.sampler import BucketBatchSampler, evaluation_batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unispeech.finetune", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model and data")
    m.add_argument("--checkpoint", required=True,
                   help="folder with config.json + weights (ours or transformers'); a pre-training checkpoint "
                        "gets a newly initialised CTC head")
    m.add_argument("--from-scratch", action="store_true",
                   help="the checkpoint's architecture (its config.json) with random weights")
    m.add_argument("--implementation", default="unispeech", choices=["unispeech", "transformers"],
                   help="train this library's UniSpeechForCTC or transformers' (same recipe, for comparison)")
    m.add_argument("--train", required=True, help="training manifest (.tsv / .jsonl) or folder of .wav + .txt")
    m.add_argument("--eval", default=None, help="held-out manifest or folder: CER / WER every --eval-every steps")
    m.add_argument("--eval-batch-size", type=int, default=8, help="utterances per process and evaluation batch")
    m.add_argument("--vocab", default=None, help="vocab.json (default: the checkpoint's, else built from --train)")
    add_training_arguments(p, steps=1000, lr=5e-5, batch_size=8, warmup=0.1, hold=0.4,
                           freeze_feature_encoder_steps=-1)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_training_arguments(p, args)
    return args


def _vocabulary(args, utterances) -> dict:
    path = args.vocab or os.path.join(args.checkpoint, VOCAB_NAME)
    if args.vocab or os.path.isfile(path):
        return read_json_object(path)
    return character_vocabulary(utterances)


def build_model(args, vocab: dict):
    """The CTC model (ours or transformers') and our config of it, on the CPU."""
    config = UniSpeechConfig.from_pretrained(args.checkpoint)
    config.update(dict(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], ctc_loss_reduction="sum",
                       ctc_zero_infinity=True, architectures=None))
    apply_overrides(config, args.config_overrides)
    if args.kernel_backend is not None:
        config.kernel_backend = args.kernel_backend
    if args.implementation == "unispeech":
        model = UniSpeechForCTC(config) if args.from_scratch else UniSpeechForCTC.from_pretrained(
            args.checkpoint, config=config, dtype=torch.float32)
    else:
        import transformers
        theirs = transformers.UniSpeechConfig.from_dict(config.to_dict())
        cls = transformers.UniSpeechForCTC
        model = cls(theirs) if args.from_scratch else cls.from_pretrained(args.checkpoint, config=theirs,
                                                                          dtype=torch.float32)
    base = model.base_model
    if hasattr(base, "masked_spec_embed") and not (config.apply_spec_augment and config.mask_time_prob > 0):
        base.masked_spec_embed.requires_grad_(False)  # never used: DDP must not wait for its gradient
    return model.float(), config


def make_evaluate(model, config, tokenizer, utterances, args, runtime: Runtime):
    """Greedy CTC decoding of the held-out set, sharded over the ranks: CER, WER and loss per token."""
    dataset = UtteranceDataset(utterances)
    batches = evaluation_batches([u.samples for u in utterances], args.eval_batch_size, runtime.world, runtime.rank)
    dtype = autocast_dtype(args.precision, runtime.device)

    def evaluate(wrapped, step):
        model.eval()
        refs, hyps, loss, tokens = [], [], 0.0, 0
        autocast = torch.autocast(runtime.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        with torch.no_grad(), autocast:
            for keys in batches:
                batch = collate([dataset[k] for k in keys]).to(runtime.device)
                logits = wrapped(batch.input_values, attention_mask=batch.attention_mask).logits.float()
                frames = model._get_feat_extract_output_lengths(batch.attention_mask.sum(-1))
                per_utterance = F.ctc_loss(F.log_softmax(logits, -1).transpose(0, 1), batch.labels.clamp(min=0), frames,
                                           (batch.labels >= 0).sum(-1), blank=config.pad_token_id,
                                           reduction="none", zero_infinity=True)
                counted = batch.counted.to(runtime.device)
                loss += per_utterance[counted].sum().item()
                tokens += int((batch.labels >= 0)[counted].sum())
                texts = greedy_decode(logits, frames, tokenizer)
                for key, text in zip(keys, texts):
                    if key[2]:
                        refs.append(utterances[key[0]].text)
                        hyps.append(text)
        counts = error_counts(refs, hyps)
        names = list(counts)
        totals = all_reduce_sum([counts[n] for n in names] + [loss, tokens], runtime)
        rates = error_rates(dict(zip(names, totals)))
        if runtime.main and refs:
            print(f"eval example: ref {refs[0]!r}\n              hyp {hyps[0]!r}", file=sys.stderr)
        return dict(eval_cer=rates["cer"], eval_wer=rates["wer"], eval_loss=totals[-2] / max(totals[-1], 1))
    return evaluate


def build(args, runtime):
    """(recipe, dataset, sampler) of a run, for ``Trainer``; BadInput for bad data."""
    say = print if runtime.main else (lambda _: None)
    seed_everything(args.seed)  # the same weights on every rank (FSDP2 does not broadcast them)
    train_utts = read_utterances(args.train)
    vocab = _vocabulary(args, train_utts)
    model, config = build_model(args, vocab)
    tokenizer = UniSpeechCTCTokenizer(vocab=vocab)
    processor = UniSpeechProcessor(UniSpeechFeatureExtractor(return_attention_mask=True, do_normalize=True),
                                   tokenizer)
    min_frames = config.mask_time_length if config.apply_spec_augment and config.mask_time_prob > 0 else 1
    checks = Checks(frames=lambda n: int(model._get_feat_extract_output_lengths(n)),
                    min_samples=samples_for_frames(config, min_frames), labeler=character_labeler(tokenizer),
                    max_samples=None if args.max_seconds is None else int(args.max_seconds * 16000),
                    resample=args.resample)
    train_utts = check_utterances(train_utts, checks, args.on_bad_input, say)
    say(f"{len(train_utts)} training utterances, {sum(u.samples for u in train_utts) / 16000 / 3600:.2f} h; "
        f"vocabulary of {len(vocab)}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    evaluate = None
    if args.eval:
        eval_utts = check_utterances(read_utterances(args.eval), checks, args.on_bad_input, say)
        evaluate = make_evaluate(model, config, tokenizer, eval_utts, args, runtime)

    def step(wrapped, batch, _step):
        out = wrapped(batch.input_values, attention_mask=batch.attention_mask, labels=batch.labels)
        return StepResult(out.loss, float((batch.labels >= 0).sum()))

    def write_model(folder, state):
        model.save_pretrained(folder, state_dict=state)
        processor.save_pretrained(folder)

    uses_own_layerdrop = args.implementation == "transformers" and config.layerdrop > 0
    recipe = Recipe(model, step, write_model, evaluate, find_unused_parameters=uses_own_layerdrop)
    sampler = BucketBatchSampler([u.samples for u in train_utts], args.batch_size, runtime.world, runtime.rank,
                                 args.seed, args.shard_batches)
    return recipe, UtteranceDataset(train_utts), sampler


def main(argv=None) -> dict:
    return run_recipe(parse_args, build, argv)


if __name__ == "__main__":
    main()
