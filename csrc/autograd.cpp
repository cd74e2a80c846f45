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
#include <torch/extension.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

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
    const optional<Tensor>&, bool, bool)>&
layer_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_layer_forward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&, bool, bool)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, bool, const Tensor&, const Tensor&, const Tensor&)>&
layer_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lstm_ext::lstm_layer_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
              const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const optional<Tensor>&, const optional<Tensor>&, bool, const Tensor&,
              const Tensor&, const Tensor&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, bool)>&
layer_reference_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lstm_ext::lstm_layer_reference", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                 const optional<Tensor>&, const optional<Tensor>&, bool)>();
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
    const Tensor&, const Tensor&, const Tensor&, const Tensor&)>&
cell_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lstm_ext::lstm_cell_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
              const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&,
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
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
                                batch_sizes, reverse, /*keep_state=*/true);
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
                                    reverse);
      differentiable_grads(ctx, inputs, {ref_output, ref_h_n, ref_c_n}, grad_outputs, grads);
      return grads;
    }

    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        layer_backward_op().call(as_optional(grad_outputs[0]), as_optional(grad_outputs[1]),
                                 as_optional(grad_outputs[2]), input, h0, c0, weight_ih,
                                 weight_hh, as_optional(weight_hr), batch_sizes, reverse, output,
                                 gates, cells);
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
                                hx, cx, cy, gates, weight_ih, weight_hh);
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
                                batch_sizes, reverse, /*keep_state=*/false);
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
                              batch_sizes, reverse, /*keep_state=*/false);
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

}  // namespace
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, Autograd, m) {
  m.impl("lstm_layer", &lstm_ext::lstm_layer_autograd);
  m.impl("lstm_cell", &lstm_ext::lstm_cell_autograd);
}

TORCH_LIBRARY_IMPL(lstm_ext, CompositeExplicitAutograd, m) {
  m.impl("lstm_layer", &lstm_ext::lstm_layer_no_state);
  m.impl("lstm_cell", &lstm_ext::lstm_cell_no_state);
}
