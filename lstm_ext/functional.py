"""The differentiable functions: one LSTM layer in one direction over a whole sequence, and one LSTM
cell step. Each is a single call of a C++ op whose autograd node is also C++
(csrc/autograd.cpp): forward and backward each run as one C++ kernel, with no Python in between.

Shapes (gate order i, f, g, o as nn.LSTM):
  layer: input [T, B, I] (or a PackedSequence's data [N, I] with its batch_sizes [T]),
         h0 [B, P], c0 [B, H] -> output [T, B, P] (or [N, P]), h_n [B, P], c_n [B, H]
  cell:  input [B, I], hx and cx [B, H] -> hy [B, H], cy [B, H]
  weight_ih [4H, I], weight_hh [4H, P], bias_ih and bias_hh [4H] or None,
  weight_hr [P, H] or None (proj_size P; without it P = H)

First derivatives come from the C++ backward kernels. A second derivative (backward with
create_graph=True) differentiates the pure-PyTorch reference of the same layer or step
(lstm_ext/reference.py): exact, slower, and used only when asked for.
"""

from typing import Optional, Tuple

from torch import Tensor

from . import _functorch, _ops


def lstm_layer(
    input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
    weight_hr: Optional[Tensor] = None, batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one LSTM layer, in one direction, over a whole sequence in C++.

    Args:
        input: [T, B, I], or a PackedSequence's data [N, I] together with its batch_sizes [T].
        h0: [B, P]. c0: [B, H]. weight_ih: [4H, I]. weight_hh: [4H, P].
        bias_ih, bias_hh: [4H], or both None. weight_hr: [P, H] (proj_size P) or None (P = H).
        reverse: run from the last step to the first (the backward direction of a bidirectional
            LSTM); output[t] is still the output at time t.
    Returns:
        output [T, B, P] (or [N, P]), h_n [B, P], c_n [B, H] (each sequence's last state).
    Without autograd (no_grad, or nothing requires grad) the op keeps no state for a backward.
    """
    op = _functorch.lstm_layer if _functorch.transforms_active() else _ops.lstm_layer
    return op(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
              reverse)


def lstm_cell(
    input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Run one fused LSTM step in C++.

    Args:
        input: [B, I]. hx, cx: [B, H]. weight_ih: [4H, I]. weight_hh: [4H, H].
        bias_ih, bias_hh: [4H], or both None.
    Returns:
        hy [B, H], cy [B, H].
    """
    op = _functorch.lstm_cell if _functorch.transforms_active() else _ops.lstm_cell
    return op(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
