"""The doors between the programs open one way: `recovery.core` knows none of them; the recovery OS
(`recovery.os`) and the running system (`recovery.updated`) never import each other; the build host
(`mkimage`) and the rig (`vm`) use only the core of the recovery package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package -> the prefixes none of its modules may import
FORBIDDEN = {
    "recovery.core": ("recovery.os", "recovery.updated", "mkimage", "vm", "bench", "tests"),
    "recovery.os": ("recovery.updated", "mkimage", "vm", "bench", "tests"),
    "recovery.updated": ("recovery.os", "mkimage", "vm", "bench", "tests"),
    "mkimage": ("recovery.os", "recovery.updated", "bench", "tests"),
    "vm": ("recovery.os", "recovery.updated", "bench", "tests"),
}


def modules(package: str) -> list[str]:
    root = REPO / package.replace(".", "/")
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for p in root.rglob("*.py") if p.name != "__main__.py")


def bad(name: str, package: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_fresh_interpreter_importing_the_package_loads_nothing_forbidden(package: str) -> None:
    code = (f"import importlib, json, sys\nfor m in {modules(package)!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = [m for m in json.loads(proc.stdout) if bad(m, package)]
    assert loaded == [], f"importing {package} loads {loaded}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_against_the_direction_even_inside_a_function(package: str) -> None:
    """Imports inside functions (kept there for the recovery OS's start-up time) count too."""
    found = []
    for module in modules(package):
        path = REPO / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = REPO / module.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found += [f"{module}:{node.lineno} imports {n}" for n in names if bad(n, package)]
    assert found == []


def test_the_check_itself_sees_a_forbidden_import() -> None:
    assert bad("recovery.updated.cli", "recovery.os") and not bad("recovery.core.errors", "recovery.os")
    assert bad("recovery.os", "mkimage") and not bad("recovery.osx", "mkimage")
