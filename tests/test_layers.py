"""The house's layers: library rooms import no program, and the programs share the training core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "unicom"
PROGRAMS = ("unicom.train", "unicom.unifex", "unicom.commands", "unicom.cli", "unicom.demo", "unicom.search")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(rooms: list[str], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for room in rooms:
        files = [SOURCE / room] if room.endswith(".py") else sorted((SOURCE / room).rglob("*.py"))
        for path in files:
            bad = sorted(name for name in imported_modules(path) if name.startswith(forbidden))
            if bad:
                found[str(path.relative_to(SOURCE))] = bad
    return found


@pytest.mark.parametrize("room", ["engine", "losses", "models", "data", "optim.py", "kernels.py"])
def test_a_library_room_imports_no_program(room):
    assert offending([room], PROGRAMS) == {}


def test_the_probe_program_does_not_import_the_train_program():
    assert offending(["unifex"], ("unicom.train",)) == {}


def test_recipes_and_the_head_table_read_without_torch():
    code = ("import sys, unicom.engine.recipe, unicom.engine.sections, unicom.losses.heads, unicom.train.config, "
            "unicom.unifex.config; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
