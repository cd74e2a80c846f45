// Where a layer's rows are, shared by the backends' host code.
//
// Every per-step tensor is laid out as the rows of the steps one after another: [T, B, .] for a
// plain sequence, or a PackedSequence's [N, .] where step t has batch_sizes[t] rows (the sequences
// still running, longest first).
#pragma once

#include <ATen/ATen.h>

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
};

}  // namespace lstm_ext
