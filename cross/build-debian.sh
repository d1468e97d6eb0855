#!/usr/bin/env bash
# Cross-build rtcam for aarch64 (64-bit Raspberry Pi OS / Debian arm64 boards) with Debian 12's
# own toolchain -- no containers, no rustup target -- and run the library's unit tests under
# qemu-user.
#
#   ./cross/build-debian.sh              install packages if missing, build, test
#   ./cross/build-debian.sh --no-test    build only
#
# Uses /usr/bin/cargo and /usr/bin/rustc from Debian's rustc-web/cargo-web (Rust 1.96 in
# bookworm) and the target's std from libstd-rust-web-dev:arm64, unpacked (not installed) into
# a private sysroot under target/debian-cross: installing it would pull in arm64 zlib, xz,
# zstd and libxml2 at the newest version, which multiarch forces onto the host's own amd64
# packages as upgrades. Output:
#   target/debian-cross/aarch64-unknown-linux-gnu/release/rtcam
# The separate target dir keeps this build from invalidating rustup's target/{debug,release}.
# Nothing is written to .cargo/config.toml: the cross settings are environment variables, so
# the x86 build is unaffected. Source this file's environment with `--print-env`.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
# The device build: no embedded MQTT broker (README: device images use an external broker).
FEATURES=(--no-default-features)

run_tests=1
print_env=0
for arg in "$@"; do
    case "$arg" in
        --no-test) run_tests=0 ;;
        --print-env) print_env=1 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "build-debian.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'build-debian.sh: error: %s\n' "$*" >&2; exit 1; }

# --- Debian packages --------------------------------------------------------------------
PKGS=(rustc-web cargo-web gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake
    libc6-dev-arm64-cross qemu-user-static libclang-dev file binutils-aarch64-linux-gnu)
if ((!print_env)); then
    # shellcheck source=cross/apt.sh
    . "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
    ensure_packages "${PKGS[@]}"
fi

# --- The target's Rust std, unpacked into a private sysroot -------------------------------
# libstd-rust-web-dev:arm64 at exactly the installed rustc-web's version (rustc refuses a std
# from another build), downloaded with apt-get download and unpacked with dpkg-deb -x.
RUST_SYSROOT="$REPO/target/debian-cross/rust-sysroot"
arm64_std() {
    local version
    version="$(dpkg-query -W -f='${Version}' rustc-web)" || die "rustc-web is not installed"
    if [[ "$(cat "$RUST_SYSROOT/.version" 2>/dev/null)" == "$version" ]]; then
        return 0
    fi
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        [[ "$(id -u)" == 0 ]] || die "MISSING: the arm64 dpkg architecture (dpkg --add-architecture arm64; apt-get update)"
        dpkg --add-architecture arm64
        apt-get update
    fi
    local dl
    dl="$(mktemp -d)"
    chmod 0755 "$dl" # apt-get download drops privileges to _apt
    (cd "$dl" && apt-get download "libstd-rust-web-dev:arm64=$version") ||
        die "MISSING: libstd-rust-web-dev:arm64=$version could not be downloaded (apt-get update?)"
    rm -rf "$RUST_SYSROOT"
    mkdir -p "$RUST_SYSROOT"
    dpkg-deb -x "$dl"/libstd-rust-web-dev_*_arm64.deb "$RUST_SYSROOT.unpacked"
    mv "$RUST_SYSROOT.unpacked/usr/lib" "$RUST_SYSROOT/lib"
    rm -rf "$RUST_SYSROOT.unpacked" "$dl"
    echo "$version" >"$RUST_SYSROOT/.version"
}

# --- Environment: Debian's cargo + rustc, GNU cross tools, bindgen sysroot, qemu runner ---
CARGO=/usr/bin/cargo
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
unset RUSTUP_TOOLCHAIN RUSTC_WRAPPER
export CARGO_TARGET_DIR="$REPO/target/debian-cross"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
# Target crates find std in the private sysroot; build scripts and proc macros (host) use
# rustc's own.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="--sysroot=$RUST_SYSROOT"
# The runner starts the sysroot's dynamic loader as the program and lets it load the test
# binary: Debian's qemu-user 7.2 on some hosts (seen on a 6.18 kernel in a Firecracker VM)
# spins forever in the guest's first pthread_create when qemu itself maps the ELF interpreter
# (`qemu-aarch64-static -L sysroot prog`), while the very same binary run as
# `ld-linux-aarch64.so.1 --library-path ... prog` works. The probe below checks it.
QEMU_RUN="qemu-aarch64-static $SYSROOT/lib/ld-linux-aarch64.so.1 --library-path $SYSROOT/lib"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$QEMU_RUN"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# bindgen (v4l2-sys-mit) parses <linux/videodev2.h> with libclang: point it at the arm64 libc
# and kernel headers (libc6-dev-arm64-cross, linux-libc-dev-arm64-cross), not the host's.
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=$SYSROOT"
export QEMU_LD_PREFIX="$SYSROOT"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ((print_env)); then
    for v in RUSTC RUSTDOC CARGO_TARGET_DIR CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER CC_aarch64_unknown_linux_gnu \
        CXX_aarch64_unknown_linux_gnu AR_aarch64_unknown_linux_gnu \
        BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu QEMU_LD_PREFIX \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    exit 0
fi

[[ -x "$CARGO" && -x "$RUSTC" ]] || die "Debian's cargo/rustc not found at $CARGO / $RUSTC"
arm64_std
[[ -d "$RUST_SYSROOT/lib/rustlib/$TARGET/lib" ]] || die "MISSING: no std for $TARGET in $RUST_SYSROOT"
step "$("$CARGO" --version); $("$RUSTC" --version)"

# --- Release build ------------------------------------------------------------------------
step "cargo build --release --target $TARGET ${FEATURES[*]}"
"$CARGO" build --locked --release --target "$TARGET" "${FEATURES[@]}" --bin rtcam
BIN="$CARGO_TARGET_DIR/$TARGET/release/rtcam"
file "$BIN"
file -L "$BIN" | grep -q 'ARM aarch64' || die "$BIN is not an aarch64 ELF"
# openh264's NEON code (the arm64 .S files) is in: its *_AArch64_neon functions are in the
# libraries the binary linked (same build arguments: no rebuild).
CARGO="$CARGO" "$REPO/scripts/check-openh264-asm.sh" --locked --release --target "$TARGET" "${FEATURES[@]}" --bin rtcam
aarch64-linux-gnu-readelf -d "$BIN" | grep NEEDED || true
# The release profile already strips (strip = true); strip a copy again to be sure the figure
# is the stripped size.
aarch64-linux-gnu-strip -o "$BIN.stripped" "$BIN"
step "stripped aarch64 binary: $(stat -c %s "$BIN.stripped") bytes ($(du -h "$BIN.stripped" | cut -f1))"
# shellcheck disable=SC2086 # QEMU_RUN is a command line
$QEMU_RUN "$BIN" --version

# --- Unit tests under qemu-user -----------------------------------------------------------
# qemu-user must be able to run a threaded program through the runner above, or every Rust
# test binary would hang: probe with a 5-line C program first and fail loudly if it cannot.
qemu_runs_threads() {
    local probe="$CARGO_TARGET_DIR/qemu-thread-probe"
    printf '%s\n' '#include <pthread.h>' 'static void *f(void *a) { return a; }' \
        'int main(void) { pthread_t t; return pthread_create(&t, 0, f, 0) || pthread_join(t, 0); }' |
        aarch64-linux-gnu-gcc -x c -pthread -o "$probe" -
    # shellcheck disable=SC2086 # QEMU_RUN is a command line
    timeout 20 $QEMU_RUN "$probe"
}

if ((run_tests)); then
    # --release shares most dependency builds with the binary above.
    step "cargo test --release --target $TARGET --lib --no-run"
    "$CARGO" test --locked --release --target "$TARGET" "${FEATURES[@]}" --lib --no-run
    if qemu_runs_threads; then
        step "cargo test --release --target $TARGET --lib (qemu-aarch64-static)"
        timeout --kill-after=10 "${QEMU_TEST_TIMEOUT_S:-1200}" \
            "$CARGO" test --locked --release --target "$TARGET" "${FEATURES[@]}" --lib
    else
        die "qemu-aarch64-static cannot run a threaded aarch64 program on this host ($QEMU_RUN): the aarch64 unit tests cannot run"
    fi
fi
step "aarch64 build OK: $BIN"
