#!/bin/sh
# /init of the stillpoint test guest (PID 1, busybox sh). See docs/test-guest.md.
#
# Per-VM settings come from /etc/stillpoint/, which a small per-VM archive appended to the
# cached initramfs provides:
#   hostname        the VM name
#   disks           how many data disks to wait for
#   agent           "on" or "off"
#   qga-args        extra qemu-ga arguments, one per line
#   fsfreeze-hook   an executable qemu-ga runs with "freeze" / "thaw" (optional)
# Every line this script prints starts with "stillpoint-guest: " so the host can wait for it
# in the serial console log.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
conf=/etc/stillpoint
say() { echo "stillpoint-guest: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -sfn /run /var/run
say "init started, kernel $(uname -r)"

[ -f $conf/hostname ] && hostname "$(cat $conf/hostname)"

# Modules in dependency order (no depmod/modprobe in the guest).
while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module.ko" || say "ERROR: insmod $module failed"
done < /lib/modules/load-order
say "modules loaded"

# Data disks: virtio-blk devices with serial "stillpoint-diskN" are mounted at /data (N=0)
# or /dataN. The serial, not the probe order, decides the mount point.
want=$(cat $conf/disks 2>/dev/null || echo 0)
tries=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt "$want" ] && [ $tries -lt 100 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
mounted=0
for dev in /sys/block/vd*; do
    [ -e "$dev" ] || continue
    name=${dev##*/}
    serial=$(cat "$dev/serial" 2>/dev/null)
    index=${serial#stillpoint-disk}
    case "$index" in
        '' | *[!0-9]*) say "disk $name has serial '$serial', not a data disk, not mounted"; continue ;;
    esac
    if [ "$index" = 0 ]; then mnt=/data; else mnt=/data$index; fi
    mkdir -p "$mnt"
    if mount -t ext4 "/dev/$name" "$mnt"; then
        say "data disk $name ($serial) mounted at $mnt"
        mounted=$((mounted + 1))
    else
        say "ERROR: cannot mount /dev/$name ($serial) at $mnt"
    fi
done
if [ "$mounted" -eq "$want" ]; then
    say "data disks mounted ($mounted)"
else
    say "ERROR: $mounted of $want data disks mounted"
fi

# No udev: name the virtio serial ports the way udev would.
tries=0
while :; do
    for port in /sys/class/virtio-ports/*; do
        [ -f "$port/name" ] || continue
        mkdir -p /dev/virtio-ports
        ln -sfn "../${port##*/}" "/dev/virtio-ports/$(cat "$port/name")"
    done
    [ "$(cat $conf/agent 2>/dev/null)" = off ] && break
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && break
    [ $tries -ge 100 ] && { say "ERROR: no virtio port org.qemu.guest_agent.0"; break; }
    sleep 0.1
    tries=$((tries + 1))
done

if [ "$(cat $conf/agent 2>/dev/null)" = off ]; then
    say "agent disabled"
    say "ready"
    while :; do sleep 3600; done
fi

set -- -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -f /run/qemu-ga.pid -t /run
if [ -x $conf/fsfreeze-hook ]; then
    # qemu-ga's option takes its argument only in the attached form.
    set -- "$@" "--fsfreeze-hook=$conf/fsfreeze-hook"
    say "fsfreeze hook installed at $conf/fsfreeze-hook"
fi
if [ -f $conf/qga-args ]; then
    while IFS= read -r arg; do set -- "$@" "$arg"; done < $conf/qga-args
fi
say "ready"
while :; do
    say "qemu-ga starting: qemu-ga $*"
    qemu-ga "$@"
    say "qemu-ga exited with status $?, restarting in 1 s"
    sleep 1
done
