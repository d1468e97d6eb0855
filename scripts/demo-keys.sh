#!/usr/bin/env bash
# Signed-mode keys for the demo (scripts/demo.sh, tests/web/run.mjs demo), made on first use
# under target/demo/: an owner key, a viewer key and the device identity of config/demo.toml.
# DEMO ONLY: these keys sit in the build directory and the viewer key travels in a URL; a real
# device gets its owner keys and credentials as docs/security.md describes.
#
# Prints two lines: the owner public key (for RTCAM__AUTH__OWNER_KEYS), and the viewer URL's
# fragment: a credential for device "demo" (cred), the viewer key it is bound to (vk, PKCS#8
# base64url) and the device key to pin (dk).
set -euo pipefail
cd "$(dirname "$0")/.."
rtcam="${RTCAM_BIN:-target/release/rtcam}"
dir=target/demo
mkdir -p "$dir"
chmod 700 "$dir"
[ -f "$dir/owner.key" ] || "$rtcam" token keygen --out "$dir/owner.key" >/dev/null 2>&1
[ -f "$dir/viewer.key" ] || "$rtcam" token keygen --out "$dir/viewer.key" >/dev/null 2>&1
owner="$("$rtcam" token public --key "$dir/owner.key")"
viewer="$("$rtcam" token public --key "$dir/viewer.key")"
# config/demo.toml keeps the device identity at target/demo/identity.pem.
device="$("$rtcam" --config config/demo.toml identity --create 2>/dev/null)"
cred="$("$rtcam" token issue --key "$dir/owner.key" --viewer-key "$viewer" --device demo \
    --allow view,control --expires 30d --name demo-browser 2>/dev/null)"
vk="$(sed '1d;$d' "$dir/viewer.key" | tr -d '\n' | base64 -d | base64 -w0 | tr '+/' '-_' | tr -d '=')"
echo "$owner"
echo "cred=$cred&vk=$vk&dk=$device"
