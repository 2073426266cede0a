"""The layout is a building: each folder a floor, and a floor imports only the floors below it.

    core (the contract) < training < backends < export, serving < predict < resdeploy (the CLI) < bench

export and serving share a floor and never import each other. Every import counts, also the ones
inside functions (a lazy import is still a dependency), read from the source with ``ast``.
docs/design.md, "Layout", explains the floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"core": 0, "training": 1, "backends": 2, "export": 3, "serving": 3, "predict": 4, "resdeploy": 5,
          "bench": 6}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in FLOORS}


def _graph() -> dict[str, set[str]]:
    files = [p for top in FLOORS for p in (ROOT / top).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        # keep the names that are modules (drop `from core.errors import ConfigError`'s class name)
        graph[name] = {n for n in _imports(path) if n in modules and n != name}
    return graph


GRAPH = _graph()


def test_the_graph_sees_every_floor():
    assert {m.split(".")[0] for m in GRAPH} == set(FLOORS)
    assert "core.manifest" in GRAPH["serving.engine"]  # the reader works: a known edge is found
    assert "backends.pytorch" in GRAPH["serving.engine"]  # and a lazy import inside a function


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_floor_imports_a_higher_or_sibling_floor(module):
    floor, top = FLOORS[module.split(".")[0]], module.split(".")[0]
    wrong = sorted(dep for dep in GRAPH[module]
                   if dep.split(".")[0] != top and FLOORS[dep.split(".")[0]] >= floor)
    assert not wrong, f"{module} (floor {floor}) imports {wrong}"


def test_core_imports_no_stage():
    for module, deps in GRAPH.items():
        if module.startswith("core"):
            assert all(d.startswith("core") for d in deps), (module, deps)


def test_no_import_loops():
    """Depth-first search for a cycle among the project's modules."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (cycle := visit(dep, path + [node])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])


def _runtime_modules(top: str = "serving") -> set[str]:
    """What ``top`` reaches (backends.pytorch, which needs training/, is loaded only for
    RESDEPLOY_BACKEND=pytorch / --backend pytorch, which a torch-free image cannot run)."""
    reached, todo = set(), [m for m in GRAPH if m.startswith(top)]
    while todo:
        module = todo.pop()
        if module in reached or module == "backends.pytorch":
            continue
        reached.add(module)
        todo += GRAPH[module]
    return reached


def test_the_runtime_image_needs_no_training_export_or_cli():
    """serving/ reaches core/ and backends/ only (backends.pytorch, which needs training/, is loaded
    only for RESDEPLOY_BACKEND=pytorch, which a torch-free image cannot run)."""
    reached = _runtime_modules()
    assert {m.split(".")[0] for m in reached} == {"core", "backends", "serving"}, sorted(reached)


def test_offline_prediction_needs_no_training_export_or_cli():
    """predict/ runs where the service runs: on the runtime's modules and its own, torch-free."""
    reached = _runtime_modules("predict")
    assert {m.split(".")[0] for m in reached} == {"core", "backends", "serving", "predict"}, sorted(reached)
    assert {m for m in reached if m.startswith("serving")} == {"serving.engine"}  # not the HTTP service


def test_bentofile_packs_every_module_the_runtime_reaches():
    """`bentoml build` copies only bentofile.yaml's ``include`` globs: a module serving reaches that
    is not listed is missing from the Bento (an ImportError at start-up, never seen in a checkout)."""
    import fnmatch

    import yaml

    include = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    reached = _runtime_modules()
    files = {str((ROOT / m.replace(".", "/")).with_suffix(".py").relative_to(ROOT)) if
             (ROOT / m.replace(".", "/")).with_suffix(".py").is_file() else f"{m.replace('.', '/')}/__init__.py"
             for m in reached}
    missing = sorted(f for f in files if not any(fnmatch.fnmatch(f, g) or fnmatch.fnmatch(f, g.replace("**/", ""))
                                                   for g in include))
    assert not missing, f"add to bentofile.yaml's include: {missing}"
