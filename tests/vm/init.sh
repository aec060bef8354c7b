#!/bin/busybox sh
# PID 1 of the jobworker test VM (packed into the initramfs by run_vm.py).
#
# Why it exists: the host mounts cgroups hybrid, so real cgroup v2 limits can only be
# tested in a kernel booted with cgroup_no_v1=all. This init shows the guest the host's
# own filesystem (9p, read-only, with a throw-away tmpfs overlay so writes succeed and
# vanish), mounts a pure cgroup2 hierarchy, runs the job that run_vm.py wrote into the
# results share, records its exit status there and powers off.
#
# A missing status file tells the host that the VM itself failed (not the command),
# so every failure path here ends without writing one.

/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "jobworker-vm init: $*" >&2
    sync
    reboot -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Modules are listed in dependency order by run_vm.py; busybox modprobe is not used
# because busybox depmod orders dependencies differently from kmod.
while read -r m; do
    insmod "/lib/modules/$m" || fail "insmod $m failed"
done </etc/modules.load

P9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /results /host /rw /newroot
mount -t 9p -o "$P9" jwresults /results || fail "cannot mount the results share"
mount -t 9p -o "$P9,ro,cache=loose" hostroot /host || fail "cannot mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
    fail "cannot mount the overlay"

R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $R/sys/fs/cgroup ||
    fail "cannot mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run

# job.sh mounts the writable shares and runs the command in the chroot; see run_vm.py.
. /results/job.sh
rc=$?
echo "$rc" >/results/status.tmp && mv /results/status.tmp /results/status
sync
echo 0 >/proc/sys/kernel/printk # keep "reboot: Restarting system" out of the output
reboot -f
