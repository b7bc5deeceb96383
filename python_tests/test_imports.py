"""Imports run one way (cli -> train/parallel -> model -> ops -> _C): no vita_ext module imports
another inside a function when that other module leads back to it (a function-local import that hides
a cycle means a name is in the wrong file). Static (ast): nothing is imported."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vita_ext")


def _modules() -> dict[str, str]:
    mods = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = "vita_ext" + path[len(ROOT):-3].replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _targets(node, package: str, mods: dict[str, str]) -> list[str]:
    """The vita_ext modules an import statement loads (a name imported from a package: the package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = package
            for _ in range(node.level - 1):
                pkg = pkg.rsplit(".", 1)[0]
            base = pkg + ("." + base if base else "")
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        if name.startswith("vita_ext"):
            out.append(name)
    return out


def _graph():
    mods = _modules()
    edges, local = {m: set() for m in mods}, []
    for mod, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in tree.body:
            edges[mod].update(t for t in _targets(node, package, mods) if t != mod)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    for t in _targets(node, package, mods):
                        if t != mod:
                            local.append((mod, t, node.lineno))
                            edges[mod].add(t)
    return edges, local


def _reaches(edges, start: str, goal: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def test_no_function_local_import_hides_a_cycle():
    edges, local = _graph()
    assert len(edges) > 50 and local  # the walk found the package and its local imports
    cycles = [f"{m}:{line} imports {t}, which leads back to {m}" for m, t, line in local if _reaches(edges, t, m)]
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_a_hidden_cycle():
    """The check itself: two modules importing each other inside functions are reported."""
    edges = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _reaches(edges, "b", "a") and not _reaches(edges, "c", "a")
