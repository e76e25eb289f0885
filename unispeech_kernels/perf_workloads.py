"""What each shipped Triton kernel is asked to do at the benchmark shapes: the launch geometry the
performance model (``perf_model.py``) multiplies its per-iteration SASS counts by.

An aot spec is matched by its kernel's name (``spec["fn"].__name__``) and read only through its
public fields (constexpr tiles and flags, num_warps), so the tool follows kernels wherever they live.
The grid and loop trip counts mirror what the launchers in ``ops/`` compute (named per kernel below);
the device-filling split counts use an H100 / H200's 132 SMs (``physics.SM90``). A kernel without an
entry here gets static numbers only (``launches`` returns None); ``NO_WORKLOAD`` names the ones left
out on purpose.

Shapes (bench/cases.py's models and batches; B 8, utterances as the benchmarks draw them, frames as
the conv stack gives them, every padded batch padded to its longest utterance):
- attention: base (H 12) and large (H 16), D 64, 5 / 10 / 20 / 30 s (S 249 .. 1499), padded with a
  prefix mask (given as a mask, or as its lengths: ``_prefix``) and packed; the specs compile the
  large model's H 16 (H only enters index math);
- positional conv: base (C 768) and large (C 1024), K 128, 16 groups, 10 / 30 s (T 499 / 1499);
- feature encoder: 10 / 30 s; layer 0 (1 -> 512, K 10, stride 5; base GroupNorm, large LayerNorm)
  and layers 1-6 (512 channels; K 3 at layers 1-4, K 2 at layers 5-6, which run the K 3 build's
  loop: KSIZE is only a trip count there), base without a norm, large with LayerNorm.

Counts per launch: ``flops`` are the kernel's own useful matmul / conv FLOPs (``bench/physics.py``
conventions, real frames only; the attention backward's dK/dV kernel 4 and dQ kernel 3 of the
n^2 D matmuls); ``nbytes`` the least DRAM traffic of the kernel: each tensor it reads once, each it
writes once, padded rows included where the kernel writes them. ``op`` names the benchmark row
(bench/results/README.md) the kernel is part of, with ``op_flops`` / ``op_bytes`` the row's counts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

from bench import cases, physics

BATCH = 8
ATTENTION_SECONDS = (5, 10, 20, 30)
POS_CONV_SECONDS = (10, 30)
ENCODER_SECONDS = (10, 30)
BF16 = 2
TARGET_PROGRAMS = 4 * physics.SM90["sms"]  # _runtime.target_programs on an H100 / H200
NO_WORKLOAD = {
    "_dropout_mask_kernel": "debug helper (the bool keep-mask for tests), not launched by an op",
    "_forced_align_kernel": "a sequential dynamic program, one program per utterance: latency, not throughput, "
                            "decides its time (static numbers only)",
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Launch:
    op: str  # the benchmark row it belongs to (+dropout / +dx: variants no benchmark times)
    part: str  # its role in the op ("fwd", "layer 3 conv", ...): one config per part is picked
    model: str
    seconds: int
    shape: str
    blocks: int  # programs in the grid
    work_blocks: int  # programs that run the body (the others exit at once)
    trips: float  # main-loop iterations, all programs together
    outer_trips: float  # iterations of each other loop, per working program (1: straight code)
    flops: float
    nbytes: float
    op_flops: float
    op_bytes: float


def _split_work(n_tiles: int, other: int):
    """ops/_common.split_work: (splits, tiles per split)."""
    splits = max(1, min(n_tiles, cdiv(TARGET_PROGRAMS, max(1, other))))
    per = cdiv(n_tiles, splits)
    return cdiv(n_tiles, per), per


def _audio(model: str, seconds: int):
    """(sample lengths, the model's config) of a benchmark batch."""
    return cases.batch_lengths(seconds, BATCH), cases.MODELS[model]


# ---- attention (ops/attention.py attn_fwd / attn_bwd) -------------------------------------------------
def _attention(spec: dict) -> list:
    """Launches of the op rows a spec belongs to: padded with a mask, padded with its lengths (prefix:
    no mask loads) or packed; the padded preprocess kernel serves both padded rows."""
    c, name = spec["constexprs"], spec["fn"].__name__
    layouts = ["_packed"] if c["PACKED"] else ["_prefix"] if c.get("PREFIX_MASK") else \
        ["", "_prefix"] if name == "_attn_bwd_preprocess_kernel" else [""]
    return [launch for layout in layouts for launch in _attention_launches(spec, layout)]


def _attention_launches(spec: dict, layout: str) -> list:
    c, name = spec["constexprs"], spec["fn"].__name__
    d, packed, dropout = c["HEAD_DIM"], c["PACKED"], c.get("HAS_DROPOUT", False)  # preprocess: no flag
    kind = {"_attn_fwd_kernel": "fwd", "_attn_bwd_preprocess_kernel": "bwd",
            "_attn_bwd_dkdv_kernel": "bwd", "_attn_bwd_dq_kernel": "bwd"}[name]
    # HAS_BIAS (rel_pos_attention): the same geometry; its gathers, d(gate) and d(table) traffic not counted
    op = f"{'rel_pos_' if c.get('HAS_BIAS') else ''}attention{layout}_{kind}" + ("+dropout" if dropout else "")
    out = []
    for model in ("base", "large"):
        heads = cases.MODELS[model]["num_attention_heads"]
        for seconds in ATTENTION_SECONDS:
            lengths, cfg = _audio(model, seconds)
            frames = cases.frame_lengths(lengths, cfg)
            b, s = len(frames), max(frames)
            bh, fwd = b * heads, physics.attention_flops(frames, heads, d)
            real = sum(frames) * heads * d * BF16  # one [tokens, H, D] tensor over real rows
            full = real if packed else b * s * heads * d * BF16  # ... as the kernel writes it
            rows_f32 = 4 * bh * s  # one fp32 value per (batch, head, row): lse, delta
            mask = b * s if layout == "" else 0  # the bool mask, read once
            shape = f"{model} {seconds}s B{b} S{s} H{heads} D{d}"
            if name == "_attn_bwd_preprocess_kernel":
                blocks = cdiv(s, c["BLOCK_M"]) * bh
                geo = (blocks, blocks, 0, 0.0, 2 * full + rows_f32)  # read out, dout; write delta
                part = "preprocess"
            else:
                resident, streamed = ("BLOCK_N", "BLOCK_M") if name == "_attn_bwd_dkdv_kernel" else \
                    ("BLOCK_M", "BLOCK_N")
                r, t = c[resident], c[streamed]
                work = heads * sum(cdiv(n, r) for n in frames)
                trips = heads * sum(cdiv(n, r) * cdiv(n, t) for n in frames)
                if name == "_attn_fwd_kernel":
                    geo, part = (cdiv(s, r) * bh, work, trips, fwd, 3 * real + full + rows_f32 + mask), "fwd"
                elif name == "_attn_bwd_dkdv_kernel":
                    geo, part = (cdiv(s, r) * bh, work, trips, 2.0 * fwd, 4 * real + 2 * full + 2 * rows_f32 + mask), \
                        "dk dv"
                else:
                    geo, part = (cdiv(s, r) * bh, work, trips, 1.5 * fwd, 4 * real + full + 2 * rows_f32 + mask), "dq"
            blocks, work, trips, flops, nbytes = geo
            bwd = kind == "bwd"
            out.append(Launch(op, part, model, seconds, shape, blocks, work, trips, 1, flops, nbytes,
                              physics.attention_flops(frames, heads, d, bwd),
                              physics.attention_bytes(frames, heads, d, BF16, bwd)))
    return out


# ---- feature encoder layers 1-6 (ops/conv_layer.py conv_layer_fwd / conv_layer_bwd) ------------------
def _encoder_layers(model: str, seconds: int):
    """[(layer, K, stride, T_in, real input frames per utterance, T_out, real output frames)]."""
    lengths, cfg = _audio(model, seconds)
    t_in = physics.conv_out_len(max(lengths), cfg["conv_kernel"][0], cfg["conv_stride"][0])
    real = [physics.conv_out_len(n, cfg["conv_kernel"][0], cfg["conv_stride"][0]) for n in lengths]
    out = []
    for i in range(1, len(cfg["conv_dim"])):
        k, st = cfg["conv_kernel"][i], cfg["conv_stride"][i]
        t_out, real_out = physics.conv_out_len(t_in, k, st), [physics.conv_out_len(n, k, st) for n in real]
        out.append((i, k, st, t_in, real, t_out, real_out))
        t_in, real = t_out, real_out
    return out


def _encoder_counts(model: str, seconds: int, backward: bool = False):
    """(FLOPs, bytes) of the encoder's forward (bench/physics.py), or of layers 1-6's backward: dX and
    dW (2x their forward), each layer's input and output gradient read once, its input gradient written."""
    lengths, cfg = _audio(model, seconds)
    conv = (cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"])
    if not backward:
        return physics.feature_encoder_flops(lengths, *conv), physics.feature_encoder_bytes(lengths, *conv, BF16)
    layers = _encoder_layers(model, seconds)
    ch = cfg["conv_dim"][1:]
    flops = sum(4.0 * c * c * k * sum(real_out) for c, (_, k, _, _, _, _, real_out) in zip(ch, layers))
    nbytes = sum(BATCH * c * BF16 * (2 * t_in + t_out) for c, (_, _, _, t_in, _, t_out, _) in zip(ch, layers))
    return flops, nbytes


def _conv_layer(spec: dict) -> list:
    c, name, out = spec["constexprs"], spec["fn"].__name__, []
    norm = bool(c.get("NORM"))
    # base: layers 1-6 without a norm; large: LayerNorm everywhere; dX and dW kernels serve both
    models = ["large" if norm else "base"] if "NORM" in c else ["base", "large"]
    forward = name == "_conv_fwd_kernel"
    op = ("feature_encoder_fwd" + ("+save" if c["SAVE"] else "")) if forward else "feature_encoder_bwd"
    for model, seconds in itertools.product(models, ENCODER_SECONDS):
        op_flops, op_bytes = _encoder_counts(model, seconds, backward=not forward)
        for layer, k, st, t_in, real_in, t_out, real_out in _encoder_layers(model, seconds):
            ch, m = cases.MODELS[model]["conv_dim"][layer], BATCH * t_out
            flops = 2.0 * ch * ch * k * sum(real_out)
            act_in, act_out, weight = BATCH * t_in * ch * BF16, m * ch * BF16, k * ch * ch * BF16
            shape = f"{model} {seconds}s B{BATCH} layer {layer} T_in {t_in} K{k}"
            if forward:
                bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
                n_tiles = cdiv(ch, bn)
                blocks = (1 if norm else n_tiles) * cdiv(m, bm)
                trips = blocks * k * cdiv(ch, bk) * (n_tiles if norm else 1)
                saved = (act_out + (8 * m if norm else 0)) if c["SAVE"] else 0
                geo = (blocks, trips, n_tiles if norm else 1, flops, act_in + weight + act_out + saved)
                part = f"layer {layer} conv"
            elif name == "_norm_act_bwd_kernel":
                block_m = c["BLOCK_M"]
                programs = max(1, min(cdiv(m, block_m), 4 * TARGET_PROGRAMS))
                rows = cdiv(cdiv(m, programs), block_m) * block_m
                programs = cdiv(m, rows)
                geo = (programs, programs * rows // block_m, 1, 0.0,
                       3 * act_out + (8 * m if norm else 0) + programs * 3 * ch * 4)
                part = f"layer {layer} norm/GELU bwd"
            elif name == "_conv_bwd_dx_kernel":
                bm, bn, bk, j = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], cdiv(t_in, st)
                per_phase = cdiv(ch, bn) * cdiv(BATCH * j, bm)
                trips = per_phase * sum(cdiv(k - p, st) for p in range(st)) * cdiv(ch, bk)
                geo = (per_phase * st, trips, 1, flops, act_out + weight + act_in)
                part = f"layer {layer} dX"
            else:  # _conv_bwd_dw_kernel
                bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
                tiles = cdiv(k * ch, 128) * cdiv(ch, 128)
                splits = max(1, min(cdiv(TARGET_PROGRAMS, tiles), cdiv(m, 1024)))
                per = cdiv(cdiv(m, splits), 128) * 128
                splits = cdiv(m, per)
                tiles = cdiv(ch, bn) * cdiv(k * ch, bm)
                trips = tiles * sum(cdiv(min(per, m - s * per), bk) for s in range(splits))
                geo = (tiles * splits, trips, 1, flops, act_in + act_out + splits * k * ch * ch * 4)
                part = f"layer {layer} dW"
            blocks, trips, outer, flops_k, nbytes = geo
            out.append(Launch(op, part, model, seconds, shape, blocks, blocks, trips, outer, flops_k, nbytes,
                              op_flops, op_bytes))
    return out


# ---- feature encoder layer 0 (ops/first_conv_layer.py first_conv_fwd / first_conv_bwd) ---------------
GROUP_NORM = 2  # the first-layer kernels' NORM code of GroupNorm (the statistics kernels are group-only)


def _first_conv(spec: dict) -> list:
    c, name, out = spec["constexprs"], spec["fn"].__name__, []
    model = "base" if c.get("NORM", GROUP_NORM) == GROUP_NORM else "large"  # base GroupNorm, large LayerNorm
    for seconds in ENCODER_SECONDS:
        lengths, cfg = _audio(model, seconds)
        ch, k, st = cfg["conv_dim"][0], cfg["conv_kernel"][0], cfg["conv_stride"][0]
        length, t = max(lengths), physics.conv_out_len(max(lengths), k, st)
        flops = 2.0 * ch * k * sum(physics.conv_out_len(n, k, st) for n in lengths)
        audio, act = BATCH * length * BF16, BATCH * t * ch * BF16
        shape = f"{model} {seconds}s B{BATCH} L{length} T{t} C{ch}"
        bt, bc = c["BLOCK_T"], c["BLOCK_C"]
        fwd_counts = (physics.feature_encoder_flops(lengths, [ch], [k], [st]),
                      physics.feature_encoder_bytes(lengths, [ch], [k], [st], BF16))
        if name == "_first_conv_fwd_kernel":
            blocks = cdiv(t, bt) * BATCH * cdiv(ch, bc)
            ops, part = ["first_conv_layer_fwd"], "conv + norm + GELU"
            geo = (blocks, 0, flops, audio + act + (8 * BATCH * ch if model == "base" else 0))
        elif name in ("_first_conv_group_stats_kernel", "_first_conv_group_bwd_reduce_kernel"):
            n_tiles, lanes = cdiv(t, bt), BATCH * cdiv(ch, bc)
            splits, _ = _split_work(n_tiles, lanes)
            forward = name == "_first_conv_group_stats_kernel"
            ops = ["first_conv_layer_fwd"] if forward else ["first_conv_layer_bwd"]
            part = "group statistics" if forward else "group reduction"
            partials = splits * BATCH * ch * (3 if forward else 2) * 4
            geo = (splits * lanes, lanes * n_tiles, 0.0, audio + (0 if forward else act) + partials)
        else:  # _first_conv_bwd_kernel: dW (and the audio gradient's taps with NEED_DX)
            n_tiles = cdiv(t, bt)
            splits, _ = _split_work(n_tiles, BATCH)
            dx = bool(c["NEED_DX"])
            partials = splits * BATCH * ch * (c["KPAD"] + 3) * 4 + (BATCH * t * k * 4 if dx else 0)
            ops, part = ["first_conv_layer_bwd" + ("+dx" if dx else "")], "dW, norm grads" + (", dX taps" if dx else "")
            geo = (splits * BATCH, BATCH * n_tiles, flops * (2 if dx else 1), audio + act + partials)
        blocks, trips, flops_k, nbytes = geo
        if ops == ["first_conv_layer_fwd"]:  # layer 0 is also the first part of the encoder's forward
            ops += ["feature_encoder_fwd", "feature_encoder_fwd+save"]
        for op in ops:
            if op.startswith("first_conv_layer_bwd"):
                counts = (fwd_counts[0] * (2 if op.endswith("+dx") else 1), audio + act)
            elif op.startswith("feature_encoder"):
                counts = _encoder_counts(model, seconds)
            else:
                counts = fwd_counts
            out.append(Launch(op, part if op.startswith("first_conv") else "layer 0 " + part, model, seconds,
                              shape, blocks, blocks, trips, 1, flops_k, nbytes, *counts))
    return out


# ---- positional conv (ops/pos_conv.py _launch_conv, pos_conv_dw, gelu_bwd) ----------------------------
def _pos_conv(spec: dict) -> list:
    c, name, out = spec["constexprs"], spec["fn"].__name__, []
    models = [m for m in ("base", "large") if "CG" not in c or
              cases.MODELS[m]["hidden_size"] // cases.MODELS[m]["num_conv_pos_embedding_groups"] == c["CG"]]
    for model in models:
        cfg = cases.MODELS[model]
        ch, groups, k = cfg["hidden_size"], cfg["num_conv_pos_embedding_groups"], cfg["num_conv_pos_embeddings"]
        cg = ch // groups
        for seconds in POS_CONV_SECONDS:
            frames = cases.frame_lengths(cases.batch_lengths(seconds, BATCH), cfg)
            t = max(frames)
            act, weight = BATCH * t * ch * BF16, ch * cg * k * BF16
            flops = physics.pos_conv_flops(frames, ch, groups, k)
            shape = f"{model} {seconds}s B{BATCH} T{t} C{ch} G{groups} K{k}"
            if name == "_pos_conv_conv_kernel":
                blocks = cdiv(t, c["BLOCK_T"]) * BATCH * groups * cdiv(cg, c["BLOCK_N"])
                trips = blocks * cdiv(k * cg, c["BLOCK_R"])
                tensors = 2 + bool(c.get("ADD_RES")) + bool(c.get("STORE_PRE"))  # in, out, residual, pre
                op = "pos_conv_fwd" if not (c.get("FLIP") or c.get("STORE_PRE")) else "pos_conv_fwd_bwd"
                part = "dX" if c.get("FLIP") else "conv + GELU + residual"
                geo = (blocks, trips, flops, tensors * act + weight)
            elif name == "_pos_conv_dw_kernel":
                m_tiles, n_tiles = cdiv(k * cg, c["BLOCK_M"]), groups * cdiv(cg, c["BLOCK_N"])
                n_iters = BATCH * cdiv(t, c["BLOCK_S"])
                split = max(1, min(cdiv(TARGET_PROGRAMS // 2, m_tiles * n_tiles), n_iters))
                split = cdiv(n_iters, cdiv(n_iters, split))
                partial = (4 if split > 1 else BF16) * split * (ch * cg * k + ch)
                op, part = "pos_conv_fwd_bwd", "dW, db"
                geo = (m_tiles * n_tiles * split, m_tiles * n_tiles * n_iters, flops, 2 * act + partial)
            else:  # _gelu_bwd_kernel
                n = BATCH * t * ch
                op, part = "pos_conv_fwd_bwd", "GELU bwd"
                geo = (cdiv(n, c["BLOCK"]), 0, 0.0, 3 * n * BF16)
            blocks, trips, flops_k, nbytes = geo
            bwd = op == "pos_conv_fwd_bwd"
            out.append(Launch(op, part, model, seconds, shape, blocks, blocks, trips, 1, flops_k, nbytes,
                              physics.pos_conv_flops(frames, ch, groups, k, bwd),
                              physics.pos_conv_bytes(frames, ch, groups, k, BF16, bwd)))
    return out


WORKLOADS = {
    "_attn_fwd_kernel": _attention, "_attn_bwd_preprocess_kernel": _attention,
    "_attn_bwd_dkdv_kernel": _attention, "_attn_bwd_dq_kernel": _attention,
    "_conv_fwd_kernel": _conv_layer, "_norm_act_bwd_kernel": _conv_layer,
    "_conv_bwd_dx_kernel": _conv_layer, "_conv_bwd_dw_kernel": _conv_layer,
    "_first_conv_fwd_kernel": _first_conv, "_first_conv_group_stats_kernel": _first_conv,
    "_first_conv_group_bwd_reduce_kernel": _first_conv, "_first_conv_bwd_kernel": _first_conv,
    "_pos_conv_conv_kernel": _pos_conv, "_pos_conv_dw_kernel": _pos_conv, "_gelu_bwd_kernel": _pos_conv,
}


def launches(spec: dict) -> Optional[list]:
    """[Launch] of a spec at every benchmark shape it runs at; None without a workload entry."""
    workload = WORKLOADS.get(spec["fn"].__name__)
    return workload(spec) if workload else None
