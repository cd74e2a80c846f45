#!/usr/bin/env bash
# Check, on a machine without a GPU, that the CUDA kernels compile, link and register.
#
# Builds lstm_ext with FORCE_CUDA=1 against a CUDA build of torch in a separate virtual environment
# (torch's pip wheel brings the CUDA headers and libraries in its nvidia-* packages; nvcc must be
# on the machine), imports it, and checks that every op has a CUDA kernel registered.
#   LSTM_EXT_CUDA_VENV     the virtual environment to use or create (default /tmp/lstm_ext_cuda_venv)
#   LSTM_EXT_CUDA_TORCH    the torch to install there (default torch==2.14.1, a CUDA 13 build)
#   TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default 9.0: H100/H200)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LSTM_EXT_CUDA_VENV:-/tmp/lstm_ext_cuda_venv}"
torch_spec="${LSTM_EXT_CUDA_TORCH:-torch==2.14.1}"

command -v nvcc >/dev/null || { echo "check_cuda_build: nvcc not found; nothing to check" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
fi
"$venv/bin/pip" install -q "$torch_spec" ninja setuptools wheel numpy
"$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'not a CUDA torch: ' + torch.__version__)"

# nvcc's own toolkit folder (for libcudart), not the folder its launcher happens to sit in.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_real="$(readlink -f "$(command -v nvcc)")"
  CUDA_HOME="$(dirname "$(dirname "$nvcc_real")")"
  [ -d /usr/local/cuda/lib64 ] && [ ! -d "$CUDA_HOME/lib64" ] && CUDA_HOME=/usr/local/cuda
fi
export CUDA_HOME FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

# Build from a copy of the tracked tree, so the developer's own build is left alone.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$root" && git ls-files -co --exclude-standard | tar cf - -T -) | (cd "$work" && tar xf -)
(cd "$work" && "$venv/bin/pip" install -q --no-build-isolation --no-deps --force-reinstall .)

cd /
"$venv/bin/python" - <<'PY'
import torch
import lstm_ext

ops = ["lstm_layer_forward", "lstm_layer_backward", "lstm_cell_forward", "lstm_cell_backward"]
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_ext::{op}", "CUDA")]
assert lstm_ext.build_info["cuda"], lstm_ext.build_info
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"check_cuda_build: OK: torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"CUDA kernels registered for {', '.join(ops)}")
PY
