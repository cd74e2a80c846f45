"""The ways users transform an LSTM module: whatever weight getattr(module, name) gives at the call
is what lstm_ext computes with and what gradients flow to, as with nn.LSTM. Each case runs the same
transformation on nn.LSTM and lstm_ext.LSTM (same weights, float64) and compares outputs and the
gradients of the tensors the user trains."""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import lstm_ext

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def pair(cls=(nn.LSTM, lstm_ext.LSTM), *args, **kwargs):
    """(nn module, lstm_ext module) with the same float64 weights."""
    args = args or (3, 5)
    kwargs.setdefault("dtype", F64)
    torch.manual_seed(0)
    reference = cls[0](*args, **kwargs)
    ours = cls[1](*args, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def cell_pair():
    return pair((nn.LSTMCell, lstm_ext.LSTMCell), 3, 5)


def run(module, x, hx=None):
    """Output and states of a call, and the loss used for gradients."""
    out = module(x) if hx is None else module(x, hx)
    if isinstance(module, (nn.LSTMCell, lstm_ext.LSTMCell)):
        h, c = out
        return [h, c], h.square().sum() + 0.5 * c.sum()
    y, (h, c) = out
    return [y, h, c], y.square().sum() + 0.5 * h.sum() + 0.25 * c.sum()


def assert_same(reference, ours, x, leaves, hx=None):
    """Same outputs, and the same gradients of each module's `leaves(module)`."""
    results = []
    for module in (reference, ours):
        outputs, loss = run(module, x, hx)
        tensors = leaves(module)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        assert all(g is not None for g in grads), "a trained tensor got no gradient"
        results.append(outputs + list(grads))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, **TOL)


def all_parameters(module):
    return list(module.parameters())


X = lambda *shape: torch.randn(*shape, dtype=F64)  # noqa: E731


class Halve(nn.Module):
    def forward(self, weight):
        return 0.5 * weight


@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_register_parametrization(cls):
    reference, ours = pair() if cls == "LSTM" else cell_pair()
    name = "weight_hh_l0" if cls == "LSTM" else "weight_hh"
    for module in (reference, ours):
        parametrize.register_parametrization(module, name, Halve())
    x = X(4, 2, 3) if cls == "LSTM" else X(2, 3)
    assert_same(reference, ours, x, all_parameters)  # includes parametrizations...original


def test_orthogonal_recurrent_weight():
    reference, ours = pair((nn.LSTM, lstm_ext.LSTM), 4, 4)
    for module in (reference, ours):
        torch.nn.utils.parametrizations.orthogonal(module, "weight_hh_l0")
    ours.load_state_dict(reference.state_dict())
    assert_same(reference, ours, X(6, 2, 4), all_parameters)


def test_weight_norm():
    reference, ours = pair()
    for module in (reference, ours):
        torch.nn.utils.weight_norm(module, "weight_hh_l0")  # weight_g, weight_v and a pre-hook
    assert_same(reference, ours, X(4, 2, 3), all_parameters)
    names = [n for n, _ in ours.named_parameters()]
    assert "weight_hh_l0_g" in names and "weight_hh_l0_v" in names


def test_pruning():
    reference, ours = pair()
    for module in (reference, ours):
        prune.l1_unstructured(module, "weight_hh_l0", amount=0.5)
    assert_same(reference, ours, X(4, 2, 3), all_parameters)
    prune.remove(ours, "weight_hh_l0")  # and made permanent again
    prune.remove(reference, "weight_hh_l0")
    assert_same(reference, ours, X(4, 2, 3), all_parameters)


def test_weight_drop_deleted_then_assigned_each_call():
    # AWD-LSTM / fastai WeightDropout: the raw weight is a Parameter elsewhere; the module's own
    # weight is deleted and a dropped-out copy is assigned before every forward.
    reference, ours = pair()
    raws = []
    for module in (reference, ours):
        raw = nn.Parameter(module.weight_hh_l0.detach().clone())
        del module.weight_hh_l0
        raws.append(raw)
    for step in range(3):
        for module, raw in zip((reference, ours), raws):
            torch.manual_seed(step)
            module.weight_hh_l0 = nn.functional.dropout(raw, p=0.3, training=True)
        x = X(4, 2, 3)
        assert_same(reference, ours, x, lambda m: [raws[0] if m is reference else raws[1]])


def test_deleted_weight_tolerated_by_conversions_and_named_at_the_call():
    _, ours = pair()
    del ours.weight_hh_l0
    ours.to(torch.float32)
    ours.cpu()
    assert ours.all_weights[0][1] is None
    with pytest.raises(AttributeError, match="weight_hh_l0 is missing"):
        ours(torch.randn(4, 2, 3))
    ours.weight_hh_l0 = nn.Parameter(torch.randn(20, 5))
    assert ours(torch.randn(4, 2, 3))[0].shape == (4, 2, 5)


def test_plain_tensor_assigned_over_a_deleted_weight_is_used():
    reference, ours = pair()
    new = X(20, 5)
    for module in (reference, ours):
        del module.weight_hh_l0
        module.weight_hh_l0 = new
    assert_same(reference, ours, X(4, 2, 3), lambda m: list(m.parameters()))
    outputs, _ = run(ours, X(4, 2, 3))
    ours.weight_hh_l0 = torch.zeros(20, 5, dtype=F64)  # changed between calls
    reference.weight_hh_l0 = torch.zeros(20, 5, dtype=F64)
    assert_same(reference, ours, X(4, 2, 3), lambda m: list(m.parameters()))


@pytest.mark.parametrize("how", ["assign", "setattr", "data", "in place", "to"])
def test_weights_changed_between_calls(how):
    reference, ours = pair()
    x = X(4, 2, 3)
    run(ours, x)  # the module keeps its list of weights from this call
    for module in (reference, ours):
        if how == "assign":
            module.load_state_dict({k: v * 2 for k, v in module.state_dict().items()}, assign=True)
        elif how == "setattr":
            module.weight_ih_l0 = nn.Parameter(module.weight_ih_l0.detach() * 3)
        elif how == "data":
            module.weight_hh_l0.data = module.weight_hh_l0.data * -1
        elif how == "in place":
            with torch.no_grad():
                module.bias_ih_l0.add_(1.0)
        else:
            module.to(torch.float32).to(F64)
    assert_same(reference, ours, x, all_parameters)


def test_dataparallel_replica_uses_its_own_tensors():
    # nn.parallel.replicate gives each replica plain tensors, set as attributes of a shallow copy
    # whose _parameters is empty (needs GPUs to run for real; the replica's mechanics here).
    reference, ours = pair()
    replicas = []
    for module in (reference, ours):
        replica = module._replicate_for_data_parallel()
        for name, weight in module._parameters.items():
            setattr(replica, name, weight * 2)
        replicas.append(replica)
    x = X(4, 2, 3)
    torch.testing.assert_close(replicas[1](x)[0], replicas[0](x)[0], **TOL)
    torch.testing.assert_close(ours(x)[0], reference(x)[0], **TOL)  # the original is untouched


def test_functional_call_uses_the_given_tensors():
    reference, ours = pair(num_layers=2)
    x = X(4, 2, 3)
    zeros = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    out = torch.func.functional_call(ours, zeros, (x,))[0]
    assert out.abs().max() == 0  # all-zero weights: h stays 0
    given = {name: p.detach().clone().mul_(1.5).requires_grad_() for name, p in
             reference.named_parameters()}
    results = []
    for module in (reference, ours):
        y, (h, c) = torch.func.functional_call(module, given, (x,))
        grads = torch.autograd.grad(y.square().sum() + h.sum(), list(given.values()))
        results.append([y, h, c, *grads])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, **TOL)
    # afterwards the module's own weights are back
    torch.testing.assert_close(ours(x)[0], reference(x)[0], **TOL)


def test_functional_call_on_the_cell():
    reference, ours = cell_pair()
    given = {name: torch.randn_like(p) for name, p in reference.named_parameters()}
    x = X(2, 3)
    expected = torch.func.functional_call(reference, given, (x,))
    actual = torch.func.functional_call(ours, given, (x,))
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, **TOL)


def test_copies_and_pickles_keep_working_after_weight_changes():
    _, ours = pair()
    ours.weight_hh_l0 = nn.Parameter(ours.weight_hh_l0.detach() * 2)
    x = X(4, 2, 3)
    expected = ours(x)[0]
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        torch.testing.assert_close(clone(x)[0], expected, **TOL)
        with torch.no_grad():
            clone.weight_hh_l0.zero_()  # the copy has weights of its own
        assert not torch.equal(clone(x)[0], expected)
    torch.testing.assert_close(ours(x)[0], expected, **TOL)


def test_nothing_from_a_transform_is_held_after_its_call():
    _, ours = pair()
    given = {name: p.detach().clone() for name, p in ours.named_parameters()}
    torch.func.functional_call(ours, given, (X(4, 2, 3),))
    held = ours._kept_weights or []
    assert not any(any(w is g for g in given.values()) for w in held)


STEP_CHANGES = ["optimizer step", "in place through .data", "new Parameter", "dtype round trip",
                "parametrization", "functional_call"]


@pytest.mark.parametrize("how", STEP_CHANGES)
@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_step_by_step_calls_see_every_weight_change(cls, how):
    """Calls of one step at a time (what streaming and decoders do), with the weights changed
    between them in each way a user changes them: every call computes with the weights of that
    moment. (Nothing derived from the weights is kept between calls; a .data change bumps no
    version counter, so a kept copy would have missed it.)"""
    reference, ours = pair() if cls == "LSTM" else cell_pair()
    x = X(1, 2, 3) if cls == "LSTM" else X(2, 3)
    hidden = "weight_hh_l0" if cls == "LSTM" else "weight_hh"
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, ours)]
    for step in range(3):
        given = None
        for module, optimizer in zip((reference, ours), optimizers):
            if how == "optimizer step":
                optimizer.zero_grad()
                run(module, x)[1].backward()
                optimizer.step()
            elif how == "in place through .data":
                getattr(module, hidden).data.mul_(0.5)
            elif how == "new Parameter":
                setattr(module, hidden, nn.Parameter(getattr(module, hidden).detach() + 0.1))
            elif how == "dtype round trip":
                module.float().double()
            elif how == "parametrization" and step == 0:
                parametrize.register_parametrization(module, hidden, Halve())
            elif how == "functional_call":
                given = {k: v * (step + 2) for k, v in reference.state_dict().items()}
        if given is not None:
            expected = torch.func.functional_call(reference, given, (x,))
            actual = torch.func.functional_call(ours, given, (x,))
        else:
            expected, actual = reference(x), ours(x)
        torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_threads_calling_one_module(cls):
    """Several threads calling one module at once: each gets what a call alone gives."""
    import concurrent.futures

    _, ours = pair() if cls == "LSTM" else cell_pair()
    inputs = [X(1, 2, 3) if cls == "LSTM" else X(2, 3) for _ in range(8)]
    expected = [ours(x) for x in inputs]

    def call(i):
        return [ours(inputs[i]) for _ in range(20)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(len(inputs))))
    for i, outputs in enumerate(results):
        for output in outputs:
            torch.testing.assert_close(output, expected[i], rtol=0, atol=0)


class _WholeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = lstm_ext.LSTM(3, 8, num_layers=2)
        self.cell = lstm_ext.LSTMCell(8, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.cell(self.lstm(x)[0][-1])[0])


def test_a_whole_model_loads_with_the_readmes_safe_globals(tmp_path):
    """torch.save(model) / torch.load as the word-language-model example does: with
    weights_only (torch.load's default) lstm_ext's classes go in safe_globals beside the model's,
    as the README says; without them the load is refused, not silently wrong."""
    model = _WholeModel()
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "model.pt")
    with torch.serialization.safe_globals([_WholeModel, lstm_ext.LSTM, lstm_ext.LSTMCell,
                                           torch.nn.Linear]):
        loaded = torch.load(tmp_path / "model.pt")
    x = torch.randn(5, 2, 3)
    assert torch.equal(loaded(x), model(x))
