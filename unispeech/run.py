"""The main job of `make run`: one UniSpeechForCTC through every backend this machine has.

    python -m unispeech.run [--checkpoint DIR] [--seconds N] [--batch B] [--device cpu|cuda]
                            [--dtype float32|bfloat16|float16] [--repeats R] [--no-transformers]

Model: the checkpoint folder when given (config.json + weights, as transformers saves them), else the
built-in default: UniSpeech-base shaped (768 x 12 layers, 12 heads, group-norm feature encoder,
transformers' UniSpeechConfig defaults) with seeded random weights. Base is kept as the default
even on a 2-core CPU because it is the shape users run; 3 s of audio keeps the whole job near
half a minute there.
Input: a padded batch of synthetic seeded audio (utterance lengths from --seconds down to 60 % of it),
with its attention mask. Each variant (attention implementation x kernel backend) runs --repeats
times after one warm-up; the table shows the median time and the max |difference| of the logits vs
the eager variant over real frames. A variant the dispatcher cannot run here is listed with its
reason instead (Triton on a CPU: the interpreter would take hours for a model, so it never runs;
"auto" is shown on a GPU only: without one it resolves to the torch backends of the sdpa row).
Last, when transformers is installed: our model (sdpa) vs transformers' UniSpeechForCTC (sdpa) on
the same weights and input, ours with batch_invariant_group_norm=False there (transformers' padded
numerics: in a group-norm model the padded batch's real frames then match transformers').
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from unispeech import UniSpeechConfig, UniSpeechForCTC  # noqa: E402
from unispeech_kernels import BackendUnavailableError  # noqa: E402

SAMPLE_RATE = 16000
# (label, attn_implementation, kernel_backend); the first is the reference
VARIANTS = [
    ("eager", "eager", "torch"),
    ("sdpa", "sdpa", "torch"),
    ("triton", "triton", "triton"),
    ("cuda", "triton", "cuda"),
    ("auto", "triton", "auto"),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m unispeech.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="local folder with config.json + model weights")
    ap.add_argument("--seconds", type=float, default=3.0, help="longest utterance, seconds of 16 kHz audio")
    ap.add_argument("--batch", type=int, default=2, help="utterances in the padded batch")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant (after one warm-up)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the comparison with transformers")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible to torch")
    if args.batch < 1 or not args.seconds > 0 or args.repeats < 1:  # NaN fails the comparison too
        ap.error("--batch, --seconds and --repeats must be positive")
    if args.checkpoint and not os.path.isdir(args.checkpoint):
        ap.error(f"--checkpoint {args.checkpoint!r} is not a local folder (config.json + model weights)")
    return args


def synthetic_batch(seconds, batch, device, dtype, seed=0):
    """Seeded audio [B, L] (a few tones + noise, zero past each length) and its mask [B, L]."""
    g = torch.Generator().manual_seed(seed)
    longest = int(seconds * SAMPLE_RATE)
    lengths = [round(longest * (1 - 0.4 * i / max(1, batch - 1))) for i in range(batch)]
    t = torch.arange(longest) / SAMPLE_RATE
    freqs = 100 + 900 * torch.rand(batch, 3, generator=g)
    audio = torch.sin(2 * math.pi * freqs[:, :, None] * t).sum(1) + 0.1 * torch.randn(batch, longest, generator=g)
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    audio = (audio * mask).to(device=device, dtype=dtype)
    return audio, mask.to(device), lengths


def build_reference(args):
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        model = UniSpeechForCTC.from_pretrained(args.checkpoint, attn_implementation="eager",
                                                kernel_backend="torch", torch_dtype=dtype)
        source = args.checkpoint
    else:
        torch.manual_seed(0)
        model = UniSpeechForCTC(UniSpeechConfig(attn_implementation="eager", kernel_backend="torch"))
        source = "built-in default: UniSpeech-base shaped config, random weights (seed 0)"
    return model.to(device=args.device, dtype=dtype).eval(), source


def variant(reference, attn, backend):
    model = UniSpeechForCTC(reference.config, attn_implementation=attn, kernel_backend=backend)
    model.load_state_dict(reference.state_dict())
    return model.to(device=reference.device, dtype=reference.dtype).eval()


def timed(fn, repeats, device, warmup=True):
    """(median seconds, output) over `repeats` runs (after one warm-up run unless warmup=False)."""
    out, times = fn() if warmup else None, []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def unavailable_reason(error: BackendUnavailableError, backend: str) -> str:
    """The dispatcher's reason for the forced backend, from the op that refused."""
    from unispeech_kernels.ops.attention import attention_op
    from unispeech_kernels.ops.feature_encoder import feature_encoder_op
    from unispeech_kernels.ops.pos_conv import pos_conv_op
    for op in (feature_encoder_op, pos_conv_op, attention_op):
        if str(error).startswith(op.name + ":") and op.last_reasons.get(backend):
            return f"{op.name}: {op.last_reasons[backend]}"
    return str(error)


def real_max_diff(a, b, frames):
    real = torch.arange(a.shape[1], device=a.device)[None, :] < frames[:, None]
    return (a.double() - b.double())[real].abs().max().item()


def run_variants(reference, audio, mask, args):
    """Rows (label, attn, kernels, seconds or None, max diff or None, note) and (sdpa model, logits)."""
    device = reference.device
    frames = reference._get_feat_extract_output_lengths(mask.sum(-1))
    rows, ref_logits, sdpa = [], None, None
    for label, attn, backend in VARIANTS:
        if label == "auto" and device.type == "cpu":
            continue  # with no GPU, auto resolves to the torch backends: the sdpa row
        if backend in ("triton", "auto") and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            rows.append((label, attn, backend, None, None, "skipped: TRITON_INTERPRET=1 would interpret "
                         "Triton on the CPU, far too slow for a whole model"))
            continue
        model = reference if label == "eager" else variant(reference, attn, backend)
        with torch.no_grad():
            try:
                seconds, logits = timed(lambda: model(audio, attention_mask=mask).logits, args.repeats, device)
            except BackendUnavailableError as e:
                rows.append((label, attn, backend, None, None, "unavailable: " + unavailable_reason(e, backend)))
                continue
        if ref_logits is None:
            ref_logits = logits
        rows.append((label, attn, backend, seconds, real_max_diff(logits, ref_logits, frames), ""))
        if label == "sdpa":
            sdpa = (model, logits)
    return rows, sdpa


def compare_transformers(reference, audio, mask, sdpa, args):
    """Lines comparing our sdpa run with transformers' UniSpeechForCTC (sdpa), or why it was skipped."""
    try:
        import transformers
    except Exception as e:
        return [f"transformers comparison skipped: transformers not importable ({type(e).__name__})"]
    if sdpa is None:
        return ["transformers comparison skipped: our sdpa variant did not run"]
    fields = reference.config.to_dict() if hasattr(reference.config, "to_dict") else {}
    hf_config = transformers.UniSpeechConfig.from_dict(
        {k: v for k, v in fields.items() if k not in ("attn_implementation", "kernel_backend", "unispeech_kernels")})
    hf_config._attn_implementation = "sdpa"
    hf = transformers.UniSpeechForCTC(hf_config)
    hf.load_state_dict(reference.state_dict())
    hf = hf.to(device=reference.device, dtype=reference.dtype).eval()
    sdpa[0].config.batch_invariant_group_norm = False  # transformers' padded numerics (its own config copy)
    ours_t, hf_t = [], []
    with torch.no_grad():  # interleaved, so a busy machine slows both alike
        hf(audio, attention_mask=mask)  # warm-up (ours ran above)
        for _ in range(args.repeats):
            t, ours_logits = timed(lambda: sdpa[0](audio, attention_mask=mask).logits, 1, reference.device, False)
            ours_t.append(t)
            t, logits = timed(lambda: hf(audio, attention_mask=mask).logits, 1, reference.device, False)
            hf_t.append(t)
    frames = reference._get_feat_extract_output_lengths(mask.sum(-1))
    diff = real_max_diff(ours_logits, logits, frames)
    ours_s, hf_s = statistics.median(ours_t), statistics.median(hf_t)
    return [f"vs transformers {transformers.__version__} (sdpa, same weights and input, interleaved runs, ours with "
            f"batch_invariant_group_norm=False): ours "
            f"{ours_s * 1e3:.1f} ms, transformers {hf_s * 1e3:.1f} ms -> ours {hf_s / ours_s:.2f}x as fast, "
            f"max |diff| {diff:.2e}"]


def format_table(rows) -> str:
    lines = [f"{'backend':<8} {'attention':<10} {'kernels':<8} {'time ms':>10} {'max|diff| vs eager':>19}  note",
             "-" * 78]
    for label, attn, backend, seconds, diff, note in rows:
        t = f"{seconds * 1e3:10.1f}" if seconds is not None else f"{'-':>10}"
        d = f"{diff:19.2e}" if diff is not None else f"{'-':>19}"
        lines.append(f"{label:<8} {attn:<10} {backend:<8} {t} {d}  {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    reference, source = build_reference(args)
    audio, mask, lengths = synthetic_batch(args.seconds, args.batch, reference.device, reference.dtype)
    cfg = reference.config
    print(f"model: {source}\n  hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} "
          f"heads; device {reference.device}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"input: batch {args.batch}, lengths {[round(n / SAMPLE_RATE, 2) for n in lengths]} s (padded), "
          f"median of {args.repeats} runs after a warm-up\n")
    rows, sdpa = run_variants(reference, audio, mask, args)
    print(format_table(rows))
    if not args.no_transformers:
        print("\n" + "\n".join(compare_transformers(reference, audio, mask, sdpa, args)))
    print(f"\ntotal {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
