"""The training loop both recipes run.

Loss normalisation: a recipe's step returns its loss as a SUM over the micro-batch and the
sample size it sums over (label tokens, masked frames). Gradients of every micro-batch and rank
are accumulated unnormalised, DDP / FSDP2 average them over the ranks, and before the optimizer
step they are multiplied by world / (global sample size, all-reduced): the update is that of the
per-sample loss of the whole global batch, however it is split over processes and micro-steps.

LayerDrop: before each micro-step the encoder's ``layerdrop_generator`` is seeded from (seed,
step, micro-step), so every rank drops the same layers, and dropped layers get zero gradients
(see unispeech.encoder): DDP runs without find_unused_parameters.

Feature-encoder freezing for the first N steps: the conv parameters stop requiring gradients
(the optimizer holds them throughout); DDP is rebuilt when that changes, since its reducer fixes
the set of parameters that get gradients when it is built.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .checkpoint import (full_model_state, latest_checkpoint, load_training_checkpoint,
                         save_training_checkpoint, seed_everything)
from .cli import autocast_dtype
from .data import BadInput, collate
from .distributed import Runtime, all_reduce_sum, gradient_sync, init_runtime, is_sharded, shutdown, wrap
from .schedule import tri_stage_scheduler

LOG_NAME = "log.jsonl"


def derived_seed(*words: int) -> int:
    """A 63-bit seed from integers (seed, step, index, ...): independent streams per tuple."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32).astype(np.uint64)
               .dot([1 << 31, 1]))


@dataclass
class StepResult:
    loss: torch.Tensor  # the micro-batch's loss, a SUM over its samples (what backward sees)
    sample_size: float  # how many samples that sum covers (the normaliser)
    logs: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # name -> (sum, count) to report


@dataclass
class Recipe:
    model: nn.Module  # unwrapped, on the CPU or the device
    step: Callable  # (wrapped model, Batch on the device, step) -> StepResult
    write_model: Callable  # (folder, full state dict) -> None: the user-facing files (rank 0 only)
    evaluate: Optional[Callable] = None  # (wrapped model, step) -> {name: value}, on every rank
    before_step: Optional[Callable] = None  # (step) -> None
    find_unused_parameters: bool = False  # DDP's flag (a model that draws LayerDrop per rank)


class Logger:
    """Rank 0: a tqdm bar, a one-line log every --log-every steps, and every record in log.jsonl."""

    def __init__(self, runtime: Runtime, output_dir: str, total: int, initial: int):
        self.main = runtime.main
        self.bar = None
        self.path = os.path.join(output_dir, LOG_NAME)
        if self.main:
            os.makedirs(output_dir, exist_ok=True)
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else print)(text)

    def record(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        self.line(shown)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def set_feature_encoder_trainable(model: nn.Module, trainable: bool) -> None:
    """Ours and transformers' models alike (transformers reads ``_requires_grad`` in its forward)."""
    encoder = model.base_model.feature_extractor
    for p in encoder.parameters():
        p.requires_grad = trainable
    encoder._requires_grad = trainable


def _seed_layerdrop(model: nn.Module, seed: int, step: int, micro: int) -> None:
    encoder = model.base_model.encoder
    if hasattr(encoder, "layerdrop_generator"):
        encoder.layerdrop_generator = torch.Generator().manual_seed(derived_seed(seed, step, micro, 1))


class Trainer:
    """One training run: the model wrapped, the optimizer, schedule, grad scaler and batch stream
    set up (and restored from args.resume); ``gradient_step`` computes one step's gradients,
    ``run`` trains to args.steps."""

    def __init__(self, args, runtime: Runtime, recipe: Recipe, dataset, sampler):
        self.args, self.runtime, self.recipe = args, runtime, recipe
        self.say = print if runtime.main else (lambda _: None)
        self.model = model = recipe.model.to(runtime.device)
        self.frozen_until = args.steps if args.freeze_feature_encoder_steps < 0 else args.freeze_feature_encoder_steps
        set_feature_encoder_trainable(model, self.frozen_until == 0)
        self.wrapped = wrap(model, runtime, args.fsdp, recipe.find_unused_parameters, log=self.say)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
                                           weight_decay=args.weight_decay)
        self.scheduler = tri_stage_scheduler(self.optimizer, args.steps, args.warmup, args.hold, args.final_lr_scale)
        dtype = autocast_dtype(args.precision, runtime.device)
        if dtype == torch.float16 and is_sharded(self.wrapped):
            raise SystemExit("--precision fp16 with --fsdp is not supported (no sharded grad scaler): use bf16")
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=dtype == torch.float16)
        self.autocast = lambda: (torch.autocast(runtime.device.type, dtype=dtype) if dtype is not None
                                 else contextlib.nullcontext())
        self.start, self.consumed = 0, 0
        resume = latest_checkpoint(args.output_dir) if args.resume == "latest" else args.resume
        if args.resume == "latest" and resume is None:
            self.say(f"--resume latest: no checkpoint in {args.output_dir}, starting from step 0")
        if resume is not None:
            state = load_training_checkpoint(resume, runtime, self.wrapped, self.optimizer, self.scheduler,
                                             self.scaler, log=self.say)
            self.start, self.consumed = state["step"], state["consumed"]
        else:  # per-rank streams for dropout and masks; the weights were drawn from args.seed on every rank
            seed_everything(derived_seed(args.seed, runtime.rank, 2))
        # a generator of its own: the loader's draws (worker seeds) leave the restored streams alone
        self.batches = iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler.iterate(self.consumed), collate_fn=collate, num_workers=args.num_workers,
            pin_memory=runtime.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed)))

    def gradient_step(self, step: int) -> Dict[str, Tuple[float, float]]:
        """Forward and backward of the step's micro-batches; leaves the gradients of the per-sample
        loss of the global batch (unscaled) in the parameters. Returns the all-reduced (sum, count)
        of every logged quantity, "loss" included."""
        args, runtime, model = self.args, self.runtime, self.model
        trainable = step > self.frozen_until
        if any(p.requires_grad != trainable for p in model.base_model.feature_extractor.parameters()):
            set_feature_encoder_trainable(model, trainable)
            if runtime.distributed and not is_sharded(self.wrapped):
                self.wrapped = wrap(model, runtime, False, self.recipe.find_unused_parameters)
        if self.recipe.before_step is not None:
            self.recipe.before_step(step)
        model.train()
        sample_size, sums = 0.0, {}
        for micro in range(args.accumulate):
            batch = next(self.batches).to(runtime.device)
            self.consumed += 1
            _seed_layerdrop(model, args.seed, step, micro)
            with gradient_sync(self.wrapped, micro == args.accumulate - 1):
                with self.autocast():
                    out = self.recipe.step(self.wrapped, batch, step)
                self.scaler.scale(out.loss).backward()
            sample_size += out.sample_size
            logs = {"loss": (out.loss.item(), out.sample_size), "utterances": (len(batch.indices), 1), **out.logs}
            for name, (total, count) in logs.items():
                s = sums.setdefault(name, [0.0, 0.0])
                s[0], s[1] = s[0] + total, s[1] + count
        names = list(sums)
        reduced = all_reduce_sum([sample_size] + [v for n in names for v in sums[n]], runtime)
        self.scaler.unscale_(self.optimizer)
        factor = runtime.world / max(reduced[0], 1.0)  # DDP / FSDP2 averaged over ranks: back to the sum
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        return {n: (reduced[1 + 2 * i], reduced[2 + 2 * i]) for i, n in enumerate(names)}

    def run(self) -> dict:
        """Train to args.steps, logging, evaluating and saving as the flags say; writes the final
        model into args.output_dir. Returns the last log record."""
        args, runtime, recipe = self.args, self.runtime, self.recipe
        logger = Logger(runtime, args.output_dir, args.steps, self.start)
        window: Dict[str, list] = {}
        window_start, record = time.time(), {}
        for step in range(self.start + 1, args.steps + 1):
            sums = self.gradient_step(step)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            sums["grad_norm"] = (float(grad_norm), 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            sums["lr"] = (self.scheduler.get_last_lr()[0], 1.0)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            for name, (total, count) in sums.items():
                w = window.setdefault(name, [0.0, 0.0])
                w[0], w[1] = w[0] + total, w[1] + count
            logger.advance()
            if step % args.log_every == 0 or step == args.steps:
                utterances = window.pop("utterances")[0]
                record = dict(step=step, **{n: t / max(c, 1e-12) for n, (t, c) in window.items()},
                              utterances_per_s=utterances / max(time.time() - window_start, 1e-9))
                logger.record(record)
                window, window_start = {}, time.time()
            if recipe.evaluate is not None and ((args.eval_every and step % args.eval_every == 0)
                                                or step == args.steps):
                logger.record(dict(step=step, **recipe.evaluate(self.wrapped, step)))
            if args.save_every and step % args.save_every == 0:
                save_training_checkpoint(os.path.join(args.output_dir, f"checkpoint-{step}"), runtime, self.wrapped,
                                         self.optimizer, self.scheduler, self.scaler, step, self.consumed,
                                         recipe.write_model)
        logger.close()
        state = full_model_state(self.wrapped)
        if runtime.main:
            recipe.write_model(args.output_dir, state)
        self.say(f"saved {args.output_dir}")
        return record


def run_recipe(parse_args: Callable, build: Callable, argv=None) -> dict:
    """A recipe's main: parse the flags, join the process group, build (recipe, dataset, sampler),
    train, leave the group; bad data ends the run with its message."""
    args = parse_args(argv)
    runtime = init_runtime(args.device)
    try:
        return Trainer(args, runtime, *build(args, runtime)).run()
    except BadInput as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        shutdown(runtime)
