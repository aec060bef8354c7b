"""An isolated job's first process: carries out the isolation plan the server built
(see :mod:`jobworker.backends.local.isolation`): namespaces, the job's filesystem view, an
unprivileged account with no way back. Only jobs with a plan get here; ``ctypes`` is
imported on this path only.
"""

import os

from ._launcher_base import (
    EXIT_FD,
    PR_CAP_AMBIENT,
    Libc,
    fail,
    plan_value,
    plan_values,
)
from ._launcher_net import Network, await_network, connect_network, net_helper
from ._launcher_pid1 import init, relay

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUSER = 0x00020000, 0x02000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 4
RLIMIT_NPROC = 6
_KEYCTL = {"x86_64": 250, "aarch64": 219}  # keyctl(2)'s syscall number
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_SETPERM, KEYCTL_DESCRIBE, KEYCTL_CLEAR = 1, 5, 6, 7
KEYCTL_LINK = 8
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
#: Possessor: all but setattr (the kernel's own default); the uid: view, read, write,
#: search, link, and no setattr.
USER_KEYRING_PERM = 0x1F1F0000
SETATTR_PERMS = 0x20200000  # possessor's and user's


def _write_file(path: str, data: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(data)
    except OSError as err:
        fail("namespace", err, path)


def isolate(plan: list[str], pid1: bool, in_cgroup: bool) -> None:
    """Carry out the plan; return in the job's process, ready to exec (see isolation.py)."""
    libc = Libc()
    flags = int(plan_value(plan, "ns", "0"))
    helper = None if pid1 else net_helper(libc, plan)
    # The PID namespace waits for the rules: nft's process would be its init.
    later = CLONE_NEWPID if helper is not None else 0
    if not pid1:
        # The launcher's way: namespaces for this process, the PID namespace for its child.
        libc.check(libc.lib.unshare(flags & ~CLONE_NEWCGROUP & ~later), "namespace", "unshare")
    if flags & CLONE_NEWUSER:
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"65534 {plan_value(plan, 'map_uid')} 1")
        _write_file("/proc/self/gid_map", f"65534 {plan_value(plan, 'map_gid')} 1")
    network: Network | None = None
    if helper is not None:
        network = connect_network(libc, plan, helper)
        libc.check(libc.lib.unshare(flags & later), "namespace", "unshare")
    if not pid1 and flags & CLONE_NEWPID:
        relay(libc, helper[0] if helper else 0)  # the child goes on as PID 1
    if flags & CLONE_NEWCGROUP:
        # Rooted at the cgroup just joined: the job sees its own cgroup as "/".
        libc.check(libc.lib.unshare(CLONE_NEWCGROUP), "namespace", "cgroup")
    _mount_view(libc, plan, in_cgroup)
    if flags & CLONE_NEWNET:
        _loopback_up(libc)
    if network is not None:
        await_network(network)
    child = os.fork()
    if child == 0:
        _drop_privileges(libc, plan)
        return
    init(child)


def _mount_view(libc: Libc, plan: list[str], in_cgroup: bool) -> None:
    """The job's filesystem: read-only, its own /proc, /tmp and cgroup, the server's hidden."""
    libc.mount("", "/", "", MS_REC | MS_PRIVATE)  # nothing of ours propagates to the host
    libc.set_mount_attrs("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0)
    for path in plan_values(plan, "writable"):
        if os.path.isdir(path):
            libc.mount(path, path, "", MS_BIND | MS_REC)
            libc.set_mount_attrs(path, 0, MOUNT_ATTR_RDONLY)
    libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Cover the host's hierarchy first: cgroup2 cannot be mounted on itself (EBUSY).
    _hide(libc, "/sys/fs/cgroup")
    if in_cgroup:
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
        libc.mount("cgroup2", "/sys/fs/cgroup", "cgroup2", flags)
    for path in plan_values(plan, "hide"):
        _hide(libc, path)
    _private_tmp(libc, plan)


def _private_tmp(libc: Libc, plan: list[str]) -> None:
    """The job's /tmp, /var/tmp and /dev/shm: directories of one tmpfs of the plan's size.

    One tmpfs, not one each: their total is what is bounded. It is mounted on the first
    path, which then gets its own directory bound over the tmpfs's root, so the job sees
    none of the others there.
    """
    paths = [path for path in plan_values(plan, "tmp") if os.path.isdir(path)]
    if not paths:
        return
    size = plan_value(plan, "tmp_size")
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
            fail("mount", err, own)
    # The first path last: its bind covers the tmpfs's root, where the others' are.
    for index in reversed(range(len(paths))):
        libc.mount(f"{base}/{index}", paths[index], "", MS_BIND)


def _hide(libc: Libc, path: str) -> None:
    """Cover ``path`` with something empty and read-only; a path that is not there is hidden."""
    if os.path.isdir(path):
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        libc.mount("tmpfs", path, "tmpfs", flags, "mode=0,size=4k")
    elif os.path.lexists(path):
        libc.mount(os.devnull, path, "", MS_BIND)
        libc.mount("", path, "", MS_REMOUNT | MS_BIND | MS_RDONLY)


def _loopback_up(libc: Libc) -> None:
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


def _drop_privileges(libc: Libc, plan: list[str]) -> None:
    """In the job's process: become the account, with no way back to more power."""
    uid, gid = int(plan_value(plan, "uid")), int(plan_value(plan, "gid"))
    groups = [int(g) for g in plan_value(plan, "groups").split(",") if g]
    os.close(EXIT_FD)
    _limit_processes(libc, plan)
    if uid != 0:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        for cap in range(last_cap + 1):
            libc.prctl(PR_CAPBSET_DROP, cap, "capabilities")
    try:
        if not plan_value(plan, "map_uid"):  # a user namespace denies setgroups
            os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as err:
        fail("user", err, str(uid))
    if uid != 0:
        # setresuid cleared the permitted and effective sets; inheritable and ambient stay
        # unless cleared (capset with an all-zero set: version 3, this process).
        header = (libc.ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (libc.ctypes.c_uint32 * 6)()
        libc.check(libc.lib.capset(header, data), "capabilities", "capset")
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "capabilities")
    _own_keyrings(libc, plan)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def _limit_processes(libc: Libc, plan: list[str]) -> None:
    """RLIMIT_NPROC: the kernel counts the processes of the job's uid (in its user
    namespace), which only this job has, and refuses a fork past the limit."""
    nproc = plan_value(plan, "nproc")
    if nproc:
        limit = (libc.ctypes.c_ulong * 2)(int(nproc), int(nproc))
        libc.check(libc.lib.setrlimit(RLIMIT_NPROC, limit), "rlimit", nproc)


def _own_keyrings(libc: Libc, plan: list[str]) -> None:
    """As the job's account: a session keyring of its own, not the server's.

    A dynamic uid's user and user-session keyrings outlive its jobs (the kernel keeps them
    until reboot): empty them, and leave the uid no right to change their permissions, so
    that no job can keep the next job of its uid from emptying them.
    """
    ctypes = libc.ctypes
    number = _KEYCTL.get(os.uname().machine)
    empty = plan_value(plan, "keyrings") == "empty"
    if number is None:
        if empty:
            fail("keyring", OSError(38, "Function not implemented"), os.uname().machine)
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
