// CPU kernels of the lstm_ext layer and cell ops (schemas in csrc/ops.cpp), for float32, float64,
// bfloat16 and float16: the argument checks, the per-call preparation of the weights and
// workspaces, then one time loop for every dtype (layer_forward.h, layer_backward.h; S the
// layer's dtype, C = at::opmath_type<S> what it computes in: mixed_gemm.h). The cell ops are
// the layer kernels with T = 1.
//
// The per-call preparation runs for every call, so at small sizes it must cost little: one
// allocation for all scratch buffers (Workspace), transposes and bias sums as plain loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../lstm_checks.h"
#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "blas.h"
#include "layer_backward.h"
#include "layer_common.h"
#include "layer_forward.h"
#include "mixed_gemm.h"

namespace lstm_ext {
namespace cpu {
namespace {

using at::Tensor;
using c10::optional;

// Dispatches over the four floating dtypes of a layer.
#define LSTM_EXT_DISPATCH_LAYER_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

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

// A layer with no hidden units (H = 0, reachable only through the ops, with a projection): its
// output h_t = r_t W_hr^T is zero at every step, and nothing depends on h0, c0 or the weights,
// so every gradient is zero. Spelled out here, as the BLAS calls of the kernels below may skip a
// product over nothing and leave their output unwritten.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> no_hidden_units_forward(
    const LayerSizes& s, bool packed, const at::TensorOptions& opts, bool keep_state) {
  const auto kept = opts.dtype(kept_state_dtype(opts.dtype().toScalarType()));
  std::vector<int64_t> state_shape = per_step_shape(s, packed, 0);
  if (!keep_state) {
    state_shape[0] = 0;
  }
  return {at::zeros(per_step_shape(s, packed, s.P), opts), at::zeros({s.B, s.P}, opts),
          at::empty({s.B, 0}, opts), at::empty(state_shape, kept), at::empty(state_shape, kept)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> no_hidden_units_backward(
    const LayerSizes& s, const Tensor& input, bool proj, bool need_grad_input) {
  const auto opts = input.options();
  return {at::zeros(rows_or_none(input.sizes(), need_grad_input), opts),
          at::zeros({s.B, s.P}, opts),
          at::empty({s.B, 0}, opts),
          at::empty({0, s.I}, opts),
          at::empty({0, s.P}, opts),
          at::empty({0}, opts),
          at::empty({proj ? s.P : 0, 0}, opts)};
}

// The forward of one layer in dtype S: output [.., P], h_n [B, P], c_n [B, H] in S; gates
// [.., 4H] and cells [.., H] in C (no rows unless keep_state).
template <typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_layer(
    const LayerSizes& s, const LayerSteps& walk, bool packed, const Tensor& input,
    const Tensor& h0, const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
    const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, bool keep_state, const Zoneout& zoneout,
    const optional<Tensor>& recurrent_mask) {
  using C = at::opmath_type<S>;
  constexpr bool kSame = std::is_same_v<S, C>;
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

  if constexpr (kSame) {
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
    if (s.T >= kMinStepsToPack && PackedWeight<S>::usable(s.I + s.P, G)) {
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
  // packed weights each step projects its own inputs: one chunk, a buffer of one step.
  a.pipelined = kSame && forward_pipelined(s);
  a.chunk_steps =
      a.pipelined ? (s.T + kPipelineChunks - 1) / kPipelineChunks
      : w.w_packed ? s.T
                   : std::clamp<int64_t>(kChunkElements / std::max<int64_t>(s.B * G, 1), 1, s.T);
  a.gates_all_rows = keep_state || a.pipelined;
  const int64_t buffer_rows =
      keep_state ? 0 : (a.pipelined ? s.N : (w.w_packed ? s.B : a.chunk_steps * s.B));
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
  layer_forward<S, C>(s, walk, w, a);
  if constexpr (!kSame) {
    convert(a.c_state, c_n.template data_ptr<S>(), s.B * s.H);
  }
  return {output, h_n, c_n, gates, cells};
}

// The backward of one layer in dtype S: gradients of input (no rows unless need_grad_input), h0,
// c0, weight_ih, weight_hh, the bias, weight_hr (no rows without it), in S. cells: the kept c_t
// in C. fuse_x: whether x may be copied next to h for one weight-gradient GEMM (see BackwardArgs).
template <typename S>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_layer(
    const LayerSizes& s, const LayerSteps& walk, const optional<Tensor>& dy,
    const optional<Tensor>& dh_n, const optional<Tensor>& dc_n, const Tensor& input,
    const Tensor& h0, const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
    const optional<Tensor>& weight_hr, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input, bool may_fuse_x, const Zoneout& zoneout,
    const optional<Tensor>& recurrent_mask) {
  using C = at::opmath_type<S>;
  constexpr bool kSame = std::is_same_v<S, C>;
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
  a.fuse_x = kSame && may_fuse_x && 2 * s.I <= s.P;
  const int64_t K = (a.fuse_x ? s.I : 0) + P;
  std::optional<PackedWeight<S>> w_hh_packed;
  if constexpr (!kSame) {
    if (s.T >= kMinStepsToPack && PackedWeight<S>::usable(G, P)) {
      w_hh_packed.emplace(a.w_hh, G, P, opts);  // W_hh [4H, P] = B [K, N] as stored
      a.w_hh_packed = &*w_hh_packed;
    }
  }
  a.pipeline_chunks = kSame ? backward_pipeline_chunks(s) : 1;
  // In S: dgates [rows, 4H], xh [rows, K]; with projection dh_all [rows, P], r_all [rows, H].
  // In C: tanh_c [B, H], db_slices [B, 4H], dw_cat [4H, K] (fuse_x), dr [B, H] (proj),
  // restart_dh [B, P] and restart_dc [B, H] (restarts), keep_dh [B, P] (zoneout of h), keep_dc
  // and c_new [B, H] (zoneout of c); where S is not C, the gradients before rounding: dh [B, P],
  // dc [B, H], dx [rows, I], dW_ih, dW_hh, dW_hr, db, with c0 [B, H], dgates_step [B, 4H] and
  // r_step [B, H] (proj).
  const int64_t storage = s.N * (G + K) + (proj ? s.N * (P + H) : 0);
  const int64_t compute =
      s.B * H + s.B * G + (a.fuse_x ? G * K : 0) + (proj ? s.B * H : 0) +
      (restarts ? s.B * (P + H) : 0) + (zoneout.on_h() ? s.B * P : 0) +
      (zoneout.on_c() ? 2 * s.B * H : 0) +
      (kSame ? 0
             : s.B * (P + 2 * H + G) + (need_grad_input ? s.N * s.I : 0) + G * (s.I + P) +
                   (proj ? P * H + s.B * H : 0) + G);
  LayerWorkspace<S, C> work(storage, compute, opts);
  a.dgates = work.storage(s.N * G);
  a.xh = work.storage(s.N * K);
  a.dh_all = proj ? work.storage(s.N * P) : nullptr;
  a.r_all = proj ? work.storage(s.N * H) : nullptr;
  a.tanh_c = work.compute(s.B * H);
  a.db_slices = work.compute(s.B * G);
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
    a.db = grad_bias.template data_ptr<C>();
  } else {
    C* c0f = work.compute(s.B * H);
    convert(c0c->template data_ptr<S>(), c0f, s.B * H);
    a.c0 = c0f;
    a.dh = work.compute(s.B * P);
    a.dc = work.compute(s.B * H);
    a.dgates_step = work.compute(s.B * G);
    a.dx = need_grad_input ? work.compute(s.N * s.I) : nullptr;
    a.dw_ih = work.compute(G * s.I);
    a.dw_hh = work.compute(G * P);
    a.dw_hr = proj ? work.compute(P * H) : nullptr;
    a.r_step = proj ? work.compute(s.B * H) : nullptr;
    a.db = work.compute(G);
  }
  layer_backward<S, C>(s, walk, a);
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
    convert(a.db, grad_bias.template data_ptr<S>(), G);
  }
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward_cpu(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    bool keep_state, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::lstm_layer_forward";
  const LayerSizes s = check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, bias_ih,
                                          bias_hh, weight_hr, batch_sizes);
  check_reset(op, reset, input, s);
  const bool packed = batch_sizes.has_value();
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, packed);
  if (s.H == 0) {
    return no_hidden_units_forward(s, packed, input.options(), keep_state);
  }
  const Steps steps(s, batch_sizes);
  const Restarts restarts(steps, reset, reverse);
  const LayerSteps walk{steps, restarts, reverse};
  const Zoneout zoneout(zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> result;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "lstm_layer_forward_cpu", [&] {
    result = forward_layer<scalar_t>(s, walk, packed, input, h0, c0, weight_ih, weight_hh,
                                     bias_ih, bias_hh, weight_hr, keep_state, zoneout,
                                     recurrent_mask);
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward_cpu(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
  constexpr const char* op = "lstm_ext::lstm_layer_backward";
  const LayerSizes s = check_layer_backward_inputs(op, grad_output, grad_h_n, grad_c_n, input, h0,
                                                   c0, weight_ih, weight_hh, weight_hr,
                                                   batch_sizes, output, gates, cells);
  check_reset(op, reset, input, s);
  check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                   input, s, batch_sizes.has_value());
  if (s.H == 0) {
    return no_hidden_units_backward(s, input, weight_hr.has_value(), need_grad_input);
  }
  const Steps steps(s, batch_sizes);
  const Restarts restarts(steps, reset, reverse);
  const LayerSteps walk{steps, restarts, reverse};
  const Zoneout zoneout(zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h);
  const auto dy = contiguous_or_none(grad_output), dh_n = contiguous_or_none(grad_h_n),
             dc_n = contiguous_or_none(grad_c_n);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> result;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    result = backward_layer<scalar_t>(s, walk, dy, dh_n, dc_n, input, h0, c0, weight_ih,
                                      weight_hh, weight_hr, output, gates, cells,
                                      need_grad_input, /*may_fuse_x=*/true, zoneout,
                                      recurrent_mask);
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward_cpu(const Tensor& input, const Tensor& hx,
                                                         const Tensor& cx, const Tensor& weight_ih,
                                                         const Tensor& weight_hh,
                                                         const optional<Tensor>& bias_ih,
                                                         const optional<Tensor>& bias_hh) {
  constexpr const char* op = "lstm_ext::lstm_cell_forward";
  const LayerSizes s = check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const Steps steps(s, c10::nullopt);
  const Restarts no_restarts;
  const LayerSteps walk{steps, no_restarts, false};
  const Zoneout no_zoneout;
  if (is_low_precision(input.scalar_type())) {  // one step of the layer kernel
    std::tuple<Tensor, Tensor, Tensor> result;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "lstm_cell_forward_cpu", [&] {
      auto [hy, h_n, cy, gates, cells] = forward_layer<scalar_t>(
          s, walk, false, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, c10::nullopt,
          /*keep_state=*/true, no_zoneout, c10::nullopt);
      result = {hy.view({s.B, s.H}), cy, gates.view({s.B, 4 * s.H})};
    });
    return result;
  }
  // float32 / float64: the layer kernel's step with only the buffers a cell needs (hy is the
  // step's output, cy its running c state).
  const auto x = input.expect_contiguous(), hxc = hx.expect_contiguous(),
             cxc = cx.expect_contiguous(), w_ih = weight_ih.expect_contiguous();
  const auto opts = input.options();
  const int64_t G = 4 * s.H;
  Tensor hy = at::empty({s.B, s.H}, opts);
  Tensor cy = at::empty({s.B, s.H}, opts);
  Tensor gates = at::empty({s.B, G}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_forward_cpu", [&] {
    const bool direct = direct_steps(s);
    // w_hh_t [H, 4H] (not direct), bias [4H], exp_scratch [B, 4H], h_n [B, H] (the layer
    // kernel's copy of hy)
    Workspace<scalar_t> work((direct ? 0 : s.H * G) + G + s.B * G + s.B * s.H, opts);
    ForwardArgs<scalar_t, scalar_t> a{};
    scalar_t* bias = work.take(G);
    combined_bias_into(bias_ih, bias_hh, G, bias);
    a.bias = bias;
    a.exp_scratch = work.take(s.B * G);
    a.h_n = work.take(s.B * s.H);
    a.x = x->data_ptr<scalar_t>();
    a.h0 = hxc->data_ptr<scalar_t>();
    a.c0 = cxc->data_ptr<scalar_t>();
    a.y = hy.data_ptr<scalar_t>();
    a.c_state = cy.data_ptr<scalar_t>();
    a.gates = gates.data_ptr<scalar_t>();
    a.gates_all_rows = true;
    a.chunk_steps = 1;
    a.zoneout = &no_zoneout;
    if (direct) {
      const auto w_hh = weight_hh.expect_contiguous();
      layer_forward_direct<scalar_t>(s, walk, w_ih->data_ptr<scalar_t>(),
                                     w_hh->data_ptr<scalar_t>(), nullptr, a);
      return;
    }
    scalar_t* w_hh_t = work.take(s.H * G);
    transpose_into(weight_hh, w_hh_t);
    ForwardWeights<scalar_t, scalar_t> w;
    w.w_ih = w_ih->data_ptr<scalar_t>();
    w.w_hh_t = w_hh_t;
    layer_forward<scalar_t, scalar_t>(s, walk, w, a);
  });
  return {hy, cy, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_cpu(
    const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
    const Tensor& weight_ih, const Tensor& weight_hh, bool need_grad_input) {
  constexpr const char* op = "lstm_ext::lstm_cell_backward";
  const LayerSizes s = check_cell_backward_inputs(op, grad_hy, grad_cy, input, hx, cx, cy, gates,
                                                  weight_ih, weight_hh);
  const Steps steps(s, c10::nullopt);
  const Restarts no_restarts;
  const LayerSteps walk{steps, no_restarts, false};
  const Zoneout no_zoneout;
  const auto dhy = contiguous_or_none(grad_hy), dcy = contiguous_or_none(grad_cy);
  // One step of the layer backward: grad_hy is that step's output gradient, grad_cy its dc, the
  // kept cell state is cy (in C). With one step the forward output is never read (every row's
  // previous h is hx), so hx stands in for it. x is not copied next to h (fuse_x): with one step
  // the weight gradients go straight into their outputs, without the copies out of a joint dW_cat.
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> result;
  LSTM_EXT_DISPATCH_LAYER_TYPES(input.scalar_type(), "lstm_cell_backward_cpu", [&] {
    using C = at::opmath_type<scalar_t>;
    const Tensor cells = cy.scalar_type() == c10::CppTypeToScalarType<C>::value
                             ? cy
                             : cy.to(c10::CppTypeToScalarType<C>::value);
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, unused] =
        backward_layer<scalar_t>(s, walk, dhy, c10::nullopt, dcy, input, hx, cx, weight_ih,
                                 weight_hh, c10::nullopt, hx, gates, cells, need_grad_input,
                                 /*may_fuse_x=*/false, no_zoneout, c10::nullopt);
    result = {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
  });
  return result;
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

bool has_direct_blas_impl() { return has_direct_blas(); }
bool has_vml_impl() { return has_vml(); }

std::string gemm_settings_impl();

std::vector<std::pair<std::string, std::string>> gemm_backends_impl() {
  const std::string fp = "the GEMM seam: " + gemm_settings_impl();
  return {{"float32", fp},
          {"float64", fp},
          {"bfloat16", lowp_step_gemm_backend(at::kBFloat16)},
          {"float16", lowp_step_gemm_backend(at::kHalf)}};
}

VectorIsa vector_isa() {
  static const VectorIsa isa = [] {
    // ATen's capability, and the whole x86-64 level the variant is compiled for (ATen's AVX2
    // asks for AVX2 and FMA only; x86-64-v3 also for BMI2, MOVBE, ..., which a VM may hide).
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    if (capability == "AVX512" && __builtin_cpu_supports("x86-64-v4")) {
      return VectorIsa::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("x86-64-v3")) {
      return VectorIsa::kAvx2;
    }
    return VectorIsa::kBaseline;
  }();
  return isa;
}

std::string vector_code_impl() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return "x86-64-v4 (AVX-512)";
    case VectorIsa::kAvx2: return "x86-64-v3 (AVX2, FMA)";
    default: return "x86-64 baseline (SSE2)";
  }
}

}  // namespace cpu
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_ext::cpu::lstm_layer_forward_cpu);
  m.impl("lstm_layer_backward", &lstm_ext::cpu::lstm_layer_backward_cpu);
  m.impl("lstm_cell_forward", &lstm_ext::cpu::lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_ext::cpu::lstm_cell_backward_cpu);
}
