"""zoneout and recurrent_dropout on lstm_ext.LSTM, fused in the CPU kernels.

The yardstick is lstm_ext.reference (plain PyTorch, the equations spelled out) run with the masks
the op drew: they come from torch's default generator in a fixed order (per layer, per direction:
zoneout's c mask, its h mask, the recurrent dropout mask; then the dropout between layers), so
`drawn_masks` redraws them from the same seed (zoneout's through the module's own bernoulli_mask;
the rate tests check its distribution). float64 must agree to ~1e-10, float32 as closely
as the reference's own float32 error allows.
"""

import io

import pytest
import torch

import lstm_ext
from lstm_testing import (LOW_PRECISION_CONFIGS, SEED, assert_as_accurate, bernoulli_mask,
                          drawn_masks, gradgradcheck_module, make, ours, rel_err, round_through,
                          theirs, outputs_and_grads as results)

CONFIGS = [
    # (input, hidden), T, B, options, lengths (None: all T; else packed, unsorted)
    ((3, 5), 9, 4, dict(), None),
    ((3, 5), 9, 4, dict(bidirectional=True), None),
    ((3, 6), 8, 3, dict(num_layers=2, bidirectional=True, proj_size=4, dropout=0.3), None),
    ((4, 5), 10, 4, dict(num_layers=2), [6, 10, 3, 8]),
    ((4, 5), 10, 4, dict(bidirectional=True, proj_size=3), [6, 10, 3, 8]),
    ((8, 64), 12, 40, dict(), None),          # the batch split over threads, chunked steps
    ((8, 64), 12, 40, dict(bidirectional=True), [12] * 20 + [7] * 20),
    ((16, 128), 40, 1, dict(), None),         # two-thread pipelines (batch too small to split)
    ((16, 128), 40, 2, dict(bidirectional=True), None),
    ((5, 7), 3, 2, dict(num_layers=2, bidirectional=True), None),  # few rows: direct steps
]

VARIANTS = {
    "zoneout": dict(zoneout=0.3),
    "zoneout_h_only": dict(zoneout=(0.0, 0.4)),
    "zoneout_c_only": dict(zoneout=(0.25, 0.0)),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "both": dict(zoneout=(0.2, 0.35), recurrent_dropout=0.25),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sizes,T,B,options,lengths", CONFIGS, ids=str)
@pytest.mark.parametrize("with_reset", [False, True], ids=["", "reset"])
def test_float64_equals_the_reference_with_the_same_masks(sizes, T, B, options, lengths, variant,
                                                          with_reset):
    if with_reset and variant not in ("zoneout", "both"):
        pytest.skip("reset is combined with the variants that touch both states")
    model, x, h0, c0, reset = make(sizes, T, B, dict(options, **VARIANTS[variant]))
    reset = reset if with_reset else torch.zeros_like(reset)
    expected = results(theirs, model, x, h0, c0, reset, lengths)
    actual = results(ours, model, x, h0, c0, reset, lengths)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, k
        assert rel_err(a, e) <= 1e-10, (k, rel_err(a, e))


@pytest.mark.parametrize("sizes,T,B,options,lengths", CONFIGS[:3] + CONFIGS[5:8], ids=str)
def test_eval_is_the_expectation_and_draws_nothing(sizes, T, B, options, lengths):
    model, x, h0, c0, reset = make(sizes, T, B, dict(options, zoneout=(0.2, 0.3),
                                                     recurrent_dropout=0.4))
    model.eval()
    expected = results(theirs, model, x, h0, c0, reset, lengths)
    actual = results(ours, model, x, h0, c0, reset, lengths)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert rel_err(a, e) <= 1e-10, (k, rel_err(a, e))
    state = torch.get_rng_state()
    model(x, (h0, c0))
    assert torch.equal(torch.get_rng_state(), state)  # eval draws no random numbers


def test_recurrent_dropout_in_eval_is_the_plain_lstm():
    model, x, h0, c0, _ = make((3, 5), 9, 4, dict(num_layers=2, recurrent_dropout=0.5))
    plain = lstm_ext.LSTM(3, 5, num_layers=2, dtype=torch.float64)
    plain.load_state_dict(model.state_dict())
    model.eval()
    a, b = model(x, (h0, c0)), plain(x, (h0, c0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][1], b[1][1])


def test_batch_first():
    model, x, h0, c0, reset = make((3, 6), 8, 3, dict(num_layers=2, bidirectional=True,
                                                      proj_size=4, zoneout=0.3,
                                                      recurrent_dropout=0.2))
    expected = results(theirs, model, x, h0, c0, reset, None)
    model.batch_first = True

    def batch_first_run(model, x, h0, c0, reset, lengths):
        torch.manual_seed(SEED)
        out, (h_n, c_n) = model(x.transpose(0, 1), (h0, c0), reset=reset.t())
        return out.transpose(0, 1), h_n, c_n

    actual = results(batch_first_run, model, x, h0, c0, reset, None)
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert rel_err(a, e) <= 1e-10, (k, rel_err(a, e))


@pytest.mark.parametrize("variant", ["zoneout", "recurrent_dropout", "both"])
@pytest.mark.parametrize("sizes,T,B,options,lengths", [CONFIGS[2], CONFIGS[4], CONFIGS[5],
                                                       CONFIGS[7]], ids=str)
def test_float32_as_accurate_as_the_reference(sizes, T, B, options, lengths, variant):
    model, x, h0, c0, reset = make(sizes, T, B, dict(options, **VARIANTS[variant]))
    exact = results(theirs, model, x, h0, c0, reset, lengths)
    model.float()
    x, h0, c0 = x.float(), h0.float(), c0.float()
    reference32 = results(theirs, model, x, h0, c0, reset, lengths)
    assert_as_accurate(results(ours, model, x, h0, c0, reset, lengths), reference32, exact,
                       torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes,T,B,options,lengths", LOW_PRECISION_CONFIGS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_as_accurate_as_the_reference(dtype, sizes, T, B, options, lengths,
                                                    training):
    model, x, h0, c0, reset = make(sizes, T, B, dict(options, zoneout=(0.2, 0.3),
                                                     recurrent_dropout=0.25))
    model.train(training)
    x, h0, c0 = round_through(dtype, [model], (x, h0, c0))
    exact = results(theirs, model, x, h0, c0, reset, lengths, mask_dtype=dtype)
    model.to(dtype)
    x, h0, c0 = (t.to(dtype) for t in (x, h0, c0))
    reference_low = results(theirs, model, x, h0, c0, reset, lengths)
    assert_as_accurate(results(ours, model, x, h0, c0, reset, lengths), reference_low, exact,
                       dtype)


@pytest.mark.parametrize("options,lengths", [
    (dict(bidirectional=True, zoneout=0.3, recurrent_dropout=0.3), None),
    (dict(num_layers=2, proj_size=2, zoneout=(0.2, 0.4), recurrent_dropout=0.2), [5, 3, 4]),
], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(options, lengths, training):
    model, x, h0, c0, reset = make((2, 3), 5, 3, options)
    model.train(training)
    names = [n for n, _ in model.named_parameters()]

    def f(x, h0, c0, *weights):  # the same masks at every call: the seed is set first
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, weights))):
            return ours(model, x, h0, c0, reset, lengths)

    inputs = [t.detach().clone().requires_grad_() for t in (x, h0, c0, *model.parameters())]
    assert torch.autograd.gradcheck(f, inputs)
    assert gradgradcheck_module(f, inputs)


def _repeats_of_the_step_before(h):
    """The fraction of units whose h_t equals h_{t-1} exactly (h [T, B, H])."""
    return (h[1:] == h[:-1]).double().mean().item()


def _within_4_sigma(rate, p, n):
    return abs(rate - p) <= 4 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("zoneout", [(0.3, 0.0), (0.0, 0.3), (0.5, 0.2)], ids=str)
def test_zoneout_keeps_units_at_its_rates(zoneout):
    """One step from random states: a zoned-out unit's c_n / h_n is its c_0 / h_0 exactly (a
    unit's new value equals the old one with probability 0), so the fraction of such units
    estimates each rate."""
    B, H = 1000, 16
    model = lstm_ext.LSTM(4, H, zoneout=zoneout, dtype=torch.float64)
    x = torch.randn(1, B, 4, dtype=torch.float64)
    h0, c0 = torch.randn(1, B, H, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64)
    _, (h_n, c_n) = model(x, (h0, c0))
    for kept, p in (((c_n == c0).double().mean().item(), zoneout[0]),
                    ((h_n == h0).double().mean().item(), zoneout[1])):
        assert _within_4_sigma(kept, p, B * H) if p else kept == 0.0, (kept, p)


@pytest.mark.parametrize("p_h", [0.3, 0.7])
def test_zoneout_draws_a_fresh_mask_every_step(p_h):
    """With weights under which h's new value is fresh every step (f = 0, i = o = 1, g from the
    input), h_t repeats h_{t-1} exactly where the unit was zoned out at step t: the fraction of
    repeats over all steps estimates p_h, and a mask drawn once would repeat whole units."""
    T, B, H = 60, 20, 16
    zoneout = (0.0, p_h)
    model = lstm_ext.LSTM(4, H, zoneout=zoneout, dtype=torch.float64)
    with torch.no_grad():
        model.weight_hh_l0.zero_()
        model.weight_ih_l0.zero_()
        model.weight_ih_l0[2 * H:3 * H].normal_()  # g from the input
        model.bias_hh_l0.zero_()
        model.bias_ih_l0.copy_(torch.cat([torch.full((H,), 40.0), torch.full((H,), -800.0),
                                          torch.zeros(H), torch.full((H,), 40.0)]))
    x = torch.randn(T, B, 4, dtype=torch.float64)
    torch.manual_seed(0)
    out, _ = model(x)
    assert _within_4_sigma(_repeats_of_the_step_before(out), p_h, (T - 1) * B * H)
    always = (out[1:] == out[:-1]).all(0)  # units repeated at every step
    assert always.double().mean().item() < 0.01
    model.zoneout = (0.0, 0.0)
    assert _repeats_of_the_step_before(model(x)[0]) == 0.0  # nothing repeats without zoneout


def test_recurrent_dropout_drops_at_its_rate_and_scales():
    """The mask is one per sequence: where a row's unit j is dropped, W_hh's column j never
    reaches that row, so the gradient of W_hh's column j from row b alone is zero; the rate of
    such columns estimates p."""
    B, P = 200, 8
    model = lstm_ext.LSTM(3, P, recurrent_dropout=0.3, dtype=torch.float64)
    x = torch.randn(6, B, 3, dtype=torch.float64)
    torch.manual_seed(SEED)
    out, _ = model(x)
    _, recurrent, _ = drawn_masks(model, (6, B), B, torch.float64)
    mask = recurrent[0]
    kept = mask != 0
    assert _within_4_sigma((~kept).double().mean().item(), 0.3, mask.numel())
    assert torch.allclose(mask[kept], torch.tensor(1 / 0.7, dtype=torch.float64))
    dropped_row, dropped_unit = (~kept).nonzero()[0].tolist()
    grad = torch.autograd.grad(out[:, dropped_row].sum(), model.weight_hh_l0)[0]
    assert torch.all(grad[:, dropped_unit] == 0) and grad.abs().sum() > 0


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.93])
def test_zoneout_masks_are_independent_draws_at_their_rate(p):
    n = 1 << 20
    torch.manual_seed(SEED)
    mask = bernoulli_mask([n], p)
    assert mask.dtype == torch.bool and _within_4_sigma(mask.double().mean().item(), p, n)
    pairs = mask[:-1] & mask[1:]  # neighbours: P(both) = p^2 when independent
    assert _within_4_sigma(pairs.double().mean().item(), p * p, n)
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(bernoulli_mask([n], p), mask)  # a seed, any thread count
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(bernoulli_mask([n], p), mask)  # the generator moved on
    assert bernoulli_mask([3, 0, 2], p).shape == (3, 0, 2)


def test_reproducible_under_a_seed_and_fresh_otherwise():
    model, x, h0, c0, reset = make((3, 5), 9, 4, dict(num_layers=2, zoneout=0.3,
                                                      recurrent_dropout=0.3))
    first = ours(model, x, h0, c0, reset, None)
    second = ours(model, x, h0, c0, reset, None)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    third = model(x, (h0, c0))  # the generator has moved on: new masks
    assert not torch.equal(first[0], third[0])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_draws_the_same_masks_as_eager(backend):
    model, x, h0, c0, reset = make((3, 5), 9, 4, dict(bidirectional=True, zoneout=0.3,
                                                      recurrent_dropout=0.3))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    eager = ours(model, x, h0, c0, reset, None)
    torch.manual_seed(SEED)
    out, (h_n, c_n) = compiled(x, (h0, c0), reset=reset)
    assert torch.equal(eager[0], out) and torch.equal(eager[1], h_n) and torch.equal(eager[2], c_n)


def test_default_module_is_nn_lstm_exactly():
    model = lstm_ext.LSTM(3, 5, num_layers=2)
    assert (model.zoneout, model.recurrent_dropout) == ((0.0, 0.0), 0.0)
    assert list(model.state_dict()) == list(torch.nn.LSTM(3, 5, num_layers=2).state_dict())
    zoned = lstm_ext.LSTM(3, 5, num_layers=2, zoneout=0.1, recurrent_dropout=0.2)
    assert list(zoned.state_dict()) == list(model.state_dict())  # no new parameters
    assert repr(zoned) == "LSTM(3, 5, num_layers=2, zoneout=0.1, recurrent_dropout=0.2)"
    assert "zoneout=(0.0, 0.3)" in repr(lstm_ext.LSTM(3, 5, zoneout=(0, 0.3)))
    x = torch.randn(7, 2, 3)
    zoned.load_state_dict(model.state_dict())
    zoned.zoneout, zoned.recurrent_dropout = (0.0, 0.0), 0.0
    assert torch.equal(model(x)[0], zoned(x)[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(zoneout=1.0), "zoneout should be a number in range"),
    (dict(zoneout=-0.1), "zoneout should be a number in range"),
    (dict(zoneout=(0.1,)), r"or a pair \(p_c, p_h\)"),
    (dict(zoneout="0.1"), "zoneout should be a number"),
    (dict(zoneout=True), "zoneout should be a number"),
    (dict(recurrent_dropout=1.0), "recurrent_dropout should be a number in range"),
    (dict(recurrent_dropout=None), "recurrent_dropout should be a number in range"),
], ids=str)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lstm_ext.LSTM(3, 5, **kwargs)


def test_refused_where_not_supported():
    # (under torch.func transforms they work: tests/test_func.py)
    model = lstm_ext.LSTM(3, 5, zoneout=0.2, recurrent_dropout=0.2)
    x = torch.randn(7, 2, 3)
    # export runs the model in eval: recurrent dropout is off there, zoneout is not
    with pytest.raises(NotImplementedError, match="zoneout not supported under ONNX export"):
        torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)


def test_the_ops_check_their_masks():
    model, x, h0, c0, _ = make((3, 5), 9, 4, dict())
    args = (x, h0[0], c0[0], model.weight_ih_l0, model.weight_hh_l0, None, None, None, None,
            False, False, None)
    op = torch.ops.lstm_ext.lstm_layer_forward
    with pytest.raises(RuntimeError, match=r"zoneout_mask_h must have shape \[T, B, P\]"):
        op(*args, 0.0, 0.1, None, torch.zeros(9, 4, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="zoneout_mask_c must be a bool tensor"):
        op(*args, 0.1, 0.0, torch.zeros(9, 4, 5))
    with pytest.raises(RuntimeError, match=r"recurrent_mask must have shape \[B, P\]"):
        op(*args, 0.0, 0.0, None, None, torch.ones(4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="zoneout_c and zoneout_h must be probabilities"):
        op(*args, 1.5, 0.0)
    with pytest.raises(ValueError, match="recurrent_dropout must be a probability"):
        torch.ops.lstm_ext.lstm(x, None, None, list(model.parameters()), True, False, 1, 0.0,
                                True, False, None, None, 0.0, 0.0, 1.0)
