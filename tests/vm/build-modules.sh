#!/usr/bin/env bash
# Builds the VM tests' extra V4L2 test drivers as out-of-tree modules for exactly the guest's
# kernel (issue 13 "Test drivers"): vimc (virtual media-controller camera, for libcamera),
# vicodec (virtual stateful M2M codec, FWHT) and v4l2loopback. Debian's 6.1 kernel builds
# only vivid; amd64 also lacks CONFIG_V4L2_MEM2MEM_DEV, so there v4l2-mem2mem.c is compiled
# into vicodec.ko.
#
#   tests/vm/build-modules.sh x86_64|aarch64       prints the directory holding the .ko files
#
# Sources: Debian's linux-source-<M.m> at the kernel package's exact version and
# v4l2loopback-dkms; build tree: linux-headers-<release> (+ -common, and the amd64
# linux-kbuild host tools, also for arm64, which is cross-compiled with
# aarch64-linux-gnu-gcc-12). Everything is downloaded into target/vm/debs (apt-get download,
# nothing installed) and the modules are cached in target/vm/modules/<release>_<version>/.
# tests/vm/run.sh downloads the kernel package first. A missing package, tool or module is an
# error naming it.
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO="$(pwd)"
CACHE="$REPO/target/vm"
arch="${1:?usage: tests/vm/build-modules.sh x86_64|aarch64}"

die() { printf 'tests/vm/build-modules.sh: error: %s\n' "$*" >&2; exit 1; }
die_missing() { printf 'tests/vm/build-modules.sh: MISSING: %s\n' "$*" >&2; exit 1; }
say() { printf 'build-modules: %s\n' "$*" >&2; }

case "$arch" in
    x86_64) deb_arch=amd64; make_arch=x86; cross="" ;;
    aarch64) deb_arch=arm64; make_arch=arm64; cross=aarch64-linux-gnu- ;;
    *) die "unknown architecture $arch (x86_64 or aarch64)" ;;
esac
# The compiler Debian built the kernel with (CONFIG_CC_VERSION_TEXT: gcc-12).
cc="${cross}gcc-12"
command -v "$cc" >/dev/null \
    || die_missing "$cc (package $([[ -n $cross ]] && echo gcc-12-aarch64-linux-gnu || echo gcc-12))"
command -v make >/dev/null || die_missing "make (package make)"

shopt -s nullglob
kernel_debs=("$CACHE/debs/linux-image-"*"-${deb_arch}_"*"_${deb_arch}.deb")
((${#kernel_debs[@]} == 1)) \
    || die_missing "exactly one linux-image-*-$deb_arch .deb in $CACHE/debs (found ${#kernel_debs[@]}; tests/vm/run.sh downloads it)"
kernel_deb="${kernel_debs[0]}"
kernel_pkg="$(dpkg-deb -f "$kernel_deb" Package)"   # linux-image-6.1.0-57-amd64
version="$(dpkg-deb -f "$kernel_deb" Version)"      # 6.1.192-3
release="${kernel_pkg#linux-image-}"                # 6.1.0-57-amd64
abi="${release%-"$deb_arch"}"                       # 6.1.0-57
series="$(cut -d. -f1,2 <<<"$abi")"                 # 6.1
out="$CACHE/modules/${release}_${version}"
# The cache key also covers this script: a changed recipe rebuilds.
recipe="$(sha256sum "$0" | cut -c1-16)"
if [[ -f "$out/.built" && "$(cat "$out/.built")" == "$recipe" ]]; then
    say "$release ($version): cached in $out: $(cd "$out" && echo *.ko)"
    echo "$out"
    exit 0
fi

# Downloads <package>[=<version>] into target/vm/debs unless that exact .deb is there (other
# versions of a pinned package are removed: a new kernel replaces the old). Stale package
# lists may lack the version: then they are refreshed (as root) once.
fetch() {
    local spec="$1" name="${1%%[:=]*}" want_version="*" attempt f
    [[ "$spec" == *=* ]] && want_version="${spec#*=}"
    if [[ "$want_version" != "*" ]]; then
        for f in "$CACHE/debs/${name}_"*.deb; do
            [[ "$f" == "$CACHE/debs/${name}_${want_version//:/%3a}_"* ]] || rm -f "$f"
        done
    fi
    compgen -G "$CACHE/debs/${name}_${want_version//:/%3a}_*.deb" >/dev/null && return 0
    mkdir -p "$CACHE/debs"
    for attempt in 1 2; do
        if (cd "$CACHE/debs" && apt-get download "$spec" >&2); then
            return 0
        fi
        ((attempt == 1)) && [[ "$(id -u)" == 0 ]] && apt-get update >&2
    done
    die_missing "Debian package $spec (apt-get download failed; it must match the guest kernel $kernel_pkg $version)"
}
# The cached .deb of a package (the one fetch left).
deb() {
    local f=("$CACHE/debs/$1"_*.deb)
    ((${#f[@]} == 1)) || die_missing "one $1 .deb in $CACHE/debs (found ${#f[@]})"
    echo "${f[0]}"
}

say "$release ($version): building vimc, vicodec, v4l2loopback for $arch"
headers_pkg="linux-headers-$release"
common_pkg="linux-headers-$abi-common"
kbuild_pkg="linux-kbuild-$series"
source_pkg="linux-source-$series"
fetch "$headers_pkg:$deb_arch=$version"
fetch "$common_pkg=$version"
fetch "$kbuild_pkg:amd64=$version"   # host tools (fixdep, modpost) run on the amd64 build host
fetch "$source_pkg=$version"
loopback_version="$(apt-cache policy v4l2loopback-dkms 2>/dev/null | awk '/Candidate:/ { print $2 }')"
[[ -n "$loopback_version" && "$loopback_version" != "(none)" ]] \
    || die_missing "Debian package v4l2loopback-dkms (apt-cache policy finds no candidate)"
fetch "v4l2loopback-dkms=$loopback_version"

work="$CACHE/modules/build-$release"
rm -rf "$work"
mkdir -p "$work/root"
dpkg-deb -x "$(deb "$headers_pkg")" "$work/root"
dpkg-deb -x "$(deb "$common_pkg")" "$work/root"
dpkg-deb -x "$(deb "$kbuild_pkg")" "$work/root"
dpkg-deb -x "$(deb v4l2loopback-dkms)" "$work/root"
hdr="$work/root/usr/src/linux-headers-$release"
[[ -f "$hdr/.config" ]] || die_missing "$hdr/.config (package $headers_pkg)"
# The flavour Makefile includes the common one by absolute path: point it at our copy.
sed -i "s|/usr/src/|$work/root/usr/src/|" "$hdr/Makefile"
config() { grep -E "^$1=" "$hdr/.config" | cut -d= -f2 || true; }

# Only the driver sources are needed from the 140 MB source tarball.
say "extracting the driver sources from $source_pkg $version"
dpkg-deb --fsys-tarfile "$(deb "$source_pkg")" \
    | tar -x -C "$work" --strip-components=3 "./usr/src/$source_pkg.tar.xz"
src_members=(drivers/media/test-drivers/vimc drivers/media/test-drivers/vicodec
    drivers/media/v4l2-core/v4l2-mem2mem.c)
tar -xJf "$work/$source_pkg.tar.xz" -C "$work" "${src_members[@]/#/$source_pkg/}" \
    || die_missing "vimc/vicodec/v4l2-mem2mem.c in $source_pkg $version"
rm "$work/$source_pkg.tar.xz"
src="$work/$source_pkg"

built=()
build() { # name dir kbuild-lines...
    local name="$1" dir="$2"
    shift 2
    printf '%s\n' "$@" >"$dir/Kbuild"
    say "make $name.ko ($make_arch, $cc)"
    nice -n 10 make -s -C "$hdr" M="$dir" ARCH="$make_arch" CROSS_COMPILE="$cross" \
        -j"$(nproc)" modules >"$dir/build.log" 2>&1 \
        || { tail -30 "$dir/build.log" >&2; die "building $name.ko failed (log: $dir/build.log)"; }
    local ko="$dir/$name.ko" magic
    [[ -f "$ko" ]] || die "no $name.ko after the build"
    magic="$(strings "$ko" | grep -m1 '^vermagic=' || true)"
    [[ "$magic" == "vermagic=$release "* ]] || die "$name.ko has '$magic', not the guest's $release"
    built+=("$ko")
}

if [[ "$(config CONFIG_VIDEO_VIMC)" == "" ]]; then
    build vimc "$src/drivers/media/test-drivers/vimc" \
        "vimc-y := vimc-core.o vimc-common.o vimc-streamer.o vimc-capture.o vimc-debayer.o vimc-scaler.o vimc-sensor.o vimc-lens.o" \
        "obj-m += vimc.o"
fi
if [[ "$(config CONFIG_VIDEO_VICODEC)" == "" ]]; then
    vicodec_objs="vicodec-core.o codec-fwht.o codec-v4l2-fwht.o"
    if [[ "$(config CONFIG_V4L2_MEM2MEM_DEV)" == "" ]]; then
        # amd64: no v4l2-mem2mem.ko in the kernel package; link the framework in.
        cp "$src/drivers/media/v4l2-core/v4l2-mem2mem.c" "$src/drivers/media/test-drivers/vicodec/"
        vicodec_objs+=" v4l2-mem2mem.o"
        say "CONFIG_V4L2_MEM2MEM_DEV is not set: v4l2-mem2mem.c goes into vicodec.ko"
    fi
    # Both files declare a module parameter "debug"; one module cannot have it twice.
    build vicodec "$src/drivers/media/test-drivers/vicodec" "vicodec-y := $vicodec_objs" \
        "obj-m += vicodec.o" "CFLAGS_v4l2-mem2mem.o := -Ddebug=m2m_debug"
fi
loopback=("$work/root/usr/src/v4l2loopback-"*)
((${#loopback[@]} == 1)) || die_missing "usr/src/v4l2loopback-* in the v4l2loopback-dkms package"
build v4l2loopback "${loopback[0]}" "obj-m += v4l2loopback.o"

rm -rf "$out"
mkdir -p "$out"
cp "${built[@]}" "$out/"
echo "$recipe" >"$out/.built"
rm -rf "$work"
say "$release ($version): built $(cd "$out" && echo *.ko) into $out"
echo "$out"
