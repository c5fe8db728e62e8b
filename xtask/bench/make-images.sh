#!/bin/bash
# Builds the benchmark's image pair: a container-host root debootstrapped from
# Debian bookworm (old.img) and the same tree after a real upgrade from
# bookworm-security and bookworm-updates, old kernel removed (new.img).
# Both trees are made into two pairs: deterministic `mkfs.ext4 -d` images
# (old.img, new.img) and erofs images compressed with lz4hc level 12, as
# Azure Container Linux builds its /usr (old.erofs, new.erofs). The images
# of a pair have the same size, as two A/B partitions would.
#
# Usage: make-images.sh CACHE_DIR        (needs root, debootstrap, mkfs.erofs,
# network to the Debian mirror). Results are cached: the trees are kept in
# CACHE_DIR/trees, and an existing image pair is kept.
set -euo pipefail

cache=${1:?usage: make-images.sh CACHE_DIR}
mirror=${TANDEM_BENCH_MIRROR:-http://deb.debian.org/debian}
security=${TANDEM_BENCH_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
export SOURCE_DATE_EPOCH=1700000000 E2FSPROGS_FAKE_TIME=1700000000
fs_uuid=6b8f1c2e-3d4a-4b5c-9e6f-7a8b9c0d1e2f
hash_seed=0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0
packages=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,
packages+=containerd,runc,iptables,nftables,openssh-server,ca-certificates,
packages+=iproute2,conntrack,ethtool,socat,ebtables,e2fsprogs,xfsprogs,
packages+=curl,openssl,python3,perl,tzdata,less,procps,sudo,nfs-common,
packages+=cifs-utils,chrony,lvm2,cryptsetup-bin,jq,rsync,zstd

if [[ -f $cache/old.img && -f $cache/new.img && -f $cache/old.erofs && -f $cache/new.erofs ]]; then
    echo "bench images: cached in $cache"
    exit 0
fi
mkdir -p "$cache"
work=$cache/trees
mounted=()
cleanup() {
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
make_trees() {
rm -rf "$work"
mkdir -p "$work"

echo "bench images: debootstrap bookworm (old tree)"
debootstrap --variant=minbase --include="$packages" bookworm "$work/old" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log"; exit 1; }

echo "bench images: copying the tree and upgrading it from bookworm-security and bookworm-updates"
cp -a "$work/old" "$work/new"
new=$work/new
cat >"$new/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
SOURCES
printf '#!/bin/sh\nexit 101\n' >"$new/usr/sbin/policy-rc.d"
chmod +x "$new/usr/sbin/policy-rc.d"
mount -t proc proc "$new/proc"; mounted+=("$new/proc")
mount --bind /dev "$new/dev"; mounted+=("$new/dev")
old_kernels=$(chroot "$new" dpkg-query -W -f '${Package}\n' 'linux-image-[0-9]*')
chroot "$new" apt-get -qq update
DEBIAN_FRONTEND=noninteractive chroot "$new" apt-get -y -q \
    -o Dpkg::Options::=--force-confold dist-upgrade >"$work/upgrade.log" 2>&1 \
    || { tail -30 "$work/upgrade.log"; exit 1; }
new_kernels=$(chroot "$new" dpkg-query -W -f '${Package}\n' 'linux-image-[0-9]*')
for k in $old_kernels; do
    if [[ $(echo "$new_kernels" | wc -l) -gt 1 ]]; then
        echo "bench images: removing the old kernel $k"
        DEBIAN_FRONTEND=noninteractive chroot "$new" apt-get -y -q purge "$k" >>"$work/upgrade.log" 2>&1
    fi
done
chroot "$new" apt-get clean
cleanup; mounted=()
rm -f "$new/usr/sbin/policy-rc.d"

for tree in old new; do
    t=$work/$tree
    rm -rf "$t"/var/cache/apt/*.bin "$t"/var/lib/apt/lists/* "$t"/var/log/* "$t"/tmp/*
    chroot "$t" dpkg-query -W -f '${Package} ${Version}\n' >"$cache/$tree.packages"
done
diff "$cache/old.packages" "$cache/new.packages" >"$cache/changed.packages" || true
echo "bench images: $(grep -c '^>' "$cache/changed.packages") packages changed"
rm -f "$work"/*.log
touch "$work/complete"
}
[[ -f $work/complete ]] || make_trees

# Both images of a pair get the same size, as two A/B partitions would.
if [[ ! -f $cache/old.img || ! -f $cache/new.img ]]; then
    kib=$(du -s --apparent-size -k "$work/old" "$work/new" | awk '{ if ($1 > m) m = $1 } END { print m }')
    size_mib=$(( (kib * 13 / 10 / 1024 + 63) / 64 * 64 ))
    for tree in old new; do
        rm -f "$cache/$tree.img.part"
        mkfs.ext4 -q -F -b 4096 -L usr -U "$fs_uuid" -E "hash_seed=$hash_seed,root_owner=0:0,nodiscard" \
            -d "$work/$tree" "$cache/$tree.img.part" "${size_mib}M"
    done
    mv "$cache/old.img.part" "$cache/old.img"
    mv "$cache/new.img.part" "$cache/new.img"
    echo "bench images: $cache/old.img and $cache/new.img (${size_mib} MiB each)"
fi
if [[ ! -f $cache/old.erofs || ! -f $cache/new.erofs ]]; then
    for tree in old new; do
        rm -f "$cache/$tree.erofs.part"
        mkfs.erofs --quiet -zlz4hc,12 -T "$SOURCE_DATE_EPOCH" -U "$fs_uuid" \
            "$cache/$tree.erofs.part" "$work/$tree"
    done
    bytes=$(stat -c %s "$cache/old.erofs.part" "$cache/new.erofs.part" | sort -n | tail -1)
    bytes=$(( (bytes + 1048575) / 1048576 * 1048576 ))
    for tree in old new; do
        truncate -s "$bytes" "$cache/$tree.erofs.part"
    done
    mv "$cache/old.erofs.part" "$cache/old.erofs"
    mv "$cache/new.erofs.part" "$cache/new.erofs"
    echo "bench images: $cache/old.erofs and $cache/new.erofs ($(( bytes / 1048576 )) MiB each, lz4hc level 12)"
fi
