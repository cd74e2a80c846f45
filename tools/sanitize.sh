#!/usr/bin/env bash
# The sanitizer leg: lstm_ext built with AddressSanitizer and UndefinedBehaviorSanitizer
# (LSTM_EXT_SANITIZE=address,undefined, see setup.py) in a virtual environment of its own, then the
# tests that feed the kernels odd and wrong inputs, run with gcc's sanitizer runtimes preloaded
# into python (python and libtorch are not instrumented; the extension is). Any report stops the
# process, so any report fails the run.
#
#   bash tools/sanitize.sh [VENV]       VENV: where to make the environment
#                                       (default: $TMPDIR/lstm_ext-sanitize, made anew)
#   TORCH=torch==2.13.0                 the torch to build against (default: CI's)
#
# Took 21 minutes on 2 cores (with other work running): ~4 to install and build, 13 the tests.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root
venv="${1:-${TMPDIR:-/tmp}/lstm_ext-sanitize}"
rm -rf "$venv"
python -m venv "$venv"
"$venv/bin/pip" install -q "${TORCH:-torch==2.13.0}"
"$venv/bin/pip" install -q -r tests/requirements.txt
LSTM_EXT_SANITIZE=address,undefined "$venv/bin/pip" install -q .
# The runtimes of the compiler that built the extension (g++, as torch's cpp_extension uses it).
runtimes="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
for lib in $runtimes; do
  [ -f "$lib" ] || { echo "sanitize.sh: $lib not found (g++'s sanitizer runtime)"; exit 1; }
done
# halt_on_error: the first report ends the process (exit code != 0). detect_leaks=0: python frees
# little at exit (a leak check of repeated calls was clean: see issue 24).
# allocator_may_return_null=1: an impossible allocation raises in torch as without ASan.
export LD_PRELOAD="$runtimes"
export ASAN_OPTIONS=halt_on_error=1:detect_leaks=0:allocator_may_return_null=1:abort_on_error=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
"$venv/bin/python" -c 'import sys, lstm_ext
print("lstm_ext", lstm_ext.build_info)
sys.exit(lstm_ext.build_info["sanitize"] != "address,undefined")'
# --capture=sys: a report is written to file descriptor 2 by C code; pytest's default capture of
# that descriptor would swallow it when the process halts.
"$venv/bin/python" -m pytest -q -p no:cacheprovider --capture=sys \
  tests/test_fuzz.py tests/test_parity.py tests/test_inputs.py tests/test_errors.py \
  tests/test_reset.py tests/test_regularize.py tests/test_layer_norm.py tests/test_lowp.py \
  tests/test_quantized.py
