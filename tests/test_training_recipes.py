"""The recipes in one process: pre-training writes a checkpoint fine-tuning starts from, the
fine-tuned folder loads in transformers' ASR pipeline (offline), every flag is documented, and bad
data stops with the manifest line named before any batch is built."""
import json
import os

import numpy as np
import pytest
import soundfile
import torch

from unispeech import UniSpeechForCTC, UniSpeechForPreTraining
from unispeech import finetune, pretrain

SMALL = ["--hidden-size", "16", "--layers", "1", "--conv-dim", "16", "--kernel-backend", "torch",
         "--batch-size", "2", "--log-every", "1"]


@pytest.fixture
def pairs(tmp_path):
    """A folder of 4 .wav + .txt pairs: 8 kHz stereo and 16 kHz mono, 0.4-0.6 s."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (rate, channels) in enumerate([(8000, 2), (16000, 1), (16000, 1), (22050, 1)]):
        n = int(rate * (0.4 + 0.05 * i))
        audio = 0.3 * np.sin(2 * np.pi * (200 + 100 * i) * np.arange(n) / rate) + 0.02 * rng.standard_normal(n)
        soundfile.write(str(folder / f"{i}.wav"), np.repeat(audio[:, None], channels, 1), rate)
        (folder / f"{i}.txt").write_text(["a cab", "back", "a bad cab", "dab"][i])
    return folder


def test_pretrain_then_finetune_then_transformers_pipeline(pairs, tmp_path, one_thread):
    pretrain.main(["--audio-dir", str(pairs), "--steps", "2", "--output-dir", str(tmp_path / "pt"),
                   "--max-seconds", "0.3"] + SMALL)
    pretrained = UniSpeechForPreTraining.from_pretrained(str(tmp_path / "pt"))
    assert not os.path.exists(tmp_path / "pt" / "phonemes.json")  # unlabeled audio: no CTC term
    record = finetune.main(["--checkpoint", str(tmp_path / "pt"), "--train", str(pairs), "--eval", str(pairs),
                            "--steps", "2", "--batch-size", "2", "--output-dir", str(tmp_path / "ft"),
                            "--set", "mask_time_prob=0.0", "--kernel-backend", "torch", "--log-every", "1"])
    assert record["step"] == 2 and np.isfinite(record["loss"])
    with open(tmp_path / "ft" / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval_cer" in r]
    assert evals[-1]["step"] == 2 and 0 <= evals[-1]["eval_wer"]
    model = UniSpeechForCTC.from_pretrained(str(tmp_path / "ft"))
    assert torch.equal(model.unispeech.feature_extractor.conv_layers[0].conv.weight,  # frozen the whole run
                       pretrained.unispeech.feature_extractor.conv_layers[0].conv.weight)
    with open(tmp_path / "ft" / "vocab.json") as f:
        vocab = json.load(f)
    assert vocab == {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b", "c", "d", "k"])}

    from transformers import pipeline
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "ft"))
    assert type(asr.model).__name__ == "UniSpeechForCTC" and type(asr.tokenizer).__name__ == "Wav2Vec2CTCTokenizer"
    audio, rate = soundfile.read(str(pairs / "1.wav"), dtype="float32")
    text = asr({"raw": audio, "sampling_rate": rate})["text"]
    assert isinstance(text, str) and set(text) <= set("abcdk <>/sunp")
    with torch.no_grad():  # the pipeline runs the weights we saved
        ours = model(torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))[None]).logits
        theirs = asr.model(torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))[None]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("module", [pretrain, finetune])
def test_help_documents_every_flag(module, capsys):
    for action in module.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--resume", "--fsdp", "--on-bad-input", "--accumulate", "--precision", "--set"):
        assert flag in text


def test_bad_manifest_line_stops_before_training_and_skip_goes_on(pairs, tmp_path, one_thread):
    pretrain.main(["--audio-dir", str(pairs), "--steps", "1", "--output-dir", str(tmp_path / "pt")] + SMALL)
    (tmp_path / "train.tsv").write_text(f"{pairs}/0.wav\ta cab\n{pairs}/missing.wav\tcab\n{pairs}/1.wav\tback\n"
                                        f"{pairs}/2.wav\tbad\n")
    argv = ["--checkpoint", str(tmp_path / "pt"), "--train", str(tmp_path / "train.tsv"), "--steps", "1",
            "--batch-size", "2", "--output-dir", str(tmp_path / "ft"), "--kernel-backend", "torch"]
    with pytest.raises(SystemExit, match=r"train.tsv line 2: audio file .*missing.wav does not exist"):
        finetune.main(argv)
    assert not os.path.exists(tmp_path / "ft" / "log.jsonl")
    assert finetune.main(argv + ["--on-bad-input", "skip"])["step"] == 1
