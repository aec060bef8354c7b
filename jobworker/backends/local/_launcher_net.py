"""A private network: the launcher's side of :mod:`jobworker.backends.local.network`. Only
jobs whose plan names pasta get here. A helper forked before the job's namespaces exist
stays in the host's and runs pasta for them; nft installs the job's rules inside them
while pasta starts, and the job's PID 1 waits for pasta just before the command's process.
"""

import _signal  # type: ignore[import-not-found]
import os

from ._launcher_base import (
    PR_CAP_AMBIENT,
    PR_SET_PDEATHSIG,
    Libc,
    fail,
    plan_value,
    plan_values,
    read_all,
)

PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN = 2, 12
#: pasta's ready pipe and its log, as PID 1 waits on them.
Network = tuple[int, int]


def net_helper(libc: Libc, plan: list[str]) -> tuple[int, int, int, int] | None:
    """Before the namespaces exist: a child that stays in the host's, and will run pasta
    for the job's network namespace once it exists (see network.py). It dies with this
    process (``PR_SET_PDEATHSIG``). Returns (its pid, go pipe, ready pipe, log), or None
    when the plan has no private network."""
    pasta = plan_value(plan, "pasta")
    if not pasta:
        return None
    launcher = os.getpid()
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    log = os.memfd_create("jobworker-network-log")
    pid = os.fork()
    if pid == 0:
        try:
            libc.lib.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
            if os.getppid() != launcher or os.read(go_r, 1) != b"g":
                os._exit(1)  # the launcher is gone or gave up: nothing to connect
            keep = [ready_w, os.open(f"/proc/{launcher}/ns/net", os.O_RDONLY)]
            argv = [pasta, *plan_values(plan, "pasta_arg"), "-P", f"/proc/self/fd/{ready_w}"]
            argv += ["--netns", f"/proc/self/fd/{keep[1]}"]
            if plan_value(plan, "map_uid"):
                keep.append(os.open(f"/proc/{launcher}/ns/user", os.O_RDONLY))
                argv += ["--userns", f"/proc/self/fd/{keep[2]}"]
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            for name in os.listdir("/proc/self/fd"):
                if int(name) > 2 and int(name) not in keep:
                    try:
                        os.close(int(name))
                    except OSError:
                        pass  # the descriptor listdir itself used
            for fd in keep:
                os.set_inheritable(fd, True)
            try:
                os.execv(pasta, argv)
            except OSError as err:
                os.write(2, f"cannot execute {pasta}: {err.strerror}\n".encode())
        finally:
            os._exit(127)
    os.close(go_r)
    os.close(ready_w)
    return pid, go_w, ready_r, log


def connect_network(libc: Libc, plan: list[str], helper: tuple[int, int, int, int]) -> Network:
    """In the job's new namespaces, before any of the job runs: pasta starts connecting the
    namespace while nft installs the rules; return once the rules are in. pasta's start
    (15-20 ms, most of it its own initialisation) goes on meanwhile: the job's PID 1
    builds its filesystem view and then waits for it (:func:`await_network`)."""
    _pid, go, ready, log = helper
    os.write(go, b"g")
    os.close(go)
    _install_rules(libc, plan)
    return ready, log


def await_network(network: Network) -> None:
    """In PID 1, before the command's process exists: return once pasta has the namespace
    connected (it writes its pid then, and keeps the pipe open); fail with its last
    message if it exited instead."""
    ready, log = network
    started = os.read(ready, 64).strip()
    os.close(ready)
    if not started:  # EOF: pasta exited, after writing what it had to say
        fail("network", OSError(0, _log_line(log) or "exited"), "pasta")
    os.close(log)


def _install_rules(libc: Libc, plan: list[str]) -> None:
    """``nft -f`` the plan's ruleset in this network namespace; nft runs with
    CAP_NET_ADMIN only (ambient: in a user namespace this process is not uid 0)."""
    nft = plan_value(plan, "nft")
    rules = os.memfd_create("jobworker-nft-rules")
    log = os.memfd_create("jobworker-nft-log")
    os.write(rules, plan_value(plan, "nft_rules").encode())
    os.lseek(rules, 0, os.SEEK_SET)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(rules, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.closerange(3, 1 << 20)
            only = 1 << CAP_NET_ADMIN
            header = (libc.ctypes.c_uint32 * 2)(0x20080522, 0)
            data = (libc.ctypes.c_uint32 * 6)(only, only, only, 0, 0, 0)
            libc.lib.capset(header, data)
            libc.lib.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN, 0, 0)
            os.execv(nft, [nft, "-f", "/dev/stdin"])
        finally:
            os._exit(127)
    os.close(rules)
    _pid, status = os.waitpid(pid, 0)
    if status != 0:
        exited = f"exit status {os.waitstatus_to_exitcode(status)}"
        fail("network", OSError(0, _log_line(log) or exited), "nft")
    os.close(log)


def _log_line(log: int) -> str:
    """The last line a network tool wrote (pasta also logs that syslog is missing)."""
    os.lseek(log, 0, os.SEEK_SET)
    lines = [ln for ln in read_all(log).decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
