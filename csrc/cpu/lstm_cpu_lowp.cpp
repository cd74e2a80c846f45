// bfloat16 and float16 layer kernels on the CPU (what they keep in which precision: lowp.h).
//
// The loops are the float32 kernels' (lstm_cpu.cpp): the input projection of a chunk of steps as
// one GEMM, then per step one GEMM and one fused float32 gate pass, threads splitting the batch;
// the backward's reverse loop, then the weight gradients as single GEMMs over all rows. The large
// GEMMs (projection, weight gradients) are MKL's mixed-precision ones, on the weights as stored.
// The per-step products of a bfloat16 call of several steps run on oneDNN's brgemm micro-kernel
// (AMX) on W_hh packed once per call (PackedWeight): MKL's GEMM packs its operand itself on every
// call, which at a step's size (M = 32, K = 256, N = 1024) left it at 280 GFLOP/s against
// brgemm's ~1100.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/native/CPUBlas.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "../lstm_regularize.h"
#include "gates.h"
#include "layer_common.h"
#include "lowp.h"

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
namespace {

using Gemm = decltype(&cblas_gemm_bf16bf16f32);

inline Gemm lowp_gemm(c10::BFloat16) { return mkl_allowed() ? cblas_gemm_bf16bf16f32 : nullptr; }
inline Gemm lowp_gemm(c10::Half) { return mkl_allowed() ? cblas_gemm_f16f16f32 : nullptr; }

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
  if (const Gemm gemm = lowp_gemm(S())) {
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

// Rounding to the low precision (to nearest, ties to even) and back.
template <typename S>
void to_lowp(const float* src, S* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<S>(src[i]);
  }
}

template <typename S>
void to_float(const S* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// Forward of one layer over all steps.
//   x [rows, I]; h0 [B, P], c0 [B, H]; w_ih [4H, I], w_hh [4H, P], w_hr [P, H] or null (as stored)
//   w_packed: [W_ih | W_hh]^T packed for brgemm, or null
//   bias [4H] float32 (b_ih + b_hh, or zeros); y [rows, P]; h_n [B, P] (also the running h)
//   c_state [B, H] float32: the running c (c_n when rounded); gates: with gates_all_rows
//   [rows, 4H] float32 (kept for the backward), else the rows of one chunk of chunk_steps steps
//   (no w_packed) or of one step (w_packed); cells [rows, H] float32 or null
//   r [B, H] float32: o ⊙ tanh(c_t); with w_hr: r_lowp [B, H], y_float [B, P] scratch
//   xh [B, I + P]: a step's [x_t | h] (with w_packed)
//   zoneout, recurrent_mask [B, P] or null (csrc/lstm_regularize.h), with their scratch:
//   c_prev [B, H] float32 (zoneout of c), fed [B, P] (the masked h; recurrent_mask, no w_packed)
//   w_hh_t_float [P, 4H] float32 (W_hh^T) or null, with h_float [B, P]: the steps' products in
//   float32 (kFloatStepRows)
template <typename S>
void layer_forward(const LayerSizes& s, const Steps& steps, bool reverse, const Restarts& restarts,
                   const S* x, const S* h0, const S* c0, const S* w_ih, const S* w_hh,
                   const PackedWeight<S>* w_packed,
                   const float* bias, const S* w_hr, S* y, S* h_n, float* c_state, float* gates,
                   bool gates_all_rows, int64_t chunk_steps, float* cells, float* r, S* r_lowp,
                   float* y_float, S* xh, const Zoneout& zoneout, const S* recurrent_mask,
                   float* c_prev, S* fed, const float* w_hh_t_float, float* h_float) {
  const int64_t H = s.H, P = s.P, G = 4 * s.H, K = s.I + s.P;
  copy_elements(h_n, h0, s.B * P);
  to_float(c0, c_state, s.B * H);
  // After a step's products are in gates_t (rows [b0, b0 + n) of step t, at `row`): the gate
  // pass, c_t kept, y_t = h_t (projected with w_hr), and h_t as the next step reads it.
  // c_{t-1}'s rows [b0, b0 + n), kept for zoneout's mix before the gate pass overwrites them.
  auto keep_c_prev = [&](int64_t n, int64_t b0) {
    if (zoneout.on_c()) {
      copy_elements(c_prev + b0 * H, c_state + b0 * H, n * H);
    }
  };
  auto finish_step = [&](int64_t n, int64_t row, int64_t b0, float* gates_t) {
    S* y_t = y + row * P;
    float* r_t = r + b0 * H;
    gates_forward(n, H, 0, H, gates_t, bias, c_state + b0 * H, r_t, nullptr);
    if (zoneout.on_c()) {
      zoneout_mix(zoneout.c_rows(row, H), zoneout.p_c, n * H, c_prev + b0 * H,
                  c_state + b0 * H);
    }
    if (cells) {
      copy_elements(cells + row * H, c_state + b0 * H, n * H);
    }
    if (w_hr) {  // y_t = r W_hr^T
      S* r_rows = r_lowp + b0 * H;
      float* y_rows = y_float + b0 * P;
      to_lowp(r_t, r_rows, n * H);
      if (w_packed) {
        // MKL's GEMM configures the AMX tiles its own way: the micro-kernel must set its
        // configuration again afterwards, or its next tile instruction faults.
        PackedWeight<S>::release();
      }
      gemm_lowp<S>(false, true, n, P, H, r_rows, H, w_hr, H, 0.f, y_rows, P);
      to_lowp(y_rows, y_t, n * P);
    } else {
      to_lowp(r_t, y_t, n * H);
    }
    if (zoneout.on_h()) {
      zoneout_mix(zoneout.h_rows(row, P), zoneout.p_h, n * P, h_n + b0 * P, y_t);
    }
    copy_elements(h_n + b0 * P, y_t, n * P);  // the next step reads it rounded
  };
  if (w_packed) {  // per step [x_t | h] @ [W_ih | W_hh]^T on the micro-kernel, one call per block
    for_each_batch_slice(s, [&](int64_t b0, int64_t b1) {
      for (int64_t k = 0; k < s.T; ++k) {
        const int64_t t = Steps::time_of(k, s.T, reverse);
        const int64_t n = std::min(b1, steps.batch[t]) - b0;
        if (n <= 0) {
          continue;
        }
        const int64_t row = steps.offset[t] + b0;
        if (const uint8_t* restart = restarts.at(t, b0)) {
          restart_states(restart, n, P, H, h0 + b0 * P, c0 + b0 * H, h_n + b0 * P,
                         c_state + b0 * H);
        }
        S* a = xh + b0 * K;
        for (int64_t i = 0; i < n; ++i) {
          copy_elements(a + i * K, x + (row + i) * s.I, s.I);
          if (recurrent_mask) {
            mask_rows(1, P, h_n + (b0 + i) * P, recurrent_mask + (b0 + i) * P, a + i * K + s.I);
          } else {
            copy_elements(a + i * K + s.I, h_n + (b0 + i) * P, P);
          }
        }
        float* gates_t = gates_all_rows ? gates + row * G : gates + b0 * G;
        w_packed->multiply(n, a, K, false, gates_t, G);
        keep_c_prev(n, b0);
        finish_step(n, row, b0, gates_t);
      }
      PackedWeight<S>::release();
    });
    return;
  }
  for (int64_t k0 = 0; k0 < s.T; k0 += chunk_steps) {
    const int64_t k1 = std::min(s.T, k0 + chunk_steps);
    const auto [row_begin, row_end] = steps.rows_of_steps(k0, k1, reverse);
    float* chunk = gates_all_rows ? gates + row_begin * G : gates;
    gemm_lowp<S>(false, true, row_end - row_begin, G, s.I, x + row_begin * s.I, s.I, w_ih, s.I,
                 0.f, chunk, G);  // x W_ih^T; the bias is added in the gate pass
    for_each_batch_slice(s, [&](int64_t b0, int64_t b1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = Steps::time_of(k, s.T, reverse);
        const int64_t n = std::min(b1, steps.batch[t]) - b0;
        if (n <= 0) {
          continue;
        }
        const int64_t row = steps.offset[t] + b0;
        float* gates_t = chunk + (row - row_begin) * G;
        if (const uint8_t* restart = restarts.at(t, b0)) {
          restart_states(restart, n, P, H, h0 + b0 * P, c0 + b0 * H, h_n + b0 * P,
                         c_state + b0 * H);
        }
        const S* h_fed = h_n + b0 * P;
        if (recurrent_mask) {
          mask_rows(n, P, h_fed, recurrent_mask + b0 * P, fed + b0 * P);
          h_fed = fed + b0 * P;
        }
        if (w_hh_t_float) {  // h (exact in float32) @ W_hh^T, summed in float32 as MKL's GEMM
          to_float(h_fed, h_float + b0 * P, n * P);
          gemm<float>(false, false, n, G, P, 1.f, h_float + b0 * P, P, w_hh_t_float, G, 1.f,
                      gates_t, G);
        } else {
          gemm_lowp<S>(false, true, n, G, P, h_fed, P, w_hh, P, 1.f, gates_t, G);
        }
        keep_c_prev(n, b0);
        finish_step(n, row, b0, gates_t);
      }
    });
  }
}

// The reverse loop of one layer's backward (the weight gradients follow in the caller).
//   dy [rows, P] or null; dh, dc [B, P] / [B, H] float32: in dL/dh_n, dL/dc_n, out dh0, dc0
//   c0f [B, H] float32 (c0); gates, cells: the forward's (float32)
//   dgates_step [B, 4H] float32 scratch; dgates [rows, 4H] S: each step's gate gradients, rounded
//   for the GEMMs; db_slices [B, 4H] float32 (a batch slice sums its bias gradient in row b0)
//   xh [rows, P] S: the h each step read; with w_hr: dh_all [rows, P], r_all [rows, H] S,
//   r_step, dr [B, H] float32
//   w_hh_packed: W_hh [4H, P] packed for brgemm, or null
//   zoneout, recurrent_mask as in the forward, with float32 scratch keep_dh [B, P] (zoneout of
//   h), keep_dc and c_new [B, H] (zoneout of c): as the float32 kernel's
template <typename S>
void layer_recurrence_backward(const LayerSizes& s, const Steps& steps, bool reverse,
                               const Restarts& restarts, const S* dy,
                               const S* h0, const float* c0f, const S* w_hh,
                               const PackedWeight<S>* w_hh_packed, const S* w_hr,
                               const S* y, const float* gates, const float* cells, float* dh,
                               float* dc, float* dgates_step, S* dgates, float* db_slices, S* xh,
                               S* dh_all, S* r_all, float* r_step, float* dr,
                               float* restart_dh, float* restart_dc, const Zoneout& zoneout,
                               const S* recurrent_mask, float* keep_dh, float* keep_dc,
                               float* c_new) {
  const int64_t H = s.H, P = s.P, G = 4 * s.H;
  for_each_batch_slice(s, [&](int64_t b0, int64_t b1) {
    float* dh_state = dh + b0 * P;
    float* dc_state = dc + b0 * H;
    float* db_slice = db_slices + b0 * G;
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = std::min(b1, steps.batch[t]) - b0;
      if (n <= 0) {
        continue;
      }
      const int64_t row = steps.offset[t] + b0;
      int64_t n_prev = 0, prev_row = 0;  // as in the float32 kernel
      if (k > 0) {
        const int64_t t_prev = Steps::time_of(k - 1, s.T, reverse);
        n_prev = std::max<int64_t>(0, std::min(steps.batch[t_prev], b0 + n) - b0);
        prev_row = steps.offset[t_prev] + b0;
      }
      const uint8_t* restart = restarts.at(t, b0);  // rows that read h0 / c0 although r < n_prev
      fed_state_rows(n, P, n_prev, restart, y + prev_row * P, h0 + b0 * P,
                     recurrent_mask ? recurrent_mask + b0 * P : nullptr, xh + row * P);
      if (dy) {
        const S* dy_t = dy + row * P;
        for (int64_t u = 0; u < n * P; ++u) {
          dh_state[u] += static_cast<float>(dy_t[u]);
        }
      }
      float* keep_dh_rows = zoneout.on_h() ? keep_dh + b0 * P : nullptr;
      float* keep_dc_rows = zoneout.on_c() ? keep_dc + b0 * H : nullptr;
      const float* cells_t = zoneout_step_backward(
          zoneout, row, n, P, H, gates + row * G, cells + row * H, cells + prev_row * H,
          c0f + b0 * H, n_prev, restart, dh_state, dc_state, keep_dh_rows, keep_dc_rows,
          zoneout.on_c() ? c_new + b0 * H : nullptr);
      const float* dr_rows = dh_state;  // dL/d(o ⊙ tanh c_t)
      if (w_hr) {
        S* dh_rows = dh_all + row * P;
        to_lowp(dh_state, dh_rows, n * P);
        if (w_hh_packed) {
          PackedWeight<S>::release();  // MKL's GEMM sets the AMX tiles its own way
        }
        gemm_lowp<S>(false, false, n, H, P, dh_rows, P, w_hr, H, 0.f, dr + b0 * H, H);
        dr_rows = dr + b0 * H;
      }
      float* dg = dgates_step + b0 * G;
      gates_backward(n, H, gates + row * G, cells_t, cells + prev_row * H, c0f + b0 * H,
                     n_prev, restart, dr_rows, dc_state, dg, db_slice,
                     w_hr ? r_step + b0 * H : nullptr, nullptr);
      if (w_hr) {
        to_lowp(r_step + b0 * H, r_all + row * H, n * H);
      }
      S* dg_rows = dgates + row * G;
      to_lowp(dg, dg_rows, n * G);
      // dL/dh of the state this step read = dG_t W_hh
      if (w_hh_packed) {
        w_hh_packed->multiply(n, dg_rows, G, false, dh_state, P);
      } else {
        gemm_lowp<S>(false, false, n, P, G, dg_rows, G, w_hh, P, 0.f, dh_state, P);
      }
      finish_step_backward(n, P, H, recurrent_mask ? recurrent_mask + b0 * P : nullptr,
                           keep_dh_rows, keep_dc_rows, restart, dh_state, dc_state,
                           restarts.any() ? restart_dh + b0 * P : nullptr,
                           restarts.any() ? restart_dc + b0 * H : nullptr);
    }
    if (w_hh_packed) {
      PackedWeight<S>::release();
    }
  });
}

}  // namespace

std::string lowp_step_gemm_backend(at::ScalarType type) {
  const char* mkl =
      type == at::kBFloat16 ? "MKL cblas_gemm_bf16bf16f32" : "MKL cblas_gemm_f16f16f32";
  if (lowp_gemm(c10::BFloat16()) == nullptr) {
    return "at::mm in float32 (LSTM_EXT_NO_MKL)";
  }
  const std::string float_copy = std::string("; at most ") + std::to_string(kFloatStepRows) +
                                 " rows a step and T >= " + std::to_string(kMinStepsToPack) +
                                 ": a float32 copy of W_hh through the float32 GEMM";
  if (type == at::kBFloat16 && PackedWeight<c10::BFloat16>::usable(2, 16)) {
    return std::string("oneDNN brgemm on W_hh packed per call (T >= ") +
           std::to_string(kMinStepsToPack) + ", K even, 4H a multiple of 16), else " + mkl +
           float_copy;
  }
  return mkl + float_copy;
}

bool has_lowp_blas() {
  return lowp_gemm(c10::BFloat16()) != nullptr && lowp_gemm(c10::Half()) != nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_lowp(
    const LayerSizes& s, const Steps& steps, const Restarts& restarts, bool packed,
    const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const c10::optional<at::Tensor>& bias_ih,
    const c10::optional<at::Tensor>& bias_hh, const c10::optional<at::Tensor>& weight_hr,
    bool reverse, bool keep_state, const Zoneout& zoneout,
    const c10::optional<at::Tensor>& recurrent_mask) {
  const bool recurrent = recurrent_mask.has_value() && recurrent_mask->defined();
  const auto x = input.expect_contiguous(), h0c = h0.expect_contiguous(),
             c0c = c0.expect_contiguous(), w_ih = weight_ih.expect_contiguous(),
             w_hh = weight_hh.expect_contiguous();
  const auto w_hr = contiguous_or_none(weight_hr);
  const auto opts = input.options();
  const auto float_opts = opts.dtype(at::kFloat);
  const int64_t G = 4 * s.H;
  const bool proj = weight_hr.has_value();
  at::Tensor output = at::empty(per_step_shape(s, packed, s.P), opts);
  at::Tensor h_n = at::empty({s.B, s.P}, opts);
  at::Tensor c_n = at::empty({s.B, s.H}, opts);
  std::vector<int64_t> gates_shape = per_step_shape(s, packed, G);
  std::vector<int64_t> cells_shape = per_step_shape(s, packed, s.H);
  if (!keep_state) {  // nothing kept for a backward: no rows
    gates_shape[0] = 0;
    cells_shape[0] = 0;
  }
  at::Tensor gates = at::empty(gates_shape, float_opts);
  at::Tensor cells = at::empty(cells_shape, float_opts);
  const int64_t chunk_steps =
      std::clamp<int64_t>(kChunkElements / std::max<int64_t>(s.B * G, 1), 1, s.T);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "lstm_layer_forward_lowp", [&] {
    // float32: bias [4H], c_state [B, H], r [B, H], y_float [B, P] (proj), gates of one chunk;
    // scalar_t: r_lowp [B, H] (proj)
    const int64_t buffer_rows = keep_state ? 0 : chunk_steps * s.B;  // >= one step's B rows
    // and c_prev [B, H] (zoneout of c); scalar_t: fed [B, P] (recurrent dropout)
    Workspace<float> work(G + 2 * s.B * s.H + (proj ? s.B * s.P : 0) + buffer_rows * G +
                              (zoneout.on_c() ? s.B * s.H : 0),
                          float_opts);
    float* c_prev = zoneout.on_c() ? work.take(s.B * s.H) : nullptr;
    at::Tensor fed = recurrent ? at::empty({s.B, s.P}, opts) : at::Tensor();
    float* bias = work.take(G);
    combined_bias_into<float, scalar_t>(bias_ih, bias_hh, G, bias);
    float* c_state = work.take(s.B * s.H);
    float* r = work.take(s.B * s.H);
    float* y_float = proj ? work.take(s.B * s.P) : nullptr;
    float* gates_buffer = keep_state ? gates.data_ptr<float>() : work.take(buffer_rows * G);
    at::Tensor r_lowp = proj ? at::empty({s.B, s.H}, opts) : at::Tensor();
    std::optional<PackedWeight<scalar_t>> w_packed;
    at::Tensor xh;
    if (s.T >= kMinStepsToPack && PackedWeight<scalar_t>::usable(s.I + s.P, G)) {
      const at::Tensor stacked = stacked_transpose<scalar_t>(*w_ih, *w_hh);
      w_packed.emplace(stacked.data_ptr<scalar_t>(), s.I + s.P, G, opts);
      xh = at::empty({s.B, s.I + s.P}, opts);
    }
    at::Tensor w_hh_t_float, h_float;
    if (!w_packed && s.T >= kMinStepsToPack && s.B <= kFloatStepRows) {
      w_hh_t_float = w_hh->to(at::kFloat).t().contiguous();  // [P, 4H]
      h_float = at::empty({s.B, s.P}, float_opts);
    }
    layer_forward<scalar_t>(
        s, steps, reverse, restarts, x->data_ptr<scalar_t>(), h0c->data_ptr<scalar_t>(),
        c0c->data_ptr<scalar_t>(), w_ih->data_ptr<scalar_t>(), w_hh->data_ptr<scalar_t>(),
        w_packed ? &*w_packed : nullptr, bias, data_or_null<scalar_t>(w_hr),
        output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(), c_state, gates_buffer, keep_state,
        chunk_steps, keep_state ? cells.data_ptr<float>() : nullptr, r,
        proj ? r_lowp.data_ptr<scalar_t>() : nullptr, y_float,
        xh.defined() ? xh.data_ptr<scalar_t>() : nullptr, zoneout,
        recurrent ? recurrent_mask->data_ptr<scalar_t>() : nullptr, c_prev,
        recurrent ? fed.data_ptr<scalar_t>() : nullptr,
        w_hh_t_float.defined() ? w_hh_t_float.data_ptr<float>() : nullptr,
        h_float.defined() ? h_float.data_ptr<float>() : nullptr);
    to_lowp(c_state, c_n.data_ptr<scalar_t>(), s.B * s.H);
  });
  return {output, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_lowp(const LayerSizes& s, const Steps& steps, const Restarts& restarts,
                    const at::Tensor* grad_output,
                    const at::Tensor* grad_h_n, const at::Tensor* grad_c_n,
                    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                    const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                    const c10::optional<at::Tensor>& weight_hr, bool reverse,
                    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                    bool need_grad_input, const Zoneout& zoneout,
                    const c10::optional<at::Tensor>& recurrent_mask) {
  const bool recurrent = recurrent_mask.has_value() && recurrent_mask->defined();
  const auto x = input.expect_contiguous(), h0c = h0.expect_contiguous(),
             c0c = c0.expect_contiguous(), w_ih = weight_ih.expect_contiguous(),
             w_hh = weight_hh.expect_contiguous(), y = output.expect_contiguous(),
             gates_c = gates.expect_contiguous(), cells_c = cells.expect_contiguous();
  const auto w_hr = contiguous_or_none(weight_hr);
  const bool proj = w_hr.has_value();
  const auto opts = input.options();
  const auto float_opts = opts.dtype(at::kFloat);
  const int64_t G = 4 * s.H, H = s.H, P = s.P;
  at::Tensor grad_input = at::empty(rows_or_none(input.sizes(), need_grad_input), opts);
  at::Tensor grad_h0 = at::empty({s.B, P}, opts);
  at::Tensor grad_c0 = at::empty({s.B, H}, opts);
  at::Tensor grad_w_ih = at::empty({G, s.I}, opts);
  at::Tensor grad_w_hh = at::empty({G, P}, opts);
  at::Tensor grad_bias = at::empty({G}, opts);
  at::Tensor grad_w_hr = at::empty({proj ? P : 0, H}, opts);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "lstm_layer_backward_lowp", [&] {
    using S = scalar_t;
    // float32: dh [B, P], dc [B, H], c0f [B, H], dgates_step [B, 4H], db_slices [B, 4H],
    // r_step, dr [B, H] (proj), weight-gradient scratch [4H, max(I, P)], dx [rows, I], db [4H],
    // restart_dh [B, P] and restart_dc [B, H] (what the restarts pass to h0, c0)
    // S: dgates [rows, 4H], xh [rows, P], dh_all [rows, P] and r_all [rows, H] (proj)
    const int64_t dw_elements = G * std::max(s.I, P);
    Workspace<float> work(s.B * (P + 2 * H + 2 * G) + (proj ? 2 * s.B * H : 0) + dw_elements +
                              (need_grad_input ? s.N * s.I : 0) + G +
                              (restarts.any() ? s.B * (P + H) : 0) +
                              (zoneout.on_h() ? s.B * P : 0) + (zoneout.on_c() ? 2 * s.B * H : 0),
                          float_opts);
    // zoneout: keep_dh [B, P], keep_dc and c_new [B, H]
    float* keep_dh = zoneout.on_h() ? work.take(s.B * P) : nullptr;
    float* keep_dc = zoneout.on_c() ? work.take(s.B * H) : nullptr;
    float* c_new = zoneout.on_c() ? work.take(s.B * H) : nullptr;
    float* dh = work.take(s.B * P);
    float* dc = work.take(s.B * H);
    float* c0f = work.take(s.B * H);
    float* dgates_step = work.take(s.B * G);
    float* db_slices = work.take(s.B * G);
    float* r_step = proj ? work.take(s.B * H) : nullptr;
    float* dr = proj ? work.take(s.B * H) : nullptr;
    float* dw = work.take(dw_elements);
    float* dx = need_grad_input ? work.take(s.N * s.I) : nullptr;
    float* db = work.take(G);
    float* restart_dh = restarts.any() ? work.take(s.B * P) : nullptr;
    float* restart_dc = restarts.any() ? work.take(s.B * H) : nullptr;
    if (restarts.any()) {
      std::fill(restart_dh, restart_dh + s.B * P, 0.f);
      std::fill(restart_dc, restart_dc + s.B * H, 0.f);
    }
    Workspace<S> lowp(s.N * (G + P) + (proj ? s.N * (P + H) : 0), opts);
    S* dgates = lowp.take(s.N * G);
    S* xh = lowp.take(s.N * P);
    S* dh_all = proj ? lowp.take(s.N * P) : nullptr;
    S* r_all = proj ? lowp.take(s.N * H) : nullptr;
    if (grad_h_n) {
      to_float(grad_h_n->data_ptr<S>(), dh, s.B * P);
    } else {
      std::fill(dh, dh + s.B * P, 0.f);
    }
    if (grad_c_n) {
      to_float(grad_c_n->data_ptr<S>(), dc, s.B * H);
    } else {
      std::fill(dc, dc + s.B * H, 0.f);
    }
    to_float(c0c->data_ptr<S>(), c0f, s.B * H);
    std::fill(db_slices, db_slices + s.B * G, 0.f);
    std::optional<PackedWeight<S>> w_hh_packed;
    if (s.T >= kMinStepsToPack && PackedWeight<S>::usable(G, P)) {
      w_hh_packed.emplace(w_hh->data_ptr<S>(), G, P, opts);  // W_hh [4H, P] = B [K, N] as stored
    }
    layer_recurrence_backward<S>(
        s, steps, reverse, restarts, grad_output ? grad_output->data_ptr<S>() : nullptr,
        h0c->data_ptr<S>(), c0f, w_hh->data_ptr<S>(), w_hh_packed ? &*w_hh_packed : nullptr,
        data_or_null<S>(w_hr), y->data_ptr<S>(),
        gates_c->data_ptr<float>(), cells_c->data_ptr<float>(), dh, dc, dgates_step, dgates,
        db_slices, xh, dh_all, r_all, r_step, dr, restart_dh, restart_dc, zoneout,
        recurrent ? recurrent_mask->data_ptr<S>() : nullptr, keep_dh, keep_dc, c_new);
    if (restarts.any()) {
      add_restart_gradients(s.B, P, H, restart_dh, restart_dc, dh, dc);
    }
    // The weight gradients and dx as single GEMMs over all rows (MKL's threads), then rounded.
    if (dx) {
      gemm_lowp<S>(false, false, s.N, s.I, G, dgates, G, w_ih->data_ptr<S>(), s.I, 0.f, dx, s.I);
      to_lowp(dx, grad_input.data_ptr<S>(), s.N * s.I);
    }
    gemm_lowp<S>(true, false, G, s.I, s.N, dgates, G, x->data_ptr<S>(), s.I, 0.f, dw, s.I);
    to_lowp(dw, grad_w_ih.data_ptr<S>(), G * s.I);
    gemm_lowp<S>(true, false, G, P, s.N, dgates, G, xh, P, 0.f, dw, P);
    to_lowp(dw, grad_w_hh.data_ptr<S>(), G * P);
    if (proj) {
      gemm_lowp<S>(true, false, P, H, s.N, dh_all, P, r_all, H, 0.f, dw, H);
      to_lowp(dw, grad_w_hr.data_ptr<S>(), P * H);
    }
    std::fill(db, db + G, 0.f);
    for (int64_t b = 0; b < s.B; ++b) {  // db: the slices' sums (unused rows are zeros)
      for (int64_t j = 0; j < G; ++j) {
        db[j] += db_slices[b * G + j];
      }
    }
    to_lowp(db, grad_bias.data_ptr<S>(), G);
    to_lowp(dh, grad_h0.data_ptr<S>(), s.B * P);
    to_lowp(dc, grad_c0.data_ptr<S>(), s.B * H);
  });
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace cpu
}  // namespace lstm_ext
