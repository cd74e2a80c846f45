"""lstm_ext: a fused C++ LSTM for PyTorch, a drop-in replacement for torch.nn.LSTM / LSTMCell.

    import lstm_ext
    lstm = lstm_ext.LSTM(input_size=1, hidden_size=16)   # same arguments as torch.nn.LSTM
    output, (h_n, c_n) = lstm(x)                         # x: [T, B, 1]

The ops are registered as torch.ops.lstm_ext.lstm (the whole module), lstm_layer and lstm_cell
(differentiable), and their kernels as torch.ops.lstm_ext.{lstm_layer,lstm_cell}_{forward,backward}.
"""

from ._ops import _build_info, _C
from .functional import lstm_cell, lstm_layer
from .modules import LSTM, LSTMCell

__version__ = "0.1.0"

#: What this installation was built with: the torch version, whether CUDA kernels were compiled,
#: and whether the CPU kernels call MKL's BLAS and vector math (VML) directly (else through
#: at::mm and scalar libm, slower per step).
build_info = {
    "torch_version": _build_info.torch_version,
    "cuda": _build_info.cuda,
    "direct_blas": bool(_C.has_direct_blas),
    "vector_math": bool(_C.has_vml),
}

__all__ = ["LSTM", "LSTMCell", "lstm_layer", "lstm_cell", "build_info", "__version__"]
