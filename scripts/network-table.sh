#!/usr/bin/env bash
# Prints the adaptive-streaming table (issue 15): runs the network-emulation scenarios of
# tests/e2e/test_network.py ((a) 600 kbit/s, (b0) a fast viewer alone, also at 1280x720,
# (b) both, also at 1280x720, (c) a dip to 500 kbit/s, (d) 2 % loss, also at 1280x720; each
# with webrtc.adaptation on and off)
# in a private network namespace, as tests/run.sh does, and prints the table they write to
# target/network-table.txt with the load average, and rtcam's CPU per run (all threads, the capture/encode thread, the rest)
# with what adaptation adds outside the pipeline. About seven minutes. Needs root
# (namespaces, veth, tc) and the end-to-end venv tests/run.sh creates (target/e2e-venv, or
# another one named by RTCAM_E2E_VENV).
#
#   ./scripts/network-table.sh             all scenarios and the emulator's own check
#   ./scripts/network-table.sh -k test_c   extra arguments go to pytest
#   RTCAM_NET_CPU_ROUNDS=5 ./scripts/network-table.sh -k test_cpu
#                                          the 1280x720 CPU scenarios (b0-720p, d-720p) in five
#                                          rounds, on and off alternating, with each round's figure
# (the (b) row's of_alone ratio needs test_b0 in the same run)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
VENV="${RTCAM_E2E_VENV:-$REPO/target/e2e-venv}"
[[ "$(id -u)" == 0 ]] || { echo "network-table.sh: needs root (network namespaces, tc)" >&2; exit 1; }
[[ -x "$VENV/bin/python" ]] || {
    echo "network-table.sh: $VENV is missing: run ./tests/run.sh --e2e-only once to create it" >&2
    exit 1
}
export RTCAM_BIN="${RTCAM_BIN:-$REPO/target/release/rtcam}"
if [[ ! -x "$RTCAM_BIN" ]]; then
    cargo build --release
fi
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
rm -f "$REPO/target/network-table.txt"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
status=0
unshare -n -- bash -c 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider tests/e2e/test_network.py "$@"' \
    "$VENV/bin/python" "$@" >"$REPO/target/network-table.log" 2>&1 || status=$?
tail -n 3 "$REPO/target/network-table.log"
if [[ -f "$REPO/target/network-table.txt" ]]; then
    echo
    cat "$REPO/target/network-table.txt"
else
    echo "network-table.sh: no table written; see target/network-table.log" >&2
    status=1
fi
exit "$status"
