// The LSTM gate math of one hidden unit, shared by the CPU and CUDA kernels.
//
// Gate order is nn.LSTM's: i (input), f (forget), g (cell candidate), o (output).
//   i = σ(z_i)   f = σ(z_f)   g = tanh(z_g)   o = σ(z_o)
//   c_t = f ⊙ c_{t-1} + i ⊙ g
//   h_t = o ⊙ tanh(c_t)
// The backward is written in terms of the saved activated gates (σ' = σ(1-σ), tanh' = 1-tanh²),
// so nothing but tanh(c_t) is recomputed.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSTM_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LSTM_EXT_HOST_DEVICE inline
#endif

namespace lstm_ext {

LSTM_EXT_HOST_DEVICE float exp_of(float x) { return ::expf(x); }
LSTM_EXT_HOST_DEVICE double exp_of(double x) { return ::exp(x); }
LSTM_EXT_HOST_DEVICE float tanh_of(float x) { return ::tanhf(x); }
LSTM_EXT_HOST_DEVICE double tanh_of(double x) { return ::tanh(x); }

template <typename T>
LSTM_EXT_HOST_DEVICE T sigmoid_of(T x) {
  return T(1) / (T(1) + exp_of(-x));
}

// Forward of one unit. z_* are the pre-activations (x W_ih^T + h W_hh^T + b); they are overwritten
// with the activated gates, which the backward needs. Returns c_t; writes h_t.
template <typename T>
LSTM_EXT_HOST_DEVICE T cell_forward(T& z_i, T& z_f, T& z_g, T& z_o, T c_prev, T* h_out) {
  const T i = sigmoid_of(z_i);
  const T f = sigmoid_of(z_f);
  const T g = tanh_of(z_g);
  const T o = sigmoid_of(z_o);
  const T c = f * c_prev + i * g;
  *h_out = o * tanh_of(c);
  z_i = i;
  z_f = f;
  z_g = g;
  z_o = o;
  return c;
}

// Backward of one unit.
//   i, f, g, o : activated gates saved by the forward
//   c_prev, c  : c_{t-1}, c_t
//   dh         : dL/dh_t (from the output at t and from step t+1)
//   dc_next    : dL/dc_t arriving from step t+1
// Writes the pre-activation gradients d_i, d_f, d_g, d_o; returns dL/dc_{t-1}.
template <typename T>
LSTM_EXT_HOST_DEVICE T cell_backward(T i, T f, T g, T o, T c_prev, T c, T dh, T dc_next,
                                     T* d_i, T* d_f, T* d_g, T* d_o) {
  const T tanh_c = tanh_of(c);
  const T dc = dc_next + dh * o * (T(1) - tanh_c * tanh_c);
  *d_o = dh * tanh_c * o * (T(1) - o);
  *d_i = dc * g * i * (T(1) - i);
  *d_f = dc * c_prev * f * (T(1) - f);
  *d_g = dc * i * (T(1) - g * g);
  return dc * f;
}

}  // namespace lstm_ext
