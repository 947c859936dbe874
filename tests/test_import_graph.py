"""The import graph of ``polytope/`` and ``experiments/``: no cycles, layers point one way.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (lazy
imports), relative or absolute.  The wings of ``polytope/`` and what each may import:

    model  <-  bounds  <-  solvers  <-  verifiers  <-  runs  <-  commands
    model  <-  io                                            (commands may import anything)

``polytope/__init__.py`` and ``__main__.py`` are the public facade and are exempt as importers;
a wing importing the facade is a cycle through it.  Nothing under ``polytope/`` imports
``experiments`` except the ``reproduce`` dispatcher (which lists the package and runs an
experiment by name).  An experiment imports ``polytope`` (never ``polytope.commands``) and the
one shared helper module, never another experiment.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The other wings each wing may import (its own modules it always may: cycles are tested apart).
ALLOWED: dict[str, frozenset[str]] = {
    "model": frozenset(),
    "bounds": frozenset({"model"}),
    "solvers": frozenset({"model", "bounds"}),
    "verifiers": frozenset({"model", "bounds", "solvers"}),
    "io": frozenset({"model"}),
    "runs": frozenset({"model", "bounds", "solvers", "verifiers", "io"}),
    "commands": frozenset({"model", "bounds", "solvers", "verifiers", "io", "runs", "commands"}),
}
FACADE = frozenset({"polytope", "polytope.__main__"})
DISPATCHER = "polytope.commands.reproduce"
HELPER = "experiments._plot"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(root: Path = ROOT) -> dict[str, str]:
    """``{module: source}`` of every module under ``polytope/`` and ``experiments/``."""
    files = [p for pkg in ("polytope", "experiments") for p in sorted((root / pkg).rglob("*.py"))]
    return {module_name(p, root): p.read_text() for p in files}


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The module of ours that importing ``name`` names (a submodule or the package above a name)."""
    modules = set(modules)
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str, source: str, modules: Iterable[str]) -> set[str]:
    """Our modules that ``module`` imports anywhere in its body (function-level imports included)."""
    modules = set(modules)
    is_package = any(m.startswith(module + ".") for m in modules)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            targets = [t for t in targets[:-1] if t in modules] or [base]
        else:
            continue
        found |= {r for t in targets if (r := _resolve(t, modules)) is not None and r != module}
    return found


def graph(srcs: Mapping[str, str]) -> dict[str, set[str]]:
    return {m: imports(m, s, srcs) for m, s in srcs.items()}


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "polytope" else None


def layer_violations(edges: Mapping[str, set[str]]) -> list[str]:
    """Imports against the wing order, of ``experiments``, or between experiments."""
    bad = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if src.startswith("polytope"):
                if dst.split(".")[0] == "experiments":
                    if not (src == DISPATCHER and dst == "experiments"):
                        bad.append(f"{src} imports {dst}: only {DISPATCHER} reaches experiments (by name)")
                elif src not in FACADE and wing(dst) not in {wing(src), *ALLOWED.get(wing(src) or "", ())} - {None}:
                    bad.append(f"{src} ({wing(src)}) imports {dst} ({wing(dst) or 'the facade'})")
            elif src.startswith("experiments"):
                if dst.startswith("polytope.commands"):
                    bad.append(f"{src} imports {dst}: experiments use the library, not the command line")
                elif dst.startswith("experiments") and dst != HELPER:
                    bad.append(f"{src} imports {dst}: experiments share only {HELPER}")
    return bad


def test_every_polytope_module_lives_in_a_wing() -> None:
    stray = [m for m in sources() if m.startswith("polytope") and m not in FACADE and wing(m) not in ALLOWED]
    assert not stray, f"modules outside the wings {sorted(ALLOWED)}: {stray}"


def test_no_import_cycles_among_polytope_modules() -> None:
    edges = {m: {t for t in ts if t.startswith("polytope")}
             for m, ts in graph(sources()).items() if m.startswith("polytope")}
    assert not cycles(edges), f"import cycles: {cycles(edges)}"


def test_imports_follow_the_wing_order() -> None:
    bad = layer_violations(graph(sources()))
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_the_graph_sees_lazy_relative_and_facade_imports() -> None:
    srcs = {
        "polytope": "from polytope.verifiers.robust import certify\nfrom polytope.bounds.dual import D\n",
        "polytope.model": "",
        "polytope.model.sets": "def f():\n    from ..verifiers import robust\n",
        "polytope.verifiers": "",
        "polytope.verifiers.robust": "from polytope import model\nfrom polytope.model.sets import Ball\n",
        "polytope.bounds": "",
        "polytope.bounds.dual": "import polytope\n",
        "experiments": "",
        "experiments._plot": "",
        "experiments.fig1": "from experiments import fig2, _plot\nfrom polytope.commands.radius import rows\n",
        "experiments.fig2": "",
        "polytope.commands": "",
        "polytope.commands.radius": "import experiments.fig1\n",
    }
    edges = graph(srcs)
    assert edges["polytope.model.sets"] == {"polytope.verifiers.robust"}
    assert edges["polytope.verifiers.robust"] == {"polytope.model", "polytope.model.sets"}
    assert edges["experiments.fig1"] == {"experiments.fig2", "experiments._plot", "polytope.commands.radius"}
    assert sorted(cycles({m: {t for t in ts if t.startswith("polytope")} for m, ts in edges.items()})) == [
        ["polytope", "polytope.bounds.dual"], ["polytope.model.sets", "polytope.verifiers.robust"]
    ]
    assert layer_violations(edges) == [
        "experiments.fig1 imports experiments.fig2: experiments share only experiments._plot",
        "experiments.fig1 imports polytope.commands.radius: experiments use the library, not the command line",
        "polytope.bounds.dual (bounds) imports polytope (the facade)",
        "polytope.commands.radius imports experiments.fig1: only polytope.commands.reproduce reaches experiments "
        "(by name)",
        "polytope.model.sets (model) imports polytope.verifiers.robust (verifiers)",
    ]


@pytest.mark.parametrize("module", ["polytope.__main__", DISPATCHER])
def test_the_exempt_modules_exist(module: str) -> None:
    assert module in sources(), f"{module} is named in the rules but does not exist"


def test_the_facade_exports_every_public_name() -> None:
    import polytope as pt

    missing = [name for name in pt.__all__ if not hasattr(pt, name)]
    assert not missing, f"named in polytope.__all__ but not importable: {missing}"
    assert {"RelaxedLP", "ExactMILP", "optimize_alpha", "tightness_rows"} <= set(pt.__all__)
