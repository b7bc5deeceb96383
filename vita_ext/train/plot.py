"""``vita-ext plot-train``: the loss curve (and learning rate) of one or more runs, as a PNG."""
from __future__ import annotations

import csv
import json
import os


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl / metrics.csv file, or of OUT/metrics.jsonl for an output directory."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file: {path}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".csv"):
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(paths: list[str], out: str, labels: list[str] | None = None, smooth: int = 1) -> str:
    """Draw the runs one after another on a shared step axis (stages in sequence); returns ``out``.

    smooth > 1 adds a trailing moving average of that many steps over the raw curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    offset = 0
    for k, path in enumerate(paths):
        rows = read_metrics(path)
        if not rows:
            raise ValueError(f"{path}: no metrics rows")
        steps = [offset + int(r["step"]) for r in rows]
        loss = [float(r["loss"]) for r in rows]
        label = labels[k] if labels and k < len(labels) else os.path.basename(os.path.normpath(path))
        line, = ax.plot(steps, loss, lw=0.8, alpha=0.5 if smooth > 1 else 1.0, label=label)
        if smooth > 1:
            avg = [sum(loss[max(0, i - smooth + 1):i + 1]) / len(loss[max(0, i - smooth + 1):i + 1])
                   for i in range(len(loss))]
            ax.plot(steps, avg, lw=1.6, color=line.get_color())
        ax_lr.plot(steps, [float(r["lr"]) for r in rows], color=line.get_color())
        offset = steps[-1]
    ax.set_ylabel("loss (per supervised token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_yscale("log")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
