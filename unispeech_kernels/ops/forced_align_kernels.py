"""The CTC Viterbi kernel of ``forced_align.py``: one program per utterance, the whole dynamic
programme and the backtracking in one launch.

State layout: the 2L + 1 CTC states of an utterance are held as pairs, pair k = (label_k, blank_{k+1})
for k < BLOCK_L (state 2k + 1 and state 2k + 2), plus the scalar blank_0 (state 0). In one frame
    label_k     <- best of  label_k (stay), blank_k (advance), label_{k-1} (skip, when labels k-1, k differ)
    blank_{k+1} <- best of  blank_{k+1} (stay), label_k (advance)
so only the previous pair's values are needed: the rows go through a small per-program scratch
buffer (double-buffered by frame parity, one barrier per frame) to be read shifted by one pair
(laid out so that the shifted read needs no mask: [-inf, label_0 .. | blank_0, blank_1 ..]).
Choices, as torchaudio's CPU kernel makes them: the skip only when it beats both others, else the
advance only when it beats the stay, else the stay (comparisons are strict, so ties go to the
shortest step; the caller has checked that no input is NaN or +inf). Back-pointers, 2 bits per
state per frame: one nibble per pair (label choice 0 / 1 / 2 in bits 0-1, blank choice 0 / 1 in
bit 2), 8 nibbles per int32 word (pair k in word k // 8 at bit 4 * (k % 8)), W = BLOCK_L / 8 words
per frame. A choice is the state step back: state(t - 1) = state(t) - choice, for both kinds.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _forced_align_kernel(
    lp_ptr,        # [B, T, C] log-probs (fp32 / fp16 / bf16, read as given), any strides
    star_ptr,      # [B, T] fp32 star emissions (max non-blank log-prob of the frame); read when HAS_STAR
    tgt_ptr,       # [B, L] int64 targets, label stride 1
    in_len_ptr,    # [B] int64 frames of each utterance
    tgt_len_ptr,   # [B] int64 labels of each utterance
    bp_ptr,        # int32 back-pointer words: utterance b's frame t at bp_start[b] + t * W
    bp_start_ptr,  # [B] int64 first back-pointer word of each utterance
    scratch_ptr,   # [B, 2, 2 * BLOCK_L + 2] fp32 scratch: the rows of the two frame parities
    align_ptr,     # [B, T] int64 out, prefilled with -1: the label of each real frame
    score_ptr,     # [B, T] fp32 out, prefilled with 0: the log-prob of that label
    best_ptr,      # [B] fp32 out: the best path's total log-prob (-inf: no path of finite score)
    stride_lb,     # log-probs batch stride (elements)
    stride_lt,     # log-probs frame stride
    stride_lc,     # log-probs class stride
    stride_tb,     # targets batch stride
    T,             # padded frames (row length of star, align and score)
    blank,         # blank class
    star,          # star id (labels equal to it are wildcards); unused unless HAS_STAR
    HAS_STAR: tl.constexpr,  # targets may hold the star id
    BLOCK_L: tl.constexpr,   # label pairs per program: a power of two >= max(L, 32)
    BLOCK_T: tl.constexpr,   # frames per step of the closing label / score pass
):
    NEG_INF: tl.constexpr = float("-inf")
    W: tl.constexpr = BLOCK_L // 8  # back-pointer words per frame
    ROW: tl.constexpr = 2 * BLOCK_L + 2  # scratch floats per parity
    b = tl.program_id(0).to(tl.int64)
    n_frames = tl.load(in_len_ptr + b)  # int64 scalars, as is the frame loop's index
    n_labels = tl.load(tgt_len_ptr + b)
    k = tl.arange(0, BLOCK_L)
    real = k < n_labels
    tgt_row = tgt_ptr + b * stride_tb
    tgt = tl.load(tgt_row + k, mask=real, other=0)
    prev_tgt = tl.load(tgt_row - 1 + k, mask=real & (k > 0), other=0)
    skip_ok = real & (k > 0) & (tgt != prev_tgt)
    if HAS_STAR:
        is_star = real & (tgt == star)
        col = tl.where(is_star, blank, tgt)
    else:
        col = tgt
    lp_row = lp_ptr + b * stride_lb
    lab_ptrs = lp_row + col * stride_lc  # frame 0's log-prob of each label
    blank_ptr = lp_row + blank * stride_lc
    star_row = star_ptr + b * T
    scratch = scratch_ptr + b * (2 * ROW)
    bp_row = bp_ptr + tl.load(bp_start_ptr + b)
    words = tl.arange(0, W)
    last_frame = tl.maximum(n_frames - 1, 0)  # emissions are read at frames clamped to it

    # frame 0: blank_0 and label_0 start; the emissions of frame t + 1 are loaded while frame t runs
    e_blank = tl.load(blank_ptr).to(tl.float32)
    e_lab = tl.load(lab_ptrs, mask=real, other=NEG_INF).to(tl.float32)
    if HAS_STAR:
        e_lab = tl.where(is_star, tl.load(star_row), e_lab)
    blk0 = e_blank
    lab = tl.where(k == 0, e_lab, NEG_INF)
    blk = tl.full([BLOCK_L], NEG_INF, tl.float32)
    tl.store(scratch, NEG_INF)  # the label row's "label_{-1}" of both parities
    tl.store(scratch + ROW, NEG_INF)
    off = tl.minimum(1, last_frame) * stride_lt
    e_blank = tl.load(blank_ptr + off).to(tl.float32)
    e_lab = tl.load(lab_ptrs + off, mask=real, other=NEG_INF).to(tl.float32)
    if HAS_STAR:
        e_lab = tl.where(is_star, tl.load(star_row + tl.minimum(1, last_frame)), e_lab)
    for t in range(1, n_frames):
        buf = scratch + (t % 2) * ROW
        tl.store(buf + 1 + k, lab)  # [-inf, label_0, ..]
        tl.store(buf + (BLOCK_L + 1), blk0)  # [blank_0, blank_1 (pair 0), ..]
        tl.store(buf + (BLOCK_L + 2) + k, blk)
        t_next = tl.minimum(t + 1, last_frame)
        e_blank_next = tl.load(blank_ptr + t_next * stride_lt).to(tl.float32)
        e_lab_next = tl.load(lab_ptrs + t_next * stride_lt, mask=real, other=NEG_INF).to(tl.float32)
        if HAS_STAR:
            e_lab_next = tl.where(is_star, tl.load(star_row + t_next), e_lab_next)
        tl.debug_barrier()
        lab_prev = tl.load(buf + k)  # label_{k-1}
        blk_prev = tl.load(buf + (BLOCK_L + 1) + k)  # blank_k
        # label_k: x0 stay, x1 advance from blank_k, x2 skip from label_{k-1}
        x2 = tl.where(skip_ok, lab_prev, NEG_INF)
        take2 = (x2 > blk_prev) & (x2 > lab)
        take1 = (blk_prev > lab) & (take2 == 0)
        # blank_{k+1}: x0 stay, x1 advance from label_k
        adv = lab > blk
        blk = tl.where(adv, lab, blk) + e_blank
        lab = tl.where(take2, x2, tl.where(take1, blk_prev, lab)) + e_lab
        blk0 = blk0 + e_blank
        # one nibble per pair, then pairs of neighbours merged three times: 8 nibbles per word
        nib = tl.where(take2, 2, take1.to(tl.int32)) | (adv.to(tl.int32) << 2)
        for level in tl.static_range(3):
            lo, hi = tl.split(tl.reshape(nib, [W, 4 >> level, 2]))
            nib = lo | (hi << (4 << level))
        tl.store(bp_row + t * W + words, tl.reshape(nib, [W]))
        e_blank = e_blank_next
        e_lab = e_lab_next

    # the best final state: the last label, or the closing blank when it scores strictly higher
    last = n_labels - 1
    final_lab = tl.sum(tl.where(k == last, lab, 0.0))
    final_blk = tl.sum(tl.where(k == last, blk, 0.0))
    end_blank = final_blk > final_lab
    best = tl.where(end_blank, final_blk, final_lab)
    state = tl.where(end_blank, 2 * n_labels, 2 * n_labels - 1)
    best = tl.where(n_labels == 0, blk0, best)
    state = tl.where(n_labels == 0, 0, state)
    best = tl.where(n_frames == 0, tl.where(n_labels == 0, 0.0, NEG_INF), best)
    tl.store(best_ptr + b, best)
    feasible = (best > NEG_INF) & (best < float("inf"))
    if feasible:
        tl.debug_barrier()  # the back-pointers of every thread are written
        align_row = align_ptr + b * T
        # backtracking: one state per frame, written to align_row, then turned into labels below
        for i in range(0, n_frames):
            t = n_frames - 1 - i
            tl.store(align_row + t, state.to(tl.int64))
            is_lab = state % 2 == 1
            pair = tl.maximum(state - 1, 0) // 2  # label_k and blank_{k+1}: pair k
            bits = tl.load(bp_row + t * W + pair // 8, mask=(t > 0) & (state > 0), other=0)
            nib = bits >> (4 * (pair % 8)).to(tl.int32)
            state = state - tl.where(is_lab, nib & 3, (nib >> 2) & 1)
        tl.debug_barrier()
        for t0 in range(0, n_frames, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            in_row = ts < n_frames
            s = tl.load(align_row + ts, mask=in_row, other=0).to(tl.int32)
            on_label = in_row & (s % 2 == 1)
            label = tl.load(tgt_row + (s - 1) // 2, mask=on_label, other=blank)
            label = tl.where(on_label, label, blank)
            if HAS_STAR:
                wild = on_label & (label == star)
                cls = tl.where(wild, blank, label)
            else:
                cls = label
            score = tl.load(lp_row + ts * stride_lt + cls * stride_lc, mask=in_row, other=0.0).to(tl.float32)
            if HAS_STAR:
                score = tl.where(wild, tl.load(star_row + ts, mask=in_row & wild, other=0.0), score)
            tl.store(align_row + ts, label, mask=in_row)
            tl.store(score_ptr + b * T + ts, score, mask=in_row)
