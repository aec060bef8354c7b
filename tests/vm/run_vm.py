#!/usr/bin/env python3
"""Run one command inside a throw-away QEMU VM whose kernel has pure cgroup v2.

Why: the CI and developer hosts mount cgroups hybrid (cpu, memory, io and pids are bound
to v1 hierarchies), so cgroup v2 limits cannot be enforced or tested on the host. This
script boots Debian's own kernel with ``cgroup_no_v1=all`` under QEMU, shows the guest the
host's ``/`` read-only (with a tmpfs overlay, so writes succeed and vanish), runs the
command there with the given cwd and environment, copies its output to stdout and exits
with its exit status.

Usage::

    python tests/vm/run_vm.py [--timeout S] [--retries N] [--cwd DIR] -- CMD ARGS...

Stdlib only, so it runs before any venv exists. See tests/vm/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INIT_SCRIPT = HERE / "init.sh"

SCRATCH_SERIAL = "jwscratch"
# loglevel=1: only emergencies reach the console, which is the tests' output; the OOM
# killer's lines (KERN_ERR and KERN_WARNING, which "quiet" lets through) stay in dmesg.
KERNEL_CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 cgroup_no_v1=all rdinit=/init"
# Loadable in Debian's kernel and needed before the host root can be mounted.
#: ext4 (and the crc32c it loads at mount): a file system on the scratch disk, for
#: bench_spool_stall.py --io-max.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "overlay",
    "crc32c_generic",
    "ext4",
)
HOST_PACKAGES = ("qemu-system-x86", "busybox-static")
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"

# Exit statuses that mean "the VM failed", not "the command failed".
EXIT_TIMEOUT = 124
EXIT_VM_FAILED = 125

# Host variables copied into the guest when set (besides JOBWORKER_*).
PASS_ENV = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "CI", "PYTEST_ADDOPTS")

_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr: setup and boot take seconds to minutes, stdout is the command's."""
    print(f"[run_vm {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str], cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run a setup command, failing loudly with its output."""
    res = subprocess.run(list(cmd), text=True, capture_output=True, cwd=cwd, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"run_vm: command failed ({res.returncode}): {shlex.join(cmd)}")
    return res.stdout


# --------------------------------------------------------------------------- host setup


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _missing_packages() -> list[str]:
    missing = []
    for pkg in HOST_PACKAGES:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True
        )
        if "install ok installed" not in res.stdout:
            missing.append(pkg)
    return missing


def ensure_host_packages() -> None:
    """Install QEMU and a static busybox (the initramfs needs a static one) if missing."""
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"run_vm: missing packages {missing}; install them as root")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    log(f"installing {' '.join(missing)} (apt-get) ...")
    if subprocess.run(cmd, env=_apt_env(), capture_output=True).returncode != 0:
        log("apt-get install failed; running apt-get update and retrying ...")
        run(["apt-get", "update"], env=_apt_env())
        run(cmd, env=_apt_env())
    log("packages installed")


def kernel_package() -> str:
    """The concrete linux-image-6.*-amd64 package behind the linux-image-amd64 metapackage.

    Only that package is downloaded, never installed: installing it would rebuild the
    host's initrd for nothing.
    """
    for attempt in range(2):
        res = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
        )
        for line in res.stdout.splitlines():
            name = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-6."):
                return name
        if attempt == 0:
            log("no kernel package known to apt; running apt-get update ...")
            run(["apt-get", "update"], env=_apt_env())
    raise SystemExit("run_vm: apt-cache depends linux-image-amd64 names no linux-image-6.*")


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Unpack the ELF kernel from a bzImage so QEMU boots it via PVH (skips ~7 s under TCG)."""
    data = vmlinuz.read_bytes()
    magics: list[tuple[bytes, str]] = [(b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip")]
    for magic, kind in magics:
        pos = data.find(magic)
        while pos != -1:
            try:
                if kind == "xz":
                    elf = lzma.LZMADecompressor().decompress(data[pos:])
                else:
                    elf = gzip.decompress(data[pos:])
            except (lzma.LZMAError, OSError, EOFError):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                tmp = out.with_suffix(".tmp")
                tmp.write_bytes(elf)
                tmp.replace(out)
                return
            pos = data.find(magic, pos + 1)
    raise SystemExit(f"run_vm: no xz/gzip ELF kernel found inside {vmlinuz}")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".gz", ".zst"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def module_load_order(moddir: Path, wanted: Sequence[str]) -> list[str]:
    """Paths (relative to moddir) of the wanted modules and their deps, deps first.

    Reads the modules.dep that busybox depmod wrote; its dependency lists are not in
    load order, so this sorts them itself.
    """
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        paths[_module_name(mod)] = mod
        deps[mod] = rest.split()
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {_module_name(p) for p in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name in paths:
            visit(paths[name])
        elif name not in builtin:
            raise SystemExit(f"run_vm: kernel module {name} not found in {moddir}")
    return order


class Cpio:
    """Minimal newc cpio writer: lets us add /dev/console without mknod and without cpio."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._chunks.append(hdr + b"\0" * (-len(hdr) % 4))
        self._chunks.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(name, stat.S_IFREG | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._add(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def getvalue(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self._chunks)


def prune(cache: Path, root: Path, moddir: Path) -> None:
    """Keep only what a boot needs: the guest modules (with their dependencies) and the
    module index. The rest of the kernel package, and its .deb, is about 450 MB; vmlinux
    was already extracted beside ``root``. A module list that later needs more finds its
    files missing and says to empty the cache."""
    keep = {moddir / rel for rel in module_load_order(moddir, GUEST_MODULES)}
    for path in sorted(root.rglob("*"), reverse=True):  # children before their directory
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif path not in keep and path.parent != moddir:
            path.unlink()
    for deb in cache.glob("linux-image-*.deb"):
        deb.unlink()


def build_initramfs(moddir: Path, out: Path) -> None:
    """Static busybox + init.sh + the few virtio/9p/overlay modules (about 1.5 MB)."""
    order = module_load_order(moddir, GUEST_MODULES)
    cpio = Cpio()
    for d in ("bin", "dev", "etc", "proc", "sys", "lib", "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    names = []
    for rel in order:
        if not (moddir / rel).exists():
            raise SystemExit(
                f"run_vm: {rel} was pruned from the cache; remove {moddir.parents[3]} to rebuild it"
            )
        raw = (moddir / rel).read_bytes()
        if rel.endswith(".xz"):
            raw = lzma.decompress(raw)
        elif rel.endswith(".gz"):
            raw = gzip.decompress(raw)
        elif rel.endswith(".zst"):
            raise SystemExit(f"run_vm: cannot unpack zstd module {rel} with the stdlib")
        name = _module_name(rel) + ".ko"
        cpio.file(f"lib/modules/{name}", raw)
        names.append(name)
    cpio.file("etc/modules.load", "".join(n + "\n" for n in names).encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(cpio.getvalue())
    tmp.replace(out)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise cache setup between concurrent runs."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(cache: Path) -> tuple[Path, Path]:
    """Return (vmlinux, initramfs), building whatever the cache lacks."""
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / ".lock"):
        ensure_host_packages()
        current = cache / "kernel-package"
        pkg = current.read_text().strip() if current.exists() else kernel_package()
        kdir = cache / pkg
        root = kdir / "root"
        pruned = kdir / "pruned"
        if pruned.exists() and pruned.read_text() != repr(GUEST_MODULES):
            # Pruned for another module list: the modules now wanted are gone; start over.
            log("the cache was pruned for other guest modules: unpacking the kernel again ...")
            shutil.rmtree(kdir)
        if not (kdir / "extracted").exists():
            debs = sorted(cache.glob(f"{pkg}_*.deb"))
            if not debs:
                log(
                    f"downloading {pkg} (about 70 MB; the cache keeps about 70 MB: vmlinux, unpacked, and a few modules) ..."
                )
                run(["apt-get", "download", "-o", "APT::Sandbox::User=root", pkg], cwd=cache)
                debs = sorted(cache.glob(f"{pkg}_*.deb"))
            log(f"extracting {debs[-1].name} ...")
            shutil.rmtree(kdir, ignore_errors=True)
            root.mkdir(parents=True)
            run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
            (kdir / "extracted").touch()
        release = pkg.removeprefix("linux-image-")
        moddir = root / "lib" / "modules" / release
        if not (moddir / "modules.dep").exists():
            log("busybox depmod ...")
            run([str(BUSYBOX), "depmod", "-b", str(root), release])
        vmlinux = kdir / "vmlinux"
        if not vmlinux.exists():
            log("extracting the ELF kernel from vmlinuz ...")
            extract_vmlinux(root / "boot" / f"vmlinuz-{release}", vmlinux)
        if not pruned.exists():
            prune(cache, root, moddir)
            pruned.write_text(repr(GUEST_MODULES))
        digest = hashlib.sha256()
        for part in (INIT_SCRIPT.read_bytes(), BUSYBOX.read_bytes(), repr(GUEST_MODULES).encode()):
            digest.update(hashlib.sha256(part).digest())
        initramfs = kdir / f"initramfs-{digest.hexdigest()[:12]}.cpio"
        if not initramfs.exists():
            log("building the initramfs ...")
            for old in kdir.glob("initramfs-*.cpio"):
                old.unlink()
            build_initramfs(moddir, initramfs)
        current.write_text(pkg + "\n")
    return vmlinux, initramfs


# --------------------------------------------------------------------------- the guest job


def guest_path(argv0: str) -> str:
    """Host PATH for the guest, without pyenv's shims and with the real interpreter first.

    pyenv shims are bash scripts that cost seconds each under TCG. A venv's bin/ holds
    plain symlinks to the real interpreter, so it stays, first, so "python" is the venv's.
    """
    first: list[str] = []
    if os.sep in argv0 and os.path.basename(argv0).startswith("python"):
        python = argv0
    elif sys.prefix != sys.base_prefix:  # run_vm.py itself runs from a venv
        python = sys.executable
    else:
        python = ""
    if python:
        first += [os.path.dirname(os.path.abspath(python))]
        first += [os.path.dirname(os.path.realpath(python))]
    host = os.environ.get("PATH", "").split(os.pathsep)
    std = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    out: list[str] = []
    for d in [*first, *host, *std]:
        pyenv_internal = "/.pyenv/" in d and "/.pyenv/versions/" not in d
        if d and d not in out and not pyenv_internal and not d.rstrip("/").endswith("/shims"):
            out.append(d)
    return os.pathsep.join(out)


def guest_env(argv0: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The command's whole environment in the guest (it starts from an empty one)."""
    env = {"HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    for key, val in os.environ.items():
        if key in PASS_ENV or key.startswith("JOBWORKER_"):
            env[key] = val
    env.update(
        PATH=guest_path(argv0),
        JOBWORKER_VM="1",
        JOBWORKER_SCRATCH_SERIAL=SCRATCH_SERIAL,
        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
    )
    env.update(extra)
    return env


def job_script(
    cwd: str, argv: Sequence[str], env: Mapping[str, str], rw_dirs: Sequence[str]
) -> str:
    """Shell text that init.sh sources: mount writable shares, run the command chrooted."""
    lines = []
    for i, d in enumerate(rw_dirs):
        q = shlex.quote("/newroot" + d)
        msg = shlex.quote(f"cannot mount {d}")
        lines.append(f'mkdir -p {q} && mount -t 9p -o "$P9" jwrw{i} {q} || fail {msg}')
    inner = 'cd "$1" || exit 125; shift; exec "$@"'
    env_words = [f"{k}={v}" for k, v in env.items()]
    chroot = ["/bin/busybox", "chroot", "/newroot", "/bin/sh", "-c", inner, "run_vm"]
    words = ["env", "-i", *env_words, *chroot, cwd, *argv]
    # Output goes through a pipe, as under CI, so programs do not see a tty (pytest would
    # redraw progress lines); pipefail keeps the command's status.
    lines.append("set -o pipefail")
    lines.append(shlex.join(words) + " </dev/null 2>&1 | cat")
    return "\n".join(lines) + "\n"


def use_kvm() -> bool:
    """KVM only with a real VMX/SVM module: /dev/kvm here may be nested PVM, which fails."""
    return any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd")) and (
        os.access("/dev/kvm", os.R_OK | os.W_OK)
    )


def _opt(path: object) -> str:
    """A path as a QEMU option value: commas are doubled there."""
    return str(path).replace(",", ",,")


def qemu_command(
    vmlinux: Path, initramfs: Path, rundir: Path, rw_dirs: Sequence[str], cpus: int, memory: str
) -> list[str]:
    """The QEMU command line: PVH boot, 9p host root + results share, virtio-blk scratch."""
    kvm = use_kvm()
    # No i8042 etc.: the guest kernel probes them for seconds under TCG.
    machine = "q35,i8042=off,vmport=off,sata=off,smbus=off"
    p9 = "security_model=none,multidevs=remap"
    opts: list[tuple[str, str]] = [
        ("-accel", "kvm" if kvm else "tcg,thread=multi"),
        ("-cpu", "host" if kvm else "max"),
        ("-machine", machine),
        ("-smp", str(cpus)),
        ("-m", memory),
        ("-display", "none"),
        ("-serial", "stdio"),
        ("-kernel", str(vmlinux)),
        ("-initrd", str(initramfs)),
        ("-append", KERNEL_CMDLINE),
        ("-fsdev", f"local,id=hostroot,path=/,readonly=on,{p9}"),
        ("-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"),
        ("-fsdev", f"local,id=jwresults,path={_opt(rundir / 'results')},{p9}"),
        ("-device", "virtio-9p-pci,fsdev=jwresults,mount_tag=jwresults"),
        ("-drive", f"if=none,id=scratch,format=raw,file={_opt(rundir / 'scratch.img')}"),
        ("-device", f"virtio-blk-pci,drive=scratch,serial={SCRATCH_SERIAL}"),
    ]
    for i, d in enumerate(rw_dirs):
        opts.append(("-fsdev", f"local,id=jwrw{i},path={_opt(d)},{p9}"))
        opts.append(("-device", f"virtio-9p-pci,fsdev=jwrw{i},mount_tag=jwrw{i}"))
    cmd = [QEMU, "-nodefaults", "-no-user-config", "-no-reboot"]
    for flag, value in opts:
        cmd += [flag, value]
    return cmd


def _pump(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy the serial console to stdout, turning the tty's CRLF back into LF."""
    for line in iter(src.readline, b""):
        dst.write(line.replace(b"\r\n", b"\n"))
        dst.flush()


def boot_once(cmd: Sequence[str], rundir: Path, timeout: float, scratch_mib: int) -> int:
    """Boot the VM once; the command's exit status, or EXIT_TIMEOUT/EXIT_VM_FAILED."""
    results = rundir / "results"
    (results / "status").unlink(missing_ok=True)
    with (rundir / "scratch.img").open("wb") as fh:  # a blank disk for every boot
        fh.truncate(scratch_mib * 1024 * 1024)
    start = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    pump = threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer), daemon=True)
    pump.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"VM still running after {timeout:.0f}s: killing QEMU")
        proc.kill()
        proc.wait()
        pump.join(5)
        return EXIT_TIMEOUT
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    pump.join(5)
    status = results / "status"
    if not status.exists():
        log(f"VM exited (QEMU status {proc.returncode}) without the command's exit status")
        return EXIT_VM_FAILED
    rc = int(status.read_text().strip())
    log(f"command exited with status {rc}; VM ran {time.monotonic() - start:.1f}s")
    return rc


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """CLI: options before ``--``, the guest command after it."""
    p = argparse.ArgumentParser(
        prog="run_vm.py",
        description="Run CMD in a throw-away QEMU VM with a pure cgroup v2 kernel.",
        epilog=f"Exits with CMD's status; {EXIT_TIMEOUT} if the VM hung past --timeout, "
        f"{EXIT_VM_FAILED} if it failed to run CMD at all.",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per boot (default 900)")
    p.add_argument("--retries", type=int, default=0, help="extra boots if the VM hangs or fails")
    p.add_argument("--cwd", default=os.getcwd(), help="guest working dir (default: current)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a variable in the guest (repeatable)",
    )
    p.add_argument(
        "--rw",
        action="append",
        default=[],
        metavar="DIR",
        help="host DIR stays writable in the guest, e.g. for reports (repeatable)",
    )
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory", default="2G")
    p.add_argument("--scratch-mib", type=int, default=64, help="size of the scratch disk")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("JOBWORKER_VM_CACHE", REPO / ".vm-cache")),
        help="kernel/initramfs cache (default $JOBWORKER_VM_CACHE or <repo>/.vm-cache)",
    )
    p.add_argument("--prepare-only", action="store_true", help="fill the cache, boot nothing")
    p.add_argument("command", nargs="*", help="command to run in the guest (after --)")
    args = p.parse_args(argv)
    if not args.command and not args.prepare_only:
        p.error("no command given (put it after --)")
    for item in args.env:
        if "=" not in item:
            p.error(f"--env wants KEY=VALUE, got {item!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the cache, boot the VM (retrying hangs), return the command's status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM (e.g. from a CI time limit) must still kill QEMU: make it an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    vmlinux, initramfs = prepare(args.cache_dir.resolve())
    if args.prepare_only:
        log(f"ready: {vmlinux} {initramfs}")
        return 0
    cwd = os.path.abspath(args.cwd)
    rw_dirs = [os.path.abspath(d) for d in args.rw]
    extra = dict(item.split("=", 1) for item in args.env)
    env = guest_env(args.command[0], extra)
    with tempfile.TemporaryDirectory(prefix="jobworker-vm-") as tmp:
        rundir = Path(tmp)
        (rundir / "results").mkdir()
        (rundir / "results" / "job.sh").write_text(job_script(cwd, args.command, env, rw_dirs))
        cmd = qemu_command(vmlinux, initramfs, rundir, rw_dirs, args.cpus, args.memory)
        mode = "KVM" if use_kvm() else "TCG"
        rc = EXIT_VM_FAILED
        for attempt in range(1, args.retries + 2):
            log(
                f"booting VM ({mode}, {args.cpus} vCPU, {args.memory}), attempt {attempt}: "
                f"{shlex.join(args.command)}"
            )
            rc = boot_once(cmd, rundir, args.timeout, args.scratch_mib)
            if (rundir / "results" / "status").exists():
                return rc
        log("giving up: the VM never reported the command's exit status")
        return rc


if __name__ == "__main__":
    sys.exit(main())
