#!/usr/bin/env bash
# The test command: installs what the tests need (tests/setup.sh; quick when all is there), builds every
# binary, runs the whole suite on etcd 3.5, then the compatibility pass on the system's etcd 3.4.
#
# For the inner loop once this has run: `cargo build --workspace --bins && cargo test --workspace`
# (the same suite on etcd 3.5, without the set-up and the 3.4 pass). Arguments go to the main cargo test
# run, e.g. `tests/run.sh -- restore::`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

"$ROOT/tests/setup.sh"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$HOME/.local/bin:$PATH"

echo "=== cargo build --workspace --bins"
cargo build --workspace --bins
echo "=== cargo test --workspace (etcd: $("$ROOT/.tools/etcd-3.5/usr/bin/etcd" --version | sed -n 1p))"
cargo test --workspace "$@"

# etcd 3.4 is still in the field: backup, S3 backup and restore on it too. Bookworm's etcd-server is 3.4.
ETCD34_DIR="${FERRY_ETCD34_DIR:-/usr/bin}"
if ! "$ETCD34_DIR/etcd" --version 2>/dev/null | grep -q '^etcd Version: 3\.4\.'; then
    echo "the compatibility pass needs etcd 3.4 in $ETCD34_DIR (Debian bookworm's etcd-server), or FERRY_ETCD34_DIR" >&2
    exit 1
fi
echo "=== compatibility pass on $("$ETCD34_DIR/etcd" --version | sed -n 1p)"
FERRY_ETCD_DIR="$ETCD34_DIR" cargo test -p ferry-tests --test e2e -- --exact \
    backup::manual_backup_of_three_member_cluster_restores_every_key \
    s3::s3_backup_restores_with_independent_tools \
    restore::three_member_cluster_comes_back_from_ferry_restore \
    restore_orchestrated::ferryctl_restore_seeds_one_member_and_joins_the_others_by_default
