"""What is benchmarked: model shapes, audio lengths and the case lists of each profile.

A profile is chosen with BENCH_PROFILE (default: "check" on a GPU, "cpu" without one):
- "check": what `make gpu-check` runs: the goal shapes once, bf16, in priority order, sized
           for the few minutes of benchmarking a GPU session's check leaves (bench/gpu_check.sh).
- "full":  every op at every length, fp16 too, torch.compile of transformers everywhere (`make bench`).
- "cpu":   the CPU comparisons only (UniSpeech-base, batch 2 x 10 s with one 7 s row, fp32, eval,
           our model vs transformers; forced alignment of 64 utterances; `make bench-cpu`): the other
           op files collect no case there.
Every registered op (``unispeech_kernels.ops.OP_MODULES``) has a section in every profile: the
cases given below, else none; the model-level sections are ``MODEL_SECTIONS``.

Audio is 16 kHz. A batch of duration S seconds holds one utterance of exactly S s and the others
drawn uniformly in [S/2, S] (seeded), so every batch is padded the way real batches are.
"""
from __future__ import annotations

import os
import random

import torch

from unispeech_kernels.ops import registered_ops
from unispeech_kernels.padding import conv_output_length

SAMPLE_RATE = 16000
SEED = 1234

CONV = dict(conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2])
# transformers field values of microsoft/unispeech-1350-en-17h-ky-ft style base / large models
MODELS = {
    "base": dict(CONV, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False,
                 num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=32),
    "large": dict(CONV, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                  num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=32),
}


def profile() -> str:
    name = os.environ.get("BENCH_PROFILE") or ("check" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"BENCH_PROFILE={name!r}: valid profiles are {sorted(PROFILES)}")
    return name


def batch_lengths(seconds: float, batch: int, seed: int = SEED) -> list[int]:
    """Sample counts: the first utterance is exactly `seconds` long, the rest uniform in [S/2, S]."""
    longest = int(round(seconds * SAMPLE_RATE))
    rng = random.Random(seed * 1000 + batch * 37 + longest)
    return [longest] + [rng.randint(longest // 2, longest) for _ in range(batch - 1)]


def padded_audio(lengths, dtype, device):
    """(audio [B, max(lengths)] random, zero past each utterance's length; its bool mask [B, L])."""
    mask = torch.arange(max(lengths), device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return torch.randn(*mask.shape, device=device, dtype=dtype) * mask, mask


def frame_lengths(sample_lengths, cfg=MODELS["base"]) -> list[int]:
    return [conv_output_length(n, cfg["conv_kernel"], cfg["conv_stride"]) for n in sample_lengths]


MODEL_SECTIONS = ("e2e_inference", "e2e_ctc_train_step")  # our model against transformers


def _with_every_op(profile: dict) -> dict:
    """The profile with a section for every registered op (no cases where it names none)."""
    return {**{op.name: [] for op in registered_ops()}, **profile}


# Forced alignment, fp32 log-probs at 50 frames/s, vocab 32, ~15 characters/s: 64
# utterances of 4-16 s, and one 30-minute file cut into 30 s segments; align() end to end on 1 hour.
FORCED_ALIGN_GPU = [dict(utterances=64, seconds=(4, 16), impls=["triton", "torchaudio"]),
                    dict(file_minutes=30, segment_s=30, impls=["triton", "torchaudio"])]
ALIGN_E2E = [dict(models=["base"], hours=1, segment_s=30, impls=["ours"])]

# Each list entry is one shape; every implementation named runs at it, side by side.
# "dtypes" are torch dtype names; "seconds" the longest utterance; "batch" the batch size.
PROFILES = {
    # `make gpu-check`: the goal shapes once, in priority order (the time budget cuts from the end):
    # attention at S 250/500/1000/1500 (large: H 16, D 64), pos conv at T 500/1500, the first layer's
    # cuda vs triton, the feature encoder at 10 and 30 s, then the model.
    "check": {
        "dtypes": ["bfloat16"],
        "attention": dict(models=["large"], seconds=[5, 10, 20, 30], batch=8,
                          fwd=["triton", "sdpa", "flex"], bwd=["triton", "sdpa", "flex"],
                          packed_fwd=[], packed_bwd=[]),  # the model's packed layout: profile "full"
        "pos_conv": dict(models=["base", "large"], seconds=[10, 30], batch=8,
                         fwd=["triton", "torch"], fwd_bwd=["triton", "torch"]),
        "first_conv_layer": [dict(models=["base", "large"], seconds=[10], batch=8, impls=["cuda", "triton", "torch"])],
        "feature_encoder": [dict(models=["base"], seconds=[10, 30], batch=8,
                                 impls=["triton", "cuda", "torch", "compile"])],
        "e2e_inference": [dict(models=["base"], seconds=[10], batch=8,
                               impls=["ours", "hf_sdpa", "hf_patched", "hf_compile"])],
        "e2e_ctc_train_step": [dict(models=["base"], seconds=[10], batch=8, impls=["ours", "hf_sdpa"])],
        "forced_align": FORCED_ALIGN_GPU,
        "align_e2e": ALIGN_E2E,
    },
    "full": {
        "dtypes": ["bfloat16", "float16"],
        "attention": dict(models=["base", "large"], seconds=[1, 5, 10, 20, 30], batch=8,
                          fwd=["triton", "cuda", "sdpa", "flex", "torch"], bwd=["triton", "sdpa", "flex", "torch"],
                          packed_fwd=["triton", "sdpa", "flex"], packed_bwd=["triton", "sdpa", "flex"]),
        "pos_conv": dict(models=["base", "large"], seconds=[1, 10, 30], batch=8,
                         fwd=["triton", "cuda", "torch", "compile"], fwd_bwd=["triton", "cuda", "torch"]),
        "first_conv_layer": [dict(models=["base", "large"], seconds=[1, 10, 30], batch=8,
                                  impls=["cuda", "triton", "torch"])],
        "feature_encoder": [dict(models=["base", "large"], seconds=[1, 5, 10, 20, 30], batch=8,
                                 impls=["triton", "cuda", "torch", "compile"])],
        "e2e_inference": [dict(models=["base", "large"], seconds=[1, 10, 30], batch=8,
                               impls=["ours", "hf_sdpa", "hf_compile", "hf_patched"])],
        "e2e_ctc_train_step": [dict(models=["base", "large"], seconds=[5, 10, 20], batch=8,
                                    impls=["ours", "hf_sdpa", "hf_compile"])],
        "forced_align": FORCED_ALIGN_GPU,
        "align_e2e": ALIGN_E2E,
    },
    "cpu": {  # the model only: a CPU op benchmark says nothing about GPU kernels
        "dtypes": ["float32"],
        "e2e_inference": [dict(models=["base"], seconds=[10], batch=2, impls=["ours", "hf_sdpa", "hf_patched"],
                               lengths=[160000, 112000])],  # exactly 10 s and 7 s
        "e2e_ctc_train_step": [],
        # issue 19's CPU comparison: the batched torch backend vs the per-utterance numpy loop
        "forced_align": [dict(utterances=64, seconds=(4, 16), impls=["ours", "numpy_loop", "torchaudio"])],
        "align_e2e": [],
    },
}

# timing knobs per device type: rounds are chosen to fill target_s, within [min_rounds, max_rounds]
TIMING = {
    "cuda": dict(target_s=0.6, min_rounds=10, max_rounds=100, warmup_rounds=2, cache_bytes=None),
    "cpu": dict(target_s=4.0, min_rounds=5, max_rounds=20, warmup_rounds=0, cache_bytes=64 << 20),
}


def expand(entries, impl_key: str = "impls"):
    """[(model, seconds, batch, impl, lengths)] of a profile section (dict or list of dicts), in order."""
    if isinstance(entries, dict):
        entries = [entries]
    out = []
    for e in entries:
        for model in e["models"]:
            for seconds in e["seconds"]:
                lengths = e.get("lengths") or batch_lengths(seconds, e["batch"])
                for impl in e[impl_key]:
                    out.append((model, seconds, len(lengths), impl, lengths))
    return out


PROFILES = {name: _with_every_op(p) for name, p in PROFILES.items()}


def section(name: str):
    """The profile's cases for an op (by its registered name) or a model-level section."""
    sections = PROFILES[profile()]
    if name not in sections and name not in MODEL_SECTIONS:
        raise ValueError(f"no benchmark section {name!r}; valid: {sorted(sections)}")
    return sections.get(name, [])


def dtypes():
    return [getattr(torch, d) for d in PROFILES[profile()]["dtypes"]]
