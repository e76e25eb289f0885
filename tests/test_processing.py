"""unispeech.processing against transformers' Wav2Vec2FeatureExtractor / Wav2Vec2CTCTokenizer /
Wav2Vec2Processor on the same inputs (transformers is the reference; it is used only here)."""
import itertools
import json
import logging

import numpy as np
import pytest
import torch

from unispeech.processing import (
    UniSpeechCTCTokenizer,
    UniSpeechFeatureExtractor,
    UniSpeechProcessor,
    offsets_to_seconds,
)

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

SR = 16000
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "'": 5, "?": 6,
         **{chr(ord("A") + i): 7 + i for i in range(26)}}


def _batch(rng):
    """Lengths 7, 1 (a single sample: variance 0), 13, and a constant row of 4 (variance 0)."""
    return [rng.standard_normal(7).astype(np.float32) * 3 + 1, np.array([0.25], np.float32),
            rng.standard_normal(13).astype(np.float32), np.full(4, -2.0, np.float32)]


def _assert_same_features(ours, theirs):
    """Same keys, dtypes and values. With return_tensors=None we always give a list of rows, where
    transformers sometimes stacks equal-length rows into one array (when it skips normalisation)."""
    assert set(ours) == set(theirs)
    for key in theirs:
        a, b = ours[key], theirs[key]
        if isinstance(a, list):
            b = list(b)
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.dtype == y.dtype, key
                np.testing.assert_array_equal(x, y)
        else:
            assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, key
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------- feature extractor
FE_CASES = [
    dict(padding=True), dict(padding="longest", pad_to_multiple_of=8), dict(padding="max_length", max_length=16),
    dict(padding="max_length", max_length=10, truncation=True), dict(padding=False),
    dict(padding=False, truncation=True, max_length=5, pad_to_multiple_of=4),
    dict(padding="longest", truncation=True, max_length=9),
]


@pytest.mark.parametrize("case", FE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("return_attention_mask", [True, False, None])
@pytest.mark.parametrize("do_normalize", [True, False])
@pytest.mark.parametrize("padding_value", [0.0, 0.5])
def test_feature_extractor_matches_transformers(case, return_attention_mask, do_normalize, padding_value):
    raw = _batch(np.random.default_rng(1))
    config = dict(do_normalize=do_normalize, padding_value=padding_value, return_attention_mask=True)
    ours = UniSpeechFeatureExtractor(**config)(raw, sampling_rate=SR, return_attention_mask=return_attention_mask,
                                               **case)
    theirs = transformers.Wav2Vec2FeatureExtractor(**config)(
        raw, sampling_rate=SR, return_attention_mask=return_attention_mask, **case)
    _assert_same_features(ours, theirs)


@pytest.mark.parametrize("return_tensors", ["np", "pt"])
@pytest.mark.parametrize("default_mask", [True, False])
def test_feature_extractor_tensors_and_default_mask(return_tensors, default_mask):
    """The mask comes back whatever the config's return_attention_mask (a group-norm checkpoint's
    false included): the inputs transformers gives when asked for the mask."""
    raw = _batch(np.random.default_rng(2))
    ours = UniSpeechFeatureExtractor(return_attention_mask=default_mask)(
        raw, sampling_rate=SR, padding=True, return_tensors=return_tensors)
    theirs = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=default_mask)(
        raw, sampling_rate=SR, padding=True, return_tensors=return_tensors, return_attention_mask=True)
    _assert_same_features(ours, theirs)
    # the real part of each row is zero-mean / unit-variance, padding = padding_value
    values, mask = np.asarray(ours["input_values"]), np.asarray(ours["attention_mask"])
    for row, n, x in zip(values, mask.sum(1), raw):
        want = (x.astype(np.float64) - x.mean()) / np.sqrt(x.astype(np.float64).var() + 1e-7)
        np.testing.assert_allclose(row[:n], want, rtol=1e-5, atol=1e-5)
        assert (row[n:] == 0).all()
    unmasked = UniSpeechFeatureExtractor(return_attention_mask=default_mask)(
        raw, sampling_rate=SR, padding=True, return_tensors=return_tensors, return_attention_mask=False)
    _assert_same_features(unmasked, transformers.Wav2Vec2FeatureExtractor()(
        raw, sampling_rate=SR, padding=True, return_tensors=return_tensors, return_attention_mask=False))


@pytest.mark.parametrize("make", [
    lambda x: x, lambda x: x.astype(np.float64), lambda x: x.tolist(), lambda x: x[None, :],
    lambda x: [x.astype(np.float64)], lambda x: [x.tolist()], lambda x: np.stack([x, x[::-1]]),
], ids=["1d", "float64", "list", "2d", "list-f64", "list-of-lists", "2d-batch"])
def test_feature_extractor_input_kinds(make):
    x = np.random.default_rng(3).standard_normal(11).astype(np.float32)
    ours = UniSpeechFeatureExtractor()(make(x), sampling_rate=SR, padding=True)
    theirs = transformers.Wav2Vec2FeatureExtractor()(make(x), sampling_rate=SR, padding=True,
                                                     return_attention_mask=True)
    assert ours["input_values"][0].dtype == np.float32
    _assert_same_features(ours, theirs)


def test_feature_extractor_torch_and_int_inputs():
    """Tensors (1-D, 2-D, list, bf16) and integer samples give what float32 numpy input gives."""
    x = torch.randn(2, 9)
    fe = UniSpeechFeatureExtractor(return_attention_mask=True)
    want = fe(list(x.numpy()), sampling_rate=SR, padding=True, return_tensors="pt")
    for given in (x, list(x)):
        got = fe(given, sampling_rate=SR, padding=True, return_tensors="pt")
        torch.testing.assert_close(got["input_values"], want["input_values"], rtol=0, atol=0)
    single = fe(x[0], sampling_rate=SR, return_tensors="pt")
    torch.testing.assert_close(single["input_values"], want["input_values"][:1], rtol=0, atol=0)
    bf16 = fe(x.bfloat16(), sampling_rate=SR, padding=True, return_tensors="pt")
    assert bf16["input_values"].dtype == torch.float32
    ints = np.array([3, -7, 12, 0, 5], dtype=np.int16)
    got = fe(ints, sampling_rate=SR, return_tensors="np")["input_values"]
    ref = transformers.Wav2Vec2FeatureExtractor()(ints.astype(np.float32), sampling_rate=SR, return_tensors="np")
    np.testing.assert_array_equal(got, ref["input_values"])


def test_feature_extractor_left_padding():
    """Left padding: statistics over the real samples, zeros (padding_value) on the left of the mask."""
    raw = _batch(np.random.default_rng(4))
    fe = UniSpeechFeatureExtractor(padding_side="left", padding_value=0.5, return_attention_mask=True)
    out = fe(raw, sampling_rate=SR, padding=True, return_tensors="np")
    right = UniSpeechFeatureExtractor(padding_value=0.5, return_attention_mask=True)(
        raw, sampling_rate=SR, padding=True, return_tensors="np")
    for row, mask, ref, ref_mask in zip(out["input_values"], out["attention_mask"],
                                        right["input_values"], right["attention_mask"]):
        n = int(mask.sum())
        np.testing.assert_array_equal(mask, ref_mask[::-1])
        np.testing.assert_array_equal(row[len(row) - n:], ref[:n])
        assert (row[:len(row) - n] == 0.5).all()


@pytest.mark.parametrize("raw, kwargs, error, match", [
    (np.zeros(10), dict(sampling_rate=8000), ValueError, "8000 Hz"),
    ([np.zeros((2, 10))], {}, ValueError, "1-D mono"),
    (np.zeros((2, 2, 10)), {}, ValueError, "shape"),
    ([], {}, ValueError, "empty batch"),
    ([np.zeros(3), np.zeros(0)], {}, ValueError, "utterance 1 is empty"),
    ([0.1, np.zeros(3)], {}, ValueError, "mixes"),
    ("audio.wav", {}, TypeError, "numpy array"),
    (np.array(["a", "b"]), {}, TypeError, "numbers"),
    (np.zeros(10), dict(padding="shortest"), ValueError, "unknown padding mode"),
    (np.zeros(10), dict(padding="max_length"), ValueError, "needs max_length"),
    (np.zeros(10), dict(truncation=True), ValueError, "needs max_length"),
    ([np.zeros(3), np.zeros(4)], dict(return_tensors="pt"), ValueError, "different lengths"),
    (np.zeros(3), dict(return_tensors="tf"), ValueError, "return_tensors"),
])
def test_feature_extractor_bad_input(raw, kwargs, error, match):
    kwargs.setdefault("sampling_rate", SR)
    with pytest.raises(error, match=match):
        UniSpeechFeatureExtractor()(raw, **kwargs)


def test_feature_extractor_files(tmp_path):
    ours = UniSpeechFeatureExtractor(return_attention_mask=True, do_normalize=False, padding_value=0.25)
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path / "ours")
    assert {k: theirs.to_dict()[k] for k in ours.to_dict()} == ours.to_dict()
    theirs.sampling_rate = 8000
    theirs.save_pretrained(tmp_path / "theirs")
    back = UniSpeechFeatureExtractor.from_pretrained(tmp_path / "theirs")
    assert (back.sampling_rate, back.return_attention_mask, back.do_normalize, back.padding_value) == \
        (8000, True, False, 0.25)
    assert UniSpeechFeatureExtractor.from_pretrained(tmp_path / "theirs", do_normalize=True).do_normalize
    with pytest.raises(OSError, match="not a local folder"):
        UniSpeechFeatureExtractor.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        UniSpeechFeatureExtractor.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="feature_size"):
        UniSpeechFeatureExtractor(feature_size=2)


# ---------------------------------------------------------------------------------- tokenizer
def _vocab_dir(tmp_path, vocab=VOCAB, name="vocab"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    return folder


def _pair(tmp_path, vocab=VOCAB, **kwargs):
    path = _vocab_dir(tmp_path, vocab) / "vocab.json"
    return UniSpeechCTCTokenizer(path, **kwargs), transformers.Wav2Vec2CTCTokenizer(str(path), **kwargs)


TEXTS = ["HELLO WORLD", "A  B", " LEADING AND TRAILING ", "WHAT'S UP?", "UNKNOWN: é!", "<pad>X <unk> Y",
         "WITH</s>EOS  <s> ", "THE CAT", "Q", "", "hello World"]


@pytest.mark.parametrize("do_lower_case", [False, True])
@pytest.mark.parametrize("multichar", [False, True])
def test_tokenizer_encode_matches_transformers(tmp_path, do_lower_case, multichar):
    vocab = {**VOCAB, "TH": 33, "CAT": 34} if multichar else VOCAB
    ours, theirs = _pair(tmp_path, vocab, do_lower_case=do_lower_case)
    for text in TEXTS:
        assert ours.tokenize(text) == theirs.tokenize(text), text
        assert ours(text) == dict(theirs(text)), text
    assert ours(TEXTS) == dict(theirs(TEXTS))
    for kwargs in (dict(padding=True), dict(padding="max_length", max_length=30),
                   dict(padding=True, pad_to_multiple_of=8), dict(truncation=True, max_length=4, padding=True)):
        got, want = ours(TEXTS, return_tensors="pt", **kwargs), theirs(TEXTS, return_tensors="pt", **kwargs)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (kwargs, key)
    got, want = ours("HELLO", return_tensors="np"), theirs("HELLO", return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert (len(ours), ours.vocab_size, ours.pad_token_id, ours.word_delimiter_token_id) == (
        len(theirs), theirs.vocab_size, theirs.pad_token_id, theirs.word_delimiter_token_id)


def _random_ctc_ids(rng, length, vocab_size):
    """CTC-like frame ids: many blanks (0), repeats, delimiters (4), specials and out-of-vocab ids."""
    ids = rng.choice([0, 0, 0, 4, 1, 3, 7, 8, 9, 20, 31, 99], size=length)
    repeat = rng.random(length) < 0.4
    for i in range(1, length):
        if repeat[i]:
            ids[i] = ids[i - 1]
    return ids.tolist()


@pytest.mark.parametrize("do_lower_case, clean_up", [(False, False), (True, False), (False, True)])
def test_tokenizer_decode_matches_transformers(tmp_path, do_lower_case, clean_up):
    ours, theirs = _pair(tmp_path, do_lower_case=do_lower_case, clean_up_tokenization_spaces=clean_up)
    rng = np.random.default_rng(5)
    sequences = [[], [0], [7], [4, 4, 7, 0, 7, 4]] + [_random_ctc_ids(rng, n, len(VOCAB)) for n in (2, 9, 40, 41, 64)]
    sequences.append([ours.convert_tokens_to_ids(c) for c in "WHAT|'S|UP|?|,|."])
    flags = itertools.product([False, True], [False, True], [False, True], [False, True])
    for ids, (skip, group, offsets, spaces) in itertools.product(sequences, flags):
        kwargs = dict(skip_special_tokens=skip, group_tokens=group, spaces_between_special_tokens=spaces,
                      output_char_offsets=offsets, output_word_offsets=offsets)
        got, want = ours.decode(ids, **kwargs), theirs.decode(ids, **kwargs)
        if offsets:
            assert (got.text, got.char_offsets, got.word_offsets) == (
                want.text, want.char_offsets, want.word_offsets), (ids, kwargs)
        else:
            assert got == want, (ids, kwargs)
    for only in ("output_char_offsets", "output_word_offsets"):
        got, want = ours.decode(sequences[-2], **{only: True}), theirs.decode(sequences[-2], **{only: True})
        assert (got.char_offsets, got.word_offsets) == (want.char_offsets, want.word_offsets)
    assert ours.decode(7) == theirs.decode(7) and ours.decode(np.int64(1)) == theirs.decode(np.int64(1))


def test_tokenizer_batch_decode_matches_transformers(tmp_path):
    ours, theirs = _pair(tmp_path)
    rng = np.random.default_rng(6)
    ids = torch.tensor([_random_ctc_ids(rng, 33, len(VOCAB)) for _ in range(3)])
    for batch in (ids, ids.numpy(), ids.tolist()):
        assert ours.batch_decode(batch) == theirs.batch_decode(batch)
        got = ours.batch_decode(batch, output_char_offsets=True, output_word_offsets=True)
        want = theirs.batch_decode(batch, output_char_offsets=True, output_word_offsets=True)
        assert (got.text, got.char_offsets, got.word_offsets) == (want.text, want.char_offsets, want.word_offsets)
    assert ours.decode(ids[0]) == theirs.decode(ids[0])
    with pytest.raises(ValueError, match="batch, frames"):
        ours.batch_decode(ids[0])
    with pytest.raises(ValueError, match="batch_decode"):
        ours.decode(ids.tolist())


def test_tokenizer_ctc_rules_and_seconds(tmp_path):
    """Hand-checked: repeats merge, a blank between repeats keeps both, delimiter -> space, offsets."""
    tok, _ = _pair(tmp_path)
    A, B, C, bar, blank = (tok.convert_tokens_to_ids(t) for t in ("A", "B", "C", "|", "<pad>"))
    ids = [blank, A, A, blank, A, bar, bar, B, B, B, blank, C, bar]
    out = tok.decode(ids, output_char_offsets=True, output_word_offsets=True)
    assert out.text == "AA BC"
    assert [(c["char"], c["start_offset"], c["end_offset"]) for c in out.char_offsets] == [
        ("A", 1, 3), ("A", 4, 5), (" ", 5, 7), ("B", 7, 10), ("C", 11, 12), (" ", 12, 13)]
    assert out.word_offsets == [{"word": "AA", "start_offset": 1, "end_offset": 5},
                                {"word": "BC", "start_offset": 7, "end_offset": 12}]
    assert tok.decode(ids, group_tokens=False) == "AAA  BBBC"
    timed = offsets_to_seconds(out.word_offsets, inputs_to_logits_ratio=320, sampling_rate=SR)
    assert [(w["word"], w["start_time"], w["end_time"]) for w in timed] == [("AA", 0.02, 0.1), ("BC", 0.14, 0.24)]
    assert offsets_to_seconds([{"start_offset": 1, "end_offset": 3}], 320, 48000, ndigits=3) == [
        {"start_offset": 1, "end_offset": 3, "start_time": 0.007, "end_time": 0.02}]
    with pytest.raises(ValueError, match="positive"):
        offsets_to_seconds(out.word_offsets, 0, SR)


def test_tokenizer_files(tmp_path):
    ours = UniSpeechCTCTokenizer(_vocab_dir(tmp_path) / "vocab.json", do_lower_case=True, word_delimiter_token="|")
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.Wav2Vec2CTCTokenizer.from_pretrained(tmp_path / "ours")
    ids = [0, 7, 7, 4, 0, 8, 3, 99, 4, 9]
    assert theirs.do_lower_case and theirs.get_vocab() == ours.get_vocab()
    assert theirs.decode(ids) == ours.decode(ids) and theirs("Ab c")["input_ids"] == ours("Ab c")["input_ids"]
    theirs.add_tokens(["<new>"])
    theirs.save_pretrained(tmp_path / "theirs")
    back = UniSpeechCTCTokenizer.from_pretrained(tmp_path / "theirs")
    assert back.get_vocab() == theirs.get_vocab() and back.do_lower_case
    assert back("A<new>B")["input_ids"] == theirs("A<new>B")["input_ids"]
    assert back.decode(ids + [len(VOCAB)]) == theirs.decode(ids + [len(VOCAB)])
    assert UniSpeechCTCTokenizer.from_pretrained(tmp_path / "theirs", do_lower_case=False).decode([7]) == "A"


def test_tokenizer_nested_vocab_and_missing_specials(tmp_path):
    nested = {"eng": VOCAB, "xyz": {"<pad>": 0, "|": 1, "X": 2, "Y": 3}}
    folder = _vocab_dir(tmp_path, nested, "nested")
    ours = UniSpeechCTCTokenizer(folder / "vocab.json", target_lang="xyz", unk_token="<unk>")
    theirs = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), target_lang="xyz")
    assert ours.get_vocab() == theirs.get_vocab()  # missing <s>, </s>, <unk> are appended after the vocab
    got, want = ours("XY YX Q")["input_ids"], theirs("XY YX Q")["input_ids"]
    # an unknown character maps to the appended <unk> id; transformers yields None there
    assert got == want[:-1] + [ours.unk_token_id] == [2, 3, 1, 3, 2, 1, 6] and want[-1] is None
    assert ours.decode([0, 2, 2, 1, 3, 6, 6]) == theirs.decode([0, 2, 2, 1, 3, 6, 6])
    with pytest.raises(ValueError, match="target_lang"):
        UniSpeechCTCTokenizer(folder / "vocab.json")
    with pytest.raises(ValueError, match="not a language"):
        UniSpeechCTCTokenizer(folder / "vocab.json", target_lang="fra")


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UniSpeechCTCTokenizer(tmp_path / "nope.json")
    (tmp_path / "no_vocab").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        UniSpeechCTCTokenizer.from_pretrained(tmp_path / "no_vocab")
    with pytest.raises(OSError, match="not a local folder"):
        UniSpeechCTCTokenizer.from_pretrained("facebook/wav2vec2-base-960h")
    tok, _ = _pair(tmp_path)
    with pytest.raises(ValueError, match="unknown padding mode"):
        tok(["A"], padding="everything")
    with pytest.raises(ValueError, match="different lengths"):
        tok(["A", "BB"], return_tensors="pt")
    with pytest.raises(ValueError, match="empty batch"):
        tok([])
    with pytest.raises(TypeError, match="must be a str"):
        tok([3])


# ---------------------------------------------------------------------------------- processor
def test_processor_matches_transformers_and_pads_labels(tmp_path):
    tok, hf_tok = _pair(tmp_path)
    fe = UniSpeechFeatureExtractor(return_attention_mask=True)
    proc = UniSpeechProcessor(fe, tok)
    hf_proc = transformers.Wav2Vec2Processor(transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True), hf_tok)
    raw, texts = _batch(np.random.default_rng(7))[:3], ["HELLO", "A B", "CTC IS FUN"]
    got = proc(audio=raw, text=texts, sampling_rate=SR, return_tensors="pt")
    want = hf_proc(audio=raw, text=texts, sampling_rate=SR, padding=True, return_tensors="pt")
    torch.testing.assert_close(got["input_values"], want["input_values"], rtol=0, atol=0)
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    mask = hf_tok(texts, padding=True, return_tensors="pt")["attention_mask"]
    assert torch.equal(got["labels"], want["labels"].masked_fill(mask == 0, -100))
    assert (got["labels"] == -100).sum() == (mask == 0).sum() > 0
    lists = proc(audio=raw, text=texts, sampling_rate=SR)
    assert lists["labels"] == got["labels"].tolist()
    one = proc(audio=raw[0], text="HI", sampling_rate=SR, return_tensors="np")
    assert one["labels"].tolist() == [hf_tok("HI")["input_ids"]]
    assert proc(text=texts) == dict(hf_tok(texts, padding=True))
    assert proc(text=texts, padding=False) == dict(hf_tok(texts))
    assert proc.batch_decode(got["labels"].clamp(min=0)) == ["HELO", "A B", "CTC IS FUN"]
    assert proc.decode([7, 7, 0, 7]) == "AA"
    assert proc.offsets_to_seconds([{"start_offset": 50, "end_offset": 100}], 320)[0]["end_time"] == 2.0
    with pytest.raises(ValueError, match="one text per utterance"):
        proc(audio=raw, text=texts[:2], sampling_rate=SR)
    with pytest.raises(ValueError, match="audio, text or both"):
        proc()
    with pytest.raises(TypeError, match="UniSpeechCTCTokenizer"):
        UniSpeechProcessor(fe, hf_tok)


def test_processor_files(tmp_path):
    tok, _ = _pair(tmp_path)
    proc = UniSpeechProcessor(UniSpeechFeatureExtractor(return_attention_mask=True), tok)
    proc.save_pretrained(tmp_path / "ours")
    hf_proc = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "ours")
    assert hf_proc.feature_extractor.return_attention_mask and hf_proc.tokenizer.get_vocab() == tok.get_vocab()
    hf_proc.save_pretrained(tmp_path / "theirs")  # transformers 5 writes processor_config.json
    back = UniSpeechProcessor.from_pretrained(tmp_path / "theirs")
    assert back.feature_extractor.to_dict() == proc.feature_extractor.to_dict()
    assert back.tokenizer.get_vocab() == tok.get_vocab()
    raw = np.random.default_rng(8).standard_normal(20)
    np.testing.assert_array_equal(back(raw, sampling_rate=SR, return_tensors="np")["input_values"],
                                  hf_proc(raw, sampling_rate=SR, return_tensors="np")["input_values"])
