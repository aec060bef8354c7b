"""The plugin author's guide documents every hook, and only hooks that exist."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from jobworker.hooks import spec

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def hookspecs() -> set[str]:
    return {
        name
        for name, obj in inspect.getmembers(spec, inspect.isfunction)
        if hasattr(obj, "jobworker_spec")  # set by the hookspec marker
    }


def sections() -> list[str]:
    return re.findall(r"^### (\S+)\s*$", GUIDE.read_text(), flags=re.MULTILINE)


def test_the_guide_finds_the_hookspecs() -> None:
    assert "jobworker_pre_spawn" in hookspecs()
    assert "jobworker_pre_spawn" in sections()


def test_every_hook_has_its_section() -> None:
    missing = sorted(hookspecs() - set(sections()))
    assert not missing, f"docs/plugins.md has no '### <hook>' section for {missing}"


def test_every_section_names_a_hook_once() -> None:
    found = sections()
    unknown = sorted(set(found) - hookspecs())
    assert not unknown, f"docs/plugins.md documents hooks that do not exist: {unknown}"
    repeated = sorted({name for name in found if found.count(name) > 1})
    assert not repeated, f"docs/plugins.md documents {repeated} more than once"


def test_each_section_shows_the_signature_of_its_hook() -> None:
    text = GUIDE.read_text()
    for name in hookspecs():
        body = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        params = inspect.signature(getattr(spec, name)).parameters
        assert f"def {name}(" in body, f"section {name} shows no signature"
        for param in params:
            assert param in body, f"section {name} does not mention argument {param!r}"
