// Where a layer's rows are, shared by the backends' host code.
//
// Every per-step tensor is laid out as the rows of the steps one after another: [T, B, .] for a
// plain sequence, or a PackedSequence's [N, .] where step t has batch_sizes[t] rows (the sequences
// still running, longest first).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "lstm_checks.h"

namespace lstm_ext {

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

}  // namespace lstm_ext
