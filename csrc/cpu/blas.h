// Row-major GEMM on raw pointers for the CPU time loop.
//
// Why not at::mm: an ATen call costs a few microseconds of dispatch and allocation even for a
// 5x16 * 16x64 product, which at small LSTM sizes is more than the arithmetic of the whole step.
// libtorch_cpu on x86 links MKL and exports its Fortran BLAS entry points (sgemm_, dgemm_), so we
// call them directly. They are declared weak: on a build of torch that does not export them the
// pointers are null and we fall back to at::addmm_out on tensors wrapping the same memory (correct,
// only slower per call). LSTM_EXT_NO_MKL=1 in the environment forces the fallbacks (tests use it).
#pragma once

#include <ATen/ATen.h>

#include <climits>
#include <cstdlib>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace lstm_ext {
namespace cpu {

// False when LSTM_EXT_NO_MKL is set: every MKL entry point is then treated as absent.
inline bool mkl_allowed() {
  static const bool allowed = std::getenv("LSTM_EXT_NO_MKL") == nullptr;
  return allowed;
}

// The Fortran entry point for each dtype (null where libtorch_cpu does not export it).
inline decltype(&sgemm_) fortran_gemm(float) { return mkl_allowed() ? sgemm_ : nullptr; }
inline decltype(&dgemm_) fortran_gemm(double) { return mkl_allowed() ? dgemm_ : nullptr; }

// Whether BLAS is called directly (true) or through at::addmm_out (false); reported in build info.
inline bool has_direct_blas() {
  return fortran_gemm(float()) != nullptr && fortran_gemm(double()) != nullptr;
}

// Sets MKL's thread count for this thread within a scope; 0 means "leave it as it is".
class MklThreadsOnThisThread {
 public:
  explicit MklThreadsOnThisThread(int threads)
      : active_(threads > 0 && MKL_Set_Num_Threads_Local != nullptr),
        previous_(active_ ? MKL_Set_Num_Threads_Local(threads) : 0) {}
  ~MklThreadsOnThisThread() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  MklThreadsOnThisThread(const MklThreadsOnThisThread&) = delete;
  MklThreadsOnThisThread& operator=(const MklThreadsOnThisThread&) = delete;

 private:
  bool active_;
  int previous_;
};

// C[M, N] = alpha * op(A) @ op(B) + beta * C, all row-major.
//   op(A) is [M, K]: A is [M, K] (lda >= K) or, with trans_a, [K, M] (lda >= M).
//   op(B) is [K, N]: B is [K, N] (ldb >= N) or, with trans_b, [N, K] (ldb >= K).
// Callers guarantee every dimension fits in int (checked at the op boundary).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) {
    return;
  }
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        C[m * ldc + n] = beta == T(0) ? T(0) : beta * C[m * ldc + n];
      }
    }
    return;
  }
  const auto gemm_fn = fortran_gemm(T());
  if (gemm_fn != nullptr) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N';
    const char tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(lda);
    const int ld_c = static_cast<int>(ldc);
    gemm_fn(&ta, &tb, &m, &n, &k, &alpha, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = trans_a ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, options).t()
                   : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  auto b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, options).t()
                   : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, options);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) {
      c.mul_(alpha);
    }
  } else {
    c.mul_(beta).addmm_(a, b, 1, alpha);
  }
}

}  // namespace cpu
}  // namespace lstm_ext
