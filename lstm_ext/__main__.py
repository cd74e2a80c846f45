"""`python -m lstm_ext`: show what this installation was built with, and check it against nn.LSTM.

Runs a 2-layer lstm_ext.LSTM and a torch.nn.LSTM with the same weights on the same random batch,
forward and backward, and prints the largest relative difference of outputs and gradients.
"""

import sys

import torch

import lstm_ext


def main() -> int:
    print(f"lstm_ext {lstm_ext.__version__}: {lstm_ext.build_info}")
    torch.manual_seed(0)
    T, B, I, H = 20, 5, 1, 16
    reference = torch.nn.LSTM(I, H, num_layers=2, dtype=torch.float64)
    ours = lstm_ext.LSTM(I, H, num_layers=2, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    worst = 0.0
    results = []
    for model in (reference, ours):
        model.zero_grad()
        out, (h, c) = model(x)
        (out.square().sum() + h.sum() + c.sum()).backward()
        results.append([out, h, c] + [p.grad for p in model.parameters()])
    for expected, actual in zip(*results):
        worst = max(worst, ((actual - expected).abs().max() / expected.abs().max()).item())
    ok = worst < 1e-10
    print(f"LSTM(1, 16, num_layers=2), T={T}, B={B}, float64: outputs and all gradients match "
          f"nn.LSTM to {worst:.1e} relative: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
