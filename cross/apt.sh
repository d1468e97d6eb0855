# Sourced by the cross/ scripts: installs the Debian packages given that are missing
# (adding the arm64 architecture first), using the caller's die().
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    [[ "$(id -u)" == 0 ]] || die "missing packages: ${missing[*]} (run as root, or install them)"
    printf 'installing %s\n' "${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
}
