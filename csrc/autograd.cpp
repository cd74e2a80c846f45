// Autograd for lstm_ext's public ops, lstm, lstm_layer and lstm_cell: one graph node per call (the
// whole module; a layer's whole time loop in one direction; one cell step), written with
// torch::autograd::Function so that neither the forward nor the backward runs any Python.
//
// Why C++ and not a Python torch.autograd.Function: at small sizes (the sin->cos trainer's
// T=20, B=5, H=16) the arithmetic of a forward+backward takes a few microseconds, while a Python
// Function costs ~40-50 us per forward+backward (its apply, ctx, and the call back into Python
// from the engine); the node below costs a few.
//
// forward runs the forward kernels below autograd and saves the inputs and what the kernels keep
// (the activated gates and cell states); backward runs the backward kernels. A second derivative
// (backward with create_graph=True) differentiates the pure-PyTorch reference instead
// (lstm_ext/reference.py, registered from Python as lstm_*_reference): exact, slower, and used only
// when asked for. The module's forward and backward are csrc/module.h's.
//
// Without autograd (no_grad, or no input requires grad) the kernels keep no state.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "lstm_regularize.h"
#include "module.h"
#include "ops.h"

namespace lstm_ext {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool any_requires_grad(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) {
      return true;
    }
  }
  return false;
}

// Whether argument `position` of the forward needs a gradient. `inputs` are the forward's tensor
// arguments in order, undefined where an optional one was None: the context numbers only the
// tensors that were given, so the index it takes counts the given ones before `position`.
bool needs_grad(AutogradContext* ctx, const std::vector<Tensor>& inputs, size_t position) {
  if (!inputs[position].defined()) {
    return false;
  }
  size_t edge = 0;
  for (size_t i = 0; i < position; ++i) {
    edge += inputs[i].defined() ? 1 : 0;
  }
  return ctx->needs_input_grad(edge);
}

// The kernels return one bias gradient; it belongs to bias_ih and bias_hh alike. Both positions
// get the same tensor, as PyTorch's own nodes do (AddBackward): gradient accumulation copies a
// tensor that another input still holds rather than adopting it, so the two .grad fields never
// share storage.
void set_bias_grads(AutogradContext* ctx, const std::vector<Tensor>& inputs, variable_list& grads,
                    size_t ih, size_t hh, const Tensor& grad_bias) {
  if (needs_grad(ctx, inputs, ih)) {
    grads[ih] = grad_bias;
  }
  if (needs_grad(ctx, inputs, hh)) {
    grads[hh] = grad_bias;
  }
}

// Gradients of `outputs` (the reference recomputed with autograd on) with respect to the inputs
// that need one, as differentiable tensors (create_graph): the route of a second derivative.
// An input the outputs do not depend on gets zeros, as nn.LSTM's double backward gives.
void differentiable_grads(AutogradContext* ctx, const std::vector<Tensor>& inputs,
                          const std::vector<Tensor>& outputs, const variable_list& grad_outputs,
                          variable_list& grads) {
  std::vector<Tensor> wanted_outputs, wanted_grads, wanted_inputs;
  std::vector<size_t> positions;
  for (size_t k = 0; k < outputs.size(); ++k) {
    if (grad_outputs[k].defined()) {
      wanted_outputs.push_back(outputs[k]);
      wanted_grads.push_back(grad_outputs[k]);
    }
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (needs_grad(ctx, inputs, i)) {
      wanted_inputs.push_back(inputs[i]);
      positions.push_back(i);
    }
  }
  if (wanted_outputs.empty() || wanted_inputs.empty()) {
    return;
  }
  const variable_list result =
      torch::autograd::grad(wanted_outputs, wanted_inputs, wanted_grads, /*retain_graph=*/true,
                            /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t k = 0; k < positions.size(); ++k) {
    const size_t i = positions[k];
    grads[i] = result[k].defined() ? result[k] : at::zeros_like(inputs[i]);
  }
}

// Argument positions of lstm_layer: input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
// weight_hr, batch_sizes, reverse.
constexpr size_t kLayerArgs = 10;

class LayerFunction : public torch::autograd::Function<LayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const Tensor& c0, const Tensor& weight_ih, const Tensor& weight_hh,
                               const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
                               const optional<Tensor>& weight_hr,
                               const optional<Tensor>& batch_sizes, bool reverse) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, c_n, gates, cells] =
        ops::lstm_layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                batch_sizes, reverse, /*keep_state=*/true, c10::nullopt, 0.,
                                0., c10::nullopt, c10::nullopt, c10::nullopt);
    ctx->save_for_backward({input, h0, c0, weight_ih, weight_hh, bias_ih.value_or(Tensor()),
                            bias_hh.value_or(Tensor()), weight_hr.value_or(Tensor()), output,
                            gates, cells});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n};
  }

  // grad_outputs: d output, d h_n, d c_n, each possibly undefined (not used by the loss).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &h0 = saved[1], &c0 = saved[2], &weight_ih = saved[3],
                 &weight_hh = saved[4], &bias_ih = saved[5], &bias_hh = saved[6],
                 &weight_hr = saved[7], &output = saved[8], &gates = saved[9], &cells = saved[10];
    const optional<Tensor> batch_sizes = ctx->saved_data["batch_sizes"].toOptional<Tensor>();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const std::vector<Tensor> inputs = {input,     h0,      c0,      weight_ih,
                                        weight_hh, bias_ih, bias_hh, weight_hr};
    variable_list grads(kLayerArgs);

    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True
      auto [ref_output, ref_h_n, ref_c_n] =
          ops::lstm_layer_reference(input, h0, c0, weight_ih, weight_hh, as_optional(bias_ih),
                                    as_optional(bias_hh), as_optional(weight_hr), batch_sizes,
                                    reverse, c10::nullopt, 0., 0., c10::nullopt, c10::nullopt,
                                    c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt,
                                    c10::nullopt);
      differentiable_grads(ctx, inputs, {ref_output, ref_h_n, ref_c_n}, grad_outputs, grads);
      return grads;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        ops::lstm_layer_backward(as_optional(grad_outputs[0]), as_optional(grad_outputs[1]),
                                 as_optional(grad_outputs[2]), input, h0, c0, weight_ih,
                                 weight_hh, as_optional(weight_hr), batch_sizes, reverse, output,
                                 gates, cells, needs_grad(ctx, inputs, 0), c10::nullopt, 0., 0.,
                                 c10::nullopt, c10::nullopt, c10::nullopt);
    const Tensor computed[] = {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh};
    for (size_t i = 0; i < 5; ++i) {
      if (needs_grad(ctx, inputs, i)) {
        grads[i] = computed[i];
      }
    }
    set_bias_grads(ctx, inputs, grads, 5, 6, grad_bias);
    if (needs_grad(ctx, inputs, 7)) {
      grads[7] = grad_w_hr;
    }
    return grads;
  }
};

// Argument positions of lstm_cell: input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh.
constexpr size_t kCellArgs = 7;

class CellFunction : public torch::autograd::Function<CellFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& hx,
                               const Tensor& cx, const Tensor& weight_ih, const Tensor& weight_hh,
                               const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [hy, cy, gates] =
        ops::lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
    ctx->save_for_backward({input, hx, cx, weight_ih, weight_hh, bias_ih.value_or(Tensor()),
                            bias_hh.value_or(Tensor()), cy, gates});
    ctx->set_materialize_grads(false);
    return {hy, cy};
  }

  // grad_outputs: d hy, d cy, each possibly undefined.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &weight_ih = saved[3],
                 &weight_hh = saved[4], &bias_ih = saved[5], &bias_hh = saved[6], &cy = saved[7],
                 &gates = saved[8];
    const std::vector<Tensor> inputs = {input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh};
    variable_list grads(kCellArgs);

    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True
      auto [ref_hy, ref_cy] = ops::lstm_cell_reference(
          input, hx, cx, weight_ih, weight_hh, as_optional(bias_ih), as_optional(bias_hh));
      differentiable_grads(ctx, inputs, {ref_hy, ref_cy}, grad_outputs, grads);
      return grads;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias] =
        ops::lstm_cell_backward(as_optional(grad_outputs[0]), as_optional(grad_outputs[1]), input,
                                hx, cx, cy, gates, weight_ih, weight_hh,
                                needs_grad(ctx, inputs, 0));
    const Tensor computed[] = {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh};
    for (size_t i = 0; i < 5; ++i) {
      if (needs_grad(ctx, inputs, i)) {
        grads[i] = computed[i];
      }
    }
    set_bias_grads(ctx, inputs, grads, 5, 6, grad_bias);
    return grads;
  }
};

// The configuration in the C++ node's context (saved_data holds IValues, not structs).
void save_config(AutogradContext* ctx, const ModuleConfig& config) {
  ctx->saved_data["flags"] = std::vector<int64_t>{config.has_biases, config.has_projections,
                                                  config.num_layers, config.train,
                                                  config.bidirectional, config.layer_norm};
  ctx->saved_data["probabilities"] = std::vector<double>{
      config.dropout, config.zoneout_c, config.zoneout_h, config.recurrent_dropout};
  ctx->saved_data["batch_sizes"] = config.batch_sizes;
  ctx->saved_data["reset"] = config.reset;
}

ModuleConfig load_config(AutogradContext* ctx) {
  const auto flags = ctx->saved_data["flags"].toIntVector();
  const auto probabilities = ctx->saved_data["probabilities"].toDoubleVector();
  return ModuleConfig{flags[0] != 0,
                      flags[1] != 0,
                      flags[2],
                      probabilities[0],
                      flags[3] != 0,
                      flags[4] != 0,
                      ctx->saved_data["batch_sizes"].toOptional<Tensor>(),
                      ctx->saved_data["reset"].toOptional<Tensor>(),
                      probabilities[1],
                      probabilities[2],
                      probabilities[3],
                      flags[5] != 0};
}

// lstm's graph node: the forward and backward of lstm_forward / lstm_backward (below), with the
// state kept in the node's context in the same layout (saved_list).
class ModuleFunction : public torch::autograd::Function<ModuleFunction> {
 public:
  // Arguments: input, h0, c0, the parameters, then the configuration (one position).
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& h0, const optional<Tensor>& c0,
                               at::TensorList params, const ModuleConfig& config) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const ForwardResult result = module_forward(input, h0, c0, params, config,
                                                /*keep_state=*/true);
    // Everything goes through save_for_backward, the output included: a tensor held anywhere else
    // in the context would hold the node through its grad_fn, a reference cycle never freed.
    std::vector<Tensor> to_save = {input, h0.value_or(Tensor()), c0.value_or(Tensor())};
    to_save.insert(to_save.end(), params.begin(), params.end());
    to_save.push_back(result.output);
    const std::vector<Tensor> saved = saved_list(result, config);
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    save_config(ctx, config);
    ctx->set_materialize_grads(false);
    return {result.output, result.h_n, result.c_n};
  }

  // grad_outputs: d output, d h_n, d c_n, each possibly undefined (not used by the loss).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const ModuleConfig config = load_config(ctx);
    // saved: input, h0, c0, the parameters, the output, then saved_list's entries.
    const variable_list saved = ctx->get_saved_variables();
    const size_t n_inputs = 3 + static_cast<size_t>(ctx->saved_data["params"].toInt());
    const std::vector<Tensor> inputs(saved.begin(), saved.begin() + n_inputs);
    const Tensor &input = inputs[0], &h0 = inputs[1], &c0 = inputs[2];
    const at::TensorList params = at::TensorList(inputs).slice(3);
    const ForwardResult forward = unpack_saved(at::TensorList(saved).slice(n_inputs + 1), input,
                                               saved[n_inputs], config, h0.defined());
    variable_list grads(n_inputs + 1);  // the configuration's position gets none

    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True
      Tensor h0_or_zeros = h0, c0_or_zeros = c0;
      if (!h0.defined()) {
        const int64_t states = config.num_layers * config.directions();
        const Tensor &zero_h = forward.zero_h, &zero_c = forward.zero_c;
        h0_or_zeros = zero_h.expand({states, zero_h.size(0), zero_h.size(1)});
        c0_or_zeros = zero_c.expand({states, zero_c.size(0), zero_c.size(1)});
      }
      const variable_list outputs =
          module_reference(input, h0_or_zeros, c0_or_zeros, params, config, forward);
      differentiable_grads(ctx, inputs, outputs, grad_outputs, grads);
      return grads;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const ModuleGrads computed =
        module_backward(grad_outputs[0], grad_outputs[1], grad_outputs[2], input, h0, c0, params,
                        config, forward, needs_grad(ctx, inputs, 0));
    if (needs_grad(ctx, inputs, 0)) {
      grads[0] = computed.input;
    }
    if (needs_grad(ctx, inputs, 1)) {
      grads[1] = at::stack(computed.h0);
    }
    if (needs_grad(ctx, inputs, 2)) {
      grads[2] = at::stack(computed.c0);
    }
    for (size_t i = 0; i < computed.params.size(); ++i) {
      if (needs_grad(ctx, inputs, 3 + i)) {
        grads[3 + i] = computed.params[i];
      }
    }
    return grads;
  }
};

// ---- kernels of lstm_layer and lstm_cell --------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> lstm_layer_autograd(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse) {
  const Tensor none;
  const bool track = torch::autograd::GradMode::is_enabled() &&
                     any_requires_grad({&input, &h0, &c0, &weight_ih, &weight_hh,
                                        bias_ih ? &*bias_ih : &none, bias_hh ? &*bias_hh : &none,
                                        weight_hr ? &*weight_hr : &none});
  if (!track) {  // nothing to differentiate: keep no state for a backward
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, h_n, c_n, gates, cells] =
        ops::lstm_layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                batch_sizes, reverse, /*keep_state=*/false, c10::nullopt, 0.,
                                0., c10::nullopt, c10::nullopt, c10::nullopt);
    return {output, h_n, c_n};
  }
  const variable_list out = LayerFunction::apply(input, h0, c0, weight_ih, weight_hh, bias_ih,
                                                 bias_hh, weight_hr, batch_sizes, reverse);
  return {out[0], out[1], out[2]};
}

// Below autograd (inference, or a graph traced by torch.compile / torch.export after autograd).
std::tuple<Tensor, Tensor, Tensor> lstm_layer_no_state(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse) {
  auto [output, h_n, c_n, gates, cells] =
      ops::lstm_layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                              batch_sizes, reverse, /*keep_state=*/false, c10::nullopt, 0., 0.,
                              c10::nullopt, c10::nullopt, c10::nullopt);
  return {output, h_n, c_n};
}

std::tuple<Tensor, Tensor> lstm_cell_autograd(const Tensor& input, const Tensor& hx,
                                              const Tensor& cx, const Tensor& weight_ih,
                                              const Tensor& weight_hh,
                                              const optional<Tensor>& bias_ih,
                                              const optional<Tensor>& bias_hh) {
  const Tensor none;
  const bool track = torch::autograd::GradMode::is_enabled() &&
                     any_requires_grad({&input, &hx, &cx, &weight_ih, &weight_hh,
                                        bias_ih ? &*bias_ih : &none, bias_hh ? &*bias_hh : &none});
  if (!track) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [hy, cy, gates] =
        ops::lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
    return {hy, cy};
  }
  const variable_list out =
      CellFunction::apply(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> lstm_cell_no_state(const Tensor& input, const Tensor& hx,
                                              const Tensor& cx, const Tensor& weight_ih,
                                              const Tensor& weight_hh,
                                              const optional<Tensor>& bias_ih,
                                              const optional<Tensor>& bias_hh) {
  auto [hy, cy, gates] =
      ops::lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  return {hy, cy};
}

// ---- kernels of lstm, lstm_forward and lstm_backward --------------------------------------------
//
// The three ops take the same configuration arguments in the same order (csrc/ops.cpp).

std::tuple<Tensor, Tensor, Tensor> lstm_no_state(
    const Tensor& input, const optional<Tensor>& h0, const optional<Tensor>& c0,
    at::TensorList params, bool has_biases, bool has_projections, int64_t num_layers,
    double dropout, bool train, bool bidirectional, const optional<Tensor>& batch_sizes,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h, double recurrent_dropout,
    bool layer_norm) {
  const ModuleConfig config{has_biases, has_projections, num_layers,        dropout,
                            train,      bidirectional,   batch_sizes,       reset,
                            zoneout_c,  zoneout_h,       recurrent_dropout, layer_norm};
  ForwardResult result = module_forward(input, h0, c0, params, config, /*keep_state=*/false);
  return {result.output, result.h_n, result.c_n};
}

std::tuple<Tensor, Tensor, Tensor> lstm_autograd(
    const Tensor& input, const optional<Tensor>& h0, const optional<Tensor>& c0,
    at::TensorList params, bool has_biases, bool has_projections, int64_t num_layers,
    double dropout, bool train, bool bidirectional, const optional<Tensor>& batch_sizes,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h, double recurrent_dropout,
    bool layer_norm) {
  bool track = false;
  if (torch::autograd::GradMode::is_enabled()) {
    const Tensor none;
    track = any_requires_grad({&input, h0 ? &*h0 : &none, c0 ? &*c0 : &none});
    for (const Tensor& p : params) {
      track = track || p.requires_grad();
    }
  }
  const ModuleConfig config{has_biases, has_projections, num_layers,        dropout,
                            train,      bidirectional,   batch_sizes,       reset,
                            zoneout_c,  zoneout_h,       recurrent_dropout, layer_norm};
  if (!track) {  // nothing to differentiate: keep no state for a backward
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const ForwardResult result =
        module_forward(input, h0, c0, params, config, /*keep_state=*/false);
    return {result.output, result.h_n, result.c_n};
  }
  const variable_list out = ModuleFunction::apply(input, h0, c0, params, config);
  return {out[0], out[1], out[2]};
}

// lstm's forward with the state its backward needs, as one list (saved_list): what torch.func
// transforms run (lstm_ext/_functorch.py), since functorch refuses a C++ autograd node.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_forward_kernels(
    const Tensor& input, const optional<Tensor>& h0, const optional<Tensor>& c0,
    at::TensorList params, bool has_biases, bool has_projections, int64_t num_layers,
    double dropout, bool train, bool bidirectional, const optional<Tensor>& batch_sizes,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h, double recurrent_dropout,
    bool layer_norm) {
  const ModuleConfig config{has_biases, has_projections, num_layers,        dropout,
                            train,      bidirectional,   batch_sizes,       reset,
                            zoneout_c,  zoneout_h,       recurrent_dropout, layer_norm};
  ForwardResult result = module_forward(input, h0, c0, params, config, /*keep_state=*/true);
  return {result.output, result.h_n, result.c_n, saved_list(result, config)};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> lstm_backward_kernels(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const optional<Tensor>& h0,
    const optional<Tensor>& c0, at::TensorList params, bool has_biases, bool has_projections,
    int64_t num_layers, double dropout, bool train, bool bidirectional,
    const optional<Tensor>& batch_sizes, const Tensor& output, at::TensorList saved,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h, double recurrent_dropout,
    bool layer_norm) {
  const ModuleConfig config{has_biases, has_projections, num_layers,        dropout,
                            train,      bidirectional,   batch_sizes,       reset,
                            zoneout_c,  zoneout_h,       recurrent_dropout, layer_norm};
  check_module_args(input, h0, c0, params, config);
  const Tensor h0_t = h0.value_or(Tensor()), c0_t = c0.value_or(Tensor());
  const ForwardResult forward = unpack_saved(saved, input, output, config, h0_t.defined());
  ModuleGrads grads = module_backward(grad_output.value_or(Tensor()),
                                      grad_h_n.value_or(Tensor()), grad_c_n.value_or(Tensor()),
                                      input, h0_t, c0_t, params, config, forward,
                                      /*need_grad_input=*/true);
  if (has_biases) {  // an op's outputs do not alias each other: bias_hh gets its own copy
    for (size_t i = 3; i < grads.params.size(); i += config.params_per_layer()) {
      grads.params[i] = grads.params[i].clone();
    }
  }
  return {grads.input, at::stack(grads.h0), at::stack(grads.c0), grads.params};
}

}  // namespace
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, Autograd, m) {
  m.impl("lstm", &lstm_ext::lstm_autograd);
  m.impl("lstm_layer", &lstm_ext::lstm_layer_autograd);
  m.impl("lstm_cell", &lstm_ext::lstm_cell_autograd);
  // The kernels are not differentiable themselves (the public ops and lstm_ext/_functorch.py
  // differentiate them): differentiating through one is an error, never a silent zero.
  for (const char* op : {"lstm_forward", "lstm_backward", "lstm_layer_forward",
                         "lstm_layer_backward", "ln_lstm_layer_forward",
                         "ln_lstm_layer_backward", "lstm_cell_forward", "lstm_cell_backward",
                         "fill_bernoulli_mask_"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(lstm_ext, CompositeExplicitAutograd, m) {
  m.impl("lstm", &lstm_ext::lstm_no_state);
  m.impl("lstm_layer", &lstm_ext::lstm_layer_no_state);
  m.impl("lstm_cell", &lstm_ext::lstm_cell_no_state);
  m.impl("lstm_forward", &lstm_ext::lstm_forward_kernels);
  m.impl("lstm_backward", &lstm_ext::lstm_backward_kernels);
  m.impl("fill_bernoulli_mask_", &lstm_ext::fill_bernoulli_mask);
}
