// The per-call preparation of a CPU layer's forward and backward, for every dtype and cell: the
// contiguous inputs, the outputs, the weights in the form the time loops multiply by
// (ForwardWeights), and the workspaces, then the loop (layer_forward.h, layer_backward.h). Used
// by the plain kernels (lstm_cpu.cpp) and the layer-normalised ones (lstm_cpu_layer_norm.cpp).
//
// The preparation runs for every call, so at small sizes it must cost little: one allocation for
// all scratch buffers (two where S is not C), transposes and bias sums as plain loops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../lstm_checks.h"
#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "layer_backward.h"
#include "layer_common.h"
#include "layer_forward.h"
#include "mixed_gemm.h"

// Dispatches over the four floating dtypes of a layer.
#define LSTM_EXT_DISPATCH_LAYER_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace lstm_ext {
namespace cpu {

// Pieces of two allocations, one of S values and one of C values: one allocation where S is C.
template <typename S, typename C>
class LayerWorkspace {
 public:
  LayerWorkspace(int64_t storage_elements, int64_t compute_elements,
                 const at::TensorOptions& options)
      : compute_(compute_elements + (kSame ? storage_elements : 0),
                 options.dtype(c10::CppTypeToScalarType<C>::value)) {
    if constexpr (!kSame) {
      storage_.emplace(storage_elements, options);
    }
  }
  S* storage(int64_t elements) {
    if constexpr (kSame) {
      return compute_.take(elements);
    } else {
      return storage_->take(elements);
    }
  }
  C* compute(int64_t elements) { return compute_.take(elements); }

 private:
  static constexpr bool kSame = std::is_same_v<S, C>;
  Workspace<C> compute_;
  std::optional<Workspace<S>> storage_;
};

// What a layer call's options make of its steps: the steps in the layer's direction with their
// restarts (walk) and zoneout, built once by the op kernel from its batch_sizes, reverse, reset
// and zoneout arguments (checked before).
struct LayerCall {
  Steps steps;
  Restarts restarts;
  Zoneout zoneout;
  LayerSteps walk;  // over steps and restarts above

  LayerCall(const LayerSizes& s, const optional<Tensor>& batch_sizes, bool reverse,
            const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
            const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h)
      : steps(s, batch_sizes),
        restarts(steps, reset, reverse),
        zoneout(zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h),
        walk{steps, restarts, reverse} {}
  // A call of the plain steps of s (an LSTMCell step): forward, no option.
  explicit LayerCall(const LayerSizes& s)
      : steps(s, c10::nullopt), walk{steps, restarts, false} {}
  LayerCall(const LayerCall&) = delete;  // walk refers to the members
  LayerCall& operator=(const LayerCall&) = delete;
};

// A 16-bit tensor's float32 copy (exact), or none.
inline optional<Tensor> float_copy(const optional<Tensor>& t) {
  return t.has_value() && t->defined() ? optional<Tensor>(t->to(at::kFloat)) : c10::nullopt;
}

// The forward of one layer in dtype S with the given cell (layer_forward's Cell policy): output
// [.., P], h_n [B, P], c_n [B, H] in S; gates [.., 4H] and cells [.., H] in C (no rows unless
// keep_state). Round: as layer_forward's (a 16-bit layer run in float32 calls this with S float).
template <typename S, typename Cell, typename Round = NoRounding>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_layer(
    const LayerSizes& s, const LayerCall& call, bool packed, const Tensor& input,
    const Tensor& h0, const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
    const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, bool keep_state, const optional<Tensor>& recurrent_mask,
    const Cell& cell) {
  const LayerSteps& walk = call.walk;
  const Zoneout& zoneout = call.zoneout;
  using C = at::opmath_type<S>;
  constexpr bool kSame = std::is_same_v<S, C>;
  constexpr bool kPlain = !Cell::kSeparateProducts;
  if constexpr (!kSame) {
    const auto type = c10::CppTypeToScalarType<S>::value;
    if (lowp_products_in_float32(type)) {  // the same loop on float32 copies (mixed_gemm.h)
      auto [y, h_n, c_n, gates, cells] = forward_layer<float, Cell, RoundThrough<S>>(
          s, call, packed, input.to(at::kFloat), h0.to(at::kFloat), c0.to(at::kFloat),
          weight_ih.to(at::kFloat), weight_hh.to(at::kFloat), float_copy(bias_ih),
          float_copy(bias_hh), float_copy(weight_hr), keep_state, float_copy(recurrent_mask),
          cell);
      return {y.to(type), h_n.to(type), c_n.to(type), gates, cells};
    }
  }
  const bool recurrent = recurrent_mask.has_value() && recurrent_mask->defined();
  const bool proj = weight_hr.has_value();
  const auto x = input.expect_contiguous(), h0c = h0.expect_contiguous(),
             c0c = c0.expect_contiguous(), w_ih = weight_ih.expect_contiguous(),
             w_hh = weight_hh.expect_contiguous();
  const auto w_hr = contiguous_or_none(weight_hr);
  const auto opts = input.options();
  const auto kept_opts = opts.dtype(c10::CppTypeToScalarType<C>::value);
  const int64_t G = 4 * s.H;
  Tensor output = at::empty(per_step_shape(s, packed, s.P), opts);
  Tensor h_n = at::empty({s.B, s.P}, opts);
  Tensor c_n = at::empty({s.B, s.H}, opts);
  std::vector<int64_t> gates_shape = per_step_shape(s, packed, G);
  std::vector<int64_t> cells_shape = per_step_shape(s, packed, s.H);
  if (!keep_state) {  // nothing kept for a backward: no rows
    gates_shape[0] = 0;
    cells_shape[0] = 0;
  }
  Tensor gates = at::empty(gates_shape, kept_opts);
  Tensor cells = at::empty(cells_shape, kept_opts);

  ForwardArgs<S, C> a{};
  a.x = x->template data_ptr<S>();
  a.h0 = h0c->template data_ptr<S>();
  a.c0 = c0c->template data_ptr<S>();
  a.y = output.template data_ptr<S>();
  a.h_n = h_n.template data_ptr<S>();
  a.cells = keep_state ? cells.template data_ptr<C>() : nullptr;
  a.zoneout = &zoneout;
  a.recurrent_mask = recurrent ? recurrent_mask->template data_ptr<S>() : nullptr;
  // r [B, H] where S is not C or with a projection, fed [B, P] (recurrent dropout), c_prev
  // [B, H] (zoneout of c), exp_scratch [B, 4H], bias [4H]
  const int64_t common_c = G + s.B * G + ((!kSame || proj) ? s.B * s.H : 0) +
                           (zoneout.on_c() ? s.B * s.H : 0);
  const int64_t common_s = recurrent ? s.B * s.P : 0;
  auto take_common = [&](LayerWorkspace<S, C>& work) {
    a.fed = recurrent ? work.storage(s.B * s.P) : nullptr;
    a.c_prev = zoneout.on_c() ? work.compute(s.B * s.H) : nullptr;
    C* bias = work.compute(G);
    combined_bias_into<C, S>(bias_ih, bias_hh, G, bias);
    a.bias = bias;
    a.exp_scratch = work.compute(s.B * G);
    a.r = (!kSame || proj) ? work.compute(s.B * s.H) : nullptr;
  };

  if constexpr (kSame && kPlain && !Round::kOn) {
    if (direct_steps(s)) {
      // the common pieces, and the gates of one step [B, 4H]
      LayerWorkspace<S, C> work(common_s, common_c + (keep_state ? 0 : s.B * G), opts);
      take_common(work);
      a.c_state = c_n.template data_ptr<C>();
      a.gates = keep_state ? gates.template data_ptr<C>() : work.compute(s.B * G);
      a.gates_all_rows = keep_state;
      layer_forward_direct<S>(s, walk, w_ih->template data_ptr<S>(),
                              w_hh->template data_ptr<S>(), data_or_null<S>(w_hr), a);
      return {output, h_n, c_n, gates, cells};
    }
  }

  ForwardWeights<S, C> w;
  w.w_ih = w_ih->template data_ptr<S>();
  // 16-bit: W_ih and W_hh packed for the micro-kernel, or a float32 copy of W_hh^T
  std::optional<PackedWeight<S>> w_packed;
  Tensor w_hh_t_float;
  if constexpr (!kSame) {
    if (kPlain && s.T >= kMinStepsToPack && PackedWeight<S>::usable(s.I + s.P, G)) {
      const Tensor stacked = stacked_transpose<S>(*w_ih, *w_hh);
      w_packed.emplace(stacked.template data_ptr<S>(), s.I + s.P, G, opts);
      w.w_packed = &*w_packed;
    } else if (s.T >= kMinStepsToPack && s.B <= kFloatStepRows) {
      w_hh_t_float = w_hh->to(at::kFloat).t().contiguous();  // [P, 4H]
      w.w_hh_t_float = w_hh_t_float.template data_ptr<float>();
    } else {
      w.w_hh = w_hh->template data_ptr<S>();
    }
    w.w_hr = data_or_null<S>(w_hr);
  }
  // Steps go in chunks of about kChunkElements gate values (at least one step); without a
  // backward the projection buffer holds one chunk only. Pipelined (a second thread projects
  // while the first runs the steps): kPipelineChunks chunks, each with its own rows. With the
  // packed weights, or a cell whose products have rows of their own (kept for the backward),
  // each step's gates are a buffer of one step and the input projection is one chunk.
  const bool step_buffer = w.w_packed || !kPlain;
  a.pipelined = kSame && kPlain && forward_pipelined(s);
  a.chunk_steps =
      a.pipelined ? (s.T + kPipelineChunks - 1) / kPipelineChunks
      : step_buffer ? s.T
                    : std::clamp<int64_t>(kChunkElements / std::max<int64_t>(s.B * G, 1), 1, s.T);
  a.gates_all_rows = keep_state || a.pipelined;
  const int64_t buffer_rows =
      keep_state ? 0 : (a.pipelined ? s.N : (step_buffer ? s.B : a.chunk_steps * s.B));
  // S is C: w_hh_t [P, 4H], w_hr_t [H, P]; else c_state [B, H], y_compute [B, P] (proj),
  // h_float [B, P] (the float32 copy), and in S r_storage [B, H] (proj), xh [B, I + P] (packed)
  const int64_t own_c = kSame ? s.P * G + (proj ? s.H * s.P : 0)
                              : s.B * s.H + (proj ? s.B * s.P : 0) +
                                    (w.w_hh_t_float ? s.B * s.P : 0);
  const int64_t own_s = kSame ? 0 : (proj ? s.B * s.H : 0) + (w.w_packed ? s.B * (s.I + s.P) : 0);
  LayerWorkspace<S, C> work(common_s + own_s, common_c + own_c + buffer_rows * G, opts);
  take_common(work);
  a.gates = keep_state ? gates.template data_ptr<C>() : work.compute(buffer_rows * G);
  if constexpr (kSame) {
    a.c_state = c_n.template data_ptr<C>();
    S* w_hh_t = work.compute(s.P * G);
    transpose_into(weight_hh, w_hh_t);
    w.w_hh_t = w_hh_t;
    if (proj) {
      S* w_hr_t = work.compute(s.H * s.P);
      transpose_into(*weight_hr, w_hr_t);
      w.w_hr_t = w_hr_t;
    }
  } else {
    a.c_state = work.compute(s.B * s.H);
    a.y_compute = proj ? work.compute(s.B * s.P) : nullptr;
    w.h_float = w.w_hh_t_float ? work.compute(s.B * s.P) : nullptr;
    a.r_storage = proj ? work.storage(s.B * s.H) : nullptr;
    w.xh = w.w_packed ? work.storage(s.B * (s.I + s.P)) : nullptr;
  }
  layer_forward<S, C, Cell, Round>(s, walk, w, cell, a);
  if constexpr (!kSame) {
    convert(a.c_state, c_n.template data_ptr<S>(), s.B * s.H);
  }
  return {output, h_n, c_n, gates, cells};
}

// The gradients of one layer's backward: in S, of input (no rows unless need_grad_input), h0, c0,
// weight_ih, weight_hh, the bias, weight_hr (no rows without it); and in C the cell's sums
// (Cell::sums_width: the bias's, then any of the cell's own parameters').
struct LayerGrads {
  Tensor input, h0, c0, w_ih, w_hh, bias, w_hr, sums;
};

// The backward of one layer in dtype S with the given cell. cells: the kept c_t in C. may_fuse_x:
// whether x may be copied next to h for one weight-gradient GEMM (see BackwardArgs). Round: as
// forward_layer's.
template <typename S, typename Cell, typename Round = NoRounding>
LayerGrads backward_layer(
    const LayerSizes& s, const LayerCall& call, const optional<Tensor>& dy,
    const optional<Tensor>& dh_n, const optional<Tensor>& dc_n, const Tensor& input,
    const Tensor& h0, const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
    const optional<Tensor>& weight_hr, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input, bool may_fuse_x,
    const optional<Tensor>& recurrent_mask, const Cell& cell) {
  const LayerSteps& walk = call.walk;
  const Zoneout& zoneout = call.zoneout;
  using C = at::opmath_type<S>;
  constexpr bool kSame = std::is_same_v<S, C>;
  constexpr bool kPlain = !Cell::kSeparateProducts;
  if constexpr (!kSame) {
    const auto type = c10::CppTypeToScalarType<S>::value;
    if (lowp_products_in_float32(type)) {  // the same loop on float32 copies (mixed_gemm.h)
      LayerGrads g = backward_layer<float, Cell, RoundThrough<S>>(
          s, call, float_copy(dy), float_copy(dh_n), float_copy(dc_n), input.to(at::kFloat),
          h0.to(at::kFloat), c0.to(at::kFloat), weight_ih.to(at::kFloat),
          weight_hh.to(at::kFloat), float_copy(weight_hr), output.to(at::kFloat), gates, cells,
          need_grad_input, may_fuse_x, float_copy(recurrent_mask), cell);
      for (Tensor* t : {&g.input, &g.h0, &g.c0, &g.w_ih, &g.w_hh, &g.bias, &g.w_hr}) {
        *t = t->to(type);
      }
      return g;
    }
  }
  const bool recurrent = recurrent_mask.has_value() && recurrent_mask->defined();
  const auto x = input.expect_contiguous(), h0c = h0.expect_contiguous(),
             c0c = c0.expect_contiguous(), w_ih = weight_ih.expect_contiguous(),
             w_hh = weight_hh.expect_contiguous(), y = output.expect_contiguous(),
             gates_c = gates.expect_contiguous(), cells_c = cells.expect_contiguous();
  const auto w_hr = contiguous_or_none(weight_hr);
  const bool proj = w_hr.has_value();
  const bool restarts = walk.restarts.any();
  const auto opts = input.options();
  const int64_t G = 4 * s.H, H = s.H, P = s.P;
  Tensor grad_input = at::empty(rows_or_none(input.sizes(), need_grad_input), opts);
  Tensor grad_h0 = at::empty({s.B, P}, opts);
  Tensor grad_c0 = at::empty({s.B, H}, opts);
  Tensor grad_w_ih = at::empty({G, s.I}, opts);
  Tensor grad_w_hh = at::empty({G, P}, opts);
  Tensor grad_bias = at::empty({G}, opts);
  Tensor grad_w_hr = at::empty({proj ? P : 0, H}, opts);
  const int64_t SW = cell.sums_width(H);
  // The sums: the bias gradient itself for a plain cell where S is C
  const bool sums_are_bias = kSame && kPlain;
  Tensor sums_total =
      sums_are_bias ? grad_bias : at::empty({SW}, opts.dtype(c10::CppTypeToScalarType<C>::value));

  BackwardArgs<S, C> a{};
  a.dy = data_or_null<S>(dy);
  a.dh_n = data_or_null<S>(dh_n);
  a.dc_n = data_or_null<S>(dc_n);
  a.x = x->template data_ptr<S>();
  a.h0 = h0c->template data_ptr<S>();
  a.w_ih = w_ih->template data_ptr<S>();
  a.w_hh = w_hh->template data_ptr<S>();
  a.w_hr = data_or_null<S>(w_hr);
  a.y = y->template data_ptr<S>();
  a.gates = gates_c->template data_ptr<C>();
  a.cells = cells_c->template data_ptr<C>();
  a.zoneout = &zoneout;
  a.recurrent_mask = recurrent ? recurrent_mask->template data_ptr<S>() : nullptr;
  // Copying x next to h pays when x is narrow (measured: -16% backward time at I = 64, P = 128;
  // +7% at I = P = 256); 16-bit layers keep two GEMMs.
  a.fuse_x = kSame && kPlain && may_fuse_x && 2 * s.I <= s.P;
  const int64_t K = (a.fuse_x ? s.I : 0) + P;
  std::optional<PackedWeight<S>> w_hh_packed;
  if constexpr (!kSame) {
    if (kPlain && s.T >= kMinStepsToPack && PackedWeight<S>::usable(G, P)) {
      w_hh_packed.emplace(a.w_hh, G, P, opts);  // W_hh [4H, P] = B [K, N] as stored
      a.w_hh_packed = &*w_hh_packed;
    }
  }
  a.pipeline_chunks = kSame && kPlain ? backward_pipeline_chunks(s) : 1;
  // A plain cell's per-row workspaces hold every row; a cell with products of their own, whose
  // gradients need twice the rows, those of one chunk of steps.
  a.chunk_steps = kPlain ? s.T : backward_chunk_steps(s);
  const int64_t rows = std::min(s.N, a.chunk_steps * s.B);
  // In S, of those rows: d_ih (and a separate d_hh), xh [., K]; with projection dh_all [., P],
  // r_all [., H]. In C: tanh_c [B, H], sums [B, SW], dw_cat [4H, K] (fuse_x), dr [B, H] (proj),
  // restart_dh [B, P] and restart_dc [B, H] (restarts), keep_dh [B, P] (zoneout of h), keep_dc
  // and c_new [B, H] (zoneout of c); where S is not C, the gradients before rounding: dh [B, P],
  // dc [B, H], dx [rows, I], dW_ih, dW_hh, dW_hr, with c0 [B, H], d_ih_step (and a separate
  // d_hh_step) [B, 4H] and r_step [B, H] (proj).
  const int64_t products = kPlain ? 1 : 2;
  const int64_t storage = rows * (products * G + K) + (proj ? rows * (P + H) : 0);
  const int64_t compute =
      s.B * H + s.B * SW + (a.fuse_x ? G * K : 0) + (proj ? s.B * H : 0) +
      (restarts ? s.B * (P + H) : 0) + (zoneout.on_h() ? s.B * P : 0) +
      (zoneout.on_c() ? 2 * s.B * H : 0) +
      (kSame ? 0
             : s.B * (P + 2 * H + products * G) + (need_grad_input ? s.N * s.I : 0) +
                   G * (s.I + P) + (proj ? P * H + s.B * H : 0));
  LayerWorkspace<S, C> work(storage, compute, opts);
  a.d_ih = work.storage(rows * G);
  a.d_hh = kPlain ? a.d_ih : work.storage(rows * G);
  a.xh = work.storage(rows * K);
  a.dh_all = proj ? work.storage(rows * P) : nullptr;
  a.r_all = proj ? work.storage(rows * H) : nullptr;
  a.tanh_c = work.compute(s.B * H);
  a.sums = work.compute(s.B * SW);
  a.sums_total = sums_total.template data_ptr<C>();
  a.dw_cat = a.fuse_x ? work.compute(G * K) : nullptr;
  a.dr = proj ? work.compute(s.B * H) : nullptr;
  a.restart_dh = restarts ? work.compute(s.B * P) : nullptr;
  a.restart_dc = restarts ? work.compute(s.B * H) : nullptr;
  a.keep_dh = zoneout.on_h() ? work.compute(s.B * P) : nullptr;
  a.keep_dc = zoneout.on_c() ? work.compute(s.B * H) : nullptr;
  a.c_new = zoneout.on_c() ? work.compute(s.B * H) : nullptr;
  if constexpr (kSame) {
    a.c0 = c0c->template data_ptr<C>();
    a.dx = need_grad_input ? grad_input.template data_ptr<C>() : nullptr;
    a.dh = grad_h0.template data_ptr<C>();
    a.dc = grad_c0.template data_ptr<C>();
    a.dw_ih = grad_w_ih.template data_ptr<C>();
    a.dw_hh = grad_w_hh.template data_ptr<C>();
    a.dw_hr = proj ? grad_w_hr.template data_ptr<C>() : nullptr;
  } else {
    C* c0f = work.compute(s.B * H);
    convert(c0c->template data_ptr<S>(), c0f, s.B * H);
    a.c0 = c0f;
    a.dh = work.compute(s.B * P);
    a.dc = work.compute(s.B * H);
    a.d_ih_step = work.compute(s.B * G);
    a.d_hh_step = kPlain ? a.d_ih_step : work.compute(s.B * G);
    a.dx = need_grad_input ? work.compute(s.N * s.I) : nullptr;
    a.dw_ih = work.compute(G * s.I);
    a.dw_hh = work.compute(G * P);
    a.dw_hr = proj ? work.compute(P * H) : nullptr;
    a.r_step = proj ? work.compute(s.B * H) : nullptr;
  }
  layer_backward<S, C, Cell, Round>(s, walk, cell, a);
  if (!sums_are_bias) {
    convert(a.sums_total, grad_bias.template data_ptr<S>(), G);
  }
  if constexpr (!kSame) {
    if (a.dx) {
      convert(a.dx, grad_input.template data_ptr<S>(), s.N * s.I);
    }
    convert(a.dh, grad_h0.template data_ptr<S>(), s.B * P);
    convert(a.dc, grad_c0.template data_ptr<S>(), s.B * H);
    convert(a.dw_ih, grad_w_ih.template data_ptr<S>(), G * s.I);
    convert(a.dw_hh, grad_w_hh.template data_ptr<S>(), G * P);
    if (proj) {
      convert(a.dw_hr, grad_w_hr.template data_ptr<S>(), P * H);
    }
  }
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, sums_total};
}

}  // namespace cpu
}  // namespace lstm_ext
