// First feature-encoder layer: 1-channel Conv1d (K taps, stride S) + bias + norm + exact GELU.
// Shapes and conventions: see first_conv_layer.cuh.
//
// Work split: one block per (chunk of frames, utterance), one thread per output channel (blockDim =
// C rounded up to a warp). A block walks its chunk FCL_T_TILE frames at a time: the tile's samples
// are staged in shared memory as fp32, each thread keeps its channel's K weights in registers and
// accumulates FCL_T_TILE frames, then writes channels-last so a warp stores 32 consecutive channels.
// Memory-bound: per frame it reads S new samples and writes C outputs.
//
// GROUP norm needs statistics over all frames of a channel before any output, so it runs three
// kernels: conv + per-chunk (count, mean, M2) partials; combine the partials per (utterance, channel)
// (Chan's parallel variance, numerically stable); conv again + normalise + GELU + store.
#include "first_conv_layer.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace unispeech {
namespace {

enum Phase : int { PHASE_PLAIN = 0, PHASE_LAYER = 1, PHASE_GROUP_STATS = 2, PHASE_GROUP_APPLY = 3 };

constexpr int WARP = 32;
constexpr int FINALIZE_THREADS = 128;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float gelu_exact(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Merges the statistics (nb, mb, m2b) of a disjoint set of values into the running (n, mean, m2).
__device__ __forceinline__ void chan_combine(float& n, float& mean, float& m2, float nb, float mb, float m2b) {
  if (nb == 0.0f) return;
  const float total = n + nb;
  const float delta = mb - mean;
  const float frac = nb / total;
  mean += delta * frac;
  m2 += m2b + delta * delta * n * frac;
  n = total;
}

// Per-channel sums over the block for each of the FCL_T_TILE frames: every thread gets the totals.
// red: [32][FCL_T_TILE] shared scratch, free when called; the caller syncs before reusing it.
__device__ __forceinline__ void block_sum_tile(float (&v)[FCL_T_TILE], float* red) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, n_warps = blockDim.x / WARP;
#pragma unroll
  for (int t = 0; t < FCL_T_TILE; ++t) {
    const float s = warp_sum(v[t]);
    if (lane == 0) red[warp * FCL_T_TILE + t] = s;
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < FCL_T_TILE; ++t) {
    float s = 0.0f;
    for (int w = 0; w < n_warps; ++w) s += red[w * FCL_T_TILE + t];
    v[t] = s;
  }
}

// Valid frames of utterance b for GROUP statistics.
__device__ __forceinline__ int valid_frames(const FclParams& p, int b) {
  if (p.input_lengths == nullptr) return p.T;
  const int64_t len = p.input_lengths[b];
  if (len < p.K) return 0;
  const int64_t frames = (len - p.K) / p.S + 1;
  return frames < p.T ? static_cast<int>(frames) : p.T;
}

template <typename scalar_t, int PHASE>
__global__ void __launch_bounds__(FCL_MAX_C) fcl_conv_kernel(const FclParams p) {
  extern __shared__ float smem[];
  const int span = (FCL_T_TILE - 1) * p.S + p.K;
  float* xs = smem;                                   // [span] samples of the current tile, fp32
  float* red_mean = smem + span;                      // [32][FCL_T_TILE] LAYER reductions, pass 1
  float* red_var = red_mean + WARP * FCL_T_TILE;      // [32][FCL_T_TILE] LAYER reductions, pass 2

  const int c = threadIdx.x;
  const bool active = c < p.C;
  const int b = blockIdx.y;
  const int chunk = blockIdx.x;
  const int t_begin = chunk * p.frames_per_block;
  const int t_end = min(p.T, t_begin + p.frames_per_block);
  const int n_chunks = gridDim.x;

  const scalar_t* x = static_cast<const scalar_t*>(p.x) + static_cast<int64_t>(b) * p.x_stride_b;
  const scalar_t* weight = static_cast<const scalar_t*>(p.weight);
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  const scalar_t* gamma = static_cast<const scalar_t*>(p.gamma);
  const scalar_t* beta = static_cast<const scalar_t*>(p.beta);
  scalar_t* out = static_cast<scalar_t*>(p.out);

  float w[FCL_MAX_K];
#pragma unroll
  for (int k = 0; k < FCL_MAX_K; ++k)
    w[k] = (active && k < p.K) ? to_float(weight[static_cast<int64_t>(c) * p.K + k]) : 0.0f;
  const float bias_c = (active && bias != nullptr) ? to_float(bias[c]) : 0.0f;
  const float gamma_c = (active && gamma != nullptr) ? to_float(gamma[c]) : 1.0f;
  const float beta_c = (active && beta != nullptr) ? to_float(beta[c]) : 0.0f;

  float mean_c = 0.0f, rstd_c = 1.0f;
  if (PHASE == PHASE_GROUP_APPLY && active) {
    const float* stats = p.workspace + static_cast<size_t>(p.B) * n_chunks * 3 * p.C;  // [B][2][C]
    mean_c = stats[(static_cast<size_t>(b) * 2 + 0) * p.C + c];
    rstd_c = stats[(static_cast<size_t>(b) * 2 + 1) * p.C + c];
  }
  const int stat_end = (PHASE == PHASE_GROUP_STATS) ? min(t_end, valid_frames(p, b)) : t_end;
  float run_n = 0.0f, run_mean = 0.0f, run_m2 = 0.0f;  // GROUP_STATS: this channel over the chunk

  for (int t0 = t_begin; t0 < t_end; t0 += FCL_T_TILE) {
    __syncthreads();  // every thread is done with the previous tile's xs and reductions
    const int64_t sample0 = static_cast<int64_t>(t0) * p.S;
    for (int i = threadIdx.x; i < span; i += blockDim.x) {
      const int64_t s = sample0 + i;
      xs[i] = s < p.L ? to_float(x[s]) : 0.0f;
    }
    __syncthreads();

    float acc[FCL_T_TILE];
#pragma unroll
    for (int t = 0; t < FCL_T_TILE; ++t) acc[t] = bias_c;
#pragma unroll
    for (int k = 0; k < FCL_MAX_K; ++k) {
      if (k < p.K) {
#pragma unroll
        for (int t = 0; t < FCL_T_TILE; ++t) acc[t] = fmaf(w[k], xs[t * p.S + k], acc[t]);
      }
    }

    if (PHASE == PHASE_GROUP_STATS) {
      const int n_valid = max(0, min(FCL_T_TILE, stat_end - t0));
      if (n_valid > 0) {
        float sum = 0.0f;
#pragma unroll
        for (int t = 0; t < FCL_T_TILE; ++t) sum += t < n_valid ? acc[t] : 0.0f;
        const float tile_mean = sum / n_valid;
        float m2 = 0.0f;
#pragma unroll
        for (int t = 0; t < FCL_T_TILE; ++t) {
          const float d = acc[t] - tile_mean;
          m2 += t < n_valid ? d * d : 0.0f;
        }
        chan_combine(run_n, run_mean, run_m2, static_cast<float>(n_valid), tile_mean, m2);
      }
      continue;
    }

    float y[FCL_T_TILE];
    if (PHASE == PHASE_LAYER) {
      float mean[FCL_T_TILE], var[FCL_T_TILE];
#pragma unroll
      for (int t = 0; t < FCL_T_TILE; ++t) mean[t] = active ? acc[t] : 0.0f;
      block_sum_tile(mean, red_mean);
#pragma unroll
      for (int t = 0; t < FCL_T_TILE; ++t) {
        mean[t] /= p.C;
        const float d = acc[t] - mean[t];
        var[t] = active ? d * d : 0.0f;
      }
      block_sum_tile(var, red_var);
#pragma unroll
      for (int t = 0; t < FCL_T_TILE; ++t)
        y[t] = (acc[t] - mean[t]) * rsqrtf(var[t] / p.C + p.eps) * gamma_c + beta_c;
    } else if (PHASE == PHASE_GROUP_APPLY) {
#pragma unroll
      for (int t = 0; t < FCL_T_TILE; ++t) y[t] = (acc[t] - mean_c) * rstd_c * gamma_c + beta_c;
    } else {
#pragma unroll
      for (int t = 0; t < FCL_T_TILE; ++t) y[t] = acc[t];
    }

    if (active) {
      const int n_here = min(FCL_T_TILE, t_end - t0);
#pragma unroll
      for (int t = 0; t < FCL_T_TILE; ++t) {
        if (t < n_here)
          out[(static_cast<int64_t>(b) * p.T + t0 + t) * p.C + c] = from_float<scalar_t>(gelu_exact(y[t]));
      }
    }
  }

  if (PHASE == PHASE_GROUP_STATS && active) {
    float* partial = p.workspace + (static_cast<size_t>(b) * n_chunks + chunk) * 3 * p.C;  // [3][C]
    partial[c] = run_n;
    partial[p.C + c] = run_mean;
    partial[2 * p.C + c] = run_m2;
  }
}

// Combines the per-chunk partials of each (utterance, channel) into (mean, rstd).
// grid (ceil(C / FINALIZE_THREADS), B); reads workspace [B][n_chunks][3][C], writes [B][2][C] after it.
__global__ void __launch_bounds__(FINALIZE_THREADS) fcl_group_finalize_kernel(const FclParams p, int n_chunks) {
  const int c = blockIdx.x * FINALIZE_THREADS + threadIdx.x;
  const int b = blockIdx.y;
  if (c >= p.C) return;
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
  for (int chunk = 0; chunk < n_chunks; ++chunk) {
    const float* partial = p.workspace + (static_cast<size_t>(b) * n_chunks + chunk) * 3 * p.C;
    chan_combine(n, mean, m2, partial[c], partial[p.C + c], partial[2 * p.C + c]);
  }
  const float var = n > 0.0f ? fmaxf(m2 / n, 0.0f) : 0.0f;
  float* stats = p.workspace + static_cast<size_t>(p.B) * n_chunks * 3 * p.C;
  stats[(static_cast<size_t>(b) * 2 + 0) * p.C + c] = mean;
  stats[(static_cast<size_t>(b) * 2 + 1) * p.C + c] = rsqrtf(var + p.eps);
}

template <typename scalar_t>
cudaError_t launch_typed(const FclParams& p, cudaStream_t stream) {
  const int n_chunks = fcl_num_chunks(p.T, p.frames_per_block);
  const dim3 grid(n_chunks, p.B);
  const int threads = (p.C + WARP - 1) / WARP * WARP;
  const size_t smem = fcl_smem_bytes(p.K, p.S);
  switch (p.norm) {
    case FCL_NORM_NONE:
      fcl_conv_kernel<scalar_t, PHASE_PLAIN><<<grid, threads, smem, stream>>>(p);
      break;
    case FCL_NORM_LAYER:
      fcl_conv_kernel<scalar_t, PHASE_LAYER><<<grid, threads, smem, stream>>>(p);
      break;
    case FCL_NORM_GROUP: {
      fcl_conv_kernel<scalar_t, PHASE_GROUP_STATS><<<grid, threads, smem, stream>>>(p);
      const dim3 fgrid((p.C + FINALIZE_THREADS - 1) / FINALIZE_THREADS, p.B);
      fcl_group_finalize_kernel<<<fgrid, FINALIZE_THREADS, 0, stream>>>(p, n_chunks);
      fcl_conv_kernel<scalar_t, PHASE_GROUP_APPLY><<<grid, threads, smem, stream>>>(p);
      break;
    }
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

bool params_valid(const FclParams& p) {
  if (p.x == nullptr || p.weight == nullptr || p.out == nullptr) return false;
  if (p.B < 1 || p.B > FCL_MAX_BATCH || p.C < 1 || p.C > FCL_MAX_C || p.K < 1 || p.K > FCL_MAX_K || p.S < 1) return false;
  if (p.L < p.K || p.T != (p.L - p.K) / p.S + 1 || p.x_stride_b < 0) return false;
  if (p.frames_per_block < FCL_T_TILE || p.frames_per_block % FCL_T_TILE != 0) return false;
  if (!fcl_fits_shared_memory(p.K, p.S)) return false;
  if (p.norm == FCL_NORM_GROUP && p.workspace == nullptr) return false;
  return p.dtype == FCL_FLOAT32 || p.dtype == FCL_FLOAT16 || p.dtype == FCL_BFLOAT16;
}

}  // namespace

int fcl_frames_per_block(int B, int T, int sm_count) {
  const int64_t tiles = (static_cast<int64_t>(T) + FCL_T_TILE - 1) / FCL_T_TILE;
  const int64_t target_blocks = 8 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t per_block = (tiles * B + target_blocks - 1) / target_blocks;
  if (per_block < 1) per_block = 1;
  if (per_block > FCL_MAX_TILES_PER_BLOCK) per_block = FCL_MAX_TILES_PER_BLOCK;
  return static_cast<int>(per_block) * FCL_T_TILE;
}

cudaError_t fcl_launch(const FclParams& p, cudaStream_t stream) {
  if (!params_valid(p)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case FCL_FLOAT32: return launch_typed<float>(p, stream);
    case FCL_FLOAT16: return launch_typed<__half>(p, stream);
    default: return launch_typed<__nv_bfloat16>(p, stream);
  }
}

cudaError_t fcl_kernel_attributes(cudaFuncAttributes* attr) {
  return cudaFuncGetAttributes(attr, fcl_conv_kernel<float, PHASE_PLAIN>);
}

}  // namespace unispeech
