// CUDA kernels of the lstm_ext ops (schemas in csrc/lstm.cpp), built only when CUDA is available.
//
// Same algorithm and row layout as the CPU kernels (csrc/cpu/lstm_cpu.cpp, csrc/lstm_steps.h): the
// input projection and the weight gradients are single cuBLAS GEMMs over all rows (through ATen,
// on the current stream); per step, one cuBLAS GEMM for the recurrence (and one for the
// projection), then one fused gate kernel over the step's rows. The time loop runs on the host;
// batch_sizes (a CPU tensor, as in PackedSequence) is read there.
//
// Not yet here: a persistent kernel that runs all steps of a small layer in one launch with W_hh
// in shared memory (per-step launches dominate at small sizes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../lstm_checks.h"
#include "../lstm_math.h"
#include "../lstm_steps.h"

namespace lstm_ext {
namespace cuda {
namespace {

using at::Tensor;
using c10::optional;

constexpr int kThreads = 256;

int64_t blocks_for(int64_t units) { return (units + kThreads - 1) / kThreads; }

// One thread per unit (row b, hidden unit j) of n rows.
//   z [n, 4H] in: x W_ih^T + h W_hh^T; out: activated gates i, f, g, o
//   bias [4H]; c [n, H] in: c_{t-1}, out: c_t; cells [n, H] out: c_t, or null; r [n, H] out:
//   o ⊙ tanh(c_t)
template <typename T>
__global__ void gates_forward_kernel(int64_t n, int64_t H, T* __restrict__ z,
                                     const T* __restrict__ bias, T* __restrict__ c,
                                     T* __restrict__ cells, T* __restrict__ r) {
  const int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (u >= n * H) {
    return;
  }
  const int64_t b = u / H, j = u % H;
  T* a = z + b * 4 * H;
  T zi = a[j] + bias[j];
  T zf = a[H + j] + bias[H + j];
  T zg = a[2 * H + j] + bias[2 * H + j];
  T zo = a[3 * H + j] + bias[3 * H + j];
  T h;
  const T c_t = cell_forward(zi, zf, zg, zo, c[u], &h);  // zi.. become the activated gates
  a[j] = zi;
  a[H + j] = zf;
  a[2 * H + j] = zg;
  a[3 * H + j] = zo;
  c[u] = c_t;
  if (cells != nullptr) {
    cells[u] = c_t;
  }
  r[u] = h;
}

// One thread per unit of n rows.
//   gates [n, 4H] activated; cells [n, H] c_t; c_prev: rows b < n_prev from c_prev_rows, the
//   others from c0_rows; dr [n, H] dL/d(o ⊙ tanh c_t); dc [n, H] in: dL/dc_t, out: dL/dc_{t-1};
//   dgates [n, 4H] out; r [n, H] out: o ⊙ tanh(c_t), or null
template <typename T>
__global__ void gates_backward_kernel(int64_t n, int64_t H, const T* __restrict__ gates,
                                      const T* __restrict__ cells,
                                      const T* __restrict__ c_prev_rows,
                                      const T* __restrict__ c0_rows, int64_t n_prev,
                                      const T* __restrict__ dr, T* __restrict__ dc,
                                      T* __restrict__ dgates, T* __restrict__ r) {
  const int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (u >= n * H) {
    return;
  }
  const int64_t b = u / H, j = u % H;
  const T* a = gates + b * 4 * H;
  T* d = dgates + b * 4 * H;
  const T c_prev = b < n_prev ? c_prev_rows[u] : c0_rows[u];
  const T tanh_c = tanh_of(cells[u]);
  dc[u] = cell_backward(a[j], a[H + j], a[2 * H + j], a[3 * H + j], c_prev, tanh_c, dr[u], dc[u],
                        &d[j], &d[H + j], &d[2 * H + j], &d[3 * H + j]);
  if (r != nullptr) {
    r[u] = a[3 * H + j] * tanh_c;
  }
}

Tensor combined_bias(const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
                     const Tensor& weight_hh) {
  return bias_ih.has_value() ? (*bias_ih + *bias_hh).contiguous()
                             : at::zeros({weight_hh.size(0)}, weight_hh.options());
}

// A layer's forward after its arguments are checked. x [N, I]; returns output [N, P], h_n, c_n,
// gates [N, 4H] and, with keep_state, cells [N, H].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const LayerSizes& s, const Steps& steps, bool reverse, const Tensor& x, const Tensor& h0,
    const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
    const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, bool keep_state) {
  const int64_t H = s.H, G = 4 * s.H;
  const auto opts = x.options();
  Tensor y = at::empty({s.N, s.P}, opts);
  Tensor gates = at::empty({s.N, G}, opts);
  Tensor cells = keep_state ? at::empty({s.N, H}, opts) : Tensor();
  Tensor h_state = h0.contiguous().clone();  // running states; at the end h_n, c_n
  Tensor c_state = c0.contiguous().clone();
  const Tensor bias = combined_bias(bias_ih, bias_hh, weight_hh);
  const Tensor w_hh_t = weight_hh.t();
  const bool proj = weight_hr.has_value();
  const Tensor w_hr_t = proj ? weight_hr->t() : Tensor();
  Tensor r_buffer = proj ? at::empty({s.B, H}, opts) : Tensor();
  at::mm_out(gates, x, weight_ih.t());  // input projection of all steps at once
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = Steps::time_of(k, s.T, reverse);
    const int64_t n = steps.batch[t], row = steps.offset[t];
    if (n == 0 || H == 0) {
      continue;
    }
    Tensor gates_t = gates.narrow(0, row, n);
    Tensor y_t = y.narrow(0, row, n);
    gates_t.addmm_(h_state.narrow(0, 0, n), w_hh_t);
    Tensor r_t = proj ? r_buffer.narrow(0, 0, n) : y_t;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_gates_forward_cuda", [&] {
      gates_forward_kernel<scalar_t><<<blocks_for(n * H), kThreads, 0, stream>>>(
          n, H, gates_t.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
          c_state.data_ptr<scalar_t>(),
          keep_state ? cells.data_ptr<scalar_t>() + row * H : nullptr, r_t.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (proj) {
      at::mm_out(y_t, r_t, w_hr_t);  // h_t = r_t W_hr^T
    }
    h_state.narrow(0, 0, n).copy_(y_t);
  }
  return {y, h_state, c_state, gates, cells};
}

// A layer's backward after its arguments are checked. dy [N, P] or undefined; x [N, I];
// y [N, P] (read only where a step continues the previous one); gates [N, 4H]; cells [N, H].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const LayerSizes& s, const Steps& steps, bool reverse, const Tensor& dy,
    const optional<Tensor>& grad_h_n, const optional<Tensor>& grad_c_n, const Tensor& x,
    const Tensor& h0, const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
    const optional<Tensor>& weight_hr, const Tensor& y, const Tensor& gates,
    const Tensor& cells, bool need_grad_input) {
  const int64_t H = s.H, G = 4 * s.H;
  const auto opts = x.options();
  const bool proj = weight_hr.has_value();
  Tensor dgates = at::empty({s.N, G}, opts);
  Tensor h_prev = at::empty({s.N, s.P}, opts);  // the h each step read, for dW_hh
  Tensor dh_state = grad_h_n.has_value() && grad_h_n->defined()
                        ? grad_h_n->contiguous().clone()
                        : at::zeros({s.B, s.P}, opts);
  Tensor dc_state = grad_c_n.has_value() && grad_c_n->defined()
                        ? grad_c_n->contiguous().clone()
                        : at::zeros({s.B, H}, opts);
  Tensor dh_all = proj ? at::empty({s.N, s.P}, opts) : Tensor();
  Tensor r_all = proj ? at::empty({s.N, H}, opts) : Tensor();
  Tensor dr_buffer = proj ? at::empty({s.B, H}, opts) : Tensor();
  const Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = Steps::time_of(k, s.T, reverse);
    const int64_t n = steps.batch[t], row = steps.offset[t];
    if (n == 0) {
      continue;
    }
    // The step processed before this one in the forward: its first n_prev rows carried h and c
    // into this step; the other rows started from h0 / c0.
    int64_t n_prev = 0, prev_row = 0;
    if (k > 0) {
      const int64_t t_prev = Steps::time_of(k - 1, s.T, reverse);
      n_prev = std::min(steps.batch[t_prev], n);
      prev_row = steps.offset[t_prev];
    }
    if (n_prev > 0) {
      h_prev.narrow(0, row, n_prev).copy_(y.narrow(0, prev_row, n_prev));
    }
    if (n > n_prev) {
      h_prev.narrow(0, row + n_prev, n - n_prev).copy_(h0c.narrow(0, n_prev, n - n_prev));
    }
    Tensor dh_rows = dh_state.narrow(0, 0, n);
    if (dy.defined()) {
      dh_rows.add_(dy.narrow(0, row, n));
    }
    Tensor dr = dh_rows;
    if (proj) {
      dh_all.narrow(0, row, n).copy_(dh_rows);
      dr = dr_buffer.narrow(0, 0, n);
      at::mm_out(dr, dh_rows, *weight_hr);  // dh W_hr
    }
    Tensor dgates_t = dgates.narrow(0, row, n);
    if (H > 0) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_gates_backward_cuda", [&] {
        gates_backward_kernel<scalar_t><<<blocks_for(n * H), kThreads, 0, stream>>>(
            n, H, gates.data_ptr<scalar_t>() + row * G, cells.data_ptr<scalar_t>() + row * H,
            cells.data_ptr<scalar_t>() + prev_row * H, c0c.data_ptr<scalar_t>(), n_prev,
            dr.data_ptr<scalar_t>(), dc_state.data_ptr<scalar_t>(), dgates_t.data_ptr<scalar_t>(),
            proj ? r_all.data_ptr<scalar_t>() + row * H : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    at::mm_out(dh_rows, dgates_t, weight_hh);  // dL/dh of the state this step read
  }
  Tensor grad_input = need_grad_input ? at::mm(dgates, weight_ih) : at::empty({0, s.I}, opts);
  Tensor grad_w_ih = at::mm(dgates.t(), x);
  Tensor grad_w_hh = at::mm(dgates.t(), h_prev);
  Tensor grad_w_hr = proj ? at::mm(dh_all.t(), r_all) : at::empty({0, H}, opts);
  Tensor grad_bias = dgates.sum(0);
  return {grad_input, dh_state, dc_state, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cuda(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    bool keep_state) {
  constexpr const char* op = "lstm_ext::lstm_layer_forward";
  const LayerSizes s = check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, bias_ih,
                                          bias_hh, weight_hr, batch_sizes);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool packed = batch_sizes.has_value();
  const Steps steps(s, batch_sizes);
  auto [y, h_n, c_n, gates, cells] =
      layer_forward(s, steps, reverse, input.contiguous().view({s.N, s.I}), h0, c0, weight_ih,
                    weight_hh, bias_ih, bias_hh, weight_hr, keep_state);
  std::vector<int64_t> gates_shape = per_step_shape(s, packed, 4 * s.H);
  std::vector<int64_t> cells_shape = per_step_shape(s, packed, s.H);
  if (!keep_state) {  // nothing kept for a backward: both come back with no rows
    gates_shape[0] = 0;
    cells_shape[0] = 0;
    gates = at::empty(gates_shape, input.options());
    cells = at::empty(cells_shape, input.options());
  }
  return {y.view(per_step_shape(s, packed, s.P)), h_n, c_n, gates.view(gates_shape),
          cells.view(cells_shape)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cuda(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input) {
  constexpr const char* op = "lstm_ext::lstm_layer_backward";
  const LayerSizes s = check_layer_backward_inputs(op, grad_output, grad_h_n, grad_c_n, input, h0,
                                                   c0, weight_ih, weight_hh, weight_hr,
                                                   batch_sizes, output, gates, cells);
  const c10::cuda::CUDAGuard guard(input.device());
  const Steps steps(s, batch_sizes);
  const Tensor dy = grad_output.has_value() && grad_output->defined()
                        ? grad_output->contiguous().view({s.N, s.P})
                        : Tensor();
  auto grads = layer_backward(
      s, steps, reverse, dy, grad_h_n, grad_c_n, input.contiguous().view({s.N, s.I}), h0, c0,
      weight_ih, weight_hh, weight_hr, output.contiguous().view({s.N, s.P}),
      gates.contiguous().view({s.N, 4 * s.H}), cells.contiguous().view({s.N, s.H}),
      need_grad_input);
  std::get<0>(grads) = std::get<0>(grads).view(rows_or_none(input.sizes(), need_grad_input));
  return grads;
}


std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_cuda(const Tensor& input, const Tensor& hx,
                                                          const Tensor& cx,
                                                          const Tensor& weight_ih,
                                                          const Tensor& weight_hh,
                                                          const optional<Tensor>& bias_ih,
                                                          const optional<Tensor>& bias_hh) {
  constexpr const char* op = "lstm_ext::lstm_cell_forward";
  const LayerSizes s = check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const c10::cuda::CUDAGuard guard(input.device());
  auto [y, h_n, c_n, gates, cells] =
      layer_forward(s, Steps(s, c10::nullopt), false, input.contiguous(), hx, cx, weight_ih,
                    weight_hh, bias_ih, bias_hh, c10::nullopt, false);
  return {y, c_n, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_cuda(
    const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
    const Tensor& weight_ih, const Tensor& weight_hh, bool need_grad_input) {
  constexpr const char* op = "lstm_ext::lstm_cell_backward";
  const LayerSizes s = check_cell_backward_inputs(op, grad_hy, grad_cy, input, hx, cx, cy, gates,
                                                  weight_ih, weight_hh);
  const c10::cuda::CUDAGuard guard(input.device());
  // One step: grad_hy is that step's output gradient and grad_cy its dc; the forward's output is
  // never read (every row's previous h is hx).
  const Tensor dy = grad_hy.has_value() && grad_hy->defined() ? grad_hy->contiguous() : Tensor();
  auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, unused] = layer_backward(
      s, Steps(s, c10::nullopt), false, dy, c10::nullopt, grad_cy, input.contiguous(), hx, cx,
      weight_ih, weight_hh, c10::nullopt, Tensor(), gates.contiguous(), cy.contiguous(),
      need_grad_input);
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_ext::cuda::lstm_layer_forward_cuda);
  m.impl("lstm_layer_backward", &lstm_ext::cuda::lstm_layer_backward_cuda);
  m.impl("lstm_cell_forward", &lstm_ext::cuda::lstm_cell_forward_cuda);
  m.impl("lstm_cell_backward", &lstm_ext::cuda::lstm_cell_backward_cuda);
}
