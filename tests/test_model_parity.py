"""Our UniSpeech classes against transformers' (the reference), fp32: same weights, same outputs.

Tiny random-weight configs; every output field, hidden_states and attentions tuples are compared
with ALLCLOSE[float32] (relative 1e-5), on the real frames of padded batches: our encoder skips
padded frames (they are zero in our layer outputs; transformers fills them with values nothing real
depends on), so per-frame outputs are compared where the frame mask is True. Variants cover both
feature-encoder norms, both encoder variants, conv_bias, uneven conv lists, odd and even positional
kernels and head_dim 12 / 8.
The reference is transformers >= 5.23 (setup.py's test extra). Earlier 5.x releases (the GPU
machine's image has 5.17) differ in two ways these tests see, and get version-aware expectations
that keep every comparison: before 5.21 CTC counts a blank (pad) id in the labels as a target, where
5.21+ and ours ignore it as they ignore -100, so such a release gets those labels with the blank ids
as -100 (the same targets, see ``reference_labels``); before 5.23 every encoder layer draws one
``torch.rand([])`` in every forward, even in eval mode at layerdrop 0, shifting the random stream of
what comes after (the quantizer's Gumbel noise), so ours draws the same numbers first there
(``draw_as_transformers``).
"""
import copy

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

import unispeech
from tests.tolerances import assert_close, assert_error_within, key_bias_terms

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, codevector_dim=16, proj_codevector_dim=16,
            num_codevectors_per_group=7, classifier_proj_size=8, vocab_size=11, num_ctc_classes=9,
            hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
            final_dropout=0.0, layerdrop=0.0,
            batch_invariant_group_norm=False)  # transformers' padded numerics: parity on padded batches
VARIANTS = {
    "group-postnorm": dict(),
    "layer-stable-bias": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
    "uneven-convs-even-pos-headdim12": dict(conv_dim=(16, 24, 20), conv_kernel=(7, 4, 2), conv_stride=(3, 3, 2),
                                            num_conv_pos_embeddings=4, hidden_size=36, num_attention_heads=3,
                                            num_conv_pos_embedding_groups=3, feat_extract_norm="layer"),
    "stable-group-odd-pos": dict(do_stable_layer_norm=True, num_conv_pos_embeddings=7, conv_bias=True),
}
HF_VERSION = Version(transformers.__version__).release[:2]
HEADS = {"base": ("UniSpeechModel", {}), "ctc": ("UniSpeechForCTC", {}),
         "cls": ("UniSpeechForSequenceClassification", dict(num_labels=3)),
         "cls-weighted": ("UniSpeechForSequenceClassification", dict(num_labels=3, use_weighted_layer_sum=True)),
         "pretraining": ("UniSpeechForPreTraining", {})}


def build_pair(head="base", attn="eager", **overrides):
    """transformers' model and ours with identical weights, both in eval mode."""
    cls_name, head_kw = HEADS[head]
    kw = {**BASE, **head_kw, **overrides}
    hf_config = transformers.UniSpeechConfig(**kw)
    hf_config._attn_implementation = "eager"
    hf = getattr(transformers, cls_name)(hf_config).eval()
    ours = getattr(unispeech, cls_name)(unispeech.UniSpeechConfig(**kw, attn_implementation=attn)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def reference_labels(labels, pad_token_id=0):
    """CTC labels for transformers: before 5.21 a blank id in them is a target, so it gets -100 there."""
    return labels if HF_VERSION >= (5, 21) else labels.masked_fill(labels == pad_token_id, -100)


def draw_as_transformers(model):
    """Before 5.23 transformers draws one number per encoder layer in every forward: draw them for ours."""
    if HF_VERSION < (5, 23):
        for _ in range(model.config.num_hidden_layers):
            torch.rand([])


def audio(batch=3, length=1203, pad=(0, 377, 905)):
    x = torch.randn(batch, length)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pad[:batch]):
        if p:
            mask[b, -p:] = 0
            x[b, -p:] = 0.0
    return x, mask


def frame_mask(model, mask, x):
    """bool [B, T] real frames of a padded batch (None: nothing padded)."""
    if mask is None:
        return None
    frames = int(model._get_feat_extract_output_lengths(x.shape[1]))
    return model._get_feature_vector_attention_mask(frames, mask)


def real(t, frames):
    """The real-frame part of a per-frame tensor: [B, T, ...] or attention weights [B, H, T, T]."""
    if frames is None or t.dim() < 2:
        return t
    if tuple(t.shape[:2]) == tuple(frames.shape):
        return t[frames]
    if t.dim() == 4 and t.shape[0] == frames.shape[0] and t.shape[2] == frames.shape[1]:
        return t.transpose(1, 2)[frames]
    return t


def assert_same(theirs, ours, name="output", frames=None):
    if theirs is None or ours is None:
        assert theirs is None and ours is None, f"{name}: {type(theirs)} vs {type(ours)}"
    elif isinstance(theirs, (tuple, list)):
        assert len(theirs) == len(ours), f"{name}: {len(theirs)} vs {len(ours)} entries"
        for i, (a, b) in enumerate(zip(theirs, ours)):
            assert_same(a, b, f"{name}[{i}]", frames)
    else:
        assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
        assert_close(real(ours, frames), real(theirs, frames), name=name)


def assert_outputs_equal(theirs, ours, extra=(), frames=None):
    """Same fields in the same order (ours may add the named extra fields), same values."""
    mine = [k for k in ours.keys() if k not in extra]
    assert list(theirs.keys()) == mine, (list(theirs.keys()), mine)
    for key in theirs.keys():
        assert_same(theirs[key], ours[key], key, frames)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_base_model_matches(variant, attn):
    hf, ours = build_pair("base", attn, **VARIANTS[variant])
    x, mask = audio()
    with torch.no_grad():
        for kwargs in (dict(attention_mask=mask), dict()):
            theirs = hf(x, output_hidden_states=True, output_attentions=attn == "eager", **kwargs)
            mine = ours(x, output_hidden_states=True, output_attentions=attn == "eager", **kwargs)
            if attn == "sdpa":  # transformers' sdpa returns no attentions; ours are not requested
                theirs.attentions = None
            assert_outputs_equal(theirs, mine, frames=frame_mask(ours, kwargs.get("attention_mask"), x))


@pytest.mark.parametrize("head", ["ctc", "cls", "cls-weighted", "pretraining"])
@pytest.mark.parametrize("variant", ["group-postnorm", "layer-stable-bias"])
def test_heads_match(head, variant):
    hf, ours = build_pair(head, "eager", **VARIANTS[variant])
    x, mask = audio()
    kwargs = dict(attention_mask=mask, output_hidden_states=True, output_attentions=True)
    if head == "ctc":
        kwargs["labels"] = torch.tensor([[1, 2, 3, 4, -100], [5, 5, 0, -100, -100], [7, 8, 9, 10, 1]])
    elif head.startswith("cls"):
        kwargs["labels"] = torch.tensor([0, 2, 1])
    else:
        kwargs["mask_time_indices"] = torch.rand(3, 59) < 0.3
    hf_kwargs = dict(kwargs, labels=reference_labels(kwargs["labels"])) if head == "ctc" else kwargs
    with torch.no_grad():
        theirs, mine = hf(**hf_kwargs, input_values=x), ours(**kwargs, input_values=x)
    # our pre-training head adds its loss (unispeech.pretraining) where transformers has none
    losses = ("loss", "contrastive_loss", "diversity_loss", "ctc_loss") if head == "pretraining" else ()
    frames = frame_mask(ours, mask, x)
    assert_outputs_equal(theirs, mine, extra=losses, frames=frames)
    if head != "pretraining":
        with torch.no_grad():  # tuples, and hidden states only on request (classification)
            for kw in (kwargs, hf_kwargs):
                kw.update(output_hidden_states=False, output_attentions=False)
            assert_same(hf(x, return_dict=False, **hf_kwargs), ours(x, return_dict=False, **kwargs), "tuple",
                        frames)


@pytest.mark.parametrize("reduction,zero_inf", [("sum", True), ("mean", False)])
def test_ctc_loss_semantics(reduction, zero_inf):
    hf, ours = build_pair("ctc", ctc_loss_reduction=reduction, ctc_zero_infinity=zero_inf)
    x, mask = audio(2, 800, (0, 300))
    # second row: more labels than frames -> infinite loss unless zero_infinity; pad id 0 is ignored
    labels = torch.tensor([[3, 3, 0, 4, -100, -100] + [-100] * 30, [1] * 36])
    with torch.no_grad():
        theirs = hf(x, attention_mask=mask, labels=reference_labels(labels)).loss
        mine = ours(x, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(mine) == zero_inf or reduction == "sum"
    assert_close(mine, theirs)
    with pytest.raises(ValueError, match="vocab_size"):
        ours(x, labels=torch.tensor([[1, 11], [2, 3]]))


def test_training_spec_augment_and_layerdrop_match():
    """Training mode: random time + feature masks (same numpy seed) and LayerDrop (same torch
    seed) pick the same frames/channels/layers as transformers; outputs agree, and every gradient is
    within transformers' own fp32 error of transformers' model in fp64 (same masks and layers)."""
    kw = dict(mask_time_prob=0.3, mask_time_length=3, mask_time_min_masks=2, mask_feature_prob=0.3,
              mask_feature_length=4, mask_feature_min_masks=1, layerdrop=0.5, num_hidden_layers=4)
    hf, ours = build_pair("ctc", "eager", **kw)
    gold = copy.deepcopy(hf).double()
    x, mask = audio()
    labels = torch.tensor([[1, 2, 3], [4, 5, -100], [6, -100, -100]])
    outs = []
    for model, dtype in ((hf, torch.float32), (ours, torch.float32), (gold, torch.float64)):
        model.train()
        np.random.seed(7)
        torch.manual_seed(7)
        outs.append(model(x.to(dtype), attention_mask=mask, labels=labels, output_hidden_states=True))
        outs[-1].loss.backward()
    assert_outputs_equal(outs[0], outs[1], frames=frame_mask(ours, mask, x))
    assert len(outs[1].hidden_states) < 5, "seed 7 should drop at least one of 4 layers"
    assert len(outs[2].hidden_states) == len(outs[1].hidden_states), "fp64 reference dropped other layers"
    grads_hf, grads_gold = dict(hf.named_parameters()), dict(gold.named_parameters())
    reached = 0
    for name, p in ours.named_parameters():
        theirs = grads_hf[name].grad
        assert (p.grad is None) == (theirs is None), f"{name}: gradient presence differs (dropped layer?)"
        if theirs is not None:
            reached += 1
            assert_error_within(p.grad, grads_gold[name].grad, theirs, torch.float32, name, reduction=x.numel(),
                                magnitude=key_bias_terms(name, {n: g.grad for n, g in grads_gold.items()}))
    assert reached > len(grads_hf) // 2


def test_mask_indices_equal_transformers():
    from transformers.models.unispeech.modeling_unispeech import _compute_mask_indices
    from unispeech.masking import compute_mask_indices
    frame_mask = torch.arange(40)[None, :] < torch.tensor([40, 17, 3, 9])[:, None]
    for prob, length, min_masks, m in ((0.5, 4, 2, frame_mask), (0.05, 10, 0, None), (0.9, 1, 0, frame_mask)):
        np.random.seed(3)
        theirs = _compute_mask_indices((4, 40), prob, length, attention_mask=m, min_masks=min_masks)
        np.random.seed(3)
        ours = compute_mask_indices((4, 40), prob, length, attention_mask=m, min_masks=min_masks)
        np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(ValueError, match="mask_length"):
        compute_mask_indices((2, 5), 0.5, 6)


def test_pretraining_quantizer_training_matches():
    hf, ours = build_pair("pretraining")
    hf.quantizer.train()
    ours.quantizer.train()
    x, mask = audio()
    outs = []
    for model in (hf, ours):
        torch.manual_seed(5)
        if model is ours:
            draw_as_transformers(ours)
        outs.append(model(x, attention_mask=mask))
    for key in ("projected_states", "projected_quantized_states", "codevector_perplexity"):
        assert_same(outs[0][key], outs[1][key], key, frame_mask(ours, mask, x))


@pytest.mark.parametrize("head", ["ctc", "cls"])
def test_heads_forward_mask_time_indices(head):
    """Given frames are replaced by masked_spec_embed in eval mode too, as transformers' heads do."""
    hf, ours = build_pair(head)
    x, mask = audio()
    chosen = torch.rand(3, 59) < 0.3
    with torch.no_grad():
        theirs, mine = (m(x, attention_mask=mask, mask_time_indices=chosen) for m in (hf, ours))
        plain = ours(x, attention_mask=mask)
    frames = frame_mask(ours, mask, x)
    assert_outputs_equal(theirs, mine, frames=frames)
    assert not torch.allclose(real(mine.logits, frames), real(plain.logits, frames))


ACT_NAMES = sorted(set(transformers.activations.ACT2CLS) - {"prelu", "xielu"})  # learnable ones: rejected


@pytest.mark.parametrize("field", ["hidden_act", "feat_extract_activation"])
@pytest.mark.parametrize("name", ACT_NAMES)
def test_activations_match(field, name):
    hf, ours = build_pair("base", **{field: name})
    x, mask = audio(2, 900, (0, 300))
    with torch.no_grad():
        assert_outputs_equal(hf(x, attention_mask=mask), ours(x, attention_mask=mask), frames=frame_mask(ours, mask, x))
