"""The launch path GPUs take, run on the CPU: ``launch_tuned`` -> ``triton.autotune`` (its key, our
early-prune functions, heuristics, each config's grid) -> the kernel. Under the interpreter the
tests elsewhere launch the plain kernels, so without these the first GPU run would be the first to
execute the pruners and the autotune keys. Here autotuning runs for real except for its timer: a
stand-in that ranks configs by tile area, so the config run is the cheapest to interpret."""
import pytest
import torch

from tests.test_attention import _inputs, _prefix_mask, check_against_reference
from tests.test_attention_packed import LENGTHS, _assert_matches_reference, _out_and_grads, _packed_qkv
from tests.test_feature_encoder import check_conv_layer
from tests.test_pos_conv import _params as _pos_conv_params
from tests.test_pos_conv import check_against_reference as check_pos_conv
from unispeech_kernels import attention_packed
from unispeech_kernels._runtime import interpret_mode
from unispeech_kernels._runtime import SM90_SHARED_MEMORY
from unispeech_kernels.ops import _common, attention_kernels
from unispeech_kernels.ops._common import AUTOTUNED, tuned_choices
from unispeech_kernels.ops.attention import draw_dropout_seed, dropout_keep_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
on_cpu_only = pytest.mark.skipif(not interpret_mode(), reason="GPUs autotune for real")


def test_autotune_keys_name_kernel_arguments():
    """A key name that names no argument: Triton 3.9 refuses it, Triton 3.6 silently leaves it out."""
    for name, tuned in AUTOTUNED.items():
        missing = [k for k in tuned.keys if k not in tuned.arg_names]
        assert not missing, f"{name}: autotune key names {missing} are not arguments of the kernel"


def _tile_area(config):
    area = 1
    for k, v in config.kwargs.items():
        if k.startswith("BLOCK_"):
            area *= v
    return area


@pytest.fixture
def autotuning(monkeypatch):
    """Autotuned launches take the GPU path with the stand-in timer; yields {kernel name: the configs
    it timed, in order}. Each kernel starts with an empty cache, restored afterwards."""
    timed = {name: [] for name in AUTOTUNED}
    monkeypatch.setattr(_common, "interpret_mode", lambda: False)
    # no CUDA device to ask
    monkeypatch.setattr(attention_kernels, "shared_memory_per_block", lambda index: SM90_SHARED_MEMORY)
    for name, tuned in AUTOTUNED.items():
        def stand_in_timer(*args, config, _timed=timed[name], **meta):
            _timed.append(config)
            return [float(_tile_area(config))] * 3  # (median, p20, p80)
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "_bench", stand_in_timer)
    yield timed


def _assert_tuned(timed, name, n_keys, key_start):
    """Kernel ``name`` tuned ``n_keys`` keys, the last starting with ``key_start``; what it timed are
    its own configs, and it kept the one the timer ranked first."""
    tuned = AUTOTUNED[name]
    assert len(tuned.cache) == n_keys, f"{name}: {len(tuned.cache)} autotune keys, expected {n_keys}"
    key, picked = list(tuned.cache.items())[-1]
    assert key[:len(key_start)] == tuple(key_start), f"{name}: key {key}"
    assert timed[name] and all(c in tuned.configs for c in timed[name]), f"{name}: timed {timed[name]}"
    assert picked == min(timed[name], key=_tile_area)
    pick = tuned_choices()[name]["picks"][-1]
    assert pick["config"]["num_warps"] == picked.num_warps and pick["key"] == [str(k) for k in key]


ATTENTION_KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")


def _timed_counts(timed):
    return {name: len(configs) for name, configs in timed.items()}


@on_cpu_only
def test_attention_tunes_once_per_length_bucket(autotuning):
    """Forward and backward through the autotuner (key: S bucket, D, mask, packed, dropout); another
    length in the same power-of-two bucket reuses the tuned configs (changing audio lengths do not
    re-tune), a length past it tunes anew."""
    q, k, v = _inputs(2, 100, 2, 64, torch.float16)
    check_against_reference(q, k, v, _prefix_mask([100, 70], 100))
    for name in ATTENTION_KERNELS:
        _assert_tuned(autotuning, name, 1, (128, 64, True, False, False, False))
    before = _timed_counts(autotuning)
    q, k, v = _inputs(2, 120, 2, 64, torch.float16)
    check_against_reference(q, k, v, _prefix_mask([120, 65], 120))
    assert _timed_counts(autotuning) == before, "a length in the same bucket must not tune again"
    q, k, v = _inputs(1, 130, 2, 64, torch.float16)
    check_against_reference(q, k, v, None)
    for name in ATTENTION_KERNELS:
        _assert_tuned(autotuning, name, 2, (256, 64, False, False, False, False))


@on_cpu_only
def test_attention_with_dropout(autotuning):
    """The dropout key and its pruning (the keep mask is live with the score tiles)."""
    B, S, H = 2, 100, 2
    q, k, v = _inputs(B, S, H, 64, torch.float16)
    torch.manual_seed(3)
    keep = dropout_keep_mask(draw_dropout_seed(DEVICE), B, H, S, 0.2)
    check_against_reference(q, k, v, _prefix_mask([S, 70], S), dropout_p=0.2, dropout_mask=keep, rng_seed=3)
    for name in ATTENTION_KERNELS:
        _assert_tuned(autotuning, name, 1, (128, 64, True, False, False, True))


@on_cpu_only
def test_attention_packed(autotuning):
    q, k, v = _packed_qkv(LENGTHS, 2, 64, torch.bfloat16)
    grad = torch.randn_like(q)
    out, grads = _out_and_grads(lambda *t: attention_packed(*t, LENGTHS, backend="triton"), q, k, v, grad)
    _assert_matches_reference(out, grads, q, k, v, grad, LENGTHS)
    for name in ATTENTION_KERNELS:
        _assert_tuned(autotuning, name, 1, (64, 64, False, False, True, False))


@on_cpu_only
@pytest.mark.parametrize("norm_mode", ["none", "layer"])
def test_conv_layer(autotuning, norm_mode):
    """A 512-style feature-encoder layer: forward (plain or LayerNorm epilogue), dX and dW GEMMs,
    key (M bucket, C_in, C_out, K)."""
    check_conv_layer(norm_mode)
    forward = "conv_layer_fwd_norm" if norm_mode == "layer" else "conv_layer_fwd"
    _assert_tuned(autotuning, forward, 1, (1024, 160, 160, 3))
    _assert_tuned(autotuning, "conv_layer_bwd_dx", 1, (1024, 160, 160, 3))
    _assert_tuned(autotuning, "conv_layer_bwd_dw", 1, (1024, 160, 160, 3))


@on_cpu_only
def test_pos_conv(autotuning):
    """The positional conv (forward, and its flipped-tap dX launch), key (T bucket, CG, K), with the
    untuned dW kernel at its GPU tiles; CG 48 as in UniSpeech-base."""
    x = torch.randn(2, 200, 96, device=DEVICE).to(torch.float16)
    check_pos_conv(x, *_pos_conv_params(96, 2, 16, torch.float16), 2)
    _assert_tuned(autotuning, "pos_conv_conv", 1, (256, 48, 16))
