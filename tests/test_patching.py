"""patch_model / unpatch_model on transformers' own UniSpeech, UniSpeechSat, Wav2Vec2 and HuBERT."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import unispeech_kernels  # noqa: E402,F401  (registers attn_implementation="triton")
from unispeech_kernels import patch_model, unpatch_model  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, vocab_size=12,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
            batch_invariant_group_norm=False)  # transformers' padded numerics: parity on padded batches

MODELS = {
    "unispeech": (transformers.UniSpeechConfig, transformers.UniSpeechForCTC),
    "unispeech-sat": (transformers.UniSpeechSatConfig, transformers.UniSpeechSatForCTC),
    "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2ForCTC),
    "hubert": (transformers.HubertConfig, transformers.HubertModel),
}
VARIANTS = [("group", False), ("layer", True)]  # (feat_extract_norm, do_stable_layer_norm)


def _model(kind, norm, stable, **extra):
    config_cls, model_cls = MODELS[kind]
    config = config_cls(**TINY, feat_extract_norm=norm, do_stable_layer_norm=stable, **extra)
    return model_cls(config).eval()


def _batch():
    audio = torch.randn(2, 1200)
    mask = torch.ones(2, 1200, dtype=torch.long)
    mask[1, 800:] = 0
    audio[1, 800:] = 0.0
    return audio, mask


def _real_frames(model, mask):
    lengths = model._get_feat_extract_output_lengths(mask.sum(-1))
    return [slice(0, int(n)) for n in lengths]


def _main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("norm,stable", VARIANTS)
def test_patched_matches_unpatched(kind, norm, stable):
    model = _model(kind, norm, stable)
    audio, mask = _batch()
    with torch.no_grad():
        ref = _main_output(model(audio, attention_mask=mask))
        keys = {k: v.clone() for k, v in model.state_dict().items()}
        patch_model(model)
        got = _main_output(model(audio, attention_mask=mask))
        assert model.state_dict().keys() == keys.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
        unpatch_model(model)
        back = _main_output(model(audio, attention_mask=mask))
    for rows in zip(_real_frames(model, mask), range(2)):
        frames, b = rows
        assert_close(got[b, frames], ref[b, frames])
    assert torch.equal(back, ref), "unpatch_model must restore bit-identical outputs"


@pytest.mark.parametrize("kind", ["unispeech", "wav2vec2"])
def test_patched_gradients_reach_original_parameters(kind):
    torch.manual_seed(0)
    model = _model(kind, "group", False)
    patched = _model(kind, "group", False)
    patched.load_state_dict(model.state_dict())
    patch_model(patched)
    audio, mask = _batch()
    grads = []
    for m in (model, patched):
        m.train()
        m.zero_grad()
        out = _main_output(m(audio, attention_mask=mask))
        frames = _real_frames(m, mask)
        loss = sum(out[b, frames[b]].square().sum() for b in range(2))
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-4, rtol=1e-4, msg=name)


def test_hubert_conv_pos_batch_norm():
    model = _model("hubert", "group", False, conv_pos_batch_norm=True)
    audio, mask = _batch()
    with torch.no_grad():
        ref = model(audio, attention_mask=mask).last_hidden_state
        patch_model(model)
        got = model(audio, attention_mask=mask).last_hidden_state
    for b, frames in enumerate(_real_frames(model, mask)):
        assert_close(got[b, frames], ref[b, frames])


def test_save_pretrained_after_patch(tmp_path):
    model = _model("wav2vec2", "group", False)
    patch_model(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_patch_twice_and_unpatch_unpatched_are_noops():
    model = _model("unispeech", "group", False)
    assert unpatch_model(model) is model
    patch_model(model)
    patch_model(model)
    unpatch_model(model)
    assert "forward" not in vars(model.unispeech.feature_extractor)


def test_unsupported_model_raises():
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="wav2vec2"):
        patch_model(bert)
    with pytest.raises(TypeError, match="supports"):
        patch_model(torch.nn.Linear(2, 2))


def test_a_module_that_cannot_be_patched_warns_and_keeps_its_forward():
    model = _model("wav2vec2", "group", False)
    model.wav2vec2.feature_extractor.conv_layers[1].conv.padding = (1,)  # no kernel takes padded convs
    with pytest.warns(UserWarning, match="feature_extractor keeps transformers' forward .*padding"):
        patch_model(model)
    wav2vec2_encoder = transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2FeatureEncoder
    assert type(model.wav2vec2.feature_extractor) is wav2vec2_encoder
    assert type(model.wav2vec2.encoder.pos_conv_embed).__name__.startswith("Patched")
    unpatch_model(model)


def test_a_model_configured_to_output_attentions_keeps_eager_attention():
    # setting config.output_attentions=True makes transformers build eager attention and refuse any other:
    # the triton one returns no weights, so patch_model leaves attention alone (and says so)
    config = transformers.Wav2Vec2Config(**TINY, feat_extract_norm="layer", do_stable_layer_norm=True)
    config.output_attentions = True
    model = transformers.Wav2Vec2ForCTC(config).eval()
    audio, mask = _batch()
    with torch.no_grad():
        expected = model(audio, attention_mask=mask).attentions
    with pytest.warns(UserWarning, match="attention keeps attn_implementation='eager'.*output_attentions"):
        patch_model(model)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        got = model(audio, attention_mask=mask).attentions
    assert len(got) == len(expected) == TINY["num_hidden_layers"]
    for layer, (weights, ref) in enumerate(zip(got, expected)):
        for row, frames in enumerate(_real_frames(model, mask)):
            assert_close(weights[row, :, frames, frames], ref[row, :, frames, frames], torch.float32,
                         f"attention weights of layer {layer}, row {row}")
    unpatch_model(model)
    assert model.config._attn_implementation == "eager"
