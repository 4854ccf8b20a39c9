#!/usr/bin/env bash
# Benchmark outboxd on the local stack (release build). Arguments go to examples/bench.rs:
#   scripts/bench.sh                               100,000 events, writers as fast as they can
#   scripts/bench.sh --rate 10000 --events 100000  steady 10,000 events/s (latency)
#   scripts/bench.sh --mode backlog                drain a pre-written backlog
#   scripts/bench.sh --extra-config 'delivery = "exactly-once"'   the same in exactly-once mode
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/stack.sh install
env_file=$(scripts/stack.sh up)
if [ -z "${KEEP:-}" ]; then trap 'scripts/stack.sh down' EXIT; fi
# shellcheck disable=SC1090
. "$env_file"
cargo build --release --quiet --bin outboxd --example bench
target/release/examples/bench "$@"
