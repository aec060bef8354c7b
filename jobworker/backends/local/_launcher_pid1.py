"""The launcher's processes that stay above the command: an isolated job's PID 1 and the
relay that stands for it, and live restore's monitor of a job without namespaces. Each
waits for the command and ends the way it did, or writes its wait status to the exit
report, so the job's end is known even when the process that learns it is not the server's
child.
"""

import _signal  # type: ignore[import-not-found]
import os

from ._launcher_base import EXIT_FD, PR_SET_PDEATHSIG, STATUS_FD, Libc


def relay(libc: Libc, helper: int) -> None:
    """Fork PID 1 and return in it; in this process, wait for it, then end the same way.

    This process is the server's child and stands for PID 1: like it, it ignores the
    signals a stop sends the job's process group (it ends when PID 1 does); SIGKILL ends
    it, and PID 1 with it (``PR_SET_PDEATHSIG``), so the kernel ends the namespace.
    ``helper``: the job's network helper, if any, killed first and left to exit on its
    own: pasta's exit waits for the kernel to tear its tap device down (an RCU barrier,
    20 ms or more here), which the job's end need not wait for; it is in the job's
    cgroup, whose emptying the server still waits for.
    """
    everything = _signal.valid_signals()
    _signal.pthread_sigmask(_signal.SIG_BLOCK, everything)
    child = os.fork()
    if child == 0:
        # (A relay killed before this line was killed with its process group, PID 1 too.)
        libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, "namespace")
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
        return
    for signum in everything:
        if signum not in (_signal.SIGKILL, _signal.SIGSTOP, _signal.SIGCHLD):
            try:
                _signal.signal(signum, _signal.SIG_IGN)
            except (OSError, ValueError):
                pass  # not a signal this platform lets us handle
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
    for fd in (0, 1, 2, STATUS_FD, EXIT_FD):
        os.close(fd)
    os.closerange(EXIT_FD + 1, 1 << 20)
    _pid, status = os.waitpid(child, 0)
    if helper:
        os.kill(helper, _signal.SIGKILL)
    if os.WIFSIGNALED(status):
        _signal.signal(os.WTERMSIG(status), _signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 127)


def init(child: int) -> None:
    """PID 1 of the job: reap every orphan; when the command ends, report it and exit.

    Its exit makes the kernel kill whatever is left in the namespace. It handles no
    signal, and a namespace's init ignores those it does not handle: stop signals reach
    the command through the job's cgroup or process group, never through here.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2, STATUS_FD):
        os.dup2(devnull, fd)  # the pipes close when the job's own processes close them
    os.close(devnull)
    os.closerange(EXIT_FD + 1, 1 << 20)  # the zygote's copies of the same pipes too
    while True:
        pid, status = os.wait()
        if pid == child:
            os.write(EXIT_FD, str(status).encode())
            os._exit(0)


def monitor() -> None:
    """Live restore, a job without namespaces: this process stays as the job's first
    process, waits for the command and writes its wait status to the exit report, a file
    a later server reads if the one that started the job is gone by then (nobody else
    would learn it: the orphan is reaped by init). Returns in the command's process.

    It ignores the signals a stop or a terminal sends, as a namespace's PID 1 does, so
    that it outlives the command to report how it ended; SIGKILL still takes it.
    """
    child = os.fork()
    if child == 0:
        return
    for signum in _MONITOR_IGNORES:
        _signal.signal(signum, _signal.SIG_IGN)
    init(child)


_MONITOR_IGNORES = (
    _signal.SIGHUP,
    _signal.SIGINT,
    _signal.SIGQUIT,
    _signal.SIGTERM,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
    _signal.SIGPIPE,
    _signal.SIGALRM,
)
