// Where a layer's rows are, shared by the backends' host code.
//
// Every per-step tensor is laid out as the rows of the steps one after another: [T, B, .] for a
// plain sequence, or a PackedSequence's [N, .] where step t has batch_sizes[t] rows (the sequences
// still running, longest first).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "lstm_checks.h"

namespace lstm_ext {

// dst[0, count) = src[0, count) for trivially copyable T. An empty tensor's data pointer is null,
// and memcpy with a null pointer is undefined behaviour even for 0 bytes: nothing is copied then.
template <typename T>
inline void copy_elements(T* dst, const T* src, int64_t count) {
  if (count > 0) {
    std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(T));
  }
}

// Where each time step's rows are: offset[t] (in rows) and batch[t] (active rows).
struct Steps {
  std::vector<int64_t> offset, batch;

  Steps(const LayerSizes& s, const c10::optional<at::Tensor>& batch_sizes)
      : offset(s.T), batch(s.T) {
    const at::Tensor bs = batch_sizes.has_value() ? batch_sizes->contiguous() : at::Tensor();
    int64_t rows = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      offset[t] = rows;
      batch[t] = bs.defined() ? bs.data_ptr<int64_t>()[t] : s.B;
      rows += batch[t];
    }
  }
  // The time index of the k-th step processed (a reverse layer runs backwards in time).
  static int64_t time_of(int64_t k, int64_t T, bool reverse) { return reverse ? T - 1 - k : k; }

  // The rows [first, end) of the steps processed k0 .. k1-1: consecutive in time either way, so
  // one range.
  std::pair<int64_t, int64_t> rows_of_steps(int64_t k0, int64_t k1, bool reverse) const {
    const int64_t T = static_cast<int64_t>(offset.size());
    const int64_t t_a = time_of(k0, T, reverse), t_b = time_of(k1 - 1, T, reverse);
    const int64_t t_first = std::min(t_a, t_b), t_last = std::max(t_a, t_b);
    return {offset[t_first], offset[t_last] + batch[t_last]};
  }
};

// The rows that start anew from h0 / c0 in mid-sequence, from a layer's `reset` (bool [T, B]:
// reset[t, b], row b's sequence ends before step t and a new one starts at step t), as flags in
// the layer's own direction. A forward layer restarts row b at step t where reset[t, b]. A
// reverse layer meets each boundary from the other side: it runs the later sequence first, and
// restarts row b at step t - 1, the last step of the earlier one. Step 0 needs no flag (every
// row starts from h0 / c0 there), and a packed row's flags past its last step are ignored.
class Restarts {
 public:
  Restarts() = default;  // no row restarts
  Restarts(const Steps& steps, const c10::optional<at::Tensor>& reset, bool reverse) {
    if (!reset.has_value() || !reset->defined()) {
      return;
    }
    const at::Tensor flags = reset->contiguous();
    const bool* p = flags.data_ptr<bool>();
    const int64_t T = static_cast<int64_t>(steps.batch.size());
    B_ = T > 0 ? steps.batch[0] : 0;
    flags_.assign(T * B_, 0);
    step_has_.assign(T, 0);
    for (int64_t boundary = 1; boundary < T; ++boundary) {
      const int64_t t = reverse ? boundary - 1 : boundary;
      // the rows that run at both steps of the boundary (a packed batch shrinks with time)
      for (int64_t b = 0; b < steps.batch[boundary]; ++b) {
        if (p[boundary * B_ + b]) {
          flags_[t * B_ + b] = 1;
          step_has_[t] = 1;
        }
      }
    }
  }
  // Flags of the rows from b0 on at step t (1: the row starts anew from h0 / c0), or null when
  // no row does.
  const uint8_t* at(int64_t t, int64_t b0) const {
    return step_has_.empty() || !step_has_[t] ? nullptr : flags_.data() + t * B_ + b0;
  }
  bool any() const { return !step_has_.empty(); }

 private:
  int64_t B_ = 0;
  std::vector<uint8_t> flags_;     // [T, B]
  std::vector<uint8_t> step_has_;  // [T]: whether any row of step t restarts
};

// One step of a batch slice [b0, b1), as a time loop sees it.
struct StepRows {
  int64_t k;                // its place in processing order
  int64_t t;                // its time index
  int64_t n;                // its active rows of the slice: b0 .. b0 + n - 1 (n > 0)
  int64_t row;              // the layer row of the first of them
  const uint8_t* restart;   // the flags of those rows (Restarts::at), or null when none restarts
  // Backward walks only: of the step processed just before it in the forward, the first n_prev
  // rows of the slice carried h and c into this step, and row prev_row is the first of them.
  int64_t n_prev = 0, prev_row = 0;
};

// A layer's steps in one direction, with their restarts: the row bookkeeping every time loop
// shares (which rows of a slice run at a step, where they are, which restart).
struct LayerSteps {
  const Steps& steps;
  const Restarts& restarts;
  bool reverse;

  int64_t T() const { return static_cast<int64_t>(steps.batch.size()); }
  std::pair<int64_t, int64_t> rows_of_steps(int64_t k0, int64_t k1) const {
    return steps.rows_of_steps(k0, k1, reverse);
  }
  // body(StepRows) for the steps k0 .. k1 - 1 in processing order that have rows in [b0, b1).
  template <typename F>
  void forward(int64_t k0, int64_t k1, int64_t b0, int64_t b1, const F& body) const {
    for (int64_t k = k0; k < k1; ++k) {
      const StepRows step = at_step(k, b0, b1);
      if (step.n > 0) {
        body(step);
      }
    }
  }
  // body(StepRows), with n_prev and prev_row, for the steps k_hi down to k_lo that have rows in
  // [b0, b1): a backward's order.
  template <typename F>
  void backward(int64_t k_hi, int64_t k_lo, int64_t b0, int64_t b1, const F& body) const {
    for (int64_t k = k_hi; k >= k_lo; --k) {
      StepRows step = at_step(k, b0, b1);
      if (step.n <= 0) {
        continue;
      }
      if (k > 0) {
        const int64_t t_prev = Steps::time_of(k - 1, T(), reverse);
        step.n_prev = std::max<int64_t>(0, std::min(steps.batch[t_prev], b0 + step.n) - b0);
        step.prev_row = steps.offset[t_prev] + b0;
      }
      body(step);
    }
  }

 private:
  StepRows at_step(int64_t k, int64_t b0, int64_t b1) const {
    const int64_t t = Steps::time_of(k, T(), reverse);
    const int64_t n = std::min(b1, steps.batch[t]) - b0;
    return {k, t, n, steps.offset[t] + b0, n > 0 ? restarts.at(t, b0) : nullptr};
  }
};

// The state row b of a step read in the forward (backward's view): the step before's row
// (prev_rows + b * width) for the first n_prev rows that did not restart, else the initial
// state's (init_rows + b * width: the row joined at this step, or started anew).
template <typename T>
const T* state_read(int64_t b, int64_t n_prev, const uint8_t* restarts, const T* prev_rows,
                    const T* init_rows, int64_t width) {
  const bool from_init = b >= n_prev || (restarts && restarts[b]);
  return (from_init ? init_rows : prev_rows) + b * width;
}

// Before step t, rows [0, n) whose flag is set restart: the running states take h0 / c0's rows.
// (C: the running c's type, float32 for the 16-bit kernels.)
template <typename T, typename C, typename C0>
void restart_states(const uint8_t* restarts, int64_t n, int64_t P, int64_t H, const T* h0_rows,
                    const C0* c0_rows, T* h_rows, C* c_rows) {
  for (int64_t r = 0; r < n; ++r) {
    if (restarts[r]) {
      std::copy(h0_rows + r * P, h0_rows + (r + 1) * P, h_rows + r * P);
      for (int64_t j = 0; j < H; ++j) {
        c_rows[r * H + j] = static_cast<C>(c0_rows[r * H + j]);
      }
    }
  }
}

// After step t's backward, for the rows that restarted at t: dL/dh and dL/dc of the state that
// step read are h0's and c0's (added to dh0_rows, dc0_rows), and the running dh, dc go on to the
// step before from zero (that step's state did not reach this one).
template <typename D>
void move_restart_gradients(const uint8_t* restarts, int64_t n, int64_t P, int64_t H,
                            D* dh_rows, D* dc_rows, D* dh0_rows, D* dc0_rows) {
  for (int64_t r = 0; r < n; ++r) {
    if (restarts[r]) {
      for (int64_t j = 0; j < P; ++j) {
        dh0_rows[r * P + j] += dh_rows[r * P + j];
        dh_rows[r * P + j] = D(0);
      }
      for (int64_t j = 0; j < H; ++j) {
        dc0_rows[r * H + j] += dc_rows[r * H + j];
        dc_rows[r * H + j] = D(0);
      }
    }
  }
}

// At the start of a backward: the running dh [B, P], dc [B, H] begin as dh_n, dc_n (zeros where
// null), and restart_dh, restart_dc (what the restarts pass to h0, c0; null without restarts) as
// zeros. (dh_n, dc_n may be stored in a narrower type S than the running D: converted.)
template <typename S, typename D>
void start_backward_states(int64_t B, int64_t P, int64_t H, const S* dh_n, const S* dc_n, D* dh,
                           D* dc, D* restart_dh, D* restart_dc) {
  if (dh_n) {
    std::copy(dh_n, dh_n + B * P, dh);
  } else {
    std::fill(dh, dh + B * P, D(0));
  }
  if (dc_n) {
    std::copy(dc_n, dc_n + B * H, dc);
  } else {
    std::fill(dc, dc + B * H, D(0));
  }
  if (restart_dh) {
    std::fill(restart_dh, restart_dh + B * P, D(0));
    std::fill(restart_dc, restart_dc + B * H, D(0));
  }
}

// At the end of a backward: dh0 [B, P], dc0 [B, H] also get what the restarts passed on
// (restart_dh, restart_dc: move_restart_gradients' dh0_rows, dc0_rows over the whole batch).
template <typename D>
void add_restart_gradients(int64_t B, int64_t P, int64_t H, const D* restart_dh,
                           const D* restart_dc, D* dh0, D* dc0) {
  for (int64_t u = 0; u < B * P; ++u) {
    dh0[u] += restart_dh[u];
  }
  for (int64_t u = 0; u < B * H; ++u) {
    dc0[u] += restart_dc[u];
  }
}

}  // namespace lstm_ext
