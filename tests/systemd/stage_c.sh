#!/bin/sh
# Stage C: build the machine's root inside the private mount namespace, then exec systemd as PID 1.
# Invariant: systemd starts only on an overlayfs root with a tmpfs /tmp, so nothing it cleans
# (systemd-tmpfiles empties /tmp) or remounts can reach the host.
set -eu
die() { echo "stage_c: $*" >&2; exit 70; }

state=$MACHINE_STATE
layer=$state/layer
root=$layer/root

mount --make-rprivate /
mkdir -p "$layer"
mount -t tmpfs -o mode=0755 machine-layer "$layer"
mkdir "$layer/upper" "$layer/work" "$root"
# Our files go into the upper layer up front: a lower layer inside the host's / would overlap it (ELOOP).
IFS=:
for tree in $MACHINE_LAYERS; do
    cp -a "$tree/." "$layer/upper/"
done
unset IFS
chown --reference=/ "$layer/upper"  # the upper layer's root is the new root: keep the real one's owner and mode
chmod --reference=/ "$layer/upper"
mount -t overlay -o "lowerdir=/,upperdir=$layer/upper,workdir=$layer/work" overlay "$root"
[ "$(stat -f -c %T "$root")" = overlayfs ] || die "new root is not an overlayfs"

mount -t proc proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"

dev=$root/dev
mount -t tmpfs -o mode=0755,nosuid machine-dev "$dev"
mknod -m 666 "$dev/null" c 1 3
mknod -m 666 "$dev/zero" c 1 5
mknod -m 666 "$dev/full" c 1 7
mknod -m 666 "$dev/random" c 1 8
mknod -m 666 "$dev/urandom" c 1 9
mknod -m 666 "$dev/tty" c 5 0
mkdir -m 0755 "$dev/pts"
mkdir -m 1777 "$dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$dev/pts"
ln -s pts/ptmx "$dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev machine-shm "$dev/shm"
ln -s /proc/self/fd "$dev/fd"
ln -s /proc/self/fd/0 "$dev/stdin"
ln -s /proc/self/fd/1 "$dev/stdout"
ln -s /proc/self/fd/2 "$dev/stderr"
touch "$dev/console"
mount --bind "$state/console.log" "$dev/console"

mount -t tmpfs -o mode=0755,nosuid,nodev machine-run "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev machine-tmp "$root/tmp"

systemd-id128 new > "$root/etc/machine-id"
hostname "$MACHINE_NAME"
echo "$MACHINE_NAME" > "$root/etc/hostname"

mkdir -p "$root/etc/systemd/journald.conf.d"
cat > "$root/etc/systemd/journald.conf.d/machine.conf" <<CONF
[Journal]
Storage=volatile
RateLimitBurst=0
RateLimitIntervalSec=0
CONF
cat > "$root/etc/systemd/system/machine.target" <<UNIT
[Unit]
Description=Throwaway test machine
Requires=sysinit.target
After=sysinit.target
Wants=systemd-journald.service dbus.socket
UNIT
for unit in systemd-hwdb-update.service ldconfig.service systemd-timesyncd.service \
        apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

cd "$root"
mkdir .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot
[ "$(stat -f -c %T /)" = overlayfs ] || die "/ is not an overlayfs after pivot_root"
[ "$(stat -f -c %T /tmp)" = tmpfs ] || die "/tmp is not a tmpfs after pivot_root"
# As systemd-nspawn does: services' mount namespaces must see mounts PID 1 makes later, and PID 1 those a
# unit's helper moves into /run (LoadCredential= does). New peer groups: the host's mounts are not in them.
mount --make-rshared /

exec setpriv --bounding-set \
    -sys_module,-sys_time,-sys_rawio,-wake_alarm,-block_suspend,-syslog,-mac_admin,-mac_override,-sys_pacct,-audit_control,-audit_read \
    env -i container="$MACHINE_NAME" /lib/systemd/systemd --unit=machine.target
