"""bench/transformers_suite.py: the plugin that runs transformers' model tests with our kernels plugged in
(every model built patched once, heads with their base model; triton only where no attention is asked for)
and its outcome differ (junit xml and json lines, subtests: the worst outcome wins)."""
import json

import pytest

transformers = pytest.importorskip("transformers")

from bench import transformers_suite as suite  # noqa: E402
from unispeech_kernels import patch_model  # noqa: E402
from unispeech_kernels.integrations.patching import PatchedModule  # noqa: E402


def _tiny_config(**kwargs):
    return transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=20, conv_dim=(8, 8), conv_stride=(2, 2),
                                       conv_kernel=(3, 3), num_conv_pos_embeddings=4,
                                       num_conv_pos_embedding_groups=2, vocab_size=8, **kwargs)


@pytest.fixture
def wrapped(monkeypatch):
    """Wrap the model classes' constructors as the plugin does in a mode; restored after the test."""
    def wrap(mode):
        for cls in list(suite._model_classes()):
            monkeypatch.setattr(cls, "__init__", suite._wrapped_init(cls.__init__, mode, patch_model))
    return wrap


def test_model_classes_cover_every_family():
    names = {cls.__name__ for cls in suite._model_classes()}
    assert {"UniSpeechForCTC", "UniSpeechSatForXVector", "Wav2Vec2ForPreTraining", "HubertModel"} <= names


def test_patched_mode_patches_a_head_once_with_its_base_model(wrapped):
    wrapped("patched")
    model = transformers.Wav2Vec2ForCTC(_tiny_config())
    state = model._unispeech_kernels_patch
    assert state["patched"] == ["wav2vec2.feature_extractor", "wav2vec2.encoder.pos_conv_embed"]
    assert isinstance(model.wav2vec2.feature_extractor, PatchedModule)
    assert not hasattr(model.wav2vec2, "_unispeech_kernels_patch")  # the inner model is not patched on its own
    assert model.config._attn_implementation == "triton"


def test_triton_mode_keeps_an_attention_the_test_asked_for(wrapped):
    wrapped("triton")
    default = transformers.Wav2Vec2Model(_tiny_config())
    assert default.config._attn_implementation == "triton"
    assert not any(isinstance(m, PatchedModule) for m in default.modules())
    eager = transformers.Wav2Vec2Model(_tiny_config(attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"


def test_outcomes_worst_subtest_wins_and_diff_lists_regressions(tmp_path, capsys):
    base = tmp_path / "plain.xml"
    base.write_text('<testsuites><testsuite>'
                    '<testcase classname="tests.C" name="test_a"/>'
                    '<testcase classname="tests.C" name="test_b"/>'
                    '<testcase classname="tests.C" name="test_c"><skipped message="no hub"/></testcase>'
                    '</testsuite></testsuites>')
    other = tmp_path / "patched.jsonl"
    entries = [("tests.C::test_a", "passed", ""), ("run.tests.C::test_a", "failed", "AssertionError: 0 != 2"),
               ("tests.C::test_a", "passed", ""), ("tests.C::test_b", "passed", ""), ("tests.C::test_c", "skipped", "")]
    other.write_text("".join(json.dumps({"id": i, "outcome": o, "message": m, "seconds": 0}) + "\n"
                             for i, o, m in entries))
    assert suite.outcomes(str(base))["tests.C::test_c"] == ("skipped", "no hub")
    assert suite.outcomes(str(other)) == {"tests.C::test_a": ("failed", "AssertionError: 0 != 2"),
                                          "tests.C::test_b": ("passed", ""), "tests.C::test_c": ("skipped", "")}
    assert suite.main(["diff", str(base), str(other)]) == 0
    printed = capsys.readouterr().out
    assert "passed in the baseline, not here: 1" in printed and "tests.C::test_a" in printed
