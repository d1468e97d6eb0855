#!/usr/bin/env bash
# BitBake checks of yocto/meta-rtcam, run by tests/run.sh: a real BitBake 2.18 with OE-core
# wrynose (the snapshot in ../shared/yocto, see its README.md) parses the layer, shows the
# recipe's environment, plans the build and fetches and unpacks the recipe, offline
# (BB_NO_NETWORK = "1"), for MACHINE = "qemuarm64", as an unprivileged user:
#
#   1. bitbake -p                 every recipe of OE-core and meta-rtcam parses
#   2. bitbake -e rtcam           SRC_URI, SRCREV, S, CARGO_BUILD_FLAGS (--no-default-features),
#                                 the systemd unit, the rtcam user, LICENSE, no double strip
#   3. bitbake -n rtcam           the whole task graph down to the toolchain resolves
#   4. bitbake -c unpack rtcam    fetch (every crate checked against its sha256sum) and unpack
#                                 from a DL_DIR seeded with `cargo fetch --locked` and a git
#                                 mirror of this checkout; then every LIC_FILES_CHKSUM entry
#                                 is checked against the unpacked files as do_populate_lic would
#   5. bitbake -b the recipe      on qemux86-64: nasm-native is a dependency (-e); without
#                                 RTCAM_GIT_URI: the recipe is skipped with its reason
#
#   ./yocto/ci-bitbake.sh
#
# Compiling is out of reach here (gcc-cross, rust-native and clang-native take hours).
# Snapshot: $RTCAM_YOCTO_SNAPSHOT (default ../shared/yocto/oe-core-wrynose+bitbake-2.18.tar.gz
# next to this repository); a missing snapshot is an error naming it. Work directory (kept,
# so the parse cache and downloads are reused): $RTCAM_YOCTO_WORK (default target/yocto).
# As root it installs gawk, diffstat, chrpath, cpio and locales if missing and runs BitBake
# as the system user rtcam-bitbake (created if missing); otherwise as the calling user.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
SNAPSHOT="${RTCAM_YOCTO_SNAPSHOT:-$REPO/../shared/yocto/oe-core-wrynose+bitbake-2.18.tar.gz}"
WORK="${RTCAM_YOCTO_WORK:-$REPO/target/yocto}"
BB_USER=rtcam-bitbake
LAYER="$REPO/yocto/meta-rtcam"
RECIPE="$LAYER/recipes-multimedia/rtcam/rtcam_0.1.0.bb"
# Where CI's local.conf says rtcam comes from: a host that cannot resolve (.invalid), whose
# mirror in DL_DIR is a clone of this checkout with its HEAD as the branch `main`.
GIT_URI="git://git.rtcam.invalid/rtcam.git;protocol=https"
GIT_MIRROR_NAME=git.rtcam.invalid.rtcam.git
started=$SECONDS

step() { printf '\n==> [bitbake %ds] %s\n' "$((SECONDS - started))" "$*"; }
die() { printf 'yocto/ci-bitbake.sh: error: %s\n' "$*" >&2; exit 1; }
fail() { printf 'yocto/ci-bitbake.sh: CHECK FAILED: %s\n' "$*" >&2; exit 1; }

[[ -f "$SNAPSHOT" ]] || die "MISSING: the OE-core + BitBake snapshot $SNAPSHOT
(../shared/yocto/ next to the repository; set RTCAM_YOCTO_SNAPSHOT to its path)"

step "host tools for BitBake's sanity check"
# wrynose's HOSTTOOLS want gawk, diffstat, chrpath and cpio beyond a build machine's usual
# tools (texinfo is not among them there: makeinfo is built as texinfo-native), and the
# en_US.UTF-8 locale, generated below into the work directory (LOCPATH), not system-wide.
# shellcheck source=cross/apt.sh
. "$REPO/cross/apt.sh"
ensure_packages gawk diffstat chrpath cpio locales git python3 file
for tool in gawk diffstat chrpath cpio localedef git; do
    command -v "$tool" >/dev/null || die "MISSING: $tool"
done

# --- The unprivileged user and the work directory ------------------------------------------
mkdir -p "$WORK"
if [[ "$(id -u)" == 0 ]]; then
    # BitBake refuses to run as root.
    if ! id "$BB_USER" >/dev/null 2>&1; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$BB_USER"
    fi
    as_user() { runuser -u "$BB_USER" -- "$@"; }
    chown -R "$BB_USER:$BB_USER" "$WORK"
else
    as_user() { "$@"; }
fi
as_user test -r "$LAYER/conf/layer.conf" -a -w "$WORK" \
    || die "user $(as_user id -un) cannot read $LAYER or write $WORK (check the directories' permissions)"

# --- OE-core and BitBake, unpacked once per snapshot --------------------------------------
want="$(sha256sum "$SNAPSHOT" | cut -d' ' -f1)"
if [[ "$(cat "$WORK/src/.snapshot.sha256" 2>/dev/null || true)" != "$want" ]]; then
    step "unpacking $(basename "$SNAPSHOT")"
    rm -rf "$WORK/src"
    as_user mkdir -p "$WORK/src"
    as_user tar -xzf "$SNAPSHOT" -C "$WORK/src"
    [[ -f "$WORK/src/oe-core/oe-init-build-env" && -x "$WORK/src/bitbake/bin/bitbake" ]] \
        || die "$SNAPSHOT does not hold oe-core/ and bitbake/"
    as_user sh -c "echo $want > '$WORK/src/.snapshot.sha256'"
fi

if ! locale -a 2>/dev/null | grep -qix 'en_US.utf-\?8'; then
    if [[ ! -f "$WORK/locale/en_US.UTF-8/LC_CTYPE" ]]; then
        step "generating the en_US.UTF-8 locale into $WORK/locale"
        as_user mkdir -p "$WORK/locale"
        as_user localedef -i en_US -f UTF-8 "$WORK/locale/en_US.UTF-8" \
            || die "localedef -i en_US -f UTF-8 failed (package locales)"
    fi
fi

# --- DL_DIR: the crates of Cargo.lock and a mirror of this checkout -------------------------
step "seeding DL_DIR: cargo fetch --locked, git mirror of this checkout"
DL="$WORK/downloads"
as_user mkdir -p "$DL/git2"
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || die "MISSING: cargo (to fetch the crates of Cargo.lock)"
cargo fetch --locked --quiet
CARGO_CACHE="$(cargo_home="${CARGO_HOME:-$HOME/.cargo}"; echo "$cargo_home"/registry/cache/index.crates.io-*)"
[[ -d "$CARGO_CACHE" ]] || die "no crates.io cache at $CARGO_CACHE after cargo fetch"
seeded="$(python3 - "$REPO/Cargo.lock" "$CARGO_CACHE" "$DL" <<'EOF'
import pathlib, shutil, sys, tomllib
lock, cache, dl = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
n = 0
for p in tomllib.loads(open(lock).read())["package"]:
    if "checksum" not in p:
        continue
    name = f"{p['name']}-{p['version']}.crate"
    if not (dl / name).exists():
        shutil.copyfile(cache / name, dl / name)  # a missing one is an error here
    n += 1
print(n)
EOF
)"
echo "$seeded crates in $DL"
head="$(git rev-parse HEAD)"
mirror="$DL/git2/$GIT_MIRROR_NAME"
rm -rf "$mirror"
git clone --quiet --mirror "$REPO" "$mirror"
git -C "$mirror" update-ref refs/heads/main "$head"
[[ "$(git -C "$mirror" rev-parse --is-shallow-repository)" == false ]] \
    || die "this checkout is shallow: SRCREV may be missing from its history (clone without --depth)"
chown -R "$(as_user id -un):$(as_user id -gn)" "$DL"

# --- Build directory --------------------------------------------------------------------------
BUILD="$WORK/build"
as_user mkdir -p "$BUILD/conf"
as_user tee "$BUILD/conf/local.conf" >/dev/null <<EOF
# Written by yocto/ci-bitbake.sh.
MACHINE ??= "qemuarm64"
DISTRO ?= "nodistro"
INIT_MANAGER = "systemd"
BB_NO_NETWORK = "1"
DL_DIR = "$DL"
TMPDIR = "$BUILD/tmp"
# Nothing heavy runs here (a dry run and three fetch/unpack tasks), and a dry run schedules its
# 1500 pretend tasks a few per slot and scheduler round: many slots make it take seconds, not
# minutes.
BB_NUMBER_THREADS = "64"
BB_NUMBER_PARSE_THREADS = "2"
# Debian 12 is not in OE-core's list of tested hosts; that is only a warning.
SANITY_TESTED_DISTROS = ""
# uninative (a prebuilt glibc for native tools) is a download; nothing is compiled here.
INHERIT:remove = "uninative"
RTCAM_GIT_URI ?= "$GIT_URI"
CONF_VERSION = "2"
EOF
as_user tee "$BUILD/conf/bblayers.conf" >/dev/null <<EOF
# Written by yocto/ci-bitbake.sh.
BBPATH = "\${TOPDIR}"
BBFILES ?= ""
BBLAYERS = "$WORK/src/oe-core/meta $LAYER"
EOF

# bb [VAR=VALUE...] COMMAND...: runs COMMAND in the BitBake environment (oe-init-build-env)
# as the build user, with only these variables set. PYTHONHASHSEED: OE-core computes
# COMBINED_FEATURES as a Python set, whose order (and so the configuration's hash) changes
# with each process's hash seed; with a random seed every bitbake command after `-p` found a
# "different" configuration and parsed all recipes again.
bb() {
    local vars=()
    while [[ "$1" == *=* ]]; do vars+=("$1"); shift; done
    as_user env -i HOME="$WORK" PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        LANG=en_US.UTF-8 LOCPATH="$WORK/locale" TERM=dumb PYTHONHASHSEED=0 ${vars[@]+"${vars[@]}"} \
        bash -c 'cd "$1" && . ./oe-init-build-env "$2" >/dev/null &&
            export BB_ENV_PASSTHROUGH_ADDITIONS="$BB_ENV_PASSTHROUGH_ADDITIONS LOCPATH RTCAM_GIT_URI PYTHONHASHSEED" &&
            shift 2 && exec "$@"' bb "$WORK/src/oe-core" "$BUILD" "$@"
}
LOGS="$WORK/logs"
as_user mkdir -p "$LOGS"

# BitBake keys its parse cache by a hash of the configuration, which takes in its code
# parser's record of OE's Python modules; that record is saved only after a parse, so in a
# fresh build directory the first full parse is stored under a hash no later command computes,
# and `bitbake -e` parsed all 950 recipes again (minutes). Parsing this one recipe first
# (seconds) saves the record.
if [[ ! -f "$BUILD/cache/bb_codeparser.dat" ]]; then
    step "priming BitBake's code parser cache (a parse of rtcam_0.1.0.bb alone)"
    as_user tee "$BUILD/conf/only-rtcam.conf" >/dev/null <<<'BBMASK = "^(?!.*/rtcam_0\.1\.0\.bb$).*"'
    bb bitbake -R "$BUILD/conf/only-rtcam.conf" -p 2>&1 | as_user tee "$LOGS/prime.log" | grep -E '^(Parsing of|ERROR)' || true
fi

step "bitbake -p (parse every recipe)"
bb bitbake -p 2>&1 | as_user tee "$LOGS/parse.log" | grep -E '^(Parsing of|Loaded|ERROR|WARNING)' || true
# A parse prints its summary; with every recipe still in the parse cache there is nothing to
# parse and only the cache line appears.
grep -qE '^Parsing of [0-9]+ \.bb files complete .* 0 errors\.$|^Loaded [0-9]+ entries from dependency cache\.$' \
    "$LOGS/parse.log" && ! grep -q '^ERROR' "$LOGS/parse.log" \
    || fail "bitbake -p did not parse cleanly (see $LOGS/parse.log)"
if grep -E '^(ERROR|WARNING)' "$LOGS/parse.log" | grep -i rtcam; then
    fail "bitbake -p: errors or warnings about meta-rtcam"
fi

step "bitbake -e rtcam"
bb bitbake -e rtcam >"$LOGS/env.txt" 2>&1 || { tail -20 "$LOGS/env.txt"; fail "bitbake -e rtcam"; }
var() { sed -n "s/^\\(export \\)\\?$1=\"\\(.*\\)\"\$/\\2/p" "$LOGS/env.txt" | tail -1; }
expect() { # NAME 'grep -E pattern' what
    local value
    value="$(var "$1")"
    grep -qE -- "$2" <<<"$value" ||
        fail "bitbake -e rtcam: $1 = \"${value:0:300}$( ((${#value} > 300)) && echo ...)\" does not match /$2/ ($3)"
    printf '  %-28s ok: %s\n' "$1" "$3"
}
srcrev="$(sed -n 's/^SRCREV = "\(.*\)"$/\1/p' "$LAYER/recipes-multimedia/rtcam/rtcam-release.inc")"
expect SRC_URI "^git://git\\.rtcam\\.invalid/rtcam\\.git;protocol=https;branch=main[[:space:]]+file://web[[:space:]]+crate://crates\\.io/" \
    "RTCAM_GIT_URI;branch=main, the viewer, the crates"
[[ "$(grep -o 'crate://' <<<"$(var SRC_URI)" | wc -l)" == "$seeded" ]] || fail "SRC_URI: not one crate:// per Cargo.lock crate ($seeded)"
expect SRCREV "^$srcrev\$" "pinned by rtcam-release.inc"
expect S "/sources/rtcam-0\\.1\\.0\\+git\$" "bitbake.conf's UNPACKDIR/BP, no /git"
expect CARGO_BUILD_FLAGS "--frozen .*--no-default-features" "frozen, no embedded broker"
expect CARGO_PROFILE_RELEASE_STRIP '^false$' "exported, no double strip"
expect SYSTEMD_SERVICE:rtcam '^rtcam\.service$' "the unit"
expect SYSTEMD_AUTO_ENABLE:rtcam '^enable$' "enabled"
expect USERADD_PARAM:rtcam '--system .*--groups video .* rtcam$' "the system user rtcam in video"
expect REQUIRED_DISTRO_FEATURES '^systemd$' "systemd required"
expect LICENSE "^$(sed -n 's/^RTCAM_LICENSE_OE = "\(.*\)"$/\1/p' "$LAYER/recipes-multimedia/rtcam/rtcam-release.inc" | sed 's/[()|&.+]/\\&/g')\$" \
    "the generated list, '&'/'|' on wrynose"
grep -q '^export CARGO_PROFILE_RELEASE_STRIP="false"' "$LOGS/env.txt" || fail "CARGO_PROFILE_RELEASE_STRIP is not exported"
if grep -qw nasm-native <<<"$(var DEPENDS)"; then fail "DEPENDS has nasm-native on qemuarm64"; fi
for dep in clang-native cmake-native; do
    grep -qw "$dep" <<<"$(var DEPENDS)" || fail "DEPENDS lacks $dep"
done
echo "  DEPENDS                      ok: clang-native (bindgen), cmake-native (libjpeg-turbo), no nasm-native on ARM"

step "bitbake -n rtcam (dry run of the whole build)"
bb bitbake -n rtcam 2>&1 | as_user tee "$LOGS/dry-run.log" | grep -E '^(NOTE: Tasks Summary|ERROR|WARNING)' || true
grep -qE "^NOTE: Tasks Summary: Attempted [0-9]+ tasks of which .* and all succeeded\.$" "$LOGS/dry-run.log" \
    || fail "bitbake -n rtcam (see $LOGS/dry-run.log)"

step "bitbake -c unpack rtcam (offline fetch from the seeded DL_DIR, unpack)"
bb bitbake -c unpack rtcam 2>&1 | as_user tee "$LOGS/unpack.log" | grep -E '^(NOTE: Tasks Summary|ERROR|WARNING)' || true
grep -qE "^NOTE: Tasks Summary: Attempted [0-9]+ tasks of which .* and all succeeded\.$" "$LOGS/unpack.log" \
    || fail "bitbake -c unpack rtcam (see $LOGS/unpack.log)"
S_DIR="$(var S)"
[[ "$(git show "$srcrev:Cargo.lock")" == "$(cat "$S_DIR/Cargo.lock")" ]] \
    || fail "$S_DIR is not SRCREV's tree"
[[ -f "$(var UNPACKDIR)/web/index.html" ]] || fail "the viewer (file://web) was not unpacked"
vendored="$(find "$(var CARGO_VENDORING_DIRECTORY)" -mindepth 1 -maxdepth 1 -type d | wc -l)"
[[ "$vendored" == "$seeded" ]] || fail "$vendored crates unpacked into CARGO_VENDORING_DIRECTORY, Cargo.lock has $seeded"
echo "unpacked: $S_DIR ($vendored crates vendored, the viewer)"
# do_populate_lic's checksum check (insane.bbclass), on the unpacked files: it cannot run here
# (do_patch needs quilt-native built first).
python3 - "$S_DIR" "$(var LIC_FILES_CHKSUM)" <<'EOF'
import hashlib, os, sys
s, entries = sys.argv[1], sys.argv[2].split()
bad = []
for entry in entries:
    path, *params = entry.removeprefix("file://").split(";")
    p = dict(x.split("=", 1) for x in params)
    begin, end = int(p.get("beginline", 0)), int(p.get("endline", 0))
    full = os.path.join(s, path)
    if not os.path.isfile(full):
        bad.append(f"missing: {full}")
        continue
    m = hashlib.md5()
    with open(full, "rb") as f:
        for n, line in enumerate(f, 1):
            if n >= begin and (not end or n <= end):
                m.update(line)
    if m.hexdigest() != p["md5"]:
        bad.append(f"md5 {m.hexdigest()} != {p['md5']}: {full}")
print(f"LIC_FILES_CHKSUM: {len(entries) - len(bad)} of {len(entries)} files match")
if bad:
    sys.exit("\n".join(bad))
EOF

step "bitbake -e -b rtcam_0.1.0.bb on qemux86-64, and without RTCAM_GIT_URI"
bb MACHINE=qemux86-64 bitbake -e -b "$RECIPE" >"$LOGS/env-x86-64.txt" 2>&1 \
    || { tail -20 "$LOGS/env-x86-64.txt"; fail "bitbake -e -b (qemux86-64)"; }
grep -E '^DEPENDS=' "$LOGS/env-x86-64.txt" | grep -qw nasm-native \
    || fail "qemux86-64: DEPENDS lacks nasm-native (openh264 would lose its SIMD code)"
echo "  qemux86-64: DEPENDS has nasm-native"
as_user tee "$BUILD/conf/no-uri.conf" >/dev/null <<<'RTCAM_GIT_URI = ""'
if bb bitbake -R "$BUILD/conf/no-uri.conf" -b "$RECIPE" -c listtasks >"$LOGS/no-uri.txt" 2>&1; then
    fail "the recipe parsed without RTCAM_GIT_URI"
fi
grep -q "RTCAM_GIT_URI is not set" "$LOGS/no-uri.txt" \
    || { tail -20 "$LOGS/no-uri.txt"; fail "no RTCAM_GIT_URI: the reason is not shown"; }
echo "  without RTCAM_GIT_URI: $(grep -m1 -o 'RTCAM_GIT_URI is not set[^(]*' "$LOGS/no-uri.txt")"

step "BitBake checks passed in $((SECONDS - started)) s (logs: $LOGS)"
