"""Shared benchmark harness: timing, peak memory and the one results CSV.

Timing on CUDA uses CUDA events around each call, after warm-up, over inputs rotated so L2 does not
flatter; it reports the 20th/50th/80th percentiles in milliseconds. On the CPU (``--quick`` smoke runs)
it uses ``time.perf_counter``. Every row is appended to one CSV whose schema is ``FIELDS``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSV = os.path.join(HERE, "results.csv")
FIELDS = ("op", "provider", "mode", "metric", "unit", "x", "p20", "p50", "p80", "device", "torch", "commit", "date")


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    metric: str
    unit: str
    x: str
    p20: float
    p50: float
    p80: float
    device: str = ""
    torch: str = torch.__version__
    commit: str = ""
    date: str = ""


def commit() -> str:
    """Short hash of the checkout (+dirty); VITA_EXT_BENCH_COMMIT overrides it where the tree has no git
    metadata (the device machine gets a copy of the working tree without .git)."""
    if os.environ.get("VITA_EXT_BENCH_COMMIT"):
        return os.environ["VITA_EXT_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return q[1], statistics.median(s), q[7]


def time_ms(fn: Callable[..., object], inputs: Sequence[tuple], device: torch.device, warmup: int = 5,
            reps: int = 20) -> tuple[float, float, float]:
    """Time ``fn(*inputs[i % len(inputs)])``; returns (p20, p50, p80) in milliseconds."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak device memory allocated during ``fn()`` above what was allocated before (CUDA only; 0 on CPU)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def append_rows(rows: Sequence[Row], path: str = DEFAULT_CSV, device: torch.device | None = None) -> None:
    """Stamp rows with device/commit/date and append them to the CSV (header written once)."""
    stamp = dict(device=device_name(device) if device is not None else "", commit=commit(),
                 date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            d = asdict(row)
            d.update({k: v for k, v in stamp.items() if not d.get(k)})
            writer.writerow(d)


def read_rows(path: str = DEFAULT_CSV) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few reps: a smoke test of the harness (CPU ok)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=DEFAULT_CSV, help="results CSV to append to")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 50, quick 3)")
    p.add_argument("--providers", default=None, help="comma-separated subset of providers to run")
    return p


def settings(args) -> tuple[torch.device, int, int]:
    """(device, warmup, reps) from parsed args."""
    reps = args.reps or (3 if args.quick else 50)
    return torch.device(args.device), (1 if args.quick else 10), reps


def gemm_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, reps: int = 20) -> float:
    """Same-run ceiling: TFLOP/s of a plain torch.mm of the given shape (median)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    _, p50, _ = time_ms(torch.mm, [(a, b)], device, warmup=3, reps=reps)
    return 2 * m * n * k / (p50 * 1e-3) / 1e12


def copy_gbps(nbytes: int, device: torch.device, reps: int = 20) -> float:
    """Same-run ceiling: device-to-device copy bandwidth (bytes read + written) in GB/s."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    _, p50, _ = time_ms(lambda: dst.copy_(src), [()], device, warmup=3, reps=reps)
    return 2 * src.numel() * 4 / (p50 * 1e-3) / 1e9
