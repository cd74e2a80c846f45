"""The installed package: what it was built with, and a clear ImportError under another torch."""

import subprocess
import sys

import torch

import lstm_ext


def test_build_info_records_this_torch():
    assert lstm_ext.build_info["torch_version"] == torch.__version__
    assert lstm_ext._C.torch_version == torch.__version__
    assert isinstance(lstm_ext.build_info["cuda"], bool)
    assert isinstance(lstm_ext.build_info["direct_blas"], bool)
    assert isinstance(lstm_ext.build_info["vector_math"], bool)


def test_ops_are_registered_with_a_cpu_kernel():
    for op in ("lstm_layer_forward", "lstm_layer_backward", "lstm_cell_forward",
               "lstm_cell_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_ext::{op}", "CPU"), op


def test_import_under_another_torch_is_a_clear_import_error():
    # Pretend the running torch is another release: the import must refuse before loading the
    # compiled module, naming both versions and the rebuild command.
    code = ("import torch; torch.__version__ = '0.0.1'\n"
            "try:\n"
            "    import lstm_ext\n"
            "except ImportError as e:\n"
            "    print('IMPORT-ERROR:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "IMPORT-ERROR:" in message
    assert f"built against torch {torch.__version__}" in message
    assert "torch 0.0.1 is installed" in message
    assert "pip install --no-build-isolation" in message


def test_portable_fallback_without_mkl_matches_nn_lstm():
    """With LSTM_EXT_NO_MKL=1 the kernels use at::mm and scalar exp/tanh: still exact."""
    import os
    env = dict(os.environ, LSTM_EXT_NO_MKL="1")
    result = subprocess.run([sys.executable, "-m", "lstm_ext"], capture_output=True, text=True,
                            timeout=300, cwd="/", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "'direct_blas': False, 'vector_math': False" in result.stdout
    assert "match nn.LSTM" in result.stdout and ": OK" in result.stdout
