"""Bad input: a Python exception naming the argument and what was expected, never a crash."""

import pytest
import torch

import lstm_ext
from lstm_ext import _ops

F32, F64 = torch.float32, torch.float64


@pytest.fixture
def lstm():
    return lstm_ext.LSTM(3, 4, num_layers=2)


@pytest.fixture
def cell():
    return lstm_ext.LSTMCell(3, 4)


def x(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype)


# ---- the modules: nn.LSTM's and nn.LSTMCell's own errors, then lstm_ext's details ----------
#
# Each bad call is made on torch.nn's module and on lstm_ext's: the same exception type, and our
# message starts with nn's (code and tests that match on nn's words keep working) and goes on
# with what was wrong in our words.

def _packed(T, B, I):
    lengths = list(range(T, T - B, -1))
    return torch.nn.utils.rnn.pack_padded_sequence(torch.randn(T, B, I), lengths)


LSTM_ERRORS = {  # name: (module arguments, call arguments, what our details mention)
    "input 1-D": ((3, 4), lambda: (x(3),), "input of shape [3]"),
    "input 4-D": ((3, 4), lambda: (x(1, 5, 2, 3),), "input of shape [1, 5, 2, 3]"),
    "input size": ((3, 4), lambda: (x(7, 2, 5),), "input of shape [7, 2, 5]"),
    "input size, unbatched": ((3, 4), lambda: (x(7, 5),), "input of shape [7, 5]"),
    "empty sequence": ((3, 4), lambda: (x(0, 2, 3),), "input of shape [0, 2, 3]"),
    "empty sequence, unbatched": ((3, 4), lambda: (x(0, 3),), "input of shape [0, 3]"),
    "h_0 size": ((3, 4, 2), lambda: (x(7, 2, 3), (x(2, 2, 5), x(2, 2, 4))), "hx[0] is h_0"),
    "h_0 batch": ((3, 4, 2), lambda: (x(7, 2, 3), (x(2, 3, 4), x(2, 3, 4))), "hx[0] is h_0"),
    "h_0 layers": ((3, 4, 2), lambda: (x(7, 2, 3), (x(1, 2, 4), x(2, 2, 4))), "hx[0] is h_0"),
    "c_0 size": ((3, 4, 2), lambda: (x(7, 2, 3), (x(2, 2, 4), x(2, 2, 5))), "hx[1] is c_0"),
    "h_0 size, unbatched": ((3, 4), lambda: (x(7, 3), (x(1, 5), x(1, 4))), "hx[0] is h_0"),
    "h_0 with projection": (dict(input_size=3, hidden_size=4, proj_size=2),
                            lambda: (x(7, 2, 3), (x(1, 2, 4), x(1, 2, 4))), "proj_size"),
    "hx 2-D for batched input": ((3, 4), lambda: (x(7, 2, 3), (x(1, 4), x(1, 4))), ""),
    "hx 3-D for unbatched input": ((3, 4), lambda: (x(7, 3), (x(1, 1, 4), x(1, 1, 4))), ""),
    "hx of three": ((3, 4), lambda: (x(7, 2, 3), (x(1, 2, 4),) * 3), "hx is a tuple of 3"),
    "input dtype": ((3, 4), lambda: (x(7, 2, 3, dtype=F64),), ""),
    "integer input": ((3, 4), lambda: (torch.zeros(7, 2, 3, dtype=torch.int64),),
                      "computes in floating point"),
}


def _nn_and_ours(args):
    if isinstance(args, dict):
        return torch.nn.LSTM(**args), lstm_ext.LSTM(**args)
    return torch.nn.LSTM(*args), lstm_ext.LSTM(*args)


def _error_of(module, call_args):
    try:
        module(*call_args)
    except Exception as exc:  # noqa: BLE001 - the exception is what is compared
        return exc
    raise AssertionError(f"{type(module).__name__} accepted the bad input")


@pytest.mark.parametrize("case", list(LSTM_ERRORS))
def test_lstm_errors_start_with_nn_lstms(case):
    module_args, make_call_args, details = LSTM_ERRORS[case]
    reference, ours = _nn_and_ours(module_args)
    call_args = make_call_args()
    expected, actual = _error_of(reference, call_args), _error_of(ours, call_args)
    assert type(actual) is type(expected), (actual, expected)
    if case == "integer input":  # nn's advice (model.to(torch.int64)) is not repeated
        prefix = str(expected).split(" Convert input")[0]
    else:
        prefix = str(expected)
    assert str(actual).startswith(prefix), (str(actual), str(expected))
    assert details in str(actual)


@pytest.mark.parametrize("hx", [torch.zeros(2, 2, 4), 3.0, [torch.zeros(2, 2, 4), None]])
def test_lstm_hx_not_a_pair_of_tensors(lstm, hx):
    # nn.LSTM fails here by accident (IndexError, AttributeError); ours says what hx must be.
    with pytest.raises(TypeError, match=r"lstm_ext.LSTM: hx(\[1\])? must be a (tuple|Tensor)"):
        lstm(x(7, 2, 3), hx)


def test_lstm_packed_input_errors():
    # nn.LSTM leaves these to its kernels ("The size of tensor a (2) must match ...", "mat1 and
    # mat2 shapes cannot be multiplied"); ours are its sequence-input errors.
    lstm = lstm_ext.LSTM(3, 4)
    with pytest.raises(RuntimeError, match=r"^Expected hidden\[0\] size \(1, 3, 4\), got "
                                           r"\[1, 2, 4\]"):
        lstm(_packed(5, 3, 3), (x(1, 2, 4), x(1, 2, 4)))
    with pytest.raises(RuntimeError, match=r"^input.size\(-1\) must be equal to input_size. "
                                           r"Expected 3, got 2"):
        lstm(_packed(5, 3, 2))


def test_lstm_mixed_weight_dtypes(lstm):
    lstm.weight_hh_l1.data = lstm.weight_hh_l1.data.double()
    with pytest.raises(ValueError, match=r"all parameters must share one dtype, but weight_ih_l0 is "
                                         r"torch.float32 and weight_hh_l1 is torch.float64"):
        lstm(x(7, 2, 3))


def test_lstm_state_dtype_mismatch(lstm):
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\) dtype \(torch.float64\) does not match"):
        lstm(x(7, 2, 3), (x(2, 2, 4), x(2, 2, 4, dtype=F64)))


def test_lstm_input_not_a_tensor(lstm):
    with pytest.raises(TypeError, match=r"input must be a Tensor or a PackedSequence, got list"):
        lstm([1.0, 2.0, 3.0])


def test_lstm_deleted_weight_is_named_at_the_call(lstm):
    del lstm.weight_hh_l1
    lstm.float()  # as nn.LSTM, conversions work with a weight missing
    with pytest.raises(AttributeError, match=r"lstm_ext.LSTM: weight_hh_l1 is missing: every "
                                             r"weight must be a Tensor"):
        lstm(x(7, 2, 3))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(hidden_size=0), ValueError, "hidden_size must be greater than zero"),
    (dict(input_size=0), ValueError, "input_size must be greater than zero"),
    (dict(input_size=-2), ValueError, "input_size must be greater than zero"),
    (dict(hidden_size=-3), ValueError, "hidden_size must be greater than zero"),
    (dict(num_layers=0), ValueError, "num_layers must be greater than zero"),
    (dict(hidden_size=2.5), TypeError, "hidden_size should be of type int, got: float"),
    (dict(input_size=3.0), TypeError, "input_size should be of type int, got: float"),
    (dict(bias=1), TypeError, "bias should be of type bool, got: int"),
    (dict(batch_first="False"), TypeError, "batch_first should be of type bool, got: str"),
    (dict(dropout=1.5), ValueError, r"dropout should be a number in range \[0, 1\]"),
    (dict(dropout=-0.1), ValueError, r"dropout should be a number in range \[0, 1\]"),
    (dict(dropout=True), ValueError, r"dropout should be a number in range \[0, 1\]"),
    (dict(proj_size=-1), ValueError, "proj_size should be a positive integer or zero"),
    (dict(proj_size=4), ValueError, "proj_size has to be smaller than hidden_size"),
])
def test_lstm_constructor_errors_as_nn_lstm(kwargs, error, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        torch.nn.LSTM(**args)
    with pytest.raises(error, match=match):
        lstm_ext.LSTM(**args)


CELL_ERRORS = {  # name: (call arguments, what our details mention)
    "input 3-D": (lambda: (x(1, 2, 3),), "input of shape [1, 2, 3]"),
    "input size": (lambda: (x(2, 4),), "input of shape [2, 4]"),
    "input size, unbatched": (lambda: (x(4),), "input of shape [4]"),
    "hx size": (lambda: (x(2, 3), (x(2, 5), x(2, 4))), "hx[0] (h_0) of shape [2, 5]"),
    "cx size": (lambda: (x(2, 3), (x(2, 4), x(2, 5))), "hx[1] (c_0) of shape [2, 5]"),
    "hx batch": (lambda: (x(2, 3), (x(3, 4), x(2, 4))), "hx[0] (h_0) of shape [3, 4]"),
    "cx batch": (lambda: (x(2, 3), (x(2, 4), x(3, 4))), "hx[1] (c_0) of shape [3, 4]"),
    "hx 4-D": (lambda: (x(2, 3), (x(1, 1, 2, 4), x(2, 4))), "hx[0] of shape [1, 1, 2, 4]"),
    "cx 3-D": (lambda: (x(2, 3), (x(2, 4), x(1, 2, 4))), "hx[1] of shape [1, 2, 4]"),
    "input dtype": (lambda: (x(2, 3, dtype=F64),), "input dtype (torch.float64)"),
    "integer input": (lambda: (torch.zeros(2, 3, dtype=torch.int64),), "input dtype (torch.int64)"),
    "hx dtype": (lambda: (x(2, 3), (x(2, 4, dtype=F64), x(2, 4))), "hx[0] (h_0) dtype"),
}


@pytest.mark.parametrize("case", list(CELL_ERRORS))
def test_cell_errors_start_with_nn_lstmcells(case):
    make_call_args, details = CELL_ERRORS[case]
    call_args = make_call_args()
    expected = _error_of(torch.nn.LSTMCell(3, 4), call_args)
    actual = _error_of(lstm_ext.LSTMCell(3, 4), call_args)
    assert type(actual) is type(expected), (actual, expected)
    assert str(actual).startswith(str(expected)), (str(actual), str(expected))
    assert details in str(actual)


def test_cell_hx_rank_differs_from_the_input(cell):
    with pytest.raises(RuntimeError, match=r"Expected hx\[0\] and hx\[1\] to be 1-D"):
        cell(x(3), (x(1, 4), x(1, 4)))
    with pytest.raises(RuntimeError, match=r"Expected hx\[0\] and hx\[1\] to be 2-D"):
        cell(x(2, 3), (x(4), x(4)))


def test_cell_hx_not_a_pair(cell):
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        cell(x(2, 3), x(2, 4))
    with pytest.raises(RuntimeError, match=r"^lstm_cell expects two hidden states"):
        cell(x(2, 3), (x(2, 4),))


# ---- the C++ ops check their own arguments ------------------------------------------------------

def layer_args(T=5, B=3, I=2, H=4, dtype=F32):
    return [x(T, B, I, dtype=dtype), x(B, H, dtype=dtype), x(B, H, dtype=dtype),
            x(4 * H, I, dtype=dtype), x(4 * H, H, dtype=dtype), x(4 * H, dtype=dtype),
            x(4 * H, dtype=dtype)]


LAYER_FORWARD_BAD = [
    (0, x(5, 3), r"input must be 3-D \[T, B, input_size\], got a 2-D tensor of shape \[5, 3\]"),
    (0, x(5, 3, 7), r"input must have shape \[T, B, I\] = \[5, 3, 2\], got \[5, 3, 7\]"),
    (0, x(0, 3, 2), r"input must have at least one time step, got T = 0"),
    (1, x(2, 4), r"h0 must have shape \[B, P\] = \[3, 4\], got \[2, 4\]"),
    (2, x(3, 5), r"c0 must have shape \[B, H\] = \[3, 4\], got \[3, 5\]"),
    (3, x(15, 2), r"weight_ih must have shape \[4\*H, I\] = \[16, 2\], got \[15, 2\]"),
    (3, x(16, 3), r"input must have shape \[T, B, I\] = \[5, 3, 3\], got \[5, 3, 2\]"),
    (3, x(16), r"weight_ih must be 2-D"),
    (4, x(15, 4), r"weight_hh must have 4\*hidden_size rows, got \[15, 4\]"),
    (4, x(16, 5), r"weight_hh must have shape \[4\*H, H\] = \[16, 4\], got \[16, 5\]"),
    (5, x(12), r"bias_ih must have shape \[4\*H\] = \[16\], got \[12\]"),
    (6, None, r"bias_ih and bias_hh must be given together"),
    (0, x(5, 3, 2, dtype=F64), r"input has dtype Double but weight_ih has dtype Float"),
    (4, x(16, 4, dtype=F64), r"weight_hh has dtype Double but weight_ih has dtype Float"),
    (2, torch.zeros(3, 4, dtype=torch.int64), r"c0 has dtype Long but weight_ih has dtype Float"),
]


@pytest.mark.parametrize("index,bad,match", LAYER_FORWARD_BAD)
def test_op_layer_forward_checks(index, bad, match):
    args = layer_args()
    args[index] = bad
    with pytest.raises(RuntimeError, match=r"lstm_ext::lstm_layer_forward: " + match):
        _ops.lstm_layer_forward(*args, None, None, False, True)


def test_op_integer_weights():
    args = [a.long() for a in layer_args()]
    with pytest.raises(RuntimeError, match=r"weight_ih must be float32, float64, bfloat16 or float16, got Long"):
        _ops.lstm_layer_forward(*args, None, None, False, True)


PACKED_BAD = [
    (torch.tensor([3, 2, 2]), x(8, 2), r"input must have shape \[sum\(batch_sizes\), I\] = "
                                       r"\[7, 2\], got \[8, 2\]"),
    (torch.tensor([3, 4, 2]), x(9, 2), r"batch_sizes must be positive and non-increasing, got 4 "
                                       r"at step 1 after 3"),
    (torch.tensor([3, 0]), x(3, 2), r"batch_sizes must be positive and non-increasing, got 0"),
    (torch.tensor([3, 2], dtype=torch.int32), x(5, 2), r"batch_sizes must be a 1-D int64 CPU "
                                                       r"tensor"),
    (torch.tensor([[3, 2]]), x(5, 2), r"batch_sizes must be a 1-D int64 CPU tensor"),
    (torch.tensor([], dtype=torch.int64), x(0, 2), r"batch_sizes must have at least one time step"),
    (torch.tensor([3, 2]), x(5, 1, 2), r"input must be 2-D \[N, input_size\] \(packed\)"),
    (torch.tensor([4, 2]), x(6, 2), r"h0 must have shape \[B, P\] = \[4, 4\], got \[3, 4\]"),
]


@pytest.mark.parametrize("batch_sizes,data,match", PACKED_BAD)
def test_op_packed_checks(batch_sizes, data, match):
    """batch_sizes is read by the kernel: every inconsistency is refused before any step runs."""
    args = layer_args()
    args[0] = data
    with pytest.raises(RuntimeError, match=r"lstm_ext::lstm_layer_forward: " + match):
        _ops.lstm_layer_forward(*args, None, batch_sizes, False, True)


def test_op_projection_checks():
    args = layer_args()  # H = 4; a projection to P = 2 needs weight_hh [16, 2] and h0 [3, 2]
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \[4\*H, P\] = \[16, 3\], "
                                           r"got \[16, 4\]"):
        _ops.lstm_layer_forward(*args, x(3, 4), None, False, True)
    args[4] = x(16, 2)
    with pytest.raises(RuntimeError, match=r"weight_hr must have shape \[P, H\] = \[2, 4\], "
                                           r"got \[2, 5\]"):
        _ops.lstm_layer_forward(*args, x(2, 5), None, False, True)
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[B, P\] = \[3, 2\], got \[3, 4\]"):
        _ops.lstm_layer_forward(*args, x(2, 4), None, False, True)
    with pytest.raises(RuntimeError, match=r"weight_hr has dtype Double"):
        _ops.lstm_layer_forward(*args, x(2, 4, dtype=F64), None, False, True)


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
def test_zero_row_projection_is_an_error_not_a_crash(dtype):
    """weight_hr with no rows (P = 0) crashed the kernels, which took its null data pointer for
    'no projection' (issue 24): the ops raise, and so does the module through functional_call,
    where nn.LSTM raises a RuntimeError too."""
    from torch.func import functional_call
    words = r"proj_size should be a positive integer or zero to disable projections \("
    with pytest.raises(RuntimeError, match=words + r"lstm_ext::lstm_layer_forward: weight_hr "
                                               r"has shape \[0, 4\]"):
        _ops.lstm_layer_forward(x(2, 2, 3, dtype=dtype), x(2, 0, dtype=dtype),
                                x(2, 4, dtype=dtype), x(16, 3, dtype=dtype),
                                x(16, 0, dtype=dtype), x(16, dtype=dtype), x(16, dtype=dtype),
                                x(0, 4, dtype=dtype), None, False, True)
    model = lstm_ext.LSTM(3, 4, proj_size=2, dtype=dtype)
    params = dict(model.named_parameters(), weight_hh_l0=x(16, 0, dtype=dtype),
                  weight_hr_l0=x(0, 4, dtype=dtype))
    reference = torch.nn.LSTM(3, 4, proj_size=2)
    with pytest.raises(RuntimeError):
        functional_call(reference, {k: v.float() for k, v in params.items()}, (x(2, 2, 3),))
    with pytest.raises(RuntimeError, match=words):
        functional_call(model, params, (x(2, 2, 3, dtype=dtype),))


def test_op_layer_backward_checks():
    args = layer_args()
    output, h_n, c_n, gates, cells = _ops.lstm_layer_forward(*args, None, None, False, True)
    base = [None, None, None] + args[:5] + [None, None, False, output, gates, cells]
    _, _, _, no_gates, no_cells = _ops.lstm_layer_forward(*args, None, None, False, False)
    cases = [
        (0, x(5, 3, 5), r"grad_output must have shape \[T, B, P\] = \[5, 3, 4\], got \[5, 3, 5\]"),
        (1, x(4, 4), r"grad_h_n must have shape \[B, P\] = \[3, 4\], got \[4, 4\]"),
        (2, x(3, 4, dtype=F64), r"grad_c_n has dtype Double"),
        (12, no_gates, r"gates must have shape \[T, B, 4\*H\] \(saved by lstm_layer_forward with "
                      r"keep_state=True\) = \[5, 3, 16\], got \[0, 3, 16\]"),
        (13, no_cells, r"cells must have shape \[T, B, H\]"),
        (11, x(4, 3, 4), r"output must have shape \[T, B, P\] = \[5, 3, 4\], got \[4, 3, 4\]"),
    ]
    for index, bad, match in cases:
        call = list(base)
        call[index] = bad
        with pytest.raises(RuntimeError, match=r"lstm_ext::lstm_layer_backward: " + match):
            _ops.lstm_layer_backward(*call)


def test_op_cell_checks():
    args = [x(3, 2), x(3, 4), x(3, 4), x(16, 2), x(16, 4), None, None]
    bad = list(args)
    bad[0] = x(5, 3, 2)
    with pytest.raises(RuntimeError, match=r"lstm_cell_forward: input must be 2-D \[B, input_size\]"):
        _ops.lstm_cell_forward(*bad)
    bad = list(args)
    bad[2] = x(2, 4)
    with pytest.raises(RuntimeError, match=r"^Input batch size 3 doesn't match hidden1 batch size 2 "
                                           r"\(lstm_ext::lstm_cell_forward: cx of shape \[2, 4\], "
                                           r"expected \[B, H\] = \[3, 4\]\)"):
        _ops.lstm_cell_forward(*bad)
    bad = list(args)
    bad[0] = x(3, 5)
    with pytest.raises(RuntimeError, match=r"^input has inconsistent input_size: got 5 expected 2 "
                                           r"\(lstm_ext::lstm_cell_forward: input of shape \[3, 5\]\)"):
        _ops.lstm_cell_forward(*bad)
    bad = list(args)
    bad[1] = x(3, 6)
    with pytest.raises(RuntimeError, match=r"^hidden0 has inconsistent hidden_size: got 6, expected 4 "):
        _ops.lstm_cell_forward(*bad)
    hy, cy, gates = _ops.lstm_cell_forward(*args)
    with pytest.raises(RuntimeError, match=r"lstm_cell_backward: gates must have shape \[B, 4\*H\]"):
        _ops.lstm_cell_backward(hy, cy, *args[:3], cy, gates[:, :8], *args[3:5])
    with pytest.raises(RuntimeError, match=r"lstm_cell_backward: grad_hy must have shape"):
        _ops.lstm_cell_backward(hy[:2], cy, *args[:3], cy, gates, *args[3:5])


# ---- the whole-module op ------------------------------------------------------------------------

def module_op_args():
    """torch.ops.lstm_ext.lstm arguments: 2 layers, one direction, I = 2, H = 4, T = 5, B = 3."""
    params = [p.detach() for p in lstm_ext.LSTM(2, 4, num_layers=2).parameters()]
    return [x(5, 3, 2), x(2, 3, 4), x(2, 3, 4), params, True, False, 2, 0.0, False, False, None]


MODULE_OP_BAD = [
    (3, "drop one", r"lstm: expected 8 parameters \(2 layers x 1 directions x 4 each\), got 7"),
    (2, None, r"lstm: give both h0 and c0 or neither"),
    (1, x(1, 3, 4),
     r"lstm: h0 must have shape \[2, B, P\] \(num_layers \* directions first\), got \[1, 3, 4\]"),
    (2, x(3, 4), r"lstm: c0 must have shape \[2, B, H\]"),
    (0, x(5, 2), r"lstm: input must be 3-D \[T, B, I\], got 2-D \[5, 2\]"),
    (7, 1.5, r"lstm: dropout must be a probability in \[0, 1\], got 1.5"),
    (6, 0, r"lstm: num_layers must be at least 1, got 0"),
    (1, x(2, 2, 4), r"lstm_layer_forward: h0 must have shape \[B, P\] = \[3, 4\], got \[2, 4\]"),
]


@pytest.mark.parametrize("index,bad,match", MODULE_OP_BAD)
def test_op_module_checks(index, bad, match):
    args = module_op_args()
    args[index] = args[3][:-1] if isinstance(bad, str) else bad
    with pytest.raises(RuntimeError, match=r"lstm_ext::" + match):
        torch.ops.lstm_ext.lstm(*args)


def test_op_module_bad_first_weight_and_batch_sizes():
    args = module_op_args()
    args[1] = args[2] = None
    args[3][1] = x(16)
    with pytest.raises(RuntimeError, match=r"first layer's weight_hh must be 2-D \[4\*H, P\]"):
        torch.ops.lstm_ext.lstm(*args)
    args = module_op_args()
    args[0], args[10] = x(6, 2), torch.zeros(0, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"batch_sizes must be 1-D with at least one step"):
        torch.ops.lstm_ext.lstm(*args)
