"""The ``jobworker`` command: ``serve`` runs the server, the other commands are its clients.

Every failure is one line on stderr and an exit status (docs/cli.md has the table):

====  ===================================================================================
0     success
1     the server refused or failed the request, or could not be reached
      (``jobworker: CODE: message``)
2     usage or local configuration error (``jobworker: error: message``)
130   interrupted (Ctrl-C); ``run`` stops its job first
====  ===================================================================================

``run`` exits with the job's own status instead: its exit code, or 128+N after signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import attrs

from jobworker import __version__
from jobworker.client import JobClient, JobStatusView
from jobworker.errors import ConfigError, JobworkerError
from jobworker.hooks.manager import Plugins, available_plugins
from jobworker.logs import LEVELS, configure_logging
from jobworker.model import IoLimit, Limits, TerminationReason
from jobworker.pki import ROLES, PkiPaths, default_pki_dir, init_pki
from jobworker.tls import TlsFiles
from jobworker.units import (
    parse_cores,
    parse_count,
    parse_rate,
    parse_seconds,
    parse_size,
    split_device_value,
)

DEFAULT_SERVER = "127.0.0.1:50051"
#: The client of the dev PKI that client commands use when given no certificate.
DEV_CLIENT = "admin"

EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

# Client TLS options: (option dest, flag, environment variable).
_CLIENT_TLS = (
    ("tls_cert", "--tls-cert", "JOBWORKER_TLS_CERT"),
    ("tls_key", "--tls-key", "JOBWORKER_TLS_KEY"),
    ("tls_ca", "--tls-ca", "JOBWORKER_TLS_CA"),
)

T = TypeVar("T")


class UsageError(Exception):
    """The command line is wrong; ``main`` prints it on one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, not usage plus message."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Adapt a ``units`` parser for ``type=``: argparse shows only ArgumentTypeError text."""

    @functools.wraps(parse)
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"invalid environment variable {text!r}: expected KEY=VALUE")
    return key, value


def _device_rate(text: str) -> tuple[str, int]:
    device, value = split_device_value(text)
    return device, parse_rate(value)


def _device_count(text: str) -> tuple[str, int]:
    device, value = split_device_value(text)
    return device, parse_count(value)


def _client_role(text: str) -> tuple[str, str]:
    name, _, role = text.partition(":")
    role = role or "user"
    if not name or role not in ROLES:
        raise ValueError(
            f"invalid client {text!r}: expected NAME or NAME:ROLE, ROLE one of {ROLES}"
        )
    return name, role


class _DeviceLimit(argparse.Action):
    """Collect the ``--io-*`` flags as {device: {IoLimit field: value}}; no field twice."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        device, value = values
        devices: dict[str, dict[str, int]] = dict(getattr(namespace, self.dest) or {})
        fields = devices[device] = dict(devices.get(device, {}))
        if self.const in fields:
            raise argparse.ArgumentError(self, f"given twice for device {device}")
        fields[self.const] = value
        setattr(namespace, self.dest, devices)


# -- building the parser ------------------------------------------------------------------


def _connection_options() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group(
        "connection",
        "Without certificate options or JOBWORKER_TLS_* variables, the dev PKI's "
        f"{DEV_CLIENT!r} client certificate in {default_pki_dir()} is used.",
    )
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"server address (env JOBWORKER_SERVER; default {DEFAULT_SERVER})",
    )
    for _dest, flag, env in _CLIENT_TLS:
        group.add_argument(flag, type=Path, metavar="FILE", help=f"PEM file (env {env})")
    return parent


def _job_options() -> _Parser:
    parent = _Parser(add_help=False)
    job = parent.add_argument_group("job")
    job.add_argument(
        "--env",
        action="append",
        type=_argument(_env_pair),
        default=[],
        metavar="KEY=VALUE",
        help="the job's environment, one variable per flag (PATH defaults if unset)",
    )
    job.add_argument("--cwd", metavar="DIR", help="working directory on the server")
    job.add_argument(
        "--node", metavar="NAME", help="run on this cluster node (a cluster backend only)"
    )
    job.add_argument(
        "command", nargs="+", metavar="CMD", help="the command and its arguments, after --"
    )
    limits = parent.add_argument_group(
        "limits",
        "Sizes and rates take binary units (K, M, G, T = powers of 1024). DEV is a block "
        "device path or MAJ:MIN; repeat an IO flag for more devices.",
    )
    limits.add_argument("--cpu", type=_argument(parse_cores), metavar="CORES", help="e.g. 0.5")
    limits.add_argument(
        "--memory", type=_argument(parse_size), metavar="SIZE", help="e.g. 256M, 1G"
    )
    limits.add_argument(
        "--memory-high", type=_argument(parse_size), metavar="SIZE", help="throttle above this"
    )
    limits.add_argument(
        "--cpu-weight", type=_argument(parse_count), metavar="N", help="CPU share, 1-10000"
    )
    limits.add_argument("--pids", type=_argument(parse_count), metavar="N", help="max processes")
    for flag, field, parse, metavar, help_ in (
        ("--io-read-bps", "rbps", _device_rate, "DEV=RATE", "read bytes per second, e.g. 10M"),
        ("--io-write-bps", "wbps", _device_rate, "DEV=RATE", "write bytes per second"),
        ("--io-read-iops", "riops", _device_count, "DEV=N", "read operations per second"),
        ("--io-write-iops", "wiops", _device_count, "DEV=N", "write operations per second"),
    ):
        limits.add_argument(
            flag,
            dest="io",
            action=_DeviceLimit,
            const=field,
            type=_argument(parse),
            metavar=metavar,
            help=help_,
        )
    return parent


def _add_serve(commands: Any, plugins: Plugins) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the jobworker server. Without --tls-* options it uses (and on "
        f"first use creates) the dev PKI in {default_pki_dir()} and its authz.toml.",
    )
    serve.add_argument(
        "--listen", default=DEFAULT_SERVER, metavar="HOST:PORT", help="default %(default)s"
    )
    serve.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="server private key")
    serve.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA bundle for clients")
    serve.add_argument("--tls-crl", type=Path, metavar="FILE", help="revoked client certs")
    serve.add_argument(
        "--plugin", action="append", default=[], metavar="NAME", help="load a plugin"
    )
    serve.add_argument("--spool-dir", type=Path, metavar="DIR", help="where job output goes")
    serve.add_argument(
        "--grace",
        type=_argument(parse_seconds),
        default=10.0,
        metavar="SECONDS",
        help="default stop grace period (default %(default)s)",
    )
    serve.add_argument(
        "--max-jobs",
        type=_argument(parse_count),
        default=1000,
        metavar="N",
        help="most jobs running at once; more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    serve.add_argument(
        "--retain-jobs",
        type=_argument(parse_count),
        default=1000,
        metavar="N",
        help="finished jobs (and their output) kept for status and logs (default %(default)s)",
    )
    serve.add_argument(
        "--retain-seconds",
        type=_argument(parse_seconds),
        default=3600.0,
        metavar="SECONDS",
        help="how long a finished job is kept at most (default %(default)s)",
    )
    serve.add_argument("--log-level", choices=LEVELS, default="info")
    serve.set_defaults(handler=functools.partial(_serve, plugins))
    plugins.add_options(serve)


def build_parser(plugins: Plugins) -> argparse.ArgumentParser:
    """The whole command line; ``plugins`` (already loaded) add their ``serve`` options."""
    parser = _Parser(prog="jobworker", description="Run Linux commands on a jobworker server.")
    parser.add_argument("--version", action="version", version=f"jobworker {__version__}")
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
    _add_serve(commands, plugins)

    connection = _connection_options()
    job = _job_options()
    start = commands.add_parser(
        "start", parents=[connection, job], help="start a job and print its id"
    )
    start.set_defaults(handler=_client_command(_start))
    run = commands.add_parser(
        "run",
        parents=[connection, job],
        help="start a job, stream its output and exit with its status",
    )
    run.set_defaults(handler=_client_command(_run))

    status = commands.add_parser("status", parents=[connection], help="show a job")
    status.add_argument("job_id", metavar="JOB")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_client_command(_status))

    logs = commands.add_parser("logs", parents=[connection], help="print a job's output")
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep following until the job ends"
    )
    logs.set_defaults(handler=_client_command(_logs))

    stop = commands.add_parser("stop", parents=[connection], help="stop a job")
    stop.add_argument("job_id", metavar="JOB")
    stop.add_argument(
        "--grace",
        type=_argument(parse_seconds),
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL (default: the server's)",
    )
    stop.set_defaults(handler=_client_command(_stop))

    listing = commands.add_parser("list", parents=[connection], help="list jobs")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--node", metavar="NAME", help="only the jobs of this cluster node")
    listing.set_defaults(handler=_client_command(_list))

    plugins_cmd = commands.add_parser(
        "plugins",
        help="list plugins",
        description="Without --plugin: every available plugin (built-ins and installed "
        "entry points). With: those `serve --plugin ...` would load (authz and the given "
        "ones).",
    )
    plugins_cmd.add_argument("--plugin", action="append", default=[], metavar="NAME")
    plugins_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    plugins_cmd.set_defaults(handler=_plugins)

    certs = commands.add_parser("certs", help="manage a dev PKI")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    init = certs_commands.add_parser(
        "init",
        help="create a CA, server and client certificates and authz.toml",
        description="Create (or complete) a dev PKI; existing files are kept.",
    )
    init.add_argument("--dir", type=Path, default=default_pki_dir(), help="default %(default)s")
    init.add_argument(
        "--client",
        action="append",
        type=_argument(_client_role),
        default=[],
        metavar="NAME[:ROLE]",
        help=f"a client certificate; ROLE is one of {ROLES} (default user); "
        f"default: {DEV_CLIENT}:admin",
    )
    init.set_defaults(handler=_certs_init)
    return parser


def _preload_plugins(argv: Sequence[str]) -> Plugins:
    """Phase one of parsing ``serve``: load the plugins it names, so that phase two can
    parse the options they add."""
    plugins = Plugins()
    if next((arg for arg in argv if not arg.startswith("-")), None) != "serve":
        return plugins
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--plugin", action="append", default=[])
    names: list[str] = finder.parse_known_args(argv)[0].plugin
    plugins.load(["authz", *names])
    return plugins


# -- shared helpers -----------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"jobworker: {message}", file=sys.stderr, flush=True)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _client_tls(options: argparse.Namespace) -> TlsFiles:
    """Certificate files from flags, else environment, else the dev PKI's admin client."""
    given: dict[str, str | Path] = {}
    for dest, _flag, env in _CLIENT_TLS:
        value = getattr(options, dest) or os.environ.get(env)
        if value:
            given[dest] = value
    if not given:
        files = PkiPaths(default_pki_dir()).client(DEV_CLIENT)
        if not files.cert.exists():
            raise UsageError(
                "no client certificate: pass --tls-cert, --tls-key and --tls-ca (or set "
                f"JOBWORKER_TLS_CERT, _KEY and _CA); the dev PKI {files.cert.parent} does "
                "not exist yet (`jobworker serve` or `jobworker certs init` creates it)"
            )
        return files
    missing = [f"{flag} (or {env})" for dest, flag, env in _CLIENT_TLS if dest not in given]
    if missing:
        raise UsageError(
            f"--tls-cert, --tls-key and --tls-ca go together: missing {', '.join(missing)}"
        )
    return TlsFiles(cert=given["tls_cert"], key=given["tls_key"], ca=given["tls_ca"])


def _connect(options: argparse.Namespace) -> JobClient:
    server = options.server or os.environ.get("JOBWORKER_SERVER") or DEFAULT_SERVER
    return JobClient(server, _client_tls(options))


def _client_command(
    command: Callable[[JobClient, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` connected; errors from the server exit 1 with their status code.

    Errors raised while connecting (bad flags, unusable certificate files) are local and
    left to ``main``.
    """

    @functools.wraps(command)
    def handler(options: argparse.Namespace) -> int:
        with _connect(options) as client:
            try:
                return command(client, options)
            except JobworkerError as err:
                _say(f"{err.code}: {err}")
                return EXIT_SERVER_ERROR

    return handler


def _limits(options: argparse.Namespace) -> Limits | None:
    """The limits flags as one ``Limits``; the IO flags of a device merge into one entry."""
    io: tuple[IoLimit, ...] = tuple(
        IoLimit(device=device, **fields) for device, fields in (options.io or {}).items()
    )
    limits = Limits(
        cpu=options.cpu,
        cpu_weight=options.cpu_weight,
        memory=options.memory,
        memory_high=options.memory_high,
        pids=options.pids,
        io=io,
    )
    return None if limits.is_empty() else limits


def _start_job(client: JobClient, options: argparse.Namespace) -> str:
    command, *args = options.command
    return client.start(
        command,
        args,
        env=dict(options.env),
        cwd=options.cwd,
        limits=_limits(options),
        node=options.node,
    )


def _copy_output(chunks: Iterator[tuple[str, bytes, int]]) -> None:
    """Write each chunk to our own stdout or stderr, byte for byte, as it arrives."""
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer
    for stream, data, _offset in chunks:
        target = stderr if stream == "stderr" else stdout
        target.write(data)
        target.flush()


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the exit-time flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# -- client commands ----------------------------------------------------------------------


def _start(client: JobClient, options: argparse.Namespace) -> int:
    print(_start_job(client, options))
    return 0


def _run(client: JobClient, options: argparse.Namespace) -> int:
    job_id = _start_job(client, options)
    try:
        with contextlib.closing(client.stream(job_id)) as chunks:
            _copy_output(chunks)
    except (KeyboardInterrupt, BrokenPipeError) as err:
        # The job is ours alone: leave nothing running behind us, as a shell would.
        client.stop(job_id)
        if isinstance(err, BrokenPipeError):
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        _say(f"interrupted: stopped job {job_id}")
        return EXIT_INTERRUPTED
    status = client.status(job_id)
    code = status.shell_exit_code
    if status.reason is TerminationReason.NODE_LOST:
        raise JobworkerError(f"job {job_id} was lost with its node {status.node}")
    if code is None:
        raise JobworkerError(f"job {job_id}'s output ended but it is still {status.state.value}")
    return code


def _status(client: JobClient, options: argparse.Namespace) -> int:
    view = client.status(options.job_id)
    if options.json:
        _print_json(view.as_dict())
        return 0
    for key, value in _flatten(view.as_dict()):
        print(f"{key + ':':<26}{_human(key, value)}")
    return 0


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _human(key: str, value: Any) -> str:
    if value is None or value == []:
        return "-"
    if key.endswith("_at"):
        return datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
    if key == "args":
        return shlex.join(value)
    if key == "limits.io":
        return "; ".join(
            " ".join(f"{k}={v}" for k, v in device.items() if v is not None) for device in value
        )
    return str(value)


def _logs(client: JobClient, options: argparse.Namespace) -> int:
    with contextlib.closing(client.stream(options.job_id, follow=options.follow)) as chunks:
        _copy_output(chunks)
    return 0


def _stop(client: JobClient, options: argparse.Namespace) -> int:
    result = client.stop(options.job_id, grace=options.grace)
    summary = "already finished" if result.already_finished else "stopped"
    if result.escalated:
        summary += " (killed with SIGKILL after the grace period)"
    print(f"{options.job_id}: {result.message or summary}")
    return 0


def _outcome(view: JobStatusView) -> str:
    if view.reason is None:
        return "-"
    if view.exit_code is not None:
        return f"{view.reason.value} {view.exit_code}"
    return f"{view.reason.value} SIG{signal.Signals(view.signal or 0).name.removeprefix('SIG')}"


def _list(client: JobClient, options: argparse.Namespace) -> int:
    views = client.list(node=options.node)
    if options.json:
        _print_json([view.as_dict() for view in views])
        return 0
    rows = [("JOB", "STATE", "RESULT", "OWNER", "STARTED", "COMMAND")]
    rows += [
        (
            view.job_id,
            view.state.value,
            _outcome(view),
            view.owner,
            _human("started_at", view.started_at),
            shlex.join([view.command, *view.args]),
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


# -- local commands -----------------------------------------------------------------------


def _plugins(options: argparse.Namespace) -> int:
    """Describe plugins without starting anything; one broken plugin does not hide the rest."""
    plugins = Plugins()
    rows: list[dict[str, Any]] = []
    if options.plugin:
        plugins.load(["authz", *options.plugin])
    else:
        for name in available_plugins():
            try:
                plugins.load([name])
            except ConfigError as err:
                rows.append({"name": name, "version": None, "hooks": [], "error": str(err)})
    rows = plugins.describe() + rows
    if options.json:
        _print_json(rows)
        return 0
    for row in rows:
        details = row.get("error") or ", ".join(row["hooks"]) or "(no hooks)"
        print(f"{row['name']} {row['version'] or '-'}: {details}")
    return 0


def _certs_init(options: argparse.Namespace) -> int:
    clients: list[tuple[str, str]] = options.client or [(DEV_CLIENT, "admin")]
    paths = init_pki(options.dir, clients=clients)
    out = sys.stdout
    print(f"dev PKI in {paths.directory}:", file=out)
    for label, files in (("created", paths.created), ("kept", paths.existing)):
        for path in files:
            print(f"  {label:8}{path}", file=out)
    if paths.authz in paths.existing:
        names = ", ".join(name for name, _role in clients)
        print(f"  note: {paths.authz} was kept as it is; check it lists {names}", file=out)
    _print_usage(paths, clients, out)
    return 0


def _print_usage(paths: PkiPaths, clients: Sequence[tuple[str, str]], out: IO[str]) -> None:
    q = shlex.quote
    server = paths.server()
    print("\nstart the server:", file=out)
    print(
        f"  jobworker serve --tls-cert {q(str(server.cert))} --tls-key {q(str(server.key))} "
        f"--tls-ca {q(str(server.ca))} --authz {q(str(paths.authz))}",
        file=out,
    )
    for name, role in clients:
        files = paths.client(name)
        print(f"\nconnect as {name} ({role}):", file=out)
        print(
            f"  export JOBWORKER_SERVER={DEFAULT_SERVER} JOBWORKER_TLS_CERT={q(str(files.cert))} "
            f"JOBWORKER_TLS_KEY={q(str(files.key))} JOBWORKER_TLS_CA={q(str(files.ca))}",
            file=out,
        )


# -- serve --------------------------------------------------------------------------------


def _server_tls(options: argparse.Namespace) -> tuple[TlsFiles, PkiPaths | None]:
    """The server's TLS files from flags, or the dev PKI (created on first use)."""
    flags = {
        "--tls-cert": options.tls_cert,
        "--tls-key": options.tls_key,
        "--tls-ca": options.tls_ca,
    }
    if not any(flags.values()):
        pki = init_pki(default_pki_dir())
        return attrs.evolve(pki.server(), crl=options.tls_crl), pki
    missing = [flag for flag, value in flags.items() if value is None]
    if missing:
        raise UsageError(
            f"--tls-cert, --tls-key and --tls-ca go together: missing {', '.join(missing)}"
        )
    files = TlsFiles(
        cert=options.tls_cert, key=options.tls_key, ca=options.tls_ca, crl=options.tls_crl
    )
    return files, None


def _stop_before_serving(signum: int, frame: object) -> NoReturn:
    """SIGTERM/SIGINT while the server is still setting up: nothing runs yet, exit 0."""
    raise SystemExit(0)


def _serve(plugins: Plugins, options: argparse.Namespace) -> int:
    # Until serve() installs its own handlers (which stop jobs first), a stop request
    # unwinds the set-up cleanly instead of dying with 143.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_before_serving)
    # Imported here so that client commands do not pay for loading the server.
    import asyncio

    import structlog

    from jobworker.server import ServerConfig, serve

    configure_logging(options.log_level)
    tls, dev_pki = _server_tls(options)
    if dev_pki is not None:
        if options.authz is None:
            options.authz = dev_pki.authz
        structlog.get_logger("jobworker.cli").info(
            "dev_pki",
            directory=str(dev_pki.directory),
            authz=str(options.authz),
            client_cert=str(dev_pki.client_cert(DEV_CLIENT)),
            hint="client commands on this machine use it when given no --tls-* options",
        )
    plugins.configure(options)
    config = ServerConfig(
        listen=options.listen,
        tls=tls,
        spool_dir=options.spool_dir,
        default_grace=options.grace,
        max_running=options.max_jobs,
        retain_finished=options.retain_jobs,
        retain_seconds=options.retain_seconds,
    )
    asyncio.run(serve(config, plugins))
    return 0


# -- entry point --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``jobworker`` command; return its exit status (never raises)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        plugins = _preload_plugins(args)
        options = build_parser(plugins).parse_args(args)
        status: int = options.handler(options)
        return status
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except UsageError as err:
        _say(f"error: {err}")
    except JobworkerError as err:  # raised here, not by the server: local configuration
        _say(f"error: {err}")
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as err:  # a file or directory we were told to use
        where = f"{err.filename}: " if err.filename else ""
        _say(f"error: {where}{err.strerror or err}")
    except Exception as err:  # a bug: still one line, no traceback (see errors.py)
        _say(f"INTERNAL: unexpected {type(err).__name__}: {err}")
        return EXIT_SERVER_ERROR
    return EXIT_USAGE
