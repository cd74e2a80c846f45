// bfloat16 and float16 layers on the CPU (csrc/cpu/lstm_cpu_lowp.cpp), called by the op kernels
// of lstm_cpu.cpp for those dtypes, after its argument checks.
//
// Storage and GEMM inputs are in the low precision: the inputs, weights and outputs, and what a
// GEMM reads (each step's h, the gate gradients). Everything else is float32: the GEMMs accumulate
// in float32 (MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, on AMX where the CPU has it);
// the gate math, the cell state across the steps of a call and the running gradients stay
// float32, and the activated gates and cell states kept for the backward are float32 (so the
// backward's derivatives are the forward's, not re-rounded ones). Values are rounded to the low
// precision only where they leave a call (outputs, h_n, c_n, gradients) or enter a GEMM.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include <tuple>

#include "../lstm_checks.h"
#include "../lstm_regularize.h"
#include "../lstm_steps.h"

namespace lstm_ext {
namespace cpu {

inline bool is_low_precision(at::ScalarType type) {
  return type == at::kBFloat16 || type == at::kHalf;
}

// The layer forward: output [.., P], h_n [B, P], c_n [B, H] in the input's dtype; gates [.., 4H]
// and cells [.., H] in float32 (with no rows unless keep_state).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_lowp(
    const LayerSizes& s, const Steps& steps, const Restarts& restarts, bool packed,
    const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const c10::optional<at::Tensor>& weight_hr,
    bool reverse, bool keep_state, const Zoneout& zoneout = Zoneout(),
    const c10::optional<at::Tensor>& recurrent_mask = c10::nullopt);

// The layer backward: gradients of input (no rows unless need_grad_input), h0, c0, weight_ih,
// weight_hh, the bias, weight_hr (no rows without it), in the input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_lowp(const LayerSizes& s, const Steps& steps, const Restarts& restarts,
                    const at::Tensor* grad_output,
                    const at::Tensor* grad_h_n, const at::Tensor* grad_c_n,
                    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                    const c10::optional<at::Tensor>& weight_hr, bool reverse,
                    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                    bool need_grad_input, const Zoneout& zoneout = Zoneout(),
                    const c10::optional<at::Tensor>& recurrent_mask = c10::nullopt);

bool has_lowp_blas();
// What a bfloat16 / float16 layer's per-step products run on, on this CPU.
std::string lowp_step_gemm_backend(at::ScalarType type);

}  // namespace cpu
}  // namespace lstm_ext
