"""The textbook CTC Viterbi recursion in numpy, one utterance at a time: the float64 ground truth of
the forced-alignment tests and fuzz target, and the per-utterance loop most users run (the
benchmarks' baseline). Same semantics and tie rule as unispeech_kernels.forced_align (its module
docstring): states s = 0 .. 2L, blank at even s, label s // 2 at odd s;
    alpha[0][s] = e(0, s) for s in {0, 1}
    alpha[t][s] = e(t, s) + alpha[t-1][s - choice], choice = 2 if x2 > x1 and x2 > x0,
                  else 1 if x1 > x0, else 0   (x_j = alpha[t-1][s - j]; x2 only at a label that
                  differs from the label before it)
    end state 2L if alpha[T-1][2L] > alpha[T-1][2L - 1], else 2L - 1
with e(t, s) = log_probs[t, label(s)], or for a star label max over the non-blank classes plus
star_penalty, rounded to ``star_dtype`` (the backends' accumulation dtype: fp32 for fp32 / fp16 /
bf16 input) as the backends round it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def viterbi_numpy(log_probs, targets: Sequence[int], blank: int = 0, star: Optional[int] = None,
                  star_penalty: float = -1.0, star_dtype=np.float64, dtype=np.float64):
    """log_probs [T, C] (array-like), targets [L] -> (path [T] int64, scores [T], best score); path
    None (and scores empty) when no path has a finite score (T < L + repeats included)."""
    lp = np.asarray(log_probs, dtype=dtype)
    n_t = lp.shape[0]
    targets = [int(x) for x in targets]
    labels = np.array([blank if s % 2 == 0 else targets[s // 2] for s in range(2 * len(targets) + 1)])
    n_s = len(labels)
    if n_t == 0:
        return (np.zeros(0, np.int64), np.zeros(0, dtype), 0.0) if not targets else (None, np.zeros(0, dtype), -np.inf)
    star_em = np.where(np.arange(lp.shape[1]) == blank, -np.inf, lp).max(1).astype(star_dtype)
    star_em = (star_em + star_dtype(star_penalty)).astype(dtype)
    wild = labels == star if star is not None else np.zeros(n_s, bool)
    em = np.where(wild[None, :], star_em[:, None], lp[:, np.where(wild, blank, labels)])  # [T, S]
    skip = np.zeros(n_s, bool)
    skip[3::2] = labels[3::2] != labels[1:-2:2]
    alpha = np.full(n_s, -np.inf, dtype)
    alpha[:2] = em[0, :2]
    choice = np.zeros((n_t, n_s), np.int8)
    neg = np.array([-np.inf, -np.inf], dtype)
    for t in range(1, n_t):
        shifted = np.concatenate([neg, alpha])  # alpha[t-1][s - 2 + i] at i
        x1 = shifted[1:n_s + 1]
        x2 = np.where(skip, shifted[:n_s], -np.inf)
        take2 = (x2 > x1) & (x2 > alpha)
        take1 = (x1 > alpha) & ~take2
        choice[t] = np.where(take2, 2, take1)
        alpha = np.where(take2, x2, np.where(take1, x1, alpha)) + em[t]
    state = n_s - 1 if n_s == 1 or alpha[n_s - 1] > alpha[n_s - 2] else n_s - 2
    best = alpha[state]
    if not np.isfinite(best):
        return None, np.zeros(0, dtype), best
    states = np.empty(n_t, np.int64)
    for t in range(n_t - 1, -1, -1):
        states[t] = state
        state -= int(choice[t, state])
    return labels[states].astype(np.int64), em[np.arange(n_t), states], best
