#!/bin/sh
# Builds the Debian root that every test slot image starts from: a
# bookworm minbase with systemd, D-Bus and the cloud kernel, trimmed.
# Usage: base.sh OUT-DIR MIRROR   (OUT-DIR must not exist; needs root)
# The builder caches the result keyed by this file's hash.
set -eu
out=$1
mirror=$2
packages=systemd,systemd-sysv,udev,dbus,kmod,initramfs-tools,linux-image-cloud-amd64,e2fsprogs,procps,cryptsetup-bin
mkdir -p "$out/etc/initramfs-tools/conf.d"
# Only the drivers a q35 VM with virtio disks needs in the initrd.
echo "MODULES=list" > "$out/etc/initramfs-tools/conf.d/tandem.conf"
printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic dm_mod dm_verity > "$out/etc/initramfs-tools/modules"
debootstrap --variant=minbase --include="$packages" bookworm "$out" "$mirror"
# dm-verity in the initrd, for the ACL-layout images: a hook that brings
# veritysetup, and a local-top script that opens the slot named by
# systemd.verity_usr_data=/systemd.verity_usr_hash=/usrhash= (ACL's
# arguments) as /dev/mapper/usr. Debian's initramfs-tools has no systemd
# in the initrd, so this stands in for systemd-veritysetup-generator.
mkdir -p "$out/etc/initramfs-tools/hooks" "$out/etc/initramfs-tools/scripts/local-top"
cat > "$out/etc/initramfs-tools/hooks/tandem-verity" <<'HOOK'
#!/bin/sh
case $1 in prereqs) exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
copy_exec /usr/sbin/veritysetup /sbin
HOOK
cat > "$out/etc/initramfs-tools/scripts/local-top/tandem-verity" <<'TOP'
#!/bin/sh
case $1 in prereqs) exit 0;; esac
. /scripts/functions
data=; hash=; roothash=
for arg in $(cat /proc/cmdline); do
    case $arg in
        systemd.verity_usr_data=PARTUUID=*) data=${arg#*PARTUUID=};;
        systemd.verity_usr_hash=PARTUUID=*) hash=${arg#*PARTUUID=};;
        usrhash=*) roothash=${arg#usrhash=};;
    esac
done
[ -n "$data" ] || exit 0
modprobe dm_verity
i=0
while [ ! -e "/dev/disk/by-partuuid/$data" ] || [ ! -e "/dev/disk/by-partuuid/$hash" ]; do
    i=$((i + 1)); [ $i -gt 20 ] && panic "dm-verity: no partition $data or $hash"
    sleep 1
done
veritysetup open "/dev/disk/by-partuuid/$data" usr "/dev/disk/by-partuuid/$hash" "$roothash" \
    || panic "dm-verity: cannot open $data with root hash $roothash"
TOP
chmod 755 "$out/etc/initramfs-tools/hooks/tandem-verity" "$out/etc/initramfs-tools/scripts/local-top/tandem-verity"
# Before the trim below, which removes /boot/config-* (mkinitramfs reads it).
chroot "$out" update-initramfs -u -k all
# Trim what a test node never reads: docs, locales, the hardware
# database, and every kernel module but virtio, block, ext4/vfat and their
# helpers.
rm -rf "$out"/usr/share/doc/* "$out"/usr/share/man/* "$out"/usr/share/locale/* \
    "$out"/usr/share/info/* "$out"/var/cache/apt/* "$out"/var/lib/apt/lists/* \
    "$out"/usr/lib/udev/hwdb.d "$out"/usr/lib/udev/hwdb.bin \
    "$out"/boot/System.map-* "$out"/boot/config-*
for modules in "$out"/usr/lib/modules/*; do
    (cd "$modules/kernel" && find . -name '*.ko*' \
        ! -path './drivers/virtio/*' ! -path './drivers/block/*' \
        ! -path './drivers/char/*' ! -path './fs/ext4/*' ! -path './fs/jbd2/*' \
        ! -path './fs/mbcache*' ! -path './fs/fat/*' ! -path './fs/nls/*' \
        ! -path './crypto/*' ! -path './lib/*' ! -path './drivers/md/*' -delete)
    find "$modules/kernel" -type d -empty -delete
    chroot "$out" depmod "$(basename "$modules")"
done
