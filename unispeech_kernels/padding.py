"""Padding: lengths <-> masks <-> packed rows, for the model layer and the ops.

A padded batch [B, T, ...] holds utterance b in its first lengths[b] frames (audio padding is always
a prefix: ``mask[b, t] = t < lengths[b]``, bool, True = real). Packed rows [N, ...] (N = sum of the
lengths) hold the real frames back to back; ``pack_index`` gives each packed row's position in the
flattened padded batch, so ``pack`` / ``unpack`` are one index_select / index_copy. Host lengths
(Python ints) are what packing needs: read them once per forward (``prefix_lengths`` is one host
sync) and pass them down; ``host_to_device`` moves host tables without a sync. Sample lengths
become frame lengths through the conv stack's ``conv_output_length``.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import torch


def conv_output_length(length, kernel_sizes: Sequence[int], strides: Sequence[int]):
    """Frames after a conv stack without padding: floor((L - K) / S) + 1 per layer; ints or tensors
    (negative where an input is shorter than the receptive field)."""
    for k, s in zip(kernel_sizes, strides):
        length = torch.div(length - k, s, rounding_mode="floor") + 1 if torch.is_tensor(length) \
            else (length - k) // s + 1
    return length


def receptive_field(kernel_sizes: Sequence[int], strides: Sequence[int]) -> int:
    """Fewest input samples that give one output frame."""
    field, jump = 1, 1
    for k, s in zip(kernel_sizes, strides):
        field += (k - 1) * jump
        jump *= s
    return field


def mask_from_lengths(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """bool [B, frames], True on the first lengths[b] frames of row b (lengths a [B] tensor)."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


def prefix_lengths(mask: torch.Tensor) -> Optional[List[int]]:
    """Host lengths of a bool [B, S] mask if every row is a prefix of real frames (audio padding),
    else None; one host sync."""
    lengths = mask.sum(1)
    prefix = (mask == mask_from_lengths(lengths, mask.shape[1])).all()
    *host, prefix = torch.cat([lengths, prefix[None].long()]).tolist()
    return host if prefix else None


def host_to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def sequence_starts(lengths: Sequence[int]) -> List[int]:
    """The packed row where each sequence starts."""
    return list(itertools.accumulate(lengths, initial=0))[:-1]


def pack_index(lengths: Sequence[int], frames: int, device: torch.device) -> torch.Tensor:
    """[N] int64: the position in the flattened [B * frames] padded batch of each packed row (host
    lengths, each <= frames); built on the host, moved without a sync."""
    index = torch.cat([torch.arange(n) + b * frames for b, n in enumerate(lengths)]) if lengths else \
        torch.zeros(0, dtype=torch.int64)
    return host_to_device(index, device)


def pack(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, T, ...] -> [N, ...] rows at ``index`` (None: every frame, a free reshape)."""
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return x if index is None else x.index_select(0, index)


def unpack(x: torch.Tensor, index: Optional[torch.Tensor], batch: int, frames: int) -> torch.Tensor:
    """[N, ...] rows -> [batch, frames, ...] with zeros at the positions ``index`` leaves out."""
    if index is not None:
        x = x.new_zeros(batch * frames, *x.shape[1:]).index_copy(0, index, x)
    return x.view(batch, frames, *x.shape[1:])
