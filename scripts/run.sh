#!/usr/bin/env bash
# The main job: makes sure PostgreSQL, NATS (JetStream) and RabbitMQ run, builds, applies the outbox
# migrations and runs the relay against DATABASE_URL (default: the local `root` database), serving
# /metrics, /healthz and /readyz on 127.0.0.1:9187. Extra arguments go to `outbox relay`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
export DATABASE_URL="${DATABASE_URL:-postgres://root@127.0.0.1:5432/root}"
cargo build --release --locked -p outbox-cli
exec target/release/outbox relay --migrate "$@"
