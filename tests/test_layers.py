"""The package layers: every import of the project points down the stack (or stays in its package)."""

import ast
from pathlib import Path

import copd

SRC = Path(copd.__file__).resolve().parent

# Lowest first. A module may import its own package and the packages of lower layers only.
LAYERS = [
    ("copd.errors", "copd.core"),
    ("copd.schedule",),
    ("copd.config",),
    ("copd.multimodal",),
    ("copd.capabilities",),
    ("copd.models",),
    ("copd.backends",),
    ("copd.evaluation",),
    ("copd.reporting",),
    ("copd.driver",),
    ("copd.cli",),
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def project_imports(path: Path) -> set[str]:
    """Every copd module imported anywhere in the file, function-level imports included."""
    found = set()
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]:
        block.body = []  # imports for type checkers only are no dependency at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("copd"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("copd"))
    return found


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        yield ".".join(rel.parts), path


def test_every_module_belongs_to_a_layer():
    orphans = [name for name, _ in modules() if name not in ("copd.__init__",) and package_of(name) not in RANK]
    assert orphans == []


def test_imports_point_down():
    upward = []
    for name, path in modules():
        own = package_of(name)
        if own not in RANK:
            continue
        for target in project_imports(path):
            other = package_of(target)
            if other != own and RANK.get(other, -1) >= RANK[own]:
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_core_imports_nothing_of_the_project():
    for name, path in modules():
        if name.startswith("copd.core"):
            assert project_imports(path) == set(), name


def test_the_seam_imports_no_backend():
    # The roles and their data are what a driver and a remote worker share: no model class behind them.
    assert {t for t in project_imports(SRC / "backends" / "roles.py") if t.startswith("copd.backends")} == set()
