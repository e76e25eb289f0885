"""Checkpoints both ways with transformers: their saved folders (safetensors, .bin, sharded, both
weight-norm spellings) load into our classes with equal outputs; ours load into theirs with no
missing or unexpected keys. Broken folders fail with errors naming the problem."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import unispeech
from tolerances import ALLCLOSE

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11, classifier_proj_size=8, codevector_dim=16,
            proj_codevector_dim=16, num_codevectors_per_group=7)
X = torch.randn(2, 900)
MASK = torch.cat([torch.ones(1, 900), torch.cat([torch.ones(1, 600), torch.zeros(1, 300)], 1)]).long()


def hf_model(cls_name="UniSpeechForCTC", **kw):
    return getattr(transformers, cls_name)(transformers.UniSpeechConfig(**{**TINY, **kw})).eval()


def same_outputs(a, b, key="logits"):
    """Equal on the real frames (padded frames of our encoder outputs are zero, see encoder.py)."""
    with torch.no_grad():
        out_a, out_b = a(X, attention_mask=MASK)[key], b(X, attention_mask=MASK)[key]
        real = b._get_feature_vector_attention_mask(out_b.shape[1], MASK)
        torch.testing.assert_close(out_b[real], out_a[real], **ALLCLOSE[torch.float32])


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
