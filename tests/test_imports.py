"""The package layers: evolution -> workers -> genome, never upward, and no import circle between modules; and
the test command's process groups, which must run every test module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("genome", "workers", "evolution")
LAYER = {name: i for i, name in enumerate(PACKAGES)}  # a module may import its own layer or lower ones


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Project modules imported by ``name`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    known = modules()
    return {m for m in found if m in known and m != name}


def test_no_module_imports_a_higher_layer():
    for name, path in modules().items():
        for target in imports(name, path, top_level_only=False):
            assert LAYER[target.split(".")[0]] <= LAYER[name.split(".")[0]], f"{name} imports {target}"


def test_no_import_circle_between_modules():
    known = modules()
    graph = {name: {t for t in imports(name, path, top_level_only=True) if not name.startswith(t + ".")}
             for name, path in known.items()}  # a submodule importing its own package is not a circle
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = trail[trail.index(target):] + [target] if target in trail else [node, target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 20


def test_no_circle_even_through_imports_inside_functions():
    """Deferred imports hide circles from Python but not from readers: none either (a package's own
    ``__init__`` re-exporting its submodules is not a circle)."""
    known = modules()
    graph = {name: {t for t in imports(name, path, top_level_only=False) if not name.startswith(t + ".")}
             for name, path in known.items()}
    for name, targets in graph.items():
        for target in targets:
            back = graph.get(target, set())
            assert name not in back or target.startswith(name + "."), f"{name} <-> {target}"


def test_every_package_export_resolves():
    import evolution
    import genome
    import workers

    for package in (genome, workers, evolution):
        assert package.__all__
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"


def test_the_test_command_runs_every_test_module_once_and_the_o1_modules_alone():
    """The README's test command runs one pytest process per line of tests/process_groups.txt: a module on no
    line would never run, one on two lines would run twice, and a module of conftest.NEEDS_O1 turns its whole
    process to -O1, so it has a line of its own."""
    from conftest import NEEDS_O1

    text = (ROOT / "tests" / "process_groups.txt").read_text()
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    # xargs -L joins a line that ends in a blank to the next one
    assert all(line == line.rstrip() for line in text.splitlines())
    listed = sorted(module for line in lines for module in line)
    assert listed == sorted(f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py"))
    for line in lines:
        assert len(line) == 1 or not NEEDS_O1 & {Path(module).name for module in line}, line
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- test-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert "tests/process_groups.txt" in command and "pytest" in command
