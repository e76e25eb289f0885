"""unispeech_kernels.forced_align against the float64 numpy recursion (bench/align_reference.py): exact
paths and scores on both backends (Triton through TRITON_INTERPRET=1 on CPU machines: small shapes),
the tie rule on hand-made cases, star labels, padding and infeasible rows, dtypes and strides,
dispatch, torch.compile, opcheck, every bad input, and a fuzz sample. Inputs whose exactness matters
are quantised to multiples of 1/16 (every fp32 partial sum exact, ties everywhere)."""
import numpy as np
import pytest
import torch

from bench import fuzz_forced_align
from bench.align_reference import viterbi_numpy
from unispeech_kernels import BackendUnavailableError, forced_align
from unispeech_kernels._runtime import interpret_mode
from unispeech_kernels.ops import forced_align as fa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = DEVICE == "cuda" or interpret_mode()
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no Triton here"))]
NEG_INF = float("-inf")


def quantized_log_probs(*shape, dtype=torch.float32, seed=0, floor=-16):
    """log-softmax values rounded to multiples of 1/16 in [floor, 0]: exact in fp16 / bf16, and their
    sums exact in fp32 while T * |floor| * 16 < 2^24."""
    gen = torch.Generator().manual_seed(seed)
    lp = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3).log_softmax(-1)
    return ((lp * 16).round().clamp(min=16 * floor) / 16).to(dtype).to(DEVICE)


def assert_matches_reference(log_probs, targets, frames, labels, blank=0, star=None, backend="torch",
                             star_penalty=-1.0):
    alignment, scores = forced_align(log_probs, targets, frames, labels, blank, star, star_penalty=star_penalty,
                                     backend=backend)
    lp = log_probs.double().cpu().numpy()
    star_dtype = np.float64 if log_probs.dtype == torch.float64 else np.float32
    for b, (n, n_l) in enumerate(zip(frames, labels)):
        path, ref_scores, _ = viterbi_numpy(lp[b, :n], targets[b, :n_l].tolist(), blank, star, star_penalty, star_dtype)
        assert path is not None
        assert alignment[b, :n].tolist() == path.tolist(), f"utterance {b}"
        assert scores[b, :n].double().cpu().numpy().tolist() == ref_scores.tolist(), f"utterance {b} scores"
        assert (alignment[b, n:] == -1).all() and (scores[b, n:] == 0).all()
    return alignment, scores


def _t(rows, dtype=torch.long):
    return torch.tensor(rows, dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------------ exact paths

@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_of_mixed_lengths(backend):
    """Repeats (a a), L = 1, L = 0, a minimal T, an empty utterance and a long one in one batch;
    targets padded with -100 past their lengths."""
    rows = [[1, 1, 2, 2, 2], [3], [], [1, 2, 1, 2], [], [4, 3, 4, 4]]
    frames = [16, 1, 5, 4, 0, 6]  # row 3 at its minimum 4, row 5: 4 labels + 1 repeat = 5, given 6
    targets = torch.full((len(rows), 6), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        targets[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    lp = quantized_log_probs(len(rows), 17, 5)
    assert_matches_reference(lp, targets.to(DEVICE), frames, [len(r) for r in rows], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minimal_frames_leave_no_choice(backend):
    """T = L + repeats: every label one frame, one blank between repeats."""
    lp = quantized_log_probs(1, 7, 4)
    alignment, _ = forced_align(lp, _t([[1, 1, 2, 3, 3]]), backend=backend)
    assert alignment.tolist() == [[1, 0, 1, 2, 3, 0, 3]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_blank_stretch(backend):
    """A stretch where the blank dominates is aligned to blanks, the labels around it."""
    lp = torch.full((1, 9, 3), -8.0, device=DEVICE)
    lp[0, :2, 1] = 0.0
    lp[0, 2:7, 0] = 0.0
    lp[0, 7:, 2] = 0.0
    alignment, scores = forced_align(lp, _t([[1, 2]]), backend=backend)
    assert alignment.tolist() == [[1, 1, 0, 0, 0, 0, 0, 2, 2]]
    assert (scores == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_keep_the_shortest_step(backend):
    """Equal scores everywhere: every tie stays, so each state is entered as early as possible and
    the last frame keeps the label over the closing blank."""
    lp = torch.zeros(1, 3, 2, device=DEVICE)
    assert forced_align(lp, _t([[1]]), backend=backend)[0].tolist() == [[1, 1, 1]]
    lp = torch.zeros(1, 5, 3, device=DEVICE)
    assert forced_align(lp, _t([[1, 2]]), backend=backend)[0].tolist() == [[1, 2, 2, 2, 2]]
    assert forced_align(lp, _t([[1, 1]]), backend=backend)[0].tolist() == [[1, 0, 1, 1, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_advance_beats_an_equal_skip(backend):
    """Frame 2, state b: advance from the blank (0) = skip from a (0) > stay (-9): the advance."""
    lp = torch.tensor([[[-1.0, 0, -9], [0, 0, -9], [-9, -9, 0], [-9, -9, 0]]], device=DEVICE)
    alignment, scores = forced_align(lp, _t([[1, 2]]), backend=backend)
    assert alignment.tolist() == [[1, 0, 2, 2]]  # the skip's a a b b scores the same
    assert scores.sum().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_blank_only_when_strictly_better(backend):
    lp = torch.tensor([[[-1.0, 0], [0, 0]]], device=DEVICE)
    assert forced_align(lp, _t([[1]]), backend=backend)[0].tolist() == [[1, 1]]
    lp[0, 1, 0] = 0.5
    assert forced_align(lp, _t([[1]]), backend=backend)[0].tolist() == [[1, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_star_takes_what_no_label_explains(backend):
    """Star = 5 (C): a wildcard between a and b takes the frames of class 3, which is no target, with
    that class's log-prob + star_penalty; two stars in a row need a blank between them. With
    star_penalty 0 the star ties a on a's frames and, entered as early as ties allow, takes them."""
    lp = torch.full((2, 8, 5), -6.0, device=DEVICE)
    for t, c in enumerate([1, 1, 3, 3, 0, 2, 2, 0]):
        lp[:, t, c] = -0.5
    star = 5
    targets = _t([[1, star, 2], [star, star, 2]])
    alignment, scores = forced_align(lp, targets, star=star, backend=backend)
    assert alignment.tolist() == [[1, 1, star, star, 0, 2, 2, 0], [star, star, star, star, 0, star, 2, 0]]
    assert scores[0].tolist() == [-0.5, -0.5, -1.5, -1.5, -0.5, -0.5, -0.5, -0.5]
    assert alignment_of(lp, targets, star, 0.0, backend)[0].tolist() == [1, star, star, star, 0, 2, 2, 0]
    for penalty in (-1.0, 0.0, -2.25):
        assert_matches_reference(lp, targets, [8, 8], [3, 3], star=star, backend=backend, star_penalty=penalty)


def alignment_of(lp, targets, star, star_penalty, backend):
    return forced_align(lp, targets, star=star, star_penalty=star_penalty, backend=backend)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_read_as_given(backend, dtype):
    lp = quantized_log_probs(3, 20, 6, dtype=dtype, seed=1)
    targets = _t([[1, 2, 2, 5, 3], [4, 4, 4, 0, 0], [5, 1, 0, 0, 0]], torch.int32)
    _, scores = assert_matches_reference(lp, targets, [20, 13, 7], [5, 3, 2], blank=0, backend=backend)
    assert scores.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_log_probs_and_targets(backend):
    wide = quantized_log_probs(14, 3, 9, seed=2)  # [T, B, 9]: frames-major storage, classes sliced
    lp = wide.transpose(0, 1)[..., 2:8]
    targets = _t([[1, 9, 2, 9, 3], [4, 9, 4, 9, 0], [5, 9, 5, 9, 5]])[:, ::2]
    assert not lp.is_contiguous() and not targets.is_contiguous()
    assert_matches_reference(lp, targets, [14, 9, 14], [3, 2, 3], blank=0, backend=backend)


def test_fp64_accumulates_in_fp64_on_torch():
    """Continuous fp64 values (no quantisation): the torch backend equals the fp64 recursion."""
    lp = (torch.randn(2, 40, 7, dtype=torch.float64, device=DEVICE) * 3).log_softmax(-1)
    _, scores = assert_matches_reference(lp, _t([[1, 2, 3, 3, 4, 5, 6], [6, 6, 6, 1, 1, 2, 0]]), [40, 31], [7, 6])
    assert scores.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_targets(backend):
    """300 labels (Triton label block 512) on both; the torch backend also at 1024 labels."""
    gen = torch.Generator().manual_seed(3)
    for n_l, backends in ((300, ("torch", "triton")), (1024, ("torch",))):
        if backend not in backends:
            continue
        targets = torch.randint(1, 30, (1, n_l), generator=gen).to(DEVICE)
        lp = quantized_log_probs(1, n_l + n_l // 3, 30, seed=n_l)
        assert_matches_reference(lp, targets, [lp.shape[1]], [n_l], backend=backend)


def test_backends_agree_on_continuous_inputs():
    if not HAS_TRITON:
        pytest.skip("no Triton here")
    lp = (torch.randn(3, 30, 9, device=DEVICE) * 3).log_softmax(-1)
    targets = torch.randint(1, 9, (3, 10), device=DEVICE)
    ours = forced_align(lp, targets, [30, 25, 21], [10, 8, 6], backend="triton")
    ref = forced_align(lp, targets, [30, 25, 21], [10, 8, 6], backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


# ------------------------------------------------------------------- padding and infeasible rows

@pytest.mark.parametrize("backend", BACKENDS)
def test_infeasible_rows_raise_or_are_marked(backend):
    lp = quantized_log_probs(3, 6, 4)
    targets = _t([[1, 1, 2], [1, 2, 3], [3, 0, 0]])
    with pytest.raises(ValueError, match=r"utterance\(s\) \[1\]: utterance 1 has 2 frames \(input_lengths\[1\]\) "
                                         r"for 3 labels with 0 repeats, which need at least 3"):
        forced_align(lp, targets, [6, 2, 6], [3, 3, 1], backend=backend)
    alignment, scores, feasible = forced_align(lp, targets, [6, 2, 6], [3, 3, 1], infeasible="mark", backend=backend)
    assert feasible.tolist() == [True, False, True]
    assert (alignment[1] == -1).all()
    assert scores[1, :2].tolist() == [NEG_INF, NEG_INF] and (scores[1, 2:] == 0).all()
    ok = forced_align(lp[[0, 2]], targets[[0, 2]], [6, 6], [3, 1], backend=backend)
    assert torch.equal(alignment[[0, 2]], ok[0]) and torch.equal(scores[[0, 2]], ok[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_path_of_finite_score_is_infeasible(backend):
    lp = quantized_log_probs(2, 5, 3)
    lp[0, :, 2] = NEG_INF  # label 2 can never be emitted
    with pytest.raises(ValueError, match="every path of utterance 0 scores -inf"):
        forced_align(lp, _t([[1, 2], [1, 2]]), backend=backend)
    feasible = forced_align(lp, _t([[1, 2], [1, 2]]), infeasible="mark", backend=backend)[2]
    assert feasible.tolist() == [False, True]


def test_nan_and_inf_on_real_frames_raise():
    lp = quantized_log_probs(2, 5, 3)
    lp[1, 4] = float("nan")  # past utterance 1's 4 frames: ignored
    forced_align(lp, _t([[1], [2]]), [5, 4])
    for value in (float("nan"), float("inf")):
        bad = lp.clone()
        bad[1, 2, 1] = value
        with pytest.raises(ValueError, match=rf"log_probs\[1, 2, 1\] = {value}: log-probs must be finite or -inf"):
            forced_align(bad, _t([[1], [2]]), [5, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    lp = quantized_log_probs(2, 0, 3)
    alignment, scores, feasible = forced_align(lp, _t([[1], [0]]), [0, 0], [1, 0], infeasible="mark", backend=backend)
    assert alignment.shape == (2, 0) and feasible.tolist() == [False, True]
    out = forced_align(quantized_log_probs(0, 4, 3), _t(np.zeros((0, 2), np.int64)), backend=backend)
    assert out[0].shape == (0, 4) and out[1].shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_under_a_small_back_pointer_budget(backend, monkeypatch):
    lp = quantized_log_probs(4, 12, 5)
    targets = torch.randint(1, 5, (4, 4), device=DEVICE)
    whole = forced_align(lp, targets, [12, 7, 10, 4], [4, 3, 2, 1], backend=backend)
    assert [list(r) for r in fa.utterance_groups([12, 7, 10, 4], 1, True, 20)] == [[0], [1, 2], [3]]
    monkeypatch.setattr(fa, "BACKPOINTER_BUDGET", 1)  # every utterance in its own group
    grouped = forced_align(lp, targets, [12, 7, 10, 4], [4, 3, 2, 1], backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(whole, grouped))


def test_back_pointer_memory_at_30_minutes():
    """T = 90 000 frames, L = 1024 labels: 2 bits per state per frame on the Triton backend."""
    _, triton_bytes, _ = fa._BACKENDS["triton"]
    assert 90_000 * triton_bytes(fa._block_labels([1024]), 2049) == 46_080_000


@pytest.mark.gpu
def test_30_minute_utterance_on_the_gpu():
    """One utterance of T = 90 000 frames and 1024 labels through the Triton kernel, bf16, against
    the fp64 recursion."""
    targets = torch.randint(1, 32, (1, 1024), device=DEVICE)
    lp = quantized_log_probs(1, 90_000, 32, dtype=torch.bfloat16, seed=4, floor=-4)  # sums < 2^24 / 16
    assert_matches_reference(lp, targets, [90_000], [1024], backend="triton")


# ------------------------------------------------------------------- dispatch, compile, opcheck

def test_dispatch_and_reasons():
    lp = quantized_log_probs(1, 4, 3)
    forced_align(lp, _t([[1]]))
    inputs = fa.ForcedAlignInputs(lp, _t([[1]]), *fa.check_forced_align_inputs(lp, _t([[1]]), None, None, 0, None,
                                                                              -1.0, "raise"), 0, None, -1.0, True)
    reasons = fa.forced_align_dispatch.reasons(inputs)
    assert reasons["torch"] is None and (reasons["triton"] is None) == HAS_TRITON
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64 not supported"):
        forced_align(lp.double(), _t([[1]]), backend="triton")
    wide = torch.ones(1, fa.MAX_TRITON_LABELS + 1, dtype=torch.long, device=DEVICE)
    lengths = fa.check_forced_align_inputs(lp, wide, None, None, 0, None, -1.0, "raise")
    reason = fa.forced_align_dispatch.reasons(fa.ForcedAlignInputs(lp, wide, *lengths, 0, None, -1.0, True))["triton"]
    assert reason is not None and ("labels 4097 > 4096" in reason or not HAS_TRITON)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    lp = quantized_log_probs(2, 10, 4)
    targets = _t([[1, 2, 2], [3, 0, 0]])

    def fn(lp, targets, lengths):
        alignment, scores = forced_align(lp, targets, target_lengths=lengths, backend=backend)
        return alignment, scores.sum(1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    lengths = _t([3, 1])
    assert all(torch.equal(a, b) for a, b in zip(compiled(lp, targets, lengths), fn(lp, targets, lengths)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    lp = quantized_log_probs(3, 9, 5).transpose(0, 1).contiguous().transpose(0, 1)
    args = (lp, _t([[1, 1, 2], [4, 0, 0], [2, 3, 0]], torch.int32), _t([9, 5, 0]), _t([3, 1, 0]), 0, None, -1.0,
            False, backend)
    torch.library.opcheck(torch.ops.unispeech_kernels.forced_align, args)
    torch.library.opcheck(torch.ops.unispeech_kernels.forced_align, (*args[:5], 5, -0.5, True, backend))


# ------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change, error, match", [
    (dict(log_probs=torch.zeros(4, 3)), ValueError, r"log_probs must be \[batch, frames, classes\]"),
    (dict(log_probs=torch.zeros(1, 4, 3, dtype=torch.int64)), TypeError, "log_probs must be fp32, fp16, bf16 or fp64"),
    (dict(targets=torch.ones(2, dtype=torch.long)), ValueError, r"targets must be \[batch, labels\]"),
    (dict(targets=torch.ones(1, 2)), TypeError, "targets must hold integer label ids"),
    (dict(targets=torch.ones(2, 2, dtype=torch.long)), ValueError, "targets has 2 rows, log_probs 1"),
    (dict(targets=torch.tensor([[1, 0]])), ValueError, r"targets\[0, 1\] is the blank id 0"),
    (dict(targets=torch.tensor([[1, 3]])), ValueError,
     r"targets\[0, 1\] = 3 is no class of log_probs \(0 <= label < 3\)"),
    (dict(targets=torch.tensor([[-1, 1]])), ValueError, r"targets\[0, 0\] = -1 is no class"),
    (dict(targets=torch.tensor([[1, 4]]), star=3), ValueError, r"= 4 is no class of log_probs \(0 <= label < 3\) nor "
                                                               "the star id 3"),
    (dict(blank=3), ValueError, r"blank must be a class of log_probs \(an int in \[0, 3\)\)"),
    (dict(star=1), ValueError, "star must be None or an id >= the 3 classes"),
    (dict(star=3, star_penalty=0.5), ValueError, "star_penalty must be a finite number <= 0"),
    (dict(star=3, star_penalty=float("-inf")), ValueError, "star_penalty must be a finite number <= 0"),
    (dict(input_lengths=[5]), ValueError, r"input_lengths\[0\] = 5 is outside \[0, 4\]"),
    (dict(input_lengths=[-1]), ValueError, r"input_lengths\[0\] = -1 is outside"),
    (dict(target_lengths=[3]), ValueError, r"target_lengths\[0\] = 3 is outside \[0, 2\]"),
    (dict(input_lengths=torch.tensor([1.0])), TypeError, "input_lengths must hold integers"),
    (dict(input_lengths=[1, 2]), ValueError, r"input_lengths must be \[batch\] = \[1\], got shape \(2,\)"),
    (dict(input_lengths="4"), TypeError, "input_lengths must be a tensor or a sequence of ints"),
    (dict(targets=torch.tensor([[1, 1]]), input_lengths=[2]), ValueError, "utterance 0 has 2 frames"),
    (dict(infeasible="skip"), ValueError, "infeasible must be one of"),
])
def test_bad_inputs(change, error, match):
    args = dict(log_probs=torch.zeros(1, 4, 3), targets=torch.tensor([[1, 2]]), input_lengths=None, target_lengths=None,
                blank=0, star=None)
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("infeasible", "star_penalty") if k in args}
    with pytest.raises(error, match=match):
        forced_align(**args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_targets_on_another_device():
    with pytest.raises(ValueError, match="targets on cpu, log_probs on cuda"):
        forced_align(torch.zeros(1, 4, 3, device="cuda"), torch.tensor([[1, 2]]))


def test_targets_on_another_device_than_log_probs():
    with pytest.raises(ValueError, match="targets on cpu, log_probs on meta"):
        forced_align(torch.zeros(1, 4, 3, device="meta"), torch.tensor([[1, 2]]))


# -------------------------------------------------------------------------------------- fuzz

def test_fuzz_sample_torch():
    result = fuzz_forced_align.run(300, seed=11, triton_every=0)
    assert result["mismatches"] == 0, result["first_mismatches"]
    assert result["cases"] == 300 and result["utterances"] > 600


@pytest.mark.skipif(not HAS_TRITON, reason="no Triton here")
def test_fuzz_sample_triton():
    result = fuzz_forced_align.run(30, seed=12, triton_every=1)
    assert result["mismatches"] == 0, result["first_mismatches"]
    assert result["triton_cases"] >= 15


def test_fuzz_flags_a_wrong_path():
    gen = torch.Generator().manual_seed(0)
    while True:  # the first random case with a feasible utterance
        case = fuzz_forced_align.random_case(gen, DEVICE)
        alignment, scores, feasible = fuzz_forced_align.run_backend(case, "torch")
        b = next((i for i, ok in enumerate(feasible.tolist()) if ok and case["frames"][i] > 1), None)
        if b is not None:
            break
    alignment[b, 0] = -5
    problems, _ = fuzz_forced_align.compare_to_reference(case, alignment, scores, feasible)
    assert problems and problems[0].startswith(f"utterance {b}")
