"""The dispatcher's contract: backends declared as data (the support matrix, README's table), the
first backend that fits stops the search, the environment variable rejects what it does not know,
and the switches mean what they say (one rule for attn_implementation x kernel_backend, a warning
whenever what runs is not what was asked for); the CUDA kernel's limits come from one place."""
import os
import re
import warnings

import pytest
import torch

import unispeech
from unispeech.configuration import attention_implementation
from unispeech_kernels import BackendUnavailableError, _runtime
from unispeech_kernels.dispatch import BACKEND_NAMES, RUNTIMES, Inputs, Op
from unispeech_kernels.matrix import readme_section, support_matrix
from unispeech_kernels.ops import OP_MODULES, registered_ops
from unispeech_kernels.ops.attention import attention_op
from unispeech_kernels.ops.attention_packed import attention_packed_op
from unispeech_kernels.ops.feature_encoder import feature_encoder_op
from unispeech_kernels.ops.pos_conv import pos_conv_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11)


def test_readme_table_is_the_support_matrix():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert readme_section(f.read()) == support_matrix(), \
            "stale: python -m unispeech_kernels.info --matrix --readme README.md"


def test_every_registered_backend_declares_its_capabilities():
    ops = registered_ops()
    assert {op.module.rsplit(".", 1)[1] for op in ops} <= set(OP_MODULES)
    for op in ops:
        assert "torch" in op.backends, op.name  # every op runs somewhere
        assert op.example_inputs is not None, op.name
        for name, backend in op.backends.items():
            assert name in BACKEND_NAMES and backend.op == op.name
            parts = [part for _, part, _ in backend.parts] or [backend]
            for part in parts:
                assert part.runtime in RUNTIMES and set(part.features) <= set(op.features), (op.name, name)
                assert f"| {op.name} | {name}" in support_matrix()


class _Probe(Inputs):
    @property
    def tensors(self):
        return (torch.zeros(1),)


def test_selection_stops_at_the_first_backend_that_fits():
    asked = []

    def declines(inputs):
        """A probe's extra condition."""
        asked.append("cuda")
        return ["not today"]

    def fits(name):
        def check(inputs):
            asked.append(name)
            return []
        return check

    op = Op("probe_first_fit")
    op.backend("cuda", not_supported_reasons=declines)(lambda inputs: "cuda")
    op.backend("triton", not_supported_reasons=fits("triton"))(lambda inputs: "triton")
    op.backend("torch", not_supported_reasons=fits("torch"))(lambda inputs: "torch")
    assert op(_Probe()) == "triton" and asked == ["cuda", "triton"]  # torch is never looked at
    assert op.last_reasons == {"cuda": "not today", "triton": None}
    with pytest.raises(BackendUnavailableError, match=r"cuda: not today; triton: ok; torch: ok"):
        op(_Probe(), backend="cuda")
    with pytest.warns(UserWarning, match=r"'cuda' was asked for but cannot run this input \(not today\); running "
                                         r"'triton'"):
        assert op(_Probe(), backend="cuda", fallback=True) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op(_Probe(), backend="cuda", fallback=True) == "triton"  # said once


@pytest.mark.parametrize("value,match", [
    ("atention=triton", r"unknown op 'atention'; valid: \['attention', 'attention_packed', "),
    ("none=triton", "unknown op 'none'"),
    ("attention=trition", r"unknown backend 'trition'; valid: \['cuda', 'triton', 'torch'\]"),
    ("cudnn", "unknown backend 'cudnn'"),
])
def test_environment_rejects_unknown_names(monkeypatch, value, match):
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", value)
    with pytest.raises(ValueError, match=match):
        attention_op.select(attention_op.example_inputs(torch.device("cpu"), torch.float32))
    with pytest.raises(ValueError, match=match):
        unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY)).eval()(torch.randn(1, 400))


@pytest.mark.parametrize("attn,backend,runs", [
    (None, "auto", "sdpa"), (None, "torch", "sdpa"), (None, "triton", "triton"), (None, "cuda", "triton"),
    ("eager", "triton", "eager"), ("sdpa", "triton", "sdpa"), ("triton", "torch", "triton"),
])
def test_one_rule_for_the_two_switches(attn, backend, runs):
    assert attention_implementation(attn, backend) == runs
    config = unispeech.UniSpeechConfig(**TINY, attn_implementation=attn, kernel_backend=backend)
    assert config.attn_implementation == runs
    assert unispeech.UniSpeechConfig.from_dict(config.to_dict()) == config  # unset stays unset


def _padded_batch():
    x = torch.randn(2, 700)
    mask = torch.ones(2, 700, dtype=torch.long)
    mask[1, 450:] = 0
    return x, mask


def test_kernel_backend_triton_covers_every_hot_spot():
    model = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY, kernel_backend="triton")).eval()
    for op in (attention_packed_op, feature_encoder_op, pos_conv_op):
        op.last_reasons = {}
    with torch.no_grad():
        model(*_padded_batch())
    for op in (attention_packed_op, feature_encoder_op, pos_conv_op):
        assert op.last_reasons == {"triton": None}, op.name


def test_triton_attention_that_cannot_run_warns_once(monkeypatch):
    monkeypatch.setattr(_runtime, "_INTERPRET", False)  # a CPU without the interpreter
    model = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY, attn_implementation="triton")).eval()
    x, mask = _padded_batch()
    with torch.no_grad(), pytest.warns(UserWarning) as record:
        model(x, attention_mask=mask)
    said = [str(w.message) for w in record if "was asked for" in str(w.message)]
    assert said == ["attention_packed: 'triton' was asked for but cannot run this input (CPU tensors need "
                    "TRITON_INTERPRET=1 for Triton); running 'torch'"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, attention_mask=mask)  # once
    forced = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY, kernel_backend="triton")).eval()
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match="CPU tensors need TRITON_INTERPRET=1"):
        forced(x, attention_mask=mask)  # forced by kernel_backend: raises, as for the other hot spots


def _header_constants():
    with open(os.path.join(ROOT, "csrc", "first_conv_layer.cuh")) as f:
        return {name: int(eval(value)) for name, value in
                re.findall(r"constexpr (?:int|size_t) (FCL_\w+) = ([\d *]+);", f.read())}


def test_cuda_kernel_limits_are_the_headers():
    """The limits are written once (csrc/first_conv_layer.cuh); the bindings export them and the
    Python backend reads them from the extension (test_cuda_ext checks the built one agrees)."""
    header = _header_constants()
    assert header["FCL_MAX_SMEM_BYTES"] == 48 * 1024
    with open(os.path.join(ROOT, "csrc", "bindings.cpp")) as f:
        bindings = f.read()
    assert "{unispeech::FCL_MAX_C, unispeech::FCL_MAX_K, unispeech::FCL_MAX_BATCH}" in bindings
    sources = "".join(open(os.path.join(ROOT, "csrc", n)).read() for n in os.listdir(os.path.join(ROOT, "csrc"))
                      if n.endswith((".cu", ".cuh", ".cpp")))
    assert sources.count("48 * 1024") == 1 and "65535" not in sources.replace("FCL_MAX_BATCH = 65535", "")


def test_patch_model_backend_triton_runs_the_kernels():
    """patch_model(backend="triton"): transformers' feature encoder and positional conv run the Triton
    backends (attention the registered "triton" one), with transformers' own outputs."""
    transformers = pytest.importorskip("transformers")
    from tests.tolerances import assert_close
    from unispeech_kernels import patch_model

    config = transformers.UniSpeechConfig(**{k: v for k, v in TINY.items() if k != "vocab_size"},
                                          hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                          feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                                          batch_invariant_group_norm=False)  # transformers' padded numerics
    model = transformers.UniSpeechModel(config).eval()
    x, mask = _padded_batch()
    with torch.no_grad():
        ref = model(x, attention_mask=mask).last_hidden_state
        patch_model(model, backend="triton")
        for op in (feature_encoder_op, pos_conv_op, attention_op):
            op.last_reasons = {}
        out = model(x, attention_mask=mask).last_hidden_state
    for op in (feature_encoder_op, pos_conv_op, attention_op):
        assert op.last_reasons == {"triton": None}, op.name
    real = model._get_feature_vector_attention_mask(out.shape[1], mask)
    assert_close(out[real], ref[real])
