#!/usr/bin/env bash
# Issue 20, goal 6: relay on / off over the inventory's reservations, N interleaved pairs, with WAL
# bytes and WAL flushes per reservation. PostgreSQL's WAL counters are server-wide, so the bench
# runs against a private server (initdb in a temporary directory, default settings, fsync on, a
# free loopback port) that nothing else writes to; NATS is the machine's.
#   scripts/bench_archive.sh [pairs] [reservations] [connections]   (defaults 10, 5000, 32)
# With 60 or more pairs it also prints the interval over blocks of BENCH_BLOCK (default 20)
# consecutive pairs (batch means), which holds the drift of the machine between blocks.
# Extra environment is passed through (BENCH_RETENTION_ZERO=1: the relay deletes published rows;
# BENCH_WAKE_WINDOW_MS: the inventory's wake-up window). BENCH_BIN=<path to a bench_reservations
# binary> runs that build (e.g. an older one from its own target directory) instead of this tree's.
set -euo pipefail
PAIRS=${1:-10}
REQ=${2:-5000}
CONC=${3:-32}
HERE=$(cd "$(dirname "$0")/.." && pwd)
"$HERE/scripts/ensure-services.sh"
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
DIR=$(mktemp -d /tmp/bench_archive.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
AS=()
if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; AS=(runuser -u postgres --); fi
cleanup() { "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT
"${AS[@]}" "$BIN/initdb" -D "$DIR/data" -A trust -U root -E UTF8 >/dev/null
"${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w \
  -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=100" start >/dev/null
cd "$HERE"
if [ -n "${BENCH_BIN:-}" ]; then
  RUN=("$BENCH_BIN")
else
  RUN=(cargo run --release -q -p inventory --example bench_reservations --)
fi
TEST_PG_URL="postgres://root@127.0.0.1:$PORT" BENCH_PAIRS=$PAIRS "${RUN[@]}" "$REQ" "$CONC"
