#!/usr/bin/env bash
# On a machine with a GPU and a CUDA build of torch: build lstm_ext there, run the CUDA tests and the
# GPU benchmark (lstm_ext vs nn.LSTM on cuDNN), and keep every log under $OUT (default ./gpu_results).
#   bash tools/gpu_run.sh
set -uo pipefail
mkdir -p "${OUT:-gpu_results}"
out="$(cd "${OUT:-gpu_results}" && pwd)"  # absolute: the self-check runs from another folder
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
# --no-deps: the machine's own torch is used as it is, nothing is downloaded.
if ! pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  exit 1
fi
(cd /tmp && python -m lstm_ext) 2>&1 | tee "$out/selfcheck.log"
# The pytest command, not python -m pytest (which would import the unbuilt source tree).
pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests_rc=${PIPESTATUS[0]}
plot=()
python -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/gpu_speedup.png")
python benchmarks/bench_lstm.py --device cuda --csv "$out/gpu.csv" "${plot[@]}" \
  --shapes 20,5,1,16 100,1,128,128 100,64,256,256 50,128,512,512 100,64,512,1024 \
  2>&1 | tee "$out/bench_cuda.log"
exit "$tests_rc"
