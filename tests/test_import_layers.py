"""The package layers of docs/architecture.md hold: every import between rmgl's packages
(function-level ones included) points to a package the table allows, so there are no
cycles and no upward imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rmgl"
# package -> the rmgl packages it may import (docs/architecture.md, "Layers")
ALLOWED = {
    "data": set(),
    "registry": set(),
    "model": {"registry"},
    "losses": {"model", "registry"},
    "metrics": {"data"},
    "reporting": {"data", "metrics", "model"},
    "engine": {"data", "model", "losses", "metrics", "reporting", "registry"},
    "deploy": {"data", "engine", "metrics", "reporting", "model", "registry"},
    "tracking": {"data", "deploy"},
    "serve": {"deploy", "data", "engine", "metrics", "reporting", "model", "registry"},
}


def imported_packages(path: Path) -> set[str]:
    """The rmgl packages a module imports (``rmgl`` alone for the top-level package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        found |= {n.split(".")[1] if "." in n else n for n in names if n.split(".")[0] == "rmgl"}
    return found


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        package = parts[0]
        if package in ("__init__", "cli"):  # the top-level package and the command line
            continue
        for target in imported_packages(path) - {package}:
            # `import rmgl` (the version; the top-level names are imported lazily) is allowed
            if target != "rmgl" and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports rmgl.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_table_has_no_cycles():
    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in ALLOWED.get(start, ())
        )

    assert not [p for p in ALLOWED if reaches(p, p)]
    assert set(ALLOWED) | {"cli", "configs"} == {  # configs: YAML files only
        p.name if p.is_dir() else p.stem
        for p in PACKAGE.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.stem != "__init__")
    }
