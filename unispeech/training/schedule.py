"""The tri-stage learning-rate schedule of the wav2vec 2.0 / UniSpeech fine-tuning recipes."""
from __future__ import annotations

import math

import torch


def tri_stage(step: int, total: int, warmup: float, hold: float, init_scale: float = 0.01,
              final_scale: float = 0.05) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: linear from init_scale to 1 over
    the first ``warmup`` fraction of the steps, 1 for the next ``hold`` fraction, then exponential
    decay to final_scale at the last step."""
    if not (0 <= warmup and 0 <= hold and warmup + hold <= 1):
        raise ValueError(f"warmup {warmup} and hold {hold} must be fractions adding up to at most 1")
    warmup_steps, hold_steps = int(warmup * total), int(hold * total)
    decay_steps = max(total - warmup_steps - hold_steps, 1)
    if step < warmup_steps:
        return init_scale + (1 - init_scale) * step / warmup_steps
    if step < warmup_steps + hold_steps:
        return 1.0
    progress = min((step - warmup_steps - hold_steps) / decay_steps, 1.0)
    return math.exp(math.log(final_scale) * progress)


def tri_stage_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: float, hold: float,
                        final_scale: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: tri_stage(step, total, warmup, hold, final_scale=final_scale))
