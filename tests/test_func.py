"""torch.func: functional_call, grad, vjp, jacrev equal nn.LSTM's; vmap over inputs (folded into the
batch), over stacked parameters (ensembles) and per-sample gradients equal a loop over the items.
nn.LSTM has no batching rule, so the vmap cases compare with loops of lstm_ext and of nn.LSTM."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vjp, vmap

import lstm_ext

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)

CONFIGS = {
    "1 layer": dict(num_layers=1),
    "2 layers, bidirectional, projection": dict(num_layers=2, bidirectional=True, proj_size=3),
    "no bias, batch_first": dict(bias=False, batch_first=True),
}


def pair(**kwargs):
    torch.manual_seed(0)
    reference = nn.LSTM(3, 5, dtype=F64, **kwargs)
    ours = lstm_ext.LSTM(3, 5, dtype=F64, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def params_of(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def loss_of(module):
    """loss(params, x): the module run with `params` through functional_call."""
    def loss(params, x):
        y, (h, c) = functional_call(module, params, (x,))
        return y.square().sum() + 0.5 * h.sum() + 0.25 * (c * c).sum()
    return loss


def assert_trees_close(actual, expected):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], **TOL)
    elif isinstance(expected, (tuple, list)):
        for a, e in zip(actual, expected):
            assert_trees_close(a, e)
    else:
        torch.testing.assert_close(actual, expected, **TOL)


def inputs(config, *batch):
    x = torch.randn(*batch, 6, 2, 3, dtype=F64)
    return x.transpose(-3, -2) if config.get("batch_first") else x


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grad_over_parameters_equals_nn_lstm(name):
    reference, ours = pair(**CONFIGS[name])
    params, x = params_of(reference), inputs(CONFIGS[name])
    assert_trees_close(grad(loss_of(ours))(params, x), grad(loss_of(reference))(params, x))
    # and over the input
    expected = grad(loss_of(reference), argnums=1)(params, x)
    assert_trees_close(grad(loss_of(ours), argnums=1)(params, x), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vjp_equals_nn_lstm(name):
    reference, ours = pair(**CONFIGS[name])
    params, x = params_of(reference), inputs(CONFIGS[name])
    results = []
    for module in (reference, ours):
        outputs, pullback = vjp(lambda p, x: functional_call(module, p, (x,)), params, x)
        cotangents = torch.utils._pytree.tree_map(lambda t: torch.ones_like(t) * 0.3, outputs)
        results.append((outputs, pullback(cotangents)))
    assert_trees_close(results[1], results[0])


def test_jacrev_equals_nn_lstm():
    reference, ours = pair()
    params, x = params_of(reference), inputs({})
    results = [jacrev(lambda w: functional_call(m, {**params, "weight_hh_l0": w}, (x,))[1][0])(
        params["weight_hh_l0"]) for m in (reference, ours)]
    assert results[1].shape == (1, 2, 5, 20, 5)  # d h_n / d weight_hh_l0
    assert_trees_close(results[1], results[0])


def test_second_derivative_equals_nn_lstm():
    # grad of (grad . v): differentiates the reference, as create_graph=True does
    reference, ours = pair()
    params, x = params_of(reference), inputs({})
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def hvp(module):
        inner = grad(loss_of(module))
        return grad(lambda p: sum((inner(p, x)[k] * v[k]).sum() for k in p))(params)
    assert_trees_close(hvp(ours), hvp(reference))


def test_functional_call_grads_reach_the_given_tensors():
    reference, ours = pair(num_layers=2)
    x = inputs({})
    given = [{k: p.clone().requires_grad_() for k, p in params_of(reference).items()}
             for _ in range(2)]
    for module, params in zip((reference, ours), given):
        loss_of(module)(params, x).backward()
    assert_trees_close({k: p.grad for k, p in given[1].items()},
                       {k: p.grad for k, p in given[0].items()})


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("grad_mode", [False, True])
def test_vmap_over_inputs_equals_a_loop(name, grad_mode):
    _, ours = pair(**CONFIGS[name])
    xs = inputs(CONFIGS[name], 4)
    with torch.set_grad_enabled(grad_mode):
        batched = vmap(ours)(xs)
        looped = [ours(x) for x in xs]
    expected = torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *looped)
    assert_trees_close(batched, expected)


def test_vmap_over_inputs_and_states_then_backward():
    # vmap inside ordinary training: the batched call is differentiable with .backward()
    reference, ours = pair(num_layers=2)
    xs = inputs({}, 3)
    h0 = torch.randn(3, 2, 2, 5, dtype=F64)
    results = []
    for module in (ours,):
        module.zero_grad()
        y, (h, c) = vmap(lambda x, h: module(x, (h, torch.zeros_like(h))))(xs, h0)
        (y.square().sum() + h.sum()).backward()
        results.append([y] + [p.grad.clone() for p in module.parameters()])
    reference.zero_grad()
    total = 0
    outputs = []
    for x, h in zip(xs, h0):
        y, (hn, _) = reference(x, (h, torch.zeros_like(h)))
        outputs.append(y)
        total = total + y.square().sum() + hn.sum()
    total.backward()
    expected = [torch.stack(outputs)] + [p.grad for p in reference.parameters()]
    assert_trees_close(results[0], expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_sample_gradients_equal_a_loop(name):
    # The DP-training pattern: vmap(grad(loss), in_dims=(None, 0)) over samples.
    reference, ours = pair(**CONFIGS[name])
    params = params_of(reference)
    xs = inputs(CONFIGS[name], 4)
    per_sample = vmap(grad(loss_of(ours)), in_dims=(None, 0))(params, xs)
    expected = [grad(loss_of(reference))(params, x) for x in xs]
    expected = {k: torch.stack([e[k] for e in expected]) for k in params}
    assert_trees_close(per_sample, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ensemble_over_stacked_parameters_equals_each_member(name):
    members = [lstm_ext.LSTM(3, 5, dtype=F64, **CONFIGS[name]) for _ in range(3)]
    stacked, buffers = stack_module_state(members)
    base = lstm_ext.LSTM(3, 5, dtype=F64, **CONFIGS[name])
    x = inputs(CONFIGS[name])
    outputs = vmap(lambda p, b: functional_call(base, (p, b), (x,)), in_dims=(0, 0))(stacked,
                                                                                   buffers)
    expected = torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *[m(x) for m in members])
    assert_trees_close(outputs, expected)
    # and its gradients with respect to every member's parameters
    loss = vmap(lambda p, b: loss_of(base)(p, x), in_dims=(0, 0))(stacked, buffers).sum()
    grads = torch.autograd.grad(loss, list(stacked.values()))
    for i, member in enumerate(members):
        member_grads = torch.autograd.grad(loss_of(member)(dict(member.named_parameters()), x),
                                           list(member.parameters()))
        for g, expected_g in zip(grads, member_grads):
            torch.testing.assert_close(g[i], expected_g, **TOL)


def test_cell_under_transforms():
    torch.manual_seed(0)
    reference, ours = nn.LSTMCell(3, 5, dtype=F64), lstm_ext.LSTMCell(3, 5, dtype=F64)
    ours.load_state_dict(reference.state_dict())
    params = params_of(reference)
    xs = torch.randn(4, 2, 3, dtype=F64)

    def loss(module):
        return lambda p, x: sum(t.square().sum() for t in functional_call(module, p, (x,)))
    assert_trees_close(grad(loss(ours))(params, xs[0]), grad(loss(reference))(params, xs[0]))
    per_sample = vmap(grad(loss(ours)), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        assert_trees_close({k: v[i] for k, v in per_sample.items()},
                           grad(loss(reference))(params, x))
    assert_trees_close(vmap(ours)(xs), tuple(torch.stack(t) for t in zip(*[ours(x) for x in xs])))


def test_functions_under_vmap():
    torch.manual_seed(0)
    weights = [torch.randn(20, 3, dtype=F64), torch.randn(20, 5, dtype=F64)]
    xs = torch.randn(4, 6, 2, 3, dtype=F64)
    h0 = torch.zeros(2, 5, dtype=F64)

    def run(x):
        return lstm_ext.lstm_layer(x, h0, h0, *weights)
    assert_trees_close(vmap(run)(xs), [torch.stack(t) for t in zip(*[run(x) for x in xs])])
    # directly through the op (no Function): its batching rule
    op = torch.ops.lstm_ext.lstm_cell
    cells = vmap(lambda x: op(x[0], h0, h0, *weights, None, None))(xs)
    assert_trees_close(cells, [torch.stack(t) for t in zip(
        *[op(x[0], h0, h0, *weights, None, None) for x in xs])])


def test_vmap_with_dropout_follows_the_randomness_flag():
    torch.manual_seed(0)
    model = lstm_ext.LSTM(3, 5, num_layers=2, dropout=0.5, dtype=F64).train()
    x = inputs({})
    xs = x.expand(3, *x.shape).contiguous()  # the same input 3 times
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(model)(xs)
    different = vmap(model, randomness="different")(xs)[0]
    same = vmap(model, randomness="same")(xs)[0]
    assert not torch.equal(different[0], different[1])
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    torch.manual_seed(5)
    same_again = vmap(model, randomness="same")(xs)[0]
    torch.manual_seed(5)
    assert torch.equal(same_again[0], model(x)[0])  # the masks of one unbatched call


# ---- the options beyond nn.LSTM: the eager module (its C++ node) is the reference ---------------

OPTION_CASES = {
    "reset": (dict(num_layers=2, bidirectional=True), True),
    "zoneout, training": (dict(num_layers=2, zoneout=(0.3, 0.2)), False),
    "zoneout, eval, projection": (dict(zoneout=0.3, proj_size=2), False),
    "recurrent dropout, training": (dict(recurrent_dropout=0.4, bidirectional=True), False),
    "layer_norm": (dict(num_layers=2, layer_norm=True), False),
    "all, training": (dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.3,
                           bidirectional=True, num_layers=2, dropout=0.3), True),
}


def option_case(name):
    """(model, forward's keyword arguments, whether a forward draws masks) of OPTION_CASES[name]."""
    kwargs, with_reset = OPTION_CASES[name]
    torch.manual_seed(0)
    model = lstm_ext.LSTM(3, 5, dtype=F64, **kwargs).train("training" in name)
    if "eval" in name:
        model.eval()
    reset = torch.rand(6, 2) < 0.3 if with_reset else None
    draws = "training" in name
    return model, ({"reset": reset} if with_reset else {}), draws


def option_loss(model, kwargs):
    def loss(params, x):
        y, (h, c) = functional_call(model, params, (x,), kwargs)
        return y.square().sum() + 0.5 * h.sum() + 0.25 * (c * c).sum()
    return loss


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_options_grad_and_vjp_equal_the_eager_module(name):
    model, kwargs, _ = option_case(name)
    params, x = params_of(model), inputs({})
    torch.manual_seed(3)  # the same masks in both runs: drawn in the same order
    grads = grad(option_loss(model, kwargs), argnums=(0, 1))(params, x)
    torch.manual_seed(3)
    given = {k: p.clone().requires_grad_() for k, p in params.items()}
    x_given = x.clone().requires_grad_()
    expected = torch.autograd.grad(option_loss(model, kwargs)(given, x_given),
                                   list(given.values()) + [x_given])
    assert_trees_close(grads[0], dict(zip(given, expected[:-1])))
    assert_trees_close(grads[1], expected[-1])
    torch.manual_seed(4)
    outputs, pullback = vjp(lambda p: functional_call(model, p, (x,), kwargs), params)
    torch.manual_seed(4)
    assert_trees_close(outputs, model(x, **kwargs))


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_options_vmap_and_per_sample_gradients_equal_a_loop(name):
    model, kwargs, draws = option_case(name)
    params, xs = params_of(model), inputs({}, 3)
    # with masks drawn, randomness="same": every item draws what one unbatched call draws
    randomness = "same" if draws else "error"

    def looped(fn):
        results = []
        for x in xs:
            torch.manual_seed(5)
            results.append(fn(x))
        return torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *results)
    torch.manual_seed(5)
    batched = vmap(lambda x: model(x, **kwargs), randomness=randomness)(xs)
    assert_trees_close(batched, looped(lambda x: model(x, **kwargs)))
    loss = option_loss(model, kwargs)
    torch.manual_seed(5)
    per_sample = vmap(grad(loss), in_dims=(None, 0), randomness=randomness)(params, xs)
    assert_trees_close(per_sample, looped(lambda x: grad(loss)(params, x)))
    if draws:  # and "different" folds the items into one call, each item its own masks
        different = vmap(lambda x: model(x, **kwargs), randomness="different")(
            xs[:1].expand(3, *xs.shape[1:]))[0]
        assert not torch.equal(different[0], different[1])


@pytest.mark.parametrize("name", ["reset", "zoneout, eval, projection", "layer_norm"])
def test_options_second_derivative_equals_create_graph(name):
    model, kwargs, _ = option_case(name)
    params, x = params_of(model), inputs({})
    v = {k: torch.randn_like(p) for k, p in params.items()}
    inner = grad(option_loss(model, kwargs))
    hvp = grad(lambda p: sum((inner(p, x)[k] * v[k]).sum() for k in p))(params)
    given = {k: p.clone().requires_grad_() for k, p in params.items()}
    first = torch.autograd.grad(option_loss(model, kwargs)(given, x), list(given.values()),
                                create_graph=True)
    expected = torch.autograd.grad(sum((g * v[k]).sum() for g, k in zip(first, given)),
                                   list(given.values()))
    assert_trees_close(hvp, dict(zip(given, expected)))


def test_options_second_derivative_with_masks_is_a_clear_error():
    model, kwargs, _ = option_case("zoneout, training")
    params, x = params_of(model), inputs({})
    inner = grad(option_loss(model, kwargs))
    with pytest.raises(NotImplementedError, match="second derivatives under torch.func "
                                                  "transforms with zoneout in training mode"):
        grad(lambda p: inner(p, x)["weight_hh_l0"].sum())(params)


@pytest.mark.parametrize("name", ["reset", "zoneout, training", "layer_norm"])
def test_options_jacrev_equals_the_eager_module(name):
    model, kwargs, _ = option_case(name)
    params, x = params_of(model), inputs({})

    def h_n(w):
        return functional_call(model, {**params, "weight_hh_l0": w}, (x,), kwargs)[1][0]
    torch.manual_seed(6)
    jacobian = jacrev(h_n)(params["weight_hh_l0"])
    torch.manual_seed(6)
    w = params["weight_hh_l0"].clone().requires_grad_()
    out = h_n(w)  # the same masks: the same seed, one forward
    rows = [torch.autograd.grad(out.reshape(-1)[i], w, retain_graph=True)[0]
            for i in range(out.numel())]
    torch.testing.assert_close(jacobian, torch.stack(rows).reshape(*out.shape, *w.shape), **TOL)
