"""Benchmark of pixel_shuffle_projector (issue 4, target 1; CPU: issue 12).

Long-VITA shape: x [N, 1024, 1024] -> [N, 256, 5120] (LayerNorm 4096, Linear 4096->1024, GELU, Linear
1024->5120, no biases), N = 64 and 1024 tiles, bf16. CPU runs (--device cpu without --quick): N = 8
tiles of [1024, 256] -> [256, 512] via a 1024-wide hidden layer, the --dtype given. Modes: fwd,
fwd_bwd (gradients of x and every weight). Providers:
  ours     vita_ext.pixel_shuffle_projector (its device default: CPU keeps the activations for the
           backward, as eager autograd does; CUDA recomputes them)
  ours_recompute  the same with recompute=True (CPU only, fwd_bwd: less memory, one more GEMM)
  eager    what users run today (HF InternVL): the shuffle as two permute-copies, then LayerNorm, Linear,
           GELU, Linear as separate PyTorch ops
  compile  torch.compile of eager
  gemm     the projector's two GEMMs alone on pre-shuffled, pre-normalised inputs (fwd only, CUDA): the
           same-run "plain bf16 GEMM of the same FLOPs" ceiling
Metrics: time (ms p20/p50/p80), TFLOP/s (2*M*(4C*D1 + D1*D2) per fwd, 3x that for fwd_bwd, M = N*L/4),
GB/s of the minimal traffic (x in, y out, weights), peak memory (CUDA), speedup_vs_eager/compile,
frac_of_gemm (ours TFLOP/s / gemm TFLOP/s) and frac_of_peak (vs an 8192^3 GEMM in the same run). On the
CPU providers run interleaved and speedups are paired per round (``Bench.time_group``).
Targets: fwd >= 1.5x eager and >= 1.2x compile; fwd_bwd >= 1.3x eager; frac_of_gemm >= 0.6; CPU: fwd
and fwd_bwd >= 1.0x eager, fp32 and bf16.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

import _common
from _common import Bench, grad_fn, leaf

import vita_ext  # noqa: E402

OP = "pixel_shuffle_projector"


def pixel_shuffle_two_copies(x: torch.Tensor) -> torch.Tensor:
    """InternVL's v2 pixel shuffle as users write it: [N, L, C] -> [N, L/4, 4C] through two permute-copies."""
    n, length, c = x.shape
    g = math.isqrt(length)
    h = x.view(n, g, g // 2, 2 * c).permute(0, 2, 1, 3).contiguous()
    h = h.view(n, g // 2, g // 2, 4 * c).permute(0, 2, 1, 3).contiguous()
    return h.view(n, length // 4, 4 * c)


def eager(x, ln_weight, ln_bias, w1, w2, eps: float = 1e-5):
    h = pixel_shuffle_two_copies(x)
    h = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)
    return F.linear(F.gelu(F.linear(h, w1)), w2)


def ours(x, ln_weight, ln_bias, w1, w2, eps: float = 1e-5):
    return vita_ext.pixel_shuffle_projector(x, ln_weight, ln_bias, w1, w2, eps)


def ours_recompute(x, ln_weight, ln_bias, w1, w2, eps: float = 1e-5):
    return vita_ext.pixel_shuffle_projector(x, ln_weight, ln_bias, w1, w2, eps, recompute=True)


def two_gemms(a, w1, h, w2):
    return torch.mm(a, w1.t()), torch.mm(h, w2.t())


def make_inputs(n, length, c, d1, d2, dtype, device, sets):
    def one():
        return (torch.randn(n, length, c, device=device).to(dtype),
                (1 + 0.1 * torch.randn(4 * c, device=device)).to(dtype),
                (0.1 * torch.randn(4 * c, device=device)).to(dtype),
                (torch.randn(d1, 4 * c, device=device) / math.sqrt(4 * c)).to(dtype),
                (torch.randn(d2, d1, device=device) / math.sqrt(d1)).to(dtype))
    return [one() for _ in range(sets)]


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--tiles", default=None, help="comma-separated N (default 64,1024; CPU 8; quick 2,3)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    args = p.parse_args(argv)
    b = Bench(OP, args)
    cpu = b.device.type == "cpu"
    if args.quick:
        length, c, d1, d2, tiles = 64, 16, 24, 40, args.tiles or "2,3"
    elif cpu:
        length, c, d1, d2, tiles = 1024, 256, 1024, 512, args.tiles or "8"
    else:
        length, c, d1, d2, tiles = 1024, 1024, 1024, 5120, args.tiles or "64,1024"
    modes = args.modes.split(",")
    peak = None if cpu else b.device_peak()
    eager_c = b.compiled(eager) if b.compile_on else None
    for n in _common.ints(tiles):
        x_label = b.label(f"N={n}")
        m = n * length // 4
        flops = 2.0 * m * (4 * c * d1 + d1 * d2)
        elt = torch.finfo(b.dtype).bits // 8
        nbytes = elt * (n * length * c + m * d2 + 4 * c * d1 + d1 * d2 + 8 * c)
        sets = make_inputs(n, length, c, d1, d2, b.dtype, b.device, _common.rotations(elt * n * length * c, b.device))
        first = sets[0]
        ref = ours(*first)
        b.check("eager", x_label, lambda: eager(*first), ref)
        if eager_c is not None:
            b.check("compile", x_label, lambda: eager_c(*first), ref)
        del ref
        fns = {"ours": ours, "eager": eager, "compile": eager_c}
        if "fwd" in modes:
            if cpu:
                b.time_group("fwd", x_label, fns, sets, flops=flops, nbytes=nbytes)
            else:
                for name, fn in fns.items():
                    if fn is None:
                        continue
                    b.time(name, "fwd", x_label, fn, sets, flops=flops, nbytes=nbytes)
                    b.memory(name, "fwd", x_label, lambda: fn(*first))
                a = torch.randn(m, 4 * c, device=b.device).to(b.dtype)
                h = torch.randn(m, d1, device=b.device).to(b.dtype)
                b.time("gemm", "fwd", x_label, two_gemms, [(a, first[3], h, first[4])], flops=flops)
                del a, h
                gemm = b.value("gemm", "fwd", "tflops", x_label)
                for base in ("eager", "compile"):
                    b.speedup("fwd", x_label, "ours", base)
                b.fraction("fwd", x_label, "ours", "tflops", gemm, "frac_of_gemm")
                b.fraction("fwd", x_label, "ours", "tflops", peak, "frac_of_peak")
        if "fwd_bwd" in modes:
            gsets = [tuple(leaf(t) for t in s) + (torch.randn(n, length // 4, d2, device=b.device).to(b.dtype),)
                     for s in sets]
            if cpu:
                runs = {name: grad_fn(fn, range(5)) for name, fn in
                        {**fns, "ours_recompute": ours_recompute}.items() if fn is not None}
                b.time_group("fwd_bwd", x_label, runs, gsets, ours=("ours", "ours_recompute"), flops=3 * flops)
            else:
                gemm = b.value("gemm", "fwd", "tflops", x_label)
                for name, fn in fns.items():
                    if fn is None:
                        continue
                    run = grad_fn(fn, range(5))
                    b.time(name, "fwd_bwd", x_label, run, gsets, flops=3 * flops, nbytes=None)
                    b.memory(name, "fwd_bwd", x_label, lambda: run(*gsets[0]))
                for base in ("eager", "compile"):
                    b.speedup("fwd_bwd", x_label, "ours", base)
                b.fraction("fwd_bwd", x_label, "ours", "tflops", gemm, "frac_of_gemm")
                b.fraction("fwd_bwd", x_label, "ours", "tflops", peak, "frac_of_peak")
            del gsets
        del sets, first
        _common.free(b.device)
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
