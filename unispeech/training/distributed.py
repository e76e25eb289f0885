"""torchrun set-up and model wrapping for the recipes.

One process per device, as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK in the environment;
a plain ``python -m`` run is a world of one). The process group is NCCL on GPUs and gloo on CPUs.
Models are wrapped in DDP by default or sharded with FSDP2 (``fully_shard`` on every encoder layer
and on the whole model); a torch without FSDP2 trains with DDP and says so.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_runtime(device: Optional[str] = None, timeout_s: float = 1800.0) -> Runtime:
    """This process's rank, world and device; joins the process group when torchrun started several.
    ``device``: "cuda" (the LOCAL_RANK-th GPU), "cpu", or None (a GPU when there is one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to this process")
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    else:
        target = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Runtime(rank, world, local_rank, target)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still talks to rank 0's rendezvous store
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def fully_shard_function() -> Optional[Callable]:
    """FSDP2's ``fully_shard`` (public from torch 2.6, under _composable in 2.4 / 2.5), or None."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


def wrap(model: nn.Module, runtime: Runtime, fsdp: bool = False, find_unused_parameters: bool = False,
         log: Callable[[str], None] = print) -> nn.Module:
    """The model as the training step calls it: itself (one process), FSDP2-sharded in place
    (``fsdp``), or in DDP. FSDP2 must be applied before the optimizer is built (it replaces the
    parameters by shards); DDP may wrap again later (after a change of requires_grad)."""
    if not runtime.distributed:
        return model
    if fsdp:
        shard = fully_shard_function()
        if shard is not None:
            for layer in model.base_model.encoder.layers:
                shard(layer)
            shard(model)
            return model
        log(f"--fsdp: torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2 needs "
            "torch >= 2.4); training with DDP instead")
    return DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def is_sharded(model: nn.Module) -> bool:
    return not isinstance(model, DistributedDataParallel) and hasattr(model, "set_requires_gradient_sync")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce inside (accumulation micro-steps but the last)."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: Sequence[float], runtime: Runtime) -> List[float]:
    """Sums over the ranks of a few numbers (one collective, float64)."""
    if not runtime.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return t.tolist()
