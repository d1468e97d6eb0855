#!/usr/bin/env bash
# Fails unless the openh264 that a cargo build linked was compiled with its SIMD assembly.
#
#   scripts/check-openh264-asm.sh [CARGO BUILD ARGUMENTS...]
#   scripts/check-openh264-asm.sh --release
#   scripts/check-openh264-asm.sh --release --target aarch64-unknown-linux-gnu --no-default-features
#
# Run it after the build with the same arguments and environment (cargo, CARGO_TARGET_DIR):
# `cargo build --message-format=json` then does no work and names the openh264-sys2 build
# script's OUT_DIR. openh264-sys2 assembles openh264's x86 .asm files with nasm and, when that
# fails (no nasm), prints "Failed to compile NASM files, not using any assembly." and builds
# the plain C encoder (about 2.4x the CPU per frame at 720p). On aarch64 it compiles the NEON
# .S files with the C++ (cross) compiler. The libraries it writes then hold the assembly's own
# functions, which plain C builds lack: *_sse2, *_ssse3, *_avx2 ... on x86_64 (nasm) and
# *_AArch64_neon on aarch64. This counts them in libopenh264_common.a and _encoder.a.
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO="${CARGO:-cargo}"
die() { printf 'check-openh264-asm.sh: FAILED: %s\n' "$*" >&2; exit 1; }

target="$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[i]}" == --target ]] && target="${args[i + 1]}"
    [[ "${args[i]}" == --target=* ]] && target="${args[i]#--target=}"
done
case "$target" in
    x86_64-*) pattern='_(mmx|sse2|ssse3|sse41|sse42|avx2)$'; nm=nm; what="nasm-assembled x86 SIMD" ;;
    aarch64-*) pattern='_AArch64_neon$'; nm=aarch64-linux-gnu-nm; what="NEON (arm64 .S)" ;;
    *) die "no assembly check for target ${target:-?} (x86_64 and aarch64 are checked)" ;;
esac
command -v "$nm" >/dev/null || die "MISSING: $nm (binutils for $target)"

out_dir="$("$CARGO" build --message-format=json "${args[@]}" 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "build-script-executed" and "openh264-sys2" in m["package_id"]:
        print(m["out_dir"])
')" || die "$CARGO build --message-format=json ${args[*]} failed"
[[ -n "$out_dir" && -d "$out_dir" ]] || die "the build of ${args[*]} has no openh264-sys2 build script output"
output="$(dirname "$out_dir")/output"
# x86: nasm failed or was switched off. (On aarch64 the script always prints "No NASM
# configuration found for target, not using any assembly." -- about nasm only: the NEON .S
# files are compiled all the same, so there only the functions below count.)
if [[ "$target" == x86_64-* ]] && grep -qE 'Failed to compile NASM files|NASM compilation disabled' "$output"; then
    die "openh264 was built WITHOUT its assembly for $target ($(grep -E 'NASM' "$output" | head -1)); install nasm and rebuild: cargo clean -p openh264-sys2"
fi
for lib in common encoder; do
    count="$("$nm" --defined-only "$out_dir/libopenh264_$lib.a" 2>/dev/null | grep -cE " T .*$pattern" || true)"
    ((count > 0)) || die "libopenh264_$lib.a has no $what functions ($out_dir): openh264 runs as plain C"
    printf 'openh264 %s for %s: %d %s functions (%s)\n' "$lib" "$target" "$count" "$what" "$out_dir"
done
