"""Planted bugs: the emulation tier must be able to fail. Each bug below is planted in a copy of one
csrc/cuda source (a regex edit of the current file, so it follows the file as it changes), the affected
translation units are rebuilt on top of the plain build, and a scenario that exercises the kernel runs
under forward, reverse and random thread/block order in a fresh process. A bug counts as caught when
any order raises (an emulator rule, a launch error), crashes in a sanitizer, gives NaN, or disagrees
with the CPU twin. The same scenarios first run on the unmodified build and must pass there: a check
that fails without the bug proves nothing.

Usage: python tools/cuda_emu/planted.py [--build DIR] [--only NAME ...]
Exit status 0 when every bug is caught and every control passes; a bug whose pattern no longer matches
the source fails too ("no longer applies"), so that it is updated rather than silently skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import build as emu_build  # noqa: E402


@dataclass
class Bug:
    name: str
    file: str        # under csrc/cuda
    pattern: str     # regex; its first match is replaced
    repl: str
    scenario: str    # in planted_check.py
    expect: str      # how it shows up (documentation)


BUGS = [
    Bug("removed __syncwarp", "merge_attention.cu", r"\n[ \t]*__syncwarp\(\);[^\n]*", "", "merge_attention",
        "lane 0 replaces the row's lse before the other lanes read it (forward order)"),
    Bug("removed tile __syncthreads", "attention_lse.cu",
        r"(for \(int64_t j0 = kbeg; j0 < kend; j0 \+= KT\) \{\s*)__syncthreads\(\);", r"\1", "attention_forward",
        "a thread reloads the key tile while others still read the previous one"),
    Bug("missing zero-fill of a padded tile", "attention_lse.cu",
        r"k_s\[jj\]\[d\] = in \? (static_cast<float>\(k\[[^\]]*\]\)) : 0\.f;", r"if (in) k_s[jj][d] = \1;",
        "attention_forward", "padded key dims keep shared memory's NaN bytes"),
    Bug("early return before a shuffle", "pixel_shuffle_projector.cu",
        r"(const int64_t K = 4 \* C;\n\s*const scalar_t\* run\[4\];)", r"if (lane * VEC >= C) return;  \1",
        "projector_forward", "lanes without channels exit while their warp reduces with full-mask shuffles"),
    Bug("off-by-one bound", "rows.cuh", r"for \(int64_t h = threadIdx\.x; h < H; h \+= blockDim\.x\) out\[h\]",
        "for (int64_t h = threadIdx.x; h <= H; h += blockDim.x) out[h]", "masked_lm_head",
        "each gathered row writes one element into the next row (and past the buffer)"),
    Bug("dropped alignment test", "merge_attention.cu",
        r"(const bool vec = D % 4 == 0)[^;]*;", r"\1;", "merge_attention",
        "vector loads through a misaligned view (UBSan: misaligned address)"),
]


def planted_sources(bug: Bug, src: Path) -> dict[str, str]:
    text = (src / bug.file).read_text()
    new, n = re.subn(bug.pattern, bug.repl, text, count=1)
    if n != 1 or new == text:
        raise LookupError(f"planted bug '{bug.name}' no longer applies: /{bug.pattern}/ does not match "
                          f"{src / bug.file}; update tools/cuda_emu/planted.py")
    return {bug.file: new}


def run_scenario(lib: Path, scenario: str, gcov_dir: Path, extra_env: dict | None = None) -> dict:
    """Runs planted_check.py in a fresh process; returns its per-order results (or the crash)."""
    env = dict(os.environ, VITA_EXT_CUDA_EMU=str(lib), GCOV_PREFIX=str(gcov_dir), GCOV_PREFIX_STRIP="0",
               **(extra_env or {}))
    proc = subprocess.run([sys.executable, str(HERE / "planted_check.py"), scenario], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    text = proc.stdout + proc.stderr
    sanitizer = re.search(r"runtime error: [^\n]*|ERROR: AddressSanitizer: [^\n]*", text)
    return {"crash": sanitizer.group(0) if sanitizer else f"exit {proc.returncode}: {text[-400:]}"}


def verdict(res: dict) -> tuple[bool, str]:
    """(bug caught, how)."""
    if "crash" in res:
        return True, "crash: " + res["crash"]
    bad = {o: r for o, r in res.items() if r["status"] != "ok"}
    if not bad:
        return False, "all orders agree with the CPU twin"
    order, r = next(iter(bad.items()))
    return True, f"{r['status']} in {order} order ({', '.join(bad)}): {r['detail'][:300]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "cuda_emu" / "plain")
    ap.add_argument("--src", type=Path, default=ROOT / "csrc" / "cuda")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--variant", choices=sorted(emu_build.VARIANTS), default="plain",
                    help="the build --build holds (asan: run the scenarios with the ASan runtime preloaded)")
    args = ap.parse_args(argv)
    base, src = args.build.resolve(), args.src.resolve()
    import run as emu_run

    extra_env = emu_run.sanitizer_env(args.variant)
    lib = base / emu_build.LIB_NAME
    gcov_dir = base / "planted" / "gcov"  # keeps the plain build's coverage counters clean
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    t0 = time.monotonic()
    scenarios = sorted({b.scenario for b in bugs})
    controls_ok = 0
    for scenario in scenarios:
        failed, how = verdict(run_scenario(lib, scenario, gcov_dir, extra_env))
        print(f"control   {scenario:36s} {'FAILS WITHOUT A BUG: ' + how if failed else 'passes'}", flush=True)
        controls_ok += not failed
    caught_n = 0
    for i, bug in enumerate(bugs):
        try:
            patched = planted_sources(bug, src)
        except LookupError as exc:
            print(f"planted   {bug.name:36s} NOT APPLIED: {exc}", flush=True)
            continue
        t1 = time.monotonic()
        variant = emu_build.build_patched(base, patched, base / "planted" / f"bug{i}", src, variant=args.variant)
        caught, how = verdict(run_scenario(variant, bug.scenario, gcov_dir, extra_env))
        print(f"planted   {bug.name:36s} {'caught' if caught else 'MISSED'} ({time.monotonic() - t1:.0f} s): {how}",
              flush=True)
        caught_n += caught
    print(f"cuda_emu planted bugs: {caught_n} of {len(bugs)} caught; controls: {controls_ok} of {len(scenarios)} "
          f"pass ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0 if caught_n == len(bugs) and controls_ok == len(scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
