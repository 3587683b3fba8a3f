#!/usr/bin/env bash
# The whole test suite: makes sure PostgreSQL, NATS (JetStream) and RabbitMQ run, then runs every
# test of the workspace against them. Each test makes its own database and broker names.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo test --workspace --all-targets --locked "$@"
