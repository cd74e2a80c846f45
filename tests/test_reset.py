"""forward(input, hx, reset): rows that start anew mid-sequence, fused in the CPU kernels.

The yardstick is what a user would otherwise do: cut each batch row at its resets and run
torch.nn.LSTM on every piece separately, each from that row's h_0 / c_0 (`split_run`). lstm_ext
with reset must give the same outputs, final states and gradients: float64 to ~1e-10, float32
and the 16-bit dtypes as accurately as nn.LSTM in the same precision.
"""

import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_ext
from lstm_ext.reference import lstm_reference
from lstm_testing import (LOW_PRECISION_CONFIGS, assert_as_accurate, gradgradcheck_module,
                          rel_err, round_through, split_run, outputs_and_grads as results)


def our_run(model, x, h0, c0, reset, lengths, batch_first=False):
    """lstm_ext with reset, padded or packed (unsorted lengths) -> padded output, h_n, c_n."""
    packed = min(lengths) < x.shape[0]
    if batch_first:
        x, reset = x.transpose(0, 1), reset.t()
    if packed:
        x = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                 enforce_sorted=False)
    out, (h_n, c_n) = model(x, (h0, c0), reset=reset)
    if packed:
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=len(reset) if
                                     not batch_first else reset.shape[1])
    if batch_first:
        out = out.transpose(0, 1)
    return out, h_n, c_n


def make(sizes, T, B, options, dtype=torch.float64, seed=0, rate=0.25, lengths=None):
    """nn.LSTM and lstm_ext.LSTM with the same weights, input, states and a reset pattern."""
    gen = torch.Generator().manual_seed(seed)
    theirs = nn.LSTM(*sizes, dtype=dtype, **options)
    ours = lstm_ext.LSTM(*sizes, dtype=dtype, **options)
    ours.load_state_dict(theirs.state_dict())
    D = 2 if theirs.bidirectional else 1
    P = theirs.proj_size or theirs.hidden_size
    x = torch.randn(T, B, sizes[0], generator=gen).to(dtype)
    h0 = torch.randn(theirs.num_layers * D, B, P, generator=gen).to(dtype)
    c0 = torch.randn(theirs.num_layers * D, B, sizes[1], generator=gen).to(dtype)
    reset = torch.rand(T, B, generator=gen) < rate
    return theirs, ours, x, h0, c0, reset, lengths or [T] * B


CONFIGS = [
    # (input, hidden), T, B, options, lengths (None: all T; else packed, unsorted)
    ((3, 5), 9, 4, dict(), None),
    ((3, 5), 9, 4, dict(bidirectional=True), None),
    ((3, 6), 8, 3, dict(num_layers=2, bidirectional=True, proj_size=4), None),
    ((4, 5), 10, 4, dict(num_layers=2), [6, 10, 3, 8]),
    ((4, 5), 10, 4, dict(bidirectional=True, proj_size=3), [6, 10, 3, 8]),
    ((8, 64), 12, 40, dict(), None),          # the batch split over threads, chunked steps
    ((8, 64), 12, 40, dict(bidirectional=True), [12] * 20 + [7] * 20),
    ((16, 128), 40, 1, dict(), None),         # two-thread pipelines (batch too small to split)
    ((16, 128), 40, 2, dict(bidirectional=True), None),
    ((5, 7), 3, 2, dict(num_layers=2, bidirectional=True), None),  # few rows: direct steps
]


@pytest.mark.parametrize("sizes,T,B,options,lengths", CONFIGS, ids=str)
def test_float64_equals_nn_on_the_split_sequences(sizes, T, B, options, lengths):
    theirs, ours, x, h0, c0, reset, lengths = make(sizes, T, B, options, lengths=lengths)
    expected = results(split_run, theirs, x, h0, c0, reset, lengths)
    actual = results(our_run, ours, x, h0, c0, reset, lengths)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, k
        assert rel_err(a, e) <= 1e-10, (k, rel_err(a, e))


@pytest.mark.parametrize("sizes,T,B,options,lengths", CONFIGS[:5], ids=str)
def test_batch_first(sizes, T, B, options, lengths):
    theirs, ours, x, h0, c0, reset, lengths = make(sizes, T, B, dict(options, batch_first=True),
                                                   lengths=lengths)
    theirs.batch_first = False  # split_run feeds it [T, 1, I] pieces
    expected = results(split_run, theirs, x, h0, c0, reset, lengths)
    actual = results(our_run, ours, x, h0, c0, reset, lengths, batch_first=True)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert rel_err(a, e) <= 1e-10, (k, rel_err(a, e))


@pytest.mark.parametrize("sizes,T,B,options,lengths", CONFIGS, ids=str)
def test_float32_as_accurate_as_nn(sizes, T, B, options, lengths):
    theirs, ours, x, h0, c0, reset, lengths = make(sizes, T, B, options, lengths=lengths)
    exact = results(split_run, theirs, x, h0, c0, reset, lengths)
    theirs.float()
    ours.float()
    x, h0, c0 = x.float(), h0.float(), c0.float()
    nn32 = results(split_run, theirs, x, h0, c0, reset, lengths)
    assert_as_accurate(results(our_run, ours, x, h0, c0, reset, lengths), nn32, exact,
                       torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes,T,B,options,lengths", LOW_PRECISION_CONFIGS, ids=str)
def test_low_precision_as_accurate_as_nn(dtype, sizes, T, B, options, lengths):
    theirs, ours, x, h0, c0, reset, lengths = make(sizes, T, B, options, lengths=lengths)
    x, h0, c0 = round_through(dtype, [theirs, ours], (x, h0, c0))
    exact = results(split_run, theirs, x, h0, c0, reset, lengths)
    theirs.to(dtype)
    ours.to(dtype)
    x, h0, c0 = (t.to(dtype) for t in (x, h0, c0))
    nn_low = results(split_run, theirs, x, h0, c0, reset, lengths)
    assert_as_accurate(results(our_run, ours, x, h0, c0, reset, lengths), nn_low, exact, dtype)


def test_matches_the_reference():
    _, ours, x, h0, c0, reset, _ = make((3, 6), 8, 3, dict(num_layers=2, bidirectional=True,
                                                            proj_size=4))
    out, (h_n, c_n) = ours(x, (h0, c0), reset=reset)
    params = [getattr(ours, n) for n in ours._flat_weights_names]
    expected = lstm_reference(x, h0, c0, params, True, True, 2, True, reset=reset)
    for a, e in zip((out, h_n, c_n), expected):
        assert rel_err(a, e) <= 1e-12


@pytest.mark.parametrize("options,lengths", [
    (dict(bidirectional=True), None),
    (dict(num_layers=2, proj_size=2), [5, 3, 4]),
], ids=str)
def test_gradcheck_and_gradgradcheck(options, lengths):
    _, ours, x, h0, c0, reset, lengths = make((2, 3), 5, 3, options, rate=0.4, lengths=lengths)
    params = list(ours.parameters())

    def f(x, h0, c0, *weights):
        with torch.nn.utils.stateless._reparametrize_module(
                ours, dict(zip([n for n, _ in ours.named_parameters()], weights))):
            out, h_n, c_n = our_run(ours, x, h0, c0, reset, lengths)
        return out, h_n, c_n

    inputs = [t.detach().clone().requires_grad_() for t in (x, h0, c0, *params)]
    assert torch.autograd.gradcheck(f, inputs)
    assert gradgradcheck_module(f, inputs)


def test_no_reset_and_all_false_reset_are_the_same_call():
    _, ours, x, h0, c0, _, _ = make((3, 5), 9, 4, dict(bidirectional=True))
    plain = ours(x, (h0, c0))
    none_set = ours(x, (h0, c0), reset=torch.zeros(9, 4, dtype=torch.bool))
    first_step_only = torch.zeros(9, 4, dtype=torch.bool)
    first_step_only[0] = True  # every row starts from h_0 at step 0 anyway
    at_start = ours(x, (h0, c0), reset=first_step_only)
    for other in (none_set, at_start):
        assert torch.equal(plain[0], other[0])
        assert torch.equal(plain[1][0], other[1][0]) and torch.equal(plain[1][1], other[1][1])


def test_without_hx_rows_restart_from_zeros_and_unbatched_input():
    _, ours, x, _, _, reset, _ = make((3, 5), 9, 1, dict())
    batched, _ = ours(x, reset=reset)
    unbatched, _ = ours(x[:, 0], reset=reset[:, 0])
    assert torch.equal(batched[:, 0], unbatched)
    t = int(reset[1:, 0].nonzero()[0]) + 1 if reset[1:, 0].any() else 4
    reset[:, 0] = False
    reset[t, 0] = True
    out, _ = ours(x, reset=reset)
    fresh, _ = ours(x[t:])
    assert rel_err(out[t:], fresh) <= 1e-12


def test_compile_gives_eager_results():
    _, ours, x, h0, c0, reset, _ = make((3, 5), 9, 4, dict(bidirectional=True))
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    eager = ours(x, (h0, c0), reset=reset)
    traced = compiled(x, (h0, c0), reset=reset)
    assert torch.equal(eager[0], traced[0]) and torch.equal(eager[1][0], traced[1][0])


def test_bad_reset_is_a_clear_error():
    _, ours, x, h0, c0, reset, _ = make((3, 5), 9, 4, dict())
    with pytest.raises(TypeError, match="reset must be a bool tensor, got torch.float32"):
        ours(x, reset=reset.float())
    with pytest.raises(TypeError, match="reset must be a bool Tensor or None, got list"):
        ours(x, reset=[[True]])
    with pytest.raises(ValueError,
                       match=r"reset must have shape \[T, B\] = \(9, 4\).*got \[4, 9\]"):
        ours(x, reset=reset.t())
    ours.batch_first = True
    with pytest.raises(ValueError, match=r"\[B, T\] \(batch_first\) = \(9, 4\)"):
        ours(x, reset=reset.t())  # x read as [B=9, T=4, I]
    ours.batch_first = False
    with pytest.raises(RuntimeError, match="reset must have shape"):  # the op checks it too
        torch.ops.lstm_ext.lstm_layer_forward(x, h0[0], c0[0], ours.weight_ih_l0,
                                              ours.weight_hh_l0, None, None, None, None, False,
                                              False, reset[:3])


def test_reset_refused_where_not_supported():
    # (under torch.func transforms it works: tests/test_func.py)
    _, ours, x, _, _, reset, _ = make((3, 5), 9, 4, dict())

    class WithReset(nn.Module):
        def forward(self, x):
            return ours(x, reset=reset)[0]
    with pytest.raises(NotImplementedError, match="reset not supported under ONNX export"):
        torch.onnx.export(WithReset(), (x,), io.BytesIO(), dynamo=False)
