#!/usr/bin/env bash
# Installs everything Ferry's tests need; safe to run again (quick when all is there).
#
#   tests/setup.sh        everything below
#   tests/setup.sh etcd   only etcd 3.5 into .tools/ (the demo uses this)
#   tests/setup.sh ministack   only ministack into .tools/ministack
#
# - apt: etcd-server + etcd-client (the system's etcd: 3.4 on Debian bookworm, for the compatibility pass),
#   protobuf-compiler (etcd-client's build needs protoc), zstd, prometheus (promtool + a real Prometheus),
#   age (the independent client for encrypted backups), faketime (agents with a skewed clock).
# - etcd 3.5, the version Kubernetes runs: Debian trixie's etcd-server/etcd-client, fetched with
#   `apt-get download` through a private sources list (the system's own Debian mirror, read from its apt
#   sources, with the suite trixie) and unpacked with `dpkg-deb -x` into .tools/etcd-3.5
#   in this checkout. Nothing is added to the system's sources and the system's etcd is left alone.
# - cargo: s3s-fs (a real S3 server; pinned because the tests read its on-disk layout).
# - pip, into its own venv .tools/ministack: ministack (an S3 server that checks a part's signed Content-MD5
#   and x-amz-checksum-sha256, which s3s-fs does not; pinned, and it pins botocore, hence the venv).
# - pip: the aws CLI (an independent S3 client) and kubernetes-validate (checks deploy/kubernetes).
#
# Programs land in ~/.cargo/bin and ~/.local/bin; tests/run.sh puts both on PATH, and the test fixtures
# look there too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
ETCD35_DIR="$TOOLS/etcd-3.5"
ETCD35_SUITE=trixie
S3S_FS_VERSION=0.14.1
MINISTACK_DIR="$TOOLS/ministack"
MINISTACK_VERSION=1.5.33
what="${1:-all}"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
say() { printf '=== setup: %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$HOME/.local/bin:$PATH"

apt_updated=0
apt_install() {
    if ((apt_updated == 0)); then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
        apt_updated=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

# --- etcd 3.5 from Debian trixie, unpacked into .tools ---------------------------------------------------
# The system's own Debian mirror: the first URI of a Debian archive (not its security archive) in the apt
# sources, one-line or deb822 form. Proxies and local mirrors keep working; no host is named here.
debian_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1
    # One awk, no pipe: under pipefail a reader that stops early would fail the writer with SIGPIPE.
    awk '
        function pick(u) { if (u ~ /\/debian\/?$/) { print u; found = 1; exit } }
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*deb[[:space:]]/ {
            for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { pick($i); break }
            next
        }
        /^URIs:/ { for (i = 2; i <= NF; i++) pick($i) }
        END { exit !found }
    ' "${files[@]}"
}

etcd35() {
    if [[ -x "$ETCD35_DIR/usr/bin/etcdutl" ]] && "$ETCD35_DIR/usr/bin/etcd" --version 2>/dev/null | grep -q '^etcd Version: 3\.5\.'; then
        say "etcd 3.5 present: $("$ETCD35_DIR/usr/bin/etcd" --version | sed -n 1p)"
        return
    fi
    have apt-get && have dpkg-deb || { echo "setup: apt-get and dpkg-deb are needed to fetch etcd 3.5" >&2; exit 1; }
    say "fetching etcd 3.5 (Debian trixie etcd-server, etcd-client) into ${ETCD35_DIR#"$ROOT"/}"
    local work
    work="$(mktemp -d)"
    # _apt drops privileges to download; let it write into the private dirs.
    chmod 755 "$work"
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
    local mirror
    mirror="$(debian_mirror)" || { echo "setup: no Debian mirror in the system's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d/*): add one, or fetch etcd 3.5 by hand into $ETCD35_DIR" >&2; exit 1; }
    echo "deb $mirror $ETCD35_SUITE main" >"$work/sources.list"
    local opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=/dev/null"
        -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" update -q >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; exit 1; }
    (cd "$work/debs" && apt-get "${opts[@]}" download etcd-server etcd-client >"$work/download.log" 2>&1) \
        || { cat "$work/download.log" >&2; exit 1; }
    for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
    local version
    version="$("$work/root/usr/bin/etcd" --version | sed -n 1p)"
    case "$version" in
        "etcd Version: 3.5."*) ;;
        *) echo "setup: trixie's etcd is '$version', not 3.5: update ETCD35_SUITE in tests/setup.sh" >&2; exit 1 ;;
    esac
    # --bump-revision needs etcdutl 3.5.10+.
    local patch="${version##*.}"
    ((patch >= 10)) || { echo "setup: $version is older than 3.5.10 (no --bump-revision)" >&2; exit 1; }
    mkdir -p "$TOOLS"
    rm -rf "$ETCD35_DIR"
    mv "$work/root" "$ETCD35_DIR"
    rm -rf "$work"
    say "etcd 3.5 ready: $version"
}

# --- ministack in its own venv under .tools ---------------------------------------------------------------
# Its dist-info is written last by pip: present means a complete install of this version.
ministack_installed() {
    [[ -x "$MINISTACK_DIR/bin/ministack" ]] \
        && compgen -G "$MINISTACK_DIR/lib/python3*/site-packages/ministack-$MINISTACK_VERSION.dist-info" >/dev/null
}

ministack() {
    if ministack_installed; then
        say "ministack $MINISTACK_VERSION present"
        return
    fi
    # Debian's python3 makes a venv (with pip in it) only with python3-venv.
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || apt_install python3-venv
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "setup: ministack needs Python 3.10 or newer; python3 is $(python3 --version 2>&1)" >&2; exit 1; }
    say "pip install ministack==$MINISTACK_VERSION into ${MINISTACK_DIR#"$ROOT"/} (its own venv)"
    # A half-made venv (an interrupted run, another version) is made again from scratch.
    rm -rf "$MINISTACK_DIR"
    mkdir -p "$TOOLS"
    python3 -m venv "$MINISTACK_DIR"
    "$MINISTACK_DIR/bin/python" -m pip install -q --disable-pip-version-check "ministack==$MINISTACK_VERSION"
    ministack_installed || { echo "setup: ministack $MINISTACK_VERSION is not in $MINISTACK_DIR after pip install" >&2; exit 1; }
    say "ministack ready: $MINISTACK_VERSION"
}

case "$what" in
    etcd) etcd35; exit 0 ;;
    ministack) ministack; exit 0 ;;
    all) ;;
    *) echo "usage: tests/setup.sh [all|etcd|ministack]" >&2; exit 2 ;;
esac

# --- apt ---------------------------------------------------------------------------------------------------
packages=()
have etcd && have etcdctl || packages+=(etcd-server etcd-client)
have protoc || packages+=(protobuf-compiler)
have zstd || packages+=(zstd)
have promtool && have prometheus || packages+=(prometheus)
have age || packages+=(age)
# libfaketime: agents run with their clock an hour off (faults_net.rs).
have faketime || packages+=(faketime)
have cc || packages+=(build-essential)
pip_packages=()
have aws || pip_packages+=(awscli)
have kubernetes-validate || pip_packages+=(kubernetes-validate)
if ((${#pip_packages[@]})) && ! python3 -m pip --version >/dev/null 2>&1; then packages+=(python3-pip); fi
if ((${#packages[@]})); then
    say "apt-get install ${packages[*]}"
    apt_install "${packages[@]}"
else
    say "apt packages present (etcd, protoc, zstd, prometheus, age, faketime)"
fi

etcd35
ministack

# --- cargo -------------------------------------------------------------------------------------------------
if have s3s-fs; then
    say "s3s-fs present"
else
    say "cargo install s3s-fs@$S3S_FS_VERSION (a few minutes, once)"
    cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked
fi

# --- pip ---------------------------------------------------------------------------------------------------
if ((${#pip_packages[@]})); then
    say "pip install ${pip_packages[*]}"
    # A distribution's own Python refuses plain pip installs (PEP 668): install for this user then.
    python3 -m pip install -q "${pip_packages[@]}" 2>/dev/null \
        || python3 -m pip install -q --user --break-system-packages "${pip_packages[@]}"
    hash -r
else
    say "aws CLI and kubernetes-validate present"
fi
for tool in etcd etcdctl protoc zstd promtool prometheus age faketime s3s-fs aws kubernetes-validate; do
    have "$tool" || { echo "setup: $tool is still missing after the install" >&2; exit 1; }
done
ministack_installed || { echo "setup: ministack is still missing after the install" >&2; exit 1; }
say "done"
