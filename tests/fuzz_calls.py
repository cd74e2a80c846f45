"""A seeded, bounded fuzz of lstm_ext's modules and of every op in torch.ops.lstm_ext.

Each call gets odd inputs: empty dimensions (T, B, I, H or P = 0), a projection with no rows,
stride-0 and offset views, NaN / Inf, unsorted lengths, corrupted batch_sizes, bad masks, wrong
saved state, 16-bit dtypes, autocast. Every call must return or raise a Python exception; a crash
(or, in the sanitizer build, any AddressSanitizer / UBSan report) ends the process, which is what
tests/test_fuzz.py watches for by running this file in a child process.

    python tests/fuzz_calls.py --seed 0 --calls 3000      # prints one line of counts
"""

import argparse
import random
import sys
import time
import warnings

import torch
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

OPS = torch.ops.lstm_ext
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SMALL = [0, 1, 1, 2, 3, 5]  # sizes, 0 and 1 the most often


class Fuzz:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        torch.manual_seed(seed)

    # ---- odd tensors ----------------------------------------------------------------------------
    def size(self):
        return self.rng.choice(SMALL)

    def odd(self, t):
        """t, or a tensor with t's values and shape laid out oddly, or with NaN / Inf in it."""
        kind = self.rng.randrange(8)
        if kind == 0 and t.dim() > 0 and t.numel() > 0:  # stride 0 along the first dimension
            return t[:1].expand(t.shape).clone() if self.rng.random() < 0.5 else t[:1].expand(
                t.shape)
        if kind == 1:  # a storage offset
            flat = torch.empty(t.numel() + 3, dtype=t.dtype)
            flat[3:] = t.reshape(-1)
            return flat[3:].view(t.shape)
        if kind == 2 and t.dim() >= 2:  # not contiguous
            return t.transpose(0, 1).contiguous().transpose(0, 1)
        if kind == 3 and t.numel() > 0 and t.is_floating_point():
            t = t.clone()
            t.view(-1)[self.rng.randrange(t.numel())] = self.rng.choice(
                [float("nan"), float("inf"), -float("inf")])
        return t

    def rand(self, *shape, dtype=torch.float32):
        return self.odd(torch.randn(*shape).to(dtype))

    def maybe_wrong(self, shape):
        """The shape, or one of its dimensions changed (off by one, or 0)."""
        shape = list(shape)
        if shape and self.rng.random() < self.wrong_shapes:
            d = self.rng.randrange(len(shape))
            shape[d] = self.rng.choice([0, shape[d] + 1, max(shape[d] - 1, 0)])
        return shape

    def tensor(self, *shape, dtype):
        return self.rand(*self.maybe_wrong(shape), dtype=dtype)

    def batch_sizes(self, T, B):
        """A PackedSequence's batch_sizes, or a corrupted one."""
        sizes = sorted((self.rng.randint(1, max(B, 1)) for _ in range(T)), reverse=True)
        if sizes:
            sizes[0] = max(B, 1)
        kind = self.rng.randrange(6)
        if kind == 0 and sizes:
            sizes[self.rng.randrange(len(sizes))] = self.rng.choice([0, -1, B + 2])
        elif kind == 1:
            sizes = sizes[::-1]
        if kind == 2:
            return torch.tensor(sizes, dtype=torch.int32)
        return torch.tensor(sizes, dtype=torch.long).reshape(-1)

    # ---- the layer kernels ----------------------------------------------------------------------
    def layer_args(self, dtype):
        T, B, I, H = self.size(), self.size(), self.size(), self.size()
        proj = self.rng.random() < 0.4
        P = self.rng.choice([0, 1, 2]) if proj else H  # P = 0: a projection with no rows
        packed = self.rng.random() < 0.3
        if packed:
            bs = self.batch_sizes(T, B)
            rows = int(bs.clamp(min=0).sum())
            x = self.tensor(rows, I, dtype=dtype)
        else:
            bs = None
            x = self.tensor(T, B, I, dtype=dtype)
        B_ = max(B, 1) if packed else B
        bias = self.rng.random() < 0.8
        args = dict(
            input=x, h0=self.tensor(B_, P, dtype=dtype), c0=self.tensor(B_, H, dtype=dtype),
            weight_ih=self.tensor(4 * H, I, dtype=dtype),
            weight_hh=self.tensor(4 * H, P, dtype=dtype),
            bias_ih=self.tensor(4 * H, dtype=dtype) if bias else None,
            bias_hh=self.tensor(4 * H, dtype=dtype) if bias else None,
            weight_hr=self.tensor(P, H, dtype=dtype) if proj else None,
            batch_sizes=bs, reverse=self.rng.random() < 0.5)
        return args, (T, B_, H, P)

    def options(self, args, sizes, dtype):
        T, B, H, P = sizes
        rows = args["input"].shape[0] if args["batch_sizes"] is not None else T * B
        opts = {}
        if self.rng.random() < 0.3:
            opts["reset"] = self.rng.choice([
                torch.rand(*self.maybe_wrong([T, B])) < 0.3, torch.zeros(T, B)])
        if self.rng.random() < 0.3:
            opts["zoneout_c"] = self.rng.choice([0.0, 0.3, 1.0, -0.1])
            opts["zoneout_h"] = self.rng.choice([0.0, 0.3])
            if self.rng.random() < 0.5:
                opts["zoneout_mask_c"] = torch.rand(*self.maybe_wrong([rows, H])) < 0.3
                opts["zoneout_mask_h"] = torch.rand(*self.maybe_wrong([rows, P])) < 0.3
        if self.rng.random() < 0.3:
            opts["recurrent_mask"] = self.rng.choice([
                torch.rand(*self.maybe_wrong([B, P])).to(dtype), torch.rand(B, P, 2)[..., 0]])
        return opts

    def ln_params(self, H, dtype):
        return dict(ln_weight_ih=self.tensor(4 * H, dtype=dtype),
                    ln_weight_hh=self.tensor(4 * H, dtype=dtype),
                    ln_weight_c=self.tensor(H, dtype=dtype), ln_bias_c=self.tensor(H, dtype=dtype))

    def layer_op(self):
        dtype = self.rng.choice(DTYPES)
        args, sizes = self.layer_args(dtype)
        opts = self.options(args, sizes, dtype)
        layer_norm = self.rng.random() < 0.3
        ln = self.ln_params(sizes[2], dtype) if layer_norm else {}
        names = list(args)
        forward_args = dict(args)
        if layer_norm:
            forward_args = {**{k: args[k] for k in names[:8]}, **ln,
                            **{k: args[k] for k in names[8:]}}
            out = OPS.ln_lstm_layer_forward(**forward_args, keep_state=True, **opts)
        else:
            out = OPS.lstm_layer_forward(**forward_args, keep_state=True, **opts)
        output, h_n, c_n, gates, cells = out[:5]
        if self.rng.random() < 0.2:  # wrong saved state
            gates = self.rand(*self.maybe_wrong(gates.shape), dtype=gates.dtype)
            cells = cells[:-1] if cells.shape[0] else cells
        grads = dict(grad_output=self.odd(torch.randn_like(output)) if self.rng.random() < 0.8
                     else None,
                     grad_h_n=torch.randn_like(h_n) if self.rng.random() < 0.5 else None,
                     grad_c_n=torch.randn_like(c_n) if self.rng.random() < 0.5 else None)
        common = dict(input=args["input"], h0=args["h0"], c0=args["c0"],
                      weight_ih=args["weight_ih"], weight_hh=args["weight_hh"],
                      weight_hr=args["weight_hr"])
        tail = dict(batch_sizes=args["batch_sizes"], reverse=args["reverse"], output=output,
                    gates=gates, cells=cells, need_grad_input=self.rng.random() < 0.8)
        opts.pop("recurrent_mask", None) if self.rng.random() < 0.2 else None
        if layer_norm:
            OPS.ln_lstm_layer_backward(**grads, **common, **ln, **tail, norms=out[5], **opts)
        else:
            OPS.lstm_layer_backward(**grads, **common, **tail, **opts)

    def cell_op(self):
        dtype = self.rng.choice(DTYPES)
        B, I, H = self.size(), self.size(), self.size()
        bias = self.rng.random() < 0.8
        w = dict(weight_ih=self.tensor(4 * H, I, dtype=dtype),
                 weight_hh=self.tensor(4 * H, H, dtype=dtype),
                 bias_ih=self.tensor(4 * H, dtype=dtype) if bias else None,
                 bias_hh=self.tensor(4 * H, dtype=dtype) if bias else None)
        x, hx, cx = (self.tensor(B, I, dtype=dtype), self.tensor(B, H, dtype=dtype),
                     self.tensor(B, H, dtype=dtype))
        hy, cy, gates = OPS.lstm_cell_forward(x, hx, cx, **w)
        if self.rng.random() < 0.2:
            gates = self.rand(*self.maybe_wrong(gates.shape), dtype=gates.dtype)
        OPS.lstm_cell_backward(torch.randn_like(hy) if self.rng.random() < 0.7 else None,
                               torch.randn_like(cy) if self.rng.random() < 0.7 else None,
                               x, hx, cx, cy, gates, w["weight_ih"], w["weight_hh"],
                               self.rng.random() < 0.8)

    # ---- the whole-module ops and the modules ---------------------------------------------------
    def module(self):
        dtype = self.rng.choice(DTYPES)
        I, H = self.rng.choice([1, 2, 3]), self.rng.choice([1, 2, 3])
        layers = self.rng.choice([1, 1, 2])
        kwargs = dict(num_layers=layers, bias=self.rng.random() < 0.8,
                      batch_first=self.rng.random() < 0.3,
                      dropout=self.rng.choice([0.0, 0.5]) if layers > 1 else 0.0,
                      bidirectional=self.rng.random() < 0.3,
                      proj_size=self.rng.choice([0, 0, 1]) if H > 1 else 0)
        if self.rng.random() < 0.3:
            kwargs["zoneout"] = self.rng.choice([0.2, (0.0, 0.3)])
        if self.rng.random() < 0.2:
            kwargs["recurrent_dropout"] = 0.25
        if self.rng.random() < 0.2:
            kwargs["layer_norm"] = True
        lstm = lstm_ext.LSTM(I, H, dtype=dtype, **kwargs)
        if self.rng.random() < 0.5:
            lstm.eval()
        T, B = self.size(), self.size()
        reset = None
        kind = self.rng.randrange(5)
        if kind == 0:  # unbatched
            x = self.tensor(T, I, dtype=dtype)
        elif kind == 1 and B > 0 and T > 0:  # packed, lengths possibly unsorted
            lengths = torch.tensor([self.rng.randint(1, T) for _ in range(B)])
            padded = self.rand(T, B, I, dtype=dtype)
            x = pack_padded_sequence(padded, lengths, enforce_sorted=self.rng.random() < 0.3)
        else:
            shape = [B, T, I] if kwargs["batch_first"] else [T, B, I]
            x = self.tensor(*shape, dtype=dtype)
            if self.rng.random() < 0.3:
                reset = torch.rand(*self.maybe_wrong(shape[:2])) < 0.3
        x = x.requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        params = None
        if self.rng.random() < 0.3:  # weights of other shapes through functional_call
            params = dict(lstm.named_parameters())
            name = self.rng.choice(list(params))
            shape = self.maybe_wrong(params[name].shape)
            params[name] = self.rand(*shape, dtype=dtype)
            if "weight_hr" in name and self.rng.random() < 0.5:  # P = 0 (the repro)
                params[name] = torch.randn(0, H, dtype=dtype)
                params[name.replace("weight_hr", "weight_hh")] = torch.randn(4 * H, 0, dtype=dtype)
        autocast = self.rng.random() < 0.15 and dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            call = (lambda: functional_call(lstm, params, (x,), {"reset": reset})
                    if params is not None else lstm(x, reset=reset))
            out, (h, c) = call()
        data = out.data if not isinstance(out, torch.Tensor) else out
        (data.float().sum() + h.float().sum() + c.float().sum()).backward()

    def module_op(self):
        """torch.ops.lstm_ext.lstm_forward / lstm_backward (the torch.func path) directly, every
        option."""
        dtype = self.rng.choice(DTYPES)
        I, H, B, T = self.size(), self.rng.choice([0, 1, 2]), self.size(), self.size()
        layers, D = self.rng.choice([1, 2]), self.rng.choice([1, 2])
        proj, layer_norm = self.rng.random() < 0.3, self.rng.random() < 0.3
        P = self.rng.choice([0, 1]) if proj else H
        params = []
        for layer in range(layers):
            for _ in range(D):
                width = I if layer == 0 else D * P
                params += [self.tensor(4 * H, width, dtype=dtype),
                           self.tensor(4 * H, P, dtype=dtype),
                           self.tensor(4 * H, dtype=dtype), self.tensor(4 * H, dtype=dtype)]
                if proj:
                    params.append(self.tensor(P, H, dtype=dtype))
                if layer_norm:
                    params += [self.tensor(4 * H, dtype=dtype), self.tensor(4 * H, dtype=dtype),
                               self.tensor(H, dtype=dtype), self.tensor(H, dtype=dtype)]
        if self.rng.random() < 0.1:
            params = params[:-1]
        x = self.tensor(T, B, I, dtype=dtype)
        h0 = self.tensor(layers * D, B, P, dtype=dtype) if self.rng.random() < 0.5 else None
        c0 = self.tensor(layers * D, B, H, dtype=dtype) if h0 is not None else None
        flags = (True, proj, layers, self.rng.choice([0.0, 0.5]), self.rng.random() < 0.5, D == 2)
        reset = (torch.rand(T + self.rng.choice([0, 0, 1]), B) < 0.3
                 if self.rng.random() < 0.3 else None)
        options = (reset, self.rng.choice([0.0, 0.4]), self.rng.choice([0.0, 0.4]),
                   self.rng.choice([0.0, 0.4]), layer_norm)
        if self.rng.random() < 0.5:
            OPS.lstm(x, h0, c0, params, *flags, None, *options)
            return
        output, h_n, c_n, saved = OPS.lstm_forward(x, h0, c0, params, *flags, None, *options)
        if self.rng.random() < 0.2 and saved:
            saved = saved[:-1] if self.rng.random() < 0.5 else [s[:0] for s in saved]
        OPS.lstm_backward(torch.randn_like(output), None, torch.randn_like(c_n), x, h0, c0, params,
                          *flags, None, output, saved, *options)

    def cell_module(self):
        dtype = self.rng.choice(DTYPES)
        I, H, B = self.rng.choice([1, 2]), self.rng.choice([1, 3]), self.size()
        cell = lstm_ext.LSTMCell(I, H, bias=self.rng.random() < 0.8, dtype=dtype)
        x = self.tensor(B, I, dtype=dtype) if self.rng.random() < 0.7 else self.tensor(I,
                                                                                       dtype=dtype)
        hx = None
        if self.rng.random() < 0.5:
            hx = (self.tensor(*x.shape[:-1], H, dtype=dtype),
                  self.tensor(*x.shape[:-1], H, dtype=dtype))
        x.requires_grad_()
        hy, cy = cell(x, hx)
        (hy.float().sum() + cy.float().sum()).backward()

    def quantized_op(self):
        """The int8 layer (lstm_ext.quantized): the layer's float arguments with int8 weights
        (a float one at times: a wrong dtype) and row scales; reset, zoneout and layer_norm at
        times."""
        args, sizes = self.layer_args(torch.float32)
        opts = self.options(args, sizes, torch.float32)

        def int8(weight):
            if weight is None or self.rng.random() < 0.05:
                return weight
            return self.odd(torch.randint(-127, 128, tuple(weight.shape), dtype=torch.int8))

        def scales(weight):
            return None if weight is None else self.tensor(weight.shape[0], dtype=torch.float32)

        weights = [args[name] for name in ("weight_ih", "weight_hh", "weight_hr")]
        quantized = [part for w in weights for part in (int8(w), scales(w))]
        w_ih = args["weight_ih"]
        G = w_ih.shape[0] if w_ih is not None and w_ih.dim() > 0 else 0
        H = G // 4
        # layer_norm at times: its four float32 parameters (odd shapes where wrong_shapes says)
        ln = [self.tensor(n, dtype=torch.float32) for n in (G, G, H, H)] \
            if self.rng.random() < 0.3 else [None] * 4
        OPS.quantized_lstm_layer(args["input"], args["h0"], args["c0"], *quantized[:4],
                                 args["bias_ih"], *quantized[4:], args["batch_sizes"],
                                 args["reverse"], opts.get("reset"), opts.get("zoneout_c", 0.0),
                                 opts.get("zoneout_h", 0.0), *ln)

    def quantized_module(self):
        I, H = self.size() or 1, self.size() or 1
        options = dict(num_layers=self.rng.choice([1, 2]), bidirectional=self.rng.random() < 0.5,
                       bias=self.rng.random() < 0.8, proj_size=self.rng.choice([0, 0, 1]) % H)
        float_model = lstm_ext.LSTM(I, H, layer_norm=True, **options) \
            if self.rng.random() < 0.3 else torch.nn.LSTM(I, H, **options)
        model = lstm_ext.quantize_dynamic(float_model)
        model.zoneout = (self.rng.choice([0.0, 0.4]), self.rng.choice([0.0, 0.4]))
        x = self.tensor(self.size(), self.size(), I, dtype=torch.float32)
        reset = torch.rand(*x.shape[:2]) < 0.3 if self.rng.random() < 0.3 else None
        with torch.no_grad():
            model(x, reset=reset)

    def call(self):
        # Half the calls have every shape right (odd sizes, layouts and values only).
        self.wrong_shapes = self.rng.choice([0.0, 0.1])
        kind = self.rng.choice([self.layer_op, self.layer_op, self.cell_op, self.module,
                                self.module, self.module_op, self.cell_module, self.quantized_op,
                                self.quantized_module])
        kind()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--verbose", action="store_true", help="print each call's exception")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    fuzz = Fuzz(args.seed)
    returned = raised = 0
    errors = {}
    start = time.perf_counter()
    for i in range(args.calls):
        try:
            fuzz.call()
            returned += 1
        except Exception as e:  # a Python exception is an answer; only a crash is a failure
            raised += 1
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            if args.verbose:
                print(f"call {i}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    seconds = time.perf_counter() - start
    print(f"fuzz seed {args.seed}: {args.calls} calls, {returned} returned, {raised} raised "
          f"{dict(sorted(errors.items()))} in {seconds:.1f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
