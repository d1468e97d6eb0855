#!/usr/bin/env bash
# Field-deployment checks (issue 4), run by tests/run.sh after the end-to-end tests:
#   1. the device config config/rtcam.toml: its values pass `rtcam check-config --no-files`;
#      the full check fails naming mqtt.password_file (the shipped file names
#      /etc/rtcam/mqtt-password, which the operator creates) and passes once that file exists;
#   2. packaging/rtcam.service passes `systemd-analyze verify` (when systemd is installed);
#   3. yocto/meta-rtcam's generated files are current (yocto/update-crates.py --check --web:
#      crate list, SRCREV, licences, the viewer copy);
#   4. aarch64 cross build with Debian's toolchain + unit tests under qemu (build-debian.sh);
#   5. .deb packages for arm64 (that build) and amd64 ($RTCAM_BIN, default
#      target/release/rtcam) with a pinned cargo-deb, holding the viewer (web/dist, built by
#      tests/run.sh before this) and a copyright file listing every linked crate; prints and
#      checks their contents.
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
# nasm: openh264's x86 SIMD code, for a `cargo deb` that builds the amd64 binary itself.
PKGS=(rustc-web cargo-web gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
    libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-user-static libclang-dev file
    dpkg-dev python3 build-essential nasm ca-certificates)
# shellcheck source=cross/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
ensure_packages "${PKGS[@]}"

step "yocto/meta-rtcam generated files (update-crates.py --check --web)"
[[ -f web/dist/index.html ]] || die "web/dist is not built (tests/run.sh builds it before this step: cd web && npm ci && npm run build)"
python3 yocto/update-crates.py --check --web

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
# The shipped config names /etc/rtcam/mqtt-password, which the operator writes: its values are
# checked with --no-files, the full check must fail naming that key, and pass once the file
# exists (RTCAM__MQTT__PASSWORD_FILE points at a stand-in). The device identity key goes to
# /var/lib/rtcam, which the package's unit creates (StateDirectory) and this host lacks:
# RTCAM__AUTH__IDENTITY_KEY_PATH points into the stand-in directory.
ARM_RUN=(qemu-aarch64-static "$SYSROOT/lib/ld-linux-aarch64.so.1" --library-path "$SYSROOT/lib" "$ARM_BIN")
"${ARM_RUN[@]}" check-config --no-files --config config/rtcam.toml >/dev/null
echo "aarch64: config/rtcam.toml values OK (--no-files)"
[[ -x "$RTCAM_BIN" ]] || die "no x86 rtcam at $RTCAM_BIN (cargo build --release, or set RTCAM_BIN)"
"$RTCAM_BIN" check-config --no-files --config config/rtcam.toml >/dev/null
if out="$("$RTCAM_BIN" check-config --config config/rtcam.toml 2>&1)"; then
    die "check-config passed config/rtcam.toml although /etc/rtcam/mqtt-password does not exist"
fi
grep -q 'mqtt.password_file.*/etc/rtcam/mqtt-password' <<<"$out" || die "check-config did not name mqtt.password_file: $out"
echo "x86_64: without the password file: $out"
password_dir="$(mktemp -d)"
echo stand-in >"$password_dir/mqtt-password"
export RTCAM__AUTH__IDENTITY_KEY_PATH="$password_dir/identity.pem"
RTCAM__MQTT__PASSWORD_FILE="$password_dir/mqtt-password" "$RTCAM_BIN" check-config --config config/rtcam.toml >/dev/null
RTCAM__MQTT__PASSWORD_FILE="$password_dir/mqtt-password" "${ARM_RUN[@]}" check-config --config config/rtcam.toml >/dev/null
unset RTCAM__AUTH__IDENTITY_KEY_PATH
rm -rf "$password_dir"
echo "x86_64, aarch64: config/rtcam.toml OK once the password file exists"

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
step "copyright file: every linked crate with its licence texts (target/deb/copyright)"
mkdir -p target/deb
python3 yocto/update-crates.py --debian-copyright target/deb/copyright
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
    dpkg-deb -c "$deb" | tee "$OUT/contents.txt"
    dpkg-deb -I "$deb" | grep -E '^ +[0-9]+ bytes' || true
    for path in usr/bin/rtcam etc/rtcam/rtcam.toml usr/lib/systemd/system/rtcam.service \
        usr/share/doc/rtcam/copyright usr/share/rtcam/web/index.html usr/share/rtcam/web/app.js \
        usr/share/rtcam/web/app.js.LEGAL.txt usr/share/rtcam/web/mqtt.LICENSE.md; do
        grep -qE " \./$path\$" "$OUT/contents.txt" || die "$(basename "$deb") lacks /$path"
    done
    dpkg-deb --fsys-tarfile "$deb" | tar -xOf - ./usr/share/doc/rtcam/copyright | grep -c '^Files: ' |
        xargs printf '/usr/share/doc/rtcam/copyright: %s Files paragraphs (rtcam and each linked crate)\n'
done
ls "$OUT"/*_arm64.deb "$OUT"/*_amd64.deb >/dev/null || die "expected an arm64 and an amd64 .deb"
step "field checks passed"
