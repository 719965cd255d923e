# Shared by scripts/*: messages, and installing system packages on Debian/Ubuntu (apt) or macOS (brew).

say() { printf '\033[1m%s:\033[0m %s\n' "$(basename "$0")" "$*" >&2; }
die() { say "$*"; exit 2; }

have_postgres() {
    command -v postgres >/dev/null 2>&1 && return 0
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ] && return 0
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && return 0
    ls /opt/homebrew/opt/postgresql*/bin/postgres /usr/local/opt/postgresql*/bin/postgres >/dev/null 2>&1 && return 0
    return 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $*"
    fi
}

_apt_updated=
install_packages() {
    if command -v apt-get >/dev/null 2>&1; then
        say "apt-get install $*"
        [ -n "$_apt_updated" ] || { as_root apt-get update -qq; _apt_updated=1; }
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    elif command -v brew >/dev/null 2>&1; then
        say "brew install $*"
        brew install "$@"
    else
        die "cannot install $* here: install it yourself, then run this again"
    fi
}
