"""The training package's data side: manifest checks, audio decoding / resampling, batch orders,
the schedule and the error rates (hand-computed values)."""
import json
import math
import os

import numpy as np
import pytest
import soundfile
import torch

from unispeech import UniSpeechCTCTokenizer
from unispeech.training.audio import RATE, read_audio
from unispeech.training.data import (BadInput, Checks, UtteranceDataset, character_labeler, character_vocabulary,
                                     check_utterances, collate, read_utterances)
from unispeech.training.metrics import edit_distance, error_counts, error_rates, greedy_decode
from unispeech.training.sampler import BucketBatchSampler, evaluation_batches
from unispeech.training.schedule import tri_stage

STRIDE = 320  # samples per frame of the checks below


def write(path, seconds=0.5, rate=RATE, channels=1, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    audio = 0.3 * np.sin(2 * np.pi * freq * t)
    soundfile.write(path, np.repeat(audio[:, None], channels, 1), rate, subtype="PCM_16")


def checks(tokenizer, resample=True):
    return Checks(frames=lambda n: n // STRIDE, min_samples=800, labeler=character_labeler(tokenizer),
                  resample=resample)


@pytest.fixture
def corpus(tmp_path):
    """A TSV manifest with one good line and one line per kind of bad input."""
    write(str(tmp_path / "good.wav"))
    write(str(tmp_path / "rate.wav"), rate=8000)
    write(str(tmp_path / "short.wav"), seconds=0.01)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    lines = ["good.wav\tab ba", "missing.wav\tab", "good.wav\t  ", "good.wav\tab\u00e9", "broken.wav\tab",
             "rate.wav\tab", "short.wav\tab", "good.wav\t" + "ab " * 20, "good.wav\ta\tb\tc"]
    (tmp_path / "train.tsv").write_text("# comment\n" + "\n".join(lines) + "\n")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6}
    return tmp_path, UniSpeechCTCTokenizer(vocab=vocab)


EXPECTED = {  # manifest line -> its message
    3: "missing.wav does not exist", 4: "empty transcript", 5: "characters outside the vocabulary: 'é'",
    6: "unreadable audio", 7: "sampled at 8000 Hz, the model expects 16000 Hz", 8: "shorter than the 800 samples",
    # line 9: "ab ab ... ab" (20 words) is 59 tokens, no repeat: 59 frames, 0.5 s gives 8000 // 320 = 25
    9: "transcript needs 59 CTC frames but the audio gives only 25", 10: "4 tab-separated fields",
}


def test_every_bad_input_is_named_by_its_line_and_skipped(corpus):
    folder, tokenizer = corpus
    messages = []
    kept = check_utterances(read_utterances(str(folder / "train.tsv")), checks(tokenizer, resample=False), "skip",
                            messages.append)
    assert [u.where.rsplit(" ", 1)[1] for u in kept] == ["2"] and kept[0].labels == [5, 6, 4, 6, 5]
    assert len(messages) == len(EXPECTED) + 1
    assert messages[-1] == f"skipped {len(EXPECTED)} of {len(EXPECTED) + 1} utterances"
    for (line, expected), message in zip(EXPECTED.items(), messages):
        assert f"train.tsv line {line}: " in message and expected in message, message


@pytest.mark.parametrize("line", sorted(EXPECTED))
def test_stop_raises_on_the_first_bad_line(corpus, line):
    folder, tokenizer = corpus
    text = (folder / "train.tsv").read_text().splitlines()
    keep = [text[0], text[1], text[line - 1]]  # the comment, the good line, one bad line
    (folder / "one.tsv").write_text("\n".join(keep) + "\n")
    with pytest.raises(BadInput, match=f"one.tsv line 3: .*{EXPECTED[line][:20]}.*--on-bad-input skip"):
        check_utterances(read_utterances(str(folder / "one.tsv")), checks(tokenizer, resample=False), "stop")


def test_wrong_rate_is_resampled_by_default_and_jsonl_and_folder_sources(corpus):
    folder, tokenizer = corpus
    records = [{"audio": "rate.wav", "text": "ab"}, {"audio": "good.wav"}, "not json"]
    (folder / "m.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    messages = []
    kept = check_utterances(read_utterances(str(folder / "m.jsonl")), checks(tokenizer), "skip", messages.append)
    assert [u.samples for u in kept] == [8000]  # 0.5 s at 8 kHz -> 16 kHz
    assert "m.jsonl line 2: no transcript" in messages[0] and "m.jsonl line 3: not valid JSON" in messages[1]
    pairs = folder / "pairs"
    pairs.mkdir()
    write(str(pairs / "x.wav"))
    (pairs / "x.txt").write_text("ba\n")
    (u,) = check_utterances(read_utterances(str(pairs)), checks(tokenizer))
    assert u.text == "ba" and u.labels == [6, 5] and u.where.endswith("x.wav")
    with pytest.raises(BadInput, match="none of the 1 utterances"):
        check_utterances(read_utterances(str(folder / "m.jsonl"))[1:2], checks(tokenizer), "skip", messages.append)


def test_audio_that_fails_to_decode_names_its_line_in_the_loader(corpus):
    folder, tokenizer = corpus
    (u,) = check_utterances(read_utterances(str(folder / "train.tsv"))[:1], checks(tokenizer))
    os.remove(folder / "good.wav")  # gone between the check and the loader
    with pytest.raises(BadInput, match="train.tsv line 2: unreadable audio"):
        UtteranceDataset([u])[(0, 0, True)]


def test_resampling_is_band_limited_and_stereo_is_mixed_down(tmp_path):
    """A 1 kHz tone at 22.05 kHz, stereo -> 16 kHz mono: the length ratio, the tone's amplitude and
    its frequency are kept (linear interpolation attenuates and aliases)."""
    write(str(tmp_path / "a.wav"), seconds=1.0, rate=22050, channels=2, freq=1000.0)
    audio = read_audio(str(tmp_path / "a.wav"))
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(audio[2000:14000] * np.hanning(12000)))
    assert abs(np.argmax(spectrum) * RATE / 12000 - 1000) < 2
    assert abs(np.sqrt(2) * audio[2000:14000].std() - 0.3) < 3e-3


def test_collate_normalises_each_utterance_and_pads(corpus):
    folder, tokenizer = corpus
    write(str(folder / "long.wav"), seconds=0.75)
    (folder / "two.tsv").write_text("good.wav\tab\nlong.wav\tba ab\n")
    utts = check_utterances(read_utterances(str(folder / "two.tsv")), checks(tokenizer))
    batch = collate([UtteranceDataset(utts)[(i, 0, True)] for i in (1, 0)])
    assert batch.input_values.shape == (2, 12000) and batch.attention_mask.sum(1).tolist() == [12000, 8000]
    real = batch.input_values[1, :8000].double()
    assert abs(real.mean()) < 1e-6 and abs(real.std(unbiased=False) - 1) < 1e-4
    assert batch.input_values[1, 8000:].abs().max() == 0
    assert batch.labels.tolist() == [[6, 5, 4, 5, 6], [5, 6, -100, -100, -100]] and batch.indices.tolist() == [1, 0]


def test_built_vocabulary_has_the_transformers_layout():
    from unispeech.training.data import Utterance
    vocab = character_vocabulary([Utterance("1", None, text="the cat"), Utterance("2", None, text="a dog")])
    assert list(vocab) == ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "c", "d", "e", "g", "h", "o", "t"]
    assert list(vocab.values()) == list(range(13))


def test_bucket_sampler_is_world_size_invariant_resumable_and_sorted():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 1000, size=53)
    one = BucketBatchSampler(lengths, 6, seed=3, shard_batches=2)
    ranks = [BucketBatchSampler(lengths, 3, world=2, rank=r, seed=3, shard_batches=2) for r in range(2)]
    assert one.batches_per_epoch == 8  # 53 // 6, the rest dropped
    stream = one.iterate()
    streams = [r.iterate() for r in ranks]
    seen = []
    for _ in range(2 * one.batches_per_epoch):  # two epochs
        whole = next(stream)
        parts = [next(s) for s in streams]
        assert sorted(whole) == sorted(parts[0] + parts[1]) and len(parts[0]) == len(parts[1]) == 3
        seen.append(whole)
    for epoch in (0, 1):
        indices = [k[0] for b in seen[8 * epoch: 8 * epoch + 8] for k in b]
        assert len(set(indices)) == 48 and all(k[1] == epoch for b in seen[8 * epoch: 8 * epoch + 8] for k in b)
    assert seen[0] != seen[8]  # a new order per epoch
    resumed = one.iterate(start=11)
    assert [next(resumed) for _ in range(3)] == seen[11:14]
    for batch in one.epoch_batches(0):  # within a shard batches are length-sorted: little padding
        assert list(lengths[batch]) == sorted(lengths[batch], reverse=True)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        BucketBatchSampler(lengths[:5], 3, world=2)


def test_evaluation_batches_cover_everything_once_in_equal_counts():
    lengths = [5, 9, 1, 7, 3, 8, 2]
    parts = [evaluation_batches(lengths, 2, world=3, rank=r) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2] and [sum(len(b) for b in p) for p in parts] == [3, 3, 3]
    counted = sorted(k[0] for p in parts for b in p for k in b if k[2])
    assert counted == list(range(7))
    assert sum(not k[2] for p in parts for b in p for k in b) == 2


def test_tri_stage_schedule_values():
    values = [tri_stage(s, 100, warmup=0.1, hold=0.4) for s in (0, 5, 10, 49, 50, 75, 100)]
    expected = [0.01, 0.505, 1.0, 1.0, 1.0, math.exp(math.log(0.05) * 0.5), 0.05]
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="fractions"):
        tri_stage(0, 10, 0.7, 0.5)


def test_edit_distance_and_error_rates_by_hand():
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance("the cat sat".split(), "the bat sat down".split()) == 2
    counts = error_counts(["the cat sat", "a dog"], ["the bat  sat down", "a dog"])
    # chars: "the cat sat" vs "the bat sat down": 1 substitution + 5 insertions; "a dog" exact
    assert counts == dict(char_edits=6, chars=16, word_edits=2, words=5)
    assert error_rates(counts) == dict(cer=6 / 16, wer=2 / 5)


def test_greedy_decode_merges_repeats_and_drops_blanks():
    tokenizer = UniSpeechCTCTokenizer(vocab={"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6})
    path = [[5, 5, 0, 5, 4, 6, 6, 1, 0], [6, 0, 6, 6, 5, 5, 5, 5, 5]]
    logits = torch.nn.functional.one_hot(torch.tensor(path), 7).float()
    assert greedy_decode(logits, torch.tensor([9, 4]), tokenizer) == ["aa b", "bb"]
