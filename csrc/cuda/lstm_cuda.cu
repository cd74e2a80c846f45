// CUDA kernels of the lstm_ext ops (schemas in csrc/ops.cpp), built only when CUDA is available.
//
// The time loop, the GEMMs and the row bookkeeping are in layer_host.h (shared with a CPU test of
// that loop, tests/cuda_host_check.cpp); this file launches the gate passes (gate_pass.h) and
// registers the ops. float32, float64, and bfloat16 / float16 with float32 gate math and kept
// state (cuBLAS accumulates their GEMMs in float32).
//
// Not yet here: a persistent kernel that runs all steps of a small layer in one launch with W_hh
// in shared memory (per-step launches dominate at small sizes).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../lstm_checks.h"
#include "../lstm_steps.h"
#include "gate_pass.h"
#include "layer_host.h"
#include "layer_norm_host.h"

namespace lstm_ext {
namespace cuda {
namespace {

using at::Tensor;
using c10::optional;

// A 2-D grid over one step: x over the hidden units j < H, y over the rows (grid-stride, as
// gridDim.y is at most 65535), so no thread divides an index.
struct GateLaunch {
  dim3 grid, block;
  GateLaunch(int64_t n, int64_t H) {
    constexpr int64_t kThreads = 256;
    const int64_t tx = std::min<int64_t>(kThreads, (H + 31) / 32 * 32);
    const int64_t ty = kThreads / tx;
    block = dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
    grid = dim3(static_cast<unsigned>((H + tx - 1) / tx),
                static_cast<unsigned>(std::min<int64_t>((n + ty - 1) / ty, 65535)));
  }
};

template <typename S, typename C>
__global__ void gates_forward_kernel(const GatesForward<S, C> a) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= a.H) {
    return;
  }
  for (int64_t b = blockIdx.y * blockDim.y + threadIdx.y; b < a.n;
       b += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    gates_forward_unit(a, b, j);
  }
}

template <typename S, typename C>
__global__ void gates_backward_kernel(const GatesBackward<S, C> a) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= a.H) {
    return;
  }
  for (int64_t b = blockIdx.y * blockDim.y + threadIdx.y; b < a.n;
       b += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    gates_backward_unit(a, b, j);
  }
}

struct CudaKernels {
  using DeviceGuard = c10::cuda::CUDAGuard;
  // Gate values an inference forward projects at once (a chunk of steps): 2^24 float32 values
  // are 64 MB, enough for the chunk's GEMM to fill the GPU.
  static int64_t chunk_elements() { return int64_t{1} << 24; }
  template <typename S, typename C>
  static void gates_forward(const GatesForward<S, C>& a) {
    const GateLaunch launch(a.n, a.H);
    const auto stream = at::cuda::getCurrentCUDAStream();
    gates_forward_kernel<S, C><<<launch.grid, launch.block, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename S, typename C>
  static void gates_backward(const GatesBackward<S, C>& a) {
    const GateLaunch launch(a.n, a.H);
    const auto stream = at::cuda::getCurrentCUDAStream();
    gates_backward_kernel<S, C><<<launch.grid, launch.block, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // out = a b; a float32 out with 16-bit a, b through cuBLAS's float32-output GEMM (mm.dtype_out).
  static void mm_into(const Tensor& out, const Tensor& a, const Tensor& b) {
    Tensor result = out;
    if (out.scalar_type() == a.scalar_type()) {
      at::mm_out(result, a, b);
    } else {
      at::mm_out(result, a, b, out.scalar_type());
    }
  }
};

// The op kernels: layer_host.h's, on the current CUDA device.
using Ops = LayerOps<CudaKernels>;
using NormOps = LayerNormOps<CudaKernels>;  // the layer-normalised layer (layer_norm_host.h)

}  // namespace
}  // namespace cuda
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_ext::cuda::Ops::layer_forward);
  m.impl("lstm_layer_backward", &lstm_ext::cuda::Ops::layer_backward);
  m.impl("ln_lstm_layer_forward", &lstm_ext::cuda::NormOps::layer_forward);
  m.impl("ln_lstm_layer_backward", &lstm_ext::cuda::NormOps::layer_backward);
  m.impl("lstm_cell_forward", &lstm_ext::cuda::Ops::cell_forward);
  m.impl("lstm_cell_backward", &lstm_ext::cuda::Ops::cell_backward);
}
