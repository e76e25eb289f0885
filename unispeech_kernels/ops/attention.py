"""Masked bidirectional attention.

Shapes: q, k, v [B, S, H, D] (any strides); key_padding_mask bool [B, S], True = real frame;
output [B, S, H, D]. Rows whose sequence has no real frame return zeros.

Triton backend (kernels: ``attention_kernels.py``): a flash-style forward (online softmax in exp2,
fp32 accumulation, log-sum-exp saved) and a deterministic bidirectional backward. Masks: any bool
mask works; the kernels load it per key block, and loop only up to ``kv_end`` = last real position +
1 (computed on the device, no host sync), so for audio's prefix masks key blocks past a sequence's
length are skipped and query blocks past it exit early. With PACKED the same kernels read sequences
stored back to back in [N, H, D] rows (``attention_packed.py``). The Triton op defines padded query
rows as zeros: gradients through them are zero (the torch backend returns attention over real keys
there; both are within the contract "any finite value"). Eager calls launch through
``TritonAttentionFunction`` (host time per call: ``bench/test_attention_host.py``), torch.compile
traces the torch.library ops; a mask's kv_end is computed once while the same mask tensor comes back.
Dropout: a uniform per (batch*head, query, key), one Philox draw (four uniforms) per four consecutive
keys of a query, from a seed drawn on the device with torch's generator (``torch.manual_seed``
reproduces it), saved for the backward, which regenerates the mask.

File order: torch reference -> contract (inputs, checks) -> launchers -> torch.library ops + autograd
-> backends -> functional entry point -> ``aot_specs``.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .._runtime import SM90_SHARED_MEMORY, dot_flags, interpret_mode
from ..dispatch import Inputs, Op
from ..padding import mask_from_lengths, prefix_lengths
from ._common import KERNEL_DTYPES, aot_spec, cdiv, launch_tuned, length_bucket, next_power_of_2, tile_config

MAX_HEAD_DIM = 256


def attention_reference(q, k, v, key_padding_mask=None, *, dropout_p=0.0, softmax_scale=None,
                        upcast=False, dropout_mask=None):
    """Plain softmax(QK^T * scale + mask) V. ``upcast`` computes in fp64 (tests' ground truth).
    ``dropout_mask`` [B, H, S, S] bool (True = keep) replaces random dropout when given."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no real key -> zeros
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out if upcast else out.to(dtype)



def check_qkv(q, k, v, dims: tuple, op: str = "attention"):
    """q, k, v tensors of one floating dtype, shape and device, with the ``dims`` named."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(dims):
            raise ValueError(f"{op}: {name} must be [{', '.join(dims)}], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head_dim must be at least 1, got shape {tuple(q.shape)}")


MAX_SOFTMAX_SCALE = torch.finfo(torch.float32).max / math.log2(math.e)  # kernels take scale * log2(e) as fp32


def check_dropout_and_scale(dropout_p, softmax_scale, op: str = "attention"):
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not 0 < softmax_scale <= MAX_SOFTMAX_SCALE:
        raise ValueError(f"{op}: softmax_scale must be positive and finite (at most {MAX_SOFTMAX_SCALE:.3g}), "
                         f"got {softmax_scale}")


def check_attention_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    """Raise a clear error for anything no backend should be asked to compute."""
    check_qkv(q, k, v, ("batch", "seq", "heads", "head_dim"))
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("attention: key_padding_mask must be a bool tensor (True = real frame), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (q.shape[0], q.shape[1]):
            raise ValueError(f"attention: key_padding_mask must have shape [batch, seq] = "
                             f"{(q.shape[0], q.shape[1])}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")
    check_dropout_and_scale(dropout_p, softmax_scale)


def check_lengths(q, key_padding_mask, lengths):
    """``lengths``, when given instead of a mask: a [batch] integer tensor on q's device."""
    if lengths is None:
        return
    if key_padding_mask is not None:
        raise ValueError("attention: pass key_padding_mask or lengths (a prefix mask's lengths), not both")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype.is_complex \
            or lengths.dtype == torch.bool:
        raise TypeError(f"attention: lengths must be an integer tensor, got "
                        f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
    if tuple(lengths.shape) != (q.shape[0],):
        raise ValueError(f"attention: lengths must have shape [batch] = ({q.shape[0]},), got {tuple(lengths.shape)}")
    if lengths.device != q.device:
        raise ValueError(f"attention: lengths on {lengths.device}, q on {q.device}")


class AttentionCall(Inputs):
    """What both attention ops' inputs share: q, dropout_p, softmax_scale."""

    @property
    def features(self):
        return frozenset(name for name, needed in (("dropout", self.dropout_p > 0.0), ("training", self.needs_grad))
                         if needed)

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.q.shape[-1])

    def sequence_span(self, rows: int) -> int:
        """Elements that ``rows`` rows of one sequence span in q, k, v or the output (contiguous):
        the kernels' offsets within a sequence are int32."""
        def span(shape, stride):
            return sum((max(n, 1) - 1) * st for n, st in zip(shape, stride)) + 1
        heads = self.q.shape[-2:]
        return max([span((rows, *heads), t.stride()[-3:]) for t in (self.q, self.k, self.v)]
                   + [span((rows, *heads), (heads[0] * heads[1], heads[1], 1))])


@dataclasses.dataclass(frozen=True)
class AttentionInputs(AttentionCall):
    q: torch.Tensor  # [B, S, H, D]
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: Optional[torch.Tensor] = None  # bool [B, S], True = real frame
    dropout_p: float = 0.0
    softmax_scale: Optional[float] = None  # None: 1 / sqrt(D)
    lengths: Optional[torch.Tensor] = None  # [B] integer: a prefix mask's lengths, instead of the mask

    @property
    def tensors(self):
        return self.q, self.k, self.v, self.key_padding_mask, self.lengths

    @property
    def float_tensors(self):
        return self.q, self.k, self.v

    @property
    def sizes(self):
        B, S, H, D = self.q.shape
        return {"head_dim": D, "batch*heads (a grid axis)": B * H, "seq": S, SPAN: self.sequence_span(S)}


FEATURES = {"dropout": "has no dropout", "training": "has no backward"}
SPAN = "elements one sequence spans (int32 offsets)"


# ----------------------------------------------------------------------------------------- launchers

@functools.lru_cache(None)
def _kernels():  # imported once, at the first launch (a per-call import costs microseconds)
    from . import attention_kernels

    return attention_kernels


def draw_dropout_seed(device) -> torch.Tensor:
    """[1] int64 seed from torch's generator of ``device`` (what the op uses; tests redraw it)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def kv_end_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B] int32: last real position + 1 of each row of a bool [B, S] mask (0 for no real frame)."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int32)
    return torch.where(mask, pos, 0).amax(dim=1).to(torch.int32)


_LAST_MASK: list = [None, -1, None]  # weak reference to the last mask seen, its version, its kv_end


def mask_args(mask: Optional[torch.Tensor], lengths: Optional[torch.Tensor] = None):
    """(mask as uint8 [B, S], kv_end [B] int32) as the launchers take them: (None, lengths) for a
    prefix mask given by its lengths (the kernels clamp them to [0, S]), (None, None) without a mask.
    Every layer of a forward attends with the same mask tensor: its kv_end is computed once (device
    ops, no host sync) and reused while that tensor lives unmodified."""
    if mask is None:
        return None, (None if lengths is None else lengths.to(torch.int32))
    if mask.is_inference():  # inference tensors track no version: nothing tells a reused one is unchanged
        return mask.view(torch.uint8), kv_end_from_mask(mask)
    ref, version, kv_end = _LAST_MASK
    if ref is None or ref() is not mask or mask._version != version:
        kv_end = kv_end_from_mask(mask)
        _LAST_MASK[:] = [weakref.ref(mask), mask._version, kv_end]
    return mask.view(torch.uint8), kv_end


def strides(t):
    """A tensor's strides as the kernels take them; packed [N, H, D] rows get the batch stride 0 of
    [B, S, H, D] (the kernels find a sequence's rows from seq_start_ptr)."""
    return (0, *t.stride()) if t.dim() == 3 else tuple(t.stride())


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def attn_fwd(q, k, v, mask_u8, kv_end, seed, dropout_p: float, softmax_scale: float, seq_start=None,
             max_len: int = 0, bias=None):
    """Launch the forward; returns out [B, S, H, D] and lse [B, H, S] (log2 domain). ``seed``: [1]
    int64, None without dropout. Packed (``seq_start`` [B] int32 first rows, ``kv_end`` the
    lengths): q, k, v and out are [N, H, D] rows and S = ``max_len``. ``kv_end`` without ``mask_u8``
    (padded): a prefix mask, no mask loads. ``bias``: (table [H, 2, L], gate [B, S, H]) contiguous
    fp32, the gated relative-position bias (``rel_pos_attention.py``; padded batches only)."""
    kern = _kernels()
    packed = seq_start is not None
    (B, S), (H, D) = ((seq_start.numel(), max_len) if packed else q.shape[:2]), q.shape[-2:]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((B, H, S), dtype=torch.float32)
    loads_mask = mask_u8 is not None
    table, gate = bias if bias is not None else (lse, lse)
    args = (q, k, v, out, lse, mask_u8 if loads_mask else lse, kv_end if kv_end is not None else lse,
            seq_start if packed else lse, seed if seed is not None else lse, table, gate,
            *strides(q), *strides(k), *strides(v), *strides(out),
            *(strides(mask_u8) if loads_mask else (0, 0)),
            H, S, _distances(bias), softmax_scale * 1.4426950408889634, float(dropout_p), length_bucket(S))
    flags = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), **_mask_flags(loads_mask, kv_end, packed),
                 HAS_DROPOUT=dropout_p > 0.0, HAS_BIAS=bias is not None, **dot_flags(q.dtype))
    launch_tuned(kern._fwd_tuned if bias is None else kern._fwd_bias_tuned, lambda m: (cdiv(S, m["BLOCK_M"]), B * H),
                 *args, **flags, interpret=kern.INTERPRET_TILES)
    return out, lse


def _mask_flags(loads_mask: bool, kv_end, packed: bool) -> dict:
    """HAS_MASK (padded, kv_end given), PREFIX_MASK (HAS_MASK with no mask to load: kv_end alone) and PACKED."""
    has_mask = kv_end is not None and not packed
    return dict(HAS_MASK=has_mask, PREFIX_MASK=has_mask and not loads_mask, PACKED=packed)


def _distances(bias) -> int:
    """L of a bias's [H, 2, L] table (1 without a bias)."""
    return bias[0].shape[2] if bias is not None else 1


def attn_bwd(dout, q, k, v, out, lse, seed, mask_u8, kv_end, dropout_p: float, softmax_scale: float,
             seq_start=None, bias=None):
    """Launch preprocess, dK/dV and dQ: (dq, dk, dv), with ``bias`` (as ``attn_fwd``'s) followed by
    ddiag [B*H, m blocks, 2S] (the table's gradient by relative position, ``rel_pos_attention``
    sums it) and dgate [B, S, H] fp32. ``mask_u8`` / ``kv_end`` as ``attn_fwd`` takes them.
    Packed (``seq_start`` given, ``kv_end`` the lengths): every tensor is [N, H, D] rows, S = lse's."""
    kern = _kernels()
    B, H, S = lse.shape
    D = q.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    packed = seq_start is not None
    kern._attn_bwd_preprocess_kernel[(cdiv(S, kern.PREPROCESS_BLOCK_M), B * H)](
        out, dout, delta, kv_end if packed else delta, seq_start if packed else delta, *strides(out),
        *strides(dout), H, S, HEAD_DIM=D, BLOCK_M=kern.PREPROCESS_BLOCK_M, BLOCK_D=_block_d(D), PACKED=packed)
    loads_mask = mask_u8 is not None
    mask_arg = mask_u8 if loads_mask else delta
    mask_strides = strides(mask_u8) if loads_mask else (0, 0)
    kv_arg = kv_end if kv_end is not None else delta
    start_arg = seq_start if packed else delta
    common = (*strides(q), *strides(k), *strides(v), *strides(dout))
    scalars = (H, S, _distances(bias), softmax_scale * 1.4426950408889634, softmax_scale, float(dropout_p),
               length_bucket(S))
    flags = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), **_mask_flags(loads_mask, kv_end, packed),
                 HAS_DROPOUT=dropout_p > 0.0, HAS_BIAS=bias is not None, **dot_flags(q.dtype))
    seed_arg = seed if seed is not None else delta
    table, gate = bias if bias is not None else (delta, delta)
    dkdv_args = (q, k, v, dout, dk, dv, lse, delta, mask_arg, kv_arg, start_arg, seed_arg, table, gate, *common,
                 *strides(dk), *mask_strides, *scalars)
    launch_tuned(kern._dkdv_tuned if bias is None else kern._dkdv_bias_tuned, lambda m: (cdiv(S, m["BLOCK_N"]), B * H),
                 *dkdv_args, **flags, interpret=kern.INTERPRET_TILES)
    if bias is None:
        dq_args = (q, k, v, dout, dq, delta, delta, delta, lse, delta, mask_arg, kv_arg, start_arg, seed_arg, delta,
                   delta, *common, *strides(dq), *mask_strides, *scalars)
        launch_tuned(kern._dq_tuned, lambda m: (cdiv(S, m["BLOCK_M"]), B * H), *dq_args, **flags,
                     interpret=kern.INTERPRET_TILES)
        return dq, dk, dv
    # fixed tiles: they size the buffers of the table's gradient
    tiles = tile_config(kern._attn_bwd_dq_kernel, gpu=kern.DQ_BIAS_TILES, interpret=kern.INTERPRET_TILES)
    grid = (cdiv(S, tiles["BLOCK_M"]), B * H)
    ddiag = torch.zeros((B * H, grid[0], 2 * S), dtype=torch.float32, device=q.device)
    scratch = torch.empty((B * H * grid[0], tiles["BLOCK_M"] * tiles["BLOCK_N"]), dtype=torch.float32, device=q.device)
    dgate = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    launch = {} if interpret_mode() else dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    kern._attn_bwd_dq_kernel[grid](q, k, v, dout, dq, dgate, ddiag, scratch, lse, delta, mask_arg, kv_arg, start_arg,
                                   seed_arg, table, gate, *common, *strides(dq), *mask_strides, *scalars, **flags,
                                   BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], **launch)
    return dq, dk, dv, ddiag, dgate


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, seq: int, dropout_p: float):
    """Debug/test helper: the bool keep-mask [B, H, S, S] the kernels use for ``seed`` ([1] int64)."""
    keep = torch.empty((batch * heads, seq, seq), dtype=torch.uint8, device=seed.device)
    grid = (cdiv(seq, 64), cdiv(seq, 64), batch * heads)
    _kernels()._dropout_mask_kernel[grid](keep, seed, seq, float(dropout_p), BLOCK=64)
    return keep.view(batch, heads, seq, seq).bool()


class TritonAttentionFunction(torch.autograd.Function):
    """Eager autograd of the Triton kernels, padded or packed (``attn_fwd`` / ``attn_bwd`` arguments).
    Eager calls come here rather than through the torch.library ops below, whose dispatch costs more
    host time than the launch itself; torch.compile traces the ops."""

    @staticmethod
    def forward(ctx, q, k, v, mask_u8, kv_end, seq_start, max_len, dropout_p, softmax_scale):
        seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
        out, lse = attn_fwd(q, k, v, mask_u8, kv_end, seed, dropout_p, softmax_scale, seq_start, max_len)
        ctx.save_for_backward(q, k, v, out, lse, seed, mask_u8, kv_end, seq_start)
        ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, seed, mask_u8, kv_end, seq_start = ctx.saved_tensors
        dq, dk, dv = attn_bwd(dout, q, k, v, out, lse, seed, mask_u8, kv_end, ctx.dropout_p, ctx.softmax_scale,
                              seq_start)
        return dq, dk, dv, None, None, None, None, None, None


def triton_attention(inputs: AttentionCall, mask_u8, kv_end, seq_start=None, max_len: int = 0):
    """The Triton forward of an eager call: the launcher alone when no gradient is needed, else
    ``TritonAttentionFunction``; under torch.compile the callers use the torch.library ops instead."""
    q, k, v = inputs.q, inputs.k, inputs.v
    dropout_p, scale = float(inputs.dropout_p), float(inputs.scale)
    if inputs.needs_grad:
        return TritonAttentionFunction.apply(q, k, v, mask_u8, kv_end, seq_start, max_len, dropout_p, scale)
    seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    return attn_fwd(q, k, v, mask_u8, kv_end, seed, dropout_p, scale, seq_start, max_len)[0]


@torch.library.custom_op("unispeech_kernels::attention_fwd", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? lengths, "
                                "float dropout_p, float softmax_scale) -> (Tensor, Tensor, Tensor)")
def attention_fwd_op(q, k, v, key_padding_mask, lengths, dropout_p, softmax_scale):
    """Triton forward as a torch.library op: (out, lse, seed)."""
    seed = forward_seed(dropout_p, q.device)
    out, lse = attn_fwd(q, k, v, *mask_args(key_padding_mask, lengths), seed, dropout_p, softmax_scale)
    return out, lse, seed


def forward_seed(dropout_p: float, device) -> torch.Tensor:
    """A forward op's [1] int64 dropout seed: drawn with dropout, 0 without."""
    return draw_dropout_seed(device) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64, device=device)


def fake_forward(q):
    """(out, lse, seed) of a forward op on padded [B, S, H, D] q, as meta tensors (its fake impl)."""
    B, S, H, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32),
            q.new_empty((1,), dtype=torch.int64))


@attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, lengths, dropout_p, softmax_scale):
    return fake_forward(q)


@torch.library.custom_op("unispeech_kernels::attention_bwd", mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor seed, "
                                "Tensor? key_padding_mask, Tensor? lengths, float dropout_p, float softmax_scale) "
                                "-> (Tensor, Tensor, Tensor)")
def attention_bwd_op(dout, q, k, v, out, lse, seed, key_padding_mask, lengths, dropout_p, softmax_scale):
    """Triton backward as a torch.library op: (dq, dk, dv)."""
    return attn_bwd(dout, q, k, v, out, lse, seed, *mask_args(key_padding_mask, lengths), dropout_p, softmax_scale)


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, seed, key_padding_mask, lengths, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, lengths, dropout_p, softmax_scale = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, out, lse, seed, key_padding_mask, lengths)
    ctx.dropout_p, ctx.softmax_scale = dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse, seed)


def _backward(ctx, dout, _dlse, _dseed):
    q, k, v, out, lse, seed, key_padding_mask, lengths = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, seed, key_padding_mask, lengths, ctx.dropout_p,
                                  ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ backends

attention_op = Op("attention", features=FEATURES)


def sdpa_unmasked(q, k, v, dropout_p, softmax_scale):
    """SDPA of unmasked sequences in the [B, S, H, D] layout (any strides) -> [B, S, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=softmax_scale).transpose(1, 2)


@attention_op.backend("torch", features=tuple(FEATURES))
def attention_torch(inputs: AttentionInputs):
    """torch SDPA. A prefix mask (audio padding) runs SDPA per sequence on its real frames, with no
    mask (SDPA's fast path, no padded work; padded query rows are zero); any other mask goes to
    SDPA as a boolean mask. Fully padded sequences give zeros."""
    q, k, v, key_padding_mask, lengths = inputs.tensors
    dropout_p, softmax_scale = inputs.dropout_p, inputs.softmax_scale
    if lengths is not None:
        key_padding_mask = mask_from_lengths(lengths, q.shape[1])
    if key_padding_mask is not None and not torch.compiler.is_compiling():
        lengths = prefix_lengths(key_padding_mask)  # one host sync
        if lengths is not None:
            out = torch.zeros_like(q)
            for b, n in enumerate(lengths):
                if n:
                    out[b:b + 1, :n] = sdpa_unmasked(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], dropout_p,
                                                     softmax_scale)
            return out
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    mask = None
    if key_padding_mask is not None:
        empty = ~key_padding_mask.any(dim=1)  # sequences with no real frame
        # let empty rows attend to everything (finite), then zero them below
        mask = (key_padding_mask | empty[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p,
                                         scale=softmax_scale).transpose(1, 2)
    if key_padding_mask is not None:
        out = out * (~empty).to(out.dtype)[:, None, None, None]
    return out


def _empty_sequence(inputs):
    """A sequence axis of at least one frame."""
    return ["empty sequence axis"] if inputs.sizes["seq"] == 0 else []


# what the Triton kernels take, for this op and its packed variant
TRITON_CAPABILITIES = dict(runtime="triton", dtypes=KERNEL_DTYPES, features=tuple(FEATURES),
                           limits=(("head_dim", MAX_HEAD_DIM), ("batch*heads (a grid axis)", 65535),
                                   (SPAN, 2 ** 31 - 1)),
                           not_supported_reasons=_empty_sequence)


@attention_op.backend("triton", **TRITON_CAPABILITIES)
def attention_triton(inputs: AttentionInputs):
    """Flash-style Triton kernels; padded query rows return zeros."""
    if torch.compiler.is_compiling():
        return attention_fwd_op(inputs.q, inputs.k, inputs.v, inputs.key_padding_mask, inputs.lengths,
                                float(inputs.dropout_p), float(inputs.scale))[0]
    return triton_attention(inputs, *mask_args(inputs.key_padding_mask, inputs.lengths))


def attention(q, k, v, key_padding_mask: Optional[torch.Tensor] = None, *, lengths: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, softmax_scale: Optional[float] = None, backend: Optional[str] = None,
              fallback: bool = False):
    """Masked bidirectional attention; see the module docstring for shapes. ``lengths`` [B] (integer,
    on q's device) instead of a mask: the prefix mask of audio padding, frame t of sequence b real iff
    t < lengths[b]; the kernels then read no mask at all (compute it once per forward, e.g. from the
    frame lengths). ``backend`` forces one (None: the dispatcher picks); with ``fallback=True`` a
    forced backend that cannot run the input warns once, naming the reason, and the dispatcher
    picks instead of raising."""
    check_attention_inputs(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    check_lengths(q, key_padding_mask, lengths)
    inputs = AttentionInputs(q, k, v, key_padding_mask, dropout_p, softmax_scale, lengths)
    return attention_op(inputs, backend, fallback)


@attention_op.example
def _example(device, dtype):
    """UniSpeech-base: 2 utterances of 499 frames (one half padded), 12 heads of 64."""
    q, k, v = (torch.empty(2, 499, 12, 64, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(2, 499, dtype=torch.bool, device=device)
    mask[1, 250:] = False
    return AttentionInputs(q, k, v, mask)


# ---------------------------------------------------------------------------------------- aot specs

# UniSpeech base and large both have head_dim 64; fp16 compiles to the same tiles as bf16
_AOT_DTYPES = {torch.bfloat16: "bf16"}
_AOT_HEAD_DIMS = (64,)
_AOT_SEQ = 1024  # bucketed length of UniSpeech's 10-20 s utterances (499-999 frames)
_POINTER_TYPES = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "mask_ptr": "*u8", "keep_ptr": "*u8",
                  "kv_end_ptr": "*i32", "seq_start_ptr": "*i32", "seed_ptr": "*i64",
                  **{name: "*fp32" for name in ("table_ptr", "gate_ptr", "dgate_ptr", "ddiag_ptr", "scratch_ptr")}}
_FLOAT_ARGS = ("qk_scale", "sm_scale", "dropout_p")


def _aot_spec(name, fn, elem, constexprs, num_warps, num_stages, mma):
    """The kernels' argument types follow their names; the last dim is contiguous at real shapes
    (Triton specialises those strides to the constant 1), and so is the key-padding mask's ([B, S]
    bool) frame stride, whose batch stride S is any length; at model shapes (D 64/80/128, H 16)
    pointers are 16-aligned and the other strides, H and S_BUCKET divisible by 16 (packed rows pass
    the unused mask strides as 0). Without these hints loads compile unvectorised and unpipelined."""
    mask = constexprs.get("HAS_MASK", False) and not constexprs.get("PREFIX_MASK", False)  # a mask is loaded
    unit = [a for a in fn.arg_names if a.startswith("stride_") and a.endswith("d") or mask and a == "stride_ms"]
    constexprs = {**{a: 1 for a in unit}, **constexprs}
    types = {a: _POINTER_TYPES.get(a, "fp32" if a in _FLOAT_ARGS else "i32" if a in ("H", "S", "L", "S_BUCKET")
                                   or a.startswith("stride_") else "*" + elem) for a in fn.arg_names}
    divisible = [a for a in fn.arg_names if a not in constexprs and (
        a.startswith("stride_") and not (mask and a == "stride_mb") or a in ("H", "S_BUCKET"))]
    return aot_spec(name, fn, types, constexprs, num_warps, num_stages, mma, divisible)


def aot_specs():
    """Every kernel config shipped for UniSpeech shapes (B 8, H 16, D 64, bf16), as an sm_90 device
    keeps after pruning (padded with a mask and packed rows, with and without dropout), for
    ahead-of-time compile checks. Other head dims and fp16 are covered by the interpreter tests."""
    kern = _kernels()
    specs = []
    tuned = (("fwd", kern._attn_fwd_kernel, kern.FWD_CONFIGS, "BLOCK_M", 1, 1),
             ("bwd_dkdv", kern._attn_bwd_dkdv_kernel, kern.BWD_DKDV_CONFIGS, "BLOCK_N", 2, 2),
             ("bwd_dq", kern._attn_bwd_dq_kernel, kern.BWD_DQ_CONFIGS, "BLOCK_M", 1, 2))
    for dtype, elem in _AOT_DTYPES.items():
        for d in _AOT_HEAD_DIMS:
            for kname, fn, configs, resident, n_acc, n_score in tuned:
                for dropout in (False, True):
                    kept = kern.prune_by_budget(configs, resident=resident, n_acc=n_acc, n_score=n_score,
                                                block_d=_block_d(d), elem_size=torch.finfo(dtype).bits // 8,
                                                s_bucket=_AOT_SEQ, max_smem=SM90_SHARED_MEMORY, dropout=dropout)
                    # padded batches with a mask (transformers' models) or its lengths (prefix), packed rows (ours)
                    for layout, c in itertools.product(("", "_prefix", "_packed"), kept):
                        packed = layout == "_packed"
                        flags = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), HAS_MASK=not packed,
                                     PREFIX_MASK=layout == "_prefix", PACKED=packed, HAS_DROPOUT=dropout,
                                     HAS_BIAS=False, UPCAST=False, DOT_PREC="tf32", **c.kwargs)
                        tag = f"attn_{kname}_{elem}_d{d}_m{c.kwargs['BLOCK_M']}_n{c.kwargs['BLOCK_N']}" \
                              f"_w{c.num_warps}_s{c.num_stages}" + "_dropout" * dropout + layout
                        specs.append(_aot_spec(tag, fn, elem, flags, c.num_warps, c.num_stages, True))
            for packed in (False, True):
                specs.append(_aot_spec(f"attn_bwd_preprocess_{elem}_d{d}" + "_packed" * packed,
                                       kern._attn_bwd_preprocess_kernel, elem,
                                       dict(HEAD_DIM=d, BLOCK_M=64, BLOCK_D=_block_d(d), PACKED=packed), 4, 1, False))
    specs.append(_aot_spec("attn_dropout_mask", kern._dropout_mask_kernel, "u8", dict(BLOCK=64), 4, 1, False))
    return specs
