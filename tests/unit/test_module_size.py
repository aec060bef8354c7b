"""No module of jobworker/ is over 500 lines: past that a module holds more than one thing
a reader would name, and is split where they would draw the line (issue 21). Generated
protobuf code is left out: its size is the proto's, not a design choice.
"""

from __future__ import annotations

from pathlib import Path

import jobworker

ROOT = Path(jobworker.__file__).parent
MAX_LINES = 500


def oversized(root: Path, limit: int = MAX_LINES) -> dict[str, int]:
    """Each module under ``root`` longer than ``limit`` lines, with its line count."""
    sizes = {
        str(path.relative_to(root.parent)): len(path.read_text().splitlines())
        for path in sorted(root.rglob("*.py"))
        if "_pb2" not in path.name
    }
    return {name: lines for name, lines in sizes.items() if lines > limit}


def test_no_module_is_over_500_lines() -> None:
    assert len(list(ROOT.rglob("*.py"))) > 50, "the package was not found"
    assert oversized(ROOT) == {}


def test_a_long_module_is_named(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "short.py").write_text("x = 1\n" * 3)
    (package / "sub" / "long.py").write_text("x = 1\n" * 4)
    (package / "sub" / "long_pb2.py").write_text("x = 1\n" * 9)
    assert oversized(package, limit=3) == {"pkg/sub/long.py": 4}
