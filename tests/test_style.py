"""The code base stays ruff-clean (lint and format), as configured in pyproject.toml, and its
layers point one way."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    proc = subprocess.run([RUFF, *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


PACKAGE = "torchtitan_lite"
#: What ``models/`` may import from the package: itself and the leaf module of error types.
MODELS_MAY_IMPORT = ("torchtitan_lite.models", "torchtitan_lite.errors")


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports, read from the source (every import
    statement, including those inside functions and ``TYPE_CHECKING`` blocks)."""
    files = {}
    for path in (REPO / PACKAGE).rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            targets |= {n for n in names if n in files and n != name}
        graph[name] = targets
    return graph


def test_layers_point_one_way():
    graph = import_graph()
    assert "torchtitan_lite.models.llama3.model" in graph  # the walk found the package
    upward = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("torchtitan_lite.models")
        for target in targets
        if not target.startswith(MODELS_MAY_IMPORT)
    ]
    assert upward == [], "models/ imports from a layer above it"
    # components/ sits below export/: the export uses checkpoints, never the reverse
    reaching_up = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("torchtitan_lite.components")
        for target in targets
        if target.startswith(("torchtitan_lite.export", "torchtitan_lite.trainer"))
    ]
    assert reaching_up == [], "components/ imports from export/ or the trainer"
    # no cycle: repeatedly drop modules that import nothing left
    left = {module: set(targets) for module, targets in graph.items()}
    while True:
        leaves = {module for module, targets in left.items() if not targets}
        if not leaves:
            break
        left = {m: t - leaves for m, t in left.items() if m not in leaves}
    assert left == {}, f"import cycle among {sorted(left)}"


def test_modules_import_no_other_test_module():
    """Test modules share through ``tests/helpers.py`` (fixtures through ``conftest.py``), never
    by importing each other: a helper kept in a test module has no one owner, and whatever
    imports it breaks when that module changes."""
    modules = {}
    for path in (REPO / "tests").rglob("*.py"):
        modules[".".join(path.relative_to(REPO).with_suffix("").parts)] = path
    test_modules = {name for name in modules if name.rsplit(".", 1)[-1].startswith("test_")}
    assert "tests.integration.test_train" in test_modules  # the walk found the tests
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = ".".join(name.split(".")[: -node.level])
                    base = f"{package}.{base}" if node.module else package
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found += [f"{name} -> {target}" for target in targets if target in test_modules]
    assert found == [], "a test module is imported: move what it shares to tests/helpers.py"


#: The most lines a package file may have: one reads it in one sitting, and a file that
#: grows past it has taken on a second job.
MAX_LINES = 450


def test_package_files_stay_short():
    long = {
        str(path.relative_to(REPO)): n
        for path in (REPO / PACKAGE).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these along their jobs (at most {MAX_LINES} lines)"
