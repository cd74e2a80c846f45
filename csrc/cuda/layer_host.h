// The host side of the CUDA layer kernels: the time loop, the GEMMs (through ATen, on the current
// stream) and where each step's rows are. Written against a Kernels policy instead of CUDA itself,
// so that tests/cuda_host_check.cpp runs this same loop on the CPU (with CPU loops for the gate
// passes) and checks it against the CPU kernels, on a machine without a GPU.
//
// Kernels provides
//   gates_forward(const GatesForward<S, C>&), gates_backward(const GatesBackward<S, C>&):
//     one step's gate pass (gate_pass.h), on the current stream;
//   mm_into(out, a, b): out = a b, where out may be C while a and b are S (cuBLAS accumulates the
//     16-bit products in float32 and writes float32).
//
// Same algorithm and row layout as the CPU kernels (csrc/cpu/layer_forward.h, csrc/lstm_steps.h):
// the input projection of a chunk of steps in one GEMM (all steps when the backward will need the
// gates; else chunks of about chunk_elements gate values, so inference does not hold every step's
// gates); per step one GEMM for the recurrence, read straight from the previous step's rows of the
// output (and h0), one gate kernel, and with a projection one more GEMM; the weight gradients in
// single GEMMs over all rows. batch_sizes (a CPU tensor, as in PackedSequence) is read on the host.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "../lstm_checks.h"
#include "../lstm_steps.h"
#include "gate_pass.h"

namespace lstm_ext {
namespace cuda {

// reset, zoneout and recurrent dropout as the host loop applies them (the equations:
// lstm_ext/reference.py; the same rules as the CPU kernels, csrc/lstm_steps.h and
// csrc/lstm_regularize.h): with a few ATen ops on the layer's tensors per step, on the current
// stream, not yet fused into the gate kernels.
struct HostVariants {
  using Tensor = at::Tensor;
  Restarts restarts;
  Tensor restart_flags;  // bool [T, B] on the layer's device: Restarts' flags (when any)
  double p_c = 0, p_h = 0;
  Tensor mask_c, mask_h;  // bool [N, H], [N, P] (training), or undefined (eval: p_c, p_h)
  Tensor recurrent;       // [B, P] in the layer's dtype, or undefined

  HostVariants() = default;  // none
  HostVariants(const LayerSizes& s, const Steps& steps, bool reverse,
               const c10::optional<Tensor>& reset, double zoneout_c, double zoneout_h,
               const c10::optional<Tensor>& zoneout_mask_c,
               const c10::optional<Tensor>& zoneout_mask_h,
               const c10::optional<Tensor>& recurrent_mask, const at::TensorOptions& options)
      : restarts(steps, on_cpu(reset), reverse),
        p_c(zoneout_c),
        p_h(zoneout_h) {
    if (restarts.any()) {
      Tensor flags = at::zeros({s.T, s.B}, at::TensorOptions().dtype(at::kBool));
      for (int64_t t = 0; t < s.T; ++t) {
        if (const uint8_t* f = restarts.at(t, 0)) {
          std::memcpy(flags.data_ptr<bool>() + t * s.B, f, s.B);
        }
      }
      restart_flags = flags.to(options.device());
    }
    auto view = [&](const c10::optional<Tensor>& t, int64_t width) {
      return t.has_value() && t->defined() ? t->view({s.N, width}) : Tensor();
    };
    mask_c = view(zoneout_mask_c, s.H);
    mask_h = view(zoneout_mask_h, s.P);
    if (recurrent_mask.has_value() && recurrent_mask->defined()) {
      recurrent = *recurrent_mask;
    }
  }
  // reset's flags are read on the host (Restarts), as batch_sizes are.
  static c10::optional<Tensor> on_cpu(const c10::optional<Tensor>& t) {
    return t.has_value() && t->defined() ? c10::optional<Tensor>(t->cpu()) : t;
  }
  bool zone_c() const { return mask_c.defined() || p_c > 0; }
  bool zone_h() const { return mask_h.defined() || p_h > 0; }
  // [n, 1] bool: which of step t's first n rows restart, or undefined.
  Tensor restarting(int64_t t, int64_t n) const {
    return restarts.at(t, 0) ? restart_flags.select(0, t).narrow(0, 0, n).unsqueeze(1)
                             : Tensor();
  }
  // d ⊙ previous + (1 - d) ⊙ next (zoneout_mix), computed in opmath type C, in next's dtype.
  static Tensor mix(const Tensor& mask, double p, const Tensor& previous, const Tensor& next,
                    at::ScalarType c_type) {
    if (mask.defined()) {
      return at::where(mask, previous.to(next.scalar_type()), next);
    }
    return (previous.to(c_type) * p + next.to(c_type) * (1 - p)).to(next.scalar_type());
  }
};

template <typename Kernels, typename S>
struct LayerHost {
  using C = at::opmath_type<S>;
  using Tensor = at::Tensor;

  // The processed step before step k (in the order of the time loop): its row count and first row.
  // The first min(n, n_prev) rows of step k continue it; rows n_prev.. start from h0 / c0.
  static std::pair<int64_t, int64_t> previous(const LayerSizes& s, const Steps& steps, int64_t k,
                                              bool reverse) {
    if (k == 0) {
      return {0, 0};
    }
    const int64_t t_prev = Steps::time_of(k - 1, s.T, reverse);
    return {steps.batch[t_prev], steps.offset[t_prev]};
  }

  // The h (or c) a step's n rows read: the first `carried` from the step before's rows of
  // `previous` (from prev_row on), the others from `initial` (h0 / c0).
  static Tensor state_read(const Tensor& previous, const Tensor& initial, int64_t prev_row,
                           int64_t carried, int64_t n) {
    if (carried == n) {
      return previous.narrow(0, prev_row, n);
    }
    if (carried == 0) {
      return initial.narrow(0, 0, n);
    }
    return at::cat({previous.narrow(0, prev_row, carried),
                    initial.narrow(0, carried, n - carried).to(previous.scalar_type())});
  }

  static Tensor rows_of(const Tensor& t, int64_t row, int64_t n) {
    return t.defined() ? t.narrow(0, row, n) : Tensor();
  }

  // h_n [B, P]: each row's output y [N, P] at the last step that has it (h0 where none). In
  // time-loop order a step's rows that the next step lacks end there (a packed forward layer
  // drops its shortest sequences first).
  static Tensor last_outputs(const LayerSizes& s, const Steps& steps, bool reverse,
                             const Tensor& y, const Tensor& h0) {
    Tensor h_n = h0.contiguous().clone();
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = steps.batch[t];
      const int64_t n_next = k + 1 < s.T ? steps.batch[Steps::time_of(k + 1, s.T, reverse)] : 0;
      if (n > n_next) {
        h_n.narrow(0, n_next, n - n_next).copy_(y.narrow(0, steps.offset[t] + n_next, n - n_next));
      }
    }
    return h_n;
  }

  // x [N, I], h0 [B, P], c0 [B, H] in S. Returns output [N, P], h_n [B, P], c_n [B, H] in S;
  // with keep_state, gates [N, 4H] and cells [N, H] in C (else undefined).
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward(
      const LayerSizes& s, const Steps& steps, bool reverse, const Tensor& x, const Tensor& h0,
      const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
      const c10::optional<Tensor>& bias_ih, const c10::optional<Tensor>& bias_hh,
      const c10::optional<Tensor>& weight_hr, bool keep_state, int64_t chunk_elements,
      const HostVariants& v = HostVariants()) {
    const int64_t H = s.H, G = 4 * s.H;
    const auto opts = x.options();
    const auto c_opts = opts.dtype(c10::CppTypeToScalarType<C>::value);
    const bool proj = weight_hr.has_value();
    // With H = 0 nothing reaches the output (h = r W_hr^T with r of width 0): zeros, as on the CPU.
    Tensor y = H == 0 ? at::zeros({s.N, s.P}, opts) : at::empty({s.N, s.P}, opts);
    Tensor cells = keep_state ? at::empty({s.N, H}, c_opts) : Tensor();
    const int64_t chunk_steps =
        keep_state ? s.T
                   : std::clamp<int64_t>(chunk_elements / std::max<int64_t>(1, s.B * G), 1, s.T);
    Tensor gates = at::empty({keep_state ? s.N : std::min(s.N, chunk_steps * s.B), G}, c_opts);
    Tensor zh = at::empty({s.B, G}, c_opts);  // h_{t-1} W_hh^T of one step
    Tensor c_state = at::empty({s.B, H}, c_opts).copy_(c0);
    const auto c_type = c_opts.dtype().toScalarType();
    const Tensor bias = bias_ih.has_value()
                            ? (bias_ih->to(c_type) + bias_hh->to(c_type)).contiguous()
                            : at::zeros({G}, c_opts);
    const Tensor w_ih_t = weight_ih.t(), w_hh_t = weight_hh.t();
    const Tensor w_hr_t = proj ? weight_hr->t() : Tensor();
    Tensor r_buffer = proj ? at::empty({s.B, H}, opts) : Tensor();
    for (int64_t k0 = 0; k0 < s.T && H > 0; k0 += chunk_steps) {
      const int64_t k1 = std::min(s.T, k0 + chunk_steps);
      const auto [row_begin, row_end] = steps.rows_of_steps(k0, k1, reverse);
      Tensor chunk = gates.narrow(0, keep_state ? row_begin : 0, row_end - row_begin);
      Kernels::mm_into(chunk, x.narrow(0, row_begin, row_end - row_begin), w_ih_t);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = Steps::time_of(k, s.T, reverse);
        const int64_t n = steps.batch[t], row = steps.offset[t];
        if (n == 0) {
          continue;
        }
        const auto [n_prev, prev_row] = previous(s, steps, k, reverse);
        const int64_t carried = std::min(n, n_prev);
        const Tensor restarting = v.restarting(t, n);
        Tensor h_read;  // [n, P]: the state the step reads, where a variant needs it whole
        if (restarting.defined() || v.recurrent.defined() || v.zone_h()) {
          h_read = state_read(y, h0, prev_row, carried, n);
          if (restarting.defined()) {
            h_read = at::where(restarting, h0.narrow(0, 0, n), h_read);
            Tensor c_rows = c_state.narrow(0, 0, n);
            c_rows.copy_(at::where(restarting, c0.narrow(0, 0, n).to(c_type), c_rows));
          }
          Tensor zh_rows = zh.narrow(0, 0, n);
          Kernels::mm_into(zh_rows,
                           v.recurrent.defined() ? h_read * v.recurrent.narrow(0, 0, n) : h_read,
                           w_hh_t);
        } else {
          if (carried > 0) {
            Tensor zh_rows = zh.narrow(0, 0, carried);
            Kernels::mm_into(zh_rows, y.narrow(0, prev_row, carried), w_hh_t);
          }
          if (n > carried) {
            Tensor zh_rows = zh.narrow(0, carried, n - carried);
            Kernels::mm_into(zh_rows, h0.narrow(0, carried, n - carried), w_hh_t);
          }
        }
        const Tensor c_prev = v.zone_c() ? c_state.narrow(0, 0, n).clone() : Tensor();
        Tensor y_t = y.narrow(0, row, n);
        Tensor r_t = proj ? r_buffer.narrow(0, 0, n) : y_t;
        Kernels::gates_forward(GatesForward<S, C>{
            n, H, chunk.data_ptr<C>() + (row - row_begin) * G, zh.data_ptr<C>(),
            bias.data_ptr<C>(), c_state.data_ptr<C>(),
            keep_state ? cells.data_ptr<C>() + row * H : nullptr, r_t.data_ptr<S>()});
        if (c_prev.defined()) {  // c_t = zoneout's mix, also as kept
          Tensor c_rows = c_state.narrow(0, 0, n);
          c_rows.copy_(HostVariants::mix(rows_of(v.mask_c, row, n), v.p_c, c_prev, c_rows,
                                         c_type));
          if (keep_state) {
            cells.narrow(0, row, n).copy_(c_rows);
          }
        }
        if (proj) {
          Kernels::mm_into(y_t, r_t, w_hr_t);  // h_t = r_t W_hr^T
        }
        if (v.zone_h()) {
          y_t.copy_(HostVariants::mix(rows_of(v.mask_h, row, n), v.p_h, h_read, y_t, c_type));
        }
      }
    }
    return {y, last_outputs(s, steps, reverse, y, h0), c_state.to(opts.dtype()), keep_state ? gates : Tensor(), cells};
  }

  // dy [N, P] or undefined; x [N, I]; y [N, P] (read where a step continues the previous one);
  // gates [N, 4H] and cells [N, H] in C; grad_h_n [B, P] / grad_c_n [B, H] or undefined.
  // Returns the gradients of input ([0, I] unless need_grad_input), h0, c0, weight_ih, weight_hh,
  // the bias, weight_hr ([0, H] without it), all in S.
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
      const LayerSizes& s, const Steps& steps, bool packed, bool reverse, const Tensor& dy,
      const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
      const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
      const c10::optional<Tensor>& weight_hr, const Tensor& y, const Tensor& gates,
      const Tensor& cells, bool need_grad_input, const HostVariants& v = HostVariants()) {
    const int64_t H = s.H, G = 4 * s.H, P = s.P;
    const auto opts = x.options();
    const auto c_opts = opts.dtype(c10::CppTypeToScalarType<C>::value);
    const auto c_type = c_opts.dtype().toScalarType();
    const bool proj = weight_hr.has_value();
    // what the restarts pass to dh0, dc0 (added at the end)
    Tensor restart_dh = v.restarts.any() ? at::zeros({s.B, P}, c_opts) : Tensor();
    Tensor restart_dc = v.restarts.any() ? at::zeros({s.B, H}, c_opts) : Tensor();
    // The h each step fed to W_hh, gathered for dW_hh where it is not two blocks of y and h0.
    const bool gather_h = packed || v.restarts.any() || v.recurrent.defined();
    Tensor dgates = at::empty({s.N, G}, opts);
    Tensor dh_state = grad_h_n.defined() ? at::empty({s.B, P}, c_opts).copy_(grad_h_n)
                                         : at::zeros({s.B, P}, c_opts);
    Tensor dc_state = grad_c_n.defined() ? at::empty({s.B, H}, c_opts).copy_(grad_c_n)
                                         : at::zeros({s.B, H}, c_opts);
    Tensor dh_all = proj ? at::empty({s.N, P}, opts) : Tensor();  // dL/dh_t of every row
    Tensor r_all = proj ? at::empty({s.N, H}, opts) : Tensor();   // o ⊙ tanh(c_t) of every row
    Tensor dr_buffer = proj ? at::empty({s.B, H}, c_opts) : Tensor();
    // A packed layer's steps read h from rows scattered over y and h0: gathered here per step for
    // dW_hh. Unpacked, they are two blocks (see below), read in place.
    Tensor h_prev = gather_h ? at::empty({s.N, P}, opts) : Tensor();
    const Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = steps.batch[t], row = steps.offset[t];
      if (n == 0) {
        continue;
      }
      auto [n_prev, prev_row] = previous(s, steps, k, reverse);
      n_prev = std::min(n_prev, n);
      const Tensor restarting = v.restarting(t, n);
      if (gather_h) {
        Tensor h_read = state_read(y, h0c, prev_row, n_prev, n);
        if (restarting.defined()) {
          h_read = at::where(restarting, h0c.narrow(0, 0, n), h_read);
        }
        h_prev.narrow(0, row, n)
            .copy_(v.recurrent.defined() ? h_read * v.recurrent.narrow(0, 0, n) : h_read);
      }
      Tensor dh_rows = dh_state.narrow(0, 0, n);
      const C* dh = dh_rows.data_ptr<C>();
      const S* dy_rows = dy.defined() ? dy.data_ptr<S>() + row * P : nullptr;
      Tensor keep_dh;  // zoneout of h: what passes straight to the state this step read
      Tensor dh_new;   // then dL/d(the step's new h)
      if (v.zone_h()) {
        Tensor total = dy.defined() ? dh_rows + dy.narrow(0, row, n).to(c_type) : dh_rows.clone();
        const Tensor mask = rows_of(v.mask_h, row, n);
        keep_dh = mask.defined() ? at::where(mask, total, at::zeros_like(total)) : total * v.p_h;
        dh_new = mask.defined() ? at::where(mask, at::zeros_like(total), total)
                                : total * (1 - v.p_h);
        dh = dh_new.data_ptr<C>();
        dy_rows = nullptr;
      }
      if (proj) {
        Tensor dh_all_t = dh_all.narrow(0, row, n);
        if (dh_new.defined()) {
          dh_all_t.copy_(dh_new);
        } else if (dy.defined()) {
          at::add_out(dh_all_t, dh_rows, dy.narrow(0, row, n));
        } else {
          dh_all_t.copy_(dh_rows);
        }
        Tensor dr = dr_buffer.narrow(0, 0, n);
        Kernels::mm_into(dr, dh_all_t, *weight_hr);  // dL/dr = dL/dh W_hr
        dh = dr.data_ptr<C>();
        dy_rows = nullptr;
      }
      Tensor dgates_t = dgates.narrow(0, row, n);
      if (H == 0) {
        dh_rows.zero_();  // nothing carries h across steps
        continue;
      }
      // With a restart or zoneout of c, the kernel reads c_{t-1} from c_read (every row) and
      // takes tanh of c_new, the unmixed c_t rebuilt from the gates.
      Tensor c_read, c_new, keep_dc;
      if (restarting.defined() || v.zone_c()) {
        c_read = state_read(cells, c0c, prev_row, n_prev, n).to(c_type);
        if (restarting.defined()) {
          c_read = at::where(restarting, c0c.narrow(0, 0, n).to(c_type), c_read);
        }
        c_read = c_read.contiguous();
      }
      Tensor dc_rows = dc_state.narrow(0, 0, n);
      if (v.zone_c()) {
        const Tensor g = gates.narrow(0, row, n);
        c_new = (g.narrow(1, H, H) * c_read + g.narrow(1, 0, H) * g.narrow(1, 2 * H, H))
                    .contiguous();
        const Tensor mask = rows_of(v.mask_c, row, n);
        keep_dc = mask.defined() ? at::where(mask, dc_rows, at::zeros_like(dc_rows))
                                 : dc_rows * v.p_c;
        dc_rows.copy_(mask.defined() ? at::where(mask, at::zeros_like(dc_rows), dc_rows)
                                     : dc_rows * (1 - v.p_c));
      }
      Kernels::gates_backward(GatesBackward<S, C>{
          n, c_read.defined() ? n : n_prev, H, gates.data_ptr<C>() + row * G,
          c_new.defined() ? c_new.data_ptr<C>() : cells.data_ptr<C>() + row * H,
          c_read.defined() ? c_read.data_ptr<C>() : cells.data_ptr<C>() + prev_row * H,
          c0c.data_ptr<S>(), dh, dy_rows, dc_state.data_ptr<C>(), dgates_t.data_ptr<S>(),
          proj ? r_all.data_ptr<S>() + row * H : nullptr});
      if (keep_dc.defined()) {
        dc_rows.add_(keep_dc);
      }
      Kernels::mm_into(dh_rows, dgates_t, weight_hh);  // dL/dh of the state this step read
      if (v.recurrent.defined()) {
        dh_rows.mul_(v.recurrent.narrow(0, 0, n));
      }
      if (keep_dh.defined()) {
        dh_rows.add_(keep_dh);
      }
      if (restarting.defined()) {  // the restarted rows' gradients belong to h0, c0
        restart_dh.narrow(0, 0, n).add_(at::where(restarting, dh_rows, at::zeros_like(dh_rows)));
        restart_dc.narrow(0, 0, n).add_(at::where(restarting, dc_rows, at::zeros_like(dc_rows)));
        dh_rows.masked_fill_(restarting, 0);
        dc_rows.masked_fill_(restarting, 0);
      }
    }
    if (restart_dh.defined()) {
      dh_state.add_(restart_dh);
      dc_state.add_(restart_dc);
    }
    Tensor grad_input = need_grad_input ? at::mm(dgates, weight_ih) : at::empty({0, s.I}, opts);
    Tensor grad_w_ih = at::mm(dgates.t(), x);
    Tensor grad_w_hh;
    if (gather_h) {
      grad_w_hh = at::mm(dgates.t(), h_prev);
    } else {
      // The first step of the loop read h0; every other step the output rows of its neighbour
      // in time: one block of rows each way.
      const int64_t t_first = Steps::time_of(0, s.T, reverse);
      grad_w_hh = at::mm(dgates.narrow(0, steps.offset[t_first], s.B).t(), h0c);
      if (s.T > 1) {
        const int64_t rest = s.N - s.B;
        grad_w_hh.addmm_(dgates.narrow(0, reverse ? 0 : s.B, rest).t(),
                         y.narrow(0, reverse ? s.B : 0, rest));
      }
    }
    Tensor grad_w_hr = proj ? at::mm(dh_all.t(), r_all) : at::empty({0, H}, opts);
    Tensor grad_bias = dgates.sum(0);
    return {grad_input,
            dh_state.to(opts.dtype()),
            dc_state.to(opts.dtype()),
            grad_w_ih,
            grad_w_hh,
            grad_bias,
            grad_w_hr};
  }
};

// The layer forward and backward for every dtype the ops take: LayerHost<Kernels, S> for the
// inputs' dtype S, called with the rest of the arguments.
template <typename Kernels, typename... Args>
auto dispatch_forward(at::ScalarType dtype, const Args&... args) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "lstm_ext_layer_forward",
      [&] { return LayerHost<Kernels, scalar_t>::forward(args...); });
}

template <typename Kernels, typename... Args>
auto dispatch_backward(at::ScalarType dtype, const Args&... args) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "lstm_ext_layer_backward",
      [&] { return LayerHost<Kernels, scalar_t>::backward(args...); });
}

// The op kernels (schemas in csrc/ops.cpp) over LayerHost: argument checks, then the
// Kernels' device guard, then the layer in the inputs' dtype. Kernels also provides DeviceGuard
// (constructed from the input's device) and chunk_elements().
template <typename Kernels>
struct LayerOps {
  using Tensor = at::Tensor;
  template <typename T>
  using optional = c10::optional<T>;

  static Tensor defined_or_none(const optional<Tensor>& t) {
    return t.has_value() && t->defined() ? t->contiguous() : Tensor();
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
      const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
      const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
      const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
      bool keep_state, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
      const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
      const optional<Tensor>& recurrent_mask) {
    constexpr const char* op = "lstm_ext::lstm_layer_forward";
    const LayerSizes s = check_layer_inputs(op, input, h0, c0, weight_ih, weight_hh, bias_ih,
                                            bias_hh, weight_hr, batch_sizes);
    const bool packed = batch_sizes.has_value();
    check_reset(op, reset, input, s);
    check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                     input, s, packed);
    const typename Kernels::DeviceGuard guard(input.device());
    const Steps steps(s, batch_sizes);
    const HostVariants variants(s, steps, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                                zoneout_mask_h, recurrent_mask, input.options());
    auto [y, h_n, c_n, gates, cells] = dispatch_forward<Kernels>(
        input.scalar_type(), s, steps, reverse, input.contiguous().view({s.N, s.I}), h0, c0,
        weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, keep_state, Kernels::chunk_elements(),
        variants);
    std::vector<int64_t> gates_shape = per_step_shape(s, packed, 4 * s.H);
    std::vector<int64_t> cells_shape = per_step_shape(s, packed, s.H);
    if (!keep_state) {  // nothing kept for a backward: both come back with no rows
      gates_shape[0] = 0;
      cells_shape[0] = 0;
      const auto kept = input.options().dtype(kept_state_dtype(input.scalar_type()));
      gates = at::empty(gates_shape, kept);
      cells = at::empty(cells_shape, kept);
    }
    return {y.view(per_step_shape(s, packed, s.P)), h_n, c_n, gates.view(gates_shape),
            cells.view(cells_shape)};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
      const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
      const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
      const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
      const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
      const Tensor& cells, bool need_grad_input, const optional<Tensor>& reset,
      double zoneout_c, double zoneout_h, const optional<Tensor>& zoneout_mask_c,
      const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
    constexpr const char* op = "lstm_ext::lstm_layer_backward";
    const LayerSizes s = check_layer_backward_inputs(op, grad_output, grad_h_n, grad_c_n, input,
                                                     h0, c0, weight_ih, weight_hh, weight_hr,
                                                     batch_sizes, output, gates, cells);
    check_reset(op, reset, input, s);
    check_regularize(op, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask,
                     input, s, batch_sizes.has_value());
    const typename Kernels::DeviceGuard guard(input.device());
    const Steps steps(s, batch_sizes);
    const HostVariants variants(s, steps, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                                zoneout_mask_h, recurrent_mask, input.options());
    const Tensor dy = defined_or_none(grad_output);
    auto grads = dispatch_backward<Kernels>(
        input.scalar_type(), s, steps, batch_sizes.has_value(), reverse,
        dy.defined() ? dy.view({s.N, s.P}) : dy, defined_or_none(grad_h_n),
        defined_or_none(grad_c_n), input.contiguous().view({s.N, s.I}), h0, c0, weight_ih,
        weight_hh, weight_hr, output.contiguous().view({s.N, s.P}),
        gates.contiguous().view({s.N, 4 * s.H}), cells.contiguous().view({s.N, s.H}),
        need_grad_input, variants);
    std::get<0>(grads) = std::get<0>(grads).view(rows_or_none(input.sizes(), need_grad_input));
    return grads;
  }

  static std::tuple<Tensor, Tensor, Tensor> cell_forward(
      const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& weight_ih,
      const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh) {
    constexpr const char* op = "lstm_ext::lstm_cell_forward";
    const LayerSizes s =
        check_cell_inputs(op, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
    const typename Kernels::DeviceGuard guard(input.device());
    // One step; its gates are kept (the cell's backward needs them), its cell state is c_n.
    auto [y, h_n, c_n, gates, cells] = dispatch_forward<Kernels>(
        input.scalar_type(), s, Steps(s, c10::nullopt), false, input.contiguous(), hx, cx,
        weight_ih, weight_hh, bias_ih, bias_hh, optional<Tensor>(), true,
        Kernels::chunk_elements());
    return {y, c_n, gates};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cell_backward(
      const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
      const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
      const Tensor& weight_ih, const Tensor& weight_hh, bool need_grad_input) {
    constexpr const char* op = "lstm_ext::lstm_cell_backward";
    const LayerSizes s = check_cell_backward_inputs(op, grad_hy, grad_cy, input, hx, cx, cy,
                                                    gates, weight_ih, weight_hh);
    const typename Kernels::DeviceGuard guard(input.device());
    // One step: grad_hy is that step's output gradient and grad_cy its dc; the forward's output is
    // never read (every row's previous h is hx). cy is the step's cell state (in the kept dtype
    // for the kernel; a 16-bit cy is what the forward returned, rounded).
    const Tensor cells = cy.to(kept_state_dtype(input.scalar_type())).contiguous();
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, unused] =
        dispatch_backward<Kernels>(input.scalar_type(), s, Steps(s, c10::nullopt), false, false,
                                   defined_or_none(grad_hy), Tensor(), defined_or_none(grad_cy),
                                   input.contiguous(), hx, cx, weight_ih, weight_hh,
                                   optional<Tensor>(), Tensor(), gates.contiguous(), cells,
                                   need_grad_input);
    return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias};
  }
};

}  // namespace cuda
}  // namespace lstm_ext
