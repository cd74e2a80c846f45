"""A short pure-PyTorch LSTM: the readable specification that the tests hold the kernels to.

Gate order i, f, g, o (nn.LSTM's). For one step, with x_t [B, I] and h_{t-1}, c_{t-1} [B, H]:
    z   = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          [B, 4H]
    i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)          each [B, H]
    c_t = f ⊙ c_{t-1} + i ⊙ g                               forget, then remember
    h_t = o ⊙ tanh(c_t)                                     then output
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def lstm_cell_reference(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                        bias_ih: Optional[Tensor] = None,
                        bias_hh: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One step: x [B, I], h, c [B, H] -> (h_t, c_t)."""
    z = x @ weight_ih.T + h @ weight_hh.T
    if bias_ih is not None:
        z = z + bias_ih + bias_hh
    z_i, z_f, z_g, z_o = z.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    return h, c


def lstm_reference(input: Tensor, h0: Tensor, c0: Tensor,
                   layers: Sequence[Sequence[Optional[Tensor]]]) -> Tuple[Tensor, Tensor, Tensor]:
    """A stack of layers over a sequence.

    input [T, B, I]; h0, c0 [L, B, H]; layers[l] = (weight_ih, weight_hh, bias_ih, bias_hh), the
    biases possibly None. Returns output [T, B, H], h_n [L, B, H], c_n [L, B, H].
    """
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    for layer, weights in enumerate(layers):
        h, c = h0[layer], c0[layer]
        outputs = []
        for x in input:
            h, c = lstm_cell_reference(x, h, c, *weights)
            outputs.append(h)
        input = torch.stack(outputs)
        h_n.append(h)
        c_n.append(c)
    return input, torch.stack(h_n), torch.stack(c_n)
