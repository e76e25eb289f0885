"""Batch orders: length-bucketed and distributed for training, sharded for evaluation.

Items are keys (index, epoch, counted) for ``data.UtteranceDataset``. The training order is a
function of (seed, epoch, position) only, so a run resumed at a consumed-batch count continues
with exactly the batches it would have seen, and it is the same for every world size: a global
batch holds ``batch_size * world`` utterances and rank r takes its items r, r + world, ...
"""
from __future__ import annotations

import math
from typing import Iterator, List, Sequence, Tuple

import numpy as np

Key = Tuple[int, int, bool]


class BucketBatchSampler:
    """Epoch e: a permutation of the utterances drawn from (seed, e), cut into shards of
    ``shard_batches`` global batches; each shard is sorted by length (little padding within a
    batch) and cut into global batches; the epoch's batches are shuffled (seed, e); an incomplete
    last global batch is dropped (every rank needs a full part)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 shard_batches: int = 32):
        if batch_size < 1 or shard_batches < 1:
            raise ValueError(f"batch_size and shard_batches must be >= 1, got {batch_size}, {shard_batches}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.lengths = np.asarray(lengths)
        self.global_batch = batch_size * world
        if len(self.lengths) < self.global_batch:
            raise ValueError(f"{len(self.lengths)} utterances cannot fill one global batch of {self.global_batch} "
                             f"(batch size {batch_size} x {world} processes)")
        self.world, self.rank, self.seed, self.shard_batches = world, rank, seed, shard_batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch

    def epoch_batches(self, epoch: int) -> List[np.ndarray]:
        """The epoch's global batches (arrays of utterance indices), in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.batches_per_epoch * self.global_batch]
        shard = self.shard_batches * self.global_batch
        batches = []
        for start in range(0, len(order), shard):
            part = order[start:start + shard]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[i:i + self.global_batch] for i in range(0, len(part), self.global_batch)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def iterate(self, start: int = 0) -> Iterator[List[Key]]:
        """This rank's part of every global batch from the ``start``-th on (counted over epochs), forever."""
        epoch, position = divmod(start, self.batches_per_epoch)
        while True:
            for batch in self.epoch_batches(epoch)[position:]:
                yield [(int(i), epoch, True) for i in batch[self.rank::self.world]]
            epoch, position = epoch + 1, 0


def evaluation_batches(lengths: Sequence[int], batch_size: int, world: int = 1, rank: int = 0) -> List[List[Key]]:
    """This rank's evaluation batches: the utterances sorted by length, rank r taking r, r + world,
    ...; parts are padded to equal size with uncounted repeats, so every rank runs the same number
    of forwards (FSDP's collectives need that)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    part = [(int(i), 0, True) for i in order[rank::world]]
    per_rank = math.ceil(len(order) / world)
    part += [(int(order[-1]), 0, False)] * (per_rank - len(part))
    return [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
