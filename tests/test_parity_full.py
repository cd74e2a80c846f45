"""Every nn.LSTM option and input form, against nn.LSTM: bidirectional, proj_size, dropout,
PackedSequence (sorted and not), unbatched, batch_first, and their combinations; double backward;
state_dict, save/load, deepcopy, dtype moves, repr."""

import copy
import io
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_ext

from lstm_testing import (assert_float32_close, assert_float64_equal, forward_backward,
                          gradgradcheck_module)

F64 = torch.float64
I, H, P = 3, 5, 2  # input, hidden, projection sizes (odd on purpose)
T, B = 7, 4
LENGTHS = [2, 7, 1, 5]  # unsorted on purpose; the longest is T

ARCHITECTURES = [
    dict(num_layers=layers, bidirectional=bi, proj_size=proj, bias=bias)
    for layers, bi, proj, bias in itertools.product((1, 2, 3), (False, True), (0, P), (True, False))
]
INPUT_FORMS = ["batched", "batch_first", "unbatched", "packed_sorted", "packed_unsorted"]


def make_pair(dtype, seed=0, **options):
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, dtype=dtype, **options)
    ext = lstm_ext.LSTM(I, H, dtype=dtype, **options)
    ext.load_state_dict(ref.state_dict())
    return ref, ext


def state_shapes(options, batch):
    d = 2 if options.get("bidirectional") else 1
    layers = options.get("num_layers", 1)
    h_size = options.get("proj_size") or H
    lead = (layers * d,) if batch is None else (layers * d, batch)
    return lead + (h_size,), lead + (H,)


def make_input(form, dtype, seed=1):
    """(input for the model, the leaf tensor to differentiate, batch or None)."""
    gen = torch.Generator().manual_seed(seed)
    if form == "unbatched":
        x = torch.randn(T, I, generator=gen, dtype=F64).to(dtype)
        return x, None
    x = torch.randn(T, B, I, generator=gen, dtype=F64).to(dtype)
    if form == "batch_first":
        return x.transpose(0, 1).contiguous(), B
    if form.startswith("packed"):
        lengths = sorted(LENGTHS, reverse=True) if form == "packed_sorted" else LENGTHS
        return pack_padded_sequence(x, torch.tensor(lengths),
                                    enforce_sorted=form == "packed_sorted"), B
    return x, B


def states(options, batch, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=gen, dtype=F64).to(dtype)
                 for s in state_shapes(options, batch))


def options_for(architecture, form):
    options = dict(architecture)
    if form == "batch_first":
        options["batch_first"] = True
    return options


@pytest.mark.parametrize("form", INPUT_FORMS)
@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=str)
def test_float64(architecture, form):
    options = options_for(architecture, form)
    ref, ext = make_pair(F64, **options)
    x, batch = make_input(form, F64)
    hx = states(options, batch, F64)
    names, expected = forward_backward(ref, x, hx)
    _, actual = forward_backward(ext, x, hx)
    assert_float64_equal(names, actual, expected)


def to_device(x, device):
    """A tensor or PackedSequence on `device` (batch_sizes stay on the CPU, as PyTorch keeps them)."""
    if isinstance(x, PackedSequence):
        move = (lambda t: t.to(device) if t is not None else None)
        return PackedSequence(x.data.to(device), x.batch_sizes, move(x.sorted_indices),
                              move(x.unsorted_indices))
    return x.to(device)


def float32_results(architecture, form, device="cpu"):
    """(names, lstm_ext float32, nn.LSTM float32, nn.LSTM float64 on the CPU), same weights."""
    options = options_for(architecture, form)
    ref32, ext32 = make_pair(torch.float32, **options)
    ref64 = nn.LSTM(I, H, dtype=F64, **options)
    ref64.load_state_dict(ref32.state_dict())  # the same float32 weights, exactly, in float64
    x, batch = make_input(form, torch.float32)
    hx = states(options, batch, torch.float32)
    x64 = (PackedSequence(x.data.double(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
           if isinstance(x, PackedSequence) else x.double())
    names, r64 = forward_backward(ref64, x64, tuple(t.double() for t in hx))
    x_dev, hx_dev = to_device(x, device), tuple(t.to(device) for t in hx)
    _, t32 = forward_backward(ref32.to(device), x_dev, hx_dev)
    _, e32 = forward_backward(ext32.to(device), x_dev, hx_dev)
    return names, [t.cpu() for t in e32], [t.cpu() for t in t32], r64


@pytest.mark.parametrize("form", INPUT_FORMS)
@pytest.mark.parametrize("architecture", ARCHITECTURES[::3], ids=str)
def test_float32(architecture, form):
    assert_float32_close(*float32_results(architecture, form))


@pytest.mark.parametrize("form", ["batched", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("architecture", [dict(num_layers=2), dict(num_layers=3, proj_size=P),
                                          dict(num_layers=2, bidirectional=True, proj_size=P)],
                         ids=str)
def test_dropout_in_training_matches_nn_lstm(architecture, form):
    """The same RNG stream gives the same dropout masks between layers, and the same results."""
    options = dict(architecture, dropout=0.4)
    ref, ext = make_pair(F64, **options)
    x, batch = make_input(form, F64)
    hx = states(options, batch, F64)
    torch.manual_seed(11)
    names, expected = forward_backward(ref, x, hx)
    torch.manual_seed(11)
    _, actual = forward_backward(ext, x, hx)
    assert_float64_equal(names, actual, expected)
    # ... and the masks really did something: without dropout the output differs.
    plain = make_pair(F64, **architecture)[1]
    _, no_dropout = forward_backward(plain, x, hx)
    assert not torch.allclose(no_dropout[0], actual[0])


def test_dropout_off_in_eval_and_after_last_layer():
    ref, ext = make_pair(F64, num_layers=2, dropout=0.5)
    plain = make_pair(F64, num_layers=2)[1]
    x, _ = make_input("batched", F64)
    ext.eval()
    assert torch.equal(ext(x)[0], plain(x)[0])
    ext.train()
    torch.manual_seed(0)
    out_a = ext(x)[0]
    torch.manual_seed(0)
    out_b = ref(x)[0]
    assert torch.allclose(out_a, out_b, rtol=1e-12, atol=1e-14)


def test_dropout_warning_with_one_layer_as_nn_lstm():
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        nn.LSTM(I, H, dropout=0.2)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        lstm_ext.LSTM(I, H, dropout=0.2)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert len(ours) == 1


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_output_is_a_packed_sequence_like_nn_lstm(enforce_sorted):
    ref, ext = make_pair(F64, num_layers=2, bidirectional=True)
    x, _ = make_input("packed_sorted" if enforce_sorted else "packed_unsorted", F64)
    out_r, (h_r, c_r) = ref(x)
    out_e, (h_e, c_e) = ext(x)
    assert isinstance(out_e, PackedSequence)
    assert torch.equal(out_e.batch_sizes, out_r.batch_sizes)
    for a, b in ((out_e.sorted_indices, out_r.sorted_indices),
                 (out_e.unsorted_indices, out_r.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    # h_n holds each sequence's last real step, in the caller's order.
    padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(out_e)
    H_out = H
    for k, length in enumerate(lengths.tolist()):
        assert torch.allclose(h_e[2][k], padded[length - 1, k, :H_out], rtol=0, atol=0)
        assert torch.allclose(h_e[3][k], padded[0, k, H_out:], rtol=0, atol=0)
    assert_float64_equal(["h_n", "c_n"], [h_e, c_e], [h_r, c_r])


def test_packed_costs_no_compute_on_padding():
    """The packed kernel visits real steps only: one long and 63 length-1 sequences are 463 rows of
    gates (what the op computes and keeps), not the 400 x 64 of the padded batch."""
    ext = lstm_ext.LSTM(16, 64)
    long_seq = torch.randn(400, 1, 16)
    padded = torch.cat([long_seq, torch.cat([torch.randn(1, 63, 16), torch.zeros(399, 63, 16)])],
                       dim=1)
    packed = pack_padded_sequence(padded, torch.tensor([400] + [1] * 63))
    w = [p.detach() for p in ext.parameters()]
    h0 = torch.zeros(64, 64)
    _, h_n, _, gates, cells = lstm_ext._ops.lstm_layer_forward(
        packed.data, h0, h0, *w, None, packed.batch_sizes, False, True)
    assert gates.shape == (463, 256) and cells.shape == (463, 64)
    with torch.no_grad():
        _, (h_alone, _) = ext(long_seq)
    assert torch.allclose(h_n[0], h_alone[0, 0], rtol=1e-6, atol=1e-6)


# ---- double backward ----------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["batched", "packed_unsorted", "unbatched"])
@pytest.mark.parametrize("architecture", [dict(), dict(num_layers=2, bidirectional=True, proj_size=1),
                                          dict(bias=False)], ids=str)
def test_gradgradcheck_lstm(architecture, form):
    torch.manual_seed(0)
    model = lstm_ext.LSTM(2, 3, dtype=F64, **architecture)
    names = [n for n, _ in model.named_parameters()]
    x, batch = make_small_input(form)
    hx = tuple(t.requires_grad_() for t in states_small(architecture, batch))
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def fn(data, h0, c0, *weights):
        inp = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices) \
            if isinstance(x, PackedSequence) else data
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, weights))):
            out, (h, c) = model(inp, (h0, c0))
        return (out.data if isinstance(out, PackedSequence) else out), h, c

    data = (x.data if isinstance(x, PackedSequence) else x).detach().requires_grad_()
    assert gradgradcheck_module(fn, [data, *hx, *params])


def make_small_input(form):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2, generator=gen, dtype=F64)
    if form == "unbatched":
        return x[:, 0], None
    if form == "packed_unsorted":
        return pack_padded_sequence(x, torch.tensor([2, 3]), enforce_sorted=False), 2
    return x, 2


def states_small(architecture, batch):
    d = 2 if architecture.get("bidirectional") else 1
    layers = architecture.get("num_layers", 1)
    h_size = architecture.get("proj_size") or 3
    lead = (layers * d,) if batch is None else (layers * d, batch)
    gen = torch.Generator().manual_seed(4)
    return (torch.randn(lead + (h_size,), generator=gen, dtype=F64),
            torch.randn(lead + (3,), generator=gen, dtype=F64))


@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck_cell(bias):
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(2, 3, bias=bias, dtype=F64)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x, h, c = (torch.randn(s, dtype=F64, requires_grad=True) for s in ((4, 2), (4, 3), (4, 3)))

    def fn(x, h, c, *weights):
        with torch.nn.utils.stateless._reparametrize_module(cell, dict(zip(names, weights))):
            return cell(x, (h, c))

    assert torch.autograd.gradgradcheck(fn, [x, h, c, *params])


def test_first_order_backward_stays_on_the_cpp_op():
    """Without create_graph, backward is the C++ op; the reference is only for double backward."""
    ext = lstm_ext.LSTM(I, H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64)
    out, _ = ext(x)
    with torch.profiler.profile() as prof:
        out.sum().backward()
    names = {e.name for e in prof.events()}
    assert "lstm_ext::lstm_layer_backward" in names
    assert not any(n.startswith("aten::sigmoid") for n in names)


TWO_THREAD_BACKWARD = {
    # Pipelined: the second thread computes the weight gradients chunk of steps by chunk while the
    # first runs the recurrence. The batch is too small to split over threads (4 rows, 4000
    # multiply-adds per row and step) ...
    "unsplit": (dict(input_size=200, hidden_size=40, proj_size=20, bidirectional=True),
                [30, 17, 29, 4]),
    # ... or split (12 rows > 8 per thread), but a step is small (12 x 4096 multiply-adds).
    "small_steps": (dict(input_size=64, hidden_size=32, bidirectional=True),
                    [30, 17, 29, 4, 30, 1, 12, 30, 8, 30, 22, 5]),
    # Split batch, large steps: after the recurrence, one thread computes dx and the first gate
    # rows of dW_cat = dG^T [x | h], the other the remaining rows (x narrow enough to copy next
    # to h: 2 I <= P). With a projection, layer 2 (I = P) takes MKL's threading instead.
    "split_gradients": (dict(input_size=16, hidden_size=64),
                        [(7 * i) % 30 + 1 for i in range(40)]),
    "split_gradients_proj": (dict(input_size=8, hidden_size=64, proj_size=32, num_layers=2),
                             [(11 * i) % 30 + 1 for i in range(40)]),
}


@pytest.mark.parametrize("batch", TWO_THREAD_BACKWARD)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_thread_backward_matches_nn_lstm(packed, dtype, batch):
    """Sizes where the backward's weight gradients are large and run on both threads in one of
    the ways of TWO_THREAD_BACKWARD: the same numbers as nn.LSTM. Packed (unsorted) or not."""
    sizes, lengths = TWO_THREAD_BACKWARD[batch]
    steps = max(lengths)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # both ways need a second thread
    try:
        torch.manual_seed(0)
        ref = nn.LSTM(**sizes, dtype=dtype)
        ext = lstm_ext.LSTM(**sizes, dtype=dtype)
        ext.load_state_dict(ref.state_dict())
        x = torch.randn(steps, len(lengths), sizes["input_size"], dtype=dtype)
        if packed:
            x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        names, expected = forward_backward(ref, x, None)
        _, actual = forward_backward(ext, x, None)
        with torch.no_grad():  # inference: the forward keeps no state, pipelined all the same
            inference = [t.data if isinstance(t, PackedSequence) else t
                         for t in (ext(x)[0],) + ext(x)[1]]
    finally:
        torch.set_num_threads(previous_threads)
    for name, a, b in zip(names, inference, actual):
        assert torch.equal(a, b), f"{name}: inference differs from the training forward"
    if dtype == torch.float64:
        assert_float64_equal(names, actual, expected)
    else:  # float32: as close as nn.LSTM's float32 is to the exact (float64) result
        ref64 = nn.LSTM(**sizes, dtype=F64)
        ref64.load_state_dict(ref.state_dict())
        x64 = (PackedSequence(x.data.double(), *x[1:]) if packed else x.double())
        _, exact = forward_backward(ref64, x64, None)
        assert_float32_close(names, actual, expected, exact)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bidirectional_directions_on_two_threads_match_nn_lstm(packed, dtype):
    """Small bidirectional layers run their two directions at the same time on two threads (one
    each), forward and backward: the same numbers as nn.LSTM, and the profiler still sees every
    kernel call (the worker thread gets the caller's thread-local state)."""
    sizes = dict(input_size=5, hidden_size=8, proj_size=3, num_layers=2, bidirectional=True)
    lengths = [9, 4, 7]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the second direction needs a second thread
    try:
        torch.manual_seed(0)
        ref = nn.LSTM(**sizes, dtype=dtype)
        ext = lstm_ext.LSTM(**sizes, dtype=dtype)
        ext.load_state_dict(ref.state_dict())
        x = torch.randn(max(lengths), len(lengths), 5, dtype=dtype)
        if packed:
            x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        names, expected = forward_backward(ref, x, None)
        with torch.profiler.profile() as prof:
            _, actual = forward_backward(ext, x, None)
    finally:
        torch.set_num_threads(previous_threads)
    calls = [e.name for e in prof.events()]
    assert calls.count("lstm_ext::lstm_layer_forward") == 4  # 2 layers x 2 directions
    assert calls.count("lstm_ext::lstm_layer_backward") == 4
    if dtype == torch.float64:
        assert_float64_equal(names, actual, expected)
    else:
        ref64 = nn.LSTM(**sizes, dtype=F64)
        ref64.load_state_dict(ref.state_dict())
        x64 = (PackedSequence(x.data.double(), *x[1:]) if packed else x.double())
        _, exact = forward_backward(ref64, x64, None)
        assert_float32_close(names, actual, expected, exact)


# ---- interop ------------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=str)
def test_state_dict_round_trip_and_repr(architecture):
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, **architecture)
    torch.manual_seed(0)
    ext = lstm_ext.LSTM(I, H, **architecture)
    assert list(ext.state_dict()) == list(ref.state_dict())
    for name, p in ref.state_dict().items():  # same seed, same init
        assert torch.equal(ext.state_dict()[name], p), name
    ext.load_state_dict(nn.LSTM(I, H, **architecture).state_dict())
    back = nn.LSTM(I, H, **architecture)
    back.load_state_dict(ext.state_dict())
    assert repr(ext) == repr(ref)
    assert [[p.shape for p in w] for w in ext.all_weights] == \
           [[p.shape for p in w] for w in ref.all_weights]


def test_save_load_deepcopy_dtype_moves():
    ext = lstm_ext.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, dropout=0.1)
    x = torch.randn(T, B, I)
    ext.eval()
    expected = ext(x)[0]
    buffer = io.BytesIO()
    torch.save(ext, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, lstm_ext.LSTM) and not loaded.training
    assert torch.equal(loaded(x)[0], expected)
    clone = copy.deepcopy(ext)
    assert torch.equal(clone(x)[0], expected)
    assert clone.weight_hr_l1_reverse is not ext.weight_hr_l1_reverse
    double = copy.deepcopy(ext).double()
    assert all(p.dtype == F64 for p in double.parameters())
    assert torch.allclose(double(x.double())[0], expected.double(), atol=1e-5)
    half_way = copy.deepcopy(ext).to(F64)
    assert torch.equal(half_way(x.double())[0], double(x.double())[0])
    assert ext.train() is ext and ext.training and not ext.eval().training


DIRECT_STEPS = {
    # Calls of at most 32 rows multiply by the weights as stored (no transposed copy), each step
    # its input projection too; from 2^17 multiply-adds a step its hidden units are split over the
    # threads. One step, B = 4 (4 x 256 x 128 multiply-adds): split; with a projection and both
    # directions; packed with a few steps; a step too small to split; H = 37 (units not a multiple
    # of the vector width in either thread's half).
    "one step, split": (dict(input_size=64, hidden_size=64), [1, 1, 1, 1]),
    "projection, bidirectional, split": (
        dict(input_size=96, hidden_size=80, proj_size=48, bidirectional=True, num_layers=2),
        [1, 1, 1, 1]),
    "packed, few steps, split": (dict(input_size=128, hidden_size=96), [5, 3, 5, 2, 4, 1]),
    "unsplit": (dict(input_size=8, hidden_size=16), [3, 1, 2]),
    "odd units, split": (dict(input_size=100, hidden_size=37, num_layers=2), [2, 2, 2, 2, 2, 2]),
}


@pytest.mark.parametrize("batch", DIRECT_STEPS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_direct_steps_match_nn_lstm(packed, dtype, batch):
    """Short calls (the direct path on the weights as stored, split by units): nn.LSTM's numbers."""
    sizes, lengths = DIRECT_STEPS[batch]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        ref = nn.LSTM(**sizes, dtype=dtype)
        ext = lstm_ext.LSTM(**sizes, dtype=dtype)
        ext.load_state_dict(ref.state_dict())
        x = torch.randn(max(lengths), len(lengths), sizes["input_size"], dtype=dtype)
        if packed:
            x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        d = 2 if sizes.get("bidirectional") else 1
        lead = (sizes.get("num_layers", 1) * d, len(lengths))
        hx = (torch.randn(lead + (sizes.get("proj_size") or sizes["hidden_size"],), dtype=dtype),
              torch.randn(lead + (sizes["hidden_size"],), dtype=dtype))
        names, expected = forward_backward(ref, x, hx)
        _, actual = forward_backward(ext, x, hx)
    finally:
        torch.set_num_threads(previous_threads)
    if dtype == torch.float64:
        assert_float64_equal(names, actual, expected)
    else:
        ref64 = nn.LSTM(**sizes, dtype=F64)
        ref64.load_state_dict(ref.state_dict())
        x64 = (PackedSequence(x.data.double(), *x[1:]) if packed else x.double())
        _, exact = forward_backward(ref64, x64, tuple(t.double() for t in hx))
        assert_float32_close(names, actual, expected, exact)


def cell_forward_backward(cell, x, hx):
    """(names, tensors): hy, cy and the gradients of x, hx, cx and every parameter."""
    x, hx = x.detach().requires_grad_(), tuple(t.detach().requires_grad_() for t in hx)
    params = list(cell.named_parameters())
    hy, cy = cell(x, hx)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype) for t in (hy, cy)]
    results = torch.autograd.grad((hy, cy), [x, *hx] + [p for _, p in params], grads)
    names = ["hy", "cy", "grad input", "grad hx", "grad cx"] + [f"grad {n}" for n, _ in params]
    return names, [hy, cy, *results]


def test_large_weights_transposed_on_two_threads():
    """H = 512: W_hh^T is large enough to be transposed on both threads (tiles of rows split
    between them): float64 with a projection and a non-contiguous W_hh, against nn.LSTM; bfloat16
    (whose calls of 8+ steps transpose [W_ih | W_hh] for the AMX micro-kernel) as close to float64
    on the same rounded values as nn.LSTM's bfloat16."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        options = dict(input_size=8, hidden_size=512, proj_size=300)
        ref = nn.LSTM(dtype=F64, **options)
        ext = lstm_ext.LSTM(dtype=F64, **options)
        ext.load_state_dict(ref.state_dict())
        with torch.no_grad():  # the same values, stored transposed: strides (1, 2048)
            ext.weight_hh_l0 = nn.Parameter(ext.weight_hh_l0.t().contiguous().t())
        x = torch.randn(3, 40, 8, dtype=F64)  # 120 rows: not the direct path
        names, expected = forward_backward(ref, x, None)
        _, actual = forward_backward(ext, x, None)
        exact = nn.LSTM(8, 512, dtype=F64)
        with torch.no_grad():
            for p in exact.parameters():
                p.copy_(p.to(torch.bfloat16).double())
        ours = lstm_ext.LSTM(8, 512, dtype=torch.bfloat16)
        theirs = nn.LSTM(8, 512, dtype=torch.bfloat16)
        ours.load_state_dict(exact.state_dict())
        theirs.load_state_dict(exact.state_dict())
        x16 = torch.randn(8, 40, 8).to(torch.bfloat16)
        with torch.no_grad():
            y_exact = exact(x16.double())[0]
            error = [(model(x16)[0].double() - y_exact).abs().max().item()
                     for model in (ours, theirs)]
    finally:
        torch.set_num_threads(previous_threads)
    assert_float64_equal(names, actual, expected)
    scale = y_exact.abs().max().item()
    assert error[0] <= 2 * error[1] + scale * 2.0 ** -8, error


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", [(4, 64, 64), (1, 80, 256), (7, 33, 40), (32, 16, 64)])
def test_cell_steps_match_nn_lstmcell(dtype, sizes):
    """LSTMCell, where the direct path splits a step over threads (and where it does not)."""
    B, I, H = sizes
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        ref = nn.LSTMCell(I, H, dtype=dtype)
        ext = lstm_ext.LSTMCell(I, H, dtype=dtype)
        ext.load_state_dict(ref.state_dict())
        x = torch.randn(B, I, dtype=dtype)
        hx = (torch.randn(B, H, dtype=dtype), torch.randn(B, H, dtype=dtype))
        names, expected = cell_forward_backward(ref, x, hx)
        _, actual = cell_forward_backward(ext, x, hx)
    finally:
        torch.set_num_threads(previous_threads)
    if dtype == torch.float64:
        assert_float64_equal(names, actual, expected)
    else:
        ref64 = nn.LSTMCell(I, H, dtype=F64)
        ref64.load_state_dict(ref.state_dict())
        _, exact = cell_forward_backward(ref64, x.double(), tuple(t.double() for t in hx))
        assert_float32_close(names, actual, expected, exact)


@pytest.mark.parametrize("cls,sizes,x_shape", [
    (nn.LSTM, dict(input_size=6, hidden_size=5, num_layers=2, bidirectional=True, proj_size=3),
     (7, 4, 6)),
    (nn.LSTM, dict(input_size=40, hidden_size=48), (3, 2, 40)),  # a short call: the direct path
    (nn.LSTM, dict(input_size=6, hidden_size=5), (40, 3, 6)),
    (nn.LSTMCell, dict(input_size=6, hidden_size=5), (4, 6)),
])
def test_input_without_grad_skips_its_gradient_only(cls, sizes, x_shape):
    """The usual training call: the data needs no gradient, so the kernels skip dx = dG W_ih;
    every other gradient is nn's."""
    torch.manual_seed(0)
    ref = cls(**sizes, dtype=F64)
    ext = (lstm_ext.LSTM if cls is nn.LSTM else lstm_ext.LSTMCell)(**sizes, dtype=F64)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(*x_shape, dtype=F64)
    results = []
    for model in (ref, ext):
        out = model(x)
        tensors = [out[0], *out[1]] if cls is nn.LSTM else list(out)
        loss = sum((t * (k + 1)).sum() for k, t in enumerate(tensors))
        results.append(tensors + list(torch.autograd.grad(loss, list(model.parameters()))))
    names = [f"t{i}" for i in range(len(results[0]))]
    assert_float64_equal(names, results[1], results[0])
    calls = torch.ops.lstm_ext
    if cls is nn.LSTM and "proj_size" not in sizes:  # the kernel op returns no rows for it
        w = [p.detach() for p in ext.parameters()]
        h = torch.zeros(x_shape[1], sizes["hidden_size"], dtype=F64)
        fwd = calls.lstm_layer_forward(x, h, h, *w, None, None, False, True)
        grads = calls.lstm_layer_backward(torch.ones_like(fwd[0]), None, None, x, h, h, w[0], w[1],
                                          None, None, False, fwd[0], fwd[3], fwd[4], False)
        full = calls.lstm_layer_backward(torch.ones_like(fwd[0]), None, None, x, h, h, w[0], w[1],
                                         None, None, False, fwd[0], fwd[3], fwd[4], True)
        assert grads[0].shape == (0,) + x_shape[1:]
        for skipped, computed in zip(grads[1:], full[1:]):
            assert torch.equal(skipped, computed)


# Users run on 1 to 64 cores; the batch split, the pipelined second thread and the two directions
# on two threads were written and measured at 2. At 1, 3 and 8 threads (more than this machine's
# cores: the split and its sums still run) the numbers are nn.LSTM's, float64, in training and
# inference, packed (unsorted) and not.
THREAD_SHAPES = {
    "split batch": (dict(input_size=8, hidden_size=64, num_layers=2, bidirectional=True), 40, 12),
    "pipelined B=1": (dict(input_size=16, hidden_size=128, proj_size=32), 1, 20),
    "small steps": (dict(input_size=5, hidden_size=16, bidirectional=True), 7, 9),
}


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("packed", [False, True])
def test_any_thread_count_matches_nn_lstm(threads, shape, packed):
    sizes, batch, steps = THREAD_SHAPES[shape]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        ref = nn.LSTM(**sizes, dtype=F64)
        ext = lstm_ext.LSTM(**sizes, dtype=F64)
        ext.load_state_dict(ref.state_dict())
        x = torch.randn(steps, batch, sizes["input_size"], dtype=F64)
        if packed:
            lengths = [steps - (3 * b) % steps for b in range(batch)]
            x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        names, expected = forward_backward(ref, x, None)
        _, actual = forward_backward(ext, x, None)
        with torch.no_grad():
            inference = ext(x)
    finally:
        torch.set_num_threads(previous_threads)
    assert_float64_equal(names, actual, expected)
    out = inference[0].data if packed else inference[0]
    assert_float64_equal(names[:3], [out, *inference[1]], expected[:3])
