// float32 exp, sigmoid and tanh written so that the compiler vectorises loops that call them
// (no libm calls, no branches: both sides of each choice are computed and one is selected).
//
// Why: a float32 step's gate pass is a handful of transcendentals per unit; calling a vector
// library once per block costs a call and a pass over memory per function, which at small sizes
// is most of the step. Inlined into one fused loop, the whole gate pass is one pass.
// Accuracy (checked over [-20, 20] against double precision): sigmoid <= 2.5 ulp, tanh <= 1.3 ulp
// for normal results; NaN propagates; ±inf give the limits. Coefficients are Cephes' expf/tanhf.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Compile a function for AVX-512, AVX2+FMA and baseline x86-64; the loader picks the best the CPU
// has (GCC/Clang function multiversioning). Elsewhere: one plain version.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LSTM_EXT_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LSTM_EXT_TARGET_CLONES
#endif

namespace lstm_ext {
namespace cpu {

// e^x = 2^n e^r with x = n ln2 + r, |r| <= ln2 / 2; e^r by a degree-7 polynomial.
inline float exp_f32(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;  // 2^n stays a normal float
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693359375f;  // ln2 in two parts, for an exact reduction
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  // 2^n from its bit pattern (a bit cast, not memcpy: memcpy into a local blocks vectorisation)
#if defined(__has_builtin) && __has_builtin(__builtin_bit_cast)
  const float scale = __builtin_bit_cast(float, bits);
#else
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
#endif
  float result = p * scale;
  result = x > hi ? INFINITY : result;
  result = x < -103.972f ? 0.0f : result;
  return x != x ? x : result;  // NaN in, NaN out
}

inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// |x| < 0.625: x + x^3 P(x^2); otherwise sign(x) (1 - 2 / (e^{2|x|} + 1)).
inline float tanh_f32(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745E-3f;
  p = p * z + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  const float small = p * z * x + x;
  const float big_abs = 1.0f - 2.0f / (exp_f32(2.0f * ax) + 1.0f);
  const float big = x < 0 ? -big_abs : big_abs;
  return ax < 0.625f ? small : big;
}

}  // namespace cpu
}  // namespace lstm_ext
