"""The import direction of DESIGN.md: model ← router ← engine ← cluster ← deployments, and
monitoring is imported by cluster and deployments but imports none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "router", "engine", "cluster", "deployments", "monitoring")
ALLOWED = {
    "model": set(),
    "router": {"model"},
    "engine": {"model", "router"},
    "cluster": {"model", "router", "engine", "monitoring"},
    "deployments": {"model", "router", "engine", "cluster", "monitoring"},
    "monitoring": set(),
}
NO_RAY = ("model", "router", "engine")


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        imports = imported_top_levels(path)
        wrong = (imports & set(PACKAGES)) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
        if package in NO_RAY:
            assert "ray" not in imports, f"{path.relative_to(ROOT)} imports ray"
