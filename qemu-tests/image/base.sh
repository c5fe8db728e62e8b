#!/bin/sh
# Builds the Debian root that every test slot image starts from: a
# bookworm minbase with systemd, D-Bus and the cloud kernel, trimmed.
# Usage: base.sh OUT-DIR MIRROR   (OUT-DIR must not exist; needs root)
# The builder caches the result keyed by this file's hash.
set -eu
out=$1
mirror=$2
packages=systemd,systemd-sysv,udev,dbus,kmod,initramfs-tools,linux-image-cloud-amd64,e2fsprogs,procps
mkdir -p "$out/etc/initramfs-tools/conf.d"
# Only the drivers a q35 VM with virtio disks needs in the initrd.
echo "MODULES=list" > "$out/etc/initramfs-tools/conf.d/tandem.conf"
printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic > "$out/etc/initramfs-tools/modules"
debootstrap --variant=minbase --include="$packages" bookworm "$out" "$mirror"
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
        ! -path './crypto/*' ! -path './lib/*' -delete)
    find "$modules/kernel" -type d -empty -delete
    chroot "$out" depmod "$(basename "$modules")"
done
