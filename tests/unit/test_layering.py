"""The import rules of the layout (README, "Layout"), read from the source with `ast`:
every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "command_api", "query_api", "projections", "taskctl", "bench")

# package -> the packages of ours it must not import
FORBIDDEN = {
    "shared": {"command_api", "query_api", "projections", "taskctl", "bench"},
    "command_api": {"query_api", "projections", "taskctl", "bench"},
    "query_api": {"command_api", "projections", "taskctl", "bench"},
    "projections": {"command_api", "query_api", "taskctl", "bench"},
    "taskctl": set(),
    "bench": {"taskctl"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The modules of ours that `path` imports (a `from package import name` counts as
    importing the submodule when `name` is one)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                while name not in MODULES and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in MODULES:
                    out.add(name)
    return out


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def test_the_source_tree_has_every_package():
    for package in PACKAGES:
        assert package in MODULES, package


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_the_layers_below_it(package: str):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] in FORBIDDEN[package]
    )
    assert wrong == []


def test_there_are_no_import_cycles():
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert cycles == []


def test_the_rules_are_checked_against_real_imports():
    """The checker sees imports inside functions, and names imported from a package."""
    assert "shared.settings" in GRAPH["command_api.app"]
    assert any(target.startswith("command_api") for target in GRAPH["taskctl.cli"])
