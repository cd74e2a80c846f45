"""PyTorch's own module-test inputs for nn.LSTM and nn.LSTMCell (torch.testing._internal's
module_db, what PyTorch's test_modules.py runs): every sample on lstm_ext's module gives nn's
outputs and gradients, and every error sample raises nn's exception type with nn's words."""

import re

import pytest
import torch
from torch import nn

import lstm_ext

common_modules = pytest.importorskip("torch.testing._internal.common_modules")

OURS = {nn.LSTM: lstm_ext.LSTM, nn.LSTMCell: lstm_ext.LSTMCell}
INFOS = {info.module_cls: info for info in common_modules.module_db if info.module_cls in OURS}


def samples(cls, training, errors=False, dtype=None):
    """The samples test_modules.py makes: float64 for outputs and gradients; for the errors, each
    dtype its test_errors runs (float32 and float64 inputs, the module at its default dtype, so
    a float64 sample also has the wrong dtype: nn reports the sizes first)."""
    info = INFOS[cls]
    make = info.module_error_inputs_func if errors else info.module_inputs_func
    return make(info, device="cpu", dtype=dtype or torch.float64, requires_grad=not errors,
                training=training)


CASES = [(cls, i) for cls in OURS for i in range(len(samples(cls, True)))]
ERROR_CASES = [(cls, i, dtype) for cls in OURS for dtype in (torch.float32, torch.float64)
               for i in range(len(samples(cls, True, errors=True, dtype=dtype)))]


def tensors_of(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls,index", CASES, ids=[f"{c.__name__}-{i}" for c, i in CASES])
def test_module_db_sample_matches_nn(cls, index, training):
    sample = samples(cls, training)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(0)
    reference = cls(*args, **kwargs).to(torch.float64).train(training)
    ours = OURS[cls](*args, **kwargs).to(torch.float64).train(training)
    ours.load_state_dict(reference.state_dict())
    results = []
    for module in (reference, ours):
        forward_args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else
                        tuple(t.detach().clone().requires_grad_() for t in a)
                        for a in sample.forward_input.args]
        outputs = tensors_of(module(*forward_args, **sample.forward_input.kwargs))
        inputs = tensors_of(forward_args) + list(module.parameters())
        loss = sum((o * (k + 1)).sum() for k, o in enumerate(outputs))
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        results.append(outputs + [g if g is not None else torch.zeros(()) for g in grads])
    assert len(results[0]) == len(results[1])
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    if sample.reference_fn is not None:  # the sample's own check: unbatched = a batch of one
        expected = tensors_of(sample.reference_fn(ours, *sample.forward_input.args))
        actual = tensors_of(ours(*sample.forward_input.args))
        for e, a in zip(expected, actual):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls,index,dtype", ERROR_CASES,
                         ids=[f"{c.__name__}-{i}-{d}" for c, i, d in ERROR_CASES])
def test_module_db_error_sample_raises_nns_error(cls, index, dtype):
    error = samples(cls, True, errors=True, dtype=dtype)[index]
    construct = error.module_error_input.constructor_input
    forward = error.module_error_input.forward_input
    with pytest.raises(error.error_type) as raised:
        module = OURS[cls](*construct.args, **construct.kwargs)
        assert error.error_on != common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR
        module(*forward.args, **forward.kwargs)
    assert re.search(error.error_regex, str(raised.value)), str(raised.value)
