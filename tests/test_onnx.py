"""ONNX export with both exporters (TorchScript's, and dynamo=True): standard ONNX LSTM nodes, and
the exported file run in ONNX Runtime gives the eager outputs (float32, 1e-5)."""

import io
import warnings

import pytest
import torch

import lstm_ext

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's

EXPORTERS = {"torchscript": dict(dynamo=False), "dynamo": dict(dynamo=True)}

CASES = {  # name: (module arguments, example inputs)
    "1 layer": (dict(), lambda: (torch.randn(6, 2, 3),)),
    "2 layers bidirectional": (dict(num_layers=2, bidirectional=True),
                               lambda: (torch.randn(6, 2, 3),)),
    "batch_first, no bias, given states": (
        dict(batch_first=True, bias=False),
        lambda: (torch.randn(2, 6, 3), (torch.randn(1, 2, 5), torch.randn(1, 2, 5)))),
    "3 layers, given states": (
        dict(num_layers=3), lambda: (torch.randn(6, 2, 3), (torch.randn(3, 2, 5),
                                                            torch.randn(3, 2, 5)))),
    "unbatched": (dict(num_layers=2), lambda: (torch.randn(6, 3),)),
    "projection": (dict(proj_size=2, num_layers=2), lambda: (torch.randn(6, 2, 3),)),
}


def export(model, args, exporter, **kwargs):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, **EXPORTERS[exporter], **kwargs)
    return buffer.getvalue()


def run_in_onnxruntime(model_bytes, args):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    leaves = torch.utils._pytree.tree_leaves(args)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), leaves)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def node_types(model_bytes):
    return {node.op_type for node in onnx.load_from_string(model_bytes).graph.node}


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("case", list(CASES))
def test_export_runs_in_onnxruntime_as_in_eager(case, exporter):
    kwargs, make_args = CASES[case]
    torch.manual_seed(0)
    model = lstm_ext.LSTM(3, 5, **kwargs).eval()
    args = make_args()
    model_bytes = export(model, args, exporter)
    if "proj_size" in kwargs:
        assert "LSTM" not in node_types(model_bytes)  # ONNX's LSTM has no projection
        assert {"MatMul", "Sigmoid", "Tanh"} <= node_types(model_bytes)
    else:
        assert "LSTM" in node_types(model_bytes)
        assert not any(t.startswith("lstm_ext") for t in node_types(model_bytes))
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(model(*args))
    actual = run_in_onnxruntime(model_bytes, args)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_cell_export(exporter):
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(3, 5).eval()
    args = (torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 5)))
    model_bytes = export(cell, args, exporter)
    assert not any(t.startswith("lstm_ext") for t in node_types(model_bytes))
    with torch.no_grad():
        expected = cell(*args)
    for a, e in zip(run_in_onnxruntime(model_bytes, args), expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_same_graph_as_nn_lstm_with_its_weights():
    """nn.LSTM's weights loaded into lstm_ext export to a model that runs like nn.LSTM's own."""
    torch.manual_seed(0)
    reference = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True).eval()
    ours = lstm_ext.LSTM(3, 5, num_layers=2, bidirectional=True).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(6, 2, 3)
    ours_out = run_in_onnxruntime(export(ours, (x,), "torchscript"), (x,))
    theirs = run_in_onnxruntime(export(reference, (x,), "torchscript"), (x,))
    for a, e in zip(ours_out, theirs):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_exported_lstm_takes_other_batches_and_lengths(exporter):
    # TorchScript's exporter keeps the sequence length dynamic; the dynamo exporter fixes it at
    # the example's, for nn.LSTM too (its aten::lstm translation reshapes to T), so only the
    # batch varies there.
    torch.manual_seed(0)
    model = lstm_ext.LSTM(3, 5, num_layers=2).eval()
    example = torch.randn(6, 2, 3)
    if exporter == "torchscript":
        dynamic = dict(input_names=["x"], dynamic_axes={"x": {0: "T", 1: "B"}})
        other = torch.randn(11, 4, 3)
    else:
        dynamic = dict(dynamic_shapes=({1: torch.export.Dim("B")},))
        other = torch.randn(6, 4, 3)
    model_bytes = export(model, (example,), exporter, **dynamic)
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(model(other))
    for a, e in zip(run_in_onnxruntime(model_bytes, (other,)), expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_projection_export_says_it_is_unrolled():
    model = lstm_ext.LSTM(3, 5, proj_size=2).eval()
    with pytest.warns(UserWarning, match="unrolled over the example input's sequence length"):
        torch.onnx.export(model, (torch.randn(4, 2, 3),), io.BytesIO(), dynamo=False)


def test_export_does_not_change_eager_or_torch_export():
    """Outside an ONNX export the module still calls lstm_ext's op: torch.export keeps it."""
    model = lstm_ext.LSTM(3, 5).eval()
    program = torch.export.export(model, (torch.randn(4, 2, 3),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "lstm_ext.lstm.default" in targets
