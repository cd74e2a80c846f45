// Argument checks shared by every backend's kernels: the ops validate their inputs themselves, so a
// direct call of torch.ops.lstm_ext.* with a wrong shape or dtype raises instead of reading out of
// bounds. Messages name the op, the argument, and the expected vs actual shape or dtype.
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <sstream>
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

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// The BLAS interface takes 32-bit dimensions.
inline void check_fits_int(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= INT_MAX, op, ": ", what, " = ", value,
              " is too large for the 32-bit BLAS interface");
}

// Sizes of one layer, read off the weights: weight_ih [4H, I], weight_hh [4H, H].
struct LayerSizes {
  int64_t T, B, I, H;
};

inline LayerSizes check_weights(const char* op, const at::Tensor& weight_ih,
                                const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
                                const c10::optional<at::Tensor>& bias_hh) {
  check_floating(op, weight_ih, "weight_ih");
  check_rank(op, weight_ih, "weight_ih", "[4*hidden_size, input_size]", 2);
  check_rank(op, weight_hh, "weight_hh", "[4*hidden_size, hidden_size]", 2);
  const int64_t H = weight_hh.size(1);
  const int64_t I = weight_ih.size(1);
  check_shape(op, weight_hh, "weight_hh", "[4*H, H]", {4 * H, H});
  check_shape(op, weight_ih, "weight_ih", "[4*H, I]", {4 * H, I});
  check_same_dtype_device(op, weight_ih, "weight_ih", weight_hh, "weight_hh");
  TORCH_CHECK(bias_ih.has_value() == bias_hh.has_value(), op,
              ": bias_ih and bias_hh must be given together or both be None");
  if (bias_ih.has_value()) {
    check_shape(op, *bias_ih, "bias_ih", "[4*H]", {4 * H});
    check_shape(op, *bias_hh, "bias_hh", "[4*H]", {4 * H});
    check_same_dtype_device(op, weight_ih, "weight_ih", *bias_ih, "bias_ih");
    check_same_dtype_device(op, weight_ih, "weight_ih", *bias_hh, "bias_hh");
  }
  return {0, 0, I, H};
}

// input [T, B, I] (layer) and the states [B, H].
inline LayerSizes check_layer_inputs(const char* op, const at::Tensor& input, const at::Tensor& h0,
                                     const at::Tensor& c0, const at::Tensor& weight_ih,
                                     const at::Tensor& weight_hh,
                                     const c10::optional<at::Tensor>& bias_ih,
                                     const c10::optional<at::Tensor>& bias_hh) {
  LayerSizes s = check_weights(op, weight_ih, weight_hh, bias_ih, bias_hh);
  check_rank(op, input, "input", "[T, B, input_size]", 3);
  s.T = input.size(0);
  s.B = input.size(1);
  TORCH_CHECK(s.T > 0, op, ": input must have at least one time step, got T = 0 (shape ",
              shape_str(input.sizes()), ")");
  check_shape(op, input, "input", "[T, B, I]", {s.T, s.B, s.I});
  check_shape(op, h0, "h0", "[B, H]", {s.B, s.H});
  check_shape(op, c0, "c0", "[B, H]", {s.B, s.H});
  check_same_dtype_device(op, weight_ih, "weight_ih", input, "input");
  check_same_dtype_device(op, weight_ih, "weight_ih", h0, "h0");
  check_same_dtype_device(op, weight_ih, "weight_ih", c0, "c0");
  check_fits_int(op, "T*B", s.T * s.B);
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

}  // namespace lstm_ext
