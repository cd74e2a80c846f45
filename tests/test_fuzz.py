"""A seeded fuzz of every op and module (tests/fuzz_calls.py) in a child process: each of its calls
returns or raises a Python exception, so the child exits 0; a crash (a segmentation fault, an abort,
or a sanitizer's report in the LSTM_EXT_SANITIZE build, which halts on the first) fails the test
with the child's last output."""

import os
import subprocess
import sys

import pytest

FUZZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_calls.py")


def run_fuzz(*args, timeout=600):
    return subprocess.run([sys.executable, "-X", "faulthandler", FUZZ, *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_call_returns_or_raises(seed):
    result = run_fuzz("--seed", str(seed), "--calls", "3000")
    assert result.returncode == 0, (
        f"the fuzz process died (exit {result.returncode}); its last output:\n"
        f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}")
    summary = result.stdout.strip().splitlines()[-1]
    assert "3000 calls" in summary, result.stdout
    # The fuzz is no fuzz if everything raises: most calls must reach the kernels and return.
    returned = int(summary.split(" returned")[0].split()[-1])
    assert returned >= 1000, summary


def test_a_crash_in_the_child_fails():
    """The harness sees a crash: a child that segfaults exits with -SIGSEGV, not 0."""
    crash = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"],
                           capture_output=True)
    assert crash.returncode != 0
