#!/usr/bin/env bash
# rtcam's test command: formatting, lints, unit tests, release build (and a check that openh264
# has its SIMD assembly), end-to-end tests, the browser viewer's build and its browser tests
# (Chromium), field-deployment checks (cross/ci-field.sh), BitBake checks of the Yocto layer
# (yocto/ci-bitbake.sh), the VM tests against the vivid V4L2 driver in x86_64 and aarch64
# virtual machines (tests/vm/run.sh) and the Debian package under systemd in a VM
# (tests/vm/systemd/run.sh); the last four are skipped with --e2e-only/--web-only.
#
#   ./tests/run.sh                  everything
#   ./tests/run.sh --e2e-only       only the end-to-end and browser tests (existing $RTCAM_BIN)
#   ./tests/run.sh --web-only       only the viewer build and the browser tests
#   ./tests/run.sh -- -k bye        extra arguments after -- go to pytest
#
# On a fresh Debian 12 machine, run as root: missing Debian packages are installed with apt,
# never removing or upgrading an installed one (cross/apt.sh: it stops and names them).
# A Rust toolchain (rustup, >= the crate's rust-version, with clippy and rustfmt) must be
# installed beforehand. The end-to-end tests run inside a private network namespace
# (`unshare -n`) holding only the loopback interface: they start their own mosquitto and
# rtcam on 127.0.0.1 and cannot send a packet anywhere else.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
VENV="$REPO/target/e2e-venv"
REQUIREMENTS="$REPO/tests/e2e/requirements.txt"
E2E_TIMEOUT_S="${E2E_TIMEOUT_S:-1200}"

e2e_only=0
web_only=0
pytest_args=()
while (($#)); do
    case "$1" in
        --e2e-only) e2e_only=1 ;;
        --) shift; pytest_args=("$@"); break ;;
        --web-only) e2e_only=1; web_only=1 ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

# --- System packages ------------------------------------------------------------------
step "checking system packages"
# shellcheck source=cross/apt.sh
. "$REPO/cross/apt.sh"  # ensure_packages: never removes or upgrades an installed package
# cmake: turbojpeg-sys builds its bundled libjpeg-turbo (MJPEG decoding) with it.
# chromium: the browser tests (tests/web) drive Debian's /usr/bin/chromium; openssl makes the
# certificates of the MQTT TLS tests; nasm assembles openh264's x86 SIMD code (without it
# openh264-sys2 quietly builds the plain C encoder; scripts/check-openh264-asm.sh fails then).
# coturn and nftables: the NAT lab (tests/e2e/natlab.py: a TURN relay, NAT routers).
pkgs=(mosquitto libclang-dev iproute2 util-linux build-essential pkg-config cmake chromium openssl nasm coturn nftables)
# GStreamer's webrtcbin as a second, independent viewer (tests/e2e/test_gstreamer.py), run by
# Debian's python3 with PyGObject; without recommends, so no graphics stack comes along.
pkgs+=(python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
    gir1.2-nice-0.1 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
    gstreamer1.0-nice gstreamer1.0-libav)
if ! command -v python3 >/dev/null; then
    pkgs+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    pkgs+=(python3-venv)  # Debian ships ensurepip separately
fi
# Node.js >= 18 and npm build the viewer (web/) and run the browser tests. Debian's `nodejs`
# and `npm` packages do; a Node.js from elsewhere (e.g. NodeSource, which bundles npm) is used
# as it is.
command -v node >/dev/null || pkgs+=(nodejs)
command -v npm >/dev/null || pkgs+=(npm)
ensure_packages "${pkgs[@]}"
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || die "mosquitto not found"
command -v unshare >/dev/null || die "unshare (util-linux) not found"
command -v ip >/dev/null || die "ip (iproute2) not found"
command -v turnserver >/dev/null || die "turnserver (coturn) not found"
command -v nft >/dev/null || [[ -x /usr/sbin/nft ]] || die "nft (nftables) not found"
command -v nasm >/dev/null || die "nasm not found (apt-get install nasm): openh264 would lose its SIMD code"
[[ -x /usr/bin/chromium ]] || die "/usr/bin/chromium not found (apt-get install chromium)"
command -v node >/dev/null || die "node not found (apt-get install nodejs)"
command -v npm >/dev/null || die "npm not found (apt-get install npm)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
((node_major >= 18)) || die "Node.js $(node --version) is too old: the viewer build needs >= 18"

# --- Python venv for the end-to-end tests ---------------------------------------------
if ((!web_only)); then
want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
have="$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)"
if [[ "$want" != "$have" ]] || ! "$VENV/bin/python" -c 'import aiortc, paho.mqtt, pytest, numpy' 2>/dev/null; then
    step "creating $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet \
        --only-binary=:all: -r "$REQUIREMENTS"
    echo "$want" >"$VENV/.requirements.sha256"
fi
fi

# --- Rust -------------------------------------------------------------------------------
if ((!e2e_only)); then
    if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
    cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"

    step "cargo fmt --check"
    cargo fmt --check
    step "cargo clippy --all-targets -- -D warnings"
    cargo clippy --all-targets -- -D warnings
    step "cargo test"
    cargo test
    step "cargo build --release"
    cargo build --release
    step "openh264 built with its assembly (scripts/check-openh264-asm.sh --release)"
    ./scripts/check-openh264-asm.sh --release
fi

# --- End-to-end tests -------------------------------------------------------------------
export RTCAM_BIN="${RTCAM_BIN:-$REPO/target/release/rtcam}"
[[ -x "$RTCAM_BIN" ]] || die "rtcam binary not found at $RTCAM_BIN"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
unshare_args=(-n)
[[ "$(id -u)" == 0 ]] || unshare_args=(-r -n)  # unprivileged: map to root in a user ns

# The namespace has only `lo` and no route for multicast. E2E_LO_MULTICAST=1 adds
# 224.0.0.0/4 on lo (for a device that insists on an mDNS socket; see tests/e2e/README.md).
netns_setup='ip link set lo up'
if [[ "${E2E_LO_MULTICAST:-0}" == 1 ]]; then
    netns_setup+=' && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo'
fi

if ((!web_only)); then
step "end-to-end tests (pytest tests/e2e in a private network namespace, RTCAM_BIN=$RTCAM_BIN)"
timeout --kill-after=30 "$E2E_TIMEOUT_S" \
    unshare "${unshare_args[@]}" -- bash -c \
    "$netns_setup"' && exec "$0" -m pytest -v -p no:cacheprovider tests/e2e "$@"' \
    "$VENV/bin/python" ${pytest_args[@]+"${pytest_args[@]}"}
fi

# --- Browser viewer: build from the lockfile, browser tests in Chromium -----------------
# npm ci installs exactly package-lock.json (mqtt, esbuild; playwright-core for the tests).
# The tests start mosquitto (TCP + WebSocket listeners), rtcam serving web/dist, and Debian's
# Chromium inside their own network namespace; see tests/web/README.md.
step "viewer build and unit tests (web/: npm ci && npm test && npm run build -> web/dist)"
(cd web && npm ci --no-audit --no-fund --loglevel=error && npm test --silent && npm run build --silent)
step "browser test dependencies (tests/web: npm ci)"
(cd tests/web && npm ci --no-audit --no-fund --loglevel=error)
step "browser tests (tests/web/run.mjs: Chromium + playwright-core in a private network namespace)"
timeout --kill-after=30 "${WEB_TIMEOUT_S:-300}" \
    unshare "${unshare_args[@]}" -- bash -c 'ip link set lo up && exec node tests/web/run.mjs'
step "WHEP browser test (tests/web/whep.mjs: the whip-whep npm library in Chromium, no broker)"
timeout --kill-after=30 120 \
    unshare "${unshare_args[@]}" -- bash -c 'ip link set lo up && exec node tests/web/whep.mjs'
# The README's demo in an ordinary browser (no loopback flags): that browser needs a LAN
# address to gather candidates from, so this namespace gets a veth pair that leads nowhere.
step "browser test of the demo (config/demo.toml, the URL scripts/demo.sh prints, plain Chromium)"
timeout --kill-after=30 120 \
    unshare "${unshare_args[@]}" -- bash -c 'ip link set lo up &&
        ip link add rtcam-lan0 type veth peer name rtcam-lan1 &&
        ip addr add 10.254.0.1/24 dev rtcam-lan0 && ip link set rtcam-lan0 up &&
        ip link set rtcam-lan1 up && exec node tests/web/run.mjs demo'

# --- Field deployment (issue 4) ---------------------------------------------------------
# aarch64 build with Debian's toolchain + unit tests under qemu, check-config of
# config/rtcam.toml, systemd unit and Yocto crate-list checks, arm64 and amd64 .debs.
if ((!e2e_only)); then
    step "field deployment checks (cross/ci-field.sh)"
    RTCAM_BIN="$RTCAM_BIN" ./cross/ci-field.sh
fi

# --- The Yocto layer through BitBake (issue 12) --------------------------------------------
# OE-core wrynose + BitBake 2.18 from ../shared/yocto: parse, bitbake -e/-n, offline fetch and
# unpack of meta-rtcam as an unprivileged user (yocto/ci-bitbake.sh).
if ((!e2e_only)); then
    step "Yocto layer: BitBake parse, environment, dry run and unpack (yocto/ci-bitbake.sh)"
    ./yocto/ci-bitbake.sh
fi

# --- Real V4L2 in virtual machines (issue 5) ----------------------------------------------
# rtcam record against Debian's vivid driver under qemu-system-x86_64 and -aarch64 (the
# aarch64 binary is the one ci-field.sh just built): formats, strides, controls, camera loss.
if ((!e2e_only)); then
    step "VM tests: real V4L2 (vivid) on x86_64 and aarch64 (tests/vm/run.sh)"
    RTCAM_BIN="$RTCAM_BIN" ./tests/vm/run.sh
fi

# --- The Debian package under a real systemd (issue 12) -------------------------------------
# The amd64 .deb ci-field.sh built, installed in a Debian 12 guest with systemd and vivid:
# READY, watchdog, journald fields, a viewer through the broker, offline on stop, security.
if ((!e2e_only)); then
    step "VM test: the .deb under systemd (tests/vm/systemd/run.sh)"
    ./tests/vm/systemd/run.sh
fi
