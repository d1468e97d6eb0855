# Sourced by the cross/, tests/ and yocto/ scripts (uses the caller's die()):
#
#   ensure_packages PKG...       install the Debian packages given that are missing
#   apt_install_checked PKG...   install exactly these (e.g. PKG=VERSION), same checks
#
# Nothing installed is ever removed or upgraded behind the caller's back: the install is first
# simulated (`apt-get install -s`), and when it would remove a package, or upgrade or downgrade
# an installed one, the script stops and names them. One case is mended first: a library whose
# sibling packages (same source package) would come new from a security update that wants the
# installed one at the same version (libevent-extra-2.1-7 from bookworm-security pulls up the
# libevent-core-2.1-7 a machine came with). The new siblings are then asked for at the installed
# version, when the archive still has it, and the install is simulated again.
# RTCAM_APT_ALLOW_UPGRADES=1 lets upgrades through (never removals) on a machine where that is
# fine. The arm64 architecture is added only when an :arm64 package is asked for.

# The packages an `apt-get install -s` transcript would remove, upgrade or downgrade.
apt_changes_to_installed() {
    # Inst lines of installed packages carry the installed version in brackets:
    #   Inst zlib1g [1:1.2.13.dfsg-1] (1:1.2.13.dfsg-1+deb12u1 Debian-Security:...)
    awk '/^Remv / { print "remove " $2 } /^Inst [^ ]+ \[/ { gsub(/[][]/, "", $3); print "upgrade " $2 " " $3 " -> " substr($4, 2) }'
}

# The packages an `apt-get install -s` transcript installs new, as "NAME VERSION" lines.
apt_new_packages() {
    awk '/^Inst [^ ]+ \(/ { print $2 " " substr($3, 2) }'
}

# NAME=VERSION requests that keep the upgrades of a transcript away: each package it installs
# new from the source package of an installed one it would upgrade, at that installed version,
# where the archive has that version of it.
apt_pins_to_installed() {
    local sim="$1" new sources kind pkg from src name version
    new="$(apt_new_packages <<<"$sim")"
    [[ -n "$new" ]] || return 0
    # "PACKAGE SOURCE" for every new package, from one apt-cache call.
    # shellcheck disable=SC2046 # one argument per package
    sources="$(apt-cache show $(awk '{ print $1 "=" $2 }' <<<"$new") 2>/dev/null |
        awk '/^Package: / { p = $2; s = $2 } /^Source: / { s = $2 }
             /^$/ { if (p != "") print p, s; p = "" } END { if (p != "") print p, s }' || true)"
    while read -r kind pkg from _; do
        [[ "$kind" == upgrade ]] || continue
        src="$(dpkg-query -W -f='${source:Package}\n' "$pkg" 2>/dev/null | head -n 1 || true)"
        [[ -n "$src" ]] || continue
        while read -r name version; do
            [[ "$(awk -v n="${name%%:*}" '$1 == n { print $2; exit }' <<<"$sources")" == "$src" ]] ||
                continue
            if apt-cache show "$name=$from" >/dev/null 2>&1; then
                printf '%s=%s\n' "$name" "$from"
            fi
        done <<<"$new"
    done < <(apt_changes_to_installed <<<"$sim") | sort -u
}

apt_install_checked() {
    local sim changes pins=()
    export DEBIAN_FRONTEND=noninteractive
    if ! sim="$(apt-get install -s --no-install-recommends "$@" 2>&1)"; then
        die "apt-get cannot install $* here:
$sim"
    fi
    changes="$(apt_changes_to_installed <<<"$sim")"
    if [[ -n "$changes" ]] && ! grep -q '^remove ' <<<"$changes" &&
        [[ "${RTCAM_APT_ALLOW_UPGRADES:-0}" != 1 ]]; then
        mapfile -t pins < <(apt_pins_to_installed "$sim")
        if ((${#pins[@]})) &&
            sim="$(apt-get install -s --no-install-recommends "$@" "${pins[@]}" 2>&1)" &&
            [[ -z "$(apt_changes_to_installed <<<"$sim")" ]]; then
            printf 'asking for %s: the installed version, so that nothing installed is upgraded instead of:\n%s\n' \
                "${pins[*]}" "$(sed 's/^/    /' <<<"$changes")"
            set -- "$@" "${pins[@]}"
            changes=""
        fi
    fi
    if grep -q '^remove ' <<<"$changes" ||
        { [[ -n "$changes" ]] && [[ "${RTCAM_APT_ALLOW_UPGRADES:-0}" != 1 ]]; }; then
        die "installing $* would change packages this machine already has:
$(sed 's/^/    /' <<<"$changes")
Nothing was installed. Install the packages yourself in a way that suits this machine, or
rerun with RTCAM_APT_ALLOW_UPGRADES=1 to allow the upgrades (removals are never allowed)."
    fi
    apt-get install -y --no-install-recommends "$@"
}

ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    [[ "$(id -u)" == 0 ]] || die "missing packages: ${missing[*]} (run as root, or install them)"
    printf 'installing %s\n' "${missing[*]}"
    if [[ " ${missing[*]}" == *:arm64* ]] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64
    fi
    apt-get update
    apt_install_checked "${missing[@]}"
}

# ensure_qemu_system qemu-system-x86 [qemu-system-arm]: the qemu system emulators, matching the
# qemu this machine already has. Debian 12's qemu-system-* (7.2) would replace a qemu-utils
# from bookworm-backports (10.x) -- a removal -- so when qemu-utils is a backports version the
# emulators are installed at exactly that version from bookworm-backports (adding that source
# first if it is not configured); otherwise from bookworm. A dependency those versions want
# newer than bookworm has (qemu 10.0.2's qemu-system-x86 needs seabios > 1.16.3-1~) is taken
# from bookworm-backports too; the install is still checked by apt_install_checked.
ensure_qemu_system() {
    local missing=() pkg version
    for pkg in "$@"; do
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    version="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
    if [[ "$version" != *bpo* ]]; then
        ensure_packages "${missing[@]}"
        return
    fi
    [[ "$(id -u)" == 0 ]] || die "missing packages: ${missing[*]} at qemu-utils' version $version (run as root)"
    if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" \
            >/etc/apt/sources.list.d/rtcam-bookworm-backports.list
    fi
    apt-get update
    local wanted=()
    for pkg in "${missing[@]}" qemu-system-common qemu-system-data; do
        [[ "$(dpkg-query -W -f='${Status} ${Version}' "$pkg" 2>/dev/null || true)" == "install ok installed $version" ]] \
            || wanted+=("$pkg=$version")
    done
    local sim deps dep round
    for round in 1 2 3 4 5; do
        sim="$(apt-get install -s --no-install-recommends "${wanted[@]}" 2>&1)" && break
        # " qemu-system-x86 : Depends: seabios (> 1.16.3-1~) but 1.16.2-1 is to be installed"
        deps="$(sed -n 's/.*Depends: \([^ ]*\) .* but .* is to be installed$/\1/p' <<<"$sim" | sort -u)"
        [[ -n "$deps" ]] || break
        for dep in $deps; do
            [[ " ${wanted[*]} " != *" $dep/bookworm-backports "* ]] || break 2
            wanted+=("$dep/bookworm-backports")
        done
    done
    printf 'installing %s (round %s; qemu-utils is %s, from bookworm-backports)\n' \
        "${wanted[*]}" "$round" "$version"
    apt_install_checked "${wanted[@]}"
}
