// What the CPU and CUDA kernels of the layer-normalised layer (lstm_ext::ln_lstm_layer_forward /
// _backward; schemas in csrc/ops.cpp) share: the layout of the norms they keep for the
// backward, the epsilon, and their arguments' checks. The kernels: csrc/cpu/lstm_cpu_layer_norm.cpp,
// csrc/cuda/layer_norm_host.h; the equations: lstm_ext/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "lstm_checks.h"

namespace lstm_ext {

// nn.LayerNorm's default, and haste's.
constexpr double kLayerNormEps = 1e-5;

// A row of norms: [x̂_ih (4H) | x̂_hh (4H) | rstd_ih, rstd_hh, mean_c, rstd_c, 12 unused]:
// the normalised products x̂_ih = LN(x W_ih^T) and x̂_hh = LN(h W_hh^T) before their gains, then
// 1 / sqrt(var + eps) of each product and the mean and 1 / sqrt(var + eps) of c_new (the unmixed
// c_t), padded to 16 values so that each row's products start 64-byte aligned on the CPU (they
// are the per-step GEMM's output there).
struct NormsRow {
  int64_t H;
  int64_t width() const { return 8 * H + 16; }
  int64_t hh() const { return 4 * H; }
  int64_t stats() const { return 8 * H; }
};
enum Stat { kRstdIh = 0, kRstdHh = 1, kMeanC = 2, kRstdC = 3 };

// A layer-normalised layer's parameters (csrc/cpu/lstm_cpu_layer_norm.cpp): the gains of the two
// products' normalisation, ln_weight_ih and ln_weight_hh [4H], and the gain and bias of the cell
// state's, ln_weight_c and ln_bias_c [H]; each 1-D with weight_ih's dtype and device.
inline void check_layer_norm_params(const char* op, const at::Tensor& weight_ih,
                                    const LayerSizes& s, const at::Tensor& ln_weight_ih,
                                    const at::Tensor& ln_weight_hh, const at::Tensor& ln_weight_c,
                                    const at::Tensor& ln_bias_c) {
  check_shape(op, ln_weight_ih, "ln_weight_ih", "[4*H]", {4 * s.H});
  check_shape(op, ln_weight_hh, "ln_weight_hh", "[4*H]", {4 * s.H});
  check_shape(op, ln_weight_c, "ln_weight_c", "[H]", {s.H});
  check_shape(op, ln_bias_c, "ln_bias_c", "[H]", {s.H});
  check_same_dtype_device(op, weight_ih, "weight_ih", ln_weight_ih, "ln_weight_ih");
  check_same_dtype_device(op, weight_ih, "weight_ih", ln_weight_hh, "ln_weight_hh");
  check_same_dtype_device(op, weight_ih, "weight_ih", ln_weight_c, "ln_weight_c");
  check_same_dtype_device(op, weight_ih, "weight_ih", ln_bias_c, "ln_bias_c");
}

// ln_lstm_layer_forward's arguments beyond the plain layer's: the four parameters, reset,
// zoneout and recurrent dropout as lstm_layer_forward checks them, and H >= 1.
inline LayerSizes check_ln_layer_forward_args(
    const char* op, const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& bias_ih, const c10::optional<at::Tensor>& bias_hh,
    const c10::optional<at::Tensor>& weight_hr, const at::Tensor& ln_weight_ih,
    const at::Tensor& ln_weight_hh, const at::Tensor& ln_weight_c, const at::Tensor& ln_bias_c,
    const c10::optional<at::Tensor>& batch_sizes, const c10::optional<at::Tensor>& reset,
    double zoneout_c, double zoneout_h, const c10::optional<at::Tensor>& zoneout_mask_c,
    const c10::optional<at::Tensor>& zoneout_mask_h,
    const c10::optional<at::Tensor>& recurrent_mask) {
  const LayerSizes s = check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, bias_ih,
                                          bias_hh, weight_hr, batch_sizes);
  check_layer_norm_params(op, weight_ih, s, ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c);
  check_reset(op, reset, input, s);
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, batch_sizes.has_value());
  TORCH_CHECK(s.H > 0, op, ": hidden_size must be at least 1 with layer normalisation");
  return s;
}

// ln_lstm_layer_backward's: as the forward's, and the kept state with the norms.
inline LayerSizes check_ln_layer_backward_args(
    const char* op, const c10::optional<at::Tensor>& grad_output,
    const c10::optional<at::Tensor>& grad_h_n, const c10::optional<at::Tensor>& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& weight_hr, const at::Tensor& ln_weight_ih,
    const at::Tensor& ln_weight_hh, const at::Tensor& ln_weight_c, const at::Tensor& ln_bias_c,
    const c10::optional<at::Tensor>& batch_sizes, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& norms,
    const c10::optional<at::Tensor>& reset, double zoneout_c, double zoneout_h,
    const c10::optional<at::Tensor>& zoneout_mask_c,
    const c10::optional<at::Tensor>& zoneout_mask_h,
    const c10::optional<at::Tensor>& recurrent_mask) {
  const LayerSizes s = check_layer_backward_inputs(op, grad_output, grad_h_n, grad_c_n, input, h0,
                                                   c0, weight_ih, weight_hh, weight_hr,
                                                   batch_sizes, output, gates, cells);
  check_layer_norm_params(op, weight_ih, s, ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c);
  const bool packed = batch_sizes.has_value();
  check_shape(op, norms, "norms",
              packed ? "[N, 8*H + 16] (saved by ln_lstm_layer_forward with keep_state=True)"
                     : "[T, B, 8*H + 16] (saved by ln_lstm_layer_forward with keep_state=True)",
              per_step_shape(s, packed, NormsRow{s.H}.width()));
  check_kept_state(op, weight_ih, norms, "norms");
  check_reset(op, reset, input, s);
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, packed);
  TORCH_CHECK(s.H > 0, op, ": hidden_size must be at least 1 with layer normalisation");
  return s;
}

}  // namespace lstm_ext
