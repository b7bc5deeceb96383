"""Build the CUDA emulation library: csrc/cuda/* rewritten (rewrite.py) and compiled as host C++ with
g++, plus the emulator runtime (src/) and its self-test kernels (tests/selftest/), into one shared
library that `cuda_emu.load()` loads next to vita_ext._C.

Variants:
  plain  -O1, gcov instrumentation of the kernel sources (line coverage of csrc/cuda), and the cheap
         UBSan checks (array bounds -- static shared arrays are real C arrays here --, alignment,
         null, shift, division by zero, missing return) that abort at the first finding;
  asan   -O1, AddressSanitizer + UBSan (all of -fsanitize=undefined but vptr); Python must run with
         LD_PRELOAD=<libasan.so> (run.py does that).

Usage: python tools/cuda_emu/build.py [--variant plain|asan] [--src csrc/cuda] [--out DIR] [--jobs N]
Objects are rebuilt only when a dependency changed (g++ -MMD); MAX_JOBS sets the default --jobs.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import rewrite  # noqa: E402

LIB_NAME = "libvita_ext_cuda_emu.so"
UBSAN_CHEAP = "alignment,bounds,null,return,vla-bound,shift,integer-divide-by-zero,unreachable"
VARIANTS = {
    "plain": {"opt": ["-O1", f"-fsanitize={UBSAN_CHEAP}", "-fno-sanitize-recover=all"], "coverage": True},
    "asan": {"opt": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"],
             "coverage": False},
}


def torch_flags() -> tuple[list[str], list[str], str]:
    """(-isystem include flags, library dirs, cxx11 abi flag value) of the installed torch."""
    import torch
    from torch.utils import cpp_extension

    inc = [f for d in cpp_extension.include_paths() for f in ("-isystem", d)]
    return inc, cpp_extension.library_paths(), str(int(torch._C._GLIBCXX_USE_CXX11_ABI))


def default_out(variant: str) -> Path:
    return ROOT / "build" / "cuda_emu" / variant


def _stale(obj: Path, dep: Path, cmd_file: Path, cmd: list[str]) -> bool:
    if not obj.exists() or not dep.exists() or not cmd_file.exists() or cmd_file.read_text() != " ".join(cmd):
        return True
    t = obj.stat().st_mtime
    text = dep.read_text().replace("\\\n", " ")
    deps = text.split(":", 1)[1].split() if ":" in text else []
    return any(not Path(d).exists() or Path(d).stat().st_mtime > t for d in deps)


def compile_one(src: Path, obj: Path, flags: list[str]) -> tuple[Path, float, str]:
    obj.parent.mkdir(parents=True, exist_ok=True)
    dep, cmd_file = obj.with_suffix(".d"), obj.with_suffix(".cmd")
    cmd = ["g++", *flags, "-MMD", "-MF", str(dep), "-c", str(src), "-o", str(obj)]
    if not _stale(obj, dep, cmd_file, cmd):
        return obj, 0.0, ""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return obj, -1.0, f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}"
    cmd_file.write_text(" ".join(cmd))
    return obj, time.monotonic() - t0, proc.stderr


def build(variant: str = "plain", src: Path | None = None, out: Path | None = None, jobs: int | None = None,
          extra_kernel_dirs: list[Path] | None = None, verbose: bool = True) -> Path:
    """Builds the library and returns its path. src: the CUDA sources (default csrc/cuda); the headers
    they include from its parent (csrc/) are found through -I <parent>."""
    cfg = VARIANTS[variant]
    src = (src or ROOT / "csrc" / "cuda").resolve()
    out = (out or default_out(variant)).resolve()
    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    extra = [d.resolve() for d in (extra_kernel_dirs or [HERE / "tests" / "selftest"])]
    t0 = time.monotonic()
    gen = out / "src"
    rewrite.rewrite_tree(src, gen / src.name, [src.parent])
    for d in extra:
        rewrite.rewrite_tree(d, gen / d.name, [d, src.parent])
    flags, pch_job = unit_flags(variant, gen, src, out / "pch")
    _, t_pch, msg = compile_one(*pch_job)
    if t_pch < 0:
        raise RuntimeError("cuda_emu build failed (precompiled prelude):\n" + msg)
    if t_pch > 0 and verbose:
        print(f"  precompiled the prelude in {t_pch:.1f} s", flush=True)
    jobs_list = []
    for d in [src, *extra]:
        for f in sorted((gen / d.name).rglob("*.cu")):
            jobs_list.append((f, out / "obj" / d.name / (f.name + ".o"), [*flags, "-x", "c++"]))
    for f in sorted((HERE / "src").glob("*.cpp")):
        jobs_list.append((f, out / "obj" / "runtime" / (f.name + ".o"), flags))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda a: compile_one(*a), jobs_list))
    failed = [msg for _, t, msg in results if t < 0]
    if failed:
        raise RuntimeError("cuda_emu build failed:\n" + "\n".join(failed))
    for obj, t, msg in results:
        if t > 0 and verbose:
            print(f"  compiled {obj.relative_to(out)} in {t:.1f} s", flush=True)
        if msg.strip() and verbose:
            print(msg.strip()[-4000:], flush=True)
    lib = link(variant, [o for o, _, _ in results], out / LIB_NAME)
    if verbose:
        print(f"cuda_emu {variant} build: {lib} ({time.monotonic() - t0:.1f} s)", flush=True)
    return lib


def unit_flags(variant: str, gen: Path, src: Path, pch_dir: Path) -> tuple[list[str], tuple]:
    """(flags of every translation unit, the job that precompiles the prelude into pch_dir)."""
    cfg = VARIANTS[variant]
    inc, _, abi = torch_flags()
    common = ["-std=c++20", "-fPIC", "-g", "-fno-omit-frame-pointer", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
              "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable",
              "-Wno-unused-but-set-variable", *cfg["opt"], "-I", str(HERE / "include"), "-I", str(gen),
              "-I", str(src.parent), *inc]
    if cfg["coverage"]:
        common += ["--coverage", "-fprofile-update=single"]
    # Every translation unit starts with the prelude (torch's headers + the CUDA keywords), precompiled
    # once: parsing ATen dominates the cost of each unit otherwise.
    pch = pch_dir / "cuda_emu" / "prelude.h.gch"
    pch_job = (HERE / "include" / "cuda_emu" / "prelude.h", pch, [*common, "-x", "c++-header"])
    return ["-I", str(pch_dir), *common, "-include", "cuda_emu/prelude.h", "-Winvalid-pch"], pch_job


def link(variant: str, objs: list[Path], lib: Path) -> Path:
    cfg = VARIANTS[variant]
    _, libdirs, _ = torch_flags()
    cmd = ["g++", "-shared", "-o", str(lib), *map(str, objs), *cfg["opt"], *(["--coverage"] if cfg["coverage"] else []),
           *[f for d in libdirs for f in ("-L", d, f"-Wl,-rpath,{d}")], "-ltorch_cpu", "-lc10"]
    newest = max(Path(o).stat().st_mtime for o in objs)
    if not lib.exists() or lib.stat().st_mtime < newest:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cuda_emu link failed:\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return lib


def build_patched(base: Path, patched: dict[str, str], out: Path, src: Path | None = None,
                  jobs: int | None = None, variant: str = "plain") -> Path:
    """A variant of the plain build `base` in which the CUDA sources named in `patched` (file name ->
    new text) differ: only the translation units that include a patched file are compiled again (with
    base's precompiled prelude); every other object is linked from base. Used by planted.py."""
    src = (src or ROOT / "csrc" / "cuda").resolve()
    base, out = base.resolve(), out.resolve()
    gen_base, gen = base / "src", out / "src"
    known = rewrite.known_identifiers()
    for f in (gen_base / src.name).rglob("*"):  # unpatched rewritten files, so relative includes resolve
        if f.is_file() and f.name not in patched:
            target = gen / src.name / f.relative_to(gen_base / src.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or target.read_text() != f.read_text():
                target.write_text(f.read_text())
    changed = set()
    for name, text in patched.items():
        res = rewrite.rewrite_text(text, str(src / name), known)
        target = gen / src.name / name
        if not target.exists() or target.read_text() != res.text:
            target.write_text(res.text)
        changed.add(str(gen_base / src.name / name))
    flags, _ = unit_flags(variant, gen, src, base / "pch")
    objs, todo = [], []
    for obj in sorted((base / "obj").rglob("*.o")):
        dep = obj.with_suffix(".d")
        text = dep.read_text().replace("\\\n", " ") if dep.exists() else ""
        deps = text.split(":", 1)[1].split() if ":" in text else []
        unit = obj.parent.name
        if unit == src.name and any(d in changed for d in deps):
            todo.append((gen / unit / obj.name[:-2], out / "obj" / unit / obj.name, [*flags, "-x", "c++"]))
        else:
            objs.append(obj)
    with ThreadPoolExecutor(max_workers=max(1, jobs or int(os.environ.get("MAX_JOBS", "2")))) as pool:
        results = list(pool.map(lambda a: compile_one(*a), todo))
    failed = [msg for _, t, msg in results if t < 0]
    if failed:
        raise RuntimeError("cuda_emu patched build failed:\n" + "\n".join(failed))
    return link(variant, objs + [o for o, _, _ in results], out / LIB_NAME)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="plain")
    ap.add_argument("--src", type=Path, default=None, help="CUDA sources (default: csrc/cuda)")
    ap.add_argument("--out", type=Path, default=None, help="build folder (default: build/cuda_emu/<variant>)")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        build(args.variant, args.src, args.out, args.jobs)
    except rewrite.Refused as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
