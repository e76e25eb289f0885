"""Datasets for the recipes: manifests or folders -> checked utterances -> padded batches.

Sources (``read_utterances``):
* a TSV manifest: ``audio_path<TAB>transcript[<TAB>phonemes]`` per line (a line without a tab is
  unlabeled audio); blank lines and lines starting with ``#`` are skipped;
* a JSONL manifest (.jsonl / .json): ``{"audio": path, "text": ..., "phonemes": "p1 p2 ..."}``;
* a folder: every ``*.wav`` (recursively), its transcript in the ``.txt`` of the same stem.
Relative audio paths are relative to the manifest's folder. Phonemes are space-separated tokens.

Every utterance is checked before training starts (``check_utterances``): a missing or unreadable
audio file, an empty transcript, characters outside the vocabulary, a sample rate other than the
model's when resampling is off, audio too short for the model (or longer than the limit), a
transcript longer than CTC can align with the audio's frames. Each problem is one message naming
the manifest line (or the file), and either stops the run or skips the utterance, as
``on_bad_input`` says. A file whose header reads but whose samples do not decode fails later, in
the data loader, with the same kind of message.

Batches (``collate``): input_values [B, L] float32, each utterance normalised to zero mean and unit
variance over its own samples (as the processor's feature extractor does), right-padded with zeros;
attention_mask [B, L] int64; labels [B, N] int64 padded with -100 (None for unlabeled data);
indices [B] (positions in the utterance list).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from unispeech_kernels.ops.feature_encoder import receptive_field

from ..feature_extraction import zero_mean_unit_var
from .audio import RATE, AudioError, audio_info, read_audio, resampled_length

IGNORE_LABEL = -100
ON_BAD_INPUT = ("stop", "skip")


class BadInput(ValueError):
    """An utterance the recipe cannot train on; the message names its manifest line or file."""


@dataclass
class Utterance:
    where: str  # "train.tsv line 7", or the audio file of a folder source: named in every message
    path: Optional[str]  # audio file (None: ``audio`` holds the samples)
    text: Optional[str] = None
    phonemes: Optional[List[str]] = None
    samples: int = 0  # at the model's rate, known after checking
    labels: Optional[List[int]] = None  # set by checking, from the recipe's labeler
    audio: Optional[np.ndarray] = None  # in-memory samples at the model's rate
    problem: Optional[str] = None  # a parse error of its manifest line


def _phonemes(value) -> Optional[List[str]]:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else str(value).split()


def _tsv_line(where: str, line: str, folder: str) -> Utterance:
    fields = line.split("\t")
    path = os.path.join(folder, fields[0].strip())
    if len(fields) > 3:
        return Utterance(where, path, problem=f"{len(fields)} tab-separated fields, expected at most 3 "
                                              "(audio path, transcript, phonemes)")
    return Utterance(where, path, text=fields[1].strip() if len(fields) > 1 else None,
                     phonemes=_phonemes(fields[2]) if len(fields) > 2 else None)


def _jsonl_line(where: str, line: str, folder: str) -> Utterance:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return Utterance(where, None, problem=f"not valid JSON ({e})")
    if not isinstance(record, dict) or not isinstance(record.get("audio"), str):
        return Utterance(where, None, problem='needs an object with an "audio" path')
    text = record.get("text")
    return Utterance(where, os.path.join(folder, record["audio"]), text=None if text is None else str(text).strip(),
                     phonemes=_phonemes(record.get("phonemes")))


def read_utterances(source: str) -> List[Utterance]:
    """The utterances a manifest or a folder lists, unchecked (see the module docstring)."""
    if os.path.isdir(source):
        found = []
        for root, _, names in os.walk(source):
            found += [os.path.join(root, n) for n in names if n.lower().endswith(".wav")]
        if not found:
            raise BadInput(f"no .wav files in {source}")
        utterances = []
        for path in sorted(found):
            txt = os.path.splitext(path)[0] + ".txt"
            text = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else None
            utterances.append(Utterance(path, path, text=text))
        return utterances
    if not os.path.isfile(source):
        raise BadInput(f"no manifest or folder {source}")
    parse = _jsonl_line if source.endswith((".jsonl", ".json")) else _tsv_line
    folder = os.path.dirname(os.path.abspath(source))
    utterances = []
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip() and not line.startswith("#"):
                utterances.append(parse(f"{source} line {number}", line, folder))
    if not utterances:
        raise BadInput(f"{source} lists no utterance")
    return utterances


def samples_for_frames(config, frames: int) -> int:
    """The fewest samples from which the model's conv stack makes ``frames`` frames (>= 1)."""
    stride = 1
    for s in config.conv_stride:
        stride *= s
    return receptive_field(config.conv_kernel, config.conv_stride) + (max(frames, 1) - 1) * stride


def ctc_frames_needed(labels: Sequence[int]) -> int:
    """Frames CTC needs for a label sequence: one per label plus a blank between repeats."""
    return len(labels) + sum(a == b for a, b in zip(labels, labels[1:]))


@dataclass
class Checks:
    """What a recipe's model needs of an utterance."""
    frames: Callable[[int], int]  # samples -> frames of the model's conv stack
    min_samples: int  # shortest usable audio
    labeler: Optional[Callable[[Utterance], List[int]]] = None  # ids, or BadInput; None: unlabeled
    max_samples: Optional[int] = None  # longest (None: no limit)
    resample: bool = True  # False: another sample rate than the model's is bad input


def _check(u: Utterance, checks: Checks) -> None:
    """Fill u.samples and u.labels, or raise BadInput naming the problem."""
    if u.problem:
        raise BadInput(u.problem)
    if u.audio is not None:
        u.samples = len(u.audio)
    else:
        if not os.path.isfile(u.path):
            raise BadInput(f"audio file {u.path} does not exist")
        try:
            frames, rate = audio_info(u.path)
        except AudioError as e:
            raise BadInput(str(e)) from None
        if rate != RATE and not checks.resample:
            raise BadInput(f"{u.path} is sampled at {rate} Hz, the model expects {RATE} Hz "
                           "(resampling is off: drop --no-resample to resample it)")
        u.samples = resampled_length(frames, rate)
    if u.samples < checks.min_samples:
        raise BadInput(f"audio of {u.samples} samples ({u.samples / RATE:.3f} s) is shorter than the "
                       f"{checks.min_samples} samples the model needs")
    if checks.max_samples is not None and u.samples > checks.max_samples:
        raise BadInput(f"audio of {u.samples / RATE:.2f} s is longer than the limit of "
                       f"{checks.max_samples / RATE:.2f} s")
    if checks.labeler is None:
        return
    labels = checks.labeler(u)
    needed, frames = ctc_frames_needed(labels), checks.frames(u.samples)
    if needed > frames:
        raise BadInput(f"the transcript needs {needed} CTC frames but the audio gives only {frames}")
    u.labels = labels


def check_utterances(utterances: List[Utterance], checks: Checks, on_bad_input: str = "stop",
                     log: Callable[[str], None] = print) -> List[Utterance]:
    """The usable utterances. A bad one raises BadInput (``on_bad_input="stop"``) or is logged and
    left out ("skip"); none usable at all raises BadInput."""
    if on_bad_input not in ON_BAD_INPUT:
        raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
    kept = []
    for u in utterances:
        try:
            _check(u, checks)
        except BadInput as e:
            if on_bad_input == "stop":
                raise BadInput(f"{u.where}: {e} (--on-bad-input skip leaves such utterances out)") from None
            log(f"skipping {u.where}: {e}")
            continue
        kept.append(u)
    if not kept:
        raise BadInput(f"none of the {len(utterances)} utterances is usable")
    if len(kept) < len(utterances):
        log(f"skipped {len(utterances) - len(kept)} of {len(utterances)} utterances")
    return kept


@dataclass
class Batch:
    indices: torch.Tensor  # [B] positions in the utterance list
    input_values: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: Optional[torch.Tensor] = None  # [B, N], -100 padded
    counted: Optional[torch.Tensor] = field(default=None)  # [B] bool: False for evaluation padding

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.indices, move(self.input_values), move(self.attention_mask), move(self.labels),
                     self.counted)


class UtteranceDataset(torch.utils.data.Dataset):
    """Items by key (index, epoch, counted): the normalised audio and its labels. Unlabeled audio
    longer than ``crop_samples`` is cut at a random offset drawn from (seed, epoch, index), so a
    crop does not depend on the worker, the rank or a resume."""

    def __init__(self, utterances: List[Utterance], crop_samples: Optional[int] = None, seed: int = 0):
        self.utterances, self.crop_samples, self.seed = utterances, crop_samples, seed

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, key: Tuple[int, int, bool]):
        index, epoch, counted = key
        u = self.utterances[index]
        try:
            audio = u.audio if u.audio is not None else read_audio(u.path)
        except AudioError as e:
            raise BadInput(f"{u.where}: {e}") from None
        if self.crop_samples is not None and u.labels is None and len(audio) > self.crop_samples:
            start = int(np.random.default_rng([self.seed, epoch, index]).integers(len(audio) - self.crop_samples + 1))
            audio = audio[start:start + self.crop_samples]
        return index, zero_mean_unit_var(audio.astype(np.float32)), u.labels, counted


def collate(items) -> Batch:
    """Dataset items -> one right-padded Batch (see the module docstring)."""
    width = max(len(audio) for _, audio, _, _ in items)
    x = torch.zeros(len(items), width)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for i, (_, audio, _, _) in enumerate(items):
        x[i, :len(audio)] = torch.from_numpy(audio)
        mask[i, :len(audio)] = 1
    labels = None
    if all(lab is not None for _, _, lab, _ in items):
        labels = torch.full((len(items), max(len(lab) for _, _, lab, _ in items)), IGNORE_LABEL, dtype=torch.long)
        for i, (_, _, lab, _) in enumerate(items):
            labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return Batch(torch.tensor([i for i, _, _, _ in items]), x, mask, labels,
                 torch.tensor([c for _, _, _, c in items], dtype=torch.bool))


SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0-3 of a built character vocabulary (0 = CTC blank)
WORD_DELIMITER = "|"
PHONEME_BLANK = "<blank>"


def character_vocabulary(utterances: List[Utterance]) -> dict:
    """{token: id} in transformers' layout: <pad> <s> </s> <unk>, "|" (the space), then every other
    character of the transcripts, sorted."""
    chars = sorted({c for u in utterances if u.text for c in u.text} - {" "})
    return {t: i for i, t in enumerate(SPECIALS + (WORD_DELIMITER,) + tuple(chars))}


def phoneme_vocabulary(utterances: List[Utterance]) -> dict:
    """{phoneme: id}: the CTC blank first (id 0), then every phoneme of the utterances, sorted."""
    phones = sorted({p for u in utterances if u.phonemes for p in u.phonemes})
    return {t: i for i, t in enumerate((PHONEME_BLANK,) + tuple(phones))}


def character_labeler(tokenizer) -> Callable[[Utterance], List[int]]:
    """Transcript -> CTC ids with ``tokenizer`` (a UniSpeechCTCTokenizer); an empty transcript or a
    character the vocabulary lacks is BadInput (the tokenizer would map it to <unk>)."""
    vocab = tokenizer.get_vocab()

    def labels(u: Utterance) -> List[int]:
        if not u.text:
            raise BadInput("empty transcript" if u.text is not None else "no transcript")
        tokens = tokenizer.tokenize(u.text)
        unknown = sorted({t for t in tokens if t not in vocab})
        if unknown:
            raise BadInput("characters outside the vocabulary: " + ", ".join(repr(t) for t in unknown))
        return tokenizer.convert_tokens_to_ids(tokens)
    return labels


def phoneme_labeler(vocab: dict) -> Callable[[Utterance], List[int]]:
    """Phonemes -> CTC ids of ``vocab`` (phoneme_vocabulary's); none, or one outside it, is BadInput."""
    def labels(u: Utterance) -> List[int]:
        if not u.phonemes:
            raise BadInput("no phonemes")
        unknown = sorted({p for p in u.phonemes if p not in vocab or p == PHONEME_BLANK})
        if unknown:
            raise BadInput("phonemes outside the vocabulary: " + ", ".join(repr(p) for p in unknown))
        return [vocab[p] for p in u.phonemes]
    return labels
