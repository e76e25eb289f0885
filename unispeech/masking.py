"""SpecAugment span masks, with the semantics of transformers' ``_compute_mask_indices``.

Shapes: returns a bool numpy array [B, L] (True = masked). For each row, ``mask_prob * length /
mask_length`` spans (probabilistically rounded with one shared uniform draw, at least
``min_masks``, at most what fits) of ``mask_length`` frames start at distinct random positions
within the row's real length (from ``attention_mask``); spans may overlap. Randomness comes from
numpy's global generator (or ``random_state``, a ``np.random.RandomState``) and is drawn in the
same order as transformers', so equal numpy seeds give equal masks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def compute_mask_indices(shape: Tuple[int, int], mask_prob: float, mask_length: int,
                         attention_mask: Optional[torch.Tensor] = None, min_masks: int = 0,
                         random_state: Optional[np.random.RandomState] = None) -> np.ndarray:
    batch_size, seq_len = shape
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    if mask_length > seq_len:
        raise ValueError(f"mask_length {mask_length} is longer than the sequence ({seq_len} frames)")
    random = np.random if random_state is None else random_state
    rounding = random.rand(1).item()

    def num_spans(length: int) -> int:
        n = max(int(mask_prob * length / mask_length + rounding), min_masks)
        n = min(n, seq_len // mask_length)
        return min(n, max(length - (mask_length - 1), 0))

    lengths = (attention_mask.detach().sum(-1).tolist() if attention_mask is not None
               else [seq_len] * batch_size)
    mask = np.zeros((batch_size, seq_len), dtype=bool)
    max_spans = num_spans(seq_len)
    if max_spans == 0:
        return mask
    starts = np.empty((batch_size, max_spans), dtype=np.int64)
    for b, length in enumerate(lengths):
        n = num_spans(length)
        chosen = random.choice(np.arange(length - (mask_length - 1)), n, replace=False)
        # rows with fewer spans repeat one start (or mark the last, padded, frame) to fill the array
        filler = chosen[0] if n else seq_len - 1
        starts[b, :n] = chosen
        starts[b, n:] = filler
    idx = (starts[:, :, None] + np.arange(mask_length)[None, None, :]).reshape(batch_size, -1)
    np.put_along_axis(mask, np.minimum(idx, seq_len - 1), True, axis=-1)
    return mask
