#!/usr/bin/env bash
# Debezium's PostgreSQL connector with the Outbox EventRouter on Kafka Connect standalone,
# assembled from Maven Central jars — the relay outboxd's users come from, run beside it for
# the compatibility test, the switch-over test and the side-by-side benchmark.
#
#   bench/debezium/debezium.sh fetch
#       resolve the classpath (pom.xml: connect-runtime 4.3.1, debezium-connector-postgres
#       3.6.1.Final, log4j2 + its slf4j 1.7 binding) into ${OUTBOXD_CACHE:-~/.cache/outboxd}
#   bench/debezium/debezium.sh start DIR BOOTSTRAP PROPERTY=VALUE...
#       start a worker in DIR with connector.properties plus the given connector properties
#       (database.port, database.dbname, slot.name, publication.name,
#       transforms.outbox.route.topic.replacement, …; the later line wins); returns once the
#       task runs and its slot is active. DIR/connect.pid holds the worker's pid.
#   bench/debezium/debezium.sh stop DIR
#       SIGTERM (Connect commits its offsets, Debezium confirms the slot), SIGKILL after 30 s.
#
# Debezium Server 3.x needs Java 21; Connect standalone runs on the Java 17 here.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=$(sed -n 's#.*<debezium.version>\(.*\)</debezium.version>.*#\1#p' "$HERE/pom.xml")
CACHE=${OUTBOXD_CACHE:-$HOME/.cache/outboxd}
LIB=$CACHE/debezium-$VERSION/lib

log() { echo "debezium: $*" >&2; }

fetch() {
  [ -f "$LIB/.complete" ] && return 0
  log "fetching Kafka Connect and Debezium $VERSION jars from Maven Central (cached in $LIB)"
  rm -rf "$LIB"
  mkdir -p "$LIB"
  mvn -B -q -Dstyle.color=never -f "$HERE/pom.xml" \
    org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$LIB" >&2
  ls "$LIB" | grep -q '^log4j-slf4j-impl' || { log "log4j-slf4j-impl missing from $LIB"; exit 1; }
  touch "$LIB/.complete"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

prop() { # prop NAME FILE: the last value of NAME in FILE
  sed -n "s#^$1=##p" "$2" | tail -1
}

start() {
  local dir=$1 bootstrap=$2 rest i
  shift 2
  fetch
  mkdir -p "$dir"
  rest=$(free_port)
  sed -e "s#@BOOTSTRAP@#$bootstrap#" -e "s#@DIR@#$dir#" -e "s#@REST_PORT@#$rest#" \
    "$HERE/worker.properties" >"$dir/worker.properties"
  cp "$HERE/connector.properties" "$dir/connector.properties"
  for i in "$@"; do echo "$i" >>"$dir/connector.properties"; done
  echo "$rest" >"$dir/rest_port"
  local cp
  cp=$(find "$LIB" -name '*.jar' | sort | paste -sd: -)
  # shellcheck disable=SC2086
  nohup java -Xms128m -Xmx${DEBEZIUM_HEAP:-512m} -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$HERE/log4j2.xml" -cp "$cp" \
    org.apache.kafka.connect.cli.ConnectStandalone \
    "$dir/worker.properties" "$dir/connector.properties" >>"$dir/connect.log" 2>&1 &
  echo $! >"$dir/connect.pid"
  local url="http://127.0.0.1:$rest/connectors/outbox-connector/status"
  for i in $(seq 1 240); do
    if python3 - "$url" <<'PY'
import json, sys, urllib.request
try:
    d = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
except Exception:
    sys.exit(1)
tasks = d.get("tasks") or []
if any(t["state"] == "FAILED" for t in tasks):
    print(tasks, file=sys.stderr)
    sys.exit(2)
sys.exit(0 if tasks and all(t["state"] == "RUNNING" for t in tasks) else 1)
PY
    then break; fi
    kill -0 "$(cat "$dir/connect.pid")" 2>/dev/null || { tail -40 "$dir/connect.log" >&2; exit 1; }
    [ "$i" = 240 ] && { log "the connector did not start within 120 s"; tail -40 "$dir/connect.log" >&2; exit 1; }
    sleep 0.5
  done
  # Streaming has begun once the slot is active: rows committed before are not published.
  # An initial snapshot comes first (DEBEZIUM_STREAM_WAIT seconds, default 60).
  local port db slot wait=$(( ${DEBEZIUM_STREAM_WAIT:-60} * 2 ))
  port=$(prop database.port "$dir/connector.properties")
  db=$(prop database.dbname "$dir/connector.properties")
  slot=$(prop slot.name "$dir/connector.properties")
  for i in $(seq 1 "$wait"); do
    if [ "$(psql -h 127.0.0.1 -p "$port" -U postgres -d "$db" -Atc \
      "SELECT active FROM pg_replication_slots WHERE slot_name = '$slot'" 2>/dev/null)" = t ]; then
      log "streaming (slot $slot, REST 127.0.0.1:$rest)"
      return 0
    fi
    sleep 0.5
  done
  log "the connector's slot $slot never became active"; tail -40 "$dir/connect.log" >&2; exit 1
}

stop() {
  local dir=$1 pid i
  [ -f "$dir/connect.pid" ] || return 0
  pid=$(cat "$dir/connect.pid")
  kill -TERM "$pid" 2>/dev/null || { rm -f "$dir/connect.pid"; return 0; }
  for i in $(seq 1 120); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/connect.pid"
}

case "${1:-}" in
  fetch) fetch ;;
  start) shift; start "$@" ;;
  stop) stop "$2" ;;
  *) echo "usage: $0 fetch | start DIR BOOTSTRAP PROPERTY=VALUE... | stop DIR" >&2; exit 2 ;;
esac
