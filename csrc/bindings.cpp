// PyTorch bindings of the CUDA kernels: input checks, device guard, current stream, Meta shapes.
//
// Ops (namespace unispeech_cuda, loaded by `import unispeech_kernels._C`):
//   first_conv_layer(Tensor input_values [B, L], Tensor weight [C, 1, K], Tensor? bias [C], int stride,
//                    int norm_mode (0 none, 1 layer, 2 group), Tensor? norm_weight [C], Tensor? norm_bias [C],
//                    float eps, Tensor? input_lengths [B]) -> Tensor [B, T, C]
//     input_lengths (group norm only): statistics over each utterance's frames of real samples.
//   kernel_image_info() -> int[]  [cudaError_t of cudaFuncGetAttributes (0 = the build has code for
//                    the current device), binaryVersion, ptxVersion, numRegs]
//   kernel_limits() -> int[]  [most channels, largest kernel size, most utterances] first_conv_layer takes
//   fits_shared_memory(int kernel_size, int stride) -> bool  whether the shared-memory sample tile holds them
#include <Python.h>

#include <cmath>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "first_conv_layer.cuh"

namespace {

using unispeech::FclParams;

constexpr const char* kOp = "unispeech_cuda::first_conv_layer: ";

struct FclShape {
  int64_t B, L, C, K, T;
};

// Shape, dtype and layout checks shared by the CUDA and Meta implementations.
FclShape check_fcl_shapes(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          int64_t stride, int64_t norm_mode, const std::optional<at::Tensor>& norm_weight,
                          const std::optional<at::Tensor>& norm_bias, double eps,
                          const std::optional<at::Tensor>& input_lengths) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              "input_values must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 2, kOp, "input_values must be [batch, samples], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, kOp,
              "input_values must have contiguous samples (stride(1) == 1), got strides ", x.strides());
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == 1, kOp, "weight must be [channels, 1, kernel], got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype, kOp, "weight is ", weight.scalar_type(), ", input_values is ", dtype);
  TORCH_CHECK(weight.is_contiguous(), kOp, "weight must be contiguous, got strides ", weight.strides());
  const int64_t C = weight.size(0), K = weight.size(2);
  TORCH_CHECK(C >= 1 && C <= unispeech::FCL_MAX_C, kOp, "channels must be in [1, ", unispeech::FCL_MAX_C,
              "], got ", C);
  TORCH_CHECK(K >= 1 && K <= unispeech::FCL_MAX_K, kOp, "kernel size must be in [1, ", unispeech::FCL_MAX_K,
              "], got ", K);
  TORCH_CHECK(stride >= 1, kOp, "stride must be >= 1, got ", stride);
  TORCH_CHECK(unispeech::fcl_fits_shared_memory(K, stride), kOp, "stride ", stride,
              " is too large for the shared-memory sample tile");
  TORCH_CHECK(norm_mode >= unispeech::FCL_NORM_NONE && norm_mode <= unispeech::FCL_NORM_GROUP, kOp,
              "norm_mode must be 0 (none), 1 (layer) or 2 (group), got ", norm_mode);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), kOp, "eps must be finite and >= 0, got ", eps);
  const std::pair<const char*, const std::optional<at::Tensor>*> vectors[] = {
      {"bias", &bias}, {"norm_weight", &norm_weight}, {"norm_bias", &norm_bias}};
  for (const auto& named : vectors) {
    const auto& t = *named.second;
    if (!t.has_value()) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, kOp, named.first, " must be [", C, "], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, kOp, named.first, " is ", t->scalar_type(), ", input_values is ", dtype);
    TORCH_CHECK(t->is_contiguous(), kOp, named.first, " must be contiguous, got strides ", t->strides());
  }
  const int64_t B = x.size(0), L = x.size(1);
  TORCH_CHECK(B <= unispeech::FCL_MAX_BATCH, kOp, "batch must be <= ", unispeech::FCL_MAX_BATCH, ", got ", B);
  TORCH_CHECK(L >= K, kOp, "input of ", L, " samples is shorter than the kernel (", K, ")");
  const int64_t T = (L - K) / stride + 1;
  TORCH_CHECK(L <= INT32_MAX && B * T * C <= (int64_t{1} << 40), kOp, "input too large: ", x.sizes());
  if (input_lengths.has_value()) {
    TORCH_CHECK(norm_mode == unispeech::FCL_NORM_GROUP, kOp, "input_lengths is only used with group norm");
    TORCH_CHECK(input_lengths->dim() == 1 && input_lengths->size(0) == B, kOp, "input_lengths must be [", B,
                "], got shape ", input_lengths->sizes());
    TORCH_CHECK(input_lengths->scalar_type() == at::kLong || input_lengths->scalar_type() == at::kInt, kOp,
                "input_lengths must be int64 or int32, got ", input_lengths->scalar_type());
  }
  return {B, L, C, K, T};
}

void check_device(const at::Tensor& x, const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == x.device(), kOp, name, " is on ", t->device(), ", input_values on ", x.device());
}

at::Tensor first_conv_layer_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 int64_t stride, int64_t norm_mode, const std::optional<at::Tensor>& norm_weight,
                                 const std::optional<at::Tensor>& norm_bias, double eps,
                                 const std::optional<at::Tensor>& input_lengths) {
  TORCH_CHECK(x.is_cuda(), kOp, "input_values must be a CUDA tensor, got ", x.device());
  check_device(x, weight, "weight");
  check_device(x, bias, "bias");
  check_device(x, norm_weight, "norm_weight");
  check_device(x, norm_bias, "norm_bias");
  check_device(x, input_lengths, "input_lengths");
  const FclShape s = check_fcl_shapes(x, weight, bias, stride, norm_mode, norm_weight, norm_bias, eps, input_lengths);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.B, s.T, s.C}, x.options());
  if (s.B == 0) return out;
  int sm_count = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()) == cudaSuccess, kOp,
              "cannot query the multiprocessor count of ", x.device());
  const int frames_per_block = unispeech::fcl_frames_per_block(static_cast<int>(s.B), static_cast<int>(s.T), sm_count);
  at::Tensor workspace, lengths;
  if (norm_mode == unispeech::FCL_NORM_GROUP) {
    const auto n = unispeech::fcl_workspace_floats(static_cast<int>(s.B), static_cast<int>(s.T), static_cast<int>(s.C),
                                                   frames_per_block);
    workspace = at::empty({static_cast<int64_t>(n)}, x.options().dtype(at::kFloat));
  }
  if (input_lengths.has_value()) lengths = input_lengths->to(at::kLong).contiguous();

  FclParams p{};
  p.x = x.data_ptr();
  p.x_stride_b = x.stride(0);
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.gamma = norm_mode != unispeech::FCL_NORM_NONE && norm_weight.has_value() ? norm_weight->data_ptr() : nullptr;
  p.beta = norm_mode != unispeech::FCL_NORM_NONE && norm_bias.has_value() ? norm_bias->data_ptr() : nullptr;
  p.input_lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  p.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  p.B = static_cast<int>(s.B);
  p.L = static_cast<int>(s.L);
  p.T = static_cast<int>(s.T);
  p.C = static_cast<int>(s.C);
  p.K = static_cast<int>(s.K);
  p.S = static_cast<int>(stride);
  p.eps = static_cast<float>(eps);
  p.norm = static_cast<int>(norm_mode);
  p.dtype = x.scalar_type() == at::kFloat  ? unispeech::FCL_FLOAT32
            : x.scalar_type() == at::kHalf ? unispeech::FCL_FLOAT16
                                           : unispeech::FCL_BFLOAT16;
  p.frames_per_block = frames_per_block;
  const cudaError_t err = unispeech::fcl_launch(p, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor first_conv_layer_meta(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 int64_t stride, int64_t norm_mode, const std::optional<at::Tensor>& norm_weight,
                                 const std::optional<at::Tensor>& norm_bias, double eps,
                                 const std::optional<at::Tensor>& input_lengths) {
  const FclShape s = check_fcl_shapes(x, weight, bias, stride, norm_mode, norm_weight, norm_bias, eps, input_lengths);
  return at::empty({s.B, s.T, s.C}, x.options());
}

std::vector<int64_t> kernel_image_info() {
  cudaFuncAttributes attr{};
  const cudaError_t err = unispeech::fcl_kernel_attributes(&attr);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a missing kernel image is not sticky: clear it for later calls
    return {static_cast<int64_t>(err), 0, 0, 0};
  }
  return {0, attr.binaryVersion, attr.ptxVersion, attr.numRegs};
}

std::vector<int64_t> kernel_limits() {
  return {unispeech::FCL_MAX_C, unispeech::FCL_MAX_K, unispeech::FCL_MAX_BATCH};
}

bool fits_shared_memory(int64_t kernel_size, int64_t stride) {
  return unispeech::fcl_fits_shared_memory(kernel_size, stride);
}

}  // namespace

TORCH_LIBRARY(unispeech_cuda, m) {
  m.def("first_conv_layer(Tensor input_values, Tensor weight, Tensor? bias, int stride, int norm_mode, "
        "Tensor? norm_weight, Tensor? norm_bias, float eps, Tensor? input_lengths) -> Tensor");
  m.def("kernel_image_info() -> int[]", &kernel_image_info);
  m.def("kernel_limits() -> int[]", &kernel_limits);
  m.def("fits_shared_memory(int kernel_size, int stride) -> bool", &fits_shared_memory);
}

TORCH_LIBRARY_IMPL(unispeech_cuda, CUDA, m) { m.impl("first_conv_layer", &first_conv_layer_cuda); }

TORCH_LIBRARY_IMPL(unispeech_cuda, Meta, m) { m.impl("first_conv_layer", &first_conv_layer_meta); }

// `import unispeech_kernels._C` loads this library, which registers the ops above with torch.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "unispeech_kernels CUDA ops (torch.ops.unispeech_cuda)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
