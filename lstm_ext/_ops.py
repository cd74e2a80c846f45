"""Loads the compiled kernels, registers their fake (meta) kernels, and wraps each op thinly.

Shapes (gate order i, f, g, o): input [T, B, I] or packed [N, I] with batch_sizes [T] (layer),
[B, I] (cell); h [B, P], c [B, H]; weight_ih [4H, I]; weight_hh [4H, P]; biases [4H];
weight_hr [P, H] (P = H without projection).
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .reference import lstm_cell_reference, lstm_layer_reference, lstm_reference

REBUILD_COMMAND = "pip install --force-reinstall --no-deps ."


def _load_compiled_module():
    import glob
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    if not glob.glob(os.path.join(here, "_C.*")):
        raise ImportError(
            f"lstm_ext is not built: {here} holds its sources but not the compiled module, and no "
            "installed lstm_ext was found on sys.path. Install it: `pip install .` in the "
            "repository root.")
    from . import _build_info
    if _build_info.torch_version != torch.__version__:
        # Checked before loading: a module built for another torch can fail with undefined symbols
        # or, worse, load and crash.
        raise ImportError(
            f"lstm_ext was built against torch {_build_info.torch_version} but torch "
            f"{torch.__version__} is installed. Rebuild it against this torch: `{REBUILD_COMMAND}` "
            "in the lstm_ext source tree."
        )
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(
            f"lstm_ext's compiled module failed to load ({exc}). It was built against torch "
            f"{_build_info.torch_version}; torch {torch.__version__} is installed. Rebuild it: "
            f"`{REBUILD_COMMAND}` in the lstm_ext source tree."
        ) from exc
    if _C.torch_version != torch.__version__:
        raise ImportError(
            f"lstm_ext's compiled module was built against torch {_C.torch_version} but torch "
            f"{torch.__version__} is installed. Rebuild it: `{REBUILD_COMMAND}`."
        )
    return _C, _build_info


_C, _build_info = _load_compiled_module()
_ops = torch.ops.lstm_ext


# ---- fake kernels: shapes only, for torch.compile / opcheck / meta tensors ----------------------


def _kept_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the gates and cell states a forward keeps: float32 for bfloat16 / float16
    layers (csrc/lstm_checks.h, kept_state_dtype), else the layer's own."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype



@torch.library.register_fake("lstm_ext::lstm")
def _lstm_fake(input, h0, c0, params, has_biases, has_projections, num_layers, dropout, train,
               bidirectional, batch_sizes, reset=None, zoneout_c=0.0, zoneout_h=0.0,
               recurrent_dropout=0.0, layer_norm=False):
    directions = 2 if bidirectional else 1
    H, P = params[1].shape[0] // 4, params[1].shape[1]
    if h0 is not None:
        B = h0.shape[1]
    else:
        B = input.shape[1] if batch_sizes is None else int(batch_sizes[0])
    return (input.new_empty(tuple(input.shape[:-1]) + (directions * P,)),
            input.new_empty(num_layers * directions, B, P),
            input.new_empty(num_layers * directions, B, H))


@torch.library.register_fake("lstm_ext::lstm_forward")
def _(input, h0, c0, params, has_biases, has_projections, num_layers, dropout, train,
      bidirectional, batch_sizes, reset=None, zoneout_c=0.0, zoneout_h=0.0,
      recurrent_dropout=0.0, layer_norm=False):
    output, h_n, c_n = _lstm_fake(input, h0, c0, params, has_biases, has_projections, num_layers,
                                  dropout, train, bidirectional, batch_sizes)
    # saved (csrc/autograd.cpp, saved_list): the zero states without h0; per layer its input
    # unless it is the module's input or the layer before's output, the dropout mask after it
    # where there is dropout, and per direction output (unless the module's own), gates, cells;
    # then the masks drawn, per layer-direction; then with layer_norm the norms, per
    # layer-direction.
    directions = 2 if bidirectional else 1
    H, P = params[1].shape[0] // 4, params[1].shape[1]
    B = h_n.shape[1]
    rows = tuple(input.shape[:-1])
    kept = _kept_dtype(input)
    saved = [] if h0 is not None else [input.new_empty(B, P), input.new_empty(B, H)]
    dropout_after = [train and dropout > 0 and layer < num_layers - 1
                     for layer in range(num_layers)]
    for layer in range(num_layers):
        if layer > 0 and (directions == 2 or dropout_after[layer - 1]):
            saved.append(input.new_empty(rows + (directions * P,)))
        if dropout_after[layer]:
            saved.append(input.new_empty(rows + (directions * P,)))
        for _direction in range(directions):
            if directions == 2 or layer < num_layers - 1:
                saved.append(input.new_empty(rows + (P,)))
            saved += [input.new_empty(rows + (4 * H,), dtype=kept),
                      input.new_empty(rows + (H,), dtype=kept)]
    draws_masks = train and (zoneout_c > 0 or zoneout_h > 0 or recurrent_dropout > 0)
    for _layer_direction in range(num_layers * directions if draws_masks else 0):
        if zoneout_c > 0:
            saved.append(input.new_empty(rows + (H,), dtype=torch.bool))
        if zoneout_h > 0:
            saved.append(input.new_empty(rows + (P,), dtype=torch.bool))
        if recurrent_dropout > 0:
            saved.append(input.new_empty(B, P))
    if layer_norm:
        saved += [input.new_empty(rows + (8 * H + 16,), dtype=kept)
                  for _ in range(num_layers * directions)]
    return output, h_n, c_n, saved


@torch.library.register_fake("lstm_ext::lstm_backward")
def _(grad_output, grad_h_n, grad_c_n, input, h0, c0, params, has_biases, has_projections,
      num_layers, dropout, train, bidirectional, batch_sizes, output, saved, reset=None,
      zoneout_c=0.0, zoneout_h=0.0, recurrent_dropout=0.0, layer_norm=False):
    directions = 2 if bidirectional else 1
    H, P = params[1].shape[0] // 4, params[1].shape[1]
    B = h0.shape[1] if h0 is not None else saved[0].shape[0]
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty(num_layers * directions, B, P),
            input.new_empty(num_layers * directions, B, H),
            [p.new_empty(p.shape) for p in params])


@torch.library.register_fake("lstm_ext::lstm_layer")
def _(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, reverse):
    P = weight_hh.shape[1]
    return input.new_empty(tuple(input.shape[:-1]) + (P,)), h0.new_empty(h0.shape), \
        c0.new_empty(c0.shape)


@torch.library.register_fake("lstm_ext::quantized_lstm_layer")
def _(input, h0, c0, weight_ih, scale_ih, weight_hh, scale_hh, bias, weight_hr, scale_hr,
      batch_sizes, reverse, reset=None, zoneout_c=0.0, zoneout_h=0.0, ln_weight_ih=None,
      ln_weight_hh=None, ln_weight_c=None, ln_bias_c=None):
    P = weight_hh.shape[1]
    return input.new_empty(tuple(input.shape[:-1]) + (P,)), h0.new_empty(h0.shape), \
        c0.new_empty(c0.shape)


@torch.library.register_fake("lstm_ext::lstm_cell")
def _(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
    return hx.new_empty(hx.shape), cx.new_empty(cx.shape)


@torch.library.register_fake("lstm_ext::lstm_layer_forward")
def _(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, reverse,
      keep_state, reset=None, zoneout_c=0.0, zoneout_h=0.0, zoneout_mask_c=None,
      zoneout_mask_h=None, recurrent_mask=None):
    rows = tuple(input.shape[:-1])  # (T, B), or (N,) when packed
    kept = rows if keep_state else (0,) + rows[1:]
    H, P = weight_hh.shape[0] // 4, weight_hh.shape[1]
    B = h0.shape[0]
    return (input.new_empty(rows + (P,)), input.new_empty(B, P), input.new_empty(B, H),
            input.new_empty(kept + (4 * H,), dtype=_kept_dtype(input)),
            input.new_empty(kept + (H,), dtype=_kept_dtype(input)))


@torch.library.register_fake("lstm_ext::lstm_layer_backward")
def _(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
      batch_sizes, reverse, output, gates, cells, need_grad_input=True, reset=None,
      zoneout_c=0.0, zoneout_h=0.0, zoneout_mask_c=None, zoneout_mask_h=None,
      recurrent_mask=None):
    H, P = weight_hh.shape[0] // 4, weight_hh.shape[1]
    return (
        input.new_empty((input.shape[0] if need_grad_input else 0,) + tuple(input.shape[1:])),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty(4 * H),
        weight_hh.new_empty(P if weight_hr is not None else 0, H),
    )


@torch.library.register_fake("lstm_ext::ln_lstm_layer_forward")
def _(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, ln_weight_ih,
      ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, reverse, keep_state, reset=None,
      zoneout_c=0.0, zoneout_h=0.0, zoneout_mask_c=None, zoneout_mask_h=None,
      recurrent_mask=None):
    rows = tuple(input.shape[:-1])
    kept = rows if keep_state else (0,) + rows[1:]
    H, P = weight_hh.shape[0] // 4, weight_hh.shape[1]
    B = h0.shape[0]
    return (input.new_empty(rows + (P,)), input.new_empty(B, P), input.new_empty(B, H),
            input.new_empty(kept + (4 * H,), dtype=_kept_dtype(input)),
            input.new_empty(kept + (H,), dtype=_kept_dtype(input)),
            input.new_empty(kept + (8 * H + 16,), dtype=_kept_dtype(input)))


@torch.library.register_fake("lstm_ext::ln_lstm_layer_backward")
def _(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, weight_hr,
      ln_weight_ih, ln_weight_hh, ln_weight_c, ln_bias_c, batch_sizes, reverse, output, gates,
      cells, norms, need_grad_input=True, reset=None, zoneout_c=0.0, zoneout_h=0.0,
      zoneout_mask_c=None, zoneout_mask_h=None, recurrent_mask=None):
    H, P = weight_hh.shape[0] // 4, weight_hh.shape[1]
    return (
        input.new_empty((input.shape[0] if need_grad_input else 0,) + tuple(input.shape[1:])),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty(4 * H),
        weight_hh.new_empty(P if weight_hr is not None else 0, H),
        ln_weight_ih.new_empty(4 * H),
        ln_weight_hh.new_empty(4 * H),
        ln_weight_c.new_empty(H),
        ln_bias_c.new_empty(H),
    )


@torch.library.register_fake("lstm_ext::fill_bernoulli_mask_")
def _(mask, p):
    return None


@torch.library.register_fake("lstm_ext::lstm_cell_forward")
def _(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
    B = input.shape[0]
    H = weight_hh.shape[1]
    return (input.new_empty(B, H), input.new_empty(B, H),
            input.new_empty(B, 4 * H, dtype=_kept_dtype(input)))


@torch.library.register_fake("lstm_ext::lstm_cell_backward")
def _(grad_hy, grad_cy, input, hx, cx, cy, gates, weight_ih, weight_hh, need_grad_input=True):
    return (
        input.new_empty((input.shape[0] if need_grad_input else 0, input.shape[1])),
        hx.new_empty(hx.shape),
        cx.new_empty(cx.shape),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty(weight_hh.shape[0]),
    )


# ---- the reference as kernels of lstm_*_reference: what a second derivative differentiates -----

_reference_library = torch.library.Library("lstm_ext", "IMPL")


# CompositeImplicitAutograd: made of differentiable torch ops, so autograd sees through it.
_reference_library.impl("lstm_layer_reference", lstm_layer_reference, "CompositeImplicitAutograd")
_reference_library.impl("lstm_cell_reference", lstm_cell_reference, "CompositeImplicitAutograd")
_reference_library.impl("lstm_reference", lstm_reference, "CompositeImplicitAutograd")


# ---- typed wrappers ------------------------------------------------------------------------------


def lstm(
    input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], params: List[Tensor],
    has_biases: bool, has_projections: bool, num_layers: int, dropout: float, train: bool,
    bidirectional: bool, batch_sizes: Optional[Tensor], reset: Optional[Tensor] = None,
    zoneout_c: float = 0.0, zoneout_h: float = 0.0, recurrent_dropout: float = 0.0,
    layer_norm: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The whole module, differentiable -> (output [.., D*P], h_n [L*D,B,P], c_n [L*D,B,H]).
    reset: None or bool [T, B]: where rows start anew from h0 / c0; zoneout_c, zoneout_h,
    recurrent_dropout: probabilities; layer_norm: params hold each layer-direction's four
    normalisation parameters too (csrc/ops.cpp)."""
    return _ops.lstm(input, h0, c0, params, has_biases, has_projections, num_layers, dropout,
                     train, bidirectional, batch_sizes, reset, zoneout_c, zoneout_h,
                     recurrent_dropout, layer_norm)


def lstm_layer(
    input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], weight_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor], reverse: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer over all steps, differentiable -> (output [.., P], h_n [B,P], c_n [B,H])."""
    return _ops.lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                           batch_sizes, reverse)


def lstm_cell(
    input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """One step, differentiable -> (hy [B,H], cy [B,H])."""
    return _ops.lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)


def lstm_layer_forward(
    input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], weight_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor], reverse: bool, keep_state: bool,
    reset: Optional[Tensor] = None, zoneout_c: float = 0.0, zoneout_h: float = 0.0,
    zoneout_mask_c: Optional[Tensor] = None, zoneout_mask_h: Optional[Tensor] = None,
    recurrent_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer over all steps -> (output [.., P], h_n [B,P], c_n [B,H], gates [.., 4H], cells).
    The zoneout and recurrent dropout arguments: csrc/ops.cpp."""
    return _ops.lstm_layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                                   weight_hr, batch_sizes, reverse, keep_state, reset, zoneout_c,
                                   zoneout_h, zoneout_mask_c, zoneout_mask_h, recurrent_mask)


def lstm_layer_backward(
    grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
    input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    weight_hr: Optional[Tensor], batch_sizes: Optional[Tensor], reverse: bool,
    output: Tensor, gates: Tensor, cells: Tensor, need_grad_input: bool = True,
    reset: Optional[Tensor] = None, zoneout_c: float = 0.0, zoneout_h: float = 0.0,
    zoneout_mask_c: Optional[Tensor] = None, zoneout_mask_h: Optional[Tensor] = None,
    recurrent_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reverse loop -> grads of (input (no rows unless need_grad_input), h0, c0, weight_ih,
    weight_hh, bias, weight_hr)."""
    return _ops.lstm_layer_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih,
                                    weight_hh, weight_hr, batch_sizes, reverse, output, gates,
                                    cells, need_grad_input, reset, zoneout_c, zoneout_h,
                                    zoneout_mask_c, zoneout_mask_h, recurrent_mask)


def lstm_cell_forward(
    input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """One step -> (hy [B,H], cy [B,H], gates [B,4H] activated, for the backward)."""
    return _ops.lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)


def lstm_cell_backward(
    grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], input: Tensor, hx: Tensor, cx: Tensor,
    cy: Tensor, gates: Tensor, weight_ih: Tensor, weight_hh: Tensor, need_grad_input: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step back -> (grad_input (no rows unless need_grad_input), grad_hx, grad_cx,
    grad_weight_ih, grad_weight_hh, grad_bias)."""
    return _ops.lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, cy, gates, weight_ih,
                                   weight_hh, need_grad_input)
