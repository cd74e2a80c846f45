"""Shared helpers: run a model forward and backward, and compare results the way the tests agree on.

float64: lstm_ext must equal the reference to ~1e-10 relative.
float32: lstm_ext's error against a float64 reference must be within a small multiple of
torch.nn.LSTM's own float32 error against the same float64 reference (flash-attention's criterion).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstm_ext
from lstm_ext.reference import lstm_reference

FLOAT64_RTOL = 1e-10
# lstm_ext's float32 error may be at most this multiple of nn.LSTM's float32 error ...
FLOAT32_ERROR_FACTOR = 3.0
# ... plus this many float32 ulps of the result's scale (nn.LSTM's error can be exactly 0).
FLOAT32_ULPS = 8


def gradgradcheck_module(fn, inputs) -> bool:
    """gradgradcheck of a whole-module function in fast mode: the double backward (the reference
    recomputed under create_graph, csrc/autograd.cpp) checked along random directions, v' J u,
    rather than column by column. A full check of a 2-layer bidirectional model costs 20-30 s a
    case (minutes of CI for the eight cases); a wrong entry of the Jacobian still changes v' J u.
    The first derivative keeps its full gradcheck beside it; the cells keep full checks."""
    return torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute where expected is all zero)."""
    actual, expected = actual.double(), expected.double()
    if actual.numel() == 0:
        return 0.0
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


# (input, hidden), T, B, options, lengths (None: all T; else packed, unsorted): the paths of the
# 16-bit kernels, for the tests of reset, zoneout and recurrent dropout in those dtypes.
LOW_PRECISION_CONFIGS = [
    ((8, 32), 20, 4, dict(), None),  # the micro-kernel path (T >= 8, 4H a multiple of 16)
    ((7, 5), 12, 3, dict(bidirectional=True, proj_size=3), [12, 5, 9]),
    ((6, 16), 10, 3, dict(num_layers=2), None),
]


def assert_as_accurate(actual, yardstick, exact, dtype, float32_factor=FLOAT32_ERROR_FACTOR):
    """Each of `actual` (lstm_ext in a lower precision) is as close to `exact` (float64) as
    `yardstick` (nn.LSTM or the reference, in the same precision) is: float32 within
    float32_factor times the yardstick's error plus FLOAT32_ULPS ulps; the 16-bit dtypes
    within twice it plus one unit of the dtype."""
    if dtype == torch.float32:
        factor, slack = float32_factor, FLOAT32_ULPS * torch.finfo(torch.float32).eps
    else:
        factor, slack = 2.0, {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    for k, (a, y, e) in enumerate(zip(actual, yardstick, exact)):
        assert a.dtype == dtype, (k, a.dtype)
        assert rel_err(a, e) <= factor * rel_err(y, e) + slack, (k, rel_err(a, e), rel_err(y, e))


# A float32 error is one draw: which quantities land a few ulps from float64 depends on the data
# and on the order of every sum, which differs between CPUs (MKL's and oneDNN's AVX-512 and AVX2
# kernels block their sums differently). Measured over 20 draws (AMD EPYC, AVX2), lstm_ext's and
# the reference's float32 errors on one quantity have a median ratio of 0.9-1.1, yet single draws
# range from 0.2x to 10x, the large ratios where the yardstick happened to land within a few ulps;
# the mean over draws of each quantity's error stays within 2.1x. So tests of accuracy on data
# whose error is dominated by such luck (long sums, saturated gates, normalisations) compare the
# mean error over ACCURACY_DRAWS draws.
ACCURACY_DRAWS = 8


def assert_as_accurate_over_draws(draw, dtype, draws=ACCURACY_DRAWS,
                                  float32_factor=FLOAT32_ERROR_FACTOR):
    """draw(seed) -> (actual, yardstick, exact), as assert_as_accurate takes them, for seed in
    range(draws); each quantity's mean error over the draws is held to assert_as_accurate's
    bound on the yardstick's mean error."""
    if dtype == torch.float32:
        factor, slack = float32_factor, FLOAT32_ULPS * torch.finfo(torch.float32).eps
    else:
        factor, slack = 2.0, {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    errors = []  # per draw: [(actual's error, yardstick's error) per quantity]
    for seed in range(draws):
        actual, yardstick, exact = draw(seed)
        assert all(a.dtype == dtype for a in actual), [a.dtype for a in actual]
        errors.append([(rel_err(a, e), rel_err(y, e)) for a, y, e in zip(actual, yardstick, exact)])
    for k in range(len(errors[0])):
        mean_actual = sum(draw_errors[k][0] for draw_errors in errors) / draws
        mean_yardstick = sum(draw_errors[k][1] for draw_errors in errors) / draws
        assert mean_actual <= factor * mean_yardstick + slack, (
            f"quantity {k}: mean error over {draws} draws {mean_actual:.3e} > {factor} x the "
            f"yardstick's {mean_yardstick:.3e} + {slack:.1e}")


def round_through(dtype, modules, tensors):
    """The modules' parameters and the tensors rounded to dtype and back (in place / returned),
    so that a float64 run sees exactly the values a run in dtype does."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(p.to(dtype).to(p.dtype))
    return [t.to(dtype).to(t.dtype) for t in tensors]


def outputs_and_grads(run, model, x, h0, c0, reset, lengths, **kw):
    """run(model, x, h0, c0, reset, lengths, **kw) -> padded output [T, B, .], h_n, c_n; returns
    the output's valid rows (each row's first lengths[b] steps; all with lengths None), h_n, c_n,
    then the gradients of x, h0, c0 and every parameter of model for a fixed random loss."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, h0, c0)]
    out, h_n, c_n = run(model, *leaves, reset, lengths, **kw)
    gen = torch.Generator().manual_seed(7)
    valid = torch.ones(out.shape[:2], dtype=torch.bool)
    for b, n in enumerate(lengths or []):
        valid[n:, b] = False
    outputs = [out[valid], h_n, c_n]
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
               for o in outputs)
    return outputs + list(torch.autograd.grad(loss, leaves + list(model.parameters())))


# ---- runs of lstm_ext.LSTM with reset, zoneout, recurrent dropout, layer_norm, and of the reference
# with the masks the module drew: they come from torch's default generator in a fixed order (per
# layer, per direction: zoneout's c mask, its h mask, the recurrent dropout mask; then the dropout
# between layers), so drawn_masks redraws them from the same seed.

SEED = 1234


def bernoulli_mask(size, p):
    """A mask drawn as the module draws zoneout's (csrc/lstm_regularize.h)."""
    mask = torch.empty(size, dtype=torch.bool)
    torch.ops.lstm_ext.fill_bernoulli_mask_(mask, p)
    return mask


def drawn_masks(model, rows, batch, dtype):
    """The masks model's forward draws (in training) right after torch.manual_seed(SEED):
    (zoneout_masks, recurrent_masks, dropout_masks) as lstm_reference takes them."""
    torch.manual_seed(SEED)
    D = 2 if model.bidirectional else 1
    H, P = model.hidden_size, model.proj_size or model.hidden_size
    (p_c, p_h), p_r = model.zoneout, model.recurrent_dropout
    zoneout, recurrent, dropout = [], [], []
    for layer in range(model.num_layers):
        for _ in range(D):
            zoneout.append(bernoulli_mask([*rows, H], p_c) if p_c else None)
            zoneout.append(bernoulli_mask([*rows, P], p_h) if p_h else None)
            recurrent.append(torch.empty(batch, P, dtype=dtype).bernoulli_(1 - p_r).div_(1 - p_r)
                             if p_r else None)
        if model.dropout and layer < model.num_layers - 1:
            p = model.dropout
            dropout.append(torch.empty(*rows, D * P, dtype=dtype).bernoulli_(1 - p).div_(1 - p))
    return (zoneout if p_c or p_h else []), (recurrent if p_r else []), dropout


def make(sizes, T, B, options, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = lstm_ext.LSTM(*sizes, dtype=dtype, **options)
    with torch.no_grad():  # layer_norm's gains and biases away from their ones and zeros
        for name, p in model.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen).to(dtype))
    D = 2 if model.bidirectional else 1
    P = model.proj_size or model.hidden_size
    x = torch.randn(T, B, sizes[0], generator=gen).to(dtype)
    h0 = torch.randn(model.num_layers * D, B, P, generator=gen).to(dtype)
    c0 = torch.randn(model.num_layers * D, B, sizes[1], generator=gen).to(dtype)
    reset = torch.rand(T, B, generator=gen) < 0.2
    return model, x, h0, c0, reset


def ours(model, x, h0, c0, reset, lengths, **_):
    """lstm_ext after seeding, padded or packed (unsorted lengths) -> padded out, h_n, c_n."""
    torch.manual_seed(SEED)
    packed = lengths is not None
    if packed:
        x = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    out, (h_n, c_n) = model(x, (h0, c0), reset=reset)
    if packed:
        out, _ = pad_packed_sequence(out, total_length=len(reset))
    return out, h_n, c_n


def theirs(model, x, h0, c0, reset, lengths, mask_dtype=None):
    """lstm_reference with the masks the module drew (model.training) -> padded out, h_n, c_n.
    mask_dtype: the dtype the module drew the recurrent dropout mask in (default: x's)."""
    params = [getattr(model, n) for n in model._flat_weights_names]
    T, B = x.shape[:2]
    batch_sizes = order = None
    data = x
    if lengths is not None:  # the packed layout: rows of each step in order of length
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        batch_sizes, order = packed.batch_sizes, packed.sorted_indices
        data = torch.cat([x[t, order[:n]] for t, n in enumerate(batch_sizes.tolist())])
        h0, c0 = h0[:, order], c0[:, order]
        reset = reset[:, order]
    rows = (data.shape[0],) if lengths is not None else (T, B)
    zoneout, recurrent, dropout = (drawn_masks(model, rows, B, mask_dtype or x.dtype)
                                   if model.training else ([], [], []))
    recurrent = [m if m is None else m.to(x.dtype) for m in recurrent]
    dropout = [m.to(x.dtype) for m in dropout]
    out, h_n, c_n = lstm_reference(data, h0, c0, params, model.bias, model.proj_size > 0,
                                   model.num_layers, model.bidirectional, batch_sizes, dropout,
                                   zoneout, recurrent, reset, *model.zoneout,
                                   layer_norm=getattr(model, "layer_norm", False))
    if lengths is not None:
        padded = out.new_zeros(T, B, out.shape[-1])
        start = 0
        for t, n in enumerate(batch_sizes.tolist()):
            padded[t, order[:n]] = out[start:start + n]
            start += n
        inverse = torch.argsort(order)
        out, h_n, c_n = padded, h_n[:, inverse], c_n[:, inverse]
    return out, h_n, c_n



def forward_backward(model, x, hx, grad_seed=1234):
    """Run model(x, hx), backprop fixed random gradients of (output, h_n, c_n).

    x may be a PackedSequence: its data is then the input differentiated, and the output's data
    the output compared. Returns (names, tensors): output, h_n, c_n, then the gradients of input,
    h0, c0 (when given) and of every parameter.
    """
    packed = isinstance(x, PackedSequence)
    # detach() keeps the strides (clone() would densify an expanded tensor).
    leaf = (x.data if packed else x).detach().requires_grad_()
    model_input = (PackedSequence(leaf, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
                   if packed else leaf)
    inputs, names = [leaf], ["grad input"]
    if hx is not None:
        hx = tuple(t.detach().requires_grad_() for t in hx)
        inputs += list(hx)
        names += ["grad h0", "grad c0"]
    params = list(model.named_parameters())
    inputs += [p for _, p in params]
    names += [f"grad {n}" for n, _ in params]
    out, (h_n, c_n) = model(model_input, hx) if hx is not None else model(model_input)
    out = out.data if packed else out
    gen = torch.Generator().manual_seed(grad_seed)  # on the CPU: the same numbers on any device
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
             for t in (out, h_n, c_n)]
    results = torch.autograd.grad((out, h_n, c_n), inputs, grads, allow_unused=False)
    return ["output", "h_n", "c_n"] + names, [out, h_n, c_n, *results]


def assert_float64_equal(names, actual, expected, rtol=FLOAT64_RTOL):
    worst = 0.0
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, f"{name}: shape {list(a.shape)} != {list(e.shape)}"
        err = rel_err(a, e)
        worst = max(worst, err)
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"
    return worst


def assert_float32_close(names, ext32, torch32, ref64):
    """ext32's error vs ref64 is at most FLOAT32_ERROR_FACTOR x torch32's error (+ a few ulps)."""
    eps = torch.finfo(torch.float32).eps
    worst = 0.0
    for name, a, t, r in zip(names, ext32, torch32, ref64):
        assert a.dtype == torch.float32, f"{name}: dtype {a.dtype}"
        ext_err, torch_err = rel_err(a, r), rel_err(t, r)
        worst = max(worst, ext_err)
        bound = FLOAT32_ERROR_FACTOR * torch_err + FLOAT32_ULPS * eps
        assert ext_err <= bound, (f"{name}: lstm_ext float32 error {ext_err:.3e} > {bound:.3e} "
                                  f"(nn.LSTM float32 error {torch_err:.3e})")
    return worst


# ---- DistributedDataParallel helpers (spawned processes import them from here) -----------------

DDP_STEPS, DDP_BATCH = 3, 8


def ddp_data():
    gen = torch.Generator().manual_seed(5)
    return (torch.randn(6, DDP_BATCH, 3, generator=gen, dtype=torch.float64),
            torch.randn(6, DDP_BATCH, 1, generator=gen, dtype=torch.float64))


class DDPModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import lstm_ext
        self.lstm = lstm_ext.LSTM(3, 5, num_layers=2, bidirectional=True)
        self.head = torch.nn.Linear(10, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def ddp_model():
    torch.manual_seed(0)
    return DDPModel().double()


def ddp_train(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def ddp_worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(ddp_model())
        x, y = ddp_data()
        half = DDP_BATCH // world
        rows = slice(rank * half, (rank + 1) * half)
        ddp_train(model, x[:, rows], y[:, rows])
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
        # Leave together: a rank that tears gloo down while its peer is still in a collective or
        # still saving can make the peer abort.
        dist.barrier()
        del model
    finally:
        dist.destroy_process_group()
    # Leave without finalizing the interpreter. In torch 2.13 a gloo worker thread can still be
    # releasing its last Work when the process exits; the Work's ThreadLocalState holds a Python
    # contextvars.Context, whose decref then waits for the GIL of a finalizing interpreter, the
    # thread is unwound through a noexcept destructor and std::terminate aborts the process
    # ("terminate called without an active exception", about 1 run in 10 here). The file is
    # written and closed, and there is nothing else to clean up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- reset: the yardstick of a restart (tests/test_reset.py, tests/test_quantized.py) ----------

def pieces(row_reset, length):
    """[(start, end)) of one row's sequences: it restarts where row_reset[t] (t > 0)."""
    starts = [0] + [t for t in range(1, length) if row_reset[t]]
    return list(zip(starts, starts[1:] + [length]))


def split_run(model, x, h0, c0, reset, lengths):
    """nn.LSTM on each piece of each row: padded output [T, B, D*P] (zeros past a row's length),
    h_n, c_n. A reverse direction's h_n is the state at time 0, the end of its first piece."""
    T, B = reset.shape
    D = 2 if model.bidirectional else 1
    P = model.proj_size or model.hidden_size
    columns, h_n, c_n = [], [], []
    for b in range(B):
        outputs, last_h, last_c, first_h, first_c = [], None, None, None, None
        for start, end in pieces(reset[:, b], lengths[b]):
            out, (h, c) = model(x[start:end, b:b + 1], (h0[:, b:b + 1], c0[:, b:b + 1]))
            outputs.append(out)
            if first_h is None:
                first_h, first_c = h, c
            last_h, last_c = h, c
        pad = x.new_zeros(T - lengths[b], 1, D * P)
        columns.append(torch.cat(outputs + [pad]))
        # per layer: the forward direction ends with the last piece, the reverse with the first
        pick = [(last_h, last_c) if i % D == 0 else (first_h, first_c)
                for i in range(model.num_layers * D)]
        h_n.append(torch.stack([h[i] for i, (h, _) in enumerate(pick)]))
        c_n.append(torch.stack([c[i] for i, (_, c) in enumerate(pick)]))
    return torch.cat(columns, 1), torch.cat(h_n, 1), torch.cat(c_n, 1)
