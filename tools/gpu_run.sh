#!/usr/bin/env bash
# On a machine with a GPU: build lstm_ext there with its CUDA kernels, run the CUDA tests and, if
# they pass, the GPU benchmark (lstm_ext vs nn.LSTM on cuDNN, TF32 off on both sides). Every log
# goes under $OUT (default ./gpu_results). Meant to finish within about 6 minutes on an H100/H200
# machine (build ~2-3 min with all cores, tests ~1-2 min, benchmark ~1 min), so a rerun fits a
# 15-minute lease.
#   bash tools/gpu_run.sh                  # with python3 (or $PYTHON) the machine's torch env
set -uo pipefail
start=$SECONDS
say() { echo "gpu_run [$((SECONDS - start)) s]: $*"; }
fail() { say "FAILED: $*"; exit 1; }
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "${OUT:-$root/gpu_results}"
out="$(cd "${OUT:-$root/gpu_results}" && pwd)"  # absolute: some steps run from another folder
cd "$root"

# 1. In the first seconds: the machine's torch environment (pip and pytest run as `python -m`,
# so they are that python's), a GPU, the compiler and the Python headers. $PYTHON if set, else
# python3 (on the GPU machine the one that holds torch; there may be no plain `python`).
py="${PYTHON:-$(command -v python3 || command -v python)}"
[ -n "$py" ] || fail "no python3 or python on PATH"
"$py" - <<'PY' || fail "the environment is not ready (above)"
import os, sysconfig, torch
import pip, pytest  # noqa: F401 - both in this python's environment
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
assert torch.cuda.is_available(), "torch sees no GPU"
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
assert os.path.exists(header), f"no {header}: the Python headers are missing"
print(f"python {os.sys.executable}; torch {torch.__version__} (CUDA {torch.version.cuda}) on "
      f"{torch.cuda.get_device_name()}")
PY
command -v nvcc >/dev/null || fail "no nvcc on PATH"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

# 2. Build: H100 and H200 are sm_90 (an inherited arch list multiplies the compile time, and archs
# below 7.5 are fatal with nvcc 13); --no-deps: the machine's own torch, nothing downloaded.
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" FORCE_CUDA=1
say "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
if ! "$py" -m pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  fail "build (log: $out/build.log)"
fi
(cd /tmp && "$py" -c '
import torch, lstm_ext
assert torch.cuda.is_available() and lstm_ext.build_info["cuda"], lstm_ext.build_info
print("built:", lstm_ext.build_info)') 2>&1 | tee "$out/build_info.txt"
[ "${PIPESTATUS[0]}" = 0 ] || fail "lstm_ext was built without its CUDA kernels"
say "built"
(cd /tmp && "$py" -m lstm_ext) > "$out/selfcheck.log" 2>&1

# 3. The CUDA tests (from the root, as the README runs tests).
say "tests/test_cuda.py"
"$py" -m pytest -q -p no:cacheprovider --tb=short -rfE tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" = 0 ] || fail "CUDA tests (log: $out/test_cuda.log); no benchmark"

# 4. The benchmark, only after the tests passed: TF32 off (like for like), then one row with TF32
# on for both.
say "benchmark"
"$py" benchmarks/bench_lstm.py --device cuda --seconds 1 --csv "$out/gpu.csv" \
  --shapes 20,5,1,16 100,1,128,128 100,64,256,256 50,128,512,512 100,64,512,1024 \
  2>&1 | tee "$out/bench_cuda.log"
"$py" benchmarks/bench_lstm.py --device cuda --seconds 1 --tf32 --csv "$out/gpu_tf32.csv" \
  --shapes 100,64,256,256 2>&1 | tee "$out/bench_cuda_tf32.log"
"$py" benchmarks/bench_lstm.py --device cuda --seconds 1 --dtype bfloat16 \
  --csv "$out/gpu_bf16.csv" --shapes 20,5,1,16 100,64,256,256 2>&1 | tee "$out/bench_cuda_bf16.log"
say "done"
