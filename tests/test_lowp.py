"""bfloat16 and float16 on the CPU, and torch.autocast: outputs and every gradient as accurate as
nn.LSTM's in the same precision. The criterion: against float64 on the same rounded weights and
inputs, lstm_ext's relative error (max |error| / max |exact|, per tensor) is at most twice
nn.LSTM's own, plus one unit of the dtype's precision."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_ext

LOW = [torch.bfloat16, torch.float16]
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def relative_error(actual, exact):
    scale = exact.abs().max().item()
    return (actual.double() - exact).abs().max().item() / (scale if scale > 0 else 1.0)


def run(model, x, hx, autocast=None):
    """Outputs and the gradients of input, states and parameters, for a fixed loss."""
    packed = isinstance(x, PackedSequence)
    data = (x.data if packed else x).detach().clone().requires_grad_()
    model_input = PackedSequence(data, *x[1:]) if packed else data
    states = tuple(t.detach().clone().requires_grad_() for t in hx) if hx is not None else None
    context = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast(
        "cpu", enabled=False)
    with context:
        out = model(model_input, states) if states is not None else model(model_input)
    if isinstance(model, (nn.LSTMCell, lstm_ext.LSTMCell)):
        outputs = list(out)
    else:
        outputs = [out[0].data if packed else out[0], *out[1]]
    gen = torch.Generator().manual_seed(5)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
               for o in outputs)
    leaves = [data] + list(states or ()) + list(model.parameters())
    return outputs + list(torch.autograd.grad(loss, leaves))


def compare(sizes, dtype, x, hx=None, cell=False, autocast=None, scale=1.0, **options):
    """Errors of nn's and lstm_ext's module (input and hidden `sizes`, constructor `options`) in
    `dtype` (or float32 under `autocast`) against float64 on the same rounded values."""
    nn_cls, ext_cls = (nn.LSTMCell, lstm_ext.LSTMCell) if cell else (nn.LSTM, lstm_ext.LSTM)
    torch.manual_seed(0)
    exact = nn_cls(*sizes, dtype=torch.float64, **options)
    low = autocast or dtype
    with torch.no_grad():  # weights representable in the low precision, optionally large
        for p in exact.parameters():
            p.mul_(scale).copy_(p.to(low).double())
    module_dtype = torch.float32 if autocast else dtype
    ours = ext_cls(*sizes, dtype=module_dtype, **options)
    theirs = nn_cls(*sizes, dtype=module_dtype, **options)
    ours.load_state_dict(exact.state_dict())
    theirs.load_state_dict(exact.state_dict())

    def as_dtype(v, d):
        return PackedSequence(v.data.to(d), *v[1:]) if isinstance(v, PackedSequence) else v.to(d)

    x_low = as_dtype(as_dtype(x, low), module_dtype)
    hx_low = tuple(t.to(low).to(module_dtype) for t in hx) if hx is not None else None
    reference = run(exact, as_dtype(x_low, torch.float64),
                    tuple(t.double() for t in hx_low) if hx_low else None)
    ext = run(ours, x_low, hx_low, autocast)
    try:
        nn_result = run(theirs, x_low, hx_low, autocast)
    except RuntimeError as error:
        # nn.LSTM under autocast runs oneDNN's RNN primitive in the low dtype, which fails where
        # the CPU lacks it: float16 everywhere, bfloat16 without AVX512-BF16 (an AVX2 CPU: "could
        # not create a primitive descriptor"). lstm_ext runs there; the yardstick is then nn.LSTM
        # in that dtype itself.
        if not autocast or "could not create a primitive" not in str(error):
            raise
        theirs.to(autocast)
        nn_result = run(theirs, as_dtype(x_low, autocast),
                        tuple(t.to(autocast) for t in hx_low) if hx_low else None)
    for k, (e, n, r) in enumerate(zip(ext, nn_result, reference)):
        assert e.dtype == n.dtype or autocast and k >= 3, (k, e.dtype, n.dtype)
        ours_err, nn_err = relative_error(e, r), relative_error(n, r)
        assert ours_err <= 2 * nn_err + EPS[low], (k, ours_err, nn_err)


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("config", [
    # (input, hidden, options, T, B): the micro-kernel path (T >= 8, 4H a multiple of 16, I + P
    # even), MKL's (odd sizes, or few steps), projection and both directions, 2 layers
    (8, 32, dict(), 20, 4),
    (7, 5, dict(), 20, 3),
    (8, 32, dict(), 3, 4),
    (6, 16, dict(num_layers=2, bidirectional=True, proj_size=4), 12, 3),
    (9, 12, dict(num_layers=2, proj_size=5), 10, 2),
    (64, 64, dict(batch_first=True), 16, 40),  # the batch split over threads
], ids=str)
def test_low_precision_module_as_accurate_as_nn(dtype, config):
    I, H, options, T, B = config
    x = randn(B, T, I) if options.get("batch_first") else randn(T, B, I)
    layers, d = options.get("num_layers", 1), 2 if options.get("bidirectional") else 1
    hx = (randn(layers * d, B, options.get("proj_size") or H), randn(layers * d, B, H))
    compare((I, H), dtype, x, hx, **options)


@pytest.mark.parametrize("dtype", LOW)
def test_long_sequence_does_not_drift(dtype):
    """T = 1000: the cell state stays float32 within a call."""
    compare((4, 16), dtype, randn(1000, 2, 4))


@pytest.mark.parametrize("dtype", LOW)
def test_saturated_gates(dtype):
    compare((8, 32), dtype, randn(20, 3, 8), scale=30.0)


@pytest.mark.parametrize("dtype", LOW)
def test_packed_sequence(dtype):
    lengths = torch.tensor([11, 3, 9, 1, 7])
    x = pack_padded_sequence(randn(11, 5, 8), lengths, enforce_sorted=False)
    compare((8, 16), dtype, x, bidirectional=True)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("sizes", [(3, 8, 16), (1, 80, 64), (5, 7, 9)], ids=str)
def test_cell(dtype, sizes):
    B, I, H = sizes
    compare((I, H), dtype, randn(B, I), (randn(B, H), randn(B, H)), cell=True)


@pytest.mark.parametrize("autocast", LOW)
@pytest.mark.parametrize("config", [(8, 32, 20, 4), (6, 10, 12, 3)], ids=str)
def test_autocast_with_float32_master_weights(autocast, config):
    I, H, T, B = config
    compare((I, H), None, randn(T, B, I), autocast=autocast, num_layers=2)


def test_autocast_dtypes_and_float32_gradients():
    torch.manual_seed(0)
    model = lstm_ext.LSTM(3, 8, num_layers=2)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = model(x)
        cell_out = lstm_ext.LSTMCell(3, 8)(x[0])[0]
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16  # as nn.LSTM
    assert cell_out.dtype == torch.float32  # as nn.LSTMCell on the CPU: not cast
    (y.float().sum() + h.float().sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch.compile of an autocast region
        compiled = torch.compile(model, fullgraph=True)(x)[0]
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, y.detach(), rtol=2e-2, atol=2e-2)
    double = lstm_ext.LSTM(3, 8).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as nn.LSTM's
        assert double(x.double())[0].dtype == torch.float64


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_features(dtype):
    """The float32 path's features in low precision: dropout, unbatched, double backward."""
    torch.manual_seed(0)
    model = lstm_ext.LSTM(4, 8, num_layers=2, dropout=0.5, dtype=dtype).train()
    reference = nn.LSTM(4, 8, num_layers=2, dropout=0.5, dtype=dtype).train()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 2, 4, dtype=dtype)
    torch.manual_seed(1)
    ours = model(x)[0]
    torch.manual_seed(1)
    theirs = reference(x)[0]
    assert ((ours == 0) == (theirs == 0)).all()  # the same dropout masks
    unbatched = model.eval()(x[:, 0])[0]
    assert unbatched.shape == (6, 8) and unbatched.dtype == dtype
    x64 = x.double().requires_grad_()  # double backward differentiates the reference
    model64 = lstm_ext.LSTM(4, 8, dtype=torch.float64)
    out = model64(x64)[0].sum()
    (g,) = torch.autograd.grad(out, x64, create_graph=True)
    assert g.requires_grad


def test_kept_state_is_float32_for_low_precision():
    x, h = torch.randn(5, 2, 3).bfloat16(), torch.zeros(2, 4).bfloat16()
    w_ih, w_hh = torch.randn(16, 3).bfloat16(), torch.randn(16, 4).bfloat16()
    out = torch.ops.lstm_ext.lstm_layer_forward(x, h, h, w_ih, w_hh, None, None, None, None,
                                                False, True)
    assert out[0].dtype == torch.bfloat16 and out[3].dtype == out[4].dtype == torch.float32
    torch.library.opcheck(torch.ops.lstm_ext.lstm_layer_forward.default,
                          [x, h, h, w_ih, w_hh, None, None, None, None, False, True])


@pytest.mark.skipif(bool(os.environ.get("LSTM_EXT_LOWP_PRODUCTS")),
                    reason="this run has its way of running 16-bit products set")
@pytest.mark.parametrize("mode", ["native", "float32"])
def test_both_ways_of_running_16_bit_products(mode):
    """A 16-bit layer runs its products as MKL's 16-bit GEMMs or as float32 GEMMs on float32
    copies with the GEMM inputs rounded through the dtype (csrc/cpu/mixed_gemm.h,
    lowp_products_in_float32), the way a rule picks for the CPU: whichever it picks here, each
    way passes this file's accuracy tests and layer_norm's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_lowp.py",
         "tests/test_layer_norm.py::test_low_precision_as_accurate_as_the_reference"],
        cwd=root, env=dict(os.environ, LSTM_EXT_LOWP_PRODUCTS=mode), capture_output=True,
        text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
