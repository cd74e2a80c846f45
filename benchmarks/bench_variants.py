"""Time lstm_ext.LSTM's options beyond nn.LSTM (reset, zoneout, recurrent_dropout, layer_norm)
against what a user would otherwise write, forward + backward, float32, in training mode:

  reference   lstm_ext.reference (plain PyTorch, one small op after another per step), eager,
              drawing its masks with torch.bernoulli as the module does
  compiled    torch.compile of that same function (--compiled; compiling unrolls every step, which
              takes minutes at T = 100)
  plain       lstm_ext.LSTM without the option: what the option costs on top

Candidates run in one process, interleaved (A B A B ...) after a warm-up; each figure is the
median over rounds, in milliseconds. The option's cost (lstm_ext with it against without) is
measured in its own interleaved loop; the speedups over the reference (and the compiled one) in
another, lstm_ext beside them. In a table row, "lstm_ext" is the first loop's figure.

    python benchmarks/bench_variants.py                     # both shapes, eager reference
    python benchmarks/bench_variants.py --compiled          # also torch.compile of the reference
    python benchmarks/bench_variants.py --shapes 20,5,1,16 --rounds 50
    python benchmarks/bench_variants.py --options layer_norm "layer_norm + all three"
"""

import argparse
import statistics
import time

import torch

import lstm_ext
from lstm_ext.reference import lstm_reference

DEFAULT_SHAPES = [(20, 5, 1, 16), (100, 32, 64, 128)]
OPTIONS = {
    "reset": dict(),
    "zoneout": dict(zoneout=0.1),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "all three": dict(zoneout=0.1, recurrent_dropout=0.25),
    "layer_norm": dict(layer_norm=True),
    "layer_norm + all three": dict(layer_norm=True, zoneout=0.1, recurrent_dropout=0.25),
}
RESET_RATE = 0.05  # a new sequence starts at 5% of the (step, row) pairs, where reset is used


def parse_shape(text):
    sizes = tuple(int(p) for p in text.split(","))
    if len(sizes) != 4 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"a shape is T,B,I,H with positive sizes, got {text!r}")
    return sizes


def reference_function(model, with_reset):
    """The option as plain PyTorch: draw the masks, then lstm_ext.reference's loop."""
    params = [getattr(model, n) for n in model._flat_weights_names]
    (p_c, p_h), p_r = model.zoneout, model.recurrent_dropout
    H = model.hidden_size

    def run(x, h0, c0, reset):
        T, B = x.shape[:2]
        zoneout = []
        if p_c or p_h:
            zoneout = [torch.empty(T, B, H, dtype=torch.bool).bernoulli_(p_c) if p_c else None,
                       torch.empty(T, B, H, dtype=torch.bool).bernoulli_(p_h) if p_h else None]
        recurrent = ([torch.empty(B, H, dtype=x.dtype).bernoulli_(1 - p_r).div_(1 - p_r)]
                     if p_r else [])
        return lstm_reference(x, h0, c0, params, True, False, 1, False, None, [], zoneout,
                              recurrent, reset if with_reset else None, p_c, p_h,
                              model.layer_norm)

    return run


def fwd_bwd(run, grads, params):
    out, h_n, c_n = run()
    torch.autograd.backward((out, h_n, c_n), grads)
    for p in params:
        p.grad = None


def median_ms(candidates, rounds, warmup):
    """Each round runs every candidate once, in an order rotated round by round, so that each
    follows each of the others equally often (what ran before sets the caches' state)."""
    times = {name: [] for name in candidates}
    names = list(candidates)
    for i in range(warmup + rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            call = candidates[name]
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=DEFAULT_SHAPES,
                        help="T,B,I,H")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compiled", action="store_true",
                        help="also time torch.compile of the reference (slow to compile)")
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS),
                        help="the options to time")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, float32, "
          "training; median ms over interleaved rounds")
    header = "| shape | option | lstm_ext | plain lstm_ext | option / plain | reference |"
    header += " reference / ours |" + (" compiled | compiled / ours |" if args.compiled else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for T, B, I, H in args.shapes:
        x = torch.randn(T, B, I)
        h0, c0 = torch.randn(1, B, H), torch.randn(1, B, H)
        reset = torch.rand(T, B) < RESET_RATE
        grads = (torch.randn(T, B, H), torch.randn(1, B, H), torch.randn(1, B, H))
        plain = lstm_ext.LSTM(I, H)
        for option in args.options:
            with_reset = option in ("reset", "all three", "layer_norm + all three")
            model = lstm_ext.LSTM(I, H, **OPTIONS[option])
            model.load_state_dict(plain.state_dict(), strict=False)  # layer_norm's: its own
            params = list(model.parameters()) + list(plain.parameters())
            reference = reference_function(model, with_reset)
            ours = lambda: fwd_bwd(lambda: (lambda o: (o[0], *o[1]))(  # noqa: E731
                model(x, (h0, c0), reset=reset if with_reset else None)), grads, params)
            # The option's cost: ours against plain, interleaved by themselves (the reference's
            # thousands of small tensors, run in between, would leave both with cold caches).
            cost = median_ms({"ours": ours, "plain": lambda: fwd_bwd(
                lambda: (lambda o: (o[0], *o[1]))(plain(x, (h0, c0))), grads, params)},
                args.rounds, args.warmup)
            candidates = {
                "ours": ours,
                "reference": lambda: fwd_bwd(lambda: reference(x, h0, c0, reset), grads, params),
            }
            if args.compiled:
                compiled = torch.compile(reference)
                start = time.perf_counter()
                fwd_bwd(lambda: compiled(x, h0, c0, reset), grads, params)
                compile_s = time.perf_counter() - start
                candidates["compiled"] = lambda: fwd_bwd(lambda: compiled(x, h0, c0, reset),
                                                         grads, params)
            ms = median_ms(candidates, args.rounds, args.warmup)
            row = (f"| ({T}, {B}, {I}, {H}) | {option} | {cost['ours']:.3f} | "
                   f"{cost['plain']:.3f} | {cost['ours'] / cost['plain']:.2f}x | "
                   f"{ms['reference']:.2f} | {ms['reference'] / ms['ours']:.1f}x |")
            if args.compiled:
                row += (f" {ms['compiled']:.2f} (compiled in {compile_s:.0f} s) | "
                        f"{ms['compiled'] / ms['ours']:.1f}x |")
            print(row, flush=True)


if __name__ == "__main__":
    main()
