"""Learn cos(t) from sin(t) with an LSTM: the experiment of the original write-up, on lstm_ext.

    python -m lstm_ext.sincos                  # train on lstm_ext.LSTM, write sincos.png
    python -m lstm_ext.sincos --compare        # lstm_ext vs torch.nn.LSTM from the same start
    lstm-sincos --backend torch --no-plot      # the same model on torch.nn.LSTM
    lstm-sincos --dtype bfloat16 --compare     # the model in bfloat16 (or --autocast bfloat16)

The seed's setup: 200 points over t in [0, 12*pi], input sin(t), target cos(t); the first half
trains, reshaped to [20, 5, 1] ([T, B, 1]) as the seed does, the second half tests. Model
LSTM(1, 16) + Linear(16, 1), MSE loss, Adam lr 1e-2, up to 10000 epochs, stopping once the
training loss is below 1e-4.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .modules import LSTM
from .quantized import quantize_dynamic

DATA_LEN = 200
TRAIN_RATIO = 0.5
BATCH = 5  # the seed's reshape(-1, 5, 1)
BACKENDS = {"ext": LSTM, "torch": nn.LSTM}
BACKEND_NAMES = {"ext": "lstm_ext.LSTM", "torch": "torch.nn.LSTM"}


class SinCosModel(nn.Module):
    """The seed's LstmRNN: an LSTM followed by a Linear layer applied at every step."""

    def __init__(self, backend: str, hidden_size: int = 16, num_layers: int = 1,
                 **lstm_options):
        super().__init__()
        # lstm_options: lstm_ext.LSTM's zoneout / recurrent_dropout / layer_norm (none for
        # torch.nn.LSTM)
        self.lstm = BACKENDS[backend](1, hidden_size, num_layers, **lstm_options)
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, x):  # x [T, B, 1] -> [T, B, 1]
        y, _ = self.lstm(x)
        steps, batch, hidden = y.shape
        return self.linear(y.reshape(steps * batch, hidden)).view(steps, batch, -1)


@dataclass
class Dataset:
    t: np.ndarray  # [200]
    sin: np.ndarray  # [200] float32
    cos: np.ndarray  # [200] float32
    split: int  # index of the first test point

    def tensors(self, part: str, device, dtype=torch.float32):
        """(x, y), each [T, B, 1] as the seed reshapes them."""
        rows = slice(0, self.split) if part == "train" else slice(self.split, None)
        x = torch.from_numpy(self.sin[rows].reshape(-1, BATCH, 1)).to(device, dtype)
        y = torch.from_numpy(self.cos[rows].reshape(-1, BATCH, 1)).to(device, dtype)
        return x, y


def make_dataset() -> Dataset:
    t = np.linspace(0, 12 * np.pi, DATA_LEN)
    return Dataset(t, np.sin(t).astype("float32"), np.cos(t).astype("float32"),
                   int(DATA_LEN * TRAIN_RATIO))


@dataclass
class Result:
    backend: str
    epochs: int
    final_loss: float
    test_mse: float
    seconds: float
    int8_test_mse: Optional[float] = None  # with --quantize: the trained model in int8


class Progress:
    """A live line (on a terminal) or a line every 500 epochs (in a log); silent when quiet."""

    def __init__(self, label: str, quiet: bool):
        self.label, self.quiet = label, quiet
        self.live = sys.stdout.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, epoch: int, max_epochs: int, loss: float, force: bool = False):
        if self.quiet:
            return
        now = time.perf_counter()
        due = (now - self.last >= 0.2) if self.live else (epoch % 500 == 0)
        if not (due or force):
            return
        self.last = now
        rate = epoch / max(now - self.start, 1e-9)
        line = f"{self.label}: epoch {epoch}/{max_epochs}  loss {loss:.3e}  {rate:,.0f} epochs/s"
        print(("\r" + line.ljust(78)) if self.live else line, end="" if self.live else "\n",
              flush=True)

    def close(self, epoch: int, max_epochs: int, loss: float):
        """On a terminal, leave the live line at the final epoch (a log gets the summary only)."""
        if self.live and not self.quiet:
            self.update(epoch, max_epochs, loss, force=True)
            print()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def precision(model: SinCosModel, args):
    """The model's dtype, and the autocast region its forward runs in (a no-op without
    --autocast)."""
    parameter = next(model.parameters())
    region = torch.autocast(parameter.device.type, dtype=DTYPES[args.autocast or "bfloat16"],
                            enabled=args.autocast is not None)
    return parameter.dtype, region


def train(model: SinCosModel, data: Dataset, args, backend: str) -> Tuple[Result, List[float]]:
    """Train as the seed does; return the summary and the training loss of every epoch."""
    device = next(model.parameters()).device
    dtype, autocast = precision(model, args)
    x, y = data.tensors("train", device, dtype)
    loss_fn = nn.MSELoss()
    # Adam's default eps (1e-8) is 0 in float16, and its update then divides by zero.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr,
                                 eps=1e-4 if dtype == torch.float16 else 1e-8)
    progress = Progress(BACKEND_NAMES[backend], args.quiet)
    losses = []
    start = time.perf_counter()
    epoch = 0
    loss_value = math.inf
    for epoch in range(1, args.epochs + 1):
        with autocast:
            prediction = model(x)
        loss = loss_fn(prediction.float(), y.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss_value = loss.item()
        losses.append(loss_value)
        if loss_value < args.target_loss:
            break
        progress.update(epoch, args.epochs, loss_value)
    seconds = time.perf_counter() - start
    progress.close(epoch, args.epochs, loss_value)
    return Result(backend, epoch, loss_value, evaluate(model, data, args), seconds), losses


@torch.no_grad()
def predict(model: SinCosModel, data: Dataset, part: str, args) -> np.ndarray:
    device = next(model.parameters()).device
    dtype, autocast = precision(model, args)
    x, _ = data.tensors(part, device, dtype)
    with autocast:
        prediction = model.eval()(x)
    return prediction.view(-1).float().cpu().numpy()


def evaluate(model: SinCosModel, data: Dataset, args) -> float:
    prediction = predict(model, data, "test", args)
    model.train()
    return float(np.mean((prediction - data.cos[data.split:]) ** 2))


def plot(path: str, data: Dataset, predictions: Dict[str, Dict[str, np.ndarray]],
         results: Dict[str, Result]):
    """The seed's two figures in one PNG: the dataset, then the predictions on train and test."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    t, split = data.t, data.split
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [1, 1.4]})
    top.plot(t[:60], data.sin[:60], label="sin(t)")
    top.plot(t[:60], data.cos[:60], label="cos(t)")
    top.plot([2.5, 2.5], [-1.3, 0.55], "r--", label="t = 2.5")
    top.plot([6.8, 6.8], [-1.3, 0.85], "m--", label="t = 6.8")
    top.set_xlabel("t")
    top.set_ylabel("sin(t) and cos(t)")
    top.set_ylim(-1.2, 1.2)
    top.set_title("dataset: the first 60 points")
    top.legend(loc="upper right")

    bottom.plot(t[:split], data.sin[:split], "g", label="sin(t), training input")
    bottom.plot(t[:split], data.cos[:split], "b", label="cos(t), training target")
    bottom.plot(t[split:], data.sin[split:], "c", label="sin(t), test input")
    bottom.plot(t[split:], data.cos[split:], "k", label="cos(t), test target")
    styles = {"ext": ("y--", "m--"), "torch": ("y:", "m:")}
    for backend, pred in predictions.items():
        suffix = f", {BACKEND_NAMES[backend]}" if len(predictions) > 1 else ""
        train_style, test_style = styles[backend]
        bottom.plot(t[:split], pred["train"], train_style,
                    label=f"predicted cos(t), training{suffix}")
        bottom.plot(t[split:], pred["test"], test_style, label=f"predicted cos(t), test{suffix}")
    bottom.plot([t[split], t[split]], [-1.2, 4.0], "r--", label="training | test")
    bottom.set_xlabel("t")
    bottom.set_ylabel("sin(t) and cos(t)")
    bottom.set_xlim(t[0], t[-1])
    bottom.set_ylim(-1.2, 4)
    bottom.legend(loc="upper right", fontsize=8, ncol=2)
    bottom.text(14, 2, "train", size=15)
    bottom.text(20, 2, "test", size=15)
    bottom.set_title("; ".join(f"{BACKEND_NAMES[b]}: {r.epochs} epochs, test MSE {r.test_mse:.2e}"
                               for b, r in results.items()))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_table(results: Dict[str, Result], label: str = "float32") -> str:
    ref = results["torch"]
    lines = [f"{'backend':<15} {'epochs':>7} {'final loss':>11} {'test MSE':>10} {'wall s':>8} "
             f"{'ms/epoch':>9} {'speedup':>8}"]
    for backend, r in results.items():
        ms = 1e3 * r.seconds / r.epochs
        speed = (ref.seconds / ref.epochs) / (r.seconds / r.epochs)
        lines.append(f"{BACKEND_NAMES[backend]:<15} {r.epochs:>7} {r.final_loss:>11.3e} "
                     f"{r.test_mse:>10.3e} {r.seconds:>8.2f} {ms:>9.3f} {speed:>7.2f}x")
    lines.append(f"(speedup: torch.nn.LSTM ms/epoch / this backend's; {label}; "
                 f"threads {torch.get_num_threads()}, torch {torch.__version__})")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, no usage block, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number greater than 0, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number greater than 0, got {text!r}")
    return value


def probability(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def zoneout_option(text):
    """p (both states) or p_c,p_h."""
    parts = text.split(",")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"must be p or p_c,p_h, got {text!r}")
    values = [probability(p) for p in parts]
    return values[0] if len(values) == 1 else tuple(values)


def writable_path_problem(path: str) -> Optional[str]:
    """Why `path` cannot be written (checked before training, not after it), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file exists and is not writable"
    return None


def parse_args(argv):
    parser = _Parser(prog="lstm-sincos", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="ext",
                        help="ext: lstm_ext.LSTM, torch: torch.nn.LSTM (default: %(default)s)")
    parser.add_argument("--compare", action="store_true",
                        help="train both backends from the same seed and weights, print a table")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the initial weights (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=10000,
                        help="train at most this many epochs (default: %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=16,
                        help="LSTM hidden size (default: %(default)s)")
    parser.add_argument("--layers", type=positive_int, default=1,
                        help="LSTM layers (default: %(default)s)")
    parser.add_argument("--zoneout", type=zoneout_option, default=0.0, metavar="P|P_C,P_H",
                        help="lstm_ext only: zoneout of the cell and hidden states in training "
                             "(default: %(default)s, off)")
    parser.add_argument("--recurrent-dropout", type=probability, default=0.0, metavar="P",
                        help="lstm_ext only: dropout of the h fed back to W_hh, one mask per "
                             "sequence (default: %(default)s, off)")
    parser.add_argument("--layer-norm", action="store_true",
                        help="lstm_ext only: layer-normalised LSTM (haste's LayerNormLSTM; "
                             "default: off)")
    parser.add_argument("--lr", type=positive_float, default=1e-2,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--target-loss", type=positive_float,
                        help="stop once the training loss is below this (default: 1e-4; 1e-3 "
                             "with --dtype bfloat16/float16 or --autocast)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to train (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the model's and the data's dtype (default: %(default)s); in "
                             "bfloat16 or float16 the default --target-loss is 1e-3 (and in "
                             "float16 Adam's eps 1e-4: 1e-8 is 0 there)")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"],
                        help="train the float32 model under torch.autocast to this dtype (the "
                             "default --target-loss is then 1e-3)")
    parser.add_argument("--plot", default="sincos.png", metavar="PATH",
                        help="write the figures to this PNG (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--save", metavar="PATH",
                        help="write the trained model's state_dict to this file")
    parser.add_argument("--load", metavar="PATH",
                        help="start from this state_dict (saved with --save by either backend)")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON to this file")
    parser.add_argument("--quantize", action="store_true",
                        help="also evaluate the trained model in int8 "
                             "(lstm_ext.quantize_dynamic; CPU, float32)")
    parser.add_argument("--quiet", action="store_true", help="print no progress")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        from . import build_info
        if (args.compare or args.backend == "ext") and not build_info["cuda"]:
            parser.error("--device cuda: lstm_ext was built without CUDA kernels")
    if args.load and not os.path.isfile(args.load):
        parser.error(f"--load: no such file: {args.load}")
    if ((args.zoneout or args.recurrent_dropout or args.layer_norm)
            and (args.compare or args.backend == "torch")):
        parser.error("--zoneout, --recurrent-dropout and --layer-norm are lstm_ext.LSTM options "
                     "that torch.nn.LSTM does not have: use them with --backend ext, without "
                     "--compare")
    if args.quantize and (args.device != "cpu" or args.dtype != "float32" or args.autocast):
        parser.error("--quantize evaluates a float32 model on the CPU in int8: use it with "
                     "--device cpu and --dtype float32, without --autocast")
    if args.compare and args.save:
        parser.error("--save takes one model: use it without --compare")
    if args.autocast and args.dtype != "float32":
        parser.error("--autocast trains a float32 model: use it without --dtype")
    if (args.autocast == "float16" and args.device == "cpu"
            and (args.compare or args.backend == "torch")):
        parser.error("--autocast float16: torch.nn.LSTM does not run under float16 autocast on "
                     "the CPU (oneDNN refuses it); use it with --backend ext only")
    if args.target_loss is None:  # a low-precision model's loss stops improving sooner
        args.target_loss = 1e-3 if args.autocast or args.dtype != "float32" else 1e-4
    outputs = [("--save", args.save), ("--json", args.json)]
    if not args.no_plot:
        outputs.append(("--plot", args.plot))
    for option, path in outputs:
        problem = writable_path_problem(path) if path else None
        if problem:
            parser.error(f"{option} {path}: cannot write there: {problem}")
    return parser, args


def saved_sizes(state: dict) -> Optional[Tuple[int, int]]:
    """(hidden size, layers) of the SinCosModel a state_dict was saved from, if it is one."""
    weight_hh = state.get("lstm.weight_hh_l0")
    if not isinstance(weight_hh, torch.Tensor) or weight_hh.dim() != 2:
        return None
    layers = sum(1 for key in state if key.startswith("lstm.weight_ih_l"))
    return weight_hh.shape[1], layers


def load_state(path: str, hidden: int, layers: int, device: str) -> dict:
    """The state_dict in `path`, checked against the model this run builds; ValueError otherwise,
    with a message that says what does not match and what to do."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        reason = str(exc).split(". ")[0].strip() or type(exc).__name__
        raise ValueError("not a file written by torch.save (as --save writes): torch.load "
                         f"failed: {type(exc).__name__}: {reason}") from None
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state_dict (a dict of parameter "
                         "names to tensors, as --save writes)")
    sizes = saved_sizes(state)
    if sizes is not None and sizes != (hidden, layers):
        raise ValueError(f"it holds a model with hidden size {sizes[0]} and {sizes[1]} layer(s), "
                         f"but this run builds hidden size {hidden} and {layers} layer(s): pass "
                         f"--hidden {sizes[0]} --layers {sizes[1]}")
    expected = SinCosModel("torch", hidden, layers).state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError("not a state_dict of this model (LSTM + Linear): "
                         + "; ".join(f"{what} keys: {', '.join(keys)}" for what, keys in
                                     (("missing", missing), ("unexpected", unexpected)) if keys))
    wrong = [f"{key} is {list(state[key].shape)}, expected {list(value.shape)}"
             for key, value in expected.items()
             if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape]
    if wrong:
        raise ValueError("shapes differ from this model's: " + "; ".join(wrong))
    return state


def build_model(backend: str, args, state: Optional[dict]) -> SinCosModel:
    torch.manual_seed(args.seed)  # same seed, same initial weights on both backends
    options = ({"zoneout": args.zoneout, "recurrent_dropout": args.recurrent_dropout,
                "layer_norm": args.layer_norm} if backend == "ext" else {})
    model = SinCosModel(backend, args.hidden, args.layers, **options).to(args.device,
                                                                          DTYPES[args.dtype])
    if state is not None:
        model.load_state_dict(state)
    return model


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    data = make_dataset()
    start = None
    if args.load:
        try:
            start = load_state(args.load, args.hidden, args.layers, args.device)
        except ValueError as exc:  # one line, exit 2
            parser.error(f"--load {args.load}: {exc}")

    backends = ["ext", "torch"] if args.compare else [args.backend]
    results: Dict[str, Result] = {}
    predictions: Dict[str, Dict[str, np.ndarray]] = {}
    for backend in backends:
        model = build_model(backend, args, start)
        if not args.quiet:
            print(f"{BACKEND_NAMES[backend]}: {model}".replace("\n", "\n  "))
        results[backend], _ = train(model, data, args, backend)
        predictions[backend] = {"train": predict(model, data, "train", args),
                                "test": predict(model, data, "test", args)}
        r = results[backend]
        print(f"{BACKEND_NAMES[backend]}: {r.epochs} epochs, final loss {r.final_loss:.3e}, "
              f"test MSE {r.test_mse:.3e}, {r.seconds:.2f} s "
              f"({1e3 * r.seconds / r.epochs:.3f} ms/epoch)"
              + ("" if r.final_loss < args.target_loss else
                 f"; did not reach loss {args.target_loss:g}"))
        if args.quantize:
            r.int8_test_mse = evaluate(quantize_dynamic(model), data, args)
            print(f"{BACKEND_NAMES[backend]} in int8 (lstm_ext.quantize_dynamic): test MSE "
                  f"{r.int8_test_mse:.3e} (float32: {r.test_mse:.3e})")
        if args.save:
            torch.save(model.state_dict(), args.save)
    if args.compare:
        print(compare_table(results, f"autocast {args.autocast}" if args.autocast else args.dtype))
    if not args.no_plot:
        plot(args.plot, data, predictions, results)
        print(f"plot written to {args.plot}")
    if args.json:
        summary = {b: asdict(r) for b, r in results.items()}
        with open(args.json, "w") as f:
            json.dump(summary if args.compare else summary[backends[0]], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
