"""FLOP and minimum-byte counts of every benchmarked case, and the device ceilings they are held to.

Every count is on the REAL (unpadded) work: padding a batch to its longest utterance costs time but
adds no useful work, so padding waste shows up as lower TFLOP/s. Conventions:
- a multiply-add is 2 FLOPs; a conv1d layer: 2 * C_out * (C_in / groups) * K per real output frame;
- attention forward: QK^T and PV, 2 * 2 * n^2 * H * D per sequence of n real frames (queries and keys
  both restricted to real frames); backward: 2.5x the forward (dQ, dK, dV, dP and the recomputed
  QK^T: 5 matmuls against the forward's 2, flash-attention's convention);
- fwd+bwd of a conv: 3x the forward (forward, grad of the input, grad of the weight);
- elementwise work (norms, GELU, bias, residual, softmax) is not counted: it is small next to the
  matmuls and is bound by bytes, which the byte count covers;
- minimum bytes: each input read once, each output written once, weights once; intermediates that
  a perfect fusion would keep on chip are not counted. It is the floor, not a model of any kernel.
The floor of a case is max(FLOPs / peak FLOP/s, bytes / peak bandwidth); ``pct_of_peak`` is
floor / measured time in percent ("how close to the device's limit", 100 = at the ceiling).

Ceilings: the numbers MEASURED on this project's GPU machines (design.md: an 8192^3 bf16 matmul
through torch, a large device-to-device copy counting read + write), not datasheet numbers: H100
SXM ~790 TFLOP/s bf16/fp16 dense (datasheet 989), ~3.0 TB/s HBM (datasheet 3.35); H200 the same
tensor rate and ~4.3 TB/s (datasheet 4.8). The report's header gives the datasheet numbers beside
them, so TFLOP/s columns can be read against either. Other GPUs use datasheet values, marked "spec".
CPUs: no ceiling, we report times and ratios only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from unispeech_kernels.padding import conv_output_length

# (substring of torch.cuda.get_device_name(), tensor TFLOP/s bf16/fp16 dense, fp32 TFLOP/s, TB/s, source
#  [, datasheet tensor TFLOP/s, datasheet TB/s where the ceilings are measured]); the first match wins
PEAKS = (
    ("H200", 790.0, 67.0, 4.3, "measured (design.md)", 989.0, 4.8),
    ("H100 PCIe", 756.0, 51.0, 2.0, "spec"),
    ("H100", 790.0, 67.0, 3.0, "measured (design.md)", 989.0, 3.35),
    ("A100", 312.0, 19.5, 2.0, "spec"),
    ("L40S", 362.0, 91.6, 0.864, "spec"),
    ("A10", 125.0, 31.2, 0.6, "spec"),
    ("RTX 4090", 165.0, 82.6, 1.0, "spec"),
)

# An H100 SXM / H200 SM (compute capability 9.0; CUDA C++ Programming Guide, "Compute Capabilities"
# table; both GPUs have 132 SMs), for the static performance model (unispeech_kernels/perf_model.py):
# registers are allocated per warp in units of 256 within one of the 4 schedulers' quarter of the file,
# shared memory in units of 128 bytes plus 1 KB the runtime reserves per block.
SM90 = dict(sms=132, schedulers=4, regs=65536, reg_unit=256, smem=233472, smem_unit=128,
            smem_reserved=1024, warps=64, blocks=32)


@dataclass(frozen=True)
class Peak:
    name: str
    tensor_tflops: float  # bf16 / fp16 dense matmul rate
    fp32_tflops: float    # plain fp32 (no TF32) rate
    tbps: float           # device memory bandwidth, TB/s
    source: str
    datasheet_tflops: Optional[float] = None  # the vendor's bf16 / fp16 dense rate, when the ceilings are measured
    datasheet_tbps: Optional[float] = None

    def tflops(self, dtype_name: str) -> float:
        return self.tensor_tflops if dtype_name in ("bfloat16", "float16") else self.fp32_tflops


def peak_for(device_name: str) -> Optional[Peak]:
    """The ceilings of a GPU by its name; None for CPUs and unknown GPUs."""
    for key, *numbers in PEAKS:
        if key.lower() in device_name.lower():
            return Peak(key, *numbers)
    return None


def roofline(flops: Optional[float], nbytes: Optional[float], seconds: float, peak: Optional[Peak],
             dtype_name: str) -> dict:
    """tflops, gbps and pct_of_peak of one measured case (None where not meaningful)."""
    out = {"tflops": flops / seconds / 1e12 if flops else None,
           "gbps": nbytes / seconds / 1e9 if nbytes else None,
           "pct_of_peak": None}
    if peak is not None and (flops or nbytes):
        floor = max((flops or 0) / (peak.tflops(dtype_name) * 1e12), (nbytes or 0) / (peak.tbps * 1e12))
        out["pct_of_peak"] = 100.0 * floor / seconds
    return out


# ---------------------------------------------------------------- per-op counts

def attention_flops(lengths: Sequence[int], heads: int, head_dim: int, backward: bool = False) -> float:
    fwd = sum(4.0 * n * n * heads * head_dim for n in lengths)
    return 2.5 * fwd if backward else fwd


def attention_bytes(lengths: Sequence[int], heads: int, head_dim: int, elem: int, backward: bool = False) -> float:
    """fwd: read q, k, v, write o; bwd: read q, k, v, o, dO, write dQ, dK, dV (real frames only)."""
    tokens = sum(lengths) * heads * head_dim * elem
    return (8 if backward else 4) * tokens


def conv_out_len(n: int, kernel: int, stride: int) -> int:
    return max(0, conv_output_length(n, [kernel], [stride]))


def feature_encoder_flops(sample_lengths: Sequence[int], conv_dim: Sequence[int], kernels: Sequence[int],
                          strides: Sequence[int]) -> float:
    total = 0.0
    for n in sample_lengths:
        c_in = 1
        for c_out, k, s in zip(conv_dim, kernels, strides):
            n = conv_out_len(n, k, s)
            total += 2.0 * c_out * c_in * k * n
            c_in = c_out
    return total


def feature_encoder_bytes(sample_lengths: Sequence[int], conv_dim: Sequence[int], kernels: Sequence[int],
                          strides: Sequence[int], elem: int) -> float:
    """Read the audio and every weight once, write the final [T, C] features."""
    weights = sum(c_out * c_in * k for c_out, c_in, k in zip(conv_dim, [1, *conv_dim[:-1]], kernels))
    frames = 0
    for n in sample_lengths:
        for k, s in zip(kernels, strides):
            n = conv_out_len(n, k, s)
        frames += n
    return elem * (sum(sample_lengths) + weights + frames * conv_dim[-1])


def pos_conv_flops(frame_lengths: Sequence[int], channels: int, groups: int, kernel: int,
                   backward: bool = False) -> float:
    fwd = sum(2.0 * n * channels * (channels // groups) * kernel for n in frame_lengths)
    return 3.0 * fwd if backward else fwd


def pos_conv_bytes(frame_lengths: Sequence[int], channels: int, groups: int, kernel: int, elem: int,
                   backward: bool = False) -> float:
    """fwd: read hidden + weight, write out. fwd+bwd adds: read dOut and hidden, write dHidden and dW."""
    acts = sum(frame_lengths) * channels * elem
    weight = channels * (channels // groups) * kernel * elem
    return (2 * acts + weight) + ((3 * acts + weight) if backward else 0)


def model_forward_flops(sample_lengths: Sequence[int], cfg: dict) -> tuple[float, float]:
    """(total, feature-encoder part) forward FLOPs of a UniSpeech/wav2vec2 CTC model.

    cfg holds transformers' field names: conv_dim, conv_kernel, conv_stride, hidden_size,
    num_hidden_layers, intermediate_size, num_conv_pos_embeddings, num_conv_pos_embedding_groups,
    vocab_size. Per real frame: feature projection 2*C_fe*C, pos conv, per layer QKV+O 8*C^2 and
    FFN 4*C*I, attention 4*n*C per frame (n real frames), CTC head 2*C*V.
    """
    conv_dim, kernels, strides = cfg["conv_dim"], cfg["conv_kernel"], cfg["conv_stride"]
    c, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    fe = feature_encoder_flops(sample_lengths, conv_dim, kernels, strides)
    frames = []
    for n in sample_lengths:
        for k, s in zip(kernels, strides):
            n = conv_out_len(n, k, s)
        frames.append(n)
    per_frame = 2.0 * conv_dim[-1] * c + 2.0 * c * cfg.get("vocab_size", 32) \
        + layers * (8.0 * c * c + 4.0 * c * inter)
    rest = sum(frames) * per_frame + layers * sum(4.0 * n * n * c for n in frames) \
        + pos_conv_flops(frames, c, cfg["num_conv_pos_embedding_groups"], cfg["num_conv_pos_embeddings"])
    return fe + rest, fe


def ctc_train_step_flops(sample_lengths: Sequence[int], cfg: dict) -> float:
    """Forward + backward with the feature encoder frozen (as transformers' fine-tuning recipes do):
    the backward (2x the forward) covers everything after the feature encoder. Model FLOPs, as MFU
    counts them: the attention backward is 2x its forward here, not the 2.5x of the attention_bwd
    rows, whose extra 0.5x is the flash-style recomputation of QK^T (~1 % of this step at base, 10 s).
    The AdamW update is elementwise (bytes, not FLOPs) and is not counted."""
    total, fe = model_forward_flops(sample_lengths, cfg)
    return total + 2.0 * (total - fe)


def viterbi_cells(frames: Sequence[int], labels: Sequence[int]) -> int:
    """CTC Viterbi work: one (frame, state) cell per real frame and each of the 2L + 1 states."""
    return sum(t * (2 * n + 1) for t, n in zip(frames, labels))


def forced_align_flops(frames: Sequence[int], labels: Sequence[int]) -> float:
    """4 operations per cell: three comparisons choosing among <= 3 predecessors, one add (FLOP-like
    work: the recursion has no multiplies)."""
    return 4.0 * viterbi_cells(frames, labels)


def forced_align_bytes(frames: Sequence[int], labels: Sequence[int], classes: int, elem: int) -> float:
    """Read each real frame's log-probs and the targets (int64) once, write alignment (int64) and
    scores (fp32) per frame; back-pointers a perfect kernel keeps on chip are not counted."""
    return sum(t * (classes * elem + 12) + 8 * n for t, n in zip(frames, labels))
