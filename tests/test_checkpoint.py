"""Checkpoints both ways with transformers: their saved folders (safetensors, .bin, sharded, both
weight-norm spellings) load into our classes with equal outputs; ours (whole, sharded, .bin) load
into theirs with no missing or unexpected keys. Checkpoints of another head class load as in
transformers (same loading info); dtype and the common loading / saving keyword arguments behave
as theirs. Broken folders fail with errors naming the problem."""
import json
import os
import re
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import unispeech
from tests.tolerances import assert_close

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11, classifier_proj_size=8, codevector_dim=16,
            proj_codevector_dim=16, num_codevectors_per_group=7,
            batch_invariant_group_norm=False)  # transformers' padded numerics: parity on padded batches
X = torch.randn(2, 900)
MASK = torch.cat([torch.ones(1, 900), torch.cat([torch.ones(1, 600), torch.zeros(1, 300)], 1)]).long()


def hf_model(cls_name="UniSpeechForCTC", **kw):
    return getattr(transformers, cls_name)(transformers.UniSpeechConfig(**{**TINY, **kw})).eval()


def same_outputs(a, b, key="logits"):
    """Equal on the real frames (padded frames of our encoder outputs are zero, see encoder.py)."""
    with torch.no_grad():
        out_a, out_b = a(X, attention_mask=MASK)[key], b(X, attention_mask=MASK)[key]
        real = b._get_feature_vector_attention_mask(out_b.shape[1], MASK)
        assert_close(out_b[real], out_a[real])


def write_bin(folder, state, shards=1):
    """The pre-safetensors format, optionally sharded with an index file."""
    keys = sorted(state)
    if shards == 1:
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin", "bin-sharded", "weight_g_v"])
def test_load_transformers_checkpoint(tmp_path, fmt):
    hf = hf_model()
    if fmt.startswith("safetensors"):
        hf.save_pretrained(tmp_path, max_shard_size="20KB" if fmt.endswith("sharded") else "50GB")
        assert os.path.isfile(tmp_path / "model.safetensors.index.json") == fmt.endswith("sharded")
    else:
        hf.config.save_pretrained(tmp_path)
        state = {k: v.clone() for k, v in hf.state_dict().items()}
        if fmt == "weight_g_v":  # the spelling of nn.utils.weight_norm (older checkpoints)
            state = {k.replace("parametrizations.weight.original0", "weight_g")
                     .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
            assert any(k.endswith("weight_g") for k in state)
        write_bin(tmp_path, state, shards=3 if fmt.endswith("sharded") else 1)
    ours = unispeech.UniSpeechForCTC.from_pretrained(tmp_path)
    assert not ours.training
    same_outputs(hf, ours)


@pytest.mark.parametrize("cls_name", ["UniSpeechModel", "UniSpeechForCTC", "UniSpeechForSequenceClassification",
                                      "UniSpeechForPreTraining"])
def test_transformers_loads_ours(tmp_path, cls_name):
    ours = getattr(unispeech, cls_name)(unispeech.UniSpeechConfig(**TINY, attn_implementation="eager",
                                                                    kernel_backend="torch")).eval()
    ours.save_pretrained(tmp_path)
    theirs, info = getattr(transformers, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert set(load_file(tmp_path / "model.safetensors")) == set(theirs.state_dict())
    key = {"UniSpeechModel": "last_hidden_state", "UniSpeechForPreTraining": "projected_states"}.get(cls_name, "logits")
    same_outputs(theirs.eval(), ours, key)
    back = getattr(unispeech, cls_name).from_pretrained(tmp_path)  # our switches survive the round trip
    assert (back.config.attn_implementation, back.config.kernel_backend) == ("eager", "torch")
    assert back.config.to_dict() == ours.config.to_dict() | {"architectures": [cls_name], "dtype": "float32"}


def test_base_prefix_both_ways(tmp_path):
    base, head = hf_model("UniSpeechModel"), hf_model("UniSpeechForCTC")
    base.save_pretrained(tmp_path / "base")
    head.save_pretrained(tmp_path / "head")
    with pytest.warns(UserWarning, match="newly initialised.*lm_head"):
        ctc = unispeech.UniSpeechForCTC.from_pretrained(tmp_path / "base")
    same_outputs(base, ctc.unispeech, "last_hidden_state")
    with pytest.warns(UserWarning, match="not used.*lm_head"):
        ours_base = unispeech.UniSpeechModel.from_pretrained(tmp_path / "head")
    same_outputs(head.unispeech, ours_base, "last_hidden_state")


def test_overrides_and_dtype(tmp_path):
    hf_model().save_pretrained(tmp_path)
    model = unispeech.UniSpeechForCTC.from_pretrained(tmp_path, attn_implementation="sdpa", kernel_backend="torch",
                                                      torch_dtype=torch.bfloat16, final_dropout=0.0)
    assert model.dtype == torch.bfloat16 and model.config.final_dropout == 0.0
    assert model.config.kernel_backend == "torch"
    assert unispeech.UniSpeechForCTC.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown attn_implementation 'flash'.*eager"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path, attn_implementation="flash")
    with pytest.raises(ValueError, match="unknown kernel_backend 'cudnn'.*triton"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path, kernel_backend="cudnn")
    with pytest.raises(ValueError, match="unknown config field 'hiden_size'.*hidden_size"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path, hiden_size=8)
    with pytest.raises(ValueError, match="torch_dtype"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path, torch_dtype="int8")


def test_broken_folders(tmp_path):
    with pytest.raises(OSError, match="not a local folder.*no model hub"):
        unispeech.UniSpeechModel.from_pretrained("microsoft/unispeech-large-1500h-cv")
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)

    save_file({k: v for k, v in state.items() if "lm_head" not in k}, weights)
    with pytest.raises(ValueError, match=r"missing keys \(2\).*lm_head.bias"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="missing"):  # strict=False loads the rest
        loose = unispeech.UniSpeechForCTC.from_pretrained(tmp_path, strict=False)
    torch.testing.assert_close(loose.unispeech.encoder.layers[0].attention.q_proj.weight,
                               state["unispeech.encoder.layers.0.attention.q_proj.weight"])

    save_file({**state, "unispeech.extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*unispeech.extra.weight"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)

    save_file({**state, "lm_head.weight": torch.zeros(5, 32)}, weights)
    with pytest.raises(ValueError, match=r"shape-mismatched.*lm_head.weight: checkpoint \(5, 32\) vs model \(11, 32\)"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)

    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="could not read checkpoint file .*model.safetensors"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)
    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="could not read checkpoint file .*pytorch_model.bin"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(OSError, match="no weights in"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(ValueError, match="model_type 'wav2vec2'"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(OSError, match=f"names shard '{shard}', which is missing"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)


HEAD_KEYS = {"UniSpeechForCTC": "lm_head", "UniSpeechForSequenceClassification": "classifier",
             "UniSpeechForPreTraining": "quantizer"}


def load_both(cls_name, folder, **kw):
    """(theirs, ours, our warnings as text), each with its loading info."""
    theirs = getattr(transformers, cls_name).from_pretrained(folder, output_loading_info=True, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = getattr(unispeech, cls_name).from_pretrained(folder, output_loading_info=True, **kw)
    return theirs, ours, " | ".join(str(w.message) for w in caught)


@pytest.mark.parametrize("source,target", [
    ("UniSpeechForPreTraining", "UniSpeechForCTC"), ("UniSpeechForPreTraining", "UniSpeechForSequenceClassification"),
    ("UniSpeechForCTC", "UniSpeechForSequenceClassification"), ("UniSpeechForCTC", "UniSpeechForPreTraining"),
    ("UniSpeechForSequenceClassification", "UniSpeechModel")])
def test_cross_head_checkpoints_load_as_in_transformers(tmp_path, source, target):
    """Fine-tuning paths: the base weights load, the target's head is newly initialised and the
    source's head ignored, each with a warning naming the keys; loading info equals transformers'."""
    hf_model(source).save_pretrained(tmp_path)
    (theirs, their_info), (ours, our_info), messages = load_both(target, tmp_path)
    assert our_info == their_info
    if target in HEAD_KEYS:
        assert re.search(f"newly initialised.*{HEAD_KEYS[target]}", messages), messages
    assert re.search(f"not used by this model.*{HEAD_KEYS[source]}", messages), messages
    same_outputs(theirs.base_model, ours.base_model, "last_hidden_state")


@pytest.mark.parametrize("saved,loaded", [(0.05, 0.0), (0.0, 0.05)])
def test_masked_spec_embed_follows_the_config(tmp_path, saved, loaded):
    hf_model(mask_time_prob=saved).save_pretrained(tmp_path)
    (theirs, their_info), (ours, our_info), messages = load_both("UniSpeechForCTC", tmp_path, mask_time_prob=loaded)
    assert our_info == their_info
    assert re.search(("newly initialised" if loaded else "not used by this model") + ".*masked_spec_embed", messages)
    same_outputs(theirs, ours)


def test_incompatible_checkpoints_still_raise(tmp_path):
    hf_model("UniSpeechForPreTraining").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"shape-mismatched.*intermediate_dense"):  # a shared weight
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path, intermediate_size=40)
    weights = tmp_path / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "layers.1.final_layer_norm" not in k}, weights)
    with pytest.raises(ValueError, match=r"missing keys \(2\).*unispeech.encoder.layers.1.final_layer_norm"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path)


def test_ignore_mismatched_sizes(tmp_path):
    hf_model("UniSpeechForSequenceClassification", num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shape-mismatched.*classifier.weight.*ignore_mismatched_sizes"):
        unispeech.UniSpeechForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    (theirs, their_info), (ours, our_info), messages = load_both(
        "UniSpeechForSequenceClassification", tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert our_info == their_info and our_info["mismatched_keys"]
    assert re.search(r"newly initialised \(shape differs.*classifier.bias: checkpoint \(3,\) vs model \(5,\)", messages)
    assert ours.classifier.weight.shape == (5, 8)
    same_outputs(theirs.base_model, ours.base_model, "last_hidden_state")


def test_dtype_as_transformers(tmp_path):
    hf_model().to(torch.bfloat16).save_pretrained(tmp_path)
    cases = [({}, torch.bfloat16), (dict(dtype="auto"), torch.bfloat16), (dict(dtype=torch.float32), torch.float32),
             (dict(dtype="float16"), torch.float16), (dict(torch_dtype=torch.float32), torch.float32),
             (dict(dtype=torch.float16, torch_dtype=torch.float16), torch.float16)]
    for kw, want in cases:  # None is "auto" in transformers 5
        ours = unispeech.UniSpeechForCTC.from_pretrained(tmp_path, **kw)
        assert ours.dtype == transformers.UniSpeechForCTC.from_pretrained(tmp_path, **kw).dtype == want, kw
        assert ours.config.dtype == str(want).replace("torch.", "")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["dtype"]  # "auto" then reads the weights' dtype
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert unispeech.UniSpeechForCTC.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype=torch.float16 and torch_dtype=torch.float32 disagree"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype 'int8' is not a floating torch dtype"):
        unispeech.UniSpeechForCTC.from_pretrained(tmp_path, dtype="int8")


def test_from_pretrained_loading_kwargs(tmp_path):
    hf = hf_model("UniSpeechForSequenceClassification", num_labels=3)
    hf.save_pretrained(tmp_path)
    cls = unispeech.UniSpeechForSequenceClassification
    for kw in (dict(local_files_only=True), dict(local_files_only=False), dict(low_cpu_mem_usage=True),
               dict(use_safetensors=True), dict(config=hf.config),
               dict(config=unispeech.UniSpeechConfig(**TINY, num_labels=3)),
               dict(config=str(tmp_path / "config.json"))):
        same_outputs(hf, cls.from_pretrained(tmp_path, **kw))
    ours = cls.from_pretrained(tmp_path, config=hf.config, final_dropout=0.3)  # overrides apply to a given config
    assert ours.config.final_dropout == 0.3 and hf.config.final_dropout == 0.1
    # pytorch_model.bin beside model.safetensors, with other values: use_safetensors picks the file
    changed = {k: v + 1.0 if k == "classifier.bias" else v for k, v in hf.state_dict().items()}
    torch.save(changed, tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(cls.from_pretrained(tmp_path).classifier.bias, hf.classifier.bias)
    torch.testing.assert_close(cls.from_pretrained(tmp_path, use_safetensors=False).classifier.bias,
                               changed["classifier.bias"])
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no weights in .*\(use_safetensors=True\)"):
        cls.from_pretrained(tmp_path, use_safetensors=True)
    with pytest.raises(ValueError, match="does not support device_map=: .*model.to"):
        cls.from_pretrained(tmp_path, device_map="cpu")
    with pytest.raises(TypeError, match="needs a UniSpeechConfig .*got builtins.dict"):
        cls.from_pretrained(tmp_path, config={"hidden_size": 32})


def test_save_pretrained_kwargs(tmp_path):
    ours = unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**TINY)).eval()
    ours.save_pretrained(tmp_path)
    ours.save_pretrained(tmp_path, safe_serialization=False)  # the old model.safetensors must not shadow it
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    same_outputs(transformers.UniSpeechForCTC.from_pretrained(tmp_path), ours)

    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(index["weight_map"]) == set(ours.state_dict())
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", "model.safetensors.index.json", *shards])
    for shard in shards:  # each at most 20 kB, or one tensor on its own
        state = load_file(tmp_path / shard)
        assert len(state) == 1 or sum(t.numel() * t.element_size() for t in state.values()) <= 20_000
    theirs, info = transformers.UniSpeechForCTC.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    same_outputs(theirs.eval(), ours)
    same_outputs(unispeech.UniSpeechForCTC.from_pretrained(tmp_path), ours)

    state = {k: v + 1.0 if k == "lm_head.bias" else v for k, v in ours.state_dict().items()}
    ours.save_pretrained(tmp_path, state_dict=state)
    torch.testing.assert_close(load_file(tmp_path / "model.safetensors")["lm_head.bias"], state["lm_head.bias"])
    for bad, error in ((dict(max_shard_size="lots"), ValueError), (dict(max_shard_size=0), ValueError),
                       (dict(safe_serialization="yes"), TypeError), (dict(state_dict=[1]), TypeError)):
        with pytest.raises(error):
            ours.save_pretrained(tmp_path / "bad", **bad)
