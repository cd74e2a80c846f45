// Which backend runs each product of the GEMM seam (blas.h): measured on the running CPU, kept.
//
// A size class is a product's dtype, transposes, the backends that may run it, the threads it may
// use, and M, N, K rounded up to powers of two (M exactly up to 4). The first time a process meets
// a class, the eligible backends are timed on a product of the class's size (interleaved rounds,
// the median of each; at most ~2^25 multiply-adds a run, a few milliseconds in all), and the
// fastest wins unless the fixed rule's backend is within 10% of it (no change for noise:
// single products of a microsecond vary by that much from round to round on a shared machine).
//
// Results must not change from one run of a program to the next (the backends sum in different
// orders), so the decision is appended to a file that every later run on this machine reads
// first: ${LSTM_EXT_GEMM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/lstm_ext}/gemm-choices-<hash>.txt,
// one file per CPU model, torch version, vector variant and ISA caps (the hash is of that
// fingerprint, which the file's first line spells out). Processes that start at once take a lock
// on the file and re-read it, so the first to measure a class decides it for all. Where no such
// file can be written (LSTM_EXT_GEMM_CACHE=off, a read-only home), nothing is timed: the fixed
// rule decides (blas.h), the same every run.
//
// LSTM_EXT_GEMM=<backend> (small, brgemm, mkl, aten) forces a backend for every product it can
// run (the rest follow the rule); LSTM_EXT_GEMM=rule the fixed rule; unset or auto: measured.
// Tests switch at run time with lstm_ext._C.set_gemm_backend.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "blas.h"

namespace lstm_ext {
namespace cpu {

// Bump when a backend changes enough that old measurements should not be trusted.
constexpr int kChoiceFileFormat = 1;

namespace {

constexpr GemmBackend kAllBackends[] = {GemmBackend::kSmall, GemmBackend::kBrgemm,
                                        GemmBackend::kMkl, GemmBackend::kAten};

const char* backend_name(GemmBackend b) {
  switch (b) {
    case GemmBackend::kSmall: return "small";
    case GemmBackend::kBrgemm: return "brgemm";
    case GemmBackend::kMkl: return "mkl";
    case GemmBackend::kAten: return "aten";
  }
  return "?";
}

bool backend_from_name(const std::string& name, GemmBackend* out) {
  for (GemmBackend b : kAllBackends) {
    if (name == backend_name(b)) {
      *out = b;
      return true;
    }
  }
  return false;
}

enum class Mode : int { kMeasured, kRule, kForced };

// ---- size classes ----------------------------------------------------------------------------

int ceil_log2(int64_t x) {
  int bits = 0;
  while ((int64_t(1) << bits) < x) ++bits;
  return bits;
}

// M exactly up to 4 (where the small GEMM and the others cross), then powers of two.
int rows_class(int64_t M) { return M <= 4 ? static_cast<int>(M) : 3 + ceil_log2(M); }

// A size class and the key it is kept under in the choice file: its fields, most significant
// first, with their widths, listed once for packing and unpacking.
struct SizeClass {
  uint64_t is_double = 0, trans_a = 0, trans_b = 0, eligible = 0, threads = 0, rows = 0,
           log_n = 0, log_k = 0;

  template <typename F>
  void fields(F&& field) {
    field(is_double, 1);
    field(trans_a, 1);
    field(trans_b, 1);
    field(eligible, 4);  // a bit per backend that can run the call
    field(threads, 8);
    field(rows, 8);  // rows_class(M)
    field(log_n, 8);
    field(log_k, 8);
  }
  uint64_t key() {
    uint64_t key = 0;
    fields([&](uint64_t value, int bits) { key = key << bits | value; });
    return key;
  }
  static SizeClass from_key(uint64_t key) {
    SizeClass c;
    int shift = 0;
    c.fields([&](uint64_t, int bits) { shift += bits; });
    c.fields([&](uint64_t& value, int bits) {
      shift -= bits;
      value = (key >> shift) & ((uint64_t(1) << bits) - 1);
    });
    return c;
  }
};

template <typename T>
uint64_t class_key(const GemmCall& c) {
  SizeClass size;
  for (GemmBackend b : kAllBackends) {
    size.eligible |= uint64_t(gemm_backend_can_run<T>(b, c)) << static_cast<int>(b);
  }
  size.is_double = std::is_same<T, double>::value;
  size.trans_a = c.trans_a;
  size.trans_b = c.trans_b;
  size.threads = c.may_thread ? std::min(at::get_num_threads(), 255) : 1;
  size.rows = rows_class(c.M);
  size.log_n = ceil_log2(c.N);
  size.log_k = ceil_log2(c.K);
  return size.key();
}

std::string describe_key(uint64_t key) {
  const SizeClass c = SizeClass::from_key(key);
  const int m = static_cast<int>(c.rows);
  std::ostringstream out;
  out << (c.is_double ? "float64" : "float32") << (c.trans_a ? " A^T" : " A")
      << (c.trans_b ? " B^T" : " B")
      << ", M " << (m <= 4 ? "= " + std::to_string(m) : "<= " + std::to_string(1 << (m - 3)))
      << ", N <= " << (int64_t(1) << c.log_n) << ", K <= " << (int64_t(1) << c.log_k) << ", "
      << c.threads << (c.threads == 1 ? " thread" : " threads");
  return out.str();
}

template <typename T>
GemmBackend rule_backend(const GemmCall& c) {
  const int64_t work = c.M * c.N * c.K;
  if (gemm_backend_can_run<T>(GemmBackend::kSmall, c) &&
      (work <= kSmallGemmWork || (c.M == 1 && work <= 4 * kSmallGemmWork))) {
    return GemmBackend::kSmall;
  }
  return fortran_gemm(T()) != nullptr ? GemmBackend::kMkl : GemmBackend::kAten;
}

// ---- timing ----------------------------------------------------------------------------------

struct Measurement {
  GemmBackend chosen;
  std::vector<std::pair<GemmBackend, double>> ns_per_call;  // medians, per candidate
};

template <typename T>
Measurement measure(const GemmCall& call, const std::vector<GemmBackend>& candidates) {
  GemmCall c = call;
  // A product of the class's size, cut to at most kMaxMeasuredMacs by its rows.
  constexpr int64_t kMaxMeasuredMacs = int64_t(1) << 25;
  if (c.M * c.N * c.K > kMaxMeasuredMacs) {
    c.M = std::max<int64_t>(std::min<int64_t>(c.M, 16), kMaxMeasuredMacs / (c.N * c.K));
  }
  const int64_t lda = c.trans_a ? c.M : c.K, ldb = c.trans_b ? c.K : c.N, ldc = c.N;
  std::vector<T> a(c.M * c.K), b(c.K * c.N), out(c.M * c.N, T(0));
  uint32_t seed = 12345;
  for (auto* v : {&a, &b}) {
    for (T& x : *v) {
      seed = seed * 1664525u + 1013904223u;
      x = T((seed >> 8) % 2001) / T(1000) - T(1);
    }
  }
  const int64_t work = c.M * c.N * c.K;
  const int reps = static_cast<int>(std::clamp<int64_t>((int64_t(1) << 20) / work, 1, 64));
  constexpr int kRounds = 7;  // the first is a warm-up (kernel JIT, caches)
  std::vector<std::vector<double>> times(candidates.size());
  for (int round = 0; round < kRounds; ++round) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      const auto start = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) {
        run_gemm<T>(candidates[i], c, T(1), a.data(), lda, b.data(), ldb, T(r > 0), out.data(),
                    ldc);
      }
      const std::chrono::duration<double, std::nano> elapsed =
          std::chrono::steady_clock::now() - start;
      if (round > 0) {
        times[i].push_back(elapsed.count() / reps);
      }
    }
  }
  Measurement result;
  const GemmBackend rule = rule_backend<T>(call);
  double rule_ns = -1, best_ns = -1;
  GemmBackend best = candidates[0];
  for (size_t i = 0; i < candidates.size(); ++i) {
    auto& t = times[i];
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    const double median = t[t.size() / 2];
    result.ns_per_call.emplace_back(candidates[i], median);
    if (candidates[i] == rule) rule_ns = median;
    if (best_ns < 0 || median < best_ns) {
      best_ns = median;
      best = candidates[i];
    }
  }
  // The rule's backend unless another is clearly faster: noise alone changes nothing.
  result.chosen = rule_ns >= 0 && best_ns >= 0.9 * rule_ns ? rule : best;
  return result;
}

// ---- the choice file -------------------------------------------------------------------------

std::string env_or(const char* name, const std::string& otherwise) {
  const char* value = std::getenv(name);
  return value != nullptr ? std::string(value) : otherwise;
}

std::string cpu_model() {
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  std::string model = "unknown CPU";
  if (f != nullptr) {
    char line[512];
    while (std::fgets(line, sizeof(line), f) != nullptr) {
      if (std::strncmp(line, "model name", 10) == 0) {
        const char* colon = std::strchr(line, ':');
        if (colon != nullptr) {
          model = colon + 1;
          model.erase(0, model.find_first_not_of(" \t"));
          model.erase(model.find_last_not_of(" \t\n") + 1);
        }
        break;
      }
    }
    std::fclose(f);
  }
  return model;
}

std::string fingerprint() {
  std::ostringstream out;
  out << "format " << kChoiceFileFormat << "; cpu " << cpu_model() << "; torch "
      << LSTM_EXT_TORCH_VERSION << "; vector code " << static_cast<int>(vector_isa())
      << " bytes; ATEN_CPU_CAPABILITY=" << env_or("ATEN_CPU_CAPABILITY", "")
      << "; ONEDNN_MAX_CPU_ISA=" << env_or("ONEDNN_MAX_CPU_ISA", "")
      << "; MKL_ENABLE_INSTRUCTIONS=" << env_or("MKL_ENABLE_INSTRUCTIONS", "")
      << "; LSTM_EXT_NO_MKL=" << env_or("LSTM_EXT_NO_MKL", "");
  return out.str();
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) {
    h = (h ^ ch) * 1099511628211ull;
  }
  return h;
}

bool make_directories(const std::string& path) {
  for (size_t pos = 1; pos <= path.size(); ++pos) {
    if (pos == path.size() || path[pos] == '/') {
      const std::string prefix = path.substr(0, pos);
      if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
        return false;
      }
    }
  }
  return true;
}

// The file's path, or "" with *why set where none can be kept.
std::string choice_file_path(std::string* why) {
  std::string dir = env_or("LSTM_EXT_GEMM_CACHE", "");
  if (dir == "off") {
    *why = "LSTM_EXT_GEMM_CACHE=off";
    return "";
  }
  if (dir.empty()) {
    const std::string xdg = env_or("XDG_CACHE_HOME", "");
    const std::string home = env_or("HOME", "");
    if (!xdg.empty()) {
      dir = xdg + "/lstm_ext";
    } else if (!home.empty()) {
      dir = home + "/.cache/lstm_ext";
    } else {
      *why = "neither LSTM_EXT_GEMM_CACHE, XDG_CACHE_HOME nor HOME is set";
      return "";
    }
  }
  if (!make_directories(dir)) {
    *why = "cannot create " + dir + ": " + std::strerror(errno);
    return "";
  }
  char hash[17];
  std::snprintf(hash, sizeof(hash), "%016llx",
                static_cast<unsigned long long>(fnv1a(fingerprint())));
  const std::string path = dir + "/gemm-choices-" + hash + ".txt";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    *why = "cannot write " + path + ": " + std::strerror(errno);
    return "";
  }
  ::close(fd);
  return path;
}

// Reads "<key hex> <backend> ..." lines (after the fingerprint line) into choices.
void read_choices(int fd, std::unordered_map<uint64_t, GemmBackend>* choices,
                  bool* has_header) {
  std::string text;
  char buffer[4096];
  ::lseek(fd, 0, SEEK_SET);
  for (ssize_t n; (n = ::read(fd, buffer, sizeof(buffer))) > 0;) {
    text.append(buffer, n);
  }
  std::istringstream lines(text);
  std::string line;
  *has_header = false;
  while (std::getline(lines, line)) {
    if (line.rfind("#", 0) == 0) {
      *has_header = true;
      continue;
    }
    std::istringstream fields(line);
    std::string key_hex, name;
    GemmBackend backend;
    if (fields >> key_hex >> name && backend_from_name(name, &backend)) {
      choices->emplace(std::strtoull(key_hex.c_str(), nullptr, 16), backend);  // first wins
    }
  }
}

class FileLock {
 public:
  FileLock(const std::string& path, int operation)
      : fd_(::open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644)) {
    if (fd_ >= 0) ::flock(fd_, operation);
  }
  ~FileLock() {
    if (fd_ >= 0) {
      ::flock(fd_, LOCK_UN);
      ::close(fd_);
    }
  }
  int fd() const { return fd_; }

 private:
  int fd_;
};

// ---- the process's state ---------------------------------------------------------------------

struct State {
  std::mutex mutex;
  std::atomic<int> mode{static_cast<int>(Mode::kMeasured)};
  std::atomic<int> forced{static_cast<int>(GemmBackend::kMkl)};
  std::atomic<uint64_t> generation{1};  // bumped when the mode changes (thread caches flush)
  std::string file;                     // "" where no choice can be kept
  std::string why_no_file;
  bool loaded = false;
  std::unordered_map<uint64_t, GemmBackend> on_file;  // read once from the file
  std::unordered_map<uint64_t, GemmBackend> choices;  // what this process runs
  std::vector<std::tuple<uint64_t, GemmBackend, std::string>> made;  // this process's, described
  std::atomic<bool> counting{false};  // tests: count the products each backend runs
  std::atomic<int64_t> calls[4] = {};
};

std::string measurement_text(const Measurement& m) {
  std::ostringstream out;
  out.precision(3);
  for (const auto& [backend, ns] : m.ns_per_call) {
    out << (out.tellp() > 0 ? " " : "") << backend_name(backend) << "=" << ns / 1000 << "us";
  }
  return out.str();
}

void set_mode_from_name(State& state, const std::string& name) {
  GemmBackend forced;
  if (name.empty() || name == "auto") {
    state.mode = static_cast<int>(Mode::kMeasured);
  } else if (name == "rule") {
    state.mode = static_cast<int>(Mode::kRule);
  } else if (backend_from_name(name, &forced)) {
    state.forced = static_cast<int>(forced);
    state.mode = static_cast<int>(Mode::kForced);
  } else {
    TORCH_CHECK_VALUE(false, "LSTM_EXT_GEMM: expected auto, rule, small, brgemm, mkl or aten, got '",
                      name, "'");
  }
  state.generation.fetch_add(1);
}

State& state() {
  static State* s = [] {
    auto* created = new State();
    // An unknown name is reported at the first product (as a Python error), not at import.
    try {
      set_mode_from_name(*created, env_or("LSTM_EXT_GEMM", ""));
    } catch (...) {
      created->mode = -1;
    }
    created->file = choice_file_path(&created->why_no_file);
    return created;
  }();
  return *s;
}

template <typename T>
GemmBackend measured_backend(State& s, uint64_t key, const GemmCall& call) {
  std::lock_guard<std::mutex> guard(s.mutex);
  if (auto found = s.choices.find(key); found != s.choices.end()) {
    return found->second;  // another thread of this process decided it
  }
  if (!s.loaded && !s.file.empty()) {
    FileLock lock(s.file, LOCK_SH);
    bool has_header;
    read_choices(lock.fd(), &s.on_file, &has_header);
    s.loaded = true;
  }
  if (auto found = s.on_file.find(key); found != s.on_file.end()) {
    s.choices.emplace(key, found->second);
    s.made.emplace_back(key, found->second, "kept in " + s.file);
    return found->second;
  }
  std::vector<GemmBackend> candidates;
  for (GemmBackend b : kAllBackends) {
    // at::mm only where MKL is absent: it calls the same MKL, later.
    if (gemm_backend_can_run<T>(b, call) &&
        (b != GemmBackend::kAten || fortran_gemm(T()) == nullptr)) {
      candidates.push_back(b);
    }
  }
  GemmBackend chosen;
  std::string how;
  if (candidates.size() == 1) {
    chosen = candidates[0];
    how = "the only one";
  } else if (s.file.empty()) {
    chosen = rule_backend<T>(call);
    how = "fixed rule (" + s.why_no_file + ")";
  } else {
    FileLock lock(s.file, LOCK_EX);
    bool has_header = false;
    std::unordered_map<uint64_t, GemmBackend> on_file;
    if (lock.fd() >= 0) {
      read_choices(lock.fd(), &on_file, &has_header);
    }
    if (auto found = on_file.find(key); found != on_file.end()) {
      chosen = found->second;
      how = "kept in " + s.file;
    } else if (lock.fd() < 0) {
      // A choice that cannot be kept could differ in the next run: the rule decides instead.
      chosen = rule_backend<T>(call);
      how = "fixed rule (cannot open " + s.file + ": " + std::strerror(errno) + ")";
    } else {
      const Measurement m = measure<T>(call, candidates);
      chosen = m.chosen;
      how = measurement_text(m);
      std::string text = has_header ? "" : "# lstm_ext GEMM choices; " + fingerprint() + "\n";
      char key_hex[17];
      std::snprintf(key_hex, sizeof(key_hex), "%016llx", static_cast<unsigned long long>(key));
      text += std::string(key_hex) + " " + backend_name(chosen) + " " + describe_key(key) +
              "; " + how + "\n";
      if (::write(lock.fd(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
        // Not kept, so the next run might measure otherwise: the rule, the same every run.
        how = "fixed rule (measured " + std::string(backend_name(chosen)) + " but could not " +
              "keep it in " + s.file + ": " + std::strerror(errno) + ")";
        chosen = rule_backend<T>(call);
      }
    }
  }
  s.choices.emplace(key, chosen);
  s.made.emplace_back(key, chosen, how);
  return chosen;
}

template <typename T>
GemmBackend choose_backend(State& s, const GemmCall& call) {
  const int mode = s.mode.load(std::memory_order_relaxed);
  if (mode == static_cast<int>(Mode::kForced)) {
    const auto forced = static_cast<GemmBackend>(s.forced.load(std::memory_order_relaxed));
    return gemm_backend_can_run<T>(forced, call) ? forced : rule_backend<T>(call);
  }
  if (mode == static_cast<int>(Mode::kRule)) {
    return rule_backend<T>(call);
  }
  if (mode != static_cast<int>(Mode::kMeasured)) {
    set_mode_from_name(s, env_or("LSTM_EXT_GEMM", ""));  // raises the error
  }
  // This thread's copy of the decisions: no lock per product.
  struct ThreadCache {
    uint64_t generation = 0;
    std::unordered_map<uint64_t, GemmBackend> choices;
  };
  static thread_local ThreadCache cache;
  const uint64_t generation = s.generation.load(std::memory_order_acquire);
  if (cache.generation != generation) {
    cache.choices.clear();
    cache.generation = generation;
  }
  const uint64_t key = class_key<T>(call);
  if (auto found = cache.choices.find(key); found != cache.choices.end()) {
    return found->second;
  }
  const GemmBackend chosen = measured_backend<T>(s, key, call);
  cache.choices.emplace(key, chosen);
  return chosen;
}

}  // namespace

bool brgemm_f32_usable() {
  static const bool usable = [] {
#ifdef CPUBLAS_BRGEMM_F32F32F32  // torch's CPUBlas.h says which brgemm overloads it has
    try {
      float a[2] = {1.f, 2.f}, b[2 * 16], c[16];
      for (int i = 0; i < 32; ++i) b[i] = static_cast<float>(i);
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a, b, c, /*is_vnni=*/false);
      for (int n = 0; n < 16; ++n) {
        if (c[n] != b[n] + 2.f * b[16 + n]) return false;
      }
      return true;
    } catch (...) {
      return false;
    }
#else
    return false;
#endif
  }();
  return usable;
}

template <typename T>
GemmBackend gemm_backend_for(const GemmCall& call) {
  State& s = state();
  const GemmBackend backend = choose_backend<T>(s, call);
  if (s.counting.load(std::memory_order_relaxed)) {
    s.calls[static_cast<int>(backend)].fetch_add(1, std::memory_order_relaxed);
  }
  return backend;
}

template GemmBackend gemm_backend_for<float>(const GemmCall&);
template GemmBackend gemm_backend_for<double>(const GemmCall&);

// ---- reports (lstm_ext._C) -------------------------------------------------------------------

std::string gemm_settings_impl() {
  State& s = state();
  std::string mode;
  switch (static_cast<Mode>(s.mode.load())) {
    case Mode::kMeasured:
      mode = s.file.empty() ? "fixed rule, nothing timed (" + s.why_no_file + ")"
                            : "measured per size class, kept in " + s.file;
      break;
    case Mode::kRule: mode = "fixed rule (LSTM_EXT_GEMM=rule)"; break;
    case Mode::kForced:
      mode = std::string("forced: ") +
             backend_name(static_cast<GemmBackend>(s.forced.load())) +
             " wherever it can run, the fixed rule elsewhere";
      break;
    default: mode = "invalid LSTM_EXT_GEMM='" + env_or("LSTM_EXT_GEMM", "") + "'";
  }
  return mode + "; brgemm f32 " + (brgemm_f32_usable() ? "usable" : "not usable on this CPU");
}

// (size class, backend, how it was chosen) for each class this process has met, in order.
std::vector<std::tuple<std::string, std::string, std::string>> gemm_choices_impl() {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.mutex);
  std::vector<std::tuple<std::string, std::string, std::string>> out;
  for (const auto& [key, backend, how] : s.made) {
    out.emplace_back(describe_key(key), backend_name(backend), how);
  }
  return out;
}

// Starts (or, with false, stops) counting the products each backend runs; returns the counts so
// far as {backend: count} and resets them.
std::vector<std::pair<std::string, int64_t>> count_gemm_backends_impl(bool on) {
  State& s = state();
  std::vector<std::pair<std::string, int64_t>> out;
  for (GemmBackend b : kAllBackends) {
    out.emplace_back(backend_name(b), s.calls[static_cast<int>(b)].exchange(0));
  }
  s.counting = on;
  return out;
}

void set_gemm_backend_impl(const std::string& name) {
  State& s = state();
  std::lock_guard<std::mutex> guard(s.mutex);
  set_mode_from_name(s, name);  // the decisions made so far stay: the file they came from is the same
}

}  // namespace cpu
}  // namespace lstm_ext
