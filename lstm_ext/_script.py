"""TorchScript: `torch.jit.script` of lstm_ext.LSTM / LSTMCell and of models holding them.

The eager modules' forward is not TorchScript (it routes PackedSequence, parametrized weights,
torch.func and ONNX export in Python that the scripter does not compile), so each module's
`__prepare_scriptable__` (the hook torch.jit.script calls on a module and on every submodule, as
torchvision's ops use it) hands the scripter one of the modules below instead: the same
Parameter objects under the same names (so the scripted model's state_dict is the eager one's),
and a forward TorchScript compiles that calls the same op, torch.ops.lstm_ext.lstm / lstm_cell,
with the same arguments. A scripted model saved with torch.jit.save loads with torch.jit.load in
any process that has imported lstm_ext (which registers the ops).

What they take: Tensor inputs, batched or unbatched, batch_first, (h_0, c_0) or None, and every
option of the module (layers, bidirectional, proj_size, dropout, zoneout, recurrent dropout,
layer_norm; training and eval). Not: a PackedSequence, the per-step `reset` argument,
parametrized weights (torch.nn.utils.parametrize) -- scripting raises a clear error for the last.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


def _own_parameters(owner: str, source: nn.Module, target: nn.Module, names: List[str]) -> None:
    for name in names:
        weight = getattr(source, name, None)
        if name in getattr(source, "parametrizations", {}) or not isinstance(weight, nn.Parameter):
            raise RuntimeError(
                f"{owner}: torch.jit.script needs plain nn.Parameter weights; {name} is "
                f"{'parametrized' if weight is not None else 'missing'} (remove the "
                "parametrization first, e.g. torch.nn.utils.parametrize.remove_parametrizations)")
        target.register_parameter(name, weight)


class ScriptableLSTM(nn.Module):
    """lstm_ext.LSTM for torch.jit.script (see the module docstring)."""

    __constants__ = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                     "bidirectional", "proj_size", "zoneout_c", "zoneout_h", "recurrent_dropout",
                     "layer_norm"]

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.input_size: int = module.input_size
        self.hidden_size: int = module.hidden_size
        self.num_layers: int = module.num_layers
        self.bias: bool = module.bias
        self.batch_first: bool = module.batch_first
        self.dropout: float = float(module.dropout)
        self.bidirectional: bool = module.bidirectional
        self.proj_size: int = module.proj_size
        self.zoneout_c: float = float(module.zoneout[0])
        self.zoneout_h: float = float(module.zoneout[1])
        self.recurrent_dropout: float = float(module.recurrent_dropout)
        self.layer_norm: bool = bool(module.layer_norm)
        names = list(module._flat_weights_names)
        _own_parameters("lstm_ext.LSTM", module, self, names)
        # The op's params, in nn.LSTM's order (as nn.LSTM keeps _flat_weights for TorchScript).
        self._flat_weights: List[Tensor] = [getattr(self, name) for name in names]
        self.train(module.training)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError("LSTM: Expected input to be 2D or 3D, got " + str(input.dim()) +
                             "D instead (lstm_ext.LSTM, scripted)")
        if input.size(-1) != self.input_size:
            raise RuntimeError("input.size(-1) must be equal to input_size. Expected " +
                               str(self.input_size) + ", got " + str(input.size(-1)) +
                               " (lstm_ext.LSTM, scripted)")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)
        h0: Optional[Tensor] = None
        c0: Optional[Tensor] = None
        if hx is not None:
            h0, c0 = hx[0], hx[1]
            rank = 3 if batched else 2
            if h0.dim() != rank or c0.dim() != rank:
                raise RuntimeError("For " + ("batched 3-D" if batched else "unbatched 2-D") +
                                   " input, hx and cx should also be " + str(rank) + "-D but got (" +
                                   str(h0.dim()) + "-D, " + str(c0.dim()) + "-D) tensors")
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        output, h_n, c_n = torch.ops.lstm_ext.lstm(
            input, h0, c0, self._flat_weights, self.bias, self.proj_size > 0, self.num_layers,
            self.dropout, self.training, self.bidirectional, None, None, self.zoneout_c,
            self.zoneout_h, self.recurrent_dropout if self.training else 0.0, self.layer_norm)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)


class ScriptableLSTMCell(nn.Module):
    """lstm_ext.LSTMCell for torch.jit.script (see the module docstring)."""

    __constants__ = ["input_size", "hidden_size"]

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.input_size: int = module.input_size
        self.hidden_size: int = module.hidden_size
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])
        _own_parameters("lstm_ext.LSTMCell", module, self, names)
        if not module.bias:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tensor]:
        if input.dim() != 1 and input.dim() != 2:
            raise ValueError("LSTMCell: Expected input to be 1D or 2D, got " + str(input.dim()) +
                             "D instead (lstm_ext.LSTMCell, scripted)")
        # The sizes the op checks, in nn.LSTMCell's words (a RuntimeError, as scripted nn's).
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            h = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                            device=input.device)
            c = h
        else:
            h, c = hx[0], hx[1]
            if not batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        hy, cy = torch.ops.lstm_ext.lstm_cell(input, h, c, self.weight_ih, self.weight_hh,
                                              self.bias_ih, self.bias_hh)
        if not batched:
            return hy.squeeze(0), cy.squeeze(0)
        return hy, cy
