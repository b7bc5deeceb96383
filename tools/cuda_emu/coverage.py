"""gcov line coverage of the CUDA sources under the emulated tests.

The plain build compiles the rewritten sources with --coverage; their `#line` directives name the
original files, so gcov reports csrc/cuda/<file> lines directly. A line counts as executable when gcov
says so in any translation unit that includes the file (headers are compiled into several) and as
executed when any of them ran it.

Usage: python tools/cuda_emu/coverage.py [--build DIR] [--src csrc/cuda] [--min 95] [--show-missed]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def reset(build: Path) -> None:
    """Deletes the counters of earlier runs."""
    for f in (build / "obj").rglob("*.gcda"):
        f.unlink()


def collect(build: Path, src: Path) -> dict[str, dict[int, int]]:
    """{original file: {line: count}} for the files under src."""
    src = src.resolve()
    lines: dict[str, dict[int, int]] = {}
    objdir = build / "obj" / src.name
    for gcda in sorted(objdir.glob("*.gcda")):
        proc = subprocess.run(["gcov", "--json-format", "--stdout", "--object-directory", str(objdir), str(gcda)],
                              capture_output=True, cwd=objdir)
        if proc.returncode != 0:
            raise RuntimeError(f"gcov failed on {gcda}: {proc.stderr.decode()[-2000:]}")
        data = proc.stdout
        for chunk in data.splitlines():
            if not chunk.strip():
                continue
            if chunk[:2] == b"\x1f\x8b":
                chunk = gzip.decompress(chunk)
            doc = json.loads(chunk)
            for f in doc.get("files", []):
                path = Path(f["file"])
                path = path if path.is_absolute() else (objdir / path)
                try:
                    path.resolve().relative_to(src)
                except ValueError:
                    continue
                per = lines.setdefault(str(path.resolve()), {})
                for ln in f.get("lines", []):
                    per[ln["line_number"]] = max(per.get(ln["line_number"], 0), ln["count"])
    return lines


def report(lines: dict[str, dict[int, int]], show_missed: bool = False) -> tuple[int, int, str]:
    out, tot_hit, tot_all = [], 0, 0
    for path in sorted(lines):
        per = lines[path]
        hit = sum(1 for c in per.values() if c > 0)
        tot_hit += hit
        tot_all += len(per)
        pct = 100.0 * hit / max(1, len(per))
        out.append(f"  {Path(path).name:34s} {hit:4d} / {len(per):4d} lines  {pct:5.1f}%")
        if show_missed:
            missed = sorted(n for n, c in per.items() if c == 0)
            if missed:
                out.append(f"      not executed: {', '.join(map(str, missed))}")
    pct = 100.0 * tot_hit / max(1, tot_all)
    out.append(f"  {'total':34s} {tot_hit:4d} / {tot_all:4d} lines  {pct:5.1f}%")
    return tot_hit, tot_all, "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "cuda_emu" / "plain")
    ap.add_argument("--src", type=Path, default=ROOT / "csrc" / "cuda")
    ap.add_argument("--min", type=float, default=0.0, help="fail below this line coverage (percent)")
    ap.add_argument("--show-missed", action="store_true")
    args = ap.parse_args(argv)
    lines = collect(args.build, args.src)
    if not lines:
        print("cuda_emu coverage: no gcov data (run the emulated tests on the plain build first)", file=sys.stderr)
        return 1
    hit, total, text = report(lines, args.show_missed)
    print(f"gcov line coverage of {args.src} under the emulated tests:\n{text}")
    if 100.0 * hit / max(1, total) < args.min:
        print(f"cuda_emu coverage: {100.0 * hit / total:.1f}% is below the required {args.min}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
