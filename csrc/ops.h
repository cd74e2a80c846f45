// lstm_ext's ops as C++ functions: each calls its op through the dispatcher (every dispatch key:
// autograd, autocast, the CPU or CUDA kernel), as torch.ops.lstm_ext.<name> does from Python.
// The schemas, with what each argument means, are in csrc/ops.cpp; a signature here that does
// not match its schema fails at the first call (c10's typed handle checks it).
// torchvision's csrc/ops/*.h do the same: one declaration per op, its handle typed from it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace lstm_ext {
namespace ops {

using at::Tensor;
using c10::optional;

// ---- the public ops (autograd-aware, csrc/autograd.cpp) ----

std::tuple<Tensor, Tensor, Tensor> lstm(
    const Tensor& input, const optional<Tensor>& h0, const optional<Tensor>& c0,
    at::TensorList params, bool has_biases, bool has_projections, int64_t num_layers,
    double dropout, bool train, bool bidirectional, const optional<Tensor>& batch_sizes,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h, double recurrent_dropout,
    bool layer_norm);

std::tuple<Tensor, Tensor, Tensor> lstm_layer(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse);

std::tuple<Tensor, Tensor> lstm_cell(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                     const Tensor& weight_ih, const Tensor& weight_hh,
                                     const optional<Tensor>& bias_ih,
                                     const optional<Tensor>& bias_hh);

// ---- the kernels they run (one per backend) ----

// -> output, h_n, c_n, gates, cells
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    bool keep_state, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask);

// -> grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask);

// -> output, h_n, c_n, gates, cells, norms
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const Tensor& ln_weight_ih, const Tensor& ln_weight_hh,
    const Tensor& ln_weight_c, const Tensor& ln_bias_c, const optional<Tensor>& batch_sizes,
    bool reverse, bool keep_state, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask);

// -> lstm_layer_backward's, then grad_ln_weight_ih, grad_ln_weight_hh, grad_ln_weight_c,
// grad_ln_bias_c
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
ln_lstm_layer_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const Tensor& ln_weight_ih, const Tensor& ln_weight_hh, const Tensor& ln_weight_c,
    const Tensor& ln_bias_c, const optional<Tensor>& batch_sizes, bool reverse,
    const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& norms,
    bool need_grad_input, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask);

// -> hy, cy, gates
std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& input, const Tensor& hx,
                                                     const Tensor& cx, const Tensor& weight_ih,
                                                     const Tensor& weight_hh,
                                                     const optional<Tensor>& bias_ih,
                                                     const optional<Tensor>& bias_hh);

// -> grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
    const Tensor& weight_ih, const Tensor& weight_hh, bool need_grad_input);

void fill_bernoulli_mask_(const Tensor& mask, double p);

// ---- the pure-PyTorch reference (lstm_ext/reference.py): the route of a second derivative ----

std::tuple<Tensor, Tensor, Tensor> lstm_reference(
    const Tensor& input, const Tensor& h0, const Tensor& c0, at::TensorList params,
    bool has_biases, bool has_projections, int64_t num_layers, bool bidirectional,
    const optional<Tensor>& batch_sizes, at::TensorList dropout_masks,
    const c10::List<optional<Tensor>>& zoneout_masks,
    const c10::List<optional<Tensor>>& recurrent_masks, const optional<Tensor>& reset,
    double zoneout_c, double zoneout_h, bool layer_norm);

std::tuple<Tensor, Tensor, Tensor> lstm_layer_reference(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask, const optional<Tensor>& ln_weight_ih,
    const optional<Tensor>& ln_weight_hh, const optional<Tensor>& ln_weight_c,
    const optional<Tensor>& ln_bias_c);

std::tuple<Tensor, Tensor> lstm_cell_reference(const Tensor& input, const Tensor& hx,
                                               const Tensor& cx, const Tensor& weight_ih,
                                               const Tensor& weight_hh,
                                               const optional<Tensor>& bias_ih,
                                               const optional<Tensor>& bias_hh);

}  // namespace ops

// An optional tensor argument from a tensor that may be undefined (None where undefined).
inline c10::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

}  // namespace lstm_ext
