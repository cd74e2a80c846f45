// The Python module lstm_ext._C: typed entry points to two public ops, and what lstm_ext reports
// about its build and CPU kernels. The ops themselves live under torch.ops.lstm_ext (csrc/ops.cpp).
#include <torch/extension.h>

#include "ops.h"

#ifndef LSTM_EXT_TORCH_VERSION
#error "LSTM_EXT_TORCH_VERSION must be defined by setup.py"
#endif

namespace lstm_ext {
namespace cpu {
bool has_direct_blas_impl();
bool has_vml_impl();
std::vector<std::pair<std::string, std::string>> gemm_backends_impl();
std::string vector_code_impl();
std::vector<std::tuple<std::string, std::string, std::string>> gemm_choices_impl();
void set_gemm_backend_impl(const std::string& name);
std::vector<std::pair<std::string, int64_t>> count_gemm_backends_impl(bool on);
}  // namespace cpu
}  // namespace lstm_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lstm_ext compiled kernels; the ops live under torch.ops.lstm_ext";
  // lstm and lstm_cell through their typed handles (csrc/ops.h): the same dispatcher ops as
  // torch.ops.lstm_ext.* (autograd, every backend), without torch.ops' conversion of each
  // argument into a boxed stack. Measured at the trainer's shape, each call right after an
  // nn.LSTM call: forward 24 -> 17 us, forward + backward 164 -> 146 us. torch.compile traces
  // torch.ops instead (modules.py). A cell is called once per step: per-call cost is most of it.
  m.def(
      "lstm",
      [](const at::Tensor& input, const c10::optional<at::Tensor>& h0,
         const c10::optional<at::Tensor>& c0, const std::vector<at::Tensor>& params,
         bool has_biases, bool has_projections, int64_t num_layers, double dropout, bool train,
         bool bidirectional, const c10::optional<at::Tensor>& batch_sizes,
         const c10::optional<at::Tensor>& reset, double zoneout_c, double zoneout_h,
         double recurrent_dropout, bool layer_norm) {
        return lstm_ext::ops::lstm(input, h0, c0, params, has_biases, has_projections,
                                   num_layers, dropout, train, bidirectional, batch_sizes, reset,
                                   zoneout_c, zoneout_h, recurrent_dropout, layer_norm);
      },
      "torch.ops.lstm_ext.lstm through its typed handle (same op, less per-call cost)",
      py::arg("input"), py::arg("h0"), py::arg("c0"), py::arg("params"), py::arg("has_biases"),
      py::arg("has_projections"), py::arg("num_layers"), py::arg("dropout"), py::arg("train"),
      py::arg("bidirectional"), py::arg("batch_sizes"), py::arg("reset") = py::none(),
      py::arg("zoneout_c") = 0.0, py::arg("zoneout_h") = 0.0,
      py::arg("recurrent_dropout") = 0.0, py::arg("layer_norm") = false);
  m.def("lstm_cell", &lstm_ext::ops::lstm_cell,
        "torch.ops.lstm_ext.lstm_cell through its typed handle (same op, less per-call cost)");
  // Checked by lstm_ext/_ops.py against the running torch (C++ ABI is per torch version).
  m.attr("torch_version") = LSTM_EXT_TORCH_VERSION;
  m.attr("has_direct_blas") = lstm_ext::cpu::has_direct_blas_impl();
  m.attr("has_vml") = lstm_ext::cpu::has_vml_impl();
  m.def("gemm_backends", &lstm_ext::cpu::gemm_backends_impl,
        "(dtype, what a CPU layer's per-step products run on) for each dtype, on this CPU");
  m.def("gemm_choices", &lstm_ext::cpu::gemm_choices_impl,
        "(size class, backend, how it was chosen) for each GEMM size class this process has run");
  m.def("set_gemm_backend", &lstm_ext::cpu::set_gemm_backend_impl,
        "LSTM_EXT_GEMM at run time, for tests: auto, rule, small, brgemm, mkl or aten",
        py::arg("name"));
  m.def("count_gemm_backends", &lstm_ext::cpu::count_gemm_backends_impl,
        "tests: the products each GEMM backend ran since the last call (then reset); on: whether "
        "to go on counting",
        py::arg("on"));
  m.def("vector_code", &lstm_ext::cpu::vector_code_impl,
        "the instruction set lstm_ext's vector code runs (ATen's CPU capability)");
}
