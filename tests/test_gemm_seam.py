"""The GEMM seam (csrc/cpu/blas.h, gemm_choice.cpp): every backend gives nn.LSTM's numbers on this
machine, forcing one is honoured, and the measured choice is the same from one run to the next."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lstm_ext
from lstm_ext._ops import _C

from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lstm_testing import assert_float32_close, assert_float64_equal, forward_backward

BACKENDS = ["small", "brgemm", "mkl", "aten"]
BRGEMM_USABLE = "brgemm f32 usable" in dict(_C.gemm_backends())["float32"]

# (T, B, I, H, options): the trainer's size (small products), B = 1 (the direct path), a batch
# split over threads, projections, two bidirectional layers on a packed batch of unequal lengths.
CASES = [
    (20, 5, 1, 16, {}),
    (9, 1, 64, 128, {}),
    (6, 48, 40, 64, {}),
    (7, 3, 10, 32, dict(proj_size=16)),
    (8, 6, 12, 16, dict(num_layers=2, bidirectional=True, packed=True)),
    (5, 40, 33, 48, dict(num_layers=2, proj_size=8)),
]


def results(T, B, I, H, options, dtype):
    """(names, lstm_ext, nn.LSTM in dtype, nn.LSTM in float64 on the same weights)."""
    options = dict(options)
    packed = options.pop("packed", False)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, dtype=dtype, **options)
    ext = lstm_ext.LSTM(I, H, dtype=dtype, **options)
    ext.load_state_dict(ref.state_dict())
    ref64 = torch.nn.LSTM(I, H, dtype=torch.float64, **options)
    ref64.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    states = (options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1), B)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    hx = (torch.randn(states + (options.get("proj_size") or H,), generator=gen,
                      dtype=torch.float64),
          torch.randn(states + (H,), generator=gen, dtype=torch.float64))

    def inputs(dtype):
        xd, hd = x.to(dtype), tuple(t.to(dtype) for t in hx)
        if packed:
            lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(2))
            lengths[0] = T
            xd = pack_padded_sequence(xd, lengths, enforce_sorted=False)
        return xd, hd

    names, exact = forward_backward(ref64, *inputs(torch.float64))
    _, theirs = forward_backward(ref, *inputs(dtype))
    _, ours = forward_backward(ext, *inputs(dtype))
    return names, ours, theirs, exact


def check_float64(T, B, I, H, **options):
    names, ours, _, exact = results(T, B, I, H, options, torch.float64)
    assert_float64_equal(names, ours, exact)


def check_float32(T, B, I, H, **options):
    assert_float32_close(*results(T, B, I, H, options, torch.float32))


@pytest.fixture
def gemm_backend(request):
    """Forces the backend named by the test's parameter; yields the products each ran."""
    name = request.param
    if name == "brgemm" and not BRGEMM_USABLE:
        pytest.skip("oneDNN's f32 brgemm does not run on this CPU / torch")
    _C.set_gemm_backend(name)
    _C.count_gemm_backends(True)
    try:
        yield name
    finally:
        _C.count_gemm_backends(False)
        _C.set_gemm_backend("auto")


def ran(counts):
    return {name: n for name, n in counts if n > 0}


@pytest.mark.parametrize("gemm_backend", BACKENDS + ["rule"], indirect=True)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_backend_matches_nn_lstm(gemm_backend, case):
    T, B, I, H, options = case
    check_float64(T, B, I, H, **dict(options))
    check_float32(T, B, I, H, **dict(options))
    counts = ran(_C.count_gemm_backends(True))
    if gemm_backend in ("mkl", "aten"):
        assert counts.get(gemm_backend, 0) > 0, counts  # they can run every product
    elif gemm_backend in ("small", "brgemm"):
        # No transposes: the recurrent products are theirs, the transposed ones the rule's.
        assert counts.get(gemm_backend, 0) > 0, counts
        assert set(counts) <= {gemm_backend, "small", "mkl"}, counts


@pytest.mark.parametrize("gemm_backend", BACKENDS, indirect=True)
def test_every_backend_matches_the_reference_with_layer_norm(gemm_backend):
    torch.manual_seed(0)
    model = lstm_ext.LSTM(6, 32, num_layers=2, layer_norm=True, dtype=torch.float64)
    x = torch.randn(9, 4, 6, dtype=torch.float64, requires_grad=True)
    out, (h, c) = model(x)
    _C.set_gemm_backend("rule")
    expected, (h_e, c_e) = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gemm_backend", BACKENDS, indirect=True)
def test_every_backend_runs_the_cell(gemm_backend):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(24, 32, dtype=torch.float64)
    ext = lstm_ext.LSTMCell(24, 32, dtype=torch.float64)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(5, 24, dtype=torch.float64)
    for a, b in zip(ref(x), ext(x)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


RUN_TWICE = r"""
import hashlib, json, sys, torch, lstm_ext
torch.use_deterministic_algorithms(True)
from lstm_ext._ops import _C
torch.manual_seed(0)
digest = hashlib.sha256()
for T, B, I, H in [(20, 5, 1, 16), (30, 1, 64, 128), (10, 40, 64, 96)]:
    model = lstm_ext.LSTM(I, H)
    x = torch.randn(T, B, I, requires_grad=True)
    out, _ = model(x)
    out.square().sum().backward()
    for t in [out, x.grad] + [p.grad for p in model.parameters()]:
        digest.update(t.detach().numpy().tobytes())
print(json.dumps({"digest": digest.hexdigest(), "choices": _C.gemm_choices(),
                  "settings": dict(_C.gemm_backends())["float32"]}))
"""


def run_child(env_changes):
    env = dict(os.environ)
    env.pop("LSTM_EXT_GEMM", None)
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", RUN_TWICE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_measured_choice_is_kept_and_the_next_run_gives_the_same_numbers(tmp_path):
    first = run_child({"LSTM_EXT_GEMM_CACHE": str(tmp_path)})
    second = run_child({"LSTM_EXT_GEMM_CACHE": str(tmp_path)})
    assert "measured per size class" in first["settings"]
    (kept,) = list(tmp_path.iterdir())
    assert kept.read_text().startswith("# lstm_ext GEMM choices; ")
    timed = [how for _, _, how in first["choices"] if "us" in how]
    assert timed, first["choices"]  # something had several candidates and was timed
    assert [(c, b) for c, b, _ in first["choices"]] == [(c, b) for c, b, _ in second["choices"]]
    assert all(how in ("the only one", f"kept in {kept}") for _, _, how in second["choices"])
    assert first["digest"] == second["digest"]


def test_without_a_place_to_keep_choices_the_fixed_rule_decides(tmp_path):
    runs = [run_child({"LSTM_EXT_GEMM_CACHE": "off"}) for _ in range(2)]
    assert "fixed rule, nothing timed (LSTM_EXT_GEMM_CACHE=off)" in runs[0]["settings"]
    assert all("us" not in how for _, _, how in runs[0]["choices"])
    assert runs[0]["digest"] == runs[1]["digest"]
    # The measured choice and the rule may pick different backends; each is deterministic.
    run_child({"LSTM_EXT_GEMM_CACHE": str(tmp_path)})


def test_an_unknown_backend_name_is_a_clear_error():
    env = dict(os.environ, LSTM_EXT_GEMM="fastest")
    done = subprocess.run(
        [sys.executable, "-c",
         "import torch, lstm_ext\n"
         "try:\n"
         "    lstm_ext.LSTM(3, 16)(torch.randn(40, 2, 3))  # 80 rows: not the direct path\n"
         "except ValueError as e:\n"
         "    print('ValueError:', e)\n"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LSTM_EXT_GEMM: expected auto, rule, small, brgemm, mkl or aten, got 'fastest'" in (
        done.stdout), done.stdout
    with pytest.raises(ValueError, match="got 'fastest'"):
        _C.set_gemm_backend("fastest")
