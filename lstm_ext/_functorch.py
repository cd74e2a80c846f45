"""torch.func support: the ops under grad, vjp, jacrev, vmap and functional_call.

functorch refuses C++ autograd nodes (csrc/autograd.cpp), so under a torch.func transform the
modules and functions call the Python autograd.Functions below instead. They run the same C++
kernels (lstm_forward / lstm_backward, lstm_layer_forward / _backward, lstm_cell_forward /
_backward) and let functorch vmap them (generate_vmap_rule) with the batching rules registered at
the end. Outside transforms none of this runs: the C++ node is the path (a Python Function costs
tens of microseconds per call).

Batching rules: where only the data is batched (input, states, incoming gradients; the weights
shared), the vmapped dimension is folded into the batch and each kernel runs once; where a weight
is batched (an ensemble from stack_module_state), for a packed sequence, and for the backward
kernels (whose weight gradients are per vmapped item) the kernel runs once per item.

Second derivatives under transforms (grad of grad, hessian) differentiate the pure-PyTorch
reference, as create_graph=True does outside them; forward-mode AD (jvp, jacfwd) is not supported.
"""

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _ops

_lstm_ext = torch.ops.lstm_ext


def transforms_active() -> bool:
    return torch._C._are_functorch_transforms_active()


def _differentiable_backward_wanted() -> bool:
    """Whether the derivative of a backward may be taken: more than one differentiating transform
    (grad-like) is active (a functorch backward always runs with grad mode on)."""
    levels = torch._C._functorch.get_interpreter_stack() or []
    grad_like = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return sum(level.key() in grad_like for level in levels) >= 2


def _inference_only() -> bool:
    """No gradient of this call can be taken: grad mode is off and only vmap transforms are
    active. The public op then runs (through its batching rule): no state kept for a backward.
    (Whether a tensor is differentiated cannot be read through vmap's wrappers.)"""
    if torch.is_grad_enabled():
        return False
    levels = torch._C._functorch.get_interpreter_stack() or []
    return all(level.key() == torch._C._functorch.TransformType.Vmap for level in levels)


def _reference_grads(inputs: Sequence[Optional[Tensor]], outputs: Sequence[Tensor],
                     grad_outputs: Sequence[Optional[Tensor]], needs: Sequence[bool]):
    """Gradients of `outputs` (the reference, recomputed) for the inputs that need them, as
    differentiable tensors; zeros for an input the outputs do not depend on."""
    wanted = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
    positions = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    grads: List[Optional[Tensor]] = [None] * len(inputs)
    if not wanted or not positions:
        return grads
    computed = torch.autograd.grad([o for o, _ in wanted], [inputs[i] for i in positions],
                                   [g for _, g in wanted], create_graph=True, allow_unused=True)
    for i, g in zip(positions, computed):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])
    return grads


# ---- the whole module ---------------------------------------------------------------------------


class _Module(torch.autograd.Function):
    """lstm under transforms. Arguments: config (has_biases, has_projections, num_layers, dropout,
    train, bidirectional), options (zoneout_c, zoneout_h, recurrent_dropout, layer_norm),
    batch_sizes, reset, input, h0, c0, *params. Outputs: output, h_n, c_n and the saved state
    (not differentiable)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(config, options, batch_sizes, reset, input, h0, c0, *params):
        output, h_n, c_n, saved = _lstm_ext.lstm_forward(input, h0, c0, list(params), *config,
                                                         batch_sizes, reset, *options)
        return (output, h_n, c_n, *saved)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        config, options, batch_sizes, reset, input, h0, c0, *params = inputs
        saved = outputs[3:]
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.config, ctx.options, ctx.batch_sizes, ctx.n_params = \
            config, options, batch_sizes, len(params)
        ctx.save_for_backward(reset, input, h0, c0, *params, outputs[0], *saved)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_saved_grads):
        reset, input, h0, c0, *rest = ctx.saved_tensors
        params, output, saved = rest[:ctx.n_params], rest[ctx.n_params], rest[ctx.n_params + 1:]
        has_biases, has_projections, num_layers, dropout, train, bidirectional = ctx.config
        zoneout_c, zoneout_h, recurrent_dropout, layer_norm = ctx.options
        inputs = [input, h0, c0, *params]
        needs = ctx.needs_input_grad[4:]
        if _differentiable_backward_wanted():
            drawn = [name for name, used in (
                ("dropout", num_layers > 1 and dropout > 0),
                ("zoneout", zoneout_c > 0 or zoneout_h > 0),
                ("recurrent_dropout", recurrent_dropout > 0)) if train and used]
            if drawn:
                raise NotImplementedError(
                    f"lstm_ext: second derivatives under torch.func transforms with "
                    f"{', '.join(drawn)} in training mode are not supported (call model.eval(), "
                    "or set them to 0)")
            if h0 is None:  # the forward started from zeros: saved[0], saved[1]
                states = num_layers * (2 if bidirectional else 1)
                h0_used = saved[0].expand(states, *saved[0].shape)
                c0_used = saved[1].expand(states, *saved[1].shape)
            else:
                h0_used, c0_used = h0, c0
            with torch.enable_grad():
                outputs = _lstm_ext.lstm_reference(input, h0_used, c0_used, list(params),
                                                   has_biases, has_projections, num_layers,
                                                   bidirectional, ctx.batch_sizes, [], [], [],
                                                   reset, zoneout_c, zoneout_h, layer_norm)
            grads = _reference_grads(inputs, outputs, (grad_output, grad_h_n, grad_c_n), needs)
            return (None, None, None, None, *grads)
        grad_input, grad_h0, grad_c0, grad_params = _lstm_ext.lstm_backward(
            grad_output, grad_h_n, grad_c_n, input, h0, c0, list(params), *ctx.config,
            ctx.batch_sizes, output, list(saved), reset, *ctx.options)
        grads = [grad_input, grad_h0 if h0 is not None else None,
                 grad_c0 if c0 is not None else None, *grad_params]
        return (None, None, None, None, *[g if need else None for g, need in zip(grads, needs)])


def lstm(input: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], params: List[Tensor],
         has_biases: bool, has_projections: bool, num_layers: int, dropout: float, train: bool,
         bidirectional: bool, batch_sizes: Optional[Tensor], reset: Optional[Tensor] = None,
         zoneout_c: float = 0.0, zoneout_h: float = 0.0, recurrent_dropout: float = 0.0,
         layer_norm: bool = False):
    """torch.ops.lstm_ext.lstm, under transforms: through _Module unless _inference_only()."""
    config = (has_biases, has_projections, num_layers, dropout, train, bidirectional)
    options = (zoneout_c, zoneout_h, recurrent_dropout, layer_norm)
    if _inference_only():
        return _lstm_ext.lstm(input, h0, c0, params, *config, batch_sizes, reset, *options)
    return _Module.apply(config, options, batch_sizes, reset, input, h0, c0, *params)[:3]


# ---- one layer ----------------------------------------------------------------------------------


class _Layer(torch.autograd.Function):
    """lstm_layer under transforms. Arguments: batch_sizes, reverse, input, h0, c0, weight_ih,
    weight_hh, bias_ih, bias_hh, weight_hr. Outputs: output, h_n, c_n, gates, cells."""

    generate_vmap_rule = True

    @staticmethod
    def forward(batch_sizes, reverse, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                weight_hr):
        return _lstm_ext.lstm_layer_forward(input, h0, c0, weight_ih, weight_hh, bias_ih,
                                            bias_hh, weight_hr, batch_sizes, reverse, True)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        batch_sizes, reverse, *tensors = inputs
        output, _, _, gates, cells = outputs
        ctx.mark_non_differentiable(gates, cells)
        ctx.set_materialize_grads(False)
        ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        ctx.save_for_backward(*tensors, output, gates, cells)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        *inputs, output, gates, cells = ctx.saved_tensors
        input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = inputs
        needs = ctx.needs_input_grad[2:]
        if _differentiable_backward_wanted():
            with torch.enable_grad():
                outputs = _lstm_ext.lstm_layer_reference(input, h0, c0, weight_ih, weight_hh,
                                                         bias_ih, bias_hh, weight_hr,
                                                         ctx.batch_sizes, ctx.reverse)
            return (None, None, *_reference_grads(inputs, outputs,
                                                  (grad_output, grad_h_n, grad_c_n), needs))
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = \
            _lstm_ext.lstm_layer_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0,
                                          weight_ih, weight_hh, weight_hr, ctx.batch_sizes,
                                          ctx.reverse, output, gates, cells, needs[0])
        grads = [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_bias,
                 grad_w_hr if weight_hr is not None else None]
        return (None, None, *[g if need else None for g, need in zip(grads, needs)])


def lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
               reverse):
    """torch.ops.lstm_ext.lstm_layer, under transforms."""
    if _inference_only():
        return _lstm_ext.lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                                    weight_hr, batch_sizes, reverse)
    return _Layer.apply(batch_sizes, reverse, input, h0, c0, weight_ih, weight_hh, bias_ih,
                        bias_hh, weight_hr)[:3]


# ---- one step -----------------------------------------------------------------------------------


class _Cell(torch.autograd.Function):
    """lstm_cell under transforms. Outputs: hy, cy, gates."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
        return _lstm_ext.lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        _, cy, gates = outputs
        ctx.mark_non_differentiable(gates)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, cy, gates)

    @staticmethod
    def backward(ctx, grad_hy, grad_cy, _grad_gates):
        *inputs, cy, gates = ctx.saved_tensors
        input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh = inputs
        if _differentiable_backward_wanted():
            with torch.enable_grad():
                outputs = _lstm_ext.lstm_cell_reference(input, hx, cx, weight_ih, weight_hh,
                                                        bias_ih, bias_hh)
            return tuple(_reference_grads(inputs, outputs, (grad_hy, grad_cy),
                                          ctx.needs_input_grad))
        grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias = \
            _lstm_ext.lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, cy, gates, weight_ih,
                                         weight_hh, ctx.needs_input_grad[0])
        grads = [grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_bias]
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
    """torch.ops.lstm_ext.lstm_cell, under transforms."""
    if _inference_only():
        return _lstm_ext.lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    return _Cell.apply(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)[:2]


# ---- batching rules -------------------------------------------------------------------------------
#
# A rule gets the op's arguments with the vmapped dimension of each tensor at in_dims (None: not
# vmapped; a list for a Tensor[] argument) and returns the outputs with out_dims. It calls the ops
# themselves: inside a rule the vmap level is still on the interpreter stack (only its dispatch
# key is excluded), where an autograd.Function cannot run. (The public ops' rules are what a
# direct torch.ops call under vmap meets; the modules and functions go through the Functions.)

_RANDOM_ERROR = ("vmap: called random operation while in randomness error mode. Please either use "
                 "the 'same' or 'different' randomness flags on vmap or perform the randomness "
                 "operation out of vmap (lstm_ext: dropout between layers, zoneout or "
                 "recurrent dropout in training mode)")


def _is_batched(dim) -> bool:
    if isinstance(dim, (list, tuple)):
        return any(_is_batched(d) for d in dim)
    return dim is not None


def _select(arg, dim, index):
    if isinstance(arg, (list, tuple)):
        return [_select(a, d, index) for a, d in zip(arg, dim)]
    return arg if dim is None else arg.select(dim, index)


def _stack(results):
    """Per-item results (each a tuple of tensors or lists of tensors) -> stacked, out_dims 0."""
    first = results[0]
    if isinstance(first, (list, tuple)):
        stacked = [_stack([r[i] for r in results]) for i in range(len(first))]
        return type(first)(s for s, _ in stacked), type(first)(d for _, d in stacked)
    return torch.stack(results), 0


def _per_item(info, fn, args, in_dims, random: bool = False):
    """fn once per vmapped item. random: fn draws dropout masks, by vmap's randomness flag."""
    rng = None
    if random:
        if info.randomness == "error":
            raise RuntimeError(_RANDOM_ERROR)
        if info.randomness == "same":  # every item draws the same masks
            rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all()
                                          if torch.cuda.is_initialized() else None)
    results = []
    for index in range(info.batch_size):
        if rng is not None:
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
        results.append(fn(*[_select(a, d, index) for a, d in zip(args, in_dims)]))
    return _stack(results)


def _fold(t: Optional[Tensor], dim, at: int, size: int) -> Optional[Tensor]:
    """The vmapped dimension `dim` of t merged into t's batch dimension `at` (item-major)."""
    if t is None:
        return None
    if dim is None:
        t = t.unsqueeze(at).expand(*t.shape[:at], size, *t.shape[at:])
    else:
        t = t.movedim(dim, at)
    return t.flatten(at, at + 1)


def _unfold(t: Tensor, at: int, size: int) -> Tensor:
    return t.unflatten(at, (size, -1))


def _draws_random(dropout, train, num_layers, zoneout_c, zoneout_h, recurrent_dropout) -> bool:
    """Whether lstm / lstm_forward draws masks: dropout between layers, zoneout, recurrent
    dropout, in training."""
    return train and ((dropout > 0 and num_layers > 1) or zoneout_c > 0 or zoneout_h > 0
                      or recurrent_dropout > 0)


def _module_vmap(op, keeps_state):
    """The batching rule of lstm / lstm_forward: the vmapped dimension folded into the batch,
    reset's too; one call per item for batched weights, packed input, or masks drawn the same
    for every item."""
    def rule(info, in_dims, input, h0, c0, params, has_biases, has_projections, num_layers,
             dropout, train, bidirectional, batch_sizes, reset=None, zoneout_c=0.0,
             zoneout_h=0.0, recurrent_dropout=0.0, layer_norm=False):
        args = (input, h0, c0, params, has_biases, has_projections, num_layers, dropout, train,
                bidirectional, batch_sizes, reset, zoneout_c, zoneout_h, recurrent_dropout,
                layer_norm)
        in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
        random = _draws_random(dropout, train, num_layers, zoneout_c, zoneout_h,
                               recurrent_dropout)
        if (_is_batched(in_dims[3]) or batch_sizes is not None
                or (random and info.randomness != "different")):
            return _per_item(info, op(), args, in_dims, random)
        n = info.batch_size
        outputs = op()(_fold(input, in_dims[0], 1, n), _fold(h0, in_dims[1], 1, n),
                       _fold(c0, in_dims[2], 1, n), params, has_biases, has_projections,
                       num_layers, dropout, train, bidirectional, None,
                       _fold(reset, in_dims[11], 1, n), zoneout_c, zoneout_h, recurrent_dropout,
                       layer_norm)
        dims = (1, 1, 1)  # output [T, B, .], h_n, c_n [L*D, B, .]
        unfolded = tuple(_unfold(t, d, n) for t, d in zip(outputs[:3], dims))
        if not keeps_state:
            return unfolded, dims
        # saved: the zero states and recurrent dropout masks [B, .] (batch first), the rest
        # per-step [T, B, .]
        saved_dims = [0 if t.dim() == 2 else 1 for t in outputs[3]]
        saved = [_unfold(t, d, n) for t, d in zip(outputs[3], saved_dims)]
        return unfolded + (saved,), dims + (saved_dims,)
    return rule


torch.library.register_vmap("lstm_ext::lstm_forward",
                            _module_vmap(lambda: _lstm_ext.lstm_forward, keeps_state=True))
torch.library.register_vmap("lstm_ext::lstm", _module_vmap(lambda: _lstm_ext.lstm,
                                                           keeps_state=False))


def _layer_vmap(op, keeps_state):
    def rule(info, in_dims, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
             batch_sizes, reverse, *further):
        args = (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes,
                reverse, *further)
        if any(_is_batched(d) for d in in_dims[3:8]) or batch_sizes is not None:
            return _per_item(info, op(), args, in_dims)
        n = info.batch_size
        # lstm_layer_forward's further arguments: keep_state, then reset [T, B], zoneout_c,
        # zoneout_h, the zoneout masks [T, B, .] and the recurrent dropout mask [B, P]
        batch_at = {11: 1, 14: 1, 15: 1, 16: 0}
        further = [_fold(a, in_dims[i], batch_at[i], n) if i in batch_at else a
                   for i, a in enumerate(further, start=10)]
        outputs = op()(_fold(input, in_dims[0], 1, n), _fold(h0, in_dims[1], 0, n),
                       _fold(c0, in_dims[2], 0, n), weight_ih, weight_hh, bias_ih, bias_hh,
                       weight_hr, None, reverse, *further)
        dims = (1, 0, 0, 1, 1) if keeps_state else (1, 0, 0)  # output, h_n, c_n (gates, cells)
        return tuple(_unfold(t, d, n) for t, d in zip(outputs, dims)), dims
    return rule


torch.library.register_vmap("lstm_ext::lstm_layer_forward",
                            _layer_vmap(lambda: _lstm_ext.lstm_layer_forward, keeps_state=True))
torch.library.register_vmap("lstm_ext::lstm_layer",
                            _layer_vmap(lambda: _lstm_ext.lstm_layer, keeps_state=False))


def _cell_vmap(op, outputs_count):
    def rule(info, in_dims, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh):
        args = (input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
        if any(_is_batched(d) for d in in_dims[3:]):
            return _per_item(info, op(), args, in_dims)
        n = info.batch_size
        outputs = op()(_fold(input, in_dims[0], 0, n), _fold(hx, in_dims[1], 0, n),
                       _fold(cx, in_dims[2], 0, n), weight_ih, weight_hh, bias_ih, bias_hh)
        return tuple(_unfold(t, 0, n) for t in outputs), (0,) * outputs_count
    return rule


torch.library.register_vmap("lstm_ext::lstm_cell_forward",
                            _cell_vmap(lambda: _lstm_ext.lstm_cell_forward, 3))
torch.library.register_vmap("lstm_ext::lstm_cell", _cell_vmap(lambda: _lstm_ext.lstm_cell, 2))


def _per_item_rule(op):
    """The backward kernels: their weight gradients are per vmapped item, so one call per item."""
    def rule(info, in_dims, *args):
        return _per_item(info, op, args, in_dims)
    return rule


for _name in ("lstm_backward", "lstm_layer_backward", "lstm_cell_backward"):
    torch.library.register_vmap(f"lstm_ext::{_name}", _per_item_rule(getattr(_lstm_ext, _name)))
