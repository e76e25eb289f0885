"""patch_model / unpatch_model on transformers' WavLM: every head, both layer-norm variants, padded
batches, training gradients, attention weights, a tensor position_bias, reversibility."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from unispeech_kernels import patch_model, unpatch_model  # noqa: E402
from unispeech_kernels.integrations.patching import PatchedRelPosAttention  # noqa: E402
from unispeech_kernels.ops.rel_pos_attention import rel_pos_attention_op  # noqa: E402
from tests.test_patching import _batch  # noqa: E402  (2 x 1200 samples, the second padded after 800)
from tests.tolerances import assert_close, assert_error_within, key_bias_terms  # noqa: E402

# 16 buckets up to distance 20: ~59 frames of 1200 samples reach past max_distance
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4, vocab_size=12, num_buckets=16, max_bucket_distance=20,
            hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, tdnn_dim=(8, 8), tdnn_kernel=(3, 1),
            tdnn_dilation=(1, 1), xvector_output_dim=8, num_labels=3)
HEADS = ["WavLMModel", "WavLMForCTC", "WavLMForSequenceClassification", "WavLMForAudioFrameClassification",
         "WavLMForXVector"]
VARIANTS = [("group", False), ("layer", True)]  # (feat_extract_norm, do_stable_layer_norm)


def _model(head="WavLMModel", norm="group", stable=False):
    # transformers' padded group-norm numerics (patch_model's default takes per-utterance statistics)
    config = transformers.WavLMConfig(**TINY, feat_extract_norm=norm, do_stable_layer_norm=stable,
                                      batch_invariant_group_norm=False)
    model = getattr(transformers, head)(config).eval()
    with torch.no_grad():  # a bias and gates that matter: the init's are near zero and constant
        for module in model.modules():
            if hasattr(module, "gru_rel_pos_const"):
                module.gru_rel_pos_const.uniform_(0.5, 1.5)
                module.gru_rel_pos_linear.weight.normal_()
                if hasattr(module, "rel_attn_embed"):
                    module.rel_attn_embed.weight.normal_()
    return model


def _outputs(out):
    """The per-frame outputs of a head (real frames compared) and its pooled ones (compared whole)."""
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state, None
    if isinstance(out, transformers.modeling_outputs.XVectorOutput):
        return None, torch.cat([out.logits, out.embeddings], dim=-1)
    framewise = out.logits.dim() == 3
    return (out.logits, None) if framewise else (None, out.logits)


def _compare(model, got, ref, mask):
    (got_frames, got_pooled), (ref_frames, ref_pooled) = _outputs(got), _outputs(ref)
    if got_frames is not None:
        for b, n in enumerate(model._get_feat_extract_output_lengths(mask.sum(-1)).tolist()):
            assert_close(got_frames[b, :n], ref_frames[b, :n], name=f"frames of sequence {b}")
    if got_pooled is not None:
        assert_close(got_pooled, ref_pooled, name="pooled")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("norm,stable", VARIANTS)
def test_patched_matches_transformers(head, norm, stable):
    model = _model(head, norm, stable)
    audio, mask = _batch()
    with torch.no_grad():
        ref = model(audio, attention_mask=mask)
        keys = {k: v.clone() for k, v in model.state_dict().items()}
        patch_model(model)
        assert sum(isinstance(m, PatchedRelPosAttention) for m in model.modules()) == TINY["num_hidden_layers"]
        got = model(audio, attention_mask=mask)
        assert rel_pos_attention_op.last_reasons.get("torch") is None  # the op ran, not transformers' forward
        assert model.state_dict().keys() == keys.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
        unpatch_model(model)
        back = model(audio, attention_mask=mask)
    _compare(model, got, ref, mask)
    for restored, original in zip(_outputs(back), _outputs(ref)):
        assert restored is None or torch.equal(restored, original), "unpatch_model must restore bit-identical outputs"


def test_unpadded_batch_matches_transformers():
    model = _model("WavLMForCTC", "layer", True)
    audio = torch.randn(2, 1000)
    with torch.no_grad():
        ref = model(audio).logits
        got = patch_model(model)(audio).logits
    assert_close(got, ref)


@pytest.mark.parametrize("norm,stable", VARIANTS)
def test_training_gradients_within_transformers_own_error(norm, stable):
    """Every parameter's gradient (training mode, padded batch): ours in fp32 within 2x transformers'
    own fp32 error of transformers in fp64."""
    audio, mask = _batch()
    models = {"ref": _model("WavLMForCTC", norm, stable)}
    models["eager"] = _model("WavLMForCTC", norm, stable)
    models["ours"] = _model("WavLMForCTC", norm, stable)
    for name in ("eager", "ours"):
        models[name].load_state_dict(models["ref"].state_dict())
    models["ref"].double()
    patch_model(models["ours"])
    lengths = models["ref"]._get_feat_extract_output_lengths(mask.sum(-1)).tolist()
    grads, weights = {}, None
    for name, m in models.items():
        m.train()
        out = m(audio.to(next(m.parameters()).dtype), attention_mask=mask).logits
        if weights is None:
            weights = torch.randn(out.shape, dtype=torch.float64)
        loss = sum((out[b, :n] * weights[b, :n].to(out.dtype)).sum() for b, n in enumerate(lengths))
        loss.backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["ours"].keys() == grads["ref"].keys()
    assert any("rel_attn_embed" in n for n in grads["ours"]) and any("gru_rel_pos" in n for n in grads["ours"])
    for n, ref in grads["ref"].items():
        assert_error_within(grads["ours"][n], ref, grads["eager"][n], torch.float32, n, reduction=sum(lengths),
                            magnitude=key_bias_terms(n, grads["ref"]))


def test_output_attentions_runs_transformers_forward_with_a_warning():
    model = _model()
    audio, mask = _batch()
    with torch.no_grad():
        ref = model(audio, attention_mask=mask, output_attentions=True)
        patch_model(model)
        with pytest.warns(UserWarning, match="output_attentions"):
            got = model(audio, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == TINY["num_hidden_layers"]
    for a, r in zip(got.attentions, ref.attentions):
        assert_close(a, r, name="attention weights")
    _compare(model, got, ref, mask)


def test_tensor_position_bias_runs_transformers_forward():
    model = _model()
    attn = model.encoder.layers[0].attention
    hidden = torch.randn(2, 30, TINY["hidden_size"])
    with torch.no_grad():
        bias = attn.compute_bias(30, 30)[None].expand(2, -1, -1, -1).reshape(2 * 4, 30, 30)
        ref = attn(hidden, position_bias=bias)
        patch_model(model)
        got = attn(hidden, position_bias=bias)
        ours, _, passed = attn(hidden)
    assert torch.equal(got[0], ref[0]) and got[2] is bias
    assert_close(ours, ref[0])
    assert passed.table is attn.rel_attn_embed.weight and passed.gate is None


def test_patch_unpatch_round_trip_and_forced_backend():
    model = _model("WavLMForCTC")
    audio, mask = _batch()
    with torch.no_grad():
        ref = model(audio, attention_mask=mask).logits
        patch_model(model, backend="torch")
        got = model(audio, attention_mask=mask).logits
        unpatch_model(model)
    assert not any(isinstance(m, PatchedRelPosAttention) for m in model.modules())
    assert "forward" not in vars(model.wavlm.encoder.layers[0].attention)
    for b, n in enumerate(model._get_feat_extract_output_lengths(mask.sum(-1)).tolist()):
        assert_close(got[b, :n], ref[b, :n])
    with torch.no_grad():
        assert torch.equal(model(audio, attention_mask=mask).logits, ref)
