"""A patched transformers model is an ordinary model. On UniSpeech, UniSpeechSat, Wav2Vec2 and
HuBERT (base model, CTC and sequence-classification heads), after copy.deepcopy, pickle, torch.save
of the whole module, load_state_dict, dtype moves, requires_grad_ / freeze_feature_encoder,
gradient checkpointing and torch.compile, the patched model's outputs (eval, no grad: the cached
weight-norm path) and every parameter gradient (train) equal the unpatched model's after the same
operation, and unpatch_model then gives the unpatched outputs bit for bit. Also: deep copies
compute with and train their own weights, hooks and module names, save_pretrained, patching
twice, the forced backends, and the same operations on unispeech's own classes.

The workflow tests run attention on its torch backend (through the "triton" attention
implementation all the same): the interpreted Triton attention would cost seconds per test and
is covered by test_backend_triton and tests/test_transformers_attention.py.
"""
import copy
import io
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import unispeech  # noqa: E402
from tests.test_patching import TINY, _main_output, _real_frames  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402
from unispeech_kernels import patch_model, unpatch_model  # noqa: E402
from unispeech_kernels.integrations.patching import PatchedModule  # noqa: E402

HEADS = {
    "unispeech": ("UniSpeechConfig", "UniSpeechModel", "UniSpeechForCTC", "UniSpeechForSequenceClassification"),
    "unispeech-sat": ("UniSpeechSatConfig", "UniSpeechSatModel", "UniSpeechSatForCTC",
                      "UniSpeechSatForSequenceClassification"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", "Wav2Vec2ForCTC", "Wav2Vec2ForSequenceClassification"),
    "hubert": ("HubertConfig", "HubertModel", "HubertForCTC", "HubertForSequenceClassification"),
}
# (kind, class name, stable layer norm): base models in "layer" mode, heads in "group" mode
CASES = [(kind, name, name == names[1]) for kind, names in HEADS.items() for name in names[1:]]
CTC_CASES = [case for case in CASES if case[1].endswith("ForCTC")]
# what torch and transformers can pickle: no weight-norm parametrization on the positional conv
# (HuBERT's conv_pos_batch_norm) and no output-capturing hooks (a classification head that has run)
PICKLABLE_CASES = [(kind, name, stable, {"conv_pos_batch_norm": True}) for kind, name, stable in CASES
                   if kind == "hubert" and not name.endswith("Classification")]
UNPICKLABLE_CASES = [*CASES, ("hubert", "HubertForSequenceClassification", False, {"conv_pos_batch_norm": True})]


@pytest.fixture(autouse=True)
def _torch_attention(monkeypatch):
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "attention=torch")


def _batch():
    """The same two utterances on every call: 1200 samples and 800 + padding."""
    audio = torch.randn(2, 1200, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 1200, dtype=torch.long)
    mask[1, 800:] = 0
    audio[1, 800:] = 0.0
    return audio, mask


def _build(kind, name, stable, extra=None):
    config_cls = getattr(transformers, HEADS[kind][0])
    config = config_cls(**TINY, feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable,
                        **(extra or {}))
    return getattr(transformers, name)(config).eval()


def _pair(case):
    """(unpatched model, patched copy of it), both run once without grad (caches filled)."""
    model = _build(*case)
    patched = patch_model(copy.deepcopy(model))
    for m in (model, patched):
        _outputs(m)
    return model, patched


def _dtype(model):
    return next(model.parameters()).dtype


def _outputs(model):
    """Real parts of the main output (eval, no grad)."""
    audio, mask = _batch()
    model.eval()
    with torch.no_grad():
        out = _main_output(model(audio.to(_dtype(model)), attention_mask=mask))
    return _real_parts(model, out, mask)


def _real_parts(model, out, mask):
    if out.dim() == 2:  # sequence classification logits [B, labels]
        return [out]
    return [out[b, frames] for b, frames in enumerate(_real_frames(model, mask))]


def _gradients(model):
    """(real output parts, {name: grad}) of one training step's loss."""
    audio, mask = _batch()
    model.train()
    model.zero_grad(set_to_none=True)
    parts = _real_parts(model, _main_output(model(audio.to(_dtype(model)), attention_mask=mask)), mask)
    loss = sum(p.float().square().mean() for p in parts)
    if loss.requires_grad:
        loss.backward()
    model.eval()
    return [p.detach() for p in parts], {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()
                                         if p.grad is not None}  # a compiled model's names: "_orig_mod." first


def assert_same_model(got, expected):
    """Outputs (eval) and every gradient (train) of ``got`` equal ``expected``'s."""
    dtype = _dtype(expected)
    for a, b in zip(_outputs(got), _outputs(expected), strict=True):
        assert_close(a, b, dtype, "eval output")
    (out_got, grads_got), (out_exp, grads_exp) = _gradients(got), _gradients(expected)
    for a, b in zip(out_got, out_exp, strict=True):
        assert_close(a, b, dtype, "train output")
    assert grads_got.keys() == grads_exp.keys()
    for name, grad in grads_exp.items():
        assert_close(grads_got[name], grad, dtype, name)


def _patched_modules(model):
    return [name for name, m in model.named_modules() if isinstance(m, PatchedModule)]


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _load_state_dict(assign):
    def load(model):
        donor = copy.deepcopy(model)
        with torch.no_grad():
            for p in donor.parameters():
                p.mul_(0.75)
        state = {k: v.clone() for k, v in donor.state_dict().items()}
        model.load_state_dict(state, strict=True, assign=assign)
        return model
    return load


def _freeze_feature_encoder(model):
    model.base_model.feature_extractor._freeze_parameters()  # what every head's freeze_feature_encoder does
    return model


def _gradient_checkpointing(model):
    with warnings.catch_warnings():  # transformers 5 calls it a deprecated alias of activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    return model


PICKLING = {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch_save_load": _torch_save_load}
OPERATIONS = {
    "deepcopy": copy.deepcopy,
    "load_state_dict": _load_state_dict(assign=False),
    "load_state_dict_assign": _load_state_dict(assign=True),
    "to_float16": lambda m: m.to(torch.float16),
    "bfloat16": lambda m: m.bfloat16(),
    "half_then_float": lambda m: m.half().float(),
    "requires_grad_false": lambda m: m.requires_grad_(False),
    "freeze_feature_encoder": _freeze_feature_encoder,
    "gradient_checkpointing": _gradient_checkpointing,
}


def _rotated(operations):
    """(case, operation) pairs: every operation on every model type, the heads taking turns (each
    head class meets a third of the operations), to keep the run short."""
    kinds = list(HEADS)
    return [pytest.param(CASES[3 * k + (i + k) % 3], op, id=f"{CASES[3 * k + (i + k) % 3][1]}-{op}")
            for i, op in enumerate(operations) for k in range(len(kinds))]


@pytest.mark.parametrize("case,operation", _rotated(OPERATIONS))
def test_operation_keeps_patched_equal_to_unpatched(case, operation):
    _check_operation(case, OPERATIONS[operation])


@pytest.mark.parametrize("operation", list(PICKLING))
@pytest.mark.parametrize("case", PICKLABLE_CASES, ids=lambda c: c[1])
def test_pickling_keeps_patched_equal_to_unpatched(case, operation):
    _check_operation(case, PICKLING[operation])


@pytest.mark.parametrize("operation", list(PICKLING))
def test_unpicklable_models_stay_unpicklable(operation):
    """torch refuses to pickle weight-norm parametrizations, and pickle the local forward hooks
    transformers' classification heads install: a patched model refuses with the same error."""
    for case in UNPICKLABLE_CASES:
        model, patched = _pair(case)
        with pytest.raises((RuntimeError, AttributeError)) as unpatched_error:
            PICKLING[operation](model)
        with pytest.raises(type(unpatched_error.value)) as patched_error:
            PICKLING[operation](patched)
        assert str(patched_error.value) == str(unpatched_error.value)


def _check_operation(case, operation):
    model, patched = _pair(case)
    names = _patched_modules(patched)
    model, patched = operation(model), operation(patched)
    assert _patched_modules(patched) == names
    assert patched.config._attn_implementation == "triton"
    assert_same_model(patched, model)
    unpatch_model(patched)
    assert _patched_modules(patched) == [] and patched.config._attn_implementation == model.config._attn_implementation
    for a, b in zip(_outputs(patched), _outputs(model), strict=True):
        assert torch.equal(a, b), "unpatch_model must restore bit-identical outputs"


def test_gradient_checkpointing_recomputes_the_feature_encoder():
    """With checkpointing on, the fused feature-encoder op keeps only its input (the audio) for
    the backward pass and is recomputed there, as transformers' per-layer checkpoints keep only
    each layer's input."""
    model = patch_model(_build("wav2vec2", "Wav2Vec2ForCTC", False)).train()
    audio, _ = _batch()

    def saved_bytes():
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            model.wav2vec2.feature_extractor(audio)
        return sum(sizes)

    plain = saved_bytes()
    _gradient_checkpointing(model)
    assert plain > audio.numel() * audio.element_size() == saved_bytes()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[1])
def test_deepcopy_computes_with_and_trains_its_own_weights(case):
    """A deep copy of a patched model reads and back-propagates into the copy's parameters only:
    scaling its feature-encoder and positional-conv weights changes its outputs as it changes an
    unpatched model's, and leaves the source alone."""
    model, patched = _pair(case)
    before = _outputs(patched)
    twin = copy.deepcopy(patched)
    for m in (model, twin):
        base = m.base_model
        with torch.no_grad():
            for p in [*base.feature_extractor.parameters(), *base.encoder.pos_conv_embed.parameters()]:
                p.mul_(0.5)
    assert_same_model(twin, model)
    assert all(p.grad is None for p in patched.parameters())  # the twin's backward reached the twin only
    for a, b in zip(_outputs(patched), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CTC_CASES, ids=lambda c: c[1])
def test_torch_compile(case):
    model, patched = _pair(case)
    compiled = torch.compile(patched, backend="aot_eager")
    assert_same_model(compiled, model)
    unpatch_model(compiled)
    assert _patched_modules(patched) == [] and patched.config._attn_implementation == model.config._attn_implementation
    for a, b in zip(_outputs(patched), _outputs(model), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CTC_CASES, ids=lambda c: c[1])
def test_save_pretrained_reloads_unpatched_and_equal(case, tmp_path):
    model, patched = _pair(case)
    patched.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert _patched_modules(loaded) == [] and loaded.config._attn_implementation == model.config._attn_implementation
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for a, b in zip(_outputs(loaded), _outputs(model), strict=True):
        assert torch.equal(a, b)


def test_state_dict_keys_and_cross_loading():
    """Keys are the unpatched model's; a patched model loads an unpatched one's state strictly and
    the other way round."""
    for case in CTC_CASES:
        model, patched = _pair(case)
        assert list(patched.state_dict()) == list(model.state_dict())
        other = _build(*case)
        patched.load_state_dict(other.state_dict(), strict=True)
        model.load_state_dict(patch_model(copy.deepcopy(other)).state_dict(), strict=True)
        for a, b in zip(_outputs(patched), _outputs(model), strict=True):
            assert_close(a, b)


@pytest.mark.parametrize("case", CTC_CASES, ids=lambda c: c[1])
def test_hooks_and_module_names(case):
    """Module names stay; forward hooks registered before and after patching see the patched
    modules' outputs, equal to the unpatched modules'."""
    model, patched = _pair(case)
    assert [n for n, _ in patched.named_modules()] == [n for n, _ in model.named_modules()]
    seen = {}

    def hook(key):
        return lambda module, args, output: seen.setdefault(key, []).append(output)

    for tag, m in (("plain", model), ("patched", patched)):
        m.base_model.feature_extractor.register_forward_hook(hook((tag, "features")))
    patched2 = patch_model(unpatch_model(patched))
    for tag, m in (("plain", model), ("patched", patched2)):
        m.base_model.encoder.pos_conv_embed.register_forward_hook(hook((tag, "pos_conv")))
        _outputs(m)
    for key in ("features", "pos_conv"):
        (got,), (expected,) = seen[("patched", key)], seen[("plain", key)]
        assert_close(got, expected, name=key)


def test_patch_twice_warns_and_another_backend_raises():
    model = patch_model(_build("wav2vec2", "Wav2Vec2ForCTC", False))
    with pytest.warns(UserWarning, match=r"already patched \(backend=None\); nothing changed"):
        assert patch_model(model) is model
    with pytest.raises(ValueError, match="already patched with backend=None; call unpatch_model"):
        patch_model(model, backend="torch")
    with pytest.raises(ValueError, match=r"part of the model is already patched \(wav2vec2, "):
        patch_model(_wrap_patched_base())
    unpatch_model(model)
    patch_model(model, backend="torch")
    assert model._unispeech_kernels_patch["backend"] == "torch"


def _wrap_patched_base():
    """A CTC model whose base model alone was patched."""
    model = _build("wav2vec2", "Wav2Vec2ForCTC", False)
    patch_model(model.wav2vec2)
    return model


def test_unpatch_restores_a_copied_submodule():
    model = patch_model(_build("hubert", "HubertForCTC", False))
    encoder = copy.deepcopy(model.hubert.feature_extractor)
    hubert_encoder = transformers.models.hubert.modeling_hubert.HubertFeatureEncoder
    assert isinstance(encoder, PatchedModule) and isinstance(encoder, hubert_encoder)
    unpatch_model(encoder)
    assert type(encoder) is hubert_encoder
    assert not hasattr(encoder, "_unispeech_kernels")


def test_torch_save_loads_in_a_fresh_process(tmp_path):
    """The whole patched model, saved with torch.save, loads where nothing imported
    unispeech_kernels before (unpickling does) and computes what it computed here."""
    model, patched = _pair(PICKLABLE_CASES[1])
    torch.save(patched, tmp_path / "model.pt")
    audio, mask = _batch()
    torch.save((audio, mask), tmp_path / "batch.pt")
    script = (
        "import sys, torch\n"
        "model = torch.load(sys.argv[1] + '/model.pt', weights_only=False)\n"
        "assert 'unispeech_kernels' in sys.modules and type(model.hubert.feature_extractor).__name__ "
        "== 'PatchedHubertFeatureEncoder'\n"
        "audio, mask = torch.load(sys.argv[1] + '/batch.pt')\n"
        "with torch.no_grad():\n"
        "    torch.save(model(audio, attention_mask=mask).logits, sys.argv[1] + '/logits.pt')\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    logits = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = model(audio, attention_mask=mask).logits
    for b, frames in enumerate(_real_frames(model, mask)):
        assert_close(logits[b, frames], expected[b, frames])


@pytest.mark.parametrize("case", CTC_CASES, ids=lambda c: c[1])
def test_backend_torch(case):
    model = _build(*case)
    assert_same_model(patch_model(copy.deepcopy(model), backend="torch"), model)


def test_backend_triton(monkeypatch):
    """Every hot spot on its Triton kernel (interpreted here: one model, one step)."""
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "attention=triton")
    model = _build("wav2vec2", "Wav2Vec2ForCTC", False)
    assert_same_model(patch_model(copy.deepcopy(model), backend="triton"), model)


# unispeech's own classes ---------------------------------------------------------------------------

OWN_CLASSES = [unispeech.UniSpeechModel, unispeech.UniSpeechForCTC, unispeech.UniSpeechForSequenceClassification,
               unispeech.UniSpeechForPreTraining]
OWN_OPERATIONS = {name: {**OPERATIONS, **PICKLING}[name] for name in
                  ("deepcopy", "pickle", "torch_save_load", "load_state_dict", "load_state_dict_assign",
                   "to_float16", "half_then_float")}


def _own(cls):
    return cls(unispeech.UniSpeechConfig(**TINY)).eval()


def _own_outputs(model):
    audio, mask = _batch()
    with torch.no_grad():
        out = model(audio.to(_dtype(model)), attention_mask=mask, return_dict=False)
    return [t for t in out if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("operation", list(OWN_OPERATIONS))
@pytest.mark.parametrize("cls", OWN_CLASSES, ids=lambda c: c.__name__)
def test_own_classes_survive_the_same_operations(cls, operation):
    """After the operation, a model that had run (its weight-norm fold cached) computes exactly
    what a model that never ran computes after the same operation."""
    ran, fresh = _own(cls), None
    fresh = copy.deepcopy(ran)
    _own_outputs(ran)
    ran, fresh = OWN_OPERATIONS[operation](ran), OWN_OPERATIONS[operation](fresh)
    for a, b in zip(_own_outputs(ran), _own_outputs(fresh), strict=True):
        assert torch.equal(a, b)


def test_own_deepcopy_trains_its_own_weights():
    model = _own(unispeech.UniSpeechForCTC)
    before = _own_outputs(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.unispeech.encoder.pos_conv_embed.parameters():
            p.mul_(0.5)
    assert not torch.equal(_own_outputs(twin)[0], before[0])
    assert torch.equal(_own_outputs(model)[0], before[0])
    audio, mask = _batch()
    twin.train()
    twin(audio, attention_mask=mask).logits.square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in twin.unispeech.encoder.parameters())


def test_patch_model_on_own_class_says_it_needs_none():
    with pytest.raises(TypeError, match="unispeech's own model class, which runs on unispeech_kernels already"):
        patch_model(_own(unispeech.UniSpeechForCTC))
