#!/usr/bin/env bash
# Field-deployment checks (issue 4), run by tests/run.sh after the end-to-end tests:
#   1. the device config config/rtcam.toml passes `rtcam check-config`;
#   2. packaging/rtcam.service passes `systemd-analyze verify` (when systemd is installed);
#   3. yocto/meta-rtcam's crate list matches Cargo.lock;
#   4. aarch64 cross build with Debian's toolchain + unit tests under qemu (build-debian.sh);
#   5. .deb packages for arm64 (that build) and amd64 ($RTCAM_BIN, default
#      target/release/rtcam) with a pinned cargo-deb; prints their contents.
#
#   ./cross/ci-field.sh
#
# Needs root on a fresh Debian 12 machine (installs its apt packages). Uses Debian's cargo
# (/usr/bin/cargo) and its own target dirs: target/debian-cross, target/tools (cargo-deb).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
CARGO_DEB_VERSION=3.8.0
TOOLS="$REPO/target/tools"
OUT="$REPO/target/debian-cross/deb"
RTCAM_BIN="${RTCAM_BIN:-$REPO/target/release/rtcam}"
SYSROOT=/usr/aarch64-linux-gnu
started=$SECONDS

step() { printf '\n==> [field %ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'ci-field.sh: error: %s\n' "$*" >&2; exit 1; }

step "system packages"
PKGS=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
    libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-user-static libclang-dev file
    dpkg-dev python3 build-essential)
# shellcheck source=cross/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
ensure_packages "${PKGS[@]}"

step "yocto/meta-rtcam crate list vs Cargo.lock"
python3 yocto/update-crates.py --check

step "systemd-analyze verify packaging/rtcam.service"
if command -v systemd-analyze >/dev/null; then
    # The unit runs /usr/bin/rtcam, which is not installed here; verify a copy whose ExecStart
    # is an existing executable, so only the unit itself is judged.
    unit_dir="$(mktemp -d)"
    trap 'rm -rf "$unit_dir"' EXIT
    sed "s#/usr/bin/rtcam#/bin/true#" packaging/rtcam.service >"$unit_dir/rtcam.service"
    systemd-analyze verify "$unit_dir/rtcam.service"
else
    echo "systemd-analyze not installed; skipped"
fi

step "aarch64 cross build and unit tests (cross/build-debian.sh)"
./cross/build-debian.sh
ARM_BIN="$REPO/target/debian-cross/aarch64-unknown-linux-gnu/release/rtcam"

step "rtcam check-config --config config/rtcam.toml (aarch64 under qemu, and $RTCAM_BIN)"
qemu-aarch64-static "$SYSROOT/lib/ld-linux-aarch64.so.1" --library-path "$SYSROOT/lib" "$ARM_BIN" check-config --config config/rtcam.toml >/dev/null
echo "aarch64: config/rtcam.toml OK"
[[ -x "$RTCAM_BIN" ]] || die "no x86 rtcam at $RTCAM_BIN (cargo build --release, or set RTCAM_BIN)"
"$RTCAM_BIN" check-config --config config/rtcam.toml
echo "x86_64: config/rtcam.toml OK"

step "cargo-deb $CARGO_DEB_VERSION (target/tools)"
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO=/usr/bin/cargo
unset RUSTUP_TOOLCHAIN
if ! "$TOOLS/bin/cargo-deb" --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    CARGO_TARGET_DIR="$REPO/target/tools/build" /usr/bin/cargo install --locked \
        --version "$CARGO_DEB_VERSION" --root "$TOOLS" cargo-deb
fi
"$TOOLS/bin/cargo-deb" --version

rm -rf "$OUT"
mkdir -p "$OUT"
step "rtcam .deb for arm64"
# The binary is already stripped (profile.release strip = true) and built --no-default-features.
CARGO_TARGET_DIR="$REPO/target/debian-cross" "$TOOLS/bin/cargo-deb" --no-build --no-strip \
    --target aarch64-unknown-linux-gnu --output "$OUT/"

step "rtcam .deb for amd64 ($RTCAM_BIN)"
amd64_dir="$REPO/target/debian-cross/amd64-deb"
mkdir -p "$amd64_dir/release"
cp "$RTCAM_BIN" "$amd64_dir/release/rtcam"
CARGO_TARGET_DIR="$amd64_dir" "$TOOLS/bin/cargo-deb" --no-build --no-strip --output "$OUT/"

for deb in "$OUT"/*.deb; do
    step "$(basename "$deb")"
    dpkg-deb -f "$deb" Package Version Architecture Depends Installed-Size
    dpkg-deb -c "$deb"
    dpkg-deb -I "$deb" | grep -E '^ +[0-9]+ bytes' || true
done
ls "$OUT"/*_arm64.deb "$OUT"/*_amd64.deb >/dev/null || die "expected an arm64 and an amd64 .deb"
step "field checks passed"
