"""CUDA emulation tier, end to end: build, run the project's CUDA tests through the emulated kernels,
run the emulator's own tests, plant bugs, report gcov line coverage of csrc/cuda.

    python tools/cuda_emu/run.py                    # plain: what CI runs on every commit
    python tools/cuda_emu/run.py --variant asan     # AddressSanitizer + UBSan (tools/cuda_emu/asan.sh)
    python tools/cuda_emu/run.py --steps build,ops  # a subset: build, ops, emulator, planted, coverage

The op tests are those of selection.py (the "cuda" instances of the `device` fixture); each runs under
the forward, reverse or random thread/block order chosen by a hash of its id ($VITA_EXT_CUDA_EMU_ORDER
forces one). Every step prints its wall time; the run fails if any step fails or the line coverage is
below --min-coverage.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import build as emu_build  # noqa: E402
import coverage as emu_coverage  # noqa: E402
import selection  # noqa: E402

STEPS = ("build", "ops", "emulator", "planted", "coverage")


def sanitizer_env(variant: str) -> dict:
    if variant != "asan":
        return {"UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    def lib(name):
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    return {
        # The interpreter is not instrumented, so the ASan runtime must come first; libstdc++ right after
        # it, or ASan's __cxa_throw interceptor finds no real __cxa_throw (C++ exceptions then abort).
        "LD_PRELOAD": f"{lib('libasan.so')} {lib('libstdc++.so')}",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0:"
                        "detect_odr_violation=0:allocator_may_return_null=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }


def pytest(args: list[str], env: dict, report: Path) -> tuple[int, dict]:
    full = dict(os.environ, **env, VITA_EXT_CUDA_EMU_REPORT=str(report))
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), full.get("PYTHONPATH", "")) if p)
    report.unlink(missing_ok=True)
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], env=full,
                        cwd=ROOT).returncode
    data = json.loads(report.read_text()) if report.exists() else {}
    return rc, data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(emu_build.VARIANTS), default="plain")
    ap.add_argument("--steps", default=None, help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--min-coverage", type=float, default=95.0)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments for the op tests (e.g. -k attention)")
    args = ap.parse_args(argv)
    plain = args.variant == "plain"
    steps = args.steps.split(",") if args.steps else [s for s in STEPS if plain or s not in ("planted", "coverage")]
    out = emu_build.default_out(args.variant)
    lib = out / emu_build.LIB_NAME
    env = {"VITA_EXT_CUDA_EMU": str(lib), **sanitizer_env(args.variant)}
    times, failed, summary = {}, [], []

    def step(name, fn):
        if name not in steps:
            return
        print(f"\n=== cuda_emu [{args.variant}] {name}", flush=True)
        t0 = time.monotonic()
        ok = fn()
        times[name] = time.monotonic() - t0
        print(f"=== cuda_emu [{args.variant}] {name}: {'ok' if ok else 'FAILED'} in {times[name]:.0f} s", flush=True)
        if not ok:
            failed.append(name)

    def do_build():
        emu_build.build(args.variant, jobs=args.jobs)
        return True

    def do_ops():
        if plain and "coverage" in steps:
            emu_coverage.reset(out)
        rc, data = pytest([*selection.TEST_FILES, *args.pytest_args], env, out / "report_ops.json")
        if data:
            c, st = data["comparisons"], data["stats"]
            summary.append(f"op tests: {sum(c.values())} comparisons, {sum(st['ops'].values())} emulated op calls, "
                           f"{st['launches']} launches of {len(st['kernels'])} kernel instantiations")
        return rc == 0

    def do_emulator():
        rc, data = pytest(selection.EMULATOR_TESTS, env, out / "report_emulator.json")
        if data:
            summary.append(f"emulator tests: {data['comparisons'].get('side_by_side', 0)} side-by-side comparisons")
        return rc == 0

    def do_planted():
        import planted

        return planted.main(["--build", str(out)]) == 0

    def do_coverage():
        return emu_coverage.main(["--build", str(out), "--min", str(args.min_coverage)]) == 0

    for name, fn in (("build", do_build), ("ops", do_ops), ("emulator", do_emulator), ("coverage", do_coverage),
                     ("planted", do_planted)):
        try:
            step(name, fn)
        except Exception as exc:  # noqa: BLE001 - report the step as failed, keep the summary
            print(f"cuda_emu {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            if name == "build":
                break
    print(f"\ncuda_emu [{args.variant}] summary: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    for line in summary:
        print("  " + line)
    if failed:
        print(f"cuda_emu [{args.variant}]: FAILED steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
