"""Outputs, final states and every gradient of lstm_ext.LSTM / LSTMCell equal torch.nn's."""

import pytest
import torch
from torch import nn

import lstm_ext
from lstm_ext.reference import lstm_cell_reference, lstm_reference

from lstm_testing import assert_float32_close, assert_float64_equal, forward_backward

SEQ_LENS = [1, 7, 50]
BATCHES = [1, 5, 32]
SIZES = [(1, 1), (3, 17), (17, 3), (129, 129),  # (input_size, hidden_size): odd sizes, and
         (1, 16), (8, 8), (24, 32)]  # 4H and H multiples of 8 or 16 (the small-GEMM path)


def make_pair(input_size, hidden_size, dtype, seed=0, **options):
    """An nn.LSTM and an lstm_ext.LSTM holding the same weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(input_size, hidden_size, dtype=dtype, **options)
    ext = lstm_ext.LSTM(input_size, hidden_size, dtype=dtype, **options)
    ext.load_state_dict(ref.state_dict())
    return ref, ext


def make_inputs(T, B, I, H, layers, dtype, batch_first=False, unbatched=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if unbatched:
        x_shape, h_shape = (T, I), (layers, H)
    else:
        x_shape = (B, T, I) if batch_first else (T, B, I)
        h_shape = (layers, B, H)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64).to(dtype)
    hx = tuple(torch.randn(h_shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return x, hx


def check_float64(T, B, I, H, hx_given=True, **options):
    layers = options.get("num_layers", 1)
    unbatched = options.pop("unbatched", False)
    ref, ext = make_pair(I, H, torch.float64, **options)
    x, hx = make_inputs(T, B, I, H, layers, torch.float64, options.get("batch_first", False),
                        unbatched)
    hx = hx if hx_given else None
    names, expected = forward_backward(ref, x, hx)
    _, actual = forward_backward(ext, x, hx)
    return assert_float64_equal(names, actual, expected)


def check_float32(T, B, I, H, **options):
    layers = options.get("num_layers", 1)
    unbatched = options.pop("unbatched", False)
    ref32, ext32 = make_pair(I, H, torch.float32, **options)
    ref64 = nn.LSTM(I, H, dtype=torch.float64, **options)
    ref64.load_state_dict(ref32.state_dict())  # the same float32 weights, exactly, in float64
    x, hx = make_inputs(T, B, I, H, layers, torch.float32, options.get("batch_first", False),
                        unbatched)
    names, r64 = forward_backward(ref64, x.double(), tuple(t.double() for t in hx))
    _, t32 = forward_backward(ref32, x, hx)
    _, e32 = forward_backward(ext32, x, hx)
    return assert_float32_close(names, e32, t32, r64)


@pytest.mark.parametrize("I,H", SIZES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("T", SEQ_LENS)
def test_lstm_float64_grid(T, B, I, H):
    check_float64(T, B, I, H)


@pytest.mark.parametrize("I,H", SIZES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("T", SEQ_LENS)
def test_lstm_float32_grid(T, B, I, H):
    check_float32(T, B, I, H)


OPTIONS = [
    dict(num_layers=layers, bias=bias, batch_first=batch_first)
    for layers in (1, 2, 3) for bias in (True, False) for batch_first in (False, True)
] + [dict(num_layers=layers, unbatched=True) for layers in (1, 2, 3)] + [
    dict(num_layers=2, bias=False, unbatched=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_lstm_options_float64(options):
    check_float64(7, 5, 3, 17, **options)


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_lstm_options_float32(options):
    check_float32(7, 5, 3, 17, **options)


@pytest.mark.parametrize("options", [dict(num_layers=1), dict(num_layers=3, batch_first=True),
                                     dict(num_layers=2, unbatched=True)], ids=str)
def test_lstm_default_zero_state(options):
    check_float64(7, 5, 3, 17, hx_given=False, **options)


def test_lstm_matches_reference_float64():
    """The pure-PyTorch reference (the spec) and the C++ kernels agree, gradients included."""
    ext = lstm_ext.LSTM(4, 9, num_layers=2, dtype=torch.float64)
    x, (h0, c0) = make_inputs(11, 3, 4, 9, 2, torch.float64)

    class Reference(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.params = params

        def named_parameters(self, *args, **kwargs):
            return self.params.named_parameters()

        def forward(self, x, hx):
            out, h, c = lstm_reference(x, hx[0], hx[1], ext._flat_weights, True, False, 2,
                                       False)
            return out, (h, c)

    names, expected = forward_backward(Reference(ext), x, (h0, c0))
    _, actual = forward_backward(ext, x, (h0, c0))
    assert_float64_equal(names, actual, expected)


def test_initialisation_matches_nn_lstm():
    """Same seed, same parameter names, shapes and values as nn.LSTM."""
    torch.manual_seed(3)
    ref = nn.LSTM(5, 7, num_layers=3, bias=True)
    torch.manual_seed(3)
    ext = lstm_ext.LSTM(5, 7, num_layers=3, bias=True)
    ref_params, ext_params = dict(ref.named_parameters()), dict(ext.named_parameters())
    assert list(ref_params) == list(ext_params)
    for name, p in ref_params.items():
        assert torch.equal(p, ext_params[name]), name


# ---- LSTMCell -----------------------------------------------------------------------------------

def make_cell_pair(I, H, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    torch.manual_seed(seed)
    ext = lstm_ext.LSTMCell(I, H, bias=bias, dtype=dtype)
    for name, p in ref.named_parameters():  # same init from the same seed
        assert torch.equal(p, getattr(ext, name)), name
    return ref, ext


def cell_forward_backward(model, x, hx):
    """Like forward_backward, for a cell returning (h, c)."""
    class AsLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = model

        def named_parameters(self, *args, **kwargs):
            return model.named_parameters()

        def forward(self, x, hx=None):
            h, c = model(x, hx)
            return h, (h * 0.5, c)  # a second use of h, so its gradient has two sources

    return forward_backward(AsLayer(), x, hx)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("I,H", SIZES)
@pytest.mark.parametrize("B", [1, 5, 32])
def test_cell_float64(B, I, H, bias):
    ref, ext = make_cell_pair(I, H, torch.float64, bias)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, I, generator=gen, dtype=torch.float64)
    hx = tuple(torch.randn(B, H, generator=gen, dtype=torch.float64) for _ in range(2))
    names, expected = cell_forward_backward(ref, x, hx)
    _, actual = cell_forward_backward(ext, x, hx)
    assert_float64_equal(names, actual, expected)
    # ... and the reference cell agrees.
    h, c = lstm_cell_reference(x, *hx, *[getattr(ext, n) for n in
                                         ("weight_ih", "weight_hh", "bias_ih", "bias_hh")])
    assert_float64_equal(["h", "c"], [h, c], expected[:1] + expected[2:3])


@pytest.mark.parametrize("I,H", SIZES)
@pytest.mark.parametrize("B", [1, 32])
def test_cell_float32(B, I, H):
    ref32, ext32 = make_cell_pair(I, H, torch.float32)
    ref64 = nn.LSTMCell(I, H, dtype=torch.float64)
    ref64.load_state_dict(ref32.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, I, generator=gen)
    hx = tuple(torch.randn(B, H, generator=gen) for _ in range(2))
    names, r64 = cell_forward_backward(ref64, x.double(), tuple(t.double() for t in hx))
    _, t32 = cell_forward_backward(ref32, x, hx)
    _, e32 = cell_forward_backward(ext32, x, hx)
    assert_float32_close(names, e32, t32, r64)


@pytest.mark.parametrize("unbatched", [False, True])
def test_cell_default_state_and_unbatched(unbatched):
    ref, ext = make_cell_pair(3, 17, torch.float64)
    x = torch.randn(3 if unbatched else (4, 3), dtype=torch.float64)
    for hx in (None, (torch.randn(x.shape[:-1] + (17,), dtype=torch.float64),) * 2):
        h_r, c_r = ref(x, hx)
        h_e, c_e = ext(x, hx)
        assert h_e.shape == h_r.shape and c_e.shape == c_r.shape
        assert_float64_equal(["h", "c"], [h_e, c_e], [h_r, c_r])
