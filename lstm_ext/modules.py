"""Drop-in replacements for torch.nn.LSTM and torch.nn.LSTMCell, running lstm_ext's C++ kernels.

Same constructor signatures, parameter names (weight_ih_l0, bias_hh_l1, ...), initialisation,
forward signatures and return values as torch.nn, so a state_dict loads in both directions.
They subclass nn.Module, not nn.LSTM: Dynamo refuses instances of nn.LSTM.
"""

import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ._ops import _C, lstm, lstm_cell

_GATES = 4  # i, f, g, o


def _shape(t: Tensor) -> List[int]:
    return list(t.shape)


def _check_dtypes(owner: str, params: List[Tuple[str, Tensor]], input: Tensor) -> None:
    """Input and parameters share one floating-point dtype, and the parameters agree."""
    first_name, first = params[0]
    for name, p in params[1:]:
        if p.dtype != first.dtype:
            raise ValueError(f"{owner}: all parameters must share one dtype, but {first_name} is "
                             f"{first.dtype} and {name} is {p.dtype}. Convert the model: "
                             f"model.to({first.dtype})")
    if not input.is_floating_point():
        raise ValueError(f"{owner}: input must be a floating-point tensor, got dtype {input.dtype}. "
                         f"Convert it: input.to({first.dtype})")
    if input.dtype != first.dtype:
        raise ValueError(f"{owner}: input dtype ({input.dtype}) does not match the weights' dtype "
                         f"({first.dtype}). Convert input: input.to({first.dtype}), or convert "
                         f"model: model.to({input.dtype})")


def _check_state(owner: str, name: str, state: Tensor, expected: Tuple[int, ...], ref: Tensor):
    if not isinstance(state, Tensor):
        raise TypeError(f"{owner}: {name} must be a Tensor, got {type(state).__name__}")
    if tuple(state.shape) != expected:
        raise RuntimeError(f"{owner}: Expected {name} of size {expected}, got {_shape(state)}")
    if state.dtype != ref.dtype:
        raise ValueError(f"{owner}: {name} dtype ({state.dtype}) does not match the input dtype "
                         f"({ref.dtype})")
    if state.device != ref.device:
        raise RuntimeError(f"{owner}: {name} is on {state.device} but input is on {ref.device}")


def _unpack_hx(owner: str, hx) -> Tuple[Tensor, Tensor]:
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2
            and all(isinstance(t, Tensor) for t in hx)):
        got = type(hx).__name__ + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else "")
        raise TypeError(f"{owner}: hx must be a tuple (h_0, c_0) of two tensors, got {got}")
    return hx[0], hx[1]


class LSTM(nn.Module):
    r"""A multi-layer LSTM with the interface of :class:`torch.nn.LSTM`, computed by lstm_ext's
    fused C++ kernels: one C++ call runs a layer's whole time loop in one direction, forward or
    backward, and the whole module (every layer and direction) is one op and one autograd node.

    Args (as torch.nn.LSTM): input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
    dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None.

    Shapes, with D = 2 if bidirectional else 1 and P = proj_size or hidden_size (H):
    input [T, B, I] ([B, T, I] with batch_first), unbatched [T, I], or a PackedSequence;
    h_0 [num_layers*D, B, P], c_0 [num_layers*D, B, H] (without the B dimension when unbatched).
    Returns output [T, B, D*P] (same layout as the input; a PackedSequence for one) and
    (h_n, c_n) shaped like (h_0, c_0).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None) -> None:
        super().__init__()
        # The same argument errors and warning as torch.nn.RNNBase.
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("proj_size", proj_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        # Registration order is nn.LSTM's, so reset_parameters draws the same numbers from the RNG.
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else real_hidden * directions
                shapes = [("weight_ih", (_GATES * hidden_size, layer_input)),
                          ("weight_hh", (_GATES * hidden_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (_GATES * hidden_size,)),
                               ("bias_hh", (_GATES * hidden_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for kind, shape in shapes:
                    name = f"{kind}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._all_weights.append(names)
        self._init_flat_weights()
        self.reset_parameters()

    # As nn.RNNBase: the flat parameter list (nn.LSTM's order, what the op takes) is cached, and
    # refreshed whenever a parameter is replaced (assignment, .to(), .double(),
    # load_state_dict(assign=True)), so that forward does not look up every parameter by name on
    # each call.
    def _init_flat_weights(self) -> None:
        self._flat_named = [(name, getattr(self, name))
                            for names in self._all_weights for name in names]
        self._flat_weights = [p for _, p in self._flat_named]

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if "_all_weights" in self.__dict__ and isinstance(value, nn.Parameter) and any(
                name in names for names in self._all_weights):
            self._init_flat_weights()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._init_flat_weights()
        return result

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_flat_weights()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as nn.LSTM."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for nn.LSTM runs unchanged: lstm_ext needs no flat buffer."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        owner = "lstm_ext.LSTM"
        directions = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        packed = isinstance(input, PackedSequence)
        batch_sizes = sorted_indices = unsorted_indices = None
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            batched = True
        elif not isinstance(input, Tensor):
            raise TypeError(f"{owner}: input must be a Tensor or a PackedSequence, got "
                            f"{type(input).__name__}")
        elif input.dim() not in (2, 3):
            raise ValueError(f"{owner}: Expected input to be 2-D (unbatched [T, input_size]) or 3-D "
                             f"(batched), got a {input.dim()}-D tensor of shape {_shape(input)}")
        else:
            batched = input.dim() == 3
        _check_dtypes(owner, self._flat_named, input)
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{owner}: input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.shape[-1]} (input shape "
                               f"{_shape(input)})")
        if not packed:
            if not batched:
                input = input.unsqueeze(1)  # [T, 1, I]
            elif self.batch_first:
                input = input.transpose(0, 1)  # [T, B, I]; the op makes it contiguous
            if input.shape[0] == 0:
                raise RuntimeError(f"{owner}: Expected sequence length to be larger than 0, got "
                                   f"input of shape {_shape(input if batched else input[:, 0])}")

        if hx is None:
            h0 = c0 = None  # the op starts every layer from zeros
        else:
            h0, c0 = _unpack_hx(owner, hx)
            rank = 3 if batched else 2
            if h0.dim() != rank or c0.dim() != rank:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(f"{owner}: For {kind} input, hx and cx should also be {rank}-D "
                                   f"but got ({h0.dim()}-D, {c0.dim()}-D) tensors")
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            states = self.num_layers * directions
            batch = int(batch_sizes[0]) if packed else input.shape[1]
            _check_state(owner, "hx[0] (h_0)", h0, (states, batch, real_hidden), input)
            _check_state(owner, "hx[1] (c_0)", c0, (states, batch, self.hidden_size), input)
            if sorted_indices is not None:  # the packed batch is sorted by length
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)

        # One C++ op (and one graph node) for every layer and direction. Eager calls it through
        # its typed pybind11 binding (_C.lstm: no boxing of the arguments, a third of the forward's
        # cost at small sizes); torch.compile traces torch.ops.lstm_ext.lstm, the same op.
        op = lstm if torch.compiler.is_compiling() else _C.lstm
        output, h_n_t, c_n_t = op(input, h0, c0, self._flat_weights, self.bias,
                                  self.proj_size > 0, self.num_layers, self.dropout,
                                  self.training, self.bidirectional, batch_sizes)
        if packed:
            if unsorted_indices is not None:
                h_n_t = h_n_t.index_select(1, unsorted_indices)
                c_n_t = c_n_t.index_select(1, unsorted_indices)
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    (h_n_t, c_n_t))
        if not batched:
            return output.squeeze(1), (h_n_t.squeeze(1), c_n_t.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n_t, c_n_t)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)


class LSTMCell(nn.Module):
    r"""One LSTM step with the interface of :class:`torch.nn.LSTMCell`, computed by one fused C++ op.

    Args (as torch.nn.LSTMCell): input_size, hidden_size, bias=True, device=None, dtype=None.
    Shapes: input [B, I] or unbatched [I]; hx = (h_0, c_0), each [B, H] (or [H]), default zeros.
    Returns (h_1, c_1), each [B, H] (or [H]).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty((_GATES * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((_GATES * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(_GATES * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(_GATES * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as nn.LSTMCell."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        owner = "lstm_ext.LSTMCell"
        if not isinstance(input, Tensor):
            raise TypeError(f"{owner}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{owner}: Expected input to be 1-D (unbatched) or 2-D [B, input_size],"
                             f" got a {input.dim()}-D tensor of shape {_shape(input)}")
        params = [("weight_ih", self.weight_ih), ("weight_hh", self.weight_hh)]
        if self.bias:  # named here: named_parameters() costs microseconds per call
            params += [("bias_ih", self.bias_ih), ("bias_hh", self.bias_hh)]
        _check_dtypes(owner, params, input)
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"{owner}: input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.shape[-1]} (input shape "
                               f"{_shape(input)})")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        state_shape = (input.shape[0], self.hidden_size)
        if hx is None:
            hx_t = cx_t = torch.zeros(state_shape, dtype=input.dtype, device=input.device)
        else:
            hx_t, cx_t = _unpack_hx(owner, hx)
            rank = 2 if batched else 1
            if hx_t.dim() != rank or cx_t.dim() != rank:
                raise RuntimeError(f"{owner}: Expected hx[0] and hx[1] to be {rank}-D like the "
                                   f"{'batched' if batched else 'unbatched'} input, got "
                                   f"({hx_t.dim()}-D, {cx_t.dim()}-D) tensors")
            if not batched:
                hx_t, cx_t = hx_t.unsqueeze(0), cx_t.unsqueeze(0)
            _check_state(owner, "hx[0] (h_0)", hx_t, state_shape, input)
            _check_state(owner, "hx[1] (c_0)", cx_t, state_shape, input)
        # As LSTM.forward: the typed binding in eager, torch.ops under torch.compile.
        op = lstm_cell if torch.compiler.is_compiling() else _C.lstm_cell
        hy, cy = op(input, hx_t, cx_t, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not batched:
            return hy.squeeze(0), cy.squeeze(0)
        return hy, cy

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return s.format(**self.__dict__)
