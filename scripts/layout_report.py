"""The code's shape, for refactoring reviews: the largest files and functions and the import circles.

    python scripts/layout_report.py [TOP]          # from the repository root
    python scripts/layout_report.py --walk         # and linear_divergence's walk down to a Triton kernel

Modules are opd_fast/ and kernels/ (installed as opd_fast.kernels). An import counts wherever it stands (at the top
or inside a function; not under ``if TYPE_CHECKING``), and importing ``a.b.c`` counts as importing the packages
``a.b`` and ``a`` too unless the importer is inside them: Python runs a package's ``__init__`` before any module
below it, which is how a circle can hide behind a submodule import. tests/repo/test_import_layout.py checks the rules
built on this graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ((REPO / "opd_fast", "opd_fast"), (REPO / "kernels", "opd_fast.kernels"))


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    found = {}
    for root, prefix in SOURCES:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped |= {id(inner) for inner in ast.walk(child)}
    return skipped


def _imported_names(node: ast.AST, package: str, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    return [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names]


def _owner(name: str, known: dict[str, Path]) -> str:
    """The deepest known module that ``name`` names or lies in ('' when none: a third-party import)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports (directly, or by running their packages' ``__init__``)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            for imported in _imported_names(node, package, known):
                target = _owner(imported, known)
                while target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
                    target = _owner(target.rpartition(".")[0], known)
    return edges


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return sorted(circles)


def file_lengths() -> list[tuple[int, str]]:
    """(lines, path) of every module, longest first."""
    rows = [(len(path.read_text().splitlines()), str(path.relative_to(REPO))) for path in modules().values()]
    return sorted(rows, reverse=True)


def function_lengths() -> list[tuple[int, str]]:
    """(lines, 'path:line name') of every function and method, longest first."""
    rows = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(REPO)}:{node.lineno} {node.name}"
                rows.append((node.end_lineno - node.lineno + 1, where))
    return sorted(rows, reverse=True)


def linear_divergence_walk() -> tuple[list[str], list[str]]:
    """Follow ``opd_fast.linear_divergence``'s student hidden states (backend="triton", Triton's CPU interpreter
    where there is no GPU) to the first kernel launch. Returns (the package's frames on the stack at that launch,
    outermost first: the call depth; every package function that received the hidden states, or a tensor sharing
    their storage, as an argument, in call order: the hops), each as 'path: function'."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(REPO))  # this checkout's opd_fast, whichever one is installed
    import torch

    import opd_fast

    ours = {str(path.resolve()) for path in modules().values()}
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    storage = hidden.untyped_storage().data_ptr()
    stack_at_launch: list[str] = []
    hops: list[str] = []

    def where(frame) -> str:
        return f"{Path(frame.f_code.co_filename).resolve().relative_to(REPO)}: {frame.f_code.co_name}"

    def receives_hidden(frame) -> bool:
        code = frame.f_code
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            value = frame.f_locals.get(name)
            for item in value if isinstance(value, tuple | list) else (value,):
                tensors = [item] if isinstance(item, torch.Tensor) else [getattr(item, "hs", None)]
                if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage for t in tensors):
                    return True
        return False

    def profile(frame, event, arg):
        if stack_at_launch or event != "call":
            return
        if "triton" in frame.f_code.co_filename and frame.f_code.co_name == "run":  # a kernel launch
            outer = frame.f_back
            while outer is not None:
                if str(Path(outer.f_code.co_filename).resolve()) in ours:
                    stack_at_launch.insert(0, where(outer))
                outer = outer.f_back
        elif str(Path(frame.f_code.co_filename).resolve()) in ours and receives_hidden(frame):
            hops.append(where(frame))

    sys.setprofile(profile)
    try:
        opd_fast.linear_divergence(hidden, weight, hidden.detach() * 0.5, weight.detach() * 2, backend="triton")
    finally:
        sys.setprofile(None)
    return stack_at_launch, hops


def main(top: int = 12) -> None:
    print("largest files:")
    for lines, where in file_lengths()[:top]:
        print(f"  {lines:5d}  {where}")
    print("largest functions:")
    for lines, where in function_lengths()[:top]:
        print(f"  {lines:5d}  {where}")
    circles = import_circles(import_graph())
    print(f"import circles: {len(circles)}")
    for component in circles:
        print("  " + " <-> ".join(component))


if __name__ == "__main__":
    if sys.argv[1:] == ["--walk"]:
        stack, hops = linear_divergence_walk()
        files = {frame.split(":")[0] for frame in stack}
        print(f"call depth at the first kernel launch: {len(stack) - 1} calls, {len(files)} files")
        for frame in stack:
            print(f"  {frame}")
        files = {frame.split(":")[0] for frame in hops}
        print(f"functions receiving the hidden states before it: {len(hops)}, in {len(files)} files")
        for frame in hops:
            print(f"  {frame}")
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
