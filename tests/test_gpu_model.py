"""Our model with every kernel on the GPU against transformers on the same GPU (needs CUDA).

UniSpeechForCTC with attn_implementation="triton" and kernel_backend="triton" (Triton feature
encoder, positional conv and attention, through the real compiler with autotuning) against
transformers' UniSpeechForCTC with SDPA, same weights, a padded batch of 3 s / 2 s / 0.75 s of audio,
both encoder variants, against transformers' model in fp64: ours in fp32 (TF32 off: tests/conftest.py)
and bf16 within the tolerance rule (at most 2x transformers' own error in that dtype + the floor); one
training backward compares the loss and the gradient of every parameter. Model shapes are small (128 conv channels,
hidden 256, 4 heads of 64, 2 layers) so compiles dominate and the file runs in seconds.
"""
import pytest
import torch

from tests.tolerances import assert_error_within

transformers = pytest.importorskip("transformers")
import unispeech  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
CONFIG = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
              conv_dim=(128,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
              num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=32,
              hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
              final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
              batch_invariant_group_norm=False)  # transformers' padded numerics: parity on padded batches
VARIANTS = {"group-postnorm": dict(),
            "layer-stable-bias": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)}
LENGTHS = (48000, 31000, 12000)


def build_pair(variant, dtype=torch.float32, train=False):
    kw = {**CONFIG, **VARIANTS[variant]}
    torch.manual_seed(0)
    hf = transformers.UniSpeechForCTC(transformers.UniSpeechConfig(**kw, attn_implementation="sdpa"))
    ours = unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**kw, attn_implementation="triton",
                                                               kernel_backend="triton"))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return [m.to(DEVICE, dtype).train(train) for m in (hf, ours)]


def batch(dtype=torch.float32):
    n = torch.tensor(LENGTHS, device=DEVICE)
    mask = torch.arange(max(LENGTHS), device=DEVICE)[None, :] < n[:, None]
    return torch.randn(len(LENGTHS), max(LENGTHS), device=DEVICE, dtype=dtype) * mask, mask.long()


def real_frames(model, logits, mask):
    return logits[model._get_feature_vector_attention_mask(logits.shape[1], mask)]


def reference(variant, train=False):
    """transformers' model in fp64: the reference both fp32 models are measured against."""
    return build_pair(variant, torch.float64, train)[0]


REDUCTION = max(LENGTHS) // 5  # the longest sum: layer 0's group norm over its frames


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_logits_match_transformers(variant):
    hf, ours = build_pair(variant)
    x, mask = batch()
    with torch.no_grad():
        gold = reference(variant)(x.double(), attention_mask=mask).logits
        eager, out = hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask).logits
    assert_error_within(*(real_frames(hf, t, mask) for t in (out, gold, eager)), torch.float32, "logits",
                        reduction=REDUCTION)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_error_within_transformers_own(variant):
    hf16, ours16 = build_pair(variant, torch.bfloat16)
    x, mask = batch()
    with torch.no_grad():
        gold = reference(variant)(x.double(), attention_mask=mask).logits
        eager = hf16(x.bfloat16(), attention_mask=mask).logits
        out = ours16(x.bfloat16(), attention_mask=mask).logits
    assert_error_within(*(real_frames(hf16, t, mask) for t in (out, gold, eager)), torch.bfloat16, "logits",
                        reduction=REDUCTION)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_training_gradients_match_transformers(variant):
    """CTC loss backward through every layer, the feature encoder included (not frozen)."""
    hf, ours = build_pair(variant, train=True)
    gold = reference(variant, train=True)
    x, mask = batch()
    labels = torch.randint(1, CONFIG["vocab_size"], (len(LENGTHS), 8), device=DEVICE)
    labels[2, 4:] = -100
    losses = [m(x.to(dtype), attention_mask=mask, labels=labels).loss
              for m, dtype in ((ours, torch.float32), (gold, torch.float64), (hf, torch.float32))]
    for loss in losses:
        loss.backward()
    assert_error_within(*(loss.detach() for loss in losses), torch.float32, "loss", reduction=sum(LENGTHS))
    theirs, gold_params = dict(hf.named_parameters()), dict(gold.named_parameters())
    for name, p in ours.named_parameters():
        eager = theirs[name].grad
        if eager is None:  # unused here (masked_spec_embed: SpecAugment is off)
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, f"{name}: no gradient"
        assert_error_within(p.grad, gold_params[name].grad, eager, torch.float32, name, reduction=sum(LENGTHS))
