"""Accuracy of attention on the CPU per backend, against the project's rule (issue 10's fp32 decision).

For fresh random draws (q, k, v, dout ~ N(0, 1), rounded to the dtype; the float64 reference starts
from the rounded inputs), each backend's error max|x - ref64| over out, lse, dq, dk, dv is divided by
the error of plain PyTorch (vita_ext.reference, autograd) at the same dtype. The project's rule is
error <= 2x plain PyTorch's plus one ulp of the reference's magnitude. Providers: ``flash`` (PyTorch's CPU flash
kernel, forward and backward), ``vita`` (vita_ext's kernels). Cases: S in --seqlens (square, causal and
not, alternating), 4/2 heads, D in --head-dims, default scale. Rows (op "attention_accuracy", mode =
dtype, metric err_ratio_<tensor> with p20/p50/p80 over the draws, and fail_rate_<tensor>: the share of
draws over the rule). No timing: the machine's load does not matter here.
"""
from __future__ import annotations

import argparse
import sys

import torch

import _common  # noqa: F401  (puts this checkout's vita_ext on the path)
import harness

import vita_ext
from vita_ext import reference as R
from vita_ext.ops import flash_attention as fa

NAMES = ("out", "lse", "dq", "dk", "dv")


def errors(backend, q, k, v, go, causal):
    """Max errors of (out, lse, dq, dk, dv) of one provider (None = plain PyTorch at the dtype) vs float64."""
    def run(dtype_inputs, fn):
        xs = [t.detach().clone().requires_grad_() for t in dtype_inputs]
        out, lse = fn(*xs)
        grads = torch.autograd.grad(out, xs, go.to(out.dtype))
        return [out, lse, *grads]

    cast = (q, k, v)
    ref = run([t.double() for t in cast], lambda *a: R.attention_lse(*a, causal))
    if backend is None:
        got = run(cast, lambda *a: R.attention_lse(*a, causal))
    elif backend == "flash":  # the kernels themselves (attention_lse refuses fp32 CPU training on flash)
        scale = q.shape[-1] ** -0.5
        out, lse = fa.flash_cpu_forward(q, k, v, causal, scale, None)
        got = [out, lse, *fa.flash_cpu_backward(go.to(q.dtype), q, k, v, out, lse, causal, scale, None)]
    else:
        got = run(cast, lambda *a: vita_ext.attention_lse(*a, causal=causal, backend=backend))
    errs = []
    for g, r in zip(got, ref):
        floor = torch.finfo(g.dtype).eps * max(1.0, r.abs().max().item())
        errs.append(((g.double() - r).abs().max().item(), floor))
    return errs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=48)
    p.add_argument("--seqlens", default="23,64,257")
    p.add_argument("--head-dims", default="32,64,128")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--csv", default=harness.DEFAULT_CSV)
    args = p.parse_args(argv)
    seqlens, dims = _common.ints(args.seqlens), _common.ints(args.head_dims)
    rows = []
    for dname in args.dtypes.split(","):
        dtype = _common.DTYPES[dname]
        ratios = {b: {n: [] for n in NAMES} for b in ("flash", "vita")}
        fails = {b: {n: 0 for n in NAMES} for b in ratios}
        for i in range(args.draws):
            torch.manual_seed(10_000 + i)
            s, d, causal = seqlens[i % len(seqlens)], dims[(i // len(seqlens)) % len(dims)], i % 2 == 0
            q, go = (torch.randn(1, s, 4, d, dtype=torch.float64).to(dtype) for _ in range(2))
            k, v = (torch.randn(1, s, 2, d, dtype=torch.float64).to(dtype) for _ in range(2))
            plain = errors(None, q, k, v, go, causal)
            for b in ratios:
                for n, (e, floor), (ep, _) in zip(NAMES, errors(b, q, k, v, go, causal), plain):
                    ratios[b][n].append(e / max(ep, 1e-300))
                    fails[b][n] += e > 2 * ep + floor  # the rule, as python_tests/_utils.assert_2x_rule
        for b, per in ratios.items():
            for n, r in per.items():
                rows.append(harness.Row("attention_accuracy", b, dname, f"err_ratio_{n}", "x", "draws",
                                        *harness.quantiles(r)))
                fail = fails[b][n] / len(r)
                rows.append(harness.Row("attention_accuracy", b, dname, f"fail_rate_{n}", "x", "draws", fail, fail, fail))
                print(f"{dname:5} {b:6} {n:4} ratio p50 {sorted(r)[len(r) // 2]:6.2f}  max {max(r):6.2f}  "
                      f"over 2x in {fail:.0%} of {len(r)} draws", flush=True)
    harness.append_rows(rows, args.csv, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
