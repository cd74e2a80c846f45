// Argument checks shared by every backend's kernels: the ops validate their inputs themselves, so a
// direct call of torch.ops.lstm_ext.* with a wrong shape or dtype raises instead of reading out of
// bounds. Messages name the op, the argument, and the expected vs actual shape or dtype.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <sstream>
#include <utility>
#include <string>
#include <vector>

namespace lstm_ext {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t d = 0; d < sizes.size(); ++d) {
    out << (d ? ", " : "") << sizes[d];
  }
  out << "]";
  return out.str();
}

// `what` spells the expected shape symbolically, e.g. "[B, H]".
inline void check_shape(const char* op, const at::Tensor& t, const char* name, const char* what,
                        std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ", what,
              " = ", shape_str(expected), ", got ", shape_str(t.sizes()));
}

inline void check_rank(const char* op, const at::Tensor& t, const char* name, const char* what,
                       int64_t rank) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be ", rank, "-D ", what, ", got a ",
              t.dim(), "-D tensor of shape ", shape_str(t.sizes()));
}

// Every tensor of an op shares the dtype and device of `ref` (the first weight), and that dtype is
// one the kernels are written for.
inline void check_same_dtype_device(const char* op, const at::Tensor& ref, const char* ref_name,
                                    const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; all tensors must share one floating-point dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on one device");
}

// The input and the states are on the weights' device, with nn.LSTM's words first (its RNN code
// checks the same): checked after the weights agree among themselves, and input before states, so
// a state that differs from the weights differs from the input too.
inline void check_input_device(const char* op, const at::Tensor& weight, const at::Tensor& input) {
  TORCH_CHECK(input.device() == weight.device(),
              "Input and parameter tensors are not at the same device, found input tensor at ",
              input.device(), " and parameter tensor at ", weight.device(), " (", op,
              ": input is on ", input.device(), " but weight_ih is on ", weight.device(), ")");
}

inline void check_state_device(const char* op, const at::Tensor& input, const at::Tensor& state,
                               const char* name) {
  TORCH_CHECK(state.device() == input.device(),
              "Input and hidden tensors are not at the same device, found input tensor at ",
              input.device(), " and hidden tensor at ", state.device(), " (", op, ": ", name,
              " is on ", state.device(), " but input is on ", input.device(), ")");
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 ||
                  type == at::kHalf,
              op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", type);
}

// The dtype of the activated gates and cell states a forward keeps for its backward: float32 for
// bfloat16 / float16 layers (which compute their gates in float32), else the weights' dtype.
inline at::ScalarType kept_state_dtype(at::ScalarType weight) {
  return weight == at::kBFloat16 || weight == at::kHalf ? at::kFloat : weight;
}

inline void check_kept_state(const char* op, const at::Tensor& weight_ih, const at::Tensor& t,
                             const char* name) {
  TORCH_CHECK(t.scalar_type() == kept_state_dtype(weight_ih.scalar_type()), op, ": ", name,
              " has dtype ", t.scalar_type(), " but a forward with ", weight_ih.scalar_type(),
              " weights keeps ", kept_state_dtype(weight_ih.scalar_type()));
  TORCH_CHECK(t.device() == weight_ih.device(), op, ": ", name, " is on ", t.device(),
              " but weight_ih is on ", weight_ih.device());
}

// The BLAS interface takes 32-bit dimensions.
inline void check_fits_int(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= INT_MAX, op, ": ", what, " = ", value,
              " is too large for the 32-bit BLAS interface");
}

// Sizes of one layer. I, H, P are read off the weights: weight_ih [4H, I], weight_hh [4H, P],
// weight_hr [P, H] (P = H without projection). T, B, N off the input: N = T*B rows, or the total
// of batch_sizes for a packed sequence.
struct LayerSizes {
  int64_t T, B, I, H, P, N;
};

inline LayerSizes check_weights(const char* op, const at::Tensor& weight_ih,
                                const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
                                const c10::optional<at::Tensor>& bias_hh,
                                const c10::optional<at::Tensor>& weight_hr) {
  check_floating(op, weight_ih, "weight_ih");
  check_rank(op, weight_ih, "weight_ih", "[4*hidden_size, input_size]", 2);
  check_rank(op, weight_hh, "weight_hh", "[4*hidden_size, hidden_size or proj_size]", 2);
  TORCH_CHECK(weight_hh.size(0) % 4 == 0, op, ": weight_hh must have 4*hidden_size rows, got ",
              shape_str(weight_hh.sizes()));
  const int64_t H = weight_hh.size(0) / 4;
  const int64_t I = weight_ih.size(1);
  if (weight_hr.has_value()) {
    check_rank(op, *weight_hr, "weight_hr", "[proj_size, hidden_size]", 2);
  }
  const int64_t P = weight_hr.has_value() ? weight_hr->size(0) : H;
  check_shape(op, weight_ih, "weight_ih", "[4*H, I]", {4 * H, I});
  if (weight_hr.has_value()) {
    // A projection to no features: nn.LSTM has no such thing (its proj_size = 0 means none), and
    // the kernels would read an empty weight_hr's null data pointer. nn.LSTM's words for
    // proj_size; RuntimeError, as nn.LSTM raises for such weights through functional_call.
    TORCH_CHECK(P > 0, "proj_size should be a positive integer or zero to disable projections (",
                op, ": weight_hr has shape ", shape_str(weight_hr->sizes()),
                ", a projection to 0 features; pass weight_hr=None for no projection)");
    check_shape(op, weight_hh, "weight_hh", "[4*H, P]", {4 * H, P});
    check_shape(op, *weight_hr, "weight_hr", "[P, H]", {P, H});
    check_same_dtype_device(op, weight_ih, "weight_ih", *weight_hr, "weight_hr");
  } else {
    check_shape(op, weight_hh, "weight_hh", "[4*H, H]", {4 * H, H});
  }
  check_same_dtype_device(op, weight_ih, "weight_ih", weight_hh, "weight_hh");
  TORCH_CHECK(bias_ih.has_value() == bias_hh.has_value(), op,
              ": bias_ih and bias_hh must be given together or both be None");
  if (bias_ih.has_value()) {
    check_shape(op, *bias_ih, "bias_ih", "[4*H]", {4 * H});
    check_shape(op, *bias_hh, "bias_hh", "[4*H]", {4 * H});
    check_same_dtype_device(op, weight_ih, "weight_ih", *bias_ih, "bias_ih");
    check_same_dtype_device(op, weight_ih, "weight_ih", *bias_hh, "bias_hh");
  }
  return {0, 0, I, H, P, 0};
}

// input [T, B, I], or packed [N, I] with batch_sizes [T] (each step's active batch: positive,
// non-increasing, summing to N; B = batch_sizes[0]); h0 [B, P]; c0 [B, H].
inline LayerSizes check_layer_inputs(const char* op, const at::Tensor& input, const at::Tensor& h0,
                                     const at::Tensor& c0, const at::Tensor& weight_ih,
                                     const at::Tensor& weight_hh,
                                     const c10::optional<at::Tensor>& bias_ih,
                                     const c10::optional<at::Tensor>& bias_hh,
                                     const c10::optional<at::Tensor>& weight_hr,
                                     const c10::optional<at::Tensor>& batch_sizes) {
  LayerSizes s = check_weights(op, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr);
  if (batch_sizes.has_value()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op,
                ": batch_sizes must be a 1-D int64 CPU tensor (PackedSequence.batch_sizes), got a ",
                bs.dim(), "-D ", bs.scalar_type(), " tensor on ", bs.device());
    check_rank(op, input, "input", "[N, input_size] (packed)", 2);
    s.T = bs.size(0);
    TORCH_CHECK(s.T > 0, op, ": batch_sizes must have at least one time step, got none");
    const at::Tensor bsc = bs.contiguous();
    const int64_t* b = bsc.data_ptr<int64_t>();
    s.B = b[0];
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(b[t] > 0 && b[t] <= (t ? b[t - 1] : b[0]), op,
                  ": batch_sizes must be positive and non-increasing, got ", b[t], " at step ", t,
                  (t ? " after " : ""), (t ? std::to_string(b[t - 1]) : std::string()));
      total += b[t];
    }
    s.N = total;
    check_shape(op, input, "input", "[sum(batch_sizes), I]", {s.N, s.I});
  } else {
    check_rank(op, input, "input", "[T, B, input_size]", 3);
    s.T = input.size(0);
    s.B = input.size(1);
    TORCH_CHECK(s.T > 0, op, ": input must have at least one time step, got T = 0 (shape ",
                shape_str(input.sizes()), ")");
    check_shape(op, input, "input", "[T, B, I]", {s.T, s.B, s.I});
    s.N = s.T * s.B;
  }
  check_shape(op, h0, "h0", "[B, P]", {s.B, s.P});
  check_shape(op, c0, "c0", "[B, H]", {s.B, s.H});
  check_input_device(op, weight_ih, input);
  check_state_device(op, input, h0, "h0");
  check_state_device(op, input, c0, "c0");
  check_same_dtype_device(op, weight_ih, "weight_ih", input, "input");
  check_same_dtype_device(op, weight_ih, "weight_ih", h0, "h0");
  check_same_dtype_device(op, weight_ih, "weight_ih", c0, "c0");
  check_fits_int(op, "the number of rows (T*B)", s.N);
  check_fits_int(op, "B*4*H", s.B * 4 * s.H);
  check_fits_int(op, "input_size", s.I);
  return s;
}

// An optional incoming gradient: absent, or shaped like the output it belongs to.
inline void check_optional_grad(const char* op, const c10::optional<at::Tensor>& grad,
                                const char* name, const char* what, std::vector<int64_t> expected,
                                const at::Tensor& ref) {
  if (grad.has_value() && grad->defined()) {
    check_shape(op, *grad, name, what, std::move(expected));
    check_same_dtype_device(op, ref, "weight_ih", *grad, name);
  }
}

// `sizes` with no rows (a leading 0) unless `wanted`: an output that was not asked for.
inline std::vector<int64_t> rows_or_none(at::IntArrayRef sizes, bool wanted) {
  std::vector<int64_t> shape(sizes.begin(), sizes.end());
  if (!wanted) {
    shape[0] = 0;
  }
  return shape;
}

// The shape of a per-step tensor with `width` features: [T, B, width], or [N, width] when packed.
inline std::vector<int64_t> per_step_shape(const LayerSizes& s, bool packed, int64_t width) {
  return packed ? std::vector<int64_t>{s.N, width} : std::vector<int64_t>{s.T, s.B, width};
}

// The layer backward's arguments: the forward's inputs, what it saved, and the incoming gradients.
inline LayerSizes check_layer_backward_inputs(
    const char* op, const c10::optional<at::Tensor>& grad_output,
    const c10::optional<at::Tensor>& grad_h_n, const c10::optional<at::Tensor>& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const c10::optional<at::Tensor>& weight_hr, const c10::optional<at::Tensor>& batch_sizes,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells) {
  const LayerSizes s = check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, c10::nullopt,
                                          c10::nullopt, weight_hr, batch_sizes);
  const bool packed = batch_sizes.has_value();
  const char* rows_h = packed ? "[N, P]" : "[T, B, P]";
  check_shape(op, output, "output", rows_h, per_step_shape(s, packed, s.P));
  check_shape(op, gates, "gates",
              packed ? "[N, 4*H] (saved by lstm_layer_forward with keep_state=True)"
                     : "[T, B, 4*H] (saved by lstm_layer_forward with keep_state=True)",
              per_step_shape(s, packed, 4 * s.H));
  check_shape(op, cells, "cells",
              packed ? "[N, H] (saved by lstm_layer_forward with keep_state=True)"
                     : "[T, B, H] (saved by lstm_layer_forward with keep_state=True)",
              per_step_shape(s, packed, s.H));
  check_same_dtype_device(op, weight_ih, "weight_ih", output, "output");
  check_kept_state(op, weight_ih, gates, "gates");
  check_kept_state(op, weight_ih, cells, "cells");
  check_optional_grad(op, grad_output, "grad_output", rows_h, per_step_shape(s, packed, s.P),
                      weight_ih);
  check_optional_grad(op, grad_h_n, "grad_h_n", "[B, P]", {s.B, s.P}, weight_ih);
  check_optional_grad(op, grad_c_n, "grad_c_n", "[B, H]", {s.B, s.H}, weight_ih);
  return s;
}

// reset: None, or bool [T, B] on the input's device (where a row's sequence starts anew; see
// Restarts in lstm_steps.h).
inline void check_reset(const char* op, const c10::optional<at::Tensor>& reset,
                        const at::Tensor& input, const LayerSizes& s) {
  if (!reset.has_value() || !reset->defined()) {
    return;
  }
  TORCH_CHECK(reset->scalar_type() == at::kBool, op, ": reset must be a bool tensor, got ",
              reset->scalar_type());
  TORCH_CHECK(reset->device() == input.device(), op, ": reset is on ", reset->device(),
              " but input is on ", input.device());
  check_shape(op, *reset, "reset", "[T, B]", {s.T, s.B});
}

// A layer's zoneout and recurrent dropout (csrc/lstm_regularize.h): probabilities in [0, 1);
// masks contiguous, on the input's device: zoneout's bool [rows, H] (c) and [rows, P] (h) in the
// input's layout, recurrent_mask [B, P] in the input's dtype.
inline void check_regularize(const char* op, double zoneout_c, double zoneout_h,
                             const c10::optional<at::Tensor>& zoneout_mask_c,
                             const c10::optional<at::Tensor>& zoneout_mask_h,
                             const c10::optional<at::Tensor>& recurrent_mask,
                             const at::Tensor& input, const LayerSizes& s, bool packed) {
  TORCH_CHECK(zoneout_c >= 0 && zoneout_c < 1 && zoneout_h >= 0 && zoneout_h < 1, op,
              ": zoneout_c and zoneout_h must be probabilities in [0, 1), got ", zoneout_c, " and ",
              zoneout_h);
  const char* rows = packed ? "[N, " : "[T, B, ";
  const std::pair<const c10::optional<at::Tensor>*, const char*> masks[] = {
      {&zoneout_mask_c, "zoneout_mask_c"}, {&zoneout_mask_h, "zoneout_mask_h"}};
  for (const auto& [mask, name] : masks) {
    if (!mask->has_value() || !(*mask)->defined()) {
      continue;
    }
    const at::Tensor& m = **mask;
    const bool is_c = mask == &zoneout_mask_c;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor, got ",
                m.scalar_type());
    TORCH_CHECK(m.device() == input.device() && m.is_contiguous(), op, ": ", name,
                " must be contiguous and on the input's device (", input.device(), ")");
    const std::string what = std::string(rows) + (is_c ? "H]" : "P]");
    check_shape(op, m, name, what.c_str(), per_step_shape(s, packed, is_c ? s.H : s.P));
  }
  if (recurrent_mask.has_value() && recurrent_mask->defined()) {
    const at::Tensor& m = *recurrent_mask;
    TORCH_CHECK(m.scalar_type() == input.scalar_type(), op,
                ": recurrent_mask must have the input's dtype ", input.scalar_type(), ", got ",
                m.scalar_type());
    TORCH_CHECK(m.device() == input.device() && m.is_contiguous(), op,
                ": recurrent_mask must be contiguous and on the input's device (", input.device(),
                ")");
    check_shape(op, m, "recurrent_mask", "[B, P]", {s.B, s.P});
  }
}

// The cell's arguments: input [B, I], hx, cx [B, H] (one step: T = 1, N = B).
inline LayerSizes check_cell_inputs(const char* op, const at::Tensor& input, const at::Tensor& hx,
                                    const at::Tensor& cx, const at::Tensor& weight_ih,
                                    const at::Tensor& weight_hh,
                                    const c10::optional<at::Tensor>& bias_ih,
                                    const c10::optional<at::Tensor>& bias_hh) {
  LayerSizes s = check_weights(op, weight_ih, weight_hh, bias_ih, bias_hh, c10::nullopt);
  check_rank(op, input, "input", "[B, input_size]", 2);
  s.T = 1;
  s.B = input.size(0);
  s.N = s.B;
  // nn.LSTMCell's checks and words first (at::lstm_cell's, which a scripted model meets as ours).
  TORCH_CHECK(input.size(1) == s.I, "input has inconsistent input_size: got ", input.size(1),
              " expected ", s.I, " (", op, ": input of shape ", shape_str(input.sizes()), ")");
  for (const auto& [index, state] : {std::pair<int, const at::Tensor*>{0, &hx}, {1, &cx}}) {
    if (state->dim() != 2) continue;  // check_shape below says what is expected
    const char* name = index == 0 ? "hx" : "cx";
    TORCH_CHECK(state->size(0) == s.B, "Input batch size ", s.B, " doesn't match hidden", index,
                " batch size ", state->size(0), " (", op, ": ", name, " of shape ",
                shape_str(state->sizes()), ", expected [B, H] = [", s.B, ", ", s.H, "])");
    TORCH_CHECK(state->size(1) == s.H, "hidden", index, " has inconsistent hidden_size: got ",
                state->size(1), ", expected ", s.H, " (", op, ": ", name, " of shape ",
                shape_str(state->sizes()), ", expected [B, H] = [", s.B, ", ", s.H, "])");
  }
  check_shape(op, input, "input", "[B, I]", {s.B, s.I});
  check_shape(op, hx, "hx", "[B, H]", {s.B, s.H});
  check_shape(op, cx, "cx", "[B, H]", {s.B, s.H});
  check_input_device(op, weight_ih, input);
  check_state_device(op, input, hx, "hx");
  check_state_device(op, input, cx, "cx");
  check_same_dtype_device(op, weight_ih, "weight_ih", input, "input");
  check_same_dtype_device(op, weight_ih, "weight_ih", hx, "hx");
  check_same_dtype_device(op, weight_ih, "weight_ih", cx, "cx");
  check_fits_int(op, "B*4*H", s.B * 4 * s.H);
  check_fits_int(op, "input_size", s.I);
  return s;
}

inline LayerSizes check_cell_backward_inputs(
    const char* op, const c10::optional<at::Tensor>& grad_hy,
    const c10::optional<at::Tensor>& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& gates,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh) {
  const LayerSizes s =
      check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, c10::nullopt, c10::nullopt);
  check_shape(op, cy, "cy", "[B, H]", {s.B, s.H});
  check_shape(op, gates, "gates", "[B, 4*H] (saved by lstm_cell_forward)", {s.B, 4 * s.H});
  check_same_dtype_device(op, weight_ih, "weight_ih", cy, "cy");
  check_kept_state(op, weight_ih, gates, "gates");
  check_optional_grad(op, grad_hy, "grad_hy", "[B, H]", {s.B, s.H}, weight_ih);
  check_optional_grad(op, grad_cy, "grad_cy", "[B, H]", {s.B, s.H}, weight_ih);
  return s;
}

}  // namespace lstm_ext
