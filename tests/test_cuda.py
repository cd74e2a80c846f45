"""The CUDA kernels: the same checks as on the CPU, run where a GPU and a CUDA build are present
(skipped elsewhere, so CI without a GPU stays green; tools/check_torch.sh checks that they
compile and register)."""

import itertools

import pytest
import torch

import lstm_ext

from lstm_testing import assert_float32_close, assert_float64_equal, forward_backward
from test_parity_full import (INPUT_FORMS, P, float32_results, make_input, make_pair,
                              options_for, states, to_device)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and lstm_ext.build_info["cuda"]),
    reason="needs a GPU and lstm_ext built with CUDA kernels")

F64 = torch.float64
CUDA = "cuda"
ARCHITECTURES = [dict(num_layers=layers, bidirectional=bi, proj_size=proj, bias=bias)
                 for layers, bi, proj, bias in itertools.product((1, 2), (False, True), (0, P),
                                                                 (True, False))]


@pytest.mark.parametrize("form", INPUT_FORMS)
@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=str)
def test_float64_against_nn_lstm_and_our_cpu_op(architecture, form):
    options = options_for(architecture, form)
    ref, ext = make_pair(F64, **options)
    x, batch = make_input(form, F64)
    hx = states(options, batch, F64)
    names, on_cpu = forward_backward(ext, x, hx)
    _, on_gpu = forward_backward(ext.cuda(), to_device(x, CUDA), tuple(t.cuda() for t in hx))
    _, theirs = forward_backward(ref.cuda(), to_device(x, CUDA), tuple(t.cuda() for t in hx))
    assert_float64_equal(names, [t.cpu() for t in on_gpu], on_cpu)
    assert_float64_equal(names, [t.cpu() for t in on_gpu], [t.cpu() for t in theirs])


@pytest.mark.parametrize("form", ["batched", "packed_unsorted"])
@pytest.mark.parametrize("architecture", ARCHITECTURES[::3], ids=str)
def test_float32_within_cudnn_error(architecture, form):
    """lstm_ext's float32 error on the GPU is within a small multiple of cuDNN's own."""
    assert_float32_close(*float32_results(architecture, form, CUDA))


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 GEMMs in float32 on both sides (no TF32), so the comparison is like for like."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_gradcheck_on_cuda():
    torch.manual_seed(0)
    for args in [(4, 3, 2, 5, None), (3, 2, 2, 3, torch.tensor([2, 1, 1]))]:
        T, B, I_, H_, batch_sizes = args
        N = T * B if batch_sizes is None else int(batch_sizes.sum())
        shape = (T, B, I_) if batch_sizes is None else (N, I_)
        tensors = [torch.randn(shape), torch.randn(B, H_), torch.randn(B, H_),
                   torch.randn(4 * H_, I_) * 0.5, torch.randn(4 * H_, H_) * 0.5,
                   torch.randn(4 * H_), torch.randn(4 * H_)]
        tensors = [t.to(CUDA, F64).requires_grad_() for t in tensors]
        for reverse in (False, True):
            fn = lambda *a: lstm_ext.lstm_layer(*a, None, batch_sizes, reverse)  # noqa
            assert torch.autograd.gradcheck(fn, tensors)
    cell_args = [torch.randn(s, device=CUDA, dtype=F64, requires_grad=True)
                 for s in ((3, 2), (3, 4), (3, 4), (16, 2), (16, 4), (16,), (16,))]
    assert torch.autograd.gradcheck(lstm_ext.lstm_cell, cell_args)


@pytest.mark.parametrize("keep_state", [True, False])
def test_opcheck_on_cuda(keep_state):
    ops = torch.ops.lstm_ext
    x, h, c = (torch.randn(s, device=CUDA) for s in ((5, 3, 4), (3, 6), (3, 6)))
    w_ih, w_hh, b = torch.randn(24, 4, device=CUDA), torch.randn(24, 6, device=CUDA), \
        torch.randn(24, device=CUDA)
    args = [x, h, c, w_ih, w_hh, b, b, None, None, False]
    torch.library.opcheck(ops.lstm_layer_forward.default, args + [keep_state])
    out, h_n, c_n, gates, cells = ops.lstm_layer_forward(*args, True)
    torch.library.opcheck(ops.lstm_layer_backward.default,
                          [torch.randn_like(out), None, torch.randn_like(c_n), x, h, c, w_ih, w_hh,
                           None, None, False, out, gates, cells])
    torch.library.opcheck(ops.lstm_cell_forward.default, [x[0], h, c, w_ih, w_hh, b, b])
    # the differentiable ops (C++ autograd over the CUDA kernels), forward and backward
    grad_args = [t.detach().requires_grad_() if t is not None else None for t in args[:8]]
    torch.library.opcheck(ops.lstm_layer.default, grad_args + [None, False])
    torch.library.opcheck(ops.lstm_cell.default, [x[0].detach().requires_grad_()] + grad_args[1:7])
    hy, cy, g = ops.lstm_cell_forward(x[0], h, c, w_ih, w_hh, b, b)
    torch.library.opcheck(ops.lstm_cell_backward.default,
                          [torch.randn_like(hy), None, x[0], h, c, cy, g, w_ih, w_hh])


def test_compile_fullgraph_on_cuda():
    torch.manual_seed(0)
    model = lstm_ext.LSTM(3, 8, num_layers=2, bidirectional=True).cuda()
    x = torch.randn(6, 4, 3, device=CUDA)
    eager = model(x)[0]
    compiled = torch.compile(model, fullgraph=True)(x)[0]
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


def test_module_moves_and_device_errors():
    model = lstm_ext.LSTM(3, 8).to("cuda")
    assert all(p.is_cuda for p in model.parameters())
    out, (h, c) = model(torch.randn(5, 2, 3, device=CUDA))
    assert out.is_cuda and h.is_cuda and c.is_cuda
    cell = lstm_ext.LSTMCell(3, 8).cuda()
    assert cell(torch.randn(2, 3, device=CUDA))[0].is_cuda
    # nn.LSTM's words first, then ours
    with pytest.raises(RuntimeError, match=r"^Input and parameter tensors are not at the same "
                                           r"device, found input tensor at cpu and parameter "
                                           r"tensor at cuda:0 \(.*input is on cpu but weight_ih "
                                           r"is on cuda"):
        model(torch.randn(5, 2, 3))
    with pytest.raises(RuntimeError, match=r"^Input and hidden tensors are not at the same device, "
                                           r"found input tensor at cuda:0 and hidden tensor at cpu "
                                           r"\(lstm_ext.LSTM: hx\[0\] \(h_0\)\)"):
        model(torch.randn(5, 2, 3, device=CUDA), (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)))
