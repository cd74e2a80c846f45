"""lstm_ext.quantized (int8 inference) and lstm_ext.quantize_dynamic: accuracy against torch's own
int8 LSTM on the same float model, every input form of nn.LSTM, the conversions, state_dict,
torch.compile / torch.export, and the errors."""

import copy
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_ext
from lstm_ext import quantized
from lstm_testing import split_run

F32 = torch.float32


class Holder(nn.Module):
    """torch.ao's quantize_dynamic swaps submodules only, never the model it is given."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, hx=None):
        return self.lstm(x, hx)


def torch_int8(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        return torch.ao.quantization.quantize_dynamic(Holder(model), {nn.LSTM},
                                                      dtype=torch.qint8).lstm


def float_model(I, H, seed=0, weight_scale=1.0, **options):
    torch.manual_seed(seed)
    model = nn.LSTM(I, H, **options).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    return model


def errors(actual, expected):
    diff = (actual - expected).abs()
    return diff.max().item(), diff.mean().item()


# (I, H, T, B, weight scale, options): the accuracy grid. T = 1000: drift over a long sequence;
# weight scale 5: saturated gates; B = 1: one row per step.
GRID = [
    (16, 32, 50, 4, 1.0, dict()),
    (64, 128, 100, 8, 1.0, dict()),
    (8, 32, 1000, 2, 1.0, dict()),
    (16, 32, 50, 4, 5.0, dict()),
    (16, 32, 30, 3, 1.0, dict(num_layers=2, bidirectional=True)),
    (1, 16, 20, 5, 1.0, dict()),
    (128, 128, 100, 1, 1.0, dict()),
]


@pytest.mark.parametrize("I,H,T,B,weight_scale,options", GRID, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_as_accurate_as_torch_int8_lstm(I, H, T, B, weight_scale, options, seed):
    # Against the float32 model: the mean error at most torch's int8 LSTM's, the largest at most
    # 1.25x its (one draw's largest is luck; measured here: 0.19-0.92x torch's, means 0.22-0.73x).
    model = float_model(I, H, seed, weight_scale, **options)
    x = torch.randn(T, B, I, generator=torch.Generator().manual_seed(seed + 10))
    ours, theirs = lstm_ext.quantize_dynamic(model), torch_int8(model)
    with torch.no_grad():
        exact, (h, c) = model(x)
        out, (h_q, c_q) = ours(x)
        out_t, (h_t, c_t) = theirs(x)
    for name, a, t, e in (("output", out, out_t, exact), ("h_n", h_q, h_t, h),
                          ("c_n", c_q, c_t, c)):
        (our_max, our_mean), (their_max, their_mean) = errors(a, e), errors(t, e)
        assert our_mean <= their_mean, (name, our_mean, their_mean)
        assert our_max <= 1.25 * their_max, (name, our_max, their_max)


@pytest.mark.parametrize("options", [dict(proj_size=8, num_layers=2), dict(bias=False)], ids=str)
def test_what_torch_int8_refuses_is_as_accurate_as_the_rest(options):
    # torch's int8 LSTM refuses proj_size and bias=False. A projection is one more quantized
    # product, so the errors stay of the plain layer's order (the grid above: up to 1.2e-2 max,
    # 1.4e-3 mean; measured here with a projection: 3.5e-3 max, 5e-4 mean).
    model = float_model(16, 32, **options)
    x = torch.randn(40, 3, 16)
    with torch.no_grad():
        exact, (h, c) = model(x)
        out, (h_q, c_q) = lstm_ext.quantize_dynamic(model)(x)
    assert out.shape == exact.shape and h_q.shape == h.shape and c_q.shape == c.shape
    assert errors(out, exact)[0] < 2e-2 and errors(out, exact)[1] < 3e-3
    assert errors(c_q, c)[0] < 4e-2


def int8_pair(**options):
    model = float_model(5, 12, **options)
    return model, lstm_ext.quantize_dynamic(model)


def test_unbatched_and_batch_first_are_the_batched_layer():
    _, q = int8_pair(num_layers=2)
    x = torch.randn(7, 5)
    with torch.no_grad():
        out, (h, c) = q(x)
        out_b, (h_b, c_b) = q(x[:, None])
    assert torch.equal(out, out_b[:, 0]) and torch.equal(h, h_b[:, 0]) and torch.equal(c, c_b[:, 0])
    _, q_first = int8_pair(num_layers=2, batch_first=True)
    x = torch.randn(3, 7, 5)
    with torch.no_grad():
        out_f, (h_f, _) = q_first(x)
        out_t, (h_t, _) = q(x.transpose(0, 1))
    assert torch.equal(out_f, out_t.transpose(0, 1)) and torch.equal(h_f, h_t)


def test_packed_sequence_rows_equal_each_sequence_alone():
    # Each row is quantized alone, so a packed batch gives each sequence exactly what it gives
    # alone (torch's int8 LSTM, one scale per step's rows, does not).
    model, q = int8_pair(bidirectional=True, num_layers=2)
    lengths = torch.tensor([4, 7, 2])
    x = torch.randn(7, 3, 5)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    h0 = torch.randn(4, 3, 12)
    c0 = torch.randn(4, 3, 12)
    with torch.no_grad():
        out, (h, c) = q(packed, (h0, c0))
        padded, _ = pad_packed_sequence(out)
        for b, n in enumerate(lengths.tolist()):
            alone, (h_b, c_b) = q(x[:n, b:b + 1], (h0[:, b:b + 1], c0[:, b:b + 1]))
            assert torch.allclose(padded[:n, b], alone[:, 0], rtol=0, atol=1e-6)
            assert torch.allclose(h[:, b], h_b[:, 0], rtol=0, atol=1e-6)
            assert torch.allclose(c[:, b], c_b[:, 0], rtol=0, atol=1e-6)
        exact, _ = model(packed, (h0, c0))
    assert errors(out.data, exact.data)[0] < 2e-2


def test_given_states_and_the_same_numbers_every_call():
    model, q = int8_pair(num_layers=2, proj_size=4)
    x = torch.randn(30, 64, 5)  # 64 rows: the products may split over threads
    hx = (torch.randn(2, 64, 4), torch.randn(2, 64, 12))
    with torch.no_grad():
        first = q(x, hx)
        again = q(x, hx)
        exact = model(x, hx)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1][1], again[1][1])
    assert errors(first[0], exact[0])[0] < 2e-2


def test_a_non_finite_row_is_nan_and_the_others_are_not_touched():
    _, q = int8_pair()
    x = torch.randn(6, 3, 5)
    bad = x.clone()
    bad[2, 1, 3] = float("inf")
    with torch.no_grad():
        out, _ = q(x)
        out_bad, _ = q(bad)
    assert torch.equal(out_bad[:, [0, 2]], out[:, [0, 2]])
    assert torch.equal(out_bad[:2, 1], out[:2, 1]) and out_bad[2:, 1].isnan().all()


def test_cell():
    torch.manual_seed(0)
    for cell in (nn.LSTMCell(6, 10), lstm_ext.LSTMCell(6, 10, bias=False)):
        q = lstm_ext.quantize_dynamic(cell)
        assert isinstance(q, quantized.LSTMCell)
        x, hx = torch.randn(4, 6), (torch.randn(4, 10), torch.randn(4, 10))
        with torch.no_grad():
            h, c = q(x, hx)
            h_e, c_e = cell(x, hx)
            h_u, c_u = q(x[0], (hx[0][0], hx[1][0]))
            h_z, _ = q(x)
            h_z_e, _ = cell(x)
        assert errors(h, h_e)[0] < 1e-2 and errors(c, c_e)[0] < 1e-2
        assert torch.equal(h_u, h[0]) and torch.equal(c_u, c[0])
        assert errors(h_z, h_z_e)[0] < 1e-2


def test_quantize_dynamic_swaps_every_lstm_and_nothing_else():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.LSTM(3, 8)
            self.decoder = lstm_ext.LSTM(8, 8, num_layers=2)
            self.cell = nn.LSTMCell(8, 8)
            self.head = nn.Linear(8, 2)
            self.inner = nn.Sequential(lstm_ext.LSTMCell(8, 4))

    model = Model()
    q = lstm_ext.quantize_dynamic(model)
    assert isinstance(q.encoder, quantized.LSTM) and isinstance(q.decoder, quantized.LSTM)
    assert isinstance(q.cell, quantized.LSTMCell) and isinstance(q.inner[0], quantized.LSTMCell)
    assert type(q.head) is nn.Linear and q.head is not model.head  # a copy
    assert type(model.encoder) is nn.LSTM  # not inplace: the model is left as it was
    kept = lstm_ext.quantize_dynamic(model, skip=["decoder"])
    assert isinstance(kept.decoder, lstm_ext.LSTM) and isinstance(kept.encoder, quantized.LSTM)
    same = lstm_ext.quantize_dynamic(model, inplace=True)
    assert same is model and isinstance(model.encoder, quantized.LSTM)
    assert "dtype=torch.qint8" in repr(q.decoder) and "num_layers=2" in repr(q.decoder)


def test_state_dict_round_trip_gives_the_same_numbers():
    model, q = int8_pair(num_layers=2, bidirectional=True, proj_size=3)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = quantized.LSTM(5, 12, num_layers=2, bidirectional=True, proj_size=3)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(9, 2, 5)
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], q(x)[0])
    assert q.weight_ih_l1_reverse.dtype == torch.int8 and q.scale_hr_l0.dtype == F32


def test_torch_compile_and_export():
    _, q = int8_pair(num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 5)
    with torch.no_grad():
        eager, (h, c) = q(x)
        compiled, (h_c, c_c) = torch.compile(q, backend="aot_eager", fullgraph=True)(x)
        program = torch.export.export(q, (x,))
        exported, (h_e, c_e) = program.module()(x)
    assert torch.equal(compiled, eager) and torch.equal(h_c, h) and torch.equal(c_c, c)
    assert torch.equal(exported, eager) and torch.equal(h_e, h) and torch.equal(c_e, c)


def test_inference_only_and_clear_errors():
    model, q = int8_pair()
    x = torch.randn(4, 2, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        q(x)
    with torch.no_grad():
        q(x)  # fine without grad
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        q(torch.randn(4, 2, 6))
    with pytest.raises(ValueError, match="RNN input dtype"):
        q(torch.randn(4, 2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"reset must have shape \[T, B\] = \(4, 2\)"):
        q(torch.randn(4, 2, 5), reset=torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="reset must be a bool tensor"):
        q(torch.randn(4, 2, 5), reset=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="zoneout should be a number"):
        quantized.LSTM(5, 12, zoneout=1.0)
    with pytest.raises(ValueError, match="qint8"):
        lstm_ext.quantize_dynamic(model, dtype=torch.float16)
    with pytest.raises(TypeError, match="nn.Module"):
        lstm_ext.quantize_dynamic("model")
    with pytest.raises(RuntimeError, match="int8 \\[48, 5\\]"):  # the op's own checks
        torch.ops.lstm_ext.quantized_lstm_layer(
            torch.randn(4, 2, 5), torch.zeros(2, 12), torch.zeros(2, 12), q.weight_ih_l0.float(),
            q.scale_ih_l0, q.weight_hh_l0, q.scale_hh_l0, None, None, None, None, False)
    args = [torch.randn(4, 2, 5), torch.zeros(2, 12), torch.zeros(2, 12), q.weight_ih_l0,
            q.scale_ih_l0, q.weight_hh_l0, q.scale_hh_l0, None, None, None, None, False, None,
            0.0, 0.0]
    with pytest.raises(RuntimeError, match="come together"):
        torch.ops.lstm_ext.quantized_lstm_layer(*args, torch.ones(48), None, None, None)
    with pytest.raises(RuntimeError, match=r"ln_weight_c must be float32 \[12\]"):
        torch.ops.lstm_ext.quantized_lstm_layer(*args, torch.ones(48), torch.ones(48),
                                                torch.ones(11), torch.zeros(12))


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_reset_equals_each_piece_run_alone(packed, layer_norm):
    # Each row is quantized alone, so a restart gives exactly what the pieces give run apart,
    # bidirectional with a projection, with layer_norm too (and restarts are not ignored).
    options = dict(bidirectional=True, num_layers=2, proj_size=4)
    if layer_norm:
        model, I, H = layer_norm_model(**options), 16, 32
    else:
        model, I, H = lstm_ext.LSTM(5, 12, **options).eval(), 5, 12
        model.load_state_dict(float_model(5, 12, **options).state_dict())
    q = lstm_ext.quantize_dynamic(model)
    T, B = 9, 3
    lengths = [9, 5, 7] if packed else [T] * B
    torch.manual_seed(1)
    x, reset = torch.randn(T, B, I), torch.rand(T, B) < 0.3
    h0, c0 = torch.randn(4, B, 4), torch.randn(4, B, H)
    with torch.no_grad():
        given = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False) if packed \
            else x
        out, (h, c) = q(given, (h0, c0), reset=reset)
        exact, _ = model(given, (h0, c0), reset=reset)
        if packed:
            out, _ = pad_packed_sequence(out, total_length=T)
            exact, _ = pad_packed_sequence(exact, total_length=T)
        expected = split_run(q, x, h0, c0, reset, lengths)
    for actual, wanted in zip((out, h, c), expected):
        assert torch.allclose(actual, wanted, rtol=0, atol=1e-6)
    if not layer_norm:  # (layer_norm's accuracy: its own test below)
        assert errors(out, exact)[0] < 2e-2  # and near the float model with the same restarts
    # the restarts are not ignored
    with torch.no_grad():
        plain = q(given, (h0, c0))[0]
    plain = pad_packed_sequence(plain, total_length=T)[0] if packed else plain
    assert not torch.allclose(plain, out, atol=1e-3)


def test_zoneout_runs_as_in_eval():
    torch.manual_seed(0)  # (not whatever the tests before left)
    model = lstm_ext.LSTM(5, 12, num_layers=2, proj_size=4, zoneout=(0.3, 0.2)).eval()
    q = lstm_ext.quantize_dynamic(model)
    assert q.zoneout == (0.3, 0.2) and "zoneout=(0.3, 0.2)" in repr(q)
    x = torch.randn(8, 2, 5)
    without = copy.deepcopy(q)
    without.zoneout = (0.0, 0.0)
    with torch.no_grad():
        out, (h, c) = q(x)
        exact, (h_e, c_e) = model(x)
        err = max(errors(out, exact)[0], errors(h, h_e)[0], errors(c, c_e)[0])
        assert err < 2e-2
        # zoneout is not ignored: without it the int8 layer is much further from the float model
        # (mean errors: max errors over 8 steps put the ratio under 5 for a few draws in 10; the
        # means' ratio measured 6.4 or more in 30 draws, 1 if zoneout were ignored)
        assert errors(without(x)[0], exact)[1] > 5 * errors(out, exact)[1]
    # a module pickled before int8 zoneout existed loads with it off
    state = q.__dict__.copy()
    del state["zoneout"]
    restored = quantized.LSTM.__new__(quantized.LSTM)
    restored.__setstate__(state)
    assert restored.zoneout == (0.0, 0.0)


def test_recurrent_dropout_is_nothing_in_int8_as_in_eval():
    model = lstm_ext.LSTM(5, 12, recurrent_dropout=0.3).eval()
    q = lstm_ext.quantize_dynamic(model)
    x = torch.randn(8, 2, 5)
    with torch.no_grad():
        assert errors(q(x)[0], model(x)[0])[0] < 1e-2


@pytest.mark.parametrize("T,B,I,H,P", [(3, 2, 0, 4, 4), (3, 0, 5, 4, 4), (3, 2, 5, 4, 0),
                                       (3, 2, 5, 0, 0)])
def test_empty_dimensions_at_the_op(T, B, I, H, P):
    # A projection with no rows (P = 0) made the first version read past an empty buffer (found
    # by tests/fuzz_calls.py); every empty size must give empty or well-defined results.
    weight = quantized.quantize_weight  # (rows, cols) float -> int8 and row scales
    w_ih, s_ih = weight(torch.randn(4 * H, I))
    w_hh, s_hh = weight(torch.randn(4 * H, P))
    w_hr, s_hr = weight(torch.randn(P, H)) if P != H else (None, None)
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, P), torch.randn(B, H)
    out, h, c = torch.ops.lstm_ext.quantized_lstm_layer(x, h0, c0, w_ih, s_ih, w_hh, s_hh,
                                                        torch.randn(4 * H), w_hr, s_hr, None,
                                                        False)
    assert out.shape == (T, B, P) and h.shape == (B, P) and c.shape == (B, H)
    assert torch.isfinite(c).all() and torch.isfinite(out).all()


def test_the_same_numbers_on_one_thread_and_on_several():
    # Rows are quantized alone, so splitting the batch over threads (64 rows: 2 slices of 32 on
    # 2 threads) or splitting each product (one thread's slice) changes nothing, bitwise.
    _, q = int8_pair(num_layers=2, bidirectional=True)
    x = torch.randn(12, 64, 5)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            alone = q(x)
            torch.set_num_threads(max(threads, 2))
            split = q(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], split[0]) and torch.equal(alone[1][1], split[1][1])


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_long_call_gives_each_step_what_one_call_per_step_gives(layer_norm, threads):
    # The input projection runs a chunk of steps at a time (2^18 gate values a thread's rows:
    # here 3 to 16 steps of 64 or 32 rows at H = 128), so a 24-step call crosses chunk
    # boundaries: bitwise, each step is what a call of that step alone, carrying the state,
    # gives. Forward with resets, reverse, and packed batches whose rows end (forward) or start
    # (reverse) at different steps, so that some chunks of a thread's rows are empty.
    torch.manual_seed(6)
    I, H, T, B = 16, 128, 24, 64
    (q_ih, s_ih) = quantized.quantize_weight(torch.randn(4 * H, I) * 0.3)
    (q_hh, s_hh) = quantized.quantize_weight(torch.randn(4 * H, H) * 0.1)
    bias = torch.randn(4 * H) * 0.1
    ln = ([1 + 0.3 * torch.randn(4 * H), 1 + 0.3 * torch.randn(4 * H), 1 + 0.3 * torch.randn(H),
           0.3 * torch.randn(H)] if layer_norm else [None] * 4)
    op = torch.ops.lstm_ext.quantized_lstm_layer

    def layer(x, h0, c0, batch_sizes=None, reverse=False, reset=None):
        return op(x, h0, c0, q_ih, s_ih, q_hh, s_hh, bias, None, None, batch_sizes, reverse,
                  reset, 0.0, 0.0, *ln)

    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    reset = torch.rand(T, B) < 0.1
    batch_sizes = torch.tensor([64] * 5 + [40] * 7 + [17] * 12)
    rows = x.reshape(T * B, I)[:int(batch_sizes.sum())]  # [N, I]: step t's rows one after another
    starts = [0] + batch_sizes.cumsum(0).tolist()[:-1]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for reverse in (False, True):
            out, h_n, c_n = layer(x, h0, c0, reverse=reverse, reset=None if reverse else reset)
            h, c = h0, c0
            for t in (reversed(range(T)) if reverse else range(T)):
                if not reverse:  # a row that resets at t starts the step from h0, c0
                    h = torch.where(reset[t, :, None], h0, h)
                    c = torch.where(reset[t, :, None], c0, c)
                step, h, c = layer(x[t:t + 1], h, c)
                assert torch.equal(out[t], step[0]), (reverse, t)
            assert torch.equal(h_n, h) and torch.equal(c_n, c)
            out, h_n, c_n = layer(rows, h0, c0, batch_sizes, reverse)
            h, c = h0.clone(), c0.clone()
            for t in (reversed(range(T)) if reverse else range(T)):
                n, at = int(batch_sizes[t]), starts[t]
                step, h[:n], c[:n] = layer(rows[at:at + n][None], h[:n], c[:n])
                assert torch.equal(out[at:at + n], step[0]), (reverse, t)
            assert torch.equal(h_n, h) and torch.equal(c_n, c)
    finally:
        torch.set_num_threads(previous)


_INT8_RUN = """
import sys, torch, lstm_ext
torch.manual_seed(7)
model = lstm_ext.LSTM(24, 48, num_layers=2, bidirectional=True, proj_size=16)
q = lstm_ext.quantize_dynamic(model)
with torch.no_grad():
    out, (h, c) = q(4 * torch.randn(40, 9, 24))  # large inputs: wide pair sums
torch.save((out, h, c), sys.argv[1])
"""


def test_the_same_int8_numbers_with_every_kind_of_fbgemm_kernel(tmp_path):
    # 7-bit activations keep the AVX2 kernels' 16-bit pair sums (u8 * s8 + u8 * s8) from
    # saturating, so AVX2, AVX-512 and VNNI kernels give the same int32 products: the same
    # outputs, bitwise, with FBGEMM capped to AVX2 (FBGEMM_ENABLE_INSTRUCTIONS, which only
    # lowers: on an AVX2 CPU both runs are AVX2).
    results = []
    for kernels in (None, "AVX2", "AVX512"):
        env = dict(os.environ)
        env.pop("FBGEMM_ENABLE_INSTRUCTIONS", None)
        if kernels:
            env["FBGEMM_ENABLE_INSTRUCTIONS"] = kernels
        path = tmp_path / f"{kernels}.pt"
        subprocess.run([sys.executable, "-c", _INT8_RUN, str(path)], env=env, check=True,
                       timeout=300)
        results.append(torch.load(path))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_under_autocast_it_computes_in_float32():
    # Inside torch.autocast (a model trained that way, evaluated in int8), 16-bit inputs are cast
    # to float32 for the int8 op, as autocast does for float32-only ops.
    model, q = int8_pair(num_layers=2)
    x = torch.randn(6, 3, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = q(x.bfloat16())
        cell_h, _ = lstm_ext.quantize_dynamic(nn.LSTMCell(5, 12))(x[0].bfloat16())
    assert out.dtype == F32 and h.dtype == F32 and cell_h.dtype == F32
    with torch.no_grad():
        exact, _ = model(x.bfloat16().float())
    assert errors(out, exact)[0] < 2e-2


def layer_norm_model(**options):
    """A float lstm_ext.LSTM with layer_norm whose normalisation parameters are not their
    starting 1 and 0 (so that each of them matters)."""
    torch.manual_seed(3)
    model = lstm_ext.LSTM(16, 32, layer_norm=True, **options).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def fake_quantized_rows(v):
    """v [M, K] float32 as the int8 layer quantizes each row of a product's left operand (7-bit,
    asymmetric, the row's range with 0 in it), dequantized: exactly the values it multiplies."""
    low = v.amin(dim=1, keepdim=True).clamp(max=0)
    high = v.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (high - low) / 127
    flat = scale == 0
    scale = torch.where(flat, torch.ones_like(scale), scale)
    inverse = 1 / scale
    zero_point = torch.round(-low * inverse).clamp(0, 127)
    q = (torch.round(v * inverse) + zero_point).clamp(0, 127)
    return torch.where(flat, torch.zeros_like(v), scale.double() * (q - zero_point).double())


def test_layer_norm_int8_step_is_the_layer_norm_cell_on_the_quantized_values():
    # The int8 layer's products are exact integer products of the quantized rows and weights;
    # with layer_norm, the cell's equations (lstm_ext.reference) on those dequantized values, in
    # float64, give its output to float32's rounding (a row's quantization sees float32 h).
    from lstm_ext.reference import layer_norm_cell_reference
    torch.manual_seed(5)
    I, H, T, B = 12, 16, 5, 3
    w_ih, w_hh = torch.randn(4 * H, I) * 0.3, torch.randn(4 * H, H) * 0.3
    (q_ih, s_ih), (q_hh, s_hh) = quantized.quantize_weight(w_ih), quantized.quantize_weight(w_hh)
    bias = torch.randn(4 * H) * 0.1
    ln = [1 + 0.3 * torch.randn(4 * H), 1 + 0.3 * torch.randn(4 * H), 1 + 0.3 * torch.randn(H),
          0.3 * torch.randn(H)]
    x, h0, c0 = torch.randn(T, B, I), 0.5 * torch.randn(B, H), torch.randn(B, H)
    out, h_n, c_n = torch.ops.lstm_ext.quantized_lstm_layer(
        x, h0, c0, q_ih, s_ih, q_hh, s_hh, bias, None, None, None, False, None, 0.0, 0.0, *ln)
    deq_ih = (q_ih.double() * s_ih.double()[:, None])
    deq_hh = (q_hh.double() * s_hh.double()[:, None])
    h, c = h0, c0.double()
    for t in range(T):
        h64, c = layer_norm_cell_reference(
            fake_quantized_rows(x[t]), fake_quantized_rows(h.float()), c, deq_ih, deq_hh,
            bias.double(), torch.zeros_like(bias).double(), None, *(p.double() for p in ln))
        assert torch.allclose(out[t].double(), h64, rtol=0, atol=1e-4), t
        h = h64.float()
    assert torch.allclose(c_n.double(), c, rtol=0, atol=1e-4)


@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, bidirectional=True),
                                     dict(proj_size=8), dict(zoneout=(0.2, 0.1))], ids=str)
def test_layer_norm_in_int8_is_as_accurate_as_its_weights_allow(options):
    # A layer-normalised LSTM normalises each product, whatever its size: its output moves far
    # more with a small change than a plain LSTM's (measured on this model: 30x more under the
    # same perturbation of the input). Rounding the weights alone to int8, with every activation
    # in float32, then moves it by up to 1.5 (0.04 on average); int8's errors come mostly from
    # that: measured here 1.0-4.5x the weights' own mean error. Bound: 6x.
    model = layer_norm_model(**options)
    q = lstm_ext.quantize_dynamic(model)
    assert q.layer_norm and "layer_norm=True" in repr(q)
    rounded = copy.deepcopy(model)  # the float model on the int8 weights
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.startswith("weight_"):
                w, scale = quantized.quantize_weight(p)
                p.copy_(w.float() * scale[:, None])
    x = torch.randn(60, 3, 16, generator=torch.Generator().manual_seed(4))
    plain = copy.deepcopy(q)
    plain.layer_norm = False  # the same int8 weights without the normalisation
    with torch.no_grad():
        exact, (h, c) = model(x)
        out, (h_q, c_q) = q(x)
        near, (h_r, c_r) = rounded(x)
        for a, r, e in ((out, near, exact), (h_q, h_r, h), (c_q, c_r, c)):
            assert errors(a, e)[1] <= 6 * errors(r, e)[1], (errors(a, e), errors(r, e))
        assert errors(plain(x)[0], exact)[1] > 5 * errors(out, exact)[1]  # not ignored


def test_layer_norm_int8_state_dict_round_trip():
    q = lstm_ext.quantize_dynamic(layer_norm_model(num_layers=2))
    fresh = quantized.LSTM(16, 32, num_layers=2, layer_norm=True)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.ln_bias_c_l1, q.ln_bias_c_l1)
    x = torch.randn(5, 2, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], q(x)[0])
    state = q.__dict__.copy()  # a module pickled before int8 layer_norm existed: off
    del state["layer_norm"]
    restored = quantized.LSTM.__new__(quantized.LSTM)
    restored.__setstate__(state)
    assert restored.layer_norm is False
