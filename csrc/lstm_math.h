// The LSTM gate math of one hidden unit, shared by the CPU and CUDA kernels.
//
// Gate order is nn.LSTM's: i (input), f (forget), g (cell candidate), o (output).
//   i = σ(z_i)   f = σ(z_f)   g = tanh(z_g)   o = σ(z_o)
//   c_t = f ⊙ c_{t-1} + i ⊙ g
//   h_t = o ⊙ tanh(c_t)
// The backward is written in terms of the saved activated gates (σ' = σ(1-σ), tanh' = 1-tanh²),
// so nothing but tanh(c_t) is recomputed (by the caller, which may do a whole block at once).
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

// σ(z) from e = exp(-z), so a backend may compute the exponentials of a whole block at once.
template <typename T>
LSTM_EXT_HOST_DEVICE T sigmoid_from_exp_neg(T e) {
  return T(1) / (T(1) + e);
}

// c_t = f ⊙ c_{t-1} + i ⊙ g, from the activated gates.
template <typename T>
LSTM_EXT_HOST_DEVICE T next_cell(T i, T f, T g, T c_prev) {
  return f * c_prev + i * g;
}

// Forward of one unit, all in one place (for backends that compute exp and tanh per element).
// z_* are the pre-activations (x W_ih^T + h W_hh^T + b); they are overwritten with the activated
// gates, which the backward needs. Returns c_t; writes h_t.
template <typename T>
LSTM_EXT_HOST_DEVICE T cell_forward(T& z_i, T& z_f, T& z_g, T& z_o, T c_prev, T* h_out) {
  z_i = sigmoid_of(z_i);
  z_f = sigmoid_of(z_f);
  z_g = tanh_of(z_g);
  z_o = sigmoid_of(z_o);
  const T c = next_cell(z_i, z_f, z_g, c_prev);
  *h_out = z_o * tanh_of(c);
  return c;
}

// Backward of one unit.
//   i, f, g, o : activated gates saved by the forward
//   c_prev     : c_{t-1};  tanh_c : tanh(c_t)
//   dh         : dL/dh_t (from the output at t and from step t+1)
//   dc_next    : dL/dc_t arriving from step t+1
// Writes the pre-activation gradients d_i, d_f, d_g, d_o; returns dL/dc_{t-1}.
template <typename T>
LSTM_EXT_HOST_DEVICE T cell_backward(T i, T f, T g, T o, T c_prev, T tanh_c, T dh, T dc_next,
                                     T* d_i, T* d_f, T* d_g, T* d_o) {
  const T dc = dc_next + dh * o * (T(1) - tanh_c * tanh_c);
  *d_o = dh * tanh_c * o * (T(1) - o);
  *d_i = dc * g * i * (T(1) - i);
  *d_f = dc * c_prev * f * (T(1) - f);
  *d_g = dc * i * (T(1) - g * g);
  return dc * f;
}

}  // namespace lstm_ext
