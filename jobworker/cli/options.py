"""The options of the client commands: a job (command, environment, limits) and a
connection (server, TLS files), read into the values the client takes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobworker.api.address import DEFAULT_ADDRESS, DEFAULT_PORT, dial_target
from jobworker.api.tlsfiles import DEV_CLIENT, PkiFiles, TlsFiles, default_pki_dir, given_files
from jobworker.cli.common import Parser, argument
from jobworker.client import JobClient
from jobworker.errors import UsageError
from jobworker.units import (
    CPU_WEIGHT_RANGE,
    parse_cores,
    parse_count,
    parse_rate,
    parse_size,
    split_device_value,
)

if TYPE_CHECKING:
    from jobworker.jobspec import Limits

# Client TLS options: (option dest, flag, environment variable).
_CLIENT_TLS = (
    ("tls_cert", "--tls-cert", "JOBWORKER_TLS_CERT"),
    ("tls_key", "--tls-key", "JOBWORKER_TLS_KEY"),
    ("tls_ca", "--tls-ca", "JOBWORKER_TLS_CA"),
)


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


def connection_options() -> Parser:
    parent = Parser(add_help=False)
    group = parent.add_argument_group(
        "connection",
        "Without certificate options or JOBWORKER_TLS_* variables, the dev PKI's "
        f"{DEV_CLIENT!r} client certificate in {default_pki_dir()} is used.",
    )
    group.add_argument(
        "--server",
        metavar="HOST[:PORT]",
        help=f"server address (env JOBWORKER_SERVER; default {DEFAULT_ADDRESS}; port"
        f" {DEFAULT_PORT} when not given); several, comma-separated IP addresses (a"
        " cluster's front servers): the next is used when one is down",
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name the server's certificate must list, when it is not the host dialled"
        " (env JOBWORKER_SERVER_NAME; needed for several --server hosts)",
    )
    for _dest, flag, env in _CLIENT_TLS:
        group.add_argument(flag, type=Path, metavar="FILE", help=f"PEM file (env {env})")
    return parent


def job_options() -> Parser:
    parent = Parser(add_help=False)
    job = parent.add_argument_group("job")
    job.add_argument(
        "--env",
        action="append",
        type=argument(_env_pair),
        default=[],
        metavar="KEY=VALUE",
        help="the job's environment, one variable per flag (PATH defaults if unset)",
    )
    job.add_argument("--cwd", metavar="DIR", help="working directory on the server")
    job.add_argument(
        "--user",
        metavar="NAME",
        help="Unix account to run as (one the whitelist's run_as lists for you)",
    )
    job.add_argument(
        "--network",
        choices=("private", "none", "host"),
        help="private (a way out, none to the server's host), none (only a loopback), or"
        " host (the host's own, if the whitelist grants it); default: the server's",
    )
    job.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="keep the job's stdin open: run forwards ours (also done when it is not a"
        " terminal); start leaves it for `jobworker write`",
    )
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
    limits.add_argument("--cpu", type=argument(parse_cores), metavar="CORES", help="e.g. 0.5")
    limits.add_argument("--memory", type=argument(parse_size), metavar="SIZE", help="e.g. 256M, 1G")
    limits.add_argument(
        "--memory-high", type=argument(parse_size), metavar="SIZE", help="throttle above this"
    )
    limits.add_argument(
        "--cpu-weight",
        type=argument(parse_count),
        metavar="N",
        help=f"CPU share, {CPU_WEIGHT_RANGE[0]}-{CPU_WEIGHT_RANGE[1]}",
    )
    limits.add_argument("--pids", type=argument(parse_count), metavar="N", help="max processes")
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
            type=argument(parse),
            metavar=metavar,
            help=help_,
        )
    return parent


def _client_tls(options: argparse.Namespace) -> TlsFiles:
    """Certificate files from flags, else environment, else the dev PKI's admin client."""
    cert, key, ca = (getattr(options, dest) or os.environ.get(env) for dest, _, env in _CLIENT_TLS)
    given = given_files(
        cert, key, ca, labels=[f"{flag} (or {env})" for _, flag, env in _CLIENT_TLS]
    )
    if given is not None:
        return given
    files = PkiFiles(default_pki_dir()).client(DEV_CLIENT)
    if not files.cert.exists():
        raise UsageError(
            "no client certificate: pass --tls-cert, --tls-key and --tls-ca (or set "
            f"JOBWORKER_TLS_CERT, _KEY and _CA); the dev PKI {files.cert.parent} does "
            "not exist yet (`jobworker serve` or `jobworker certs init` creates it)"
        )
    return files


def connect(options: argparse.Namespace) -> JobClient:
    server = options.server or os.environ.get("JOBWORKER_SERVER") or DEFAULT_ADDRESS
    name = options.server_name or os.environ.get("JOBWORKER_SERVER_NAME") or None
    target, name = dial_target(server, name)
    return JobClient(target, _client_tls(options), server_name=name)


def limits_from_options(options: argparse.Namespace) -> Limits | None:
    """The limits flags as one ``Limits``; the IO flags of a device merge into one entry.
    The model (and attrs) is imported only for a job that has some."""
    flags = (options.cpu, options.cpu_weight, options.memory, options.memory_high, options.pids)
    if all(value is None for value in flags) and not options.io:
        return None
    from jobworker.jobspec import IoLimit, Limits

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


def job_id(text: str) -> str:
    """A JOB argument: refuse an empty one here, in CLI words, before asking the server."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "the job id is empty: pass the id `jobworker start` printed (see `jobworker list`)"
        )
    return text
