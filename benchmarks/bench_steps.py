"""Step-by-step use, lstm_ext against torch.nn: LSTMCell steps, one-step LSTM calls carrying (h, c),
and a decoder loop of LSTMCell steps trained through (forward of every step, then backward).

Streaming inference, RL agents and seq2seq decoders call an LSTM one step at a time, so the cost of
a call is what counts. Each case times a block of back-to-back calls (a few milliseconds), blocks
of nn and of lstm_ext alternating in one process after a warm-up; the figure is the median block
divided by the calls in it.

    python benchmarks/bench_steps.py                 # every case, CSV with --csv
    python benchmarks/bench_steps.py --quick         # a few seconds, smoke test
"""

import argparse
import csv
import os
import statistics
import time

import torch
from torch import nn

import lstm_ext

from bench_lstm import machine_name


class CellSteps:
    """LSTMCell, inference: `steps` calls, each feeding the last (h, c) back."""

    def __init__(self, B, I, H, steps=50):
        self.label = f"LSTMCell step, inference, B={B}, I={I}, H={H}"
        torch.manual_seed(0)
        self.reference = nn.LSTMCell(I, H)
        self.ours = lstm_ext.LSTMCell(I, H)
        self.ours.load_state_dict(self.reference.state_dict())
        self.xs = torch.randn(steps, B, I)
        self.state = (torch.zeros(B, H), torch.zeros(B, H))
        self.calls = steps

    def run(self, cell):
        state = self.state
        with torch.no_grad():
            for x in self.xs:
                state = cell(x, state)


class LayerSteps:
    """A multi-layer LSTM called once per step with a [1, B, I] input, carrying (h, c)."""

    def __init__(self, B, I, H, layers=2, steps=16):
        self.label = f"{layers}-layer LSTM, one step per call, {steps} steps, B={B}, I={I}, H={H}"
        torch.manual_seed(0)
        self.reference = nn.LSTM(I, H, num_layers=layers)
        self.ours = lstm_ext.LSTM(I, H, num_layers=layers)
        self.ours.load_state_dict(self.reference.state_dict())
        self.xs = torch.randn(steps, 1, B, I)
        self.state = (torch.zeros(layers, B, H), torch.zeros(layers, B, H))
        self.calls = steps

    def run(self, lstm):
        state = self.state
        with torch.no_grad():
            for x in self.xs:
                _, state = lstm(x, state)


class Decoder:
    """Training through a Python loop of LSTMCell steps (a seq2seq decoder): `steps` forward
    steps, then one backward through all of them. One block = one such iteration."""

    def __init__(self, B, I, H, steps=20):
        self.label = f"LSTMCell decoder, {steps} steps fwd+bwd, B={B}, I={I}, H={H}"
        torch.manual_seed(0)
        self.reference = nn.LSTMCell(I, H)
        self.ours = lstm_ext.LSTMCell(I, H)
        self.ours.load_state_dict(self.reference.state_dict())
        self.xs = torch.randn(steps, B, I)
        self.state = (torch.zeros(B, H), torch.zeros(B, H))
        self.calls = 1

    def run(self, cell):
        h, c = self.state
        total = 0
        for x in self.xs:
            h, c = cell(x, (h, c))
            total = total + h.sum()
        total.backward()


CASES = [
    lambda: CellSteps(1, 80, 256), lambda: CellSteps(8, 128, 512), lambda: CellSteps(5, 1, 16),
    lambda: LayerSteps(1, 80, 256), lambda: LayerSteps(8, 128, 512),
    lambda: Decoder(32, 64, 256), lambda: Decoder(1, 16, 64),
]


def measure(case, seconds, warmup=3, max_rounds=2000):
    for _ in range(warmup):
        case.run(case.reference)
        case.run(case.ours)
    theirs, ours = [], []
    deadline = time.perf_counter() + seconds
    while len(ours) < max_rounds and (len(ours) < 5 or time.perf_counter() < deadline):
        for model, times in ((case.reference, theirs), (case.ours, ours)):
            start = time.perf_counter()
            case.run(model)
            times.append((time.perf_counter() - start) / case.calls)
    return statistics.median(theirs), statistics.median(ours), len(ours)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke test)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per case")
    parser.add_argument("--csv", help="write the table as CSV")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = 0.1 if args.quick else args.seconds
    print(f"# {machine_name()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"lstm_ext {lstm_ext.__version__}")
    print(f"{'case':<72} {'nn us':>9} {'lstm_ext us':>12} {'speedup':>8}")
    rows = []
    for make in CASES:
        case = make()
        theirs, ours, rounds = measure(case, seconds)
        rows.append(dict(case=case.label, nn_us=theirs * 1e6, lstm_ext_us=ours * 1e6,
                         speedup=theirs / ours, rounds=rounds, threads=torch.get_num_threads()))
        print(f"{case.label:<72} {theirs * 1e6:>9.1f} {ours * 1e6:>12.1f} {theirs / ours:>7.2f}x",
              flush=True)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
