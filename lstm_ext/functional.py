"""Autograd for the C++ ops: one autograd node per layer (the whole time loop) or per cell step.

Shapes (gate order i, f, g, o as nn.LSTM):
  layer: input [T, B, I], h0 and c0 [B, H] -> output [T, B, H], h_n [B, H], c_n [B, H]
  cell:  input [B, I],    hx and cx [B, H] -> hy [B, H], cy [B, H]
  weight_ih [4H, I], weight_hh [4H, H], bias_ih and bias_hh [4H] or None
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops


def _bias_grads(ctx, grad_bias: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The kernels return one bias gradient; it belongs to bias_ih and bias_hh alike."""
    need_ih, need_hh = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
    grad_ih = grad_bias if need_ih else None
    # A separate tensor for the second bias, so the two .grad fields never share storage.
    grad_hh = (grad_bias.clone() if need_ih else grad_bias) if need_hh else None
    return grad_ih, grad_hh


def _needed(ctx, grads: Tuple[Tensor, ...]) -> Tuple[Optional[Tensor], ...]:
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


class LSTMLayerFunction(torch.autograd.Function):
    """One LSTM layer over all time steps; forward and backward each run as a single C++ op."""

    @staticmethod
    def forward(ctx, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
        output, h_n, c_n, gates, cells = _ops.lstm_layer_forward(
            input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, True)
        ctx.save_for_backward(input, h0, c0, weight_ih, weight_hh, output, gates, cells)
        ctx.set_materialize_grads(False)
        return output, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        input, h0, c0, weight_ih, weight_hh, output, gates, cells = ctx.saved_tensors
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias = _ops.lstm_layer_backward(
            grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates,
            cells)
        grad_b_ih, grad_b_hh = _bias_grads(ctx, grad_bias)
        return _needed(ctx, (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh)) + (
            grad_b_ih, grad_b_hh)


class LSTMCellFunction(torch.autograd.Function):
    """One LSTM time step; forward and backward each run as a single C++ op."""

    @staticmethod
    def forward(ctx, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
        hy, cy, gates = _ops.lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
        ctx.save_for_backward(input, hx, cx, cy, gates, weight_ih, weight_hh)
        ctx.set_materialize_grads(False)
        return hy, cy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hy, grad_cy):
        input, hx, cx, cy, gates, weight_ih, weight_hh = ctx.saved_tensors
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
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run one LSTM layer over a whole sequence in C++.

    Args:
        input: [T, B, I]. h0, c0: [B, H]. weight_ih: [4H, I]. weight_hh: [4H, H].
        bias_ih, bias_hh: [4H], or both None.
    Returns:
        output [T, B, H] (h_t of every step), h_n [B, H], c_n [B, H].
    Without autograd (no_grad, or nothing requires grad) the op keeps no state for a backward.
    """
    args = (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    if _needs_autograd(*args):
        return LSTMLayerFunction.apply(*args)
    output, h_n, c_n, _, _ = _ops.lstm_layer_forward(*args, False)
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
