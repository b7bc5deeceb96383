"""Rewrite CUDA sources (.cu, .cuh, ...) into host C++ for the emulation tier, line for line.

The rewrite is mechanical and keeps every token on the line it was on, so that compiler messages,
gcov and the emulator's reports (which carry ``__FILE__``/``__LINE__``) point at the original file;
the output starts with ``#line 1 "<original path>"``. What it changes:

- ``k<<<grid, block[, smem[, stream]]>>>(args)`` becomes
  ``::cuda_emu::launch(k, "k", __FILE__, __LINE__, grid, block[, smem[, stream]])(args)``;
- ``__shared__ T name[A][B];`` becomes a reference to the block's own storage
  (``auto& name = ::cuda_emu::static_shared<T[A][B], __COUNTER__, align>();``) and
  ``extern __shared__ T name[];`` a pointer to the block's dynamic shared memory;
- the body of every ``__global__`` function starts with ``::cuda_emu::kernel_entry(...)`` (kernel name for
  reports, ``__launch_bounds__`` checked against the launch);
- ``TORCH_LIBRARY_IMPL(ns, CUDA, m)`` becomes ``CUDA_EMU_LIBRARY_IMPL(ns, CUDA, m)`` (recorded, registered
  later under the CPU key by ``cuda_emu.enable``).

Everything else is left to the force-included header (include/cuda_emu/prelude.h) and the stand-in
headers (include/). Anything the tier does not emulate is refused with ``file:line: reason`` -- inline
assembly/PTX, ``__CUDA_ARCH__`` branches, ``__constant__``/``__managed__`` memory, cooperative groups,
WMMA, CUDA headers without a stand-in, and any ``__xxx``/``cudaXxx``/``cublasXxx`` identifier that the
stand-ins do not define -- rather than compiled into something that only looks right.

Usage: python tools/cuda_emu/rewrite.py SRC_DIR OUT_DIR [--include-root DIR ...]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAND_INS = HERE / "include"
SUFFIXES = {".cu", ".cuh", ".h", ".hpp", ".hh", ".inl", ".inc"}

# Tokens refused with a reason of their own (checked before the generic unknown-identifier rule).
FORBIDDEN = [
    (r"\b(?:asm|__asm__|__asm)\b", "inline assembly / PTX is not emulated (mma.sync, cp.async, ...)"),
    (r"\b(?:__CUDA_ARCH__|__CUDACC__|__NVCC__|__CUDACC_RTC__|__CUDA_ARCH_LIST__)\b",
     "a preprocessor branch on the device compiler: the emulated build would take the host branch"),
    (r"\b__constant__\b", "__constant__ memory is not emulated"),
    (r"\b__managed__\b", "__managed__ memory is not emulated"),
    (r"\bcooperative_groups\b|\bcg::", "cooperative groups are not emulated"),
    (r"\bnvcuda\b|\bwmma\b", "WMMA / tensor-core fragments are not emulated"),
    (r"\b(?:tex1Dfetch|tex1D|tex2D|tex3D|surf1Dread|surf2Dread|surf1Dwrite|surf2Dwrite)\b",
     "textures and surfaces are not emulated"),
    (r"\b(?:__half|__half2|__nv_bfloat16|__nv_bfloat162|half2)\b",
     "cuda_fp16 / cuda_bf16 types have no stand-in (use at::Half / at::BFloat16)"),
    (r"\bTORCH_LIBRARY(?:_FRAGMENT)?\s*\(", "schemas belong in csrc/vita_ext.cpp (TORCH_LIBRARY_IMPL only here)"),
]

# Identifiers that look like CUDA API or intrinsics: each must be defined by the stand-ins or the prelude.
CUDA_LOOKING = re.compile(r"\b(__[A-Za-z_]\w*|cuda[A-Z]\w*|cublas[A-Z]\w*|CUBLAS_\w+|CUDA_[RC]_\w+|cu[A-Z]\w*|"
                          r"atomic[A-Z]\w*)\b")
ALWAYS_KNOWN = {
    "__FILE__", "__LINE__", "__func__", "__PRETTY_FUNCTION__", "__FUNCTION__", "__VA_ARGS__", "__VA_OPT__",
    "__attribute__", "__restrict__", "__restrict", "__cplusplus", "__GNUC__", "__clang__", "__has_include",
    "__int128", "__COUNTER__", "__shared__", "__launch_bounds__", "__extension__", "__typeof__", "__alignof__",
    "__declspec", "__forceinline", "__unused__", "__always_inline__", "__noinline__",
}
SYSTEM_PREFIXES = ("ATen/", "c10/", "torch/", "caffe2/", "sys/", "bits/")


class Refused(Exception):
    """The source uses a construct the emulation tier does not handle; .problems lists 'file:line: why'."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def strip_code(text: str) -> str:
    """`text` with comments and the insides of string/char literals blanked (newlines kept), so that
    every index into the result is an index into `text`."""
    out = list(text)
    i, n = 0, len(text)

    def blank(a: int, b: int) -> None:
        for j in range(a, b):
            if out[j] != "\n":
                out[j] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == "R" and text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^()\\ ]{0,16})\(', text[i:])
            if not m:
                i += 1
                continue
            end = text.find(")" + m.group(1) + '"', i)
            end = n if end < 0 else end + len(m.group(1)) + 2
            blank(i + 2, end - 1)
            i = end
        elif c in "\"'":
            if c == "'" and i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_") and text[i - 1] not in "uUL":
                i += 1  # digit separator (1'000)
                continue
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, min(j, n))
            i = j + 1
        else:
            i += 1
    return "".join(out)


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def known_identifiers() -> set[str]:
    """Every identifier the stand-in headers and the prelude define or mention in code."""
    names = set(ALWAYS_KNOWN)
    for path in STAND_INS.rglob("*.h"):
        names.update(re.findall(r"\b[A-Za-z_]\w*\b", strip_code(path.read_text())))
    return names


def stand_in_headers() -> set[str]:
    return {p.relative_to(STAND_INS).as_posix() for p in STAND_INS.rglob("*.h")}


@dataclass
class Result:
    text: str
    launches: int = 0
    shared: int = 0
    kernels: list[str] = field(default_factory=list)
    registrations: int = 0


def _match_back(code: str, end: int, close: str, open_: str) -> int:
    """Index of the `open_` matching the `close` at code[end]."""
    depth, i = 0, end
    while i >= 0:
        if code[i] == close:
            depth += 1
        elif code[i] == open_:
            depth -= 1
            if depth == 0:
                return i
        i -= 1
    return -1


def _find_depth0(code: str, start: int, token: str) -> int:
    depth, i = 0, start
    while i < len(code):
        if depth == 0 and code.startswith(token, i):
            return i
        ch = code[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return -1
        i += 1
    return -1


def _kernels(code: str) -> tuple[list[tuple[int, str, str, bool]], set[str]]:
    """(insert position after '{', kernel name, launch-bounds expression, is template) per __global__."""
    found, templates = [], set()
    for m in re.finditer(r"\b__global__\b", code):
        line_start = code.rfind("\n", 0, m.start()) + 1
        if code[line_start:m.start()].lstrip().startswith("#"):
            continue
        i, depth, bounds, name, last_ident = m.end(), 0, "0", None, None
        while i < len(code):
            ch = code[i]
            if depth == 0 and ch in "{;":
                break
            if depth == 0 and code.startswith("__launch_bounds__", i):
                j = code.find("(", i)
                k = _find_depth0(code, j + 1, ")")
                first = code[j + 1:k]
                c = _find_depth0(first, 0, ",")
                bounds = (first if c < 0 else first[:c]).strip() or "0"
                i = k + 1
                continue
            if ch.isalpha() or ch == "_":
                w = re.match(r"[A-Za-z_]\w*", code[i:]).group(0)
                last_ident = w
                i += len(w)
                continue
            if ch == "(":
                if depth == 0 and name is None:
                    name = last_ident
                depth += 1
            elif ch == ")":
                depth -= 1
            i += 1
        if i >= len(code) or code[i] == ";" or name is None:
            continue
        before = code[:m.start()].rstrip()
        is_template = False
        if before.endswith(">"):
            lt = _match_back(before, len(before) - 1, ">", "<")
            is_template = lt > 0 and re.search(r"\btemplate\s*$", before[:lt]) is not None
        if is_template:
            templates.add(name)
        found.append((i + 1, name, bounds, is_template))
    return found, templates


def rewrite_text(text: str, path: str, known: set[str] | None = None) -> Result:
    """Rewrite one CUDA source. Raises Refused with every problem found."""
    known = known_identifiers() if known is None else known
    code = strip_code(text)
    problems: list[str] = []
    edits: list[tuple[int, int, str]] = []
    res = Result(text="")

    def refuse(pos: int, why: str) -> None:
        problems.append(f"{path}:{line_of(text, pos)}: cuda_emu rewrite refused: {why}")

    for pattern, why in FORBIDDEN:
        for m in re.finditer(pattern, code):
            refuse(m.start(), f"`{m.group(0).strip()}`: {why}")
    for m in CUDA_LOOKING.finditer(code):
        tok = m.group(1)
        if tok in known or tok.startswith("__builtin_") or tok.startswith("__sanitizer"):
            continue
        if any(re.fullmatch(p, tok) for p, _ in FORBIDDEN if not p.startswith(r"\bTORCH")):
            continue  # already reported with its reason
        refuse(m.start(), f"`{tok}` has no stand-in in tools/cuda_emu/include (not emulated)")

    # Kernels: entry hook after the opening brace.
    kernels, templates = _kernels(code)
    for pos, name, bounds, _ in kernels:
        edits.append((pos, pos, f" ::cuda_emu::kernel_entry(__PRETTY_FUNCTION__, {bounds});"))
        res.kernels.append(name)

    # Launches.
    for m in re.finditer(r"<<<", code):
        end = m.start() - 1
        while end >= 0 and code[end].isspace():
            end -= 1
        start = end
        if code[end] == ">":
            start = _match_back(code, end, ">", "<") - 1
            while start >= 0 and code[start].isspace():
                start -= 1
        while start >= 0 and (code[start].isalnum() or code[start] in "_:"):
            start -= 1
        start += 1
        callee = code[start:end + 1]
        if not re.fullmatch(r"\s*(::)?[A-Za-z_]\w*(::[A-Za-z_]\w*)*\s*(<.*>)?\s*", callee, re.S):
            refuse(m.start(), f"a launch whose kernel expression `{callee.strip()}` is not a (qualified) name")
            continue
        base = re.match(r"\s*(?:::)?([\w:]+)", callee).group(1).split("::")[-1]
        if "<" not in callee and base in templates:
            refuse(m.start(), f"template kernel `{base}` launched without explicit template arguments")
            continue
        close = _find_depth0(code, m.end(), ">>>")
        if close < 0:
            refuse(m.start(), "a launch configuration without its closing `>>>`")
            continue
        after = close + 3
        while after < len(code) and code[after].isspace():
            after += 1
        if after >= len(code) or code[after] != "(":
            refuse(m.start(), "`>>>` not followed by the argument list")
            continue
        name = " ".join(callee.split()).replace('"', "'")
        repl = (f"::cuda_emu::launch({text[start:end + 1]}, \"{name}\", __FILE__, __LINE__, "
                f"{text[m.end():close]})")
        edits.append((start, close + 3, repl))
        res.launches += 1

    # Shared memory declarations.
    for m in re.finditer(r"\b__shared__\b", code):
        ls = code.rfind("\n", 0, m.start()) + 1
        le = code.find("\n", m.start())
        le = len(code) if le < 0 else le
        if code[ls:m.start()].lstrip().startswith("#"):
            refuse(m.start(), "__shared__ inside a macro definition")
            continue
        semi = code.find(";", m.start(), le)
        if semi < 0:
            refuse(m.start(), "a __shared__ declaration that does not end on its own line")
            continue
        start = max(code.rfind(c, ls, m.start()) for c in ";{}") + 1
        start = max(start, ls)
        while code[start].isspace():
            start += 1
        decl = code[start:semi]
        aligns = [int(a) for a in re.findall(r"(?:__align__|alignas)\s*\(\s*(\d+)\s*\)", decl)]
        body = re.sub(r"(?:__align__|alignas)\s*\(\s*\d+\s*\)", " ", decl)
        is_extern = re.search(r"\bextern\b", body) is not None
        body = re.sub(r"\b(?:extern|static|__shared__|volatile)\b", " ", body).strip()
        if "=" in body or _find_depth0(body, 0, ",") >= 0:
            refuse(m.start(), "a __shared__ declaration with an initializer or several declarators")
            continue
        d = re.fullmatch(r"(.+?)\s*\b([A-Za-z_]\w*)\s*((?:\[[^\[\]]*\]\s*)*)", body, re.S)
        if not d or not d.group(1).strip():
            refuse(m.start(), f"a __shared__ declaration not of the form `T name[dims];`: `{decl.strip()}`")
            continue
        typ, name, dims = d.group(1).strip(), d.group(2), "".join(d.group(3).split())
        align = max(aligns) if aligns else 0
        if is_extern:
            if dims != "[]":
                refuse(m.start(), "an extern __shared__ array must be declared `name[]`")
                continue
            repl = f"{typ}* {name} = static_cast<{typ}*>(::cuda_emu::dynamic_shared({align}));"
        else:
            if "[]" in dims:
                refuse(m.start(), "a static __shared__ array without a size")
                continue
            repl = f"auto& {name} = ::cuda_emu::static_shared<{typ}{dims}, __COUNTER__, {align}>();"
        edits.append((start, semi + 1, repl))
        res.shared += 1

    # Registration.
    for m in re.finditer(r"\bTORCH_LIBRARY_IMPL\s*\(\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*\)", code):
        if m.group(2) != "CUDA":
            refuse(m.start(), f"TORCH_LIBRARY_IMPL for dispatch key {m.group(2)} (only CUDA is emulated)")
            continue
        edits.append((m.start(), m.start() + len("TORCH_LIBRARY_IMPL"), "CUDA_EMU_LIBRARY_IMPL"))
        res.registrations += 1

    if problems:
        raise Refused(problems)
    out = text
    for a, b, repl in sorted(edits, key=lambda e: e[0], reverse=True):
        if "\n" in repl and repl.count("\n") != text[a:b].count("\n"):
            raise AssertionError("rewrite would move lines")
        out = out[:a] + repl + out[b:]
    assert out.count("\n") == text.count("\n"), "rewrite moved lines"
    res.text = f'#line 1 "{path}"\n' + out
    return res


def check_includes(text: str, path: Path, src_root: Path, include_roots: list[Path]) -> list[str]:
    """Problems with the file's #includes: CUDA headers without a stand-in, and project headers outside the
    rewritten tree that contain CUDA constructs (they would be compiled without the rewrite)."""
    problems, stand = [], stand_in_headers()
    for lineno, line in enumerate(text.splitlines(), 1):
        m = re.match(r'\s*#\s*include\s*([<"])([^>"]+)[>"]', line)
        if not m:
            continue
        kind, name = m.groups()
        resolved = None
        if kind == '"':
            for root in [path.parent] + include_roots:
                if (root / name).is_file():
                    resolved = (root / name).resolve()
                    break
        if resolved is not None:
            inside = src_root.resolve() in resolved.parents
            if not inside and re.search(r"<<<|\b__shared__\b|\b__global__\b|\b__syncthreads\b|\b__shfl\w*",
                                        strip_code(resolved.read_text(errors="replace"))):
                problems.append(f"{path}:{lineno}: cuda_emu rewrite refused: {name} holds CUDA code but lies "
                                f"outside {src_root} (move it there so that it is rewritten)")
            continue
        cudaish = re.search(r"(^|/)(cu[a-z_]*\.h|cuda[^/]*|cub|thrust|mma\.h|cooperative_groups[^/]*|nvtx3?)(/|$)",
                            name) or "/cuda/" in "/" + name
        if cudaish and name not in stand:
            problems.append(f"{path}:{lineno}: cuda_emu rewrite refused: #include {kind}{name} has no stand-in in "
                            "tools/cuda_emu/include")
    return problems


def rewrite_tree(src: Path, out: Path, include_roots: list[Path]) -> list[Result]:
    """Rewrite every CUDA source under src into out (same relative paths); files are written only when
    their content changes, so a rebuild recompiles only what changed."""
    known, results, problems = known_identifiers(), [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in SUFFIXES):
        text = path.read_text()
        problems += check_includes(text, path, src, include_roots)
        try:
            res = rewrite_text(text, str(path.resolve()), known)
        except Refused as exc:
            problems += exc.problems
            continue
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_text() != res.text:
            target.write_text(res.text)
        results.append(res)
    if problems:
        raise Refused(problems)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--include-root", type=Path, action="append", default=[])
    args = ap.parse_args(argv)
    try:
        results = rewrite_tree(args.src, args.out, args.include_root)
    except Refused as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    n_k = sum(len(r.kernels) for r in results)
    print(f"cuda_emu rewrite: {len(results)} files, {n_k} kernels, {sum(r.launches for r in results)} launches, "
          f"{sum(r.shared for r in results)} shared declarations -> {os.fspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
