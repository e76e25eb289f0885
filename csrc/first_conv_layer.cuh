// First feature-encoder layer: 1-channel Conv1d + bias + norm + exact GELU, torch-free interface.
//
// Shapes: x [B, L] (samples contiguous, any batch stride) -> out [B, T, C] contiguous, channels-last,
// T = (L - K) / S + 1. weight [C, K] contiguous (the [C, 1, K] conv weight), bias / gamma / beta [C]
// contiguous or null (null gamma = 1, null beta = 0, null bias = 0). All of x, weight, bias, gamma,
// beta and out share one dtype (fp32, fp16 or bf16); arithmetic and statistics are fp32.
// norm: NONE; LAYER (over the C channels of each frame); GROUP (GroupNorm(C, C): each channel over
// the frames t < valid_len[b], where valid_len[b] = T, or with input_lengths the frames made only of
// real samples, (len - K) / S + 1 clamped to [0, T]).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace unispeech {

enum FclNorm : int { FCL_NORM_NONE = 0, FCL_NORM_LAYER = 1, FCL_NORM_GROUP = 2 };
enum FclDtype : int { FCL_FLOAT32 = 0, FCL_FLOAT16 = 1, FCL_BFLOAT16 = 2 };

constexpr int FCL_T_TILE = 8;             // frames computed together (one accumulator each per thread)
constexpr int FCL_MAX_K = 16;             // kernel taps held in registers
constexpr int FCL_MAX_C = 1024;           // one thread per channel, one block per frame chunk
constexpr int FCL_MAX_TILES_PER_BLOCK = 64;
constexpr int FCL_MAX_BATCH = 65535;       // utterances: a grid axis
constexpr size_t FCL_MAX_SMEM_BYTES = 48 * 1024;  // dynamic shared memory without an opt-in attribute

struct FclParams {
  const void* x;                 // [B, L] input samples
  int64_t x_stride_b;            // elements between two utterances of x
  const void* weight;            // [C, K]
  const void* bias;              // [C] or null
  const void* gamma;             // [C] norm weight or null
  const void* beta;              // [C] norm bias or null
  const int64_t* input_lengths;  // [B] real samples per utterance, or null (statistics over all T)
  void* out;                     // [B, T, C]
  float* workspace;              // fcl_workspace_floats(...) floats (GROUP only, else may be null)
  int B, L, T, C, K, S;
  float eps;
  int norm;                      // FclNorm
  int dtype;                     // FclDtype
  int frames_per_block;          // from fcl_frames_per_block, a multiple of FCL_T_TILE
};

// Frames each block walks through: enough blocks to fill `sm_count` SMs a few times over, few
// enough that GROUP's per-chunk partial statistics stay short to combine.
int fcl_frames_per_block(int B, int T, int sm_count);

// Number of frame chunks (blocks along T).
inline int fcl_num_chunks(int T, int frames_per_block) {
  return (T + frames_per_block - 1) / frames_per_block;
}

// fp32 workspace GROUP needs: partial (count, mean, M2) per chunk and channel, then (mean, rstd).
inline size_t fcl_workspace_floats(int B, int T, int C, int frames_per_block) {
  return static_cast<size_t>(B) * C * (3 * static_cast<size_t>(fcl_num_chunks(T, frames_per_block)) + 2);
}

// Dynamic shared memory of the conv kernels: the samples of one tile of frames, plus reductions.
inline size_t fcl_smem_bytes(int K, int S) {
  return sizeof(float) * (static_cast<size_t>(FCL_T_TILE - 1) * S + K + 2 * 32 * FCL_T_TILE);
}

// Whether a kernel size and stride fit the shared-memory sample tile.
inline bool fcl_fits_shared_memory(int64_t K, int64_t S) {
  return S >= 1 && S < (1 << 20) && K >= 1 && K <= FCL_MAX_K &&
         fcl_smem_bytes(static_cast<int>(K), static_cast<int>(S)) <= FCL_MAX_SMEM_BYTES;
}

// Validates the parameters (returns cudaErrorInvalidValue on a violated limit) and launches the
// kernels on `stream`. Callers check their inputs first and give users the reason.
cudaError_t fcl_launch(const FclParams& p, cudaStream_t stream);

// The attributes of the conv kernel for the current device: fails with cudaErrorNoKernelImageForDevice
// (or cudaErrorInvalidDeviceFunction) when this build has no code for the device's architecture.
cudaError_t fcl_kernel_attributes(cudaFuncAttributes* attr);

}  // namespace unispeech
