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

from . import _functorch, _onnx
from ._ops import _C, lstm, lstm_cell

_GATES = 4  # i, f, g, o


def _is_probability(p) -> bool:
    return isinstance(p, numbers.Real) and not isinstance(p, bool) and 0 <= p < 1


def _zoneout_pair(owner: str, zoneout) -> Tuple[float, float]:
    """A module's zoneout argument (p, or (p_c, p_h)), checked -> (p_c, p_h)."""
    pair = zoneout if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
    if len(pair) != 2 or not all(_is_probability(p) for p in pair):
        raise ValueError(f"{owner}: zoneout should be a number in range [0, 1), or a pair "
                         f"(p_c, p_h) of them, got {zoneout!r}")
    return float(pair[0]), float(pair[1])


def _zoneout_repr(zoneout: Tuple[float, float]) -> str:
    """", zoneout=..." for a module's extra_repr, or "" when off."""
    if zoneout == (0.0, 0.0):
        return ""
    return f", zoneout={zoneout[0] if zoneout[0] == zoneout[1] else zoneout}"


def _shape(t: Tensor) -> List[int]:
    return list(t.shape)


# Error messages start with nn.LSTM's / nn.LSTMCell's own words and exception type, so code and
# tests that match on them keep working; lstm_ext's details follow in parentheses.


def _scalar_type_name(dtype: torch.dtype) -> str:
    """c10's name of a dtype, as ATen's errors print it (Float, Double, BFloat16, Long...)."""
    return torch.empty(0, dtype=dtype).type().split(".")[-1][:-len("Tensor")]


def _dtype_error(owner: str, what: str, got: torch.dtype, expected: torch.dtype,
                 advice: str) -> Exception:
    """nn.LSTM checks the input dtype itself (ValueError, "RNN input dtype ..."); nn.LSTMCell
    leaves it to the matrix product (RuntimeError, "mat1 and mat2 must have the same dtype ...")."""
    if owner == "lstm_ext.LSTMCell":
        return RuntimeError(f"mat1 and mat2 must have the same dtype, but got "
                            f"{_scalar_type_name(got)} and {_scalar_type_name(expected)} ({owner}: "
                            f"{what} dtype ({got}) does not match the weights' dtype ({expected}). "
                            f"{advice})")
    return ValueError(f"RNN {what} dtype ({got}) does not match weight dtype ({expected}). "
                      f"{advice}")


def _check_input_dtype(owner: str, input: Tensor, weight: Tensor) -> None:
    """The input has the weights' dtype (nn.LSTM's check, which it skips under torch.autocast:
    the op's autocast kernel casts them alike). That the weights share one dtype and device, and
    the input's device, the op checks (in nn's words where nn has some)."""
    if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
        advice = f"Convert input: input.to({weight.dtype}), " + (
            f"or convert model: model.to({input.dtype})" if input.is_floating_point() else
            f"({owner} computes in floating point)")
        raise _dtype_error(owner, "input", input.dtype, weight.dtype, advice)


def _check_state_dtype(owner: str, name: str, state: Tensor, input: Tensor) -> None:
    """A state has the input's dtype, outside torch.autocast. (Its device the op checks, in nn's
    words.)"""
    if state.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
        if owner == "lstm_ext.LSTMCell":
            raise _dtype_error(owner, name, state.dtype, input.dtype,
                               f"Convert it: {name.split()[0]}.to({input.dtype})")
        raise ValueError(f"{owner}: {name} dtype ({state.dtype}) does not match the input dtype "
                         f"({input.dtype})")


def _unpack_hx(owner: str, op: str, hx) -> Tuple[Tensor, Tensor]:
    """hx = (h_0, c_0); `op` is nn's name for the wrong-length message (lstm, lstm_cell)."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"{owner}: hx must be a tuple (h_0, c_0) of two tensors, got "
                        f"{type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError(f"{op} expects two hidden states ({owner}: hx is a "
                           f"{type(hx).__name__} of {len(hx)}; give (h_0, c_0))")
    for index, t in enumerate(hx):
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: hx[{index}] must be a Tensor, got {type(t).__name__}")
    return hx[0], hx[1]


def _time_major_inputs(module: nn.Module, owner: str, input, hx, weight: Tensor):
    """nn.LSTM's forward up to its computation, for `module` (its input_size, hidden_size,
    proj_size, num_layers, bidirectional, batch_first): the checks in nn's words, then the layout
    the ops take. `weight`: a tensor of the dtype the input must have.
    -> input ([T, B, I], or a packed batch's [N, I]), h0 and c0 ([L*D, B, *], sorted as a packed
    batch; None without hx), batch_sizes, sorted_indices, unsorted_indices, batched, packed."""
    packed = isinstance(input, PackedSequence)
    batch_sizes = sorted_indices = unsorted_indices = None
    if packed:
        input, batch_sizes, sorted_indices, unsorted_indices = input
        batched = True
    elif not isinstance(input, Tensor):
        raise TypeError(f"{owner}: input must be a Tensor or a PackedSequence, got "
                        f"{type(input).__name__}")
    elif input.dim() not in (2, 3):
        raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead "
                         f"({owner}: input of shape {_shape(input)}; batched [T, B, "
                         f"input_size] ([B, T, input_size] with batch_first), or unbatched "
                         f"[T, input_size])")
    else:
        batched = input.dim() == 3
    _check_input_dtype(owner, input, weight)
    if input.shape[-1] != module.input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                           f"{module.input_size}, got {input.shape[-1]} ({owner}: input of "
                           f"shape {_shape(input)})")
    if not packed:
        if not batched:
            input = input.unsqueeze(1)  # [T, 1, I]
        elif module.batch_first:
            input = input.transpose(0, 1)  # [T, B, I]; the op makes it contiguous
        if input.shape[0] == 0:
            raise RuntimeError(f"Expected sequence length to be larger than 0 in RNN ({owner}: "
                               f"input of shape {_shape(input if batched else input[:, 0])})")

    if hx is None:
        h0 = c0 = None  # the op starts every layer from zeros
    else:
        h0, c0 = _unpack_hx(owner, "lstm", hx)
        rank = 3 if batched else 2
        if h0.dim() != rank or c0.dim() != rank:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {rank}-D but got "
                               f"({h0.dim()}-D, {c0.dim()}-D) tensors")
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        real_hidden = module.proj_size if module.proj_size > 0 else module.hidden_size
        states = module.num_layers * (2 if module.bidirectional else 1)
        batch = int(batch_sizes[0]) if packed else input.shape[1]
        for index, (state, width, what) in enumerate(((h0, real_hidden, "h_0"),
                                                      (c0, module.hidden_size, "c_0"))):
            expected = (states, batch, width)  # nn.LSTM's words, also when unbatched
            if tuple(state.shape) != expected:
                raise RuntimeError(
                    f"Expected hidden[{index}] size {expected}, got {_shape(state)} ({owner}: "
                    f"hx[{index}] is {what}: [num_layers * num_directions, batch, "
                    f"{'proj_size' if index == 0 and module.proj_size else 'hidden_size'}])")
            _check_state_dtype(owner, f"hx[{index}] ({what})", state, input)
        if sorted_indices is not None:  # the packed batch is sorted by length
            h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
    return input, h0, c0, batch_sizes, sorted_indices, unsorted_indices, batched, packed


def _module_outputs(module: nn.Module, output: Tensor, h_n: Tensor, c_n: Tensor, batch_sizes,
                    sorted_indices, unsorted_indices, batched: bool, packed: bool):
    """The ops' time-major results in the form nn.LSTM returns for the input it was given."""
    if packed:
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices)
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
    if not batched:
        return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    if module.batch_first:
        output = output.transpose(0, 1)
    return output, (h_n, c_n)


def _cell_inputs(module: nn.Module, owner: str, input, hx, weight: Tensor):
    """nn.LSTMCell's forward up to its computation, for `module` (its input_size, hidden_size):
    the checks in nn's words and order, then the layout the ops take. `weight`: a tensor of the
    dtype the input must have. -> input [B, I], hx [B, H], cx [B, H] (zeros without hx), batched."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{owner}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead "
                         f"({owner}: input of shape {_shape(input)}; batched [B, input_size] "
                         f"or unbatched [input_size])")
    if hx is not None:
        hx_t, cx_t = _unpack_hx(owner, "lstm_cell", hx)
        for index, state in enumerate((hx_t, cx_t)):
            if state.dim() not in (1, 2):
                raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got "
                                 f"{state.dim()}D instead ({owner}: hx[{index}] of shape "
                                 f"{_shape(state)})")
    # nn.LSTMCell's order: the sizes (input, then each state's batch and hidden size), then
    # the dtypes.
    if input.shape[-1] != module.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[-1]} expected "
                           f"{module.input_size} ({owner}: input of shape {_shape(input)})")
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    if hx is None:
        hx_t = cx_t = torch.zeros((input.shape[0], module.hidden_size), dtype=input.dtype,
                                  device=input.device)
    else:
        rank = 2 if batched else 1
        if hx_t.dim() != rank or cx_t.dim() != rank:
            raise RuntimeError(f"{owner}: Expected hx[0] and hx[1] to be {rank}-D like the "
                               f"{'batched' if batched else 'unbatched'} input, got "
                               f"({hx_t.dim()}-D, {cx_t.dim()}-D) tensors")
        if not batched:
            hx_t, cx_t = hx_t.unsqueeze(0), cx_t.unsqueeze(0)
        expected = (input.shape[0], module.hidden_size)
        for index, (state, what) in enumerate(((hx_t, "h_0"), (cx_t, "c_0")) if (
                hx_t.shape != expected or cx_t.shape != expected) else ()):  # only when wrong
            if state.shape[0] != input.shape[0]:
                raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match "
                                   f"hidden{index} batch size {state.shape[0]} ({owner}: "
                                   f"hx[{index}] ({what}) of shape {_shape(state)})")
            if state.shape[1] != module.hidden_size:
                raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got "
                                   f"{state.shape[1]}, expected {module.hidden_size} ({owner}: "
                                   f"hx[{index}] ({what}) of shape {_shape(state)})")
        if hx_t.dtype != input.dtype or cx_t.dtype != input.dtype:
            for index, (state, what) in enumerate(((hx_t, "h_0"), (cx_t, "c_0"))):
                _check_state_dtype(owner, f"hx[{index}] ({what})", state, input)
    _check_input_dtype(owner, input, weight)
    return input, hx_t, cx_t, batched


class _WeightsAtTheCall(nn.Module):
    """What LSTM and LSTMCell share: a call computes with the weights getattr(self, name) gives
    at that call (nn.RNNBase's rule), for the names in self._flat_weights_names (nn's order).

    getattr costs a Module.__getattr__ per weight per call, so the list of the module's own
    Parameters is kept, and a call checks with one dict lookup per weight that each is still in
    place in _parameters: true unless a weight was replaced there (functional_call swaps tensors
    into _parameters), re-registered (.to(), assignment, load_state_dict(assign=True)) or removed
    (parametrize, pruning, weight_norm, `del`, DataParallel replicas), in which case the call
    reads every weight with getattr. Only a list made wholly of this module's registered
    Parameters is kept: a transform's tensors are never held after their call."""

    _flat_weights_names: List[str]
    _owner = "lstm_ext"

    def _keep_parameters(self) -> None:
        parameters = self._parameters
        current = [parameters.get(name) for name in self._flat_weights_names]
        self._kept_weights = current if all(
            isinstance(w, nn.Parameter) for w in current) else None

    def _current_weights(self, compiling: bool = False) -> List[Optional[Tensor]]:
        """The weights in nn's order, as getattr(self, name) gives them now (None: missing).
        compiling: under torch.compile, which traces getattr and must find nothing kept."""
        kept = self._kept_weights
        if kept is not None and not compiling:
            parameters = self._parameters
            for name, weight in zip(self._flat_weights_names, kept):
                if parameters.get(name) is not weight:
                    break
            else:
                return kept
        current = [getattr(self, name, None) for name in self._flat_weights_names]
        if not compiling:
            self._keep_parameters()
        return current

    def _weights_for_call(self, compiling: bool) -> List[Tensor]:
        """_current_weights, each checked to be a Tensor where they were read with getattr."""
        weights = self._current_weights(compiling)
        if weights is not self._kept_weights:
            for name, weight in zip(self._flat_weights_names, weights):
                if not isinstance(weight, Tensor):
                    what = "is missing" if weight is None else f"is a {type(weight).__name__}"
                    raise AttributeError(
                        f"{self._owner}: {name} {what}: every weight must be a Tensor when the "
                        f"module is called (after `del module.{name}`, assign a tensor to it "
                        "again)")
        return weights

    @property
    def _flat_weights(self) -> List[Optional[Tensor]]:
        """nn.RNNBase's attribute of the same name: the weights a call would use now."""
        return self._current_weights(torch.compiler.is_compiling())

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._keep_parameters()  # drop the tensors from before the conversion
        return result

    def __setstate__(self, state):
        super().__setstate__(state)
        self._keep_parameters()


class LSTM(_WeightsAtTheCall):
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

    Beyond nn.LSTM: ``forward(input, hx=None, reset=None)``. ``reset``, a bool tensor laid out
    as the input's leading dimensions ([T, B], [B, T] with batch_first, [T] unbatched; for a
    PackedSequence, as its padded form), marks where a new sequence starts inside a batch row:
    where ``reset[t, b]``, every layer runs row b's step t from its h_0 / c_0 (zeros without hx),
    as if the steps before had been a separate call: an episode or a document ended at t - 1.
    A reverse direction runs the later sequence first and so starts anew at t - 1. h_n, c_n are
    each row's state after its last step. Gradients flow to h_0 / c_0 from every restart. Works
    under torch.func transforms; not under ONNX export yet.

    Also beyond nn.LSTM, two regularisers of the recurrence (keyword-only, default off, so a
    default module is nn.LSTM exactly; the equations are in lstm_ext/reference.py):

    - ``zoneout=p`` or ``zoneout=(p_c, p_h)`` (Krueger et al. 2016): in training, each unit of
      the cell state c_t (with probability p_c) and of the hidden state h_t (p_h) keeps its
      previous value, a fresh mask per step, layer and direction; in eval, the expectation
      ``c_t = p_c c_{t-1} + (1 - p_c) c_new`` and ``h_t = p_h h_{t-1} + (1 - p_h) h_new``.
      ``zoneout=p`` zones out both; haste's LayerNormLSTM zones out h only: ``(0, p)``.
    - ``recurrent_dropout=p`` (Gal and Ghahramani 2016): in training, the h each step feeds to
      W_hh is multiplied by one dropout mask per sequence (batch row), layer and direction,
      the same at every step of the call, kept units scaled by 1 / (1 - p); nothing in eval.

    Both run fused in the C++ loop on the CPU (float32, float64, bfloat16, float16), draw their
    masks from torch's default generator (``torch.manual_seed`` reproduces them, in eager and
    under torch.compile alike), and work with reset, bidirectional, proj_size and
    PackedSequence. On CUDA, reset and both regularisers run in the host loop as a few ATen ops
    per step (not fused into the gate kernels yet; not run on a GPU yet). Under torch.func
    transforms they work (vmap draws masks by its ``randomness`` flag); not yet: ONNX export (a
    clear error says so).

    ``layer_norm=True`` (keyword-only, default off): haste's LayerNormLSTM (Ba et al. 2016) on
    nn.LSTM's weights. Each layer-direction gains four parameters, after its nn.LSTM ones:
    ``ln_weight_ih_l{k}``, ``ln_weight_hh_l{k}`` [4H] (the gains of the two normalised products;
    haste's ``gamma[0]``, ``gamma[1]``), ``ln_weight_c_l{k}`` and ``ln_bias_c_l{k}`` [H] (haste's
    ``gamma_h``, ``beta_h``), initialised to ones and zeros; ``_reverse`` for a reverse
    direction. With LN(v) = (v - mean(v)) / sqrt(var(v) + 1e-5) over a row::

        z   = LN(x_t W_ih^T) * ln_weight_ih + LN(h_{t-1} W_hh^T) * ln_weight_hh + b_ih + b_hh
        c_t = f * c_{t-1} + i * g                       (c itself is carried unnormalised)
        h_t = o * tanh(LN(c_t) * ln_weight_c + ln_bias_c)

    Fused in its own C++ loop on the CPU (float32, float64; bfloat16 and float16 computed in
    float32 with h rounded to the dtype each step), with every other option. On CUDA it runs in
    the host loop as ATen ops per step (not fused, not run on a GPU yet). Works under torch.func
    transforms; not yet: ONNX export (a clear error says so).

    The weights are whatever ``getattr(module, name)`` gives at the call, as for nn.LSTM: the
    Parameters, or a parametrization's, ``torch.func.functional_call``'s or a pruning hook's
    tensors, or a plain tensor assigned in place of a deleted weight (weight drop).
    """

    _owner = "lstm_ext.LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *,
                 zoneout: "float | Tuple[float, float]" = 0.0,
                 recurrent_dropout: float = 0.0, layer_norm: bool = False) -> None:
        super().__init__()
        # The same argument errors and warning as torch.nn.RNNBase.
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=2)
        for name, value in (("bias", bias), ("batch_first", batch_first)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("proj_size", proj_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
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
        zoneout_pair = _zoneout_pair(self._owner, zoneout)
        if not isinstance(layer_norm, bool):
            raise TypeError(f"layer_norm should be of type bool, got: {type(layer_norm).__name__}")
        if not _is_probability(recurrent_dropout):
            raise ValueError(f"{self._owner}: recurrent_dropout should be a number in range "
                             f"[0, 1) representing the probability of an element being zeroed, "
                             f"got {recurrent_dropout!r}")

        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.zoneout = zoneout_pair  # (p_c, p_h)
        self.recurrent_dropout = float(recurrent_dropout)
        self.layer_norm = layer_norm

        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        # Registration order is nn.LSTM's, so reset_parameters draws the same numbers from the RNG,
        # and _flat_weights_names is nn.LSTM's order, which the op takes.
        self._flat_weights_names: List[str] = []
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
                if layer_norm:  # the gains of LN(x W_ih^T), LN(h W_hh^T); LN(c)'s gain, bias
                    shapes += [("ln_weight_ih", (_GATES * hidden_size,)),
                               ("ln_weight_hh", (_GATES * hidden_size,)),
                               ("ln_weight_c", (hidden_size,)), ("ln_bias_c", (hidden_size,))]
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for kind, shape in shapes:
                    name = f"{kind}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._all_weights.append(names)
                self._flat_weights_names.extend(names)
        self._keep_parameters()
        self.reset_parameters()

    def __setstate__(self, state) -> None:
        # A module pickled before zoneout and recurrent_dropout existed has neither: both off.
        state.setdefault("zoneout", (0.0, 0.0))
        state.setdefault("recurrent_dropout", 0.0)
        state.setdefault("layer_norm", False)
        super().__setstate__(state)

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as nn.LSTM; with layer_norm, the
        normalisation gains are ones and ln_bias_c zeros (as nn.LayerNorm's and haste's), drawing
        nothing, so the other weights get the numbers nn.LSTM's would under the same seed."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, weight in self.named_parameters():
            if name.startswith("ln_bias"):
                nn.init.zeros_(weight)
            elif name.startswith("ln_weight"):
                nn.init.ones_(weight)
            else:
                nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for nn.LSTM runs unchanged: lstm_ext needs no flat buffer."""

    @property
    def all_weights(self) -> List[List[Optional[Tensor]]]:
        return [[getattr(self, name, None) for name in names] for names in self._all_weights]

    def _time_major_reset(self, reset, input: Tensor, batched: bool, packed: bool,
                          batch_sizes: Optional[Tensor],
                          sorted_indices: Optional[Tensor]) -> Tensor:
        """forward's reset, checked, as the op takes it: bool [T, B], time first, batch rows in
        the packed order. It comes laid out as the input's leading dimensions: [T, B] ([B, T]
        with batch_first), [T] unbatched, and for a PackedSequence as its padded form
        (pad_packed_sequence with this module's batch_first), rows in the original order."""
        owner = self._owner
        if not isinstance(reset, Tensor):
            raise TypeError(f"{owner}: reset must be a bool Tensor or None, got "
                            f"{type(reset).__name__}")
        if reset.dtype != torch.bool:
            raise TypeError(f"{owner}: reset must be a bool tensor, got {reset.dtype} (use "
                            "reset.bool(), or a comparison such as done > 0)")
        if reset.device != input.device:
            raise ValueError(f"{owner}: reset is on {reset.device} but the input is on "
                             f"{input.device}; move it: reset.to({str(input.device)!r})")
        steps = len(batch_sizes) if packed else input.shape[0]
        batch = int(batch_sizes[0]) if packed else input.shape[1]  # input is [T, B, I] here
        batch_first = self.batch_first and batched
        if not batched:
            expected, layout = (steps,), "[T] (unbatched input)"
        elif batch_first:
            expected, layout = (batch, steps), "[B, T] (batch_first)"
        else:
            expected, layout = (steps, batch), "[T, B]"
        if tuple(reset.shape) != expected:
            raise ValueError(f"{owner}: reset must have shape {layout} = {expected}, the input's "
                             f"leading dimensions, got {_shape(reset)}")
        if not batched:
            reset = reset.unsqueeze(1)
        elif batch_first:
            reset = reset.t()
        if sorted_indices is not None:
            reset = reset.index_select(1, sorted_indices)
        return reset.contiguous()

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None,
                reset: Optional[Tensor] = None):
        owner = self._owner
        compiling = torch.compiler.is_compiling()
        weights = self._weights_for_call(compiling)
        input, h0, c0, batch_sizes, sorted_indices, unsorted_indices, batched, packed = \
            _time_major_inputs(self, owner, input, hx, weights[0])
        if reset is not None:
            reset = self._time_major_reset(reset, input, batched, packed, batch_sizes,
                                           sorted_indices)

        # One C++ op (and one graph node) for every layer and direction. Eager calls it through
        # its typed pybind11 binding (_C.lstm: no boxing of the arguments, a third of the forward's
        # cost at small sizes); torch.compile and tracing record torch.ops.lstm_ext.lstm, the same
        # op, but for ONNX export, which records ONNX's LSTM (lstm_ext/_onnx.py); under torch.func
        # transforms the same kernels run through lstm_ext/_functorch.py.
        if compiling or torch._C._get_tracing_state() is not None:
            op = _onnx.lstm if _onnx.exporting() else lstm
        else:
            op = _functorch.lstm if _functorch.transforms_active() else _C.lstm
        zoneout_c, zoneout_h = self.zoneout
        recurrent_dropout = self.recurrent_dropout if self.training else 0.0  # eval: nothing
        beyond_nn = [name for name, used in (("reset", reset is not None),
                                             ("zoneout", zoneout_c > 0 or zoneout_h > 0),
                                             ("recurrent_dropout", recurrent_dropout > 0),
                                             ("layer_norm", self.layer_norm)) if used]
        if not beyond_nn:
            output, h_n_t, c_n_t = op(input, h0, c0, weights, self.bias, self.proj_size > 0,
                                      self.num_layers, self.dropout, self.training,
                                      self.bidirectional, batch_sizes)
        else:
            if op is _onnx.lstm:
                raise NotImplementedError(
                    f"{owner}: {', '.join(beyond_nn)} not supported under ONNX export (ONNX's "
                    "LSTM node has none of them) yet; call the module without them there")
            output, h_n_t, c_n_t = op(
                input, h0, c0, weights, self.bias, self.proj_size > 0, self.num_layers,
                self.dropout, self.training, self.bidirectional, batch_sizes, reset, zoneout_c,
                zoneout_h, recurrent_dropout, self.layer_norm)
        return _module_outputs(self, output, h_n_t, c_n_t, batch_sizes, sorted_indices,
                               unsorted_indices, batched, packed)

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script compiles in this module's place (lstm_ext/_script.py)."""
        from ._script import ScriptableLSTM
        return ScriptableLSTM(self)

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
        s += _zoneout_repr(self.zoneout)
        if self.recurrent_dropout != 0:
            s += ", recurrent_dropout={recurrent_dropout}"
        if self.layer_norm:
            s += ", layer_norm=True"
        return s.format(**self.__dict__)


class LSTMCell(_WeightsAtTheCall):
    r"""One LSTM step with the interface of :class:`torch.nn.LSTMCell`, computed by one fused C++ op.

    Args (as torch.nn.LSTMCell): input_size, hidden_size, bias=True, device=None, dtype=None.
    Shapes: input [B, I] or unbatched [I]; hx = (h_0, c_0), each [B, H] (or [H]), default zeros.
    Returns (h_1, c_1), each [B, H] (or [H]).
    """

    _owner = "lstm_ext.LSTMCell"

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
        self._flat_weights_names = ["weight_ih", "weight_hh"] + (
            ["bias_ih", "bias_hh"] if bias else [])
        self._keep_parameters()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as nn.LSTMCell."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        owner = self._owner
        compiling = torch.compiler.is_compiling()
        weights = self._weights_for_call(compiling)
        input, hx_t, cx_t, batched = _cell_inputs(self, owner, input, hx, weights[0])
        # As LSTM.forward: the typed binding in eager, torch.ops under torch.compile and tracing
        # (ONNX's ops in an ONNX export), the Python Function under torch.func transforms.
        if compiling or torch._C._get_tracing_state() is not None:
            op = _onnx.lstm_cell if _onnx.exporting() else lstm_cell
        else:
            op = _functorch.lstm_cell if _functorch.transforms_active() else _C.lstm_cell
        hy, cy = op(input, hx_t, cx_t, *weights[:2], *(weights[2:] or (None, None)))
        if not batched:
            return hy.squeeze(0), cy.squeeze(0)
        return hy, cy

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script compiles in this module's place (lstm_ext/_script.py)."""
        from ._script import ScriptableLSTMCell
        return ScriptableLSTMCell(self)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return s.format(**self.__dict__)
