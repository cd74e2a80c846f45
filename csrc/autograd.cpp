// Autograd for lstm_ext's public ops, lstm_layer and lstm_cell: one graph node per call (a layer's
// whole time loop in one direction, or one cell step), written with torch::autograd::Function so
// that neither the forward nor the backward runs any Python.
//
// Why C++ and not a Python torch.autograd.Function: at small sizes (the sin->cos trainer's
// T=20, B=5, H=16) the arithmetic of a forward+backward takes a few microseconds, while a Python
// Function costs ~40-50 us per forward+backward (its apply, ctx, and the call back into Python
// from the engine); the node below costs a few.
//
// forward runs lstm_*_forward below autograd and saves the inputs and what the kernels keep (the
// activated gates and cell states); backward runs lstm_*_backward. A second derivative
// (backward with create_graph=True) differentiates the pure-PyTorch reference instead
// (lstm_ext/reference.py, registered from Python as lstm_*_reference): exact, slower, and used only
// when asked for.
//
// Without autograd (no_grad, or no input requires grad) the kernels keep no state.
//
// lstm, the whole module (every layer and direction, dropout between layers), is one node too:
// torch.nn.LSTM's forward written in C++ over the layer kernels, with one backward that runs the
// layers' backward kernels in reverse. Why one node rather than one lstm_layer per layer: at small
// sizes each Python step of a module's forward (zero states, a call per layer, stacking h_n) and
// each extra graph node of the backward costs about as much as a layer's arithmetic.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "lstm_regularize.h"

namespace lstm_ext {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Typed handles to the ops, looked up once.
const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, bool, bool, const optional<Tensor>&, double, double,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&)>&
layer_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_layer_forward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&, bool, bool,
                                 const optional<Tensor>&, double, double, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, bool, const Tensor&, const Tensor&, const Tensor&, bool,
    const optional<Tensor>&, double, double, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&)>&
layer_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lstm_ext::lstm_layer_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
              const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const optional<Tensor>&, const optional<Tensor>&, bool, const Tensor&,
              const Tensor&, const Tensor&, bool, const optional<Tensor>&, double, double,
              const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, bool, const optional<Tensor>&, double, double,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&)>&
layer_reference_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_layer_reference", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&, bool,
                                 const optional<Tensor>&, double, double, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&)>();
  return op;
}

// ln_lstm_layer_forward and ln_lstm_layer_backward (the layer-normalised layer).
using LnLayerForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, bool, bool,
    const optional<Tensor>&, double, double, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&);
const c10::TypedOperatorHandle<LnLayerForward>& ln_layer_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::ln_lstm_layer_forward", "")
                             .typed<LnLayerForward>();
  return op;
}

using LnLayerBackward =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
               Tensor>(const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
                       const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const optional<Tensor>&, bool, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, bool, const optional<Tensor>&, double,
                       double, const optional<Tensor>&, const optional<Tensor>&,
                       const optional<Tensor>&);
const c10::TypedOperatorHandle<LnLayerBackward>& ln_layer_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::ln_lstm_layer_backward", "")
                             .typed<LnLayerBackward>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&)>&
cell_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_cell_forward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const optional<Tensor>&, const optional<Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)>&
cell_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lstm_ext::lstm_cell_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
              const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&)>&
cell_reference_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_cell_reference", "")
                             .typed<std::tuple<Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const optional<Tensor>&, const optional<Tensor>&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, at::TensorList, bool, bool, int64_t, bool,
    const optional<Tensor>&, at::TensorList, const c10::List<optional<Tensor>>&,
    const c10::List<optional<Tensor>>&, const optional<Tensor>&, double, double, bool)>&
module_reference_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_reference", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, at::TensorList,
                                 bool, bool, int64_t, bool, const optional<Tensor>&,
                                 at::TensorList, const c10::List<optional<Tensor>>&,
                                 const c10::List<optional<Tensor>>&, const optional<Tensor>&,
                                 double, double, bool)>();
  return op;
}

const c10::TypedOperatorHandle<void(const Tensor&, double)>& fill_bernoulli_mask_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::fill_bernoulli_mask_", "")
                             .typed<void(const Tensor&, double)>();
  return op;
}

optional<Tensor> as_optional(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : c10::nullopt;
}

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
        layer_forward_op().call(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
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
          layer_reference_op().call(input, h0, c0, weight_ih, weight_hh, as_optional(bias_ih),
                                    as_optional(bias_hh), as_optional(weight_hr), batch_sizes,
                                    reverse, c10::nullopt, 0., 0., c10::nullopt, c10::nullopt,
                                    c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt,
                                    c10::nullopt);
      differentiable_grads(ctx, inputs, {ref_output, ref_h_n, ref_c_n}, grad_outputs, grads);
      return grads;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        layer_backward_op().call(as_optional(grad_outputs[0]), as_optional(grad_outputs[1]),
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
        cell_forward_op().call(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
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
      auto [ref_hy, ref_cy] = cell_reference_op().call(
          input, hx, cx, weight_ih, weight_hh, as_optional(bias_ih), as_optional(bias_hh));
      differentiable_grads(ctx, inputs, {ref_hy, ref_cy}, grad_outputs, grads);
      return grads;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias] =
        cell_backward_op().call(as_optional(grad_outputs[0]), as_optional(grad_outputs[1]), input,
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

// ---- lstm: the whole module ---------------------------------------------------------------------

// The configuration of an lstm call (everything but its tensors).
struct ModuleConfig {
  bool has_biases;
  bool has_projections;
  int64_t num_layers;
  double dropout;
  bool train;
  bool bidirectional;
  optional<Tensor> batch_sizes;
  optional<Tensor> reset;  // bool [T, B] or None: where rows start anew (csrc/lstm.cpp)
  // zoneout and recurrent dropout probabilities (csrc/lstm_regularize.h)
  double zoneout_c = 0, zoneout_h = 0, recurrent_dropout = 0;
  bool layer_norm = false;  // haste's LayerNormLSTM (csrc/cpu/lstm_cpu_layer_norm.cpp)

  int64_t directions() const { return bidirectional ? 2 : 1; }
  // Whether the forward draws masks for zoneout or recurrent dropout (training only: in eval
  // zoneout is its expectation and recurrent dropout nothing).
  bool draws_masks() const {
    return train && (zoneout_c > 0 || zoneout_h > 0 || recurrent_dropout > 0);
  }
  // Parameters per layer and direction: weight_ih, weight_hh, (bias_ih, bias_hh), (weight_hr),
  // (ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c).
  int64_t params_per_layer() const {
    return 2 + (has_biases ? 2 : 0) + (has_projections ? 1 : 0) + (layer_norm ? 4 : 0);
  }
  bool dropout_after(int64_t layer) const {
    return train && dropout > 0 && layer < num_layers - 1;
  }
};

// One layer-direction's parameters, picked out of the flat list.
struct LayerParams {
  Tensor weight_ih, weight_hh;
  optional<Tensor> bias_ih, bias_hh, weight_hr;
  Tensor ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c;  // with layer_norm only
};

constexpr int64_t kLayerNormParams = 4;

LayerParams layer_params(at::TensorList params, const ModuleConfig& config, int64_t index) {
  const int64_t first = index * config.params_per_layer();
  LayerParams p{params[first], params[first + 1], c10::nullopt, c10::nullopt, c10::nullopt};
  if (config.has_biases) {
    p.bias_ih = params[first + 2];
    p.bias_hh = params[first + 3];
  }
  const int64_t norms = config.layer_norm ? kLayerNormParams : 0;
  if (config.has_projections) {
    p.weight_hr = params[first + config.params_per_layer() - norms - 1];
  }
  if (config.layer_norm) {
    const int64_t at = first + config.params_per_layer() - norms;
    p.ln_weight_ih = params[at];
    p.ln_weight_hh = params[at + 1];
    p.ln_weight_c = params[at + 2];
    p.ln_bias_c = params[at + 3];
  }
  return p;
}

// A dtype as Python spells it (torch.float32), for messages that suggest Python code.
std::string python_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(type);
  }
}

// nn.LSTM's name of parameter `position` of the flat list: weight_hh_l1_reverse, ...
std::string param_name(const ModuleConfig& config, size_t position) {
  const int64_t per_layer = config.params_per_layer();
  const int64_t index = static_cast<int64_t>(position) / per_layer;  // layer * directions + d
  const int64_t kind = static_cast<int64_t>(position) % per_layer;
  std::vector<const char*> kinds = {"weight_ih", "weight_hh"};
  if (config.has_biases) {
    kinds.insert(kinds.end(), {"bias_ih", "bias_hh"});
  }
  if (config.has_projections) {
    kinds.push_back("weight_hr");
  }
  if (config.layer_norm) {
    kinds.insert(kinds.end(), {"ln_weight_ih", "ln_weight_hh", "ln_weight_c", "ln_bias_c"});
  }
  const char* name = kinds[kind];
  return std::string(name) + "_l" + std::to_string(index / config.directions()) +
         (index % config.directions() == 1 ? "_reverse" : "");
}

void check_module_args(const Tensor& input, const optional<Tensor>& h0, const optional<Tensor>& c0,
                       at::TensorList params, const ModuleConfig& config) {
  constexpr const char* op = "lstm_ext::lstm";
  TORCH_CHECK(config.num_layers >= 1, op, ": num_layers must be at least 1, got ",
              config.num_layers);
  TORCH_CHECK(config.dropout >= 0 && config.dropout <= 1, op,
              ": dropout must be a probability in [0, 1], got ", config.dropout);
  for (const auto& [p, name] : {std::pair<double, const char*>{config.zoneout_c, "zoneout_c"},
                                {config.zoneout_h, "zoneout_h"},
                                {config.recurrent_dropout, "recurrent_dropout"}}) {
    TORCH_CHECK_VALUE(p >= 0 && p < 1, op, ": ", name, " must be a probability in [0, 1), got ",
                      p);
  }
  const int64_t expected = config.num_layers * config.directions() * config.params_per_layer();
  TORCH_CHECK(static_cast<int64_t>(params.size()) == expected, op, ": expected ", expected,
              " parameters (", config.num_layers, " layers x ", config.directions(),
              " directions x ", config.params_per_layer(), " each), got ", params.size());
  // Every parameter shares the first's dtype, named as nn.LSTM names it (the kernels check each
  // layer's again, but by their own argument names, without the layer).
  for (size_t i = 1; i < params.size(); ++i) {
    if (params[i].scalar_type() != params[0].scalar_type()) {
      const std::string first = python_dtype(params[0].scalar_type());
      TORCH_CHECK_VALUE(false, "lstm_ext.LSTM: all parameters must share one dtype, but ",
                        param_name(config, 0), " is ", first, " and ", param_name(config, i),
                        " is ", python_dtype(params[i].scalar_type()),
                        ". Convert the model: model.to(", first, ")");
    }
  }
  const bool has_h0 = h0.has_value() && h0->defined(), has_c0 = c0.has_value() && c0->defined();
  TORCH_CHECK(has_h0 == has_c0, op, ": give both h0 and c0 or neither");
  if (has_h0) {
    const int64_t states = config.num_layers * config.directions();
    TORCH_CHECK(h0->dim() == 3 && h0->size(0) == states, op, ": h0 must have shape [",
                states, ", B, P] (num_layers * directions first), got ", h0->sizes());
    TORCH_CHECK(c0->dim() == 3 && c0->size(0) == states, op, ": c0 must have shape [",
                states, ", B, H] (num_layers * directions first), got ", c0->sizes());
  }
  TORCH_CHECK(input.dim() == (config.batch_sizes ? 2 : 3), op, ": input must be ",
              config.batch_sizes ? "2-D [N, I] (packed)" : "3-D [T, B, I]", ", got ",
              input.dim(), "-D ", input.sizes());
  // What zero_states reads; each layer's kernel checks the rest of its arguments.
  TORCH_CHECK(params[1].dim() == 2, op, ": the first layer's weight_hh must be 2-D [4*H, P], got ",
              params[1].sizes());
  TORCH_CHECK(!config.batch_sizes || (config.batch_sizes->dim() == 1 &&
                                      config.batch_sizes->numel() > 0),
              op, ": batch_sizes must be 1-D with at least one step, got ",
              config.batch_sizes ? config.batch_sizes->sizes() : at::IntArrayRef());
}

// The module's outputs and, with keep_state, what the backward needs of each layer: its input,
// the mask of the dropout after it, and per direction the kernel's output and kept state.
struct ForwardResult {
  Tensor output, h_n, c_n;
  Tensor zero_h, zero_c;  // the states every layer started from when h0, c0 were not given
  std::vector<Tensor> kept;  // per layer: layer input, dropout mask (or undefined), then per
                             // direction: output, gates, cells
  // When config.draws_masks(), per layer-direction: zoneout's masks of c and h, the recurrent
  // dropout mask (each undefined where its probability is 0); else empty.
  std::vector<Tensor> masks;
  // With layer_norm and keep_state, per layer-direction: what the kernel kept of the
  // normalisations (ln_lstm_layer_forward's norms); else empty.
  std::vector<Tensor> norms;
};

constexpr int64_t kMasksPerDirection = 3;

// The masks of one layer-direction whose input is layer_input ([T, B, .] or packed [N, .]),
// drawn from the default generator in a fixed order (zoneout c, zoneout h: fill_bernoulli_mask;
// recurrent: bernoulli_), so a seeded run draws the same ones in eager and under torch.compile
// (the op is opaque to it).
std::array<Tensor, kMasksPerDirection> draw_masks(const Tensor& layer_input, int64_t batch,
                                                  const LayerParams& p,
                                                  const ModuleConfig& config) {
  const int64_t hidden = p.weight_hh.size(0) / 4, real_hidden = p.weight_hh.size(1);
  std::vector<int64_t> rows(layer_input.sizes().begin(), layer_input.sizes().end() - 1);
  auto zoneout_mask = [&](double probability, int64_t width) {
    if (probability == 0) {
      return Tensor();
    }
    std::vector<int64_t> shape = rows;
    shape.push_back(width);
    Tensor mask = at::empty(shape, layer_input.options().dtype(at::kBool));
    fill_bernoulli_mask_op().call(mask, probability);
    return mask;
  };
  std::array<Tensor, kMasksPerDirection> masks = {zoneout_mask(config.zoneout_c, hidden),
                                                  zoneout_mask(config.zoneout_h, real_hidden),
                                                  Tensor()};
  if (config.recurrent_dropout > 0) {
    masks[2] = at::empty({batch, real_hidden}, layer_input.options())
                   .bernoulli_(1 - config.recurrent_dropout)
                   .div_(1 - config.recurrent_dropout);
  }
  return masks;
}

constexpr int64_t kKeptPerLayer = 2;
constexpr int64_t kKeptPerDirection = 3;

int64_t kept_index(const ModuleConfig& config, int64_t layer) {
  return layer * (kKeptPerLayer + kKeptPerDirection * config.directions());
}

// The batch size B: input [T, B, I], or the first step's rows of a packed input.
int64_t batch_of(const Tensor& input, const ModuleConfig& config) {
  return config.batch_sizes ? config.batch_sizes->select(0, 0).item<int64_t>() : input.size(1);
}

// Zero states [B, P] and [B, H] for every layer and direction when h0 and c0 are not given.
std::pair<Tensor, Tensor> zero_states(const Tensor& input, const ModuleConfig& config,
                                      const LayerParams& first) {
  const int64_t batch = batch_of(input, config);
  const int64_t hidden = first.weight_hh.size(0) / 4, real_hidden = first.weight_hh.size(1);
  return {at::zeros({batch, real_hidden}, input.options()),
          at::zeros({batch, hidden}, input.options())};
}

// Below this many multiply-adds in a step's recurrent product (all rows, one direction), the two
// directions of a bidirectional CPU layer run at the same time, one thread each, rather than one
// after the other with each direction's batch split over the threads: one direction's product on
// every row is larger, so runs faster per multiply-add. Measured (ms, 2 threads, forward /
// forward+backward): B = 1, H = 128: 0.41 -> 0.29 / 1.19 -> 0.86; B = 4, H = 64: 0.45 -> 0.34 /
// 1.39 -> 0.99; B = 16, H = 128, 2 layers: 5.0 -> 3.9 / 13.6 -> 12.6; at B = 64, H = 256
// (2^24) forward+backward was 7% slower, so larger steps keep the split.
constexpr int64_t kMaxConcurrentDirectionsStepMacs = int64_t(1) << 20;

bool plain_cpu_tensor(const Tensor& t) {
  return !t.defined() || (t.is_cpu() && !t.key_set().has_any(c10::python_ks));
}

// Whether the directions of this layer run on two threads. Only for plain CPU tensors and no
// Python dispatch mode (fake tensors under torch.compile, tensor subclasses): those call back
// into Python, which a worker thread must not do while the calling thread holds the GIL.
bool directions_concurrently(const Tensor& input, const optional<Tensor>& h0,
                             at::TensorList params, const ModuleConfig& config) {
  if (config.directions() != 2 || at::get_num_threads() < 2 || at::in_parallel_region() ||
      c10::impl::TorchDispatchModeTLS::any_modes_set() || !plain_cpu_tensor(input) ||
      (h0 && !plain_cpu_tensor(*h0))) {
    return false;
  }
  for (const Tensor& p : params) {
    if (!plain_cpu_tensor(p)) {
      return false;
    }
  }
  const Tensor& weight_hh = params[1];  // [4H, P], checked 2-D
  return batch_of(input, config) * weight_hh.size(0) * weight_hh.size(1) <=
         kMaxConcurrentDirectionsStepMacs;
}

// Runs body(direction) for each direction of a layer: on two threads when `concurrently`, with
// the caller's thread-local state (below autograd, grad mode, profiler) carried to the worker.
template <typename F>
void for_each_direction(int64_t directions, bool concurrently, const F& body) {
  if (concurrently) {
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      for (int64_t direction = begin; direction < end; ++direction) {
        body(direction);
      }
    });
    return;
  }
  for (int64_t direction = 0; direction < directions; ++direction) {
    body(direction);
  }
}

// The layers in order, through the kernels (below autograd). keep_state: keep what the backward
// needs (in `kept`). Dropout between layers draws its mask as at::dropout does on CPU (one
// bernoulli_ over the layer's output), so a seeded run matches torch.nn.LSTM's.
ForwardResult module_forward(const Tensor& input, const optional<Tensor>& h0,
                             const optional<Tensor>& c0, at::TensorList params,
                             const ModuleConfig& config, bool keep_state) {
  check_module_args(input, h0, c0, params, config);
  const int64_t directions = config.directions();
  const bool has_states = h0.has_value() && h0->defined();
  ForwardResult result;
  if (!has_states) {
    std::tie(result.zero_h, result.zero_c) =
        zero_states(input, config, layer_params(params, config, 0));
  }
  const Tensor &zero_h = result.zero_h, &zero_c = result.zero_c;
  const bool concurrently = directions_concurrently(input, h0, params, config);
  std::vector<Tensor> h_n, c_n;
  Tensor layer_input = input;
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    if (keep_state) {
      result.kept.push_back(layer_input);
      result.kept.emplace_back();  // the mask, set below
    }
    if (config.draws_masks()) {  // on this thread, before the directions run
      for (int64_t direction = 0; direction < directions; ++direction) {
        const auto masks = draw_masks(layer_input, batch_of(input, config),
                                      layer_params(params, config, layer * directions + direction),
                                      config);
        result.masks.insert(result.masks.end(), masks.begin(), masks.end());
      }
    }
    // per direction: output, h_n, c_n, gates, cells
    std::vector<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>> runs(directions);
    std::vector<Tensor> layer_norms(directions);  // with layer_norm: each direction's norms
    for_each_direction(directions, concurrently, [&](int64_t direction) {
      const int64_t index = layer * directions + direction;
      const LayerParams p = layer_params(params, config, index);
      const Tensor* masks = result.masks.empty() ? nullptr
                                                 : &result.masks[index * kMasksPerDirection];
      const Tensor h0_layer = has_states ? h0->select(0, index) : zero_h;
      const Tensor c0_layer = has_states ? c0->select(0, index) : zero_c;
      const optional<Tensor> mask_c = masks ? as_optional(masks[0]) : c10::nullopt;
      const optional<Tensor> mask_h = masks ? as_optional(masks[1]) : c10::nullopt;
      const optional<Tensor> recurrent = masks ? as_optional(masks[2]) : c10::nullopt;
      if (config.layer_norm) {
        auto [output, h, c, gates, cells, norms] = ln_layer_forward_op().call(
            layer_input, h0_layer, c0_layer, p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh,
            p.weight_hr, p.ln_weight_ih, p.ln_weight_hh, p.ln_weight_c, p.ln_bias_c,
            config.batch_sizes, /*reverse=*/direction == 1, keep_state, config.reset,
            config.zoneout_c, config.zoneout_h, mask_c, mask_h, recurrent);
        runs[direction] = {output, h, c, gates, cells};
        layer_norms[direction] = norms;
        return;
      }
      runs[direction] = layer_forward_op().call(
          layer_input, h0_layer, c0_layer, p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh,
          p.weight_hr, config.batch_sizes, /*reverse=*/direction == 1, keep_state, config.reset,
          config.zoneout_c, config.zoneout_h, mask_c, mask_h, recurrent);
    });
    if (keep_state && config.layer_norm) {
      result.norms.insert(result.norms.end(), layer_norms.begin(), layer_norms.end());
    }
    std::vector<Tensor> outputs;
    for (const auto& [output, h, c, gates, cells] : runs) {
      if (keep_state) {
        result.kept.insert(result.kept.end(), {output, gates, cells});
      }
      outputs.push_back(output);
      h_n.push_back(h);
      c_n.push_back(c);
    }
    layer_input = directions == 1 ? outputs[0] : at::cat(outputs, -1);
    if (config.dropout_after(layer)) {
      Tensor mask = at::empty_like(layer_input).bernoulli_(1 - config.dropout);
      if (config.dropout == 1) {
        mask.zero_();
      } else {
        mask.div_(1 - config.dropout);
      }
      layer_input = layer_input * mask;
      if (keep_state) {
        result.kept[kept_index(config, layer) + 1] = mask;
      }
    }
  }
  result.output = layer_input;
  // One layer-direction (the common case): a view, no copy.
  result.h_n = h_n.size() == 1 ? h_n[0].unsqueeze(0) : at::stack(h_n);
  result.c_n = c_n.size() == 1 ? c_n[0].unsqueeze(0) : at::stack(c_n);
  return result;
}

// The dropout masks the forward drew, one per layer that had dropout after it (config decides
// which), in layer order.
std::vector<Tensor> dropout_masks(const ModuleConfig& config, const std::vector<Tensor>& kept) {
  std::vector<Tensor> masks;
  for (int64_t layer = 0; layer + 1 < config.num_layers; ++layer) {
    if (config.dropout_after(layer)) {
      masks.push_back(kept[kept_index(config, layer) + 1]);
    }
  }
  return masks;
}

// The same forward in pure PyTorch with autograd on (lstm_ext/reference.py, the lstm_reference
// op), with the first forward's dropout masks: what a second derivative differentiates.
// forward: what module_forward kept, its masks among it.
variable_list module_reference(const Tensor& input, const Tensor& h0, const Tensor& c0,
                               at::TensorList params, const ModuleConfig& config,
                               const ForwardResult& forward) {
  const std::vector<Tensor>& masks = forward.masks;
  c10::List<optional<Tensor>> zoneout_masks, recurrent_masks;
  for (size_t k = 0; k < masks.size(); k += kMasksPerDirection) {
    if (config.zoneout_c > 0 || config.zoneout_h > 0) {  // undefined where that p is 0: None
      zoneout_masks.push_back(as_optional(masks[k]));
      zoneout_masks.push_back(as_optional(masks[k + 1]));
    }
    if (config.recurrent_dropout > 0) {
      recurrent_masks.push_back(as_optional(masks[k + 2]));
    }
  }
  auto [output, h_n, c_n] = module_reference_op().call(
      input, h0, c0, params, config.has_biases, config.has_projections, config.num_layers,
      config.bidirectional, config.batch_sizes, dropout_masks(config, forward.kept),
      zoneout_masks, recurrent_masks, config.reset, config.zoneout_c, config.zoneout_h, config.layer_norm);
  return {output, h_n, c_n};
}

// What the forward saves for the backward, as one list: the lstm_forward op's `saved`, and what
// the C++ node saves besides the module's inputs and output (one layout for both). In order:
// - the zero states when h0, c0 were not given;
// - `kept` without what an op cannot return as a further output (another output, or an input):
//   the first layer's input (the module's input), a layer's input that is the layer before's
//   output (one direction, no dropout between), the last layer's output with one direction (the
//   module's output), and the masks of layers with no dropout after them (undefined);
// - where the forward drew masks (config.draws_masks()), per layer-direction those of zoneout's
//   c, zoneout's h and recurrent dropout whose probability is not 0;
// - with layer_norm, per layer-direction what the kernel kept of the normalisations.
// Which entries are there follows from config and whether h0 was given; unpack_saved puts the
// rest back.
bool input_is_previous_output(const ModuleConfig& config, int64_t layer) {
  return layer > 0 && config.directions() == 1 && !config.dropout_after(layer - 1);
}

bool output_is_module_output(const ModuleConfig& config, int64_t layer) {
  return layer == config.num_layers - 1 && config.directions() == 1;
}

// Whether mask `kind` (0: zoneout c, 1: zoneout h, 2: recurrent) of a layer-direction was drawn.
bool mask_drawn(const ModuleConfig& config, int64_t kind) {
  const double probability[kMasksPerDirection] = {config.zoneout_c, config.zoneout_h,
                                                  config.recurrent_dropout};
  return config.draws_masks() && probability[kind] > 0;
}

std::vector<Tensor> saved_list(const ForwardResult& result, const ModuleConfig& config) {
  std::vector<Tensor> saved;
  if (result.zero_h.defined()) {
    saved.insert(saved.end(), {result.zero_h, result.zero_c});
  }
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    const Tensor* kept = &result.kept[kept_index(config, layer)];
    if (layer > 0 && !input_is_previous_output(config, layer)) {
      saved.push_back(kept[0]);
    }
    if (config.dropout_after(layer)) {
      saved.push_back(kept[1]);
    }
    for (int64_t i = 0; i < kKeptPerDirection * config.directions(); ++i) {
      if (!(i == 0 && output_is_module_output(config, layer))) {
        saved.push_back(kept[kKeptPerLayer + i]);
      }
    }
  }
  for (size_t k = 0; k < result.masks.size(); ++k) {
    if (mask_drawn(config, k % kMasksPerDirection)) {
      saved.push_back(result.masks[k]);
    }
  }
  saved.insert(saved.end(), result.norms.begin(), result.norms.end());
  return saved;
}

// The inverse of saved_list: the forward's state (zero states undefined when has_states) as
// module_forward left it, with `output` as its output.
ForwardResult unpack_saved(at::TensorList saved, const Tensor& input, const Tensor& output,
                           const ModuleConfig& config, bool has_states) {
  const int64_t directions = config.directions();
  const int64_t layer_directions = config.num_layers * directions;
  size_t expected = has_states ? 0 : 2;
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    expected += (layer > 0 && !input_is_previous_output(config, layer) ? 1 : 0) +
                (config.dropout_after(layer) ? 1 : 0) + kKeptPerDirection * directions -
                (output_is_module_output(config, layer) ? 1 : 0);
  }
  for (int64_t kind = 0; kind < kMasksPerDirection; ++kind) {
    expected += mask_drawn(config, kind) ? layer_directions : 0;
  }
  expected += config.layer_norm ? layer_directions : 0;
  TORCH_CHECK(saved.size() == expected, "lstm_ext::lstm_backward: saved must hold ", expected,
              " tensors (what lstm_forward returned for this configuration), got ", saved.size());
  ForwardResult result;
  result.output = output;
  size_t next = 0;
  if (!has_states) {
    result.zero_h = saved[next++];
    result.zero_c = saved[next++];
  }
  std::vector<Tensor>& kept = result.kept;
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    if (layer == 0) {
      kept.push_back(input);
    } else if (input_is_previous_output(config, layer)) {
      kept.push_back(kept[kept_index(config, layer - 1) + kKeptPerLayer]);
    } else {
      kept.push_back(saved[next++]);
    }
    kept.push_back(config.dropout_after(layer) ? saved[next++] : Tensor());
    for (int64_t i = 0; i < kKeptPerDirection * directions; ++i) {
      kept.push_back(i == 0 && output_is_module_output(config, layer) ? output : saved[next++]);
    }
  }
  if (config.draws_masks()) {
    for (int64_t k = 0; k < layer_directions * kMasksPerDirection; ++k) {
      result.masks.push_back(mask_drawn(config, k % kMasksPerDirection) ? saved[next++]
                                                                         : Tensor());
    }
  }
  if (config.layer_norm) {
    result.norms.assign(saved.begin() + next, saved.end());
  }
  return result;
}

// The gradients of the module's backward: of the input, of h0 and c0 (per layer and direction:
// at::stack them to get h0's layout, where wanted), and of each parameter (a bias pair shares
// one tensor).
struct ModuleGrads {
  Tensor input;
  std::vector<Tensor> h0, c0;
  std::vector<Tensor> params;
};

// The layers' backward kernels in reverse (below autograd). grad_*: d output, d h_n, d c_n, each
// possibly undefined; h0, c0 undefined when the forward started from its zero states.
// forward: what module_forward kept (or unpack_saved put back).
// need_grad_input: whether the module's input needs a gradient (else grads.input has no rows).
ModuleGrads module_backward(const Tensor& grad_output, const Tensor& grad_h_n,
                            const Tensor& grad_c_n, const Tensor& input, const Tensor& h0,
                            const Tensor& c0, at::TensorList params, const ModuleConfig& config,
                            const ForwardResult& forward, bool need_grad_input) {
  const Tensor &zero_h = forward.zero_h, &zero_c = forward.zero_c;
  const std::vector<Tensor>&kept = forward.kept, &masks = forward.masks, &norms = forward.norms;
  const int64_t directions = config.directions();
  const int64_t per_layer = config.params_per_layer();
  ModuleGrads grads;
  grads.params.resize(params.size());
  grads.h0.resize(config.num_layers * directions);
  grads.c0.resize(config.num_layers * directions);
  const bool concurrently =
      directions_concurrently(input, h0.defined() ? optional<Tensor>(h0) : c10::nullopt, params,
                              config) &&
      plain_cpu_tensor(grad_output) && plain_cpu_tensor(grad_h_n) && plain_cpu_tensor(grad_c_n);
  Tensor grad_layer_output = grad_output;  // d(output of the layer being processed)
  for (int64_t layer = config.num_layers - 1; layer >= 0; --layer) {
    const int64_t at_layer = kept_index(config, layer);
    const Tensor& layer_input = kept[at_layer];
    std::vector<Tensor> grad_inputs(directions);
    for_each_direction(directions, concurrently, [&](int64_t direction) {
      const int64_t index = layer * directions + direction;
      const LayerParams p = layer_params(params, config, index);
      const Tensor* state = &kept[at_layer + kKeptPerLayer + kKeptPerDirection * direction];
      const Tensor &output = state[0], &gates = state[1], &cells = state[2];
      const int64_t real_hidden = p.weight_hh.size(1);
      optional<Tensor> dy;
      if (grad_layer_output.defined()) {
        dy = directions == 1 ? grad_layer_output
                             : grad_layer_output.narrow(-1, direction * real_hidden, real_hidden);
      }
      const optional<Tensor> dh_n =
          grad_h_n.defined() ? optional<Tensor>(grad_h_n.select(0, index)) : c10::nullopt;
      const optional<Tensor> dc_n =
          grad_c_n.defined() ? optional<Tensor>(grad_c_n.select(0, index)) : c10::nullopt;
      const Tensor* layer_masks = masks.empty() ? nullptr : &masks[index * kMasksPerDirection];
      const Tensor h0_layer = h0.defined() ? h0.select(0, index) : zero_h;
      const Tensor c0_layer = c0.defined() ? c0.select(0, index) : zero_c;
      const bool need_grad_layer_input = layer > 0 || need_grad_input;
      const optional<Tensor> mask_c =
          layer_masks ? as_optional(layer_masks[0]) : c10::nullopt;
      const optional<Tensor> mask_h =
          layer_masks ? as_optional(layer_masks[1]) : c10::nullopt;
      const optional<Tensor> recurrent =
          layer_masks ? as_optional(layer_masks[2]) : c10::nullopt;
      const size_t first = index * per_layer;
      const int64_t norms_at = config.layer_norm ? kLayerNormParams : 0;
      Tensor grad_in, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr;
      if (config.layer_norm) {
        Tensor grad_ln_ih, grad_ln_hh, grad_ln_c, grad_ln_bias_c;
        std::tie(grad_in, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_ln_ih,
                 grad_ln_hh, grad_ln_c, grad_ln_bias_c) =
            ln_layer_backward_op().call(
                dy, dh_n, dc_n, layer_input, h0_layer, c0_layer, p.weight_ih, p.weight_hh,
                p.weight_hr, p.ln_weight_ih, p.ln_weight_hh, p.ln_weight_c, p.ln_bias_c,
                config.batch_sizes, /*reverse=*/direction == 1, output, gates, cells,
                norms[index], need_grad_layer_input, config.reset, config.zoneout_c,
                config.zoneout_h, mask_c, mask_h, recurrent);
        const size_t at = first + per_layer - kLayerNormParams;
        grads.params[at] = grad_ln_ih;
        grads.params[at + 1] = grad_ln_hh;
        grads.params[at + 2] = grad_ln_c;
        grads.params[at + 3] = grad_ln_bias_c;
      } else {
        std::tie(grad_in, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr) =
            layer_backward_op().call(dy, dh_n, dc_n, layer_input, h0_layer, c0_layer,
                                     p.weight_ih, p.weight_hh, p.weight_hr, config.batch_sizes,
                                     /*reverse=*/direction == 1, output, gates, cells,
                                     need_grad_layer_input, config.reset, config.zoneout_c,
                                     config.zoneout_h, mask_c, mask_h, recurrent);
      }
      grad_inputs[direction] = grad_in;
      grads.h0[index] = grad_h;
      grads.c0[index] = grad_c;
      grads.params[first] = grad_w_ih;
      grads.params[first + 1] = grad_w_hh;
      if (config.has_biases) {
        grads.params[first + 2] = grads.params[first + 3] = grad_bias;
      }
      if (config.has_projections) {
        grads.params[first + per_layer - norms_at - 1] = grad_w_hr;
      }
    });
    const bool computed_input = layer > 0 || need_grad_input;  // else no rows
    Tensor grad_layer_input = directions == 1 || !computed_input
                                  ? grad_inputs[0]
                                  : grad_inputs[0].add_(grad_inputs[1]);
    if (layer > 0) {
      const Tensor& mask = kept[kept_index(config, layer - 1) + 1];
      grad_layer_output = mask.defined() ? grad_layer_input.mul_(mask) : grad_layer_input;
    } else {
      grads.input = grad_layer_input;
    }
  }
  return grads;
}

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

// ---- kernels of lstm_layer and lstm_cell ---------------------------------------------------------

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
        layer_forward_op().call(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
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
      layer_forward_op().call(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
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
        cell_forward_op().call(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
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
      cell_forward_op().call(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  return {hy, cy};
}

// ---- kernels of lstm, lstm_forward and lstm_backward --------------------------------------------
//
// The three ops take the same configuration arguments in the same order (csrc/lstm.cpp).

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
  if (!track) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return lstm_no_state(input, h0, c0, params, has_biases, has_projections, num_layers, dropout,
                         train, bidirectional, batch_sizes, reset, zoneout_c, zoneout_h,
                         recurrent_dropout, layer_norm);
  }
  const ModuleConfig config{has_biases, has_projections, num_layers,        dropout,
                            train,      bidirectional,   batch_sizes,       reset,
                            zoneout_c,  zoneout_h,       recurrent_dropout, layer_norm};
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
