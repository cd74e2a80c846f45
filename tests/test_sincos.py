"""The sin->cos trainer (python -m lstm_ext.sincos / lstm-sincos)."""

import json
import subprocess
import sys

import pytest
import torch

from lstm_ext import sincos


def run_main(tmp_path, *argv):
    summary = tmp_path / "summary.json"
    assert sincos.main([*argv, "--quiet", "--json", str(summary)]) == 0
    return json.loads(summary.read_text())


def test_default_config_converges(tmp_path):
    result = run_main(tmp_path, "--no-plot")
    assert set(result) == {"backend", "epochs", "final_loss", "test_mse", "seconds"}
    assert result["backend"] == "ext"
    assert result["final_loss"] < 1e-4
    assert result["epochs"] < 10000
    assert result["test_mse"] < 1e-2  # the prediction on the unseen half follows cos(t)
    assert result["seconds"] > 0


def test_compare_trains_both_from_the_same_start(tmp_path, capsys):
    result = run_main(tmp_path, "--compare", "--no-plot")
    out = capsys.readouterr().out
    assert set(result) == {"ext", "torch"}
    for backend in ("ext", "torch"):
        assert result[backend]["backend"] == backend
        assert result[backend]["final_loss"] < 1e-4
    for name in ("lstm_ext.LSTM", "torch.nn.LSTM", "ms/epoch", "speedup", "test MSE"):
        assert name in out
    # Same data, same initial weights, equal kernels: the runs end within a few percent of epochs.
    assert abs(result["ext"]["epochs"] - result["torch"]["epochs"]) < 0.2 * result["torch"]["epochs"]


def test_plot_is_a_png(tmp_path):
    import matplotlib.image

    path = tmp_path / "plot.png"
    run_main(tmp_path, "--epochs", "30", "--plot", str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_fixed_seed_reproduces_losses():
    args = sincos.parse_args(["--epochs", "150", "--quiet"])[1]
    data = sincos.make_dataset()
    runs = [sincos.train(sincos.build_model("ext", args, None), data, args, "ext")[1]
            for _ in range(2)]
    assert len(runs[0]) == 150 and runs[0] == runs[1]
    args.seed = 1
    other = sincos.train(sincos.build_model("ext", args, None), data, args, "ext")[1]
    assert other != runs[0]


def test_ext_and_torch_losses_agree_epoch_by_epoch():
    """Only the LSTM differs, and it computes the same numbers: the loss curves coincide early on."""
    args = sincos.parse_args(["--epochs", "50", "--quiet"])[1]
    data = sincos.make_dataset()
    ext = sincos.train(sincos.build_model("ext", args, None), data, args, "ext")[1]
    ref = sincos.train(sincos.build_model("torch", args, None), data, args, "torch")[1]
    assert ext == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("saved_by,loaded_by", [("ext", "torch"), ("torch", "ext")])
def test_save_and_load_across_backends(tmp_path, saved_by, loaded_by):
    path = tmp_path / "model.pt"
    run_main(tmp_path, "--backend", saved_by, "--epochs", "200", "--no-plot", "--save", str(path))
    state = torch.load(path, weights_only=True)
    args = sincos.parse_args(["--quiet"])[1]
    data = sincos.make_dataset()
    saved = sincos.build_model(saved_by, args, state)
    loaded = sincos.build_model(loaded_by, args, state)
    assert torch.allclose(torch.from_numpy(sincos.predict(saved, data, "test")),
                          torch.from_numpy(sincos.predict(loaded, data, "test")), atol=1e-5)
    # and the CLI starts from it: one more epoch from the trained weights is already near-converged
    result = run_main(tmp_path, "--backend", loaded_by, "--load", str(path), "--epochs", "1",
                      "--no-plot")
    assert result["final_loss"] < 0.05


@pytest.mark.parametrize("argv,message", [
    (["--hidden", "-3"], "--hidden: must be a positive integer, got -3"),
    (["--layers", "0"], "--layers: must be a positive integer, got 0"),
    (["--backend", "keras"], "--backend: invalid choice: 'keras'"),
    (["--lr", "0"], "--lr: must be a positive number, got 0"),
    (["--epochs", "ten"], "--epochs: invalid positive_int value: 'ten'"),
    (["--load", "/nonexistent/model.pt"], "--load: no such file: /nonexistent/model.pt"),
    (["--compare", "--save", "x.pt"], "--save takes one model"),
] + ([] if torch.cuda.is_available() else
     [(["--device", "cuda"], "--device cuda: no CUDA device is available")]))
def test_bad_options_exit_2_with_one_line(argv, message):
    result = subprocess.run([sys.executable, "-m", "lstm_ext.sincos", *argv, "--no-plot"],
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstm-sincos: error: "), result.stderr
    assert message in lines[0]


def test_load_of_a_wrong_file_exits_2(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"something": torch.zeros(3)}, path)
    result = subprocess.run([sys.executable, "-m", "lstm_ext.sincos", "--load", str(path)],
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"lstm-sincos: error: --load {path}:")


def test_console_script_runs(tmp_path):
    result = subprocess.run(["lstm-sincos", "--epochs", "5", "--no-plot", "--json",
                             str(tmp_path / "s.json")], capture_output=True, text=True,
                            timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "s.json").read_text())["epochs"] == 5
    assert "lstm_ext.LSTM: 5 epochs" in result.stdout
