"""transformers' model API beyond forward: models from transformers' config objects, activation
names, activation (gradient) checkpointing, num_parameters / base_model, and output objects that
behave like transformers' ModelOutput (dict, pytree, rebuilt from pairs)."""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from transformers.activations import ACT2FN

import unispeech
from tests.tolerances import assert_close
from unispeech.outputs import CausalLMOutput
from unispeech_kernels import BackendUnavailableError
from unispeech_kernels.activations import ACTIVATIONS, LEARNABLE

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11, layerdrop=0.0)


def test_model_from_transformers_config():
    theirs = transformers.UniSpeechConfig(**TINY, num_labels=3, do_stable_layer_norm=True)
    for cls in (unispeech.UniSpeechModel, unispeech.UniSpeechForCTC, unispeech.UniSpeechForSequenceClassification,
                unispeech.UniSpeechForPreTraining):
        model = cls(theirs, attn_implementation="eager")
        assert isinstance(model.config, unispeech.UniSpeechConfig)
        assert model.config == unispeech.UniSpeechConfig(**TINY, num_labels=3, do_stable_layer_norm=True,
                                                         attn_implementation="eager")
    with pytest.raises(ValueError, match="model_type 'wav2vec2', expected 'unispeech'"):
        unispeech.UniSpeechModel(transformers.Wav2Vec2Config())
    with pytest.raises(TypeError, match="UniSpeechModel needs a UniSpeechConfig .*got builtins.dict"):
        unispeech.UniSpeechModel(dict(TINY))


def test_every_parameter_free_transformers_activation():
    assert set(ACT2FN) - set(ACTIVATIONS) == set(LEARNABLE)
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    for name in LEARNABLE:
        with pytest.raises(ValueError, match=f"activation '{name}' has learnable parameters"):
            unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY, hidden_act=name))
    with pytest.raises(ValueError, match="unknown activation 'gelu2'"):  # at construction, not at forward
        unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY, feat_extract_activation="gelu2"))


def test_kernels_refuse_activations_they_do_not_fuse():
    """The fused kernels compute exact GELU only: any other activation runs on the torch path, and
    forcing a kernel names the reason."""
    model = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY, feat_extract_activation="quick_gelu",
                                                               kernel_backend="triton")).eval()
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="activation 'quick_gelu'"):
        model(torch.randn(1, 400))
    model.config.kernel_backend = "auto"
    with torch.no_grad():
        model(torch.randn(1, 400))


def _train_step(model, x, labels, seed=3):
    torch.manual_seed(seed)  # dropout
    np.random.seed(seed)  # SpecAugment
    loss = model(x, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_activation_checkpointing_recomputes_layers_with_equal_gradients(kwargs):
    config = unispeech.UniSpeechConfig(**TINY, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    plain = unispeech.UniSpeechForCTC(config).train()
    ckpt = copy.deepcopy(plain)
    assert plain.supports_gradient_checkpointing and not ckpt.is_gradient_checkpointing
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert ckpt.is_gradient_checkpointing and ckpt.is_activation_checkpointing
    calls = [0] * config.num_hidden_layers
    for i, layer in enumerate(ckpt.unispeech.encoder.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x, labels = torch.randn(2, 900), torch.tensor([[1, 2, 3], [4, 5, -100]])
    want_loss, want = _train_step(plain, x, labels)
    loss, got = _train_step(ckpt, x, labels)
    assert calls == [2] * config.num_hidden_layers, "each layer runs again in the backward pass"
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)  # same dropout masks: RNG state is replayed
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], torch.float32, name)

    calls[:] = [0] * config.num_hidden_layers
    ckpt.activation_checkpointing_enable(every_n_layers=2)
    _train_step(ckpt, x, labels)
    assert calls == [2, 1, 2]
    calls[:] = [0] * config.num_hidden_layers
    with torch.no_grad():  # nothing to recompute without a backward pass
        ckpt(x)
    ckpt.eval()(x).logits.sum().backward()  # eval: checkpointing is for training only
    assert calls == [2] * config.num_hidden_layers
    ckpt.gradient_checkpointing_disable()
    assert not ckpt.is_gradient_checkpointing
    with pytest.raises(ValueError, match="every_n_layers must be a positive int"):
        ckpt.activation_checkpointing_enable(every_n_layers=0)


def test_num_parameters_and_base_model():
    kw = dict(TINY, num_labels=3)
    for name in ("UniSpeechModel", "UniSpeechForSequenceClassification"):
        theirs = getattr(transformers, name)(transformers.UniSpeechConfig(**kw))
        ours = getattr(unispeech, name)(unispeech.UniSpeechConfig(**kw))
        assert ours.num_parameters() == theirs.num_parameters()
        for p in (*theirs.base_model.feature_extractor.parameters(), *ours.base_model.feature_extractor.parameters()):
            p.requires_grad = False
        assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)
        assert ours.num_parameters(exclude_embeddings=True) == theirs.num_parameters(exclude_embeddings=True)
        assert ours.base_model is (ours if name == "UniSpeechModel" else ours.unispeech)


def test_outputs_behave_like_transformers_model_output():
    model = unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**TINY)).eval()
    theirs_cls = transformers.modeling_outputs.CausalLMOutput
    with torch.no_grad():
        out = model(torch.randn(1, 400), output_hidden_states=True)
    theirs = theirs_cls(logits=out.logits, hidden_states=out.hidden_states)
    assert isinstance(out, dict) and list(out) == list(theirs) == ["logits", "hidden_states"]
    assert out.get("loss") is None and out.get("logits") is out.logits and "loss" not in out
    assert dict(out).keys() == dict(theirs).keys() and len(out[:2]) == 2 and out.to_tuple()[0] is out.logits
    out["loss"] = torch.tensor(1.0)  # item and attribute stay in step, new keys go last (as theirs)
    theirs["loss"] = torch.tensor(1.0)
    assert out.loss is out["loss"] and list(out.keys()) == list(theirs.keys()) == ["logits", "hidden_states", "loss"]
    out.hidden_states = None  # None is no key
    assert list(out.keys()) == ["logits", "loss"] and out.to_tuple() == (out.logits, out.loss)
    for refused in (lambda: out.pop("loss"), lambda: out.update(loss=None), lambda: out.__delitem__("loss")):
        with pytest.raises(TypeError, match="keys follow its fields"):
            refused()
    with pytest.raises(KeyError, match="no field 'logit'"):
        out["logit"] = 1
    # a pytree node (torch.compile, DDP), rebuilt from pairs (DataParallel's gather), picklable
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 2 and pytree.tree_unflatten(leaves, spec) == out
    doubled = pytree.tree_map(lambda t: t * 2, out)
    assert type(doubled) is CausalLMOutput and torch.equal(doubled.logits, out.logits * 2)
    assert doubled.hidden_states is None
    for rebuilt in (type(out)((k, v) for k, v in out.items()), pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert type(rebuilt) is CausalLMOutput and set(rebuilt.keys()) == {"logits", "loss"}
        torch.testing.assert_close(rebuilt.logits, out.logits)
    with pytest.raises(TypeError, match=r"fields or \(name, value\) pairs"):
        CausalLMOutput([("logit", 1)])
