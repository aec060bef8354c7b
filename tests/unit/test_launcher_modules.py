"""``_launcher.py`` loads its modules by path in the order of ``MODULES``; a module it does not
list, or one listed before a module it imports, would fail every job start with "No module
named 'jobworker'" (the isolated interpreter then looks for the package, and has no path to
it). This says which module and why, from the source alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

from jobworker.backends.local import _launcher

HERE = Path(_launcher.__file__).parent


def _sibling_imports(name: str) -> set[str]:
    tree = ast.parse((HERE / f"{name}.py").read_text())
    return {
        node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1
    }


def test_every_launcher_module_is_loaded_after_the_ones_it_imports() -> None:
    on_disk = {path.stem for path in HERE.glob("_launcher_*.py")}
    assert set(_launcher.MODULES) == on_disk
    for index, name in enumerate(_launcher.MODULES):
        later = _sibling_imports(name) - set(_launcher.MODULES[:index])
        assert not later, f"{name} imports {sorted(later)}, loaded after it"
