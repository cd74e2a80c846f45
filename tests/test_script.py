"""torch.jit.script of lstm_ext.LSTM / LSTMCell and of models holding them (lstm_ext/_script.py):
eager's outputs and gradients, the same state_dict, and torch.jit.save / load across processes."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import lstm_ext


@pytest.fixture(autouse=True)
def quiet_deprecation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        yield


class Model(torch.nn.Module):
    """A model as users script them: an LSTM stack, a cell on its last output, a head."""

    def __init__(self):
        super().__init__()
        self.lstm = lstm_ext.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4,
                                  batch_first=True)
        self.cell = lstm_ext.LSTMCell(8, 5, bias=False)
        self.head = torch.nn.Linear(5, 1)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        hy, cy = self.cell(y[:, -1])
        return self.head(hy) + c.sum()


def leaves(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def assert_same_outputs_and_gradients(eager, scripted, *inputs):
    results = []
    for module in (eager, scripted):
        module.zero_grad()
        outputs = leaves(module(*inputs))
        sum((o * (k + 1)).sum() for k, o in enumerate(outputs)).backward()
        results.append(outputs + [p.grad.clone() for p in module.parameters()])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_a_model_holding_both_modules_scripts_with_eager_results():
    torch.manual_seed(0)
    model = Model()
    scripted = torch.jit.script(model)
    assert sorted(scripted.state_dict()) == sorted(model.state_dict())
    assert_same_outputs_and_gradients(model, scripted, torch.randn(2, 6, 3))


@pytest.mark.parametrize("options", [
    dict(), dict(num_layers=3, dropout=0.0), dict(batch_first=True, bias=False),
    dict(layer_norm=True), dict(zoneout=(0.1, 0.2)), dict(recurrent_dropout=0.3),
    dict(proj_size=3, bidirectional=True)], ids=str)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_lstm_options(options, batched, with_state):
    torch.manual_seed(0)
    model = lstm_ext.LSTM(4, 6, **options).eval()  # eval: zoneout and dropout without masks
    scripted = torch.jit.script(model)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    lead = (layers, 3) if batched else (layers,)
    shape = ((3, 5, 4) if options.get("batch_first") else (5, 3, 4)) if batched else (5, 4)
    x = torch.randn(shape)
    inputs = [x]
    if with_state:
        inputs.append((torch.randn(*lead, options.get("proj_size") or 6), torch.randn(*lead, 6)))
    assert_same_outputs_and_gradients(model, scripted, *inputs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_cell(bias, batched):
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(4, 7, bias=bias)
    scripted = torch.jit.script(cell)
    x = torch.randn(3, 4) if batched else torch.randn(4)
    state = (torch.randn(3, 7), torch.randn(3, 7)) if batched else (torch.randn(7), torch.randn(7))
    assert_same_outputs_and_gradients(cell, scripted, x, state)
    assert_same_outputs_and_gradients(cell, scripted, x)


def test_training_mode_runs_the_same_op():
    """Dropout between layers draws from the same generator in the same op: the same numbers."""
    model = lstm_ext.LSTM(4, 6, num_layers=2, dropout=0.5).train()
    scripted = torch.jit.script(model)
    x = torch.randn(5, 3, 4)
    torch.manual_seed(1)
    eager_out = model(x)[0]
    torch.manual_seed(1)
    assert torch.equal(scripted(x)[0], eager_out)


class Holder(torch.nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0]


def test_scripted_errors_are_nns():
    """A scripted model's errors have a scripted nn module's type and words (TorchScript raises
    a Python `raise` as torch.jit.Error, an op's error as RuntimeError). A scripted nn.LSTM is
    called inside a model (called alone it has no forward)."""
    for ours, theirs, x in ((lstm_ext.LSTMCell(10, 20), torch.nn.LSTMCell(10, 20), [3, 11]),
                            (Holder(lstm_ext.LSTM(10, 20)), Holder(torch.nn.LSTM(10, 20)),
                             [5, 3, 11])):
        x = torch.randn(x)
        with pytest.raises(Exception) as expected:
            torch.jit.script(theirs)(x)
        words = str(expected.value).strip().splitlines()[-1].split("Error: ", 1)[-1]
        with pytest.raises(expected.type) as raised:
            torch.jit.script(ours)(x)
        assert words in str(raised.value), (words, str(raised.value))


def test_parametrized_weights_are_refused_clearly():
    model = lstm_ext.LSTM(4, 6)
    torch.nn.utils.parametrizations.weight_norm(model, "weight_hh_l0")
    with pytest.raises(RuntimeError, match="needs plain nn.Parameter weights; weight_hh_l0 is "
                                           "parametrized"):
        torch.jit.script(model)


def test_saved_and_loaded_in_a_new_process(tmp_path):
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 6, 3)
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.pt"))
    torch.save({"x": x, "y": model(x)}, str(tmp_path / "io.pt"))
    code = ("import sys, torch, lstm_ext\n"
            "model = torch.jit.load(sys.argv[1])\n"
            "io = torch.load(sys.argv[2])\n"
            "print(torch.equal(model(io['x']), io['y']))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt"),
                           str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
