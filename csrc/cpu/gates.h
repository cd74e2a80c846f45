// The gate passes of one step (forward and backward), over a block of rows: the pointwise part of
// the LSTM, shared by every CPU layer kernel. float32 gates (the fused, inline-exp versions) serve
// the float32, bfloat16 and float16 kernels alike: low-precision layers compute their gates in
// float32.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../lstm_math.h"
#include "../lstm_regularize.h"
#include "../lstm_steps.h"
#include "vec_math.h"
#include "vml.h"

namespace lstm_ext {
namespace cpu {

// The gate pass of one forward step over B rows and the hidden units [j0, j1), generic version
// (float64, and float32 where the fused pass below is not used): transcendentals through
// whole-block vector calls (MKL VML), the rest plain arithmetic.
//   z [B, 4H] in: x W_ih^T + h_{t-1} W_hh^T (no bias yet); out: activated gates i, f, g, o
//   bias [4H] (b_ih + b_hh, zeros without bias); c [B, H] in: c_{t-1}, out: c_t
//   r [B, H] out: o ⊙ tanh(c_t) (h_t, before any projection); exp_neg [B, 4H] scratch
// (Only units [j0, j1) of each are read or written: threads may share a step by units.)
template <typename T>
void gates_forward(int64_t B, int64_t H, int64_t j0, int64_t j1, T* z, const T* bias, T* c, T* r,
                   T* exp_neg) {
  const int64_t G = 4 * H, units = j1 - j0;
  const bool whole = j0 == 0 && j1 == H;  // every unit: a few calls over whole blocks
  for (int64_t b = 0; b < B; ++b) {
    T* __restrict__ zb = z + b * G;
    T* __restrict__ eb = exp_neg + b * G;
    for (int64_t gate = 0; gate < 4; ++gate) {
      for (int64_t k = gate * H + j0; k < gate * H + j1; ++k) {
        zb[k] += bias[k];
        eb[k] = -zb[k];
      }
    }
  }
  // e^{-z}: σ(z) = 1 / (1 + e^{-z}) for i, f, o; g = tanh(z_g), in place
  if (whole) {
    vector_exp(B * G, exp_neg, exp_neg);
  }
  for (int64_t b = 0; b < B; ++b) {
    if (!whole) {
      for (int64_t gate : {0, 1, 3}) {
        T* e = exp_neg + b * G + gate * H + j0;
        vector_exp(units, e, e);
      }
    }
    vector_tanh(units, z + b * G + 2 * H + j0, z + b * G + 2 * H + j0);
  }
  for (int64_t b = 0; b < B; ++b) {
    T* __restrict__ a = z + b * G;
    const T* __restrict__ e = exp_neg + b * G;
    T* __restrict__ cb = c + b * H;
    for (int64_t j = j0; j < j1; ++j) {
      const T i = sigmoid_from_exp_neg(e[j]);
      const T f = sigmoid_from_exp_neg(e[H + j]);
      const T o = sigmoid_from_exp_neg(e[3 * H + j]);
      a[j] = i;
      a[H + j] = f;
      a[3 * H + j] = o;
      cb[j] = next_cell(i, f, a[2 * H + j], cb[j]);
    }
  }
  if (whole) {
    vector_tanh(B * H, c, r);  // tanh(c_t), then r = o ⊙ tanh(c_t)
  } else {
    for (int64_t b = 0; b < B; ++b) {
      vector_tanh(units, c + b * H + j0, r + b * H + j0);
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict__ o = z + b * G + 3 * H;
    T* __restrict__ rb = r + b * H;
    for (int64_t j = j0; j < j1; ++j) {
      rb[j] *= o[j];
    }
  }
}

// float32: the same pass fused into one loop, with inline vectorisable exp and tanh.
// Bytes: the variant's vector width (LSTM_EXT_ISA_VARIANTS), unused: the loop is vectorised by
// the compiler for the variant's instruction set.
template <int Bytes>
__attribute__((always_inline)) inline void gates_forward_fused_body(int64_t B, int64_t H,
                                                                    int64_t j0, int64_t j1,
                                                                    float* z, const float* bias,
                                                                    float* c, float* r) {
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    float* __restrict__ a = z + b * G;
    float* __restrict__ cb = c + b * H;
    float* __restrict__ rb = r + b * H;
    const float* __restrict__ bi = bias;
    // a[j], a[H + j], ... never overlap for j < H, which GCC cannot prove: without this it does
    // not vectorise.
#pragma GCC ivdep
    for (int64_t j = j0; j < j1; ++j) {
      const float i = sigmoid_f32(a[j] + bi[j]);
      const float f = sigmoid_f32(a[H + j] + bi[H + j]);
      const float g = tanh_f32(a[2 * H + j] + bi[2 * H + j]);
      const float o = sigmoid_f32(a[3 * H + j] + bi[3 * H + j]);
      const float c_t = next_cell(i, f, g, cb[j]);
      a[j] = i;
      a[H + j] = f;
      a[2 * H + j] = g;
      a[3 * H + j] = o;
      cb[j] = c_t;
      rb[j] = o * tanh_f32(c_t);
    }
  }
}

LSTM_EXT_ISA_VARIANTS(gates_forward_fused,
                      (int64_t B, int64_t H, int64_t j0, int64_t j1, float* z, const float* bias,
                       float* c, float* r),
                      (B, H, j0, j1, z, bias, c, r), gates_forward_fused_body)

// Overload resolution picks this for float32 (an exact match beats the template).
inline void gates_forward(int64_t B, int64_t H, int64_t j0, int64_t j1, float* z,
                          const float* bias, float* c, float* r, float* /*exp_neg: not needed*/) {
  gates_forward_fused(B, H, j0, j1, z, bias, c, r);
}

// The gate pass of one backward step over B rows, generic version (float64): tanh(c_t) through a
// whole-block vector call, then the gradient arithmetic.
//   gates [B, 4H] activated gates; cells [B, H] c_t; c_prev: rows r < n_prev from c_prev_rows,
//   the others from c0_rows (the row started this step from c0), as do the rows whose restarts
//   flag is set (restarts: [B] or null; see Restarts); dr [B, H] dL/d(o ⊙ tanh c_t);
//   dc [B, H] in: dL/dc_t from the next step, out: dL/dc_{t-1}; dgates [B, 4H] out;
//   db [4H] in/out: dgates' column sums are added to it (the bias gradient, summed while the
//   values are in registers: a later pass over all of dG cost 4% of forward+backward at
//   (100, 32, 64, 128), 3% at (200, 8, 32, 64); this costs about 1%);
//   r [B, H] out: o ⊙ tanh(c_t) (for dW_hr), or null; tanh_c [B, H] scratch
template <typename T>
void gates_backward(int64_t B, int64_t H, const T* gates, const T* cells, const T* c_prev_rows,
                    const T* c0_rows, int64_t n_prev, const uint8_t* restarts, const T* dr, T* dc,
                    T* dgates, T* db, T* r, T* tanh_c) {
  const int64_t G = 4 * H;
  vector_tanh(B * H, cells, tanh_c);
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict__ a = gates + b * G;
    T* __restrict__ d = dgates + b * G;
    const T* __restrict__ tc = tanh_c + b * H;
    const T* __restrict__ cp = state_read(b, n_prev, restarts, c_prev_rows, c0_rows, H);
    const T* __restrict__ drb = dr + b * H;
    T* __restrict__ dcb = dc + b * H;
    T* __restrict__ dbb = db;
    for (int64_t j = 0; j < H; ++j) {
      dcb[j] = cell_backward(a[j], a[H + j], a[2 * H + j], a[3 * H + j], cp[j], tc[j], drb[j],
                             dcb[j], &d[j], &d[H + j], &d[2 * H + j], &d[3 * H + j]);
    }
    for (int64_t j = 0; j < G; ++j) {
      dbb[j] += d[j];
    }
    if (r) {
      for (int64_t j = 0; j < H; ++j) {
        r[b * H + j] = a[3 * H + j] * tc[j];
      }
    }
  }
}

// float32: the same pass fused into one loop, tanh(c_t) inline.
template <int Bytes>
__attribute__((always_inline)) inline void gates_backward_fused_body(
    int64_t B, int64_t H, const float* gates, const float* cells, const float* c_prev_rows,
    const float* c0_rows, int64_t n_prev, const uint8_t* restarts, const float* dr, float* dc,
    float* dgates, float* db, float* r) {
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    const float* __restrict__ a = gates + b * G;
    float* __restrict__ d = dgates + b * G;
    const float* __restrict__ cb = cells + b * H;
    const float* __restrict__ cp = state_read(b, n_prev, restarts, c_prev_rows, c0_rows, H);
    const float* __restrict__ drb = dr + b * H;
    float* __restrict__ dcb = dc + b * H;
    float* __restrict__ dbb = db;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float tc = tanh_f32(cb[j]);
      float di, df, dg, dout;
      dcb[j] = cell_backward(a[j], a[H + j], a[2 * H + j], a[3 * H + j], cp[j], tc, drb[j],
                             dcb[j], &di, &df, &dg, &dout);
      d[j] = di;
      d[H + j] = df;
      d[2 * H + j] = dg;
      d[3 * H + j] = dout;
      dbb[j] += di;
      dbb[H + j] += df;
      dbb[2 * H + j] += dg;
      dbb[3 * H + j] += dout;
    }
    if (r) {
      float* __restrict__ rb = r + b * H;
      for (int64_t j = 0; j < H; ++j) {
        rb[j] = a[3 * H + j] * tanh_f32(cb[j]);
      }
    }
  }
}

LSTM_EXT_ISA_VARIANTS(gates_backward_fused,
                      (int64_t B, int64_t H, const float* gates, const float* cells,
                       const float* c_prev_rows, const float* c0_rows, int64_t n_prev,
                       const uint8_t* restarts, const float* dr, float* dc, float* dgates,
                       float* db, float* r),
                      (B, H, gates, cells, c_prev_rows, c0_rows, n_prev, restarts, dr, dc, dgates,
                       db, r),
                      gates_backward_fused_body)

inline void gates_backward(int64_t B, int64_t H, const float* gates, const float* cells,
                           const float* c_prev_rows, const float* c0_rows, int64_t n_prev,
                           const uint8_t* restarts, const float* dr, float* dc, float* dgates,
                           float* db, float* r, float* /*tanh_c: not needed*/) {
  gates_backward_fused(B, H, gates, cells, c_prev_rows, c0_rows, n_prev, restarts, dr, dc, dgates,
                       db, r);
}

// c_new = f ⊙ c_{t-1} + i ⊙ g of a step's B rows, the cell state before zoneout mixed it (what
// the backward's tanh needs where the kept c_t is the mixed one); gates, c_prev_rows, c0_rows,
// n_prev and restarts as gates_backward reads them; out [B, H].
template <typename T>
void new_cells(int64_t B, int64_t H, const T* gates, const T* c_prev_rows, const T* c0_rows,
               int64_t n_prev, const uint8_t* restarts, T* out) {
  const int64_t G = 4 * H;
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict__ a = gates + b * G;
    const T* __restrict__ cp = state_read(b, n_prev, restarts, c_prev_rows, c0_rows, H);
    T* __restrict__ ob = out + b * H;
    for (int64_t j = 0; j < H; ++j) {
      ob[j] = next_cell(a[j], a[H + j], a[2 * H + j], cp[j]);
    }
  }
}

// A backward step's zoneout before its gate pass, shared by the float and 16-bit loops: dh [n, P]
// and dc [n, H] (the step's totals) go on as the gradients of its new h and c, what the mix
// passes straight to the state before waits in keep_dh / keep_dc (null where that state is not
// zoned out), and with zoneout of c, c_new [n, H] receives the unmixed c_t (new_cells). Returns
// the c_t the gate pass takes tanh of: c_new, or the kept cells_t. row: the step's first row;
// gates, c_prev_rows, c0_rows, n_prev, restarts as gates_backward reads them.
template <typename D>
const D* zoneout_step_backward(const Zoneout& zoneout, int64_t row, int64_t n, int64_t P,
                               int64_t H, const D* gates, const D* cells_t,
                               const D* c_prev_rows, const D* c0_rows, int64_t n_prev,
                               const uint8_t* restarts, D* dh, D* dc, D* keep_dh, D* keep_dc,
                               D* c_new) {
  if (keep_dh) {
    zoneout_split(zoneout.h_rows(row, P), zoneout.p_h, n * P, dh, keep_dh);
  }
  if (!keep_dc) {
    return cells_t;
  }
  zoneout_split(zoneout.c_rows(row, H), zoneout.p_c, n * H, dc, keep_dc);
  new_cells(n, H, gates, c_prev_rows, c0_rows, n_prev, restarts, c_new);
  return c_new;
}

// The h each of a step's n rows fed to W_hh, for dW_hh (shared by the backward loops): out row r
// (at out + r * ld_out, P values) = the state the row read (state_read: prev_rows, init_rows,
// n_prev, restarts) times the recurrent mask's rows (recurrent_rows, or null).
template <typename S, typename M>
void fed_state_rows(int64_t n, int64_t P, int64_t n_prev, const uint8_t* restarts,
                    const S* prev_rows, const S* init_rows, const M* recurrent_rows, S* out,
                    int64_t ld_out) {
  for (int64_t r = 0; r < n; ++r) {
    const S* h_read = state_read(r, n_prev, restarts, prev_rows, init_rows, P);
    if (recurrent_rows) {
      mask_rows(1, P, h_read, recurrent_rows + r * P, out + r * ld_out);
    } else {
      std::copy(h_read, h_read + P, out + r * ld_out);
    }
  }
}

// The end of a backward step, shared by the float and 16-bit loops, once dh [n, P] holds
// dG_t W_hh: the recurrent mask's rows (or null) multiply it, zoneout's kept parts (or null)
// are added back, and the rows that restarted at this step hand dh, dc to h0, c0
// (move_restart_gradients).
template <typename D, typename M>
void finish_step_backward(int64_t n, int64_t P, int64_t H, const M* recurrent_rows,
                          const D* keep_dh, const D* keep_dc, const uint8_t* restarts, D* dh,
                          D* dc, D* restart_dh, D* restart_dc) {
  if (recurrent_rows) {
    mask_rows(n, P, dh, recurrent_rows, dh);
  }
  if (keep_dh) {
    add_kept(n * P, keep_dh, dh);
  }
  if (keep_dc) {
    add_kept(n * H, keep_dc, dc);
  }
  if (restarts) {
    move_restart_gradients(restarts, n, P, H, dh, dc, restart_dh, restart_dc);
  }
}

// The plain LSTM cell as the time loops' Cell policy (layer_forward.h, layer_backward.h): both
// products summed into a step's gate rows, the gate passes above.
struct PlainCell {
  static constexpr bool kSeparateProducts = false;

  template <typename C>
  void forward(int64_t n, int64_t H, int64_t /*row*/, C* gates_t, const C* bias, C* c, C* r,
               C* exp_scratch) const {
    gates_forward(n, H, 0, H, gates_t, bias, c, r, exp_scratch);
  }

  // Per batch slice, the sums that become parameter gradients: the bias's [4H].
  static int64_t sums_width(int64_t H) { return 4 * H; }

  // gates_backward; the step's gate gradients are one [n, 4H] (d_ih and d_hh are the same rows).
  template <typename C>
  void backward(int64_t n, int64_t H, int64_t /*row*/, const C* gates_t, const C* cells_t,
                const C* c_prev_rows, const C* c0_rows, int64_t n_prev, const uint8_t* restarts,
                const C* dr, C* dc, C* d_ih, C* /*d_hh: d_ih*/, C* sums, C* r, C* tanh_c) const {
    gates_backward(n, H, gates_t, cells_t, c_prev_rows, c0_rows, n_prev, restarts, dr, dc, d_ih,
                   sums, r, tanh_c);
  }
};

}  // namespace cpu
}  // namespace lstm_ext
