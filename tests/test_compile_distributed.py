"""torch.compile (fullgraph, no graph breaks), torch.export, and DistributedDataParallel."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lstm_ext

# In a module the spawned processes can import (tests/ is on their sys.path; this file is not).
from lstm_testing import ddp_data, ddp_model, ddp_train, ddp_worker

F64 = torch.float64


class Model(torch.nn.Module):
    """An LSTM feeding a Linear head, reduced to a scalar that uses every output."""

    def __init__(self, **options):
        super().__init__()
        self.lstm = lstm_ext.LSTM(3, 5, **options)
        out = (options.get("proj_size") or 5) * (2 if options.get("bidirectional") else 1)
        self.head = torch.nn.Linear(out, 1)

    def forward(self, x, hx=None):
        y, (h, c) = self.lstm(x, hx)
        return self.head(y).sum() + h.square().sum() + c.sum()


def eager_and_compiled(model, backend, *inputs):
    """Loss and gradients (inputs first, then parameters), eager then compiled."""
    results = []
    for fn in (model, torch.compile(model, backend=backend, fullgraph=True)):
        torch._dynamo.reset()
        leaves = [t.detach().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        grads = torch.autograd.grad(loss, leaves + list(model.parameters()))
        results.append((loss, grads))
    return results


OPTIONS = [dict(), dict(num_layers=2, bidirectional=True, proj_size=2),
           dict(num_layers=3, batch_first=True, bias=False), dict(num_layers=2, dropout=0.3)]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_compile_fullgraph_aot_eager(options):
    """Dynamo traces the module and both autograd graphs without a break (fullgraph=True raises on
    any); the compiled forward and backward give eager's numbers."""
    torch.manual_seed(0)
    model = Model(**options).double().eval()  # eval: dropout (RNG) off, the rest unchanged
    x = torch.randn(4, 6, 3, dtype=F64)
    (loss, grads), (loss_c, grads_c) = eager_and_compiled(model, "aot_eager", x)
    assert torch.allclose(loss_c, loss, rtol=1e-12)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g_c, g, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_training_dropout_draws_eager_masks():
    """In training mode the op draws its dropout masks inside (nondeterministic_seeded): compiled
    and eager runs from the same seed draw the same masks, and give the same gradients."""
    model = Model(num_layers=3, dropout=0.4).double().train()
    x = torch.randn(4, 6, 3, dtype=F64)
    results = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        torch.manual_seed(7)
        loss = fn(x)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss, grads), (loss_c, grads_c) = results
    assert torch.allclose(loss_c, loss, rtol=1e-12)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g_c, g, rtol=1e-10, atol=1e-12)
    torch.manual_seed(8)
    assert not torch.allclose(model(x), loss)  # another seed, other masks


def test_compile_fullgraph_cell():
    """LSTMCell under torch.compile traces torch.ops.lstm_ext.lstm_cell (eager calls the typed
    binding): no graph break, eager's numbers."""
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(3, 5, dtype=F64)
    x = torch.randn(4, 3, dtype=F64)

    def loss(fn, x):
        h, c = fn(x)
        return h.square().sum() + c.sum()

    results = []
    for fn in (cell, torch.compile(cell, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        leaf = x.detach().requires_grad_()
        value = loss(fn, leaf)
        results.append((value, torch.autograd.grad(value, [leaf] + list(cell.parameters()))))
    (value, grads), (value_c, grads_c) = results
    assert torch.allclose(value_c, value, rtol=1e-12)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g_c, g, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_unbatched_with_state():
    torch.manual_seed(0)
    model = Model(num_layers=2, bidirectional=True).double()
    x = torch.randn(6, 3, dtype=F64)
    h0, c0 = torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    (loss, grads), (loss_c, grads_c) = eager_and_compiled(_WithState(model), "aot_eager", x, h0, c0)
    assert torch.allclose(loss_c, loss, rtol=1e-12)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g_c, g, rtol=1e-10, atol=1e-12)


class _WithState(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, h0, c0):
        return self.model(x, (h0, c0))


def test_compile_inductor_float32():
    """The default backend (Inductor) around the custom ops: same outputs and gradients."""
    torch.manual_seed(0)
    model = Model(num_layers=2, bidirectional=True, proj_size=2)
    x = torch.randn(7, 4, 3)
    (loss, grads), (loss_c, grads_c) = eager_and_compiled(model, "inductor", x)
    assert torch.allclose(loss_c, loss, rtol=1e-5)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g_c, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS[:3], ids=str)
def test_export_in_eval_mode(options):
    torch.manual_seed(0)
    model = Model(**options).eval()
    x = torch.randn(4, 6, 3)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "lstm_ext.lstm.default" in targets  # our op, kept whole in the program
    assert torch.allclose(program.module()(x), model(x), rtol=1e-6)
    x2 = torch.randn(4, 6, 3)  # the program is not tied to the example's values
    assert torch.allclose(program.module()(x2), model(x2), rtol=1e-6)


# ---- DistributedDataParallel ---------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_two_processes_equals_single_process():
    """2 CPU processes (gloo, loopback), each on half the batch, end with the parameters of one
    process trained on the whole batch."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "ddp.pt")
        mp.spawn(ddp_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
        ddp_state = torch.load(out_path, weights_only=True)
    single = ddp_model()
    ddp_train(single, *ddp_data())
    before = ddp_model().state_dict()
    for name, value in single.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} did not train"
        assert torch.allclose(ddp_state[name], value, rtol=1e-10, atol=1e-12), name


class Deployed(torch.nn.Module):
    """A float lstm_ext.LSTM feeding an int8 one (lstm_ext.quantized.LSTM) and a Linear head: both
    ops in one exported program."""

    def __init__(self):
        super().__init__()
        self.encoder = lstm_ext.LSTM(4, 8, num_layers=2)
        self.decoder = lstm_ext.quantize_dynamic(lstm_ext.LSTM(8, 6, bidirectional=True))
        self.head = torch.nn.Linear(12, 1)

    def forward(self, x):
        y, _ = self.encoder(x)
        y, _ = self.decoder(y)
        return self.head(y)


def test_aot_inductor_package_runs_as_eager(tmp_path):
    # torch.export, then AOTInductor: a .pt2 package that runs without the Python model (the
    # README's "Deploying on CPU"; about 30 s of C++ compilation).
    torch.manual_seed(0)
    model = Deployed().eval()
    x = torch.randn(10, 3, 4)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path / "model.pt2"))
        loaded = torch._inductor.aoti_load_package(path)
        assert torch.equal(loaded(x), model(x))
