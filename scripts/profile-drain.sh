#!/usr/bin/env bash
# Where a drain's time goes (issue 20; docs/benchmarks.md, "Where the drain's time goes"): drains a
# backlog to JetStream with the relay at its defaults (rows kept) and prints the CPU microseconds
# per event of the relay, PostgreSQL (all its processes) and nats-server, the round trips per
# batch, this machine's composite limit for the relay's work, and the drain's ratio to it and to a
# raw publish of the same messages in the same run (crates/outbox-cli/examples/profile_drain.rs).
#
# It starts a PostgreSQL and a nats-server of its own on free loopback ports, so that their
# processes' CPU is this run's only (the shared servers serve other tests at the same time); the
# PostgreSQL copies the shared server's settings (128 MB shared buffers, fsync and synchronous
# commit on, SSL on as sqlx prefers it, autovacuum off) and preloads pg_stat_statements.
#
#   scripts/profile-drain.sh [backlog, default 200000]
#   ROUNDS=3 scripts/profile-drain.sh                     several drains, one after the other
#   PERF=1 scripts/profile-drain.sh                       also `perf record` the relay's process
#   BINS="old=/path/old/profile_drain new=/path/new/profile_drain" ROUNDS=3 scripts/profile-drain.sh
#                                                          builds compared in one run, alternating
#   AUTOVACUUM=on scripts/profile-drain.sh                autovacuum as PostgreSQL's default
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200000}
ROUNDS=${ROUNDS:-1}
T=${CARGO_TARGET_DIR:-target}
if [ -z "${BINS:-}" ]; then
  cargo build --release -p outbox-cli --example profile_drain >&2
  BINS="this=$T/release/examples/profile_drain"
fi
DIR=$(mktemp -d /tmp/profile-drain.XXXXXX)
OUT=${PROFILE_OUT:-$DIR}
. scripts/lib/private-servers.sh
cleanup() {
  stop_private_servers
  if [ "$OUT" = "$DIR" ] && [ -z "${KEEP:-}" ]; then rm -rf "$DIR"; else rm -rf "$DIR/pg" "$DIR/nats"; fi
}
trap cleanup EXIT
start_private_servers
echo "private servers: postgres pid $PGPID port $PGPORT (ssl $SSL, autovacuum ${AUTOVACUUM:-off}), nats-server pid $NPID port $NPORT; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  for entry in $BINS; do
    label=${entry%%=*}
    bin=${entry#*=}
    perf_out=""
    [ -n "${PERF:-}" ] && perf_out="$OUT/perf-$label-$round.data"
    echo "--- round $round, $label ($bin); load average $(cut -d' ' -f1-3 /proc/loadavg)"
    TEST_PG_URL="postgres://root@127.0.0.1:$PGPORT" TEST_NATS_URL="nats://127.0.0.1:$NPORT" \
      PROFILE_PG_PID=$PGPID PROFILE_NATS_PID=$NPID PROFILE_LABEL=$label PROFILE_PERF=$perf_out \
      "$bin" "$N"
    # `|| true` below: `head` closing the pipe early makes perf fail (SIGPIPE) under pipefail.
    if [ -n "$perf_out" ] && [ -s "$perf_out" ]; then
      echo "[$label] hottest symbols of the relay's process (self time, perf record -e cpu-clock):"
      perf report -i "$perf_out" --stdio --no-children -g none --sort dso,symbol 2>/dev/null \
        | grep -E '^ +[0-9]' | sed -E 's/ +$//; s/ {2,}/  /g' | head -"${PERF_TOP:-30}" || true
      echo "[$label] by library:"
      perf report -i "$perf_out" --stdio --no-children -g none --sort dso 2>/dev/null \
        | grep -E '^ +[0-9]' | sed -E 's/ +$//; s/ {2,}/  /g' | head -8 || true
    fi
  done
done
