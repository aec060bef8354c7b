"""``jobworker top`` (a live view of running jobs) and ``status JOB --usage`` (a job's CPU
and memory over its life, as a small chart)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import select
import shlex
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from jobworker.cli.common import for_terminal, print_json
from jobworker.client import JobClient
from jobworker.model import JobState, JobStatusView
from jobworker.usage import JobUsage, UsageSample

_BARS = "▁▂▃▄▅▆▇█"
#: Widest chart ``status --usage`` draws, in samples (columns).
CHART_WIDTH = 60


# -- figures ------------------------------------------------------------------------------


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def _rate(a: int | None, b: int | None, seconds: float) -> float | None:
    if a is None or b is None or seconds <= 0:
        return None
    return max(0, b - a) / seconds


@attrs.frozen
class Row:
    """One running job in ``top``: its status and what its last two samples say."""

    view: JobStatusView
    cpu_percent: float | None = None
    memory: int | None = None
    io_read_rate: float | None = None
    io_write_rate: float | None = None
    pids: int | None = None

    @classmethod
    def of(cls, view: JobStatusView, samples: Sequence[UsageSample]) -> Row:
        if not samples:
            return cls(view)
        last = samples[-1]
        first = samples[-2] if len(samples) > 1 else None
        read0: int | None = 0
        write0: int | None = 0
        if first is None:  # one sample: the average since the job started
            since, cpu0 = view.started_at, 0
        else:
            since, cpu0 = first.time, first.cpu_usec
            read0, write0 = first.io_read_bytes, first.io_write_bytes
        dt = last.time - since
        cpu = _rate(cpu0, last.cpu_usec, dt)
        return cls(
            view,
            cpu_percent=None if cpu is None else cpu / 1e4,
            memory=last.memory_bytes,
            io_read_rate=_rate(read0, last.io_read_bytes, dt),
            io_write_rate=_rate(write0, last.io_write_bytes, dt),
            pids=last.pids,
        )


SORT_KEYS: dict[str, Callable[[Row], Any]] = {
    "cpu": lambda r: -(r.cpu_percent or 0),
    "mem": lambda r: -(r.memory or 0),
    "io": lambda r: -((r.io_read_rate or 0) + (r.io_write_rate or 0)),
    "runtime": lambda r: r.view.started_at,
    "owner": lambda r: r.view.owner,
    "id": lambda r: r.view.job_id,
}


def rows(client: JobClient) -> list[Row]:
    """Every running job the caller may see, with its newest two samples."""
    usage = {u.job_id: u.samples for u in client.running_usage(last=2)}
    return [
        Row.of(view, usage.get(view.job_id, ()))
        for view in client.list()
        if view.state is JobState.RUNNING
    ]


#: Keys of the live view, when stdin is a terminal: a sort order each, then ``r`` and ``q``.
SORT_BY_KEY = {"c": "cpu", "m": "mem", "i": "io", "t": "runtime", "o": "owner", "j": "id"}
KEY_HELP = "keys: c cpu  m mem  i io  t runtime  o owner  j id  r reverse  q quit"


def frame(jobs: list[Row], sort: str, now: float, width: int = 120, reverse: bool = False) -> str:
    """The table ``top`` prints once a second; a NODE column when some job runs on a
    cluster node."""
    jobs = sorted(jobs, key=SORT_KEYS[sort], reverse=reverse)
    nodes = any(r.view.node for r in jobs)
    node_header = f" {'NODE':<12}" if nodes else ""
    header = (
        f"{'JOB':<24} {'OWNER':<12}{node_header} {'CPU%':>6} {'MEM':>9} {'READ/s':>9}"
        f" {'WRITE/s':>9} {'PIDS':>5} {'RUNTIME':>8}  COMMAND"
    )
    order = f"sorted by {sort}, reversed" if reverse else f"sorted by {sort}"
    lines = [f"{len(jobs)} running jobs, {order}", header]
    for r in jobs:
        runtime = int(now - r.view.started_at)
        cpu = "-" if r.cpu_percent is None else f"{r.cpu_percent:.1f}"
        command = for_terminal(shlex.join([r.view.command, *r.view.args]))
        owner = for_terminal(r.view.owner)[:12]
        node = f" {for_terminal(r.view.node or '-')[:12]:<12}" if nodes else ""
        line = (
            f"{r.view.job_id:<24} {owner:<12}{node} {cpu:>6} {size(r.memory):>9}"
            f" {size(r.io_read_rate):>9} {size(r.io_write_rate):>9}"
            f" {'-' if r.pids is None else r.pids:>5}"
            f" {runtime // 3600:02d}:{runtime // 60 % 60:02d}:{runtime % 60:02d}  {command}"
        )
        lines.append(line[:width])
    return "\n".join(lines)


def top(client: JobClient, options: argparse.Namespace) -> int:
    if options.once:
        print(frame(rows(client), options.sort, time.time()), flush=True)
        return 0
    keys = sys.stdin.fileno() if sys.stdin.isatty() else None
    on_terminal = sys.stdout.isatty()
    sort, reverse = options.sort, False
    try:
        with _cbreak(keys):
            jobs, due = rows(client), time.monotonic() + options.interval
            while True:
                text = frame(jobs, sort, time.time(), _columns(), reverse)
                if keys is not None:
                    text = f"{KEY_HELP}\n{text}"
                # Home and clear on a terminal; frames separated by a blank line otherwise.
                print("\x1b[H\x1b[2J" + text if on_terminal else text + "\n", flush=True)
                pressed = _wait(keys, due - time.monotonic())
                if "q" in pressed:
                    return 0
                for key in pressed:
                    if key == "r":
                        reverse = not reverse
                    sort = SORT_BY_KEY.get(key, sort)
                if time.monotonic() >= due:
                    jobs, due = rows(client), time.monotonic() + options.interval
    except KeyboardInterrupt:
        return 0


@contextlib.contextmanager
def _cbreak(fd: int | None) -> Iterator[None]:
    """The terminal on ``fd`` delivers each key at once, unechoed (Ctrl-C still interrupts);
    its settings are restored however the block ends. Nothing when ``fd`` is None."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait(keys: int | None, seconds: float) -> str:
    """Up to ``seconds`` for keys (returned at once when some come); "q" once the terminal
    is gone (end of input, or EIO after a hang-up)."""
    if keys is None:
        time.sleep(max(0.0, seconds))
        return ""
    ready, _, _ = select.select([keys], [], [], max(0.0, seconds))
    if not ready:
        return ""
    try:
        data = os.read(keys, 64)
    except OSError:
        return "q"
    return data.decode(errors="replace") if data else "q"


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns


# -- status --usage -------------------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = CHART_WIDTH) -> str:
    """``values`` as one line of block characters, at most ``width`` wide (bucket maxima)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step) : int((i + 1) * step)]) for i in range(width)]
    top = max(values)
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(
        _BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in values
    )


def cpu_series(samples: Sequence[UsageSample]) -> list[float]:
    """Cores used between consecutive samples."""
    return [
        max(0, b.cpu_usec - a.cpu_usec) / 1e6 / (b.time - a.time)
        for a, b in itertools.pairwise(samples)
        if b.time > a.time
    ]


def chart(usage: JobUsage) -> str:
    samples = usage.samples
    if not samples:
        return f"job {usage.job_id}: no usage samples (it ended within its first second)"
    span = samples[-1].time - samples[0].time
    cpu = cpu_series(samples)
    memory = [float(s.memory_bytes) for s in samples if s.memory_bytes is not None]
    lines = [
        f"job {usage.job_id}: {len(samples)} samples over {span:.0f}s (from {usage.source})",
        f"cpu     {sparkline(cpu) or '-'}  peak {max(cpu, default=0):.2f} cores,"
        f" total {samples[-1].cpu_usec / 1e6:.2f}s",
        f"memory  {sparkline(memory)}  peak {size(max(memory))}, now {size(memory[-1])}"
        if memory
        else f"memory  unknown: {usage.source} cannot read it here (no memory controller)",
    ]
    return "\n".join(lines)


def status_usage(client: JobClient, options: argparse.Namespace) -> int:
    usage = client.usage(options.job_id)
    if options.json:
        print_json(
            {
                "job_id": usage.job_id,
                "source": usage.source,
                "samples": [attrs.asdict(s) for s in usage.samples],
            }
        )
    else:
        print(chart(usage))
        enforced = client.status(options.job_id).enforced
        print(for_terminal(f"limits  {'; '.join(enforced) or 'unknown (an older server)'}"))
    return 0


def add_command(commands: Any, connection: argparse.ArgumentParser, wrap: Any) -> None:
    parser = commands.add_parser(
        "top", parents=[connection], help="live view of running jobs and what they use"
    )
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument(
        "--sort",
        choices=sorted(SORT_KEYS),
        default="cpu",
        help="row order (default cpu); on a terminal, keys change it (c m i t o j, r reverse)",
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period"
    )
    parser.set_defaults(handler=wrap(top))
