// The int8 inference layer of lstm_ext.quantized.LSTM (op lstm_ext::quantized_lstm_layer; schema
// in csrc/ops.cpp). Dynamic quantization, as torch's own int8 LSTM does it, finer grained and
// with a fused step:
// - weights: int8, symmetric, one scale per output row (torch's LSTM: one per tensor);
// - activations: each row of each product's left operand (x_t, h_{t-1}, and o * tanh(c_t) before
//   a projection) quantized on the fly to unsigned 7-bit (0..127; scale and zero point from that
//   row's min and max; torch: one scale per step's whole operand). 7 bits as torch's
//   reduce_range: the AVX2 kernels add pairs of u8 * s8 products in int16, which 8-bit
//   activations could saturate; with 7 bits every x86-64 CPU, VNNI or not, gives the same int32;
// - products: FBGEMM (part of libtorch_cpu, the library behind torch's quantized linear layers),
//   u8 x s8 with int32 accumulation, dequantized here:
//   out[m, n] = row_scale[m] * weight_scale[n] * (C[m, n] - row_zero_point[m] * sum_k W[n, k]);
// - gate math and cell state in float32 (the float32 kernels' gate pass, csrc/cpu/gates.h; with
//   layer_norm, the layer-normalised cell's, csrc/cpu/layer_norm_pass.h, on the int8 products).
// Per-row scales let the input projection of a chunk of steps run as one product (as the float
// kernels do); a step is then h W_hh^T, the gate pass and, with a projection, r W_hr^T.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "blas.h"  // Vec, load_vec
#include "gates.h"
#include "layer_common.h"
#include "layer_norm_pass.h"

#if defined(__x86_64__) && __has_include(<fbgemm/Fbgemm.h>)
#define LSTM_EXT_HAS_FBGEMM 1
#include <fbgemm/Fbgemm.h>
#else
#define LSTM_EXT_HAS_FBGEMM 0
#endif

namespace lstm_ext {
namespace cpu {
namespace {

using at::Tensor;
using c10::optional;

constexpr const char* kOp = "lstm_ext::quantized_lstm_layer";

// The left operands' range: unsigned 7-bit (see the top of the file).
constexpr int32_t kActivationMax = 127;

// Below this many multiply-adds a product runs on one thread (a fork and join costs more).
constexpr int64_t kMinThreadedMacs = 1 << 20;

// From this many weight values (W_ih and W_hh) the weights are packed on several threads.
constexpr int64_t kMinThreadedPackValues = 1 << 18;

// Gate values per chunk of a thread's input projection (1 MB: stays in a core's L2).
constexpr int64_t kChunkGateValues = 1 << 18;


void check_weight(const Tensor& weight, const Tensor& scale, const char* name, int64_t rows,
                  int64_t cols) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.size(0) == rows &&
                  weight.size(1) == cols,
              kOp, ": ", name, " must be int8 [", rows, ", ", cols, "], got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == rows,
              kOp, ": the scales of ", name, " must be float32 [", rows, "], got ",
              scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(weight.device().is_cpu() && scale.device().is_cpu(), kOp, ": ", name,
              " must be on the CPU");
}

#if LSTM_EXT_HAS_FBGEMM

// Quantizes rows A [M, K] (row stride lda) into values [M, K], with scales, zero points and
// finite [M] (see QuantizedRows). The range is kept per lane of a generic vector of the
// variant's width (lo[j], hi[j] over k = j mod lanes), then reduced: written as arrays of lanes,
// GCC left it scalar (6.8% of an int8 forward at (T, B, I, H) = (50, 128, 512, 512)).
template <int Bytes>
__attribute__((always_inline)) inline void quantize_rows_body(const float* A, int64_t M,
                                                              int64_t K, int64_t lda,
                                                              uint8_t* values, float* scales,
                                                              int32_t* zero_points,
                                                              uint8_t* finite) {
  constexpr int kLanes = Bytes / 4;
  using Lanes = typename Vec<float, Bytes>::type;  // blas.h
  for (int64_t m = 0; m < M; ++m) {
    const float* __restrict__ row = A + m * lda;
    Lanes lo = {}, hi = {}, check = {};  // the range holds 0
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      const Lanes v = load_vec<Lanes>(row + k);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      check += v * 0.f;  // NaN after any NaN or infinity
    }
    for (; k < K; ++k) {
      lo[0] = std::min(lo[0], row[k]);
      hi[0] = std::max(hi[0], row[k]);
      check[0] += row[k] * 0.f;
    }
    float low = 0.f, high = 0.f, probe = 0.f;
    for (int j = 0; j < kLanes; ++j) {
      low = std::min(low, lo[j]);
      high = std::max(high, hi[j]);
      probe += check[j];
    }
    finite[m] = probe == 0.f;
    uint8_t* __restrict__ q = values + m * K;
    if (!finite[m] || high - low == 0.f) {
      scales[m] = 1.f;
      zero_points[m] = 0;
      std::fill_n(q, K, uint8_t{0});
      continue;
    }
    const float scale = (high - low) / kActivationMax, inverse = 1.f / scale;
    const float zero_point = std::min(std::max(std::nearbyint(-low * inverse), 0.f),
                                      static_cast<float>(kActivationMax));
    scales[m] = scale;
    zero_points[m] = static_cast<int32_t>(zero_point);
    for (k = 0; k < K; ++k) {
      const float v = std::nearbyint(row[k] * inverse) + zero_point;
      q[k] = static_cast<uint8_t>(
          static_cast<int32_t>(std::min(std::max(v, 0.f), static_cast<float>(kActivationMax))));
    }
  }
}

LSTM_EXT_ISA_VARIANTS(quantize_rows,
                      (const float* A, int64_t M, int64_t K, int64_t lda, uint8_t* values,
                       float* scales, int32_t* zero_points, uint8_t* finite),
                      (A, M, K, lda, values, scales, zero_points, finite), quantize_rows_body)

// out [M, N] (row stride ld_out) = (accumulate ? out : 0) + the dequantized C [M, N]:
// row_scale[m] * weight_scale[n] * (C[m, n] - zero_point[m] * row_sums[n]); NaN where a row
// was not finite.
template <int Bytes>
__attribute__((always_inline)) inline void dequantize_rows_body(
    const int32_t* C, int64_t M, int64_t N, const float* row_scales, const int32_t* zero_points,
    const uint8_t* finite, const float* weight_scales, const int32_t* row_sums, float* out,
    int64_t ld_out, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    float* __restrict__ o = out + m * ld_out;
    const int32_t* __restrict__ c = C + m * N;
    if (!finite[m]) {
      std::fill_n(o, N, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    const float row_scale = row_scales[m];
    const int32_t zero_point = zero_points[m];
    if (accumulate) {
      for (int64_t n = 0; n < N; ++n) {
        o[n] += row_scale * weight_scales[n] * static_cast<float>(c[n] - zero_point * row_sums[n]);
      }
    } else {
      for (int64_t n = 0; n < N; ++n) {
        o[n] = row_scale * weight_scales[n] * static_cast<float>(c[n] - zero_point * row_sums[n]);
      }
    }
  }
}

LSTM_EXT_ISA_VARIANTS(dequantize_rows,
                      (const int32_t* C, int64_t M, int64_t N, const float* row_scales,
                       const int32_t* zero_points, const uint8_t* finite,
                       const float* weight_scales, const int32_t* row_sums, float* out,
                       int64_t ld_out, bool accumulate),
                      (C, M, N, row_scales, zero_points, finite, weight_scales, row_sums, out,
                       ld_out, accumulate),
                      dequantize_rows_body)

// Rows of a product's left operand, quantized row by row (see the top of the file).
struct QuantizedRows {
  std::vector<uint8_t> values;     // [M, K]
  std::vector<float> scales;       // [M]
  std::vector<int32_t> zero_points;  // [M]
  std::vector<uint8_t> finite;     // [M]: 0 where the row holds a NaN or an infinity

  // A [M, K], row stride lda, as rows first_row .. first_row + M - 1 (the rows before are kept:
  // a chunk's steps are quantized one after another). A row with a NaN or an infinity cannot be
  // quantized: it is quantized as zeros and its outputs become NaN (see dequantize).
  void quantize(const float* A, int64_t M, int64_t K, int64_t lda, int64_t first_row = 0) {
    values.resize((first_row + M) * K);
    scales.resize(first_row + M);
    zero_points.resize(first_row + M);
    finite.resize(first_row + M);
    quantize_rows(A, M, K, lda, values.data() + first_row * K, scales.data() + first_row,
                  zero_points.data() + first_row, finite.data() + first_row);
  }
};

// One weight W [N, K] (int8, row scales) packed for FBGEMM as its B = W^T, once per call.
class Int8Weight {
 public:
  Int8Weight(const Tensor& weight, const Tensor& scale)
      : weight_(weight.contiguous()), scale_(scale.contiguous()), N_(weight.size(0)),
        K_(weight.size(1)) {
    row_sums_.assign(N_, 0);  // sum_k W[n, k]: what a zero point adds to column n
    if (N_ == 0 || K_ == 0) {
      return;  // the product is zeros (or empty): see products()
    }
    const int8_t* w = weight_.data_ptr<int8_t>();
    packed_ = std::make_unique<fbgemm::PackBMatrix<int8_t>>(
        fbgemm::matrix_op_t::Transpose, static_cast<int>(K_), static_cast<int>(N_), w,
        static_cast<int>(K_), nullptr, 1);
    for (int64_t n = 0; n < N_; ++n) {
      int32_t sum = 0;
      for (int64_t k = 0; k < K_; ++k) {
        sum += w[n * K_ + k];
      }
      row_sums_[n] = sum;
    }
  }

  // C [M, N] (row stride N) = the rows' values [M, K] W^T, in int32; over the threads where
  // may_thread and the product is large enough.
  void products(const QuantizedRows& a, int64_t M, int32_t* C, bool may_thread) const {
    if (M == 0 || N_ == 0 || K_ == 0) {
      std::fill_n(C, M * N_, 0);
      return;
    }
    const int tasks = may_thread && M * N_ * K_ >= kMinThreadedMacs ? at::get_num_threads() : 1;
    auto run = [&](int task) {
      fbgemm::PackAMatrix<uint8_t> packed_a(fbgemm::matrix_op_t::NoTranspose,
                                            static_cast<int>(M), static_cast<int>(K_),
                                            a.values.data(), static_cast<int>(K_));
      fbgemm::DoNothing<int32_t, int32_t> done;
      fbgemm::memCopy<> copy(done);
      fbgemm::fbgemmPacked(packed_a, *packed_, C, C, static_cast<int>(N_), copy, task, tasks);
    };
    if (tasks == 1) {
      run(0);
    } else {
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          run(static_cast<int>(task));
        }
      });
    }
  }

  // out[m, :] (row stride ld_out) = (accumulate ? out[m, :] : 0) + the dequantized C[m, :];
  // NaN for rows that were not finite.
  void dequantize(const QuantizedRows& a, int64_t M, const int32_t* C, float* out,
                  int64_t ld_out, bool accumulate) const {
    dequantize_rows(C, M, N_, a.scales.data(), a.zero_points.data(), a.finite.data(),
                    scale_.data_ptr<float>(), row_sums_.data(), out, ld_out, accumulate);
  }

  // out [M, N] (row stride ld_out) (+)= the quantized rows [M, K] W^T, dequantized.
  void product(const QuantizedRows& rows, int64_t M, float* out, int64_t ld_out, bool accumulate,
               bool may_thread, std::vector<int32_t>& int_scratch) const {
    if (M == 0 || N_ == 0) {
      return;
    }
    int_scratch.resize(M * N_);
    products(rows, M, int_scratch.data(), may_thread);
    dequantize(rows, M, int_scratch.data(), out, ld_out, accumulate);
  }

  // out [M, N] (row stride ld_out) (+)= A [M, K] W^T, A float (row stride lda).
  void product(const float* A, int64_t M, int64_t lda, float* out, int64_t ld_out,
               bool accumulate, bool may_thread, QuantizedRows& rows_scratch,
               std::vector<int32_t>& int_scratch) const {
    if (M == 0 || N_ == 0) {
      return;
    }
    rows_scratch.quantize(A, M, K_, lda);
    product(rows_scratch, M, out, ld_out, accumulate, may_thread, int_scratch);
  }

 private:
  Tensor weight_, scale_;
  int64_t N_, K_;
  std::unique_ptr<fbgemm::PackBMatrix<int8_t>> packed_;
  std::vector<int32_t> row_sums_;
};

#endif  // LSTM_EXT_HAS_FBGEMM

std::tuple<Tensor, Tensor, Tensor> quantized_lstm_layer_cpu(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& scale_ih, const Tensor& weight_hh, const Tensor& scale_hh,
    const optional<Tensor>& bias, const optional<Tensor>& weight_hr,
    const optional<Tensor>& scale_hr, const optional<Tensor>& batch_sizes, bool reverse,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& ln_weight_ih, const optional<Tensor>& ln_weight_hh,
    const optional<Tensor>& ln_weight_c, const optional<Tensor>& ln_bias_c) {
  const bool packed = batch_sizes.has_value();
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.dim() == (packed ? 2 : 3), kOp,
              ": input must be float32 ", packed ? "[N, I] (packed)" : "[T, B, I]", ", got ",
              input.scalar_type(), " ", input.sizes());
  TORCH_CHECK(weight_ih.dim() == 2 && weight_ih.size(0) % 4 == 0 && weight_hh.dim() == 2, kOp,
              ": weight_ih must be [4 * hidden_size, input_size] and weight_hh 2-D, got ",
              weight_ih.sizes(), " and ", weight_hh.sizes());
  const int64_t G = weight_ih.size(0), H = G / 4, I = input.size(-1);
  const int64_t P = weight_hh.size(1);
  check_weight(weight_ih, scale_ih, "weight_ih", G, I);
  check_weight(weight_hh, scale_hh, "weight_hh", G, P);
  TORCH_CHECK(weight_hr.has_value() == scale_hr.has_value(), kOp,
              ": weight_hr and scale_hr come together");
  if (weight_hr) {
    check_weight(*weight_hr, *scale_hr, "weight_hr", P, H);
  } else {
    TORCH_CHECK(P == H, kOp, ": without weight_hr, weight_hh must have hidden_size (", H,
                ") columns, got ", P);
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == G &&
                    bias->device().is_cpu(),
                kOp, ": bias must be float32 [", G, "] on the CPU, got ", bias->scalar_type(), " ",
                bias->sizes(), " on ", bias->device());
  }

  int64_t T = 0, B = 0;
  optional<Tensor> step_sizes;  // batch_sizes as int64, checked
  if (packed) {
    step_sizes = batch_sizes->to(at::kLong).contiguous();
    TORCH_CHECK(step_sizes->dim() == 1 && step_sizes->device().is_cpu(), kOp,
                ": batch_sizes must be a 1-D CPU tensor, got ", step_sizes->sizes());
    T = step_sizes->numel();
    const int64_t* s = step_sizes->data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(s[t] > 0 && (t == 0 || s[t] <= s[t - 1]), kOp,
                  ": batch_sizes must be positive and non-increasing (PackedSequence's), got ",
                  *step_sizes);
      total += s[t];
    }
    TORCH_CHECK(total == input.size(0), kOp, ": batch_sizes sum to ", total, " but input has ",
                input.size(0), " rows");
    B = T > 0 ? s[0] : 0;
  } else {
    T = input.size(0);
    B = input.size(1);
  }
  const int64_t total_rows = packed ? input.size(0) : T * B;
  const LayerSizes sizes{T, B, I, H, P, total_rows};
  check_reset(kOp, reset, input, sizes);
  TORCH_CHECK(zoneout_c >= 0 && zoneout_c < 1 && zoneout_h >= 0 && zoneout_h < 1, kOp,
              ": zoneout_c and zoneout_h must be probabilities in [0, 1), got ", zoneout_c,
              " and ", zoneout_h);
  for (const auto& [state, width, name] :
       {std::tuple<const Tensor&, int64_t, const char*>{h0, P, "h0"}, {c0, H, "c0"}}) {
    TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 2 && state.size(0) == B &&
                    state.size(1) == width,
                kOp, ": ", name, " must be float32 [", B, ", ", width, "], got ",
                state.scalar_type(), " ", state.sizes());
  }
  TORCH_CHECK(input.device().is_cpu() && h0.device().is_cpu() && c0.device().is_cpu(), kOp,
              ": every tensor must be on the CPU");
  const bool with_layer_norm = ln_weight_ih.has_value();
  TORCH_CHECK(ln_weight_hh.has_value() == with_layer_norm &&
                  ln_weight_c.has_value() == with_layer_norm &&
                  ln_bias_c.has_value() == with_layer_norm,
              kOp, ": ln_weight_ih, ln_weight_hh, ln_weight_c and ln_bias_c come together");
  if (with_layer_norm) {
    for (const auto& [t, size, name] : {std::tuple<const Tensor&, int64_t, const char*>{
                                            *ln_weight_ih, G, "ln_weight_ih"},
                                        {*ln_weight_hh, G, "ln_weight_hh"},
                                        {*ln_weight_c, H, "ln_weight_c"},
                                        {*ln_bias_c, H, "ln_bias_c"}}) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == size &&
                      t.device().is_cpu(),
                  kOp, ": ", name, " must be float32 [", size, "] on the CPU, got ",
                  t.scalar_type(), " ", t.sizes(), " on ", t.device());
    }
  }

  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape.back() = P;
  Tensor output = at::empty(out_shape, input.options());
  const Tensor h0_rows = h0.contiguous(), c0_rows = c0.contiguous();
  Tensor h = h0_rows.clone(), c = c0_rows.clone();
  if (T == 0 || B == 0) {
    return {output, h, c};
  }
#if LSTM_EXT_HAS_FBGEMM
  TORCH_CHECK(fbgemm::fbgemmSupportedCPU(), kOp,
              ": int8 needs a CPU with AVX2 or AVX-512 (FBGEMM's kernels); this one has neither");
  const Tensor x = input.contiguous();
  // The weights packed for FBGEMM, each on its own thread where they are large (packing is
  // single-threaded: 5% of a forward at (T, B, I, H) = (50, 128, 512, 512) one after another).
  std::unique_ptr<Int8Weight> packed_weights[3];
  const std::pair<const Tensor*, const Tensor*> to_pack[3] = {
      {&weight_ih, &scale_ih}, {&weight_hh, &scale_hh},
      {weight_hr ? &*weight_hr : nullptr, weight_hr ? &*scale_hr : nullptr}};
  const int64_t n_packed = weight_hr ? 3 : 2;
  const int64_t grain = G * (I + P) >= kMinThreadedPackValues ? 1 : n_packed;
  at::parallel_for(0, n_packed, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      packed_weights[i] = std::make_unique<Int8Weight>(*to_pack[i].first, *to_pack[i].second);
    }
  });
  const Int8Weight &w_ih = *packed_weights[0], &w_hh = *packed_weights[1];
  const Int8Weight* const w_hr = packed_weights[2].get();
  // Where each step's rows are, and the rows that start anew from h0 / c0 (lstm_steps.h).
  const Steps steps(sizes, step_sizes);
  const Restarts restarts(steps, reset, reverse);
  // Zoneout in eval, its expectation (an int8 module is for inference): each state mixes its
  // previous and new value (lstm_regularize.h).
  const Zoneout zoneout(zoneout_c, zoneout_h, c10::nullopt, c10::nullopt);
  const float* h0_data = h0_rows.data_ptr<float>();
  const float* c0_data = c0_rows.data_ptr<float>();
  // A row's gate values: [4H], the input projection x W_ih^T, to which the step adds h W_hh^T
  // (the gate pass adds the bias). With layer_norm, each product has its own place in the row's
  // norms (csrc/lstm_layer_norm.h: x W_ih^T first, then the step's h W_hh^T), as in the float
  // kernels.
  const NormsRow layout{H};
  const int64_t width = with_layer_norm ? layout.width() : G;
  const float* x_data = x.data_ptr<float>();
  const Tensor ln_held[] = {with_layer_norm ? ln_weight_ih->contiguous() : Tensor(),
                            with_layer_norm ? ln_weight_hh->contiguous() : Tensor(),
                            with_layer_norm ? ln_weight_c->contiguous() : Tensor(),
                            with_layer_norm ? ln_bias_c->contiguous() : Tensor()};
  const layer_norm::LayerNormParams<float> ln =
      with_layer_norm ? layer_norm::LayerNormParams<float>{ln_held[0].data_ptr<float>(),
                                                      ln_held[1].data_ptr<float>(),
                                                      ln_held[2].data_ptr<float>(),
                                                      ln_held[3].data_ptr<float>()}
                 : layer_norm::LayerNormParams<float>{};
  const Tensor bias_all = bias ? bias->contiguous() : at::zeros({G}, input.options());
  const float* bias_data = bias_all.data_ptr<float>();
  float* out = output.data_ptr<float>();
  float* h_data = h.data_ptr<float>();
  float* c_data = c.data_ptr<float>();
  // The time loop over batch rows [b0, b1). Rows that a packed batch no longer has keep their
  // last state (forward), and rows a reverse pass has not reached yet still hold h0, c0: each
  // step reads and writes only its rows below rows[t].
  auto run_rows = [&](int64_t b0, int64_t b1, bool may_thread) {
    // The input projection runs a chunk of steps at a time, on these rows: about
    // kChunkGateValues gate values that stay in the cache (every step's at once were 52 MB at
    // (T, B, H) = (50, 128, 512), written and read back through memory, and fresh pages every
    // call).
    const int64_t chunk_steps =
        std::clamp<int64_t>(kChunkGateValues / std::max<int64_t>(1, (b1 - b0) * width), 1, T);
    QuantizedRows inputs, quantized;
    std::vector<int32_t> accumulators;
    // (Not value-initialised: every element is written by the products, or is a norms row's
    // padding, never read.)
    std::unique_ptr<float[]> gates_x(new float[chunk_steps * (b1 - b0) * width]);
    std::vector<float> r((b1 - b0) * H);  // o * tanh(c_t): h_t before a projection
    std::vector<float> step_gates(with_layer_norm ? (b1 - b0) * G : 0);  // layer_norm: [n, 4H]
    // the states before the step, where zoneout mixes them into the new ones
    std::vector<float> h_prev(zoneout.on_h() ? (b1 - b0) * P : 0);
    std::vector<float> c_prev(zoneout.on_c() ? (b1 - b0) * H : 0);
    float* hb = h_data + b0 * P;
    float* cb = c_data + b0 * H;
    const LayerSteps walk{steps, restarts, reverse};
    for (int64_t k0 = 0; k0 < T; k0 += chunk_steps) {
      const int64_t k1 = std::min(T, k0 + chunk_steps);
      int64_t chunk_rows = 0;  // the chunk's input rows, one step's after another
      walk.forward(k0, k1, b0, b1, [&](const StepRows& step) {
        inputs.quantize(x_data + step.row * I, step.n, I, I, chunk_rows);
        chunk_rows += step.n;
      });
      w_ih.product(inputs, chunk_rows, gates_x.get(), width, false, may_thread, accumulators);
      int64_t chunk_row = 0;
      walk.forward(k0, k1, b0, b1, [&](const StepRows& step) {
        const int64_t n = step.n;
        float* const step_x = gates_x.get() + chunk_row * width;  // [n, width]
        chunk_row += n;
        if (step.restart) {
          restart_states(step.restart, n, P, H, h0_data + b0 * P, c0_data + b0 * H, hb, cb);
        }
        std::copy_n(hb, h_prev.empty() ? 0 : n * P, h_prev.data());
        std::copy_n(cb, c_prev.empty() ? 0 : n * H, c_prev.data());
        if (with_layer_norm) {
          w_hh.product(hb, n, P, step_x + layout.hh(), width, false, may_thread, quantized,
                       accumulators);
          layer_norm::ln_gates_forward(n, H, step_x, ln, bias_data, step_gates.data(), cb,
                                       r.data());
        } else {
          // step_x: [n, 4H], the step's gates
          w_hh.product(hb, n, P, step_x, G, true, may_thread, quantized, accumulators);
          gates_forward(n, H, 0, H, step_x, bias_data, cb, r.data(), nullptr);
        }
        if (w_hr) {
          w_hr->product(r.data(), n, H, hb, P, false, may_thread, quantized, accumulators);
        } else {
          std::copy_n(r.data(), n * H, hb);
        }
        if (zoneout.on_c()) {
          zoneout_mix(nullptr, zoneout.p_c, n * H, c_prev.data(), cb);
        }
        if (zoneout.on_h()) {
          zoneout_mix(nullptr, zoneout.p_h, n * P, h_prev.data(), hb);
        }
        std::copy_n(hb, n * P, out + step.row * P);
      });
    }
  };
  // Each row is quantized alone, so the rows are independent through the whole sequence: the
  // batch is split over the threads as in the float kernels (layer_common.h), each slice running
  // every step on its own rows (the same numbers however it is split); a batch too small to
  // split has its step's products use the threads instead.
  const bool split = batch_is_split(sizes) && at::get_num_threads() > 1;
  for_each_batch_slice(sizes, [&](int64_t b0, int64_t b1) { run_rows(b0, b1, !split); });
  return {output, h, c};
#else
  TORCH_CHECK(false, kOp,
              ": this build of lstm_ext has no int8 kernels (it was compiled without FBGEMM's "
              "headers, which x86-64 builds of torch ship)");
#endif
}

}  // namespace
}  // namespace cpu
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("quantized_lstm_layer", &lstm_ext::cpu::quantized_lstm_layer_cpu);
}

// Inference only: differentiating through it is an error at backward (lstm_ext.quantized's
// modules refuse inputs that need a gradient before that).
TORCH_LIBRARY_IMPL(lstm_ext, Autograd, m) {
  m.impl("quantized_lstm_layer", torch::autograd::autogradNotImplementedFallback());
}
