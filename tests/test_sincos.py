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
    assert set(result) == {"backend", "epochs", "final_loss", "test_mse", "seconds",
                           "int8_test_mse"}
    assert result["int8_test_mse"] is None  # without --quantize
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
    assert torch.allclose(torch.from_numpy(sincos.predict(saved, data, "test", args)),
                          torch.from_numpy(sincos.predict(loaded, data, "test", args)), atol=1e-5)
    # and the CLI starts from it: one more epoch from the trained weights is already near-converged
    result = run_main(tmp_path, "--backend", loaded_by, "--load", str(path), "--epochs", "1",
                      "--no-plot")
    assert result["final_loss"] < 0.05


@pytest.mark.parametrize("argv,message", [
    (["--hidden", "-3"], "--hidden: must be a whole number greater than 0, got '-3'"),
    (["--layers", "0"], "--layers: must be a whole number greater than 0, got '0'"),
    (["--epochs", "ten"], "--epochs: must be a whole number greater than 0, got 'ten'"),
    (["--backend", "keras"], "--backend: invalid choice: 'keras'"),
    (["--lr", "0"], "--lr: must be a number greater than 0, got '0'"),
    (["--lr", "fast"], "--lr: must be a number greater than 0, got 'fast'"),
    (["--load", "/nonexistent/model.pt"], "--load: no such file: /nonexistent/model.pt"),
    (["--compare", "--save", "x.pt"], "--save takes one model"),
    (["--quantize", "--dtype", "bfloat16"], "--quantize evaluates a float32 model on the CPU"),
    (["--zoneout", "1"], "--zoneout: must be a number in [0, 1), got '1'"),
    (["--zoneout", "0.1,0.2,0.3"], "--zoneout: must be p or p_c,p_h"),
    (["--recurrent-dropout", "-0.1"], "--recurrent-dropout: must be a number in [0, 1)"),
    (["--backend", "torch", "--zoneout", "0.1"], "torch.nn.LSTM does not have"),
    (["--compare", "--layer-norm"], "torch.nn.LSTM does not have"),
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


def run_cli(*argv, cwd="/"):
    return subprocess.run([sys.executable, "-m", "lstm_ext.sincos", *argv], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def one_line_error(result):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_load_says_which_sizes_to_pass(tmp_path):
    path = tmp_path / "m16.pt"
    run_main(tmp_path, "--epochs", "2", "--no-plot", "--save", str(path))
    line = one_line_error(run_cli("--load", str(path), "--hidden", "32", "--no-plot"))
    assert line == (f"lstm-sincos: error: --load {path}: it holds a model with hidden size 16 and 1 "
                    "layer(s), but this run builds hidden size 32 and 1 layer(s): pass --hidden 16 "
                    "--layers 1")
    line = one_line_error(run_cli("--load", str(path), "--layers", "2", "--no-plot"))
    assert "pass --hidden 16 --layers 1" in line


def test_load_of_a_dict_of_other_tensors_lists_the_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"something": torch.zeros(3)}, path)
    line = one_line_error(run_cli("--load", str(path)))
    assert line.startswith(f"lstm-sincos: error: --load {path}: not a state_dict of this model")
    assert "missing keys: lstm.weight_ih_l0, lstm.weight_hh_l0" in line
    assert "unexpected keys: something" in line


def test_load_of_a_tensor_or_a_file_torch_cannot_read(tmp_path):
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    assert "holds a Tensor, not a state_dict" in one_line_error(run_cli("--load", str(tensor)))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, this is not a model\n")
    line = one_line_error(run_cli("--load", str(junk)))
    assert f"--load {junk}: not a file written by torch.save" in line


def test_load_with_a_wrong_shape_names_it(tmp_path):
    path = tmp_path / "m.pt"
    run_main(tmp_path, "--epochs", "2", "--no-plot", "--save", str(path))
    state = torch.load(path, weights_only=True)
    state["linear.weight"] = torch.zeros(2, 16)
    torch.save(state, path)
    line = one_line_error(run_cli("--load", str(path)))
    assert "linear.weight is [2, 16], expected [1, 16]" in line


@pytest.mark.parametrize("option", ["--plot", "--save", "--json"])
def test_output_paths_are_checked_before_training(tmp_path, option):
    missing_folder = tmp_path / "no" / "such" / "out.file"
    result = run_cli(option, str(missing_folder), "--epochs", "100000", "--target-loss", "1e-30")
    line = one_line_error(result)  # returns at once: 100000 epochs would take a minute
    assert line == (f"lstm-sincos: error: {option} {missing_folder}: cannot write there: the "
                    f"folder {missing_folder.parent} does not exist")
    assert "is a folder" in one_line_error(run_cli(option, str(tmp_path)))


def test_help_shows_the_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for default in ("(default: ext)", "(default: 10000)", "(default: 16)", "(default: 0.01)",
                    "(default: 1e-4;", "(default: sincos.png)"):
        assert default in text


def test_plot_legend_uses_plain_words(tmp_path, monkeypatch):
    import matplotlib.figure

    labels = []
    save = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        for axes in fig.axes:
            labels.extend(text.get_text() for text in axes.get_legend().get_texts())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    run_main(tmp_path, "--epochs", "3", "--compare", "--plot", str(tmp_path / "p.png"))
    assert "sin(t), training input" in labels and "cos(t), test target" in labels
    assert "predicted cos(t), test, lstm_ext.LSTM" in labels
    assert "predicted cos(t), training, torch.nn.LSTM" in labels
    assert not any("_" in label and "." not in label for label in labels), labels


def test_console_script_runs(tmp_path):
    result = subprocess.run(["lstm-sincos", "--epochs", "5", "--no-plot", "--json",
                             str(tmp_path / "s.json")], capture_output=True, text=True,
                            timeout=120, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "s.json").read_text())["epochs"] == 5
    assert "lstm_ext.LSTM: 5 epochs" in result.stdout


@pytest.mark.parametrize("argv", [["--dtype", "bfloat16"], ["--autocast", "bfloat16"],
                                  ["--dtype", "float16"], ["--autocast", "float16"]], ids=str)
def test_low_precision_training_converges(tmp_path, argv):
    result = run_main(tmp_path, *argv, "--no-plot")
    assert result["final_loss"] < 1e-3  # the looser default target in low precision
    assert result["epochs"] < 10000 and result["test_mse"] < 1e-2


def test_low_precision_compare_runs_both_in_the_same_precision(tmp_path, capsys):
    result = run_main(tmp_path, "--dtype", "bfloat16", "--compare", "--no-plot")
    assert set(result) == {"ext", "torch"}
    assert all(r["final_loss"] < 1e-3 for r in result.values())
    assert "; bfloat16;" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--autocast", "bfloat16", "--dtype", "bfloat16"], "--autocast trains a float32 model"),
    (["--autocast", "float16", "--compare"], "torch.nn.LSTM does not run under float16 autocast"),
])
def test_low_precision_option_errors(argv, message):
    assert message in one_line_error(run_cli(*argv, "--no-plot"))


@pytest.mark.parametrize("argv,options", [
    (["--zoneout", "0.1", "--recurrent-dropout", "0.1"], ((0.1, 0.1), 0.1, False)),
    (["--zoneout", "0,0.2"], ((0.0, 0.2), 0.0, False)),
    (["--layer-norm"], ((0.0, 0.0), 0.0, True)),
], ids=str)
def test_regularised_training_runs(tmp_path, monkeypatch, argv, options):
    built = []
    original = sincos.build_model
    monkeypatch.setattr(sincos, "build_model",
                        lambda *a: built.append(original(*a)) or built[-1])
    result = run_main(tmp_path, *argv, "--epochs", "300", "--no-plot")
    lstm = built[0].lstm
    assert (lstm.zoneout, lstm.recurrent_dropout, lstm.layer_norm) == options
    assert result["final_loss"] < 0.1 and result["test_mse"] < 0.5


def test_quantize_reports_the_int8_test_mse_beside_float32s(tmp_path, capsys):
    summary = run_main(tmp_path, "--epochs", "300", "--no-plot", "--quantize")
    assert "in int8 (lstm_ext.quantize_dynamic): test MSE" in capsys.readouterr().out
    # int8 costs little on the trained model (measured: 1.89e-3 against 1.82e-3 float32)
    assert summary["test_mse"] < 5e-3 and summary["int8_test_mse"] < 1.5 * summary["test_mse"]


def test_quantize_with_layer_norm_and_zoneout(tmp_path, capsys):
    # int8 has both (zoneout as in eval): the trained model's int8 test MSE beside float32's.
    summary = run_main(tmp_path, "--epochs", "300", "--no-plot", "--quantize", "--layer-norm",
                       "--zoneout", "0.1")
    assert "in int8 (lstm_ext.quantize_dynamic): test MSE" in capsys.readouterr().out
    assert summary["int8_test_mse"] < 2 * summary["test_mse"] + 1e-3, summary
