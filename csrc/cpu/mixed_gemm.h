// Products of a layer whose storage type S differs from its compute type C (bfloat16 / float16
// layers computing in float32), and the conversions between the two: what the CPU time loops
// (layer_forward.h, layer_backward.h) need to run one loop for every dtype.
//
// Storage and GEMM inputs are in S: the inputs, weights and outputs, and what a GEMM reads (each
// step's h, the gate gradients). Everything else is C: the GEMMs accumulate in float32 (MKL's
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32, on AMX where the CPU has it); the gate math, the
// cell state across the steps of a call and the running gradients stay float32, and the activated
// gates and cell states kept for the backward are float32 (so the backward's derivatives are the
// forward's, not re-rounded ones). Values are rounded to S only where they leave a call (outputs,
// h_n, c_n, gradients) or enter a GEMM. For float32 and float64, S is C and every conversion
// below is nothing (or a copy where the caller asked for one).
//
// 16-bit per-step products: a call of several steps runs them on oneDNN's brgemm micro-kernel
// (AMX) on the weights packed once per call (PackedWeight): MKL's GEMM packs its operand itself
// on every call, which at a step's size (M = 32, K = 256, N = 1024) left it at 280 GFLOP/s
// against brgemm's ~1100.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "blas.h"
#include "layer_common.h"
#include "vec_math.h"

extern "C" {
// MKL's mixed-precision GEMMs (row-major: layout 101; 111 no transpose, 112 transpose), exported by
// libtorch_cpu on x86; weak, as the other MKL entry points (blas.h): null where absent.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                          float* c, int ldc) __attribute__((weak));
}

namespace lstm_ext {
namespace cpu {

using LowpGemm = decltype(&cblas_gemm_bf16bf16f32);

inline LowpGemm lowp_gemm(c10::BFloat16) { return mkl_allowed() ? cblas_gemm_bf16bf16f32 : nullptr; }
inline LowpGemm lowp_gemm(c10::Half) { return mkl_allowed() ? cblas_gemm_f16f16f32 : nullptr; }

// C[M, N] (float32) = op(A) @ op(B) + beta * C, A and B in S, row-major as gemm() in blas.h.
// Without MKL: float32 copies through at::mm (correct, slower).
template <typename S>
void gemm_lowp(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const S* A,
               int64_t lda, const S* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) {
    return;
  }
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        C[m * ldc + n] = beta == 0.f ? 0.f : beta * C[m * ldc + n];
      }
    }
    return;
  }
  if (const LowpGemm gemm = lowp_gemm(S())) {
    gemm(101, trans_a ? 112 : 111, trans_b ? 112 : 111, static_cast<int>(M), static_cast<int>(N),
         static_cast<int>(K), 1.f, reinterpret_cast<const uint16_t*>(A), static_cast<int>(lda),
         reinterpret_cast<const uint16_t*>(B), static_cast<int>(ldb), beta, C,
         static_cast<int>(ldc));
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  auto a = trans_a ? at::from_blob(const_cast<S*>(A), {K, M}, {lda, 1}, options).t()
                   : at::from_blob(const_cast<S*>(A), {M, K}, {lda, 1}, options);
  auto b = trans_b ? at::from_blob(const_cast<S*>(B), {N, K}, {ldb, 1}, options).t()
                   : at::from_blob(const_cast<S*>(B), {K, N}, {ldb, 1}, options);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, at::TensorOptions().dtype(at::kFloat));
  if (beta == 0.f) {
    at::mm_out(c, a.to(at::kFloat), b.to(at::kFloat));
  } else {
    c.mul_(beta).addmm_(a.to(at::kFloat), b.to(at::kFloat));
  }
}

// B [K, N] packed for oneDNN's brgemm (ATen's cpublas::brgemm: AMX where the CPU has it), in
// column blocks of kBlock, once per call; then C[M, N] (+)= A[M, K] @ B, a step's product, costs
// the micro-kernel's calls only. Where it cannot be used (no brgemm packing on this CPU, float16,
// K odd or N not a multiple of 16, which oneDNN refuses or, for odd K, faults on), the steps use
// gemm_lowp instead.
template <typename S>
class PackedWeight {
 public:
  static constexpr int64_t kBlock = 64;

  static bool usable(int64_t K, int64_t N) {
    return std::is_same_v<S, c10::BFloat16> && K > 0 && N > 0 && K % 2 == 0 && N % 16 == 0 &&
           mkl_allowed() && at::native::cpublas::could_pack(at::kBFloat16);
  }

  // b: B [K, N], row-major.
  PackedWeight(const S* b, int64_t K, int64_t N, const at::TensorOptions& options)
      : K_(K), N_(N), packed_(at::empty({K * N}, options)) {
    S* out = packed_.data_ptr<S>();
    const auto type = c10::CppTypeToScalarType<S>::value;
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      const int64_t width = std::min(kBlock, N - n0);
      at::native::cpublas::pack(K, width, N, width, type, type, b + n0, out + n0 * K);
    }
  }

  // C[M, N] (+)= A[M, K] @ B. The caller releases the micro-kernel's state (release()) when done,
  // and before any other code that uses the AMX tiles (MKL's GEMMs) runs on the thread.
  void multiply(int64_t M, const S* A, int64_t lda, bool accumulate, float* C, int64_t ldc) const {
    if (M == 0) {
      return;
    }
    const S* packed = packed_.data_ptr<S>();
    for (int64_t n0 = 0; n0 < N_; n0 += kBlock) {
      const int64_t width = std::min(kBlock, N_ - n0);
      at::native::cpublas::brgemm(M, width, K_, lda, width, ldc, accumulate, A, packed + n0 * K_,
                                  C + n0, /*is_vnni=*/true);
    }
  }

  static void release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

 private:
  int64_t K_, N_;
  at::Tensor packed_;
};

// Calls of at least this many steps pack the weights for the per-step products (the packing is a
// pass over the weights; a call of a few steps runs its products through gemm_lowp instead).
constexpr int64_t kMinStepsToPack = 8;

// Layers of at most this many batch rows, without the micro-kernel, multiply each step's h by a
// float32 copy of W_hh^T made once per call, through gemm<float> (the GEMM seam,
// blas.h). MKL's 16-bit GEMM converts its weight operand on every call, a cost of 4H x P whatever
// the rows, ~9x the copy's at B = 1 on an AVX2 CPU; larger batches keep MKL's
// (benchmarks/results/tuning.md).
constexpr int64_t kFloatStepRows = 4;

// [W_ih | W_hh]^T [I + P, 4H], row-major, for the forward's per-step product [x_t | h] @ it.
template <typename S>
at::Tensor stacked_transpose(const at::Tensor& weight_ih, const at::Tensor& weight_hh) {
  const int64_t G = weight_ih.size(0), I = weight_ih.size(1), P = weight_hh.size(1);
  at::Tensor out = at::empty({I + P, G}, weight_ih.options());
  transpose_into(weight_ih, out.data_ptr<S>());
  transpose_into(weight_hh, out.data_ptr<S>() + I * G);
  return out;
}

// Whether a layer of this dtype stores S values that differ from its compute type.
inline bool is_low_precision(at::ScalarType type) {
  return type == at::kBFloat16 || type == at::kHalf;
}

// dst[0, n) = src[0, n) converted (rounded to nearest, ties to even, where narrowing); a copy
// where the types are the same.
template <typename From, typename To>
void convert(const From* src, To* dst, int64_t n) {
  if constexpr (std::is_same_v<From, To>) {
    copy_elements(dst, src, n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<To>(static_cast<float>(src[i]));
    }
  }
}

// Whether a 16-bit layer of this dtype runs its products in float32 (bool per dtype, read once):
// bfloat16 where the CPU (as ATen's capability sees it: the ISA caps apply) has no bfloat16
// dot-product instructions (AVX512-BF16 or AMX-BF16), and float16 on every CPU measured: MKL's
// 16-bit GEMMs convert their operands on every call without them, and even with AVX512-FP16
// (an Intel Xeon with AMX, which has no float16 matrix unit), float32 GEMMs on float32 copies of
// the layer's tensors, made once per call, were 1.0-3.5x faster (benchmarks/results/tuning.md).
// The copies are exact (every 16-bit value is a float32) and the loops round through the 16-bit
// type wherever the 16-bit loop stores a GEMM input (RoundThrough): the GEMMs multiply the same
// values either way. LSTM_EXT_LOWP_PRODUCTS=float32 or =native forces one way; unset or auto,
// this rule (defined in lstm_cpu.cpp).
bool lowp_products_in_float32(at::ScalarType type);

// The loops' rounding of GEMM inputs: none (a layer computing in its own dtype), or through a
// 16-bit S (a 16-bit layer run on float32 copies: lowp_products_in_float32).
struct NoRounding {
  static constexpr bool kOn = false;
  template <typename T>
  static void apply(T* /*values*/, int64_t /*n*/) {}
};
// v[0, n) rounded to bfloat16 (to nearest, ties to even; NaN stays NaN, as c10::BFloat16's
// conversion does) and back, in place, as bit arithmetic the compiler vectorises (a scalar loop
// of conversions cost 6-14% of a layer's forward+backward).
template <int Bytes>
__attribute__((always_inline)) inline void round_through_bfloat16_body(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, v[i]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    v[i] = __builtin_bit_cast(float, nan ? 0x7FC00000u : rounded);
  }
}
// The same through float16 (IEEE: to nearest, ties to even, overflow to infinity, as c10::Half):
// F16C's conversions where the variant has them.
template <int Bytes>
__attribute__((always_inline)) inline void round_through_half_body(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>(static_cast<_Float16>(v[i]));
  }
}
LSTM_EXT_ISA_VARIANTS(round_through_bfloat16, (float* v, int64_t n), (v, n),
                      round_through_bfloat16_body)
LSTM_EXT_ISA_VARIANTS(round_through_half, (float* v, int64_t n), (v, n), round_through_half_body)

template <typename S>
struct RoundThrough {
  static constexpr bool kOn = true;
  static void apply(float* values, int64_t n) {
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      round_through_bfloat16(values, n);
    } else {
      static_assert(std::is_same_v<S, c10::Half>, "16-bit types only");
      round_through_half(values, n);
    }
  }
};

// C[M, N] = op(A) @ op(B) + beta * C with S operands and C results (row-major, as gemm() in
// blas.h): the GEMM seam when S is C, MKL's mixed-precision GEMM for 16-bit S.
template <typename S, typename C>
void mul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda,
         const S* B, int64_t ldb, C beta, C* out, int64_t ldc) {
  if constexpr (std::is_same_v<S, C>) {
    gemm<C>(trans_a, trans_b, M, N, K, C(1), A, lda, B, ldb, beta, out, ldc);
  } else {
    static_assert(std::is_same_v<C, float>, "16-bit layers compute in float32");
    gemm_lowp<S>(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, out, ldc);
  }
}

// What a bfloat16 / float16 layer's per-step products run on, on this CPU.
std::string lowp_step_gemm_backend(at::ScalarType type);

}  // namespace cpu
}  // namespace lstm_ext
