"""Benchmark of masked_lm_head (the logits-masked LM head; see bench_prefill.py for the model-level table).

Shape: final hidden states [T = 32768, 5120], lm_head weight [152064, 5120], bf16, logits wanted at
K = 1 (the last prompt position: decode / prefill), 64 and 4096 random rows. CPU runs (--device cpu
without --quick): T = 2048, H = 256, V = 32000, K = 1 and 64, the --dtype given. Modes: fwd; fwd_bwd
when asked (--modes fwd,fwd_bwd; run_all.sh --device cpu asks). Providers:
  ours     vita_ext.masked_lm_head
  eager    F.linear(hidden[positions], weight) (= vita_ext.reference.masked_lm_head; HF logits_to_keep)
  full     F.linear(hidden, weight)[positions]: the original head, all T rows' logits, then the rows kept
           (not run on the CPU)
  compile  torch.compile of eager
Metrics: time (ms), TFLOP/s (2*K*H*V), GB/s of the minimal traffic (weight + K hidden rows + K logits
rows), peak memory, speedup_vs_<provider>; at K = 1 time_vs_floor = time / (bytes / same-run copy GB/s)
(reading the 1.56 GB weight bounds it). On the CPU providers run interleaved and speedups are paired
per round (``Bench.time_group``).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import _common
from _common import Bench, grad_fn, leaf

import vita_ext  # noqa: E402
from vita_ext import reference

OP = "masked_lm_head"


def ours(h, w, positions):
    return vita_ext.masked_lm_head(h, w, positions)


def eager(h, w, positions):
    return reference.masked_lm_head(h, w, positions)


def full(h, w, positions):
    return F.linear(h, w)[positions]


def make_inputs(t, hidden, vocab, k, dtype, device, sets):
    def one():
        positions = (torch.tensor([-1], device=device) if k == 1
                     else torch.randperm(t, device=device)[:k].sort().values)
        return (torch.randn(t, hidden, device=device).to(dtype),
                (0.02 * torch.randn(vocab, hidden, device=device)).to(dtype), positions)
    return [one() for _ in range(sets)]


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="T rows of hidden states (default 32768; CPU 2048; quick 64)")
    p.add_argument("--keep", default=None, help="comma-separated K rows kept (default 1,64,4096; CPU 1,64; quick 1,5)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 5120; CPU 256; quick 32)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 152064; CPU 32000; quick 1003)")
    p.add_argument("--modes", default="fwd")
    args = p.parse_args(argv)
    b = Bench(OP, args)
    cpu = b.device.type == "cpu"
    t = args.tokens or (64 if args.quick else 2048 if cpu else 32768)
    hidden = args.hidden or (32 if args.quick else 256 if cpu else 5120)
    vocab = args.vocab or (1003 if args.quick else 32000 if cpu else 152064)
    keeps = _common.ints(args.keep or ("1,5" if args.quick else "1,64" if cpu else "1,64,4096"))
    modes = args.modes.split(",")
    elt = torch.finfo(b.dtype).bits // 8
    weight_bytes = vocab * hidden * elt
    copy = None if cpu else b.copy_peak(weight_bytes)
    providers = {"ours": ours, "eager": eager, "full": None if cpu else full,
                 "compile": b.compiled(eager) if b.compile_on else None}
    providers = {k: v for k, v in providers.items() if v is not None}
    for k in keeps:
        x = b.label(f"K={k}")
        sets = make_inputs(t, hidden, vocab, k, b.dtype, b.device,
                           _common.rotations(weight_bytes + t * hidden * elt, b.device))
        first = sets[0]
        ref = ours(*first)
        for name, fn in providers.items():
            if name != "ours":
                b.check(name, x, lambda: fn(*first), ref)
        del ref
        flops = 2.0 * k * hidden * vocab
        nbytes = weight_bytes + k * (hidden + vocab) * elt
        if "fwd" in modes:
            if cpu:
                b.time_group("fwd", x, providers, sets, flops=flops, nbytes=nbytes)
            else:
                for name, fn in providers.items():
                    b.time(name, "fwd", x, fn, sets, flops=flops, nbytes=nbytes)
                    b.memory(name, "fwd", x, lambda: fn(*first))
                for base in providers:
                    if base != "ours":
                        b.speedup("fwd", x, "ours", base)
                ms = b.value("ours", "fwd", "time", x)
                if k == 1 and ms and copy:
                    b.row("ours", "fwd", "time_vs_floor", "x", x, ms / (nbytes / (copy * 1e9) * 1e3))
        if "fwd_bwd" in modes:
            gsets = [(leaf(h), leaf(w), pos, torch.randn(k, vocab, device=b.device).to(b.dtype))
                     for h, w, pos in sets]
            runs = {name: grad_fn(fn, (0, 1)) for name, fn in providers.items()}
            if cpu:
                b.time_group("fwd_bwd", x, runs, gsets, flops=3 * flops)
            else:
                for name, run in runs.items():
                    b.time(name, "fwd_bwd", x, run, gsets, flops=3 * flops)
                    b.memory(name, "fwd_bwd", x, lambda: run(*gsets[0]))
                for base in providers:
                    if base != "ours":
                        b.speedup("fwd_bwd", x, "ours", base)
            del gsets
        del sets, first
        _common.free(b.device)
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
