// What the CPU layer kernels share (the plain loops in layer_forward.h / layer_backward.h, the
// layer-normalised and int8 ones): how the batch is split over threads, the pipelines' hand-off,
// and the per-call preparation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

#include "../lstm_checks.h"
#include "blas.h"  // MklThreadsOnThisThread

namespace lstm_ext {
namespace cpu {

using at::Tensor;
using c10::optional;

// Batch rows are independent through the whole sequence (row b of step t reads only row b of the
// state), so threads split the batch and each runs every step on its own rows: no synchronisation
// per step. (Threading each step's small GEMM instead cost a fork/join per step.) A slice gets at
// least this many multiply-adds of recurrent GEMM per step, or the split is not worth a thread.
constexpr int64_t kMinStepMacsPerThread = 1 << 15;

// Below this many multiply-adds a step's GEMMs run on one thread: MKL would otherwise hand even a
// [1, 128] x [128, 512] product to its threads, and the fork/join per step costs more than it saves.
constexpr int64_t kMinThreadedStepMacs = 1 << 20;

inline int64_t step_macs_per_row(const LayerSizes& s) {
  return 4 * s.H * s.P + (s.P != s.H ? s.P * s.H : 0);
}

inline int64_t batch_slice_grain(const LayerSizes& s) {
  return std::max<int64_t>(1, kMinStepMacsPerThread / std::max<int64_t>(step_macs_per_row(s), 1));
}

// Whether the batch is large enough to split over threads (with more than one thread).
inline bool batch_is_split(const LayerSizes& s) { return s.B > batch_slice_grain(s); }

// Runs body(b0, b1) over slices of the batch [0, B), in parallel when a step has enough work.
template <typename F>
void for_each_batch_slice(const LayerSizes& s, const F& body) {
  const int64_t macs_per_row = step_macs_per_row(s);
  if (!batch_is_split(s) || at::get_num_threads() == 1) {
    // One slice: the whole batch on this thread (inside an OpenMP region MKL runs serially anyway).
    MklThreadsOnThisThread single(s.B * macs_per_row < kMinThreadedStepMacs ? 1 : 0);
    body(int64_t(0), s.B);
    return;
  }
  at::parallel_for(0, s.B, batch_slice_grain(s), body);
}

// The loops' pipelines (layer_forward.h, layer_backward.h): a second thread works on finished
// (or upcoming) chunks of steps while the first runs the recurrence, in this many chunks, where
// that work is at least kMinPipelinedMacs multiply-adds (benchmarks/results/tuning.md).
constexpr int64_t kPipelineChunks = 8;
constexpr int64_t kMinPipelinedMacs = int64_t(1) << 21;

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

template <typename T>
T* data_or_null(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

inline optional<Tensor> contiguous_or_none(const optional<Tensor>& t) {
  if (t.has_value() && t->defined()) {
    return t->contiguous();
  }
  return c10::nullopt;
}

// The per-call preparation runs for every call, so at small sizes it must cost little: one
// allocation for all scratch buffers, and transposes / bias sums as plain loops, not ATen calls
// (each of which costs about a microsecond of dispatch).

// Gate values the forward projects at once (a chunk of steps): 2^20 floats is 4 MB, large enough
// that the chunk's input-projection GEMM stays efficient, small enough to stay in cache.
constexpr int64_t kChunkElements = 1 << 20;

// Hands out consecutive pieces of one allocation.
template <typename T>
class Workspace {
 public:
  Workspace(int64_t elements, const at::TensorOptions& options)
      : buffer_(at::empty({elements}, options)), next_(buffer_.data_ptr<T>()) {}
  T* take(int64_t elements) {
    T* piece = next_;
    next_ += elements;
    return piece;
  }

 private:
  Tensor buffer_;
  T* next_;
};

// dst [cols, rows] (contiguous) = src^T, for a 2-D src [rows, cols] with any strides; in tiles,
// so that both sides stay in cache. Tiles of rows write disjoint columns of dst, so large weights
// are split over the threads (single-threaded, the [W_ih | W_hh]^T stack of a bfloat16 forward at
// H = 512 was ~4% of its time, the other thread waiting); small ones stay on the caller's thread.
template <typename T>
void transpose_into(const Tensor& src, T* dst) {
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t rs = src.stride(0), cs = src.stride(1);
  const T* p = src.data_ptr<T>();
  constexpr int64_t tile = 32;
  constexpr int64_t kMinElementsPerTask = int64_t{1} << 18;
  const int64_t tiles = (rows + tile - 1) / tile;
  const int64_t grain =
      std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, tile * cols));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t r0 = t0 * tile; r0 < std::min(rows, t1 * tile); r0 += tile) {
      for (int64_t c0 = 0; c0 < cols; c0 += tile) {
        const int64_t r1 = std::min(rows, r0 + tile), c1 = std::min(cols, c0 + tile);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t r = r0; r < r1; ++r) {
            dst[c * rows + r] = p[r * rs + c * cs];
          }
        }
      }
    }
  });
}

// dst [4H] = b_ih + b_hh, or zeros without bias (the gate pass always adds one). The biases are
// stored as S (T, or bfloat16 / float16 for a float32 sum).
template <typename T, typename S = T>
void combined_bias_into(const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
                        int64_t G, T* dst) {
  if (!bias_ih.has_value()) {
    std::fill(dst, dst + G, T(0));
    return;
  }
  const S* a = bias_ih->data_ptr<S>();
  const S* b = bias_hh->data_ptr<S>();
  const int64_t sa = bias_ih->stride(0), sb = bias_hh->stride(0);
  for (int64_t k = 0; k < G; ++k) {
    dst[k] = static_cast<T>(a[k * sa]) + static_cast<T>(b[k * sb]);
  }
}

}  // namespace cpu
}  // namespace lstm_ext
