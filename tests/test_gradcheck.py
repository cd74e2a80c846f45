"""torch.autograd.gradcheck (float64) on the differentiable ops (C++ autograd) and modules,
torch.library.opcheck on every op."""

import gc
import weakref

import pytest
import torch
from torch.autograd import gradcheck

import lstm_ext
from lstm_ext import _ops
from lstm_ext.functional import lstm_cell, lstm_layer

DT = torch.float64


def rand(*shape, requires_grad=True, seed=None):
    return torch.randn(*shape, dtype=DT, requires_grad=requires_grad)


def layer_args(T, B, I, H, bias=True, requires_grad=True):
    torch.manual_seed(0)
    args = [rand(T, B, I), rand(B, H), rand(B, H), rand(4 * H, I) * 0.5, rand(4 * H, H) * 0.5]
    args = [a.detach().requires_grad_(requires_grad) for a in args]
    if bias:
        args += [rand(4 * H, requires_grad=requires_grad), rand(4 * H, requires_grad=requires_grad)]
    else:
        args += [None, None]
    return args


def cell_args(B, I, H, bias=True, requires_grad=True):
    T_args = layer_args(1, B, I, H, bias, requires_grad)
    x = T_args[0].detach()[0].requires_grad_(requires_grad)
    return [x] + T_args[1:]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 1), (4, 3, 2, 5), (6, 2, 3, 1)])
def test_gradcheck_layer(T, B, I, H, bias):
    assert gradcheck(lstm_layer, layer_args(T, B, I, H, bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_layer_projection(bias, reverse):
    torch.manual_seed(0)
    args = layer_args(4, 3, 2, 5, bias)
    args[1] = rand(3, 2)  # h0 [B, P]
    args[4] = (rand(20, 2) * 0.5).detach().requires_grad_()  # weight_hh [4H, P]
    weight_hr = (rand(2, 5) * 0.5).detach().requires_grad_()
    assert gradcheck(lambda *a: lstm_layer(*a[:-1], weight_hr=a[-1], reverse=reverse),
                     args + [weight_hr])


@pytest.mark.parametrize("wanted", [(7,), (0, 7), (5,), (6,), (2, 4)], ids=str)
def test_gradcheck_layer_some_inputs_need_grad(wanted):
    """Only some arguments require grad, some optional ones are None: each gradient still lands on
    its own argument (the autograd node numbers only the tensors that were given)."""
    torch.manual_seed(0)
    x, h0, c0, w_ih, _, b_ih, b_hh = [a.detach() for a in layer_args(3, 2, 2, 4)]
    w_hh, h0, w_hr = rand(16, 3).detach() * 0.5, rand(2, 3).detach(), rand(3, 4).detach() * 0.5
    full = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]
    if 5 not in wanted and 6 not in wanted:
        full[5] = full[6] = None  # no biases: w_hr's position shifts among the given tensors
    for i in wanted:
        full[i].requires_grad_()
    inputs = [full[i] for i in wanted]

    def run(*chosen):
        args = list(full)
        for i, t in zip(wanted, chosen):
            args[i] = t
        return lstm_layer(*args)

    assert gradcheck(run, inputs)
    out, h_n, c_n = lstm_layer(*full)
    grads = torch.autograd.grad((out.sum() + h_n.sum() + c_n.sum()), inputs)
    assert [g.shape for g in grads] == [t.shape for t in inputs]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,I,H", [(1, 1, 1), (3, 2, 5)])
def test_gradcheck_cell(B, I, H, bias):
    assert gradcheck(lstm_cell, cell_args(B, I, H, bias))


def test_gradcheck_layer_partial_outputs():
    """Only some outputs reach the loss: the others' gradients arrive as None."""
    args = layer_args(3, 2, 2, 3)
    assert gradcheck(lambda *a: lstm_layer(*a)[0], args)
    assert gradcheck(lambda *a: lstm_layer(*a)[2], args)
    assert gradcheck(lambda *a: lstm_cell(*[t[0] if i == 0 else t for i, t in enumerate(a)])[1],
                     args)


@pytest.mark.parametrize("options", [dict(num_layers=2), dict(num_layers=2, batch_first=True),
                                     dict(bias=False)], ids=str)
def test_gradcheck_module(options):
    torch.manual_seed(0)
    model = lstm_ext.LSTM(2, 3, dtype=DT, **options)
    layers = options.get("num_layers", 1)
    x = rand(3, 4, 2) if options.get("batch_first") else rand(4, 3, 2)  # T = 4, B = 3
    h0, c0 = rand(layers, 3, 3), rand(layers, 3, 3)
    params = list(model.parameters())

    def run(x, h0, c0, *weights):
        with torch.nn.utils.stateless._reparametrize_module(
                model, dict(zip([n for n, _ in model.named_parameters()], weights))):
            out, (h, c) = model(x, (h0, c0))
        return out, h, c

    assert gradcheck(run, [x, h0, c0, *[p.detach().clone().requires_grad_() for p in params]])


def module_op_args(layers=2, bidirectional=True, proj=0, bias=True, with_states=True,
                   requires_grad=True, layer_norm=False):
    """Arguments of torch.ops.lstm_ext.lstm (I = 2, H = 3, T = 4, B = 3), without dropout."""
    torch.manual_seed(0)
    model = lstm_ext.LSTM(2, 3, num_layers=layers, bidirectional=bidirectional, proj_size=proj,
                          bias=bias, dtype=DT, layer_norm=layer_norm)
    params = [p.detach().clone().requires_grad_(requires_grad) for p in model.parameters()]
    states = layers * (2 if bidirectional else 1)
    h0 = rand(states, 3, proj or 3, requires_grad=requires_grad) if with_states else None
    c0 = rand(states, 3, 3, requires_grad=requires_grad) if with_states else None
    return [rand(4, 3, 2, requires_grad=requires_grad), h0, c0, params, bias, proj > 0, layers,
            0.0, True, bidirectional, None]


MODULE_OP_CASES = [dict(), dict(with_states=False), dict(layers=1, bidirectional=False),
                   dict(layers=3, bidirectional=False, proj=2, bias=False),
                   dict(layers=1, proj=1, with_states=False)]


@pytest.mark.parametrize("case", MODULE_OP_CASES, ids=str)
def test_gradcheck_module_op(case):
    """The whole-module op's one backward (layers in reverse, directions, projections), directly."""
    args = module_op_args(**case)
    tensors = [args[0]] + [t for t in args[1:3] if t is not None] + args[3]
    positions = [0] + [i for i in (1, 2) if args[i] is not None]

    def run(*given):
        call = list(args)
        for i, t in zip(positions, given):
            call[i] = t
        call[3] = list(given[len(positions):])
        return torch.ops.lstm_ext.lstm(*call)

    assert gradcheck(run, tensors)


@pytest.mark.parametrize("wanted", ["weights", "input", "states"])
def test_gradcheck_module_op_some_inputs_need_grad(wanted):
    args = module_op_args(proj=1, requires_grad=False)
    if wanted == "weights":
        args[3] = [p.requires_grad_() for p in args[3]]
        free = list(args[3])
    elif wanted == "input":
        free = [args[0].requires_grad_()]
    else:
        free = [args[1].requires_grad_(), args[2].requires_grad_()]

    def run(*given):
        call = list(args)
        if wanted == "weights":
            call[3] = list(given)
        elif wanted == "input":
            call[0] = given[0]
        else:
            call[1], call[2] = given
        return torch.ops.lstm_ext.lstm(*call)

    assert gradcheck(run, free)


@pytest.mark.parametrize("case", [dict(layers=1, bidirectional=False),
                                  dict(layers=2, bidirectional=False), dict()], ids=str)
def test_module_op_graph_is_freed(case):
    """The node keeps what its backward needs without holding its own outputs: a saved output
    held outside save_for_backward is a reference cycle through grad_fn that is never freed (it
    leaked every call's graph)."""
    output, h_n, c_n = torch.ops.lstm_ext.lstm(*module_op_args(**case))
    alive = [weakref.ref(t) for t in (output, h_n, c_n)]
    del output, h_n, c_n
    gc.collect()
    assert [ref() is None for ref in alive] == [True, True, True]


@pytest.mark.parametrize("case", [dict(), dict(with_states=False, proj=1)], ids=str)
def test_module_op_typed_binding_is_the_same_op(case):
    """lstm_ext._C.lstm (what eager modules call) and torch.ops.lstm_ext.lstm (what torch.compile
    traces) are one op: the same outputs, the same gradients, the same argument checks."""
    args = module_op_args(**case)
    results = []
    for op in (lstm_ext._C.lstm, torch.ops.lstm_ext.lstm):
        outputs = op(*args)
        leaves = [args[0]] + [t for t in args[1:3] if t is not None] + args[3]
        grads = torch.autograd.grad([o.sum() for o in outputs], leaves)
        results.append((outputs, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(out_a + grads_a, out_b + grads_b):
        assert torch.equal(a, b)
    bad = list(args)
    bad[6] = 0
    with pytest.raises(RuntimeError, match=r"lstm_ext::lstm: num_layers must be at least 1"):
        lstm_ext._C.lstm(*bad)
    bad[3] = args[3][:-1] + ["not a tensor"]
    with pytest.raises(TypeError):
        lstm_ext._C.lstm(*bad)


@pytest.mark.parametrize("bias", [True, False])
def test_cell_op_typed_binding_is_the_same_op(bias):
    """lstm_ext._C.lstm_cell (what the eager LSTMCell calls) and torch.ops.lstm_ext.lstm_cell."""
    args = cell_args(3, 4, 6, bias)
    results = []
    for op in (lstm_ext._C.lstm_cell, torch.ops.lstm_ext.lstm_cell):
        outputs = op(*args)
        leaves = [a for a in args if a is not None]
        results.append((outputs, torch.autograd.grad([o.sum() for o in outputs], leaves)))
    (out_a, grads_a), (out_b, grads_b) = results
    for a, b in zip(out_a + grads_a, out_b + grads_b):
        assert torch.equal(a, b)


def test_module_op_dropout_masks_are_nn_lstm_s():
    """Dropout between layers inside the op draws the same masks as torch.nn.LSTM from the same
    seed; the gradient goes through the masks (compared with nn.LSTM in test_parity_full)."""
    args = module_op_args(layers=3, bidirectional=False)
    args[7] = 0.5
    torch.manual_seed(5)
    out_a = torch.ops.lstm_ext.lstm(*args)[0]
    torch.manual_seed(5)
    out_b = torch.ops.lstm_ext.lstm(*args)[0]
    torch.manual_seed(6)
    out_c = torch.ops.lstm_ext.lstm(*args)[0]
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out_c)


def test_gradcheck_cell_module():
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(2, 3, dtype=DT)
    x, h, c = rand(4, 2), rand(4, 3), rand(4, 3)
    assert gradcheck(lambda x, h, c: cell(x, (h, c)), [x, h, c])


# ---- opcheck: schema, fake kernel, autograd registration and dispatch consistency ---------------

def _detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_layer(bias, requires_grad):
    """The differentiable op: its autograd kernel, fake kernel, and torch.compile's tracing of its
    forward and backward."""
    args = layer_args(5, 3, 4, 6, bias, requires_grad)
    torch.library.opcheck(torch.ops.lstm_ext.lstm_layer.default, args + [None, None, False])


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("case", MODULE_OP_CASES, ids=str)
def test_opcheck_module_op(case, requires_grad):
    torch.library.opcheck(torch.ops.lstm_ext.lstm.default,
                          module_op_args(**case, requires_grad=requires_grad))


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cell(bias, requires_grad):
    torch.library.opcheck(torch.ops.lstm_ext.lstm_cell.default,
                          cell_args(3, 4, 6, bias, requires_grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep_state", [True, False])
def test_opcheck_layer_forward(dtype, bias, keep_state):
    args = [a.to(dtype) if a is not None else None for a in _detached(layer_args(5, 3, 4, 6, bias))]
    torch.library.opcheck(torch.ops.lstm_ext.lstm_layer_forward.default,
                          args + [None, None, False, keep_state])


@pytest.mark.parametrize("with_grads", [(True, True, True), (True, False, False),
                                        (False, True, True), (False, False, False)])
def test_opcheck_layer_backward(with_grads):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _detached(layer_args(5, 3, 4, 6))
    output, h_n, c_n, gates, cells = _ops.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                             None, None, False, True)
    grads = [torch.randn_like(t) if use else None for t, use in zip((output, h_n, c_n), with_grads)]
    for need_grad_input in (True, False):
        torch.library.opcheck(torch.ops.lstm_ext.lstm_layer_backward.default,
                              grads + [x, h0, c0, w_ih, w_hh, None, None, False, output, gates,
                                       cells, need_grad_input])


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cell_forward(bias):
    torch.library.opcheck(torch.ops.lstm_ext.lstm_cell_forward.default,
                          _detached(cell_args(3, 4, 6, bias)))


@pytest.mark.parametrize("with_grads", [(True, True), (True, False), (False, True)])
def test_opcheck_cell_backward(with_grads):
    x, hx, cx, w_ih, w_hh, b_ih, b_hh = _detached(cell_args(3, 4, 6))
    hy, cy, gates = _ops.lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh)
    grads = [torch.randn_like(t) if use else None for t, use in zip((hy, cy), with_grads)]
    for need_grad_input in (True, False):
        torch.library.opcheck(torch.ops.lstm_ext.lstm_cell_backward.default,
                              grads + [x, hx, cx, cy, gates, w_ih, w_hh, need_grad_input])


# The module's kernel ops (what torch.func runs), with dropout too: saved's layout depends on it.
MODULE_KERNEL_CASES = MODULE_OP_CASES + [
    dict(layers=3, bidirectional=False, dropout=0.4),
    dict(layers=2, dropout=0.3, with_states=False),
    dict(layers=1, bidirectional=False, options="reset, zoneout"),
    dict(layers=2, proj=2, with_states=False, options="zoneout h, recurrent dropout"),
    dict(layers=2, dropout=0.3, options="all"),
]

# reset [T, B], zoneout_c, zoneout_h, recurrent_dropout, layer_norm: lstm's arguments after
# batch_sizes
MODULE_OPTIONS = {
    "reset, zoneout": (True, 0.3, 0.3, 0.0, False),
    "zoneout h, recurrent dropout": (False, 0.0, 0.4, 0.3, False),
    "all": (True, 0.2, 0.3, 0.4, True),
}


def module_kernel_args(dropout=0.0, options=None, **case):
    """lstm's arguments (lstm_forward's): with options, every one after batch_sizes too."""
    with_reset, *probabilities, layer_norm = MODULE_OPTIONS[options] if options else (
        False, 0.0, 0.0, 0.0, False)
    args = _detached(module_op_args(**case, requires_grad=False, layer_norm=layer_norm))
    args[3] = _detached(args[3])
    args[7] = dropout
    if options:
        args += [torch.rand(4, 3) < 0.3 if with_reset else None, *probabilities, layer_norm]
    return args


def module_backward_args(grads, args, output, saved):
    """lstm_backward's arguments: output and saved come between batch_sizes and the options."""
    return [*grads, *args[:11], output, saved, *args[11:]]


@pytest.mark.parametrize("case", MODULE_KERNEL_CASES, ids=str)
def test_opcheck_module_forward(case):
    args = module_kernel_args(**case)
    # opcheck reruns the op: the same dropout masks each time, from the same seed
    torch.manual_seed(1)
    torch.library.opcheck(torch.ops.lstm_ext.lstm_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", MODULE_KERNEL_CASES, ids=str)
def test_opcheck_module_backward(case):
    args = module_kernel_args(**case)
    output, h_n, c_n, saved = torch.ops.lstm_ext.lstm_forward(*args)
    grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
    torch.library.opcheck(torch.ops.lstm_ext.lstm_backward.default,
                          module_backward_args(grads, args, output, saved))


@pytest.mark.parametrize("case", MODULE_KERNEL_CASES, ids=str)
def test_module_kernels_equal_the_module_op(case):
    """lstm_forward / lstm_backward (torch.func's route) give the C++ node's outputs and grads."""
    args = module_kernel_args(**case)
    torch.manual_seed(2)
    output, h_n, c_n, saved = torch.ops.lstm_ext.lstm_forward(*args)
    grads = [torch.randn_like(t) for t in (output, h_n, c_n)]
    computed = torch.ops.lstm_ext.lstm_backward(*module_backward_args(grads, args, output, saved))
    tensors = [t.requires_grad_() for t in [args[0]] + [t for t in args[1:3] if t is not None]
               + args[3]]
    torch.manual_seed(2)
    expected_outputs = torch.ops.lstm_ext.lstm(*args)
    expected = torch.autograd.grad(expected_outputs, tensors, grads)
    for actual, wanted in zip((output, h_n, c_n), expected_outputs):
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0)
    actual_grads = [computed[0]] + [g for g, t in zip(computed[1:3], args[1:3]) if t is not None]
    for actual, wanted in zip(actual_grads + list(computed[3]), expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-14)


def test_module_backward_checks_saved():
    args = module_kernel_args()
    output, h_n, c_n, saved = torch.ops.lstm_ext.lstm_forward(*args)
    with pytest.raises(RuntimeError, match=r"lstm_backward: saved must hold \d+ tensors \(what "
                                           r"lstm_forward returned for this configuration\), got"):
        torch.ops.lstm_ext.lstm_backward(output, None, None, *args, output, saved[:-1])


def test_kernel_ops_are_not_differentiable_silently():
    """Differentiating through a kernel op is an error, not a gradient of zero."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = layer_args(5, 3, 4, 6)
    output = torch.ops.lstm_ext.lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None,
                                                   None, False, False)[0]
    with pytest.raises(RuntimeError, match="derivative for .*lstm_layer_forward.* not implemented"):
        output.sum().backward()


def test_bias_gradients_are_separate_tensors():
    """The kernels compute one bias gradient for both biases; the two .grad fields must still be
    independent tensors (an in-place update of one must not change the other)."""
    torch.manual_seed(0)
    model = lstm_ext.LSTM(2, 4)
    out, (h, c) = model(torch.randn(3, 2, 2))
    (out.sum() + h.sum()).backward()
    b_ih, b_hh = model.bias_ih_l0.grad, model.bias_hh_l0.grad
    assert torch.equal(b_ih, b_hh)
    assert b_ih.data_ptr() != b_hh.data_ptr()
    before = b_hh.clone()
    b_ih.add_(1.0)
    assert torch.equal(b_hh, before)
