"""The package's shape: no import cycles (not even behind a function-local or ``TYPE_CHECKING``
import), and a bottom layer that imports nothing of the package; the file plumbing's errors name
the path the caller gave."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mugs import files

PACKAGE = Path(__file__).resolve().parents[1] / "mugs"
BOTTOM = ("mugs.files", "mugs.rundir")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, *, is_package: bool, modules: set[str]) -> set[str]:
    """The ``modules`` that module ``name`` imports anywhere in ``source`` (top level, functions,
    ``if TYPE_CHECKING:``); ``from pkg import name`` counts ``pkg.name`` when that is a module,
    else ``pkg``; relative imports are resolved."""
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {edge for edge in edges if edge in modules and edge != name}


def import_graph() -> dict[str, set[str]]:
    """Every module of ``mugs`` → the package's modules it imports."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: imported_modules(
            path.read_text(), name, is_package=path.name == "__init__.py", modules=set(paths)
        )
        for name, path in paths.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        while True:  # walk inside the component until a module repeats
            following = min(t for t in graph[path[-1]] if t in component)
            if following in seen:
                found.append([*path[path.index(following) :], following])
                break
            path.append(following)
            seen.add(following)
    return found


def test_the_graph_sees_local_type_checking_and_relative_imports() -> None:
    graph = import_graph()
    assert "mugs.training.checkpoint" in graph["mugs.cli"]  # inside a function
    assert "mugs.evaluation.features" in graph["mugs.evaluation.metrics_io"]  # under TYPE_CHECKING
    assert "mugs.model.network" in graph["mugs.model"]
    relative = "from . import b\nfrom .c import f\nfrom .. import top\n"
    modules = {"p", "p.q", "p.q.b", "p.q.c", "p.top"}
    assert imported_modules(relative, "p.q.a", is_package=False, modules=modules) == {
        "p.q.b",
        "p.q.c",
        "p.top",
    }
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_package_has_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" → ".join(cycle) for cycle in found)


@pytest.mark.parametrize("module", BOTTOM)
def test_the_bottom_layer_imports_nothing_of_the_package(module: str) -> None:
    assert import_graph()[module] == set()


def test_data_sources_and_prepare_do_not_import_torch() -> None:
    """prepare's worker processes import these; torch would cost them seconds and memory each."""
    probe = "import sys, mugs.data.sources, mugs.data.prepare; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_an_atomic_write_that_cannot_start_names_the_target(tmp_path: Path) -> None:
    target = Path("/proc/mugs-no-such-file")
    with pytest.raises(OSError, match=f"cannot write {target}") as error:
        files.atomic_write_text(target, "x")
    assert ".tmp" not in str(error.value)


def test_the_output_guard_tries_a_write(tmp_path: Path) -> None:
    """Permission bits and ``os.access`` let root through where nothing can be created."""
    assert files.check_output(tmp_path / "new" / "out.json") == tmp_path / "new" / "out.json"
    assert files.check_output(tmp_path / "new", directory=True) == tmp_path / "new"
    assert not list(tmp_path.iterdir())  # the probe left nothing
    with pytest.raises(files.OutputError, match=r"^cannot write /proc/x\.json: .* in /proc$"):
        files.check_output("/proc/x.json")
    (tmp_path / "input.pt").write_bytes(b"weights")
    os.link(tmp_path / "input.pt", tmp_path / "same.pt")
    with pytest.raises(files.OutputError, match="is the input"):
        files.check_output(tmp_path / "same.pt", [tmp_path / "input.pt"])
