#!/usr/bin/env bash
# The Debian package under a real systemd (issue 12): boots a Debian 12 guest (systemd as
# PID 1, Debian's kernel with vivid) in qemu-system-x86_64 under TCG, installs the amd64 .deb
# and mosquitto there with the guest's own apt, starts rtcam.service and checks it from the
# host through qemu's user-mode network (hostfwd on 127.0.0.1 only; the guest reaches nothing
# else): READY, the watchdog, journald fields, a viewer getting vivid's picture, `offline` on
# stop, `systemd-analyze security`. See README.md here.
#
#   ./tests/vm/systemd/run.sh
#
# The .deb: $RTCAM_DEB (default: target/debian-cross/deb/rtcam_*_amd64.deb, which
# cross/ci-field.sh builds). As root it installs debootstrap, qemu-system-x86 (cross/apt.sh:
# nothing installed is removed or upgraded) and openssh-client if missing, and builds the guest
# image once into target/vm/systemd (debootstrap from deb.debian.org; rebuilt when this
# script's image recipe changes). A missing piece is an error naming it.
set -euo pipefail

cd "$(dirname "$0")/../../.."
REPO="$(pwd)"
HERE="$REPO/tests/vm/systemd"
CACHE="$REPO/target/vm/systemd"
VENV_PY="$REPO/target/e2e-venv/bin/python"
MIRROR="${RTCAM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
started=$SECONDS

step() { printf '\n==> [systemd-vm %ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'tests/vm/systemd/run.sh: error: %s\n' "$*" >&2; exit 1; }
die_missing() { printf 'tests/vm/systemd/run.sh: MISSING: %s\n' "$*" >&2; exit 1; }

step "host packages"
# shellcheck source=cross/apt.sh
. "$REPO/cross/apt.sh"
ensure_packages debootstrap openssh-client e2fsprogs
ensure_qemu_system qemu-system-x86
command -v qemu-system-x86_64 >/dev/null || die_missing "qemu-system-x86_64 (package qemu-system-x86)"
"$VENV_PY" -c 'import aiortc, av, numpy, paho.mqtt' 2>/dev/null \
    || die_missing "aiortc, PyAV, numpy, paho-mqtt in target/e2e-venv (tests/run.sh creates it)"
if [[ -z "${RTCAM_DEB:-}" ]]; then
    RTCAM_DEB="$(ls -t "$REPO"/target/debian-cross/deb/rtcam_*_amd64.deb 2>/dev/null | head -1 || true)"
fi
[[ -n "$RTCAM_DEB" && -f "$RTCAM_DEB" ]] \
    || die_missing "the amd64 .deb (cross/ci-field.sh builds target/debian-cross/deb/rtcam_*_amd64.deb; or set RTCAM_DEB)"

# --- The guest image: Debian 12 minbase + systemd + kernel + sshd, mosquitto's .debs cached ---
# Everything that shapes the image is in this block; its hash names the cached image.
GUEST_PACKAGES=systemd,systemd-sysv,udev,kmod,dbus,openssh-server,linux-image-amd64,initramfs-tools,adduser,procps,iproute2
# The guest later installs these with its own apt, from its cache, offline.
GUEST_DOWNLOADS=(mosquitto)
VIVID_OPTIONS="n_devs=1 node_types=0x1 num_inputs=1 input_types=0x0 vid_cap_nr=0 no_error_inj=1"
build_image() { # $1: empty directory for the root file system
    local root="$1"
    debootstrap --variant=minbase --include="$GUEST_PACKAGES" bookworm "$root" "$MIRROR"
    echo rtcam-vm >"$root/etc/hostname"
    echo '/dev/vda / ext4 defaults 0 1' >"$root/etc/fstab"
    mkdir -p "$root/etc/systemd/network" "$root/root/.ssh"
    printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' >"$root/etc/systemd/network/80-dhcp.network"
    chroot "$root" systemctl enable systemd-networkd.service
    echo vivid >"$root/etc/modules-load.d/vivid.conf"
    echo "options vivid $VIVID_OPTIONS" >"$root/etc/modprobe.d/vivid.conf"
    cp "$CACHE/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
    chmod 700 "$root/root/.ssh"
    # Downloaded by the guest's apt now, installed by it later without a network.
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" apt-get install -y --download-only --no-install-recommends "${GUEST_DOWNLOADS[@]}"
    rm -f "$root/etc/resolv.conf"
    # No apt timers or man-db work in a throwaway guest.
    chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
}
image_key="$(printf '%s\n' "$GUEST_PACKAGES" "${GUEST_DOWNLOADS[*]}" "$VIVID_OPTIONS" "$(declare -f build_image)" | sha256sum | cut -c1-16)"
if [[ "$(cat "$CACHE/image.key" 2>/dev/null || true)" != "$image_key" ]]; then
    [[ "$(id -u)" == 0 ]] || die "building the guest image needs root (debootstrap, chroot)"
    step "building the guest image (debootstrap bookworm from $MIRROR; cached in $CACHE)"
    rm -rf "$CACHE"
    mkdir -p "$CACHE"
    ssh-keygen -q -t ed25519 -N '' -C rtcam-vm-test -f "$CACHE/id_ed25519"
    root="$CACHE/rootfs"
    build_image "$root"
    cp "$(ls "$root"/boot/vmlinuz-* | tail -1)" "$CACHE/vmlinuz"
    cp "$(ls "$root"/boot/initrd.img-* | tail -1)" "$CACHE/initrd.img"
    du -sh "$root"
    truncate -s 3G "$CACHE/base.img"
    mkfs.ext4 -q -F -L rtcam-vm -d "$root" "$CACHE/base.img"
    rm -rf "$root"
    echo "$image_key" >"$CACHE/image.key"
fi
[[ -f "$CACHE/base.img" && -f "$CACHE/vmlinuz" && -f "$CACHE/initrd.img" ]] || die "incomplete image in $CACHE"

step "the test: $(basename "$RTCAM_DEB")"
# In a private network namespace holding only `lo`: qemu's user-mode network, its hostfwd
# ports, ssh and the viewer all live on that loopback, and nothing from the guest can leave it.
unshare_args=(-n)
[[ "$(id -u)" == 0 ]] || unshare_args=(-r -n)
PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 unshare "${unshare_args[@]}" -- bash -c \
    'ip link set lo up && exec "$@"' bash \
    "$VENV_PY" "$HERE/systemd_vm.py" --cache "$CACHE" --deb "$RTCAM_DEB" --timeout "${SYSTEMD_VM_TIMEOUT_S:-900}"
step "systemd VM test passed in $((SECONDS - started)) s"
