"""Expected seconds of every part of the GPU check on the lent H200 (16 cores), for its CPU dry run
(``python -m bench.gpu_check --dry-run``, run by tests/test_gpu_check_dry_run.py).

No GPU has run the check yet, so nothing here was measured there; each number says what it comes
from. The check's guarantees do not rest on them (every step has a hard cap, and a benchmark session
skips the cases that no longer fit its budget): they are what the dry run predicts, above all that
the goal tier runs first and whole within its ~250 s.

CPU seconds were measured on this project's CPU machine (AMD EPYC, 2 shared cores, torch 2.13,
triton 3.9) as process + child CPU time (the machine is shared: wall time there ran 5-10x higher),
and are charged 1:1 as wall time on the GPU machine: its cores are not assumed faster, and neither
Inductor's parallel compile workers nor 16 cores are counted.
- Triton, one kernel config compiled for sm_90 (triton.compile of every aot_specs() entry: 93
  kernels, 101 s): attention 0.78-0.99 s, conv layers 1.0-2.7 s, positional conv 0.7-1.2 s -> 1.1 s
  each; an autotuned kernel compiles every config its pruning keeps at the first key it meets and
  times each config for each new key, 0.15 s (triton's do_bench: 25 ms warm-up + 100 ms of reps).
  CONFIGS counts them per benchmark (the configs of aot_specs() at bf16, head_dim 64).
- torch.compile (Dynamo + Inductor, its CPU backend standing in for the CUDA one, each compile of a
  new shape): FlexAttention forward 6.8 s, plus 5.0 s for Inductor's first use in a process (11.8 s
  for the first); the feature encoder's eager reference 12.4 s; transformers' UniSpeechForCTC
  inference 35 s (base, 12 layers) / 52 s (large, 24 layers). FlexAttention has no CPU backward:
  its backward is charged 2.5x the forward (forward and backward graphs are traced and compiled).
- models built from random weights, CPU-initialised (an upper bound: the check initialises them on
  the GPU): transformers' UniSpeechForCTC base 2.0 s / large 6.8 s, ours with load_state_dict
  2.4 s / 8.3 s.
- device time of one call: the case's FLOP and byte floor (bench/physics.py) at 15 % of the H200's
  measured ceilings (790 TFLOP/s, 4.3 TB/s: pessimistic next to what the perf model predicts for
  ours), plus host time (0.2 ms per op call, from the ~0.13 ms measured for an attention call with
  its launch stubbed; 1 ms per encoder layer for a model, assumed); a round is two input sets. It
  matters only where a round exceeds 60 ms (10 rounds then pass the harness's 0.6 s target).
- forced alignment, launch- and latency-bound (no floor describes it), assumed: torchaudio's loop
  ~10 us per frame of every utterance (it launches once per frame and backtracks on the host), ours
  one launch stepping through the longest utterance's frames at ~1 us each; its first call compiles
  one kernel, torchaudio's imports torchaudio (3 s, assumed). align() on an hour: the model forward
  of its 30 s segments (as above) + ours on them.
- pytest start-up of a benchmark session: 8 s CPU for `pytest --collect-only bench/` (torch,
  transformers and triton imports) + 3 s for the ceilings' matmuls and copies.
Steps no measurement sizes are charged their cap (the GPU tests); the extension build 180 s, the
design notes' "~3 min per translation unit on 2 cores" with the two units built in parallel.
"""
from __future__ import annotations

from typing import Optional, Sequence

from . import cases, physics

COMPILE_S = 1.1          # one Triton kernel config for sm_90
TUNE_S = 0.15            # one autotune timing of a config for a key
INDUCTOR_IMPORT_S = 5.0  # Inductor's first use in a process
FLEX_FWD_S = 6.8
FLEX_BWD_FACTOR = 2.5
FE_COMPILE_S = 12.4
HF_COMPILE_S = {"base": 35.0, "large": 52.0}
HF_BUILD_S = {"base": 2.0, "large": 6.8}
OURS_BUILD_S = {"base": 2.4, "large": 8.3}
BASELINE_FIRST_S = 1.0   # a library kernel's first call (cuBLAS / cuDNN handles, module load)
TORCHAUDIO_IMPORT_S = 3.0
ALIGN_FRAMES_PER_S = 50
TORCHAUDIO_FRAME_S, OURS_ALIGN_FRAME_S = 10e-6, 1e-6
EFFICIENCY = 0.15
PEAK_FLOPS, PEAK_BYTES_S = 790e12, 4.3e12
OP_HOST_S, LAYER_HOST_S = 0.2e-3, 1e-3
SETS_PER_ROUND = 2
SESSION_START_S = 11.0
STEP_S = {"facts": 15.0, "build extension": 180.0, "extension tests": 30.0, "backend info": 8.0, "report": 15.0}

# Triton configs each benchmark's first call compiles and times, by op (bf16, head_dim 64, sm_90):
# attention fwd 5; bwd dK/dV 7 + dQ 5 + preprocess 1; positional conv fwd 3, fwd+bwd 3 + dX 3 + dW 1
# + GELU bwd 1; feature encoder: the first layer's 2 kernels + the conv layers' 4 configs at kernel
# sizes 3 and 2 (6 layers: 6 keys of 4 timings); the first layer alone 2; relative-position attention
# fwd 3, fwd + bwd 3 + dK/dV 5 + dQ 1 (fixed tiles) + preprocess 1.
CONFIGS = {"attention_fwd": (5, 5), "attention_bwd": (18, 18), "attention_packed_fwd": (5, 5),
           "attention_packed_bwd": (18, 18), "pos_conv_fwd": (3, 3), "pos_conv_fwd_bwd": (8, 8),
           "feature_encoder_fwd": (10, 24), "first_conv_layer_fwd": (2, 0),  # (compiles, timings)
           "rel_pos_attention_fwd": (3, 3), "rel_pos_attention_fwd_bwd": (10, 8)}


def call_s(op: str, model: str, lengths: Sequence[int]) -> float:
    """Estimated device + host seconds of one call of ``op`` at a model shape."""
    cfg = cases.MODELS[model]
    frames = cases.frame_lengths(lengths, cfg)
    heads = cfg["num_attention_heads"]
    conv = (cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"])
    flops, nbytes, host = 0.0, 0.0, OP_HOST_S
    if op.startswith(("attention", "rel_pos_attention")):
        backward = op.endswith("bwd")
        flops = physics.attention_flops(frames, heads, cfg["hidden_size"] // heads, backward)
        nbytes = physics.attention_bytes(frames, heads, cfg["hidden_size"] // heads, 2, backward)
    elif op.startswith("pos_conv"):
        args = (frames, cfg["hidden_size"], cfg["num_conv_pos_embedding_groups"], cfg["num_conv_pos_embeddings"])
        flops = physics.pos_conv_flops(*args, backward=op.endswith("bwd"))
        nbytes = physics.pos_conv_bytes(*args, 2, backward=op.endswith("bwd"))
    elif op == "first_conv_layer_fwd":
        first = tuple(c[:1] for c in conv)
        flops = physics.feature_encoder_flops(lengths, *first)
        nbytes = physics.feature_encoder_bytes(lengths, *first, 2)
    elif op == "feature_encoder_fwd":
        flops, nbytes = physics.feature_encoder_flops(lengths, *conv), physics.feature_encoder_bytes(lengths, *conv, 2)
    else:  # the models: inference, a CTC training step, the pre-training encoder and its loss
        flops = physics.ctc_train_step_flops(lengths, cfg) if op == "e2e_ctc_train_step" else \
            physics.model_forward_flops(lengths, cfg)[0]
        host = cfg["num_hidden_layers"] * LAYER_HOST_S * (3 if op == "e2e_ctc_train_step" else 1)
    return max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES_S) / EFFICIENCY + host


def align_call_s(impl: str, entry: dict) -> float:
    """One forced_align call of a profile entry: 64 utterances of 4-16 s, or a file cut in segments."""
    if "utterances" in entry:
        total = entry["utterances"] * sum(entry["seconds"]) / 2 * ALIGN_FRAMES_PER_S
        longest = entry["seconds"][1] * ALIGN_FRAMES_PER_S
    else:
        total, longest = entry["file_minutes"] * 60 * ALIGN_FRAMES_PER_S, entry["segment_s"] * ALIGN_FRAMES_PER_S
    if impl == "torchaudio":
        return total * TORCHAUDIO_FRAME_S
    return longest * OURS_ALIGN_FRAME_S + OP_HOST_S


class Estimates:
    """Per-case costs in the order a session meets the cases: compiles, autotuning and models are
    charged where they first happen, as they do on the GPU (a process keeps them)."""

    def __init__(self):
        self.seen = set()

    def _first(self, key) -> bool:
        new = key not in self.seen
        self.seen.add(key)
        return new

    def case(self, op: str, impl: str, model: Optional[str] = None, lengths: Optional[Sequence[int]] = None,
             entry: Optional[dict] = None) -> tuple:
        """(extra seconds of the first call, seconds of one round) of a benchmark case: a model shape,
        or the profile ``entry`` of a benchmark with its own shapes; the pre-training pair, which
        has neither, is charged as the large model at 8 x 10 s."""
        if op == "forced_align":
            first = COMPILE_S if impl != "torchaudio" else TORCHAUDIO_IMPORT_S
            return (first if self._first(("align", impl)) else 0.0), align_call_s(impl, entry)
        if op == "align_e2e":
            segments = int(entry["hours"] * 3600 // entry["segment_s"])
            samples = [entry["segment_s"] * cases.SAMPLE_RATE] * segments
            frames = dict(file_minutes=entry["hours"] * 60, segment_s=entry["segment_s"])
            return (OURS_BUILD_S[model] + COMPILE_S,
                    call_s("e2e_inference", model, samples) + align_call_s("ours", frames))
        if model is None:
            model, lengths = "large", cases.batch_lengths(10, 8)
        return self._first_call(op, impl, model), SETS_PER_ROUND * call_s(op, model, lengths)

    def _first_call(self, op, impl, model) -> float:
        if impl == "triton":
            compiles, timings = CONFIGS[op]
            if self._first(("triton", op)):
                return compiles * COMPILE_S + timings * TUNE_S
            return compiles * (COMPILE_S / 2 + TUNE_S)  # a new length: new keys, some new specialisations
        if impl in ("flex", "flex_keys", "compile", "hf_compile"):
            compile_s = FE_COMPILE_S if impl == "compile" else HF_COMPILE_S[model] if impl == "hf_compile" \
                else FLEX_FWD_S  # flex: WavLM's shapes have no transformers compile time of their own
            if impl.startswith("flex") and op.endswith("bwd"):
                compile_s *= FLEX_BWD_FACTOR
            return compile_s + (INDUCTOR_IMPORT_S if self._first("inductor") else 0.0)
        if op == "e2e_inference":  # the first row of a model builds all its models (ours, transformers' twice)
            build = 2 * HF_BUILD_S[model] + OURS_BUILD_S[model] if self._first(("models", model)) else 0.0
            return build + (CONFIGS["attention_packed_fwd"][0] * (COMPILE_S / 2 + TUNE_S) if impl == "ours" else 0.0)
        if op == "e2e_ctc_train_step":
            build = HF_BUILD_S[model] + (OURS_BUILD_S[model] if impl == "ours" else 0.0)
            return build + (CONFIGS["attention_packed_bwd"][0] * (COMPILE_S / 2 + TUNE_S) if impl == "ours" else 0.0)
        if op == "encoder_forward":
            return OURS_BUILD_S["large"] + CONFIGS["attention_packed_bwd"][0] * TUNE_S
        return BASELINE_FIRST_S
