"""End to end: UniSpeechForCTC inference and one CTC fine-tuning step, ours vs transformers.

Inputs: audio [B, L] zero-padded past each utterance's length, attention_mask [B, L] (1 = real);
both models get the same inputs and the same weights (ours loads transformers' state_dict), and the
same math: ours and hf_patched run with batch_invariant_group_norm=False (transformers' padded
numerics: group statistics over the padded length), so their logits are comparable with hf_sdpa's.
Impls:
- ours:       unispeech.UniSpeechForCTC, attn_implementation "triton" on a GPU ("sdpa" on a CPU,
              the CPU comparison), kernel_backend "auto";
- hf_sdpa:    transformers.UniSpeechForCTC with attn_implementation "sdpa";
- hf_compile: torch.compile(dynamic=False) of hf_sdpa;
- hf_patched: hf_sdpa's weights in a transformers model after unispeech_kernels.patch_model (
              transformers' own classes with our feature encoder, positional conv and attention).
Inference: eval(), no_grad, logits. The ours row carries max_abs_diff / rel_diff of its logits vs
hf_sdpa's over real frames (input set 0); in fp32 `outputs_match` says rel_diff <= 1e-5.
Train step: train() with the config's dropouts, SpecAugment on (transformers' defaults), LayerDrop 0 so
every step does the same work, feature encoder frozen (transformers' fine-tuning recipe), forward
with labels (CTC loss), backward, AdamW step, zero_grad. Weights and AdamW states are in the benchmark
dtype (no fp32 master copy), the same for every impl.
FLOPs: physics.model_forward_flops / ctc_train_step_flops on real frames.
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench import cases, physics
from bench.harness import MATCH_REL_TOL, Case, rel_diff

INFER = cases.expand("e2e_inference")
TRAIN = cases.expand("e2e_ctc_train_step")
FP32_REL_TOL = 1e-5


def _id(c):
    return f"{c[0]}-{c[1]}s-B{c[2]}-{c[3]}"


def our_attention(device) -> str:
    return "triton" if device.type == "cuda" else "sdpa"


def hf_model(model, dtype, device, train=False):
    import transformers
    fields = dict(cases.MODELS[model], layerdrop=0.0)
    with torch.device(device):
        m = transformers.UniSpeechForCTC(transformers.UniSpeechConfig(**fields, attn_implementation="sdpa"))
    return m.to(dtype).train(train)


def our_model(model, dtype, device, source, train=False):
    from unispeech import UniSpeechConfig, UniSpeechForCTC
    fields = dict(cases.MODELS[model], layerdrop=0.0)
    config = UniSpeechConfig(**fields, attn_implementation=our_attention(device), kernel_backend="auto",
                             batch_invariant_group_norm=False)
    with torch.device(device):
        m = UniSpeechForCTC(config)
    m.load_state_dict(source.state_dict())
    return m.to(dtype).train(train)


@functools.lru_cache(None)
def inference_models(model, dtype, device):
    """{impl: callable(audio, mask) -> logits}, the models built once per (model, dtype)."""
    hf = hf_model(model, dtype, device)
    impls = {"hf_sdpa": lambda a, m: hf(a, attention_mask=m).logits}
    compiled = torch.compile(hf, dynamic=False)
    impls["hf_compile"] = lambda a, m: compiled(a, attention_mask=m).logits
    try:
        import unispeech_kernels
        patched = hf_model(model, dtype, device)
        patched.load_state_dict(hf.state_dict())
        patched.config.batch_invariant_group_norm = False
        unispeech_kernels.patch_model(patched)
        impls["hf_patched"] = lambda a, m: patched(a, attention_mask=m).logits
    except Exception as e:  # reported as that impl's error row
        impls["hf_patched"] = functools.partial(_raise, e)
    try:
        ours = our_model(model, dtype, device, hf)
        impls["ours"] = lambda a, m: ours(a, attention_mask=m).logits
    except Exception as e:  # reported as that impl's error row
        impls["ours"] = functools.partial(_raise, e)
    return impls


def _raise(error, *args):
    raise error


def make_inputs(lengths, dtype, device, n_sets, labels=False, vocab=32):
    sets = []
    for _ in range(n_sets):
        audio, mask = cases.padded_audio(lengths, dtype, device)
        s = (audio, mask.long())
        if labels:  # about 15 characters per second of audio, padded with -100
            count = [max(1, int(15 * x / cases.SAMPLE_RATE)) for x in lengths]
            lab = torch.full((len(lengths), max(count)), -100, device=device, dtype=torch.long)
            for i, c in enumerate(count):
                lab[i, :c] = torch.randint(1, vocab, (c,), device=device)
            s = s + (lab,)
        sets.append(s)
    return sets


def _n_sets(device):
    """Rotation: the weights (>= 190 MB) already dwarf any cache; two audio sets on a GPU, one on a
    CPU where a forward takes seconds."""
    return 2 if device.type == "cuda" else 1


def compare(fn, reference, audio, mask, frames, dtype) -> dict:
    """Logits vs hf_sdpa's over real frames (the harness's verify). fp32 on a CPU: 1e-5;
    otherwise twice the op bound (a dozen layers of rounding in the benchmark dtype)."""
    with torch.no_grad():
        a, b = fn(audio, mask).double(), reference(audio, mask).double()
    real = torch.arange(a.shape[1], device=a.device)[None, :] < torch.tensor(frames, device=a.device)[:, None]
    a, b = a[real], b[real]
    cpu_fp32 = dtype == torch.float32 and a.device.type == "cpu"
    tol = FP32_REL_TOL if cpu_fp32 else 2 * MATCH_REL_TOL[str(dtype).replace("torch.", "")]
    return {"max_abs_diff": (a - b).abs().max().item(), "rel_diff": rel_diff(a, b), "vs": "hf_sdpa", "tol": tol}


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", INFER, ids=_id)
def test_e2e_inference(benchmark, recorder, device, case, dtype):
    model, seconds, batch, impl, lengths = case
    cfg = cases.MODELS[model]
    frames = cases.frame_lengths(lengths, cfg)
    sets = make_inputs(lengths, dtype, device, _n_sets(device))
    c = Case("e2e_inference", impl, dtype, f"{model} B{batch} {seconds}s",
             dict(model=model, seconds=seconds, batch=batch, samples=lengths, frames=frames,
                  attn_implementation=our_attention(device) if impl == "ours" else "sdpa"),
             flops=physics.model_forward_flops(lengths, cfg)[0])
    verify = None
    try:
        impls = inference_models(model, dtype, device)
        fn = impls[impl]
        verify = functools.partial(compare, fn, impls["hf_sdpa"], *sets[0], frames, dtype)
    except Exception as e:
        fn = functools.partial(_raise, e)
    with torch.no_grad():
        recorder.run(benchmark, c, fn, sets, device, verify=verify)


def train_step_fn(impl, model, dtype, device):
    hf = hf_model(model, dtype, device, train=True)
    if impl == "ours":
        m = our_model(model, dtype, device, hf, train=True)
        del hf
    else:
        m = hf
    m.freeze_feature_encoder()
    fwd = torch.compile(m, dynamic=False) if impl == "hf_compile" else m
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

    def step(audio, mask, labels):
        loss = fwd(audio, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", TRAIN, ids=_id)
def test_e2e_ctc_train_step(benchmark, recorder, device, case, dtype):
    model, seconds, batch, impl, lengths = case
    cfg = cases.MODELS[model]
    sets = make_inputs(lengths, dtype, device, _n_sets(device), labels=True, vocab=cfg["vocab_size"])
    c = Case("e2e_ctc_train_step", impl, dtype, f"{model} B{batch} {seconds}s",
             dict(model=model, seconds=seconds, batch=batch, samples=lengths,
                  frames=cases.frame_lengths(lengths, cfg), frozen_feature_encoder=True),
             flops=physics.ctc_train_step_flops(lengths, cfg))
    try:
        fn = train_step_fn(impl, model, dtype, device)
    except Exception as e:
        fn = functools.partial(_raise, e)
    recorder.run(benchmark, c, fn, sets, device)
