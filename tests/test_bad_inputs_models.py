"""Bad input to the model layer: the four model classes, configs, from_pretrained /
save_pretrained, the processor, feature extractor and tokenizer, patch_model and the CLIs. Every
case ends in a clear error naming the argument, key or file, or in its documented result."""
import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import unispeech
import unispeech_kernels
from tests.bad_inputs import documented, exits, raises

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11, classifier_proj_size=8, codevector_dim=16,
            proj_codevector_dim=16, num_codevectors_per_group=7, num_labels=3)
CLASSES = ("UniSpeechModel", "UniSpeechForCTC", "UniSpeechForSequenceClassification", "UniSpeechForPreTraining")
NAN = float("nan")


def model(cls_name="UniSpeechModel", **kw):
    return getattr(unispeech, cls_name)(unispeech.UniSpeechConfig(**{**TINY, **kw})).eval()


def _input_cases():
    x = torch.randn(2, 400)
    return {
        "1-D": (lambda m: m(x[0]), ValueError, r"\[batch, samples\].*input_values\[None\]"),
        "3-D": (lambda m: m(x[None]), ValueError, r"must be \[batch, samples\]"),
        "int": (lambda m: m(x.long()), TypeError, "floating point audio"),
        "float64": (lambda m: m(x.double()), TypeError, "float64 but the model is torch.float32"),
        "empty batch": (lambda m: m(x[:0]), ValueError, "empty batch"),
        "too short": (lambda m: m(x[:, :39]), ValueError, "39 samples is shorter than the receptive field"),
        "list": (lambda m: m(x.tolist()), TypeError, "input_values must be a torch.Tensor"),
        "mask shape": (lambda m: m(x, attention_mask=torch.ones(2, 399)), ValueError,
                       r"attention_mask must have the shape of input_values \(2, 400\)"),
    }


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("case", sorted(_input_cases()))
def test_model_input_checks(case, cls_name):
    fn, error, pattern = _input_cases()[case]
    raises(lambda: fn(model(cls_name)), error, pattern)


def _first_output(out):
    return out.projected_states if hasattr(out, "projected_states") else out[0]


@pytest.mark.parametrize("cls_name", CLASSES)
@pytest.mark.parametrize("invariant", [False, True])
def test_nonfinite_padding_never_reaches_real_frames(cls_name, invariant):
    """NaN and Inf in the padded samples: the outputs are those of zero padding (the real frames'
    for frame outputs; the pooled logits of sequence classification). Batch-invariant statistics:
    large finite padding too."""
    m = model(cls_name, batch_invariant_group_norm=invariant)
    x = torch.randn(2, 800)
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 500:] = 0
    clean = x.clone()
    clean[1, 500:] = 0.0
    x[1, 500:] = NAN
    x[1, 600] = float("inf")
    if invariant:
        x[1, 700:] = 1e4 * torch.randn(100)
    with torch.no_grad():
        torch.manual_seed(0)
        got = _first_output(m(x, attention_mask=mask))
        torch.manual_seed(0)
        want = _first_output(m(clean, attention_mask=mask))
    if got.dim() == 3:
        real = m._get_feature_vector_attention_mask(got.shape[1], mask)
        got, want = got[real], want[real]
    documented(torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5), "padding read as zeros")


def _label_cases():
    x = torch.randn(2, 400)
    return {
        "label 3 of 3": (torch.tensor([0, 3]), ValueError, r"class ids in \[0, num_labels=3\) or -100, got \[3\]"),
        "label -2": (torch.tensor([-2, 1]), ValueError, r"got \[-2\]"),
        "float labels": (torch.tensor([0.0, 1.0]), TypeError, "integer class ids, got torch.float32"),
        "bool labels": (torch.tensor([True, False]), TypeError, "integer class ids, got torch.bool"),
        "list labels": ([0, 1], TypeError, "integer class ids, got list"),
        "3 labels for 2": (torch.tensor([0, 1, 2]), ValueError, r"one class id per utterance \(2\)"),
    }, x


@pytest.mark.parametrize("case", sorted(_label_cases()[0]))
def test_classification_labels(case):
    cases, x = _label_cases()
    labels, error, pattern = cases[case]
    raises(lambda: model("UniSpeechForSequenceClassification")(x, labels=labels), error, pattern)


def test_classification_ignored_label():
    out = model("UniSpeechForSequenceClassification")(torch.randn(2, 400), labels=torch.tensor([-100, 2]))
    documented(torch.isfinite(out.loss), "-100 is ignored, as cross_entropy's default")


def test_classification_without_real_frames():
    mask = torch.ones(2, 400, dtype=torch.long)
    mask[1, 30:] = 0  # fewer samples than the receptive field: 0 frames
    raises(lambda: model("UniSpeechForSequenceClassification")(torch.randn(2, 400), attention_mask=mask),
           ValueError, r"utterance\(s\) \[1\] no real frame: there is nothing to classify")


def test_ctc_labels_out_of_range():
    raises(lambda: model("UniSpeechForCTC")(torch.randn(2, 400), labels=torch.tensor([[1, 11]])), ValueError,
           r"Label values must be < vocab_size \(11\)")


# ------------------------------------------------------------------------------------------ configs

CONFIG_CASES = {
    "hidden_size str": (dict(hidden_size="abc"), TypeError, "'hidden_size' must be an int, got 'abc'"),
    "heads 0": (dict(num_attention_heads=0), ValueError, "'num_attention_heads' must be positive"),
    "heads float": (dict(num_attention_heads=2.0), TypeError, "'num_attention_heads' must be an int"),
    "conv_dim str": (dict(conv_dim="abc"), TypeError, "'conv_dim' must be a list of ints"),
    "conv_kernel float": (dict(conv_kernel=[10.0, 3, 3]), TypeError, "'conv_kernel' must be a list of ints"),
    "conv_stride 0": (dict(conv_stride=[5, 0, 2]), ValueError, "'conv_stride' must be positive"),
    "eps str": (dict(layer_norm_eps="small"), TypeError, "'layer_norm_eps' must be a number"),
    "stable str": (dict(do_stable_layer_norm="yes"), TypeError, "'do_stable_layer_norm' must be a bool"),
    "layers -1": (dict(num_hidden_layers=-1), ValueError, "'num_hidden_layers' must be >= 0"),
    "act int": (dict(hidden_act=3), TypeError, "'hidden_act' must be a string"),
    "norm": (dict(feat_extract_norm="batch"), ValueError, "feat_extract_norm must be 'group' or 'layer'"),
    "backend": (dict(kernel_backend="cudnn"), ValueError, "cudnn"),
    "num_labels": (dict(num_labels=2, id2label={0: "a"}), ValueError, "num_labels=2 does not match id2label"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_values(case):
    kw, error, pattern = CONFIG_CASES[case]
    raises(lambda: unispeech.UniSpeechConfig(**{**TINY, **kw}), error, pattern)


def test_config_vocab_size_none():
    documented(unispeech.UniSpeechConfig(vocab_size=None).vocab_size is None, "None allowed, as transformers")


@pytest.fixture
def saved(tmp_path):
    model("UniSpeechForCTC").save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("key,value,error,pattern", [
    ("hidden_size", "abc", TypeError, r"config.json: config field 'hidden_size' must be an int, got 'abc'"),
    ("conv_dim", [32, "x", 32], TypeError, r"config.json: config field 'conv_dim' must be a list of ints"),
    ("num_attention_heads", 0, ValueError, r"config.json: config field 'num_attention_heads' must be positive"),
    ("model_type", "bert", ValueError, "model_type 'bert'"),
])
def test_config_json_values(saved, key, value, error, pattern):
    config = json.loads((saved / "config.json").read_text())
    config[key] = value
    (saved / "config.json").write_text(json.dumps(config))
    raises(lambda: unispeech.UniSpeechForCTC.from_pretrained(saved), error, pattern)


@pytest.mark.parametrize("text,pattern", [("{not json", r"config.json is not valid JSON"),
                                          ("[1, 2]", r"config.json must hold a JSON object, got list")])
def test_config_json_files(saved, text, pattern):
    (saved / "config.json").write_text(text)
    raises(lambda: unispeech.UniSpeechForCTC.from_pretrained(saved), ValueError, pattern)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_from_pretrained_integer_weight(saved, dtype):
    state = load_file(saved / "model.safetensors")
    key = "lm_head.weight"
    state[key] = state[key].to(dtype)
    save_file(state, saved / "model.safetensors")
    raises(lambda: unispeech.UniSpeechForCTC.from_pretrained(saved), TypeError,
           f"lm_head.weight is {dtype}, the model's lm_head.weight is torch.float32")


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(torch_dtype="int8"), ValueError, "torch_dtype 'int8' is not a floating torch dtype"),
    (dict(dtype="float16", torch_dtype="float32"), ValueError, "disagree"),
    (dict(hiden_size=8), ValueError, "unknown config field 'hiden_size'"),
    (dict(hidden_size="abc"), TypeError, "'hidden_size' must be an int"),
    (dict(gguf_file="x.gguf"), ValueError, "GGUF"),
])
def test_from_pretrained_arguments(saved, kw, error, pattern):
    raises(lambda: unispeech.UniSpeechForCTC.from_pretrained(saved, **kw), error, pattern)


def test_from_pretrained_missing_folder(tmp_path):
    raises(lambda: unispeech.UniSpeechForCTC.from_pretrained(tmp_path / "nope"), OSError, "is not a local folder")


def test_from_pretrained_wrong_shapes(saved):
    raises(lambda: unispeech.UniSpeechForCTC.from_pretrained(saved, vocab_size=12), ValueError,
           r"shape-mismatched keys .*lm_head")


@pytest.mark.parametrize("size", ["abc", "-5GB", 0])
def test_save_pretrained_shard_size(tmp_path, size):
    raises(lambda: model().save_pretrained(tmp_path, max_shard_size=size), ValueError, "max_shard_size")


# ------------------------------------------------------------------ processor and feature extractor

def fe(**kw):
    return unispeech.UniSpeechFeatureExtractor(**kw)


EXTRACTOR_CASES = {
    "stereo numpy": (lambda: fe()(np.zeros((16000, 2), np.float32), sampling_rate=16000), ValueError,
                     r"looks like 2-channel audio \[samples, channels\].*mix it down"),
    "stereo torch": (lambda: fe()(torch.zeros(16000, 2), sampling_rate=16000), ValueError, "2-channel audio"),
    "3-D": (lambda: fe()(np.zeros((2, 2, 400)), sampling_rate=16000), ValueError, "mono utterance"),
    "empty list": (lambda: fe()([], sampling_rate=16000), ValueError, "empty batch"),
    "empty row": (lambda: fe()([np.zeros(0)], sampling_rate=16000), ValueError, "utterance 0 is empty"),
    "strings": (lambda: fe()(["a", "b"], sampling_rate=16000), TypeError, "audio samples must be numbers"),
    "dict": (lambda: fe()({"audio": 1}, sampling_rate=16000), TypeError, "raw_speech must be a numpy array"),
    "rate 8k": (lambda: fe()(np.zeros(400), sampling_rate=8000), ValueError, "sampled at 8000 Hz"),
    "max_length": (lambda: fe()(np.zeros(400), padding="max_length", sampling_rate=16000), ValueError,
                   "max_length"),
    "truncation": (lambda: fe()(np.zeros(400), truncation=True, sampling_rate=16000), ValueError,
                   "truncation=True needs max_length"),
    "rate str": (lambda: fe(sampling_rate="abc"), ValueError, "sampling_rate must be a positive int"),
    "rate 0": (lambda: fe(sampling_rate=0), ValueError, "sampling_rate must be a positive int"),
    "feature_size": (lambda: fe(feature_size=2), ValueError, "feature_size must be 1"),
    "padding_side": (lambda: fe(padding_side="middle"), ValueError, "padding_side must be"),
}


@pytest.mark.parametrize("case", sorted(EXTRACTOR_CASES))
def test_feature_extractor_arguments(case):
    fn, error, pattern = EXTRACTOR_CASES[case]
    raises(fn, error, pattern)


@pytest.mark.parametrize("normalize", [False, True])
def test_int16_pcm(caplog, normalize):
    """int16 PCM: normalised, its scale does not matter; unnormalised, it goes through unscaled with
    a warning (transformers passes it through too)."""
    pcm = (np.random.randn(400) * 3000).astype(np.int16)
    with caplog.at_level(logging.WARNING):
        out = fe(do_normalize=normalize)(pcm, sampling_rate=16000)["input_values"][0]
    warned = "unscaled" in caplog.text
    documented(warned != normalize and (normalize or np.array_equal(out, pcm.astype(np.float32))),
               "a warning exactly when unnormalised")


@pytest.mark.parametrize("name", ["preprocessor_config.json", "vocab.json", "tokenizer_config.json"])
@pytest.mark.parametrize("text,pattern", [("{oops", "is not valid JSON"), ('"a string"', "must hold a JSON object")])
def test_processor_files(tmp_path, name, text, pattern):
    processor = unispeech.UniSpeechProcessor(fe(), unispeech.UniSpeechCTCTokenizer(vocab={"<pad>": 0, "a": 1}))
    processor.save_pretrained(tmp_path)
    (tmp_path / name).write_text(text)
    raises(lambda: unispeech.UniSpeechProcessor.from_pretrained(tmp_path), ValueError, f"{name} {pattern}")


def test_preprocessor_config_bad_value(tmp_path):
    fe().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["sampling_rate"] = "abc"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    raises(lambda: unispeech.UniSpeechFeatureExtractor.from_pretrained(tmp_path), ValueError,
           r"preprocessor_config.json: sampling_rate must be a positive int \(Hz\), got 'abc'")


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(), ValueError, "exactly one of vocab_file"),
    (dict(vocab_file="/nonexistent/vocab.json"), FileNotFoundError, "does not exist"),
    (dict(vocab={"a": 0}, padding_side="up"), ValueError, "padding_side must be"),
])
def test_tokenizer_arguments(kw, error, pattern):
    raises(lambda: unispeech.UniSpeechCTCTokenizer(**kw), error, pattern)


# ---------------------------------------------------------------------------------- patch_model

@pytest.mark.parametrize("what,pattern", [
    ("ours", "this is unispeech's own model class"),
    ("linear", "got Linear"),
    ("none", "got NoneType"),
])
def test_patch_model_targets(what, pattern):
    target = {"ours": lambda: model(), "linear": lambda: torch.nn.Linear(2, 2), "none": lambda: None}[what]()
    raises(lambda: unispeech_kernels.patch_model(target), TypeError, pattern)


def _hf_model():
    import transformers
    return transformers.UniSpeechForCTC(transformers.UniSpeechConfig(**TINY)).eval()


def test_patch_model_unknown_backend():
    raises(lambda: unispeech_kernels.patch_model(_hf_model(), backend="cudnn"), ValueError, "cudnn")


def test_patch_model_twice_with_another_backend():
    m = unispeech_kernels.patch_model(_hf_model(), backend="torch")
    raises(lambda: unispeech_kernels.patch_model(m, backend="triton"), ValueError,
           "already patched with backend='torch'")


# ------------------------------------------------------------------------------------------- CLIs

@pytest.mark.parametrize("argv,pattern", [
    (["--batch", "0"], "must be positive"),
    (["--seconds", "nan"], "must be positive"),
    (["--seconds", "-1"], "must be positive"),
    (["--repeats", "0"], "must be positive"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--batch", "two"], "invalid int value: 'two'"),
    (["--checkpoint", "/nonexistent"], "is not a local folder"),
])
def test_run_cli(capsys, argv, pattern):
    from unispeech import run
    exits(lambda: run.parse_args(argv), capsys, pattern)


@pytest.mark.parametrize("argv,pattern", [
    (["--lr", "nan"], "--lr and --clip-norm must be > 0"),
    (["--lr", "0"], "--lr and --clip-norm must be > 0"),
    (["--steps", "0"], "must be >= 1"),
    (["--warmup", "0.8", "--hold", "0.5"], "summing to at most 1"),
    (["--final-lr-scale", "0"], "--final-lr-scale in"),
    (["--max-seconds", "nan"], "--max-seconds must be > 0"),
    (["--set", "hidden_size"], "FIELD=VALUE"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
])
def test_finetune_cli(capsys, argv, pattern):
    from unispeech import finetune
    base = ["--checkpoint", "c", "--train", "t", "--output-dir", "o"]
    exits(lambda: finetune.parse_args(base + argv), capsys, pattern)


# ------------------------------------------------------------------------------ forced alignment

def _aligner():
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", "a", "b", "c", "d", "e", "f"])}
    tokenizer = unispeech.UniSpeechCTCTokenizer(vocab=vocab)
    return model("UniSpeechForCTC"), unispeech.UniSpeechProcessor(fe(), tokenizer)


@pytest.mark.parametrize("audio,transcripts,kw,error,pattern", [
    (np.zeros(4000), "abc", {}, TypeError, "transcripts must be a list of strings"),
    (np.zeros((2, 4000)), ["a"], {}, ValueError, "2 utterances but 1 transcripts"),
    (np.zeros(4000), ["a"], dict(infeasible="skip"), ValueError, "infeasible must be 'raise' or 'mark'"),
    (np.zeros(4000), ["a"], dict(sampling_rate=8000), ValueError, "audio at 8000 Hz"),
    (np.zeros(4000), ["a"], dict(segments=[(0.1, 0.9)]), ValueError, r"segment 0 \(0.1, 0.9\) s is empty or outside"),
    (np.zeros((2, 4000)), ["a"], dict(segments=[(0.0, 0.1)]), ValueError, "audio must be one waveform"),
    (np.zeros((16000, 2)), ["a"], {}, ValueError, "2-channel audio"),
    (np.zeros(4000), ["abcdefabcdef" * 20], {}, ValueError, r"too short for their transcripts"),
])
def test_align_arguments(audio, transcripts, kw, error, pattern):
    m, processor = _aligner()
    raises(lambda: unispeech.align(m, processor, audio, transcripts, **kw), error, pattern)


@pytest.mark.parametrize("argv,pattern", [
    (["--ctc-weight", "2"], r"--ctc-weight must be in \[0, 1\]"),
    (["--ctc-weight", "nan"], r"--ctc-weight must be in \[0, 1\]"),
    (["--synthetic", "0"], "--synthetic must be >= 1"),
    (["--hidden-size", "30"], "positive multiple of 4"),
    (["--layers", "-1"], "--layers >= 0"),
    (["--accumulate", "0"], "must be >= 1"),
])
def test_pretrain_cli(capsys, argv, pattern):
    from unispeech import pretrain
    base = ["--synthetic", "4", "--output-dir", "o"]
    exits(lambda: pretrain.parse_args(base + argv), capsys, pattern)


def test_cli_without_its_data(capsys):
    from unispeech import pretrain
    exits(lambda: pretrain.parse_args(["--output-dir", "o"]), capsys, "one of the arguments --audio-dir")


def _tokenizer():
    return unispeech.UniSpeechCTCTokenizer(vocab={"<pad>": 0, "<unk>": 1, "|": 2, "a": 3})


@pytest.mark.parametrize("call,error,pattern", [
    (lambda t: t(123), TypeError, "text must be a str, got int"),
    (lambda t: t(["a", 5]), TypeError, "text must be a str, got int"),
    (lambda t: t.decode("abc"), TypeError, "decode takes a sequence of integer ids, got str"),
    (lambda t: t.decode([1.5, 3]), TypeError, r"integer ids .*got \[1.5\]"),
    (lambda t: t.decode([True]), TypeError, "integer ids"),
    (lambda t: t.decode([[1, 2]]), ValueError, "use batch_decode for a batch"),
    (lambda t: t.batch_decode(5), TypeError, "batch_decode expects"),
    (lambda t: t.batch_decode(np.zeros(3, np.int64)), ValueError, r"batch_decode expects \[batch, frames\]"),
    (lambda t: unispeech.UniSpeechProcessor(fe(), t)(), ValueError, "give audio, text or both"),
])
def test_tokenizer_calls(call, error, pattern):
    raises(lambda: call(_tokenizer()), error, pattern)


def test_tokenizer_unknown_id():
    documented(_tokenizer().decode([3, 99, -5]) == "a<unk>", "unknown ids: the (grouped) unk token, as transformers")
