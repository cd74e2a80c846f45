// The layer-normalised cell's fused passes of one step (forward and backward, over a block of
// rows), the pointwise part of haste's LayerNormLSTM: the equations and the layout of the norms
// rows are in lstm_cpu_layer_norm.cpp (its kernels) and csrc/lstm_layer_norm.h. Shared by the
// float kernels and the int8 inference layer (lstm_cpu_int8.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <utility>

#include "../lstm_layer_norm.h"
#include "../lstm_math.h"
#include "../lstm_steps.h"
#include "vec_math.h"

namespace lstm_ext {
namespace cpu {
// A named namespace rather than an anonymous one: the float32 passes' target clones (GCC makes an
// ifunc of each) want external linkage, which an anonymous namespace's types would deny them.
namespace layer_norm {

// Compiled into each caller, so into each target clone of the passes below.
#define LSTM_EXT_ALWAYS_INLINE __attribute__((always_inline)) inline

LSTM_EXT_ALWAYS_INLINE float sigmoid_act(float x) { return sigmoid_f32(x); }
LSTM_EXT_ALWAYS_INLINE double sigmoid_act(double x) { return sigmoid_of(x); }
LSTM_EXT_ALWAYS_INLINE float tanh_act(float x) { return tanh_f32(x); }
LSTM_EXT_ALWAYS_INLINE double tanh_act(double x) { return tanh_of(x); }

// The sum of term(j) over j in [0, n), in one 64-byte vector of partial sums (GCC vectorises
// this form; it left `omp simd reduction` loops scalar where they were inlined into the passes).
template <typename T, typename F>
LSTM_EXT_ALWAYS_INLINE T lane_sum(int64_t n, const F& term) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += term(j + l);
    }
  }
  T sum = 0;
  for (; j < n; ++j) {
    sum += term(j);
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += lanes[l];
  }
  return sum;
}

// Mean and 1 / sqrt(var + eps) of v [n] (two passes: the variance of the centred values).
template <typename T>
LSTM_EXT_ALWAYS_INLINE std::pair<T, T> moments(int64_t n, const T* __restrict__ v) {
  const T mean = lane_sum<T>(n, [&](int64_t j) { return v[j]; }) / T(n);
  const T squares = lane_sum<T>(n, [&](int64_t j) {
    const T d = v[j] - mean;
    return d * d;
  });
  return {mean, T(1) / std::sqrt(squares / T(n) + T(kLayerNormEps))};
}

// v [n] in place: (v - mean) * rstd; returns rstd.
template <typename T>
LSTM_EXT_ALWAYS_INLINE T normalize(int64_t n, T* __restrict__ v) {
  const auto [mean, rstd] = moments(n, v);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    v[j] = (v[j] - mean) * rstd;
  }
  return rstd;
}

// The backward of v̂ = normalize(v), for one row: u [n] in: dL/dv̂ (after the gain), out: dL/dv
// = rstd (u - mean(u) - v̂ mean(u ⊙ v̂)).
template <typename T>
LSTM_EXT_ALWAYS_INLINE void normalize_backward(int64_t n, const T* __restrict__ v_hat, T rstd,
                                               T* __restrict__ u) {
  const T mean = lane_sum<T>(n, [&](int64_t j) { return u[j]; }) / T(n);
  const T mean_dot = lane_sum<T>(n, [&](int64_t j) { return u[j] * v_hat[j]; }) / T(n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    u[j] = rstd * (u[j] - mean - v_hat[j] * mean_dot);
  }
}

// The layer's normalisation parameters, as raw pointers.
template <typename T>
struct LayerNormParams {
  const T* gain_ih;  // [4H]
  const T* gain_hh;  // [4H]
  const T* gain_c;   // [H]
  const T* bias_c;   // [H]
};

// The fused pass of one forward step over n rows (the per-row work after h W_hh^T).
//   norms [n, width] in: x W_ih^T where x̂_ih goes, h W_hh^T where x̂_hh goes; out: x̂_ih, x̂_hh
//   and the row's stats (x W_ih^T is normalised here, while the step reads the row anyway, not
//   in a pass over every row before the steps)
//   bias [4H] (b_ih + b_hh, or zeros); gates [n, 4H] out: activated i, f, g, o
//   c [n, H] in: c_{t-1}; out: c_new; r [n, H] out: o ⊙ tanh(LN(c_new) γ_c + β_c)
template <typename T>
LSTM_EXT_ALWAYS_INLINE void ln_gates_forward_body(int64_t n, int64_t H, T* norms,
                                                  const LayerNormParams<T>& ln, const T* bias,
                                                  T* gates, T* c, T* r) {
  const NormsRow layout{H};
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < n; ++b) {
    T* row = norms + b * layout.width();
    T* __restrict__ x_hat = row;
    T* __restrict__ h_hat = row + layout.hh();
    T* stats = row + layout.stats();
    stats[kRstdIh] = normalize(G, x_hat);
    stats[kRstdHh] = normalize(G, h_hat);
    T* __restrict__ a = gates + b * G;
    T* __restrict__ cb = c + b * H;
    const T* __restrict__ g_ih = ln.gain_ih;
    const T* __restrict__ g_hh = ln.gain_hh;
#pragma omp simd
    for (int64_t k = 0; k < G; ++k) {
      a[k] = x_hat[k] * g_ih[k] + h_hat[k] * g_hh[k] + bias[k];
    }
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T i = sigmoid_act(a[j]);
      const T f = sigmoid_act(a[H + j]);
      const T g = tanh_act(a[2 * H + j]);
      const T o = sigmoid_act(a[3 * H + j]);
      a[j] = i;
      a[H + j] = f;
      a[2 * H + j] = g;
      a[3 * H + j] = o;
      cb[j] = next_cell(i, f, g, cb[j]);
    }
    const auto [mean_c, rstd_c] = moments(H, cb);
    stats[kMeanC] = mean_c;
    stats[kRstdC] = rstd_c;
    T* __restrict__ rb = r + b * H;
    const T* __restrict__ g_c = ln.gain_c;
    const T* __restrict__ b_c = ln.bias_c;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      rb[j] = a[3 * H + j] * tanh_act((cb[j] - mean_c) * rstd_c * g_c[j] + b_c[j]);
    }
  }
}

// Per batch slice, the sums that become the bias and normalisation gains' gradients:
// [db (4H) | dγ_ih (4H) | dγ_hh (4H) | dγ_c (H) | dβ_c (H)].
inline int64_t sums_width(int64_t H) { return 14 * H; }

// The fused pass of one backward step over n rows.
//   gates [n, 4H], c_new [n, H] (the unmixed c_t), norms [n, width] as the forward left them;
//   c_prev: rows b < n_prev from c_prev_rows, else c0_rows (state_read's rule, with restarts)
//   dr [n, H] dL/d(o ⊙ tanh(...)); dc [n, H] in: dL/dc_new, out: dL/dc_{t-1} (through f)
//   d_ih, d_hh [n, 4H] out: dL/d(x W_ih^T), dL/d(h W_hh^T) (d_ih's row first holds scratch)
//   sums [sums_width(H)] in/out: this slice's sums; r [n, H] out: o ⊙ tanh(...) (for dW_hr), or
//   null
template <typename T>
LSTM_EXT_ALWAYS_INLINE void ln_gates_backward_body(int64_t n, int64_t H, const T* gates,
                                                   const T* c_new, const T* norms,
                                                   const T* c_prev_rows, const T* c0_rows,
                                                   int64_t n_prev, const uint8_t* restarts,
                                                   const LayerNormParams<T>& ln, const T* dr,
                                                   T* dc, T* d_ih, T* d_hh, T* sums, T* r) {
  const NormsRow layout{H};
  const int64_t G = 4 * H;
  T* __restrict__ db = sums;
  T* __restrict__ dg_ih = sums + G;
  T* __restrict__ dg_hh = sums + 2 * G;
  T* __restrict__ dg_c = sums + 3 * G;
  T* __restrict__ db_c = sums + 3 * G + H;
  const T* __restrict__ g_ih = ln.gain_ih;
  const T* __restrict__ g_hh = ln.gain_hh;
  const T* __restrict__ g_c = ln.gain_c;
  const T* __restrict__ b_c = ln.bias_c;
  for (int64_t b = 0; b < n; ++b) {
    const T* __restrict__ a = gates + b * G;
    const T* __restrict__ cb = c_new + b * H;
    const T* row = norms + b * layout.width();
    const T* __restrict__ x_hat = row;
    const T* __restrict__ h_hat = row + layout.hh();
    const T* stats = row + layout.stats();
    const T mean_c = stats[kMeanC], rstd_c = stats[kRstdC];
    const T* __restrict__ cp = state_read(b, n_prev, restarts, c_prev_rows, c0_rows, H);
    const T* __restrict__ drb = dr + b * H;
    T* __restrict__ dcb = dc + b * H;
    T* __restrict__ dz = d_hh + b * G;  // first dL/dz, then dL/d(h W_hh^T) in place
    // scratch [3H] in d_ih's row until it is written: dL/d(LN(c_new)) (after the gain), LN(c_new)
    // itself, and tanh(LN(c_new) γ_c + β_c)
    T* __restrict__ u = d_ih + b * G;
    T* __restrict__ c_hat = u + H;
    T* __restrict__ tn = u + 2 * H;
    // Through h = o ⊙ tanh(n), n = ĉ γ_c + β_c: dL/do (kept in dz's o block for now) and dL/dn.
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      c_hat[j] = (cb[j] - mean_c) * rstd_c;
      tn[j] = tanh_act(c_hat[j] * g_c[j] + b_c[j]);
      const T o = a[3 * H + j];
      const T dn = drb[j] * o * (T(1) - tn[j] * tn[j]);
      dz[3 * H + j] = drb[j] * tn[j] * o * (T(1) - o);
      dg_c[j] += dn * c_hat[j];
      db_c[j] += dn;
      u[j] = dn * g_c[j];
    }
    if (r) {
      for (int64_t j = 0; j < H; ++j) {
        r[b * H + j] = a[3 * H + j] * tn[j];
      }
    }
    const T mean_u = lane_sum<T>(H, [&](int64_t j) { return u[j]; }) / T(H);
    const T mean_dot = lane_sum<T>(H, [&](int64_t j) { return u[j] * c_hat[j]; }) / T(H);
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const T dc_total = dcb[j] + rstd_c * (u[j] - mean_u - c_hat[j] * mean_dot);
      const T i = a[j], f = a[H + j], g = a[2 * H + j];
      dz[j] = dc_total * g * i * (T(1) - i);
      dz[H + j] = dc_total * cp[j] * f * (T(1) - f);
      dz[2 * H + j] = dc_total * i * (T(1) - g * g);
      dcb[j] = dc_total * f;
    }
    // z = x̂_ih γ_ih + x̂_hh γ_hh + b: the sums, then each product's normalisation backward.
    T* __restrict__ dx = d_ih + b * G;
#pragma omp simd
    for (int64_t k = 0; k < G; ++k) {
      db[k] += dz[k];
      dg_ih[k] += dz[k] * x_hat[k];
      dg_hh[k] += dz[k] * h_hat[k];
      dx[k] = dz[k] * g_ih[k];
      dz[k] *= g_hh[k];
    }
    normalize_backward(G, x_hat, stats[kRstdIh], dx);
    normalize_backward(G, h_hat, stats[kRstdHh], dz);
  }
}

// The passes as the loops call them: float32 in the variant of the running instruction set
// (LSTM_EXT_ISA_VARIANTS, csrc/cpu/vec_math.h), float64 as compiled.
template <int Bytes, typename T>
LSTM_EXT_ALWAYS_INLINE void ln_gates_forward_variant(int64_t n, int64_t H, T* norms,
                                                     const LayerNormParams<T>& ln, const T* bias,
                                                     T* gates, T* c, T* r) {
  ln_gates_forward_body(n, H, norms, ln, bias, gates, c, r);
}
template <int Bytes, typename T>
LSTM_EXT_ALWAYS_INLINE void ln_gates_backward_variant(
    int64_t n, int64_t H, const T* gates, const T* c_new, const T* norms, const T* c_prev_rows,
    const T* c0_rows, int64_t n_prev, const uint8_t* restarts, const LayerNormParams<T>& ln,
    const T* dr, T* dc, T* d_ih, T* d_hh, T* sums, T* r) {
  ln_gates_backward_body(n, H, gates, c_new, norms, c_prev_rows, c0_rows, n_prev, restarts, ln,
                         dr, dc, d_ih, d_hh, sums, r);
}
LSTM_EXT_ISA_VARIANTS(ln_gates_forward,
                      (int64_t n, int64_t H, float* norms, const LayerNormParams<float>& ln,
                       const float* bias, float* gates, float* c, float* r),
                      (n, H, norms, ln, bias, gates, c, r), ln_gates_forward_variant)
LSTM_EXT_ISA_VARIANTS(ln_gates_backward,
                      (int64_t n, int64_t H, const float* gates, const float* c_new,
                       const float* norms, const float* c_prev_rows, const float* c0_rows,
                       int64_t n_prev, const uint8_t* restarts, const LayerNormParams<float>& ln,
                       const float* dr, float* dc, float* d_ih, float* d_hh, float* sums,
                       float* r),
                      (n, H, gates, c_new, norms, c_prev_rows, c0_rows, n_prev, restarts, ln, dr,
                       dc, d_ih, d_hh, sums, r),
                      ln_gates_backward_variant)
inline void ln_gates_forward(int64_t n, int64_t H, double* norms,
                             const LayerNormParams<double>& ln, const double* bias,
                             double* gates, double* c, double* r) {
  ln_gates_forward_body(n, H, norms, ln, bias, gates, c, r);
}
inline void ln_gates_backward(int64_t n, int64_t H, const double* gates, const double* c_new,
                              const double* norms, const double* c_prev_rows,
                              const double* c0_rows, int64_t n_prev, const uint8_t* restarts,
                              const LayerNormParams<double>& ln, const double* dr, double* dc,
                              double* d_ih, double* d_hh, double* sums, double* r) {
  ln_gates_backward_body(n, H, gates, c_new, norms, c_prev_rows, c0_rows, n_prev, restarts, ln,
                         dr, dc, d_ih, d_hh, sums, r);
}

}  // namespace layer_norm
}  // namespace cpu
}  // namespace lstm_ext
