// lstm_ext's ops: their schemas (the one place they are declared, with what each argument means)
// and their C++ functions (csrc/ops.h: each a call through the dispatcher, its handle typed from
// the declaration). Backends only register kernels: csrc/cpu/ (CPU), csrc/cuda/ (CUDA, when built);
// csrc/autograd.cpp and csrc/autocast.cpp the public ops' other keys.
//
// Shapes (gate order i, f, g, o as nn.LSTM): input [T, B, I] (layer), packed [N, I] (layer, with
// batch_sizes [T], PackedSequence's), or [B, I] (cell); h0, hx [B, P]; c0, cx [B, H];
// weight_ih [4H, I]; weight_hh [4H, P]; bias_ih, bias_hh [4H]; weight_hr [P, H] (proj_size = P;
// without it P = H). A reverse layer runs from the last step to the first.
// The forward ops return what the backward ops need: the activated gates [., 4H] and the cell
// states c_t [., H] per step (the layer op keeps them only when keep_state is true; otherwise both
// come back with no rows). The backward ops return one bias gradient, shared by bias_ih and
// bias_hh; the layer's grad_weight_hr has no rows without weight_hr, and grad_input none without
// need_grad_input (its product, dG W_ih, is skipped: a first layer's input rarely needs one).
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(lstm_ext, m) {
  // The public ops: autograd-aware (csrc/autograd.cpp), one graph node per call.
  // lstm: the whole of torch.nn.LSTM's computation (every layer and direction, dropout between
  // layers): input [T, B, I] or packed [N, I]; h0 [L*D, B, P] and c0 [L*D, B, H], or both None
  // (zeros); params per layer and direction in nn.LSTM's order: weight_ih, weight_hh,
  // (bias_ih, bias_hh if has_biases), (weight_hr if has_projections).
  // reset: None, or bool [T, B] (batch rows in batch_sizes' order when packed): where
  // reset[t, b], row b's sequence ends before step t and a new one starts there, from h0 / c0
  // (every layer from its own; a reverse direction restarts at step t - 1: see Restarts in
  // csrc/lstm_steps.h).
  // zoneout_c, zoneout_h (Krueger et al. 2016): in training each unit of c_t / h_t keeps its
  // previous value with that probability (a fresh mask per step, layer and direction); in eval
  // it becomes p * previous + (1 - p) * new. recurrent_dropout (Gal and Ghahramani 2016): in
  // training, the h fed to W_hh is multiplied by one mask per sequence, layer and direction
  // (kept units scaled by 1 / (1 - p)); nothing in eval. See csrc/lstm_regularize.h.
  // layer_norm: haste's LayerNormLSTM (csrc/cpu/lstm_cpu_layer_norm.cpp); params then hold,
  // after each layer-direction's nn.LSTM parameters, ln_weight_ih, ln_weight_hh [4H],
  // ln_weight_c, ln_bias_c [H].
  // -> output [T, B, D*P] (or [N, D*P]), h_n [L*D, B, P], c_n [L*D, B, H].
  m.def(
      "lstm(Tensor input, Tensor? h0, Tensor? c0, Tensor[] params, bool has_biases, "
      "bool has_projections, int num_layers, float dropout, bool train, bool bidirectional, "
      "Tensor? batch_sizes, Tensor? reset=None, float zoneout_c=0., float zoneout_h=0., "
      "float recurrent_dropout=0., bool layer_norm=False) -> (Tensor output, Tensor h_n, "
      "Tensor c_n)",
      {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  m.def(
      "lstm_layer(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, Tensor? batch_sizes, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh) -> (Tensor hy, Tensor cy)",
      {at::Tag::pt2_compliant_tag});
  // The kernels they run, one per backend (csrc/cpu, csrc/cuda).
  // Zoneout and recurrent dropout of one layer-direction (csrc/lstm_regularize.h): where
  // zoneout_mask_c (bool, rows x H) / zoneout_mask_h (bool, rows x P) is given, a unit keeps its
  // previous state where the mask is true; without one, zoneout_c / zoneout_h (probabilities)
  // mix previous and new as their expectation. recurrent_mask [B, P] (the layer's dtype) is
  // multiplied into the h each step feeds to W_hh.
  m.def(
      "lstm_layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, Tensor? batch_sizes, bool reverse, "
      "bool keep_state, Tensor? reset=None, float zoneout_c=0., float zoneout_h=0., "
      "Tensor? zoneout_mask_c=None, Tensor? zoneout_mask_h=None, Tensor? recurrent_mask=None) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, "
      "Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, Tensor cells, "
      "bool need_grad_input=True, Tensor? reset=None, float zoneout_c=0., float zoneout_h=0., "
      "Tensor? zoneout_mask_c=None, Tensor? zoneout_mask_h=None, Tensor? recurrent_mask=None) "
      "-> (Tensor grad_input, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_weight_hr)",
      {at::Tag::pt2_compliant_tag});
  // The layer-normalised layer (haste's LayerNormLSTM; csrc/cpu/lstm_cpu_layer_norm.cpp): the
  // plain layer kernels' arguments and results, with the normalisation's parameters
  // ln_weight_ih, ln_weight_hh [4H] (the gains of LN(x W_ih^T) and LN(h W_hh^T)), ln_weight_c,
  // ln_bias_c [H] (of LN(c_t) inside h_t's tanh); norms [rows, 8H + 16] is what the forward keeps
  // of the normalisations (no rows without keep_state).
  m.def(
      "ln_lstm_layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, "
      "Tensor ln_weight_ih, Tensor ln_weight_hh, Tensor ln_weight_c, Tensor ln_bias_c, "
      "Tensor? batch_sizes, bool reverse, bool keep_state, Tensor? reset=None, "
      "float zoneout_c=0., float zoneout_h=0., Tensor? zoneout_mask_c=None, "
      "Tensor? zoneout_mask_h=None, Tensor? recurrent_mask=None) -> (Tensor output, Tensor h_n, "
      "Tensor c_n, Tensor gates, Tensor cells, Tensor norms)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "ln_lstm_layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? weight_hr, Tensor ln_weight_ih, Tensor ln_weight_hh, Tensor ln_weight_c, "
      "Tensor ln_bias_c, Tensor? batch_sizes, bool reverse, Tensor output, Tensor gates, "
      "Tensor cells, Tensor norms, bool need_grad_input=True, Tensor? reset=None, "
      "float zoneout_c=0., float zoneout_h=0., Tensor? zoneout_mask_c=None, "
      "Tensor? zoneout_mask_h=None, Tensor? recurrent_mask=None) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias, Tensor grad_weight_hr, Tensor grad_ln_weight_ih, "
      "Tensor grad_ln_weight_hh, Tensor grad_ln_weight_c, Tensor grad_ln_bias_c)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_cell_forward(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh) -> (Tensor hy, Tensor cy, Tensor gates)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "lstm_cell_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, Tensor cx, "
      "Tensor cy, Tensor gates, Tensor weight_ih, Tensor weight_hh, bool need_grad_input=True) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, "
      "Tensor grad_weight_hh, Tensor grad_bias)",
      {at::Tag::pt2_compliant_tag});
  // One layer-direction of lstm_ext.quantized.LSTM (csrc/cpu/lstm_cpu_int8.cpp), inference
  // only: input float32 [T, B, I] or packed [N, I]; weight_ih int8 [4H, I], weight_hh int8
  // [4H, P], weight_hr int8 [P, H] (or None), each with float32 scales per row (scale_*: [rows]:
  // W ~ scale[n] * weight[n, k]); bias float32 [4H] (b_ih + b_hh, or None); reset as lstm's;
  // zoneout_c, zoneout_h as in eval (the expectation); ln_*: the layer-normalised cell's float32
  // parameters (ln_lstm_layer_forward's; all four or none) -> as lstm_layer.
  m.def(
      "quantized_lstm_layer(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, "
      "Tensor scale_ih, Tensor weight_hh, Tensor scale_hh, Tensor? bias, Tensor? weight_hr, "
      "Tensor? scale_hr, Tensor? batch_sizes, bool reverse, Tensor? reset=None, "
      "float zoneout_c=0., float zoneout_h=0., Tensor? ln_weight_ih=None, "
      "Tensor? ln_weight_hh=None, Tensor? ln_weight_c=None, Tensor? ln_bias_c=None) "
      "-> (Tensor output, Tensor h_n, Tensor c_n)",
      {at::Tag::pt2_compliant_tag});
  // The whole module's forward and backward, separately: what torch.func transforms run
  // (lstm_ext/_functorch.py), since functorch refuses a C++ autograd node (lstm's node runs the
  // same two functions, csrc/autograd.cpp). The arguments after params are lstm's, in its order.
  // saved: what the backward needs besides input and output, as lstm_backward takes it back
  // (zoneout's and recurrent dropout's masks among it: the backward draws none).
  m.def(
      "lstm_forward(Tensor input, Tensor? h0, Tensor? c0, Tensor[] params, bool has_biases, "
      "bool has_projections, int num_layers, float dropout, bool train, bool bidirectional, "
      "Tensor? batch_sizes, Tensor? reset=None, float zoneout_c=0., float zoneout_h=0., "
      "float recurrent_dropout=0., bool layer_norm=False) -> (Tensor output, Tensor h_n, "
      "Tensor c_n, Tensor[] saved)",
      {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  // -> grad_h0 [L*D, B, P] and grad_c0 [L*D, B, H] also where h0, c0 were None; grad_params in
  // params' order.
  m.def(
      "lstm_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor? h0, Tensor? c0, Tensor[] params, bool has_biases, bool has_projections, "
      "int num_layers, float dropout, bool train, bool bidirectional, Tensor? batch_sizes, "
      "Tensor output, Tensor[] saved, Tensor? reset=None, float zoneout_c=0., "
      "float zoneout_h=0., float recurrent_dropout=0., bool layer_norm=False) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor[] grad_params)",
      {at::Tag::pt2_compliant_tag});
  // zoneout's masks, as lstm draws them: fills the bool `mask` in place, each element true with
  // probability p (csrc/lstm_regularize.h). An op of its own, so that torch.compile records it
  // and runs the same draw as eager; in place, into a fresh empty tensor, because torch.compile's
  // common-subexpression pass would merge two calls with equal arguments (it spares only aten's
  // random ops and aten.empty).
  m.def("fill_bernoulli_mask_(Tensor(a!) mask, float p) -> ()",
        {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
  // The pure-PyTorch reference (lstm_ext/reference.py, registered from Python as composite
  // kernels): what a second derivative (create_graph=True) differentiates. The masks are the
  // forward's: dropout_masks one per layer that had dropout after it; zoneout_masks two per
  // layer-direction (c, h; None where that probability is 0) in training, else none;
  // recurrent_masks one per layer-direction with recurrent dropout in training, else none.
  m.def(
      "lstm_reference(Tensor input, Tensor h0, Tensor c0, Tensor[] params, bool has_biases, "
      "bool has_projections, int num_layers, bool bidirectional, Tensor? batch_sizes, "
      "Tensor[] dropout_masks, Tensor?[] zoneout_masks, Tensor?[] recurrent_masks, "
      "Tensor? reset=None, float zoneout_c=0., float zoneout_h=0., bool layer_norm=False) -> "
      "(Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "lstm_layer_reference(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, "
      "Tensor? batch_sizes, bool reverse, Tensor? reset=None, float zoneout_c=0., "
      "float zoneout_h=0., Tensor? zoneout_mask_c=None, Tensor? zoneout_mask_h=None, "
      "Tensor? recurrent_mask=None, Tensor? ln_weight_ih=None, Tensor? ln_weight_hh=None, "
      "Tensor? ln_weight_c=None, Tensor? ln_bias_c=None) -> (Tensor output, Tensor h_n, "
      "Tensor c_n)");
  m.def(
      "lstm_cell_reference(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh) -> (Tensor hy, Tensor cy)");
}


namespace lstm_ext {
namespace ops {
namespace {

// The op's handle, typed from its declaration in ops.h (looked up once per op: `static` below).
template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> lstm(
    const Tensor& input, const optional<Tensor>& h0, const optional<Tensor>& c0,
    at::TensorList params, bool has_biases, bool has_projections, int64_t num_layers,
    double dropout, bool train, bool bidirectional, const optional<Tensor>& batch_sizes,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h, double recurrent_dropout,
    bool layer_norm) {
  static const auto op = handle<decltype(lstm)>("lstm_ext::lstm");
  return op.call(input, h0, c0, params, has_biases, has_projections, num_layers, dropout, train,
                 bidirectional, batch_sizes, reset, zoneout_c, zoneout_h, recurrent_dropout,
                 layer_norm);
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse) {
  static const auto op = handle<decltype(lstm_layer)>("lstm_ext::lstm_layer");
  return op.call(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
                 reverse);
}

std::tuple<Tensor, Tensor> lstm_cell(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                     const Tensor& weight_ih, const Tensor& weight_hh,
                                     const optional<Tensor>& bias_ih,
                                     const optional<Tensor>& bias_hh) {
  static const auto op = handle<decltype(lstm_cell)>("lstm_ext::lstm_cell");
  return op.call(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    bool keep_state, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask) {
  static const auto op = handle<decltype(lstm_layer_forward)>("lstm_ext::lstm_layer_forward");
  return op.call(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
                 reverse, keep_state, reset, zoneout_c, zoneout_h, zoneout_mask_c,
                 zoneout_mask_h, recurrent_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const optional<Tensor>& batch_sizes, bool reverse, const Tensor& output, const Tensor& gates,
    const Tensor& cells, bool need_grad_input, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
  static const auto op = handle<decltype(lstm_layer_backward)>("lstm_ext::lstm_layer_backward");
  return op.call(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
                 batch_sizes, reverse, output, gates, cells, need_grad_input, reset, zoneout_c,
                 zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_layer_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const Tensor& ln_weight_ih, const Tensor& ln_weight_hh,
    const Tensor& ln_weight_c, const Tensor& ln_bias_c, const optional<Tensor>& batch_sizes,
    bool reverse, bool keep_state, const optional<Tensor>& reset, double zoneout_c,
    double zoneout_h, const optional<Tensor>& zoneout_mask_c,
    const optional<Tensor>& zoneout_mask_h, const optional<Tensor>& recurrent_mask) {
  static const auto op =
      handle<decltype(ln_lstm_layer_forward)>("lstm_ext::ln_lstm_layer_forward");
  return op.call(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, ln_weight_ih,
                 ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, reverse, keep_state, reset,
                 zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
ln_lstm_layer_backward(
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& h0, const Tensor& c0,
    const Tensor& weight_ih, const Tensor& weight_hh, const optional<Tensor>& weight_hr,
    const Tensor& ln_weight_ih, const Tensor& ln_weight_hh, const Tensor& ln_weight_c,
    const Tensor& ln_bias_c, const optional<Tensor>& batch_sizes, bool reverse,
    const Tensor& output, const Tensor& gates, const Tensor& cells, const Tensor& norms,
    bool need_grad_input, const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask) {
  static const auto op =
      handle<decltype(ln_lstm_layer_backward)>("lstm_ext::ln_lstm_layer_backward");
  return op.call(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
                 ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, reverse, output,
                 gates, cells, norms, need_grad_input, reset, zoneout_c, zoneout_h,
                 zoneout_mask_c, zoneout_mask_h, recurrent_mask);
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_forward(const Tensor& input, const Tensor& hx,
                                                     const Tensor& cx, const Tensor& weight_ih,
                                                     const Tensor& weight_hh,
                                                     const optional<Tensor>& bias_ih,
                                                     const optional<Tensor>& bias_hh) {
  static const auto op = handle<decltype(lstm_cell_forward)>("lstm_ext::lstm_cell_forward");
  return op.call(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward(
    const optional<Tensor>& grad_hy, const optional<Tensor>& grad_cy, const Tensor& input,
    const Tensor& hx, const Tensor& cx, const Tensor& cy, const Tensor& gates,
    const Tensor& weight_ih, const Tensor& weight_hh, bool need_grad_input) {
  static const auto op = handle<decltype(lstm_cell_backward)>("lstm_ext::lstm_cell_backward");
  return op.call(grad_hy, grad_cy, input, hx, cx, cy, gates, weight_ih, weight_hh,
                 need_grad_input);
}

void fill_bernoulli_mask_(const Tensor& mask, double p) {
  static const auto op = handle<decltype(fill_bernoulli_mask_)>("lstm_ext::fill_bernoulli_mask_");
  op.call(mask, p);
}

std::tuple<Tensor, Tensor, Tensor> lstm_reference(
    const Tensor& input, const Tensor& h0, const Tensor& c0, at::TensorList params,
    bool has_biases, bool has_projections, int64_t num_layers, bool bidirectional,
    const optional<Tensor>& batch_sizes, at::TensorList dropout_masks,
    const c10::List<optional<Tensor>>& zoneout_masks,
    const c10::List<optional<Tensor>>& recurrent_masks, const optional<Tensor>& reset,
    double zoneout_c, double zoneout_h, bool layer_norm) {
  static const auto op = handle<decltype(lstm_reference)>("lstm_ext::lstm_reference");
  return op.call(input, h0, c0, params, has_biases, has_projections, num_layers, bidirectional,
                 batch_sizes, dropout_masks, zoneout_masks, recurrent_masks, reset, zoneout_c,
                 zoneout_h, layer_norm);
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer_reference(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse,
    const optional<Tensor>& reset, double zoneout_c, double zoneout_h,
    const optional<Tensor>& zoneout_mask_c, const optional<Tensor>& zoneout_mask_h,
    const optional<Tensor>& recurrent_mask, const optional<Tensor>& ln_weight_ih,
    const optional<Tensor>& ln_weight_hh, const optional<Tensor>& ln_weight_c,
    const optional<Tensor>& ln_bias_c) {
  static const auto op = handle<decltype(lstm_layer_reference)>("lstm_ext::lstm_layer_reference");
  return op.call(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
                 reverse, reset, zoneout_c, zoneout_h, zoneout_mask_c, zoneout_mask_h,
                 recurrent_mask, ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c);
}

std::tuple<Tensor, Tensor> lstm_cell_reference(const Tensor& input, const Tensor& hx,
                                               const Tensor& cx, const Tensor& weight_ih,
                                               const Tensor& weight_hh,
                                               const optional<Tensor>& bias_ih,
                                               const optional<Tensor>& bias_hh) {
  static const auto op = handle<decltype(lstm_cell_reference)>("lstm_ext::lstm_cell_reference");
  return op.call(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
}

}  // namespace ops
}  // namespace lstm_ext
