"""What the bench_*.py scripts share on top of ``harness``: provider selection, out-of-memory handling,
derived metrics (TFLOP/s, GB/s, ratios), a correctness check of every provider, and the summary table.

Every script builds one ``Bench`` per op, registers measurements through it and calls ``finish()``,
which appends the rows to the CSV (``harness.append_rows``, schema ``harness.FIELDS``) and prints a
table of the medians. Units used across the suite: ms, TFLOP/s, GB/s (1e9 bytes/s), bytes, x (a ratio),
tokens.
"""
from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):  # run from anywhere: the harness, and this checkout's vita_ext if not installed
    if _path not in sys.path:
        sys.path.insert(1 if _path == ROOT else 0, _path)

import harness  # noqa: E402
from harness import Row  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Providers whose failure (a peer's bug, an inductor crash) is noted and skipped instead of aborting the run.
TOLERANT_PREFIXES = ("compile", "liger", "sdpa_cudnn", "ours_")  # ours_<backend>: a backend may refuse a case
MIN_REPS = 5
GROUP_SECONDS = 6.0  # CPU time_group: rounds of a cheap measurement fill about this long
MAX_ROUNDS = 200


def parser(description: str):
    """harness.parser plus the flags every bench script takes."""
    p = harness.parser(description)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile providers even with --quick on CPU (slow: inductor builds C++)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile providers")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="cap on the timed reps of one measurement: reps are cut (never below 5, with a "
                        "printed note) when reps x one call would exceed it")
    p.add_argument("--no-check", action="store_true", help="skip the check that every provider agrees with ours")
    return p


def ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def free(device: torch.device | None = None) -> None:
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rotations(nbytes_per_set: int, device: torch.device, limit: int = 8) -> int:
    """How many input sets to rotate through so that L2 cannot hold them all (CPU: 2, to exercise rotation)."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(limit, math.ceil(4 * l2 / max(1, nbytes_per_set))))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in fp64 (0 for two empty tensors)."""
    got, ref = got.detach().double(), ref.detach().double()
    den = ref.norm().item()
    return (got - ref).norm().item() / (den if den > 0 else 1.0)


def tolerance(dtype: torch.dtype) -> float:
    """Relative-norm agreement expected between two correct implementations at ``dtype``."""
    return {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 3e-2)


class Bench:
    """Collects the rows of one op's run. ``args`` come from ``parser()``."""

    def __init__(self, op: str, args):
        self.op, self.args = op, args
        self.device, self.warmup, self.reps = harness.settings(args)
        self.dtype = DTYPES[args.dtype]
        self.rows: list[Row] = []
        self.only = {p.strip() for p in args.providers.split(",")} if args.providers else None
        self._t0 = time.perf_counter()
        self.compile_on = self._decide_compile()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs measure fp32, not tf32
        elif args.quick:
            torch.set_num_threads(1)  # a smoke run on a shared CPU: one thread spins less under contention
        self.note(f"device {harness.device_name(self.device)}, torch {torch.__version__}, dtype {args.dtype}, "
                  f"warmup {self.warmup}, reps {self.reps}{', quick' if args.quick else ''}")

    # ------------------------------------------------------------------------------ providers
    def _decide_compile(self) -> bool:
        if self.args.compile is False:
            self.note("torch.compile providers skipped (--no-compile)")
            return False
        if self.args.compile is None and self.args.quick and self.device.type == "cpu":
            self.note("torch.compile providers skipped: --quick on CPU (inductor's C++ build takes tens of "
                      "seconds per graph); pass --compile to run them")
            return False
        return True

    def wants(self, provider: str) -> bool:
        if self.only is not None and provider not in self.only:
            return False
        return self.compile_on or not provider.startswith("compile")

    def note(self, msg: str) -> None:
        print(f"[{self.op}] {msg}", flush=True)

    def compiled(self, fn: Callable) -> Callable:
        """torch.compile of an eager function (static shapes: one graph per benchmarked shape)."""
        return torch.compile(fn, dynamic=False)

    # ---------------------------------------------------------------------------------- rows
    def row(self, provider: str, mode: str, metric: str, unit: str, x: str, p20: float, p50: float | None = None,
            p80: float | None = None) -> None:
        p50 = p20 if p50 is None else p50
        p80 = p20 if p80 is None else p80
        self.rows.append(Row(self.op, provider, mode, metric, unit, str(x), float(p20), float(p50), float(p80)))

    def value(self, provider: str, mode: str, metric: str, x: str) -> float | None:
        """The p50 of a row recorded earlier in this run (None if absent)."""
        for r in reversed(self.rows):
            if (r.provider, r.mode, r.metric, r.x) == (provider, mode, metric, str(x)):
                return r.p50
        return None

    def _guard(self, provider: str, what: str, fn: Callable):
        """Run fn(); out-of-memory (any provider) and failures of tolerant providers are noted, not raised."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered below
            if is_oom(exc):
                self.note(f"{provider} {what}: out of memory, skipped")
            elif provider.startswith(TOLERANT_PREFIXES):
                first = (str(exc).splitlines() or [""])[0][:200]
                self.note(f"{provider} {what}: failed, skipped ({type(exc).__name__}: {first})")
            else:
                raise
        free(self.device)  # out here: the traceback's frames (and their tensors) are gone
        return None

    # ---------------------------------------------------------------------------- measuring
    def time(self, provider: str, mode: str, x: str, fn: Callable, inputs: Sequence[tuple] = ((),),
             flops: float | None = None, nbytes: float | None = None) -> float | None:
        """Time fn over rotated inputs; record ms (+ TFLOP/s from flops, GB/s from nbytes). Returns p50 ms."""
        if not self.wants(provider):
            return None
        q = self._guard(provider, f"{mode} {x}", lambda: self._time(fn, inputs, f"{provider} {mode} {x}"))
        if q is None:
            return None
        p20, p50, p80 = q
        self.row(provider, mode, "time", "ms", x, p20, p50, p80)
        if flops:
            self.row(provider, mode, "tflops", "TFLOP/s", x, *(flops / (t * 1e-3) / 1e12 for t in (p80, p50, p20)))
        if nbytes:
            self.row(provider, mode, "gbps", "GB/s", x, *(nbytes / (t * 1e-3) / 1e9 for t in (p80, p50, p20)))
        return p50

    def _time(self, fn: Callable, inputs: Sequence[tuple], what: str) -> tuple[float, float, float]:
        inputs = list(inputs)
        reps = self.reps
        if not self.args.quick:
            # one call after one warm-up tells how many reps (and further warm-ups) fit in --max-seconds
            _, one, _ = harness.time_ms(fn, inputs, self.device, warmup=1, reps=1)
            budget_ms = self.args.max_seconds * 1e3
            fit = int(budget_ms / max(one, 1e-3))
            if fit < reps and max(MIN_REPS, fit) < reps:
                reps = max(MIN_REPS, fit)
                self.note(f"{what}: {one:.1f} ms per call, reps cut to {reps} to fit --max-seconds "
                          f"{self.args.max_seconds:g}")
            warmup = max(0, self.warmup - 2) if one * self.warmup < budget_ms / 4 else 0
            return harness.time_ms(fn, inputs, self.device, warmup=warmup, reps=reps)
        return harness.time_ms(fn, inputs, self.device, warmup=self.warmup, reps=reps)

    def memory(self, provider: str, mode: str, x: str, fn: Callable, minus: int = 0,
               reference_bytes: int | None = None) -> int | None:
        """Peak device memory during fn() above what was allocated before (CUDA only).

        Records ``peak_memory``; with ``minus`` (bytes of outputs the caller keeps, e.g. gradients) also
        ``extra_memory`` = peak - minus, and with ``reference_bytes`` the ratio ``extra_vs_reference``.
        """
        if self.device.type != "cuda" or not self.wants(provider):
            return None
        peak = self._guard(provider, f"{mode} {x} memory", lambda: harness.peak_memory_bytes(fn, self.device))
        if peak is None:
            return None
        self.row(provider, mode, "peak_memory", "bytes", x, peak)
        if minus:
            self.row(provider, mode, "extra_memory", "bytes", x, peak - minus)
        if reference_bytes:
            self.row(provider, mode, "extra_vs_reference", "x", x, (peak - minus) / reference_bytes)
        return peak

    def check(self, provider: str, x: str, got: Callable, ref, tol: float | None = None) -> None:
        """Assert that provider's output agrees with ``ref`` (relative norm), so no benchmark times a wrong
        function. ``got`` returns a tensor or a tuple of tensors; ``ref`` is the same."""
        if self.args.no_check or not self.wants(provider):
            return
        out = self._guard(provider, f"check {x}", got)
        if out is None:
            return
        outs = out if isinstance(out, (tuple, list)) else (out,)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        tol = tolerance(self.dtype) if tol is None else tol
        for i, (a, b) in enumerate(zip(outs, refs)):
            err = rel_err(a, b)
            if not err <= tol:
                raise AssertionError(f"{self.op}: provider {provider} output {i} at {x} disagrees with the "
                                     f"reference: relative error {err:.2e} > {tol:.1e}")
        self.note(f"check {provider} at {x}: agrees with ours")

    # ------------------------------------------------------------------------------ ceilings
    def gemm_peak(self, m: int, n: int, k: int, label: str) -> float:
        """Same-run bf16/fp16/fp32 GEMM rate (harness.gemm_tflops) of shape m x n x k, recorded as a ceiling row."""
        reps = self.reps if self.args.quick else max(self.reps, 20)
        tflops = harness.gemm_tflops(m, n, k, self.dtype, self.device, reps=reps)
        self.row("ceiling", "gemm", "tflops", "TFLOP/s", label, tflops)
        return tflops

    def device_peak(self) -> float:
        """The same-run GEMM peak: an 8192^3 product on CUDA (256^3 on a CPU, whose bf16 GEMMs are slow;
        64^3 with --quick)."""
        n = 64 if self.args.quick else (8192 if self.device.type == "cuda" else 256)
        return self.gemm_peak(n, n, n, label=f"{n}^3")

    def copy_peak(self, nbytes: int) -> float:
        """Same-run device-to-device copy bandwidth (harness.copy_gbps), recorded as a ceiling row."""
        reps = self.reps if self.args.quick else max(self.reps, 20)
        gbps = harness.copy_gbps(nbytes, self.device, reps=reps)
        self.row("ceiling", "copy", "gbps", "GB/s", f"{nbytes / 1e6:.4g}MB", gbps)
        return gbps

    # ------------------------------------------------------------------------------ CPU runs
    @property
    def cpu_sizes(self) -> bool:
        """A full (not --quick) run on the CPU: the scripts use their CPU sizes (issue 12)."""
        return self.device.type == "cpu" and not self.args.quick

    def label(self, x: str) -> str:
        """The x of a row. CPU runs cover several dtypes in one CSV, so their rows name the dtype."""
        return f"{x} {self.args.dtype}" if self.device.type == "cpu" else x

    def time_group(self, mode: str, x: str, fns: dict[str, Callable], inputs: Sequence[tuple] = ((),),
                   ours: Sequence[str] = ("ours",), flops: float | None = None,
                   nbytes: float | None = None) -> None:
        """Time several providers of one measurement and record each one's rows plus speedup rows.

        On the CPU (a shared machine whose load changes from second to second) the providers run
        interleaved, one call each per round in rotating order (--reps rounds, more for a cheap
        measurement: about GROUP_SECONDS, at most MAX_ROUNDS), so all of them see the same load; each
        provider in ``ours`` gets ``speedup_vs_<other>`` = the median over rounds of other's time / its
        time in the same round (a paired ratio, within one run). On CUDA each provider is timed in turn
        with CUDA events (``time``) and the speedups are ratios of the medians.
        """
        fns = {k: v for k, v in fns.items() if v is not None and self.wants(k)}
        if self.device.type == "cuda":
            for name, fn in fns.items():
                self.time(name, mode, x, fn, inputs, flops=flops, nbytes=nbytes)
            for mine in ours:
                for other in fns:
                    if other != mine:
                        self.speedup(mode, x, mine, other)
            return
        inputs = list(inputs)
        ok = {}
        for name, fn in fns.items():  # warm-up (and compile) each; a failing tolerant provider is dropped
            if self._guard(name, f"{mode} {x}", lambda: [fn(*inputs[i % len(inputs)]) for i in range(2)]) is not None:
                ok[name] = fn
        names = list(ok)
        # At least --reps rounds; cheap measurements get more (about GROUP_SECONDS of rounds, at most
        # MAX_ROUNDS): on a busy machine a few rounds of a millisecond op are mostly scheduler noise.
        t0 = time.perf_counter()
        for name in names:
            ok[name](*inputs[0])
        one_round = time.perf_counter() - t0
        rounds = self.reps if self.args.quick else max(self.reps, min(MAX_ROUNDS, int(GROUP_SECONDS / max(one_round, 1e-6))))
        # ... and expensive ones fewer: --max-seconds per provider for the whole group, never below MIN_REPS.
        budget = self.args.max_seconds * len(names)
        if not self.args.quick and rounds * one_round > budget:
            rounds = max(MIN_REPS, int(budget / max(one_round, 1e-6)))
            self.note(f"{mode} {x}: {one_round:.1f} s per round, {rounds} rounds to fit --max-seconds "
                      f"{self.args.max_seconds:g} per provider")
        samples: dict[str, list[float]] = {k: [] for k in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                ok[name](*inputs[r % len(inputs)])
                samples[name].append((time.perf_counter() - t0) * 1e3)
        for name in names:
            p20, p50, p80 = harness.quantiles(samples[name])
            self.row(name, mode, "time", "ms", x, p20, p50, p80)
            if flops:
                self.row(name, mode, "tflops", "TFLOP/s", x, *(flops / (t * 1e-3) / 1e12 for t in (p80, p50, p20)))
            if nbytes:
                self.row(name, mode, "gbps", "GB/s", x, *(nbytes / (t * 1e-3) / 1e9 for t in (p80, p50, p20)))
        for mine in (m for m in ours if m in samples):
            for other in names:
                if other == mine:
                    continue
                ratios = [b / a for a, b in zip(samples[mine], samples[other])]
                self.row(mine, mode, f"speedup_vs_{other}", "x", x, *harness.quantiles(ratios))

    def speedup(self, mode: str, x: str, provider: str, baseline: str) -> None:
        """Record baseline's p50 time / provider's p50 time as metric ``speedup_vs_<baseline>``."""
        a, b = self.value(provider, mode, "time", x), self.value(baseline, mode, "time", x)
        if a and b:
            self.row(provider, mode, f"speedup_vs_{baseline}", "x", x, b / a)

    def fraction(self, mode: str, x: str, provider: str, metric: str, ceiling: float | None, name: str) -> None:
        """Record provider's p50 ``metric`` / ceiling as metric ``name`` (e.g. frac_of_gemm)."""
        v = self.value(provider, mode, metric, x)
        if v and ceiling:
            self.row(provider, mode, name, "x", x, v / ceiling)

    # -------------------------------------------------------------------------------- output
    def finish(self) -> int:
        harness.append_rows(self.rows, self.args.csv, self.device)
        self.summary()
        self.note(f"{len(self.rows)} rows appended to {self.args.csv} in {time.perf_counter() - self._t0:.1f} s")
        return 0

    def summary(self) -> None:
        if not self.rows:
            return
        w = max(len(r.provider) for r in self.rows)
        print(f"\n{self.op}: p50 of each metric")
        for r in self.rows:
            value = f"{r.p50 / 2**30:.3f} GiB" if r.unit == "bytes" else f"{r.p50:.4g} {r.unit}"
            print(f"  {r.mode:<14} {r.x:<22} {r.provider:<{w}} {r.metric:<22} {value}")
        sys.stdout.flush()


def grad_fn(fn: Callable, grads_for: Sequence[int]) -> Callable:
    """A forward+backward callable: fn(*args) -> output, then torch.autograd.grad of output (with a fixed
    random cotangent for non-scalars, passed as the last argument) w.r.t. args[i] for i in grads_for."""

    def run(*args):
        *inputs, cot = args
        out = fn(*inputs)
        if isinstance(out, tuple):
            out = out[0]
        wrt = [inputs[i] for i in grads_for]
        return torch.autograd.grad(out, wrt, None if out.dim() == 0 else cot)

    return run


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().requires_grad_(requires_grad)
