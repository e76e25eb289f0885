"""Token and word timestamps from CTC forced alignment, and ``align``: audio + transcripts -> the time
of every character and word, for many segments in one batched model forward and one
``unispeech_kernels.forced_align`` call.

Transcripts are encoded with the processor's CTC tokenizer (ours or transformers'
Wav2Vec2CTCTokenizer): words are split on whitespace, each word is tokenised on its own (so a word's
text is exactly its transcript text), and the word delimiter ("|") goes between words when the
vocabulary has one. Tokens the vocabulary lacks (and any that would be the blank) become the star
label (``unknown="star"``: one star per run of such characters, a wildcard scored by
``forced_align``'s star rule; ``"drop"`` leaves them out).

Spans: the k-th run of non-blank frames on the path is the k-th target token (CTC puts a blank
between repeats), frames [start, end). A token's score is the mean over its frames of the
probability the model gave its label (exp of the frame log-probs); a word's is the mean over the
frames of its tokens. Times: frame * total conv stride (the product of config.conv_stride, 320 for
wav2vec2-family models) / sampling rate, plus the segment's start for segments of one long audio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

import unispeech_kernels
from unispeech_kernels.integrations.patching import PatchedModule

from .feature_extraction import as_utterances
from .modeling import UniSpeechPreTrainedModel


@dataclass
class TokenSpan:
    token: str        # the text it stands for: a vocabulary token, "|", or the characters of a star
    token_id: int     # vocabulary id, or the star id
    start: int        # first frame
    end: int          # one past the last frame
    score: float      # mean probability of the token over its frames
    start_time: float = 0.0  # seconds
    end_time: float = 0.0


@dataclass
class WordSpan:
    word: str
    start: int
    end: int
    score: float
    start_time: float
    end_time: float
    tokens: List[TokenSpan] = field(default_factory=list)


@dataclass
class SegmentAlignment:
    transcript: str
    start_time: float  # the segment's offset in its audio (0 for separate utterances)
    end_time: float
    words: List[WordSpan]
    tokens: List[TokenSpan]
    feasible: bool = True  # False: too short for its transcript (with infeasible="mark"): no spans


@dataclass
class EncodedTranscript:
    ids: List[int]          # target ids (vocabulary ids and the star id)
    texts: List[str]        # the text of each target
    word_of: List[int]      # the word each target belongs to; -1 for delimiters
    words: List[str]


def encode_transcript(tokenizer, text: str, star: int, unknown: str = "star") -> EncodedTranscript:
    """A transcript -> CTC targets through ``tokenizer`` (see the module docstring)."""
    if unknown not in ("star", "drop"):
        raise ValueError(f"unknown must be 'star' or 'drop', got {unknown!r}")
    vocab = tokenizer.get_vocab()
    blank = tokenizer.pad_token_id
    delimiter = vocab.get(tokenizer.word_delimiter_token) if tokenizer.word_delimiter_token else None
    out = EncodedTranscript([], [], [], text.split())
    for w, word in enumerate(out.words):
        if w and delimiter is not None:
            out.ids.append(delimiter)
            out.texts.append(tokenizer.word_delimiter_token)
            out.word_of.append(-1)
        for token in tokenizer.tokenize(word):
            token_id = vocab.get(token)
            if token_id is None or token_id == blank:
                if unknown == "drop":
                    continue
                if out.ids and out.ids[-1] == star and out.word_of[-1] == w:  # one star per run
                    out.texts[-1] += token
                    continue
                token_id = star
            out.ids.append(token_id)
            out.texts.append(token)
            out.word_of.append(w)
    return out


def token_spans(alignment: Sequence[int], scores: Sequence[float], encoded: EncodedTranscript, blank: int,
                seconds_per_frame: float, offset: float = 0.0) -> List[TokenSpan]:
    """One utterance's frame labels and log-prob scores (its real frames) -> a span per target."""
    alignment = np.asarray(alignment)
    probs = np.exp(np.asarray(scores, dtype=np.float64))
    on_label = alignment != blank
    starts = np.flatnonzero(on_label & np.r_[True, alignment[1:] != alignment[:-1]])
    ends = np.flatnonzero(on_label & np.r_[alignment[1:] != alignment[:-1], True]) + 1
    if len(starts) != len(encoded.ids) or not np.array_equal(alignment[starts], np.asarray(encoded.ids, dtype=int)):
        raise ValueError(f"the alignment's {len(starts)} label runs do not spell the {len(encoded.ids)} targets")
    return [TokenSpan(text, int(alignment[s]), int(s), int(e), float(probs[s:e].mean()),
                      offset + s * seconds_per_frame, offset + e * seconds_per_frame)
            for text, s, e in zip(encoded.texts, starts, ends)]


def word_spans(tokens: List[TokenSpan], encoded: EncodedTranscript) -> List[WordSpan]:
    """Group the token spans of one utterance into its words (delimiters left out)."""
    by_word: List[List[TokenSpan]] = [[] for _ in encoded.words]
    for span, w in zip(tokens, encoded.word_of):
        if w >= 0:
            by_word[w].append(span)
    out = []
    for word, spans in zip(encoded.words, by_word):
        if not spans:  # every character dropped (unknown="drop")
            continue
        frames = sum(s.end - s.start for s in spans)
        score = sum(s.score * (s.end - s.start) for s in spans) / frames
        out.append(WordSpan(word, spans[0].start, spans[-1].end, score, spans[0].start_time, spans[-1].end_time,
                            spans))
    return out


def _frame_stride(config) -> int:
    if getattr(config, "add_adapter", False):
        raise ValueError("align: models with an adapter after the conv feature encoder (config.add_adapter) change "
                         "the frame rate; they are not supported")
    return math.prod(config.conv_stride)


def _segments(audio, transcripts, segments, sampling_rate) -> Tuple[List[np.ndarray], List[float]]:
    """(waveforms, start times): separate utterances, or the ``segments`` of one long waveform."""
    if segments is None:
        waves = as_utterances(audio)
        if len(waves) != len(transcripts):
            raise ValueError(f"align: {len(waves)} utterances but {len(transcripts)} transcripts")
        return waves, [0.0] * len(waves)
    utterances = as_utterances(audio)
    if len(utterances) != 1:
        raise ValueError(f"align: with segments=, audio must be one waveform [samples], got {len(utterances)}")
    wave = utterances[0]
    if len(segments) != len(transcripts):
        raise ValueError(f"align: {len(segments)} segments but {len(transcripts)} transcripts")
    waves, starts = [], []
    for i, (start, end) in enumerate(segments):
        lo, hi = round(start * sampling_rate), round(end * sampling_rate)
        if not 0 <= lo < hi <= len(wave):
            raise ValueError(f"align: segment {i} ({start}, {end}) s is empty or outside the "
                             f"{len(wave) / sampling_rate:.3f} s of audio")
        waves.append(wave[lo:hi])
        starts.append(lo / sampling_rate)
    return waves, starts


@torch.inference_mode()
def emissions(model, processor, waves: List[np.ndarray], sampling_rate: int, batch_size: Optional[int] = None):
    """(log_probs [N, T, V] fp32 on the model's device, frames [N]) of the segments: the model runs
    on ``batch_size`` segments at a time (None: all in one forward), longest first. Our models and
    transformers' models accelerated by ``unispeech_kernels.patch_model`` always get the attention
    mask: each segment then computes as if alone (group-norm feature encoders included, unless
    ``batch_invariant_group_norm`` is off). Unpatched transformers models get it when their feature
    extractor returns one (transformers' advice for group-norm models such as wav2vec2-base is to
    pad with zeros and pass none, so padding shifts those models' emissions a little; batch_size=1
    avoids it)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    wants_mask = isinstance(model, UniSpeechPreTrainedModel) or any(
        isinstance(m, PatchedModule) for m in model.modules())
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
    step = batch_size or max(1, len(waves))
    samples = torch.tensor([len(w) for w in waves])
    frames = model._get_feat_extract_output_lengths(samples).long()
    log_probs = None
    for lo in range(0, len(order), step):
        rows = order[lo:lo + step]
        kwargs = dict(return_attention_mask=True) if wants_mask else {}
        batch = processor.feature_extractor([waves[i] for i in rows], sampling_rate=sampling_rate, padding=True,
                                            return_tensors="pt", **kwargs)
        mask = batch.get("attention_mask")
        logits = model(batch["input_values"].to(device, dtype),
                       attention_mask=None if mask is None else mask.to(device)).logits
        part = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        if log_probs is None:  # the first batch holds the longest segment
            log_probs = part.new_zeros(len(waves), part.shape[1], part.shape[2])
        log_probs[rows, :part.shape[1]] = part
    return log_probs, frames.clamp(max=log_probs.shape[1]).tolist()


def align(model, processor, audio: Any, transcripts: Sequence[str], *,
          segments: Optional[Sequence[Tuple[float, float]]] = None, sampling_rate: Optional[int] = None,
          batch_size: Optional[int] = None, unknown: str = "star", star_penalty: float = -1.0,
          infeasible: str = "raise", backend: Optional[str] = None) -> List[SegmentAlignment]:
    """Word and token timestamps of each (audio, transcript) pair.

    ``audio``: a list of waveforms [samples] (one per transcript), or with ``segments`` = [(start_s,
    end_s), ...] one long waveform cut into one segment per transcript (times are then in the long
    audio's clock). ``model``: a CTC model (our UniSpeechForCTC or transformers' *ForCTC) in eval mode;
    ``processor``: its feature extractor + CTC tokenizer (ours or transformers'). ``sampling_rate``
    defaults to the feature extractor's (no resampling is done). The model runs once on all segments
    (``batch_size`` segments per forward to bound memory), and ``unispeech_kernels.forced_align``
    aligns them all in one call (``backend``, ``star_penalty``, ``infeasible`` are its arguments;
    "mark" returns infeasible segments with feasible=False and no spans)."""
    if isinstance(transcripts, str) or not all(isinstance(t, str) for t in transcripts):
        raise TypeError("align: transcripts must be a list of strings (one per utterance or segment)")
    if infeasible not in ("raise", "mark"):
        raise ValueError(f"align: infeasible must be 'raise' or 'mark', got {infeasible!r}")
    rate = processor.feature_extractor.sampling_rate
    if sampling_rate is not None and sampling_rate != rate:
        raise ValueError(f"align: audio at {sampling_rate} Hz, the model expects {rate} Hz: resample it first")
    seconds_per_frame = _frame_stride(model.config) / rate
    waves, starts = _segments(audio, transcripts, segments, rate)
    if not waves:
        return []
    log_probs, frames = emissions(model, processor, waves, rate, batch_size)
    tokenizer = processor.tokenizer
    star = log_probs.shape[-1]
    encoded = [encode_transcript(tokenizer, text, star, unknown) for text in transcripts]
    width = max(len(e.ids) for e in encoded)
    targets = torch.full((len(encoded), max(width, 1)), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        targets[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
    alignment, scores, feasible = unispeech_kernels.forced_align(
        log_probs, targets.to(log_probs.device), frames, [len(e.ids) for e in encoded], tokenizer.pad_token_id, star,
        star_penalty=star_penalty, infeasible="mark", backend=backend)
    if infeasible == "raise" and not bool(feasible.all()):
        bad = (~feasible).nonzero().flatten().tolist()
        raise ValueError(f"align: segment(s) {bad[:5]} are too short for their transcripts (e.g. segment {bad[0]}: "
                         f"{frames[bad[0]]} frames for {transcripts[bad[0]]!r}); pass infeasible='mark' to align the "
                         "others")
    alignment, scores, feasible = alignment.cpu().numpy(), scores.cpu().numpy(), feasible.cpu().tolist()
    out = []
    for i, (e, n, offset) in enumerate(zip(encoded, frames, starts)):
        end = offset + len(waves[i]) / rate
        if not feasible[i]:
            out.append(SegmentAlignment(transcripts[i], offset, end, [], [], feasible=False))
            continue
        tokens = token_spans(alignment[i, :n], scores[i, :n], e, tokenizer.pad_token_id, seconds_per_frame, offset)
        out.append(SegmentAlignment(transcripts[i], offset, end, word_spans(tokens, e), tokens))
    return out
