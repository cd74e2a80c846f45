"""Time lstm_ext.LSTM against torch.nn.LSTM on the same weights and inputs.

The two are interleaved in one process (A B A B ...) after a warm-up, so drift and noise on a shared
machine hit both alike; each figure is the median over rounds. Two modes per shape:
  forward   forward under torch.no_grad()
  fwd+bwd   forward, then torch.autograd.backward((out, h_n, c_n), fixed gradients)

    python benchmarks/bench_lstm.py                 # default shapes, CPU
    python benchmarks/bench_lstm.py --quick         # a few seconds, smoke test
    python benchmarks/bench_lstm.py --shapes 20,5,1,16 100,32,64,128 --csv out.csv --plot out.png
    python benchmarks/bench_lstm.py --shapes 50,16,64,128,2,bi     # 2 layers, bidirectional
    python benchmarks/bench_lstm.py --isa avx2      # as on an AVX2-only CPU (both sides capped)
    python benchmarks/bench_lstm.py --dtype int8    # lstm_ext.quantize_dynamic vs float32 nn.LSTM,
                                                    # and torch's int8 LSTM (forward only)

A shape is T,B,I,H[,layers[,bi]]. Every table and CSV names the CPU and the instruction-set cap.
"""

import argparse
import contextlib
import csv
import os
import statistics
import subprocess
import sys
import time

import warnings

import torch

import lstm_ext
from lstm_ext.__main__ import cpu_name

# (T, B, I, H, layers, bidirectional): the sin->cos trainer's shape first, then growing work per
# step, then a stacked bidirectional LSTM.
DEFAULT_SHAPES = [(20, 5, 1, 16, 1, False), (100, 1, 128, 128, 1, False),
                  (200, 8, 32, 64, 1, False), (100, 32, 64, 128, 1, False),
                  (100, 64, 256, 256, 1, False), (50, 128, 512, 512, 1, False),
                  (50, 16, 64, 128, 2, True)]
QUICK_SHAPES = [(20, 5, 1, 16, 1, False), (50, 8, 32, 64, 2, True)]


def parse_shape(text):
    parts = text.split(",")
    bidirectional = len(parts) == 6 and parts[5] == "bi"
    try:
        sizes = tuple(int(p) for p in parts[:5])
    except ValueError:
        sizes = ()
    if not (4 <= len(parts) <= 6 and len(sizes) == min(len(parts), 5) and min(sizes) >= 1
            and (len(parts) < 6 or bidirectional)):
        raise argparse.ArgumentTypeError(
            f"a shape is T,B,I,H[,layers[,bi]] with positive sizes, got {text!r}")
    layers = sizes[4] if len(sizes) == 5 else 1
    return sizes[:4] + (layers, bidirectional)


def shape_label(shape):
    T, B, I, H, layers, bidirectional = shape
    extra = (f" L{layers}" if layers > 1 else "") + (" bi" if bidirectional else "")
    return f"({T}, {B}, {I}, {H}){extra}"


def machine_name():
    return cpu_name()  # the CPU's model name, as python -m lstm_ext prints it


def flops(T, B, I, H, layers, bidirectional, backward):
    """Multiply-adds x 2 of the GEMMs (the gate math is O(T B H), negligible at these sizes)."""
    d = 2 if bidirectional else 1
    forward = sum(2 * T * B * 4 * H * ((I if layer == 0 else d * H) + H) * d
                  for layer in range(layers))
    # backward: dx, dW_ih, dW_hh and the recurrent dh = 2x the forward GEMM work
    return forward * (3 if backward else 1)


# The switches PyTorch's libraries honour to stay below an instruction set (ATen's kernels and
# lstm_ext's own vector code, oneDNN: nn.LSTM's RNN primitive and brgemm, MKL, FBGEMM: the int8
# products of torch's and lstm_ext's int8 LSTMs): a CPU class emulated on a newer CPU, for
# nn.LSTM and lstm_ext alike. They only lower: avx512 on an AVX2 CPU runs AVX2. Read when the
# libraries load, so they are set in a child process.
ISA_CAPS = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
}
ISA_ENV = "LSTM_EXT_BENCH_ISA"  # set in the child that runs under the caps


def run_under_isa(isa, argv):
    """Runs this script again with isa's caps in its environment; returns its exit code."""
    env = dict(os.environ, **ISA_CAPS[isa], **{ISA_ENV: isa})
    return subprocess.call([sys.executable, os.path.abspath(__file__), *argv], env=env)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Case:
    """One shape's models and inputs; run(model) does one timed unit of work. dtype: the models'
    and inputs' dtype; autocast: float32 models and inputs run under torch.autocast(device,
    autocast) instead (the low-precision training of a float32 model)."""

    def __init__(self, T, B, I, H, layers, bidirectional, device, backward, dtype="float32",
                 autocast=None):
        torch.manual_seed(0)
        options = dict(num_layers=layers, bidirectional=bidirectional, device=device)
        self.reference = torch.nn.LSTM(I, H, **options)
        self.others = {}  # more models timed alongside: name -> model
        if dtype == "int8":  # int8 against float32 nn.LSTM, and torch's own int8 LSTM
            self.ours = lstm_ext.quantize_dynamic(self.reference.eval())
            self.others["torch_int8"] = torch_int8_lstm(self.reference)
            dtype = "float32"
        else:
            self.ours = lstm_ext.LSTM(I, H, **options)
            self.ours.load_state_dict(self.reference.state_dict())
            self.ours.to(DTYPES[dtype])
        self.reference.to(DTYPES[dtype])
        self.x = torch.randn(T, B, I, device=device, dtype=DTYPES[dtype])
        d = 2 if bidirectional else 1
        grad_dtype = DTYPES[autocast] if autocast else DTYPES[dtype]  # the outputs' dtype
        self.grads = (torch.randn(T, B, d * H, device=device, dtype=grad_dtype),
                      torch.randn(layers * d, B, H, device=device, dtype=grad_dtype),
                      torch.randn(layers * d, B, H, device=device, dtype=grad_dtype))
        self.backward = backward
        self.autocast = (torch.autocast(device, dtype=DTYPES[autocast]) if autocast
                         else contextlib.nullcontext())

    def run(self, model):
        with self.autocast:
            if self.backward:
                out, (h, c) = model(self.x)
                torch.autograd.backward((out, h, c), self.grads)
            else:
                with torch.no_grad():
                    model(self.x)


def torch_int8_lstm(model):
    """torch.ao.quantization.quantize_dynamic's int8 LSTM of `model` (it swaps submodules only)."""
    holder = torch.nn.Sequential(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        return torch.ao.quantization.quantize_dynamic(holder, {torch.nn.LSTM},
                                                      dtype=torch.qint8)[0]


def make_timer(device):
    if device == "cuda":
        def timed(fn):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return timed


def measure(case, timed, min_seconds, max_rounds, warmup):
    for _ in range(warmup):
        case.run(case.reference)
        case.run(case.ours)
        for model in case.others.values():
            case.run(model)
    theirs, ours, others = [], [], {name: [] for name in case.others}
    deadline = time.perf_counter() + min_seconds
    while len(ours) < max_rounds and (len(ours) < 5 or time.perf_counter() < deadline):
        theirs.append(timed(lambda: case.run(case.reference)))
        ours.append(timed(lambda: case.run(case.ours)))
        for name, model in case.others.items():
            others[name].append(timed(lambda: case.run(model)))
    return (statistics.median(theirs), statistics.median(ours), len(ours),
            {name: statistics.median(times) for name, times in others.items()})


def peak_memory_mb(case, model):
    """Peak extra CPU memory of one run (torch's allocator is the system's: measured with the
    profiler). Every allocation and free the profiler records, in time order, on any thread: an
    op's totals would place a free at the op's end and miss frees, on the calling thread, of
    memory a worker thread allocated (the two directions of a bidirectional layer run on two
    threads)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.run(model)
    timeline = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]")
    peak = current = 0
    for _, nbytes in timeline:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, help="T,B,I,H ...")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke test)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per shape and mode")
    parser.add_argument("--modes", nargs="+", choices=["forward", "fwd+bwd"],
                        help="default: both (int8: forward)")
    parser.add_argument("--dtype", choices=sorted(DTYPES) + ["int8"], default="float32",
                        help="the models' and inputs' dtype (default: %(default)s); int8: "
                             "lstm_ext.quantize_dynamic's model against float32 nn.LSTM and "
                             "torch's int8 LSTM, forward only")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"],
                        help="float32 models and inputs under torch.autocast to this dtype")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: allow TF32 in both cuDNN and cuBLAS (default: off for both, so "
                             "that float32 is compared like for like)")
    parser.add_argument("--memory", action="store_true", help="also report peak memory (CPU)")
    parser.add_argument("--csv", help="write the table as CSV")
    parser.add_argument("--plot", help="plot speedup per shape to this PNG (from the table)")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), default="native",
                        help="cap the instruction set of both sides (a child process with the "
                             "caps of ISA_CAPS set; default: %(default)s)")
    args = parser.parse_args(argv)
    if args.isa != "native" and os.environ.get(ISA_ENV) != args.isa:
        sys.exit(run_under_isa(args.isa, sys.argv[1:] if argv is None else argv))

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.autocast and args.dtype != "float32":
        parser.error("--autocast runs float32 models: use it without --dtype")
    if args.dtype == "int8":
        if args.device != "cpu":
            parser.error("--dtype int8: the int8 kernels are the CPU's")
        if args.modes and "fwd+bwd" in args.modes:
            parser.error("--dtype int8 is inference only: --modes forward")
    args.modes = args.modes or (["forward"] if args.dtype == "int8" else ["forward", "fwd+bwd"])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":  # cuDNN allows TF32 by default, cuBLAS does not: the same for both
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    seconds = 0.2 if args.quick else args.seconds
    max_rounds = 20 if args.quick else 1000
    warmup = 2 if args.quick else 5
    timed = make_timer(args.device)

    device_name = (torch.cuda.get_device_name() if args.device == "cuda" else machine_name())
    precision = f"autocast {args.autocast}" if args.autocast else args.dtype
    tf32 = f"; TF32 {'on' if args.tf32 else 'off'}" if args.device == "cuda" else ""
    isa = (f"; isa {args.isa} (torch CPU capability {torch.backends.cpu.get_cpu_capability()})"
           if args.device == "cpu" else "")
    print(f"# {device_name}{isa}; torch {torch.__version__}; threads "
          f"{torch.get_num_threads()}; {precision}{tf32}; lstm_ext {lstm_ext.__version__} "
          f"{lstm_ext.build_info}")
    header = ["device", "isa", "T", "B", "I", "H", "layers", "bidirectional", "mode", "precision",
              "tf32",
              "nn_lstm_ms", "lstm_ext_ms", "speedup", "lstm_ext_gflops", "rounds"]
    if args.dtype == "int8":
        header += ["torch_int8_ms", "speedup_vs_torch_int8"]
    if args.memory:
        header += ["nn_lstm_peak_mb", "lstm_ext_peak_mb"]
    print(f"{'shape (T,B,I,H)':<26} {'mode':<8} {'nn.LSTM ms':>11} {'lstm_ext ms':>12} "
          f"{'speedup':>8} {'GFLOP/s':>8}" + ("   peak MB nn / ext" if args.memory else "")
          + ("   torch int8 ms, speedup" if args.dtype == "int8" else ""))
    rows = []
    for shape in shapes:
        for mode in args.modes:
            case = Case(*shape, args.device, backward=(mode == "fwd+bwd"), dtype=args.dtype,
                        autocast=args.autocast)
            theirs, ours, rounds, others = measure(case, timed, seconds, max_rounds, warmup)
            gflops = flops(*shape, case.backward) / ours / 1e9
            row = dict(zip(header, [device_name, args.isa if args.device == "cpu" else "", *shape,
                                    mode, precision, args.device == "cuda" and args.tf32,
                                    theirs * 1e3, ours * 1e3, theirs / ours, gflops, rounds]))
            line = (f"{shape_label(shape):<26} {mode:<8} {theirs * 1e3:>11.3f} {ours * 1e3:>12.3f} "
                    f"{theirs / ours:>7.2f}x {gflops:>8.1f}")
            if args.memory and args.device == "cpu":
                row["nn_lstm_peak_mb"] = peak_memory_mb(case, case.reference)
                row["lstm_ext_peak_mb"] = peak_memory_mb(case, case.ours)
                line += f"   {row['nn_lstm_peak_mb']:.1f} / {row['lstm_ext_peak_mb']:.1f}"
            if "torch_int8" in others:
                row["torch_int8_ms"] = others["torch_int8"] * 1e3
                row["speedup_vs_torch_int8"] = others["torch_int8"] / ours
                line += f"   {row['torch_int8_ms']:>9.3f} {row['speedup_vs_torch_int8']:>6.2f}x"
            print(line, flush=True)
            rows.append(row)

    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot, f"lstm_ext vs nn.LSTM, {device_name}, isa {args.isa}, "
                              f"{torch.get_num_threads()} threads, {precision}")
    return rows


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    key = lambda r: (r["T"], r["B"], r["I"], r["H"], r["layers"], r["bidirectional"])  # noqa: E731
    shapes = list(dict.fromkeys(key(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(shapes)), 4))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        speed = {key(r): r["speedup"] for r in rows if r["mode"] == mode}
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(shapes))]
        bars = ax.bar(xs, [speed.get(s, 0) for s in shapes], width, label=mode)
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(shapes)), [shape_label(s) for s in shapes], rotation=20, fontsize=8)
    ax.set_xlabel("shape (T, B, I, H)")
    ax.set_ylabel("speedup over nn.LSTM (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
