"""docs/troubleshooting.md has an entry for every one-line error the CLI can print.

The messages are read from the code's syntax tree, not by pattern-matching its text, so
line wrapping, implicit concatenation and f-strings do not matter. A message is the first
argument of:

- a call of a ``JobworkerError`` class (every class of ``jobworker.errors`` and every
  subclass defined elsewhere in the package), or of ``job_not_found``;
- ``say(...)``, the CLI's one line on stderr;
- a string a ``..._message`` function returns (``unavailable_message``: grpc's words
  turned into the client's);
- or a value of a module-level ``..._MESSAGES`` dict of ``str.format`` templates (the
  launcher's failed steps, ``_STEP_MESSAGES``), whose ``{...}`` are holes too.

Its literal text is kept, each ``{...}`` becomes a hole; a name or attribute that is a
module-level string constant is read as its value. The message is
documented when its longest literal fragment appears in the page (whitespace collapsed:
the page may wrap lines anywhere). A module-level name is read only if it is upper case (a
constant such as ``EXEC_FAILED``, not ``__name__``). A message whose literal fragments are all shorter than
:data:`MIN_KEY` only passes another error's text along (``ConfigError(str(err))``) and
has nothing of its own to document.

``python -m tests.unit.test_troubleshooting`` prints the undocumented ones.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import attrs

import jobworker
from jobworker import errors

ROOT = Path(jobworker.__file__).parent
PAGE = ROOT.parent / "docs" / "troubleshooting.md"
#: Shorter literal fragments ("{}: {}", " (", ...) say nothing a reader could look up.
MIN_KEY = 8


@attrs.frozen
class Message:
    where: str  # path:line
    fragments: tuple[str, ...]

    @property
    def key(self) -> str:
        """The longest literal fragment, whitespace collapsed."""
        return max((" ".join(f.split()) for f in self.fragments), key=len, default="")

    @property
    def shown(self) -> str:
        return "{}".join(self.fragments)


def _error_names() -> set[str]:
    names = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, errors.JobworkerError)
    }
    names.add("job_not_found")
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and base.id in names for base in node.bases
            ):
                names.add(node.name)
    return names


def _modules() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        if "v1" not in path.relative_to(ROOT).parts:
            yield path


def _module_strings(path: Path) -> dict[str, str]:
    """The module-level string constants a message may name, imported ones included."""
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    if name.endswith(".__main__"):
        return {}
    module = importlib.import_module(name)
    return {
        key: value
        for key, value in vars(module).items()
        if isinstance(value, str) and key.isupper()  # constants, not __name__ and the like
    }


def _fragments(node: ast.expr, strings: dict[str, str]) -> tuple[str, ...] | None:
    """Literal text split at its holes; None if ``node`` is no string expression."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,)
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        return (strings[name],) if name in strings else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _fragments(node.left, strings), _fragments(node.right, strings)
        if left is None or right is None:
            return None
        return (*left[:-1], left[-1] + right[0], *right[1:])
    if isinstance(node, ast.JoinedStr):
        parts = [""]
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts[-1] += str(value.value)
            else:
                resolved = (
                    _fragments(value.value, strings)
                    if isinstance(value, ast.FormattedValue) and value.conversion == -1
                    else None
                )
                if resolved is not None and len(resolved) == 1:
                    parts[-1] += resolved[0]
                else:
                    parts.append("")
        return tuple(parts)
    return None


def messages() -> list[Message]:
    callees = _error_names() | {"say"}
    found: list[Message] = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        strings = _module_strings(path)
        where = path.relative_to(ROOT.parent)
        candidates: list[ast.expr] = []
        templates: list[ast.expr] = []
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.endswith("_MESSAGES")
                and isinstance(node.value, ast.Dict)
            ):
                templates += [value for value in node.value.values if value is not None]
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name in callees:
                    candidates.append(node.args[0])
            elif isinstance(node, ast.FunctionDef) and node.name.endswith("_message"):
                candidates += [
                    ret.value
                    for ret in ast.walk(node)
                    if isinstance(ret, ast.Return) and ret.value is not None
                ]
        for expr in candidates:
            fragments = _fragments(expr, strings)
            if fragments is not None:
                found.append(Message(f"{where}:{expr.lineno}", fragments))
        for expr in templates:
            fragments = _fragments(expr, strings)
            if fragments is not None:
                holes = tuple(part for f in fragments for part in re.split(r"\{[^}]*\}", f))
                found.append(Message(f"{where}:{expr.lineno}", holes))
    return found


def _page_text() -> str:
    return " ".join(PAGE.read_text().split())


def undocumented() -> list[Message]:
    text = _page_text()
    return [m for m in messages() if len(m.key) >= MIN_KEY and m.key not in text]


def test_the_extraction_finds_messages_of_every_kind() -> None:
    found = {m.shown for m in messages()}
    assert "job {} not found" in found  # job_not_found (a function, not a class)
    assert "cannot execute {}: {}" in found  # a _MESSAGES template, EXEC_FAILED resolved
    assert "INTERNAL: unexpected {}: {}" in found  # say(...); __name__ is not a constant
    assert any("does not name the host dialled" in s for s in found)  # a _message function
    assert any("is not on the authorization whitelist" in s for s in found)  # PermissionDenied
    assert len(found) > 150


def test_every_message_has_an_entry() -> None:
    missing = undocumented()
    assert not missing, "docs/troubleshooting.md has no entry for:\n" + "\n".join(
        f"  {m.where}: {m.shown}" for m in missing
    )


def test_the_page_lists_no_message_twice() -> None:
    keys = re.findall(r"^\| `([^`]+)`", PAGE.read_text(), flags=re.MULTILINE)
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    assert not repeated, f"docs/troubleshooting.md lists {repeated} more than once"


if __name__ == "__main__":
    for message in undocumented():
        print(f"{message.where}: {message.shown}")
