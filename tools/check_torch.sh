#!/usr/bin/env bash
# Install lstm_ext as the README says into a fresh virtual environment that has the given torch
# (or none), from the repository root, and check it there:
#   bash tools/check_torch.sh torch==2.11.0   # the user's torch must stay exactly as it was
#   bash tools/check_torch.sh none            # pip install . must install a supported torch
# Checks: torch unchanged (or, with none, one in the supported range), `python -m lstm_ext` from
# the root, the parity, error and build tests on the CPU, and, where torch is a CUDA build and
# nvcc is here, that the CUDA kernels compiled (FORCE_CUDA=1) and are registered for every op
# (no GPU is needed for that; nothing CUDA runs).
#   LSTM_EXT_VENV          the virtual environment to create (default /tmp/lstm_ext_<torch>);
#                          removed first, and afterwards unless LSTM_EXT_KEEP_VENV=1
#   TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default 9.0: H100/H200)
#   LSTM_EXT_TESTS         the tests to run (default: parity, errors, build)
set -euo pipefail
spec="${1:?usage: check_torch.sh TORCH_REQUIREMENT|none}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tag="$(echo "$spec" | tr -c 'A-Za-z0-9.\n' '_')"
venv="${LSTM_EXT_VENV:-/tmp/lstm_ext_$tag}"
tests="${LSTM_EXT_TESTS:-tests/test_parity.py tests/test_errors.py tests/test_build.py}"
say() { echo "check_torch [$spec]: $*"; }

rm -rf "$venv"
python -m venv "$venv"
py="$venv/bin/python"
pip=("$venv/bin/pip" --no-cache-dir)
quiet_pip() {  # pip install -q, without this machine's notes on missing local index folders;
  # pipefail: a failing pip fails the script
  "${pip[@]}" install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
if [ "$spec" != none ]; then
  quiet_pip "$spec"
fi
torch_before="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)"
say "torch before: $torch_before"

# CUDA kernels where they can be compiled: nvcc here and, for a torch installed beforehand, a CUDA
# build of it (with none, pip installs the default: a CUDA build on Linux x86-64).
cuda_torch="$("$py" -c 'import torch; print(int(torch.version.cuda is not None))' 2>/dev/null \
  || echo 1)"
if command -v nvcc >/dev/null && [ "$cuda_torch" = 1 ]; then
  if [ -z "${CUDA_HOME:-}" ]; then  # nvcc's own toolkit folder (for libcudart)
    nvcc_real="$(readlink -f "$(command -v nvcc)")"
    CUDA_HOME="$(dirname "$(dirname "$nvcc_real")")"
    [ -d /usr/local/cuda/lib64 ] && [ ! -d "$CUDA_HOME/lib64" ] && CUDA_HOME=/usr/local/cuda
  fi
  export CUDA_HOME FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  expect_cuda=1
else
  export LSTM_EXT_NO_CUDA=1
  expect_cuda=0
fi

cd "$root"
say "pip install . (FORCE_CUDA=${FORCE_CUDA:-0})"
start=$SECONDS
quiet_pip .
say "built and installed in $((SECONDS - start)) s"

EXPECT_CUDA=$expect_cuda TORCH_BEFORE=$torch_before "$py" - <<'PY'
import os
import sys
import torch
import lstm_ext
sys.path.insert(0, "tools")
from build_backend import MIN_TORCH, NEXT_UNTESTED_TORCH

before = os.environ["TORCH_BEFORE"]
if before != "none":
    assert torch.__version__ == before, f"pip install . changed torch: {before} -> {torch.__version__}"
else:
    release = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert MIN_TORCH <= release < NEXT_UNTESTED_TORCH, f"torch {torch.__version__}: not supported"
assert lstm_ext.build_info["torch_version"] == torch.__version__, lstm_ext.build_info
ops = ["lstm_layer_forward", "lstm_layer_backward", "ln_lstm_layer_forward", "ln_lstm_layer_backward",
       "lstm_cell_forward", "lstm_cell_backward"]
keys = ["CPU"] + (["CUDA"] if os.environ["EXPECT_CUDA"] == "1" else [])
assert lstm_ext.build_info["cuda"] == (os.environ["EXPECT_CUDA"] == "1"), lstm_ext.build_info
missing = [f"{op} ({key})" for op in ops for key in keys
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_ext::{op}", key)]
assert not missing, f"no kernel registered for {missing}"
print(f"check_torch: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{'kept as it was' if before != 'none' else 'installed by pip install .'}; kernels "
      f"registered for {', '.join(keys)}")
PY
"$py" -m lstm_ext
quiet_pip pytest
# shellcheck disable=SC2086
"$venv/bin/pytest" -q -p no:cacheprovider $tests
say "OK"
[ "${LSTM_EXT_KEEP_VENV:-0}" = 1 ] || rm -rf "$venv"
