"""Model-level behaviour beyond parity: input checks, padding invariance, backend and attention
switches, the config file format, the weight-norm fold cache, output objects, freezing."""
import json
import math

import pytest
import torch
import transformers

import unispeech
from tests.tolerances import assert_close
from unispeech.configuration import HF_DEFAULTS
from unispeech_kernels import BackendUnavailableError

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11)


def model(cls=unispeech.UniSpeechModel, **kw):
    return cls(unispeech.UniSpeechConfig(**{**TINY, **kw})).eval()


def test_bad_inputs():
    m = model()
    good = torch.randn(2, 400)
    cases = [
        (torch.randn(400), ValueError, r"\[batch, samples\].*input_values\[None\]"),
        (torch.randn(1, 2, 400), ValueError, r"\[batch, samples\]"),
        (torch.zeros(2, 400, dtype=torch.long), TypeError, "floating point"),
        (good.double(), TypeError, "float64 but the model is torch.float32"),
        (torch.randn(0, 400), ValueError, "empty batch"),
        (torch.randn(2, 39), ValueError, "39 samples is shorter than the receptive field .*40 samples"),
        ([0.0] * 400, TypeError, "torch.Tensor"),
    ]
    for x, error, message in cases:
        with pytest.raises(error, match=message):
            m(x)
    m(torch.randn(2, 40))  # exactly the receptive field: one frame
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_values \(2, 400\)"):
        m(good, attention_mask=torch.ones(2, 399))
    with pytest.raises(ValueError, match="mask_time_indices must have shape"):
        model(mask_time_prob=0.1)(good, mask_time_indices=torch.ones(2, 5, dtype=torch.bool))


def test_nan_input_propagates():
    """Documented behaviour: NaN audio is not checked, it reaches the outputs (no crash)."""
    x = torch.randn(2, 400)
    x[0, 100] = float("nan")
    with torch.no_grad():
        out = model(unispeech.UniSpeechForCTC)(x).logits
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("norm,invariant", [("layer", False), ("group", True)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_equals_single_on_real_frames(norm, invariant, attn):
    m = model(feat_extract_norm=norm, batch_invariant_group_norm=invariant, attn_implementation=attn)
    lengths = [901, 517, 40]
    x = torch.zeros(3, 901)
    mask = torch.zeros(3, 901, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randn(n)
        mask[b, :n] = 1
    with torch.no_grad():
        batched = m(x, attention_mask=mask).last_hidden_state
        for b, n in enumerate(lengths):
            single = m(x[b:b + 1, :n]).last_hidden_state
            frames = single.shape[1]
            assert frames == m._get_feat_extract_output_lengths(n)
            assert_close(batched[b:b + 1, :frames], single)


def test_attention_implementations_agree():
    m = model(unispeech.UniSpeechForCTC, hidden_size=48, num_attention_heads=2, num_conv_pos_embedding_groups=4)
    x = torch.randn(2, 700)
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, 450:] = 0
    outs = {}
    with torch.no_grad():
        for impl in ("eager", "sdpa", "triton"):
            m.config.attn_implementation = impl
            outs[impl] = m(x, attention_mask=mask).logits
        assert_close(outs["sdpa"], outs["eager"])
        # real frames only: the Triton attention kernel currently zeroes padded query rows, where
        # transformers (and eager/sdpa) let them attend to the real frames
        real = m._get_feature_vector_attention_mask(outs["eager"].shape[1], mask)
        assert_close(outs["triton"][real], outs["eager"][real])
        m.config.attn_implementation = "sdpa"
        with pytest.warns(UserWarning, match="'sdpa' returns no attention weights"):
            attn = m(x, attention_mask=mask, output_attentions=True).attentions
    assert len(attn) == 2 and attn[0].shape == (2, 2, 34, 34)
    assert torch.all(attn[0][1, :, :, 21:] == 0), "padded frames must not be attended"
    assert_close(attn[0].sum(-1), torch.ones(2, 2, 34))


@pytest.mark.parametrize("attn", ["eager", "sdpa", "triton"])
def test_fully_padded_row(attn):
    """A row with no real sample runs (its outputs are meaningless) and changes no other row."""
    m = model(feat_extract_norm="layer", attn_implementation=attn)
    x = torch.randn(2, 500)
    mask = torch.ones(2, 500, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        out = m(x, attention_mask=mask).last_hidden_state
        assert_close(out[:1], m(x[:1]).last_hidden_state)
    assert torch.isfinite(out).all()


def test_encoder_packing_prefix_and_holey_masks():
    """Prefix masks (audio padding) give FramePacking host lengths, so non-eager attention runs on the
    packed rows; any other mask keeps the masked padded op. Real frames agree with eager either way."""
    from unispeech.encoder import FramePacking
    m = model(unispeech.UniSpeechModel, hidden_size=48, num_attention_heads=2, num_conv_pos_embedding_groups=4)
    prefix = torch.arange(12)[None, :] < torch.tensor([12, 7, 0])[:, None]
    holey = prefix.clone()
    holey[0, 3] = False
    assert FramePacking(3, 12, prefix).lengths == [12, 7, 0]
    for mask in (prefix, holey):  # the packing index, from the lengths or from the mask
        assert torch.equal(FramePacking(3, 12, mask).index, mask.reshape(-1).nonzero().squeeze(1))
    assert FramePacking(3, 12, holey).lengths is None and FramePacking(3, 12, None).lengths is None
    hidden = torch.randn(3, 12, 48)
    for mask in (prefix, holey):
        outs = {}
        with torch.no_grad():
            for impl in ("eager", "sdpa", "triton"):
                m.config.attn_implementation = impl
                outs[impl] = m.encoder(hidden, mask)[0]
        for impl in ("sdpa", "triton"):
            assert_close(outs[impl][mask], outs["eager"][mask])
            assert (outs[impl][~mask] == 0).all()


def test_padding_does_not_leak():
    """Changing the audio under the mask changes nothing on the real frames."""
    m = model(feat_extract_norm="layer")
    x = torch.randn(2, 700)
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, 400:] = 0
    y = x.clone()
    y[1, 400:] = 100 * torch.randn(300)
    with torch.no_grad():
        a, b = (m(v, attention_mask=mask).last_hidden_state for v in (x, y))
    real = m._get_feat_extract_output_lengths(400)
    assert_close(a[1, :real - 2], b[1, :real - 2])  # last frames see padded samples


def test_kernel_backend_cuda_forces_the_extension_where_an_op_has_it():
    """The feature encoder has a CUDA backend (layer 0): forced, it runs or says why not."""
    m = model(kernel_backend="cuda")
    with torch.no_grad(), pytest.raises(
            BackendUnavailableError, match=r"feature_encoder: backend 'cuda' cannot run this input \(cuda: layer 0: "):
        m(torch.randn(1, 500))


def test_kernel_backends_and_switch_names():
    x = torch.randn(2, 500)
    m = model(kernel_backend="torch", feat_extract_norm="layer", num_conv_pos_embeddings=4)
    with torch.no_grad():
        ref = m(x).last_hidden_state
        m.config.kernel_backend = "auto"  # whatever the dispatcher picks on this machine
        assert_close(m(x).last_hidden_state, ref)
    cfg = unispeech.UniSpeechConfig(**TINY)
    assert (cfg.attn_implementation, cfg.kernel_backend, cfg.batch_invariant_group_norm) == ("sdpa", "auto", True)
    m = unispeech.UniSpeechModel(cfg, attn_implementation="eager", kernel_backend="torch")
    assert (m.config.attn_implementation, m.config.kernel_backend) == ("eager", "torch")
    assert cfg.attn_implementation == "sdpa", "constructor overrides must not change the caller's config"
    with pytest.raises(ValueError, match=r"unknown attn_implementation 'flash2'; valid: \['eager', 'sdpa', 'triton'\]"):
        unispeech.UniSpeechConfig(attn_implementation="flash2")
    with pytest.raises(ValueError,
                       match=r"unknown kernel_backend 'cudnn'; valid: \['auto', 'torch', 'triton', 'cuda'\]"):
        unispeech.UniSpeechModel(cfg, kernel_backend="cudnn")
    with pytest.raises(ValueError, match="unknown attn_implementation"):
        cfg.attn_implementation = "xformers"
    with pytest.raises(ValueError, match="conv_dim, conv_stride and conv_kernel"):
        unispeech.UniSpeechConfig(conv_dim=(8, 8), conv_kernel=(3,), conv_stride=(1, 1))


def test_config_defaults_and_json_both_ways(tmp_path):
    ours, theirs = unispeech.UniSpeechConfig(), transformers.UniSpeechConfig()
    for name in HF_DEFAULTS:
        assert getattr(ours, name) == (list(v) if isinstance(v := getattr(theirs, name), tuple) else v), name
    assert ours.num_labels == theirs.num_labels and ours.inputs_to_logits_ratio == theirs.inputs_to_logits_ratio
    ours = unispeech.UniSpeechConfig(**TINY, num_labels=3, attn_implementation="triton", adapter_attn_dim=4)
    ours.to_json_file(tmp_path / "config.json")
    theirs = transformers.UniSpeechConfig.from_json_file(tmp_path / "config.json")
    assert (theirs.hidden_size, theirs.num_labels, theirs.adapter_attn_dim) == (32, 3, 4)
    back = unispeech.UniSpeechConfig.from_json_file(tmp_path / "config.json")
    assert back == ours and back.attn_implementation == "triton"
    theirs = transformers.UniSpeechConfig(**TINY, do_stable_layer_norm=True, id2label={0: "a", 1: "b", 2: "c"})
    theirs.save_pretrained(tmp_path)
    ours = unispeech.UniSpeechConfig.from_pretrained(tmp_path)
    assert ours.do_stable_layer_norm and ours.id2label == {0: "a", 1: "b", 2: "c"} and ours.conv_kernel == [10, 3, 3]
    assert json.loads(ours.to_json_string())["unispeech_kernels"]["kernel_backend"] == "auto"


def test_weight_norm_fold_is_cached_and_trainable():
    m = model()
    pos = m.encoder.pos_conv_embed
    g = pos.conv.parametrizations.weight.original0
    x = torch.randn(1, 500)
    with torch.no_grad():
        first = m(x).last_hidden_state
        w = pos.weight()
        assert pos.weight() is w, "no-grad forward must reuse the folded weight"
        g.mul_(2.0)  # in-place change of g invalidates the cache
        assert pos.weight() is not w
        assert not torch.allclose(m(x).last_hidden_state, first)
    m.train()
    m.config.layerdrop = 0.0
    m(x).last_hidden_state.square().sum().backward()
    assert g.grad is not None and pos.conv.parametrizations.weight.original1.grad.abs().sum() > 0
    assert math.isfinite(g.grad.sum().item())


def test_freeze_and_gradient_flow():
    m = model(unispeech.UniSpeechForSequenceClassification, num_labels=3, layerdrop=0.0).train()
    x = torch.randn(2, 500)
    m.freeze_feature_encoder()
    m(x, labels=torch.tensor([0, 2])).loss.backward()
    for name, p in m.named_parameters():
        frozen = "feature_extractor" in name
        assert (p.grad is None) == frozen, name
    m.zero_grad(set_to_none=True)
    m.freeze_base_model()
    m(x, labels=torch.tensor([0, 2])).loss.backward()
    assert all((p.grad is None) == name.startswith("unispeech.") for name, p in m.named_parameters())


def test_weighted_layer_sum_with_layerdrop_trains():
    """transformers' weighted sum breaks when LayerDrop skips a layer; ours counts it as identity."""
    m = model(unispeech.UniSpeechForSequenceClassification, use_weighted_layer_sum=True, layerdrop=0.9,
              num_hidden_layers=3).train()
    out = m(torch.randn(2, 500), labels=torch.tensor([0, 1]), output_hidden_states=True)
    out.loss.backward()
    assert len(out.hidden_states) == 4 and m.layer_weights.grad is not None


def test_output_object_access():
    m = model(unispeech.UniSpeechForCTC)
    with torch.no_grad():
        out = m(torch.randn(1, 400), output_hidden_states=True)
    assert list(out.keys()) == ["logits", "hidden_states"] and out["logits"] is out.logits is out[0]
    assert out.to_tuple()[1] is out.hidden_states and len(out.hidden_states) == 3
    with pytest.raises(KeyError, match="loss"):
        out["loss"]
    tup = m(torch.randn(1, 400), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1


@pytest.mark.parametrize("cls", [unispeech.UniSpeechForCTC, unispeech.UniSpeechForPreTraining])
def test_torch_compile_fullgraph_matches_eager(cls):
    """torch.compile(fullgraph=True) traces the whole model (no host syncs or graph breaks: the
    padded layout replaces frame packing there) and matches eager on real frames."""
    m = model(cls)
    x = torch.randn(2, 1200)
    mask = torch.ones(2, 1200, dtype=torch.long)
    mask[1, 700:] = 0
    key = "logits" if cls is unispeech.UniSpeechForCTC else "projected_states"
    with torch.no_grad():
        ref = m(x, attention_mask=mask)[key]
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x, attention_mask=mask)[key]
    frames = m._get_feature_vector_attention_mask(ref.shape[1], mask)
    assert_close(out[frames], ref[frames])
