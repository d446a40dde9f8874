#!/usr/bin/env bash
# Ferry demo: back up a 3-member etcd cluster and prove the backup restores.
#
# Run from anywhere inside the repo on a Debian machine: `deploy/demo.sh`. It installs what is missing
# (protoc, zstd; etcd 3.5 — the version Kubernetes runs — into .tools/ with `tests/setup.sh etcd`), builds
# Ferry in release mode, and then, all on loopback inside ./demo-run:
#   1. starts a 3-member etcd cluster (m1..m3) and writes test keys into it,
#   2. starts ferry-coordinator and one ferry-agent per member (cluster "demo"),
#   3. takes a manual backup and shows the status resources,
#   4. downloads the backup, restores it with `etcdutl snapshot restore --bump-revision --mark-compacted`
#      (etcd's own tool, as Kubernetes needs it), and counts the keys,
#   5. damages the cluster (keys deleted, keys written after the backup), shows the change log holding every
#      change since the backup (`ferryctl changes`), and brings all three members back
#      with one command, `ferryctl restore` (each member's etcd runs under `ferry-agent gate`, which the
#      coordinator holds, rebuilds, verifies and releases), then counts the keys on every member,
#   6. writes good keys, then deletes every key (a bad change found late) and restores the cluster to the
#      revision just before it (`ferryctl restore --to-revision`: rebuilt from the full backup and the change
#      log, stored as a derived backup, restored like any).
# Every process it starts is stopped when it exits, also on failure or Ctrl-C; logs stay in ./demo-run.
#
# Environment:
#   DEMO_KEYS     number of keys to write (default 1000)
#   DEMO_BIN_DIR  use the Ferry binaries in this dir instead of building (e.g. target/debug)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KEYS="${DEMO_KEYS:-1000}"
CLUSTER=demo
WORK="$ROOT/demo-run"
COORD_ADDR=127.0.0.1:27443
# name client-port peer-port
MEMBERS=("m1 22379 22380" "m2 22479 22480" "m3 22579 22580")
RESTORE_CLIENT=22679
RESTORE_PEER=22680
# Each agent's loopback client URL for its member while a restore is not verified yet.
RESTORE_URL_PORTS=(22390 22391 22392)
export ETCDCTL_API=3

# Colours only on a terminal.
if [[ -t 1 ]]; then BOLD=$'\033[1m' RED=$'\033[31m' GREEN=$'\033[32m' RESET=$'\033[0m'; else BOLD="" RED="" GREEN="" RESET=""; fi
section() { printf '\n%s=== %s ===%s\n' "$BOLD" "$*" "$RESET"; }
info() { printf '  %s\n' "$*"; }
fail() { printf '\n%sFAIL: %s%s\n' "$RED" "$*" "$RESET" >&2; exit 1; }

# --- cleanup: stop every process this script started ----------------------------------------------------
PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        printf '\n=== Cleaning up: stopping %d processes ===\n' "${#PIDS[@]}"
        kill -TERM "${PIDS[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            local alive=0
            for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.1
        done
        kill -KILL "${PIDS[@]}" 2>/dev/null || true
        wait 2>/dev/null || true
    fi
    if ((status != 0)); then
        printf 'Logs are in %s\n' "$WORK" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOG CMD... : run CMD in the background with its output in LOG, and remember its pid.
start() {
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    PIDS+=($!)
    info "started $name (pid $!), log: ${log#"$ROOT"/}"
}

# wait_for WHAT SECONDS CMD... : retry CMD every half second until it succeeds; 1 after SECONDS.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            printf '  timed out after %ss waiting for %s\n' "$seconds" "$what" >&2
            return 1
        fi
        sleep 0.5
    done
    info "$what: ok"
}

# fail_with_logs MESSAGE LOG... : show the end of each log, then fail.
fail_with_logs() {
    local message=$1
    shift
    for log in "$@"; do
        printf -- '--- end of %s ---\n' "${log#"$ROOT"/}" >&2
        tail -n 20 "$log" >&2 || true
    done
    fail "$message"
}

# --- 0. prerequisites -------------------------------------------------------------------------------------
section "Prerequisites"
missing=()
for tool in protoc zstd; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    info "missing: ${missing[*]}; installing with apt-get"
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y protobuf-compiler zstd
else
    info "protoc and zstd are installed"
fi
# etcd 3.5 (etcd, etcdctl, etcdutl) into .tools/, leaving any system etcd alone.
"$ROOT/tests/setup.sh" etcd | sed 's/^/  /'
export PATH="$ROOT/.tools/etcd-3.5/usr/bin:$PATH"
info "$(etcd --version | sed -n 1p)"

if [[ -n "${DEMO_BIN_DIR:-}" ]]; then
    BIN="$(cd "$DEMO_BIN_DIR" && pwd)"
    info "using prebuilt binaries in $BIN"
else
    command -v cargo >/dev/null || fail "cargo not found: install Rust (https://rustup.rs), then run this again"
    section "Building Ferry (cargo build --release --bins)"
    cargo build --release --bins
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
for b in ferry-coordinator ferry-agent ferryctl; do
    [[ -x "$BIN/$b" ]] || fail "$BIN/$b not found"
done
FERRYCTL="$BIN/ferryctl"

rm -rf "$WORK"
mkdir -p "$WORK"
info "work dir: ${WORK#"$ROOT"/}"

# --- 1. etcd ----------------------------------------------------------------------------------------------
section "1. Starting a 3-member etcd cluster, each member under ferry-agent gate"
INITIAL_CLUSTER=""
ENDPOINTS=""
for m in "${MEMBERS[@]}"; do
    read -r name client peer <<<"$m"
    INITIAL_CLUSTER+="${INITIAL_CLUSTER:+,}$name=http://127.0.0.1:$peer"
    ENDPOINTS+="${ENDPOINTS:+,}http://127.0.0.1:$client"
done
for m in "${MEMBERS[@]}"; do
    read -r name client peer <<<"$m"
    # The gate runs etcd as its child; the agent holds, restores and restarts it through $WORK/gate-$name.
    start "etcd $name" "$WORK/etcd-$name.log" "$BIN/ferry-agent" gate \
        --gate-dir "$WORK/gate-$name" --data-dir "$WORK/etcd-$name" -- etcd \
        --name "$name" --data-dir "$WORK/etcd-$name" \
        --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "$INITIAL_CLUSTER" --initial-cluster-token "ferry-demo-$$" --initial-cluster-state new
done
wait_for "etcd cluster health" 60 etcdctl --endpoints "$ENDPOINTS" endpoint health \
    || fail_with_logs "etcd did not become healthy (ports in use?)" "$WORK"/etcd-m*.log
etcdctl --endpoints "$ENDPOINTS" member list -w table

section "Writing $KEYS keys under /demo/ (in transactions of 100 puts)"
for ((start_i = 0; start_i < KEYS; start_i += 100)); do
    {
        echo # no compares
        for ((i = start_i; i < start_i + 100 && i < KEYS; i++)); do
            printf 'put /demo/key-%05d "value %05d: the quick brown fox jumps over the lazy dog"\n' "$i" "$i"
        done
        echo # end of success ops
        echo # no failure ops
    } | etcdctl --endpoints "$ENDPOINTS" txn >/dev/null
done
count_keys() { etcdctl --endpoints "$1" get /demo/ --prefix --keys-only | { grep -c . || true; }; }
WRITTEN=$(count_keys "$ENDPOINTS")
info "keys under /demo/: $WRITTEN"
((WRITTEN == KEYS)) || fail "wrote $KEYS keys but etcd has $WRITTEN"

# --- 2. Ferry -------------------------------------------------------------------------------------------
section "2. Starting ferry-coordinator on $COORD_ADDR (QUIC/UDP)"
start ferry-coordinator "$WORK/coordinator.log" "$BIN/ferry-coordinator" \
    --state-dir "$WORK/coordinator" --listen "$COORD_ADDR" \
    --backup-store local --local-store-dir "$WORK/backups"
export FERRYCONFIG="$WORK/coordinator/admin.ferryconfig"
ctl_ready() { [[ -f "$FERRYCONFIG" ]] && "$FERRYCTL" get agents; }
wait_for "coordinator answering ferryctl" 30 ctl_ready \
    || fail_with_logs "the coordinator did not come up" "$WORK/coordinator.log"
info "admin credentials: ${FERRYCONFIG#"$ROOT"/} (ferryctl reads it from \$FERRYCONFIG)"

section "Issuing agent credentials and starting one ferry-agent per member (cluster \"$CLUSTER\")"
for i in "${!MEMBERS[@]}"; do
    read -r name client _ <<<"${MEMBERS[$i]}"
    "$FERRYCTL" agent-credentials --cluster "$CLUSTER" --member "$name" --out "$WORK/agent-$name"
    info "credentials for $CLUSTER/$name in ${WORK#"$ROOT"/}/agent-$name"
    start "ferry-agent $name" "$WORK/agent-$name.log" "$BIN/ferry-agent" \
        --coordinator "$COORD_ADDR" --credentials "$WORK/agent-$name" \
        --etcd-endpoints "http://127.0.0.1:$client" \
        --gate-dir "$WORK/gate-$name" --data-dir "$WORK/etcd-$name" \
        --restore-client-url "http://127.0.0.1:${RESTORE_URL_PORTS[$i]}"
done
agents_connected() {
    [[ $("$FERRYCTL" get agents -o json | grep -c '"connected": *true') -eq ${#MEMBERS[@]} ]]
}
wait_for "all ${#MEMBERS[@]} agents connected" 30 agents_connected \
    || fail_with_logs "the agents did not connect" "$WORK/coordinator.log" "$WORK"/agent-m*.log
echo
echo "\$ ferryctl get agents"
"$FERRYCTL" get agents

# The change log: one agent watches etcd and stores every revision between full backups (point-in-time).
info "turning on the change log of $CLUSTER (spec.backupconfiguration.pointintime)"
"$FERRYCTL" apply -f - <<EOF_CLUSTER >/dev/null
metadata:
  namespace: default
  type: Clusters.ferry.dev
  id: $CLUSTER
spec:
  backupconfiguration:
    pointintime:
      enabled: true
      window:
        seconds: 86400
        nanos: 0
EOF_CLUSTER

# --- 3. backup ------------------------------------------------------------------------------------------
section "3. Requesting a manual backup (EtcdManualBackups.ferry.dev, backupat = now)"
MANUAL="metadata:
  namespace: ephemeral
  type: EtcdManualBackups.ferry.dev
  id: $CLUSTER
spec:
  backupat:
    seconds: $(date +%s)
    nanos: 0"
printf '%s\n' "$MANUAL" | sed 's/^/    /'
printf '%s\n' "$MANUAL" | "$FERRYCTL" apply -f -

# backup_status: spec.status of the cluster's EtcdBackupStatus (1 ok, 2 error, 3 running, 0 unknown).
backup_status() {
    "$FERRYCTL" get etcdbackupstatus "$CLUSTER" -o json 2>/dev/null \
        | grep -o '"status": *[0-9]*' | sed -n 1p | grep -o '[0-9]*$'
}
backup_done() { local s; s=$(backup_status) && [[ $s == 1 || $s == 2 ]]; }
wait_for "backup finished" 120 backup_done \
    || fail_with_logs "the backup did not finish" "$WORK/coordinator.log" "$WORK"/agent-m*.log
echo
echo "\$ ferryctl get etcdbackupstatus"
"$FERRYCTL" get etcdbackupstatus
[[ $(backup_status) == 1 ]] || fail "backup failed (status $(backup_status)); see above and $WORK/coordinator.log"
echo
echo "\$ ferryctl get etcdbackupoverallstatus"
"$FERRYCTL" get etcdbackupoverallstatus
echo
echo "\$ ferryctl get etcdbackup --selector ferry.dev/cluster=$CLUSTER"
"$FERRYCTL" get etcdbackup --selector "ferry.dev/cluster=$CLUSTER"

# The newest backup comes first; its metadata.id is the first "id" in the JSON.
BACKUP_ID=$("$FERRYCTL" get etcdbackup --selector "ferry.dev/cluster=$CLUSTER" -o json \
    | sed -n 's/^ *"id": *"\([^"]*\)".*/\1/p' | sed -n 1p)
[[ -n "$BACKUP_ID" ]] || fail "no backup listed for cluster $CLUSTER"

# --- 4. restore -----------------------------------------------------------------------------------------
section "4. Downloading backup $BACKUP_ID and restoring it with etcdutl"
SNAPSHOT="$WORK/$BACKUP_ID.snapshot"
echo "\$ ferryctl backup download $CLUSTER $BACKUP_ID -o ${SNAPSHOT#"$ROOT"/} --decompress"
"$FERRYCTL" backup download "$CLUSTER" "$BACKUP_ID" -o "$SNAPSHOT" --decompress
info "snapshot: $(stat -c %s "$SNAPSHOT") bytes"
etcdutl snapshot status "$SNAPSHOT" -w table

RESTORE_PEER_URL="http://127.0.0.1:$RESTORE_PEER"
# The bump puts the restored revision above anything clients saw, and the compaction mark makes their
# watches relist: what a Kubernetes control plane needs after a restore (docs/RESTORE.md).
echo "\$ etcdutl snapshot restore ${SNAPSHOT#"$ROOT"/} --data-dir demo-run/etcd-restored --bump-revision 100000 --mark-compacted ..."
etcdutl snapshot restore "$SNAPSHOT" --data-dir "$WORK/etcd-restored" \
    --name restored --initial-cluster "restored=$RESTORE_PEER_URL" \
    --initial-advertise-peer-urls "$RESTORE_PEER_URL" \
    --bump-revision 100000 --mark-compacted >"$WORK/restore.log" 2>&1 \
    || fail_with_logs "etcdutl snapshot restore failed" "$WORK/restore.log"
start "etcd on the restored data" "$WORK/etcd-restored.log" etcd \
    --name restored --data-dir "$WORK/etcd-restored" \
    --listen-client-urls "http://127.0.0.1:$RESTORE_CLIENT" \
    --advertise-client-urls "http://127.0.0.1:$RESTORE_CLIENT" \
    --listen-peer-urls "$RESTORE_PEER_URL" --initial-advertise-peer-urls "$RESTORE_PEER_URL" \
    --initial-cluster "restored=$RESTORE_PEER_URL"
wait_for "restored etcd health" 30 etcdctl --endpoints "http://127.0.0.1:$RESTORE_CLIENT" endpoint health \
    || fail_with_logs "etcd on the restored data did not come up" "$WORK/etcd-restored.log"
RESTORED=$(count_keys "http://127.0.0.1:$RESTORE_CLIENT")
info "keys under /demo/ in the restored etcd: $RESTORED (written: $KEYS)"
info "revision of the restored etcd: $(etcdctl --endpoints "http://127.0.0.1:$RESTORE_CLIENT" endpoint status -w json | grep -o '"revision":[0-9]*' | sed -n 1p | cut -d: -f2) (bumped past the backup's)"
SAMPLE=$(printf '/demo/key-%05d' $((KEYS / 2)))
info "$SAMPLE = $(etcdctl --endpoints "http://127.0.0.1:$RESTORE_CLIENT" get "$SAMPLE" --print-value-only)"
((RESTORED == KEYS)) || fail "the restored etcd has $RESTORED keys, expected $KEYS"

# --- 5. the whole cluster back with one command ---------------------------------------------------------
section "5. Damage: 100 keys deleted, 50 written after the backup; then ferryctl restore"
OLD_ID=$(etcdctl --endpoints "$ENDPOINTS" endpoint status -w json | grep -o '"cluster_id":[0-9]*' | sed -n 1p | cut -d: -f2)
PRE=$(etcdctl --endpoints "$ENDPOINTS" endpoint status -w json | grep -o '"revision":[0-9]*' | sed -n 1p | cut -d: -f2)
etcdctl --endpoints "$ENDPOINTS" del /demo/key-000 --prefix >/dev/null
for i in $(seq 1 50); do etcdctl --endpoints "$ENDPOINTS" put "/after-backup/$i" lost >/dev/null; done
info "keys under /demo/ now: $(count_keys "$ENDPOINTS"), under /after-backup/: $(etcdctl --endpoints "$ENDPOINTS" get /after-backup/ --prefix --keys-only | grep -c .)"
# Every change since the backup is in the change log within seconds: any moment since can be rebuilt.
REV=$(etcdctl --endpoints "$ENDPOINTS" endpoint status -w json | grep -o '"revision":[0-9]*' | sed -n 1p | cut -d: -f2)
covered() {
    local c
    c=$("$FERRYCTL" get etcdbackupstatus "$CLUSTER" -o json | grep -o '"coveredrevision": *[0-9]*' | grep -o '[0-9]*$')
    [[ -n "$c" ]] && ((c >= REV))
}
wait_for "the change log to cover revision $REV" 60 covered \
    || fail_with_logs "the change log did not catch up" "$WORK/coordinator.log" "$WORK"/agent-m*.log
echo "\$ ferryctl changes $CLUSTER --prefix /after-backup/ --limit 5"
"$FERRYCTL" changes "$CLUSTER" --prefix /after-backup/ --limit 5 2>&1 | sed 's/^/    /'
LOGGED=$("$FERRYCTL" changes "$CLUSTER" -o json --limit 100000 | grep -c '"op":"delete"' || true)
info "the change log holds all $LOGGED deletes and every write since the backup"
((LOGGED >= 100)) || fail "the change log holds $LOGGED deletes, expected at least 100"
# One object back without a rollback: a deleted key's value just before the damage (revision $PRE).
echo "\$ ferryctl get-key $CLUSTER /demo/key-00042 --at-revision $PRE"
OLD=$("$FERRYCTL" get-key "$CLUSTER" /demo/key-00042 --at-revision "$PRE" 2>"$WORK/get-key.log") \
    || fail_with_logs "ferryctl get-key failed" "$WORK/get-key.log" "$WORK/coordinator.log"
info "its value at revision $PRE: ${OLD:0:40}…"
[[ -n "$OLD" ]] || fail "get-key printed nothing for a key that existed at revision $PRE"
# What restoring to that point would undo, counted by key prefix.
echo "\$ ferryctl restore $CLUSTER --to-revision $PRE --dry-run"
"$FERRYCTL" restore "$CLUSTER" --to-revision "$PRE" --dry-run 2>/dev/null | sed 's/^/    /' \
    || fail_with_logs "ferryctl restore --dry-run failed" "$WORK/coordinator.log"
# Without --yes the coordinator refuses (the cluster is healthy) and says what would be lost.
echo "\$ ferryctl restore $CLUSTER --backup $BACKUP_ID"
"$FERRYCTL" restore "$CLUSTER" --backup "$BACKUP_ID" 2>&1 | sed 's/^/    /' || true
echo "\$ ferryctl restore $CLUSTER --backup $BACKUP_ID --mode all-members --yes --wait"
"$FERRYCTL" restore "$CLUSTER" --backup "$BACKUP_ID" --mode all-members --yes --wait --timeout 5m \
    || fail_with_logs "ferryctl restore failed" "$WORK/coordinator.log" "$WORK"/agent-m*.log "$WORK"/etcd-m*.log
echo
echo "\$ ferryctl get etcdrestorestatus"
"$FERRYCTL" get etcdrestorestatus
for m in "${MEMBERS[@]}"; do
    read -r name client _ <<<"$m"
    n=$(count_keys "http://127.0.0.1:$client")
    info "member $name: $n keys under /demo/"
    ((n == KEYS)) || fail "member $name has $n keys after the restore, expected $KEYS"
done
LOST=$(etcdctl --endpoints "$ENDPOINTS" get /after-backup/ --prefix --keys-only | { grep -c . || true; })
((LOST == 0)) || fail "$LOST keys written after the backup are still there"
NEW_ID=$(etcdctl --endpoints "$ENDPOINTS" endpoint status -w json | grep -o '"cluster_id":[0-9]*' | sed -n 1p | cut -d: -f2)
info "cluster id: $OLD_ID -> $NEW_ID (a restored cluster is a new one); writes after the backup gone"
[[ "$NEW_ID" != "$OLD_ID" ]] || fail "the cluster id did not change"

# --- 6. back to a moment: a restore to a point in time --------------------------------------------------
section "6. Good writes, then a bad change found late; ferryctl restore --to-revision just before it"
# The restored cluster's first backup (taken at once) is the full backup the log continues from.
base_stored() {
    "$FERRYCTL" get etcdbackup --selector "ferry.dev/cluster=$CLUSTER" -o json | grep -q "\"etcdclusterid\": *\"$(printf '%x' "$NEW_ID")\""
}
wait_for "a backup of the restored cluster" 60 base_stored \
    || fail_with_logs "no backup of the restored cluster" "$WORK/coordinator.log"
for i in $(seq 1 20); do etcdctl --endpoints "$ENDPOINTS" put "/demo-good/$i" kept >/dev/null; done
GOOD=$(etcdctl --endpoints "$ENDPOINTS" endpoint status -w json | grep -o '"revision":[0-9]*' | sed -n 1p | cut -d: -f2)
etcdctl --endpoints "$ENDPOINTS" del /demo/ --prefix >/dev/null
info "20 good keys written (revision $GOOD), then every key under /demo/ deleted: $(count_keys "$ENDPOINTS") left"
REV=$(etcdctl --endpoints "$ENDPOINTS" endpoint status -w json | grep -o '"revision":[0-9]*' | sed -n 1p | cut -d: -f2)
wait_for "the change log to cover revision $REV" 60 covered \
    || fail_with_logs "the change log did not catch up" "$WORK/coordinator.log" "$WORK"/agent-m*.log
echo "\$ ferryctl restore $CLUSTER --to-revision $GOOD --mode all-members --yes --wait"
"$FERRYCTL" restore "$CLUSTER" --to-revision "$GOOD" --mode all-members --yes --wait --timeout 5m 2>&1 \
    | grep -v '^  ' | sed 's/^/    /' || true
for m in "${MEMBERS[@]}"; do
    read -r name client _ <<<"$m"
    n=$(count_keys "http://127.0.0.1:$client")
    g=$(etcdctl --endpoints "http://127.0.0.1:$client" get /demo-good/ --prefix --keys-only | { grep -c . || true; })
    info "member $name: $n keys under /demo/, $g under /demo-good/"
    ((n == KEYS && g == 20)) \
        || fail_with_logs "member $name has $n + $g keys after the restore to revision $GOOD, expected $KEYS + 20" \
            "$WORK/coordinator.log" "$WORK"/agent-m*.log
done

printf '\n%sPASS: backup %s of cluster %s restored with all %d keys, by etcdutl and by ferryctl restore on all 3 members, and restored again to revision %s of its change log%s\n' "$GREEN" "$BACKUP_ID" "$CLUSTER" "$KEYS" "$GOOD" "$RESET"
