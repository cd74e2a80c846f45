// torch.autocast for lstm_ext's public ops: inside an autocast region they run in the autocast
// dtype exactly where torch.nn.LSTM does, with its output dtypes.
//
// Like PyTorch's own autocast kernels: float32 tensor arguments are cast to the region's dtype
// (at::autocast::cached_cast: a weight's cast is made once per region and reused by every call in
// it; float64 and already low-precision tensors are left alone), then the op runs below the
// autocast key. The casts are differentiable, so float32 master weights get float32 gradients.
// Which ops: on the CPU, autocast runs nn.LSTM in its dtype but leaves nn.LSTMCell in float32
// (aten::lstm_cell is not on the CPU list), so lstm and lstm_layer are cast and lstm_cell is not;
// on CUDA all three are (cuDNN's RNN and aten::lstm_cell are on the CUDA list).
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <tuple>

#include "ops.h"

namespace lstm_ext {
namespace {

using at::Tensor;
using c10::optional;
using at::autocast::cached_cast;

template <c10::DeviceType device>
std::tuple<Tensor, Tensor, Tensor> lstm_autocast(const Tensor& input, const optional<Tensor>& h0,
                                                 const optional<Tensor>& c0,
                                                 at::TensorList params, bool has_biases,
                                                 bool has_projections, int64_t num_layers,
                                                 double dropout, bool train, bool bidirectional,
                                                 const optional<Tensor>& batch_sizes,
                                                 const optional<Tensor>& reset,
                                                 double zoneout_c, double zoneout_h,
                                                 double recurrent_dropout, bool layer_norm) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return ops::lstm(cached_cast(dtype, input, device), cached_cast(dtype, h0, device),
                   cached_cast(dtype, c0, device), cached_cast(dtype, params, device), has_biases,
                   has_projections, num_layers, dropout, train, bidirectional, batch_sizes, reset,
                   zoneout_c, zoneout_h, recurrent_dropout, layer_norm);
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor, Tensor> lstm_layer_autocast(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& weight_ih,
    const Tensor& weight_hh, const optional<Tensor>& bias_ih, const optional<Tensor>& bias_hh,
    const optional<Tensor>& weight_hr, const optional<Tensor>& batch_sizes, bool reverse) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return ops::lstm_layer(cached_cast(dtype, input, device), cached_cast(dtype, h0, device),
                         cached_cast(dtype, c0, device), cached_cast(dtype, weight_ih, device),
                         cached_cast(dtype, weight_hh, device), cached_cast(dtype, bias_ih, device),
                         cached_cast(dtype, bias_hh, device), cached_cast(dtype, weight_hr, device),
                         batch_sizes, reverse);
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor> lstm_cell_autocast(const Tensor& input, const Tensor& hx,
                                              const Tensor& cx, const Tensor& weight_ih,
                                              const Tensor& weight_hh,
                                              const optional<Tensor>& bias_ih,
                                              const optional<Tensor>& bias_hh) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  return ops::lstm_cell(cached_cast(dtype, input, device), cached_cast(dtype, hx, device),
                        cached_cast(dtype, cx, device), cached_cast(dtype, weight_ih, device),
                        cached_cast(dtype, weight_hh, device), cached_cast(dtype, bias_ih, device),
                        cached_cast(dtype, bias_hh, device));
}

}  // namespace
}  // namespace lstm_ext

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCPU, m) {
  m.impl("lstm", &lstm_ext::lstm_autocast<c10::DeviceType::CPU>);
  m.impl("lstm_layer", &lstm_ext::lstm_layer_autocast<c10::DeviceType::CPU>);
  // lstm_cell: not cast on the CPU, as aten::lstm_cell (the fallthrough)
}

TORCH_LIBRARY_IMPL(lstm_ext, AutocastCUDA, m) {
  m.impl("lstm", &lstm_ext::lstm_autocast<c10::DeviceType::CUDA>);
  m.impl("lstm_layer", &lstm_ext::lstm_layer_autocast<c10::DeviceType::CUDA>);
  m.impl("lstm_cell", &lstm_ext::lstm_cell_autocast<c10::DeviceType::CUDA>);
}
