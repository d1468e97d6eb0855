#!/usr/bin/env bash
# VM tests (issue 5): rtcam's real V4L2 capture path against Debian's vivid driver, in
# qemu-system-x86_64 and qemu-system-aarch64 (TCG, no network). Run by tests/run.sh after the
# aarch64 build (cross/ci-field.sh); see tests/vm/README.md.
#
#   ./tests/vm/run.sh                         both architectures
#   ./tests/vm/run.sh --arch x86_64           one (x86_64 or aarch64)
#
# Binaries: $RTCAM_BIN (default target/release/rtcam) and $RTCAM_ARM_BIN (default
# target/debian-cross/aarch64-unknown-linux-gnu/release/rtcam, from cross/build-debian.sh).
# Installs qemu-system-x86, qemu-system-arm (at the installed qemu-utils' version, from
# bookworm-backports when that is where it came from), busybox-static if missing (root, apt;
# never removing or upgrading a package, see cross/apt.sh); downloads
# Debian's linux-image-*-amd64/-arm64 and busybox-static:arm64 .debs into target/vm/debs.
# Anything missing is an error naming it: these tests never pass by skipping.
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO="$(pwd)"
CACHE="$REPO/target/vm"
VENV_PY="$REPO/target/e2e-venv/bin/python"
RTCAM_BIN="${RTCAM_BIN:-$REPO/target/release/rtcam}"
RTCAM_ARM_BIN="${RTCAM_ARM_BIN:-$REPO/target/debian-cross/aarch64-unknown-linux-gnu/release/rtcam}"
VM_TIMEOUT_S="${VM_TIMEOUT_S:-600}"
started=$SECONDS

arches=()
while (($#)); do
    case "$1" in
        --arch) arches+=("${2:?--arch needs x86_64 or aarch64}"); shift ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "tests/vm/run.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
((${#arches[@]})) || arches=(x86_64 aarch64)

step() { printf '\n==> [vm %ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'tests/vm/run.sh: error: %s\n' "$*" >&2; exit 1; }
die_missing() { printf 'tests/vm/run.sh: MISSING: %s\n' "$*" >&2; exit 1; }

step "system packages"
PKGS=(busybox-static file binutils binutils-aarch64-linux-gnu make gcc-12)
# The test driver modules are cross-compiled for the aarch64 guest (tests/vm/build-modules.sh).
[[ " ${arches[*]} " == *" aarch64 "* ]] && PKGS+=(gcc-12-aarch64-linux-gnu)
# Debian 12's libcamera (0.0.3: vimc pipeline handler, IPA modules, the V4L2 compatibility
# layer v4l2-compat.so, libcamerify from libcamera-tools) and the libraries it links that a build host may lack, for the x86_64
# guest: downloaded and unpacked into the initramfs, not installed.
LIBCAMERA_PKGS=(libcamera0.0.3 libcamera-ipa libcamera-v4l2 libcamera-tools liblttng-ust1 liblttng-ust-common1
    liblttng-ust-ctl5 libnuma1 libdw1 libelf1 libunwind8 libyaml-0-2)
# shellcheck source=cross/apt.sh
. "$REPO/cross/apt.sh"
ensure_packages "${PKGS[@]}"
ensure_qemu_system qemu-system-x86 qemu-system-arm  # at the installed qemu-utils' version
command -v qemu-system-x86_64 >/dev/null || die_missing "qemu-system-x86_64 (package qemu-system-x86)"
command -v qemu-system-aarch64 >/dev/null || die_missing "qemu-system-aarch64 (package qemu-system-arm)"
[[ -x /bin/busybox ]] || die_missing "/bin/busybox (package busybox-static)"
"$VENV_PY" -c 'import av, numpy' 2>/dev/null \
    || die_missing "PyAV and numpy in target/e2e-venv (tests/run.sh creates it from tests/e2e/requirements.txt)"

# Debian's current kernel package for an architecture, e.g. linux-image-6.1.0-56-arm64.
kernel_package() {
    apt-cache depends "linux-image-$1:$1" 2>/dev/null | awk '/Depends: linux-image-/ { sub(/:.*/, "", $2); print $2; exit }'
}

# Downloads a package's .deb into the cache unless a .deb of that package is already there.
fetch_deb() {
    local pkg="$1" arch="$2" name="${1%%:*}"
    if compgen -G "$CACHE/debs/${name}_*_${arch}.deb" >/dev/null; then
        return 0
    fi
    mkdir -p "$CACHE/debs"
    (cd "$CACHE/debs" && apt-get download "$pkg")
}

# Downloads Debian's current kernel .deb for an architecture (replacing an older cached one)
# and prints the package name. Stale package lists may name a kernel the archive no longer
# has: then the lists are refreshed (as root) and the name resolved again, once.
fetch_kernel() {
    local deb_arch="$1" pkg attempt
    for attempt in 1 2; do
        if ((attempt == 2)); then
            [[ "$(id -u)" == 0 ]] || break
            apt-get update >&2
        fi
        pkg="$(kernel_package "$deb_arch")"
        [[ -n "$pkg" ]] || continue
        if ! compgen -G "$CACHE/debs/${pkg}_*_${deb_arch}.deb" >/dev/null; then
            rm -f "$CACHE/debs/linux-image-"*"_${deb_arch}.deb"  # a newer kernel replaces the old
        fi
        fetch_deb "$pkg:$deb_arch" "$deb_arch" >&2 && { echo "$pkg"; return 0; }
    done
    die_missing "Debian's linux-image-$deb_arch kernel .deb (apt-cache depends linux-image-$deb_arch:$deb_arch, apt-get download)"
}

for arch in "${arches[@]}"; do
    case "$arch" in
        x86_64) deb_arch=amd64; bin="$RTCAM_BIN"; what="x86_64 rtcam (cargo build --release)" ;;
        aarch64) deb_arch=arm64; bin="$RTCAM_ARM_BIN"; what="aarch64 rtcam from the field build (cross/build-debian.sh)" ;;
        *) die "unknown architecture $arch (x86_64 or aarch64)" ;;
    esac
    [[ -x "$bin" ]] || die_missing "$what at $bin"
    step "$arch: Debian kernel and busybox packages ($CACHE/debs)"
    if [[ "$deb_arch" == arm64 ]] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
        [[ "$(id -u)" == 0 ]] || die_missing "dpkg architecture arm64 (dpkg --add-architecture arm64; apt-get update)"
        dpkg --add-architecture arm64
        apt-get update
    fi
    pkg="$(fetch_kernel "$deb_arch")"
    if [[ "$deb_arch" != amd64 ]]; then
        fetch_deb "busybox-static:$deb_arch" "$deb_arch" \
            || die_missing "busybox-static:$deb_arch .deb (apt-get download failed)"
    fi
    ls "$CACHE/debs/${pkg}_"*"_$deb_arch.deb" >/dev/null 2>&1 \
        || die_missing "$pkg .deb in $CACHE/debs"
    if [[ "$arch" == x86_64 ]]; then
        step "$arch: Debian's libcamera ($CACHE/debs)"
        for p in "${LIBCAMERA_PKGS[@]}"; do
            fetch_deb "$p:$deb_arch" "$deb_arch" || die_missing "$p:$deb_arch .deb (apt-get download failed)"
        done
    fi
done

# Extracts Debian's libcamera packages for the guest (cached, keyed by the .deb names) and
# prints the directory.
libcamera_root() {
    local deb_arch="$1" root="$CACHE/$1/libcamera" debs=() p f
    for p in "${LIBCAMERA_PKGS[@]}"; do
        f=("$CACHE/debs/${p}_"*"_$deb_arch.deb")
        [[ -f "${f[-1]}" ]] || die_missing "$p:$deb_arch .deb in $CACHE/debs"
        debs+=("${f[-1]}")
    done
    if [[ "$(cat "$root/.from" 2>/dev/null)" != "${debs[*]##*/}" ]]; then
        rm -rf "$root"
        mkdir -p "$root"
        for f in "${debs[@]}"; do dpkg-deb -x "$f" "$root"; done
        echo "${debs[*]##*/}" >"$root/.from"
    fi
    echo "$root"
}

args=()
for arch in "${arches[@]}"; do
    step "$arch: test driver modules (vimc, vicodec, v4l2loopback) for the guest kernel"
    modules="$(tests/vm/build-modules.sh "$arch")"
    case "$arch" in
        x86_64) args+=(--arch x86_64 --rtcam "$RTCAM_BIN" --modules "$modules" --libcamera "$(libcamera_root amd64)") ;;
        aarch64) args+=(--arch aarch64 --rtcam "$RTCAM_ARM_BIN" --modules "$modules" --libcamera none) ;;
    esac
done
step "VM tests: ${arches[*]}"
PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    "$VENV_PY" tests/vm/vmtest.py --cache "$CACHE" --timeout "$VM_TIMEOUT_S" \
    ${VM_ONLY:+--only "$VM_ONLY"} "${args[@]}"
step "VM tests passed in $((SECONDS - started)) s"
