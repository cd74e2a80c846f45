"""Autograd for the C++ ops: one autograd node per layer and direction (the whole time loop), or per
cell step.

Shapes (gate order i, f, g, o as nn.LSTM):
  layer: input [T, B, I] (or a PackedSequence's data [N, I] with its batch_sizes [T]),
         h0 [B, P], c0 [B, H] -> output [T, B, P] (or [N, P]), h_n [B, P], c_n [B, H]
  cell:  input [B, I], hx and cx [B, H] -> hy [B, H], cy [B, H]
  weight_ih [4H, I], weight_hh [4H, P], bias_ih and bias_hh [4H] or None,
  weight_hr [P, H] or None (proj_size P; without it P = H)

First derivatives come from the C++ backward ops. A second derivative (backward with
create_graph=True) is computed by differentiating the pure-PyTorch reference of the same step or
layer (lstm_ext/reference.py): exact, slower, and used only when asked for.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _ops
from .reference import lstm_cell_reference, lstm_layer_reference

_BIAS_IH, _BIAS_HH = 5, 6  # positions of the biases among the Functions' inputs


def _bias_grads(ctx, grad_bias: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The kernels return one bias gradient; it belongs to bias_ih and bias_hh alike."""
    need_ih, need_hh = ctx.needs_input_grad[_BIAS_IH], ctx.needs_input_grad[_BIAS_HH]
    grad_ih = grad_bias if need_ih else None
    # A separate tensor for the second bias, so the two .grad fields never share storage.
    grad_hh = (grad_bias.clone() if need_ih else grad_bias) if need_hh else None
    return grad_ih, grad_hh


def _needed(ctx, grads: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _differentiable_grads(ctx, reference: Callable, inputs: Sequence[Optional[Tensor]],
                          grad_outputs: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of reference(*inputs) with create_graph=True: a backward that is itself
    differentiable, for double backward. inputs are the Function's tensor inputs, in order."""
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    with torch.enable_grad():
        outputs = reference(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
    result: list = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result)


class LSTMLayerFunction(torch.autograd.Function):
    """One LSTM layer in one direction over all time steps; forward and backward each run as a
    single C++ op."""

    @staticmethod
    def forward(ctx, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                batch_sizes, reverse):
        output, h_n, c_n, gates, cells = _ops.lstm_layer_forward(
            input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
            reverse, True)
        ctx.save_for_backward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                              output, gates, cells)
        ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        ctx.set_materialize_grads(False)
        return output, h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, output, gates,
         cells) = ctx.saved_tensors
        inputs = (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
            def reference(*tensors):
                return lstm_layer_reference(*tensors, batch_sizes=ctx.batch_sizes,
                                            reverse=ctx.reverse)
            return _differentiable_grads(ctx, reference, inputs,
                                         (grad_output, grad_h_n, grad_c_n)) + (None, None)
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = \
            _ops.lstm_layer_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih,
                                     weight_hh, weight_hr, ctx.batch_sizes, ctx.reverse, output,
                                     gates, cells)
        grad_b_ih, grad_b_hh = _bias_grads(ctx, grad_bias)
        grad_w_hr = grad_w_hr if ctx.needs_input_grad[7] else None
        return _needed(ctx, (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh)) + (
            grad_b_ih, grad_b_hh, grad_w_hr, None, None)


class LSTMCellFunction(torch.autograd.Function):
    """One LSTM time step; forward and backward each run as a single C++ op."""

    @staticmethod
    def forward(ctx, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
        hy, cy, gates = _ops.lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
        ctx.save_for_backward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, cy, gates)
        ctx.set_materialize_grads(False)
        return hy, cy

    @staticmethod
    def backward(ctx, grad_hy, grad_cy):
        input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, cy, gates = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
            return _differentiable_grads(ctx, lstm_cell_reference,
                                         (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh),
                                         (grad_hy, grad_cy))
        grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias = _ops.lstm_cell_backward(
            grad_hy, grad_cy, input, hx, cx, cy, gates, weight_ih, weight_hh)
        grad_b_ih, grad_b_hh = _bias_grads(ctx, grad_bias)
        return _needed(ctx, (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh)) + (
            grad_b_ih, grad_b_hh)


def _needs_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
    args = (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    if _needs_autograd(*args):
        return LSTMLayerFunction.apply(*args, batch_sizes, reverse)
    output, h_n, c_n, _, _ = _ops.lstm_layer_forward(*args, batch_sizes, reverse, False)
    return output, h_n, c_n


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
    args = (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    if _needs_autograd(*args):
        return LSTMCellFunction.apply(*args)
    hy, cy, _ = _ops.lstm_cell_forward(*args)
    return hy, cy
