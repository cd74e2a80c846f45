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
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "vec_math.h"  // LSTM_EXT_ISA_VARIANTS

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

// Whether this thread's GEMMs must run on this thread alone (MklThreadsOnThisThread(1) holds).
inline bool& gemms_on_this_thread_only() {
  static thread_local bool only = false;
  return only;
}

// Sets MKL's thread count for this thread within a scope; 0 means "leave it as it is". With 1,
// the other GEMM backends also keep to this thread (gemms_on_this_thread_only).
class MklThreadsOnThisThread {
 public:
  explicit MklThreadsOnThisThread(int threads)
      : active_(threads > 0 && MKL_Set_Num_Threads_Local != nullptr),
        previous_(active_ ? MKL_Set_Num_Threads_Local(threads) : 0),
        previous_only_(gemms_on_this_thread_only()) {
    if (threads == 1) gemms_on_this_thread_only() = true;
  }
  ~MklThreadsOnThisThread() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
    gemms_on_this_thread_only() = previous_only_;
  }
  MklThreadsOnThisThread(const MklThreadsOnThisThread&) = delete;
  MklThreadsOnThisThread& operator=(const MklThreadsOnThisThread&) = delete;

 private:
  bool active_;
  int previous_;
  bool previous_only_;
};

// ---- small_gemm_nn: C[M, N] = A[M, K] @ B[K, N] (+ C where accumulate), row-major ----------
//
// Why: the per-step products of a small LSTM (B = 5, P = 16, 4H = 64 at the sin->cos trainer's
// size) take a few hundred cycles of arithmetic, while a call of MKL's sgemm_ spends a good part
// of a microsecond checking arguments and choosing a kernel, 20 steps forward and 20 backward.
// gemm() uses it where the seam (below) measured it fastest for the size class.

// One vector of T of Bytes bytes in GCC/Clang's generic vector extension, explicit vector
// arithmetic rather than hoping the auto-vectoriser finds it. small_gemm_nn uses the running
// variant's register width (LSTM_EXT_ISA_VARIANTS); small_gemm_nt 64 bytes on every level (it
// broadcasts no scalar: two AVX2 registers per vector compile well).
template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int64_t lanes = Bytes / sizeof(T);
};
template <typename T>
using Vec64 = Vec<T, 64>;

template <typename V, typename T>
__attribute__((always_inline)) inline V load_vec(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
__attribute__((always_inline)) inline void store_vec(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// C[R rows, NV vectors] (+)= A[R rows, K] @ B[K, NV vectors]: the R x NV partial sums stay in
// registers for the whole K loop, and each vector of B loaded serves all R rows.
// always_inline: compiled into each variant of small_gemm_nn (a call would run baseline code).
template <typename T, int Bytes, int R, int NV>
__attribute__((always_inline)) inline void small_gemm_tile(int64_t K, const T* A, int64_t lda,
                                                           const T* B, int64_t ldb,
                                                           bool accumulate, T* C, int64_t ldc) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int64_t L = Vec<T, Bytes>::lanes;
  V acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? load_vec<V>(C + r * ldc + v * L) : V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) {
      b[v] = load_vec<V>(B + k * ldb + v * L);
    }
    for (int r = 0; r < R; ++r) {
      const T x = A[r * lda + k];
      for (int v = 0; v < NV; ++v) {
        acc[r][v] += x * b[v];
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      store_vec(C + r * ldc + v * L, acc[r][v]);
    }
  }
}

// Callers guarantee that N is a multiple of Vec64<T>::lanes (64 bytes of T), which every
// variant's vector width divides.
template <typename T, int Bytes, int NV>
__attribute__((always_inline)) inline void small_gemm_columns(int64_t M, int64_t K, const T* A,
                                                              int64_t lda, const T* B,
                                                              int64_t ldb, bool accumulate, T* C,
                                                              int64_t ldc) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    small_gemm_tile<T, Bytes, 2, NV>(K, A + m * lda, lda, B, ldb, accumulate, C + m * ldc, ldc);
  }
  if (m < M) {
    small_gemm_tile<T, Bytes, 1, NV>(K, A + m * lda, lda, B, ldb, accumulate, C + m * ldc, ldc);
  }
}

// Tiles of 4, 2, 1 vectors of the variant's width: two rows of 4 take 8 accumulators and 4
// vectors of B, within AVX2's and SSE's 16 registers (AVX-512 has 32).
template <int Bytes, typename T>
__attribute__((always_inline)) inline void small_gemm_nn_body(int64_t M, int64_t N, int64_t K,
                                                              const T* A, int64_t lda, const T* B,
                                                              int64_t ldb, bool accumulate, T* C,
                                                              int64_t ldc) {
  constexpr int64_t L = Vec<T, Bytes>::lanes;
  int64_t n0 = 0;
  for (; n0 + 4 * L <= N; n0 += 4 * L) {
    small_gemm_columns<T, Bytes, 4>(M, K, A, lda, B + n0, ldb, accumulate, C + n0, ldc);
  }
  if (n0 + 2 * L <= N) {
    small_gemm_columns<T, Bytes, 2>(M, K, A, lda, B + n0, ldb, accumulate, C + n0, ldc);
    n0 += 2 * L;
  }
  if (n0 < N) {
    small_gemm_columns<T, Bytes, 1>(M, K, A, lda, B + n0, ldb, accumulate, C + n0, ldc);
  }
}

LSTM_EXT_ISA_VARIANTS(small_gemm_nn,
                      (int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                       const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc),
                      (M, N, K, A, lda, B, ldb, accumulate, C, ldc), small_gemm_nn_body)
LSTM_EXT_ISA_VARIANTS(small_gemm_nn,
                      (int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                       const double* B, int64_t ldb, bool accumulate, double* C, int64_t ldc),
                      (M, N, K, A, lda, B, ldb, accumulate, C, ldc), small_gemm_nn_body)

// ---- small_gemm_nt: C[M, N] = A[M, K] @ B[N, K]^T (+ C where accumulate), row-major ----------
//
// Why: a call of a few steps (an LSTMCell step, a streaming call of one step) multiplies by the
// weights as they are stored, W [4H, K]: transposing them first, as a whole sequence does once per
// call, costs more than the step's product itself (a [1024, 256] transpose: ~200 us against a
// ~10 us product at B = 1), and MKL's transposed-B GEMM runs at half its speed at small M (single
// thread, B = 1, K = 256, N = 1024: 26 us; this kernel 14.5; MKL on a transposed copy 10). Each
// output is a dot product of a row of A and a row of B: the R x 4 partial sums are vectors over K,
// reduced once at the end (sum4).

// The lane sums of four vectors, in lanes 0..3 of the result (a tree of shuffles and adds).
__attribute__((always_inline)) inline Vec64<float>::type sum4(Vec64<float>::type a0,
                                                              Vec64<float>::type a1,
                                                              Vec64<float>::type a2,
                                                              Vec64<float>::type a3) {
  typedef int32_t I __attribute__((vector_size(64)));
  const I lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const I hi = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const auto u01 = __builtin_shuffle(a0, a1, lo) + __builtin_shuffle(a0, a1, hi);  // a0 | a1
  const auto u23 = __builtin_shuffle(a2, a3, lo) + __builtin_shuffle(a2, a3, hi);  // a2 | a3
  const I q0 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const I q1 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const auto w = __builtin_shuffle(u01, u23, q0) + __builtin_shuffle(u01, u23, q1);  // 4 lanes each
  const I e0 = {0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13};
  const I e1 = {2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15};
  const auto x = __builtin_shuffle(w, w, e0) + __builtin_shuffle(w, w, e1);  // 2 lanes each
  const I o0 = {0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6};
  const I o1 = {1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7};
  return __builtin_shuffle(x, x, o0) + __builtin_shuffle(x, x, o1);
}

__attribute__((always_inline)) inline Vec64<double>::type sum4(Vec64<double>::type a0,
                                                               Vec64<double>::type a1,
                                                               Vec64<double>::type a2,
                                                               Vec64<double>::type a3) {
  typedef int64_t I __attribute__((vector_size(64)));
  const I lo = {0, 1, 2, 3, 8, 9, 10, 11};
  const I hi = {4, 5, 6, 7, 12, 13, 14, 15};
  const auto u01 = __builtin_shuffle(a0, a1, lo) + __builtin_shuffle(a0, a1, hi);
  const auto u23 = __builtin_shuffle(a2, a3, lo) + __builtin_shuffle(a2, a3, hi);
  const I q0 = {0, 1, 4, 5, 8, 9, 12, 13};
  const I q1 = {2, 3, 6, 7, 10, 11, 14, 15};
  const auto w = __builtin_shuffle(u01, u23, q0) + __builtin_shuffle(u01, u23, q1);
  const I e0 = {0, 2, 4, 6, 0, 2, 4, 6};
  const I e1 = {1, 3, 5, 7, 1, 3, 5, 7};
  return __builtin_shuffle(w, w, e0) + __builtin_shuffle(w, w, e1);
}

// One term of a sum of products A @ B^T: A [M, K] (lda), B [N, K] (ldb).
template <typename T>
struct NtTerm {
  const T* A;
  int64_t lda;
  const T* B;
  int64_t ldb;
  int64_t K;
};

// C[R rows, NC columns] (+)= sum over the terms of A[R rows, K] @ B[NC rows, K]^T, NC <= 4 (the
// unused lanes of the reduction are discarded). Both terms go into the same partial sums, so a
// step's x W_ih^T + h W_hh^T is reduced once.
template <typename T, int R, int NC, int TERMS>
__attribute__((always_inline)) inline void small_gemm_nt_tile(const NtTerm<T>* terms,
                                                              int64_t m, int64_t n,
                                                              bool accumulate, T* C,
                                                              int64_t ldc) {
  using V = typename Vec64<T>::type;
  constexpr int64_t L = Vec64<T>::lanes;
  V acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < 4; ++c) {
      acc[r][c] = V{};
    }
  }
  T tail[R][NC] = {};
  for (int term = 0; term < TERMS; ++term) {
    const T* A = terms[term].A + m * terms[term].lda;
    const T* B = terms[term].B + n * terms[term].ldb;
    const int64_t lda = terms[term].lda, ldb = terms[term].ldb, K = terms[term].K;
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      V b[NC];
      for (int c = 0; c < NC; ++c) {
        b[c] = load_vec<V>(B + c * ldb + k);
      }
      for (int r = 0; r < R; ++r) {
        const V a = load_vec<V>(A + r * lda + k);
        for (int c = 0; c < NC; ++c) {
          acc[r][c] += a * b[c];
        }
      }
    }
    for (; k < K; ++k) {  // the last K % L
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < NC; ++c) {
          tail[r][c] += A[r * lda + k] * B[c * ldb + k];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const V sums = sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    T* c_row = C + (m + r) * ldc + n;
    for (int c = 0; c < NC; ++c) {
      const T value = sums[c] + tail[r][c];
      c_row[c] = accumulate ? c_row[c] + value : value;
    }
  }
}

template <typename T, int NC, int TERMS>
__attribute__((always_inline)) inline void small_gemm_nt_columns(const NtTerm<T>* terms, int64_t M,
                                                                 int64_t n, bool accumulate,
                                                                 T* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    small_gemm_nt_tile<T, 4, NC, TERMS>(terms, m, n, accumulate, C, ldc);
  }
  switch (M - m) {
    case 3: small_gemm_nt_tile<T, 3, NC, TERMS>(terms, m, n, accumulate, C, ldc); break;
    case 2: small_gemm_nt_tile<T, 2, NC, TERMS>(terms, m, n, accumulate, C, ldc); break;
    case 1: small_gemm_nt_tile<T, 1, NC, TERMS>(terms, m, n, accumulate, C, ldc); break;
    default: break;
  }
}

template <typename T, int TERMS>
__attribute__((always_inline)) inline void small_gemm_nt_body(const NtTerm<T>* terms, int64_t M,
                                                              int64_t N, bool accumulate, T* C,
                                                              int64_t ldc) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) {  // four columns at a time: each row of A loaded serves four
    small_gemm_nt_columns<T, 4, TERMS>(terms, M, n, accumulate, C, ldc);
  }
  for (; n < N; ++n) {
    small_gemm_nt_columns<T, 1, TERMS>(terms, M, n, accumulate, C, ldc);
  }
}

// The variants' bodies (64-byte vectors at every level, see Vec).
template <int Bytes, typename T>
__attribute__((always_inline)) inline void small_gemm_nt_one(int64_t M, int64_t N, int64_t K,
                                                             const T* A, int64_t lda, const T* B,
                                                             int64_t ldb, bool accumulate, T* C,
                                                             int64_t ldc) {
  const NtTerm<T> term{A, lda, B, ldb, K};
  small_gemm_nt_body<T, 1>(&term, M, N, accumulate, C, ldc);
}

template <int Bytes, typename T>
__attribute__((always_inline)) inline void small_gemm_nt_two(int64_t M, int64_t N,
                                                             NtTerm<T> first, NtTerm<T> second,
                                                             T* C, int64_t ldc) {
  const NtTerm<T> terms[2] = {first, second};
  small_gemm_nt_body<T, 2>(terms, M, N, false, C, ldc);
}

// C[M, N] (+)= A[M, K] @ B[N, K]^T.
LSTM_EXT_ISA_VARIANTS(small_gemm_nt,
                      (int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                       const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc),
                      (M, N, K, A, lda, B, ldb, accumulate, C, ldc), small_gemm_nt_one)
LSTM_EXT_ISA_VARIANTS(small_gemm_nt,
                      (int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                       const double* B, int64_t ldb, bool accumulate, double* C, int64_t ldc),
                      (M, N, K, A, lda, B, ldb, accumulate, C, ldc), small_gemm_nt_one)

// C[M, N] = A1[M, K1] @ B1[N, K1]^T + A2[M, K2] @ B2[N, K2]^T (a step's x W_ih^T + h W_hh^T).
LSTM_EXT_ISA_VARIANTS(small_gemm_nt_sum,
                      (int64_t M, int64_t N, NtTerm<float> first, NtTerm<float> second, float* C,
                       int64_t ldc),
                      (M, N, first, second, C, ldc), small_gemm_nt_two)
LSTM_EXT_ISA_VARIANTS(small_gemm_nt_sum,
                      (int64_t M, int64_t N, NtTerm<double> first, NtTerm<double> second,
                       double* C, int64_t ldc),
                      (M, N, first, second, C, ldc), small_gemm_nt_two)

// ---- The GEMM seam: every float32 / float64 product of the CPU loops goes through gemm() ------
//
// Backends (GemmBackend):
//   small   small_gemm_nn above: no transposes, alpha 1, beta 0 or 1, N a multiple of 64 bytes,
//           at most kMaxSmallGemmRows rows and kMaxSmallGemmMacs multiply-adds
//   brgemm  oneDNN's f32 brgemm micro-kernel (at::native::cpublas::brgemm) on blocks of
//           kBrgemmBlockColumns columns of B, the blocks split over the threads where the call
//           may use them; float32, no transposes, alpha 1, beta 0 or 1
//   mkl     MKL's sgemm_ / dgemm_ (every call; absent under LSTM_EXT_NO_MKL)
//   aten    at::mm_out on tensors wrapping the same memory (every call)
// Which backend runs a call is decided per size class (dtype, transposes, which backends may run
// it, threads, and M, N, K rounded up to powers of two) by gemm_choice.cpp: by timing the
// eligible backends on this CPU the first time a class is seen, the decision kept in a file per
// CPU model and software so that every later run there makes the same one; or by a fixed rule
// where no such file can be kept; or forced with LSTM_EXT_GEMM. gemm_choice.cpp says how.
enum class GemmBackend : uint8_t { kSmall = 0, kBrgemm = 1, kMkl = 2, kAten = 3 };

// One product, as gemm() is called (row-major; see gemm()).
struct GemmCall {
  bool trans_a, trans_b;
  int64_t M, N, K;
  bool unit_scaling;  // alpha == 1 and beta is 0 or 1
  bool may_thread;    // the backend may use the other threads (not in a parallel region, ...)
};

// The backend for a call of dtype T (float or double): gemm_choice.cpp.
template <typename T>
GemmBackend gemm_backend_for(const GemmCall& call);

// The rule the measured choice replaced (Sapphire Rapids: small_gemm_nn up to kSmallGemmWork
// multiply-adds, four times as many for a single row; MKL above), also what runs where no
// choice can be kept from one run to the next.
constexpr int64_t kSmallGemmWork = int64_t(1) << 15;
constexpr int64_t kMaxSmallGemmRows = 32;
constexpr int64_t kMaxSmallGemmMacs = int64_t(1) << 22;
constexpr int64_t kBrgemmBlockColumns = 64;
// Below this many multiply-adds a brgemm call stays on one thread (a fork/join costs more).
constexpr int64_t kMinThreadedGemmMacs = int64_t(1) << 18;

// Whether oneDNN's f32 brgemm runs on this CPU and this torch (checked once, on a tiny product).
bool brgemm_f32_usable();

template <typename T>
bool gemm_backend_can_run(GemmBackend backend, const GemmCall& c) {
  const bool plain = !c.trans_a && !c.trans_b && c.unit_scaling;
  switch (backend) {
    case GemmBackend::kSmall:
      return plain && c.N % Vec64<T>::lanes == 0 && c.M <= kMaxSmallGemmRows &&
             c.M * c.N * c.K <= kMaxSmallGemmMacs;
    case GemmBackend::kBrgemm:
      return std::is_same<T, float>::value && plain && brgemm_f32_usable();
    case GemmBackend::kMkl:
      return fortran_gemm(T()) != nullptr;
    case GemmBackend::kAten:
      return true;
  }
  return false;
}

// C[M, N] = A[M, K] @ B[K, N] (+ C where accumulate) on oneDNN's brgemm, column block by block.
inline void brgemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                       const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc,
                       bool may_thread) {
  const int64_t blocks = (N + kBrgemmBlockColumns - 1) / kBrgemmBlockColumns;
  auto run = [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t n0 = block * kBrgemmBlockColumns;
      const int64_t width = std::min(kBrgemmBlockColumns, N - n0);
#ifdef CPUBLAS_BRGEMM_F32F32F32  // torch's CPUBlas.h says which brgemm overloads it has
      at::native::cpublas::brgemm(M, width, K, lda, ldb, ldc, accumulate, A, B + n0, C + n0,
                                  /*is_vnni=*/false);
#else
      TORCH_CHECK(false, "lstm_ext: this torch has no f32 brgemm (brgemm_f32_usable is false)");
#endif
    }
  };
  if (may_thread && blocks > 1 && M * N * K >= kMinThreadedGemmMacs) {
    at::parallel_for(0, blocks, 1, run);
  } else {
    run(0, blocks);
  }
}

// Runs the product on the given backend, which must be able to (gemm_backend_can_run).
template <typename T>
void run_gemm(GemmBackend backend, const GemmCall& c, T alpha, const T* A, int64_t lda,
              const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const int64_t M = c.M, N = c.N, K = c.K;
  switch (backend) {
    case GemmBackend::kSmall:
      small_gemm_nn(M, N, K, A, lda, B, ldb, beta == T(1), C, ldc);
      return;
    case GemmBackend::kBrgemm:
      if constexpr (std::is_same<T, float>::value) {
        brgemm_f32(M, N, K, A, lda, B, ldb, beta == T(1), C, ldc, c.may_thread);
        return;
      }
      break;
    case GemmBackend::kMkl: {
      // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
      const char ta = c.trans_b ? 'T' : 'N';
      const char tb = c.trans_a ? 'T' : 'N';
      const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
      const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(lda);
      const int ld_c = static_cast<int>(ldc);
      fortran_gemm(T())(&ta, &tb, &m, &n, &k, &alpha, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
      return;
    }
    case GemmBackend::kAten:
      break;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = c.trans_a ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, options).t()
                     : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, options);
  auto b = c.trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, options).t()
                     : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, options);
  auto out = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (beta == T(0)) {
    at::mm_out(out, a, b);
    if (alpha != T(1)) {
      out.mul_(alpha);
    }
  } else {
    out.mul_(beta).addmm_(a, b, 1, alpha);
  }
}

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
  const GemmCall call{trans_a,
                      trans_b,
                      M,
                      N,
                      K,
                      alpha == T(1) && (beta == T(0) || beta == T(1)),
                      !gemms_on_this_thread_only() && !at::in_parallel_region() &&
                          at::get_num_threads() > 1};
  run_gemm<T>(gemm_backend_for<T>(call), call, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace cpu
}  // namespace lstm_ext
