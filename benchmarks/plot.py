"""Draw each op's benchmark rows to a PNG: one panel per (mode, metric), providers as grouped bars with
p20-p80 whiskers, the same-run ceilings (GEMM TFLOP/s, copy GB/s) as dashed lines.

    python benchmarks/plot.py [--csv results.csv ...] [--out benchmarks/plots] [--ops a,b] [--merge-to PATH]

When a CSV holds several runs of the same measurement, the last row appended wins. Rows of different
devices go to different files (<op>__<device>.png); with one device the file is <op>.png.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import harness  # noqa: E402

GIB = 2**30


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (op, device, provider, mode, metric, x), in first-seen order."""
    keep: OrderedDict = OrderedDict()
    for r in rows:
        keep[(r["op"], r["device"], r["provider"], r["mode"], r["metric"], r["x"])] = r
    return list(keep.values())


def write_csv(rows: list[dict], path: str) -> None:
    import csv

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=harness.FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in harness.FIELDS} for r in rows)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "device"


def scaled(r: dict) -> tuple[float, float, float, str]:
    vals = [float(r[k]) for k in ("p20", "p50", "p80")]
    if r["unit"] == "bytes":
        return (*(v / GIB for v in vals), "GiB")
    return (*vals, r["unit"])


def ceilings(rows: list[dict]) -> dict[str, float]:
    """Largest same-run ceiling per metric (tflops from the GEMM rows, gbps from the copy rows)."""
    out: dict[str, float] = {}
    for r in rows:
        if r["provider"] == "ceiling":
            out[r["metric"]] = max(out.get(r["metric"], 0.0), float(r["p50"]))
    return out


def panel(ax, rows: list[dict], title: str, ceiling: float | None) -> None:
    xs = list(OrderedDict.fromkeys(r["x"] for r in rows))
    providers = list(OrderedDict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(1, len(providers))
    unit = ""
    values = []
    for i, prov in enumerate(providers):
        pos, mid, lo, hi = [], [], [], []
        for j, x in enumerate(xs):
            for r in rows:
                if r["provider"] == prov and r["x"] == x:
                    p20, p50, p80, unit = scaled(r)
                    pos.append(j - 0.4 + width * (i + 0.5))
                    mid.append(p50)
                    lo.append(max(0.0, p50 - min(p20, p80)))
                    hi.append(max(0.0, max(p20, p80) - p50))
        values += mid
        ax.bar(pos, mid, width, yerr=[lo, hi], capsize=2, label=prov)
    if ceiling:
        ax.axhline(ceiling, linestyle="--", color="gray", linewidth=1, label="same-run ceiling")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=30 if len(xs) > 4 or max(map(len, xs)) > 10 else 0, ha="right", fontsize=8)
    ax.set_title(f"{title} ({unit})" if unit else title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_op(op: str, device: str, rows: list[dict], path: str) -> None:
    ceil = ceilings(rows)
    groups: OrderedDict = OrderedDict()
    for r in rows:
        if r["provider"] == "ceiling":
            continue
        if r["unit"] == "x":  # every ratio of a mode in one panel, one bar colour per metric
            label = r["metric"] if r["provider"] == "ours" else f"{r['provider']}:{r['metric']}"
            groups.setdefault((r["mode"], "ratios"), []).append(dict(r, provider=label))
        else:
            groups.setdefault((r["mode"], r["metric"]), []).append(r)
    if not groups:
        return
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.8 * nrows), squeeze=False)
    for ax, ((mode, metric), rs) in zip(axes.flat, groups.items()):
        panel(ax, rs, f"{mode}: {metric}", ceil.get(metric) if metric in ("tflops", "gbps") else None)
        if metric == "ratios" and any(r["metric"].startswith(("speedup", "frac", "time_vs", "memory_x")) for r in rs):
            ax.axhline(1.0, color="black", linewidth=0.8)  # parity / the ceiling / perfect scaling
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    commits = sorted({r["commit"] for r in rows})
    fig.suptitle(f"{op} on {device or '?'} (torch {rows[0]['torch']}, commit {', '.join(commits)})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (3.8 * nrows)))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", nargs="+", default=[harness.DEFAULT_CSV], help="results CSV(s) to read")
    p.add_argument("--out", default=os.path.join(HERE, "plots"), help="folder for the PNGs")
    p.add_argument("--ops", default=None, help="comma-separated ops to draw (default: all in the CSV)")
    p.add_argument("--merge-to", default=None,
                   help="also write the rows drawn (the last of each measurement over all --csv) to this CSV")
    args = p.parse_args(argv)
    rows = latest([r for path in args.csv for r in harness.read_rows(path)])
    if args.ops:
        wanted = set(args.ops.split(","))
        rows = [r for r in rows if r["op"] in wanted]
    if args.merge_to:
        write_csv(rows, args.merge_to)
    os.makedirs(args.out, exist_ok=True)
    by_op: OrderedDict = OrderedDict()
    for r in rows:
        by_op.setdefault(r["op"], OrderedDict()).setdefault(r["device"], []).append(r)
    for op, devices in by_op.items():
        for device, rs in devices.items():
            name = f"{op}.png" if len(devices) == 1 else f"{op}__{slug(device)}.png"
            path = os.path.join(args.out, name)
            plot_op(op, device, rs, path)
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
