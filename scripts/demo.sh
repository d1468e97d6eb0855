#!/usr/bin/env bash
# Runs the rtcam demo on a fresh Debian/Ubuntu machine: installs the build dependencies if
# missing, builds rtcam and the browser viewer (web/), prints the viewer's URL and starts
# rtcam with the test pattern, the embedded MQTT broker and the viewer's web server.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v c++ >/dev/null || need+=(g++)
command -v cmake >/dev/null || need+=(cmake)  # builds the bundled libjpeg-turbo
# bindgen (v4l2-sys-mit) loads libclang and parses with clang's own headers; libclang-dev
# brings both (libclang-N-dev: lib/libclang.so, libclang-common-N-dev: lib/clang/N/include).
# libclang-cpp.so, from another package, is not libclang.
compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null &&
  compgen -G '/usr/lib/llvm-*/lib/clang/*/include/stddef.h' >/dev/null || need+=(libclang-dev)
# openh264's x86 SIMD code is assembled with nasm; without it the encoder runs as plain C.
case "$(uname -m)" in x86_64 | i?86) command -v nasm >/dev/null || need+=(nasm) ;; esac
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  # Install only what is missing, never removing or upgrading what the machine has.
  changes="$(apt-get install -s --no-install-recommends "${need[@]}" | grep -E '^(Remv |Inst [^ ]+ \[)' || true)"
  if [ -n "$changes" ]; then
    printf 'demo.sh: installing %s would remove or upgrade installed packages:\n%s\nInstall them yourself, then run this again.\n' \
      "${need[*]}" "$changes" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${need[@]}"
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 18 ]; then
  echo "demo.sh: Node.js $(node --version) is too old to build the viewer: install Node.js >= 18" >&2
  exit 1
fi
# The viewer, exactly as pinned in web/package-lock.json, into web/dist (config/demo.toml's web.root).
(cd web && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
cargo build --release
# Signed mode (the default): demo keys under target/demo/ on first use; the URL's fragment
# carries the demo viewer's key and credential (never sent to a server) and the device key.
keys="$(scripts/demo-keys.sh)"
owner="${keys%%$'\n'*}"
fragment="${keys#*$'\n'}"
# config/demo.toml: web server on 8080, embedded broker's WebSocket listener on 8083.
url="http://127.0.0.1:8080/?broker=ws://127.0.0.1:8083&device=demo"
printf '\n  rtcam demo: open %s\n  (Ctrl-C stops it)\n\n' "$url#$fragment"
RTCAM__AUTH__OWNER_KEYS="$owner" exec cargo run --release --quiet -- --config config/demo.toml "$@"
