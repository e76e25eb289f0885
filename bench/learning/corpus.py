"""A small speech corpus made offline with espeak-ng: ``python -m bench.learning.corpus OUT``.

Sentences are generated from word lists and templates (seeded), spoken at 22.05 kHz by espeak-ng
with several voices, speeds and pitches, resampled to 16 kHz with soxr and written as 16-bit WAV.
Each utterance carries its transcript (lower-case letters, spaces) and espeak's IPA phonemes
(stress marks dropped: the pre-training CTC branch's labels). Manifests (JSONL): train.jsonl
(training sentences, training voices), heldout.jsonl (other sentences, a voice not in training).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from unispeech.training.audio import RATE, read_audio

TRAIN_VOICES = ["en-us+m1", "en-gb+m3", "en-gb-scotland+f2", "en-029+m2", "en-us+f1", "en-gb+f3"]
HELDOUT_VOICE = "en-gb-x-rp+f4"
SUBJECTS = ["the old man", "a young girl", "my brother", "the farmer", "her mother", "the small dog", "a tired horse",
            "the captain", "our teacher", "the little boy", "a quiet woman", "the baker", "his sister", "the king",
            "a black cat", "the sailor", "my father", "the children", "a wise owl", "the doctor"]
VERBS = ["found", "carried", "painted", "lost", "wanted", "saw", "bought", "cleaned", "opened", "took", "sold",
         "watched", "kept", "brought", "dropped", "made", "left", "needed", "held", "fixed"]
OBJECTS = ["a red box", "the wooden door", "some warm bread", "an old map", "the heavy stone", "a green apple",
           "the silver key", "a long rope", "the broken chair", "some fresh milk", "a white shirt", "the big boat",
           "a yellow hat", "the round table", "a new book", "the empty bottle", "a sharp knife", "the blue cup",
           "a soft pillow", "the iron gate"]
PLACES = ["near the river", "in the garden", "at the market", "by the window", "on the hill", "under the bridge",
          "in the kitchen", "behind the barn", "at the station", "in the forest", "by the sea", "on the road"]
TIMES = ["this morning", "last night", "every day", "in the evening", "at noon", "after dinner", "before dawn",
         "on sunday", "in winter", "yesterday"]


def sentences(count: int, rng: np.random.Generator, exclude=()) -> list:
    """``count`` distinct sentences from the templates (none of ``exclude``)."""
    seen, out = set(exclude), []
    while len(out) < count:
        parts = [SUBJECTS[rng.integers(len(SUBJECTS))], VERBS[rng.integers(len(VERBS))],
                 OBJECTS[rng.integers(len(OBJECTS))]]
        tail = rng.integers(6)  # a place or a time in one sentence of three
        if tail == 1:
            parts.append(PLACES[rng.integers(len(PLACES))])
        elif tail == 2:
            parts.append(TIMES[rng.integers(len(TIMES))])
        text = " ".join(parts)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def phonemes(text: str, voice: str) -> list:
    """espeak-ng's IPA phonemes of ``text`` (stress marks dropped)."""
    ipa = subprocess.run(["espeak-ng", "-q", "--ipa", "--sep=_", "-v", voice, text], check=True,
                         capture_output=True, text=True).stdout
    return [p for word in ipa.split() for p in word.replace("ˈ", "").replace("ˌ", "").split("_") if p]


def speak(text: str, voice: str, speed: int, pitch: int, path: str) -> None:
    """espeak-ng at 22.05 kHz -> soxr -> 16 kHz 16-bit WAV at ``path``."""
    import soundfile

    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        subprocess.run(["espeak-ng", "-z", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", raw.name, text],
                       check=True)
        audio = read_audio(raw.name, RATE)  # decoded with soundfile, resampled with soxr
    soundfile.write(path, audio, RATE, subtype="PCM_16")


def build(out: str, train_sentences: int, voices_per_sentence: int, heldout_sentences: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "wav"), exist_ok=True)
    train_text = sentences(train_sentences, rng)
    heldout_text = sentences(heldout_sentences, rng, exclude=train_text)
    jobs = {"train": [], "heldout": []}
    for i, text in enumerate(train_text):
        for voice in rng.choice(TRAIN_VOICES, voices_per_sentence, replace=False):
            jobs["train"].append((text, str(voice), int(rng.integers(165, 211)), int(rng.integers(35, 66))))
    for text in heldout_text:
        jobs["heldout"].append((text, HELDOUT_VOICE, 185, 50))
    summary = {}
    for split, items in jobs.items():
        def one(job):
            k, (text, voice, speed, pitch) = job
            path = os.path.join("wav", f"{split}_{k:04d}.wav")
            speak(text, voice, speed, pitch, os.path.join(out, path))
            return dict(audio=path, text=text, phonemes=" ".join(phonemes(text, voice.split("+")[0])),
                        voice=voice, speed=speed, pitch=pitch)
        with ThreadPoolExecutor(2) as pool:
            records = list(pool.map(one, enumerate(items)))
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        import soundfile
        seconds = sum(soundfile.info(os.path.join(out, r["audio"])).duration for r in records)
        summary[split] = dict(utterances=len(records), sentences=len({r["text"] for r in records}),
                              voices=sorted({r["voice"] for r in records}), seconds=round(seconds, 1))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (wav/, train.jsonl, heldout.jsonl)")
    p.add_argument("--train-sentences", type=int, default=200)
    p.add_argument("--voices-per-sentence", type=int, default=2)
    p.add_argument("--heldout-sentences", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = build(args.out, args.train_sentences, args.voices_per_sentence, args.heldout_sentences, args.seed)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
