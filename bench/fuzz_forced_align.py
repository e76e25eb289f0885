"""Fuzz target of unispeech_kernels.forced_align: random batches against the float64 numpy recursion
(bench/align_reference.py), both backends.

    python -m bench.fuzz_forced_align --cases 1000 [--seed 0] [--triton-every 1] [--torchaudio]

Each case is a padded batch (1-4 utterances of mixed lengths, 0-12 labels drawn from few classes so
that repeats are common, some with the star id and a star penalty, frames from one short of the minimum to ~15 over,
so infeasible rows occur; targets padded with -100; int32 or int64), log-probs in fp32 / fp16 /
bf16 / fp64, sometimes non-contiguous, with all-blank stretches and sometimes -inf entries. Half
the cases are quantised to multiples of 1/16 in [-16, 0]: every partial sum is exact in fp32, so
exact ties are everywhere and the path must equal the reference's bit for bit. The other half are
continuous: paths must equal the fp64 reference's too, except where two paths' scores are closer
than fp32 accumulation can tell apart (at most 2 T eps32 |best| apart): such a difference is
counted as a rounding tie, not a mismatch, when the returned path is a valid one of that score.
fp64 inputs on the torch backend accumulate in fp64: exact equality, always. Triton (under
TRITON_INTERPRET=1 on a CPU: slow, so every ``triton_every``-th case) must equal the torch backend
exactly. ``--torchaudio`` also compares torchaudio.functional.forced_align (run it with a python
that has torchaudio) on every fp32 / fp64 utterance without a star that has labels (see
``compare_to_torchaudio``).
Prints the number of cases, utterances and mismatches; exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports a @triton.jit kernel

from bench.align_reference import viterbi_numpy  # noqa: E402
from unispeech_kernels.ops.forced_align import forced_align  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PAD_LABEL = -100
EPS32 = float(torch.finfo(torch.float32).eps)


def random_case(gen: torch.Generator, device) -> dict:
    """One random batch (see the module docstring)."""
    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    def chance(p):
        return float(torch.rand((), generator=gen)) < p

    bsz, n_c = randint(1, 4), randint(2, 8)
    blank = randint(0, n_c - 1)
    star = n_c + randint(0, 2) if chance(0.3) else None
    star_penalty = (0.0, -1.0, -0.5, -3.0625)[randint(0, 3)]
    classes = [c for c in range(n_c) if c != blank]
    rows, frames = [], []
    for _ in range(bsz):
        pool = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:randint(1, 3)]]
        row = [pool[randint(0, len(pool) - 1)] for _ in range(randint(0, 12))]
        if star is not None:
            row = [star if chance(0.2) else x for x in row]
        need = len(row) + sum(x == y for x, y in zip(row, row[1:]))
        frames.append(max(0, need + (randint(-1, 0) if chance(0.15) else randint(0, 15))))
        rows.append(row)
    n_t = max(frames) + randint(0, 3)
    logits = torch.randn(bsz, n_t, n_c, generator=gen, dtype=torch.float64) * 3
    for b in range(bsz):  # an all-blank stretch
        t0 = randint(0, n_t)
        logits[b, t0:t0 + randint(0, 8), blank] += 8
    lp = logits.log_softmax(-1)
    quantized = chance(0.5)
    if quantized:
        lp = (lp * 16).round().clamp(min=-256) / 16
    if chance(0.1):
        lp[torch.rand(lp.shape, generator=gen) < 0.05] = -math.inf
    dtype = DTYPES[randint(0, len(DTYPES) - 1)]
    lp = lp.to(dtype)
    if chance(0.3):  # non-contiguous: frames-major storage, or a slice of a wider class axis
        lp = lp.transpose(0, 1).contiguous().transpose(0, 1) if chance(0.5) else \
            torch.cat([lp, lp[..., :1]], -1)[..., :n_c]
    width = max((len(r) for r in rows), default=0) + randint(0, 2)
    targets = torch.full((bsz, width), PAD_LABEL, dtype=torch.int32 if chance(0.5) else torch.int64)
    for b, row in enumerate(rows):
        targets[b, :len(row)] = torch.tensor(row, dtype=targets.dtype)
    return dict(log_probs=lp.to(device), targets=targets.to(device), frames=frames, rows=rows, blank=blank,
                star=star, star_penalty=star_penalty, exact=quantized or dtype == torch.float64)


def run_backend(case, backend):
    return forced_align(case["log_probs"], case["targets"], case["frames"], [len(r) for r in case["rows"]],
                        case["blank"], case["star"], star_penalty=case["star_penalty"], infeasible="mark",
                        backend=backend)


def _is_ctc_path(path, row, blank) -> bool:
    """Does the frame labels ``path`` collapse (merge repeats, drop blanks) to ``row``, with a blank
    between repeated labels?"""
    out, prev = [], None
    for x in path:
        if x != prev and x != blank:
            out.append(x)
        prev = x
    return out == list(row)


def compare_to_reference(case, alignment, scores, feasible) -> tuple:
    """(mismatch lines, rounding ties) of one backend's outputs against the numpy reference."""
    problems, ties = [], 0
    lp = case["log_probs"].double().cpu().numpy()
    star_dtype = np.float64 if case["log_probs"].dtype == torch.float64 else np.float32
    for b, (row, n) in enumerate(zip(case["rows"], case["frames"])):
        path, ref_scores, best = viterbi_numpy(lp[b, :n], row, case["blank"], case["star"], case["star_penalty"],
                                               star_dtype)
        got = alignment[b].cpu().numpy()
        got_scores = scores[b].double().cpu().numpy()
        if bool(feasible[b]) != (path is not None):
            problems.append(f"utterance {b}: feasible {bool(feasible[b])}, reference {path is not None}")
            continue
        if path is None:
            if (got != -1).any() or not np.all(got_scores[:n] == -np.inf) or (got_scores[n:] != 0).any():
                problems.append(f"utterance {b}: an infeasible row must be -1 with -inf scores on its frames")
            continue
        if (got[n:] != -1).any() or (got_scores[n:] != 0).any():
            problems.append(f"utterance {b}: frames past its length must hold -1 and score 0")
        if np.array_equal(got[:n], path):
            if not np.array_equal(got_scores[:n], ref_scores):
                problems.append(f"utterance {b}: same path, different scores")
            continue
        total = got_scores[:n].sum()
        valid = _is_ctc_path(got[:n].tolist(), row, case["blank"])
        if not case["exact"] and valid and best - total <= 2 * n * EPS32 * abs(best) + 1e-12:
            ties += 1
        else:
            problems.append(f"utterance {b}: path {got[:n].tolist()} (score {total}) != reference {path.tolist()} "
                            f"(score {best})")
    return problems, ties


def compare_to_torchaudio(case, alignment, scores) -> tuple:
    """(mismatch lines, utterances compared, utterances where torchaudio's path scores lower) against
    torchaudio.functional.forced_align (CPU, one utterance at a time; fp32 / fp64 rows without a
    star that use every frame of the tensor and have labels). torchaudio prunes the states that can
    no longer reach the end in time; on some targets with repeated labels that pruning drops states
    the best path needs, and its path scores lower than ours (= the reference's): counted apart."""
    import torchaudio.functional as taf

    problems, compared, worse = [], 0, 0
    lp = case["log_probs"]
    if lp.dtype not in (torch.float32, torch.float64) or case["star"] is not None:
        return problems, compared, worse
    for b, (row, n) in enumerate(zip(case["rows"], case["frames"])):
        need = len(row) + sum(x == y for x, y in zip(row, row[1:]))
        if n < max(1, need) or not row or not torch.isfinite(scores[b, :n]).all():
            continue
        path, ta_scores = taf.forced_align(lp[b:b + 1, :n].contiguous().cpu(), torch.tensor([row], dtype=torch.int32),
                                           blank=case["blank"])
        compared += 1
        if torch.equal(path[0].long(), alignment[b, :n].cpu()) and \
                torch.equal(ta_scores[0].double(), scores[b, :n].double().cpu()):
            continue
        theirs, ours = ta_scores[0].double().sum().item(), scores[b, :n].double().sum().item()
        if _is_ctc_path(path[0].tolist(), row, case["blank"]) and theirs < ours:
            worse += 1
        else:
            problems.append(f"utterance {b}: torchaudio {path[0].tolist()} ({theirs}) != ours "
                            f"{alignment[b, :n].tolist()} ({ours})")
    return problems, compared, worse


def run(cases: int, seed: int = 0, triton_every: int = 1, torchaudio: bool = False, device="cpu") -> dict:
    """Counts of the fuzz run: cases, utterances, mismatches, rounding_ties, triton_cases, torchaudio
    utterances compared, and the first few mismatch lines."""
    gen = torch.Generator().manual_seed(seed)
    counts = dict(cases=0, utterances=0, mismatches=0, rounding_ties=0, triton_cases=0, torchaudio_utterances=0,
                  torchaudio_worse=0)
    lines = []
    for i in range(cases):
        case = random_case(gen, device)
        counts["cases"] += 1
        counts["utterances"] += len(case["rows"])
        outputs = run_backend(case, "torch")
        problems, ties = compare_to_reference(case, *outputs)
        counts["rounding_ties"] += ties
        if triton_every and i % triton_every == 0 and case["log_probs"].dtype != torch.float64:
            counts["triton_cases"] += 1
            for name, ours, theirs in zip(("alignment", "scores", "feasible"), run_backend(case, "triton"), outputs):
                if not torch.equal(ours, theirs.to(ours.dtype)):
                    problems.append(f"triton {name} != torch {name}")
        if torchaudio:
            ta_problems, compared, worse = compare_to_torchaudio(case, *outputs[:2])
            problems += ta_problems
            counts["torchaudio_utterances"] += compared
            counts["torchaudio_worse"] += worse
        counts["mismatches"] += len(problems)
        lines += [f"case {i}: {p}" for p in problems]
    return dict(counts, first_mismatches=lines[:10])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--triton-every", type=int, default=1, help="Triton on every n-th case (0: never)")
    parser.add_argument("--torchaudio", action="store_true", help="also compare torchaudio's forced_align")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    result = run(args.cases, args.seed, args.triton_every, args.torchaudio, device)
    print(f"fuzz_forced_align: {result['cases']} cases ({result['utterances']} utterances, "
          f"{result['triton_cases']} also on triton) on {device}, seed {args.seed}: {result['mismatches']} mismatches, "
          f"{result['rounding_ties']} fp32 rounding ties, {time.time() - start:.1f} s")
    if args.torchaudio:
        print(f"torchaudio: {result['torchaudio_utterances']} utterances compared, "
              f"{result['torchaudio_utterances'] - result['torchaudio_worse']} identical, "
              f"{result['torchaudio_worse']} where torchaudio's path scores lower than the best path")
    for line in result["first_mismatches"]:
        print("  " + line)
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
