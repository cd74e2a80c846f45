// CPU kernels of the lstm_ext ops (schemas in csrc/ops.cpp).
//
// The layer kernels run the whole time loop here. Per step there is no tensor allocation and no
// dispatcher call: one BLAS call on raw pointers for the recurrent GEMM (and one for the projection,
// with proj_size) and one fused pass over the gates. The input projection (forward) and the weight
// gradients (backward) are single GEMMs over all rows. The cell ops are the layer kernels with T = 1.
//
// Rows are laid out as csrc/lstm_steps.h describes. A layer keeps running states h [B, P] and
// c [B, H]; step t reads and updates their first batch_sizes[t] rows, so finished sequences keep
// their last state, which is what h_n / c_n report. A reverse layer runs the steps from T-1 down
// to 0; a sequence then joins when its first (last in time) step comes, starting from its h0 / c0
// row. Threads split the batch (for_each_batch_slice) and each runs every step on its rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "../lstm_checks.h"
#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "blas.h"
#include "gates.h"
#include "layer_common.h"
#include "lowp.h"

namespace lstm_ext {
namespace cpu {
namespace {

using at::Tensor;
using c10::optional;

// How many chunks of steps the backward hands to a second thread for their weight gradients
// while the first runs the recurrence (1: no such pipeline). When the weight gradients are enough
// work to pay for waking a thread (at B = 1, H = 128 they are a third of the backward), and the
// batch is not split, or is but a whole step is at most kMaxPipelinedStepMacs: each thread's
// slice would then run GEMMs too small to be efficient, and one thread running the recurrence on
// every row beside one computing the weight gradients is faster (benchmarks/results/tuning.md).
constexpr int64_t kPipelineChunks = 8;
constexpr int64_t kMinPipelinedMacs = int64_t(1) << 21;
constexpr int64_t kMaxPipelinedStepMacs = int64_t(1) << 18;

// The forward's counterpart: a second thread projects the inputs of the next chunks of steps
// while the first runs the recurrence. Inference then holds every step's gates (not one chunk):
// only up to kMaxPipelinedGates values.
constexpr int64_t kMaxPipelinedGates = int64_t(1) << 22;

bool forward_pipelined(const LayerSizes& s) {
  const int64_t projection_macs = s.N * 4 * s.H * s.I;
  return !batch_is_split(s) && s.T >= 2 && projection_macs >= kMinPipelinedMacs / 2 &&
         s.N * 4 * s.H <= kMaxPipelinedGates;
}

// Multiply-adds of a layer's dx, dW_ih and dW_hh.
int64_t weight_gradient_macs(const LayerSizes& s) { return s.N * 4 * s.H * (2 * s.I + s.P); }

int64_t backward_pipeline_chunks(const LayerSizes& s) {
  const bool small_steps =
      !batch_is_split(s) || s.B * step_macs_per_row(s) <= kMaxPipelinedStepMacs;
  return small_steps && s.T >= 2 && weight_gradient_macs(s) >= kMinPipelinedMacs ? kPipelineChunks
                                                                                 : 1;
}

// Whether the backward's weight gradients and dx, after an unpipelined recurrence, may run as one
// task per thread (see layer_backward) rather than as GEMMs that MKL threads: with exactly two
// threads (the only count measured here) and enough work to pay for waking the second.
bool split_weight_gradients(const LayerSizes& s) {
  return at::get_num_threads() == 2 && !at::in_parallel_region() &&
         weight_gradient_macs(s) >= kMinPipelinedMacs;
}

// Spins until counter >= target (published with release by another thread); yields now and then,
// in case there are more threads than cores.
inline void wait_until_at_least(const std::atomic<int64_t>& counter, int64_t target) {
  for (int64_t spins = 1; counter.load(std::memory_order_acquire) < target; ++spins) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if (spins % 1024 == 0) {
      std::this_thread::yield();
    }
  }
}

// Forward of one layer over all steps.
//   restarts: the rows that start anew from h0 / c0 before a step (reset; csrc/lstm_steps.h)
//   x      [rows, I]     h0 [B, P], c0 [B, H]
//   w_ih   [4H, I]       w_hh_t [P, 4H]   bias [4H] (b_ih + b_hh, or zeros)  w_hr_t [H, P] or null
//   (the recurrent weights transposed: the per-step GEMMs are then plain row-major A @ B, which
//   MKL runs 1.3-2x faster than A @ B^T at small batch sizes)
//   y      [rows, P]     h_n [B, P], c_n [B, H] (also the running states)
//   gates  the input projection and, on return, the activated gates i, f, g, o: [rows, 4H] when
//          gates_all_rows (kept for the backward); else a buffer for chunk_steps steps' rows,
//          reused chunk after chunk, so inference does not hold all steps' gates at once.
//          Either way the steps go chunk by chunk: project a chunk's inputs, then run its steps
//          while those gates are still in cache (measured: forward at (50, 128, 512, 512)
//          ~100 -> ~89 ms).
//   cells  [rows, H]     c_t of every step, or null when the backward will not run
//   exp_scratch [B, 4H]; r_scratch [B, H] (o ⊙ tanh(c_t) before the projection; with w_hr only)
//   zoneout, recurrent_mask [B, P] or null (csrc/lstm_regularize.h), with their scratch:
//   fed_scratch [B, P] (the masked h fed to W_hh; with recurrent_mask), c_prev_scratch [B, H]
//   (c_{t-1}, to mix with c_t; with zoneout of c)
template <typename T>
void layer_forward(const LayerSizes& s, const Steps& steps, bool reverse, const Restarts& restarts,
                   const T* x, const T* h0, const T* c0, const T* w_ih, const T* w_hh_t,
                   const T* bias, const T* w_hr_t, T* y, T* h_n, T* c_n, T* gates,
                   bool gates_all_rows, int64_t chunk_steps, bool pipelined, T* cells,
                   T* exp_scratch, T* r_scratch, const Zoneout& zoneout, const T* recurrent_mask,
                   T* fed_scratch, T* c_prev_scratch) {
  const int64_t H = s.H, P = s.P, G = 4 * s.H;
  copy_elements(h_n, h0, s.B * P);
  copy_elements(c_n, c0, s.B * H);
  auto chunk_gates = [&](int64_t row_begin) {
    return gates_all_rows ? gates + row_begin * G : gates;
  };
  // Input projection of a chunk's steps at once: x W_ih^T (the bias is added in the gate pass).
  auto project = [&](int64_t k0, int64_t k1) {
    const auto [row_begin, row_end] = steps.rows_of_steps(k0, k1, reverse);
    gemm<T>(false, true, row_end - row_begin, G, s.I, T(1), x + row_begin * s.I, s.I, w_ih, s.I,
            T(0), chunk_gates(row_begin), G);
  };
  // Steps [k0, k1) on batch rows [b0, b1). At step t the active rows are [b0, min(b1, batch[t])).
  auto run_steps = [&](int64_t k0, int64_t k1, int64_t b0, int64_t b1) {
    const int64_t row_begin = steps.rows_of_steps(k0, k1, reverse).first;
    T* gates_chunk = chunk_gates(row_begin);
    T* h_state = h_n + b0 * P;
    T* c_state = c_n + b0 * H;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = std::min(b1, steps.batch[t]) - b0;
      if (n <= 0) {
        continue;
      }
      const int64_t row = steps.offset[t] + b0;
      T* gates_t = gates_chunk + (row - row_begin) * G;
      T* y_t = y + row * P;
      if (const uint8_t* restart = restarts.at(t, b0)) {
        restart_states(restart, n, P, H, h0 + b0 * P, c0 + b0 * H, h_state, c_state);
      }
      const T* h_fed = h_state;
      if (recurrent_mask) {
        mask_rows(n, P, h_state, recurrent_mask + b0 * P, fed_scratch + b0 * P);
        h_fed = fed_scratch + b0 * P;
      }
      gemm<T>(false, false, n, G, P, T(1), h_fed, P, w_hh_t, G, T(1), gates_t, G);
      T* c_prev = zoneout.on_c() ? c_prev_scratch + b0 * H : nullptr;
      if (c_prev) {
        copy_elements(c_prev, c_state, n * H);
      }
      // c_state holds c_{t-1} and receives c_t.
      T* r_t = w_hr_t ? r_scratch + b0 * H : y_t;
      gates_forward(n, H, 0, H, gates_t, bias, c_state, r_t, exp_scratch + b0 * G);
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
      copy_elements(h_state, y_t, n * P);
    }
  };

  if (pipelined && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // The whole batch on one thread (too small to split) while a second projects the next
    // chunks' inputs (gates_all_rows: each chunk has its own rows). Only the recurrence waits
    // (for the projection's progress), so a serial parallel_for, which runs task 0 first, is
    // also correct.
    std::atomic<int64_t> projected{0};  // steps whose inputs are projected, in processing order
    at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
      for (int64_t task = task0; task < task1; ++task) {
        for (int64_t k0 = 0; k0 < s.T; k0 += chunk_steps) {
          const int64_t k1 = std::min(s.T, k0 + chunk_steps);
          if (task == 0) {
            project(k0, k1);
            projected.store(k1, std::memory_order_release);
          } else {
            wait_until_at_least(projected, k1);
            run_steps(k0, k1, 0, s.B);
          }
        }
      }
    });
    return;
  }
  // Project a chunk, then run its steps while those gates are still in cache.
  for (int64_t k0 = 0; k0 < s.T; k0 += chunk_steps) {
    const int64_t k1 = std::min(s.T, k0 + chunk_steps);
    project(k0, k1);
    for_each_batch_slice(s, [&](int64_t b0, int64_t b1) { run_steps(k0, k1, b0, b1); });
  }
}

// A call with few rows in all (an LSTMCell step, a streaming call of one step or a few): the
// steps multiply by the weights as they are stored, [4H, K] (small_gemm_nt), with each step's
// input projection done with its recurrent product. Transposing the weights first (and the
// allocation that holds the copy), as a longer call does once, costs more than such a call's
// products: a [1024, 256] W_hh takes ~200 us to transpose, a B = 1 step's product ~10 us. No
// per-call work scales with the weights but the products themselves, and nothing derived from
// the weights is kept between calls (an in-place change of a weight through .data, which no
// version counter records, would make a kept copy silently stale).
constexpr int64_t kMaxDirectRows = 32;

bool direct_steps(const LayerSizes& s) { return s.N <= kMaxDirectRows; }

// A direct step's hidden units are split over the threads (each computes its units' four gate
// blocks, with the same half of the weights every call, so that half stays in its core's cache)
// from this many multiply-adds per step; below it a fork/join costs more than it saves.
constexpr int64_t kMinSplitStepMacs = int64_t(1) << 17;

// Forward of one layer, directly on the weights (direct_steps).
//   x [rows, I]; h0 [B, P], c0 [B, H]; w_ih [4H, I], w_hh [4H, P], w_hr [P, H] or null, as given
//   bias [4H]; y [rows, P]; h_n [B, P], c_n [B, H] (also the running states)
//   gates [rows, 4H] (gates_all_rows: kept for the backward) or one step's [B, 4H] scratch
//   cells [rows, H] or null; exp_scratch [B, 4H]; r_scratch [B, H] (with w_hr only)
//   zoneout, recurrent_mask, fed_scratch, c_prev_scratch as layer_forward's
template <typename T>
void layer_forward_direct(const LayerSizes& s, const Steps& steps, bool reverse,
                          const Restarts& restarts, const T* x, const T* h0, const T* c0,
                          const T* w_ih, const T* w_hh, const T* bias, const T* w_hr, T* y,
                          T* h_n, T* c_n, T* gates, bool gates_all_rows, T* cells,
                          T* exp_scratch, T* r_scratch, const Zoneout& zoneout,
                          const T* recurrent_mask, T* fed_scratch, T* c_prev_scratch) {
  const int64_t H = s.H, P = s.P, G = 4 * s.H, I = s.I;
  copy_elements(h_n, h0, s.B * P);
  copy_elements(c_n, c0, s.B * H);
  const bool split = at::get_num_threads() > 1 && !at::in_parallel_region() && H >= 32 &&
                     s.B * G * (I + P) >= kMinSplitStepMacs;
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = Steps::time_of(k, s.T, reverse);
    const int64_t n = steps.batch[t], row = steps.offset[t];
    const T* x_t = x + row * I;
    T* gates_t = gates_all_rows ? gates + row * G : gates;
    T* y_t = y + row * P;
    T* r_t = w_hr ? r_scratch : y_t;  // o ⊙ tanh(c_t), before any projection
    if (const uint8_t* restart = restarts.at(t, 0)) {
      restart_states(restart, n, P, H, h0, c0, h_n, c_n);
    }
    const T* h_fed = h_n;
    if (recurrent_mask) {
      mask_rows(n, P, h_n, recurrent_mask, fed_scratch);
      h_fed = fed_scratch;
    }
    if (zoneout.on_c()) {
      copy_elements(c_prev_scratch, c_n, n * H);
    }
    // Units [j0, j1): their columns of each gate block, then their gate pass (h_n, the state this
    // step reads, is written only after every unit is done).
    auto units = [&](int64_t j0, int64_t j1) {
      for (int64_t gate = 0; gate < 4; ++gate) {
        const int64_t col = gate * H + j0;
        small_gemm_nt_sum(n, j1 - j0, NtTerm<T>{x_t, I, w_ih + col * I, I, I},
                          NtTerm<T>{h_fed, P, w_hh + col * P, P, P}, gates_t + col, G);
      }
      gates_forward(n, H, j0, j1, gates_t, bias, c_n, r_t, exp_scratch);
    };
    if (split) {
      at::parallel_for(0, H, 16, units);
    } else {
      units(0, H);
    }
    if (zoneout.on_c()) {
      zoneout_mix(zoneout.c_rows(row, H), zoneout.p_c, n * H, c_prev_scratch, c_n);
    }
    if (cells) {
      copy_elements(cells + row * H, c_n, n * H);
    }
    if (w_hr) {
      small_gemm_nt(n, P, H, r_t, H, w_hr, H, false, y_t, P);  // r W_hr^T
    }
    if (zoneout.on_h()) {
      zoneout_mix(zoneout.h_rows(row, P), zoneout.p_h, n * P, h_n, y_t);
    }
    copy_elements(h_n, y_t, n * P);
  }
}

// Backward of one layer: the steps in reverse processing order, then the weight gradients as
// single GEMMs over all rows.
//   dy [rows, P] or null; dh_n [B, P], dc_n [B, H] or null (absent gradients are zero)
//   x, h0, c0, w_ih, w_hh, w_hr as in the forward; y [rows, P] the forward's output
//   gates [rows, 4H] activated gates, cells [rows, H] c_t, both saved by the forward
//   dx [rows, I] or null (not wanted); dh0 [B, P], dc0 [B, H] (also the running dh, dc);
//   restarts as in the forward, with restart_dh [B, P], restart_dc [B, H] (when any): what the
//   restarts pass to dh0, dc0, added at the end;
//   dw_ih [4H, I]; dw_hh [4H, P];
//   dw_hr [P, H] (with w_hr); db [4H]
//   workspaces: dgates [rows, 4H] (pre-activation gradients); xh [rows, K] (the h each step read,
//   after a copy of its x when fuse_x: then dW_ih and dW_hh are one GEMM, dG^T [x | h], which
//   packs dG once instead of twice); dw_cat [4H, K] (with fuse_x); with w_hr: dh_all [rows, P],
//   r_all [rows, H], dr [B, H]; tanh_c [B, H]; db_slices [B, 4H] (a batch slice [b0, b1) sums
//   its bias gradient in row b0). K = I + P with fuse_x, else P.
//   zoneout, recurrent_mask [B, P] or null as in the forward (cells then hold the mixed c_t),
//   with their scratch: keep_dh [B, P] (zoneout of h), keep_dc [B, H] and c_new [B, H]
//   (zoneout of c): the gradients zoneout passes to the state before, and c_t before the mix.
template <typename T>
void layer_backward(const LayerSizes& s, const Steps& steps, bool reverse,
                    const Restarts& restarts, const T* dy, const T* dh_n, const T* dc_n,
                    const T* x, const T* h0, const T* c0,
                    const T* w_ih, const T* w_hh, const T* w_hr, const T* y, const T* gates,
                    const T* cells, T* dx, T* dh0, T* dc0, T* dw_ih, T* dw_hh, T* dw_hr, T* db,
                    T* dgates, bool fuse_x, T* xh, T* dw_cat, T* dh_all, T* r_all,
                    T* dr_scratch, T* tanh_c, T* db_slices, T* restart_dh, T* restart_dc,
                    int64_t pipeline_chunks, const Zoneout& zoneout, const T* recurrent_mask,
                    T* keep_dh, T* keep_dc, T* c_new) {
  const int64_t xw = fuse_x ? s.I : 0, K = xw + s.P;  // xh: [x (xw columns) | h (P columns)]
  const int64_t H = s.H, P = s.P, G = 4 * s.H;
  T* dh = dh0;
  T* dc = dc0;
  start_backward_states(s.B, P, H, dh_n, dc_n, dh, dc, restarts.any() ? restart_dh : nullptr,
                        restart_dc);
  std::fill(db_slices, db_slices + s.B * G, T(0));
  // The reverse loop over batch rows [b0, b1), every step (rows are independent, as in the
  // forward). With `done`, it publishes how many steps it has finished (all rows).
  auto recurrence = [&](int64_t b0, int64_t b1, std::atomic<int64_t>* done) {
    T* dh_state = dh + b0 * P;
    T* dc_state = dc + b0 * H;
    T* db_slice = db_slices + b0 * G;
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = std::min(b1, steps.batch[t]) - b0;
      if (n <= 0) {
        continue;
      }
      const int64_t row = steps.offset[t] + b0;
      // The step processed before this one in the forward: its first n_prev rows carried h and c
      // into this step; the other rows of this step started from h0 / c0.
      int64_t n_prev = 0, prev_row = 0;
      if (k > 0) {
        const int64_t t_prev = Steps::time_of(k - 1, s.T, reverse);
        n_prev = std::max<int64_t>(0, std::min(steps.batch[t_prev], b0 + n) - b0);
        prev_row = steps.offset[t_prev] + b0;
      }
      const uint8_t* restart = restarts.at(t, b0);  // rows that read h0 / c0 although r < n_prev
      for (int64_t r = 0; r < n; ++r) {
        T* xh_row = xh + (row + r) * K;
        if (fuse_x) {
          copy_elements(xh_row, x + (row + r) * s.I, s.I);
        }
        const T* h_read = state_read(r, n_prev, restart, y + prev_row * P, h0 + b0 * P, P);
        if (recurrent_mask) {  // dW_hh multiplies the h the step fed to W_hh
          mask_rows(1, P, h_read, recurrent_mask + (b0 + r) * P, xh_row + xw);
        } else {
          copy_elements(xh_row + xw, h_read, P);
        }
      }

      // dL/dh_t: from step t's output and from the step after it (already in dh_state).
      if (dy) {
        const T* dy_t = dy + row * P;
        for (int64_t u = 0; u < n * P; ++u) {
          dh_state[u] += dy_t[u];
        }
      }
      T* keep_dh_rows = zoneout.on_h() ? keep_dh + b0 * P : nullptr;
      T* keep_dc_rows = zoneout.on_c() ? keep_dc + b0 * H : nullptr;
      const T* cells_t = zoneout_step_backward(
          zoneout, row, n, P, H, gates + row * G, cells + row * H, cells + prev_row * H,
          c0 + b0 * H, n_prev, restart, dh_state, dc_state, keep_dh_rows, keep_dc_rows,
          zoneout.on_c() ? c_new + b0 * H : nullptr);
      const T* dr = dh_state;  // dL/d(o ⊙ tanh c_t)
      if (w_hr) {
        copy_elements(dh_all + row * P, dh_state, n * P);
        T* dr_rows = dr_scratch + b0 * H;
        gemm<T>(false, false, n, H, P, T(1), dh_state, P, w_hr, H, T(0), dr_rows, H);  // dh W_hr
        dr = dr_rows;
      }
      T* dgates_t = dgates + row * G;
      gates_backward(n, H, gates + row * G, cells_t, cells + prev_row * H, c0 + b0 * H, n_prev,
                     restart, dr, dc_state, dgates_t, db_slice, w_hr ? r_all + row * H : nullptr,
                     tanh_c + b0 * H);
      // dL/dh of the state this step read = dG_t W_hh (⊙ the recurrent mask), + zoneout's part
      gemm<T>(false, false, n, P, G, T(1), dgates_t, G, w_hh, P, T(0), dh_state, P);
      finish_step_backward(n, P, H, recurrent_mask ? recurrent_mask + b0 * P : nullptr,
                           keep_dh_rows, keep_dc_rows, restart, dh_state, dc_state,
                           restarts.any() ? restart_dh + b0 * P : nullptr,
                           restarts.any() ? restart_dc + b0 * H : nullptr);
      if (done) {
        done->store(s.T - k, std::memory_order_release);
      }
    }
  };

  // The weight gradients and dx of rows [r0, r1) (their dG and xh complete): dx = dG W_ih;
  // [dW_ih | dW_hh] (+)= dG^T [x | h] (or dW_ih = dG^T x, dW_hh = dG^T h); dW_hr (+)= dH^T r.
  // accumulate: add to what earlier rows left.
  auto row_gradients = [&](int64_t r0, int64_t r1, bool accumulate) {
    const int64_t rows = r1 - r0;
    const T beta = accumulate ? T(1) : T(0);
    const T* dg = dgates + r0 * G;
    if (dx) {
      gemm<T>(false, false, rows, s.I, G, T(1), dg, G, w_ih, s.I, T(0), dx + r0 * s.I, s.I);
    }
    if (fuse_x) {
      gemm<T>(true, false, G, K, rows, T(1), dg, G, xh + r0 * K, K, beta, dw_cat, K);
    } else {
      gemm<T>(true, false, G, s.I, rows, T(1), dg, G, x + r0 * s.I, s.I, beta, dw_ih, s.I);
      gemm<T>(true, false, G, P, rows, T(1), dg, G, xh + r0 * K, K, beta, dw_hh, P);
    }
    if (w_hr) {
      gemm<T>(true, false, P, H, rows, T(1), dh_all + r0 * P, P, r_all + r0 * H, H, beta, dw_hr,
              H);
    }
  };

  if (pipeline_chunks > 1 && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // One slice (the batch is too small to split, or its steps too small to split well) and a
    // second thread: it computes the weight gradients of each finished chunk of steps while the
    // first runs the rest of the recurrence.
    // Only the second thread waits (for the first's progress), so running the two tasks one after
    // the other, as a serial parallel_for does, is also correct.
    std::atomic<int64_t> done{0};
    const int64_t chunk = (s.T + pipeline_chunks - 1) / pipeline_chunks;
    at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
      for (int64_t task = task0; task < task1; ++task) {
        if (task == 0) {
          recurrence(0, s.B, &done);
          continue;
        }
        // Chunks in processing order: steps k = T-1 down to 0.
        for (int64_t k_hi = s.T - 1, first = 1; k_hi >= 0; k_hi -= chunk, first = 0) {
          const int64_t k_lo = std::max<int64_t>(0, k_hi - chunk + 1);
          wait_until_at_least(done, s.T - k_lo);
          const auto [row_begin, row_end] = steps.rows_of_steps(k_lo, k_hi + 1, reverse);
          row_gradients(row_begin, row_end, !first);
        }
      }
    });
  } else {
    for_each_batch_slice(s, [&](int64_t b0, int64_t b1) { recurrence(b0, b1, nullptr); });
    if (split_weight_gradients(s) && (fuse_x || direct_steps(s))) {
      // Two threads, one GEMM at a time each: one computes dx and the first g_split rows of
      // dW_cat = dG^T [x | h] (or of dW_ih and dW_hh), the other the remaining rows, as many
      // multiply-adds each (dx has I columns per gate row, the weight gradients I + P): faster
      // than MKL threading each whole GEMM with fuse_x; without it MKL keeps the GEMMs, but for a
      // short call (direct_steps: too few rows for MKL's threads). benchmarks/results/tuning.md.
      const int64_t dx_columns = dx ? s.I : 0;
      const int64_t g_split = std::min<int64_t>(
          G, (G * (s.I + s.P - dx_columns) / (2 * (s.I + s.P)) + 8) / 16 * 16);
      auto dw_cat_rows = [&](int64_t g0, int64_t g1) {  // weight gradient rows [g0, g1)
        if (fuse_x) {
          gemm<T>(true, false, g1 - g0, K, s.N, T(1), dgates + g0, G, xh, K, T(0),
                  dw_cat + g0 * K, K);
        } else {
          gemm<T>(true, false, g1 - g0, s.I, s.N, T(1), dgates + g0, G, x, s.I, T(0),
                  dw_ih + g0 * s.I, s.I);
          gemm<T>(true, false, g1 - g0, P, s.N, T(1), dgates + g0, G, xh, K, T(0),
                  dw_hh + g0 * P, P);
        }
      };
      at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
        for (int64_t task = task0; task < task1; ++task) {
          if (task == 0) {
            if (dx) {
              gemm<T>(false, false, s.N, s.I, G, T(1), dgates, G, w_ih, s.I, T(0), dx, s.I);
            }
            dw_cat_rows(0, g_split);
          } else {
            dw_cat_rows(g_split, G);
          }
        }
      });
      if (w_hr) {
        gemm<T>(true, false, P, H, s.N, T(1), dh_all, P, r_all, H, T(0), dw_hr, H);
      }
    } else {
      row_gradients(0, s.N, false);
    }
  }
  if (restarts.any()) {
    add_restart_gradients(s.B, P, H, restart_dh, restart_dc, dh0, dc0);
  }
  // db: the slices' sums (rows of db_slices no slice started at are zeros).
  std::fill(db, db + G, T(0));
  for (int64_t b = 0; b < s.B; ++b) {
    const T* slice_sum = db_slices + b * G;
    for (int64_t j = 0; j < G; ++j) {
      db[j] += slice_sum[j];
    }
  }
  if (fuse_x) {
    for (int64_t g = 0; g < G; ++g) {
      copy_elements(dw_ih + g * s.I, dw_cat + g * K, s.I);
      copy_elements(dw_hh + g * P, dw_cat + g * K + s.I, P);
    }
  }
}


// A layer with no hidden units (H = 0, reachable only through the ops, with a projection): its
// output h_t = r_t W_hr^T is zero at every step, and nothing depends on h0, c0 or the weights,
// so every gradient is zero. Spelled out here, as the BLAS calls of the kernels below may skip a
// product over nothing and leave their output unwritten.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> no_hidden_units_forward(
    const LayerSizes& s, bool packed, const at::TensorOptions& opts, bool keep_state) {
  const auto kept = opts.dtype(kept_state_dtype(opts.dtype().toScalarType()));
  std::vector<int64_t> state_shape = per_step_shape(s, packed, 0);
  if (!keep_state) {
    state_shape[0] = 0;
  }
  return {at::zeros(per_step_shape(s, packed, s.P), opts), at::zeros({s.B, s.P}, opts),
          at::empty({s.B, 0}, opts), at::empty(state_shape, kept), at::empty(state_shape, kept)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> no_hidden_units_backward(
    const LayerSizes& s, const Tensor& input, bool proj, bool need_grad_input) {
  const auto opts = input.options();
  return {at::zeros(rows_or_none(input.sizes(), need_grad_input), opts),
          at::zeros({s.B, s.P}, opts),
          at::empty({s.B, 0}, opts),
          at::empty({0, s.I}, opts),
          at::empty({0, s.P}, opts),
          at::empty({0}, opts),
          at::empty({proj ? s.P : 0, 0}, opts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cpu(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    bool keep_state, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::lstm_layer_forward";
  const LayerSizes s = check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, bias_ih,
                                          bias_hh, weight_hr, batch_sizes);
  check_reset(op, reset, input, s);
  const bool packed = batch_sizes.has_value();
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, packed);
  if (s.H == 0) {
    return no_hidden_units_forward(s, packed, input.options(), keep_state);
  }
  const Steps steps(s, batch_sizes);
  const Restarts restarts(steps, reset, reverse);
  const Zoneout zoneout(zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h);
  const bool recurrent = recurrent_mask.has_value() && recurrent_mask->defined();
  if (is_low_precision(input.scalar_type())) {
    return layer_forward_lowp(s, steps, restarts, packed, input, h0, c0, weight_ih, weight_hh,
                              bias_ih, bias_hh, weight_hr, reverse, keep_state, zoneout,
                              recurrent_mask);
  }
  const auto x = input.expect_contiguous(), h0c = h0.expect_contiguous(),
             c0c = c0.expect_contiguous(), w_ih = weight_ih.expect_contiguous();
  const auto opts = input.options();
  const int64_t G = 4 * s.H;
  Tensor output = at::empty(per_step_shape(s, packed, s.P), opts);
  Tensor h_n = at::empty({s.B, s.P}, opts);
  Tensor c_n = at::empty({s.B, s.H}, opts);
  Tensor gates = keep_state ? at::empty(per_step_shape(s, packed, G), opts) : Tensor();
  Tensor cells = keep_state ? at::empty(per_step_shape(s, packed, s.H), opts) : Tensor();
  const bool proj = weight_hr.has_value();
  // Steps go in chunks of about kChunkElements gate values (at least one step); without a
  // backward the projection buffer holds one chunk only. Pipelined (a second thread projects
  // while the first runs the steps): kPipelineChunks chunks, each with its own rows.
  const bool pipelined = forward_pipelined(s);
  const int64_t chunk_steps =
      pipelined ? (s.T + kPipelineChunks - 1) / kPipelineChunks
                : std::clamp<int64_t>(kChunkElements / std::max<int64_t>(s.B * G, 1), 1, s.T);
  const bool gates_all_rows = keep_state || pipelined;
  const int64_t buffer_rows = keep_state ? 0 : (pipelined ? s.N : chunk_steps * s.B);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_forward_cpu", [&] {
    // fed_scratch [B, P] (recurrent dropout), c_prev_scratch [B, H] (zoneout of c)
    const int64_t regularize_elements =
        (recurrent ? s.B * s.P : 0) + (zoneout.on_c() ? s.B * s.H : 0);
    const scalar_t* mask = recurrent ? recurrent_mask->data_ptr<scalar_t>() : nullptr;
    if (direct_steps(s)) {
      // bias [4H], exp_scratch [B, 4H], r_scratch [B, H], gates of one step [B, 4H]
      Workspace<scalar_t> work(G + s.B * G + (proj ? s.B * s.H : 0) +
                                   (keep_state ? 0 : s.B * G) + regularize_elements,
                               opts);
      scalar_t* fed_scratch = recurrent ? work.take(s.B * s.P) : nullptr;
      scalar_t* c_prev_scratch = zoneout.on_c() ? work.take(s.B * s.H) : nullptr;
      scalar_t* bias = work.take(G);
      combined_bias_into(bias_ih, bias_hh, G, bias);
      scalar_t* exp_scratch = work.take(s.B * G);
      scalar_t* r_scratch = proj ? work.take(s.B * s.H) : nullptr;
      scalar_t* gates_buffer = keep_state ? gates.data_ptr<scalar_t>() : work.take(s.B * G);
      const auto w_hh = weight_hh.expect_contiguous();
      const auto w_hr = contiguous_or_none(weight_hr);
      layer_forward_direct<scalar_t>(
          s, steps, reverse, restarts, x->data_ptr<scalar_t>(), h0c->data_ptr<scalar_t>(),
          c0c->data_ptr<scalar_t>(), w_ih->data_ptr<scalar_t>(), w_hh->data_ptr<scalar_t>(), bias,
          data_or_null<scalar_t>(w_hr), output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
          c_n.data_ptr<scalar_t>(), gates_buffer, keep_state,
          keep_state ? cells.data_ptr<scalar_t>() : nullptr, exp_scratch, r_scratch, zoneout,
          mask, fed_scratch, c_prev_scratch);
      return;
    }
    // w_hh_t [P, 4H], w_hr_t [H, P], bias [4H], exp_scratch [B, 4H], r_scratch [B, H],
    // gates for one chunk [chunk rows, 4H] or, pipelined, all rows (inference)
    Workspace<scalar_t> work(s.P * G + (proj ? s.H * s.P : 0) + G + s.B * G +
                                 (proj ? s.B * s.H : 0) + buffer_rows * G + regularize_elements,
                             opts);
    scalar_t* fed_scratch = recurrent ? work.take(s.B * s.P) : nullptr;
    scalar_t* c_prev_scratch = zoneout.on_c() ? work.take(s.B * s.H) : nullptr;
    scalar_t* w_hh_t = work.take(s.P * G);
    transpose_into(weight_hh, w_hh_t);
    scalar_t* w_hr_t = proj ? work.take(s.H * s.P) : nullptr;
    if (proj) {
      transpose_into(*weight_hr, w_hr_t);
    }
    scalar_t* bias = work.take(G);
    combined_bias_into(bias_ih, bias_hh, G, bias);
    scalar_t* exp_scratch = work.take(s.B * G);
    scalar_t* r_scratch = proj ? work.take(s.B * s.H) : nullptr;
    scalar_t* gates_buffer = keep_state ? gates.data_ptr<scalar_t>() : work.take(buffer_rows * G);
    layer_forward<scalar_t>(s, steps, reverse, restarts, x->data_ptr<scalar_t>(),
                            h0c->data_ptr<scalar_t>(), c0c->data_ptr<scalar_t>(),
                            w_ih->data_ptr<scalar_t>(), w_hh_t, bias, w_hr_t,
                            output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
                            c_n.data_ptr<scalar_t>(), gates_buffer, gates_all_rows, chunk_steps,
                            pipelined, keep_state ? cells.data_ptr<scalar_t>() : nullptr,
                            exp_scratch, r_scratch, zoneout, mask, fed_scratch, c_prev_scratch);
  });
  if (!keep_state) {
    // Nothing kept for a backward: both come back with no rows.
    std::vector<int64_t> none = per_step_shape(s, packed, 4 * s.H);
    none[0] = 0;
    gates = at::empty(none, opts);
    none.back() = s.H;
    cells = at::empty(none, opts);
  }
  return {output, h_n, c_n, gates, cells};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::lstm_layer_backward";
  const LayerSizes s = check_layer_backward_inputs(op, grad_output, grad_h_n, grad_c_n, input, h0,
                                                   c0, weight_ih, weight_hh, weight_hr,
                                                   batch_sizes, output, gates, cells);
  check_reset(op, reset, input, s);
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, batch_sizes.has_value());
  if (s.H == 0) {
    return no_hidden_units_backward(s, input, weight_hr.has_value(), need_grad_input);
  }
  const Steps steps(s, batch_sizes);
  const Restarts restarts(steps, reset, reverse);
  const Zoneout zoneout(zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h);
  const bool recurrent = recurrent_mask.has_value() && recurrent_mask->defined();
  const auto dy = contiguous_or_none(grad_output), dh_n = contiguous_or_none(grad_h_n),
             dc_n = contiguous_or_none(grad_c_n);
  if (is_low_precision(input.scalar_type())) {
    return layer_backward_lowp(s, steps, restarts, dy ? &*dy : nullptr, dh_n ? &*dh_n : nullptr,
                               dc_n ? &*dc_n : nullptr, input, h0, c0, weight_ih, weight_hh,
                               weight_hr, reverse, output, gates, cells, need_grad_input,
                               zoneout, recurrent_mask);
  }
  const auto x = input.expect_contiguous(), h0c = h0.expect_contiguous(),
             c0c = c0.expect_contiguous(), w_ih = weight_ih.expect_contiguous(),
             w_hh = weight_hh.expect_contiguous(), y = output.expect_contiguous(),
             gates_c = gates.expect_contiguous(), cells_c = cells.expect_contiguous();
  const auto w_hr = contiguous_or_none(weight_hr);
  const bool proj = w_hr.has_value();
  const auto opts = input.options();
  const int64_t G = 4 * s.H;
  Tensor grad_input = at::empty(rows_or_none(input.sizes(), need_grad_input), opts);
  Tensor grad_h0 = at::empty({s.B, s.P}, opts);
  Tensor grad_c0 = at::empty({s.B, s.H}, opts);
  Tensor grad_w_ih = at::empty({G, s.I}, opts);
  Tensor grad_w_hh = at::empty({G, s.P}, opts);
  Tensor grad_bias = at::empty({G}, opts);
  Tensor grad_w_hr = at::empty({proj ? s.P : 0, s.H}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    // dgates [N, 4H], xh [N, K], dw_cat [4H, K] (fuse_x), tanh_c [B, H], db_slices [B, 4H];
    // with projection dh_all [N, P], r_all [N, H], dr [B, H]. Copying x next to h pays when x
    // is narrow (measured: -16% backward time at I = 64, P = 128; +7% at I = P = 256).
    const bool fuse_x = 2 * s.I <= s.P;
    const int64_t K = (fuse_x ? s.I : 0) + s.P;
    const int64_t proj_elements = proj ? s.N * (s.P + s.H) + s.B * s.H : 0;
    const int64_t restart_elements = restarts.any() ? s.B * (s.P + s.H) : 0;
    // keep_dh [B, P] (zoneout of h); keep_dc, c_new [B, H] (zoneout of c)
    const int64_t zoneout_elements =
        (zoneout.on_h() ? s.B * s.P : 0) + (zoneout.on_c() ? 2 * s.B * s.H : 0);
    Workspace<scalar_t> work(s.N * (G + K) + (fuse_x ? G * K : 0) + s.B * s.H + s.B * G +
                                 proj_elements + restart_elements + zoneout_elements,
                             opts);
    scalar_t* keep_dh = zoneout.on_h() ? work.take(s.B * s.P) : nullptr;
    scalar_t* keep_dc = zoneout.on_c() ? work.take(s.B * s.H) : nullptr;
    scalar_t* c_new = zoneout.on_c() ? work.take(s.B * s.H) : nullptr;
    scalar_t* dgates = work.take(s.N * G);
    scalar_t* xh = work.take(s.N * K);
    scalar_t* dw_cat = fuse_x ? work.take(G * K) : nullptr;
    scalar_t* tanh_c = work.take(s.B * s.H);
    scalar_t* db_slices = work.take(s.B * G);
    scalar_t* dh_all = proj ? work.take(s.N * s.P) : nullptr;
    scalar_t* r_all = proj ? work.take(s.N * s.H) : nullptr;
    scalar_t* dr_scratch = proj ? work.take(s.B * s.H) : nullptr;
    // restart_dh [B, P], restart_dc [B, H]: what the restarts pass to h0, c0
    scalar_t* restart_dh = restarts.any() ? work.take(s.B * s.P) : nullptr;
    scalar_t* restart_dc = restarts.any() ? work.take(s.B * s.H) : nullptr;
    layer_backward<scalar_t>(
        s, steps, reverse, restarts, data_or_null<scalar_t>(dy), data_or_null<scalar_t>(dh_n),
        data_or_null<scalar_t>(dc_n), x->data_ptr<scalar_t>(), h0c->data_ptr<scalar_t>(),
        c0c->data_ptr<scalar_t>(), w_ih->data_ptr<scalar_t>(), w_hh->data_ptr<scalar_t>(),
        data_or_null<scalar_t>(w_hr), y->data_ptr<scalar_t>(), gates_c->data_ptr<scalar_t>(),
        cells_c->data_ptr<scalar_t>(), need_grad_input ? grad_input.data_ptr<scalar_t>() : nullptr,
        grad_h0.data_ptr<scalar_t>(), grad_c0.data_ptr<scalar_t>(),
        grad_w_ih.data_ptr<scalar_t>(), grad_w_hh.data_ptr<scalar_t>(),
        proj ? grad_w_hr.data_ptr<scalar_t>() : nullptr, grad_bias.data_ptr<scalar_t>(), dgates,
        fuse_x, xh, dw_cat, dh_all, r_all, dr_scratch, tanh_c, db_slices, restart_dh, restart_dc,
        backward_pipeline_chunks(s), zoneout,
        recurrent ? recurrent_mask->data_ptr<scalar_t>() : nullptr, keep_dh, keep_dc, c_new);
  });
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}


std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_cpu(const Tensor& input, const Tensor& hx,
                                                         const Tensor& cx, const Tensor& weight_ih,
                                                         const Tensor& weight_hh,
                                                         const optional<Tensor>& bias_ih,
                                                         const optional<Tensor>& bias_hh) {
  constexpr const char* op = "lstm_ext::lstm_cell_forward";
  const LayerSizes s = check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const Steps steps(s, c10::nullopt);
  if (is_low_precision(input.scalar_type())) {  // one step of the layer kernel
    auto [hy, h_n, cy, gates, cells] =
        layer_forward_lowp(s, steps, Restarts(), false, input, hx, cx, weight_ih, weight_hh,
                           bias_ih, bias_hh, c10::nullopt, false, /*keep_state=*/true);
    return {hy.view({s.B, s.H}), cy, gates.view({s.B, 4 * s.H})};
  }
  const auto x = input.expect_contiguous(), hxc = hx.expect_contiguous(),
             cxc = cx.expect_contiguous(), w_ih = weight_ih.expect_contiguous();
  const auto opts = input.options();
  const int64_t G = 4 * s.H;
  Tensor hy = at::empty({s.B, s.H}, opts);
  Tensor cy = at::empty({s.B, s.H}, opts);
  Tensor gates = at::empty({s.B, G}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_forward_cpu", [&] {
    const bool direct = direct_steps(s);
    // w_hh_t [H, 4H] (not direct), bias [4H], exp_scratch [B, 4H], h_n [B, H] (the layer
    // kernel's copy of hy)
    Workspace<scalar_t> work((direct ? 0 : s.H * G) + G + s.B * G + s.B * s.H, opts);
    scalar_t* bias = work.take(G);
    combined_bias_into(bias_ih, bias_hh, G, bias);
    scalar_t* exp_scratch = work.take(s.B * G);
    scalar_t* h_n = work.take(s.B * s.H);
    // One step of the layer kernel; its running c state is cy itself.
    if (direct) {
      const auto w_hh = weight_hh.expect_contiguous();
      layer_forward_direct<scalar_t>(
          s, steps, false, Restarts(), x->data_ptr<scalar_t>(), hxc->data_ptr<scalar_t>(),
          cxc->data_ptr<scalar_t>(), w_ih->data_ptr<scalar_t>(), w_hh->data_ptr<scalar_t>(), bias,
          nullptr, hy.data_ptr<scalar_t>(), h_n, cy.data_ptr<scalar_t>(),
          gates.data_ptr<scalar_t>(), /*gates_all_rows=*/true, nullptr, exp_scratch, nullptr,
          Zoneout(), nullptr, nullptr, nullptr);
      return;
    }
    scalar_t* w_hh_t = work.take(s.H * G);
    transpose_into(weight_hh, w_hh_t);
    layer_forward<scalar_t>(s, steps, false, Restarts(), x->data_ptr<scalar_t>(),
                            hxc->data_ptr<scalar_t>(),
                            cxc->data_ptr<scalar_t>(), w_ih->data_ptr<scalar_t>(), w_hh_t, bias,
                            nullptr, hy.data_ptr<scalar_t>(), h_n, cy.data_ptr<scalar_t>(),
                            gates.data_ptr<scalar_t>(), /*gates_all_rows=*/true,
                            /*chunk_steps=*/1, /*pipelined=*/false, nullptr, exp_scratch,
                            nullptr, Zoneout(), nullptr, nullptr, nullptr);
  });
  return {hy, cy, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_cpu(
    const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
    const Tensor& weight_ih, const Tensor& weight_hh, bool need_grad_input) {
  constexpr const char* op = "lstm_ext::lstm_cell_backward";
  const LayerSizes s = check_cell_backward_inputs(op, grad_hy, grad_cy, input, hx, cx, cy, gates,
                                                  weight_ih, weight_hh);

  const Steps steps(s, c10::nullopt);
  const auto dhy = contiguous_or_none(grad_hy), dcy = contiguous_or_none(grad_cy);
  if (is_low_precision(input.scalar_type())) {
    // One step of the layer kernel: its kept cell state is cy (in float32); the forward's output
    // is never read with one step (every row's previous h is hx), so hx stands in for it.
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, unused] =
        layer_backward_lowp(s, steps, Restarts(), dhy ? &*dhy : nullptr, nullptr,
                            dcy ? &*dcy : nullptr, input, hx, cx, weight_ih, weight_hh, c10::nullopt, false, hx, gates,
                            cy.to(at::kFloat), need_grad_input);
    return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
  }
  const auto x = input.expect_contiguous(), hxc = hx.expect_contiguous(),
             cxc = cx.expect_contiguous(), w_ih = weight_ih.expect_contiguous(),
             w_hh = weight_hh.expect_contiguous(), cy_c = cy.expect_contiguous(),
             gates_c = gates.expect_contiguous();
  const auto opts = input.options();
  const int64_t G = 4 * s.H;
  Tensor grad_input = at::empty({need_grad_input ? s.B : 0, s.I}, opts);
  Tensor grad_hx = at::empty({s.B, s.H}, opts);
  Tensor grad_cx = at::empty({s.B, s.H}, opts);
  Tensor grad_w_ih = at::empty({G, s.I}, opts);
  Tensor grad_w_hh = at::empty({G, s.H}, opts);
  Tensor grad_bias = at::empty({G}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_backward_cpu", [&] {
    // dgates [B, 4H], xh [B, H] (hx: the state the step read), tanh_c [B, H], db_slices [B, 4H].
    // x is not copied next to h (fuse_x): with one step the weight gradients go straight into
    // their outputs, without the copies out of a joint dW_cat.
    Workspace<scalar_t> work(s.B * G + s.B * s.H + s.B * s.H + s.B * G, opts);
    scalar_t* dgates = work.take(s.B * G);
    scalar_t* xh = work.take(s.B * s.H);
    scalar_t* tanh_c = work.take(s.B * s.H);
    scalar_t* db_slices = work.take(s.B * G);
    // One step of the layer backward: grad_hy is that step's output gradient, grad_cy its dc.
    // With one step the forward output is never read (every row's previous h is hx).
    layer_backward<scalar_t>(
        s, steps, false, Restarts(), data_or_null<scalar_t>(dhy), nullptr,
        data_or_null<scalar_t>(dcy), x->data_ptr<scalar_t>(), hxc->data_ptr<scalar_t>(), cxc->data_ptr<scalar_t>(),
        w_ih->data_ptr<scalar_t>(), w_hh->data_ptr<scalar_t>(), nullptr, nullptr,
        gates_c->data_ptr<scalar_t>(), cy_c->data_ptr<scalar_t>(),
        need_grad_input ? grad_input.data_ptr<scalar_t>() : nullptr, grad_hx.data_ptr<scalar_t>(),
        grad_cx.data_ptr<scalar_t>(), grad_w_ih.data_ptr<scalar_t>(),
        grad_w_hh.data_ptr<scalar_t>(), nullptr, grad_bias.data_ptr<scalar_t>(), dgates,
        /*fuse_x=*/false, xh, /*dw_cat=*/nullptr, nullptr, nullptr, nullptr, tanh_c, db_slices,
        /*restart_dh=*/nullptr, /*restart_dc=*/nullptr, /*pipeline_chunks=*/1, Zoneout(),
        nullptr, nullptr, nullptr, nullptr);
  });
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace

bool has_direct_blas_impl() { return has_direct_blas(); }
bool has_vml_impl() { return has_vml(); }

std::string gemm_settings_impl();

std::vector<std::pair<std::string, std::string>> gemm_backends_impl() {
  const std::string fp = "the GEMM seam: " + gemm_settings_impl();
  return {{"float32", fp},
          {"float64", fp},
          {"bfloat16", lowp_step_gemm_backend(at::kBFloat16)},
          {"float16", lowp_step_gemm_backend(at::kHalf)}};
}

VectorIsa vector_isa() {
  static const VectorIsa isa = [] {
    // ATen's capability, and the whole x86-64 level the variant is compiled for (ATen's AVX2
    // asks for AVX2 and FMA only; x86-64-v3 also for BMI2, MOVBE, ..., which a VM may hide).
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    if (capability == "AVX512" && __builtin_cpu_supports("x86-64-v4")) {
      return VectorIsa::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("x86-64-v3")) {
      return VectorIsa::kAvx2;
    }
    return VectorIsa::kBaseline;
  }();
  return isa;
}

std::string vector_code_impl() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return "x86-64-v4 (AVX-512)";
    case VectorIsa::kAvx2: return "x86-64-v3 (AVX2, FMA)";
    default: return "x86-64 baseline (SSE2)";
  }
}

}  // namespace cpu
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_ext::cpu::lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_ext::cpu::lstm_layer_backward_cpu);
  m.impl("lstm_cell_forward", &lstm_ext::cpu::lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_ext::cpu::lstm_cell_backward_cpu);
}
