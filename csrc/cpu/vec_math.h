// float32 exp, sigmoid and tanh written so that the compiler vectorises loops that call them
// (no libm calls, no branches: the clamps are selects).
//
// Why: a float32 step's gate pass is a handful of transcendentals per unit; calling a vector
// library once per block costs a call and a pass over memory per function, which at small sizes
// is most of the step. Inlined into one fused loop, the whole gate pass is one pass.
// Accuracy (checked over [-20, 20] against double precision, with and without FMA): sigmoid
// <= 2.5 ulp, tanh <= 2.5 ulp (<= 1.5 ulp of 1 in absolute terms) for normal results; NaN
// propagates; ±inf give the limits. Polynomial coefficients are Cephes' expf's.
//
// Cost: each function is one exp polynomial and one division, with no special-case selects:
// the forward gate pass (3 sigmoid, 2 tanh per unit) measured 2.8 -> 2.0 ns per unit against
// the previous exp-based versions, which selected among branches for inf, 0 and small |x|.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// lstm_ext's vector code (gate passes, small GEMMs) is compiled three times: for x86-64-v4
// (AVX-512), x86-64-v3 (AVX2, FMA) and baseline x86-64. Which one runs follows ATen's CPU
// capability, the CPU's own unless ATEN_CPU_CAPABILITY lowers it, so that the caps emulate an
// older CPU class for lstm_ext as they do for ATen's kernels (and ONEDNN_MAX_CPU_ISA /
// MKL_ENABLE_INSTRUCTIONS for oneDNN and MKL).
//
// LSTM_EXT_ISA_VARIANTS(name, (params), (args), body) defines name(params), which calls
// body<VectorBytes>(args) compiled for the running level, VectorBytes its register width (64,
// 32, 16): code written with GCC's generic vectors of that width compiles to whole registers.
// (A 64-byte generic vector on AVX2 is lowered to two halves, and a scalar broadcast into it
// goes through the stack: the small GEMM ran at ~3 GFLOP/s on an AVX2 CPU that way.) body must
// be always_inline, so that its code is compiled into each variant.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LSTM_EXT_ISA_VARIANTS(name, params, args, body)                                        \
  __attribute__((target("arch=x86-64-v4"))) inline void name##_avx512 params {             \
    body<64> args;                                                                           \
  }                                                                                          \
  __attribute__((target("arch=x86-64-v3"))) inline void name##_avx2 params { body<32> args; } \
  inline void name##_baseline params { body<16> args; }                                      \
  inline void name params {                                                                  \
    switch (::lstm_ext::cpu::vector_isa()) {                                                 \
      case ::lstm_ext::cpu::VectorIsa::kAvx512: return name##_avx512 args;                   \
      case ::lstm_ext::cpu::VectorIsa::kAvx2: return name##_avx2 args;                       \
      default: return name##_baseline args;                                                  \
    }                                                                                        \
  }
#else
#define LSTM_EXT_ISA_VARIANTS(name, params, args, body) \
  inline void name params { body<16> args; }
#endif

namespace lstm_ext {
namespace cpu {

// The vector width, in bytes, of the variant LSTM_EXT_ISA_VARIANTS runs: from ATen's CPU
// capability (at::get_cpu_capability()), read once (lstm_cpu.cpp).
enum class VectorIsa : int { kBaseline = 16, kAvx2 = 32, kAvx512 = 64 };
VectorIsa vector_isa();

namespace detail {

// For x = n ln2 + r, |r| <= ln2 / 2: returns e^r - 1 = r + r^2 P(r) (Cephes expf's polynomial)
// and sets *scale = 2^n. x must lie in [-87.3, 88.3] (2^n then stays a normal float) or be NaN.
// Returning e^r - 1 rather than e^r keeps its relative accuracy near x = 0, which tanh needs.
inline float exp_reduced(float x, float* scale) {
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - n * 0.693359375f;  // ln2 in two parts, for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  // 2^n from its bit pattern (a bit cast, not memcpy: memcpy into a local blocks vectorisation)
#if defined(__has_builtin) && __has_builtin(__builtin_bit_cast)
  *scale = __builtin_bit_cast(float, bits);
#else
  std::memcpy(scale, &bits, sizeof(*scale));
#endif
  return p * r * r + r;
}

}  // namespace detail

// The clamps below are written `x > hi ? hi : x`: a NaN fails the comparison and passes through,
// so NaN in gives NaN out with no separate test.

// σ(x) = 1 / (1 + e^{-x}), e^{-x} = 2^n (e^r - 1) + 2^n. -x is clamped to [-87.3, 88.3]: beyond,
// σ is 1 (rounded) or below 4e-39, and the clamped result is within 4e-39 of it.
inline float sigmoid_f32(float x) {
  float m = -x;
  m = m > 88.3762626647949f ? 88.3762626647949f : m;
  m = m < -87.3365447504f ? -87.3365447504f : m;
  float scale;
  const float em1 = detail::exp_reduced(m, &scale);
  return 1.0f / (1.0f + (scale * em1 + scale));
}

// tanh(x) = (e^{2x} - 1) / (e^{2x} - 1 + 2), with e^{2x} - 1 = 2^n (e^r - 1) + (2^n - 1): one
// exp and one division, and accurate near 0 (no 1 - 2 / (e^{2x} + 1) cancellation). |x| is
// clamped to 9, where tanh rounds to ±1 in float32.
inline float tanh_f32(float x) {
  float ax = std::fabs(x);
  ax = ax > 9.0f ? 9.0f : ax;
  float scale;
  const float em1_r = detail::exp_reduced(2.0f * ax, &scale);
  const float em1 = scale * em1_r + (scale - 1.0f);
  return std::copysign(em1 / (em1 + 2.0f), x);
}

}  // namespace cpu
}  // namespace lstm_ext
