"""Batched CTC forced alignment: the most likely CTC path that emits exactly each target sequence.

Shapes: log_probs [B, T, C] (log-softmax of a CTC head: fp32 / fp16 / bf16 / fp64, any strides);
targets [B, L] integer label ids (row b's first target_lengths[b] entries are its labels; the rest
is ignored, e.g. -100 padding); input_lengths [B], target_lengths [B] (default T and L).
Returns alignment [B, T] int64 (the label of every frame on the path: a target label, the blank, or
the star id) and scores [B, T] (the log-probability of that label at that frame, as given; fp32,
fp64 for fp64 log_probs).

Semantics (torchaudio.functional.forced_align's, for every B, and batched): utterance b's 2L_b + 1
CTC states are blank, label 0, blank, label 1, ..., blank. A path starts in state 0 or 1 at frame 0,
ends in state 2L_b or 2L_b - 1 at frame T_b - 1, and in each frame stays, advances one state, or
skips the blank between two labels that differ (a repeat, "a a", needs a blank between, so an
utterance needs T_b >= L_b + repeats frames). The result maximises the sum of the path's frame
log-probs, accumulated in fp32 (fp64 for fp64 log_probs), with the recursion
    alpha[t][s] = log_prob(t, label(s)) + max(alpha[t-1][s], alpha[t-1][s-1], alpha[t-1][s-2])
Tie rule (torchaudio's CPU kernel's, bit for bit on fp32 input): a state takes the skip only when
it scores strictly more than both other predecessors, else the advance only when it scores
strictly more than the stay, else the stay; at the last frame the closing blank wins only when
strictly better than the last label. Read backwards from the last frame, a tie keeps the path in
its state, so every state is entered at the earliest frame the scores allow (equal scores
everywhere align target "a" over 3 frames as a a a), and an advance beats an equal skip (the blank
between two labels is kept). Where torchaudio differs:
its CUDA kernel stays on a skip = advance > stay tie and renormalises the scores every frame (near
ties may round differently); both its kernels prune the states that can no longer reach the end in
time, and on some targets with repeated labels that pruning drops states the best path needs, so
its path scores lower than ours (3 of 755 utterances of ``python -m bench.fuzz_forced_align
--torchaudio``); everywhere else the paths are identical.

log_probs must be finite or -inf on real frames (NaN and +inf raise). Frames t >= input_lengths[b]
hold alignment -1 and score 0. An infeasible utterance (too few frames for its labels and repeats,
or no path of finite score because log_probs hold -inf on every way to emit its targets) raises a
ValueError naming it with ``infeasible="raise"`` (default); with ``infeasible="mark"`` the others
are aligned and a third output feasible [B] bool is returned; an infeasible row holds -1 on every
frame and -inf scores on its real frames.

Star (``star=`` an id >= C, e.g. C): a wildcard label for what the model's vocabulary cannot spell
(unknown characters, a word missing from the vocabulary, noise between segments). Target entries
equal to ``star`` are labels like any other (a CTC state between blanks, two in a row need a blank
between them), whose log-prob at frame t is the best non-blank class's plus ``star_penalty``:
max_{c != blank} log_probs[t, c] + star_penalty, rounded once to the accumulation dtype. With
star_penalty = 0 it is whisperX's wildcard emission, which ties every real label on the frames
that label explains best, and the tie rule then gives those frames to whichever comes later; the
default -1 (the star counts e^-1 = 0.37 of the best class) leaves such frames to the real label and
gives the star the frames nothing else in the transcript explains (at least one). On the path star
labels appear as ``star`` in the alignment, with their star log-prob as the score.

Backends: "torch" (the reference: vectorised over the batch and the states, one Python loop over
frames over the rows still running; int8 back-pointers, one per state per frame;
any device, fp64 too) and "triton" (``forced_align_kernels.py``: one program per utterance runs the
whole recursion and the backtracking; fp32 / fp16 / bf16 read as given; L <= 4096; back-pointers
2 bits per state and frame, for L rounded up to a power of two (at least 32): at T = 90 000 frames
(30 min) and L = 1024 labels 46 MB per utterance). Both give the same path bit for bit. Batches whose
back-pointers would pass ``BACKPOINTER_BUDGET`` bytes run in groups of utterances. The output is not
differentiable. File order: reference -> contract / checks -> launchers -> torch.library op ->
backends -> entry point -> aot_specs.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional, Sequence, Union

import torch

from ..dispatch import Inputs, Op
from ._common import KERNEL_DTYPES, aot_spec, next_power_of_2

BACKPOINTER_BUDGET = 2 << 30  # bytes of back-pointers per launch; larger batches run in groups
MAX_TRITON_LABELS = 4096  # label pairs one Triton program holds
_TIME_CHUNK = 256  # frames whose emissions the torch backend gathers at once
_INFEASIBLE_MODES = ("raise", "mark")
_LOG_PROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def star_emissions(log_probs: torch.Tensor, blank: int, penalty: float) -> torch.Tensor:
    """[B, T] in the accumulation dtype: the best non-blank log-prob of each frame (-inf if C == 1)
    plus ``penalty``."""
    is_blank = torch.arange(log_probs.shape[-1], device=log_probs.device) == blank
    return log_probs.masked_fill(is_blank, float("-inf")).amax(-1).to(_accumulator(log_probs.dtype)) + penalty


# ------------------------------------------------------------------- torch reference (backend)

def viterbi_torch(log_probs, targets, frames: Sequence[int], labels: Sequence[int], blank: int,
                  star: Optional[int], star_em: Optional[torch.Tensor]):
    """(alignment [B, T] int64 with -1 past each length, scores [B, T], best [B] total path score)
    for checked inputs; ``frames`` / ``labels``: host lengths. Infeasible rows come back with their
    best score -inf (the caller marks them).

    Layout: the utterances sorted by length, longest first, and their state rows flat, row b at
    b * W + 2 + s (W = 2L + 3: two -inf pads, then the states), so that a frame's work is a few
    contiguous 1-D ops over the prefix of rows still running, the shifted reads are the same
    buffer one and two places back, and a finished row keeps its last alphas. Pads read -inf
    emissions and stay -inf; states past a row's 2L_b + 1 never reach its real states (a state
    reads only lower ones)."""
    bsz, n_t, n_c = log_probs.shape
    device, acc = log_probs.device, _accumulator(log_probs.dtype)
    neg_inf = float("-inf")
    order = sorted(range(bsz), key=lambda b: -frames[b])
    perm = torch.tensor(order, dtype=torch.long, device=device)
    s_frames = [frames[b] for b in order]
    n_labels = torch.tensor([labels[b] for b in order], dtype=torch.long, device=device)
    max_l = max(labels, default=0)
    n_s, width = 2 * max_l + 1, 2 * max_l + 3
    n_run = s_frames[0] if bsz else 0
    tg = targets.index_select(0, perm)[:, :max_l].long()
    state_label = torch.full((bsz, n_s), blank, dtype=torch.long, device=device)
    state_label[:, 1::2] = tg
    valid = torch.arange(n_s, device=device)[None, :] < (2 * n_labels + 1)[:, None]
    wild = (state_label == star) & valid if star is not None else None
    col = state_label.masked_fill(~valid if wild is None else wild | ~valid, blank)  # [B, S] classes to read
    skip = torch.zeros(bsz, n_s, dtype=torch.bool, device=device)
    skip[:, 3::2] = tg[:, 1:] != tg[:, :-1]

    def flat(x, fill):  # [B, S] -> [B * W] with ``fill`` at the pads
        out = torch.full((bsz, width), fill, dtype=x.dtype, device=device)
        out[:, 2:] = x
        return out.reshape(-1)

    skip_bias = flat(torch.zeros(bsz, n_s, dtype=acc, device=device).masked_fill_(~skip, neg_inf), 0.0)
    row_base = torch.arange(bsz, device=device) * width
    flat_col = flat(col + torch.arange(bsz, device=device)[:, None] * n_c, 0)  # into a frame's [B * C]
    pads = flat(torch.zeros(bsz, n_s, dtype=torch.bool, device=device), True)
    flat_wild = flat(wild, False) if wild is not None else None
    s_star = star_em.index_select(0, perm) if wild is not None else None

    def emissions(t0, t1):  # [t1 - t0, B * W]: the log-prob of each position's label, -inf at the pads
        chunk = log_probs[:, t0:t1].index_select(0, perm).transpose(0, 1).reshape(t1 - t0, bsz * n_c)
        e = chunk.index_select(1, flat_col).to(acc)
        if flat_wild is not None:
            e = torch.where(flat_wild, s_star[:, t0:t1].t()[:, :, None].expand(-1, -1, width).reshape(t1 - t0, -1), e)
        return e.masked_fill_(pads, neg_inf)

    n_pos = bsz * width
    alpha = torch.full((n_pos + 2,), neg_inf, dtype=acc, device=device)  # position p at alpha[2 + p]
    jump, best = (torch.empty(n_pos, dtype=acc, device=device) for _ in range(2))
    take1, take2 = (torch.empty(n_pos, dtype=torch.bool, device=device) for _ in range(2))
    backptr = torch.empty(max(n_run, 1), n_pos, dtype=torch.int8, device=device)  # take1 + 2 take2 (3: skip)
    n_active, active = [], bsz  # rows with frames > t: a prefix
    for t in range(n_run):
        while s_frames[active - 1] <= t:
            active -= 1
        n_active.append(active)
    first = flat((torch.arange(n_s, device=device) < 2).expand(bsz, n_s), False)
    for t in range(n_run):
        if t % _TIME_CHUNK == 0:
            e = emissions(t, min(t + _TIME_CHUNK, n_run))
        if t == 0:
            alpha[2:] = e[0].masked_fill(~first, neg_inf)
            continue
        m = n_active[t] * width
        stay, adv = alpha[2:2 + m], alpha[1:1 + m]
        # no NaN or +inf (checked): the tie rule's choice is max(...) with strict comparisons
        torch.add(alpha[:m], skip_bias[:m], out=jump[:m])
        torch.gt(adv, stay, out=take1[:m])
        torch.maximum(stay, adv, out=best[:m])
        torch.gt(jump[:m], best[:m], out=take2[:m])
        torch.maximum(best[:m], jump[:m], out=best[:m])
        torch.add(take1[:m].view(torch.int8), take2[:m].view(torch.int8), alpha=2, out=backptr[t, :m])
        torch.add(best[:m], e[t % _TIME_CHUNK, :m], out=stay)

    last_blank = 2 * n_labels
    final_blank = alpha[row_base + 2 + last_blank + 2]
    final_label = alpha[row_base + 2 + (last_blank - 1).clamp(min=0) + 2]
    end_blank = (final_blank > final_label) | (n_labels == 0)
    best_total = torch.where(end_blank, final_blank, final_label)
    no_frames = torch.tensor([f == 0 for f in s_frames], dtype=torch.bool, device=device)
    best_total = torch.where(no_frames, torch.where(n_labels == 0, 0.0, neg_inf).to(acc), best_total)
    state = torch.where(end_blank, last_blank, last_blank - 1)
    frames_dev = torch.tensor(s_frames, dtype=torch.long, device=device)
    states = torch.zeros(n_run, bsz, dtype=torch.long, device=device)
    for t in range(n_run - 1, -1, -1):
        states[t] = state
        if t:
            step = backptr[t].index_select(0, row_base + 2 + state).long().clamp_(max=2)
            state = state - step * (frames_dev > t)
    states = states.t()  # [B, T_run], sorted rows
    unsort = torch.empty_like(perm)
    unsort[perm] = torch.arange(bsz, device=device)
    path_label = state_label.gather(1, states).index_select(0, unsort)
    path_col = col.gather(1, states).index_select(0, unsort)
    real = torch.arange(n_run, device=device)[None, :] < torch.tensor(frames, device=device)[:, None]
    path_scores = log_probs[:, :n_run].gather(2, path_col[..., None]).squeeze(2).to(acc)
    if wild is not None:
        path_scores = torch.where(wild.gather(1, states).index_select(0, unsort), star_em[:, :n_run], path_scores)
    alignment = torch.full((bsz, n_t), -1, dtype=torch.long, device=device)
    scores = torch.zeros(bsz, n_t, dtype=acc, device=device)
    alignment[:, :n_run] = path_label.masked_fill(~real, -1)
    scores[:, :n_run] = path_scores.masked_fill(~real, 0.0)
    return alignment, scores, best_total.index_select(0, unsort)


# ---------------------------------------------------------------------------- input contract

def _lengths(value, name: str, batch: int, default: int, device) -> torch.Tensor:
    """A [B] int64 tensor on ``device`` from a tensor or a sequence of ints (None: ``default``)."""
    if value is None:
        return torch.full((batch,), default, dtype=torch.long, device=device)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.tensor([operator.index(v) for v in value], dtype=torch.long)
        except TypeError:
            raise TypeError(f"forced_align: {name} must be a tensor or a sequence of ints, got {value!r}") from None
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"forced_align: {name} must hold integers, got {value.dtype}")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"forced_align: {name} must be [batch] = [{batch}], got shape {tuple(value.shape)}")
    if value.device != device and value.device.type != "cpu":
        raise ValueError(f"forced_align: {name} is on {value.device}, log_probs on {device}")
    return value.to(device=device, dtype=torch.long)


def check_forced_align_inputs(log_probs, targets, input_lengths, target_lengths, blank, star, star_penalty,
                              infeasible):
    """Shape / dtype / device checks that need no data; returns the two lengths as [B] int64 tensors."""
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 3:
        got = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
        raise ValueError(f"forced_align: log_probs must be [batch, frames, classes], got {got}")
    if log_probs.dtype not in _LOG_PROB_DTYPES:
        raise TypeError(f"forced_align: log_probs must be fp32, fp16, bf16 or fp64, got {log_probs.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError("forced_align: targets must be [batch, labels], got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"forced_align: targets must hold integer label ids, got {targets.dtype}")
    bsz, n_t, n_c = log_probs.shape
    if targets.shape[0] != bsz:
        raise ValueError(f"forced_align: targets has {targets.shape[0]} rows, log_probs {bsz}")
    if targets.device != log_probs.device:
        raise ValueError(f"forced_align: targets on {targets.device}, log_probs on {log_probs.device}")
    if isinstance(blank, bool) or not isinstance(blank, int) or not 0 <= blank < n_c:
        raise ValueError(f"forced_align: blank must be a class of log_probs (an int in [0, {n_c})), got {blank!r}")
    if star is not None and (isinstance(star, bool) or not isinstance(star, int) or star < n_c):
        raise ValueError(f"forced_align: star must be None or an id >= the {n_c} classes (e.g. {n_c}), so that it "
                         f"names no class of log_probs, got {star!r}")
    if isinstance(star_penalty, bool) or not isinstance(star_penalty, (int, float)) or \
            not -math.inf < star_penalty <= 0:
        raise ValueError(f"forced_align: star_penalty must be a finite number <= 0, got {star_penalty!r}")
    if infeasible not in _INFEASIBLE_MODES:
        raise ValueError(f"forced_align: infeasible must be one of {_INFEASIBLE_MODES}, got {infeasible!r}")
    return (_lengths(input_lengths, "input_lengths", bsz, n_t, log_probs.device),
            _lengths(target_lengths, "target_lengths", bsz, targets.shape[1], log_probs.device))


def _first(mask_row) -> int:
    return mask_row.nonzero()[0].item()


def check_values(log_probs, targets, input_lengths, target_lengths, blank, star):
    """The checks that read the data (one host sync); returns the host lengths (frames, labels)."""
    bsz, n_t, n_c = log_probs.shape
    n_l = targets.shape[1]
    in_label = torch.arange(n_l, device=targets.device)[None, :] < target_lengths[:, None]
    ids = targets.long()
    is_blank = (ids == blank) & in_label
    bad = ((ids < 0) | (ids >= n_c)) & in_label
    if star is not None:
        bad &= ids != star
    # NaN and +inf (no log-prob) on real frames: one pass over log_probs, in the same host sync
    real = torch.arange(n_t, device=log_probs.device)[None, :] < input_lengths[:, None]
    not_log_prob = ~(log_probs < math.inf) & real[..., None]
    flags = [is_blank.any(1), bad.any(1), not_log_prob.flatten(1).any(1)]
    host = torch.cat([input_lengths, target_lengths, *(f.long() for f in flags)]).tolist()
    frames, labels, blanks, bads, nans = (host[i * bsz:(i + 1) * bsz] for i in range(5))
    for name, values, high, what in (("input_lengths", frames, n_t, "frames"),
                                     ("target_lengths", labels, n_l, "columns")):
        for b, v in enumerate(values):
            if not 0 <= v <= high:
                raise ValueError(f"forced_align: {name}[{b}] = {v} is outside [0, {high}] (the {high} {what} given)")
    for b in range(bsz):
        if nans[b]:
            t, c = not_log_prob[b].nonzero()[0].tolist()
            raise ValueError(f"forced_align: log_probs[{b}, {t}, {c}] = {log_probs[b, t, c].item()}: log-probs must be "
                             "finite or -inf on the real frames")
        if blanks[b]:
            i = _first(is_blank[b])
            raise ValueError(f"forced_align: targets[{b}, {i}] is the blank id {blank}: targets hold labels only "
                             "(the alignment puts the blanks in)")
        if bads[b]:
            i = _first(bad[b])
            star_note = f" nor the star id {star}" if star is not None else ""
            raise ValueError(f"forced_align: targets[{b}, {i}] = {ids[b, i].item()} is no class of log_probs "
                             f"(0 <= label < {n_c}){star_note}")
    return frames, labels


def _infeasible_message(targets, frames, labels, rows) -> str:
    parts = []
    for b in rows[:5]:
        row = targets[b, :labels[b]].tolist()
        repeats = sum(x == y for x, y in zip(row, row[1:]))
        need = labels[b] + repeats
        if frames[b] < need:
            parts.append(f"utterance {b} has {frames[b]} frames (input_lengths[{b}]) for {labels[b]} labels with "
                         f"{repeats} repeats, which need at least {need} (a blank separates each repeat)")
        else:
            parts.append(f"every path of utterance {b} scores -inf (log_probs hold -inf on every way to emit its "
                         "targets)")
    more = f"; and {len(rows) - 5} more" if len(rows) > 5 else ""
    return (f"forced_align: no alignment for utterance(s) {rows[:5]}{'...' if len(rows) > 5 else ''}: "
            + "; ".join(parts) + more + ". Pass infeasible='mark' to align the others and mark these.")


def utterance_groups(frames: Sequence[int], bytes_per_frame: int, padded: bool, budget: int):
    """Consecutive ranges of utterances whose back-pointers fit ``budget`` bytes (one utterance at
    least): ``padded`` groups cost len x max(frames) frames (the torch backend), others sum(frames)."""
    groups, start, total, longest = [], 0, 0, 0
    for b, f in enumerate(frames):
        n_total, n_longest = total + f, max(longest, f)
        cost = (b - start + 1) * n_longest if padded else n_total
        if b > start and cost * bytes_per_frame > budget:
            groups.append(range(start, b))
            start, n_total, n_longest = b, f, f
        total, longest = n_total, n_longest
    groups.append(range(start, len(frames)))
    return groups


# ------------------------------------------------------------------------------ Triton launcher

def _kernels():
    from . import forced_align_kernels

    return forced_align_kernels


def _block_labels(labels: Sequence[int]) -> int:
    return max(32, next_power_of_2(max(labels, default=0)))


def viterbi_triton(log_probs, targets, frames: Sequence[int], labels: Sequence[int], blank: int,
                   star: Optional[int], star_em: Optional[torch.Tensor]):
    """``viterbi_torch``'s outputs from one launch of the Triton kernel (one program per utterance)."""
    bsz, n_t, _ = log_probs.shape
    device = log_probs.device
    block_l = _block_labels(labels)
    words = block_l // 8
    starts, total = [], 0
    for f in frames:
        starts.append(total)
        total += f * words
    backptr = torch.empty(max(total, 1), dtype=torch.int32, device=device)
    scratch = torch.empty(bsz, 2 * (2 * block_l + 2), dtype=torch.float32, device=device)
    alignment = torch.full((bsz, n_t), -1, dtype=torch.long, device=device)
    scores = torch.zeros(bsz, n_t, dtype=torch.float32, device=device)
    best = torch.empty(bsz, dtype=torch.float32, device=device)
    tgt = targets.long().contiguous() if targets.shape[1] else targets.new_zeros(bsz, 1, dtype=torch.long)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    _kernels()._forced_align_kernel[(bsz,)](
        log_probs, star_em if star_em is not None else scores, tgt, as_long(frames), as_long(labels),
        backptr, as_long(starts), scratch, alignment, scores, best, *log_probs.stride(), tgt.stride(0), n_t,
        blank, star if star is not None else 0, HAS_STAR=star is not None, BLOCK_L=block_l, BLOCK_T=128,
        num_warps=_num_warps(block_l))
    return alignment, scores, best


def _num_warps(block_l: int) -> int:
    return max(1, min(16, block_l // 256))  # 8 states of a row per thread at 1024 labels and up


_BACKENDS = {"torch": (viterbi_torch, lambda block, n_s: n_s, True),
             "triton": (viterbi_triton, lambda block, n_s: 4 * (block // 8), False)}


# ------------------------------------------------------------------ torch.library op (compile-safe)

@torch.library.custom_op("unispeech_kernels::forced_align", mutates_args=(),
                         schema="(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
                                "int blank, int? star, float star_penalty, bool raise_infeasible, str backend) "
                                "-> (Tensor, Tensor, Tensor)")
def forced_align_op(log_probs, targets, input_lengths, target_lengths, blank, star, star_penalty, raise_infeasible,
                    backend):
    """(alignment [B, T] int64, scores [B, T], feasible [B] bool) by ``backend`` ("torch" / "triton")."""
    frames, labels = check_values(log_probs, targets, input_lengths, target_lengths, blank, star)
    bsz, n_t, _ = log_probs.shape
    device = log_probs.device
    run, frame_bytes, padded = _BACKENDS[backend]
    star_em = star_emissions(log_probs, blank, star_penalty) if star is not None else None
    alignment = torch.full((bsz, n_t), -1, dtype=torch.long, device=device)
    scores = torch.zeros(bsz, n_t, dtype=_accumulator(log_probs.dtype), device=device)
    best = torch.empty(bsz, dtype=scores.dtype, device=device)
    per_frame = frame_bytes(_block_labels(labels), 2 * max(labels, default=0) + 1)
    for rows in utterance_groups(frames, per_frame, padded, BACKPOINTER_BUDGET) if bsz and n_t else ():
        part = slice(rows.start, rows.stop)
        a, s, p = run(log_probs[part], targets[part], frames[part], labels[part], blank, star,
                      star_em[part] if star_em is not None else None)
        alignment[part], scores[part], best[part] = a, s, p
    if not n_t:  # no frames: only empty targets align
        best = torch.where(target_lengths == 0, 0.0, float("-inf")).to(scores.dtype)
    feasible = torch.isfinite(best)
    real = torch.arange(n_t, device=device)[None, :] < input_lengths[:, None]
    alignment.masked_fill_(~feasible[:, None], -1)
    scores.masked_fill_(~feasible[:, None] & real, float("-inf"))
    if raise_infeasible and bsz:
        rows = (~feasible).nonzero().flatten().tolist()
        if rows:
            raise ValueError(_infeasible_message(targets, frames, labels, rows))
    return alignment, scores, feasible


@forced_align_op.register_fake
def _(log_probs, targets, input_lengths, target_lengths, blank, star, star_penalty, raise_infeasible, backend):
    bsz, n_t, _ = log_probs.shape
    return (log_probs.new_empty((bsz, n_t), dtype=torch.long),
            log_probs.new_empty((bsz, n_t), dtype=_accumulator(log_probs.dtype)),
            log_probs.new_empty((bsz,), dtype=torch.bool))


# ------------------------------------------------------------------------------------ backends

@dataclasses.dataclass(frozen=True)
class ForcedAlignInputs(Inputs):
    log_probs: torch.Tensor  # [B, T, C]
    targets: torch.Tensor  # [B, L] int
    input_lengths: torch.Tensor  # [B] int64, checked
    target_lengths: torch.Tensor  # [B] int64, checked
    blank: int
    star: Optional[int]
    star_penalty: float
    raise_infeasible: bool

    @property
    def tensors(self):
        return self.log_probs, self.targets, self.input_lengths, self.target_lengths

    @property
    def float_tensors(self):
        return (self.log_probs,)

    @property
    def features(self):
        return frozenset()  # the alignment is not differentiable: no backward to support

    @property
    def sizes(self):
        _, n_t, n_c = self.log_probs.shape
        return {"labels": self.targets.shape[1],
                "elements one utterance spans (int32 offsets)":
                    (n_t - 1) * self.log_probs.stride(1) + (n_c - 1) * self.log_probs.stride(2) + 1}

    def run(self, backend: str):
        return forced_align_op(*self.tensors, self.blank, self.star, self.star_penalty, self.raise_infeasible,
                               backend)


forced_align_dispatch = Op("forced_align")


@forced_align_dispatch.backend("torch")
def forced_align_torch(inputs: ForcedAlignInputs):
    return inputs.run("torch")


@forced_align_dispatch.backend("triton", runtime="triton", dtypes=KERNEL_DTYPES,
                               limits=(("labels", MAX_TRITON_LABELS),
                                       ("elements one utterance spans (int32 offsets)", 2 ** 31 - 1)))
def forced_align_triton(inputs: ForcedAlignInputs):
    return inputs.run("triton")


# ---------------------------------------------------------------------------------- entry point

def forced_align(log_probs: torch.Tensor, targets: torch.Tensor,
                 input_lengths: Union[torch.Tensor, Sequence[int], None] = None,
                 target_lengths: Union[torch.Tensor, Sequence[int], None] = None, blank: int = 0,
                 star: Optional[int] = None, *, star_penalty: float = -1.0, infeasible: str = "raise",
                 backend: Optional[str] = None):
    """The most likely CTC alignment of each utterance (see the module docstring): returns
    (alignment [B, T] int64, scores [B, T]), plus feasible [B] bool with ``infeasible="mark"``.
    ``backend``: None (Triton on CUDA and under TRITON_INTERPRET=1, else torch), "triton" or "torch"."""
    input_lengths, target_lengths = check_forced_align_inputs(log_probs, targets, input_lengths, target_lengths,
                                                              blank, star, star_penalty, infeasible)
    inputs = ForcedAlignInputs(log_probs, targets, input_lengths, target_lengths, blank, star, float(star_penalty),
                               infeasible == "raise")
    alignment, scores, feasible = forced_align_dispatch(inputs, backend)
    return (alignment, scores) if infeasible == "raise" else (alignment, scores, feasible)


@forced_align_dispatch.example
def _example(device, dtype):
    """Two utterances of 499 and 249 frames (10 s and 5 s), vocab 32, 15 characters per second."""
    log_probs = torch.empty(2, 499, 32, device=device, dtype=dtype)
    targets = torch.ones(2, 150, dtype=torch.long, device=device)
    lengths = (torch.tensor([499, 249], device=device), torch.tensor([150, 75], device=device))
    return ForcedAlignInputs(log_probs, targets, *lengths, 0, None, -1.0, True)


# ------------------------------------------------------------------- ahead-of-time compile specs

def aot_specs():
    """The kernel at label blocks 128 (a 10 s utterance), 1024 (the design limit of a 30 s segment
    of fast speech) and 4096 (the largest), bf16, and fp32 with a star, for the compile check."""
    specs, kernel = [], _kernels()._forced_align_kernel
    for elem, block_l, has_star in (("bf16", 128, False), ("bf16", 1024, False), ("fp32", 1024, True),
                                    ("bf16", 4096, False)):
        sig = {"lp_ptr": f"*{elem}", "star_ptr": "*fp32", "tgt_ptr": "*i64", "in_len_ptr": "*i64",
               "tgt_len_ptr": "*i64", "bp_ptr": "*i32", "bp_start_ptr": "*i64", "scratch_ptr": "*fp32",
               "align_ptr": "*i64", "score_ptr": "*fp32", "best_ptr": "*fp32", "stride_lb": "i32",
               "stride_lt": "i32", "stride_tb": "i32", "T": "i32", "blank": "i32", "star": "i32"}
        constexprs = dict(stride_lc=1, HAS_STAR=has_star, BLOCK_L=block_l, BLOCK_T=128)
        specs.append(aot_spec(f"forced_align_{elem}_l{block_l}" + "_star" * has_star, kernel, sig,
                              constexprs, _num_warps(block_l)))
    return specs
