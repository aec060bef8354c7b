"""The policy plugin against a real job manager and real processes (no server needed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from jobworker_policy import STOPPED_BY, Policy, Rules

from jobworker.backends.local.manager import JobManager
from jobworker.errors import ConfigError, FailedPrecondition, PermissionDenied
from jobworker.hooks.host import Plugins
from jobworker.jobspec import JobSpec
from jobworker.model import TerminationReason

T = TypeVar("T")

RULES = {
    "default": {"commands": ["echo"]},
    "identities": {
        "alice": {"commands": ["echo", "sleep", "/bin/true"], "max_runtime": 0.5},
        "root": {"commands": ["*"]},
    },
}


def run(
    tmp_path: Path, policy: Policy, body: Callable[[JobManager], Awaitable[T]], ready: bool = True
) -> T:
    """Run ``body`` with ``policy`` loaded as the server loads it, then shut down."""
    plugins = Plugins()
    plugins.register(policy, "policy")

    async def main() -> T:
        manager = JobManager(plugins, tmp_path)
        if ready:
            plugins.manager_ready(manager)
        try:
            return await body(manager)
        finally:
            await manager.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 60))


def spec(command: str, *args: str, **kw: Any) -> JobSpec:
    # mypy cannot type JobSpec's tuple converter (jobworker.jobspec); the call is right.
    return JobSpec(command, args, **kw)  # type: ignore[arg-type]


async def output(manager: JobManager, job_id: str) -> bytes:
    return b"".join([chunk.data async for chunk in manager.follow(job_id)])


def test_command_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        with pytest.raises(PermissionDenied, match=r"'rm' is not allowed \(allowed: echo\)"):
            await m.start(spec("rm", "-rf", "/tmp/x"), "bob")
        with pytest.raises(PermissionDenied, match=r"'\./echo' is not allowed"):
            await m.start(spec("./echo"), "bob")
        assert m.list() == []

    run(tmp_path, Policy(Rules.from_dict(RULES)), body)


def test_allowed_name_runs_the_servers_program_not_one_on_the_clients_path(
    tmp_path: Path,
) -> None:
    mine = tmp_path / "bin"
    mine.mkdir()
    (mine / "echo").write_text("#!/bin/sh\necho pwned\n")
    (mine / "echo").chmod(0o755)
    spool = tmp_path / "spool"
    spool.mkdir()

    async def body(m: JobManager) -> tuple[str, bytes]:
        job = await m.start(spec("echo", "hello", env={"PATH": str(mine)}), "bob")
        return job.spec.command, await output(m, job.job_id)

    command, out = run(spool, Policy(Rules.from_dict(RULES)), body)
    assert command.startswith("/") and command.endswith("/echo")
    assert out == b"hello\n"


def test_job_is_stopped_at_its_deadline(tmp_path: Path) -> None:
    async def body(m: JobManager) -> tuple[float, Any]:
        started = time.monotonic()
        job = await m.start(spec("sleep", "30"), "alice")
        final = await m.wait(job.job_id)
        return time.monotonic() - started, final.exit

    elapsed, exit_ = run(tmp_path, Policy(Rules.from_dict(RULES)), body)
    assert 0.5 <= elapsed < 3
    assert exit_.reason is TerminationReason.STOPPED
    assert exit_.stopped_by == STOPPED_BY and not exit_.escalated


def test_job_that_ends_in_time_is_left_alone(tmp_path: Path) -> None:
    policy = Policy(Rules.from_dict(RULES))

    async def body(m: JobManager) -> Any:
        job = await m.start(spec("/bin/true"), "alice")
        final = await m.wait(job.job_id)
        await asyncio.sleep(0.7)  # past the deadline the job would have had
        return final.exit

    exit_ = run(tmp_path, policy, body)
    assert exit_.reason is TerminationReason.EXITED and exit_.exit_code == 0
    assert policy._deadlines == {}


def test_deadline_without_a_manager_fails_closed(tmp_path: Path) -> None:
    async def body(m: JobManager) -> None:
        with pytest.raises(FailedPrecondition, match="cannot enforce max_runtime"):
            await m.start(spec("sleep", "30"), "alice")
        job = await m.start(spec("echo", "no deadline for bob"), "bob")
        await m.wait(job.job_id)

    run(tmp_path, Policy(Rules.from_dict(RULES)), body, ready=False)


def test_star_allows_any_command(tmp_path: Path) -> None:
    async def body(m: JobManager) -> bytes:
        job = await m.start(spec("sh", "-c", "echo any"), "root")
        return await output(m, job.job_id)

    assert run(tmp_path, Policy(Rules.from_dict(RULES)), body) == b"any\n"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"defaults": {}}, "unknown key 'defaults'"),
        ({"default": {"commands": "echo"}}, "commands must be a list"),
        ({"identities": {"a": {"max_runtime": 0}}}, r"\[identities.a\]: max_runtime must be"),
        ({"identities": {"a": {"max_runtime": True}}}, "max_runtime must be"),
        ({"identities": {"a": {"cmds": []}}}, "unknown key 'cmds'"),
    ],
)
def test_bad_policy_is_refused_with_where(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Rules.from_dict(doc)


def test_identity_inherits_what_it_does_not_set() -> None:
    rules = Rules.from_dict(
        {
            "default": {"commands": ["echo"], "max_runtime": 60},
            **{"identities": {"a": {"max_runtime": 5}}},
        }
    )
    assert rules.for_owner("a").commands == frozenset({"echo"})
    assert rules.for_owner("a").max_runtime == 5
    assert rules.for_owner("stranger").max_runtime == 60


def test_missing_policy_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        Rules.from_file(tmp_path / "nope.toml")
