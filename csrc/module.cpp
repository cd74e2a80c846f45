// lstm, the whole module, over the layer kernels (csrc/module.h says what and why).
#include "module.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>

#include "ops.h"

namespace lstm_ext {
namespace {

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
    ops::fill_bernoulli_mask_(mask, probability);
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
// every row is larger, so runs faster per multiply-add (measurements: benchmarks/results/tuning.md).
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

// The saved layout's rules (saved_list, module.h).
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

}  // namespace

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
        auto [output, h, c, gates, cells, norms] = ops::ln_lstm_layer_forward(
            layer_input, h0_layer, c0_layer, p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh,
            p.weight_hr, p.ln_weight_ih, p.ln_weight_hh, p.ln_weight_c, p.ln_bias_c,
            config.batch_sizes, /*reverse=*/direction == 1, keep_state, config.reset,
            config.zoneout_c, config.zoneout_h, mask_c, mask_h, recurrent);
        runs[direction] = {output, h, c, gates, cells};
        layer_norms[direction] = norms;
        return;
      }
      runs[direction] = ops::lstm_layer_forward(
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

// The same forward in pure PyTorch with autograd on (lstm_ext/reference.py, the lstm_reference
// op), with the first forward's dropout masks: what a second derivative differentiates.
// forward: what module_forward kept, its masks among it.
std::vector<Tensor> module_reference(const Tensor& input, const Tensor& h0, const Tensor& c0,
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
  auto [output, h_n, c_n] = ops::lstm_reference(
      input, h0, c0, params, config.has_biases, config.has_projections, config.num_layers,
      config.bidirectional, config.batch_sizes, dropout_masks(config, forward.kept),
      zoneout_masks, recurrent_masks, config.reset, config.zoneout_c, config.zoneout_h,
      config.layer_norm);
  return {output, h_n, c_n};
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
            ops::ln_lstm_layer_backward(
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
            ops::lstm_layer_backward(dy, dh_n, dc_n, layer_input, h0_layer, c0_layer,
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

}  // namespace lstm_ext
