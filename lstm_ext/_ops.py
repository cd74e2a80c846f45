"""Loads the compiled kernels, registers their fake (meta) kernels, and wraps each op thinly.

Shapes (gate order i, f, g, o): input [T, B, I] (layer) or [B, I] (cell); states [B, H];
weight_ih [4H, I]; weight_hh [4H, H]; biases [4H].
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _load_compiled_module():
    try:
        from . import _build_info
    except ImportError as exc:
        raise ImportError(
            "lstm_ext is not built: its compiled module is missing. Install it with "
            f"`pip install .` (or `{REBUILD_COMMAND}` against the torch you have) from the "
            "source tree; running from inside the source tree imports the unbuilt sources."
        ) from exc
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


@torch.library.register_fake("lstm_ext::lstm_layer_forward")
def _(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, keep_state):
    T, B, _ = input.shape
    H = weight_hh.shape[1]
    kept = T if keep_state else 0
    return (
        input.new_empty(T, B, H),
        input.new_empty(B, H),
        input.new_empty(B, H),
        input.new_empty(kept, B, 4 * H),
        input.new_empty(kept, B, H),
    )


@torch.library.register_fake("lstm_ext::lstm_layer_backward")
def _(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates, cells):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty(weight_hh.shape[0]),
    )


@torch.library.register_fake("lstm_ext::lstm_cell_forward")
def _(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
    B = input.shape[0]
    H = weight_hh.shape[1]
    return input.new_empty(B, H), input.new_empty(B, H), input.new_empty(B, 4 * H)


@torch.library.register_fake("lstm_ext::lstm_cell_backward")
def _(grad_hy, grad_cy, input, hx, cx, cy, gates, weight_ih, weight_hh):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        hx.new_empty(hx.shape),
        cx.new_empty(cx.shape),
        weight_ih.new_empty(weight_ih.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty(weight_hh.shape[0]),
    )


# ---- typed wrappers ------------------------------------------------------------------------------


def lstm_layer_forward(
    input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], keep_state: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer over all steps -> (output [T,B,H], h_n, c_n, gates [T|0,B,4H], cells [T|0,B,H])."""
    return _ops.lstm_layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, keep_state)


def lstm_layer_backward(
    grad_output: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor],
    input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    output: Tensor, gates: Tensor, cells: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reverse loop -> (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias)."""
    return _ops.lstm_layer_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih,
                                    weight_hh, output, gates, cells)


def lstm_cell_forward(
    input: Tensor, hx: Tensor, cx: Tensor, weight_ih: Tensor, weight_hh: Tensor,
    bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """One step -> (hy [B,H], cy [B,H], gates [B,4H] activated, for the backward)."""
    return _ops.lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)


def lstm_cell_backward(
    grad_hy: Optional[Tensor], grad_cy: Optional[Tensor], input: Tensor, hx: Tensor, cx: Tensor,
    cy: Tensor, gates: Tensor, weight_ih: Tensor, weight_hh: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step back -> (grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias)."""
    return _ops.lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, cy, gates, weight_ih, weight_hh)
