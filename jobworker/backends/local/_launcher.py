"""The job launcher: the first program of every job, run as ``python -I -S _launcher.py``.

The server never forks itself (grpcio's threads make fork unsafe); it ``posix_spawn``s this
script, which runs alone in a fresh session and, in this order:

1. reads its instructions from fd 0, then moves the job's stdin (fd 5: a pipe the server
   writes, or /dev/null) to fd 0;
2. joins the job's containment (writes ``0`` to the cgroup's ``cgroup.procs``), so the
   user's command is contained from its first instruction;
3. when the job has an isolation plan, carries it out (namespaces, its own filesystem
   view, an unprivileged account; see :mod:`jobworker.backends.local.isolation`): this process then
   stays
   as the job's PID 1 and the rest happens in its child;
4. changes directory, closes every descriptor but 0, 1, 2 and the status pipe, and gives
   signals their default disposition and an empty mask (Python ignores SIGPIPE, and ignored
   signals survive ``execve``);
5. ``execve``s the command. The status pipe (fd 3) is close-on-exec: the server reads EOF
   when the exec succeeded, or one error report when a step failed. An isolated job's PID 1
   writes the command's wait status to the exit report (fd 4, a file) before it exits: the
   server's own child is then PID 1, which no signal from inside its namespace can kill.
   Under ``serve --live-restore`` a job without namespaces gets such a first process too
   (``monitor``), since the server that reaps it may be gone when the command ends.
   PID 1 and its parent close their copies of fd 0, so the command alone holds the stdin
   pipe's read end and the server's writer sees EPIPE once the command is gone.

Instructions and reports are NUL-separated fields (no job string may hold a NUL): importing
``json`` or ``signal`` would pull in ``re`` and ``enum`` and triple the start-up time. Only
built-in modules, and no ``site``: it must start in milliseconds.
"""

import _signal  # type: ignore[import-not-found]
import os
import sys

STATUS_FD = 3
STDIN_FD = 5  # the job's stdin until it moves to fd 0


def _fail(step: str, err: OSError, what: str) -> None:
    report = "\0".join((step, str(err.errno), err.strerror or str(err), what))
    os.write(STATUS_FD, report.encode("utf-8", "surrogateescape"))
    os._exit(127)


def _read_all(fd: int) -> bytes:
    parts: list[bytes] = []
    while True:
        part = os.read(fd, 1 << 20)
        if not part:
            return b"".join(parts)
        parts.append(part)


def launch(fields: list[str], pid1: bool = False) -> None:
    """Become the job: fd 1, 2, 3 and 4 are in place; never returns.

    ``pid1``: this process was cloned into the plan's namespaces (the zygote's way), so it
    is already PID 1 of the job's PID namespace.
    """
    # command, cwd, join, plan count, plan..., argument count, arguments..., NAME=value...
    command, cwd, join_path, nplan = fields[0], fields[1], fields[2], int(fields[3])
    plan = fields[4 : 4 + nplan]
    rest = fields[4 + nplan :]
    nargs = int(rest[0])
    args = rest[1 : 1 + nargs]
    env = dict(item.split("=", 1) for item in rest[1 + nargs :])
    os.dup2(STDIN_FD, 0)
    os.close(STDIN_FD)
    # Default dispositions now, not just before exec: an isolated job's PID 1 is this
    # process, and Python's own SIGINT handler must not turn a Ctrl-C into a traceback.
    for signum in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGTERM):
        _signal.signal(signum, _signal.SIG_DFL)
    if join_path:
        try:
            with open(join_path, "w") as f:
                f.write("0")
        except OSError as err:
            _fail("join", err, join_path)
    if _plan_value(plan, "ns"):
        isolate(plan, pid1, bool(join_path))
    elif _plan_value(plan, "monitor"):
        _monitor()
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as err:
            _fail("cwd", err, cwd)
    os.set_inheritable(STATUS_FD, False)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > STATUS_FD:
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor listdir itself used
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
    argv = [*_plan_values(plan, "wrap"), command, *args]
    _exec(argv, env)


def _exec(argv: list[str], env: dict[str, str]) -> None:
    """``execvpe`` without its lazy imports: an isolated job may no longer see the stdlib."""
    program = argv[0]
    if "/" in program:
        candidates = [program]
    else:
        candidates = [d.rstrip("/") + "/" + program for d in env.get("PATH", "").split(":") if d]
    error: OSError = FileNotFoundError(2, "No such file or directory")
    for candidate in candidates:
        try:
            os.execve(candidate, argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue  # the next PATH entry, as a shell does
        except OSError as err:
            error = err  # remembered (EACCES...), but a later entry may still work
    _fail("exec", error, program)


def _plan_values(plan: list[str], key: str) -> list[str]:
    prefix = key + "="
    return [item[len(prefix) :] for item in plan if item.startswith(prefix)]


def _plan_value(plan: list[str], key: str, default: str = "") -> str:
    values = _plan_values(plan, key)
    return values[-1] if values else default


# -- isolation: only jobs with a plan get here; ctypes is imported on this path only -------

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUSER = 0x00020000, 0x02000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64 (the unified table)
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
PR_SET_PDEATHSIG = 1
EXIT_FD = 4
RLIMIT_NPROC = 6
_KEYCTL = {"x86_64": 250, "aarch64": 219}  # keyctl(2)'s syscall number
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_SETPERM, KEYCTL_DESCRIBE, KEYCTL_CLEAR = 1, 5, 6, 7
KEYCTL_LINK = 8
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
#: Possessor: all but setattr (the kernel's own default); the uid: view, read, write,
#: search, link, and no setattr.
USER_KEYRING_PERM = 0x1F1F0000
SETATTR_PERMS = 0x20200000  # possessor's and user's


class _Libc:
    """The few system calls Python 3.11 has no wrapper for, raising OSError like os does."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def check(self, result: int, step: str, what: str) -> None:
        if result < 0:
            errno = self.ctypes.get_errno()
            _fail(step, OSError(errno, os.strerror(errno)), what)

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        enc = [s.encode() if s else None for s in (source, target, fstype, data)]
        self.check(self.lib.mount(enc[0], enc[1], enc[2], flags, enc[3]), "mount", target)

    def set_mount_attrs(self, target: str, set_flags: int, clear_flags: int) -> None:
        """Change flags of ``target`` and every mount below it (mount_setattr(2))."""
        attr = (self.ctypes.c_uint64 * 4)(set_flags, clear_flags, 0, 0)
        result = self.lib.syscall(
            SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), AT_RECURSIVE, attr, 32
        )
        self.check(result, "mount", target)

    def prctl(self, option: int, arg: int, step: str) -> None:
        self.check(self.lib.prctl(option, arg, 0, 0, 0), step, str(arg))


def _write_file(path: str, data: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(data)
    except OSError as err:
        _fail("namespace", err, path)


def isolate(plan: list[str], pid1: bool, in_cgroup: bool) -> None:
    """Carry out the plan; return in the job's process, ready to exec (see isolation.py)."""
    libc = _Libc()
    flags = int(_plan_value(plan, "ns", "0"))
    helper = None if pid1 else _net_helper(libc, plan)
    # The PID namespace waits while the network is set up: nft's process would be its init.
    later = CLONE_NEWPID if helper is not None else 0
    if not pid1:
        # The launcher's way: namespaces for this process, the PID namespace for its child.
        libc.check(libc.lib.unshare(flags & ~CLONE_NEWCGROUP & ~later), "namespace", "unshare")
    if flags & CLONE_NEWUSER:
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"65534 {_plan_value(plan, 'map_uid')} 1")
        _write_file("/proc/self/gid_map", f"65534 {_plan_value(plan, 'map_gid')} 1")
    if helper is not None:
        _connect_network(libc, plan, helper)
        libc.check(libc.lib.unshare(flags & later), "namespace", "unshare")
    if not pid1 and flags & CLONE_NEWPID:
        _relay(libc, helper[0] if helper else 0)  # the child goes on as PID 1
    if flags & CLONE_NEWCGROUP:
        # Rooted at the cgroup just joined: the job sees its own cgroup as "/".
        libc.check(libc.lib.unshare(CLONE_NEWCGROUP), "namespace", "cgroup")
    _mount_view(libc, plan, in_cgroup)
    if flags & CLONE_NEWNET:
        _loopback_up(libc)
    child = os.fork()
    if child == 0:
        _drop_privileges(libc, plan)
        return
    _init(child)


def _relay(libc: _Libc, helper: int) -> None:
    """Fork PID 1 and return in it; in this process, wait for it, then end the same way.

    This process is the server's child and stands for PID 1: like it, it ignores the
    signals a stop sends the job's process group (it ends when PID 1 does); SIGKILL ends
    it, and PID 1 with it (``PR_SET_PDEATHSIG``), so the kernel ends the namespace.
    ``helper``: the job's network helper, if any, ended and reaped first.
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
        os.waitpid(helper, 0)
    if os.WIFSIGNALED(status):
        _signal.signal(os.WTERMSIG(status), _signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 127)


def _mount_view(libc: _Libc, plan: list[str], in_cgroup: bool) -> None:
    """The job's filesystem: read-only, its own /proc, /tmp and cgroup, the server's hidden."""
    libc.mount("", "/", "", MS_REC | MS_PRIVATE)  # nothing of ours propagates to the host
    libc.set_mount_attrs("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0)
    for path in _plan_values(plan, "writable"):
        if os.path.isdir(path):
            libc.mount(path, path, "", MS_BIND | MS_REC)
            libc.set_mount_attrs(path, 0, MOUNT_ATTR_RDONLY)
    libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Cover the host's hierarchy first: cgroup2 cannot be mounted on itself (EBUSY).
    _hide(libc, "/sys/fs/cgroup")
    if in_cgroup:
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
        libc.mount("cgroup2", "/sys/fs/cgroup", "cgroup2", flags)
    for path in _plan_values(plan, "hide"):
        _hide(libc, path)
    _private_tmp(libc, plan)


def _private_tmp(libc: _Libc, plan: list[str]) -> None:
    """The job's /tmp, /var/tmp and /dev/shm: directories of one tmpfs of the plan's size.

    One tmpfs, not one each: their total is what is bounded. It is mounted on the first
    path, which then gets its own directory bound over the tmpfs's root, so the job sees
    none of the others there.
    """
    paths = [path for path in _plan_values(plan, "tmp") if os.path.isdir(path)]
    if not paths:
        return
    size = _plan_value(plan, "tmp_size")
    data = "mode=0700"
    if size:
        # Inodes cost kernel memory beyond the size: about 1 KiB each, one per 8 KiB.
        data += f",size={size},nr_inodes={max(int(size) // 8192, 1024)}"
    base = paths[0]
    libc.mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, data)
    for index in range(len(paths)):
        own = f"{base}/{index}"
        try:
            os.mkdir(own)
            os.chmod(own, 0o1777)
        except OSError as err:
            _fail("mount", err, own)
    # The first path last: its bind covers the tmpfs's root, where the others' are.
    for index in reversed(range(len(paths))):
        libc.mount(f"{base}/{index}", paths[index], "", MS_BIND)


def _hide(libc: _Libc, path: str) -> None:
    """Cover ``path`` with something empty and read-only; a path that is not there is hidden."""
    if os.path.isdir(path):
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        libc.mount("tmpfs", path, "tmpfs", flags, "mode=0,size=4k")
    elif os.path.lexists(path):
        libc.mount(os.devnull, path, "", MS_BIND)
        libc.mount("", path, "", MS_REMOUNT | MS_BIND | MS_RDONLY)


def _loopback_up(libc: _Libc) -> None:
    """A new network namespace has a loopback, down: bring it up (SIOCSIFFLAGS)."""
    ctypes = libc.ctypes
    sock = libc.lib.socket(2, 2, 0)  # AF_INET, SOCK_DGRAM
    libc.check(sock, "network", "socket")
    ifreq = ctypes.create_string_buffer(b"lo", 40)
    libc.check(libc.lib.ioctl(sock, 0x8913, ifreq), "network", "lo")  # SIOCGIFFLAGS
    flags = int.from_bytes(ifreq.raw[16:18], "little") | 0x1 | 0x40  # IFF_UP | IFF_RUNNING
    ifreq[16:18] = flags.to_bytes(2, "little")
    libc.check(libc.lib.ioctl(sock, 0x8914, ifreq), "network", "lo")  # SIOCSIFFLAGS
    os.close(sock)


# -- a private network: only jobs whose plan names pasta get here --------------------------

PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN = 2, 12


def _net_helper(libc: _Libc, plan: list[str]) -> tuple[int, int, int, int] | None:
    """Before the namespaces exist: a child that stays in the host's, and will run pasta
    for the job's network namespace once it exists (see network.py). It dies with this
    process (``PR_SET_PDEATHSIG``). Returns (its pid, go pipe, ready pipe, log), or None
    when the plan has no private network."""
    pasta = _plan_value(plan, "pasta")
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
            argv = [pasta, *_plan_values(plan, "pasta_arg"), "-P", f"/proc/self/fd/{ready_w}"]
            argv += ["--netns", f"/proc/self/fd/{keep[1]}"]
            if _plan_value(plan, "map_uid"):
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


def _connect_network(libc: _Libc, plan: list[str], helper: tuple[int, int, int, int]) -> None:
    """In the job's new namespaces, before any of the job runs: pasta connects the
    namespace while nft installs the rules; return once both are done (pasta writes its
    pid when it is)."""
    pid, go, ready, log = helper
    os.write(go, b"g")
    os.close(go)
    _install_rules(libc, plan)
    started = os.read(ready, 64).strip()  # one write; pasta keeps the pipe open after it
    os.close(ready)
    if not started:
        os.waitpid(pid, 0)
        _fail("network", OSError(0, _log_line(log) or "exited"), "pasta")
    os.close(log)


def _install_rules(libc: _Libc, plan: list[str]) -> None:
    """``nft -f`` the plan's ruleset in this network namespace; nft runs with
    CAP_NET_ADMIN only (ambient: in a user namespace this process is not uid 0)."""
    nft = _plan_value(plan, "nft")
    rules = os.memfd_create("jobworker-nft-rules")
    log = os.memfd_create("jobworker-nft-log")
    os.write(rules, _plan_value(plan, "nft_rules").encode())
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
        _fail("network", OSError(0, _log_line(log) or exited), "nft")
    os.close(log)


def _log_line(log: int) -> str:
    """The last line a network tool wrote (pasta also logs that syslog is missing)."""
    os.lseek(log, 0, os.SEEK_SET)
    lines = [ln for ln in _read_all(log).decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _drop_privileges(libc: _Libc, plan: list[str]) -> None:
    """In the job's process: become the account, with no way back to more power."""
    uid, gid = int(_plan_value(plan, "uid")), int(_plan_value(plan, "gid"))
    groups = [int(g) for g in _plan_value(plan, "groups").split(",") if g]
    os.close(EXIT_FD)
    _limit_processes(libc, plan)
    if uid != 0:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        for cap in range(last_cap + 1):
            libc.prctl(PR_CAPBSET_DROP, cap, "capabilities")
    try:
        if not _plan_value(plan, "map_uid"):  # a user namespace denies setgroups
            os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as err:
        _fail("user", err, str(uid))
    if uid != 0:
        # setresuid cleared the permitted and effective sets; inheritable and ambient stay
        # unless cleared (capset with an all-zero set: version 3, this process).
        header = (libc.ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (libc.ctypes.c_uint32 * 6)()
        libc.check(libc.lib.capset(header, data), "capabilities", "capset")
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "capabilities")
    _own_keyrings(libc, plan)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def _limit_processes(libc: _Libc, plan: list[str]) -> None:
    """RLIMIT_NPROC: the kernel counts the processes of the job's uid (in its user
    namespace), which only this job has, and refuses a fork past the limit."""
    nproc = _plan_value(plan, "nproc")
    if nproc:
        limit = (libc.ctypes.c_ulong * 2)(int(nproc), int(nproc))
        libc.check(libc.lib.setrlimit(RLIMIT_NPROC, limit), "rlimit", nproc)


def _own_keyrings(libc: _Libc, plan: list[str]) -> None:
    """As the job's account: a session keyring of its own, not the server's.

    A dynamic uid's user and user-session keyrings outlive its jobs (the kernel keeps them
    until reboot): empty them, and leave the uid no right to change their permissions, so
    that no job can keep the next job of its uid from emptying them.
    """
    ctypes = libc.ctypes
    number = _KEYCTL.get(os.uname().machine)
    empty = _plan_value(plan, "keyrings") == "empty"
    if number is None:
        if empty:
            _fail("keyring", OSError(38, "Function not implemented"), os.uname().machine)
        return
    if libc.lib.syscall(number, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        if ctypes.get_errno() == 38 and not empty:  # ENOSYS: a kernel without keys
            return
        libc.check(-1, "keyring", "session")
    for ring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING) if empty else ():
        ring_id = ctypes.c_long(ring)
        text = ctypes.create_string_buffer(256)
        size = libc.lib.syscall(number, KEYCTL_DESCRIBE, ring_id, text, ctypes.c_ulong(256))
        libc.check(size, "keyring", "describe")
        # "keyring;UID;GID;PERM;NAME": the uid's first job takes setattr away, once.
        if int(text.value.split(b";")[3], 16) & SETATTR_PERMS:
            perm = ctypes.c_ulong(USER_KEYRING_PERM)
            result = libc.lib.syscall(number, KEYCTL_SETPERM, ring_id, perm)
            libc.check(result, "keyring", "setperm")
        libc.check(libc.lib.syscall(number, KEYCTL_CLEAR, ring_id), "keyring", "clear")
    # As pam_keyinit does for a login: the user keyring reachable from the session, so the
    # keys in it are the job's to use (possessed).
    user, session = ctypes.c_long(KEY_SPEC_USER_KEYRING), ctypes.c_long(KEY_SPEC_SESSION_KEYRING)
    libc.check(libc.lib.syscall(number, KEYCTL_LINK, user, session), "keyring", "link")


def _init(child: int) -> None:
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


def _monitor() -> None:
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
    _init(child)


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


def _decode(payload: bytes) -> list[str]:
    return payload.decode("utf-8", "surrogateescape").split("\0")


def zygote() -> None:
    """``--zygote``: start jobs on request, each as a child of the *server*.

    The server sends, over the socket on fd 0, a 4-byte length with the job's stdout,
    stderr, status and exit-report pipes and its stdin attached (SCM_RIGHTS), then the
    instructions.
    This process is
    single-threaded, so copying it is safe; ``clone(CLONE_PARENT)`` makes the copy the
    server's child, so the server waits for it exactly as for a posix_spawned launcher.
    An isolated job's namespaces are created by that same ``clone``, which makes the copy
    PID 1 of the job's PID namespace at once.
    The reply is the new pid (or minus errno). EOF on the socket ends the zygote.
    """
    import ctypes  # one-time costs: the zygote starts once per server
    import socket
    import struct

    clone_nr = {"x86_64": 56, "aarch64": 220}[os.uname().machine]
    clone_parent, sigchld = 0x00008000, 17
    libc = ctypes.CDLL(None, use_errno=True)
    sock = socket.socket(fileno=0)
    while True:
        header, fds, _flags, _addr = socket.recv_fds(sock, 4, 5, socket.MSG_WAITALL)
        if len(header) < 4:
            return
        (length,) = struct.unpack(">I", header)
        fields = _decode(sock.recv(length, socket.MSG_WAITALL))
        nplan = int(fields[3])
        plan = fields[4 : 4 + nplan]
        flags = int(_plan_value(plan, "ns", "0")) & ~CLONE_NEWCGROUP
        if _plan_value(plan, "pasta"):
            flags = 0  # the launcher's way: its network helper must start outside them
        pid = libc.syscall(clone_nr, clone_parent | sigchld | flags, 0, 0, 0, 0)
        if pid == 0:
            os.setsid()
            for target, fd in zip((1, 2, STATUS_FD, EXIT_FD, STDIN_FD), fds, strict=True):
                os.dup2(fd, target)
            launch(fields, pid1=bool(flags & CLONE_NEWPID))
        for fd in fds:
            os.close(fd)
        sock.sendall(struct.pack(">q", pid if pid > 0 else -ctypes.get_errno()))


def main() -> None:
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        launch(_decode(_read_all(0)))


if __name__ == "__main__":
    main()
