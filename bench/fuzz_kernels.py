"""Fuzz target of the kernel ops: random shapes, masks, dtypes and layouts against the float64
reference, outputs and every gradient, and the non-finite contract of pos_conv and feature_encoder
on random NaN/Inf placements (attention's non-finite cases are not drawn: its Triton and torch
backends do not yet agree on them).

    python -m bench.fuzz_kernels --cases 1000 [--seed 0] [--backends torch,triton]
                                 [--kernels attention,attention_packed,pos_conv,feature_encoder]

Numerical cases: each output and gradient within tests/tolerances.py's bound (``assert_error_within``:
twice eager same-dtype PyTorch's error vs the fp64 reference plus the dtype's floor); padded query
rows of attention exactly zero. Attention: B 1-3, S 1-40, H 1-3, D in (8, 16, 24, 32, 64, 80),
fp32 / fp16 / bf16, no mask, a prefix mask (lengths from 0) or a mask with holes, q / k / v
contiguous, views of one fused projection or transposed copies, a custom scale. attention_packed:
1-4 sequences of 0-30 rows. pos_conv: B 1-2, T 1-40, groups 1-4 of 4-16 channels, K 2-16.
feature_encoder (layer 0's first_conv_layer kernel and the conv_layer GEMMs behind it): 2-3 layers
of 8-24 channels, group or layer norm, batch-invariant statistics with input lengths or not.
Non-finite cases (pos_conv, feature_encoder: ``NONFINITE_KERNELS``), a quarter of their cases: NaN,
+Inf or -Inf at random places of hidden / padding; the non-finite entries of the output and of
every gradient must be the fp64 reference's, and padding never reaches a real frame
(feature_encoder).
Under TRITON_INTERPRET=1 on a CPU Triton is slow: ``--triton-every n`` runs it on every n-th case.
The torch backend of attention is torch's SDPA, itself eager PyTorch: where its error exceeds
twice that of the eager einsum baseline, the case is counted apart (``sdpa_over_bound``), not as a
mismatch of ours; its non-finite contract counts as ours.
Prints cases and mismatches per kernel and backend; exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports a @triton.jit kernel

from tests.tolerances import assert_error_within  # noqa: E402
from unispeech_kernels import attention, attention_packed, feature_encoder, pos_conv_embed  # noqa: E402
from unispeech_kernels.ops.attention import attention_reference  # noqa: E402
from unispeech_kernels.ops.feature_encoder import feature_encoder_reference  # noqa: E402
from unispeech_kernels.ops.pos_conv import pos_conv_reference  # noqa: E402
from unispeech_kernels.padding import conv_output_length, receptive_field  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("attention", "attention_packed", "pos_conv", "feature_encoder")
SPECIALS = (float("nan"), float("inf"), float("-inf"))


class Draw:
    """Random choices from one seeded generator."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def int(self, lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=self.gen))

    def pick(self, options):
        return options[self.int(0, len(options) - 1)]

    def chance(self, p):
        return float(torch.rand((), generator=self.gen)) < p

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.gen).to(dtype)

    def poison(self, t, n=None):
        """t with 1-3 random entries set to NaN / +Inf / -Inf (in place)."""
        flat = t.view(-1)
        for _ in range(n or self.int(1, 3)):
            flat[self.int(0, flat.numel() - 1)] = self.pick(SPECIALS)
        return t


def outputs_and_grads(fn, inputs, cotangent):
    """fn's output and the gradient of <output, cotangent> for every input (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, cotangent.to(out.dtype), allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def within(names, got, gold, eager, dtype, reduction, magnitudes=None):
    """Mismatch lines of the tolerance check (empty when every tensor is within its bound);
    ``magnitudes`` {name: size} for sums that cancel (see ``assert_error_within``)."""
    problems = []
    for name, a, ref, e in zip(names, got, gold, eager):
        try:
            assert_error_within(a, ref, e, dtype, name, reduction=reduction, magnitude=(magnitudes or {}).get(name))
        except AssertionError as error:
            problems.append(str(error).splitlines()[0])
    return problems


def same_nonfinite(names, got, gold):
    """Mismatch lines where the non-finite entries differ, or finite ones are far from fp64."""
    problems = []
    for name, a, ref in zip(names, got, gold):
        if not torch.equal(torch.isfinite(a), torch.isfinite(ref)):
            problems.append(f"{name}: non-finite at {int((~torch.isfinite(a)).sum())} entries, "
                            f"the reference at {int((~torch.isfinite(ref)).sum())}")
    return problems


def _qkv_layout(draw, B, S, H, D, dtype):
    layout = draw.pick(("contiguous", "fused", "transposed"))
    if layout == "fused":  # views of one [B, S, 3, H, D] projection output
        return list(draw.randn(B, S, 3, H, D, dtype=dtype).unbind(2))
    if layout == "transposed":  # [B, S, H, D] views of [B, H, S, D] tensors
        return [draw.randn(B, H, S, D, dtype=dtype).transpose(1, 2) for _ in range(3)]
    return [draw.randn(B, S, H, D, dtype=dtype) for _ in range(3)]


def attention_case(draw, backend, nonfinite):
    assert not nonfinite, "attention draws no non-finite cases (NONFINITE_KERNELS)"
    B, S, H, D = draw.int(1, 3), draw.int(1, 40), draw.int(1, 3), draw.pick((8, 16, 24, 32, 64, 80))
    dtype = draw.pick(DTYPES)
    q, k, v = _qkv_layout(draw, B, S, H, D, dtype)
    kind = draw.pick(("none", "prefix", "holes"))
    mask = None
    if kind == "prefix":
        mask = torch.arange(S)[None, :] < torch.tensor([draw.int(0, S) for _ in range(B)])[:, None]
    elif kind == "holes":
        mask = torch.rand(B, S, generator=draw.gen) < 0.7
    scale = draw.pick((None, 0.37, 1.3))
    real = mask if mask is not None else torch.ones(B, S, dtype=torch.bool)
    cotangent = draw.randn(B, S, H, D, dtype=torch.float64) * real[:, :, None, None]
    names = ("out", "dq", "dk", "dv")
    got = outputs_and_grads(lambda *t: attention(*t, mask, softmax_scale=scale, backend=backend), (q, k, v),
                            cotangent)
    gold = outputs_and_grads(lambda *t: attention_reference(*t, mask, softmax_scale=scale, upcast=True),
                             (q, k, v), cotangent)
    # padded query rows: zeros from Triton, attention over the real keys from torch (any finite value)
    padded = got[0][~real]
    ok = (padded == 0).all() if backend == "triton" else torch.isfinite(padded).all()
    problems = [] if ok else ["out: a padded query row is not zero (Triton) or not finite (torch)"]
    eager = outputs_and_grads(lambda *t: attention_reference(*t, mask, softmax_scale=scale), (q, k, v), cotangent)
    rows = real[:, :, None, None].expand(B, S, H, D)
    got[0], gold[0], eager[0] = (t[rows] for t in (got[0], gold[0], eager[0]))
    return problems + within(names, got, gold, eager, dtype, max(S, D), single_key_terms(q, k, v, real, cotangent,
                                                                                           scale))


def single_key_terms(q, k, v, real, cotangent, scale):
    """A sequence with one real key has dq = dk = 0 exactly (a softmax of one score has no slope):
    there they are judged at the size of their terms, scale |dout| . |v| |k| (dq) and |q| (dk)."""
    if not (real.sum(1) == 1).any():
        return None
    dp = torch.einsum("bqhd,bkhd->bhqk", cotangent.abs(), v.double().abs()).max().item()
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return {"dq": scale * dp * k.double().abs().max().item(), "dk": scale * dp * q.double().abs().max().item()}


def attention_packed_case(draw, backend, nonfinite):
    assert not nonfinite, "attention_packed draws no non-finite cases (NONFINITE_KERNELS)"
    lengths = [draw.int(0, 30) for _ in range(draw.int(1, 4))]
    if not sum(lengths):
        lengths[0] = draw.int(1, 30)
    H, D = draw.int(1, 3), draw.pick((8, 16, 24, 64))
    dtype = draw.pick(DTYPES)
    N = sum(lengths)
    q, k, v = draw.randn(N, 3, H, D, dtype=dtype).unbind(1)
    S = max(lengths)
    mask = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]

    def padded_reference(*t, **kw):
        padded = [x.new_zeros(len(lengths), S, H, D).masked_scatter(mask[:, :, None, None], x) for x in t]
        return attention_reference(*padded, mask, **kw)[mask]
    cotangent = draw.randn(N, H, D, dtype=torch.float64)
    names = ("out", "dq", "dk", "dv")
    got = outputs_and_grads(lambda *t: attention_packed(*t, lengths, backend=backend), (q, k, v), cotangent)
    gold = outputs_and_grads(lambda *t: padded_reference(*t, upcast=True), (q, k, v), cotangent)
    eager = outputs_and_grads(padded_reference, (q, k, v), cotangent)
    return within(names, got, gold, eager, dtype, max(S, D))


def pos_conv_case(draw, backend, nonfinite):
    B, T, groups, cg, K = draw.int(1, 2), draw.int(1, 40), draw.int(1, 4), draw.pick((4, 8, 16)), draw.int(2, 16)
    C = groups * cg
    dtype = torch.float32 if nonfinite else draw.pick(DTYPES)
    h = draw.randn(B, T, C, dtype=dtype)
    w = (draw.randn(C, cg, K) / (cg * K) ** 0.5).to(dtype)
    b = draw.randn(C, dtype=dtype) if draw.chance(0.7) else None
    if nonfinite:
        draw.poison(h)
    inputs = (h, w) if b is None else (h, w, b)
    cotangent = draw.randn(B, T, C, dtype=torch.float64)
    names = ("out", "dhidden", "dweight", "dbias")[:len(inputs) + 1]

    def run(fn, **kw):
        return lambda h, w, b=None: fn(h, w, b, groups=groups, **kw)
    got = outputs_and_grads(run(pos_conv_embed, backend=backend), inputs, cotangent)
    gold = outputs_and_grads(run(pos_conv_reference, upcast=True), inputs, cotangent)
    if nonfinite:
        return same_nonfinite(names[:2], got[:2], gold[:2])  # weight gradients sum NaN over every frame
    eager = outputs_and_grads(run(pos_conv_reference), inputs, cotangent)
    return within(names, got, gold, eager, dtype, max(K * cg, B * T))


def feature_encoder_case(draw, backend, nonfinite):
    n_layers = draw.int(2, 3)
    dims = [draw.pick((8, 16, 24)) for _ in range(n_layers)]
    kernels = [draw.pick((10, 5, 4))] + [draw.pick((3, 2)) for _ in range(n_layers - 1)]
    strides = [draw.pick((5, 3))] + [draw.pick((2, 1)) for _ in range(n_layers - 1)]
    mode = draw.pick(("group", "layer"))
    invariant = draw.chance(0.5)
    dtype = torch.float32 if nonfinite else draw.pick(DTYPES)
    B = draw.int(1, 3)
    field = receptive_field(kernels, strides)
    L = draw.int(field, field + 200)
    lengths = torch.tensor([L] + [draw.int(field, L) for _ in range(B - 1)]) if draw.chance(0.7) else None
    ws, c_in = [], 1
    for c, kk in zip(dims, kernels):
        ws.append((draw.randn(c, c_in, kk) / (c_in * kk) ** 0.5).to(dtype))
        c_in = c
    bs = [(0.3 * draw.randn(c)).to(dtype) if draw.chance(0.5) else None for c in dims]
    n_norm = n_layers if mode == "layer" else 1
    gs = [(1 + 0.2 * draw.randn(dims[i])).to(dtype) for i in range(n_norm)]
    betas = [(0.2 * draw.randn(dims[i])).to(dtype) for i in range(n_norm)]
    x = draw.randn(B, L, dtype=dtype)
    kw = dict(input_lengths=lengths, batch_invariant=invariant)
    if nonfinite:  # specials in the padding only: the output must be that of zero padding
        if lengths is None or int(lengths.min()) == L:
            lengths = torch.tensor([L] * (B - 1) + [field]) if B > 1 else torch.tensor([field])
            kw["input_lengths"] = lengths
        clean = x.masked_fill(torch.arange(L)[None, :] >= lengths[:, None], 0.0)
        dirty = clean.clone()
        for b in range(B):
            if int(lengths[b]) < L:
                draw.poison(dirty[b, int(lengths[b]):])
        with torch.no_grad():
            got = feature_encoder(dirty, ws, bs, strides, mode, gs, betas, backend=backend, **kw)
            want = feature_encoder(clean, ws, bs, strides, mode, gs, betas, backend=backend, **kw)
        frames = conv_output_length(lengths, kernels, strides)
        real = torch.arange(got.shape[1])[None, :] < frames[:, None]
        return [] if torch.equal(got[real], want[real]) else ["padding reached a real frame"]
    params = [x, *ws, *[t for t in bs if t is not None], *gs, *betas]
    bias_at = [i for i, t in enumerate(bs) if t is not None]

    def run(fn, **extra):
        def call(x, *p):
            w, rest = list(p[:n_layers]), p[n_layers:]
            b = [None] * n_layers
            for j, i in enumerate(bias_at):
                b[i] = rest[j]
            g, beta = list(rest[len(bias_at):len(bias_at) + n_norm]), list(rest[len(bias_at) + n_norm:])
            return fn(x, w, b, strides, mode, g, beta, **kw, **extra)
        return call
    T = conv_output_length(L, kernels, strides)
    cotangent = draw.randn(B, T, dims[-1], dtype=torch.float64)
    names = ["out", "dx"] + [f"dparam{i}" for i in range(len(params) - 1)]
    got = outputs_and_grads(run(feature_encoder, backend=backend), params, cotangent)
    gold = outputs_and_grads(run(feature_encoder_reference, upcast=True), params, cotangent)
    eager = outputs_and_grads(run(feature_encoder_reference), params, cotangent)
    if mode == "group" and bs[0] is not None:  # the first bias's gradient is 0 before a group norm: skip
        skip = names.index(f"dparam{n_layers}")
        names, got, gold, eager = ([t for i, t in enumerate(s) if i != skip] for s in (names, got, gold, eager))
    taps = max(kk * c for kk, c in zip(kernels, (1, *dims[:-1])))
    return within(names, got, gold, eager, dtype, max(taps, B * L))


NONFINITE_KERNELS = ("pos_conv", "feature_encoder")
CASES = {"attention": attention_case, "attention_packed": attention_packed_case, "pos_conv": pos_conv_case,
         "feature_encoder": feature_encoder_case}


def run(cases: int, seed: int = 0, backends=("torch", "triton"), kernels=KERNELS, triton_every: int = 1) -> dict:
    """{(kernel, backend): {"cases", "nonfinite", "mismatches", "first"}} for ``cases`` draws per kernel."""
    results = {}
    for kernel in kernels:
        for backend in backends:
            draw = Draw(seed)
            every = triton_every if backend == "triton" else 1
            counts = dict(cases=0, nonfinite=0, mismatches=0, sdpa_over_bound=0, first=[])
            for i in range(cases):
                nonfinite = draw.chance(0.25) and kernel in NONFINITE_KERNELS
                if i % every:
                    continue
                problems = CASES[kernel](draw, backend, nonfinite)
                if backend == "torch" and kernel.startswith("attention"):  # SDPA is torch's own: counted apart
                    over = [p for p in problems if "max error" in p]
                    counts["sdpa_over_bound"] += bool(over)
                    problems = [p for p in problems if p not in over]
                counts["cases"] += 1
                counts["nonfinite"] += nonfinite
                if problems:
                    counts["mismatches"] += 1
                    counts["first"] += [f"case {i}: {p}" for p in problems][:3 - len(counts["first"])]
            results[(kernel, backend)] = counts
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="random cases per kernel and backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--triton-every", type=int, default=1, help="Triton on every n-th case")
    args = parser.parse_args(argv)
    start = time.time()
    results = run(args.cases, args.seed, args.backends.split(","), args.kernels.split(","), args.triton_every)
    bad = 0
    for (kernel, backend), c in results.items():
        sdpa = f", {c['sdpa_over_bound']} where torch's SDPA exceeds the bound" if c["sdpa_over_bound"] else ""
        print(f"fuzz_kernels: {kernel:17s} {backend:7s} {c['cases']:5d} cases ({c['nonfinite']} non-finite), "
              f"{c['mismatches']} mismatches{sdpa}")
        for line in c["first"]:
            print("  " + line)
        bad += c["mismatches"]
    print(f"seed {args.seed}, {time.time() - start:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
