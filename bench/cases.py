"""What is benchmarked: model shapes, audio lengths and the ordered case lists of each profile.

A profile is chosen with BENCH_PROFILE (default: "check" on a GPU, "cpu" without one):
- "check": what `make gpu-check` runs, bf16: the goal tier (the rows that decide the speed goals, one
           shape each), the matrix, then the compile-heavy baselines; bench/gpu_check.py runs the GPU
           tests between the goal tier and the rest, and the time budget cuts from the end.
- "full":  every op at every length, fp16 too, torch.compile of transformers everywhere (`make bench`).
- "cpu":   the CPU comparison (UniSpeech-base, batch 2 x 10 s with one 7 s row, fp32, eval,
           our model vs transformers), the forced alignment of 64 utterances and WavLM-base
           patched vs transformers' eager at 2 x (10 s, 7 s) and 1 x 30 s (`make bench-cpu`): the
           other op files collect no case there.
BENCH_TIERS (e.g. "goal" or "matrix,compile") keeps only those tiers (bench/conftest.py).

Audio is 16 kHz. A batch of duration S seconds holds one utterance of exactly S s and the others
drawn uniformly in [S/2, S] (seeded), so every batch is padded the way real batches are.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import torch

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
# microsoft/wavlm-base(-plus) / wavlm-large shapes: the same encoders plus 320 relative-position buckets up to 800
WAVLM = dict(num_buckets=320, max_bucket_distance=800)
MODELS.update({"wavlm-base": dict(MODELS["base"], **WAVLM), "wavlm-large": dict(MODELS["large"], **WAVLM)})


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


# A profile is a list of entries, in the order the check runs them. An entry names its benchmark "op"
# (bench/test_*.py's test_<op>), its "tier" and what to run: "models" x "seconds" (the longest utterance)
# at "batch", each of "impls" side by side ("lengths" fixes the samples instead). expand() gives each
# (op, model, seconds, batch, impl) once, at its first entry. A benchmark whose cases are not shapes of a
# model reads its own fields from entries(op) and parametrises on tuples holding the entry and ending in
# the impl, (entry, ..., impl): place() finds the entry in them. Tiers, in this order:
# - "goal":    the rows that decide the speed goals, ours + the cheap baselines, one shape each;
# - "matrix":  the other shapes and implementations;
# - "compile": baselines that compile per shape (torch.compile, FlexAttention): minutes of CPU time.
TIERS = ("goal", "matrix", "compile")
ATTENTION_OPS = ("attention_fwd", "attention_bwd", "attention_packed_fwd", "attention_packed_bwd")
REL_POS_OPS = ("rel_pos_attention_fwd", "rel_pos_attention_fwd_bwd")
S1000 = dict(models=["large"], seconds=[20], batch=8)  # S 999 with large's H 16, D 64: the attention goal shape
# Forced alignment: fp32 log-probs at 50 frames/s, vocab 32, ~15 characters/s, 64 utterances of 4-16 s or
# one 30-minute file cut into 30 s segments; align() end to end on 1 hour of audio in 30 s segments.
ALIGN_64 = dict(op="forced_align", utterances=64, seconds=(4, 16))
ALIGN_30MIN = dict(op="forced_align", file_minutes=30, segment_s=30)
ALIGN_E2E = dict(op="align_e2e", models=["base"], hours=1, segment_s=30, impls=["ours"])

PROFILES = {
    # `make gpu-check`: the goal tier first (its ~250 s are the first benchmarks of the run), then the GPU
    # tests (bench/gpu_check.py), then the matrix and the compile-heavy baselines while time is left.
    "check": {"dtypes": ["bfloat16"], "entries": [
        *(dict(op=op, tier="goal", **S1000, impls=["triton", "sdpa"]) for op in ATTENTION_OPS),
        # WavLM's relative-position attention (wavlm-large, S 999, H 16): ours vs the bias materialised
        dict(op="rel_pos_attention_fwd", tier="goal", models=["wavlm-large"], seconds=[20], batch=8,
             impls=["triton", "eager", "sdpa_bias"]),
        dict(ALIGN_64, tier="goal", impls=["triton", "torchaudio"]),
        dict(ALIGN_E2E, tier="goal"),
        dict(op="pos_conv_fwd", tier="goal", models=["large"], seconds=[30], batch=8, impls=["triton", "torch"]),
        dict(op="pos_conv_fwd_bwd", tier="goal", models=["large"], seconds=[30], batch=8, impls=["triton", "torch"]),
        dict(op="feature_encoder_fwd", tier="goal", models=["base"], seconds=[10], batch=8, impls=["triton", "torch"]),
        dict(op="e2e_inference", tier="goal", models=["large", "base"], seconds=[10], batch=8,
             impls=["ours", "hf_sdpa"]),
        dict(op="e2e_ctc_train_step", tier="goal", models=["base"], seconds=[10], batch=8, impls=["ours", "hf_sdpa"]),
        # last of the tier: the CUDA extension builds in the background while the rows above run
        dict(op="first_conv_layer_fwd", tier="goal", models=["base"], seconds=[10], batch=8,
             impls=["cuda", "triton", "torch"]),
        *(dict(op=op, tier="matrix", models=["large"], seconds=[5, 10, 30], batch=8, impls=["triton", "sdpa"])
          for op in ATTENTION_OPS),
        *(dict(op=op, tier="matrix", models=["base", "large"], seconds=[10, 30], batch=8, impls=["triton", "torch"])
          for op in ("pos_conv_fwd", "pos_conv_fwd_bwd")),
        dict(op="first_conv_layer_fwd", tier="matrix", models=["large"], seconds=[10], batch=8,
             impls=["cuda", "triton", "torch"]),
        dict(op="feature_encoder_fwd", tier="matrix", models=["base"], seconds=[10, 30], batch=8,
             impls=["cuda", "triton", "torch"]),
        dict(op="e2e_inference", tier="matrix", models=["large", "base"], seconds=[10], batch=8, impls=["hf_patched"]),
        dict(ALIGN_30MIN, tier="matrix", impls=["triton", "torchaudio"]),
        # the rest of WavLM's: S 499 with base's H 12 and S 1499 with large's H 16, forward and fwd + bwd
        dict(op="rel_pos_attention_fwd_bwd", tier="matrix", models=["wavlm-large"], seconds=[20], batch=8,
             impls=["triton", "eager", "sdpa_bias", "torch"]),
        *(dict(op=op, tier="matrix", models=["wavlm-base", "wavlm-large"], seconds=[10, 30], batch=8,
               impls=["triton", "eager", "sdpa_bias", "torch"]) for op in REL_POS_OPS),
        dict(op="encoder_forward", tier="matrix"),  # bench/test_bench_pretraining.py, its own shape
        dict(op="pretraining_loss", tier="matrix"),
        *(dict(op=op, tier="compile", **S1000, impls=["flex"]) for op in ATTENTION_OPS),
        *(dict(op=op, tier="compile", models=["wavlm-large"], seconds=[20], batch=8, impls=["flex"])
          for op in REL_POS_OPS),
        dict(op="feature_encoder_fwd", tier="compile", models=["base"], seconds=[10, 30], batch=8, impls=["compile"]),
        dict(op="e2e_inference", tier="compile", models=["base"], seconds=[10], batch=8, impls=["hf_compile"]),
        *(dict(op=op, tier="compile", **S1000, impls=["flex_keys"]) for op in ATTENTION_OPS[:2]),
        *(dict(op=op, tier="compile", models=["large"], seconds=[5, 10, 30], batch=8, impls=["flex"])
          for op in ATTENTION_OPS[:2]),
        dict(op="e2e_inference", tier="compile", models=["large"], seconds=[10], batch=8, impls=["hf_compile"]),
    ]},
    # `make bench`: every op at every length, fp16 too, torch.compile of transformers everywhere
    "full": {"dtypes": ["bfloat16", "float16"], "entries": [
        dict(op="attention_fwd", models=["base", "large"], seconds=[1, 5, 10, 20, 30], batch=8,
             impls=["triton", "cuda", "sdpa", "flex", "flex_keys", "torch"]),
        dict(op="attention_bwd", models=["base", "large"], seconds=[1, 5, 10, 20, 30], batch=8,
             impls=["triton", "sdpa", "flex", "flex_keys", "torch"]),
        *(dict(op=op, models=["base", "large"], seconds=[1, 5, 10, 20, 30], batch=8, impls=["triton", "sdpa", "flex"])
          for op in ATTENTION_OPS[2:]),
        dict(op="pos_conv_fwd", models=["base", "large"], seconds=[1, 10, 30], batch=8,
             impls=["triton", "cuda", "torch", "compile"]),
        dict(op="pos_conv_fwd_bwd", models=["base", "large"], seconds=[1, 10, 30], batch=8,
             impls=["triton", "cuda", "torch"]),
        dict(op="first_conv_layer_fwd", models=["base", "large"], seconds=[1, 10, 30], batch=8,
             impls=["cuda", "triton", "torch"]),
        dict(op="feature_encoder_fwd", models=["base", "large"], seconds=[1, 5, 10, 20, 30], batch=8,
             impls=["triton", "cuda", "torch", "compile"]),
        dict(op="e2e_inference", models=["base", "large"], seconds=[1, 10, 30], batch=8,
             impls=["ours", "hf_sdpa", "hf_compile", "hf_patched"]),
        dict(op="e2e_ctc_train_step", models=["base", "large"], seconds=[5, 10, 20], batch=8,
             impls=["ours", "hf_sdpa", "hf_compile"]),
        dict(op="encoder_forward"),
        dict(op="pretraining_loss"),
        dict(ALIGN_64, impls=["triton", "torchaudio"]),
        dict(ALIGN_30MIN, impls=["triton", "torchaudio"]),
        ALIGN_E2E,
    ]},
    # `make bench-cpu`: our model vs transformers and the batched forced alignment vs a per-utterance numpy
    # loop (a CPU op benchmark of the GPU kernels would say nothing about them)
    "cpu": {"dtypes": ["float32"], "entries": [
        dict(op="e2e_inference", models=["base"], seconds=[10], batch=2, impls=["ours", "hf_sdpa", "hf_patched"],
             lengths=[160000, 112000]),  # exactly 10 s and 7 s
        dict(ALIGN_64, impls=["ours", "numpy_loop", "torchaudio"]),
        dict(op="wavlm_inference", models=["wavlm-base"], seconds=[10], batch=2, impls=["hf_patched", "hf_eager"],
             lengths=[160000, 112000]),  # exactly 10 s and 7 s
        dict(op="wavlm_inference", models=["wavlm-base"], seconds=[30], batch=1, impls=["hf_patched", "hf_eager"],
             lengths=[480000]),
        *(dict(op="wavlm_attention_layer", models=["wavlm-base"], seconds=[s], batch=len(n),
               impls=["hf_patched", "hf_eager"], lengths=n) for s, n in ((10, [160000, 112000]), (30, [480000]))),
    ]},
}

# timing knobs per device type: rounds are chosen to fill target_s, within [min_rounds, max_rounds]
TIMING = {
    "cuda": dict(target_s=0.6, min_rounds=10, max_rounds=100, warmup_rounds=2, cache_bytes=None),
    "cpu": dict(target_s=4.0, min_rounds=5, max_rounds=20, warmup_rounds=0, cache_bytes=64 << 20),
}


def entries(op: Optional[str] = None, name: Optional[str] = None) -> list:
    """The entries of profile ``name`` (default: the current one), of one ``op`` when given (a
    benchmark some profile names; an op no profile benchmarks has no bench file asking for it)."""
    known = {e["op"] for p in PROFILES.values() for e in p["entries"]}
    if op is not None and op not in known:
        raise ValueError(f"no benchmark {op!r} in any profile; valid: {sorted(known)}")
    return [e for e in PROFILES[name or profile()]["entries"] if op is None or e["op"] == op]


def expand(op: str, name: Optional[str] = None) -> list:
    """[(model, seconds, batch, impl, lengths)] of ``op``'s model-shape entries (those with models and
    seconds) in a profile, in order, each once."""
    out, seen = [], set()
    for e in entries(op, name):
        for model in e["models"] if {"models", "seconds"} <= e.keys() else []:
            for seconds in e["seconds"]:
                lengths = e.get("lengths") or batch_lengths(seconds, e["batch"])
                for impl in e["impls"]:
                    if (model, seconds, len(lengths), impl) not in seen:
                        seen.add((model, seconds, len(lengths), impl))
                        out.append((model, seconds, len(lengths), impl, lengths))
    return out


def made_by(entry: dict, case: tuple) -> bool:
    """Does ``entry`` make ``case``: an expand() tuple of its shapes, or a tuple holding the entry."""
    if any(part is entry for part in case):
        return True
    if not {"models", "seconds"} <= entry.keys() or len(case) != 5:
        return False
    model, seconds, _, impl, _ = case
    return model in entry["models"] and seconds in entry["seconds"] and impl in entry["impls"]


def place(op: str, case: Optional[tuple] = None, name: Optional[str] = None) -> Optional[tuple]:
    """(tier, entry index) of the entry that makes ``case`` of ``op`` (the op's first entry when no
    case is given); None when the profile has no entry for it. Runs sort by it."""
    for i, e in enumerate(PROFILES[name or profile()]["entries"]):
        if e["op"] == op and (case is None or made_by(e, case)):
            return e.get("tier", "matrix"), i
    return None


def dtypes():
    return [getattr(torch, d) for d in PROFILES[profile()]["dtypes"]]
