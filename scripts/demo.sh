#!/usr/bin/env bash
# The demo: a local stack, `outboxd migrate`, `outboxd run`, a few OrderPlaced events written
# in transactions (one rolled back), printed as they come out of Kafka with key and headers.
#   scripts/demo.sh           run the demo, then stop everything
#   KEEP=1 scripts/demo.sh    leave PostgreSQL, the broker and outboxd running
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/stack.sh install
env_file=$(scripts/stack.sh up)
# shellcheck disable=SC1090
. "$env_file"
cargo build --quiet --bin outboxd --example consume

TARGET=${CARGO_TARGET_DIR:-target}
OUTBOXD=$TARGET/debug/outboxd
export OUTBOXD_POSTGRES_URL="$OUTBOXD_TEST_PG_URL"
export OUTBOXD_KAFKA_BROKERS="$OUTBOXD_TEST_KAFKA"
PSQL=(psql -X -q -v ON_ERROR_STOP=1 "$OUTBOXD_POSTGRES_URL")

echo "== outboxd migrate"
$OUTBOXD migrate

echo "== outboxd run (logs in $OUTBOXD_STACK_DIR/outboxd.log)"
$OUTBOXD run >"$OUTBOXD_STACK_DIR/outboxd.log" 2>&1 &
relay=$!
cleanup() {
  if [ -z "${KEEP:-}" ]; then
    kill -TERM "$relay" 2>/dev/null || true
    wait "$relay" 2>/dev/null || true
    scripts/stack.sh down
  else
    echo "== left running: outboxd (pid $relay), stack env in $env_file"
  fi
}
trap cleanup EXIT

echo "== writing events: two committed transactions, one rolled back"
"${PSQL[@]}" <<'SQL'
BEGIN;
INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers)
VALUES ('order', 'order-1001', 'OrderPlaced', '{"orderId": 1001, "total": 25.50}', '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
VALUES ('order', 'order-1001', 'OrderPaid', '{"orderId": 1001}');
COMMIT;
BEGIN;
INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
VALUES ('order', 'order-1002', 'OrderPlaced', '{"orderId": 1002, "total": 99.00}');
ROLLBACK;
BEGIN;
INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
VALUES ('order', 'order-1003', 'OrderPlaced', '{"orderId": 1003, "total": 7.25}');
COMMIT;
SQL

echo "== consuming outbox.event.order (the rolled-back order-1002 must not appear)"
"$TARGET"/debug/examples/consume --brokers "$OUTBOXD_KAFKA_BROKERS" --topic outbox.event.order --count 3 --timeout-secs 60
