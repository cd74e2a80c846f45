// CPU kernels of the lstm_ext layer and cell ops (schemas in csrc/ops.cpp), for float32, float64,
// bfloat16 and float16: the argument checks, the per-call preparation of the weights and
// workspaces, then one time loop for every dtype (layer_forward.h, layer_backward.h; S the
// layer's dtype, C = at::opmath_type<S> what it computes in: mixed_gemm.h). The cell ops are
// the layer kernels with T = 1.
//
// The per-call preparation runs for every call, so at small sizes it must cost little: one
// allocation for all scratch buffers (Workspace), transposes and bias sums as plain loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../lstm_checks.h"
#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "blas.h"
#include "layer_backward.h"
#include "layer_common.h"
#include "layer_forward.h"
#include "layer_kernels.h"
#include "mixed_gemm.h"

namespace lstm_ext {
namespace cpu {
namespace {

using at::Tensor;
using c10::optional;

// A layer with no hidden units (H = 0, reachable only through the ops, with a projection): its
// output h_t = r_t W_hr^T is zero at every step, and nothing depends on h0, c0 or the weights,
// so every gradient is zero. Spelled out here, as the BLAS calls of the kernels below may skip a
// product over nothing and leave their output unwritten.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> no_hidden_units_forward(
    const LayerSizes& s, bool packed, const at::TensorOptions& opts, bool keep_state) {
  const auto kept = opts.dtype(kept_state_dtype(opts.dtype().toScalarType()));
  std::vector<int64_t> state_shape = per_step_shape(s, packed, 0);
  if (!keep_state) {
    state_shape[0] = 0;
  }
  return {at::zeros(per_step_shape(s, packed, s.P), opts), at::zeros({s.B, s.P}, opts),
          at::empty({s.B, 0}, opts), at::empty(state_shape, kept), at::empty(state_shape, kept)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> no_hidden_units_backward(
    const LayerSizes& s, const Tensor& input, bool proj, bool need_grad_input) {
  const auto opts = input.options();
  return {at::zeros(rows_or_none(input.sizes(), need_grad_input), opts),
          at::zeros({s.B, s.P}, opts),
          at::empty({s.B, 0}, opts),
          at::empty({0, s.I}, opts),
          at::empty({0, s.P}, opts),
          at::empty({0}, opts),
          at::empty({proj ? s.P : 0, 0}, opts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cpu(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    bool keep_state, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::lstm_layer_forward";
  const LayerSizes s = check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, bias_ih,
                                          bias_hh, weight_hr, batch_sizes);
  check_reset(op, reset, input, s);
  const bool packed = batch_sizes.has_value();
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, packed);
  if (s.H == 0) {
    return no_hidden_units_forward(s, packed, input.options(), keep_state);
  }
  const LayerCall call(s, batch_sizes, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                       zoneout_mask_h);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> result;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "lstm_layer_forward_cpu", [&] {
    result = forward_layer<scalar_t>(s, call, packed, input, h0, c0, weight_ih, weight_hh,
                                     bias_ih, bias_hh, weight_hr, keep_state, recurrent_mask,
                                     PlainCell());
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::lstm_layer_backward";
  const LayerSizes s = check_layer_backward_inputs(op, grad_output, grad_h_n, grad_c_n, input, h0,
                                                   c0, weight_ih, weight_hh, weight_hr,
                                                   batch_sizes, output, gates, cells);
  check_reset(op, reset, input, s);
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, batch_sizes.has_value());
  if (s.H == 0) {
    return no_hidden_units_backward(s, input, weight_hr.has_value(), need_grad_input);
  }
  const LayerCall call(s, batch_sizes, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                       zoneout_mask_h);
  const auto dy = contiguous_or_none(grad_output), dh_n = contiguous_or_none(grad_h_n),
             dc_n = contiguous_or_none(grad_c_n);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> result;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    LayerGrads g = backward_layer<scalar_t>(s, call, dy, dh_n, dc_n, input, h0, c0, weight_ih,
                                            weight_hh, weight_hr, output, gates, cells,
                                            need_grad_input, /*may_fuse_x=*/true, recurrent_mask,
                                            PlainCell());
    result = {g.input, g.h0, g.c0, g.w_ih, g.w_hh, g.bias, g.w_hr};
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_cpu(const Tensor& input, const Tensor& hx,
                                                         const Tensor& cx, const Tensor& weight_ih,
                                                         const Tensor& weight_hh,
                                                         const optional<Tensor>& bias_ih,
                                                         const optional<Tensor>& bias_hh) {
  constexpr const char* op = "lstm_ext::lstm_cell_forward";
  const LayerSizes s = check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const LayerCall call(s);
  if (is_low_precision(input.scalar_type())) {  // one step of the layer kernel
    std::tuple<Tensor, Tensor, Tensor> result;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "lstm_cell_forward_cpu", [&] {
      auto [hy, h_n, cy, gates, cells] = forward_layer<scalar_t>(
          s, call, false, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, c10::nullopt,
          /*keep_state=*/true, c10::nullopt, PlainCell());
      result = {hy.view({s.B, s.H}), cy, gates.view({s.B, 4 * s.H})};
    });
    return result;
  }
  // float32 / float64: the layer kernel's step with only the buffers a cell needs (hy is the
  // step's output, cy its running c state).
  const auto x = input.expect_contiguous(), hxc = hx.expect_contiguous(),
             cxc = cx.expect_contiguous(), w_ih = weight_ih.expect_contiguous();
  const auto opts = input.options();
  const int64_t G = 4 * s.H;
  Tensor hy = at::empty({s.B, s.H}, opts);
  Tensor cy = at::empty({s.B, s.H}, opts);
  Tensor gates = at::empty({s.B, G}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_forward_cpu", [&] {
    const bool direct = direct_steps(s);
    // w_hh_t [H, 4H] (not direct), bias [4H], exp_scratch [B, 4H], h_n [B, H] (the layer
    // kernel's copy of hy)
    Workspace<scalar_t> work((direct ? 0 : s.H * G) + G + s.B * G + s.B * s.H, opts);
    ForwardArgs<scalar_t, scalar_t> a{};
    scalar_t* bias = work.take(G);
    combined_bias_into(bias_ih, bias_hh, G, bias);
    a.bias = bias;
    a.exp_scratch = work.take(s.B * G);
    a.h_n = work.take(s.B * s.H);
    a.x = x->data_ptr<scalar_t>();
    a.h0 = hxc->data_ptr<scalar_t>();
    a.c0 = cxc->data_ptr<scalar_t>();
    a.y = hy.data_ptr<scalar_t>();
    a.c_state = cy.data_ptr<scalar_t>();
    a.gates = gates.data_ptr<scalar_t>();
    a.gates_all_rows = true;
    a.chunk_steps = 1;
    a.zoneout = &call.zoneout;
    if (direct) {
      const auto w_hh = weight_hh.expect_contiguous();
      layer_forward_direct<scalar_t>(s, call.walk, w_ih->data_ptr<scalar_t>(),
                                     w_hh->data_ptr<scalar_t>(), nullptr, a);
      return;
    }
    scalar_t* w_hh_t = work.take(s.H * G);
    transpose_into(weight_hh, w_hh_t);
    ForwardWeights<scalar_t, scalar_t> w;
    w.w_ih = w_ih->data_ptr<scalar_t>();
    w.w_hh_t = w_hh_t;
    layer_forward<scalar_t, scalar_t>(s, call.walk, w, PlainCell(), a);
  });
  return {hy, cy, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_cpu(
    const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
    const Tensor& weight_ih, const Tensor& weight_hh, bool need_grad_input) {
  constexpr const char* op = "lstm_ext::lstm_cell_backward";
  const LayerSizes s = check_cell_backward_inputs(op, grad_hy, grad_cy, input, hx, cx, cy, gates,
                                                  weight_ih, weight_hh);
  const LayerCall call(s);
  const auto dhy = contiguous_or_none(grad_hy), dcy = contiguous_or_none(grad_cy);
  // One step of the layer backward: grad_hy is that step's output gradient, grad_cy its dc, the
  // kept cell state is cy (in C). With one step the forward output is never read (every row's
  // previous h is hx), so hx stands in for it. x is not copied next to h (fuse_x): with one step
  // the weight gradients go straight into their outputs, without the copies out of a joint dW_cat.
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> result;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "lstm_cell_backward_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const Tensor cells = cy.scalar_type() == c10::CppTypeToScalarType<C>::value
                             ? cy
                             : cy.to(c10::CppTypeToScalarType<C>::value);
    LayerGrads g = backward_layer<scalar_t>(s, call, dhy, c10::nullopt, dcy, input, hx, cx,
                                            weight_ih, weight_hh, c10::nullopt, hx, gates, cells,
                                            need_grad_input, /*may_fuse_x=*/false,
                                            c10::nullopt, PlainCell());
    result = {g.input, g.h0, g.c0, g.w_ih, g.w_hh, g.bias};
  });
  return result;
}

}  // namespace

bool lowp_products_in_float32(at::ScalarType type) {
  static const int forced = [] {  // 1: float32, 0: native, -1: the rule
    const char* value = std::getenv("LSTM_EXT_LOWP_PRODUCTS");
    const std::string v = value ? value : "";
    if (v.empty() || v == "auto") {
      return -1;
    }
    TORCH_CHECK_VALUE(v == "float32" || v == "native",
                      "LSTM_EXT_LOWP_PRODUCTS: expected auto, float32 or native, got '", v, "'");
    return v == "float32" ? 1 : 0;
  }();
  if (forced >= 0) {
    return forced == 1;
  }
  static const bool bf16_native = [] {
    __builtin_cpu_init();
    return vector_isa() == VectorIsa::kAvx512 &&
           (__builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16"));
  }();
  // float16: float32 products on every CPU measured, AVX512-FP16 included (an Intel Xeon of
  // model 207, forward at (50, 128, 512, 512) 0.86x -> 1.02x nn.LSTM, (100, 32, 64, 128)
  // 1.2x -> 1.8x). A CPU with AMX-FP16 has not been measured: LSTM_EXT_LOWP_PRODUCTS=native
  // tries MKL's float16 GEMMs there.
  // Without MKL the 16-bit products are float32 at::mm calls anyway: float32 copies made once.
  return !mkl_allowed() || type != at::kBFloat16 || !bf16_native;
}

std::string lowp_step_gemm_backend(at::ScalarType type) {
  const char* mkl =
      type == at::kBFloat16 ? "MKL cblas_gemm_bf16bf16f32" : "MKL cblas_gemm_f16f16f32";
  if (lowp_products_in_float32(type)) {
    return "float32 GEMMs (the GEMM seam) on float32 copies made once per call, inputs rounded "
           "through the 16-bit type (float16, a CPU without bfloat16 dot products, or "
           "LSTM_EXT_LOWP_PRODUCTS=float32)";
  }
  if (lowp_gemm(c10::BFloat16()) == nullptr) {
    return "at::mm in float32 (LSTM_EXT_NO_MKL)";
  }
  const std::string float_copy = std::string("; at most ") + std::to_string(kFloatStepRows) +
                                 " rows a step and T >= " + std::to_string(kMinStepsToPack) +
                                 ": a float32 copy of W_hh through the float32 GEMM";
  if (type == at::kBFloat16 && PackedWeight<c10::BFloat16>::usable(2, 16)) {
    return std::string("oneDNN brgemm on W_hh packed per call (T >= ") +
           std::to_string(kMinStepsToPack) + ", K even, 4H a multiple of 16), else " + mkl +
           float_copy;
  }
  return mkl + float_copy;
}

bool has_direct_blas_impl() { return has_direct_blas(); }
bool has_vml_impl() { return has_vml(); }

std::string gemm_settings_impl();

std::vector<std::pair<std::string, std::string>> gemm_backends_impl() {
  const std::string fp = "the GEMM seam: " + gemm_settings_impl();
  return {{"float32", fp},
          {"float64", fp},
          {"bfloat16", lowp_step_gemm_backend(at::kBFloat16)},
          {"float16", lowp_step_gemm_backend(at::kHalf)}};
}

VectorIsa vector_isa() {
  static const VectorIsa isa = [] {
    // ATen's capability, and the whole x86-64 level the variant is compiled for (ATen's AVX2
    // asks for AVX2 and FMA only; x86-64-v3 also for BMI2, MOVBE, ..., which a VM may hide).
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    if (capability == "AVX512" && __builtin_cpu_supports("x86-64-v4")) {
      return VectorIsa::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("x86-64-v3")) {
      return VectorIsa::kAvx2;
    }
    return VectorIsa::kBaseline;
  }();
  return isa;
}

std::string vector_code_impl() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return "x86-64-v4 (AVX-512)";
    case VectorIsa::kAvx2: return "x86-64-v3 (AVX2, FMA)";
    default: return "x86-64 baseline (SSE2)";
  }
}

}  // namespace cpu
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_ext::cpu::lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_ext::cpu::lstm_layer_backward_cpu);
  m.impl("lstm_cell_forward", &lstm_ext::cpu::lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_ext::cpu::lstm_cell_backward_cpu);
}
