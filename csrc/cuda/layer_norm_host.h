// The CUDA kernels of the layer-normalised layer (lstm_ext::ln_lstm_layer_forward / _backward;
// schemas in csrc/ops.cpp): haste's LayerNormLSTM with nn.LSTM's weights, the equations of
// csrc/cpu/lstm_cpu_layer_norm.cpp and lstm_ext/reference.py:
//   z   = LN(x_t W_ih^T) ⊙ γ_ih + LN(h_{t-1} W_hh^T) ⊙ γ_hh + b_ih + b_hh
//   c_t = f ⊙ c_{t-1} + i ⊙ g;   h_t = o ⊙ tanh(LN(c_t) ⊙ γ_c + β_c)
//
// The host loop of layer_host.h (the same row bookkeeping, reset, zoneout and recurrent dropout
// through HostVariants) with each step's work as ATen ops on the current stream: one GEMM for
// h W_hh^T, at::native_layer_norm for the two normalisations of the step, the gate activations
// in place, the cell state and its normalisation. The input projection and its normalisation run
// once per chunk of steps; the backward's normalisation of x W_ih^T and every weight and gain
// gradient run once over all rows after the steps. Not fused into gate kernels of their own yet:
// a first version whose logic tests/test_cuda_host.py checks on the CPU (this same header with
// the CPU's ATen), against the fused CPU kernels.
//
// What it keeps for the backward is the CPU kernels' (gates, cells, norms: NormsRow in
// csrc/lstm_layer_norm.h), in the compute type C. A bfloat16 / float16 layer computes in float32
// as the CPU kernel does: weights converted once per call, GEMMs in float32, gates, c and the
// normalisations in float32, h rounded to the layer's dtype at every step (it is stored in the
// output, which the next step reads).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <tuple>

#include "../lstm_layer_norm.h"
#include "../lstm_steps.h"
#include "layer_host.h"

namespace lstm_ext {
namespace cuda {

template <typename Kernels, typename S>
struct LayerNormHost {
  using C = at::opmath_type<S>;
  using Tensor = at::Tensor;
  using Host = LayerHost<Kernels, S>;  // previous(), state_read(), rows_of(), last_outputs()

  // (v - mean) * rstd over each row of v [n, width], with mean and rstd [n, 1].
  static std::tuple<Tensor, Tensor, Tensor> normalize(const Tensor& v) {
    return at::native_layer_norm(v, {v.size(1)}, {}, {}, kLayerNormEps);
  }

  // The backward of v̂ = normalize(v), per row: u [n, width] dL/dv̂ (after the gain), v̂ [n, width],
  // rstd [n, 1]. Returns dL/dv = rstd (u - mean(u) - v̂ mean(u ⊙ v̂)).
  static Tensor normalize_backward(const Tensor& u, const Tensor& v_hat, const Tensor& rstd) {
    return rstd * (u - u.mean(1, true) - v_hat * (u * v_hat).mean(1, true));
  }

  // x [N, I], h0 [B, P], c0 [B, H] in S; the weights, biases and the normalisation's parameters
  // in S. Returns output [N, P], h_n [B, P], c_n [B, H] in S; with keep_state, gates [N, 4H],
  // cells [N, H] and norms [N, 8H + 16] in C (else undefined).
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward(
      const LayerSizes& s, const Steps& steps, bool reverse, const Tensor& x, const Tensor& h0,
      const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
      const c10::optional<Tensor>& bias_ih, const c10::optional<Tensor>& bias_hh,
      const c10::optional<Tensor>& weight_hr, const Tensor& ln_weight_ih,
      const Tensor& ln_weight_hh, const Tensor& ln_weight_c, const Tensor& ln_bias_c,
      bool keep_state, int64_t chunk_elements, const HostVariants& v) {
    const int64_t H = s.H, G = 4 * s.H;
    const NormsRow layout{H};
    const auto opts = x.options();
    const auto c_type = c10::CppTypeToScalarType<C>::value;
    const auto c_opts = opts.dtype(c_type);
    const bool proj = weight_hr.has_value();
    const Tensor w_ih_t = weight_ih.to(c_type).t(), w_hh_t = weight_hh.to(c_type).t();
    const Tensor w_hr_t = proj ? weight_hr->to(c_type).t() : Tensor();
    const Tensor gain_ih = ln_weight_ih.to(c_type), gain_hh = ln_weight_hh.to(c_type),
                 gain_c = ln_weight_c.to(c_type), bias_c = ln_bias_c.to(c_type);
    const Tensor bias = bias_ih.has_value() ? bias_ih->to(c_type) + bias_hh->to(c_type)
                                            : at::zeros({G}, c_opts);
    const Tensor h0c = h0.to(c_type), c0c = c0.to(c_type);
    Tensor y = at::empty({s.N, s.P}, opts);
    // Inference holds one chunk of steps' rows at a time (as LayerHost::forward).
    const int64_t chunk_steps =
        keep_state ? s.T
                   : std::clamp<int64_t>(chunk_elements / std::max<int64_t>(1, s.B * G), 1, s.T);
    const int64_t buffer_rows = keep_state ? s.N : std::min(s.N, chunk_steps * s.B);
    Tensor norms = at::empty({buffer_rows, layout.width()}, c_opts);
    Tensor gates = at::empty({buffer_rows, G}, c_opts);
    Tensor cells = keep_state ? at::empty({s.N, H}, c_opts) : Tensor();
    Tensor c_state = c0c.clone();  // [B, H]
    for (int64_t k0 = 0; k0 < s.T; k0 += chunk_steps) {
      const int64_t k1 = std::min(s.T, k0 + chunk_steps);
      const auto [row_begin, row_end] = steps.rows_of_steps(k0, k1, reverse);
      const int64_t base = keep_state ? 0 : row_begin;  // buffer row = row - base
      // The chunk's LN(x W_ih^T), kept, and LN(x W_ih^T) γ_ih + b, which each step adds to.
      Tensor chunk_norms = norms.narrow(0, row_begin - base, row_end - row_begin);
      auto [x_hat, mean_ih, rstd_ih] =
          normalize(at::mm(x.narrow(0, row_begin, row_end - row_begin).to(c_type), w_ih_t));
      chunk_norms.narrow(1, 0, G).copy_(x_hat);
      chunk_norms.select(1, layout.stats() + kRstdIh).copy_(rstd_ih.view({-1}));
      const Tensor z_ih = at::addcmul(bias, x_hat, gain_ih);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = Steps::time_of(k, s.T, reverse);
        const int64_t n = steps.batch[t], row = steps.offset[t];
        if (n == 0) {
          continue;
        }
        const auto [n_prev, prev_row] = Host::previous(s, steps, k, reverse);
        const Tensor restarting = v.restarting(t, n);
        Tensor c_rows = c_state.narrow(0, 0, n);
        Tensor h_read = Host::state_read(y, h0, prev_row, std::min(n, n_prev), n).to(c_type);
        if (restarting.defined()) {
          h_read = at::where(restarting, h0c.narrow(0, 0, n), h_read);
          c_rows.copy_(at::where(restarting, c0c.narrow(0, 0, n), c_rows));
        }
        const Tensor fed = v.recurrent.defined()
                               ? h_read * v.recurrent.narrow(0, 0, n).to(c_type)
                               : h_read;
        Tensor norms_t = norms.narrow(0, row - base, n);
        auto [h_hat, mean_hh, rstd_hh] = normalize(at::mm(fed, w_hh_t));
        norms_t.narrow(1, layout.hh(), G).copy_(h_hat);
        norms_t.select(1, layout.stats() + kRstdHh).copy_(rstd_hh.view({-1}));
        Tensor a = gates.narrow(0, row - base, n);  // z, then the activated i, f, g, o
        at::addcmul_out(a, z_ih.narrow(0, row - row_begin, n), h_hat, gain_hh);
        a.narrow(1, 0, 2 * H).sigmoid_();
        a.narrow(1, 2 * H, H).tanh_();
        a.narrow(1, 3 * H, H).sigmoid_();
        const Tensor i = a.narrow(1, 0, H), f = a.narrow(1, H, H), g = a.narrow(1, 2 * H, H),
                     o = a.narrow(1, 3 * H, H);
        const Tensor c_prev = v.zone_c() ? c_rows.clone() : Tensor();
        c_rows.copy_(f * c_rows + i * g);  // c_new
        auto [c_norm, mean_c, rstd_c] =
            at::native_layer_norm(c_rows, {H}, gain_c, bias_c, kLayerNormEps);
        norms_t.select(1, layout.stats() + kMeanC).copy_(mean_c.view({-1}));
        norms_t.select(1, layout.stats() + kRstdC).copy_(rstd_c.view({-1}));
        const Tensor r = o * at::tanh(c_norm);
        if (c_prev.defined()) {  // c_t = zoneout's mix, also as kept
          c_rows.copy_(HostVariants::mix(Host::rows_of(v.mask_c, row, n), v.p_c, c_prev, c_rows,
                                         c_type));
        }
        if (keep_state) {
          cells.narrow(0, row, n).copy_(c_rows);
        }
        Tensor h_new = proj ? at::mm(r, w_hr_t) : r;
        if (v.zone_h()) {
          h_new = HostVariants::mix(Host::rows_of(v.mask_h, row, n), v.p_h, h_read, h_new, c_type);
        }
        y.narrow(0, row, n).copy_(h_new);  // rounded to S: the h the next step reads
      }
    }
    const Tensor h_n = Host::last_outputs(s, steps, reverse, y, h0);
    if (!keep_state) {
      return {y, h_n, c_state.to(opts.dtype()), Tensor(), Tensor(), Tensor()};
    }
    return {y, h_n, c_state.to(opts.dtype()), gates, cells, norms};
  }

  // dy [N, P] or undefined; x [N, I]; y [N, P]; gates [N, 4H], cells [N, H], norms [N, 8H + 16]
  // in C as the forward kept them; grad_h_n [B, P] / grad_c_n [B, H] or undefined. Returns the
  // gradients of input ([0, I] unless need_grad_input), h0, c0, weight_ih, weight_hh, the bias,
  // weight_hr ([0, H] without it), ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, in S.
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                    Tensor>
  backward(const LayerSizes& s, const Steps& steps, bool reverse, const Tensor& dy,
           const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
           const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
           const c10::optional<Tensor>& weight_hr, const Tensor& ln_weight_ih,
           const Tensor& ln_weight_hh, const Tensor& ln_weight_c, const Tensor& ln_bias_c,
           const Tensor& y, const Tensor& gates, const Tensor& cells, const Tensor& norms,
           bool need_grad_input, const HostVariants& v) {
    const int64_t H = s.H, G = 4 * s.H, P = s.P;
    const NormsRow layout{H};
    const auto opts = x.options();
    const auto c_type = c10::CppTypeToScalarType<C>::value;
    const auto c_opts = opts.dtype(c_type);
    const auto dtype = opts.dtype().toScalarType();
    const bool proj = weight_hr.has_value();
    const Tensor w_hh = weight_hh.to(c_type), w_hr = proj ? weight_hr->to(c_type) : Tensor();
    const Tensor gain_ih = ln_weight_ih.to(c_type), gain_hh = ln_weight_hh.to(c_type),
                 gain_c = ln_weight_c.to(c_type), bias_c = ln_bias_c.to(c_type);
    const Tensor h0c = h0.to(c_type), c0c = c0.to(c_type);
    Tensor dh_state =
        grad_h_n.defined() ? grad_h_n.to(c_type).clone() : at::zeros({s.B, P}, c_opts);
    Tensor dc_state =
        grad_c_n.defined() ? grad_c_n.to(c_type).clone() : at::zeros({s.B, H}, c_opts);
    // what the restarts pass to dh0, dc0 (added at the end)
    Tensor restart_dh = v.restarts.any() ? at::zeros({s.B, P}, c_opts) : Tensor();
    Tensor restart_dc = v.restarts.any() ? at::zeros({s.B, H}, c_opts) : Tensor();
    // Per row, for the GEMMs and sums after the steps: dL/dz (before the gains), dL/d(h W_hh^T),
    // the h fed to W_hh, LN(c_new) and dL/d(LN(c_new) γ_c + β_c); with a projection dL/dh_t and
    // o ⊙ tanh(...).
    Tensor dz_all = at::empty({s.N, G}, c_opts), d_hh_all = at::empty({s.N, G}, c_opts);
    Tensor h_fed = at::empty({s.N, P}, c_opts);
    Tensor c_hat_all = at::empty({s.N, H}, c_opts), dn_all = at::empty({s.N, H}, c_opts);
    Tensor dh_all = proj ? at::empty({s.N, P}, c_opts) : Tensor();
    Tensor r_all = proj ? at::empty({s.N, H}, c_opts) : Tensor();
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = Steps::time_of(k, s.T, reverse);
      const int64_t n = steps.batch[t], row = steps.offset[t];
      if (n == 0) {
        continue;
      }
      auto [n_prev, prev_row] = Host::previous(s, steps, k, reverse);
      n_prev = std::min(n_prev, n);
      const Tensor restarting = v.restarting(t, n);
      Tensor h_read = Host::state_read(y, h0, prev_row, n_prev, n).to(c_type);
      Tensor c_read = Host::state_read(cells, c0c, prev_row, n_prev, n);
      if (restarting.defined()) {
        h_read = at::where(restarting, h0c.narrow(0, 0, n), h_read);
        c_read = at::where(restarting, c0c.narrow(0, 0, n), c_read);
      }
      h_fed.narrow(0, row, n)
          .copy_(v.recurrent.defined() ? h_read * v.recurrent.narrow(0, 0, n).to(c_type)
                                       : h_read);
      Tensor dh_rows = dh_state.narrow(0, 0, n), dc_rows = dc_state.narrow(0, 0, n);
      Tensor dh_new = dy.defined() ? dh_rows + dy.narrow(0, row, n).to(c_type) : dh_rows.clone();
      Tensor keep_dh;  // zoneout of h: what passes straight to the state this step read
      if (v.zone_h()) {
        const Tensor mask = Host::rows_of(v.mask_h, row, n);
        keep_dh = mask.defined() ? at::where(mask, dh_new, 0) : dh_new * v.p_h;
        dh_new = mask.defined() ? at::where(mask, 0, dh_new) : dh_new * (1 - v.p_h);
      }
      Tensor dr = dh_new;  // dL/d(o ⊙ tanh(LN(c_new) γ_c + β_c))
      if (proj) {
        dh_all.narrow(0, row, n).copy_(dh_new);
        dr = at::mm(dh_new, w_hr);
      }
      const Tensor a = gates.narrow(0, row, n);
      const Tensor i = a.narrow(1, 0, H), f = a.narrow(1, H, H), g = a.narrow(1, 2 * H, H),
                   o = a.narrow(1, 3 * H, H);
      Tensor c_new = cells.narrow(0, row, n), keep_dc;
      if (v.zone_c()) {  // the kept c_t is mixed: the unmixed one from the gates
        c_new = f * c_read + i * g;
        const Tensor mask = Host::rows_of(v.mask_c, row, n);
        keep_dc = mask.defined() ? at::where(mask, dc_rows, 0) : dc_rows * v.p_c;
        dc_rows.copy_(mask.defined() ? at::where(mask, 0, dc_rows) : dc_rows * (1 - v.p_c));
      }
      const Tensor norms_t = norms.narrow(0, row, n);
      const Tensor stats = norms_t.narrow(1, layout.stats(), 4);
      const Tensor rstd_c = stats.narrow(1, kRstdC, 1);
      const Tensor c_hat = (c_new - stats.narrow(1, kMeanC, 1)) * rstd_c;
      const Tensor tn = at::tanh(at::addcmul(bias_c, c_hat, gain_c));
      const Tensor dn = dr * o * (1 - tn * tn);
      dn_all.narrow(0, row, n).copy_(dn);
      c_hat_all.narrow(0, row, n).copy_(c_hat);
      if (proj) {
        r_all.narrow(0, row, n).copy_(o * tn);
      }
      const Tensor dc_total = dc_rows + normalize_backward(dn * gain_c, c_hat, rstd_c);
      Tensor dz = dz_all.narrow(0, row, n);
      dz.narrow(1, 0, H).copy_(dc_total * g * i * (1 - i));
      dz.narrow(1, H, H).copy_(dc_total * c_read * f * (1 - f));
      dz.narrow(1, 2 * H, H).copy_(dc_total * i * (1 - g * g));
      dz.narrow(1, 3 * H, H).copy_(dr * tn * o * (1 - o));
      dc_rows.copy_(dc_total * f);
      if (keep_dc.defined()) {
        dc_rows.add_(keep_dc);
      }
      Tensor d_hh = d_hh_all.narrow(0, row, n);
      d_hh.copy_(normalize_backward(dz * gain_hh, norms_t.narrow(1, layout.hh(), G),
                                    stats.narrow(1, kRstdHh, 1)));
      Kernels::mm_into(dh_rows, d_hh, w_hh);  // dL/dh of the state this step fed to W_hh
      if (v.recurrent.defined()) {
        dh_rows.mul_(v.recurrent.narrow(0, 0, n).to(c_type));
      }
      if (keep_dh.defined()) {
        dh_rows.add_(keep_dh);
      }
      if (restarting.defined()) {  // the restarted rows' gradients belong to h0, c0
        restart_dh.narrow(0, 0, n).add_(at::where(restarting, dh_rows, 0));
        restart_dc.narrow(0, 0, n).add_(at::where(restarting, dc_rows, 0));
        dh_rows.masked_fill_(restarting, 0);
        dc_rows.masked_fill_(restarting, 0);
      }
    }
    if (restart_dh.defined()) {
      dh_state.add_(restart_dh);
      dc_state.add_(restart_dc);
    }
    // LN(x W_ih^T)'s backward over every row at once, then the GEMMs and sums.
    const Tensor x_hat = norms.narrow(1, 0, G);
    const Tensor d_ih = normalize_backward(dz_all * gain_ih, x_hat,
                                           norms.narrow(1, layout.stats() + kRstdIh, 1));
    const Tensor xc = x.to(c_type);
    Tensor grad_input =
        need_grad_input ? at::mm(d_ih, weight_ih.to(c_type)) : at::empty({0, s.I}, c_opts);
    return {grad_input.to(dtype),
            dh_state.to(dtype),
            dc_state.to(dtype),
            at::mm(d_ih.t(), xc).to(dtype),
            at::mm(d_hh_all.t(), h_fed).to(dtype),
            dz_all.sum(0).to(dtype),
            (proj ? at::mm(dh_all.t(), r_all) : at::empty({0, H}, c_opts)).to(dtype),
            (dz_all * x_hat).sum(0).to(dtype),
            (dz_all * norms.narrow(1, layout.hh(), G)).sum(0).to(dtype),
            (dn_all * c_hat_all).sum(0).to(dtype),
            dn_all.sum(0).to(dtype)};
  }
};

// The op kernels (schemas in csrc/ops.cpp) over LayerNormHost: the CPU kernels' argument
// checks (csrc/lstm_layer_norm.h), then the Kernels' device guard, then the layer in the inputs'
// dtype. Kernels: as for LayerOps (layer_host.h).
template <typename Kernels>
struct LayerNormOps {
  using Tensor = at::Tensor;
  template <typename T>
  using optional = c10::optional<T>;

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
      const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
      const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
      const optional<Tensor>& weight_hr, const Tensor& ln_weight_ih, const Tensor& ln_weight_hh,
      const Tensor& ln_weight_c, const Tensor& ln_bias_c, const optional<Tensor>& batch_sizes,
      bool reverse, bool keep_state, const optional<Tensor>& reset, double zoneout_c,
      double zoneout_h, const optional<Tensor>& zoneout_mask_c,
      const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
    constexpr const char* op = "lstm_ext::ln_lstm_layer_forward";
    const LayerSizes s = check_ln_layer_forward_args(
        op, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, ln_weight_ih,
        ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, reset, zoneout_c, zoneout_h,
        zoneout_mask_c, zoneout_mask_h, recurrent_mask);
    const bool packed = batch_sizes.has_value();
    const typename Kernels::DeviceGuard guard(input.device());
    const Steps steps(s, batch_sizes);
    const HostVariants variants(s, steps, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                                zoneout_mask_h, recurrent_mask, input.options());
    auto [y, h_n, c_n, gates, cells, norms] = AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "ln_lstm_layer_forward_cuda", [&] {
          return LayerNormHost<Kernels, scalar_t>::forward(
              s, steps, reverse, input.contiguous().view({s.N, s.I}), h0, c0, weight_ih,
              weight_hh, bias_ih, bias_hh, weight_hr, ln_weight_ih, ln_weight_hh, ln_weight_c,
              ln_bias_c, keep_state, Kernels::chunk_elements(), variants);
        });
    // Kept state with every row, or none (no rows) without keep_state, as the CPU kernel's.
    const auto kept = input.options().dtype(kept_state_dtype(input.scalar_type()));
    auto shaped = [&](const Tensor& t, int64_t width) {
      std::vector<int64_t> shape = per_step_shape(s, packed, width);
      if (!keep_state) {
        shape[0] = 0;
        return at::empty(shape, kept);
      }
      return t.view(shape);
    };
    return {y.view(per_step_shape(s, packed, s.P)), h_n, c_n, shaped(gates, 4 * s.H),
            shaped(cells, s.H), shaped(norms, NormsRow{s.H}.width())};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                    Tensor>
  layer_backward(const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
                 const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0,
                 const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
                 const optional<Tensor>& weight_hr, const Tensor& ln_weight_ih,
                 const Tensor& ln_weight_hh, const Tensor& ln_weight_c, const Tensor& ln_bias_c,
                 const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output,
                 const Tensor& gates, const Tensor& cells, const Tensor& norms,
                 bool need_grad_input, const optional<Tensor>& reset, double zoneout_c,
                 double zoneout_h, const optional<Tensor>& zoneout_mask_c,
                 const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
    constexpr const char* op = "lstm_ext::ln_lstm_layer_backward";
    const LayerSizes s = check_ln_layer_backward_args(
        op, grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
        ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, output, gates, cells,
        norms, reset, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask);
    const typename Kernels::DeviceGuard guard(input.device());
    const Steps steps(s, batch_sizes);
    const HostVariants variants(s, steps, reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                                zoneout_mask_h, recurrent_mask, input.options());
    const Tensor dy = LayerOps<Kernels>::defined_or_none(grad_output);
    auto grads = AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "ln_lstm_layer_backward_cuda", [&] {
          return LayerNormHost<Kernels, scalar_t>::backward(
              s, steps, reverse, dy.defined() ? dy.view({s.N, s.P}) : dy,
              LayerOps<Kernels>::defined_or_none(grad_h_n),
              LayerOps<Kernels>::defined_or_none(grad_c_n), input.contiguous().view({s.N, s.I}),
              h0, c0, weight_ih, weight_hh, weight_hr, ln_weight_ih, ln_weight_hh, ln_weight_c,
              ln_bias_c, output.contiguous().view({s.N, s.P}),
              gates.contiguous().view({s.N, 4 * s.H}), cells.contiguous().view({s.N, s.H}),
              norms.contiguous().view({s.N, NormsRow{s.H}.width()}), need_grad_input,
              variants);
        });
    std::get<0>(grads) = std::get<0>(grads).view(rows_or_none(input.sizes(), need_grad_input));
    return grads;
  }
};

}  // namespace cuda
}  // namespace lstm_ext
