"""A short pure-PyTorch LSTM: the readable specification that the tests hold the kernels to.

Gate order i, f, g, o (nn.LSTM's). For one step, with x_t [B, I] and h_{t-1} [B, P], c_{t-1} [B, H]:
    z   = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          [B, 4H]
    i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)          each [B, H]
    c_t = f ⊙ c_{t-1} + i ⊙ g                               forget, then remember
    h_t = o ⊙ tanh(c_t)                                     then output
    h_t = h_t W_hr^T                                        only with a projection (proj_size P)

Being plain differentiable PyTorch, it is also what lstm_ext differentiates through when a second
derivative is asked for (create_graph=True).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def lstm_cell_reference(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                        bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
                        weight_hr: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One step: x [B, I], h [B, P], c [B, H] -> (h_t, c_t)."""
    z = x @ weight_ih.T + h @ weight_hh.T
    if bias_ih is not None:
        z = z + bias_ih + bias_hh
    z_i, z_f, z_g, z_o = z.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
    c = f * c + i * g
    h = o * torch.tanh(c)
    if weight_hr is not None:
        h = h @ weight_hr.T
    return h, c


def lstm_layer_reference(input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor,
                         weight_hh: Tensor, bias_ih: Optional[Tensor] = None,
                         bias_hh: Optional[Tensor] = None, weight_hr: Optional[Tensor] = None,
                         batch_sizes: Optional[Tensor] = None,
                         reverse: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction.

    input [T, B, I], or a PackedSequence's data [N, I] with its batch_sizes [T] (step t holds the
    first batch_sizes[t] sequences); h0 [B, P], c0 [B, H]. A reverse layer runs from the last step
    to the first. Returns output (input's layout, P features), h_n [B, P], c_n [B, H]: each
    sequence's state after its last step.
    """
    if batch_sizes is None:
        steps, sizes = list(input.unbind(0)), [input.shape[1]] * input.shape[0]
    else:
        sizes = batch_sizes.tolist()
        steps = list(input.split(sizes))
    h, c = h0, c0
    outputs: List[Optional[Tensor]] = [None] * len(steps)
    for t in (reversed(range(len(steps))) if reverse else range(len(steps))):
        b = sizes[t]  # the sequences still running are the first b
        h_t, c_t = lstm_cell_reference(steps[t], h[:b], c[:b], weight_ih, weight_hh, bias_ih,
                                       bias_hh, weight_hr)
        h, c = torch.cat([h_t, h[b:]]), torch.cat([c_t, c[b:]])
        outputs[t] = h_t
    output = torch.stack(outputs) if batch_sizes is None else torch.cat(outputs)
    return output, h, c


def lstm_reference(input: Tensor, h0: Tensor, c0: Tensor,
                   layers: Sequence[Sequence[Optional[Tensor]]]) -> Tuple[Tensor, Tensor, Tensor]:
    """A stack of unidirectional layers over a sequence.

    input [T, B, I]; h0, c0 [L, B, H]; layers[l] = (weight_ih, weight_hh, bias_ih, bias_hh), the
    biases possibly None. Returns output [T, B, H], h_n [L, B, H], c_n [L, B, H].
    """
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    for layer, weights in enumerate(layers):
        input, h, c = lstm_layer_reference(input, h0[layer], c0[layer], *weights)
        h_n.append(h)
        c_n.append(c)
    return input, torch.stack(h_n), torch.stack(c_n)
