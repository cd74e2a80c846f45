"""lstm_ext: a fused C++ LSTM for PyTorch, a drop-in replacement for torch.nn.LSTM / LSTMCell.

    import lstm_ext
    lstm = lstm_ext.LSTM(input_size=1, hidden_size=16)   # same arguments as torch.nn.LSTM
    output, (h_n, c_n) = lstm(x)                         # x: [T, B, 1]

The ops are registered as torch.ops.lstm_ext.lstm (the whole module), lstm_layer and lstm_cell
(differentiable), and their kernels as torch.ops.lstm_ext.{lstm_layer,lstm_cell}_{forward,backward}.
"""


def _built_package_path(path):
    """Where this package's submodules are: here, or, in a source checkout, the installed copy.

    `python -m ...` run from the repository root puts the checkout first on sys.path, and its
    lstm_ext/ has no compiled module (`pip install .` puts that into site-packages). The
    submodules then come from the installed package, so that `python -m lstm_ext.sincos`,
    `python -m pytest` and `import lstm_ext` work from the root as from anywhere else. (An editable
    install builds the module here, so it stays here.)"""
    import glob
    import importlib.machinery
    import os
    import sys

    here = path[0]
    if glob.glob(os.path.join(here, "_C.*")):
        return path
    checkout = os.path.realpath(os.path.dirname(here))
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or ".") != checkout]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None or not spec.submodule_search_locations:
        return path  # nothing installed: _ops says how to install it
    installed = list(spec.submodule_search_locations)
    return installed if glob.glob(os.path.join(installed[0], "_C.*")) else path


__path__ = _built_package_path(__path__)

from ._ops import _build_info, _C
from .functional import lstm_cell, lstm_layer
from .modules import LSTM, LSTMCell
from . import quantized
from .quantized import quantize_dynamic

__version__ = "0.1.0"

#: What this installation was built with: the torch version, whether CUDA kernels were compiled,
#: whether the CPU kernels call MKL's BLAS and vector math (VML) directly (else through
#: at::mm and scalar libm, slower per step), and the sanitizers it was built with (none: "").
build_info = {
    "torch_version": _build_info.torch_version,
    "cuda": _build_info.cuda,
    "direct_blas": bool(_C.has_direct_blas),
    "vector_math": bool(_C.has_vml),
    "sanitize": getattr(_build_info, "sanitize", ""),
}

__all__ = ["LSTM", "LSTMCell", "lstm_layer", "lstm_cell", "quantize_dynamic", "quantized",
           "build_info", "__version__"]
