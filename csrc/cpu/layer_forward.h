// The forward time loop of a CPU layer, for every dtype: storage type S (the layer's dtype) and
// compute type C (float32 for bfloat16 / float16 layers, else S; what each is used for:
// mixed_gemm.h).
//
// Per step there is no tensor allocation and no dispatcher call: one product on raw pointers for
// the recurrent term (and one for the projection, with proj_size) and one fused pass over the
// gates. The input projection is one GEMM per chunk of steps. A layer keeps running states h
// [B, P] (in S: the state a 16-bit LSTM carries) and c [B, H] (in C); step t reads and updates
// their first batch_sizes[t] rows, so finished sequences keep their last state, which is what
// h_n / c_n report. A reverse layer runs the steps from T-1 down to 0; a sequence then joins when
// its first (last in time) step comes, starting from its h0 / c0 row. Threads split the batch
// (for_each_batch_slice) and each runs every step on its rows (rows: csrc/lstm_steps.h).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "blas.h"
#include "gates.h"
#include "layer_common.h"
#include "mixed_gemm.h"

namespace lstm_ext {
namespace cpu {

// The forward's pipeline: a second thread projects the inputs of the next chunks of steps while
// the first runs the recurrence (float32 / float64 layers whose batch is not split). Inference
// then holds every step's gates (not one chunk): only up to kMaxPipelinedGates values.
constexpr int64_t kMaxPipelinedGates = int64_t(1) << 22;

inline bool forward_pipelined(const LayerSizes& s) {
  const int64_t projection_macs = s.N * 4 * s.H * s.I;
  return !batch_is_split(s) && s.T >= 2 && projection_macs >= kMinPipelinedMacs / 2 &&
         s.N * 4 * s.H <= kMaxPipelinedGates;
}

// How the forward multiplies by the weights, prepared once per call by the op kernel. The input
// projection multiplies x by w_ih as stored ([4H, I]); the recurrent product is one of:
//   w_hh_t      [P, 4H] S: W_hh transposed once per call (float32 / float64: the per-step GEMM is
//               then a plain row-major A @ B, which MKL runs 1.3-2x faster than A @ B^T at small
//               batch sizes)
//   w_hh_t_float [P, 4H] float32: a 16-bit layer of few rows (kFloatStepRows): h is converted to
//               float32 (exactly) into h_float [B, P] and multiplied through the GEMM seam
//   w_packed    [W_ih | W_hh]^T packed for brgemm (16-bit, many steps): each step multiplies
//               [x_t | h] (copied into xh [B, I + P]) once, with the input projection inside
//   w_hh        [4H, P] S as stored: MKL's 16-bit GEMM (16-bit otherwise)
// and the projection (proj_size) r W_hr^T: w_hr_t [H, P] (S is C) or w_hr [P, H] as stored.
template <typename S, typename C>
struct ForwardWeights {
  const S* w_ih = nullptr;
  const S* w_hh_t = nullptr;
  const float* w_hh_t_float = nullptr;
  float* h_float = nullptr;
  const PackedWeight<S>* w_packed = nullptr;
  S* xh = nullptr;
  const S* w_hh = nullptr;
  const S* w_hr_t = nullptr;
  const S* w_hr = nullptr;

  bool projects() const { return w_hr_t != nullptr || w_hr != nullptr; }

  // out [n, 4H] (row stride ld) = h_fed [n, P] @ W_hh^T + beta * out (with w_packed: out =
  // [x_t | h_fed] @ [W_ih | W_hh]^T), for the slice rows from b0.
  void recurrent(const LayerSizes& s, int64_t n, int64_t b0, const S* x_t, const S* h_fed, C* out,
                 int64_t ld, C beta) const {
    const int64_t G = 4 * s.H, P = s.P;
    if (w_hh_t) {
      mul<S, C>(false, false, n, G, P, h_fed, P, w_hh_t, G, beta, out, ld);
      return;
    }
    if constexpr (!std::is_same_v<S, C>) {
      if (w_packed) {
        const int64_t K = s.I + P;
        S* a = xh + b0 * K;
        for (int64_t i = 0; i < n; ++i) {
          copy_elements(a + i * K, x_t + i * s.I, s.I);
          copy_elements(a + i * K + s.I, h_fed + i * P, P);
        }
        w_packed->multiply(n, a, K, false, out, ld);
        return;
      }
      if (w_hh_t_float) {  // h (exact in float32) @ W_hh^T, summed in float32 as MKL's GEMM
        float* h = h_float + b0 * P;
        convert(h_fed, h, n * P);
        gemm<float>(false, false, n, G, P, 1.f, h, P, w_hh_t_float, G, beta, out, ld);
        return;
      }
    }
    mul<S, C>(false, true, n, G, P, h_fed, P, w_hh, P, beta, out, ld);
  }

  // out [n, P] = r [n, H] @ W_hr^T
  void projection(const LayerSizes& s, int64_t n, const S* r, C* out) const {
    if (w_hr_t) {
      mul<S, C>(false, false, n, s.P, s.H, r, s.H, w_hr_t, s.P, C(0), out, s.P);
    } else {
      mul<S, C>(false, true, n, s.P, s.H, r, s.H, w_hr, s.H, C(0), out, s.P);
    }
  }
};

// What one layer's forward reads and writes (rows as csrc/lstm_steps.h lays them out).
template <typename S, typename C>
struct ForwardArgs {
  const S* x;      // [rows, I]
  const S* h0;     // [B, P]
  const S* c0;     // [B, H]
  const C* bias;   // [4H]: b_ih + b_hh, or zeros
  S* y;            // [rows, P]
  S* h_n;          // [B, P], also the running h
  C* c_state;      // [B, H], the running c: c_n itself where S is C (else rounded into it after)
  // The input projection and, on return, the activated gates i, f, g, o: [rows, 4H] when
  // gates_all_rows (kept for the backward, or pipelined); else a buffer for chunk_steps steps'
  // rows, reused chunk after chunk, so inference does not hold all steps' gates at once (with
  // w_packed: one step's [B, 4H]). Either way the steps go chunk by chunk: project a chunk's
  // inputs, then run its steps while those gates are still in cache (measured: forward at
  // (50, 128, 512, 512) ~100 -> ~89 ms).
  C* gates;
  bool gates_all_rows;
  int64_t chunk_steps;
  bool pipelined;  // a second thread projects while the first runs the steps (S is C only)
  C* cells;        // [rows, H]: c_t of every step, or null when the backward will not run
  C* exp_scratch;  // [B, 4H]
  // r [B, H] = o ⊙ tanh(c_t) before the projection, with proj_size or where S is not C; else
  // null (r is y_t itself). With a projection and S not C: r_storage [B, H] (r rounded for the
  // GEMM) and y_compute [B, P] (its result, before rounding).
  C* r;
  S* r_storage;
  C* y_compute;
  // Regularisers (csrc/lstm_regularize.h): recurrent_mask [B, P] or null, with fed [B, P] (the
  // masked h fed to W_hh); c_prev [B, H] (c_{t-1}, to mix with c_t; zoneout of c).
  const Zoneout* zoneout;
  const S* recurrent_mask;
  S* fed;
  C* c_prev;
};

// Forward of one layer over all steps. The cell's kind is a policy: PlainCell (gates.h) or the
// layer-normalised cell (lstm_cpu_layer_norm.cpp). A Cell has
//   kSeparateProducts  false: a step's input and recurrent products are summed into its gate rows
//                      [n, 4H] (the input projection first, a chunk at a time); true: each goes
//                      to its own rows, input_products(row) and recurrent_products(row), with
//                      row stride products_ld(), for the cell's pass to combine
//   forward(n, H, row, gates_t, bias, c, r, exp_scratch)  the step's gate pass: gates_t [n, 4H]
//                      in: the summed products (plain); out: activated i, f, g, o; c [n, H] in:
//                      c_{t-1}, out: c_t; r [n, H] out: h_t before any projection
//   sums_width(H), backward(...)  for layer_backward (layer_backward.h)
// Round (mixed_gemm.h): how GEMM inputs and the carried h are rounded where S is C.
template <typename S, typename C, typename Cell, typename Round = NoRounding>
void layer_forward(const LayerSizes& s, const LayerSteps& walk, const ForwardWeights<S, C>& w,
                   const Cell& cell, const ForwardArgs<S, C>& a) {
  constexpr bool kSame = std::is_same_v<S, C>;
  const int64_t H = s.H, P = s.P, G = 4 * s.H;
  const Zoneout& zoneout = *a.zoneout;
  const bool fused_projection = w.w_packed != nullptr;
  // Where the gate rows are not all kept and no chunk is projected into them, they are one
  // step's [B, 4H].
  const bool step_buffer =
      !a.gates_all_rows && (fused_projection || Cell::kSeparateProducts);
  copy_elements(a.h_n, a.h0, s.B * P);
  convert(a.c0, a.c_state, s.B * H);
  auto chunk_gates = [&](int64_t row_begin) {
    return a.gates_all_rows ? a.gates + row_begin * G : a.gates;
  };
  // Input projection of a chunk's steps at once: x W_ih^T (the bias is added in the gate pass).
  auto project = [&](int64_t k0, int64_t k1) {
    if (fused_projection) {
      return;
    }
    const auto [row_begin, row_end] = walk.rows_of_steps(k0, k1);
    C* out = chunk_gates(row_begin);
    int64_t ld = G;
    if constexpr (Cell::kSeparateProducts) {
      out = cell.input_products(row_begin);
      ld = cell.products_ld();
    }
    mul<S, C>(false, true, row_end - row_begin, G, s.I, a.x + row_begin * s.I, s.I, w.w_ih, s.I,
              C(0), out, ld);
  };
  // Steps [k0, k1) on batch rows [b0, b1).
  auto run_steps = [&](int64_t k0, int64_t k1, int64_t b0, int64_t b1) {
    const int64_t row_begin = walk.rows_of_steps(k0, k1).first;
    C* gates_chunk = chunk_gates(row_begin);
    S* h_state = a.h_n + b0 * P;
    C* c_state = a.c_state + b0 * H;
    walk.forward(k0, k1, b0, b1, [&](const StepRows& step) {
      const int64_t n = step.n, row = step.row;
      C* gates_t = step_buffer ? a.gates + b0 * G : gates_chunk + (row - row_begin) * G;
      S* y_t = a.y + row * P;
      if (step.restart) {
        restart_states(step.restart, n, P, H, a.h0 + b0 * P, a.c0 + b0 * H, h_state, c_state);
      }
      const S* h_fed = h_state;
      if (a.recurrent_mask) {
        mask_rows(n, P, h_state, a.recurrent_mask + b0 * P, a.fed + b0 * P);
        Round::apply(a.fed + b0 * P, n * P);
        h_fed = a.fed + b0 * P;
      }
      if constexpr (Cell::kSeparateProducts) {
        w.recurrent(s, n, b0, a.x + row * s.I, h_fed, cell.recurrent_products(row),
                    cell.products_ld(), C(0));
      } else {
        w.recurrent(s, n, b0, a.x + row * s.I, h_fed, gates_t, G, C(1));
      }
      C* c_prev = zoneout.on_c() ? a.c_prev + b0 * H : nullptr;
      if (c_prev) {
        copy_elements(c_prev, c_state, n * H);
      }
      // c_state holds c_{t-1} and receives c_t.
      C* r_t;
      if constexpr (kSame) {
        r_t = a.r ? a.r + b0 * H : y_t;
      } else {
        r_t = a.r + b0 * H;
      }
      cell.forward(n, H, row, gates_t, a.bias, c_state, r_t, a.exp_scratch + b0 * G);
      if (c_prev) {
        zoneout_mix(zoneout.c_rows(row, H), zoneout.p_c, n * H, c_prev, c_state);
      }
      if (a.cells) {
        copy_elements(a.cells + row * H, c_state, n * H);
      }
      if (w.projects()) {  // y_t = r W_hr^T
        if constexpr (kSame) {
          Round::apply(r_t, n * H);
          w.projection(s, n, r_t, y_t);
          Round::apply(y_t, n * P);
        } else {
          S* r_rows = a.r_storage + b0 * H;
          C* y_rows = a.y_compute + b0 * P;
          convert(r_t, r_rows, n * H);
          if (fused_projection) {
            // MKL's GEMM configures the AMX tiles its own way: the micro-kernel must set its
            // configuration again afterwards, or its next tile instruction faults.
            PackedWeight<S>::release();
          }
          w.projection(s, n, r_rows, y_rows);
          convert(y_rows, y_t, n * P);
        }
      } else if constexpr (!kSame) {
        convert(r_t, y_t, n * H);
      } else {
        Round::apply(y_t, n * H);
      }
      if (zoneout.on_h()) {
        zoneout_mix(zoneout.h_rows(row, P), zoneout.p_h, n * P, h_state, y_t);
        Round::apply(y_t, n * P);
      }
      copy_elements(h_state, y_t, n * P);  // the next step reads it (rounded to S)
    });
    if constexpr (!kSame) {
      if (fused_projection) {
        PackedWeight<S>::release();
      }
    }
  };

  if (a.pipelined && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // The whole batch on one thread (too small to split) while a second projects the next
    // chunks' inputs (gates_all_rows: each chunk has its own rows). Only the recurrence waits
    // (for the projection's progress), so a serial parallel_for, which runs task 0 first, is
    // also correct.
    std::atomic<int64_t> projected{0};  // steps whose inputs are projected, in processing order
    at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
      for (int64_t task = task0; task < task1; ++task) {
        for (int64_t k0 = 0; k0 < s.T; k0 += a.chunk_steps) {
          const int64_t k1 = std::min(s.T, k0 + a.chunk_steps);
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
  } else {
    // Project a chunk, then run its steps while those gates are still in cache.
    for (int64_t k0 = 0; k0 < s.T; k0 += a.chunk_steps) {
      const int64_t k1 = std::min(s.T, k0 + a.chunk_steps);
      project(k0, k1);
      for_each_batch_slice(s, [&](int64_t b0, int64_t b1) { run_steps(k0, k1, b0, b1); });
    }
  }
}

// A call with few rows in all (an LSTMCell step, a streaming call of one step or a few), float32
// and float64: the steps multiply by the weights as they are stored, [4H, K] (small_gemm_nt),
// with each step's input projection done with its recurrent product. Transposing the weights
// first (and the allocation that holds the copy), as a longer call does once, costs more than
// such a call's products: a [1024, 256] W_hh takes ~200 us to transpose, a B = 1 step's product
// ~10 us. No per-call work scales with the weights but the products themselves, and nothing
// derived from the weights is kept between calls (an in-place change of a weight through .data,
// which no version counter records, would make a kept copy silently stale).
constexpr int64_t kMaxDirectRows = 32;

inline bool direct_steps(const LayerSizes& s) { return s.N <= kMaxDirectRows; }

// A direct step's hidden units are split over the threads (each computes its units' four gate
// blocks, with the same half of the weights every call, so that half stays in its core's cache)
// from this many multiply-adds per step; below it a fork/join costs more than it saves.
constexpr int64_t kMinSplitStepMacs = int64_t(1) << 17;

// Forward of one layer, directly on the weights (direct_steps): a's fields as layer_forward's
// (c_state is c_n; gates_all_rows, or gates is one step's [B, 4H]; r [B, H] with w_hr only);
// w_ih [4H, I], w_hh [4H, P], w_hr [P, H] or null, as stored.
template <typename T>
void layer_forward_direct(const LayerSizes& s, const LayerSteps& walk, const T* w_ih,
                          const T* w_hh, const T* w_hr, const ForwardArgs<T, T>& a) {
  const int64_t H = s.H, P = s.P, G = 4 * s.H, I = s.I;
  const Zoneout& zoneout = *a.zoneout;
  T* h_n = a.h_n;
  T* c_n = a.c_state;
  copy_elements(h_n, a.h0, s.B * P);
  copy_elements(c_n, a.c0, s.B * H);
  const bool split = at::get_num_threads() > 1 && !at::in_parallel_region() && H >= 32 &&
                     s.B * G * (I + P) >= kMinSplitStepMacs;
  walk.forward(0, s.T, 0, s.B, [&](const StepRows& step) {
    const int64_t n = step.n, row = step.row;
    const T* x_t = a.x + row * I;
    T* gates_t = a.gates_all_rows ? a.gates + row * G : a.gates;
    T* y_t = a.y + row * P;
    T* r_t = w_hr ? a.r : y_t;  // o ⊙ tanh(c_t), before any projection
    if (step.restart) {
      restart_states(step.restart, n, P, H, a.h0, a.c0, h_n, c_n);
    }
    const T* h_fed = h_n;
    if (a.recurrent_mask) {
      mask_rows(n, P, h_n, a.recurrent_mask, a.fed);
      h_fed = a.fed;
    }
    if (zoneout.on_c()) {
      copy_elements(a.c_prev, c_n, n * H);
    }
    // Units [j0, j1): their columns of each gate block, then their gate pass (h_n, the state this
    // step reads, is written only after every unit is done).
    auto units = [&](int64_t j0, int64_t j1) {
      for (int64_t gate = 0; gate < 4; ++gate) {
        const int64_t col = gate * H + j0;
        small_gemm_nt_sum(n, j1 - j0, NtTerm<T>{x_t, I, w_ih + col * I, I, I},
                          NtTerm<T>{h_fed, P, w_hh + col * P, P, P}, gates_t + col, G);
      }
      gates_forward(n, H, j0, j1, gates_t, a.bias, c_n, r_t, a.exp_scratch);
    };
    if (split) {
      at::parallel_for(0, H, 16, units);
    } else {
      units(0, H);
    }
    if (zoneout.on_c()) {
      zoneout_mix(zoneout.c_rows(row, H), zoneout.p_c, n * H, a.c_prev, c_n);
    }
    if (a.cells) {
      copy_elements(a.cells + row * H, c_n, n * H);
    }
    if (w_hr) {
      small_gemm_nt(n, P, H, r_t, H, w_hr, H, false, y_t, P);  // r W_hr^T
    }
    if (zoneout.on_h()) {
      zoneout_mix(zoneout.h_rows(row, P), zoneout.p_h, n * P, h_n, y_t);
    }
    copy_elements(h_n, y_t, n * P);
  });
}

}  // namespace cpu
}  // namespace lstm_ext
