#!/usr/bin/env bash
# What the relay costs at a steady load (issue 20, goal 6; docs/benchmarks.md, "The relay at steady
# load"): producers commit one event per transaction at a fixed rate, the relay runs in a process
# of its own, and crates/outbox-cli/examples/profile_steady.rs prints the CPU microseconds per event
# of the relay's process, its PostgreSQL backends, nats-server and the producers' backends, the
# relay's statements per batch, its mean batch size and commit-to-stream latency p50 / p99, with
# the relay off and on.
#
# A private PostgreSQL (settings of profile-drain.sh: 128 MB shared buffers, fsync on, autovacuum
# off, pg_stat_statements) and a private nats-server on free loopback ports, so that their CPU is
# this run's only.
#
#   scripts/profile-steady.sh [rate, default 1000] [seconds, default 10]
#   ROUNDS=3 BINS="old=/path/old/profile_steady new=/path/new/profile_steady" scripts/profile-steady.sh
#   STEADY_NOTIFY=commit|window:5|off   how producers wake the relay (default commit)
#   STEADY_PHASES=off,on                which phases, in order (default off,on)
#   STEADY_RETENTION_ZERO=1             the relay deletes published rows instead of archiving them
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-1000}
SECS=${2:-10}
ROUNDS=${ROUNDS:-1}
T=${CARGO_TARGET_DIR:-target}
if [ -z "${BINS:-}" ]; then
  cargo build --release -p outbox-cli --example profile_steady >&2
  BINS="this=$T/release/examples/profile_steady"
fi
DIR=$(mktemp -d /tmp/profile-steady.XXXXXX)
PG_EXTRA_CONF='pg_stat_statements.track_planning = on'
. scripts/lib/private-servers.sh
cleanup() {
  stop_private_servers
  rm -rf "$DIR"
}
trap cleanup EXIT
start_private_servers
echo "private servers: postgres pid $PGPID port $PGPORT (ssl $SSL), nats-server pid $NPID port $NPORT; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  for entry in $BINS; do
    label=${entry%%=*}
    bin=${entry#*=}
    echo "--- round $round, $label ($bin); load average $(cut -d' ' -f1-3 /proc/loadavg)"
    TEST_PG_URL="postgres://root@127.0.0.1:$PGPORT" TEST_NATS_URL="nats://127.0.0.1:$NPORT" \
      PROFILE_PG_PID=$PGPID PROFILE_NATS_PID=$NPID PROFILE_LABEL=$label "$bin" "$RATE" "$SECS"
  done
done
