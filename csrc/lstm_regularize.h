// Zoneout and recurrent dropout of one layer-direction, as the backends' loops apply them; the
// equations are spelled out in lstm_ext/reference.py. Both default off, and a layer without them
// runs exactly as before (one null check per step).
//
// Zoneout (Krueger et al. 2016) mixes each state with the one before:
//   c_t = d_c ⊙ c_{t-1} + (1 - d_c) ⊙ c_new,   h_t = d_h ⊙ h_{t-1} + (1 - d_h) ⊙ h_new
// where c_new, h_new are the plain step's results (h_new = o ⊙ tanh(c_new), projected with
// proj_size). In training d is a bool mask (true: the unit keeps its previous value), a fresh one
// per step; in eval it is the probability p itself, the expectation. The layer keeps the mixed
// c_t as its cell state (what the next step reads); the backward rebuilds c_new from the gates.
//
// Recurrent dropout (Gal and Ghahramani 2016) multiplies the h a step feeds to W_hh by a mask
// [B, P], the same at every step of the call (0 or 1 / (1 - p), drawn by the module).
#pragma once

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <mutex>
#include <type_traits>

namespace lstm_ext {

// Fills the bool `mask`, each element true with probability p, independently: zoneout's masks.
// On the CPU each element is a hash of (one 64-bit seed drawn from torch's default generator, its
// index): SplitMix64, whose 32 high bits are compared with p * 2^32. A seeded run therefore draws
// the same mask in eager and under torch.compile, with any number of threads, and it costs
// ~0.5 ns per element where Tensor.bernoulli_ (one generator call per element) costs ~5.6.
// Elsewhere (CUDA): bernoulli_. The kernel of the lstm_ext::fill_bernoulli_mask_ op (ops.cpp).
inline void fill_bernoulli_mask(const at::Tensor& mask, double p) {
  constexpr const char* op = "lstm_ext::fill_bernoulli_mask_";
  TORCH_CHECK(p >= 0 && p <= 1, op, ": p must be in [0, 1], got ", p);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous(), op,
              ": mask must be a contiguous bool tensor, got ", mask.scalar_type());
  if (!mask.is_cpu()) {
    mask.bernoulli_(p);
    return;
  }
  uint64_t seed;
  {
    auto* generator =
        at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(generator->mutex_);
    seed = generator->random64();
  }
  const uint64_t threshold = static_cast<uint64_t>(p * 4294967296.0);  // P(32 bits < it) = p
  uint8_t* out = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  at::parallel_for(0, mask.numel(), int64_t(1) << 16, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      uint64_t z = seed + static_cast<uint64_t>(u + 1) * 0x9e3779b97f4a7c15ull;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      out[u] = (z >> 32) < threshold;
    }
  });
}

// A layer's zoneout: the masks (bool, one row per step row: [rows, H] for c, [rows, P] for h)
// in training, or null and the probabilities (eval).
struct Zoneout {
  // Read as bytes (torch's bool is one byte, 0 or 1): GCC vectorises no loop over bool loads.
  const uint8_t* mask_c = nullptr;
  const uint8_t* mask_h = nullptr;
  double p_c = 0, p_h = 0;

  Zoneout() = default;  // off
  Zoneout(double zoneout_c, double zoneout_h, const c10::optional<at::Tensor>& zoneout_mask_c,
          const c10::optional<at::Tensor>& zoneout_mask_h)
      : mask_c(data_or_null(zoneout_mask_c)),
        mask_h(data_or_null(zoneout_mask_h)),
        p_c(zoneout_c),
        p_h(zoneout_h) {}

  bool on_c() const { return mask_c || p_c > 0; }
  bool on_h() const { return mask_h || p_h > 0; }
  bool any() const { return on_c() || on_h(); }
  // The masks' rows from `row` on (null in eval).
  const uint8_t* c_rows(int64_t row, int64_t H) const {
    return mask_c ? mask_c + row * H : nullptr;
  }
  const uint8_t* h_rows(int64_t row, int64_t P) const {
    return mask_h ? mask_h + row * P : nullptr;
  }

 private:
  // (The checks in lstm_checks.h have made each mask contiguous bool or refused it.)
  static const uint8_t* data_or_null(const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? reinterpret_cast<const uint8_t*>(t->data_ptr<bool>())
                                         : nullptr;
  }
};

// next[u] = d ⊙ previous[u] + (1 - d) ⊙ next[u] over n values: d = mask[u] where a mask is
// given, else p, computed in float64 for float64 and in float32 otherwise (16-bit h: one rounding).
template <typename T, typename S>
void zoneout_mix(const uint8_t* mask, double p, int64_t n, const S* previous, T* next) {
  if (mask) {
    for (int64_t u = 0; u < n; ++u) {
      const T kept = static_cast<T>(previous[u]), fresh = next[u];
      next[u] = mask[u] ? kept : fresh;
    }
    return;
  }
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const A d = static_cast<A>(p), rest = static_cast<A>(1 - p);
  for (int64_t u = 0; u < n; ++u) {
    next[u] = static_cast<T>(d * static_cast<A>(previous[u]) + rest * static_cast<A>(next[u]));
  }
}

// The backward of zoneout_mix: grad in: dL/d(the mixed state), out: dL/d(new), (1 - d) ⊙ grad;
// keep out: dL/d(previous) through the mix, d ⊙ grad.
template <typename T>
void zoneout_split(const uint8_t* mask, double p, int64_t n, T* grad, T* keep) {
  if (mask) {
    for (int64_t u = 0; u < n; ++u) {  // selects on loaded values: they vectorise
      const T g = grad[u];
      const bool kept = mask[u];
      keep[u] = kept ? g : T(0);
      grad[u] = kept ? T(0) : g;
    }
    return;
  }
  const T d = static_cast<T>(p), rest = static_cast<T>(1 - p);
  for (int64_t u = 0; u < n; ++u) {
    keep[u] = d * grad[u];
    grad[u] *= rest;
  }
}

// out[u] = values[u] * mask[u] over n rows of width P (recurrent dropout; in place allowed).
// 16-bit values or masks multiply in float32, rounded once to out's type.
template <typename V, typename M, typename O>
void mask_rows(int64_t n, int64_t P, const V* values, const M* mask, O* out) {
  for (int64_t u = 0; u < n * P; ++u) {
    out[u] = static_cast<O>(values[u] * mask[u]);
  }
}

// grad[u] += keep[u] over n values (what zoneout_split set aside, once the step's own
// gradient has been written).
template <typename T>
void add_kept(int64_t n, const T* keep, T* grad) {
  for (int64_t u = 0; u < n; ++u) {
    grad[u] += keep[u];
  }
}

}  // namespace lstm_ext
