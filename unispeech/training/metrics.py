"""Greedy CTC decoding and error rates (CER, WER) over a corpus."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions, each costing 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        current = [i]
        for j, h in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> Dict[str, int]:
    """Summed character and word edits and reference lengths; words split on whitespace,
    characters of the whitespace-normalised text (spaces included)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    counts = dict(char_edits=0, chars=0, word_edits=0, words=0)
    for ref, hyp in zip(references, hypotheses):
        ref_words, hyp_words = ref.split(), hyp.split()
        counts["char_edits"] += edit_distance(" ".join(ref_words), " ".join(hyp_words))
        counts["chars"] += len(" ".join(ref_words))
        counts["word_edits"] += edit_distance(ref_words, hyp_words)
        counts["words"] += len(ref_words)
    return counts


def error_rates(counts: Dict[str, float]) -> Dict[str, float]:
    """{"cer", "wer"}: edits / reference length, over the whole corpus."""
    return dict(cer=counts["char_edits"] / max(counts["chars"], 1), wer=counts["word_edits"] / max(counts["words"], 1))


def greedy_decode(logits: torch.Tensor, frames: torch.Tensor, tokenizer) -> List[str]:
    """[B, T, V] logits and [B] real frames -> texts: the argmax path with repeats merged, then
    blanks (the pad token) and other special tokens dropped. (The tokenizer's own
    ``skip_special_tokens=True`` drops blanks before merging, as transformers' does, which merges
    a letter repeated across a blank: "l <pad> l" would read "l".)"""
    special = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens
               if t != tokenizer.word_delimiter_token}
    texts = []
    for row, n in zip(logits.argmax(-1).cpu(), frames.tolist()):
        ids = torch.unique_consecutive(row[:n]).tolist()
        texts.append(tokenizer.decode([i for i in ids if i not in special], group_tokens=False))
    return texts
