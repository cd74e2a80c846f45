// One step's gate pass of the CUDA kernels, per hidden unit: what each thread of the gate kernels
// (lstm_cuda.cu) computes, as plain host/device functions so that the host loop (layer_host.h) can
// also run on the CPU in a test (tests/cuda_host_check.cpp) with these same functions.
//
// S is the storage dtype (float, double, at::Half, at::BFloat16), C the compute dtype
// (at::opmath_type<S>: float for the 16-bit ones). Gates and cell states are kept in C, as the
// CPU kernels keep them (csrc/cpu/mixed_gemm.h); what a GEMM reads next (h, the gate gradients) is S.
#pragma once

#include <cstdint>

#include "../lstm_math.h"

namespace lstm_ext {
namespace cuda {

// One step of n rows, hidden units j < H. All pointers point at the step's first row.
template <typename S, typename C>
struct GatesForward {
  int64_t n, H;
  C* z;           // [n, 4H] in: x W_ih^T; out: the activated gates i, f, g, o
  const C* zh;    // [n, 4H] h_{t-1} W_hh^T
  const C* bias;  // [4H] bias_ih + bias_hh (zeros without biases)
  C* c;           // [n, H] in: c_{t-1}; out: c_t (the running state)
  C* cells;       // [n, H] out: c_t kept for the backward, or null
  S* r;           // [n, H] out: o ⊙ tanh(c_t) (the step's output rows without a projection)
};

template <typename S, typename C>
LSTM_EXT_HOST_DEVICE void gates_forward_unit(const GatesForward<S, C>& a, int64_t b, int64_t j) {
  const int64_t H = a.H, u = b * H + j;
  C* z = a.z + b * 4 * H;
  const C* zh = a.zh + b * 4 * H;
  C zi = z[j] + zh[j] + a.bias[j];
  C zf = z[H + j] + zh[H + j] + a.bias[H + j];
  C zg = z[2 * H + j] + zh[2 * H + j] + a.bias[2 * H + j];
  C zo = z[3 * H + j] + zh[3 * H + j] + a.bias[3 * H + j];
  C h;
  const C c_t = cell_forward(zi, zf, zg, zo, a.c[u], &h);  // zi.. become the activated gates
  z[j] = zi;
  z[H + j] = zf;
  z[2 * H + j] = zg;
  z[3 * H + j] = zo;
  a.c[u] = c_t;
  if (a.cells != nullptr) {
    a.cells[u] = c_t;
  }
  a.r[u] = static_cast<S>(h);
}

// One step of n rows in the backward. Rows b < n_prev continued the step processed before this
// one in the forward (their c_{t-1} is in c_prev_rows); the others started from c0_rows.
template <typename S, typename C>
struct GatesBackward {
  int64_t n, n_prev, H;
  const C* gates;        // [n, 4H] activated gates
  const C* cells;        // [n, H] c_t
  const C* c_prev_rows;  // [n_prev, H] c_{t-1} of the continuing rows
  const S* c0_rows;      // [n, H] c0 (read for rows b >= n_prev)
  const C* dh;           // [n, H] dL/d(o ⊙ tanh c_t) from the later steps (or through W_hr)
  const S* dy;           // [n, H] the output's gradient at this step, added to dh; or null
  C* dc;                 // [n, H] in: dL/dc_t; out: dL/dc_{t-1}
  S* dgates;             // [n, 4H] out: gradients of the pre-activations
  S* r;                  // [n, H] out: o ⊙ tanh(c_t) (for dW_hr), or null
};

template <typename S, typename C>
LSTM_EXT_HOST_DEVICE void gates_backward_unit(const GatesBackward<S, C>& a, int64_t b,
                                              int64_t j) {
  const int64_t H = a.H, u = b * H + j;
  const C* g = a.gates + b * 4 * H;
  S* d = a.dgates + b * 4 * H;
  const C c_prev = b < a.n_prev ? a.c_prev_rows[u] : static_cast<C>(a.c0_rows[u]);
  const C tanh_c = tanh_of(a.cells[u]);
  const C dr = a.dy != nullptr ? a.dh[u] + static_cast<C>(a.dy[u]) : a.dh[u];
  C d_i, d_f, d_g, d_o;
  a.dc[u] = cell_backward(g[j], g[H + j], g[2 * H + j], g[3 * H + j], c_prev, tanh_c, dr, a.dc[u],
                          &d_i, &d_f, &d_g, &d_o);
  d[j] = static_cast<S>(d_i);
  d[H + j] = static_cast<S>(d_f);
  d[2 * H + j] = static_cast<S>(d_g);
  d[3 * H + j] = static_cast<S>(d_o);
  if (a.r != nullptr) {
    a.r[u] = static_cast<S>(g[3 * H + j] * tanh_c);
  }
}

}  // namespace cuda
}  // namespace lstm_ext
