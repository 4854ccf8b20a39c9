#!/usr/bin/env bash
# Local stack for the demo, the tests and the benchmark: a throwaway PostgreSQL cluster
# (wal_level=logical, its own data directory and free port) and a tansu Kafka-protocol broker.
#
#   scripts/stack.sh up      start both (installs what is missing), print the env file path
#   scripts/stack.sh down    stop both and remove the data directory
#   scripts/stack.sh env     print the env file path of the running stack
#   scripts/stack.sh pg-start DIR PORT [OPTIONS], pg-stop DIR
#                            an extra cluster with settings of its own (one test uses it)
#
# The env file sets OUTBOXD_TEST_PG_URL (superuser URL of the cluster's `postgres` database)
# and OUTBOXD_TEST_KAFKA (bootstrap address of the broker). `source` it.
#
# Cached between runs (never required to exist): the tansu binary under
# ${OUTBOXD_CACHE:-$HOME/.cache/outboxd}. Built once from crates.io (about 15 minutes on
# 2 cores).
set -euo pipefail

TANSU_VERSION=0.6.0
CACHE=${OUTBOXD_CACHE:-$HOME/.cache/outboxd}
TANSU_ROOT=$CACHE/tansu-$TANSU_VERSION
TANSU=$TANSU_ROOT/bin/tansu
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
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then missing+=(postgresql); fi
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  # The tests parse the shipped YAML (compose, Kubernetes) with PyYAML.
  if ! python3 -c 'import yaml' 2>/dev/null; then
    log "installing PyYAML"
    python3 -m pip install --quiet pyyaml 2>/dev/null || apt_install python3-yaml
  fi
}

ensure_tansu() {
  if [ -x "$TANSU" ]; then return 0; fi
  log "building tansu $TANSU_VERSION once (cached in $TANSU_ROOT; ~15 minutes on 2 cores)"
  mkdir -p "$TANSU_ROOT"
  # The dynostore build keeps topics in memory and creates topics on first produce.
  cargo install tansu --version "$TANSU_VERSION" --locked --no-default-features \
    --features dynostore --root "$TANSU_ROOT" --quiet
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
  printf '%s\n' 'local all all trust' 'host all postgres 127.0.0.1/32 trust' \
    'host all all 127.0.0.1/32 scram-sha-256' >"$dir/pg_hba.conf"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/pg_hba.conf"; fi
  as_pg "$bindir/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w -t 60 start -o \
    "-c wal_level=logical -c max_replication_slots=200 -c max_wal_senders=50 \
     -c max_connections=300 -c port=$port -c listen_addresses=127.0.0.1 \
     -c unix_socket_directories=$dir/pg -c hba_file=$dir/pg_hba.conf \
     -c fsync=off -c synchronous_commit=on -c full_page_writes=off $extra" >/dev/null \
    || { tail -20 "$dir/pg/postgres.log" >&2; exit 1; }
}

stop_pg() {
  local dir=$1 bindir
  if [ -d "$dir/pg/data" ] && bindir=$(pg_bindir); then
    as_pg "$bindir/pg_ctl" -D "$dir/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
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
  ensure_tansu
  local pg_port kafka_port
  mkdir -p "$STACK_DIR"
  pg_port=$(free_port)
  start_pg "$STACK_DIR" "$pg_port" "-c max_slot_wal_keep_size=4GB"

  kafka_port=$(free_port)
  log "starting tansu $TANSU_VERSION on 127.0.0.1:$kafka_port"
  nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
    --storage-engine memory://tansu/ >"$STACK_DIR/tansu.log" 2>&1 &
  echo $! >"$STACK_DIR/tansu.pid"
  wait_port "$kafka_port" tansu || { tail -20 "$STACK_DIR/tansu.log" >&2; exit 1; }

  cat >"$STACK_DIR/env" <<EOF
export OUTBOXD_STACK_DIR=$STACK_DIR
export OUTBOXD_STACK_PG_PORT=$pg_port
export OUTBOXD_STACK_KAFKA_PORT=$kafka_port
export OUTBOXD_TEST_PG_URL=postgres://postgres@127.0.0.1:$pg_port/postgres
export OUTBOXD_TEST_KAFKA=127.0.0.1:$kafka_port
export OUTBOXD_TANSU_BIN=$TANSU
EOF
  log "up: PostgreSQL 127.0.0.1:$pg_port, Kafka (tansu) 127.0.0.1:$kafka_port; env in $STACK_DIR/env"
  echo "$STACK_DIR/env"
}

down() {
  if [ -f "$STACK_DIR/tansu.pid" ]; then
    kill "$(cat "$STACK_DIR/tansu.pid")" 2>/dev/null || true
    rm -f "$STACK_DIR/tansu.pid"
  fi
  stop_pg "$STACK_DIR"
  rm -rf "$STACK_DIR"
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) [ -f "$STACK_DIR/env" ] && echo "$STACK_DIR/env" ;;
  install) ensure_packages; ensure_tansu ;;
  pg-start) start_pg "$2" "$3" "${4:-}" ;;
  pg-stop) stop_pg "$2"; rm -rf "$2" ;;
  *) echo "usage: $0 up|down|env|install|pg-start DIR PORT [OPTIONS]|pg-stop DIR" >&2; exit 2 ;;
esac
