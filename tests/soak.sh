#!/usr/bin/env bash
# Soak: does anything grow without bound when Ferry runs unattended? (issue 27; not a CI test)
#
#   tests/soak.sh                 an hour
#   SOAK_SECS=600 tests/soak.sh   ten minutes
#
# Three single-member etcd clusters with one agent each, one coordinator (local store, redb state) on
# loopback, release binaries. Every cluster backs up every 2 s (scheduled), is drilled every minute, and keeps
# its 5 newest backups (retention). Prints, at the start (after the first backups) and at the end: the
# coordinator's and each agent's RSS and open descriptors, the state store's size, the number of metric series
# on the coordinator, backups stored and failed. Writes the same lines to soak-run/report.txt. Leaves nothing
# running; logs stay in ./soak-run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SECS="${SOAK_SECS:-3600}"
WORK="$ROOT/soak-run"
COORD_ADDR=127.0.0.1:28443
METRICS=127.0.0.1:28464
CLUSTERS=(s1 s2 s3)
export PATH="$ROOT/.tools/etcd-3.5/usr/bin:$PATH"

PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    ((${#PIDS[@]})) && kill -TERM "${PIDS[@]}" 2>/dev/null || true
    sleep 2
    ((${#PIDS[@]})) && kill -KILL "${PIDS[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
start() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    PIDS+=($!)
}
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { echo "soak: timed out waiting for $what" >&2; return 1; }
        sleep 0.5
    done
}

tests/setup.sh etcd >/dev/null
cargo build --release --bins
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
CTL="$BIN/ferryctl"
rm -rf "$WORK"
mkdir -p "$WORK"

start "$WORK/coordinator.log" "$BIN/ferry-coordinator" --state-dir "$WORK/coordinator" --listen "$COORD_ADDR" \
    --metrics-listen "$METRICS" --backup-store local --local-store-dir "$WORK/backups" \
    --min-backup-interval 1s --min-drill-interval 1m
COORD_PID=${PIDS[-1]}
export FERRYCONFIG="$WORK/coordinator/admin.ferryconfig"
wait_for "the coordinator" 30 "$CTL" get agents

AGENT_PIDS=()
for i in "${!CLUSTERS[@]}"; do
    c=${CLUSTERS[$i]}
    client=$((28379 + i * 10)) peer=$((28380 + i * 10))
    start "$WORK/etcd-$c.log" etcd --name "$c" --data-dir "$WORK/etcd-$c" \
        --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "$c=http://127.0.0.1:$peer"
    wait_for "etcd $c" 30 etcdctl --endpoints "http://127.0.0.1:$client" endpoint health
    for k in $(seq 200); do
        etcdctl --endpoints "http://127.0.0.1:$client" put "/soak/$c/key-$k" "value-$k-$RANDOM$RANDOM" >/dev/null
    done
    "$CTL" agent-credentials --cluster "$c" --member m1 --out "$WORK/agent-$c" >/dev/null
    start "$WORK/agent-$c.log" "$BIN/ferry-agent" --coordinator "$COORD_ADDR" --credentials "$WORK/agent-$c" \
        --etcd-endpoints "http://127.0.0.1:$client"
    AGENT_PIDS+=("${PIDS[-1]}")
done
connected() { [[ $("$CTL" get agents -o json | grep -c '"connected": *true') -eq ${#CLUSTERS[@]} ]]; }
wait_for "every agent" 60 connected
for c in "${CLUSTERS[@]}"; do
    "$CTL" apply -f - >/dev/null <<YAML
metadata:
  namespace: default
  type: Clusters.ferry.dev
  id: $c
  labels:
    ferry.dev/cluster: $c
spec:
  backupconfiguration:
    interval: {seconds: 2, nanos: 0}
    schedule: ""
    retention: {keeplast: 5, hourly: 0, daily: 0, weekly: 0}
    drillinterval: {seconds: 60, nanos: 0}
YAML
done

metric() { curl -s "http://$METRICS/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $2} END {print s + 0}'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
sample() {
    local when=$1
    local series
    series=$(curl -s "http://$METRICS/metrics" | grep -vc '^#')
    printf '%-5s t=%5ss coordinator rss=%s KiB fds=%s | agents rss=' "$when" "$SECONDS" "$(rss_kib "$COORD_PID")" "$(fds "$COORD_PID")"
    for p in "${AGENT_PIDS[@]}"; do printf '%s,' "$(rss_kib "$p")"; done
    printf ' KiB fds='
    for p in "${AGENT_PIDS[@]}"; do printf '%s,' "$(fds "$p")"; done
    printf ' | state.redb=%s KiB | metric series=%s | backups ok=%s failed=%s | drills=%s | retention deleted=%s | stored files=%s\n' \
        "$(du -k "$WORK/coordinator/state.redb" | cut -f1)" "$series" \
        "$(metric 'ferry_backups_total[{].*result="success"')" "$(metric 'ferry_backups_total[{].*result="error"')" \
        "$(metric 'ferry_restore_drills_total')" "$(metric 'ferry_retention_deleted_total')" \
        "$(find "$WORK/backups" -type f | wc -l)"
}
# The first round of backups and drills, then the baseline.
sleep 90
sample start | tee "$WORK/report.txt"
end=$((SECONDS + SECS))
while ((SECONDS < end)); do
    sleep 60
    kill -0 "$COORD_PID" || { echo "soak: the coordinator died" >&2; exit 1; }
    sample now >>"$WORK/samples.txt"
done
sample end | tee -a "$WORK/report.txt"
# grep -c exits 1 when it counts none: that is the good case.
errors=$(grep -c ' ERROR ' "$WORK/coordinator.log" || true)
echo "coordinator ERROR lines: $errors" | tee -a "$WORK/report.txt"
