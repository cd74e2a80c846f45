"""The CUDA kernels: the same checks as on the CPU, run where a GPU is visible (skipped without
one, so CI stays green; tools/check_torch.sh checks there that they compile and register). With a
GPU but a build without the CUDA kernels, every test fails (test_cuda_kernels_are_built says why):
a run that skipped them all would pass while checking nothing."""

import itertools

import pytest
import torch

import lstm_ext

from lstm_testing import assert_float32_close, assert_float64_equal, forward_backward
from test_parity_full import (INPUT_FORMS, P, float32_results, make_input, make_pair,
                              options_for, states, to_device)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(autouse=True)
def cuda_kernels_built():
    assert lstm_ext.build_info["cuda"], (
        f"a GPU is visible but lstm_ext was built without its CUDA kernels ({lstm_ext.build_info});"
        " rebuild where nvcc and a CUDA build of torch are found (setup.py prints its decision: "
        "pip install -v .)")

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
                                           r"\(lstm_ext::lstm_layer_forward: h0 is on cpu"):
        model(torch.randn(5, 2, 3, device=CUDA), (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)))


# ---- sizes beyond one block, streams, dropout, an empty batch, low precision -------------------

def _pair(dtype, device=CUDA, **options):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(dtype=dtype, **options)
    ext = lstm_ext.LSTM(dtype=dtype, **options)
    ext.load_state_dict(ref.state_dict())
    return ref.to(device), ext.to(device)


def test_float64_many_blocks_packed_bidirectional_projection():
    """H = 67, B = 9: every gate launch spans several blocks (all other cases fit in one)."""
    options = dict(input_size=10, hidden_size=67, num_layers=2, bidirectional=True, proj_size=23)
    ref, ext = _pair(F64, "cpu", **options)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([13, 7, 13, 1, 9, 4, 12, 2, 8])
    x = torch.nn.utils.rnn.pack_padded_sequence(
        torch.randn(13, 9, 10, generator=gen, dtype=F64), lengths, enforce_sorted=False)
    hx = (torch.randn(4, 9, 23, generator=gen, dtype=F64),
          torch.randn(4, 9, 67, generator=gen, dtype=F64))
    names, on_cpu = forward_backward(ext, x, hx)
    x_dev, hx_dev = to_device(x, CUDA), tuple(t.cuda() for t in hx)
    _, on_gpu = forward_backward(ext.cuda(), x_dev, hx_dev)
    _, theirs = forward_backward(ref.cuda(), x_dev, hx_dev)
    assert_float64_equal(names, [t.cpu() for t in on_gpu], on_cpu)
    assert_float64_equal(names, [t.cpu() for t in on_gpu], [t.cpu() for t in theirs])


def test_float32_large_against_cudnn():
    """(T, B, I, H) = (100, 64, 256, 256) in float32, TF32 off on both sides."""
    options = dict(input_size=256, hidden_size=256)
    ref32, ext32 = _pair(torch.float32, "cpu", **options)
    ref64 = torch.nn.LSTM(dtype=F64, **options)
    ref64.load_state_dict(ref32.state_dict())
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(100, 64, 256, generator=gen)
    hx = (torch.randn(1, 64, 256, generator=gen), torch.randn(1, 64, 256, generator=gen))
    names, exact = forward_backward(ref64, x.double(), tuple(t.double() for t in hx))
    x_dev, hx_dev = x.cuda(), tuple(t.cuda() for t in hx)
    _, theirs = forward_backward(ref32.cuda(), x_dev, hx_dev)
    _, ours = forward_backward(ext32.cuda(), x_dev, hx_dev)
    assert_float32_close(names, [t.cpu() for t in ours], [t.cpu() for t in theirs], exact)


def test_cell_against_nn_lstmcell():
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(7, 37, dtype=F64).cuda()
    ext = lstm_ext.LSTMCell(7, 37, dtype=F64).cuda()
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(9, 7, dtype=F64, device=CUDA, requires_grad=True)
    hx = tuple(torch.randn(9, 37, dtype=F64, device=CUDA, requires_grad=True) for _ in range(2))
    results = []
    for model in (ref, ext):
        hy, cy = model(x, hx)
        loss = (hy * torch.arange(37, device=CUDA)).sum() + cy.square().sum()
        results.append([hy, cy] + list(torch.autograd.grad(loss, [x, *hx, *model.parameters()])))
    names = [f"t{i}" for i in range(len(results[0]))]
    assert_float64_equal(names, [t.cpu() for t in results[1]], [t.cpu() for t in results[0]])


def test_non_default_stream():
    """Every launch and GEMM on the current stream: results on a side stream equal the default
    stream's, and are ready once that stream is synchronised."""
    _, ext = _pair(torch.float32, input_size=16, hidden_size=64, num_layers=2)
    x = torch.randn(50, 8, 16, device=CUDA)
    expected = ext(x)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ext(x)[0]
        out.sum().backward()
    stream.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ext.parameters())


def test_dropout_on_cuda():
    """Dropout between layers on the GPU: seeded runs repeat, eval mode keeps everything, and with
    p = 1 the second layer sees zeros (cuDNN draws its own masks, so not compared with it)."""
    _, ext = _pair(torch.float32, input_size=4, hidden_size=8, num_layers=2, dropout=0.5)
    x = torch.randn(6, 3, 4, device=CUDA)
    torch.manual_seed(3)
    first = ext.train()(x)[0]
    torch.manual_seed(3)
    again = ext(x)[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, ext.eval()(x)[0])
    ext.dropout = 1.0
    zero_input = lstm_ext.LSTM(8, 8).cuda()
    zero_input.load_state_dict({k.replace("_l1", "_l0"): v for k, v in ext.state_dict().items()
                                if "_l1" in k})
    expected = zero_input(torch.zeros(6, 3, 8, device=CUDA))[0]
    torch.testing.assert_close(ext.train()(x)[0], expected, rtol=1e-6, atol=1e-6)


def test_empty_batch():
    ref, ext = _pair(torch.float32, input_size=4, hidden_size=8, num_layers=2, bidirectional=True)
    x = torch.randn(5, 0, 4, device=CUDA, requires_grad=True)
    out, (h, c) = ext(x)
    assert out.shape == (5, 0, 16) and h.shape == c.shape == (4, 0, 8)
    (out.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ext.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_cudnn_error(dtype):
    """float16 / bfloat16 on the GPU: against float64 on the same rounded values, lstm_ext's error
    is at most twice cuDNN's own in that dtype (plus one unit of the dtype's precision)."""
    from test_lowp import EPS, relative_error, run

    torch.manual_seed(0)
    exact = torch.nn.LSTM(24, 64, num_layers=2, dtype=F64)
    with torch.no_grad():
        for p in exact.parameters():
            p.copy_(p.to(dtype).double())
    ours = lstm_ext.LSTM(24, 64, num_layers=2, dtype=dtype).cuda()
    theirs = torch.nn.LSTM(24, 64, num_layers=2, dtype=dtype).cuda()
    ours.load_state_dict(exact.state_dict())
    theirs.load_state_dict(exact.state_dict())
    x = torch.randn(40, 8, 24).to(dtype)
    reference = run(exact, x.double(), None)
    for ours_t, theirs_t, exact_t in zip(run(ours, x.cuda(), None), run(theirs, x.cuda(), None),
                                         reference):
        assert ours_t.dtype == theirs_t.dtype
        assert relative_error(ours_t.cpu(), exact_t) <= \
            2 * relative_error(theirs_t.cpu(), exact_t) + EPS[dtype]


def test_autocast_on_cuda():
    _, ext = _pair(torch.float32, input_size=8, hidden_size=16)
    cell = lstm_ext.LSTMCell(8, 16).cuda()
    x = torch.randn(5, 2, 8, device=CUDA)
    with torch.autocast("cuda", dtype=torch.float16):
        y = ext(x)[0]
        hy = cell(x[0])[0]
    assert y.dtype == hy.dtype == torch.float16  # as nn.LSTM and nn.LSTMCell on CUDA
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ext.parameters())


def test_inference_holds_one_chunk_of_gates():
    """Without autograd the forward projects the inputs chunk by chunk (as on the CPU): its peak
    memory is the output plus one chunk (64 MB), not every step's gates (here 512 MB)."""
    T, B, H = 2000, 64, 256
    _, ext = _pair(torch.float32, input_size=H, hidden_size=H)
    x = torch.randn(T, B, H, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = ext(x)[0]
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    all_gates = T * B * 4 * H * 4
    assert peak < out.numel() * 4 + 96 * 2**20 < all_gates, (peak, all_gates)


def test_hidden_size_zero_with_projection_gives_zeros():
    """H = 0 with a projection (only through the op): zeros, as on the CPU, not whatever the
    allocator's block held (filled with NaN first, so memory left unwritten would show)."""
    T, B, I, P = 3, 2, 4, 2
    args_cpu = (torch.randn(T, B, I, dtype=F64), torch.randn(B, P, dtype=F64),
                torch.randn(B, 0, dtype=F64), torch.randn(0, I, dtype=F64),
                torch.randn(0, P, dtype=F64), None, None, torch.randn(P, 0, dtype=F64))
    args = [t.cuda() if t is not None else None for t in args_cpu]
    torch.full((4096,), float("nan"), dtype=F64, device=CUDA)  # freed: the next block holds NaN
    out = torch.ops.lstm_ext.lstm_layer_forward(*args, None, False, True)
    expected = torch.ops.lstm_ext.lstm_layer_forward(*args_cpu, None, False, True)
    for ours, theirs in zip(out, expected):
        assert ours.shape == theirs.shape and torch.equal(ours.cpu(), theirs)
    assert torch.equal(out[0].cpu(), torch.zeros(T, B, P, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_kept_state_and_packed(dtype):
    """The kept gates and cells are float32 on the GPU too (the backward's op checks that), and a
    packed bidirectional projected LSTM in low precision is, against float64 on the same rounded
    values, at most twice as far off as our CPU kernels (plus one unit of the dtype)."""
    from test_lowp import EPS, relative_error

    options = dict(input_size=6, hidden_size=32, bidirectional=True, proj_size=7)
    _, exact = _pair(F64, "cpu", **options)
    with torch.no_grad():
        for p in exact.parameters():
            p.copy_(p.to(dtype).double())
    ext = lstm_ext.LSTM(dtype=dtype, **options)
    ext.load_state_dict(exact.state_dict())
    x = torch.randn(12, 5, 6).to(dtype)
    lengths = torch.tensor([12, 9, 9, 4, 1])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
    w = [p.detach().cuda() for p in ext.parameters()][:5]  # layer 0 forward, w_hr last
    h, c = torch.zeros(5, 7, dtype=dtype, device=CUDA), torch.zeros(5, 32, dtype=dtype, device=CUDA)
    kept = torch.ops.lstm_ext.lstm_layer_forward(packed.data.cuda(), h, c, *w,
                                                 packed.batch_sizes, False, True)
    assert kept[3].dtype == kept[4].dtype == torch.float32 and kept[0].dtype == dtype
    _, reference = forward_backward(exact, torch.nn.utils.rnn.pack_padded_sequence(
        x.double(), lengths), None)
    _, on_cpu = forward_backward(ext, packed, None)
    _, on_gpu = forward_backward(ext.cuda(), to_device(packed, CUDA), None)
    for gpu_t, cpu_t, exact_t in zip(on_gpu, on_cpu, reference):
        assert gpu_t.dtype == cpu_t.dtype == dtype
        assert relative_error(gpu_t.cpu(), exact_t) <= \
            2 * relative_error(cpu_t, exact_t) + EPS[dtype]


@pytest.mark.parametrize("options", [dict(bidirectional=True, proj_size=3),
                                     dict(num_layers=2)], ids=str)
def test_reset_zoneout_and_recurrent_dropout_on_cuda(options):
    """The module with all three on the GPU against the same module on the CPU. The masks come
    from each device's generator, so the forward is compared in eval (zoneout's expectation, no
    masks), and training is checked to run and to differentiate (gradcheck lives on the CPU)."""
    model = lstm_ext.LSTM(4, 6, zoneout=(0.2, 0.3), recurrent_dropout=0.25, dtype=F64,
                          **options)
    x = torch.randn(9, 3, 4, dtype=F64)
    reset = torch.rand(9, 3) < 0.3
    model.eval()
    gpu_model = model.cuda()
    out, (h_n, c_n) = gpu_model(x.cuda(), reset=reset.cuda())
    cpu_out, (cpu_h, cpu_c) = model.cpu()(x, reset=reset)
    assert torch.allclose(out.cpu(), cpu_out, rtol=1e-10, atol=1e-12)
    assert torch.allclose(c_n.cpu(), cpu_c, rtol=1e-10, atol=1e-12)
    gpu_model = model.cuda().train()
    out, (h_n, c_n) = gpu_model(x.cuda(), reset=reset.cuda())
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu_model.parameters())


@pytest.mark.parametrize("options", [dict(bidirectional=True, proj_size=3),
                                     dict(num_layers=2, zoneout=(0.2, 0.3),
                                          recurrent_dropout=0.25)], ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=str)
def test_layer_norm_on_cuda(options, dtype):
    """layer_norm=True on the GPU (csrc/cuda/layer_norm_host.h) against the same module on the
    CPU: outputs and every parameter's gradient, packed, with reset; in eval where zoneout's masks
    would differ (each device's generator), then training runs and differentiates."""
    torch.manual_seed(0)
    model = lstm_ext.LSTM(4, 6, layer_norm=True, dtype=dtype, **options)
    with torch.no_grad():  # gains and biases away from their init
        for name, p in model.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(9, 3, 4, dtype=F64).to(dtype)
    reset = torch.rand(9, 3) < 0.3
    model.eval()
    results = []
    for device in ("cpu", CUDA):
        m = model.to(device)
        m.zero_grad()
        out, (h_n, c_n) = m(x.to(device), reset=reset.to(device))
        (out.float().square().sum() + h_n.float().sum() + c_n.float().sum()).backward()
        results.append([out, h_n, c_n] + [p.grad for p in m.parameters()])
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == F64 else dict(rtol=0.05, atol=0.05)
    for gpu_t, cpu_t in zip(results[1], results[0]):
        torch.testing.assert_close(gpu_t.cpu(), cpu_t, **tol)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [9, 6, 2], enforce_sorted=False)
    cpu_out, _ = model.cpu()(packed)
    gpu_out, _ = model.to(CUDA)(to_device(packed, CUDA))
    torch.testing.assert_close(gpu_out.data.cpu(), cpu_out.data, **tol)
    gpu_model = model.to(CUDA).train()
    out, _ = gpu_model(x.to(CUDA), reset=reset.to(CUDA))
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu_model.parameters())
