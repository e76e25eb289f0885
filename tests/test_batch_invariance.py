"""Batched equals alone: in a padded batch every utterance gets the output it gets on its own.

The matrix: {group, layer} norm x {torch, triton} backend x {fp32, bf16} x batches of 1..8 utterances
of random lengths in random order. For every utterance, the hidden states (every layer's) and the
CTC logits on its real frames are within ``ALLCLOSE[dtype]`` of its run alone (both sides are the
same computation with different batch shapes, so summation orders may differ: the model-level
parity rule of tests/tolerances.py), and its greedy transcription is identical. Without a GPU the
Triton backend runs under the interpreter, so it gets a subset there: two batches (of 2 and 5) of
short utterances per config; torch, and Triton on a GPU, get all eight batch sizes. Mismatches are
counted and printed, and must be 0.

Also: training (gradients of a summed loss equal the sums of single-utterance gradients), patched
transformers models (through the attention mask their forward receives; without a mask every sample
is real), the switch that restores transformers' padded numerics, and the measured single-vs-batched
difference of transformers and ours (``-s`` prints it; the README quotes it).
"""
import pytest
import torch

import unispeech
from tests.tolerances import assert_close, assert_error_within

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=5,
            num_conv_pos_embedding_groups=4, vocab_size=11, hidden_dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
RECEPTIVE_FIELD = 40  # samples of TINY's conv stack: one frame
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# backend -> (batch sizes, longest utterance in samples)
BATCHES = {"torch": (range(1, 9), 1600), "triton": (range(1, 9), 1600) if DEVICE == "cuda" else ((2, 5), 360)}
NORMS = {"group": dict(feat_extract_norm="group"), "layer": dict(feat_extract_norm="layer", do_stable_layer_norm=True)}
DTYPES = (torch.float32, torch.bfloat16)


def _ctc_model(norm="group", **kw):
    return unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**TINY, **NORMS[norm], **kw)).eval().to(DEVICE)


def _padded_batch(lengths, dtype=torch.float32, generator=None):
    """Audio [B, max(lengths)] with zeros past each length, and its attention mask (on DEVICE)."""
    x = torch.zeros(len(lengths), max(lengths), dtype=dtype)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randn(n, generator=generator).to(dtype)
        mask[b, :n] = 1
    return x.to(DEVICE), mask.to(DEVICE)


def _random_lengths(size, longest, generator):
    """``size`` lengths in [RECEPTIVE_FIELD, longest], one of them the shortest possible, in random order."""
    lengths = torch.randint(RECEPTIVE_FIELD, longest + 1, (size,), generator=generator)
    if size > 2:
        lengths[0] = RECEPTIVE_FIELD
    return lengths[torch.randperm(size, generator=generator)].tolist()


def greedy_ids(logits):
    """Greedy CTC transcription of [T, V] logits as token ids: argmax, repeats merged, blanks (0) dropped."""
    ids = torch.unique_consecutive(logits.argmax(-1))
    return ids[ids != 0].tolist()


def _mismatches(model, x, mask, dtype):
    """(utterances, mismatched utterances) of one padded batch: each compared with its run alone."""
    with torch.no_grad():
        batched = model(x, attention_mask=mask, output_hidden_states=True)
        bad = 0
        for b, n in enumerate(mask.sum(-1).tolist()):
            alone = model(x[b:b + 1, :n], output_hidden_states=True)
            frames = alone.logits.shape[1]
            pairs = [(f"hidden_states[{i}]", a, h) for i, (a, h) in enumerate(zip(alone.hidden_states,
                                                                                 batched.hidden_states))]
            try:
                for name, one, many in [*pairs, ("logits", alone.logits, batched.logits)]:
                    assert_close(many[b:b + 1, :frames], one, dtype, name)
                assert greedy_ids(batched.logits[b, :frames]) == greedy_ids(alone.logits[0]), "transcription"
            except AssertionError as e:
                bad += 1
                print(f"mismatch (utterance {b} of {len(mask)}, {n} samples): {e}")
    return len(mask), bad


@pytest.mark.parametrize("backend", list(BATCHES))
def test_matrix_batched_equals_alone(backend, one_thread):
    sizes, longest = BATCHES[backend]
    generator = torch.Generator().manual_seed(0)
    cases = utterances = bad = 0
    for norm in NORMS:
        for dtype in DTYPES:
            model = _ctc_model(norm, kernel_backend=backend).to(dtype)
            for size in sizes:
                x, mask = _padded_batch(_random_lengths(size, longest, generator), dtype, generator)
                n, wrong = _mismatches(model, x, mask, dtype)
                cases, utterances, bad = cases + 1, utterances + n, bad + wrong
    print(f"\nbatch invariance, {backend}: {cases} batches, {utterances} utterances, {bad} mismatches")
    assert bad == 0


def _loss_and_grads(model, x, mask, labels):
    model.zero_grad()
    loss = model(x, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("norm", list(NORMS))
def test_training_gradients_batched_equal_sum_alone(norm):
    """Training mode: the summed CTC loss of a padded batch and every parameter's gradient are as
    close to the fp64 sums over the utterances alone as the fp32 sums over the utterances alone are
    (no dropout, no SpecAugment, so both compute the same function; gradients are sums over frames,
    judged by the fp64-reference rule)."""
    model = _ctc_model(norm, ctc_loss_reduction="sum").train()
    lengths = [900, 311, 520]
    x, mask = _padded_batch(lengths)
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100], [9, 3, 10, -100]], device=DEVICE)
    loss, grads = _loss_and_grads(model, x, mask, labels)
    alone = {}
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        runs = [_loss_and_grads(model, x[b:b + 1, :n].to(dtype), None, labels[b:b + 1]) for b, n in enumerate(lengths)]
        alone[dtype] = (sum(r[0] for r in runs), {k: sum(r[1][k] for r in runs) for k in grads})
    frames = int(sum(model._get_feat_extract_output_lengths(n) for n in lengths))
    (loss32, grads32), (loss64, grads64) = alone[torch.float32], alone[torch.float64]
    assert_error_within(loss, loss64, loss32, torch.float32, "loss", reduction=frames)
    for name in grads:
        assert_error_within(grads[name], grads64[name], grads32[name], torch.float32, name, reduction=frames)


def test_switch_restores_padded_numerics_and_round_trips(tmp_path):
    """batch_invariant_group_norm=False: group statistics over the padded length (the utterance then
    differs from its run alone); the switch survives save/load, and transformers' config.json, which
    lacks it, loads with the default."""
    transformers = pytest.importorskip("transformers")
    x, mask = _padded_batch([8000, 32000])
    model = _ctc_model()
    assert model.config.batch_invariant_group_norm is True
    model.config.batch_invariant_group_norm = False
    with torch.no_grad():
        batched = model(x, attention_mask=mask).logits[0]
        alone = model(x[:1, :8000]).logits[0]
    assert (batched[:alone.shape[0]] - alone).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "ours")
    assert unispeech.UniSpeechConfig.from_pretrained(tmp_path / "ours").batch_invariant_group_norm is False
    transformers.UniSpeechConfig(**TINY).save_pretrained(tmp_path / "theirs")
    assert unispeech.UniSpeechConfig.from_pretrained(tmp_path / "theirs").batch_invariant_group_norm is True
    transformers.UniSpeechConfig.from_pretrained(tmp_path / "ours")  # theirs reads ours


def test_without_mask_every_sample_is_real():
    """No attention_mask: each padded row is computed as one utterance of the padded length (its
    padding is audio), so it equals that padded row alone and not the utterance alone."""
    model = _ctc_model()
    x, mask = _padded_batch([800, 1200])
    with torch.no_grad():
        unmasked = model(x).logits
        assert_close(unmasked[:1], model(x[:1]).logits, name="padded row 0 alone")
        alone = model(x[:1, :800]).logits
    assert (unmasked[0, :alone.shape[1]] - alone[0]).abs().max() > 1e-2


# ------------------------------------------------------------------------ patched transformers models

def _transformers_ctc(norm, **kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(**TINY, **NORMS[norm], **kw)
    return transformers.Wav2Vec2ForCTC(config).eval().to(DEVICE)


@pytest.fixture
def _torch_attention(monkeypatch):
    monkeypatch.setenv("UNISPEECH_KERNELS_BACKEND", "attention=torch")


@pytest.mark.parametrize("norm", list(NORMS))
def test_patched_transformers_batched_equals_alone(norm, _torch_attention, one_thread):
    from unispeech_kernels import patch_model
    model = patch_model(_transformers_ctc(norm), backend="torch")
    generator = torch.Generator().manual_seed(1)
    cases = bad = 0
    for size in range(1, 9):
        x, mask = _padded_batch(_random_lengths(size, 1600, generator), generator=generator)
        cases, bad = cases + size, bad + _mismatches(model, x, mask, torch.float32)[1]
    print(f"\nbatch invariance, patched transformers ({norm}): {cases} utterances, {bad} mismatches")
    assert bad == 0


def test_patched_without_mask_and_with_switch(_torch_attention):
    """Without an attention mask every sample is real, as in transformers: each padded row equals its
    padded row alone. With batch_invariant_group_norm=False set before patching, the patched model
    keeps transformers' padded numerics (it equals the unpatched model on real frames)."""
    from unispeech_kernels import patch_model
    x, mask = _padded_batch([800, 1200])
    reference = _transformers_ctc("group")
    padded = _transformers_ctc("group", batch_invariant_group_norm=False)
    padded.load_state_dict(reference.state_dict())
    with torch.no_grad():
        theirs = reference(x, attention_mask=mask).logits
        patch_model(reference, backend="torch")
        patch_model(padded, backend="torch")
        unmasked = reference(x).logits
        assert_close(unmasked[:1], reference(x[:1]).logits, name="row 0 without a mask")
        frames = int(reference._get_feat_extract_output_lengths(800))
        alone = reference(x[:1, :800]).logits
        assert (unmasked[0, :frames] - alone[0]).abs().max() > 1e-2, "without a mask the padding is audio"
        assert_close(reference(x, attention_mask=mask).logits[:1, :frames], alone, name="masked row 0")
        assert_close(padded(x, attention_mask=mask).logits[:1, :frames], theirs[:1, :frames], name="switch off")


def test_patched_hooks_hand_over_lengths_and_unpatch_removes_them(_torch_attention):
    """The base model's hooks hold the lengths on the feature encoder for one call only (also when the
    forward raises); with gradient checkpointing the recomputed feature encoder sees the same lengths
    (gradients equal those without it); unpatch_model removes the hooks."""
    from unispeech_kernels import patch_model, unpatch_model
    from unispeech_kernels.integrations.patching import _LENGTHS
    model = _transformers_ctc("group")
    base = model.wav2vec2
    hooks = (dict(base._forward_pre_hooks), dict(base._forward_hooks))
    patch_model(model, backend="torch")
    x, mask = _padded_batch([800, 1200])
    labels = torch.tensor([[3, 4, 5], [6, 7, 8]], device=DEVICE)
    grads = []
    for checkpointing in (False, True):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        model(x, attention_mask=mask, labels=labels).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        assert getattr(base.feature_extractor, _LENGTHS) is None
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, name=name)
    with pytest.raises(ValueError, match="shorter than the receptive field"):
        model(x[:, :10], attention_mask=mask[:, :10])
    assert getattr(base.feature_extractor, _LENGTHS) is None
    unpatch_model(model)
    assert (dict(base._forward_pre_hooks), dict(base._forward_hooks)) == hooks


def test_transformers_processor_with_mask_matches_ours(_torch_attention):
    """A group-norm checkpoint's preprocessor (return_attention_mask false): our extractor returns the
    mask anyway; transformers' does when asked (return_attention_mask=True), and a patched
    transformers model fed its mask gives our model's outputs."""
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from unispeech_kernels import patch_model
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(n).astype(np.float32) for n in (1500, 700, 1100)]
    ours_fe = unispeech.UniSpeechFeatureExtractor(return_attention_mask=False)
    theirs_fe = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=False)
    kw = dict(sampling_rate=16000, padding=True, return_tensors="pt")
    ours_in = ours_fe(audio, **kw)
    theirs_in = theirs_fe(audio, **kw, return_attention_mask=True)
    assert "attention_mask" not in theirs_fe(audio, **kw)
    assert torch.equal(ours_in["input_values"], theirs_in["input_values"])
    assert torch.equal(ours_in["attention_mask"], theirs_in["attention_mask"])
    hf = transformers.UniSpeechForCTC(transformers.UniSpeechConfig(**TINY)).eval().to(DEVICE)
    ours = unispeech.UniSpeechForCTC(unispeech.UniSpeechConfig(**TINY)).eval().to(DEVICE)
    ours.load_state_dict(hf.state_dict())
    patch_model(hf, backend="torch")
    with torch.no_grad():
        got = hf(**theirs_in.to(DEVICE)).logits
        want = ours(**ours_in.to(DEVICE)).logits
    for b, n in enumerate(ours.unispeech._get_feat_extract_output_lengths(ours_in["attention_mask"].sum(-1))):
        assert_close(got[b, :n], want[b, :n], name=f"utterance {b}")


# ---------------------------------------------------------------------------------- the README numbers

def _single_vs_batched(model, x, mask):
    """max |alone - batched| on the 0.5 s utterance's real frames of the last hidden state, and that
    relative to max |alone|."""
    with torch.no_grad():
        alone = model(x[:1, :8000]).last_hidden_state[0]
        batched = model(x, attention_mask=mask).last_hidden_state[0, :alone.shape[0]]
    diff = (alone - batched).abs().max().item()
    return diff, diff / alone.abs().max().item()


def test_readme_numbers(_torch_attention):
    """One 0.5 s utterance alone vs padded beside a 2 s one, tiny random group-norm config."""
    transformers = pytest.importorskip("transformers")
    from unispeech_kernels import patch_model
    x, mask = _padded_batch([8000, 32000])
    hf = transformers.UniSpeechModel(transformers.UniSpeechConfig(**TINY)).eval().to(DEVICE)
    ours = unispeech.UniSpeechModel(unispeech.UniSpeechConfig(**TINY)).eval().to(DEVICE)
    ours.load_state_dict(hf.state_dict())
    rows = {"transformers": _single_vs_batched(hf, x, mask), "ours (default)": _single_vs_batched(ours, x, mask)}
    ours.config.batch_invariant_group_norm = False
    rows["ours (batch_invariant_group_norm=False)"] = _single_vs_batched(ours, x, mask)
    patch_model(hf, backend="torch")
    rows["patched transformers (default)"] = _single_vs_batched(hf, x, mask)
    print()
    for name, (diff, relative) in rows.items():
        print(f"{name:42s} max |single - batched| = {diff:.3g} ({100 * relative:.3g} % of max |single|)")
    assert_close(torch.tensor(rows["ours (default)"][0]), torch.tensor(0.0), name="ours")
    assert_close(torch.tensor(rows["patched transformers (default)"][0]), torch.tensor(0.0), name="patched")
    assert rows["transformers"][0] > 0.1 and rows["ours (batch_invariant_group_norm=False)"][0] > 0.1
