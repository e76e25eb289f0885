"""WavLM: the whole model, transformers' eager vs patched, and its gated relative-position attention,
every implementation side by side.

wavlm_inference: transformers.WavLMForCTC (random weights, eval, no_grad, logits) as transformers
runs it (``hf_eager``: its only attention, F.multi_head_attention_forward with a float [B*H, T, T]
bias) and after ``unispeech_kernels.patch_model`` (``hf_patched``: feature encoder, positional
conv and rel_pos_attention's torch backend on a CPU, the dispatcher's choice elsewhere; the row
carries its logits' difference vs hf_eager over real frames). Peak memory is the harness's: the
RSS high-water mark over one call on a CPU, max_memory_allocated on a GPU. ``bias_mb`` counts the
bias tensors of one layer analytically: hf_eager's position_bias and its gated copy, [B*H, T, T]
fp32 each; ours one piece, the [H, 256, n] gated bias of the longest sequence's first 256 queries
(and its int64 [256, n] index).

wavlm_attention_layer: one WavLMAttention, the first layer's (it builds the shared bias), on hidden
states [B, T, C] of the case's real lengths with their mask: transformers' forward (hf_eager) vs
the patched module (hf_patched): the attention alone, where the bias's memory is the peak (in the
whole model on a CPU, the feature encoder's first conv output is).

rel_pos_attention_fwd / _fwd_bwd: the op on q, k, v [B, S, H, D] with the model's table [320, H]
and gates [B, S, H] (fwd_bwd: forward and every gradient, q, k, v, table, gate). Impls: triton /
torch = unispeech_kernels.rel_pos_attention(backend=...); sdpa_bias = SDPA with the gated bias
materialised as a float [B, H, S, S] mask (keys masked in it); eager = the formula materialised
(transformers' arithmetic: scores + gated bias, masked softmax, PV); flex = torch.compile'd
FlexAttention, a score_mod doing the same gather and gate, a block mask over real queries and keys.
FLOPs: attention's (physics.attention_flops), the bias add not counted.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench import cases, physics
from bench.harness import Case, rel_diff

INFER = cases.expand("wavlm_inference")
LAYER = cases.expand("wavlm_attention_layer")
FWD = cases.expand("rel_pos_attention_fwd")
FWD_BWD = cases.expand("rel_pos_attention_fwd_bwd")
FP32_REL_TOL = 1e-5


def _id(c):
    return f"{c[0]}-{c[1]}s-B{c[2]}-{c[3]}"


def _raise(error, *args):
    raise error


# ------------------------------------------------------------------------------------------- model

@functools.lru_cache(None)
def inference_models(model, dtype, device):
    """{impl: callable(audio, mask) -> logits}, built once per (model, dtype)."""
    import transformers
    fields = dict(cases.MODELS[model], layerdrop=0.0)
    with torch.device(device):
        hf = transformers.WavLMForCTC(transformers.WavLMConfig(**fields)).to(dtype).eval()
    impls = {"hf_eager": lambda a, m: hf(a, attention_mask=m).logits}
    try:
        import unispeech_kernels
        with torch.device(device):
            patched = transformers.WavLMForCTC(transformers.WavLMConfig(**fields)).to(dtype).eval()
        patched.load_state_dict(hf.state_dict())
        unispeech_kernels.patch_model(patched)
        impls["hf_patched"] = lambda a, m: patched(a, attention_mask=m).logits
    except Exception as e:  # reported as that impl's error row
        impls["hf_patched"] = functools.partial(_raise, e)
    return impls


def bias_mb(impl, frames, heads) -> float:
    """One layer's bias tensors (see the module docstring), in MB."""
    from unispeech_kernels.ops.rel_pos_attention import QUERY_ROWS
    B, T = len(frames), max(frames)
    if impl == "hf_eager":
        return 2 * B * heads * T * T * 4 / 2**20
    rows = min(T, QUERY_ROWS)
    return (heads * rows * T * 4 + rows * T * 8) / 2**20


def compare(fn, reference, audio, mask, frames, dtype) -> dict:
    with torch.no_grad():
        a, b = fn(audio, mask).double(), reference(audio, mask).double()
    real = torch.arange(a.shape[1], device=a.device)[None, :] < torch.tensor(frames, device=a.device)[:, None]
    tol = FP32_REL_TOL if dtype == torch.float32 else 2e-2
    return {"max_abs_diff": (a[real] - b[real]).abs().max().item(), "rel_diff": rel_diff(a[real], b[real]),
            "vs": "hf_eager", "tol": tol}


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", INFER, ids=_id)
def test_wavlm_inference(benchmark, recorder, device, case, dtype):
    model, seconds, batch, impl, lengths = case
    cfg = cases.MODELS[model]
    frames = cases.frame_lengths(lengths, cfg)
    audio, mask = cases.padded_audio(lengths, dtype, device)
    sets = [(audio, mask.long())]
    c = Case("wavlm_inference", impl, dtype, f"{model} B{batch} {seconds}s",
             dict(model=model, seconds=seconds, batch=batch, samples=lengths, frames=frames,
                  bias_mb=bias_mb(impl, frames, cfg["num_attention_heads"])),
             flops=physics.model_forward_flops(lengths, cfg)[0])
    verify = None
    try:
        impls = inference_models(model, dtype, device)
        fn = impls[impl]
        verify = functools.partial(compare, fn, impls["hf_eager"], *sets[0], frames, dtype)
    except Exception as e:
        fn = functools.partial(_raise, e)
    with torch.no_grad():
        recorder.run(benchmark, c, fn, sets, device, verify=verify)


@functools.lru_cache(None)
def attention_layers(model, dtype, device):
    """{impl: WavLMAttention}: transformers' first-layer attention and a patched copy of it."""
    import copy

    import transformers
    from unispeech_kernels.integrations.patching import _SETTINGS, KernelSettings, _patched_class
    cfg = cases.MODELS[model]
    with torch.device(device):
        hf = transformers.models.wavlm.modeling_wavlm.WavLMAttention(
            cfg["hidden_size"], cfg["num_attention_heads"], num_buckets=cfg["num_buckets"],
            max_distance=cfg["max_bucket_distance"]).to(dtype).eval()
    patched = copy.deepcopy(hf)
    setattr(patched, _SETTINGS, KernelSettings(None, cfg.get("feat_extract_activation", "gelu")))
    patched.__class__ = _patched_class(type(hf))
    return {"hf_eager": hf, "hf_patched": patched}


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", LAYER, ids=_id)
def test_wavlm_attention_layer(benchmark, recorder, device, case, dtype):
    model, seconds, batch, impl, lengths = case
    cfg = cases.MODELS[model]
    frames = cases.frame_lengths(lengths, cfg)
    mask = torch.arange(max(frames), device=device)[None, :] < torch.tensor(frames, device=device)[:, None]
    hidden = torch.randn(len(frames), max(frames), cfg["hidden_size"], device=device, dtype=dtype)
    heads = cfg["num_attention_heads"]
    c = Case("wavlm_attention_layer", impl, dtype, f"{model} B{batch} {seconds}s",
             dict(model=model, seconds=seconds, batch=batch, frames=frames, bias_mb=bias_mb(impl, frames, heads)),
             flops=physics.attention_flops(frames, heads, cfg["hidden_size"] // heads, False))
    layers = attention_layers(model, dtype, device)

    def run(layer):
        return lambda h, m: layer(h, attention_mask=m)[0]

    def verify():
        with torch.no_grad():
            a, b = run(layers[impl])(hidden, mask)[mask], run(layers["hf_eager"])(hidden, mask)[mask]
        return {"rel_diff": rel_diff(a, b), "vs": "hf_eager", "tol": FP32_REL_TOL if dtype == torch.float32 else 2e-2}
    with torch.no_grad():
        recorder.run(benchmark, c, run(layers[impl]), [(hidden, mask)], device, verify=verify)


# ---------------------------------------------------------------------------------------------- op

@functools.lru_cache(None)
def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def make_impl(impl: str, lengths: torch.Tensor, seq: int):
    """fn(q, k, v, mask, table, gate) -> out [B, S, H, D] for one implementation."""
    from unispeech_kernels import RelativePositionBias, rel_pos_attention
    from unispeech_kernels.ops.rel_pos_attention import bias_reference, distance_table, rel_pos_attention_reference
    nb, md = 320, 800
    if impl in ("triton", "torch"):
        return lambda q, k, v, m, t, g: rel_pos_attention(q, k, v, RelativePositionBias(t, nb, md, g), m,
                                                          backend=impl)
    if impl == "eager":
        return lambda q, k, v, m, t, g: rel_pos_attention_reference(q, k, v, t, g, m, num_buckets=nb,
                                                                    max_distance=md)
    if impl == "sdpa_bias":
        def sdpa_bias(q, k, v, m, t, g):
            bias = bias_reference(t, q.shape[1], nb, md)[None] * g.permute(0, 2, 1)[..., None]  # [B, H, S, S]
            bias = bias.masked_fill(~m[:, None, None, :], float("-inf")).to(q.dtype)
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=bias).transpose(1, 2)
        return sdpa_bias
    if impl == "flex":
        flex, create_block_mask = _flex()

        def mask_mod(b, h, qi, ki):
            return (qi < lengths[b]) & (ki < lengths[b])
        block_mask = create_block_mask(mask_mod, lengths.shape[0], None, seq, seq, device=lengths.device)

        def flex_rel_pos(q, k, v, m, t, g):
            by_distance = distance_table(t, nb, md, seq)  # [H, 2, L]
            L = by_distance.shape[2]

            def score_mod(score, b, h, qi, ki):
                rel = ki - qi
                side = (rel > 0).to(torch.int64)
                return score + g[b, qi, h] * by_distance[h, side, torch.clamp(rel.abs(), max=L - 1)]
            return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod,
                        block_mask=block_mask).transpose(1, 2)
        return flex_rel_pos
    raise ValueError(f"unknown rel_pos_attention impl {impl!r}")


def make_inputs(model, lengths, dtype, device, backward):
    cfg = cases.MODELS[model]
    frames, heads = cases.frame_lengths(lengths, cfg), cfg["num_attention_heads"]
    dim = cfg["hidden_size"] // heads
    b, s = len(frames), max(frames)
    n = torch.tensor(frames, device=device)
    mask = torch.arange(s, device=device)[None, :] < n[:, None]
    q, k, v = (torch.randn(b, s, heads, dim, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    table = torch.randn(320, heads, device=device, requires_grad=backward)  # fp32, as the model's
    gate = (1 + 2 * torch.rand(b, s, heads, device=device)).requires_grad_(backward)
    case = dict(model=model, batch=b, heads=heads, head_dim=dim, frames=frames)
    return (q, k, v, mask, table, gate), n, frames, heads, dim, f"{model} B{b} S{s} H{heads} D{dim}", case


def _case(op, impl, dtype, frames, heads, dim, shape, extra, backward):
    return Case(op, impl, dtype, shape, extra, flops=physics.attention_flops(frames, heads, dim, backward),
                nbytes=physics.attention_bytes(frames, heads, dim, torch.finfo(dtype).bits // 8, backward))


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", FWD, ids=_id)
def test_rel_pos_attention_fwd(benchmark, recorder, device, case, dtype):
    model, seconds, _, impl, lengths = case
    inputs, n, frames, heads, dim, shape, extra = make_inputs(model, lengths, dtype, device, backward=False)
    c = _case("rel_pos_attention_fwd", impl, dtype, frames, heads, dim, shape, dict(extra, seconds=seconds), False)
    try:
        fn = make_impl(impl, n, max(frames))
    except Exception as e:  # e.g. FlexAttention missing from this torch
        fn = functools.partial(_raise, e)
    with torch.no_grad():
        recorder.run(benchmark, c, fn, [inputs], device, verify=functools.partial(verify, fn, inputs, False))


@pytest.mark.parametrize("dtype", cases.dtypes(), ids=str)
@pytest.mark.parametrize("case", FWD_BWD, ids=_id)
def test_rel_pos_attention_fwd_bwd(benchmark, recorder, device, case, dtype):
    model, seconds, _, impl, lengths = case
    inputs, n, frames, heads, dim, shape, extra = make_inputs(model, lengths, dtype, device, backward=True)
    c = _case("rel_pos_attention_fwd_bwd", impl, dtype, frames, heads, dim, shape, dict(extra, seconds=seconds),
              True)
    try:
        fwd = make_impl(impl, n, max(frames))
        grad = torch.randn_like(inputs[0]) * inputs[3][:, :, None, None]
        leaves = [inputs[i] for i in (0, 1, 2, 4, 5)]

        def fn(*args):
            return torch.autograd.grad(fwd(*args), leaves, grad)
    except Exception as e:
        fn = functools.partial(_raise, e)
    recorder.run(benchmark, c, fn, [inputs], device, verify=functools.partial(verify, make_impl(impl, n, max(frames)),
                                                                                inputs, True))


def verify(fn, inputs, backward):
    """Output on real query rows (and with ``backward`` every gradient) vs the torch backend's."""
    q, k, v, mask, table, gate = inputs
    reference = make_impl("torch", None, None)
    if not backward:
        with torch.no_grad():
            return {"rel_diff": rel_diff(fn(*inputs)[mask], reference(*inputs)[mask]), "vs": "torch"}
    grad = torch.randn_like(q) * mask[:, :, None, None]

    def grads(f):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, table, gate)]
        got = torch.autograd.grad(f(*leaves[:3], mask, *leaves[3:]), leaves, grad)
        return torch.cat([g[mask].flatten() if i in (0, 1, 2, 4) else g.flatten() for i, g in enumerate(got)])

    return {"rel_diff": rel_diff(grads(fn), grads(reference)), "vs": "torch"}
