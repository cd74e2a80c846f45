"""ONNX export: lstm_ext's modules as ONNX's standard LSTM node (and nn.LSTMCell's graph).

An ONNX model runs in another runtime (ONNX Runtime, OpenVINO, TensorRT), with that runtime's own
LSTM kernel: what matters is that the graph says LSTM in ONNX's words. So while torch.onnx.export
traces the model (both exporters: TorchScript's and dynamo=True), the modules record the ATen op
nn.LSTM records, aten::lstm (aten::lstm_cell for LSTMCell), which both exporters translate into
ONNX's LSTM node: the same graph as nn.LSTM's, the weights in the same layout.

ONNX's LSTM has no projection (proj_size): such a module is recorded as the pure-PyTorch
reference instead (MatMul, Sigmoid, Tanh... unrolled over the steps of the example input), which
every runtime runs, for that sequence length only. (nn.LSTM's TorchScript export refuses
projections; its dynamo export writes an LSTM node that ONNX Runtime rejects.)

Only during an export: `exporting()` is asked only when torch is tracing or compiling.
"""

import warnings
from typing import List, Optional

import torch
from torch import Tensor

from .reference import lstm_reference


def exporting() -> bool:
    """Whether torch.onnx.export is tracing (is_in_onnx_export costs about a microsecond)."""
    return torch.onnx.is_in_onnx_export()


def lstm(input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], params: List[Tensor],
         has_biases: bool, has_projections: bool, num_layers: int, dropout: float, train: bool,
         bidirectional: bool, batch_sizes: Optional[Tensor]):
    """torch.ops.lstm_ext.lstm's arguments and results, recorded as aten::lstm (or, with a
    projection, as the reference)."""
    directions = 2 if bidirectional else 1
    hidden = params[1].shape[0] // 4
    real_hidden = params[1].shape[1]
    if h0 is None:
        batch = input.shape[1] if batch_sizes is None else int(batch_sizes[0])
        h0 = input.new_zeros(num_layers * directions, batch, real_hidden)
        c0 = input.new_zeros(num_layers * directions, batch, hidden)
    if has_projections:
        if train and dropout > 0 and num_layers > 1:
            raise RuntimeError("lstm_ext.LSTM: ONNX export of a module with proj_size > 0 and "
                               "dropout in training mode is not supported: export in eval mode "
                               "(model.eval())")
        warnings.warn("lstm_ext.LSTM with proj_size > 0 is exported to ONNX as standard ops "
                      "unrolled over the example input's sequence length (ONNX's LSTM node has "
                      "no projection): the model runs for that sequence length only",
                      stacklevel=3)
        return lstm_reference(input, h0, c0, params, has_biases, True, num_layers,
                              bidirectional, batch_sizes)
    if batch_sizes is None:
        return torch._VF.lstm(input, (h0, c0), params, has_biases, num_layers, dropout, train,
                              bidirectional, False)
    return torch._VF.lstm(input, batch_sizes, (h0, c0), params, has_biases, num_layers, dropout,
                          train, bidirectional)


def lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
    """torch.ops.lstm_ext.lstm_cell's arguments and results, recorded as aten::lstm_cell."""
    return torch._VF.lstm_cell(input, (hx, cx), weight_ih, weight_hh, bias_ih, bias_hh)
