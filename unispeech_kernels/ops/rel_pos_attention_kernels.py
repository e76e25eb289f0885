"""``@triton.jit`` helpers of attention with WavLM's gated relative-position bias (host side:
``rel_pos_attention.py``), which ``attention_kernels.py``'s kernels call under HAS_BIAS.

The bias of a score: table[h, side(j - i), min(|j - i|, L - 1)] (table [H, 2, L] fp32, the bias by
distance) times the query row's gate (gate [B, S, H] fp32). The dQ kernel also gives d(gate) [B, S,
H] (a row sum) and, for d(table), sums its tiles of dS * gate along their diagonals without atomics:
a tile goes to the program's own scratch slot ([programs, BLOCK_M * BLOCK_N] fp32) and is read back
skewed (``_diagonal_sums``), the sums added into the program's own row of ddiag [B*H, cdiv(S,
BLOCK_M), 2S] (relative position r at column r + S - 1), tile after tile in a fixed order; the host
sums the rows and then the positions of each bucket.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # the bias enters the log2-domain scores


@triton.jit
def _distance_bias(table_ptr, rel, L):
    """Bias of relative positions ``rel`` (key - query, any shape) from one head's [2, L] table."""
    return tl.load(table_ptr + tl.where(rel > 0, L, 0) + tl.minimum(tl.abs(rel), L - 1))


@triton.jit
def _row_gate(gate_ptr, b, h, rows, S, H):
    """[BLOCK] gates of query rows ``rows`` of sequence b, head h (gate [B, S, H] contiguous)."""
    return tl.load(gate_ptr + (b * S + rows) * H + h, mask=rows < S, other=0.0)


@triton.jit
def _diagonal_sums(scratch_ptr, x, lower: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums of tile x [BLOCK_M, BLOCK_N] along its diagonals, through this program's scratch slot
    (BLOCK_M * BLOCK_N fp32, x stored there by the caller): ``lower``, [BLOCK_M] sums of column - row
    = t - (BLOCK_M - 1); else [BLOCK_N] sums of column - row = 1 + t."""
    a = tl.arange(0, BLOCK_M)[:, None]
    if lower:
        c = tl.arange(0, BLOCK_M)[None, :] - (BLOCK_M - 1) + a
    else:
        c = tl.arange(0, BLOCK_N)[None, :] + 1 + a
    return tl.sum(tl.load(scratch_ptr + a * BLOCK_N + c, mask=(c >= 0) & (c < BLOCK_N), other=0.0), 0)


@triton.jit
def _add_diagonals(ddiag_row, scratch_ptr, x, delta, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the diagonal sums of tile x (relative positions delta + column - row) into ``ddiag_row``
    (this program's, pointing at r = 0), read-modify-write in the program's own order."""
    tl.store(scratch_ptr + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], x)
    tl.debug_barrier()
    r = delta - (BLOCK_M - 1) + tl.arange(0, BLOCK_M)
    ok = (r > -S) & (r < S)
    tl.store(ddiag_row + r, tl.load(ddiag_row + r, mask=ok, other=0.0)
             + _diagonal_sums(scratch_ptr, x, True, BLOCK_M, BLOCK_N), mask=ok)
    r = delta + 1 + tl.arange(0, BLOCK_N)
    ok = (r > -S) & (r < S)
    tl.store(ddiag_row + r, tl.load(ddiag_row + r, mask=ok, other=0.0)
             + _diagonal_sums(scratch_ptr, x, False, BLOCK_M, BLOCK_N), mask=ok)
    tl.debug_barrier()  # every read and write done before the next tile reuses the slot and the row
