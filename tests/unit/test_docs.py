"""The docs cannot drift: every hook, every CLI option, every RPC and field is documented."""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

from jobworker import cli
from jobworker.hooks import spec
from jobworker.hooks.host import BUILTIN_PLUGINS, Plugins
from jobworker.v1 import jobworker_pb2 as pb

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


# -- the call order lists every hook ---------------------------------------------------------


def call_order() -> str:
    return GUIDE.read_text().split("## Call order\n", 1)[1].split("\n## ", 1)[0]


def test_the_call_order_lists_every_hook() -> None:
    listed = set(re.findall(r"`(jobworker_\w+)", call_order()))
    missing = sorted(hookspecs() - listed)
    assert not missing, f"docs/plugins.md's call order does not list {missing}"
    assert listed <= hookspecs(), f"the call order names hooks that do not exist: {listed}"


# -- docs/cli.md names every option of every command -------------------------------------------

CLI_GUIDE = GUIDE.parent / "cli.md"
API_GUIDE = GUIDE.parent / "api.md"


def _commands(
    parser: argparse.ArgumentParser, prog: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prog} {name}")


def cli_options() -> dict[str, set[str]]:
    """Every option ``--help`` shows, per command, with every built-in plugin loaded."""
    plugins = Plugins()
    plugins.load_for_server(list(BUILTIN_PLUGINS))
    options: dict[str, set[str]] = {}
    for prog, parser in _commands(cli.build_parser(plugins), "jobworker"):
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            long = [o for o in action.option_strings if o.startswith("--")]
            options.setdefault(prog, set()).update(long or action.option_strings)
    return options


def test_the_cli_guide_finds_the_options() -> None:
    assert "--cpu-weight" in cli_options()["jobworker start"]
    assert "--cgroup-root" in cli_options()["jobworker serve"]


def test_the_cli_guide_names_every_option() -> None:
    text = CLI_GUIDE.read_text()
    missing = sorted(
        f"{prog} {option}"
        for prog, options in cli_options().items()
        for option in options
        if not re.search(rf"`[^`\n]*{re.escape(option)}(?![\w-])[^`\n]*`", text)
    )
    assert not missing, f"docs/cli.md does not name {missing}"


# -- docs/api.md names every RPC and every field ------------------------------------------------


def test_the_api_guide_names_every_rpc() -> None:
    text = API_GUIDE.read_text()
    service = pb.DESCRIPTOR.services_by_name["JobService"]
    missing = sorted(m.name for m in service.methods if f"`{m.name}(" not in text)
    assert not missing, f"docs/api.md has no section for {missing}"


def test_the_api_guide_names_every_field() -> None:
    text = API_GUIDE.read_text()
    missing = sorted(
        f"{message.name}.{field.name}"
        for message in pb.DESCRIPTOR.message_types_by_name.values()
        for field in message.fields
        if not re.search(rf"`[^`\n]*\b{field.name}\b[^`\n]*`", text)
    )
    assert not missing, f"docs/api.md does not name the fields {missing}"
