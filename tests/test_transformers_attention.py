"""attn_implementation="triton" inside transformers' own wav2vec2-family models: parity with "sdpa"
on the real frames of a padded batch, the padding mask actually reaching the kernel, from_pretrained,
gradients. Tiny random models; the kernels run through TRITON_INTERPRET=1 on CPU machines."""
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import unispeech_kernels  # noqa: E402,F401  (registers "triton" with transformers)
from tests.tolerances import assert_close, assert_error_within, key_bias_terms  # noqa: E402
from unispeech_kernels.integrations import transformers as integration  # noqa: E402
from unispeech_kernels.ops.attention import attention_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2, vocab_size=12, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
MODELS = {
    "unispeech": (transformers.UniSpeechConfig, transformers.UniSpeechModel),
    "unispeech-sat": (transformers.UniSpeechSatConfig, transformers.UniSpeechSatModel),
    "wav2vec2": (transformers.Wav2Vec2Config, transformers.Wav2Vec2Model),
    "hubert": (transformers.HubertConfig, transformers.HubertModel),
}


def _batch(lengths=(500, 290)):
    wave = torch.randn(len(lengths), max(lengths), device=DEVICE)
    mask = torch.arange(max(lengths), device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    return wave * mask, mask.long()


def _model(name, attn, **over):
    config_cls, model_cls = MODELS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **over, attn_implementation=attn)).to(DEVICE).eval()
    assert model.config._attn_implementation == attn
    return model


def _real_frames(model, out, mask):
    frames = model._get_feature_vector_attention_mask(out.shape[1], mask)
    return out[frames]


def test_registered_on_import():
    assert "triton" in transformers.AttentionInterface._global_mapping
    assert "triton" in transformers.masking_utils.AttentionMaskInterface._global_mapping
    assert integration.register_transformers_attention() is True  # idempotent


@pytest.mark.parametrize("name,stable", [(n, False) for n in MODELS] + [("wav2vec2", True)])
def test_matches_sdpa_on_real_frames(name, stable):
    """stable=True: the stable-layer-norm encoder variant (checked once, on Wav2Vec2)."""
    over = dict(do_stable_layer_norm=True, feat_extract_norm="layer") if stable else {}
    wave, mask = _batch()
    ref_model, model = _model(name, "sdpa", **over), _model(name, "triton", **over)
    with torch.no_grad():
        ref = ref_model(wave, attention_mask=mask).last_hidden_state
        out = model(wave, attention_mask=mask).last_hidden_state
    assert attention_op.last_reasons["triton"] is None  # the kernels ran (interpreter on CPU)
    assert_close(_real_frames(model, out, mask), _real_frames(model, ref, mask))


def test_padding_mask_reaches_the_kernel(monkeypatch):
    """transformers passes our bool [B, S] mask; without it the padded sample's frames would differ."""
    seen = []
    real_attention = integration.attention

    def spy(q, k, v, key_padding_mask=None, **kw):
        seen.append(key_padding_mask)
        return real_attention(q, k, v, key_padding_mask, **kw)

    monkeypatch.setattr(integration, "attention", spy)
    wave, mask = _batch()
    model = _model("unispeech", "triton")
    with torch.no_grad():
        out = model(wave, attention_mask=mask).last_hidden_state
        unmasked = _model("unispeech", "sdpa")(wave).last_hidden_state
    frames = model._get_feature_vector_attention_mask(out.shape[1], mask)
    assert len(seen) == TINY["num_hidden_layers"]
    assert all(m is not None and m.dtype == torch.bool and torch.equal(m, frames) for m in seen)
    assert not torch.allclose(out[1][frames[1]], unmasked[1][frames[1]], atol=1e-3)


def test_from_pretrained_triton(tmp_path):
    wave, mask = _batch()
    _model("unispeech", "sdpa").save_pretrained(tmp_path)
    model = transformers.UniSpeechModel.from_pretrained(tmp_path, attn_implementation="triton").to(DEVICE).eval()
    ref_model = transformers.UniSpeechModel.from_pretrained(tmp_path, attn_implementation="sdpa").to(DEVICE).eval()
    assert model.config._attn_implementation == "triton"
    with torch.no_grad():
        out = model(wave, attention_mask=mask).last_hidden_state
        ref = ref_model(wave, attention_mask=mask).last_hidden_state
    assert_close(_real_frames(model, out, mask), _real_frames(model, ref, mask))


def test_gradients_match_sdpa():
    """Every parameter's gradient through the Triton attention, against the fp64 model (SDPA), within
    the tolerance of SDPA's own fp32 gradients."""
    wave, mask = _batch((400, 250))
    grads = {}
    for attn, dtype in (("sdpa", torch.float64), ("sdpa", torch.float32), ("triton", torch.float32)):
        model = _model("hubert", attn).to(dtype)
        out = model(wave.to(dtype), attention_mask=mask).last_hidden_state
        frames = model._get_feature_vector_attention_mask(out.shape[1], mask)
        (out[frames] ** 2).sum().backward()
        grads[attn, dtype] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref, eager, got = grads.values()
    assert ref.keys() == eager.keys() == got.keys()
    for n in ref:
        assert_error_within(got[n], ref[n], eager[n], torch.float32, n, reduction=wave.numel(),
                            magnitude=key_bias_terms(n, ref))


def test_output_attentions_warns_and_causal_rejected(caplog):
    wave, mask = _batch()
    model = _model("wav2vec2", "triton")
    integration._warned.discard("output_attentions")
    with caplog.at_level(logging.WARNING, logger=integration.log.name), torch.no_grad():
        model(wave, attention_mask=mask, output_attentions=True)
    assert "output_attentions" in caplog.text
    q = torch.randn(1, 2, 5, 16)
    causal = type("M", (), {"is_causal": True})()
    with pytest.raises(ValueError, match="bidirectional only"):
        integration.triton_attention_forward(causal, q, q, q, None)
    from transformers.masking_utils import causal_mask_function
    with pytest.raises(ValueError, match="bidirectional attention"):
        integration.triton_mask(1, 5, 5, mask_function=causal_mask_function, attention_mask=None)
