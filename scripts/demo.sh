#!/usr/bin/env bash
# Runs the rtcam demo on a fresh Debian/Ubuntu machine: installs the build dependencies if
# missing, builds, and starts rtcam with the test pattern and the embedded MQTT broker.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v c++ >/dev/null || need+=(g++)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"
fi
exec cargo run --release -- --config config/demo.toml "$@"
