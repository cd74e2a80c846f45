// CPU kernels of the lstm_ext ops (schemas in csrc/lstm.cpp).
//
// The layer kernels run the whole time loop here. Per step there is no tensor allocation and no
// dispatcher call: one BLAS call on raw pointers for the recurrent GEMM and one fused pass over the
// gates. The input projection (forward) and the weight gradients (backward) are single GEMMs over
// all T*B rows. The cell ops are the layer kernels with T = 1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "../lstm_checks.h"
#include "../lstm_math.h"
#include "blas.h"
#include "vml.h"

namespace lstm_ext {
namespace cpu {
namespace {

using at::Tensor;
using c10::optional;

// A pointwise pass over [B, H] is split across threads only when each task gets at least this many
// units: below it, waking a thread costs more than the gate math it would do.
constexpr int64_t kMinUnitsPerTask = 8192;

template <typename F>
void for_each_batch_row(int64_t B, int64_t H, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kMinUnitsPerTask / std::max<int64_t>(H, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      body(b);
    }
  });
}

// The gate pass of one forward step, over a [B, 4H] block of pre-activations z (x W_ih^T + b +
// h_{t-1} W_hh^T), rows contiguous. Transcendentals go through whole-block vector calls; the rest is
// plain arithmetic the compiler vectorises.
//   z [B, 4H] in: pre-activations, out: activated gates i, f, g, o
//   c_prev [B, H]; c_t [B, H] out (may alias c_prev); h_t [B, H] out
//   exp_neg [B, 4H] scratch
template <typename T>
void gates_forward(int64_t B, int64_t H, T* z, const T* c_prev, T* c_t, T* h_t, T* exp_neg) {
  const int64_t G = 4 * H;
  for (int64_t k = 0; k < B * G; ++k) {
    exp_neg[k] = -z[k];
  }
  vector_exp(B * G, exp_neg, exp_neg);  // e^{-z}: σ(z) = 1 / (1 + e^{-z}) for i, f, o
  for (int64_t b = 0; b < B; ++b) {
    vector_tanh(H, z + b * G + 2 * H, z + b * G + 2 * H);  // g = tanh(z_g), in place
  }
  for_each_batch_row(B, H, [&](int64_t b) {
    T* __restrict__ a = z + b * G;
    const T* __restrict__ e = exp_neg + b * G;
    const T* cp = c_prev + b * H;
    T* c = c_t + b * H;
    for (int64_t j = 0; j < H; ++j) {
      const T i = sigmoid_from_exp_neg(e[j]);
      const T f = sigmoid_from_exp_neg(e[H + j]);
      const T o = sigmoid_from_exp_neg(e[3 * H + j]);
      a[j] = i;
      a[H + j] = f;
      a[3 * H + j] = o;
      c[j] = next_cell(i, f, a[2 * H + j], cp[j]);
    }
  });
  vector_tanh(B * H, c_t, h_t);  // tanh(c_t), then h_t = o ⊙ tanh(c_t)
  for_each_batch_row(B, H, [&](int64_t b) {
    const T* __restrict__ o = z + b * G + 3 * H;
    T* __restrict__ h = h_t + b * H;
    for (int64_t j = 0; j < H; ++j) {
      h[j] *= o[j];
    }
  });
}

// Forward of one layer over all T steps.
//   x      [T, B, I]     h0, c0 [B, H]
//   w_ih   [4H, I]       w_hh   [4H, H]     bias [4H] (b_ih + b_hh) or null
//   y      [T, B, H]     h_n, c_n [B, H]
//   gates  [T, B, 4H]    workspace; on return the activated gates i, f, g, o of every step
//   cells  [T, B, H]     c_t of every step, or null when the backward will not run
//   scratch [B, 4H]
template <typename T>
void layer_forward(const LayerSizes& s, const T* x, const T* h0, const T* c0, const T* w_ih,
                   const T* w_hh, const T* bias, T* y, T* h_n, T* c_n, T* gates, T* cells,
                   T* scratch) {
  const int64_t B = s.B, H = s.H, G = 4 * s.H, rows = s.T * s.B;
  if (bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(gates + r * G, bias, G * sizeof(T));
    }
  }
  // Input projection of all steps at once: gates = x W_ih^T (+ bias).
  gemm<T>(false, true, rows, G, s.I, T(1), x, s.I, w_ih, s.I, bias ? T(1) : T(0), gates, G);

  const T* h_prev = h0;
  const T* c_prev = c0;
  for (int64_t t = 0; t < s.T; ++t) {
    T* gates_t = gates + t * B * G;
    T* h_t = y + t * B * H;
    // Without saved cells, c_n is the running state: each unit reads c_{t-1} before writing c_t.
    T* c_t = cells ? cells + t * B * H : c_n;
    gemm<T>(false, true, B, G, H, T(1), h_prev, H, w_hh, H, T(1), gates_t, G);
    gates_forward(B, H, gates_t, c_prev, c_t, h_t, scratch);
    h_prev = h_t;
    c_prev = c_t;
  }
  std::memcpy(h_n, y + (s.T - 1) * B * H, B * H * sizeof(T));
  if (cells) {
    std::memcpy(c_n, cells + (s.T - 1) * B * H, B * H * sizeof(T));
  }
}

// Backward of one layer: the reverse time loop, then the weight gradients as single GEMMs.
//   dy [T, B, H] or null; dh_n, dc_n [B, H] or null (absent gradients are zero)
//   x, h0, c0, w_ih, w_hh as in the forward; y [T, B, H] (read for t >= 1 only, may be null if T = 1)
//   gates [T, B, 4H] activated gates, cells [T, B, H] c_t, both saved by the forward
//   dx [T, B, I]; dh0, dc0 [B, H] (also the running dh, dc of the loop); dw_ih [4H, I];
//   dw_hh [4H, H]; db [4H]; dgates [T, B, 4H] workspace: the pre-activation gradients;
//   scratch [B, H]
template <typename T>
void layer_backward(const LayerSizes& s, const T* dy, const T* dh_n, const T* dc_n, const T* x,
                    const T* h0, const T* c0, const T* w_ih, const T* w_hh, const T* y,
                    const T* gates, const T* cells, T* dx, T* dh0, T* dc0, T* dw_ih, T* dw_hh,
                    T* db, T* dgates, T* scratch) {
  const int64_t B = s.B, H = s.H, G = 4 * s.H, rows = s.T * s.B;
  T* dh = dh0;
  T* dc = dc0;
  if (dh_n) {
    std::memcpy(dh, dh_n, B * H * sizeof(T));
  } else {
    std::fill(dh, dh + B * H, T(0));
  }
  if (dc_n) {
    std::memcpy(dc, dc_n, B * H * sizeof(T));
  } else {
    std::fill(dc, dc + B * H, T(0));
  }
  T* tanh_c = scratch;
  for (int64_t t = s.T - 1; t >= 0; --t) {
    const T* gates_t = gates + t * B * G;
    const T* c_prev_t = t > 0 ? cells + (t - 1) * B * H : c0;
    const T* dy_t = dy ? dy + t * B * H : nullptr;
    T* dgates_t = dgates + t * B * G;
    vector_tanh(B * H, cells + t * B * H, tanh_c);
    for_each_batch_row(B, H, [&](int64_t b) {
      const T* __restrict__ a = gates_t + b * G;
      T* __restrict__ d = dgates_t + b * G;
      const T* __restrict__ tc = tanh_c + b * H;
      const T* __restrict__ cp = c_prev_t + b * H;
      const T* __restrict__ dyb = dy_t ? dy_t + b * H : nullptr;
      T* __restrict__ dhb = dh + b * H;
      T* __restrict__ dcb = dc + b * H;
      for (int64_t j = 0; j < H; ++j) {
        const T dh_total = dyb ? dhb[j] + dyb[j] : dhb[j];
        dcb[j] = cell_backward(a[j], a[H + j], a[2 * H + j], a[3 * H + j], cp[j], tc[j], dh_total,
                               dcb[j], &d[j], &d[H + j], &d[2 * H + j], &d[3 * H + j]);
      }
    });
    // dL/dh_{t-1} = dG_t W_hh
    gemm<T>(false, false, B, H, G, T(1), dgates_t, G, w_hh, H, T(0), dh, H);
  }

  // dx = dG W_ih over all T*B rows.
  gemm<T>(false, false, rows, s.I, G, T(1), dgates, G, w_ih, s.I, T(0), dx, s.I);
  // dW_ih = dG^T x.
  gemm<T>(true, false, G, s.I, rows, T(1), dgates, G, x, s.I, T(0), dw_ih, s.I);
  // dW_hh = dG^T [h0; y[0..T-2]]: the step-0 rows pair with h0, the rest with the previous output.
  gemm<T>(true, false, G, H, B, T(1), dgates, G, h0, H, T(0), dw_hh, H);
  if (s.T > 1) {
    gemm<T>(true, false, G, H, (s.T - 1) * B, T(1), dgates + B * G, G, y, H, T(1), dw_hh, H);
  }
  // db = column sums of dG (the same for b_ih and b_hh).
  std::fill(db, db + G, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* d = dgates + r * G;
    for (int64_t k = 0; k < G; ++k) {
      db[k] += d[k];
    }
  }
}

template <typename T>
const T* data_or_null(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

optional<Tensor> contiguous_or_none(const optional<Tensor>& t) {
  if (t.has_value() && t->defined()) {
    return t->contiguous();
  }
  return c10::nullopt;
}

Tensor combined_bias(const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh) {
  return bias_ih.has_value() ? (*bias_ih + *bias_hh).contiguous() : Tensor();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cpu(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    bool keep_state) {
  constexpr const char* op = "lstm_ext::lstm_layer_forward";
  const LayerSizes s =
      check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh);
  const Tensor x = input.contiguous(), h0c = h0.contiguous(), c0c = c0.contiguous();
  const Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  const Tensor bias = combined_bias(bias_ih, bias_hh);
  const auto opts = x.options();
  Tensor output = at::empty({s.T, s.B, s.H}, opts);
  Tensor h_n = at::empty({s.B, s.H}, opts);
  Tensor c_n = at::empty({s.B, s.H}, opts);
  Tensor gates = at::empty({s.T, s.B, 4 * s.H}, opts);
  Tensor cells = at::empty({keep_state ? s.T : 0, s.B, s.H}, opts);
  Tensor scratch = at::empty({s.B, 4 * s.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_forward_cpu", [&] {
    layer_forward<scalar_t>(s, x.data_ptr<scalar_t>(), h0c.data_ptr<scalar_t>(),
                            c0c.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
                            w_hh.data_ptr<scalar_t>(),
                            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                            output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
                            c_n.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                            keep_state ? cells.data_ptr<scalar_t>() : nullptr,
                            scratch.data_ptr<scalar_t>());
  });
  if (!keep_state) {
    gates = at::empty({0, s.B, 4 * s.H}, opts);
  }
  return {output, h_n, c_n, gates, cells};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& output, const Tensor& gates,
    const Tensor& cells) {
  constexpr const char* op = "lstm_ext::lstm_layer_backward";
  const LayerSizes s =
      check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, c10::nullopt, c10::nullopt);
  check_shape(op, output, "output", "[T, B, H]", {s.T, s.B, s.H});
  check_shape(op, gates, "gates", "[T, B, 4*H] (saved by lstm_layer_forward with keep_state=True)",
              {s.T, s.B, 4 * s.H});
  check_shape(op, cells, "cells", "[T, B, H] (saved by lstm_layer_forward with keep_state=True)",
              {s.T, s.B, s.H});
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{output, "output"},
                         {gates, "gates"},
                         {cells, "cells"}}) {
    check_same_dtype_device(op, weight_ih, "weight_ih", t, name);
  }
  check_optional_grad(op, grad_output, "grad_output", "[T, B, H]", {s.T, s.B, s.H}, weight_ih);
  check_optional_grad(op, grad_h_n, "grad_h_n", "[B, H]", {s.B, s.H}, weight_ih);
  check_optional_grad(op, grad_c_n, "grad_c_n", "[B, H]", {s.B, s.H}, weight_ih);

  const auto dy = contiguous_or_none(grad_output), dh_n = contiguous_or_none(grad_h_n),
             dc_n = contiguous_or_none(grad_c_n);
  const Tensor x = input.contiguous(), h0c = h0.contiguous(), c0c = c0.contiguous();
  const Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  const Tensor y = output.contiguous(), gates_c = gates.contiguous(), cells_c = cells.contiguous();
  const auto opts = x.options();
  Tensor grad_input = at::empty({s.T, s.B, s.I}, opts);
  Tensor grad_h0 = at::empty({s.B, s.H}, opts);
  Tensor grad_c0 = at::empty({s.B, s.H}, opts);
  Tensor grad_w_ih = at::empty({4 * s.H, s.I}, opts);
  Tensor grad_w_hh = at::empty({4 * s.H, s.H}, opts);
  Tensor grad_bias = at::empty({4 * s.H}, opts);
  Tensor dgates = at::empty({s.T, s.B, 4 * s.H}, opts);
  Tensor scratch = at::empty({s.B, s.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_layer_backward_cpu", [&] {
    layer_backward<scalar_t>(
        s, data_or_null<scalar_t>(dy), data_or_null<scalar_t>(dh_n), data_or_null<scalar_t>(dc_n),
        x.data_ptr<scalar_t>(), h0c.data_ptr<scalar_t>(), c0c.data_ptr<scalar_t>(),
        w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        gates_c.data_ptr<scalar_t>(), cells_c.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(), grad_c0.data_ptr<scalar_t>(), grad_w_ih.data_ptr<scalar_t>(),
        grad_w_hh.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
        dgates.data_ptr<scalar_t>(), scratch.data_ptr<scalar_t>());
  });
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias};
}

// The cell's own argument checks: input [B, I], hx, cx [B, H].
LayerSizes check_cell_inputs(const char* op, const Tensor& input, const Tensor& hx,
                             const Tensor& cx, const Tensor& weight_ih, const Tensor& weight_hh,
                             const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh) {
  LayerSizes s = check_weights(op, weight_ih, weight_hh, bias_ih, bias_hh);
  check_rank(op, input, "input", "[B, input_size]", 2);
  s.T = 1;
  s.B = input.size(0);
  check_shape(op, input, "input", "[B, I]", {s.B, s.I});
  check_shape(op, hx, "hx", "[B, H]", {s.B, s.H});
  check_shape(op, cx, "cx", "[B, H]", {s.B, s.H});
  check_same_dtype_device(op, weight_ih, "weight_ih", input, "input");
  check_same_dtype_device(op, weight_ih, "weight_ih", hx, "hx");
  check_same_dtype_device(op, weight_ih, "weight_ih", cx, "cx");
  check_fits_int(op, "B*4*H", s.B * 4 * s.H);
  check_fits_int(op, "input_size", s.I);
  return s;
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_cpu(const Tensor& input, const Tensor& hx,
                                                         const Tensor& cx, const Tensor& weight_ih,
                                                         const Tensor& weight_hh,
                                                         const optional<Tensor>& bias_ih,
                                                         const optional<Tensor>& bias_hh) {
  constexpr const char* op = "lstm_ext::lstm_cell_forward";
  const LayerSizes s = check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const Tensor x = input.contiguous(), hxc = hx.contiguous(), cxc = cx.contiguous();
  const Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  const Tensor bias = combined_bias(bias_ih, bias_hh);
  const auto opts = x.options();
  Tensor hy = at::empty({s.B, s.H}, opts);
  Tensor h_n = at::empty({s.B, s.H}, opts);
  Tensor cy = at::empty({s.B, s.H}, opts);
  Tensor gates = at::empty({s.B, 4 * s.H}, opts);
  Tensor scratch = at::empty({s.B, 4 * s.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cell_forward_cpu", [&] {
    // One step of the layer kernel; with no saved cells it writes c_t straight into cy.
    layer_forward<scalar_t>(s, x.data_ptr<scalar_t>(), hxc.data_ptr<scalar_t>(),
                            cxc.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
                            w_hh.data_ptr<scalar_t>(),
                            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                            hy.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
                            cy.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), nullptr,
                            scratch.data_ptr<scalar_t>());
  });
  return {hy, cy, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_cpu(
    const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
    const Tensor& weight_ih, const Tensor& weight_hh) {
  constexpr const char* op = "lstm_ext::lstm_cell_backward";
  const LayerSizes s =
      check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, c10::nullopt, c10::nullopt);
  check_shape(op, cy, "cy", "[B, H]", {s.B, s.H});
  check_shape(op, gates, "gates", "[B, 4*H] (saved by lstm_cell_forward)", {s.B, 4 * s.H});
  check_same_dtype_device(op, weight_ih, "weight_ih", cy, "cy");
  check_same_dtype_device(op, weight_ih, "weight_ih", gates, "gates");
  check_optional_grad(op, grad_hy, "grad_hy", "[B, H]", {s.B, s.H}, weight_ih);
  check_optional_grad(op, grad_cy, "grad_cy", "[B, H]", {s.B, s.H}, weight_ih);

  const auto dhy = contiguous_or_none(grad_hy), dcy = contiguous_or_none(grad_cy);
  const Tensor x = input.contiguous(), hxc = hx.contiguous(), cxc = cx.contiguous();
  const Tensor w_ih = weight_ih.contiguous(), w_hh = weight_hh.contiguous();
  const Tensor cy_c = cy.contiguous(), gates_c = gates.contiguous();
  const auto opts = x.options();
  Tensor grad_input = at::empty({s.B, s.I}, opts);
  Tensor grad_hx = at::empty({s.B, s.H}, opts);
  Tensor grad_cx = at::empty({s.B, s.H}, opts);
  Tensor grad_w_ih = at::empty({4 * s.H, s.I}, opts);
  Tensor grad_w_hh = at::empty({4 * s.H, s.H}, opts);
  Tensor grad_bias = at::empty({4 * s.H}, opts);
  Tensor dgates = at::empty({s.B, 4 * s.H}, opts);
  Tensor scratch = at::empty({s.B, s.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cell_backward_cpu", [&] {
    // One step of the layer backward: grad_hy is that step's output gradient, grad_cy its dc.
    layer_backward<scalar_t>(
        s, data_or_null<scalar_t>(dhy), nullptr, data_or_null<scalar_t>(dcy),
        x.data_ptr<scalar_t>(), hxc.data_ptr<scalar_t>(), cxc.data_ptr<scalar_t>(),
        w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), nullptr, gates_c.data_ptr<scalar_t>(),
        cy_c.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), grad_hx.data_ptr<scalar_t>(),
        grad_cx.data_ptr<scalar_t>(), grad_w_ih.data_ptr<scalar_t>(),
        grad_w_hh.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
        dgates.data_ptr<scalar_t>(), scratch.data_ptr<scalar_t>());
  });
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace

bool has_direct_blas_impl() { return has_direct_blas(); }
bool has_vml_impl() { return has_vml(); }

}  // namespace cpu
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_ext::cpu::lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_ext::cpu::lstm_layer_backward_cpu);
  m.impl("lstm_cell_forward", &lstm_ext::cpu::lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_ext::cpu::lstm_cell_backward_cpu);
}
