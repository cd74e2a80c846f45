// CPU kernels of the layer-normalised LSTM layer (lstm_ext::ln_lstm_layer_forward / _backward;
// schemas in csrc/ops.cpp), haste's LayerNormLSTM with nn.LSTM's weights:
//   z   = LN(x_t W_ih^T) ⊙ γ_ih + LN(h_{t-1} W_hh^T) ⊙ γ_hh + b_ih + b_hh       γ_ih, γ_hh [4H]
//   c_t = f ⊙ c_{t-1} + i ⊙ g;   h_t = o ⊙ tanh(LN(c_t) ⊙ γ_c + β_c)          γ_c, β_c [H]
// LN(v) = (v - mean(v)) / sqrt(var(v) + eps) over a row's values (biased variance); the equations
// are spelled out in lstm_ext/reference.py. Reset, zoneout and recurrent dropout work as in the
// plain kernels (csrc/lstm_steps.h, csrc/lstm_regularize.h): zoneout mixes the unnormalised c_t,
// and LN(c_new) feeds h_new.
//
// The time loops are the plain kernel's (layer_forward.h, layer_backward.h, the per-call
// preparation layer_kernels.h) with this file's NormCell as their Cell policy: the input
// projection of every step is one GEMM, into the norms rows; each step runs one GEMM for
// h W_hh^T into its own place in its norms row (the two products are normalised apart, so they
// cannot share one), then one fused pass per row: normalise both products, the gates, c_t,
// normalise c_t, h_t. Threads split the batch. The backward runs the three normalisations'
// backward inside the step's fused pass, in chunks of steps, each chunk's GEMMs after its steps:
// dx, dW_ih (from the normalised product's gradient), dW_hh, dW_hr.
//
// What the forward keeps for the backward, besides gates (activated) and cells (c_t, mixed by
// zoneout where on): norms [rows, 8H + 16]: per row the normalised products x̂_ih = LN(x W_ih^T)
// and x̂_hh = LN(h W_hh^T) (4H each, before their gains), then rstd_ih, rstd_hh (1 / sqrt(var +
// eps) of each product), mean_c and rstd_c (of c_new, the unmixed c_t), padded to 16 values so
// that each row's products start 64-byte aligned (they are the per-step GEMM's output).
//
// Every dtype runs the same loop: float32 and float64 compute in their own type; bfloat16 and
// float16 layers keep their storage and GEMM inputs in that dtype and compute (gates, c, the
// normalisations, and what is kept) in float32, as the plain 16-bit layers do (mixed_gemm.h):
// their products are the 16-bit GEMMs, and h is rounded to the layer's dtype at every step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "../lstm_checks.h"
#include "../lstm_layer_norm.h"
#include "../lstm_math.h"
#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "blas.h"
#include "gates.h"
#include "layer_common.h"
#include "layer_kernels.h"
#include "layer_norm_pass.h"
#include "mixed_gemm.h"
#include "vec_math.h"

namespace lstm_ext {
namespace cpu {
namespace layer_norm {

using at::Tensor;
using c10::optional;

// The layer-normalised cell as the time loops' Cell policy (layer_forward.h, layer_backward.h):
// each step's two products go to their own places in its norms row, the passes above combine
// them.
template <typename C>
struct NormCell {
  static constexpr bool kSeparateProducts = true;
  C* norms;  // [rows, NormsRow::width()]
  LayerNormParams<C> ln;
  NormsRow layout;

  C* input_products(int64_t row) const { return norms + row * layout.width(); }
  C* recurrent_products(int64_t row) const { return norms + row * layout.width() + layout.hh(); }
  int64_t products_ld() const { return layout.width(); }
  void forward(int64_t n, int64_t H, int64_t row, C* gates_t, const C* bias, C* c, C* r,
               C* /*exp_scratch*/) const {
    ln_gates_forward(n, H, norms + row * layout.width(), ln, bias, gates_t, c, r);
  }
  static int64_t sums_width(int64_t H) { return layer_norm::sums_width(H); }
  void backward(int64_t n, int64_t H, int64_t row, const C* gates_t, const C* cells_t,
                const C* c_prev_rows, const C* c0_rows, int64_t n_prev, const uint8_t* restarts,
                const C* dr, C* dc, C* d_ih, C* d_hh, C* sums, C* r, C* /*tanh_c*/) const {
    ln_gates_backward(n, H, gates_t, cells_t, norms + row * layout.width(), c_prev_rows, c0_rows,
                      n_prev, restarts, ln, dr, dc, d_ih, d_hh, sums, r);
  }
};

// The normalisation parameters in C (a 16-bit layer's converted: 10H values), kept alive by
// `held`.
template <typename C>
LayerNormParams<C> ln_params(const Tensor& gain_ih, const Tensor& gain_hh, const Tensor& gain_c,
                             const Tensor& bias_c, std::vector<Tensor>& held) {
  const auto type = c10::CppTypeToScalarType<C>::value;
  for (const Tensor* t : {&gain_ih, &gain_hh, &gain_c, &bias_c}) {
    held.push_back(t->to(type).contiguous());
  }
  return {held[0].data_ptr<C>(), held[1].data_ptr<C>(), held[2].data_ptr<C>(),
          held[3].data_ptr<C>()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_layer_forward_cpu(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const Tensor& ln_weight_ih, const Tensor& ln_weight_hh,
    const Tensor& ln_weight_c, const Tensor& ln_bias_c, const optional<Tensor>& batch_sizes,
    bool reverse, bool keep_state, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::ln_lstm_layer_forward";
  const LayerSizes s = check_ln_layer_forward_args(
      op, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, ln_weight_ih,
      ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, reset, zoneout_c, zoneout_h,
      zoneout_mask_c, zoneout_mask_h, recurrent_mask);
  const bool packed = batch_sizes.has_value();
  const LayerCall call(s, batch_sizes, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                       zoneout_mask_h);
  const NormsRow layout{s.H};
  // Every row's norms, kept for the backward (or, without one, returned with no rows).
  std::vector<int64_t> norms_shape = per_step_shape(s, packed, layout.width());
  Tensor norms = at::empty(norms_shape,
                           input.options().dtype(kept_state_dtype(input.scalar_type())));
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> result;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "ln_lstm_layer_forward_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    std::vector<Tensor> held;
    const NormCell<C> cell{norms.data_ptr<C>(),
                           ln_params<C>(ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, held),
                           layout};
    result = forward_layer<scalar_t>(s, call, packed, input, h0, c0, weight_ih, weight_hh,
                                     bias_ih, bias_hh, weight_hr, keep_state, recurrent_mask,
                                     cell);
  });
  if (!keep_state) {
    norms_shape[0] = 0;
    norms = at::empty(norms_shape, norms.options());
  }
  auto [output, h_n, c_n, gates, cells] = result;
  return {output, h_n, c_n, gates, cells, norms};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
ln_lstm_layer_backward_cpu(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const Tensor& ln_weight_ih, const Tensor& ln_weight_hh, const Tensor& ln_weight_c,
    const Tensor& ln_bias_c, const optional<Tensor>& batch_sizes, bool reverse,
    const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& norms,
    bool need_grad_input, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::ln_lstm_layer_backward";
  const LayerSizes s = check_ln_layer_backward_args(
      op, grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
      ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, output, gates, cells,
      norms, reset, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask);
  const int64_t G = 4 * s.H, H = s.H;
  const LayerCall call(s, batch_sizes, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                       zoneout_mask_h);
  const auto dy = contiguous_or_none(grad_output), dh_n = contiguous_or_none(grad_h_n),
             dc_n = contiguous_or_none(grad_c_n);
  const Tensor norms_c = norms.contiguous();
  LayerGrads g;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "ln_lstm_layer_backward_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    std::vector<Tensor> held;
    // The backward only reads the norms.
    const NormCell<C> cell{const_cast<C*>(norms_c.data_ptr<C>()),
                           ln_params<C>(ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, held),
                           NormsRow{s.H}};
    g = backward_layer<scalar_t>(s, call, dy, dh_n, dc_n, input, h0, c0, weight_ih, weight_hh,
                                 weight_hr, output, gates, cells, need_grad_input,
                                 /*may_fuse_x=*/false, recurrent_mask, cell);
  });
  // The sums: [db (4H) | dγ_ih (4H) | dγ_hh (4H) | dγ_c (H) | dβ_c (H)], in the layer's dtype
  // (each its own tensor).
  auto part = [&](int64_t start, int64_t length) {
    return g.sums.narrow(0, start, length).to(input.scalar_type(), false, /*copy=*/true);
  };
  return {g.input,   g.h0,          g.c0,        g.w_ih,          g.w_hh, g.bias, g.w_hr,
          part(G, G), part(2 * G, G), part(3 * G, H), part(3 * G + H, H)};
}

}  // namespace layer_norm
}  // namespace cpu
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("ln_lstm_layer_forward", &lstm_ext::cpu::layer_norm::ln_lstm_layer_forward_cpu);
  m.impl("ln_lstm_layer_backward", &lstm_ext::cpu::layer_norm::ln_lstm_layer_backward_cpu);
}
