"""``vita-ext plot-train``: the loss curve (and learning rate) of one or more runs, as a PNG."""
from __future__ import annotations

import csv
import json
import os
import warnings


class MetricsWarning(UserWarning):
    """A line of a metrics file could not be read and was dropped."""


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl / metrics.csv file, or of OUT/metrics.jsonl for an output directory.

    A line that is not a JSON object with an integer "step" is dropped: silently when it is the
    unterminated last line (a run killed while appending), with a ``MetricsWarning`` naming the file
    and line otherwise. Raises FileNotFoundError, or ValueError for a CSV value that is not a number."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file: {path}")
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            rows = []
            for lineno, row in enumerate(csv.DictReader(f), start=2):
                try:
                    rows.append({k: float(v) for k, v in row.items() if k is not None and v not in ("", None)})
                except ValueError as exc:
                    raise ValueError(f"{path} line {lineno}: not a number ({exc})") from exc
            return rows
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    rows = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or type(row.get("step")) is not int:
                raise ValueError("not a metrics row")
        except ValueError as exc:
            if lineno < len(lines):  # a complete line (terminated by a newline) that is bad
                warnings.warn(f"{path} line {lineno}: dropped ({exc})", MetricsWarning, stacklevel=2)
            continue
        rows.append(row)
    return rows


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
