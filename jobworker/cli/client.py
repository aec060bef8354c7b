"""The client commands: ``start``, ``run``, ``status``, ``logs``, ``stop``, ``list`` (and
``top``, from :mod:`jobworker.cli.top`).

Each connects with :class:`jobworker.client.JobClient`; an error the server answers with
is one line (``jobworker: CODE: message``) and exit status 1. Their options, and how they
become a job spec and a connection, are :mod:`jobworker.cli.options`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import shlex
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from jobworker.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_SERVER_ERROR,
    argument,
    for_terminal,
    print_json,
    say,
    silence_stdout,
)
from jobworker.cli.options import (
    connect,
    connection_options,
    job_id,
    job_options,
    limits_from_options,
)
from jobworker.errors import (
    EXEC_FAILED,
    FailedPrecondition,
    JobworkerError,
    NotFound,
    Unavailable,
)
from jobworker.units import parse_seconds

if TYPE_CHECKING:
    from jobworker.client import JobClient
    from jobworker.model import JobStatusView

T = TypeVar("T")
_Parent = Callable[[], argparse.ArgumentParser]

#: The client commands, in the order ``jobworker --help`` lists them.
NAMES = ("start", "run", "status", "top", "logs", "stop", "write", "list")


def add_commands(commands: Any, names: Iterable[str] = NAMES) -> None:
    """Add the client commands ``names`` to ``commands`` (the subparsers of ``jobworker``):
    all of them for ``--help``, only the one it runs otherwise, so that ``run`` builds (and
    imports) nothing for ``list`` or ``top``."""
    connection = connection_options()
    job = functools.cache(job_options)  # start and run share it, others never build it
    adders: dict[str, Callable[[Any, argparse.ArgumentParser, _Parent], None]] = {
        "start": _add_start,
        "run": _add_run,
        "status": _add_status,
        "top": _add_top,
        "logs": _add_logs,
        "stop": _add_stop,
        "write": _add_write,
        "list": _add_list,
    }
    for name in names:
        adders[name](commands, connection, job)


def _add_start(commands: Any, connection: argparse.ArgumentParser, job: _Parent) -> None:
    start = commands.add_parser(
        "start", parents=[connection, job()], help="start a job and print its id"
    )
    start.set_defaults(handler=_client_command(_start))


def _add_run(commands: Any, connection: argparse.ArgumentParser, job: _Parent) -> None:
    run = commands.add_parser(
        "run",
        parents=[connection, job()],
        help="start a job, stream its output and exit with its status",
    )
    run.set_defaults(handler=_client_command(_run))


def _add_status(commands: Any, connection: argparse.ArgumentParser, _job: _Parent) -> None:
    status = commands.add_parser("status", parents=[connection], help="show a job")
    status.add_argument("job_id", metavar="JOB", type=job_id)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--usage", action="store_true", help="chart the job's CPU and memory over its life"
    )
    status.set_defaults(handler=_client_command(_status))


def _add_top(commands: Any, connection: argparse.ArgumentParser, _job: _Parent) -> None:
    from jobworker.cli import top

    top.add_command(commands, connection, _client_command)


def _add_logs(commands: Any, connection: argparse.ArgumentParser, _job: _Parent) -> None:
    logs = commands.add_parser("logs", parents=[connection], help="print a job's output")
    logs.add_argument("job_id", metavar="JOB", type=job_id)
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep following until the job ends"
    )
    logs.set_defaults(handler=_client_command(_logs))


def _add_stop(commands: Any, connection: argparse.ArgumentParser, _job: _Parent) -> None:
    stop = commands.add_parser("stop", parents=[connection], help="stop a job")
    stop.add_argument("job_id", metavar="JOB", type=job_id)
    stop.add_argument(
        "--grace",
        type=argument(parse_seconds),
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL (default: the server's)",
    )
    stop.set_defaults(handler=_client_command(_stop))


def _add_write(commands: Any, connection: argparse.ArgumentParser, _job: _Parent) -> None:
    write = commands.add_parser(
        "write", parents=[connection], help="copy our stdin to a job started with -i"
    )
    write.add_argument("job_id", metavar="JOB", type=job_id)
    write.add_argument(
        "--keep-open",
        action="store_true",
        help="leave the job's stdin open at our end of input (another write may follow)",
    )
    write.set_defaults(handler=_client_command(_write))


def _add_list(commands: Any, connection: argparse.ArgumentParser, _job: _Parent) -> None:
    from jobworker.model import JobState

    listing = commands.add_parser("list", parents=[connection], help="list jobs")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    which = listing.add_mutually_exclusive_group()
    which.add_argument(
        "--running", action="store_const", const="running", dest="state", help="running jobs only"
    )
    which.add_argument(
        "--state", choices=[s.value for s in JobState], help="only jobs in this state"
    )
    listing.add_argument(
        "--owner", metavar="NAME", help="only jobs of this owner (an admin sees everyone's)"
    )
    listing.add_argument("-q", "--quiet", action="store_true", help="print job ids only")
    listing.add_argument("--node", metavar="NAME", help="only the jobs of this cluster node")
    listing.set_defaults(handler=_client_command(_list))


# -- shared helpers -----------------------------------------------------------------------


def _client_command(
    command: Callable[[JobClient, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` connected; errors from the server exit 1 with their status code
    (127 or 126 for a command the server could not execute, as a shell).

    Errors raised while connecting (bad flags, unusable certificate files) are local and
    left to ``main``.
    """

    @functools.wraps(command)
    def handler(options: argparse.Namespace) -> int:
        with connect(options) as client:
            try:
                return command(client, options)
            except JobworkerError as err:
                say(f"{err.code}: {err}{_hint(err)}")
                return _exit_status(err)

    return handler


def _hint(err: JobworkerError) -> str:
    """The next step, where the server's message leaves it implicit."""
    if isinstance(err, NotFound):
        return " (`jobworker list` shows the jobs you may see)"
    return ""


def _exit_status(err: JobworkerError) -> int:
    """A shell's statuses for a command that could not be executed: 127 when it does not
    exist, 126 when it exists but cannot run (permissions, a directory, no interpreter)."""
    message = str(err)
    if not isinstance(err, FailedPrecondition) or not message.startswith(EXEC_FAILED):
        return EXIT_SERVER_ERROR
    return EXIT_NOT_FOUND if message.endswith(os.strerror(errno.ENOENT)) else EXIT_NOT_EXECUTABLE


#: Bytes per InputChunk: large enough that per-message costs vanish, far below the
#: server's 4 MiB message limit.
INPUT_CHUNK = 256 << 10


def _read_chunks(fd: int) -> Iterator[bytes]:
    while data := os.read(fd, INPUT_CHUNK):
        yield data


def _forwards_stdin(options: argparse.Namespace) -> bool:
    """``run``: forward our stdin when asked to, or when it is a pipe or a file.

    A terminal is left alone (docker's habit: ``-i`` asks for it), and so is /dev/null
    or a closed fd 0, which would only send an immediate EOF.
    """
    try:
        mode = os.fstat(0)
    except OSError:
        return False
    if options.interactive:
        return True
    if os.isatty(0):
        return False
    return not (stat.S_ISCHR(mode.st_mode) and os.path.samestat(mode, os.stat(os.devnull)))


def _start_job(client: JobClient, options: argparse.Namespace, stdin: bool) -> str:
    command, *args = options.command
    return client.start(
        command,
        args,
        env=dict(options.env),
        cwd=options.cwd,
        limits=limits_from_options(options),
        user=options.user,
        network=options.network,
        stdin=stdin,
        node=options.node,
    )


#: How long ``logs -f`` and ``run`` wait for a server that went away (one restarting with
#: ``--live-restore``, or a cluster front whose client has another to go to) before they
#: give up, and how often they try meanwhile.
RESUME_WINDOW_S = 120.0
RESUME_PAUSE_S = 0.5

#: A stream from an offset: ``(stream, data, offset after it)`` chunks, returning its end.
_Opener = Callable[[int], Generator[tuple[str, memoryview, int], None, T]]


def _copy_output(open_at: _Opener[T], *, resume: bool) -> T:
    """Write each chunk of ``open_at(0)`` to our own stdout or stderr as it arrives
    (:func:`_write_chunk`); return what the stream returns.

    With ``resume``, a stream cut by UNAVAILABLE (its server restarting, or a cluster front
    going away while others serve on) is opened again from the offset of the last chunk
    written, at once, then every :data:`RESUME_PAUSE_S`, for up to :data:`RESUME_WINDOW_S`
    without a server: nothing is written twice or skipped (docs/cli.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    offset = 0
    gone_since: float | None = None
    while True:
        try:
            with contextlib.closing(open_at(offset)) as chunks:
                while True:
                    try:
                        stream, data, position = next(chunks)
                    except StopIteration as end:
                        result: T = end.value
                        return result
                    if gone_since is not None:
                        say(f"resumed at offset {offset}")
                    _write_chunk(stream, data)
                    offset, gone_since = position, None
        except Unavailable:
            if not resume:
                raise
            now = time.monotonic()
            if gone_since is None:
                gone_since = now
                say(
                    f"the server went away; resuming at offset {offset} on the first server"
                    f" to answer (waiting up to {RESUME_WINDOW_S:g} s)"
                )
                continue  # at once: another server of --server may answer now
            if now - gone_since > RESUME_WINDOW_S:
                raise
            time.sleep(RESUME_PAUSE_S)


def _write_chunk(stream: str, data: memoryview) -> None:
    """Byte for byte, straight to the descriptor from the received message (nothing else
    writes to it meanwhile): no copy, and the chunk is out before the next is read."""
    fd = sys.stderr.fileno() if stream == "stderr" else sys.stdout.fileno()
    while data:
        data = data[os.write(fd, data) :]


# -- the commands -------------------------------------------------------------------------


def _start(client: JobClient, options: argparse.Namespace) -> int:
    print(for_terminal(_start_job(client, options, stdin=options.interactive)))
    return 0


def _feed_stdin(client: JobClient, job_id: str) -> threading.Thread:
    """Copy our stdin to the job in a daemon thread: it may block reading a terminal or
    a slow job, and must never keep ``run`` from exiting with the job's status."""

    def feed() -> None:
        try:
            client.write_input(job_id, _read_chunks(0))
        except JobworkerError as err:
            if err.code != "CANCELLED":  # our channel closing at exit cancels it
                say(f"stdin not forwarded: {err.code}: {err}")
        except OSError as err:
            say(f"stdin not forwarded: {err.strerror or err}")

    thread = threading.Thread(target=feed, name="stdin", daemon=True)
    thread.start()
    return thread


def _write(client: JobClient, options: argparse.Namespace) -> int:
    read = 0

    def counted() -> Iterator[bytes]:
        nonlocal read
        for data in _read_chunks(0):
            read += len(data)
            yield data

    result = client.write_input(options.job_id, counted(), eof=not options.keep_open)
    # The call may end (stdin closed) before grpc took our input from us: look for more.
    if result.closed and (options.keep_open or result.written < read or os.read(0, 1)):
        say(
            f"job {options.job_id}'s stdin is closed (the job ended or closed it):"
            f" {result.written} bytes of our input went in, the rest was dropped"
        )
        return EXIT_SERVER_ERROR
    return 0


def _run(client: JobClient, options: argparse.Namespace) -> int:
    forward = _forwards_stdin(options)
    job_id = _start_job(client, options, stdin=forward)
    if forward:
        _feed_stdin(client, job_id)
    try:
        end = _copy_output(functools.partial(client.follow_to_end, job_id), resume=True)
    except BrokenPipeError:
        # The job is ours alone: leave nothing running behind us, as a shell would.
        client.stop(job_id)
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        try:
            say(
                f"stopping job {job_id} (SIGTERM, SIGKILL after the server's grace period;"
                " Ctrl-C again to leave it running)"
            )
            client.stop(job_id)
        except KeyboardInterrupt:
            say(f"left job {job_id} running (`jobworker stop {job_id}` stops it)")
            return EXIT_INTERRUPTED
        say(f"interrupted: stopped job {job_id}")
        return EXIT_INTERRUPTED
    if end.reason == "node_lost":
        raise JobworkerError(f"job {job_id} was lost with its node {end.node}")
    if end.reason == "lost":
        raise JobworkerError(
            f"job {job_id} was lost across a server restart; the server's log says why"
        )
    if end.exit_code is None:
        raise JobworkerError(f"job {job_id}'s output ended but it is still {end.state}")
    return end.exit_code


def _status(client: JobClient, options: argparse.Namespace) -> int:
    if options.usage:
        from jobworker.cli import top

        return top.status_usage(client, options)
    view = client.status(options.job_id)
    if options.json:
        print_json(view.as_dict())
        return 0
    for key, value in _flatten(view.as_dict()):
        print(f"{key + ':':<26}{for_terminal(_human(key, value))}")
    return 0


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _human(key: str, value: Any) -> str:
    if value is None or value == [] or value == ():
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_at"):
        from datetime import datetime

        return datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
    if key == "args":
        return shlex.join(value)
    if key == "enforced":
        return "; ".join(value)
    if key == "limits.io":
        return "; ".join(
            " ".join(f"{k}={v}" for k, v in device.items() if v is not None) for device in value
        )
    return str(value)


def _logs(client: JobClient, options: argparse.Namespace) -> int:
    """With ``-f``, a stream cut by UNAVAILABLE resumes by itself (:func:`_copy_output`)."""
    _copy_output(
        lambda offset: client.stream_views(options.job_id, offset, follow=options.follow),
        resume=options.follow,
    )
    return 0


def _stop(client: JobClient, options: argparse.Namespace) -> int:
    result = client.stop(options.job_id, grace=options.grace)
    summary = "already finished" if result.already_finished else "stopped"
    if result.escalated:
        summary += " (killed with SIGKILL after the grace period)"
    print(for_terminal(f"{options.job_id}: {result.message or summary}"))
    return 0


def _outcome(view: JobStatusView) -> str:
    if view.reason is None:
        return "-"
    if view.exit_code is not None:
        return f"{view.reason.value} {view.exit_code}"
    return f"{view.reason.value} SIG{signal.Signals(view.signal or 0).name.removeprefix('SIG')}"


def _list(client: JobClient, options: argparse.Namespace) -> int:
    from jobworker.model import JobState

    state = JobState(options.state) if options.state else None
    views = client.list(state=state, owner=options.owner, node=options.node)
    if options.quiet:
        for view in views:
            print(view.job_id)
        return 0
    if options.json:
        print_json([view.as_dict() for view in views])
        return 0
    rows: list[tuple[str, ...]] = [("JOB", "STATE", "RESULT", "OWNER", "STARTED", "COMMAND")]
    rows += [
        tuple(
            for_terminal(cell)
            for cell in (
                view.job_id,
                view.state.value,
                _outcome(view),
                view.owner,
                _human("started_at", view.started_at),
                shlex.join([view.command, *view.args]),
            )
        )
        for view in views
    ]
    # Pad every column but the last, so that a long command line is never followed by blanks.
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print(
            "  ".join(
                [
                    *(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)),
                    row[-1],
                ]
            )
        )
    return 0
