// The CUDA kernels' host loop (csrc/cuda/layer_host.h) on the CPU: the same GEMM calls, row
// bookkeeping and per-unit gate math (csrc/cuda/gate_pass.h), with plain loops where CUDA
// launches a gate kernel. Built by tests/test_cuda_host.py, which checks it against the CPU
// kernels, so that the CUDA path's logic is tested on machines without a GPU.
#include <torch/extension.h>

#include "../csrc/cuda/layer_host.h"
#include "../csrc/cuda/layer_norm_host.h"

namespace {

using at::Tensor;

// Gate values an inference forward projects at once; set small by the tests to run many chunks.
int64_t chunk_elements_for_tests = int64_t{1} << 24;

struct LoopKernels {
  struct DeviceGuard {
    explicit DeviceGuard(c10::Device) {}
  };
  static int64_t chunk_elements() { return chunk_elements_for_tests; }
  template <typename S, typename C>
  static void gates_forward(const lstm_ext::cuda::GatesForward<S, C>& a) {
    for (int64_t b = 0; b < a.n; ++b) {
      for (int64_t j = 0; j < a.H; ++j) {
        lstm_ext::cuda::gates_forward_unit(a, b, j);
      }
    }
  }
  template <typename S, typename C>
  static void gates_backward(const lstm_ext::cuda::GatesBackward<S, C>& a) {
    for (int64_t b = 0; b < a.n; ++b) {
      for (int64_t j = 0; j < a.H; ++j) {
        lstm_ext::cuda::gates_backward_unit(a, b, j);
      }
    }
  }
  // As cuBLAS's float32-output GEMM of 16-bit inputs: exact products, float32 sums.
  static void mm_into(const Tensor& out, const Tensor& a, const Tensor& b) {
    Tensor result = out;
    if (out.scalar_type() == a.scalar_type()) {
      at::mm_out(result, a, b);
    } else {
      at::mm_out(result, a.to(out.scalar_type()), b.to(out.scalar_type()));
    }
  }
};

using Ops = lstm_ext::cuda::LayerOps<LoopKernels>;
using NormOps = lstm_ext::cuda::LayerNormOps<LoopKernels>;

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_forward", &Ops::layer_forward, "", py::arg("input"), py::arg("h0"), py::arg("c0"),
        py::arg("weight_ih"), py::arg("weight_hh"), py::arg("bias_ih"), py::arg("bias_hh"),
        py::arg("weight_hr"), py::arg("batch_sizes"), py::arg("reverse"), py::arg("keep_state"),
        py::arg("reset") = py::none(), py::arg("zoneout_c") = 0.0, py::arg("zoneout_h") = 0.0,
        py::arg("zoneout_mask_c") = py::none(), py::arg("zoneout_mask_h") = py::none(),
        py::arg("recurrent_mask") = py::none());
  m.def("layer_backward", &Ops::layer_backward, "", py::arg("grad_output"), py::arg("grad_h_n"),
        py::arg("grad_c_n"), py::arg("input"), py::arg("h0"), py::arg("c0"), py::arg("weight_ih"),
        py::arg("weight_hh"), py::arg("weight_hr"), py::arg("batch_sizes"), py::arg("reverse"),
        py::arg("output"), py::arg("gates"), py::arg("cells"), py::arg("need_grad_input") = true,
        py::arg("reset") = py::none(), py::arg("zoneout_c") = 0.0, py::arg("zoneout_h") = 0.0,
        py::arg("zoneout_mask_c") = py::none(), py::arg("zoneout_mask_h") = py::none(),
        py::arg("recurrent_mask") = py::none());
  m.def("ln_layer_forward", &NormOps::layer_forward);
  m.def("ln_layer_backward", &NormOps::layer_backward);
  m.def("cell_forward", &Ops::cell_forward);
  m.def("cell_backward", &Ops::cell_backward);
  m.def("set_chunk_elements", [](int64_t n) { chunk_elements_for_tests = n; });
}
