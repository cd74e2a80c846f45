"""The CUDA kernels' host loop (csrc/cuda/layer_host.h), run on the CPU.

tests/cuda_host_check.cpp compiles that header with plain loops in place of the gate kernels'
launches (the per-unit math, csrc/cuda/gate_pass.h, is the kernels' own). What it computes must
equal the CPU kernels' ops (lstm_ext::lstm_layer_forward and friends), which the other tests hold
to nn.LSTM: the same shapes and dtypes, and float64 values to rounding. This tests the CUDA path's
row bookkeeping (packed, reverse, projection, chunked inference, H = 0, missing gradients) on any
machine; tests/test_cuda.py runs the kernels themselves where a GPU is."""

import itertools
import os

import pytest
import torch
from torch.utils.cpp_extension import load

import lstm_ext  # noqa: F401  (registers the ops compared against)
from lstm_testing import FLOAT32_ERROR_FACTOR, FLOAT32_ULPS, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
ops = torch.ops.lstm_ext


@pytest.fixture(scope="module")
def host():
    try:
        import ninja  # noqa: F401  (torch.utils.cpp_extension.load builds with it)
    except ImportError:
        pytest.skip("needs ninja (pip install -r tests/requirements.txt)")
    return load(name="lstm_ext_cuda_host_check",
                sources=[os.path.join(ROOT, "tests", "cuda_host_check.cpp")],
                extra_cflags=["-O1"], verbose=False)


@pytest.fixture
def small_chunks(host):
    host.set_chunk_elements(1)  # one step per chunk
    yield host
    host.set_chunk_elements(1 << 24)


def weights(I, H, P, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.rand(*shape, generator=g, dtype=F64) * 2 - 1).to(dtype)  # noqa: E731
    proj = P != H
    return (r(4 * H, I), r(4 * H, P), r(4 * H) if bias else None, r(4 * H) if bias else None,
            r(P, H) if proj else None)


def layer_inputs(T, B, I, H, P, packed, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=F64).to(dtype)  # noqa: E731
    if packed:
        lengths = torch.linspace(T, 1, B).round().long()  # longest first, down to one step
        batch_sizes = torch.tensor([(lengths > t).sum().item() for t in range(T)])
        x = r(int(batch_sizes.sum()), I)
    else:
        batch_sizes, x = None, r(T, B, I)
    return x, r(B, P), r(B, H), batch_sizes


def assert_same(ours, theirs, dtype, summed_rows=1, ulps=8):
    """summed_rows: how many rows a 1-D result sums (its rounding grows with them); ulps: the
    roundings of the storage dtype allowed per sqrt(row)."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        if a.numel() == 0:
            continue
        if dtype == F64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"output {i}")
        else:  # the 16-bit GEMMs differ (MKL vs float32 sums): a few roundings of the storage dtype
            scale = b.float().abs().max().item() + 1e-3
            err = (a.float() - b.float()).abs().max().item()
            eps = torch.finfo(dtype).eps
            rows = b.shape[0] if b.dim() > 1 else summed_rows
            assert err <= ulps * eps * scale * max(1, rows ** 0.5), (
                i, err, scale)


def backward_args(fwd, x, h0, c0, w, batch_sizes, reverse, which, seed=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda t: torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)  # noqa: E731
    y, h_n, c_n, gates, cells = fwd
    grad_y = r(y) if "y" in which else None
    grad_h = r(h_n) if "h" in which else None
    grad_c = r(c_n) if "c" in which else None
    return (grad_y, grad_h, grad_c, x, h0, c0, w[0], w[1], w[4], batch_sizes, reverse, y, gates,
            cells)


CASES = list(itertools.product((False, True), (False, True), (False, True), (False, True)))


@pytest.mark.parametrize("packed,reverse,proj,bias", CASES,
                         ids=[f"packed={a},reverse={b},proj={c},bias={d}" for a, b, c, d in CASES])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_matches_the_cpu_kernels(host, packed, reverse, proj, bias, dtype):
    T, B, I, H = 7, 5, 3, 6
    P = 4 if proj else H
    w = weights(I, H, P, bias, dtype)
    x, h0, c0, batch_sizes = layer_inputs(T, B, I, H, P, packed, dtype)
    for keep_state in (False, True):  # the second, with the kept state, for the backward
        args = (x, h0, c0, *w, batch_sizes, reverse, keep_state)
        ours, theirs = host.layer_forward(*args), ops.lstm_layer_forward(*args)
        assert_same(ours, theirs, dtype)
    for which in ("yhc", "y", "hc", ""):
        for need_grad_input in (True, False):
            args = backward_args(theirs, x, h0, c0, w, batch_sizes, reverse, which)
            args = args + (need_grad_input,)
            assert_same(host.layer_backward(*args), ops.lstm_layer_backward(*args), dtype)


def variant_args(T, B, H, P, rows, dtype, variant, training, seed=3):
    """lstm_layer_forward's trailing arguments (reset, zoneout_c, zoneout_h, zoneout_mask_c,
    zoneout_mask_h, recurrent_mask) for one variant; rows: the input's leading shape."""
    g = torch.Generator().manual_seed(seed)
    reset = torch.rand(T, B, generator=g) < 0.3 if "reset" in variant else None
    p_c, p_h = (0.3, 0.4) if "zoneout" in variant else (0.0, 0.0)
    mask_c = mask_h = recurrent = None
    if "zoneout" in variant and training:
        mask_c = torch.rand(*rows, H, generator=g) < p_c
        mask_h = torch.rand(*rows, P, generator=g) < p_h
    if "recurrent" in variant:
        recurrent = ((torch.rand(B, P, generator=g) > 0.25).to(F64) / 0.75).to(dtype)
    return (reset, p_c, p_h, mask_c, mask_h, recurrent)


VARIANTS = ["reset", "zoneout", "recurrent", "reset+zoneout+recurrent"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("packed,reverse,proj", [(False, False, False), (True, True, True),
                                                 (False, True, True), (True, False, False)],
                         ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=str)
def test_reset_zoneout_and_recurrent_dropout_match_the_cpu_kernels(host, variant, training,
                                                                  packed, reverse, proj, dtype):
    """The host loop's reset, zoneout and recurrent dropout (ATen ops per step) against the CPU
    kernels' fused ones, which tests/test_reset.py and tests/test_regularize.py hold to nn.LSTM
    and the reference."""
    T, B, I, H = 7, 5, 3, 6
    P = 4 if proj else H
    w = weights(I, H, P, True, dtype)
    x, h0, c0, batch_sizes = layer_inputs(T, B, I, H, P, packed, dtype)
    extra = variant_args(T, B, H, P, x.shape[:-1], dtype, variant, training)
    for keep_state in (False, True):
        args = (x, h0, c0, *w, batch_sizes, reverse, keep_state, *extra)
        ours, theirs = host.layer_forward(*args), ops.lstm_layer_forward(*args)
        assert_same(ours, theirs, dtype)
    for which in ("yhc", "y", "c"):
        args = backward_args(theirs, x, h0, c0, w, batch_sizes, reverse, which)
        args = args + (True, *extra)
        assert_same(host.layer_backward(*args), ops.lstm_layer_backward(*args), dtype)


@pytest.mark.parametrize("packed,reverse", [(False, False), (True, False), (True, True)])
def test_inference_in_chunks_of_steps(small_chunks, packed, reverse):
    """Without keep_state the gates of one chunk of steps are held at a time (here one step)."""
    T, B, I, H = 9, 4, 3, 5
    w = weights(I, H, H, True, F64)
    x, h0, c0, batch_sizes = layer_inputs(T, B, I, H, H, packed, F64)
    args = (x, h0, c0, *w, batch_sizes, reverse, False)
    assert_same(small_chunks.layer_forward(*args), ops.lstm_layer_forward(*args), F64)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,B", [(3, 2), (40, 30)])
def test_hidden_size_zero_with_projection_gives_zeros(host, dtype, T, B):
    """Reachable only through the ops: H = 0 with a projection. The output and h_n are zeros,
    and so are the gradients of input and h0 (nothing depends on them), on both paths: never
    memory left unwritten."""
    I, P = 4, 2
    r = lambda *shape: torch.randn(*shape, dtype=F64).to(dtype)  # noqa: E731
    w = (r(0, I), r(0, P), None, None, r(P, 0))
    x, h0, c0 = r(T, B, I), r(B, P), r(B, 0)
    args = (x, h0, c0, *w, None, False, True)
    for out in (host.layer_forward(*args), ops.lstm_layer_forward(*args)):
        assert torch.equal(out[0], torch.zeros(T, B, P, dtype=dtype))
        assert torch.equal(out[1], torch.zeros(B, P, dtype=dtype))
        assert out[2].shape == (B, 0) and out[3].shape == (T, B, 0) and out[4].shape == (T, B, 0)
        assert out[3].dtype == out[4].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        bwd = backward_args(out, x, h0, c0, w, None, False, "yhc") + (True,)
        for grads in (host.layer_backward(*bwd), ops.lstm_layer_backward(*bwd)):
            assert torch.equal(grads[0], torch.zeros_like(x))
            assert torch.equal(grads[1], torch.zeros_like(h0))
            assert [tuple(g.shape) for g in grads[2:]] == [(B, 0), (0, I), (0, P), (0,), (P, 0)]


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_the_cpu_kernels(host, dtype, bias):
    B, I, H = 3, 4, 5
    w = weights(I, H, H, bias, dtype)
    x, hx, cx, _ = layer_inputs(1, B, I, H, H, False, dtype)
    x = x[0]
    args = (x, hx, cx, w[0], w[1], w[2], w[3])
    ours, theirs = host.cell_forward(*args), ops.lstm_cell_forward(*args)
    assert_same(ours, theirs, dtype)
    g = torch.Generator().manual_seed(3)
    for grad_h, grad_c in ((True, True), (True, False), (False, True)):
        bwd = (torch.randn(B, H, generator=g, dtype=F64).to(dtype) if grad_h else None,
               torch.randn(B, H, generator=g, dtype=F64).to(dtype) if grad_c else None,
               x, hx, cx, theirs[1], theirs[2], w[0], w[1], True)
        assert_same(host.cell_backward(*bwd), ops.lstm_cell_backward(*bwd), dtype)


def test_bad_arguments_get_the_ops_errors(host):
    w = weights(3, 4, 4, True, F64)
    x, h0, c0, _ = layer_inputs(2, 2, 3, 4, 4, False, F64)
    with pytest.raises(RuntimeError, match=r"h0 must have shape \[B, P\]"):
        host.layer_forward(x, h0[:1], c0, *w, None, False, True)


def ln_params(H, dtype, seed=4):
    """ln_weight_ih, ln_weight_hh [4H], ln_weight_c, ln_bias_c [H], away from their init (ones,
    zeros) so that each one's gradient path is seen."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n, mean: (mean + 0.3 * torch.randn(n, generator=g, dtype=F64)).to(dtype)  # noqa: E731
    return (r(4 * H, 1.0), r(4 * H, 1.0), r(H, 1.0), r(H, 0.0))


def assert_same_norms(ours, theirs, H, dtype):
    """The kept norms, without their 12 unused values per row (NormsRow, csrc/lstm_layer_norm.h),
    which neither kernel writes."""
    used = 8 * H + 4
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_same([ours[..., :used]], [theirs[..., :used]], dtype)


# (variant, training): each variant in training and eval; without one, eval is training's run
LN_VARIANTS = [("plain", True)] + [(v, training) for v in VARIANTS for training in (True, False)]
NO_VARIANT = (None, 0.0, 0.0, None, None, None)  # reset, zoneout_c, zoneout_h, the three masks


@pytest.mark.parametrize("variant,training", LN_VARIANTS,
                         ids=[f"{v}-{'train' if t else 'eval'}" for v, t in LN_VARIANTS])
@pytest.mark.parametrize("packed,reverse,proj,bias",
                         [(False, False, False, True), (True, True, True, True),
                          (False, True, True, False), (True, False, False, True)], ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_matches_the_cpu_kernels(host, variant, training, packed, reverse, proj,
                                            bias, dtype):
    """The CUDA path of layer_norm=True (layer_norm_host.h: ATen ops per step) against the fused
    CPU kernel, which tests/test_layer_norm.py holds to haste's equations and the reference: every
    output, the kept state, and all eleven gradients, with each variant."""
    T, B, I, H = 7, 5, 3, 6
    P = 4 if proj else H
    w = weights(I, H, P, bias, dtype)
    ln = ln_params(H, dtype)
    x, h0, c0, batch_sizes = layer_inputs(T, B, I, H, P, packed, dtype)
    extra = variant_args(T, B, H, P, x.shape[:-1], dtype, variant, training)
    for keep_state in (False, True):
        args = (x, h0, c0, *w, *ln, batch_sizes, reverse, keep_state, *extra)
        ours, theirs = host.ln_layer_forward(*args), ops.ln_lstm_layer_forward(*args)
        assert_same(ours[:5], theirs[:5], dtype)
        assert_same_norms(ours[5], theirs[5], H, dtype)
    y, h_n, c_n, gates, cells, norms = theirs
    g = torch.Generator().manual_seed(2)
    r = lambda t: torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)  # noqa: E731
    draws = []
    for which in ("yhc", "y", "c"):
        grads = (r(y) if "y" in which else None, r(h_n) if "h" in which else None,
                 r(c_n) if "c" in which else None)
        for need_grad_input in (True, False):
            args = (*grads, x, h0, c0, w[0], w[1], w[4], *ln, batch_sizes, reverse, y, gates,
                    cells, norms, need_grad_input, *extra)
            ours, theirs = host.ln_layer_backward(*args), ops.ln_lstm_layer_backward(*args)
            if dtype == torch.float32:
                # The two kernels normalise and sum in different orders at every step, the CPU
                # kernel's GEMMs in the order of the backend the seam picked for each product
                # (csrc/cpu/blas.h): each is held to the float64 result of the same saved state
                # instead, the host loop as accurate as the CPU kernel on average over the six
                # draws of gradients (single draws of float32 error vary 0.2-10x: lstm_testing).
                exact = ops.ln_lstm_layer_backward(*(
                    a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                    for a in args))
                draws.append([(rel_err(a, e), rel_err(b, e)) for a, b, e in
                              zip(ours, theirs, exact)])
            else:
                assert_same(ours, theirs, dtype, summed_rows=x.numel() // I, ulps=16)
    for k, errors in enumerate(zip(*draws)):  # float32: per output, (host, CPU kernel) per draw
        host_mean = sum(e[0] for e in errors) / len(errors)
        cpu_mean = sum(e[1] for e in errors) / len(errors)
        assert host_mean <= FLOAT32_ERROR_FACTOR * cpu_mean + FLOAT32_ULPS * 2.0 ** -23, (
            k, host_mean, cpu_mean)


@pytest.mark.parametrize("packed,reverse", [(False, False), (True, True)])
def test_layer_norm_inference_in_chunks_of_steps(small_chunks, packed, reverse):
    T, B, I, H = 9, 4, 3, 5
    w = weights(I, H, H, True, F64)
    ln = ln_params(H, F64)
    x, h0, c0, batch_sizes = layer_inputs(T, B, I, H, H, packed, F64)
    args = (x, h0, c0, *w, *ln, batch_sizes, reverse, False, *NO_VARIANT)
    ours, theirs = small_chunks.ln_layer_forward(*args), ops.ln_lstm_layer_forward(*args)
    assert_same(ours, theirs, F64)  # the kept state has no rows


def test_layer_norm_bad_arguments_get_the_ops_errors(host):
    w = weights(3, 4, 4, True, F64)
    ln = ln_params(4, F64)
    x, h0, c0, _ = layer_inputs(2, 2, 3, 4, 4, False, F64)
    with pytest.raises(RuntimeError, match=r"ln_weight_c must have shape \[H\]"):
        host.ln_layer_forward(x, h0, c0, *w, ln[0], ln[1], ln[2][:2], ln[3], None, False, True,
                              *NO_VARIANT)
    fwd = ops.ln_lstm_layer_forward(x, h0, c0, *w, *ln, None, False, True)
    with pytest.raises(RuntimeError, match=r"norms must have shape \[T, B, 8\*H \+ 16\]"):
        host.ln_layer_backward(fwd[0], None, None, x, h0, c0, w[0], w[1], None, *ln, None, False,
                               fwd[0], fwd[3], fwd[4], fwd[5][:, :, :-1], True, *NO_VARIANT)
