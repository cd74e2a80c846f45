// lstm, the whole module (every layer and direction, dropout between layers), over the layer
// kernels: torch.nn.LSTM's forward written in C++, and one backward that runs the layers'
// backward kernels in reverse. Why one piece rather than one lstm_layer per layer: at small sizes
// each Python step of a module's forward (zero states, a call per layer, stacking h_n) and each
// extra graph node of the backward costs about as much as a layer's arithmetic.
// csrc/autograd.cpp makes it the lstm op's graph node and the lstm_forward / lstm_backward
// kernels (torch.func's route); both keep the forward's state in one layout (saved_list).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace lstm_ext {

using at::Tensor;
using c10::optional;

// The configuration of an lstm call (everything but its tensors).
struct ModuleConfig {
  bool has_biases;
  bool has_projections;
  int64_t num_layers;
  double dropout;
  bool train;
  bool bidirectional;
  optional<Tensor> batch_sizes;
  optional<Tensor> reset;  // bool [T, B] or None: where rows start anew (csrc/ops.cpp)
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

// The gradients of the module's backward: of the input, of h0 and c0 (per layer and direction:
// at::stack them to get h0's layout, where wanted), and of each parameter (a bias pair shares
// one tensor).
struct ModuleGrads {
  Tensor input;
  std::vector<Tensor> h0, c0;
  std::vector<Tensor> params;
};

// lstm's argument checks beyond what each layer's kernel checks (nn.LSTM's words).
void check_module_args(const Tensor& input, const optional<Tensor>& h0, const optional<Tensor>& c0,
                       at::TensorList params, const ModuleConfig& config);

// The layers in order, through the kernels (below autograd). keep_state: keep what the backward
// needs (in `kept`). Dropout between layers draws its mask as at::dropout does on CPU (one
// bernoulli_ over the layer's output), so a seeded run matches torch.nn.LSTM's.
ForwardResult module_forward(const Tensor& input, const optional<Tensor>& h0,
                             const optional<Tensor>& c0, at::TensorList params,
                             const ModuleConfig& config, bool keep_state);

// The layers' backward kernels in reverse (below autograd). grad_*: d output, d h_n, d c_n, each
// possibly undefined; h0, c0 undefined when the forward started from its zero states.
// forward: what module_forward kept (or unpack_saved put back).
// need_grad_input: whether the module's input needs a gradient (else grads.input has no rows).
ModuleGrads module_backward(const Tensor& grad_output, const Tensor& grad_h_n,
                            const Tensor& grad_c_n, const Tensor& input, const Tensor& h0,
                            const Tensor& c0, at::TensorList params, const ModuleConfig& config,
                            const ForwardResult& forward, bool need_grad_input);

// The same forward in pure PyTorch with autograd on (lstm_ext/reference.py, the lstm_reference
// op), with the first forward's dropout masks: what a second derivative differentiates.
// forward: what module_forward kept, its masks among it.
std::vector<Tensor> module_reference(const Tensor& input, const Tensor& h0, const Tensor& c0,
                                     at::TensorList params, const ModuleConfig& config,
                                     const ForwardResult& forward);

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
std::vector<Tensor> saved_list(const ForwardResult& result, const ModuleConfig& config);

// The inverse of saved_list: the forward's state (zero states undefined when has_states) as
// module_forward left it, with `output` as its output.
ForwardResult unpack_saved(at::TensorList saved, const Tensor& input, const Tensor& output,
                           const ModuleConfig& config, bool has_states);

}  // namespace lstm_ext
