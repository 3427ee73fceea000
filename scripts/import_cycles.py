"""Import cycles among latentcache's modules, and modules over the size limit.

Reads the sources with `ast` (nothing is imported). An edge A -> B is a module-level import of B
in A (imports under `if TYPE_CHECKING:` and inside functions do not run when A is imported, so
they are not edges); importing a.b.c also runs a/__init__ and a/b/__init__, so those are edges too.
Prints every cycle (strongly connected component) and every module over MAX_LINES lines, the
function-local imports of the package's own modules, and the cycles they would close; exits 1 on
a module-level cycle or an oversize module (with --strict, also on a cycle through a function).

    python scripts/import_cycles.py [--strict] [--root latentcache] [--max-lines 400]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MAX_LINES = 400


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (before its imported names)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(test)


def imported(module: str, is_package: bool, nodes: list[ast.stmt], known: set[str]) -> set[str]:
    """Own modules imported by these statements (not descending into functions, classes or TYPE_CHECKING)."""
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, is_package, node)
            out.add(target)
            out |= {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
        elif isinstance(node, ast.If | ast.Try) and not is_type_checking(node):
            bodies = [node.body, node.orelse, *(h.body for h in getattr(node, "handlers", []))]
            out |= imported(module, is_package, [n for body in bodies for n in body], known)
    ancestors = set(parents(module, known))  # already being imported when `module` runs
    return {p for name in out if name in known for p in parents(name, known)} - ancestors - {module}


def parents(name: str, known: set[str]) -> list[str]:
    """The module and every package above it that exists: importing it runs all of them."""
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in known]


def local_imports(module: str, is_package: bool, tree: ast.Module, known: set[str]) -> dict[str, set[str]]:
    """Own modules imported inside each function: {"module.function": {imported, ...}}."""
    found: dict[str, set[str]] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            names = imported(module, is_package, fn.body, known)
            if names:
                found.setdefault(f"{module}.{fn.name}", set()).update(names)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "latentcache"))
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    parser.add_argument("--strict", action="store_true", help="Also fail on cycles through function-local imports.")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph: dict[str, set[str]] = {}
    local: dict[str, set[str]] = {}
    oversize = []
    for name, path in files.items():
        text = path.read_text()
        tree = ast.parse(text)
        is_package = path.name == "__init__.py"
        graph[name] = imported(name, is_package, tree.body, known)
        local.update(local_imports(name, is_package, tree, known))
        if len(text.splitlines()) > args.max_lines:
            oversize.append(f"{path.relative_to(root.parent)}: {len(text.splitlines())} lines")
    found = cycles(graph)
    with_local = {m: graph[m] | {t for f, ts in local.items() if f.rsplit(".", 1)[0] == m for t in ts} for m in graph}
    late = [c for c in cycles(with_local) if c not in found]
    print(f"{len(files)} modules, {sum(map(len, graph.values()))} module-level imports of own modules")
    print(f"function-local imports of own modules ({sum(map(len, local.values()))}):")
    print("".join(f"  {fn} -> {', '.join(sorted(ts))}\n" for fn, ts in sorted(local.items())), end="")
    for component in found:
        print("CYCLE:", " <-> ".join(component))
    for component in late:
        print("CYCLE through function-local imports:", " <-> ".join(component))
    for line in oversize:
        print(f"OVER {args.max_lines} LINES: {line}")
    print(
        f"{len(found)} import cycle(s), {len(late)} more through function-local imports, "
        f"{len(oversize)} module(s) over {args.max_lines} lines"
    )
    return 1 if found or oversize or (args.strict and late) else 0


if __name__ == "__main__":
    sys.exit(main())
