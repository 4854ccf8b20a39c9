#!/usr/bin/env bash
# Benchmark outboxd on the local stack (release build). Arguments go to examples/bench.rs:
#   scripts/bench.sh                               100,000 events, writers as fast as they can
#   scripts/bench.sh --rate 10000 --events 100000  steady 10,000 events/s (latency)
#   scripts/bench.sh --mode backlog                drain a pre-written backlog
#   scripts/bench.sh --extra-config 'delivery = "exactly-once"'   the same in exactly-once mode
#   scripts/bench.sh --compare debezium [args]     the same run for outboxd, then for Debezium
#                                                  (bench/debezium: Kafka Connect + EventRouter)
#   scripts/bench.sh --snapshot [--compare debezium] [--kind initial|incremental] [--rows N]
#                                                  a table of N rows (default 1,000,000)
#                                                  snapshotted (examples/bench_snapshot.rs):
#                                                  rows/s, CPU-s per 100k rows, peak RSS
#   scripts/bench.sh --sink nats|rabbitmq|sqs|sns|eventbridge|pubsub|servicebus [args]
#                                                  drain a backlog into a NATS JetStream stream /
#                                                  a RabbitMQ queue / an SQS queue of ElasticMQ /
#                                                  an SNS topic of moto with a queue subscribed /
#                                                  a bus of moto / a topic of Google's emulator /
#                                                  an AMQP 1.0 queue of Artemis (Service Bus)
#                                                  (examples/bench_sinks.rs; sqs, sns: --standard
#                                                  for a standard queue or topic, FIFO otherwise)
#   scripts/bench.sh --registry --encoding avro|json-schema [args]
#                                                  the same with an Apicurio Registry started
#                                                  first: events validated and written in the
#                                                  Confluent wire format (--encoding json:
#                                                  validated only, no registry needed)
#   scripts/bench.sh --tracing [args]              the same workload, every event with a sampled
#                                                  traceparent, twice in one run: [tracing] off,
#                                                  then on (spans to a Jaeger started first)
#   scripts/bench.sh --librdkafka [--base | --io-event] [--rate N --events N --txn-size N]
#                                                  librdkafka alone, configured as the relay
#                                                  configures it, producing the bench's records:
#                                                  the floor under the relay's Kafka side
#                                                  (examples/bench_librdkafka.rs): through
#                                                  FutureProducer on tokio (as the relay), its
#                                                  C interface on one thread (--base), or reports
#                                                  served on the runtime via a pipe (--io-event)
#   scripts/bench.sh --cdc [--compare debezium] [args]
#                                                  table CDC: a 10-column table, insert/update/
#                                                  delete mix (examples/bench_cdc.rs); the same
#                                                  --mode, --rate, --events
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/stack.sh install debezium
env_file=$(scripts/stack.sh up)
if [ -z "${KEEP:-}" ]; then trap 'scripts/stack.sh down' EXIT; fi
# shellcheck disable=SC1090
. "$env_file"
# Every relay a benchmark starts checks each confirmation against its delivery ledger
# (src/ledger.rs): a violation stops it with exit code 3.
export OUTBOXD_CHECK_LEDGER=1
# The relay as users build it (`--release`: whole-program LTO); the harness without it.
cargo build --release --quiet --bin outboxd
cargo build --profile bench-tools --quiet --example bench --example bench_sinks --example bench_cdc --example bench_snapshot --example bench_librdkafka
tools="${CARGO_TARGET_DIR:-target}"/bench-tools/examples
example=bench
if [ "${1:-}" = "--registry" ]; then
  registry_dir=$(mktemp -d /tmp/outboxd-bench-registry.XXXXXX)
  trap 'scripts/stack.sh broker-stop "$registry_dir" --remove; [ -n "${KEEP:-}" ] || scripts/stack.sh down' EXIT
  OUTBOXD_BENCH_REGISTRY=$(scripts/stack.sh apicurio-start "$registry_dir")
  export OUTBOXD_BENCH_REGISTRY
  shift
fi
if [ "${1:-}" = "--tracing" ]; then
  shift
  jaeger_dir=$(mktemp -d /tmp/outboxd-bench-jaeger.XXXXXX)
  trap 'scripts/stack.sh broker-stop "$jaeger_dir" --remove; [ -n "${KEEP:-}" ] || scripts/stack.sh down' EXIT
  read -r _ otlp_http _ <<<"$(scripts/stack.sh jaeger-start "$jaeger_dir")"
  echo "== tracing off"
  "$tools"/bench --traced "$@"
  echo "== tracing on (every event sampled, OTLP/HTTP to Jaeger)"
  "$tools"/bench --traced "$@" \
    --extra-config "$(printf '[tracing]\nenabled = true\nendpoint = "%s"\n' "$otlp_http")"
  exit 0
fi
if [ "${1:-}" = "--librdkafka" ]; then
  shift
  "$tools"/bench_librdkafka "$@"
  exit 0
fi
if [ "${1:-}" = "--cdc" ]; then
  example=bench_cdc
  shift
elif [ "${1:-}" = "--snapshot" ]; then
  example=bench_snapshot
  # Debezium streams only after its initial snapshot of the whole table.
  export DEBEZIUM_STREAM_WAIT=1800
  shift
fi
if [ "${1:-}" = "--sink" ]; then
  sink=${2:?--sink needs nats, rabbitmq, sqs, sns, eventbridge, pubsub or servicebus}
  shift 2
  broker_dir=$(mktemp -d /tmp/outboxd-bench-broker.XXXXXX)
  trap 'scripts/stack.sh broker-stop "$broker_dir" --remove; [ -n "${KEEP:-}" ] || scripts/stack.sh down' EXIT
  # sqs: ElasticMQ holding messages in memory (its H2 store would be what is measured);
  # sns: moto's AWS emulator.
  case "$sink" in
    sqs) url=$(scripts/stack.sh elasticmq-start "$broker_dir" memory) ;;
    sns | eventbridge) url=$(scripts/stack.sh moto-start "$broker_dir") ;;
    servicebus) url=$(scripts/stack.sh artemis-start "$broker_dir" outboxd-bench outboxd-bench-dlq) ;;
    *) url=$(scripts/stack.sh "$sink-start" "$broker_dir") ;;
  esac
  "$tools"/bench_sinks --sink "$sink" --url "$url" "$@"
elif [ "${1:-}" = "--compare" ]; then
  other=${2:?--compare needs a system: debezium}
  shift 2
  for system in outboxd "$other"; do
    echo "== $system"
    "$tools"/$example --system "$system" "$@"
  done
else
  "$tools"/$example "$@"
fi
