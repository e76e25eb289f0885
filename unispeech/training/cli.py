"""The command-line flags both recipes take, and their shared start-up."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch

from .audio import RATE
from .data import ON_BAD_INPUT


def add_training_arguments(p: argparse.ArgumentParser, steps: int, lr: float, batch_size: int,
                           warmup: float, hold: float, freeze_feature_encoder_steps: int) -> None:
    """Flags of the training loop, data checks, distribution and checkpointing (defaults per recipe)."""
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=batch_size,
                   help="utterances per process and micro-step (global batch = this x processes x --accumulate)")
    t.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    t.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--warmup", type=float, default=warmup, help="tri-stage schedule: fraction of steps warming up")
    t.add_argument("--hold", type=float, default=hold, help="tri-stage schedule: fraction of steps at the peak")
    t.add_argument("--final-lr-scale", type=float, default=0.05, help="tri-stage schedule: last lr / peak lr")
    t.add_argument("--clip-norm", type=float, default=10.0, help="gradient norm clipping threshold")
    t.add_argument("--freeze-feature-encoder-steps", type=int, default=freeze_feature_encoder_steps,
                   help="keep the conv feature encoder frozen for this many first steps (-1: the whole run)")
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype on GPU (fp16 with a GradScaler); auto: bf16 on GPUs that have it, "
                        "else fp32; CPUs train in fp32")
    t.add_argument("--seed", type=int, default=0, help="seeds weights, batch order, masks and dropout")

    d = p.add_argument_group("data")
    d.add_argument("--on-bad-input", default="stop", choices=ON_BAD_INPUT,
                   help="a bad manifest line (missing or unreadable audio, empty transcript, unknown "
                        "characters, ...): stop with its message, or skip it with a warning")
    d.add_argument("--no-resample", dest="resample", action="store_false",
                   help=f"treat audio not at {RATE} Hz as bad input instead of resampling it (soxr)")
    d.add_argument("--max-seconds", type=float, default=None,
                   help="longest utterance (longer labelled ones are bad input; unlabeled ones are cropped)")
    d.add_argument("--shard-batches", type=int, default=32,
                   help="length bucketing: global batches per shard sorted by length")
    d.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per rank")

    s = p.add_argument_group("scale")
    s.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: the LOCAL_RANK-th GPU when there is one, else the CPU")
    s.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state with FSDP2 (fully_shard per encoder "
                        "layer) instead of DDP")
    s.add_argument("--kernel-backend", default=None, choices=["auto", "torch", "triton", "cuda"],
                   help="unispeech_kernels backend of the hot spots (default: the config's)")
    s.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="model config overrides, values as JSON (e.g. mask_time_prob=0.05 layerdrop=0.1)")

    c = p.add_argument_group("logging and checkpoints")
    c.add_argument("--output-dir", required=True, help="final model, checkpoint-<step>/ folders and log.jsonl")
    c.add_argument("--log-every", type=int, default=10, help="steps per log line (averaged over them)")
    c.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    c.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: none but the final model)")
    c.add_argument("--resume", default=None, metavar="DIR|latest",
                   help="continue from a checkpoint folder (latest: the newest under --output-dir)")


def check_training_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if min(args.steps, args.batch_size, args.accumulate, args.log_every, args.shard_batches) < 1:
        p.error("--steps, --batch-size, --accumulate, --log-every and --shard-batches must be >= 1")
    if not (args.lr > 0 and args.clip_norm > 0) or args.num_workers < 0:  # NaN fails the comparisons too
        p.error("--lr and --clip-norm must be > 0, --num-workers >= 0")
    if not (args.warmup >= 0 and args.hold >= 0 and args.warmup + args.hold <= 1 and 0 < args.final_lr_scale <= 1):
        p.error("--warmup and --hold must be fractions >= 0 summing to at most 1, --final-lr-scale in (0, 1]")
    if args.max_seconds is not None and not args.max_seconds > 0:
        p.error("--max-seconds must be > 0")
    try:
        args.config_overrides = parse_overrides(args.set)
    except ValueError as e:
        p.error(str(e))


def parse_overrides(pairs: List[str]) -> Dict[str, object]:
    """["a=1", "b=true", "c=sum"] -> {"a": 1, "b": True, "c": "sum"} (JSON values, else strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes FIELD=VALUE pairs, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def apply_overrides(config, overrides: Dict[str, object]):
    """config.update(overrides), an unknown or invalid field ending the run with its message."""
    try:
        config.update(overrides)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    return config


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype of --precision on ``device`` (None: fp32, no autocast)."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise SystemExit(f"--precision {precision} needs a GPU; CPUs train in fp32")
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
