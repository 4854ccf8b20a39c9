#!/usr/bin/env bash
# Local stack for the demo, the tests and the benchmark: a throwaway PostgreSQL cluster
# (wal_level=logical, its own data directory and free port) and a single-node Apache Kafka
# 4.x broker in KRaft mode (its own data directory and free ports).
#
#   scripts/stack.sh up      start both (installs what is missing), print the env file path
#   scripts/stack.sh down    stop both and remove the data directory
#   scripts/stack.sh env     print the env file path of the running stack
#   scripts/stack.sh pg-start DIR PORT [OPTIONS], pg-stop DIR
#                            an extra cluster with settings of its own (one test uses it)
#   scripts/stack.sh tls-certs DIR
#                            a throwaway CA and server certificate (the TLS tests use them;
#                            OUTBOXD_PG_HBA then replaces pg-start's pg_hba.conf)
#   scripts/stack.sh kafka-start DIR, kafka-stop DIR
#                            an extra broker of its own (prints its bootstrap address)
#
# The env file sets OUTBOXD_TEST_PG_URL (superuser URL of the cluster's `postgres` database)
# and OUTBOXD_TEST_KAFKA (bootstrap address of the broker). `source` it.
#
# Kafka is `java -cp <jars> kafka.Kafka`: the jars come from Maven Central
# (scripts/kafka/pom.xml, resolved with maven-dependency-plugin) and are cached between runs
# under ${OUTBOXD_CACHE:-$HOME/.cache/outboxd} (never required to exist; ~45 MB, seconds to
# fetch). Java and Maven are installed from Debian's packages when missing.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
KAFKA_VERSION=$(sed -n 's#.*<kafka.version>\(.*\)</kafka.version>.*#\1#p' "$HERE/kafka/pom.xml")
CACHE=${OUTBOXD_CACHE:-$HOME/.cache/outboxd}
KAFKA_LIB=$CACHE/kafka-$KAFKA_VERSION/lib
STACK_DIR=${OUTBOXD_STACK_DIR:-/tmp/outboxd-stack-$(id -u)}

log() { echo "stack: $*" >&2; }

as_pg() {
  # PostgreSQL refuses to run as root.
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "missing packages: $*; install them (apt-get install $*) and retry"
    exit 1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

ensure_packages() {
  local missing=()
  pg_bindir >/dev/null || missing+=(postgresql)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v cc >/dev/null || missing+=(build-essential)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
  command -v python3 >/dev/null || missing+=(python3)
  command -v promtool >/dev/null || missing+=(prometheus)   # promtool validates /metrics and rules
  command -v openssl >/dev/null || missing+=(openssl)   # the TLS tests' throwaway CA
  command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then missing+=(postgresql); fi
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  # The tests parse the shipped YAML (compose, Kubernetes) with PyYAML.
  if ! python3 -c 'import yaml' 2>/dev/null; then
    log "installing PyYAML"
    python3 -m pip install --quiet pyyaml 2>/dev/null || apt_install python3-yaml
  fi
}

ensure_kafka() {
  if [ -f "$KAFKA_LIB/.complete" ]; then return 0; fi
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central (cached in $KAFKA_LIB)"
  rm -rf "$KAFKA_LIB"
  mkdir -p "$KAFKA_LIB"
  mvn -B -q -Dstyle.color=never -f "$HERE/kafka/pom.xml" \
    org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIB" >&2
  # Without the log4j2 slf4j binding the broker logs nothing and readiness is never seen.
  ls "$KAFKA_LIB" | grep -q '^log4j-slf4j-impl' || { log "log4j-slf4j-impl missing from $KAFKA_LIB"; exit 1; }
  touch "$KAFKA_LIB/.complete"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local port=$1 what=$2 i
  for i in $(seq 1 150); do
    if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  log "$what did not open port $port"
  return 1
}

# start_pg DIR PORT [OPTIONS]: a throwaway cluster in DIR/pg with wal_level=logical, its own
# port and socket directory, run as the postgres OS user when root.
start_pg() {
  local dir=$1 port=$2 extra=${3:-} bindir
  bindir=$(pg_bindir)
  mkdir -p "$dir/pg"
  chmod 755 "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/pg"; fi
  log "starting PostgreSQL ($bindir) on 127.0.0.1:$port"
  as_pg "$bindir/initdb" -D "$dir/pg/data" -U postgres --auth=trust -E UTF8 \
    --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
  # The superuser connects without a password; every other role must give its password, so
  # the tests can check what a wrong one does.
  if [ -n "${OUTBOXD_PG_HBA:-}" ]; then
    printf '%s\n' "$OUTBOXD_PG_HBA" >"$dir/pg_hba.conf"
  else
    printf '%s\n' 'local all all trust' 'host all postgres 127.0.0.1/32 trust' \
      'host all all 127.0.0.1/32 scram-sha-256' >"$dir/pg_hba.conf"
  fi
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/pg_hba.conf"; fi
  as_pg "$bindir/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w -t 60 start -o \
    "-c wal_level=logical -c max_replication_slots=200 -c max_wal_senders=50 \
     -c max_connections=300 -c port=$port -c listen_addresses=127.0.0.1 \
     -c unix_socket_directories=$dir/pg -c hba_file=$dir/pg_hba.conf \
     -c fsync=off -c synchronous_commit=on -c full_page_writes=off $extra" >/dev/null \
    || { tail -20 "$dir/pg/postgres.log" >&2; exit 1; }
}

# make_certs DIR: a throwaway CA (ca.pem), a server certificate it signed for DNS:localhost
# only (server.pem, server.key readable by the postgres OS user), and an unrelated CA
# (other-ca.pem) — for the TLS tests.
make_certs() {
  local d=$1
  mkdir -p "$d"
  chmod 755 "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=outboxd test CA" \
      -keyout ca.key -out ca.pem
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=unrelated CA" \
      -keyout other-ca.key -out other-ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf 'subjectAltName=DNS:localhost\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile san.ext -out server.pem
    chmod 600 server.key
    if [ "$(id -u)" = 0 ]; then chown postgres: server.key server.pem; fi
  ) >"$d/openssl.log" 2>&1 || { cat "$d/openssl.log" >&2; exit 1; }
}

stop_pg() {
  local dir=$1 bindir
  if [ -d "$dir/pg/data" ] && bindir=$(pg_bindir); then
    as_pg "$bindir/pg_ctl" -D "$dir/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
}

# start_kafka DIR [PROPERTY=VALUE...]: a single-node KRaft broker (combined broker and
# controller) in DIR with free ports; writes DIR/kafka.pid and DIR/bootstrap. Extra
# properties are appended to server.properties (the later line wins).
start_kafka() {
  local dir=$1 port ctl cid cp i
  shift
  port=$(free_port)
  ctl=$(free_port)
  mkdir -p "$dir/kafka-data"
  sed -e "s#@DATA_DIR@#$dir/kafka-data#" -e "s#@PORT@#$port#" -e "s#@CONTROLLER_PORT@#$ctl#" \
    -e "s#@NODE_ID@#1#" -e "s#@VOTERS@#1@127.0.0.1:$ctl#" -e "s#@REPLICAS@#1#" \
    "$HERE/kafka/server.properties" >"$dir/server.properties"
  for i in "$@"; do echo "$i" >>"$dir/server.properties"; done
  cp=$(find "$KAFKA_LIB" -name '*.jar' | sort | paste -sd: -)
  local jopts=(-Xms256m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$HERE/kafka/log4j2.xml")
  # The cluster id is a Kafka Uuid: url-safe base64 of 16 bytes without padding.
  cid=$(python3 -c 'import base64,os;print(base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode())')
  java "${jopts[@]}" -cp "$cp" kafka.tools.StorageTool format -t "$cid" \
    -c "$dir/server.properties" >"$dir/kafka-format.log" 2>&1 \
    || { cat "$dir/kafka-format.log" >&2; exit 1; }
  log "starting Apache Kafka $KAFKA_VERSION on 127.0.0.1:$port"
  nohup java "${jopts[@]}" -cp "$cp" kafka.Kafka "$dir/server.properties" >"$dir/kafka.log" 2>&1 &
  echo $! >"$dir/kafka.pid"
  for i in $(seq 1 120); do
    if grep -q 'Kafka Server started' "$dir/kafka.log"; then
      echo "127.0.0.1:$port" >"$dir/bootstrap"
      return 0
    fi
    kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null || { tail -30 "$dir/kafka.log" >&2; exit 1; }
    sleep 0.5
  done
  log "Kafka did not start within 60 s"; tail -30 "$dir/kafka.log" >&2; exit 1
}

stop_kafka() {
  local dir=$1 pid i
  [ -f "$dir/kafka.pid" ] || return 0
  pid=$(cat "$dir/kafka.pid")
  kill -TERM "$pid" 2>/dev/null || { rm -f "$dir/kafka.pid"; return 0; }
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/kafka.pid"
}

up() {
  if [ -f "$STACK_DIR/env" ]; then
    # shellcheck disable=SC1091
    . "$STACK_DIR/env"
    if (exec 3<>/dev/tcp/127.0.0.1/"$OUTBOXD_STACK_PG_PORT") 2>/dev/null \
      && (exec 3<>/dev/tcp/127.0.0.1/"$OUTBOXD_STACK_KAFKA_PORT") 2>/dev/null; then
      log "already running ($STACK_DIR)"
      echo "$STACK_DIR/env"
      return 0
    fi
    down
  fi
  ensure_packages
  ensure_kafka
  local pg_port kafka_port
  mkdir -p "$STACK_DIR"
  pg_port=$(free_port)
  start_pg "$STACK_DIR" "$pg_port" "-c max_slot_wal_keep_size=4GB"

  start_kafka "$STACK_DIR"
  kafka_port=$(cut -d: -f2 "$STACK_DIR/bootstrap")

  cat >"$STACK_DIR/env" <<EOF
export OUTBOXD_STACK_DIR=$STACK_DIR
export OUTBOXD_STACK_PG_PORT=$pg_port
export OUTBOXD_STACK_KAFKA_PORT=$kafka_port
export OUTBOXD_TEST_PG_URL=postgres://postgres@127.0.0.1:$pg_port/postgres
export OUTBOXD_TEST_KAFKA=127.0.0.1:$kafka_port
EOF
  log "up: PostgreSQL 127.0.0.1:$pg_port, Apache Kafka 127.0.0.1:$kafka_port; env in $STACK_DIR/env"
  echo "$STACK_DIR/env"
}

down() {
  stop_kafka "$STACK_DIR"
  stop_pg "$STACK_DIR"
  rm -rf "$STACK_DIR"
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) [ -f "$STACK_DIR/env" ] && echo "$STACK_DIR/env" ;;
  install) ensure_packages; ensure_kafka ;;
  pg-start) start_pg "$2" "$3" "${4:-}" ;;
  pg-stop) stop_pg "$2"; rm -rf "$2" ;;
  tls-certs) make_certs "$2" ;;
  kafka-start) dir=$2; shift 2; ensure_kafka; start_kafka "$dir" "$@"; cat "$dir/bootstrap" ;;
  kafka-stop) stop_kafka "$2"; rm -rf "$2" ;;
  *) echo "usage: $0 up|down|env|install|pg-start DIR PORT [OPTIONS]|pg-stop DIR|tls-certs DIR|kafka-start DIR [PROP=VALUE...]|kafka-stop DIR" >&2; exit 2 ;;
esac
