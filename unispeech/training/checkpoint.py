"""Training checkpoints and exact resumption.

A checkpoint is a folder (``<output_dir>/checkpoint-<step>``) holding the model as the recipe
writes it for users (``save_pretrained`` files: config.json, model.safetensors, and the recipe's
processor / vocabulary files), plus what a resume needs to continue as if never stopped:
``optimizer.pt`` (the full, unsharded optimizer state), ``trainer_state.pt`` (step, consumed
batches, which is the sampler's position, scheduler and grad-scaler states, world size) and
``rng_rank<r>.pt`` per rank (torch CPU and CUDA, numpy and Python generator states). Under FSDP2
the full state is gathered to rank 0 to write and resharded on load, so a checkpoint does not
depend on how the model was wrapped. Multi-node runs need the output folder on a shared file
system. A resume with another world size continues the same batches (the sampler's order does
not depend on it) but reseeds the per-rank generators, which it says.
"""
from __future__ import annotations

import os
import random
import re
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..checkpoint_files import CheckpointTensors
from .distributed import Runtime, barrier

OPTIMIZER_NAME, STATE_NAME, RNG_NAME = "optimizer.pt", "trainer_state.pt", "rng_rank{}.pt"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU
SCATTER = StateDictOptions(full_state_dict=True)


def full_model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (empty on other ranks under FSDP2); a collective."""
    return get_model_state_dict(model, options=GATHER)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_checkpoint(folder: str, runtime: Runtime, model, optimizer, scheduler, scaler, step: int,
                             consumed: int, write_model: Callable[[str, Dict[str, torch.Tensor]], None]) -> None:
    """Write a checkpoint (see the module docstring); every rank calls it."""
    state = full_model_state(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=GATHER)
    os.makedirs(folder, exist_ok=True)
    if runtime.main:
        write_model(folder, state)
        torch.save(optimizer_state, os.path.join(folder, OPTIMIZER_NAME))
        torch.save(dict(step=step, consumed=consumed, scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                        world=runtime.world), os.path.join(folder, STATE_NAME))
    torch.save(_rng_state(runtime.device), os.path.join(folder, RNG_NAME.format(runtime.rank)))
    barrier(runtime)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint-<step> folder of output_dir with the highest step that holds a trainer state."""
    if not os.path.isdir(output_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))
             and os.path.isfile(os.path.join(output_dir, name, STATE_NAME))]
    return os.path.join(output_dir, max(found)[1]) if found else None


def load_training_checkpoint(folder: str, runtime: Runtime, model, optimizer, scheduler, scaler,
                             log: Callable[[str], None] = print) -> dict:
    """Restore a checkpoint into the (wrapped) model and the optimizer, scheduler and scaler;
    returns the trainer state (step, consumed, world)."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        raise SystemExit(f"--resume {folder}: no {STATE_NAME} there (not a training checkpoint)")
    state = torch.load(path, weights_only=False)
    tensors = CheckpointTensors(folder)
    set_model_state_dict(model, {name: tensors[name] for name in tensors}, options=SCATTER)
    set_optimizer_state_dict(model, optimizer, torch.load(os.path.join(folder, OPTIMIZER_NAME), weights_only=False),
                             options=SCATTER)
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = os.path.join(folder, RNG_NAME.format(runtime.rank))
    if state["world"] == runtime.world and os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False), runtime.device)
    else:
        log(f"resuming a {state['world']}-process checkpoint with {runtime.world} processes: same batches, "
            "new random streams for dropout and masking")
    return state
