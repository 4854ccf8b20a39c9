#!/usr/bin/env bash
# Local stack for the demo, the tests and the benchmark: a throwaway PostgreSQL cluster
# (wal_level=logical, its own data directory and free port) and a single-node Apache Kafka
# 4.x broker in KRaft mode (its own data directory and free ports).
#
#   scripts/stack.sh up      start both (installs what is missing), print the env file path
#   scripts/stack.sh install [debezium]
#                            install what is missing (with `debezium`: its jars too)
#   scripts/stack.sh down    stop both and remove the data directory
#   scripts/stack.sh env     print the env file path of the running stack
#   scripts/stack.sh pg-start DIR PORT [OPTIONS], pg-stop DIR, pg-crash-restart DIR
#                            an extra cluster with settings of its own (one test uses it)
#   scripts/stack.sh tls-certs DIR
#                            a throwaway CA and server certificate (the TLS tests use them;
#                            OUTBOXD_PG_HBA then replaces pg-start's pg_hba.conf)
#   scripts/stack.sh kafka-start DIR [PROP=VALUE...], kafka-stop DIR
#                            an extra broker of its own (prints its bootstrap address)
#   scripts/stack.sh kafka-start-sasl DIR USER PASSWORD
#                            an extra broker with a SASL_SSL (SCRAM-SHA-256) listener on
#                            localhost and a throwaway CA in DIR/certs (prints that address)
#   scripts/stack.sh kafka-cluster-start DIR N [PROP=VALUE...]
#                            an N-node KRaft cluster, replication N, min.insync.replicas N-1
#   scripts/stack.sh kafka-node-kill DIR I, kafka-node-start DIR I
#                            SIGKILL node I of that cluster / start it again on its data
#   scripts/stack.sh nats-start DIR [CERTDIR], rabbitmq-start DIR [CERTDIR]
#                            a NATS server (JetStream) / RabbitMQ node of its own in DIR
#                            (prints its URL; started again on the same DIR, it keeps its
#                            port and data); with CERTDIR (tls-certs) NATS is TLS-only and
#                            RabbitMQ adds an AMQPS listener (its URL in DIR/tls_url)
#   scripts/stack.sh rabbitmq-ctl DIR ARGS...
#                            rabbitmqctl against that RabbitMQ node (e.g. a memory alarm)
#   scripts/stack.sh elasticmq-start DIR [memory]
#                            ElasticMQ (an SQS-compatible server, jars from Maven Central) of
#                            its own in DIR, messages kept in DIR (H2) — in memory only with
#                            `memory` (faster; a restart loses them) — port kept in DIR/port;
#                            prints its endpoint URL (the SQS sink's tests)
#   scripts/stack.sh moto-start DIR [AUTH]
#                            moto's server (an AWS emulator: SQS, SNS, EventBridge, STS, IAM)
#                            in DIR; with AUTH = 1 it checks every request's signature and
#                            access key (INITIAL_NO_AUTH_ACTION_COUNT=3: three calls to set up a
#                            user first); prints its endpoint URL
#   scripts/stack.sh pubsub-start DIR
#                            Google's Pub/Sub emulator (the Debian package
#                            google-cloud-cli-pubsub-emulator, Java) of its own in DIR, port kept
#                            in DIR/port; prints its endpoint URL (in memory: a restart loses
#                            its topics)
#   scripts/stack.sh artemis-start DIR [QUEUE...]
#                            Apache ActiveMQ Artemis (AMQP 1.0; from Maven Central) of its own in
#                            DIR: login outboxd/secret, the anycast queues named (created with
#                            the instance; addresses are not auto-created, so a send to another
#                            is refused `amqp:not-found`, as Service Bus does), messages
#                            journaled in DIR; prints its amqp:// URL (the Service Bus tests)
#   scripts/stack.sh apicurio-start DIR
#                            Apicurio Registry 3.3.3 (Maven Central, ~158 MB, cached; a Java 21+
#                            runtime: the Temurin JDK under /usr/lib/jvm) of its own, its H2
#                            database a file in DIR (a restart keeps the schemas); prints its
#                            Confluent-compatible API URL (…/apis/ccompat/v7)
#   scripts/stack.sh jaeger-build [--background]
#                            Jaeger v1.75.0 (its all-in-one binary, built from the Go module
#                            proxy: ~25 s to fetch, ~3-4 min to build on 2 cores, then cached);
#                            --background starts the build niced and returns (the tests that
#                            need it wait for the binary, or jaeger.failed, in the cache)
#   scripts/stack.sh jaeger-start DIR
#                            that Jaeger of its own: OTLP gRPC and HTTP receivers and the query
#                            API on free ports, in-memory storage; prints
#                            "OTLP_GRPC_URL OTLP_HTTP_URL QUERY_URL"
#   scripts/stack.sh python-consumer
#                            a Python with confluent-kafka's schema-registry deserializers (PyPI,
#                            a virtualenv in the cache); prints the interpreter
#   scripts/stack.sh broker-kill DIR, broker-stop DIR [--remove]
#                            SIGKILL / stop that server (--remove: and its directory)
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
ELASTICMQ_VERSION=$(sed -n 's#.*<elasticmq.version>\(.*\)</elasticmq.version>.*#\1#p' "$HERE/elasticmq/pom.xml")
ELASTICMQ_LIB=$CACHE/elasticmq-$ELASTICMQ_VERSION/lib
ARTEMIS_VERSION=2.40.0
ARTEMIS_HOME=$CACHE/artemis-$ARTEMIS_VERSION/apache-artemis-$ARTEMIS_VERSION
APICURIO_VERSION=3.3.3
APICURIO_HOME=$CACHE/apicurio-registry-$APICURIO_VERSION
# v1.75.0, not the v1.76.0 the issue names: the machine notes say the module proxy serves
# 1.76 but it is not an approved release.
JAEGER_VERSION=1.75.0
JAEGER_HOME=$CACHE/jaeger-$JAEGER_VERSION
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
  command -v nats-server >/dev/null || missing+=(nats-server)          # the NATS sink's tests
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)   # the RabbitMQ sink's
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then missing+=(postgresql); fi
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  # The tests parse the shipped YAML (compose, Kubernetes) with PyYAML.
  if ! python3 -c 'import yaml' 2>/dev/null; then
    log "installing PyYAML"
    python3 -m pip install --quiet pyyaml 2>/dev/null || apt_install python3-yaml
  fi
}

# fetch_jars POM LIB WHAT: the runtime classpath of POM from Maven Central into LIB (once;
# LIB/.complete marks a finished copy).
fetch_jars() {
  local pom=$1 lib=$2 what=$3
  if [ -f "$lib/.complete" ]; then return 0; fi
  log "fetching $what jars from Maven Central (cached in $lib)"
  rm -rf "$lib"
  mkdir -p "$lib"
  mvn -B -q -Dstyle.color=never -f "$pom" \
    org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$lib" >&2
}

ensure_kafka() {
  if [ -f "$KAFKA_LIB/.complete" ]; then return 0; fi
  fetch_jars "$HERE/kafka/pom.xml" "$KAFKA_LIB" "Apache Kafka $KAFKA_VERSION"
  # Without the log4j2 slf4j binding the broker logs nothing and readiness is never seen.
  ls "$KAFKA_LIB" | grep -q '^log4j-slf4j-impl' || { log "log4j-slf4j-impl missing from $KAFKA_LIB"; exit 1; }
  touch "$KAFKA_LIB/.complete"
}

ensure_elasticmq() {
  if [ -f "$ELASTICMQ_LIB/.complete" ]; then return 0; fi
  fetch_jars "$HERE/elasticmq/pom.xml" "$ELASTICMQ_LIB" "ElasticMQ $ELASTICMQ_VERSION"
  touch "$ELASTICMQ_LIB/.complete"
}

# moto's server comes with the moto package (preinstalled on these machines; else PyPI).
ensure_moto() {
  command -v moto_server >/dev/null && return 0
  log "installing moto[server] from PyPI"
  python3 -m pip install --quiet 'moto[server]>=5.1' >&2
}

# python_consumer: a Python with confluent-kafka's schema-registry deserializers (PyPI), in a
# virtualenv in the cache; prints its interpreter. The tests decode the relay's Avro records
# with it — a real consumer, not outboxd's code.
CONFLUENT_KAFKA_VERSION=2.16.2
python_consumer() {
  local venv=$CACHE/python-consumer-$CONFLUENT_KAFKA_VERSION
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import confluent_kafka.schema_registry.avro, confluent_kafka.schema_registry.json_schema' 2>/dev/null; then
    log "installing confluent-kafka[avro,json,schemaregistry] $CONFLUENT_KAFKA_VERSION from PyPI"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet "confluent-kafka[avro,json,schemaregistry]==$CONFLUENT_KAFKA_VERSION" >&2
  fi
  echo "$venv/bin/python"
}

# pubsub_jar: the Pub/Sub emulator's jar, from the google-cloud-cli-pubsub-emulator package
# (installed with apt when missing — it comes from Google's Cloud SDK repository, which this
# kind of machine has configured).
pubsub_jar() {
  local jar
  jar=$(dpkg -L google-cloud-cli-pubsub-emulator 2>/dev/null | grep -m1 'all\.jar$' || true)
  if [ -z "$jar" ]; then
    log "installing google-cloud-cli-pubsub-emulator"
    apt-get install -y -q google-cloud-cli-pubsub-emulator >&2 || true
    jar=$(dpkg -L google-cloud-cli-pubsub-emulator 2>/dev/null | grep -m1 'all\.jar$' || true)
  fi
  if [ -z "$jar" ]; then
    log "the Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator) is not installed and could not be"
    return 1
  fi
  echo "$jar"
}

start_pubsub() {
  local dir=$1 port jar
  jar=$(pubsub_jar)
  mkdir -p "$dir"
  [ -f "$dir/port" ] || free_port >"$dir/port"
  port=$(cat "$dir/port")
  setsid java -Xms32m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -jar "$jar" --host=127.0.0.1 --port="$port" </dev/null >>"$dir/pubsub.log" 2>&1 &
  echo $! >"$dir/pubsub.pid"
  wait_port "$port" pubsub-emulator
  echo "http://127.0.0.1:$port" >"$dir/url"
}

# free_port: a port nobody listens on, chosen at random *below* the kernel's ephemeral range
# (ip_local_port_range, 32768+ here). A port from bind(0) is ephemeral: until the server binds
# it, any outgoing connection on the machine may take it as its source port — measured as
# "Unable to start acceptor" in one test run of 137. Below the range only listeners compete.
free_port() {
  python3 - <<'EOF'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(1000):
    port = random.randrange(20000, min(low, 32768))
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
EOF
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
  printf '%s\n%s\n' "$port" "$extra" >"$dir/pg/start-args"
  pg_ctl_start "$dir" "$port" "$extra"
}

pg_ctl_start() {
  local dir=$1 port=$2 extra=$3 bindir
  bindir=$(pg_bindir)
  as_pg "$bindir/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w -t 60 start -o \
    "-c wal_level=logical -c max_replication_slots=400 -c max_wal_senders=50 \
     -c max_connections=300 -c port=$port -c listen_addresses=127.0.0.1 \
     -c unix_socket_directories=$dir/pg -c hba_file=$dir/pg_hba.conf \
     -c fsync=off -c synchronous_commit=on -c full_page_writes=off $extra" >/dev/null \
    || { tail -20 "$dir/pg/postgres.log" >&2; exit 1; }
}

# crash_restart_pg DIR: an immediate stop (every backend killed, crash recovery on start, as
# after a power cut of the server process) and a start with the same options.
crash_restart_pg() {
  local dir=$1 port extra
  stop_pg "$dir"
  port=$(sed -n 1p "$dir/pg/start-args")
  extra=$(sed -n 2p "$dir/pg/start-args")
  pg_ctl_start "$dir" "$port" "$extra"
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

kafka_classpath() { find "$KAFKA_LIB" -name '*.jar' | sort | paste -sd: -; }

kafka_jopts() {
  # ${KAFKA_HEAP:-512m}: the 3-node cluster gives each node less.
  echo "-Xms128m -Xmx${KAFKA_HEAP:-512m} -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile=$HERE/kafka/log4j2.xml"
}

# kafka_node_config DIR NODE_ID PORT CONTROLLER_PORT VOTERS REPLICAS [PROPERTY=VALUE...]:
# writes DIR/server.properties from the template; extra properties are appended (the later
# line wins).
kafka_node_config() {
  local dir=$1 id=$2 port=$3 ctl=$4 voters=$5 replicas=$6 i
  shift 6
  mkdir -p "$dir/kafka-data"
  sed -e "s#@DATA_DIR@#$dir/kafka-data#" -e "s#@PORT@#$port#" -e "s#@CONTROLLER_PORT@#$ctl#" \
    -e "s#@NODE_ID@#$id#" -e "s#@VOTERS@#$voters#" -e "s#@REPLICAS@#$replicas#" \
    "$HERE/kafka/server.properties" >"$dir/server.properties"
  for i in "$@"; do echo "$i" >>"$dir/server.properties"; done
  echo "127.0.0.1:$port" >"$dir/bootstrap"
}

# kafka_format DIR CLUSTER_ID [STORAGE-TOOL ARGS...]
kafka_format() {
  local dir=$1 cid=$2
  shift 2
  # shellcheck disable=SC2046
  java $(kafka_jopts) -cp "$(kafka_classpath)" kafka.tools.StorageTool format --cluster-id="$cid" \
    -c "$dir/server.properties" "$@" >"$dir/kafka-format.log" 2>&1 \
    || { cat "$dir/kafka-format.log" >&2; exit 1; }
}

# kafka_launch DIR: starts the node formatted in DIR (again after a kill: same data).
kafka_launch() {
  local dir=$1
  # Every collection's pause in DIR/kafka-gc.log, stamped with the wall clock in ms: a
  # latency tail measured through the broker may be its pauses (examples/support/broker_gc.rs).
  # shellcheck disable=SC2046
  nohup java $(kafka_jopts) "-Xlog:gc:file=$dir/kafka-gc.log:timemillis" \
    -cp "$(kafka_classpath)" kafka.Kafka "$dir/server.properties" \
    >>"$dir/kafka.log" 2>&1 &
  echo $! >"$dir/kafka.pid"
}

# kafka_wait DIR: until the node in DIR logged that it started (the log is appended to, so
# count the lines).
kafka_wait() {
  local dir=$1 want=${2:-1} i
  for i in $(seq 1 180); do
    local started
    started=$(grep -c 'Kafka Server started' "$dir/kafka.log" 2>/dev/null || true)
    if [ "${started:-0}" -ge "$want" ]; then
      return 0
    fi
    if ! kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; then
      # A free port can be taken by another process before the broker binds it: the
      # caller picks others (KAFKA_RETRY_BIND=1), instead of failing the test.
      if [ "${KAFKA_RETRY_BIND:-}" = 1 ] && grep -q 'Address already in use' "$dir/kafka.log"; then
        return 2
      fi
      tail -30 "$dir/kafka.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  log "Kafka ($dir) did not start within 90 s"; tail -30 "$dir/kafka.log" >&2; exit 1
}

new_cluster_id() {
  # A Kafka Uuid: url-safe base64 of 16 bytes without padding — never one starting with '-'
  # (1 in 64 would: the storage tool then reads it as an option and refuses to format).
  python3 -c '
import base64, os
while True:
    u = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    if not u.startswith("-"):
        print(u)
        break'
}

# start_kafka DIR [PROPERTY=VALUE...]: a single-node KRaft broker (combined broker and
# controller) in DIR with free ports; writes DIR/kafka.pid and DIR/bootstrap.
start_kafka() {
  local dir=$1 port ctl attempt
  shift
  for attempt in 1 2 3; do
    port=$(free_port)
    ctl=$(free_port)
    rm -rf "$dir/kafka-data" "$dir/kafka.log"
    kafka_node_config "$dir" 1 "$port" "$ctl" "1@127.0.0.1:$ctl" 1 "$@"
    kafka_format "$dir" "$(new_cluster_id)"
    log "starting Apache Kafka $KAFKA_VERSION on 127.0.0.1:$port"
    kafka_launch "$dir"
    if KAFKA_RETRY_BIND=1 kafka_wait "$dir"; then
      return 0
    fi
    log "a port was taken before Kafka bound it; picking others (attempt $attempt of 3)"
  done
  exit 1
}

# start_kafka_sasl DIR USER PASSWORD: a single-node broker with a second listener,
# SASL_SSL on localhost (SCRAM-SHA-256, USER/PASSWORD created at format time, certificate
# for DNS:localhost from a throwaway CA in DIR/certs: ca.pem, other-ca.pem). DIR/bootstrap
# holds the plaintext address, DIR/sasl_bootstrap the SASL_SSL one.
start_kafka_sasl() {
  local dir=$1 user=$2 password=$3 port ctl sasl ks_pass attempt
  make_certs "$dir/certs"
  ks_pass=$(new_cluster_id)
  openssl pkcs12 -export -in "$dir/certs/server.pem" -inkey "$dir/certs/server.key" \
    -name localhost -out "$dir/certs/server.p12" -passout "pass:$ks_pass" 2>>"$dir/certs/openssl.log"
  # Another test's listener may take a port between the choice and the bind: as start_kafka.
  for attempt in 1 2 3; do
    port=$(free_port)
    ctl=$(free_port)
    sasl=$(free_port)
    rm -rf "$dir/kafka-data" "$dir/kafka.log"
    kafka_node_config "$dir" 1 "$port" "$ctl" "1@127.0.0.1:$ctl" 1 \
      "listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl,SASL_SSL://localhost:$sasl" \
      "advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://localhost:$sasl" \
      "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL" \
      "sasl.enabled.mechanisms=SCRAM-SHA-256" \
      "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;" \
      "ssl.keystore.type=PKCS12" "ssl.keystore.location=$dir/certs/server.p12" \
      "ssl.keystore.password=$ks_pass" "ssl.key.password=$ks_pass"
    kafka_format "$dir" "$(new_cluster_id)" --add-scram "SCRAM-SHA-256=[name=$user,password=$password]"
    log "starting Apache Kafka $KAFKA_VERSION on 127.0.0.1:$port, SASL_SSL on localhost:$sasl"
    kafka_launch "$dir"
    if KAFKA_RETRY_BIND=1 kafka_wait "$dir"; then
      echo "localhost:$sasl" >"$dir/sasl_bootstrap"
      return 0
    fi
    log "a port was taken before Kafka bound it; picking others (attempt $attempt of 3)"
  done
  exit 1
}

# start_kafka_cluster DIR N [PROPERTY=VALUE...]: N combined broker+controller nodes in
# DIR/node1..N (small heaps), replication factor N for internal and new topics,
# min.insync.replicas=N-1. DIR/bootstrap lists every node.
start_kafka_cluster() {
  local dir=$1 n=$2 i voters="" ports=() ctls=()
  shift 2
  for i in $(seq 1 "$n"); do
    ports[$i]=$(free_port)
    ctls[$i]=$(free_port)
    voters="${voters:+$voters,}$i@127.0.0.1:${ctls[$i]}"
  done
  local cid
  cid=$(new_cluster_id)
  for i in $(seq 1 "$n"); do
    kafka_node_config "$dir/node$i" "$i" "${ports[$i]}" "${ctls[$i]}" "$voters" "$n" \
      "min.insync.replicas=$((n - 1))" "transaction.state.log.min.isr=$((n - 1))" "$@"
    KAFKA_HEAP=256m kafka_format "$dir/node$i" "$cid"
  done
  log "starting a $n-node Apache Kafka $KAFKA_VERSION cluster in $dir"
  for i in $(seq 1 "$n"); do KAFKA_HEAP=256m kafka_launch "$dir/node$i"; done
  for i in $(seq 1 "$n"); do kafka_wait "$dir/node$i"; done
  cat "$dir"/node*/bootstrap | paste -sd, - >"$dir/bootstrap"
}

kill_pid_file() {
  local f=$1 signal=$2 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill "-$signal" "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  for i in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

stop_kafka() {
  local dir=$1 f
  for f in "$dir/kafka.pid" "$dir"/node*/kafka.pid; do
    [ -f "$f" ] && kill_pid_file "$f" TERM
  done
  return 0
}

# start_nats DIR [CERTDIR]: nats-server with JetStream, its store in DIR/js, on 127.0.0.1 and
# a free port (kept in DIR/port, so a restart on the same DIR listens where clients
# reconnect). With CERTDIR (from tls-certs): TLS only, with CERTDIR's server certificate
# (CN localhost), and the URL is tls://localhost:PORT.
start_nats() {
  local dir=$1 certs=${2:-} port tls=()
  mkdir -p "$dir"
  [ -f "$dir/port" ] || free_port >"$dir/port"
  port=$(cat "$dir/port")
  if [ -n "$certs" ]; then
    tls=(--tls --tlscert "$certs/server.pem" --tlskey "$certs/server.key")
  fi
  # NATS_USER / NATS_PASS: require that login (the auth test).
  if [ -n "${NATS_USER:-}" ]; then
    tls+=(--user "$NATS_USER" --pass "${NATS_PASS:-}")
  fi
  setsid nats-server -a 127.0.0.1 -p "$port" -js -sd "$dir/js" -l "$dir/nats.log" "${tls[@]}" \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/nats.pid"
  wait_port "$port" nats-server
  if [ -n "$certs" ]; then
    echo "tls://localhost:$port" >"$dir/url"
  else
    echo "nats://127.0.0.1:$port" >"$dir/url"
  fi
}

# start_rabbitmq DIR [CERTDIR]: a RabbitMQ node of its own (name, AMQP, distribution and
# epmd ports, data and log directories in DIR), run as the rabbitmq user when root. With
# CERTDIR (from tls-certs) it also listens for AMQPS on 127.0.0.1 with CERTDIR's server
# certificate, and DIR/tls_url is amqps://…@localhost:PORT. Ready when the node log says so
# (~3 s); prints nothing on stdout.
# rabbitmq_ctl DIR ARGS...: rabbitmqctl against the node started in DIR (its name, epmd port
# and cookie), e.g. `set_vm_memory_high_watermark 0.0000001` to raise a memory alarm.
rabbitmq_ctl() {
  local dir=$1 amqp dist epmd amqps
  shift
  read -r amqp dist epmd amqps <"$dir/ports"
  local run=()
  if [ "$(id -u)" = 0 ]; then run=(runuser -u rabbitmq --); fi
  "${run[@]}" env HOME="$dir/home" ERL_EPMD_PORT="$epmd" \
    /usr/lib/rabbitmq/bin/rabbitmqctl -n "outboxd$amqp@localhost" "$@"
}

start_rabbitmq() {
  local dir=$1 certs=${2:-} name
  mkdir -p "$dir/home"
  if [ ! -f "$dir/ports" ]; then
    echo "$(free_port) $(free_port) $(free_port) $(free_port)" >"$dir/ports"
    echo '[].' >"$dir/enabled_plugins"
  fi
  read -r amqp dist epmd amqps <"$dir/ports"
  : >"$dir/rabbitmq.conf"
  if [ -n "$certs" ]; then
    mkdir -p "$dir/tls"
    cp "$certs/ca.pem" "$certs/server.pem" "$certs/server.key" "$dir/tls/"
    {
      echo "listeners.ssl.1 = 127.0.0.1:$amqps"
      echo "ssl_options.cacertfile = $dir/tls/ca.pem"
      echo "ssl_options.certfile = $dir/tls/server.pem"
      echo "ssl_options.keyfile = $dir/tls/server.key"
      echo "ssl_options.verify = verify_none"
      echo "ssl_options.fail_if_no_peer_cert = false"
    } >"$dir/rabbitmq.conf"
  fi
  name="outboxd$amqp@localhost"
  local run=()
  if [ "$(id -u)" = 0 ]; then
    chown -R rabbitmq: "$dir"
    run=(runuser -u rabbitmq --)
  fi
  local before
  before=$(count_lines "$dir/log/$name.log" 'Server startup complete')
  setsid "${run[@]}" env HOME="$dir/home" RABBITMQ_NODENAME="$name" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$amqp" \
    RABBITMQ_DIST_PORT="$dist" ERL_EPMD_PORT="$epmd" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    /usr/lib/rabbitmq/bin/rabbitmq-server </dev/null >"$dir/stdout" 2>&1 &
  echo $! >"$dir/rabbitmq.pid"
  if ! wait_log "$dir/log/$name.log" 'Server startup complete' "$before" "$dir/rabbitmq.pid"; then
    log "RabbitMQ did not start in $dir:"; tail -20 "$dir/stdout" >&2
    return 1
  fi
  echo "amqp://guest:guest@127.0.0.1:$amqp/%2f" >"$dir/url"
  if [ -n "$certs" ]; then echo "amqps://guest:guest@localhost:$amqps/%2f" >"$dir/tls_url"; fi
}

# count_lines FILE PATTERN: how many lines of FILE match (0 when it does not exist).
count_lines() {
  local n=0
  [ -f "$1" ] && n=$(grep -c "$2" "$1" || true)
  echo "${n:-0}"
}

# wait_log FILE PATTERN BEFORE PIDFILE: until FILE has more than BEFORE lines matching
# PATTERN (a server appends a start line each time it starts), 30 s at most; fails at once
# when the process in PIDFILE is gone.
wait_log() {
  local file=$1 pattern=$2 before=$3 pidfile=$4 i
  for i in $(seq 1 300); do
    if [ "$(count_lines "$file" "$pattern")" -gt "$before" ]; then return 0; fi
    kill -0 "$(cat "$pidfile")" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# start_elasticmq DIR: ElasticMQ on 127.0.0.1 and a port kept in DIR/port (a restart on the
# same DIR listens where clients reconnect), its queues and messages in DIR (an H2 database
# written at every commit — with H2's default write delay a SIGKILL lost what ElasticMQ had
# acknowledged; ElasticMQ ignores SIGTERM for over 10 s, so a stop is a kill too). The
# deduplication ids of messages already deleted do not survive a restart (SQS keeps them 5
# minutes).
start_elasticmq() {
  local dir=$1 memory=${2:-} port before storage=true
  ensure_elasticmq
  mkdir -p "$dir"
  [ -f "$dir/port" ] || free_port >"$dir/port"
  port=$(cat "$dir/port")
  [ "$memory" = memory ] && storage=false
  cat >"$dir/elasticmq.conf" <<EOF
include classpath("application.conf")
node-address { protocol = http, host = "127.0.0.1", port = $port, context-path = "" }
rest-sqs { enabled = true, bind-port = $port, bind-hostname = "127.0.0.1", sqs-limits = strict }
rest-stats { enabled = false }
queues-storage { enabled = $storage, path = "$dir/queues.conf" }
messages-storage { enabled = $storage, uri = "jdbc:h2:$dir/messages;WRITE_DELAY=0" }
aws { region = "us-east-1", accountId = "000000000000" }
EOF
  before=$(count_lines "$dir/elasticmq.log" 'Started SQS rest server')
  setsid java -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dconfig.file="$dir/elasticmq.conf" -cp "$ELASTICMQ_LIB/*" org.elasticmq.server.Main \
    </dev/null >>"$dir/elasticmq.log" 2>&1 &
  echo $! >"$dir/elasticmq.pid"
  if ! wait_log "$dir/elasticmq.log" 'Started SQS rest server' "$before" "$dir/elasticmq.pid"; then
    log "ElasticMQ did not start in $dir:"; tail -20 "$dir/elasticmq.log" >&2
    return 1
  fi
  echo "http://127.0.0.1:$port" >"$dir/url"
}

# fetch_archive ARTIFACT DEST: a tar.gz from Maven Central (group:artifact:version:tar.gz:
# classifier) unpacked into DEST, atomically: a concurrent start sees all of it or none.
fetch_archive() {
  local artifact=$1 dest=$2 tmp
  mkdir -p "$CACHE"
  tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  mvn -B -q -Dstyle.color=never dependency:copy -Dartifact="$artifact" -DoutputDirectory="$tmp" >&2
  mkdir -p "$tmp/unpacked"
  tar xzf "$tmp"/*.tar.gz -C "$tmp/unpacked"
  mv "$tmp/unpacked" "$dest" 2>/dev/null || true
  rm -rf "$tmp"
}

# ensure_artemis: Artemis's binary distribution, in the cache.
ensure_artemis() {
  [ -x "$ARTEMIS_HOME/bin/artemis" ] && return 0
  log "fetching Apache ActiveMQ Artemis $ARTEMIS_VERSION from Maven Central"
  fetch_archive "org.apache.activemq:apache-artemis:$ARTEMIS_VERSION:tar.gz:bin" "$CACHE/artemis-$ARTEMIS_VERSION"
}

# start_artemis DIR [QUEUE...]: an Artemis instance in DIR/broker (made on first start, with
# the queues), AMQP on a port kept in DIR/port, its core acceptor on DIR/core_port. Its disk
# alarm is off: Artemis blocks every producer once the host's disk is 90% used (Artemis counts
# space other programs use), which a test machine with a big disk and little free reaches —
# the relay then stalls loudly, as it should, and the tests measure the alarm, not the relay.
start_artemis() {
  local dir=$1 port core before q addresses="" fresh=""
  shift
  ensure_artemis
  mkdir -p "$dir"
  [ -f "$dir/port" ] || fresh=1
  [ -f "$dir/port" ] || free_port >"$dir/port"
  [ -f "$dir/core_port" ] || free_port >"$dir/core_port"
  port=$(cat "$dir/port")
  core=$(cat "$dir/core_port")
  if [ ! -d "$dir/broker" ]; then
    "$ARTEMIS_HOME/bin/artemis" create --silent --no-web --require-login --user outboxd \
      --password secret --no-autotune --no-hornetq-acceptor --no-mqtt-acceptor \
      --no-stomp-acceptor "$dir/broker" >"$dir/create.log" 2>&1
    for q in "$@"; do
      addresses+="<address name=\"$q\"><anycast><queue name=\"$q\"/></anycast></address>"
    done
    sed -i -e "s#tcp://0.0.0.0:61616?#tcp://127.0.0.1:$core?#" \
      -e "s#tcp://0.0.0.0:5672?#tcp://127.0.0.1:$port?#" \
      -e 's#<auto-create-queues>true#<auto-create-queues>false#' \
      -e 's#<auto-create-addresses>true#<auto-create-addresses>false#' \
      -e "s#<addresses>#<addresses>$addresses#" \
      -e 's#<max-disk-usage>90<#<max-disk-usage>-1<#' "$dir/broker/etc/broker.xml"
    sed -i -e 's/-Xms512M/-Xms64M/' -e 's/-Xmx2G/-Xmx512M/' "$dir/broker/etc/artemis.profile"
  fi
  before=$(count_lines "$dir/artemis.log" 'Server is now active')
  setsid "$dir/broker/bin/artemis" run </dev/null >>"$dir/artemis.log" 2>&1 &
  echo $! >"$dir/artemis.pid"
  if ! wait_log "$dir/artemis.log" 'Server is now active' "$before" "$dir/artemis.pid"; then
    # A port free_port found free was taken before the JVM bound it (tests start servers in
    # parallel; seen once in a fresh-clone run): a first start takes new ports, once.
    if [ -n "$fresh" ] && [ -z "${ARTEMIS_RETRIED:-}" ] && grep -q 'Address already in use' "$dir/artemis.log"; then
      log "Artemis in $dir: a port was taken meanwhile; starting again on new ports"
      stop_broker "$dir" KILL
      rm -rf "$dir/broker" "$dir/port" "$dir/core_port" "$dir/artemis.log"
      ARTEMIS_RETRIED=1 start_artemis "$dir" "$@"
      return
    fi
    log "Artemis did not start in $dir:"; tail -20 "$dir/artemis.log" >&2
    return 1
  fi
  echo "amqp://127.0.0.1:$port" >"$dir/url"
}

# ensure_apicurio: Apicurio Registry's Quarkus app, in the cache.
ensure_apicurio() {
  [ -f "$APICURIO_HOME/quarkus-run.jar" ] && return 0
  log "fetching Apicurio Registry $APICURIO_VERSION from Maven Central (~158 MB, once)"
  fetch_archive "io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" "$APICURIO_HOME"
}

# java21: a Java 21+ runtime (Apicurio needs one; OpenJDK 17 is the default here).
java21() {
  local j
  for j in $(ls -d /usr/lib/jvm/*/bin/java 2>/dev/null | sort -rV) java; do
    if "$j" -version 2>&1 | grep -qE 'version "(2[1-9]|[3-9][0-9])'; then echo "$j"; return 0; fi
  done
  log "no Java 21+ runtime found (Apicurio Registry needs one): install one, e.g. openjdk-21-jre-headless"
  return 1
}

# start_apicurio DIR: Apicurio Registry on 127.0.0.1 and a port kept in DIR/port; its
# Confluent-compatible API's URL in DIR/url.
start_apicurio() {
  local dir=$1 port java before
  ensure_apicurio
  java=$(java21)
  mkdir -p "$dir"
  [ -f "$dir/port" ] || free_port >"$dir/port"
  [ -f "$dir/management_port" ] || free_port >"$dir/management_port"
  port=$(cat "$dir/port")
  before=$(count_lines "$dir/apicurio.log" 'Installed features')
  # Quarkus's management interface binds 0.0.0.0:9000 by default: one per machine. Its H2
  # database is a file in DIR (the default is in memory): a killed registry comes back with
  # the same schemas and ids, as a real one does — WRITE_DELAY=0, or H2 flushes a commit up
  # to 500 ms later and a SIGKILL just after a registration loses it (a fresh-clone run saw
  # "Schema 1 not found" for records written with id 1 before the kill).
  APICURIO_DATASOURCE_URL="jdbc:h2:file:$dir/h2/registry;WRITE_DELAY=0" \
    QUARKUS_HTTP_PORT=$port QUARKUS_HTTP_HOST=127.0.0.1 \
    QUARKUS_MANAGEMENT_PORT=$(cat "$dir/management_port") QUARKUS_MANAGEMENT_HOST=127.0.0.1 \
    setsid "$java" -Xms64m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -jar "$APICURIO_HOME/quarkus-run.jar" </dev/null >>"$dir/apicurio.log" 2>&1 &
  echo $! >"$dir/apicurio.pid"
  if ! wait_log "$dir/apicurio.log" 'Installed features' "$before" "$dir/apicurio.pid"; then
    log "Apicurio did not start in $dir:"; tail -20 "$dir/apicurio.log" >&2
    return 1
  fi
  echo "http://127.0.0.1:$port/apis/ccompat/v7" >"$dir/url"
}

# build_jaeger: the all-in-one binary in $JAEGER_HOME/jaeger (a Go module of its own for
# `go get -tool`, from the Go module proxy). Built without optimisation (-N -l): a test
# backend, and 30 % less CPU to build (measured: 3m44 vs 5m28 of CPU). jaeger.failed (the
# build's log) says the last build failed.
build_jaeger() {
  [ -x "$JAEGER_HOME/jaeger" ] && return 0
  command -v go >/dev/null || apt_install golang-go
  mkdir -p "$JAEGER_HOME"
  exec 9>"$JAEGER_HOME/build.lock"
  flock 9
  [ -x "$JAEGER_HOME/jaeger" ] && return 0
  rm -f "$JAEGER_HOME/jaeger.failed"
  local src=$JAEGER_HOME/src
  mkdir -p "$src"
  log "building Jaeger $JAEGER_VERSION from the Go module proxy (once, ~4 min on 2 cores)"
  if (
    cd "$src"
    [ -f go.mod ] || go mod init outboxd-jaeger >/dev/null 2>&1
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@v$JAEGER_VERSION" \
      && go build -trimpath -gcflags=all='-N -l' -ldflags='-s -w' -o "$JAEGER_HOME/jaeger.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
  ) >"$JAEGER_HOME/build.log" 2>&1; then
    mv "$JAEGER_HOME/jaeger.tmp" "$JAEGER_HOME/jaeger"
  else
    cp "$JAEGER_HOME/build.log" "$JAEGER_HOME/jaeger.failed"
    log "building Jaeger failed; see $JAEGER_HOME/jaeger.failed"
    tail -5 "$JAEGER_HOME/build.log" >&2
    return 1
  fi
}

# start_jaeger DIR: Jaeger with OTLP receivers and the query API on free ports of 127.0.0.1,
# traces in memory; waits for its ports.
start_jaeger() {
  local dir=$1 grpc http query query_grpc
  build_jaeger
  mkdir -p "$dir"
  [ -f "$dir/ports" ] || echo "$(free_port) $(free_port) $(free_port) $(free_port)" >"$dir/ports"
  read -r grpc http query query_grpc <"$dir/ports"
  cat >"$dir/config.yaml" <<EOF
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:$query
    grpc:
      endpoint: 127.0.0.1:$query_grpc
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$grpc
      http:
        endpoint: 127.0.0.1:$http
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
EOF
  setsid "$JAEGER_HOME/jaeger" --config "$dir/config.yaml" </dev/null >>"$dir/jaeger.log" 2>&1 &
  echo $! >"$dir/jaeger.pid"
  wait_port "$query" jaeger
  wait_port "$http" jaeger
  wait_port "$grpc" jaeger
  echo "http://127.0.0.1:$grpc http://127.0.0.1:$http http://127.0.0.1:$query" >"$dir/url"
}

# start_moto DIR [AUTH]: moto_server on 127.0.0.1 and a port kept in DIR/port. Its state is
# in memory (a restart forgets it).
start_moto() {
  local dir=$1 auth=${2:-} port
  ensure_moto
  mkdir -p "$dir"
  [ -f "$dir/port" ] || free_port >"$dir/port"
  port=$(cat "$dir/port")
  local envs=(MOTO_OUTBOXD=1)
  if [ "$auth" = 1 ]; then envs+=(INITIAL_NO_AUTH_ACTION_COUNT=3); fi
  setsid env "${envs[@]}" moto_server -H 127.0.0.1 -p "$port" </dev/null >>"$dir/moto.log" 2>&1 &
  echo $! >"$dir/moto.pid"
  wait_port "$port" moto_server
  echo "http://127.0.0.1:$port" >"$dir/url"
}

# stop_broker DIR SIGNAL: the process group of a NATS or RabbitMQ started above (TERM: a
# clean stop; KILL: a crash), and, for RabbitMQ, the epmd it started on its own port.
stop_broker() {
  local dir=$1 signal=$2 f pid i epmd
  for f in "$dir/nats.pid" "$dir/rabbitmq.pid" "$dir/elasticmq.pid" "$dir/moto.pid" "$dir/pubsub.pid" "$dir/artemis.pid" "$dir/apicurio.pid" "$dir/jaeger.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "-$signal" -- "-$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
      pgrep -g "$pid" >/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$f"
  done
  if [ -f "$dir/ports" ] && [ "$signal" = TERM ]; then
    read -r _ _ epmd _ <"$dir/ports"
    for pid in $(pgrep -x epmd || true); do
      if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "ERL_EPMD_PORT=$epmd"; then
        kill "$pid" 2>/dev/null || true
      fi
    done
  fi
  return 0
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
  # `install debezium`: the Debezium jars too (the tests run Debezium beside outboxd; the
  # demo does not need them).
  install)
    ensure_packages; ensure_kafka; ensure_elasticmq; ensure_moto; ensure_artemis; ensure_apicurio
    # The status page's test loads it in a real browser (not needed by the demo).
    command -v chromium >/dev/null || apt_install chromium
    # Jaeger (the trace tests) builds for minutes: in the background, niced, while the
    # rest installs and the tests compile; the trace tests run last and wait for it.
    "$0" jaeger-build --background
    pubsub_jar >/dev/null || true
    python_consumer >/dev/null
    if [ "${2:-}" = debezium ]; then "$HERE/../bench/debezium/debezium.sh" fetch; fi ;;
  pg-start) start_pg "$2" "$3" "${4:-}" ;;
  pg-stop) stop_pg "$2"; rm -rf "$2" ;;
  pg-crash-restart) crash_restart_pg "$2" ;;
  tls-certs) make_certs "$2" ;;
  kafka-start) dir=$2; shift 2; ensure_kafka; start_kafka "$dir" "$@"; cat "$dir/bootstrap" ;;
  kafka-start-sasl) ensure_kafka; start_kafka_sasl "$2" "$3" "$4"; cat "$2/sasl_bootstrap" ;;
  kafka-cluster-start) dir=$2; n=$3; shift 3; ensure_kafka; start_kafka_cluster "$dir" "$n" "$@"; cat "$dir/bootstrap" ;;
  kafka-node-kill) kill_pid_file "$2/node$3/kafka.pid" KILL ;;
  kafka-node-start) KAFKA_HEAP=256m kafka_launch "$2/node$3"; kafka_wait "$2/node$3" "$(( $(grep -c 'Kafka Server started' "$2/node$3/kafka.log") + 1 ))" ;;
  kafka-stop) stop_kafka "$2"; rm -rf "$2" ;;
  nats-start) start_nats "$2" "${3:-}"; cat "$2/url" ;;
  rabbitmq-start) start_rabbitmq "$2" "${3:-}"; cat "$2/url" ;;
  rabbitmq-ctl) dir=$2; shift 2; rabbitmq_ctl "$dir" "$@" ;;
  elasticmq-start) start_elasticmq "$2" "${3:-}"; cat "$2/url" ;;
  moto-start) start_moto "$2" "${3:-}"; cat "$2/url" ;;
  pubsub-start) start_pubsub "$2"; cat "$2/url" ;;
  artemis-start) d=$2; shift 2; start_artemis "$d" "$@"; cat "$d/url" ;;
  python-consumer) python_consumer ;;
  apicurio-start) start_apicurio "$2"; cat "$2/url" ;;
  jaeger-build)
    if [ "${2:-}" = --background ]; then
      mkdir -p "$JAEGER_HOME"
      [ -x "$JAEGER_HOME/jaeger" ] || (nice -n 19 "$0" jaeger-build </dev/null >/dev/null 2>&1 &)
    else
      build_jaeger
    fi ;;
  jaeger-start) start_jaeger "$2"; cat "$2/url" ;;
  broker-kill) stop_broker "$2" KILL ;;
  broker-stop) stop_broker "$2" TERM; if [ "${3:-}" = --remove ]; then rm -rf "$2"; fi ;;
  *) echo "usage: $0 up|down|env|install|pg-start DIR PORT [OPTIONS]|pg-stop DIR|pg-crash-restart DIR|tls-certs DIR|kafka-start DIR [PROP=VALUE...]|kafka-start-sasl DIR USER PASSWORD|kafka-cluster-start DIR N [PROP=VALUE...]|kafka-node-kill DIR I|kafka-node-start DIR I|kafka-stop DIR|nats-start DIR|rabbitmq-start DIR|elasticmq-start DIR|moto-start DIR [AUTH]|pubsub-start DIR|artemis-start DIR [QUEUE...]|apicurio-start DIR|jaeger-build [--background]|jaeger-start DIR|python-consumer|broker-kill DIR|broker-stop DIR [--remove]" >&2; exit 2 ;;
esac
