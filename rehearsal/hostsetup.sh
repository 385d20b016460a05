#!/bin/sh
# One rehearsal host's private root, run as PID 1 of the host's new PID, mount and UTS
# namespaces (the network namespace was entered before). Environment:
#   HOSTDIR     the host's directory (upper/ work/ ctl/ root/)
#   HOST_NAME   its hostname
#   WORKROOT    the rehearsal's directory, hidden from the host
#   SHARED      the EFS stand-in directory; EFS_MOUNTS "path:name ..." bind-mounted from it
#   CGROUP      the host's cgroup (v2) as seen from the machine, e.g. /sys/fs/cgroup/unified/...
#   DATA_VOLUME the EBS data volume's mount point, if the host has one: its stand-in is
#               $HOSTDIR/volume, already mounted there as if attached and mounted
# The root is an overlay of the machine's own root filesystem (the installed packages)
# with a private, persistent upper layer: like an instance disk, it survives a kill -9 of
# the host and a "reboot"; /run and /tmp are fresh tmpfs each boot.
set -eu
R="$HOSTDIR/root"
mkdir -p "$R" "$HOSTDIR/upper" "$HOSTDIR/work"
echo 0 > "$CGROUP/init/cgroup.procs"
mount -t overlay overlay -o "lowerdir=/,upperdir=$HOSTDIR/upper,workdir=$HOSTDIR/work" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,size=256m tmpfs "$R/run"
mount -t tmpfs -o mode=1777,size=512m tmpfs "$R/tmp"
mount -t tmpfs -o mode=0755,size=4m tmpfs "$R/dev"
for d in null zero full random urandom tty; do
    touch "$R/dev/$d"
    mount --bind "/dev/$d" "$R/dev/$d"
done
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,size=64m tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mkdir -p "$R/run/rehearsal" "$R/run/lock"
mount --bind "$HOSTDIR/ctl" "$R/run/rehearsal"
for m in $EFS_MOUNTS; do
    path=${m%%:*}
    name=${m#*:}
    mkdir -p "$SHARED/$name" "$R$path"
    mount --bind "$SHARED/$name" "$R$path"
done
if [ -n "${DATA_VOLUME:-}" ]; then
    mkdir -p "$HOSTDIR/volume" "$R$DATA_VOLUME"
    mount --bind "$HOSTDIR/volume" "$R$DATA_VOLUME"
fi
mount --bind "$HOSTDIR/ctl/systemctl" "$R/usr/bin/systemctl"
mkdir -p "$R$WORKROOT"
mount -t tmpfs -o size=1m,mode=0700 tmpfs "$R$WORKROOT"
hostname "$HOST_NAME"
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true
exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    REHEARSAL_CGROUP="/sys/fs/cgroup/${CGROUP#*/unified/}" /usr/bin/python3 /run/rehearsal/hostinit.py
