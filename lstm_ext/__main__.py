"""`python -m lstm_ext`: show what this installation was built with and what it runs on this CPU,
and check it against nn.LSTM.

Runs a 2-layer lstm_ext.LSTM and a torch.nn.LSTM with the same weights on the same random batch,
forward and backward, and prints the largest relative difference of outputs and gradients.
"""

import platform
import sys

import torch

import lstm_ext
from lstm_ext._ops import _C


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    print(f"lstm_ext {lstm_ext.__version__}: {lstm_ext.build_info}")
    print(f"CPU: {cpu_name()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; lstm_ext's vector code: {_C.vector_code()}")
    for dtype, backend in _C.gemm_backends():
        print(f"  {dtype} step products: {backend}")
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
    print("GEMM backends this run chose (size class: backend, how):")
    for size_class, backend, how in _C.gemm_choices():
        print(f"  {size_class}: {backend} ({how})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
