// The backward time loop of a CPU layer, for every dtype (S and C as in layer_forward.h) and
// cell (the Cell policy, layer_forward.h): the steps in reverse processing order, then the weight
// gradients as GEMMs over their rows: over all rows at once; or over each chunk of steps after
// its steps (chunk_steps: the per-row buffers then hold one chunk); or, for float32 / float64
// plain layers with a second thread, over each finished chunk while the recurrence goes on.
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
#include "layer_forward.h"
#include "mixed_gemm.h"

namespace lstm_ext {
namespace cpu {

// How many chunks of steps the backward hands to a second thread for their weight gradients
// while the first runs the recurrence (1: no such pipeline). When the weight gradients are enough
// work to pay for waking a thread (at B = 1, H = 128 they are a third of the backward), and the
// batch is not split, or is but a whole step is at most kMaxPipelinedStepMacs: each thread's
// slice would then run GEMMs too small to be efficient, and one thread running the recurrence on
// every row beside one computing the weight gradients is faster (benchmarks/results/tuning.md).
constexpr int64_t kMaxPipelinedStepMacs = int64_t(1) << 18;

// Multiply-adds of a layer's dx, dW_ih and dW_hh.
inline int64_t weight_gradient_macs(const LayerSizes& s) {
  return s.N * 4 * s.H * (2 * s.I + s.P);
}

inline int64_t backward_pipeline_chunks(const LayerSizes& s) {
  const bool small_steps =
      !batch_is_split(s) || s.B * step_macs_per_row(s) <= kMaxPipelinedStepMacs;
  return small_steps && s.T >= 2 && weight_gradient_macs(s) >= kMinPipelinedMacs ? kPipelineChunks
                                                                                 : 1;
}

// Whether the backward's weight gradients and dx, after an unpipelined recurrence, may run as one
// task per thread (see layer_backward) rather than as GEMMs that MKL threads: with exactly two
// threads (the only count measured here) and enough work to pay for waking the second.
inline bool split_weight_gradients(const LayerSizes& s) {
  return at::get_num_threads() == 2 && !at::in_parallel_region() &&
         weight_gradient_macs(s) >= kMinPipelinedMacs;
}

// A backward whose cell has products of their own (the layer-normalised one) runs its steps in
// chunks of about this many gate values (at least one step), and the chunk's GEMMs (dx, dW_ih,
// dW_hh, dW_hr) after each: the per-row gradient buffers then hold one chunk, not every row.
// Measured at (100, 32, 64, 128), forward+backward: the whole-sequence buffers (15 MB) cost ~2 ms
// of fresh pages a call when another model ran in between.
constexpr int64_t kBackwardChunkElements = int64_t(1) << 18;

inline int64_t backward_chunk_steps(const LayerSizes& s) {
  return std::clamp<int64_t>(kBackwardChunkElements / std::max<int64_t>(s.B * 4 * s.H, 1), 1,
                             s.T);
}

// What one layer's backward reads and writes. Gradients are accumulated in C: they are the op
// kernel's outputs themselves where S is C; else it rounds them into its outputs after. The
// per-row workspaces (d_ih, d_hh, xh, dh_all, r_all) hold the rows of one chunk of chunk_steps
// steps (all rows when chunk_steps is T), from the chunk's first row.
template <typename S, typename C>
struct BackwardArgs {
  const S* dy;    // [rows, P] or null (absent gradients are zero)
  const S* dh_n;  // [B, P] or null
  const S* dc_n;  // [B, H] or null
  const S* x;     // [rows, I]
  const S* h0;    // [B, P]
  const C* c0;    // [B, H] (in C: a 16-bit layer's caller converts it)
  const S* w_ih;  // [4H, I], as stored
  const S* w_hh;  // [4H, P], as stored
  const PackedWeight<S>* w_hh_packed;  // W_hh packed for brgemm (16-bit, many steps), or null
  const S* w_hr;  // [P, H] or null
  const S* y;     // [rows, P]: the forward's output
  const C* gates;  // [rows, 4H]: the activated gates, saved by the forward
  const C* cells;  // [rows, H]: c_t (mixed by zoneout where on), saved by the forward
  C* dx;          // [rows, I] or null (not wanted)
  C* dh;          // [B, P]: the running dh, dh0 on return
  C* dc;          // [B, H]: the running dc, dc0 on return
  C* dw_ih;       // [4H, I]
  C* dw_hh;       // [4H, P]
  C* dw_hr;       // [P, H] (with w_hr)
  // [Cell::sums_width(H)]: the sums that become parameter gradients, the bias's [4H] first
  C* sums_total;
  // Workspaces: d_ih, d_hh [rows, 4H] (the gradients of the input and recurrent products, as the
  // GEMMs read them: the same rows for a plain cell); d_ih_step, d_hh_step [B, 4H] (the cell's
  // results before rounding) where S is not C, else null; xh [rows, K] (the h each step fed to
  // W_hh, after a copy of its x when fuse_x: dW_ih and dW_hh are then one GEMM, dG^T [x | h],
  // which packs dG once instead of twice; K = I + P with fuse_x, else P); dw_cat [4H, K] (with
  // fuse_x); with w_hr: dh_all [rows, P], r_all [rows, H], dr [B, H], and r_step [B, H] where
  // S is not C; tanh_c [B, H]; sums [B, sums_width] (a batch slice [b0, b1) sums in row b0).
  S* d_ih;
  S* d_hh;
  C* d_ih_step;
  C* d_hh_step;
  bool fuse_x;
  S* xh;
  C* dw_cat;
  S* dh_all;
  S* r_all;
  C* r_step;
  C* dr;
  C* tanh_c;
  C* sums;
  // restart_dh [B, P], restart_dc [B, H] (when any row restarts): what the restarts pass to dh0,
  // dc0, added at the end.
  C* restart_dh;
  C* restart_dc;
  int64_t chunk_steps;      // see above
  int64_t pipeline_chunks;  // backward_pipeline_chunks (float32 / float64 plain cells), else 1
  // Regularisers as in the forward, with their scratch: keep_dh [B, P] (zoneout of h), keep_dc
  // and c_new [B, H] (zoneout of c): the gradients zoneout passes to the state before, and c_t
  // before the mix.
  const Zoneout* zoneout;
  const S* recurrent_mask;
  C* keep_dh;
  C* keep_dc;
  C* c_new;
};

// Backward of one layer. Round: as layer_forward's.
template <typename S, typename C, typename Cell, typename Round = NoRounding>
void layer_backward(const LayerSizes& s, const LayerSteps& walk, const Cell& cell,
                    const BackwardArgs<S, C>& a) {
  constexpr bool kSame = std::is_same_v<S, C>;
  const Zoneout& zoneout = *a.zoneout;
  const bool fuse_x = a.fuse_x;
  const int64_t xw = fuse_x ? s.I : 0, K = xw + s.P;  // xh: [x (xw columns) | h (P columns)]
  const int64_t H = s.H, P = s.P, G = 4 * s.H, SW = cell.sums_width(H);
  start_backward_states(s.B, P, H, a.dh_n, a.dc_n, a.dh, a.dc,
                        walk.restarts.any() ? a.restart_dh : nullptr, a.restart_dc);
  std::fill(a.sums, a.sums + s.B * SW, C(0));
  // The reverse loop over batch rows [b0, b1), steps k_hi down to k_lo, whose rows in the
  // workspaces start at row `base` (rows are independent, as in the forward). With `done`, it
  // publishes how many steps it has finished (all rows).
  auto recurrence = [&](int64_t k_hi, int64_t k_lo, int64_t base, int64_t b0, int64_t b1,
                        std::atomic<int64_t>* done) {
    C* dh_state = a.dh + b0 * P;
    C* dc_state = a.dc + b0 * H;
    C* slice_sums = a.sums + b0 * SW;
    walk.backward(k_hi, k_lo, b0, b1, [&](const StepRows& step) {
      const int64_t n = step.n, row = step.row, n_prev = step.n_prev, prev_row = step.prev_row;
      const int64_t local = row - base;  // the row in the workspaces
      const uint8_t* restart = step.restart;  // rows that read h0 / c0 although r < n_prev
      if (fuse_x) {
        for (int64_t r = 0; r < n; ++r) {
          copy_elements(a.xh + (local + r) * K, a.x + (row + r) * s.I, s.I);
        }
      }
      // dW_hh multiplies the h the step fed to W_hh
      fed_state_rows(n, P, n_prev, restart, a.y + prev_row * P, a.h0 + b0 * P,
                     a.recurrent_mask ? a.recurrent_mask + b0 * P : nullptr,
                     a.xh + local * K + xw, K);
      if (Round::kOn && a.recurrent_mask) {  // the masked h, as the 16-bit loop stores it
        for (int64_t r = 0; r < n; ++r) {
          Round::apply(a.xh + (local + r) * K + xw, P);
        }
      }
      // dL/dh_t: from step t's output and from the step after it (already in dh_state).
      if (a.dy) {
        const S* dy_t = a.dy + row * P;
        for (int64_t u = 0; u < n * P; ++u) {
          dh_state[u] += static_cast<C>(dy_t[u]);
        }
      }
      C* keep_dh_rows = zoneout.on_h() ? a.keep_dh + b0 * P : nullptr;
      C* keep_dc_rows = zoneout.on_c() ? a.keep_dc + b0 * H : nullptr;
      const C* cells_t = zoneout_step_backward(
          zoneout, row, n, P, H, a.gates + row * G, a.cells + row * H, a.cells + prev_row * H,
          a.c0 + b0 * H, n_prev, restart, dh_state, dc_state, keep_dh_rows, keep_dc_rows,
          zoneout.on_c() ? a.c_new + b0 * H : nullptr);
      const C* dr = dh_state;  // dL/d(o ⊙ tanh c_t)
      if (a.w_hr) {
        S* dh_rows = a.dh_all + local * P;
        convert(dh_state, dh_rows, n * P);
        Round::apply(dh_rows, n * P);
        if constexpr (!kSame) {
          if (a.w_hh_packed) {
            PackedWeight<S>::release();  // MKL's GEMM sets the AMX tiles its own way
          }
        }
        C* dr_rows = a.dr + b0 * H;
        mul<S, C>(false, false, n, H, P, dh_rows, P, a.w_hr, H, C(0), dr_rows, H);  // dh W_hr
        dr = dr_rows;
      }
      S* d_ih_t = a.d_ih + local * G;
      S* d_hh_t = a.d_hh + local * G;
      C* d_ih;
      C* d_hh;
      C* r_rows = nullptr;  // o ⊙ tanh(c_t), for dW_hr
      if constexpr (kSame) {
        d_ih = d_ih_t;
        d_hh = d_hh_t;
        r_rows = a.w_hr ? a.r_all + local * H : nullptr;
      } else {
        d_ih = a.d_ih_step + b0 * G;
        d_hh = a.d_hh_step + b0 * G;
        r_rows = a.w_hr ? a.r_step + b0 * H : nullptr;
      }
      cell.backward(n, H, row, a.gates + row * G, cells_t, a.cells + prev_row * H, a.c0 + b0 * H,
                    n_prev, restart, dr, dc_state, d_ih, d_hh, slice_sums, r_rows,
                    a.tanh_c + b0 * H);
      if constexpr (!kSame) {
        if (a.w_hr) {
          convert(r_rows, a.r_all + local * H, n * H);
        }
        convert(d_ih, d_ih_t, n * G);
        if (d_hh != d_ih) {
          convert(d_hh, d_hh_t, n * G);
        }
      } else if constexpr (Round::kOn) {
        if (a.w_hr) {
          Round::apply(r_rows, n * H);
        }
        Round::apply(d_ih_t, n * G);
        if (d_hh_t != d_ih_t) {
          Round::apply(d_hh_t, n * G);
        }
      }
      // dL/dh of the state this step read = dZ_hh W_hh (⊙ the recurrent mask), + zoneout's part
      bool packed = false;
      if constexpr (!kSame) {
        if (a.w_hh_packed) {
          a.w_hh_packed->multiply(n, d_hh_t, G, false, dh_state, P);
          packed = true;
        }
      }
      if (!packed) {
        mul<S, C>(false, false, n, P, G, d_hh_t, G, a.w_hh, P, C(0), dh_state, P);
      }
      finish_step_backward(n, P, H, a.recurrent_mask ? a.recurrent_mask + b0 * P : nullptr,
                           keep_dh_rows, keep_dc_rows, restart, dh_state, dc_state,
                           walk.restarts.any() ? a.restart_dh + b0 * P : nullptr,
                           walk.restarts.any() ? a.restart_dc + b0 * H : nullptr);
      if (done) {
        done->store(s.T - step.k, std::memory_order_release);
      }
    });
    if constexpr (!kSame) {
      if (a.w_hh_packed) {
        PackedWeight<S>::release();
      }
    }
  };

  // The weight gradients and dx of rows [r0, r1) (their gradients and xh complete, in the
  // workspaces from row `base`): dx = dZ_ih W_ih; [dW_ih | dW_hh] (+)= dG^T [x | h] (or
  // dW_ih = dZ_ih^T x, dW_hh = dZ_hh^T h); dW_hr (+)= dH^T r. accumulate: add to what earlier
  // rows left.
  auto row_gradients = [&](int64_t r0, int64_t r1, int64_t base, bool accumulate) {
    const int64_t rows = r1 - r0, local = r0 - base;
    const C beta = accumulate ? C(1) : C(0);
    const S* d_ih = a.d_ih + local * G;
    const S* d_hh = a.d_hh + local * G;
    if (a.dx) {
      mul<S, C>(false, false, rows, s.I, G, d_ih, G, a.w_ih, s.I, C(0), a.dx + r0 * s.I, s.I);
    }
    if (fuse_x) {
      mul<S, C>(true, false, G, K, rows, d_hh, G, a.xh + local * K, K, beta, a.dw_cat, K);
    } else {
      mul<S, C>(true, false, G, s.I, rows, d_ih, G, a.x + r0 * s.I, s.I, beta, a.dw_ih, s.I);
      mul<S, C>(true, false, G, P, rows, d_hh, G, a.xh + local * K, K, beta, a.dw_hh, P);
    }
    if (a.w_hr) {
      mul<S, C>(true, false, P, H, rows, a.dh_all + local * P, P, a.r_all + local * H, H, beta,
                a.dw_hr, H);
    }
  };

  if (a.pipeline_chunks > 1 && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    // One slice (the batch is too small to split, or its steps too small to split well) and a
    // second thread: it computes the weight gradients of each finished chunk of steps while the
    // first runs the rest of the recurrence (the workspaces hold all rows).
    // Only the second thread waits (for the first's progress), so running the two tasks one after
    // the other, as a serial parallel_for does, is also correct.
    std::atomic<int64_t> done{0};
    const int64_t chunk = (s.T + a.pipeline_chunks - 1) / a.pipeline_chunks;
    at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
      for (int64_t task = task0; task < task1; ++task) {
        if (task == 0) {
          recurrence(s.T - 1, 0, 0, 0, s.B, &done);
          continue;
        }
        // Chunks in processing order: steps k = T-1 down to 0.
        for (int64_t k_hi = s.T - 1, first = 1; k_hi >= 0; k_hi -= chunk, first = 0) {
          const int64_t k_lo = std::max<int64_t>(0, k_hi - chunk + 1);
          wait_until_at_least(done, s.T - k_lo);
          const auto [row_begin, row_end] = walk.rows_of_steps(k_lo, k_hi + 1);
          row_gradients(row_begin, row_end, 0, !first);
        }
      }
    });
  } else if (a.chunk_steps < s.T) {
    // Chunks in processing order (k from T - 1 down); each chunk's rows are one range.
    for (int64_t k_hi = s.T - 1; k_hi >= 0; k_hi -= a.chunk_steps) {
      const int64_t k_lo = std::max<int64_t>(0, k_hi - a.chunk_steps + 1);
      const auto [row_begin, row_end] = walk.rows_of_steps(k_lo, k_hi + 1);
      for_each_batch_slice(s, [&](int64_t b0, int64_t b1) {
        recurrence(k_hi, k_lo, row_begin, b0, b1, nullptr);
      });
      row_gradients(row_begin, row_end, row_begin, k_hi != s.T - 1);
    }
  } else {
    for_each_batch_slice(
        s, [&](int64_t b0, int64_t b1) { recurrence(s.T - 1, 0, 0, b0, b1, nullptr); });
    if (kSame && !Cell::kSeparateProducts && split_weight_gradients(s) &&
        (fuse_x || direct_steps(s))) {
      // Two threads, one GEMM at a time each: one computes dx and the first g_split rows of
      // dW_cat = dG^T [x | h] (or of dW_ih and dW_hh), the other the remaining rows, as many
      // multiply-adds each (dx has I columns per gate row, the weight gradients I + P): faster
      // than MKL threading each whole GEMM with fuse_x; without it MKL keeps the GEMMs, but for a
      // short call (direct_steps: too few rows for MKL's threads). benchmarks/results/tuning.md.
      const S* dg = a.d_ih;
      const int64_t dx_columns = a.dx ? s.I : 0;
      const int64_t g_split = std::min<int64_t>(
          G, (G * (s.I + s.P - dx_columns) / (2 * (s.I + s.P)) + 8) / 16 * 16);
      auto dw_cat_rows = [&](int64_t g0, int64_t g1) {  // weight gradient rows [g0, g1)
        if (fuse_x) {
          mul<S, C>(true, false, g1 - g0, K, s.N, dg + g0, G, a.xh, K, C(0), a.dw_cat + g0 * K,
                    K);
        } else {
          mul<S, C>(true, false, g1 - g0, s.I, s.N, dg + g0, G, a.x, s.I, C(0),
                    a.dw_ih + g0 * s.I, s.I);
          mul<S, C>(true, false, g1 - g0, P, s.N, dg + g0, G, a.xh, K, C(0), a.dw_hh + g0 * P,
                    P);
        }
      };
      at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
        for (int64_t task = task0; task < task1; ++task) {
          if (task == 0) {
            if (a.dx) {
              mul<S, C>(false, false, s.N, s.I, G, dg, G, a.w_ih, s.I, C(0), a.dx, s.I);
            }
            dw_cat_rows(0, g_split);
          } else {
            dw_cat_rows(g_split, G);
          }
        }
      });
      if (a.w_hr) {
        mul<S, C>(true, false, P, H, s.N, a.dh_all, P, a.r_all, H, C(0), a.dw_hr, H);
      }
    } else {
      row_gradients(0, s.N, 0, false);
    }
  }
  if (walk.restarts.any()) {
    add_restart_gradients(s.B, P, H, a.restart_dh, a.restart_dc, a.dh, a.dc);
  }
  // The slices' sums (rows of sums no slice started at are zeros).
  std::fill(a.sums_total, a.sums_total + SW, C(0));
  for (int64_t b = 0; b < s.B; ++b) {
    const C* slice_sum = a.sums + b * SW;
    for (int64_t j = 0; j < SW; ++j) {
      a.sums_total[j] += slice_sum[j];
    }
  }
  if (fuse_x) {
    for (int64_t g = 0; g < G; ++g) {
      copy_elements(a.dw_ih + g * s.I, a.dw_cat + g * K, s.I);
      copy_elements(a.dw_hh + g * P, a.dw_cat + g * K + s.I, P);
    }
  }
}

}  // namespace cpu
}  // namespace lstm_ext
