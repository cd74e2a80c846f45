"""int8 LSTM and LSTMCell for CPU inference, and `quantize_dynamic`, which puts them in a model.

    model = lstm_ext.quantize_dynamic(model)   # every nn.LSTM / lstm_ext.LSTM (and the cells)
    with torch.no_grad():
        output, (h_n, c_n) = model.lstm(x)

Dynamic quantization, as torch.ao.quantization.quantize_dynamic does it for nn.LSTM, with one
fused C++ step (csrc/cpu/lstm_cpu_int8.cpp): weights int8 with one scale per output row (torch:
one per tensor), each step's activations quantized on the fly to 7 bits, int32 accumulation in
FBGEMM's kernels, gates and cell state in float32. Inference only (no backward). The modules take
nn.LSTM's / nn.LSTMCell's inputs (batched, unbatched, batch_first, PackedSequence, hx) and return
what those return; they hold the int8 weights as buffers, so state_dict() and load_state_dict()
work as for any module.
"""

import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import modules as _float
from ._ops import _ops

_GATES = 4  # i, f, g, o


def quantize_weight(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """weight [rows, cols] (floating point) -> (int8 [rows, cols], float32 scales [rows]):
    symmetric, one scale per row, weight ~ scale[:, None] * int8 (values in [-127, 127])."""
    w = weight.detach().to("cpu", torch.float32)  # the int8 kernels are the CPU's
    scale = w.abs().amax(dim=1) / 127.0 if w.shape[1] > 0 else w.new_ones(w.shape[0])
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def _set_quantized(module: nn.Module, name: str, weight: Tensor) -> None:
    """Fills module's buffers weight_{name} and scale_{name} from a float weight."""
    q, scale = quantize_weight(weight)
    getattr(module, f"weight_{name}").copy_(q)
    getattr(module, f"scale_{name}").copy_(scale)


def _combined_bias(bias_ih: Tensor, bias_hh: Tensor) -> Tensor:
    """b_ih + b_hh in float32 on the CPU: the one bias the int8 op adds."""
    return bias_ih.detach().cpu().float() + bias_hh.detach().cpu().float()


def _float32_under_autocast(input, hx):
    """Under torch.autocast the int8 op computes in float32 (as nn's float32-only ops do): its
    inputs are cast, as autocast would; otherwise they stay as given (and are checked)."""
    if not torch._C._is_any_autocast_enabled():
        return input, hx
    return (input.float() if isinstance(input, Tensor) else input,
            None if hx is None else tuple(t.float() for t in hx))


def _inference_only(owner: str, tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{owner} is for inference only: it has no backward (its weights are int8). Call it "
            "under torch.no_grad() or torch.inference_mode(), or with inputs that do not require "
            "grad; train the float model and quantize it afterwards")


_LAYER_NORM = ("ln_weight_ih", "ln_weight_hh", "ln_weight_c", "ln_bias_c")


class LSTM(nn.Module):
    """int8 counterpart of nn.LSTM / lstm_ext.LSTM (inference). Build it from a float module with
    `LSTM.from_float(module)` or `lstm_ext.quantize_dynamic(model)`; the constructor makes one
    with zero weights, into which a state_dict loads.

    Buffers per layer k and direction (suffix "" or "_reverse"): weight_ih_l{k} int8 [4H, I_k],
    weight_hh_l{k} int8 [4H, P], weight_hr_l{k} int8 [P, H] (with proj_size), their float32 row
    scales scale_ih_l{k}, scale_hh_l{k}, scale_hr_l{k}, and bias_l{k} float32 [4H]
    (bias_ih + bias_hh; with bias=True); with layer_norm, the float32 normalisation parameters
    ln_weight_ih_l{k}, ln_weight_hh_l{k} [4H], ln_weight_c_l{k}, ln_bias_c_l{k} [H] (as
    lstm_ext.LSTM's, applied to the int8 products).

    As lstm_ext.LSTM: forward(input, hx=None, reset=None); ``zoneout`` (keyword-only) runs as in
    eval, each state mixing its previous and new value (an int8 module is for inference), and
    recurrent dropout, nothing in eval, has no counterpart; ``layer_norm`` (keyword-only) as
    lstm_ext.LSTM's."""

    _owner = "lstm_ext.quantized.LSTM"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, dtype: torch.dtype = torch.qint8, *,
                 zoneout: "float | Tuple[float, float]" = 0.0, layer_norm: bool = False) -> None:
        super().__init__()
        if dtype != torch.qint8:
            raise ValueError(f"{self._owner}: dtype must be torch.qint8, got {dtype}")
        self.zoneout = _float._zoneout_pair(self._owner, zoneout)  # (p_c, p_h)
        self.layer_norm = bool(layer_norm)
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be an integer greater than 0, got {value!r} "
                                 f"({self._owner})")
        if not isinstance(proj_size, int) or proj_size < 0 or proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be a non-negative integer smaller than "
                             f"hidden_size, got {proj_size!r} ({self._owner})")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)  # between layers in training only: never in int8
        self.proj_size = proj_size
        self.dtype = dtype
        H, P = hidden_size, proj_size or hidden_size
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else P * directions
            for suffix in ("", "_reverse")[:directions]:
                shapes = [("ih", (_GATES * H, layer_input)), ("hh", (_GATES * H, P))]
                if proj_size:
                    shapes.append(("hr", (P, H)))
                for kind, shape in shapes:
                    self.register_buffer(f"weight_{kind}_l{layer}{suffix}",
                                         torch.zeros(shape, dtype=torch.int8))
                    self.register_buffer(f"scale_{kind}_l{layer}{suffix}", torch.ones(shape[0]))
                if bias:
                    self.register_buffer(f"bias_l{layer}{suffix}", torch.zeros(_GATES * H))
                if layer_norm:  # gains 1, bias 0, as lstm_ext.LSTM's start
                    for kind, size, start in (("ln_weight_ih", _GATES * H, 1.0),
                                              ("ln_weight_hh", _GATES * H, 1.0),
                                              ("ln_weight_c", H, 1.0), ("ln_bias_c", H, 0.0)):
                        self.register_buffer(f"{kind}_l{layer}{suffix}",
                                             torch.full((size,), start))

    def __setstate__(self, state):
        state.setdefault("zoneout", (0.0, 0.0))  # pickled before int8 zoneout existed: off
        state.setdefault("layer_norm", False)  # pickled before int8 layer_norm existed: off
        super().__setstate__(state)

    @classmethod
    def from_float(cls, module: nn.Module) -> "LSTM":
        """An int8 copy of `module` (nn.LSTM or lstm_ext.LSTM, any floating dtype)."""
        if not isinstance(module, (nn.LSTM, _float.LSTM)):
            raise TypeError(f"{cls._owner}.from_float: expected nn.LSTM or lstm_ext.LSTM, got "
                            f"{type(module).__name__}")
        layer_norm = getattr(module, "layer_norm", False)
        q = cls(module.input_size, module.hidden_size, module.num_layers, module.bias,
                module.batch_first, module.dropout, module.bidirectional, module.proj_size,
                zoneout=getattr(module, "zoneout", (0.0, 0.0)), layer_norm=layer_norm)
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse")[:2 if module.bidirectional else 1]:
                name = f"l{layer}{suffix}"
                for kind in ("ih", "hh") + (("hr",) if module.proj_size else ()):
                    _set_quantized(q, f"{kind}_{name}", getattr(module, f"weight_{kind}_{name}"))
                if module.bias:
                    getattr(q, f"bias_{name}").copy_(_combined_bias(
                        getattr(module, f"bias_ih_{name}"), getattr(module, f"bias_hh_{name}")))
                if layer_norm:
                    for kind in _LAYER_NORM:
                        getattr(q, f"{kind}_{name}").copy_(
                            getattr(module, f"{kind}_{name}").detach().cpu().float())
        return q

    def _layer_weights(self, name: str) -> List[Optional[Tensor]]:
        weights = [getattr(self, f"weight_ih_{name}"), getattr(self, f"scale_ih_{name}"),
                   getattr(self, f"weight_hh_{name}"), getattr(self, f"scale_hh_{name}"),
                   getattr(self, f"bias_{name}") if self.bias else None]
        if self.proj_size:
            weights += [getattr(self, f"weight_hr_{name}"), getattr(self, f"scale_hr_{name}")]
        else:
            weights += [None, None]
        return weights

    def _layer_norm_params(self, name: str) -> List[Optional[Tensor]]:
        if not self.layer_norm:
            return [None] * len(_LAYER_NORM)
        return [getattr(self, f"{kind}_{name}") for kind in _LAYER_NORM]

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None,
                reset: Optional[Tensor] = None):
        owner = self._owner
        input, hx = _float32_under_autocast(input, hx)
        input, h0, c0, batch_sizes, sorted_indices, unsorted_indices, batched, packed = \
            _float._time_major_inputs(self, owner, input, hx, self.scale_ih_l0)
        _inference_only(owner, [input, h0, c0])
        if reset is not None:  # checked and laid out as lstm_ext.LSTM's
            reset = _float.LSTM._time_major_reset(self, reset, input, batched, packed,
                                                  batch_sizes, sorted_indices)
        H, P = self.hidden_size, self.proj_size or self.hidden_size
        directions = 2 if self.bidirectional else 1
        batch = int(batch_sizes[0]) if packed else input.shape[1]
        if h0 is None:
            h0 = input.new_zeros((self.num_layers * directions, batch, P))
            c0 = input.new_zeros((self.num_layers * directions, batch, H))
        layer_input, h_n, c_n = input, [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(("", "_reverse")[:directions]):
                index = layer * directions + direction
                name = f"l{layer}{suffix}"
                output, h, c = _ops.quantized_lstm_layer(
                    layer_input, h0[index], c0[index], *self._layer_weights(name), batch_sizes,
                    direction == 1, reset, *self.zoneout, *self._layer_norm_params(name))
                outputs.append(output)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        return _float._module_outputs(self, layer_input, torch.stack(h_n), torch.stack(c_n),
                                      batch_sizes, sorted_indices, unsorted_indices, batched,
                                      packed)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("bidirectional", False), ("proj_size", 0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.layer_norm:
            s += ", layer_norm=True"
        return s + _float._zoneout_repr(self.zoneout) + ", dtype=torch.qint8"


class LSTMCell(nn.Module):
    """int8 counterpart of nn.LSTMCell / lstm_ext.LSTMCell (inference). Buffers weight_ih int8
    [4H, I], weight_hh int8 [4H, H], scale_ih, scale_hh float32 [4H], bias float32 [4H]
    (bias_ih + bias_hh; with bias=True)."""

    _owner = "lstm_ext.quantized.LSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 dtype: torch.dtype = torch.qint8) -> None:
        super().__init__()
        if dtype != torch.qint8:
            raise ValueError(f"{self._owner}: dtype must be torch.qint8, got {dtype}")
        self.input_size, self.hidden_size, self.bias, self.dtype = (input_size, hidden_size, bias,
                                                                     dtype)
        for kind, cols in (("ih", input_size), ("hh", hidden_size)):
            self.register_buffer(f"weight_{kind}", torch.zeros((_GATES * hidden_size, cols),
                                                               dtype=torch.int8))
            self.register_buffer(f"scale_{kind}", torch.ones(_GATES * hidden_size))
        if bias:
            self.register_buffer("bias_all", torch.zeros(_GATES * hidden_size))

    @classmethod
    def from_float(cls, module: nn.Module) -> "LSTMCell":
        if not isinstance(module, (nn.LSTMCell, _float.LSTMCell)):
            raise TypeError(f"{cls._owner}.from_float: expected nn.LSTMCell or "
                            f"lstm_ext.LSTMCell, got {type(module).__name__}")
        q = cls(module.input_size, module.hidden_size, module.bias)
        for kind in ("ih", "hh"):
            _set_quantized(q, kind, getattr(module, f"weight_{kind}"))
        if module.bias:
            q.bias_all.copy_(_combined_bias(module.bias_ih, module.bias_hh))
        return q

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):
        owner = self._owner
        input, hx = _float32_under_autocast(input, hx)
        input, hx_t, cx_t, batched = _float._cell_inputs(self, owner, input, hx, self.scale_ih)
        _inference_only(owner, [input, hx_t, cx_t])
        _, hy, cy = _ops.quantized_lstm_layer(
            input.unsqueeze(0), hx_t, cx_t, self.weight_ih, self.scale_ih, self.weight_hh,
            self.scale_hh, self.bias_all if self.bias else None, None, None, None, False)
        if not batched:
            return hy.squeeze(0), cy.squeeze(0)
        return hy, cy

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + ", dtype=torch.qint8"


_CONVERSIONS = ((nn.LSTM, LSTM), (_float.LSTM, LSTM), (nn.LSTMCell, LSTMCell),
                (_float.LSTMCell, LSTMCell))


def _converted(module: nn.Module) -> Optional[nn.Module]:
    for float_type, int8_type in _CONVERSIONS:
        if isinstance(module, float_type):
            return int8_type.from_float(module)
    return None


def quantize_dynamic(model: nn.Module, dtype: torch.dtype = torch.qint8, inplace: bool = False,
                     skip: Optional[List[str]] = None) -> nn.Module:
    """`model` with every nn.LSTM, lstm_ext.LSTM, nn.LSTMCell and lstm_ext.LSTMCell in it (or
    `model` itself, if it is one) replaced by its int8 counterpart in lstm_ext.quantized; other
    modules stay as they are. A copy unless `inplace`. `skip`: names (as in named_modules()) to
    leave in float. Put the result in eval and call it without gradients: int8 has no backward."""
    if dtype != torch.qint8:
        raise ValueError(f"lstm_ext.quantize_dynamic: dtype must be torch.qint8, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lstm_ext.quantize_dynamic: expected an nn.Module, got "
                        f"{type(model).__name__}")
    skip = set(skip or ())
    whole = _converted(model) if "" not in skip else None
    if whole is not None:
        return whole
    if not inplace:
        model = copy.deepcopy(model)
    replacements: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and name not in skip and not any(name.startswith(r + ".") for r in replacements):
            converted = _converted(module)
            if converted is not None:
                replacements[name] = converted
    for name, converted in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, converted)
    return model
