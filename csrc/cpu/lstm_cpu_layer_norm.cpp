// CPU kernels of the layer-normalised LSTM layer (lstm_ext::ln_lstm_layer_forward / _backward;
// schemas in csrc/ops.cpp), haste's LayerNormLSTM with nn.LSTM's weights:
//   z   = LN(x_t W_ih^T) ⊙ γ_ih + LN(h_{t-1} W_hh^T) ⊙ γ_hh + b_ih + b_hh       γ_ih, γ_hh [4H]
//   c_t = f ⊙ c_{t-1} + i ⊙ g;   h_t = o ⊙ tanh(LN(c_t) ⊙ γ_c + β_c)          γ_c, β_c [H]
// LN(v) = (v - mean(v)) / sqrt(var(v) + eps) over a row's values (biased variance); the equations
// are spelled out in lstm_ext/reference.py. Reset, zoneout and recurrent dropout work as in the
// plain kernels (csrc/lstm_steps.h, csrc/lstm_regularize.h): zoneout mixes the unnormalised c_t,
// and LN(c_new) feeds h_new.
//
// The loop is the plain kernel's (layer_forward.h, layer_backward.h), simpler: the input projection of every step is
// one GEMM and is normalised before the steps; each step runs one GEMM for h W_hh^T into its own
// buffer (the two products are normalised apart, so they cannot share one), then one fused pass
// per row: normalise the recurrent product, the gates, c_t, normalise c_t, h_t. Threads split
// the batch. The backward runs the three normalisations' backward inside the step's fused pass
// and ends with single GEMMs for dx, dW_ih (from the normalised product's gradient), dW_hh,
// dW_hr.
//
// What the forward keeps for the backward, besides gates (activated) and cells (c_t, mixed by
// zoneout where on): norms [rows, 8H + 16]: per row the normalised products x̂_ih = LN(x W_ih^T)
// and x̂_hh = LN(h W_hh^T) (4H each, before their gains), then rstd_ih, rstd_hh (1 / sqrt(var +
// eps) of each product), mean_c and rstd_c (of c_new, the unmixed c_t), padded to 16 values so
// that each row's products start 64-byte aligned (they are the per-step GEMM's output).
//
// float32 and float64 compute in their own type; bfloat16 and float16 layers are computed in
// float32 (inputs and weights converted once per call, gates, c and the normalisations in
// float32 as the 16-bit plain kernels keep them), with h rounded to the layer's dtype at every
// step, as the state a 16-bit LSTM carries. Their GEMMs run in float32, not on AMX.
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
#include "mixed_gemm.h"
#include "vec_math.h"

namespace lstm_ext {
namespace cpu {
// A named namespace rather than an anonymous one: the float32 passes' target clones (GCC makes an
// ifunc of each) want external linkage, which an anonymous namespace's types would deny them.
namespace layer_norm {

using at::Tensor;
using c10::optional;

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
LSTM_EXT_ALWAYS_INLINE void normalize_backward(int64_t n, const T* __restrict__ v_hat, T rstd, T* __restrict__ u) {
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
LSTM_EXT_ALWAYS_INLINE void ln_gates_forward_body(int64_t n, int64_t H, T* norms, const LayerNormParams<T>& ln,
                      const T* bias, T* gates, T* c, T* r) {
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
LSTM_EXT_ALWAYS_INLINE void ln_gates_backward_body(int64_t n, int64_t H, const T* gates, const T* c_new, const T* norms,
                       const T* c_prev_rows, const T* c0_rows, int64_t n_prev,
                       const uint8_t* restarts, const LayerNormParams<T>& ln, const T* dr, T* dc,
                       T* d_ih, T* d_hh, T* sums, T* r) {
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
// Rounds n values of h in place through the layer's 16-bit dtype (a no-op for float32/float64
// layers: round is null): the state a 16-bit LSTM carries from step to step.
template <typename S>
void round_through(int64_t n, float* v) {
  for (int64_t u = 0; u < n; ++u) {
    v[u] = static_cast<float>(static_cast<S>(v[u]));
  }
}

// Forward of one layer over all steps.
//   x [rows, I]; h0 [B, P], c0 [B, H]; w_ih [4H, I]; w_hh_t [P, 4H]; bias [4H]; w_hr_t [H, P] or
//   null; ln: the normalisation parameters; y [rows, P]; h_n [B, P], c_n [B, H] (the running
//   states); gates [rows, 4H] (keep: all rows) or [B, 4H] scratch; cells [rows, H] or null;
//   norms [rows, width]; r_scratch [B, H] (with w_hr); zoneout, recurrent_mask [B, P] or null,
//   fed_scratch [B, P] (with recurrent_mask), c_prev_scratch [B, H] (zoneout of c), as the
//   plain kernel's; round: rounds h through a 16-bit dtype (T = float only), or null.
template <typename T>
void ln_layer_forward(const LayerSizes& s, const Steps& steps, bool reverse,
                      const Restarts& restarts, const T* x, const T* h0, const T* c0,
                      const T* w_ih, const T* w_hh_t, const T* bias, const T* w_hr_t,
                      const LayerNormParams<T>& ln, T* y, T* h_n, T* c_n, T* gates,
                      bool gates_all_rows, T* cells, T* norms, T* r_scratch,
                      const Zoneout& zoneout, const T* recurrent_mask, T* fed_scratch,
                      T* c_prev_scratch, void (*round)(int64_t, T*)) {
  const int64_t H = s.H, P = s.P, G = 4 * s.H;
  const NormsRow layout{H};
  const int64_t W = layout.width();
  copy_elements(h_n, h0, s.B * P);
  copy_elements(c_n, c0, s.B * H);
  // Every step's x W_ih^T at once (each step's pass normalises its rows).
  gemm<T>(false, true, s.N, G, s.I, T(1), x, s.I, w_ih, s.I, T(0), norms, W);
  for_each_batch_slice(s, [&](int64_t b0, int64_t b1) {
    T* h_state = h_n + b0 * P;
    T* c_state = c_n + b0 * H;
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = std::min(b1, steps.batch[t]) - b0;
      if (n <= 0) {
        continue;
      }
      const int64_t row = steps.offset[t] + b0;
      T* norms_t = norms + row * W;
      T* gates_t = gates_all_rows ? gates + row * G : gates + b0 * G;
      T* y_t = y + row * P;
      if (const uint8_t* restart = restarts.at(t, b0)) {
        restart_states(restart, n, P, H, h0 + b0 * P, c0 + b0 * H, h_state, c_state);
      }
      const T* h_fed = h_state;
      if (recurrent_mask) {
        mask_rows(n, P, h_state, recurrent_mask + b0 * P, fed_scratch + b0 * P);
        h_fed = fed_scratch + b0 * P;
      }
      gemm<T>(false, false, n, G, P, T(1), h_fed, P, w_hh_t, G, T(0), norms_t + layout.hh(), W);
      T* c_prev = zoneout.on_c() ? c_prev_scratch + b0 * H : nullptr;
      if (c_prev) {
        copy_elements(c_prev, c_state, n * H);
      }
      T* r_t = w_hr_t ? r_scratch + b0 * H : y_t;
      ln_gates_forward(n, H, norms_t, ln, bias, gates_t, c_state, r_t);
      if (c_prev) {
        zoneout_mix(zoneout.c_rows(row, H), zoneout.p_c, n * H, c_prev, c_state);
      }
      if (cells) {
        copy_elements(cells + row * H, c_state, n * H);
      }
      if (w_hr_t) {
        gemm<T>(false, false, n, P, H, T(1), r_t, H, w_hr_t, P, T(0), y_t, P);  // r W_hr^T
      }
      if (zoneout.on_h()) {
        zoneout_mix(zoneout.h_rows(row, P), zoneout.p_h, n * P, h_state, y_t);
      }
      if (round) {
        round(n * P, y_t);
      }
      copy_elements(h_state, y_t, n * P);
    }
  });
}

// The backward runs its steps in chunks of about this many gate values (at least one step), and
// the chunk's GEMMs (dx, dW_ih, dW_hh, dW_hr) after each: the per-row gradient buffers then hold
// one chunk, not every row. Measured at (100, 32, 64, 128), forward+backward: the whole-sequence
// buffers (15 MB) cost ~2 ms of fresh pages a call when another model ran in between.
constexpr int64_t kBackwardChunkElements = int64_t(1) << 18;

inline int64_t backward_chunk_steps(const LayerSizes& s) {
  return std::clamp<int64_t>(kBackwardChunkElements / std::max<int64_t>(s.B * 4 * s.H, 1), 1,
                             s.T);
}

// Backward of one layer: the steps in reverse, in chunks, each chunk's GEMMs after its steps.
//   dy [rows, P] or null; dh_n [B, P], dc_n [B, H] or null; x, h0, c0, w_ih, w_hh [4H, P],
//   w_hr [P, H] or null, ln as in the forward; y, gates, cells, norms: the forward's
//   dx [rows, I] or null; dh0 [B, P], dc0 [B, H] (the running dh, dc); dw_ih, dw_hh, dw_hr, db;
//   dln_ih, dln_hh [4H], dln_c, dln_bias_c [H]
//   workspaces, each of a chunk's rows (backward_chunk_steps * B): d_ih, d_hh [., 4H]; h_fed
//   [., P] (the h each step fed to W_hh); with w_hr: dh_all [., P], r_all [., H]; and dr [B, H];
//   sums [B, 14H] (a slice [b0, b1)
//   sums in row b0); restart_dh [B, P], restart_dc [B, H] (when any restart); keep_dh [B, P],
//   keep_dc and c_new [B, H] (zoneout), as the plain kernel's.
template <typename T>
void ln_layer_backward(const LayerSizes& s, const Steps& steps, bool reverse,
                       const Restarts& restarts, const T* dy, const T* dh_n, const T* dc_n,
                       const T* x, const T* h0, const T* c0, const T* w_ih, const T* w_hh,
                       const T* w_hr, const LayerNormParams<T>& ln, const T* y, const T* gates,
                       const T* cells, const T* norms, T* dx, T* dh0, T* dc0, T* dw_ih,
                       T* dw_hh, T* dw_hr, T* db, T* dln_ih, T* dln_hh, T* dln_c, T* dln_bias_c,
                       T* d_ih, T* d_hh, T* h_fed, T* dh_all, T* r_all, T* dr_scratch,
                       T* sums, T* restart_dh, T* restart_dc, const Zoneout& zoneout,
                       const T* recurrent_mask, T* keep_dh, T* keep_dc, T* c_new) {
  const int64_t H = s.H, P = s.P, G = 4 * s.H, SW = sums_width(H);
  const int64_t W = NormsRow{H}.width();
  T* dh = dh0;
  T* dc = dc0;
  start_backward_states(s.B, P, H, dh_n, dc_n, dh, dc, restarts.any() ? restart_dh : nullptr,
                        restart_dc);
  std::fill(sums, sums + s.B * SW, T(0));
  const int64_t chunk_steps = backward_chunk_steps(s);
  // Steps k_hi down to k_lo on batch rows [b0, b1); the chunk's rows start at row_begin.
  auto run_steps = [&](int64_t k_lo, int64_t k_hi, int64_t row_begin, int64_t b0, int64_t b1) {
    T* dh_state = dh + b0 * P;
    T* dc_state = dc + b0 * H;
    T* slice_sums = sums + b0 * SW;
    for (int64_t k = k_hi; k >= k_lo; --k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = std::min(b1, steps.batch[t]) - b0;
      if (n <= 0) {
        continue;
      }
      const int64_t row = steps.offset[t] + b0;
      const int64_t local = row - row_begin;  // the row in the chunk's buffers
      int64_t n_prev = 0, prev_row = 0;  // as in the plain kernel's backward
      if (k > 0) {
        const int64_t t_prev = Steps::time_of(k - 1, s.T, reverse);
        n_prev = std::max<int64_t>(0, std::min(steps.batch[t_prev], b0 + n) - b0);
        prev_row = steps.offset[t_prev] + b0;
      }
      const uint8_t* restart = restarts.at(t, b0);
      fed_state_rows(n, P, n_prev, restart, y + prev_row * P, h0 + b0 * P,
                     recurrent_mask ? recurrent_mask + b0 * P : nullptr, h_fed + local * P, P);
      if (dy) {
        const T* dy_t = dy + row * P;
        for (int64_t u = 0; u < n * P; ++u) {
          dh_state[u] += dy_t[u];
        }
      }
      T* keep_dh_rows = zoneout.on_h() ? keep_dh + b0 * P : nullptr;
      T* keep_dc_rows = zoneout.on_c() ? keep_dc + b0 * H : nullptr;
      T* c_new_rows = c_new + b0 * H;  // the unmixed c_t, rebuilt from the gates when mixed
      const T* c_new_t = zoneout_step_backward(
          zoneout, row, n, P, H, gates + row * G, cells + row * H, cells + prev_row * H,
          c0 + b0 * H, n_prev, restart, dh_state, dc_state, keep_dh_rows, keep_dc_rows,
          zoneout.on_c() ? c_new_rows : nullptr);
      const T* dr = dh_state;
      if (w_hr) {
        copy_elements(dh_all + local * P, dh_state, n * P);
        T* dr_rows = dr_scratch + b0 * H;
        gemm<T>(false, false, n, H, P, T(1), dh_state, P, w_hr, H, T(0), dr_rows, H);  // dh W_hr
        dr = dr_rows;
      }
      T* d_hh_t = d_hh + local * G;
      ln_gates_backward(n, H, gates + row * G, c_new_t, norms + row * W, cells + prev_row * H,
                        c0 + b0 * H, n_prev, restart, ln, dr, dc_state, d_ih + local * G,
                        d_hh_t, slice_sums, w_hr ? r_all + local * H : nullptr);
      gemm<T>(false, false, n, P, G, T(1), d_hh_t, G, w_hh, P, T(0), dh_state, P);
      finish_step_backward(n, P, H, recurrent_mask ? recurrent_mask + b0 * P : nullptr,
                           keep_dh_rows, keep_dc_rows, restart, dh_state, dc_state,
                           restarts.any() ? restart_dh + b0 * P : nullptr,
                           restarts.any() ? restart_dc + b0 * H : nullptr);
    }
  };
  // Chunks in processing order (k from T - 1 down); each chunk's rows are one range.
  for (int64_t k_hi = s.T - 1; k_hi >= 0; k_hi -= chunk_steps) {
    const int64_t k_lo = std::max<int64_t>(0, k_hi - chunk_steps + 1);
    const auto [row_begin, row_end] = steps.rows_of_steps(k_lo, k_hi + 1, reverse);
    for_each_batch_slice(s, [&](int64_t b0, int64_t b1) {
      run_steps(k_lo, k_hi, row_begin, b0, b1);
    });
    // dx = dZ_ih W_ih; dW_ih (+)= dZ_ih^T x; dW_hh (+)= dZ_hh^T h_fed; dW_hr (+)= dH^T r
    const int64_t rows = row_end - row_begin;
    const T beta = k_hi == s.T - 1 ? T(0) : T(1);
    if (dx) {
      gemm<T>(false, false, rows, s.I, G, T(1), d_ih, G, w_ih, s.I, T(0), dx + row_begin * s.I,
              s.I);
    }
    gemm<T>(true, false, G, s.I, rows, T(1), d_ih, G, x + row_begin * s.I, s.I, beta, dw_ih, s.I);
    gemm<T>(true, false, G, P, rows, T(1), d_hh, G, h_fed, P, beta, dw_hh, P);
    if (w_hr) {
      gemm<T>(true, false, P, H, rows, T(1), dh_all, P, r_all, H, beta, dw_hr, H);
    }
  }
  if (restarts.any()) {
    add_restart_gradients(s.B, P, H, restart_dh, restart_dc, dh0, dc0);
  }
  // The slices' sums (rows no slice started at are zeros).
  std::fill(db, db + G, T(0));
  std::fill(dln_ih, dln_ih + G, T(0));
  std::fill(dln_hh, dln_hh + G, T(0));
  std::fill(dln_c, dln_c + H, T(0));
  std::fill(dln_bias_c, dln_bias_c + H, T(0));
  for (int64_t b = 0; b < s.B; ++b) {
    const T* slice = sums + b * SW;
    for (int64_t k = 0; k < G; ++k) {
      db[k] += slice[k];
      dln_ih[k] += slice[G + k];
      dln_hh[k] += slice[2 * G + k];
    }
    for (int64_t j = 0; j < H; ++j) {
      dln_c[j] += slice[3 * G + j];
      dln_bias_c[j] += slice[3 * G + H + j];
    }
  }
}

// A 16-bit layer's tensors as float32 (the kernels above then run on them), or the tensor itself.
Tensor as_compute(const Tensor& t) {
  return is_low_precision(t.scalar_type()) ? t.to(at::kFloat) : t;
}
optional<Tensor> as_compute(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? optional<Tensor>(as_compute(*t)) : c10::nullopt;
}

template <typename T>
using RoundOf = void (*)(int64_t, T*);

// The rounding of a 16-bit layer's h (its kernels run in float32), or null.
template <typename T>
RoundOf<T> round_for(at::ScalarType) {
  return nullptr;
}
template <>
RoundOf<float> round_for<float>(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16: return round_through<c10::BFloat16>;
    case at::kHalf: return round_through<c10::Half>;
    default: return nullptr;
  }
}

template <typename T>
LayerNormParams<T> ln_params(const Tensor& gain_ih, const Tensor& gain_hh, const Tensor& gain_c,
                             const Tensor& bias_c) {
  return {gain_ih.data_ptr<T>(), gain_hh.data_ptr<T>(), gain_c.data_ptr<T>(),
          bias_c.data_ptr<T>()};
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
  const at::ScalarType dtype = input.scalar_type();
  const Steps steps(s, batch_sizes);
  const Restarts restarts(steps, reset, reverse);
  const Zoneout zoneout(zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h);
  // float32 copies of a 16-bit layer's tensors (see the top of this file)
  const Tensor x = as_compute(input).contiguous(), h0c = as_compute(h0).contiguous(),
               c0c = as_compute(c0).contiguous(), w_ih = as_compute(weight_ih).contiguous(),
               g_ih = as_compute(ln_weight_ih).contiguous(),
               g_hh = as_compute(ln_weight_hh).contiguous(),
               g_c = as_compute(ln_weight_c).contiguous(),
               b_c = as_compute(ln_bias_c).contiguous();
  const Tensor w_hh_t = as_compute(weight_hh).t().contiguous();
  const optional<Tensor> w_hr_t =
      weight_hr ? optional<Tensor>(as_compute(*weight_hr).t().contiguous()) : c10::nullopt;
  const optional<Tensor> mask = as_compute(recurrent_mask);
  const auto opts = x.options();
  const int64_t G = 4 * s.H, W = NormsRow{s.H}.width();
  Tensor output = at::empty(per_step_shape(s, packed, s.P), opts);
  Tensor h_n = at::empty({s.B, s.P}, opts);
  Tensor c_n = at::empty({s.B, s.H}, opts);
  Tensor gates = at::empty(keep_state ? per_step_shape(s, packed, G) : std::vector<int64_t>{
                                                                           s.B, G},
                           opts);
  Tensor cells = keep_state ? at::empty(per_step_shape(s, packed, s.H), opts) : Tensor();
  Tensor norms = at::empty(per_step_shape(s, packed, W), opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_lstm_layer_forward_cpu", [&] {
    // bias [4H], r_scratch [B, H] (projection), fed_scratch [B, P], c_prev_scratch [B, H]
    const bool proj = w_hr_t.has_value();
    Workspace<scalar_t> work(G + (proj ? s.B * s.H : 0) + (mask ? s.B * s.P : 0) +
                                 (zoneout.on_c() ? s.B * s.H : 0),
                             opts);
    scalar_t* bias = work.take(G);
    if (bias_ih.has_value()) {
      combined_bias_into(as_compute(bias_ih), as_compute(bias_hh), G, bias);
    } else {
      std::fill(bias, bias + G, scalar_t(0));
    }
    scalar_t* r_scratch = proj ? work.take(s.B * s.H) : nullptr;
    scalar_t* fed_scratch = mask ? work.take(s.B * s.P) : nullptr;
    scalar_t* c_prev_scratch = zoneout.on_c() ? work.take(s.B * s.H) : nullptr;
    ln_layer_forward<scalar_t>(
        s, steps, reverse, restarts, x.data_ptr<scalar_t>(), h0c.data_ptr<scalar_t>(),
        c0c.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(), w_hh_t.data_ptr<scalar_t>(), bias,
        proj ? w_hr_t->data_ptr<scalar_t>() : nullptr, ln_params<scalar_t>(g_ih, g_hh, g_c, b_c),
        output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(), c_n.data_ptr<scalar_t>(),
        gates.data_ptr<scalar_t>(), keep_state,
        keep_state ? cells.data_ptr<scalar_t>() : nullptr, norms.data_ptr<scalar_t>(), r_scratch,
        zoneout, mask ? mask->data_ptr<scalar_t>() : nullptr, fed_scratch, c_prev_scratch,
        round_for<scalar_t>(dtype));
  });
  if (!keep_state) {  // nothing kept for a backward: no rows
    std::vector<int64_t> none = per_step_shape(s, packed, G);
    none[0] = 0;
    gates = at::empty(none, opts);
    none.back() = s.H;
    cells = at::empty(none, opts);
    none.back() = W;
    norms = at::empty(none, opts);
  }
  // A 16-bit layer returns output and states in its dtype (h was rounded to it at every step) and
  // keeps its state in float32, as the plain 16-bit kernels do.
  return {output.to(dtype), h_n.to(dtype), c_n.to(dtype), gates, cells, norms};
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
  const int64_t G = 4 * s.H;
  const at::ScalarType dtype = input.scalar_type();
  const Steps steps(s, batch_sizes);
  const Restarts restarts(steps, reset, reverse);
  const Zoneout zoneout(zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h);
  const auto compute = [](const optional<Tensor>& t) {
    return t.has_value() && t->defined() ? optional<Tensor>(as_compute(*t).contiguous())
                                         : c10::nullopt;
  };
  const optional<Tensor> dy = compute(grad_output), dh_n = compute(grad_h_n),
                         dc_n = compute(grad_c_n), w_hr = compute(weight_hr),
                         mask = compute(recurrent_mask);
  const Tensor x = as_compute(input).contiguous(), h0c = as_compute(h0).contiguous(),
               c0c = as_compute(c0).contiguous(), w_ih = as_compute(weight_ih).contiguous(),
               w_hh = as_compute(weight_hh).contiguous(), y = as_compute(output).contiguous(),
               g_ih = as_compute(ln_weight_ih).contiguous(),
               g_hh = as_compute(ln_weight_hh).contiguous(),
               g_c = as_compute(ln_weight_c).contiguous(),
               b_c = as_compute(ln_bias_c).contiguous(), gates_c = gates.contiguous(),
               cells_c = cells.contiguous(), norms_c = norms.contiguous();
  const bool proj = w_hr.has_value();
  const auto opts = x.options();
  Tensor grad_input = at::empty(rows_or_none(input.sizes(), need_grad_input), opts);
  Tensor grad_h0 = at::empty({s.B, s.P}, opts);
  Tensor grad_c0 = at::empty({s.B, s.H}, opts);
  Tensor grad_w_ih = at::empty({G, s.I}, opts);
  Tensor grad_w_hh = at::empty({G, s.P}, opts);
  Tensor grad_bias = at::empty({G}, opts);
  Tensor grad_w_hr = at::empty({proj ? s.P : 0, s.H}, opts);
  Tensor grad_ln_ih = at::empty({G}, opts), grad_ln_hh = at::empty({G}, opts);
  Tensor grad_ln_c = at::empty({s.H}, opts), grad_ln_bias_c = at::empty({s.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_lstm_layer_backward_cpu", [&] {
    // per chunk row (C of them): d_ih, d_hh [C, 4H], h_fed [C, P], with projection dh_all
    // [C, P], r_all [C, H]; sums [B, 14H], c_new [B, H], with projection dr [B, H];
    // restart_dh [B, P], restart_dc [B, H] (restarts); keep_dh [B, P] (zoneout of h), keep_dc
    // [B, H] (zoneout of c)
    const int64_t C = std::min(s.N, backward_chunk_steps(s) * s.B);
    const int64_t proj_elements = proj ? C * (s.P + s.H) + s.B * s.H : 0;
    const int64_t restart_elements = restarts.any() ? s.B * (s.P + s.H) : 0;
    const int64_t zoneout_elements =
        (zoneout.on_h() ? s.B * s.P : 0) + (zoneout.on_c() ? s.B * s.H : 0);
    Workspace<scalar_t> work(2 * C * G + C * s.P + s.B * sums_width(s.H) + s.B * s.H +
                                 proj_elements + restart_elements + zoneout_elements,
                             opts);
    scalar_t* d_ih = work.take(C * G);
    scalar_t* d_hh = work.take(C * G);
    scalar_t* h_fed = work.take(C * s.P);
    scalar_t* sums = work.take(s.B * sums_width(s.H));
    scalar_t* c_new = work.take(s.B * s.H);
    scalar_t* dh_all = proj ? work.take(C * s.P) : nullptr;
    scalar_t* r_all = proj ? work.take(C * s.H) : nullptr;
    scalar_t* dr_scratch = proj ? work.take(s.B * s.H) : nullptr;
    scalar_t* restart_dh = restarts.any() ? work.take(s.B * s.P) : nullptr;
    scalar_t* restart_dc = restarts.any() ? work.take(s.B * s.H) : nullptr;
    scalar_t* keep_dh = zoneout.on_h() ? work.take(s.B * s.P) : nullptr;
    scalar_t* keep_dc = zoneout.on_c() ? work.take(s.B * s.H) : nullptr;
    ln_layer_backward<scalar_t>(
        s, steps, reverse, restarts, data_or_null<scalar_t>(dy), data_or_null<scalar_t>(dh_n),
        data_or_null<scalar_t>(dc_n), x.data_ptr<scalar_t>(), h0c.data_ptr<scalar_t>(),
        c0c.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
        data_or_null<scalar_t>(w_hr), ln_params<scalar_t>(g_ih, g_hh, g_c, b_c),
        y.data_ptr<scalar_t>(), gates_c.data_ptr<scalar_t>(), cells_c.data_ptr<scalar_t>(),
        norms_c.data_ptr<scalar_t>(),
        need_grad_input ? grad_input.data_ptr<scalar_t>() : nullptr,
        grad_h0.data_ptr<scalar_t>(), grad_c0.data_ptr<scalar_t>(),
        grad_w_ih.data_ptr<scalar_t>(), grad_w_hh.data_ptr<scalar_t>(),
        proj ? grad_w_hr.data_ptr<scalar_t>() : nullptr, grad_bias.data_ptr<scalar_t>(),
        grad_ln_ih.data_ptr<scalar_t>(), grad_ln_hh.data_ptr<scalar_t>(),
        grad_ln_c.data_ptr<scalar_t>(), grad_ln_bias_c.data_ptr<scalar_t>(), d_ih, d_hh, h_fed,
        dh_all, r_all, dr_scratch, sums, restart_dh, restart_dc, zoneout,
        data_or_null<scalar_t>(mask), keep_dh, keep_dc, c_new);
  });
  return {grad_input.to(dtype), grad_h0.to(dtype),      grad_c0.to(dtype),
          grad_w_ih.to(dtype),  grad_w_hh.to(dtype),    grad_bias.to(dtype),
          grad_w_hr.to(dtype),  grad_ln_ih.to(dtype),   grad_ln_hh.to(dtype),
          grad_ln_c.to(dtype),  grad_ln_bias_c.to(dtype)};
}



}  // namespace layer_norm
}  // namespace cpu
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("ln_lstm_layer_forward", &lstm_ext::cpu::layer_norm::ln_lstm_layer_forward_cpu);
  m.impl("ln_lstm_layer_backward", &lstm_ext::cpu::layer_norm::ln_lstm_layer_backward_cpu);
}
