"""unispeech.alignment: transcripts -> CTC targets (word delimiter, unknown characters -> star), token
and word spans with seconds, and align() end to end: exactly on a stub model whose frames emit the
classes written into the audio, and on small random-weight models (ours and transformers')."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import unispeech
import unispeech_kernels
from unispeech.alignment import align, emissions, encode_transcript
from unispeech.processing import UniSpeechCTCTokenizer, UniSpeechFeatureExtractor, UniSpeechProcessor
from tests.tolerances import assert_close

SR = 16000
HOP = 320  # samples per frame of the stub model: 0.02 s
VOCAB = {"<pad>": 0, "|": 1, "A": 2, "B": 3, "C": 4, "D": 5, "<unk>": 6}


class FrameModel(nn.Module):
    """A CTC 'model' whose frame f emits the class written into samples [320 f, 320 (f + 1)) of the
    audio (logits 8 for it, 0 for the others)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(conv_stride=[5, 4, 16])  # total stride 320
        self.anchor = nn.Parameter(torch.zeros(1))  # device and dtype

    def _get_feat_extract_output_lengths(self, samples):
        return samples // HOP

    def forward(self, input_values, attention_mask=None):
        frames = input_values.shape[1] // HOP
        ids = input_values[:, :frames * HOP].reshape(len(input_values), frames, HOP)[..., 0].round().long()
        return SimpleNamespace(logits=nn.functional.one_hot(ids, len(VOCAB)).float() * 8.0)


def _audio(classes):
    return np.repeat(np.asarray(classes, np.float32), HOP)


@pytest.fixture
def processor(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    return UniSpeechProcessor(UniSpeechFeatureExtractor(do_normalize=False),
                              UniSpeechCTCTokenizer(tmp_path / "vocab.json", do_lower_case=True))


P_TOP = float(torch.tensor([8.0] + [0.0] * (len(VOCAB) - 1)).softmax(0)[0])  # probability of the emitted class


def test_token_and_word_spans_in_seconds(processor):
    (seg,) = align(FrameModel(), processor, [_audio([0, 2, 2, 3, 0, 1, 4, 0, 2, 2])], ["ab ca"])
    assert [(t.token, t.start, t.end) for t in seg.tokens] == [("A", 1, 3), ("B", 3, 4), ("|", 5, 6), ("C", 6, 7),
                                                               ("A", 8, 10)]
    assert [(w.word, w.start, w.end) for w in seg.words] == [("ab", 1, 4), ("ca", 6, 10)]
    assert seg.words[1].start_time == pytest.approx(0.12) and seg.words[1].end_time == pytest.approx(0.2)
    assert all(t.score == pytest.approx(P_TOP) for t in seg.tokens) and seg.words[0].score == pytest.approx(P_TOP)
    assert (seg.start_time, seg.end_time, seg.feasible) == (0.0, pytest.approx(0.2), True)


def test_unknown_characters_become_one_star(processor):
    enc = encode_transcript(processor.tokenizer, "ab,; ca", star=7)
    assert enc.ids == [2, 3, 7, 1, 4, 2] and enc.texts == ["A", "B", ",;", "|", "C", "A"]
    assert enc.word_of == [0, 0, 0, -1, 1, 1]
    (seg,) = align(FrameModel(), processor, [_audio([0, 2, 3, 5, 0, 1, 4, 2])], ["ab,; ca"])
    assert [(t.token, t.token_id, t.start, t.end) for t in seg.tokens[:3]] == [("A", 2, 1, 2), ("B", 3, 2, 3),
                                                                                (",;", 7, 3, 4)]
    assert seg.tokens[2].score == pytest.approx(P_TOP * np.exp(-1.0))  # the star: best class, penalty -1
    assert [(w.word, w.start, w.end) for w in seg.words] == [("ab,;", 1, 4), ("ca", 6, 8)]
    dropped = encode_transcript(processor.tokenizer, "ab,; ca", star=7, unknown="drop")
    assert dropped.ids == [2, 3, 1, 4, 2]
    with pytest.raises(ValueError, match="unknown must be 'star' or 'drop'"):
        encode_transcript(processor.tokenizer, "ab", star=7, unknown="skip")


def test_segments_of_one_long_audio(processor):
    first, second = [0, 2, 2, 3, 0], [0, 4, 1, 2, 0, 0]
    long = np.concatenate([_audio(first), _audio([0] * 7), _audio(second)])
    segs = align(FrameModel(), processor, long, ["ab", "c a"], segments=[(0.0, 0.1), (0.24, 0.36)])
    alone = align(FrameModel(), processor, [_audio(first), _audio(second)], ["ab", "c a"])
    for seg, ref, offset in zip(segs, alone, (0.0, 0.24)):
        assert [(t.token, t.start, t.end) for t in seg.tokens] == [(t.token, t.start, t.end) for t in ref.tokens]
        assert [t.start_time for t in seg.tokens] == pytest.approx([t.start_time + offset for t in ref.tokens])
        assert seg.start_time == pytest.approx(offset)


def test_batch_size_changes_nothing(processor):
    audio = [_audio([0, 2, 3]), _audio([4, 0, 4, 0, 0, 1, 2]), _audio([3] * 4)]
    whole = align(FrameModel(), processor, audio, ["ab", "cc a", "b"])
    one_by_one = align(FrameModel(), processor, audio, ["ab", "cc a", "b"], batch_size=1)
    assert whole == one_by_one


def test_infeasible_segments(processor):
    audio = [_audio([0, 2, 3]), _audio([2])]
    with pytest.raises(ValueError, match=r"segment\(s\) \[1\] are too short .* 1 frames for 'a b'"):
        align(FrameModel(), processor, audio, ["ab", "a b"])
    segs = align(FrameModel(), processor, audio, ["ab", "a b"], infeasible="mark")
    assert [s.feasible for s in segs] == [True, False] and segs[1].words == []


def test_bad_arguments(processor):
    model = FrameModel()
    with pytest.raises(ValueError, match="2 utterances but 1 transcripts"):
        align(model, processor, [_audio([0]), _audio([0])], ["a"])
    with pytest.raises(TypeError, match="transcripts must be a list of strings"):
        align(model, processor, [_audio([0])], "a")
    with pytest.raises(ValueError, match="audio at 8000 Hz, the model expects 16000 Hz"):
        align(model, processor, [_audio([0])], ["a"], sampling_rate=8000)
    with pytest.raises(ValueError, match=r"segment 0 \(0.0, 9.0\) s is empty or outside"):
        align(model, processor, _audio([0, 2]), ["a"], segments=[(0.0, 9.0)])
    with pytest.raises(ValueError, match="with segments=, audio must be one waveform"):
        align(model, processor, [_audio([0]), _audio([0])], ["a"], segments=[(0.0, 0.01)])
    with pytest.raises(ValueError, match="infeasible must be 'raise' or 'mark'"):
        align(model, processor, [_audio([0])], ["a"], infeasible="skip")
    model.config.add_adapter = True
    with pytest.raises(ValueError, match="adapter"):
        align(model, processor, [_audio([0])], ["a"])


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, conv_dim=(32, 32, 32),
            conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5, num_conv_pos_embedding_groups=4,
            vocab_size=len(VOCAB), layerdrop=0.0, pad_token_id=0)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_our_model_batched_emissions_equal_single_utterances(processor, norm):
    """The packed forward of several segments gives each segment the emissions it gets alone (a
    group-norm feature encoder takes its statistics over each segment's real samples)."""
    config = unispeech.UniSpeechConfig(**TINY, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer")
    model = unispeech.UniSpeechForCTC(config).eval()
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (1600, 913, 2400)]
    log_probs, frames = emissions(model, processor, waves, SR)
    for wave, lp, n in zip(waves, log_probs, frames):
        alone, (n_alone,) = emissions(model, processor, [wave], SR)
        assert n == n_alone
        assert_close(lp[:n], alone[0, :n], name="log_probs")
    segs = align(model, processor, waves, ["ab ca", "d", "abc abc"])
    assert ["".join(t.token for t in s.tokens) for s in segs] == ["AB|CA", "D", "ABC|ABC"]
    assert [w.word for w in segs[2].words] == ["abc", "abc"]
    for s in segs:
        starts = [t.start for t in s.tokens]
        assert starts == sorted(starts) and s.tokens[-1].end_time <= s.end_time + 1e-9


def test_transformers_model_and_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    hf_processor = transformers.Wav2Vec2Processor(
        feature_extractor=transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True),
        tokenizer=transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), do_lower_case=True))
    config = transformers.Wav2Vec2Config(**TINY, feat_extract_norm="layer", do_stable_layer_norm=True)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (1600, 1200)]
    segs = align(model, hf_processor, waves, ["ab c", "dd"])
    assert ["".join(t.token for t in s.tokens) for s in segs] == ["AB|C", "DD"]
    ours = UniSpeechCTCTokenizer(tmp_path / "vocab.json", do_lower_case=True)
    for text in ("ab, c?", "d a  b"):
        a, b = (encode_transcript(tok, text, star=7) for tok in (ours, hf_processor.tokenizer))
        assert (a.ids, a.texts, a.word_of) == (b.ids, b.texts, b.word_of)


def test_patched_transformers_group_norm_model_aligns_each_segment_as_alone(tmp_path):
    """transformers' feature extractor returns no mask for group-norm models; align() asks for one
    when the model is patched, so each segment's emissions are the ones it gets alone."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    hf_processor = transformers.Wav2Vec2Processor(
        feature_extractor=transformers.Wav2Vec2FeatureExtractor(return_attention_mask=False),
        tokenizer=transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), do_lower_case=True))
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**TINY, feat_extract_norm="group")).eval()
    unispeech_kernels.patch_model(model)
    rng = np.random.default_rng(2)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (2400, 900)]
    log_probs, frames = emissions(model, hf_processor, waves, SR)
    for wave, lp, n in zip(waves, log_probs, frames):
        alone, _ = emissions(model, hf_processor, [wave], SR)
        assert_close(lp[:n], alone[0, :n], name="log_probs")
