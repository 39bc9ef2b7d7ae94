#!/usr/bin/env bash
# Build the pmigrate test guest: a Debian cloud kernel plus a tiny initramfs
# (busybox + the page-verifying workload from workload.c).
#
# Output (default tests/guest/out/, or $PMIGRATE_GUEST_DIR):
#   vmlinuz            the kernel
#   initramfs.cpio.gz  busybox, /init, /bin/pmw-workload
#   kernel-version     the Debian package the kernel came from
#
# Idempotent and cached: does nothing when the outputs exist and are newer
# than this script and workload.c.  Safe to run concurrently (flock).
# Needs only Debian's apt repositories; installs missing build packages with
# apt-get when run as root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${PMIGRATE_GUEST_DIR:-$here/out}"
script="$here/build.sh"
src="$here/workload.c"

log() { echo "guest-build: $*" >&2; }
die() { echo "guest-build: error: $*" >&2; exit 1; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"

# One build at a time (parallel test processes may all call us).
exec 9>"$out/.lock"
flock 9

# fresh FILE DEPS...: FILE exists and is newer than every DEP
fresh() {
    local f="$1"; shift
    [[ -s "$f" ]] || return 1
    local d
    for d in "$@"; do
        [[ "$f" -nt "$d" ]] || return 1
    done
}

if fresh "$out/vmlinuz" "$script" && fresh "$out/initramfs.cpio.gz" "$script" "$src"; then
    exit 0
fi

# ---------------------------------------------------------------- packages
need_pkgs=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for p in busybox-static cpio gzip gcc libc6-dev; do
    have_pkg "$p" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing packages ${need_pkgs[*]} (run as root or install them)"
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${need_pkgs[@]}" >&2
    fi
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/pmw-guest.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# ------------------------------------------------------------------ kernel
if ! fresh "$out/vmlinuz" "$script"; then
    meta=linux-image-cloud-amd64
    resolve() {
        apt-cache depends "$meta" 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }'
    }
    kpkg="$(resolve || true)"
    if [[ -z "$kpkg" ]]; then
        [[ $(id -u) -eq 0 ]] || die "apt-cache knows no $meta; run apt-get update as root"
        log "apt-cache does not know $meta; running apt-get update"
        apt-get update -q >&2
        kpkg="$(resolve || true)"
    fi
    [[ -n "$kpkg" ]] || die "cannot resolve the kernel package behind $meta"
    kver="$(apt-cache show "$kpkg" | awk '/^Version:/ { print $2; exit }')"
    log "downloading $kpkg ($kver)"
    mkdir -p "$tmp/deb"
    # apt's _apt sandbox user cannot write into a private mktemp dir.
    (cd "$tmp/deb" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >&2)
    deb="$(ls "$tmp"/deb/*.deb)"
    dpkg-deb -x "$deb" "$tmp/kernel"
    vmlinuz="$(ls "$tmp"/kernel/boot/vmlinuz-* | head -n1)"
    [[ -f "$vmlinuz" ]] || die "no boot/vmlinuz-* in $deb"
    # Everything the guest needs is built in on Debian's cloud kernel: 8250
    # serial console, initramfs (gzip), devtmpfs, proc, sysfs.  Check it so a
    # future kernel that moves one of them into a module fails loudly here.
    config="$(ls "$tmp"/kernel/boot/config-* | head -n1)"
    for opt in CONFIG_SERIAL_8250 CONFIG_SERIAL_8250_CONSOLE CONFIG_BLK_DEV_INITRD \
               CONFIG_RD_GZIP CONFIG_DEVTMPFS CONFIG_PROC_FS CONFIG_SYSFS; do
        grep -qx "$opt=y" "$config" || die "$kpkg: $opt is not built in"
    done
    cp "$vmlinuz" "$out/vmlinuz.tmp"
    mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
    echo "$kpkg $kver" >"$out/kernel-version"
    log "kernel: $(basename "$vmlinuz")"
fi

# --------------------------------------------------------------- initramfs
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,root,etc}
cp /bin/busybox "$root/bin/busybox"
file_out="$(file -b "$root/bin/busybox" 2>/dev/null || true)"
[[ -z "$file_out" || "$file_out" == *static* ]] || die "/bin/busybox is not static ($file_out)"
for applet in sh mount mkdir sleep cat echo; do
    ln -s busybox "$root/bin/$applet"
done

log "compiling workload"
gcc -static -O2 -Wall -Wextra -o "$root/bin/pmw-workload" "$src"
strip "$root/bin/pmw-workload" 2>/dev/null || true

# The kernel opens /dev/console for init before anything is mounted.
if [[ $(id -u) -eq 0 ]]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
fi

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# pmigrate test guest init (PID 1): must never exit.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin 2>/dev/null
exec </dev/console >/dev/console 2>&1
echo "PMW boot"
/bin/pmw-workload &
wait $!
echo "PMW FATAL workload exited rc=$?"
while :; do sleep 3600; done
EOF
chmod 755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --quiet -R 0:0 | gzip -6 -n) >"$out/initramfs.cpio.gz.tmp"
mv -f "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
# The initramfs must be newer than the kernel's own inputs too.
touch "$out/initramfs.cpio.gz"
log "done: $out/vmlinuz $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1))"
