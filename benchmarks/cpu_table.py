"""The CPU section of RESULTS.md (issue 12), generated from the rows of a ``run_all.sh --device cpu`` run.

    python benchmarks/cpu_table.py [--csv benchmarks/results.csv ...] [--results benchmarks/RESULTS.md]

Reads the rows whose device starts with "cpu" (the last row of each measurement wins), and writes one
table row per (op, shape, dtype, mode): the p50 time of ours, of the eager PyTorch composition and of
torch.compile of it, the speedups of ours over them (the median over interleaved rounds of their time /
ours in the same round, ``Bench.time_group``: >= 1 means ours is faster), and the same for our other
variant (masked CE with grad_in_forward, the projector recomputing its activations). Ops with no CPU
rows keep a marked placeholder row (attention_lse: issue 10). With --results the table replaces the
text between the cpu-table markers of that file; it is printed either way.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import harness  # noqa: E402
from plot import latest  # noqa: E402

OPS = ("pixel_shuffle_projector", "masked_lm_head", "masked_linear_cross_entropy", "attention_lse")
VARIANTS = {"masked_linear_cross_entropy": "ours_gif", "pixel_shuffle_projector": "ours_recompute",
            "attention_lse": "ours_vita"}
# The composition a user would write instead: eager PyTorch, except attention, where it is PyTorch's own
# fused F.scaled_dot_product_attention (its eager composition materialises [S, S] scores).
PEER = {"attention_lse": "sdpa"}
PLACEHOLDER: dict[str, str] = {}
START, END = "<!-- cpu-table:start -->", "<!-- cpu-table:end -->"
HEADER = ("| op | shape | dtype | mode | ours ms | eager (sdpa) ms | compile ms | x eager (sdpa) | x compile | "
          "variant | variant ms | variant x eager (sdpa) |")


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"


def table(rows: list[dict]) -> tuple[str, dict]:
    """(markdown table, facts: device / torch / commits / dates of the rows used)."""
    rows = [r for r in latest(rows) if r["device"].startswith("cpu")]
    value = {(r["op"], r["provider"], r["mode"], r["metric"], r["x"]): float(r["p50"]) for r in rows}
    lines = [HEADER, "|" + "|".join(["---"] * 12) + "|"]
    for op in OPS:
        keys = sorted({(r["x"], r["mode"]) for r in rows if r["op"] == op and r["metric"] == "time"},
                      key=lambda k: (k[0].split()[-1], k[0], k[1] != "fwd"))
        if not keys:
            lines.append(f"| {op} | {PLACEHOLDER.get(op, 'no CPU rows yet')} | | | | | | | | | | |")
            continue
        variant = VARIANTS.get(op)
        for x, mode in keys:
            shape, dtype = (x.rsplit(" ", 1) + [""])[:2]
            get = lambda p, m="time": value.get((op, p, mode, m, x))  # noqa: E731
            peer = PEER.get(op, "eager")
            has_variant = variant is not None and get(variant) is not None
            lines.append("| " + " | ".join([
                op, shape, dtype, mode, _fmt(get("ours")), _fmt(get(peer)), _fmt(get("compile")),
                _fmt(get("ours", f"speedup_vs_{peer}"), "x"), _fmt(get("ours", "speedup_vs_compile"), "x"),
                variant if has_variant else "-", _fmt(get(variant)) if has_variant else "-",
                _fmt(get(variant, f"speedup_vs_{peer}"), "x") if has_variant else "-"]) + " |")
    facts = {k: sorted({r[k] for r in rows}) for k in ("device", "torch", "commit", "date")}
    return "\n".join(lines), facts


def section(rows: list[dict]) -> str:
    body, facts = table(rows)
    dates = facts["date"]
    span = f"{dates[0]} to {dates[-1]}" if dates else "-"
    return (f"{body}\n\nRows: device {', '.join(facts['device']) or '-'}, torch {', '.join(facts['torch']) or '-'}, "
            f"commit {', '.join(facts['commit']) or '-'}, {span} (UTC).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", nargs="+", default=[harness.DEFAULT_CSV])
    p.add_argument("--results", default=None, help="RESULTS.md to update between the cpu-table markers")
    args = p.parse_args(argv)
    rows = [r for path in args.csv for r in harness.read_rows(path)]
    text = section(rows)
    print(text)
    if args.results:
        with open(args.results, encoding="utf-8") as f:
            doc = f.read()
        if START not in doc or END not in doc:
            raise SystemExit(f"cpu_table: {args.results} has no {START} ... {END} markers")
        head, rest = doc.split(START, 1)
        _, tail = rest.split(END, 1)
        with open(args.results, "w", encoding="utf-8") as f:
            f.write(f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
