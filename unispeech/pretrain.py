"""Pre-train a tiny UniSpeech model: ``python -m unispeech.pretrain --help``.

Data: a folder of .wav files (read with the standard library's ``wave`` + numpy: PCM 8/16/24/32-bit,
any channel count (averaged), any rate (linearly resampled to 16 kHz); unlabeled, so no CTC term),
or synthetic audio (``--synthetic N``): each utterance is a sequence of "phonemes", phoneme p being
a tone of its own pitch, labelled, so all four losses are active. Every step logs the total,
contrastive, diversity and CTC losses and the Gumbel temperature (decayed with the authors'
schedule); the end writes a checkpoint with ``save_pretrained`` that ``from_pretrained`` loads.
Batches: B utterances cropped at random to at most ``--seconds`` and right-padded (attention mask).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import wave
from typing import List, Optional, Tuple

import numpy as np
import torch

from .configuration import UniSpeechConfig
from .heads import UniSpeechForPreTraining
from .pretraining import gumbel_temperature

RATE = 16_000
PHONEME_SECONDS = 0.08  # synthetic phoneme duration


def read_wav(path: str) -> np.ndarray:
    """Mono float32 at 16 kHz, zero mean and unit variance (as the feature extractor normalises)."""
    with wave.open(path, "rb") as f:
        channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
        raw = f.readframes(n)
    if width == 1:
        audio = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        audio = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608.0
    elif width == 4:
        audio = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    audio = audio.reshape(-1, channels).mean(1)
    if rate != RATE:
        t_out = np.arange(int(len(audio) * RATE / rate)) / RATE
        audio = np.interp(t_out, np.arange(len(audio)) / rate, audio).astype(np.float32)
    return (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)


def load_folder(folder: str) -> List[Tuple[np.ndarray, None]]:
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(".wav"))
    if not paths:
        raise SystemExit(f"no .wav files in {folder}")
    return [(read_wav(p), None) for p in paths]


def synthetic(count: int, num_phonemes: int, blank: int, rng: np.random.Generator, seconds: float):
    """Utterances of random tone "phonemes" (never the blank id) and their labels."""
    phonemes = [p for p in range(num_phonemes) if p != blank]
    step = int(PHONEME_SECONDS * RATE)
    out = []
    for _ in range(count):
        labels = rng.choice(phonemes, size=max(2, int(seconds / PHONEME_SECONDS * rng.uniform(0.5, 1.0))))
        t = np.arange(step) / RATE
        audio = np.concatenate([np.sin(2 * np.pi * (200.0 + 60.0 * p) * t) for p in labels])
        audio = audio + 0.05 * rng.standard_normal(len(audio))
        out.append((((audio - audio.mean()) / audio.std()).astype(np.float32), labels.astype(np.int64)))
    return out


def make_batch(items, max_samples: int, rng: np.random.Generator):
    """Random crops (labelled synthetic items are not cropped: labels must stay aligned)."""
    crops = []
    for audio, labels in items:
        if labels is None and len(audio) > max_samples:
            start = int(rng.integers(0, len(audio) - max_samples + 1))
            audio = audio[start:start + max_samples]
        crops.append((audio, labels))
    width = max(len(a) for a, _ in crops)
    x = torch.zeros(len(crops), width)
    mask = torch.zeros(len(crops), width, dtype=torch.long)
    for i, (audio, _) in enumerate(crops):
        x[i, :len(audio)] = torch.from_numpy(audio)
        mask[i, :len(audio)] = 1
    labels = None
    if all(lab is not None for _, lab in crops):
        labels = torch.full((len(crops), max(len(lab) for _, lab in crops)), -100, dtype=torch.long)
        for i, (_, lab) in enumerate(crops):
            labels[i, :len(lab)] = torch.from_numpy(lab)
    return x, mask, labels


def tiny_config(args) -> UniSpeechConfig:
    return UniSpeechConfig(
        hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=4,
        intermediate_size=4 * args.hidden_size, conv_dim=(64,) * 7, num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=4, num_codevectors_per_group=32, num_codevector_groups=2,
        codevector_dim=64, proj_codevector_dim=64, num_negatives=20, num_ctc_classes=args.num_phonemes,
        mask_time_prob=0.5, mask_time_length=5, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, final_dropout=0.0, layerdrop=0.0, pad_token_id=0,
        pretraining_ctc_weight=args.ctc_weight, kernel_backend=args.kernel_backend,
    )


class Progress:
    """tqdm when it is installed, else one plain line every ``every`` steps."""

    def __init__(self, total: int, every: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="step")
        except ImportError:
            self.bar = None
        self.total, self.every, self.start = total, every, time.time()

    def update(self, step: int, text: str):
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total} [{time.time() - self.start:.0f}s] {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _value(x: Optional[torch.Tensor]) -> str:
    return "-" if x is None else f"{x.item():.3f}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m unispeech.pretrain",
                                description="Pre-train a tiny UniSpeech model (the full UniSpeech objective) on "
                                            "local .wav files or synthetic audio.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--audio-dir", help="folder of .wav files (unlabeled: no CTC term)")
    data.add_argument("--synthetic", type=int, metavar="N", help="N synthetic labelled utterances")
    p.add_argument("--output-dir", required=True, help="checkpoint folder (save_pretrained)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="utterances per step")
    p.add_argument("--seconds", type=float, default=2.0, help="longest crop / synthetic utterance")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    p.add_argument("--hidden-size", type=int, default=64, help="model width (4 heads)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers")
    p.add_argument("--num-phonemes", type=int, default=12, help="CTC classes (blank = 0 included)")
    p.add_argument("--ctc-weight", type=float, default=0.5, help="alpha of the total loss")
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="unispeech_kernels backend of the hot spots")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seeds data, masks and weights")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines without tqdm")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.seconds <= 0:
        p.error("--steps and --batch-size must be >= 1 and --seconds > 0")
    return args


def main(argv=None) -> UniSpeechForPreTraining:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    np.random.seed(args.seed)  # SpecAugment spans use numpy's global generator
    torch.manual_seed(args.seed)
    config = tiny_config(args)
    blank = config.pad_token_id
    items = (load_folder(args.audio_dir) if args.audio_dir
             else synthetic(args.synthetic, args.num_phonemes, blank, rng, args.seconds))
    model = UniSpeechForPreTraining(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    progress = Progress(args.steps, args.log_every)
    max_samples = int(args.seconds * RATE)
    for step in range(1, args.steps + 1):
        temperature = gumbel_temperature(step - 1)
        model.set_gumbel_temperature(temperature)
        picked = [items[i] for i in rng.choice(len(items), size=min(args.batch_size, len(items)), replace=False)]
        x, mask, labels = make_batch(picked, max_samples, rng)
        out = model(x.to(args.device), attention_mask=mask.to(args.device),
                    labels=None if labels is None else labels.to(args.device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        progress.update(step, f"loss {_value(out.loss)} contrastive {_value(out.contrastive_loss)} "
                              f"diversity {_value(out.diversity_loss)} ctc {_value(out.ctc_loss)} "
                              f"gumbel_temp {temperature:.4f}")
    progress.close()
    model.save_pretrained(args.output_dir)
    print(f"saved {args.output_dir} (UniSpeechForPreTraining.from_pretrained loads it)", file=sys.stderr)
    return model


if __name__ == "__main__":
    main()
