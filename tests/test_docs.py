"""The design notes' layout (docs/design.md) names every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "moe_hooked"
INDENT = 2


def documented_modules() -> set[str]:
    """Paths (from the package) of the modules the layout block names: a line's leading `name.py`
    entries (comma-separated) belong to the folder above them, by indentation."""
    design = (REPOSITORY / "docs/design.md").read_text()
    block = design.split("## Layout", 1)[1].split("```")[1]
    folders: list[str] = []  # the folder at each depth, the package first
    modules = set()
    for line in block.splitlines():
        entry = re.match(r"( *)((?:[\w.]+\.py(?:, )?)+|\w+/)", line)
        if entry is None:
            continue
        depth = len(entry.group(1)) // INDENT
        if entry.group(2).endswith("/"):
            folders[depth:] = [entry.group(2)]
            continue
        parent = "".join(folders[1:depth])
        modules |= {parent + name for name in entry.group(2).split(", ")}
    return modules


def test_the_design_layout_lists_every_module():
    actual = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    documented = documented_modules()
    assert not actual - documented, f"modules missing from docs/design.md's layout: {sorted(actual - documented)}"
    assert not documented - actual, f"docs/design.md's layout names modules that do not exist: {sorted(documented - actual)}"
