"""Benchmark of masked_linear_cross_entropy (issue 4, target 2; CPU: issue 12).

Shape: hidden [T, 5120], lm_head weight [152064, 5120], labels [T] with half the rows -100 (random
positions), so M = T/2 supervised rows; T = 8192 and 32768; bf16. CPU runs (--device cpu without
--quick): T = 2048, H = 256, V = 32000, the --dtype given (run_all.sh --device cpu runs fp32 and bf16).
Modes: fwd (loss) and fwd_bwd (loss, dHidden, dWeight). Providers:
  ours        vita_ext.masked_linear_cross_entropy on all T rows (it skips the ignored ones itself)
  ours_gif    the same with grad_in_forward=True and num_supervised from the host (the training
              loop's call: 6*M*H*V FLOPs per step instead of 8), fwd_bwd only
  eager       what users write: F.linear on the supervised rows (h[labels != -100]) + F.cross_entropy
              (the fair baseline)
  eager_full  HF style: F.linear on all T rows, logits upcast to fp32, F.cross_entropy(ignore_index=-100)
              (= vita_ext.reference.masked_linear_cross_entropy; not run on the CPU)
  compile     torch.compile of eager_full (CPU: of eager)
  liger       Liger-Kernel's LigerFusedLinearCrossEntropyLoss on all T rows, if liger_kernel imports
              (carry its wheel with --no-deps); skipped with a note otherwise
  liger_fp32acc  the same with accum_dtype=torch.float32 (fp32 gradient accumulation, as ours), where
              the installed version has that argument
Metrics: time (ms), effective TFLOP/s (2*M*H*V fwd, 6*M*H*V fwd_bwd), frac_of_peak (vs an 8192^3 GEMM
in the same run), frac_of_gemm (vs the logits GEMM [M, H] x [H, V] alone), speedup_vs_<provider>,
peak_memory, extra_memory (= peak - the gradient outputs dH and dW) and extra_vs_reference (extra /
the full [T, V] logits at the input dtype). On the CPU providers run interleaved and speedups are
paired per round (``Bench.time_group``); no memory or ceiling rows.
Targets: fwd_bwd faster than eager, >= 1.2x liger, extra_vs_reference <= 0.1, frac_of_peak >= 0.7;
CPU: fwd and fwd_bwd >= 1.0x eager, fp32 and bf16.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import _common
from _common import Bench, grad_fn, leaf

import vita_ext  # noqa: E402
from vita_ext import reference

OP = "masked_linear_cross_entropy"
IGNORE = -100


def ours(h, w, labels):
    return vita_ext.masked_linear_cross_entropy(h, w, labels, IGNORE)


def ours_gif(h, w, labels):
    # num_supervised from the host: the count the training packer knows (here read once at setup)
    return vita_ext.masked_linear_cross_entropy(h, w, labels, IGNORE, num_supervised=COUNTS[id(labels)],
                                                grad_in_forward=True)


COUNTS: dict[int, int] = {}


def eager(h, w, labels):
    keep = labels != IGNORE
    return F.cross_entropy(F.linear(h[keep], w).float(), labels[keep])


def eager_full(h, w, labels):
    return reference.masked_linear_cross_entropy(h, w, labels, IGNORE)


def liger_providers(b: Bench) -> dict:
    """Liger-Kernel's fused linear cross-entropy as f(h, w, labels): 'liger' (its defaults) and, where its
    loss takes accum_dtype, 'liger_fp32acc' (fp32 gradient accumulation, as ours does). Empty (with a printed
    note) when it cannot run here."""
    if not (b.wants("liger") or b.wants("liger_fp32acc")):
        return {}
    if b.device.type != "cuda":
        b.note("liger skipped: its Triton kernels need a CUDA device")
        return {}
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        b.note(f"liger skipped: liger_kernel is not importable ({type(exc).__name__}: {exc}); carry its wheel "
               "(see RESULTS.md) to compare with it")
        return {}
    import importlib.metadata
    import inspect

    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    b.note(f"liger: liger-kernel {version}")

    def make(**kwargs):
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, **kwargs)

        def run(h, w, labels):
            out = loss(w, h, labels)
            return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

        return run

    out = {"liger": make()}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters:
        out["liger_fp32acc"] = make(accum_dtype=torch.float32)
    return {k: v for k, v in out.items() if b.wants(k)}


def make_inputs(t, hidden, vocab, dtype, device, sets):
    def one():
        h = torch.randn(t, hidden, device=device).to(dtype)
        w = (0.02 * torch.randn(vocab, hidden, device=device)).to(dtype)
        labels = torch.randint(0, vocab, (t,), device=device)
        labels[torch.randperm(t, device=device)[:t // 2]] = IGNORE
        return h, w, labels
    return [one() for _ in range(sets)]


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", default=None, help="comma-separated T (default 8192,32768; CPU 2048; quick 64,96)")
    p.add_argument("--hidden", type=int, default=None, help="H (default 5120; CPU 256; quick 32)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 152064; CPU 32000; quick 1003)")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    args = p.parse_args(argv)
    b = Bench(OP, args)
    cpu = b.device.type == "cpu"
    hidden = args.hidden or (32 if args.quick else 256 if cpu else 5120)
    vocab = args.vocab or (1003 if args.quick else 32000 if cpu else 152064)
    tokens = _common.ints(args.tokens or ("64,96" if args.quick else "2048" if cpu else "8192,32768"))
    modes = args.modes.split(",")
    peak = None if cpu else b.device_peak()
    fns = {"ours": ours, "ours_gif": ours_gif, "eager": eager, "eager_full": None if cpu else eager_full,
           "compile": b.compiled(eager if cpu else eager_full) if b.compile_on else None, **liger_providers(b)}
    fns = {k: v for k, v in fns.items() if v is not None}
    fwd_fns = {k: v for k, v in fns.items() if k != "ours_gif"}  # no gradient: the same as ours
    elt = torch.finfo(b.dtype).bits // 8
    for t in tokens:
        x = b.label(f"T={t}")
        m = t // 2
        gemm = None if cpu else b.gemm_peak(m, vocab, hidden, label=f"{m}x{vocab}x{hidden}")
        sets = make_inputs(t, hidden, vocab, b.dtype, b.device,
                           _common.rotations(elt * (t + vocab) * hidden, b.device))
        for _, _, labels in sets:
            COUNTS[id(labels)] = int((labels != IGNORE).sum())
        first = sets[0]
        ref = ours(*first)
        for name in fwd_fns:
            if name != "ours":
                b.check(name, x, lambda: fwd_fns[name](*first), ref)
        logits_bytes = t * vocab * elt
        if "fwd" in modes:
            if cpu:
                b.time_group("fwd", x, fwd_fns, sets, flops=2.0 * m * hidden * vocab)
            else:
                for name, fn in fwd_fns.items():
                    b.time(name, "fwd", x, fn, sets, flops=2.0 * m * hidden * vocab)
                    b.memory(name, "fwd", x, lambda: fn(*first), reference_bytes=logits_bytes)
                for base in fwd_fns:
                    if base != "ours":
                        b.speedup("fwd", x, "ours", base)
                b.fraction("fwd", x, "ours", "tflops", peak, "frac_of_peak")
                b.fraction("fwd", x, "ours", "tflops", gemm, "frac_of_gemm")
        if "fwd_bwd" in modes:
            gsets = [(leaf(h), leaf(w), labels, None) for h, w, labels in sets]
            grads_bytes = (t + vocab) * hidden * elt
            runs = {name: grad_fn(fn, (0, 1)) for name, fn in fns.items()}
            if cpu:
                b.time_group("fwd_bwd", x, runs, gsets, ours=("ours", "ours_gif"), flops=6.0 * m * hidden * vocab)
            else:
                for name, run in runs.items():
                    b.time(name, "fwd_bwd", x, run, gsets, flops=6.0 * m * hidden * vocab)
                    b.memory(name, "fwd_bwd", x, lambda: run(*gsets[0]), minus=grads_bytes,
                             reference_bytes=logits_bytes)
                for mine in ("ours", "ours_gif"):
                    for base in fns:
                        if base != mine:
                            b.speedup("fwd_bwd", x, mine, base)
                b.fraction("fwd_bwd", x, "ours", "tflops", peak, "frac_of_peak")
                b.fraction("fwd_bwd", x, "ours", "tflops", gemm, "frac_of_gemm")
            del gsets
        del sets, first
        _common.free(b.device)
    return b.finish()


if __name__ == "__main__":
    sys.exit(main())
