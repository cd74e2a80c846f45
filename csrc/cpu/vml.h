// Elementwise exp and tanh over arrays, for the float64 CPU gate passes (float32 uses the fused
// loop with inline exp/tanh of vec_math.h).
//
// Why: the transcendental functions dominate the pointwise part of a step, and a scalar libm call
// per element does not vectorise. libtorch_cpu on x86 links MKL and exports its vector math
// library (vmsExp, vmdTanh, ...), which picks the widest SIMD path the CPU has at run time and is
// accurate to about 1 ulp in its high-accuracy mode. Declared weak, like the BLAS entry points:
// where torch does not export them (or LSTM_EXT_NO_MKL is set) we loop over std::exp / std::tanh
// (correct, slower).
#pragma once

#include <cmath>
#include <cstdint>

#include "blas.h"  // mkl_allowed()

extern "C" {
void vmsExp(const int n, const float* a, float* r, long long mode) __attribute__((weak));
void vmdExp(const int n, const double* a, double* r, long long mode) __attribute__((weak));
void vmsTanh(const int n, const float* a, float* r, long long mode) __attribute__((weak));
void vmdTanh(const int n, const double* a, double* r, long long mode) __attribute__((weak));
}

namespace lstm_ext {
namespace cpu {

// VML_HA (high accuracy) | VML_ERRMODE_NOERR (overflow of exp(-z) to inf is expected and harmless:
// σ becomes 0; nothing to report). FTZ/DAZ is left as the caller has it.
constexpr long long kVmlMode = 0x2 | 0x2000;

inline bool has_vml() {
  return mkl_allowed() && vmsExp && vmdExp && vmsTanh && vmdTanh;
}

// Below this many elements a VML call runs on the calling thread only. Left alone, VML hands even a
// 320-element exp to its OpenMP threads, and waking them costs more than the whole call (measured:
// the forward op at T=20, B=5, H=16 spent most of its time in the thread hand-off).
constexpr int64_t kVmlMinThreadedElements = 1 << 16;

template <typename T, typename Vml>
void call_vml(Vml fn, int64_t n, const T* a, T* r) {
  MklThreadsOnThisThread single(n < kVmlMinThreadedElements ? 1 : 0);
  fn(static_cast<int>(n), a, r, kVmlMode);
}

// r[k] = exp(a[k]) for k < n; r may equal a. n fits in int (checked at the op boundary).
inline void vector_exp(int64_t n, const float* a, float* r) {
  if (has_vml()) return call_vml(vmsExp, n, a, r);
  for (int64_t k = 0; k < n; ++k) r[k] = std::exp(a[k]);
}
inline void vector_exp(int64_t n, const double* a, double* r) {
  if (has_vml()) return call_vml(vmdExp, n, a, r);
  for (int64_t k = 0; k < n; ++k) r[k] = std::exp(a[k]);
}

// r[k] = tanh(a[k]) for k < n; r may equal a.
inline void vector_tanh(int64_t n, const float* a, float* r) {
  if (has_vml()) return call_vml(vmsTanh, n, a, r);
  for (int64_t k = 0; k < n; ++k) r[k] = std::tanh(a[k]);
}
inline void vector_tanh(int64_t n, const double* a, double* r) {
  if (has_vml()) return call_vml(vmdTanh, n, a, r);
  for (int64_t k = 0; k < n; ++k) r[k] = std::tanh(a[k]);
}

}  // namespace cpu
}  // namespace lstm_ext
