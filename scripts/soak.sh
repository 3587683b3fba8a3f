#!/usr/bin/env bash
# Long fault soak of the relay against both brokers (crates/outbox-cli/tests/soak.rs; docs/faults.md).
#
#   scripts/soak.sh                    10 minutes per broker, random seed
#   SOAK_SECONDS=120 scripts/soak.sh   shorter
#   SOAK_SEED=1234 scripts/soak.sh     replay a seed printed by a failed run
#   scripts/soak.sh soak_nats          one broker only (soak_nats | soak_rabbitmq | soak_redis | soak_kafka)
#   SOAK_ROUNDS=5 scripts/soak.sh      several rounds, a new seed each (stops at the first failure)
#
# SOAK_HEADERS=compact (or full) starts every relay with that header encoding; by default the
# relays started alternate between the two. SOAK_REFUSALS=0 leaves out the "broker refuses to store" faults; SOAK_RELAY_LOG=1 keeps the
# relays' logs. Each soak prints its seed first and a summary line at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
export SOAK_SECONDS="${SOAK_SECONDS:-600}"
rounds="${SOAK_ROUNDS:-1}"
filter="${1:-soak_}"
cargo build -p outbox-cli --tests >/dev/null
for round in $(seq 1 "$rounds"); do
  echo "soak round $round of $rounds (SOAK_SECONDS=$SOAK_SECONDS${SOAK_SEED:+ SOAK_SEED=$SOAK_SEED})" >&2
  cargo test -p outbox-cli --test soak "$filter" -- --nocapture --test-threads=1
done
