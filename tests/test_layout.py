"""The import direction of DESIGN.md: model ← router ← engine ← cluster ← deployments, and
monitoring is imported by cluster and deployments but imports none of them; no import cycle
between modules, and no module reaching another's `_private` names."""

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


# -- the import graph between modules ------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, at module level or inside functions, except under `if TYPE_CHECKING:` (imports
    for annotations only, which never run)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and _type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return out


def _project_module(name: str) -> str | None:
    """The project module `name` is, or lies in (the longest dotted prefix that is one)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def imports(module: str) -> tuple[set[str], list[str]]:
    """The project modules `module` imports, and its uses of another module's private names."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    deps: set[str] = set()
    private: list[str] = []
    tree = ast.parse(path.read_text(), filename=str(path))
    # Names bound to other packages' modules (torch, ray, ...): their underscore modules, such as
    # torch._dynamo, are those packages' business, not a reach into one of ours.
    external = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for a in node.names if _project_module(a.name) is None}
    for node in _nodes(tree):
        if isinstance(node, ast.Import):
            deps.update(m for a in node.names if (m := _project_module(a.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in node.names:
                target = _project_module(f"{base}.{a.name}") or _project_module(base)
                if target is None:
                    continue
                deps.add(target)
                if a.name.startswith("_") and not a.name.startswith("__") and target != module:
                    private.append(f"{module}:{node.lineno} imports {a.name} from {target}")
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
              and _root_name(node) not in external):
            # another object's or module's private name: only `self` and `cls` reach theirs
            private.append(f"{module}:{node.lineno} reads {ast.unparse(node)}")
    deps.discard(module)
    return deps, private


def _root_name(node: ast.expr) -> str | None:
    """`a` of `a.b.c`."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    groups = {tuple(sorted(other for other in reachable[m] if m in reachable[other]))
              for m in graph if m in reachable[m]}
    return sorted(list(g) for g in groups)


def test_import_cycles_helper():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_and_no_private_names_of_other_modules():
    """Between the project's modules (imports at module level and inside functions alike; those
    under `if TYPE_CHECKING:` never run), no cycle; and no module reaches another's `_private`
    names, whether imported or read as an attribute of another module or object."""
    graph, private = {}, []
    for module in MODULES:
        graph[module], bad = imports(module)
        private += bad
    cycles = import_cycles(graph)
    assert not cycles and not private, "\n".join(
        [f"import cycle: {' <-> '.join(c)}" for c in cycles] + private)
