"""Batched CTC forced alignment, every implementation side by side.

DP cases: fp32 log-softmax of random logits, vocab 32 (blank 0), 50 frames per second, transcripts
of 15 random labels per second (targets [B, L] padded with -100): 64 utterances of 4-16 s (seeded
uniform lengths), and one 30-minute file cut into 60 segments of 30 s. Impls:
- ours / triton: unispeech_kernels.forced_align on the whole batch, backend "torch" (the CPU case)
  or "triton" (GPU);
- numpy_loop: the fp64 numpy recursion (bench/align_reference.py) one utterance at a time, what most
  users run;
- torchaudio: torchaudio.functional.forced_align one utterance at a time (batch size 1 is all it
  takes), on the benchmark device; skipped where torchaudio is not installed.
One input set per case: the recursion is bound by its frame-by-frame latency, not by reading its
inputs, so cache residency does not matter (and torchaudio's per-utterance loop takes seconds).
"ours" / "triton" are verified against the numpy recursion: the largest relative difference of an
utterance's total path score (0 when the paths are equal) must stay within 1e-5 (fp32 accumulation).
Work: 4 operations per (frame, state) cell and the minimum bytes (physics.forced_align_*).

E2E case: unispeech.align() on 1 hour of audio in 30 s segments of one waveform with UniSpeech-base
(random weights) in the benchmark dtype, 15 characters per second of random text, 40 segments per
model forward: the model forward, log-softmax, one forced_align call and the spans. Verified by the
tokens of every segment spelling its transcript.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from bench import cases, physics
from bench.align_reference import viterbi_numpy
from bench.harness import Case

FRAMES_PER_S, VOCAB, LABELS_PER_S = 50, 32, 15
SCORE_REL_TOL = 1e-5
DP_CASES = [(entry, impl) for entry in cases.entries("forced_align") for impl in entry["impls"]]
E2E_CASES = [(entry, model, impl) for entry in cases.entries("align_e2e") for model in entry["models"]
             for impl in entry["impls"]]


def _dp_id(c):
    entry, impl = c
    return (f"{entry['utterances']}utt-{impl}" if "utterances" in entry
            else f"{entry['file_minutes']}min-in-{entry['segment_s']}s-{impl}")


def _durations(entry):
    if "utterances" in entry:
        rng = np.random.default_rng(cases.SEED)
        lo, hi = entry["seconds"]
        return [float(s) for s in rng.uniform(lo, hi, entry["utterances"])]
    return [float(entry["segment_s"])] * (entry["file_minutes"] * 60 // entry["segment_s"])


@functools.lru_cache(None)
def dp_inputs(key, device):
    """(log_probs [B, T, 32] fp32, targets [B, L] int64 (-100 padded), frames, labels, shape name)."""
    entry = dict(key)
    seconds = _durations(entry)
    frames = [int(s * FRAMES_PER_S) for s in seconds]
    labels = [int(s * LABELS_PER_S) for s in seconds]
    gen = torch.Generator().manual_seed(cases.SEED)
    log_probs = (torch.randn(len(frames), max(frames), VOCAB, generator=gen) * 2).log_softmax(-1)
    targets = torch.full((len(frames), max(labels)), -100, dtype=torch.long)
    for b, n in enumerate(labels):
        targets[b, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
    shape = f"B{len(frames)} T{min(frames)}-{max(frames)} L{min(labels)}-{max(labels)} C{VOCAB}"
    return log_probs.to(device), targets.to(device), frames, labels, shape


@functools.lru_cache(None)
def reference_best(key) -> list:
    """The numpy recursion's best total score of every utterance (computed once per case)."""
    log_probs, targets, frames, labels, _ = dp_inputs(key, torch.device("cpu"))
    lp = log_probs.double().numpy()
    return [viterbi_numpy(lp[b, :n], targets[b, :m].tolist())[2] for b, (n, m) in enumerate(zip(frames, labels))]


def make_dp_impl(impl, log_probs, targets, frames, labels):
    """(fn, input set) of one implementation; the inputs are prepared untimed."""
    if impl in ("ours", "triton"):
        import unispeech_kernels
        backend = "triton" if impl == "triton" else "torch"
        return (lambda *a: unispeech_kernels.forced_align(*a, backend=backend)), (log_probs, targets, frames, labels)
    if impl == "numpy_loop":
        lp = log_probs.cpu().numpy()
        rows = [(lp[b, :n], targets[b, :m].tolist()) for b, (n, m) in enumerate(zip(frames, labels))]
        return (lambda rows: [viterbi_numpy(x, r) for x, r in rows]), (rows,)
    if impl == "torchaudio":
        import torchaudio.functional as taf
        rows = [(log_probs[b:b + 1, :n], targets[b:b + 1, :m].int()) for b, (n, m) in enumerate(zip(frames, labels))]
        return (lambda rows: [taf.forced_align(x, r, blank=0) for x, r in rows]), (rows,)
    raise ValueError(f"unknown forced_align impl {impl!r}")


def compare_scores(fn, inputs, best) -> dict:
    """Each utterance's total path score (fp64 sum of the frame scores) vs the numpy recursion's best."""
    _, scores = fn(*inputs)
    totals = scores.double().sum(1).tolist()
    worst = float(max(abs(t - b) / abs(b) for t, b in zip(totals, best)))
    return {"rel_diff": worst, "vs": "numpy_loop", "tol": SCORE_REL_TOL}


def _raise(error, *args):
    raise error


@pytest.mark.parametrize("case", DP_CASES, ids=_dp_id)
def test_forced_align(benchmark, recorder, device, case):
    entry, impl = case
    key = tuple((k, v) for k, v in entry.items() if k != "impls")
    log_probs, targets, frames, labels, shape = dp_inputs(key, device)
    c = Case("forced_align", impl, torch.float32, shape,
             dict(entry, impls=None, frames=frames, labels=labels, classes=VOCAB),
             flops=physics.forced_align_flops(frames, labels),
             nbytes=physics.forced_align_bytes(frames, labels, VOCAB, 4))
    verify = None
    try:
        fn, inputs = make_dp_impl(impl, log_probs, targets, frames, labels)
        if impl in ("ours", "triton"):
            verify = functools.partial(compare_scores, fn, inputs, reference_best(key))
    except Exception as e:  # e.g. torchaudio not installed: an error row
        fn, inputs = functools.partial(_raise, e), ()
    recorder.run(benchmark, c, fn, [inputs], device, verify=verify)


# ---------------------------------------------------------------------------------- align() e2e

ALPHABET = [chr(ord("A") + i) for i in range(26)] + ["'"]
ALIGN_VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{ch: 5 + i for i, ch in enumerate(ALPHABET)}}
SEGMENTS_PER_FORWARD = 40


def e2e_setup(entry, model_name, dtype, device):
    """(model, processor, audio, transcripts, segments, sample lengths) of one hour of audio."""
    from unispeech import UniSpeechConfig, UniSpeechForCTC
    from unispeech.processing import UniSpeechCTCTokenizer, UniSpeechFeatureExtractor, UniSpeechProcessor

    config = UniSpeechConfig(**dict(cases.MODELS[model_name], layerdrop=0.0),
                             attn_implementation="triton" if device.type == "cuda" else "sdpa", kernel_backend="auto")
    with torch.device(device):
        model = UniSpeechForCTC(config).to(dtype).eval()
    processor = UniSpeechProcessor(UniSpeechFeatureExtractor(return_attention_mask=True),
                                   UniSpeechCTCTokenizer(vocab=ALIGN_VOCAB, do_lower_case=True))
    seg = entry["segment_s"]
    n_seg = int(entry["hours"] * 3600 // seg)
    rng = np.random.default_rng(cases.SEED)
    audio = rng.standard_normal(n_seg * seg * cases.SAMPLE_RATE, dtype=np.float32)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz'"))
    texts = ["".join(rng.choice(letters, size=LABELS_PER_S * seg)) for _ in range(n_seg)]
    transcripts = [" ".join(text[j:j + 5] for j in range(0, len(text), 5)) for text in texts]  # 5-letter words
    segments = [(i * seg, (i + 1) * seg) for i in range(n_seg)]
    return model, processor, audio, transcripts, segments, [seg * cases.SAMPLE_RATE] * n_seg


def spelled(fn, transcripts) -> dict:
    """The fraction of segments whose aligned tokens do not spell their transcript (must be 0)."""
    out = fn()
    bad = sum("".join(t.token for t in s.tokens) != text.upper().replace(" ", "|") for s, text in zip(out, transcripts))
    return {"rel_diff": bad / len(transcripts), "vs": "transcripts", "tol": 0.0}


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: f"{c[1]}-{c[0]['hours']}h-{c[2]}")
def test_align_e2e(benchmark, recorder, device, case, dtype):
    entry, model_name, impl = case
    from unispeech import align

    model, processor, audio, transcripts, segments, samples = e2e_setup(entry, model_name, dtype, device)
    c = Case("align_e2e", impl, dtype, f"{model_name} {entry['hours']}h in {entry['segment_s']}s segments",
             dict(model=model_name, hours=entry["hours"], segment_s=entry["segment_s"], segments=len(segments),
                  segments_per_forward=SEGMENTS_PER_FORWARD, audio_s=entry["hours"] * 3600),
             flops=physics.model_forward_flops(samples, cases.MODELS[model_name])[0])

    def fn():
        return align(model, processor, audio, transcripts, segments=segments, batch_size=SEGMENTS_PER_FORWARD)

    recorder.run(benchmark, c, fn, [()], device, verify=functools.partial(spelled, fn, transcripts))
