"""The house rules of `common/`: packages are layered (a package imports only those below it), no module is longer
than 600 lines, and every package's public surface (`__all__`) resolves."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMON = ROOT / "common"
MAX_LINES = 600

# Floors, bottom first: a module may import from its own floor's packages' own modules and from floors below, never
# from a floor above. The foundation modules are flat files; every other floor is a package.
FLOORS: list[set[str]] = [
    {"errors", "config", "distributed", "hub", "atomic", "measure", "corpus", "plots", "stops"},
    {"data", "stats"},
    {"model"},
    {"hooks"},
    {"analysis", "llm"},
    {"figures"},
    {"run"},
    {"cli"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Modules of `common` that `path` imports when it runs (imports under `if TYPE_CHECKING:` are for type hints)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(inner) for inner in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("common.")}


def _top(module: str) -> str:
    return module.split(".")[1]


def test_every_common_module_sits_on_a_floor():
    tops = {_top(_module_name(p)) for p in COMMON.rglob("*.py") if p.name != "__init__.py" or p.parent != COMMON}
    assert tops <= set(FLOOR), f"modules or packages without a floor: {sorted(tops - set(FLOOR))}"


def test_imports_only_go_down():
    upward = []
    for path in sorted(COMMON.rglob("*.py")):
        importer = _module_name(path)
        if importer == "common":
            continue
        for imported in _runtime_imports(path):
            if _top(imported) not in FLOOR:
                continue  # a name imported from a package, e.g. common.model.MoELayer
            here, there = FLOOR[_top(importer)], FLOOR[_top(imported)]
            if there > here or (there == here and here > 0 and _top(imported) != _top(importer)):
                upward.append(f"{importer} -> {imported}")
    assert not upward, "imports that go up or sideways between packages:\n" + "\n".join(upward)


def test_the_floor_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "probe.py"
    fake.write_text("from common.cli import pipeline\nif TYPE_CHECKING:\n    from common.run import Run\n")
    assert _runtime_imports(fake) == {"common.cli", "common.cli.pipeline"}


def test_no_module_of_common_above_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted(COMMON.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("package", ["common.model", "common.hooks", "common.data", "common.stats", "common.analysis",
                                     "common.run", "common.cli"])
def test_public_surface_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
