"""The folded weight-norm cache of the positional conv (unispeech_kernels/weight_norm.py): reused
while g and v are unchanged, refolded after every change it can see, never handing autograd a
tensor made under inference mode; copies never share a fold, loaded weights invalidate it."""
import copy
import pickle

import pytest
import torch

import unispeech
from unispeech_kernels.ops.pos_conv import fold_weight_norm
from unispeech_kernels import clear_weight_caches
from unispeech_kernels.weight_norm import FoldedWeightNorm


def _params(requires_grad=True):
    g = torch.nn.Parameter(torch.rand(1, 1, 7) + 0.5, requires_grad=requires_grad)
    v = torch.nn.Parameter(torch.randn(8, 2, 7), requires_grad=requires_grad)
    return g, v


def test_cached_without_grad_and_refolded_after_tracked_changes():
    fold, (g, v) = FoldedWeightNorm(), _params()
    with torch.no_grad():
        w = fold(g, v)
        assert fold(g, v) is w
        v.mul_(2.0)  # in place: a version bump
        assert fold(g, v) is not w
        w = fold(g, v)
        g.data = g.data * 3.0  # replaced storage
        assert fold(g, v) is not w
    torch.testing.assert_close(fold(g, v).detach(), fold_weight_norm(g, v).detach())


def test_training_refolds_every_call_with_gradients():
    fold, (g, v) = FoldedWeightNorm(), _params()
    a, b = fold(g, v), fold(g, v)
    assert a is not b and a.requires_grad
    a.sum().backward()
    assert g.grad is not None and v.grad is not None


def test_inference_mode_fold_is_not_reused_for_autograd():
    """Frozen parameters, a forward under inference_mode, then an input that requires grad: the
    fold must be a normal tensor that autograd can save."""
    fold, (g, v) = FoldedWeightNorm(), _params(requires_grad=False)
    with torch.inference_mode():
        assert fold(g, v).is_inference()
        assert fold(g, v) is fold(g, v)
    w = fold(g, v)
    assert not w.is_inference()
    x = torch.randn(w.shape, requires_grad=True)
    (w * x).sum().backward()  # autograd saves w
    torch.testing.assert_close(x.grad, w)


def test_data_writes_need_clear_weight_caches():
    """Writes through .data bump no version counter: documented, and clear_weight_caches() makes
    every fold of the process refold."""
    folds, (g, v) = [FoldedWeightNorm(), FoldedWeightNorm()], _params()
    with torch.no_grad():
        stale = [fold(g, v) for fold in folds]
        v.data.mul_(2.0)
        v.data.add_(1.0)
        assert all(fold(g, v) is w for fold, w in zip(folds, stale))  # the limitation this test documents
        clear_weight_caches()
        for fold in folds:
            torch.testing.assert_close(fold(g, v), fold_weight_norm(g, v))


def test_inference_tensor_parameters_are_never_cached():
    fold = FoldedWeightNorm()
    with torch.inference_mode():
        g, v = _params(requires_grad=False)
        w = fold(g, v)
        v.mul_(2.0)  # no version counter on inference tensors: the fold must not be stale
        torch.testing.assert_close(fold(g, v), fold_weight_norm(g, v))
        assert fold(g, v) is not w


def test_copies_start_empty_and_are_cleared_with_the_rest():
    """A deep copy or an unpickled fold shares nothing with its source and is one of the folds
    clear_weight_caches() reaches."""
    fold, (g, v) = FoldedWeightNorm(), _params(requires_grad=False)
    with torch.no_grad():
        fold(g, v)
        for twin in (copy.deepcopy(fold), pickle.loads(pickle.dumps(fold))):
            w = twin(g, v)
            assert w is not fold(g, v)
            v.data.add_(0.5)  # invisible to every cache (a scale of v alone would not change the fold)
            clear_weight_caches()
            torch.testing.assert_close(twin(g, v), fold_weight_norm(g, v))


def test_a_new_storage_at_an_old_address_is_refolded():
    """A replaced v whose new storage sits where the old one was (freed memory reused by the
    allocator, as after .half().float()), same version counter, new values: refolded."""
    fold, (g, v) = FoldedWeightNorm(), _params(requires_grad=False)
    memory = v.detach().numpy().copy()
    with torch.no_grad():
        v.data = torch.from_numpy(memory)
        stale = fold(g, v).clone()
        v.data = torch.empty(0)  # the old storage is freed
        memory += 0.5  # the memory's next owner writes it
        v.data = torch.from_numpy(memory)  # a new storage at the old address
        assert v.data_ptr() == memory.ctypes.data
        torch.testing.assert_close(fold(g, v), fold_weight_norm(g, v))
        assert not torch.equal(fold(g, v), stale)


TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)


def _model_output(model, audio):
    with torch.no_grad():
        return model(audio).last_hidden_state


def test_model_copy_has_its_own_fold():
    """Our model: a deep copy that has run refolds after its own .data write + clear_weight_caches."""
    model = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY)).eval()
    audio = torch.randn(1, 600)
    _model_output(model, audio)
    twin = copy.deepcopy(model)
    assert twin.encoder.pos_conv_embed._fold is not model.encoder.pos_conv_embed._fold
    _model_output(twin, audio)
    twin.encoder.pos_conv_embed.conv.parametrizations.weight.original1.data.add_(0.5)
    clear_weight_caches()
    expected = copy.deepcopy(twin)
    expected.encoder.pos_conv_embed._fold = FoldedWeightNorm()
    assert torch.equal(_model_output(twin, audio), _model_output(expected, audio))
    assert not torch.equal(_model_output(twin, audio), _model_output(model, audio))


@pytest.mark.parametrize("assign", [False, True])
def test_loaded_state_dict_invalidates_the_fold(assign):
    model = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY)).eval()
    other = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY)).eval()
    audio = torch.randn(1, 600)
    _model_output(model, audio)
    model.load_state_dict({k: t.clone() for k, t in other.state_dict().items()}, strict=True, assign=assign)
    assert torch.equal(_model_output(model, audio), _model_output(other, audio))


def test_dtype_round_trips_refold():
    """.half().float() replaces every parameter's storage (rounded values); whatever addresses
    the allocator hands out, the cached fold is the fold of the current weights."""
    model = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY)).eval()
    audio = torch.randn(1, 600)
    for _ in range(8):
        _model_output(model, audio)
        model.half().float()
        cached = _model_output(model, audio)
        clear_weight_caches()
        assert torch.equal(cached, _model_output(model, audio))


def test_weight_layouts_made_once_per_weight_version():
    """A kernel's layout of a weight is made once while the weight is unchanged, again after an
    in-place change or for another ``what``; entries of freed weights go, at most ``size`` stay."""
    from unispeech_kernels.weight_norm import WeightLayouts

    layouts, w = WeightLayouts(size=2), torch.randn(8, 2, 7)
    made = []

    def make(t):
        return lambda: made.append(1) or t.flip(-1).contiguous()
    first = layouts.get(w, "flip", make(w))
    assert layouts.get(w, "flip", make(w)) is first and len(made) == 1
    assert torch.equal(first, w.flip(-1))
    assert layouts.get(w, "other", make(w)) is not first
    w.mul_(2.0)  # in place: a version bump
    assert torch.equal(layouts.get(w, "flip", make(w)), w.flip(-1)) and len(made) == 3
    assert len(layouts._entries) == 2
    del w
    assert layouts.get(torch.randn(3), "flip", make(torch.randn(3))) is not None
    assert len(layouts._entries) == 1, "the freed weight's layouts are dropped"
    clear_weight_caches()
    assert layouts._entries == []
