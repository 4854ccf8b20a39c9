//! The RabbitMQ and NATS JetStream sinks against real servers (Debian's `rabbitmq-server` and
//! `nats-server -js`, one of a test's own each): every committed id arrives, per-aggregate
//! order holds, a crash of the relay or of the broker loses nothing, an unroutable event is
//! dead-lettered while the rest flows, and bad sink config exits 2 naming the key.
//!
//! Each guarantee is one body run against both sinks ([`Kind`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Nats,
    RabbitMq,
}

/// A broker, a database and a relay config pointed at it; `extra` goes into the config.
struct Rig {
    kind: Kind,
    broker: PrivateBroker,
    db: TestDb,
    config: PathBuf,
}

impl Rig {
    async fn new(kind: Kind, prefix: &str, extra: &str) -> Rig {
        Self::with_certs(kind, prefix, extra, None).await
    }

    /// `certs`: the broker speaks TLS with a certificate from this throwaway CA, and the
    /// relay is pointed at its TLS address (without a CA file: `extra` adds one).
    async fn with_certs(kind: Kind, prefix: &str, extra: &str, certs: Option<&Path>) -> Rig {
        let broker = match kind {
            Kind::Nats => PrivateBroker::start("nats", certs),
            Kind::RabbitMq => PrivateBroker::start("rabbitmq", certs),
        };
        let db = TestDb::new(prefix).await;
        let sink = match kind {
            Kind::Nats => nats_sink_config(&db, &broker.url),
            Kind::RabbitMq => {
                // Bound before the relay starts: with `mandatory`, a message no queue takes is
                // dead-lettered, not dropped.
                rabbitmq_queue(&broker.url, &db.name, &db.name, "order.#").await;
                rabbitmq_sink_config(&db, broker.tls_url.as_deref().unwrap_or(&broker.url))
            }
        };
        let config = db.config(&kafka_brokers(), &format!("{sink}\n{extra}"));
        migrate(&config);
        create_aggregates_table(&db.client().await).await;
        Rig {
            kind,
            broker,
            db,
            config,
        }
    }

    /// What the broker holds for the `order` events, read until every id in `expect` came.
    async fn read(&self, expect: &HashSet<String>) -> Vec<Received> {
        let (timeout, linger) = (Duration::from_secs(120), Duration::from_secs(2));
        match self.kind {
            Kind::Nats => {
                let filter = format!("{}.order.>", self.db.name);
                let stream = self.db.name.to_uppercase();
                let ca = self.broker.ca.as_deref();
                nats_read(
                    &self.broker.url,
                    ca,
                    &stream,
                    &filter,
                    expect,
                    timeout,
                    linger,
                )
                .await
            }
            Kind::RabbitMq => {
                rabbitmq_read(&self.broker.url, &self.db.name, expect, timeout, linger).await
            }
        }
    }

    /// The dead letters: event id → `outboxd.dlq.reason`.
    async fn dead_letters(&self, expect: &HashSet<String>) -> Vec<(String, String)> {
        let dlq = format!("{}_dlq", self.db.name);
        let (timeout, linger) = (Duration::from_secs(60), Duration::from_millis(500));
        let got = match self.kind {
            Kind::Nats => {
                let stream = self.db.name.to_uppercase();
                let ca = self.broker.ca.as_deref();
                nats_read(&self.broker.url, ca, &stream, &dlq, expect, timeout, linger).await
            }
            Kind::RabbitMq => rabbitmq_read(&self.broker.url, &dlq, expect, timeout, linger).await,
        };
        dead_letter_reasons(got)
    }

    /// Transactions of 1–6 `order` events over 30 aggregates for `secs`, one in
    /// `rollback_one_in` rolled back (0: none); returns (committed, rolled back).
    fn steady_writer(
        &self,
        secs: u64,
        rollback_one_in: u64,
        seed: u64,
    ) -> tokio::task::JoinHandle<(Vec<Written>, Vec<Written>)> {
        SteadyWriter::sink_test(secs, rollback_one_in, seed).spawn(&self.db)
    }

    /// NATS drops a resend of an id within the stream's duplicate window; RabbitMQ does not.
    fn assert_duplicates(&self, duplicates: usize) {
        if self.kind == Kind::Nats {
            assert_eq!(duplicates, 0, "the stream stored an event id twice");
        }
    }
}

async fn concurrent_events_arrive_in_per_aggregate_order(kind: Kind, prefix: &str) {
    let rig = Rig::new(kind, prefix, "").await;
    let mut relay = Relay::start(&rig.config);
    let written = concurrent_workload(&rig.db, 10_000, 8, 200, &["order"]).await;
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    rig.assert_duplicates(duplicates);
    assert_eq!(written.len(), 10_000);
    relay.assert_running();
    // Readiness is about the configured broker (it was "Kafka is not reachable" for ever).
    assert_ready_with_the_broker_reachable(&rig.config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_10000_concurrent_events_arrive_each_once_in_per_aggregate_order() {
    concurrent_events_arrive_in_per_aggregate_order(Kind::Nats, "nats_order").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_10000_concurrent_events_arrive_in_per_aggregate_order() {
    concurrent_events_arrive_in_per_aggregate_order(Kind::RabbitMq, "rmq_order").await;
}

/// A steady writer for 12 s; the relay is SIGKILLed at ~3 s and ~7 s and started again.
async fn relay_sigkilled_twice_loses_nothing(kind: Kind, prefix: &str) {
    let rig = Rig::new(kind, prefix, "").await;
    let writer = rig.steady_writer(12, 10, 0x51c);
    let mut relay = Relay::start(&rig.config);
    for at in [3, 4] {
        tokio::time::sleep(Duration::from_secs(at)).await;
        relay.kill();
        relay = Relay::start(&rig.config);
    }
    let (written, rolled_back) = writer.await.unwrap();
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    rig.assert_duplicates(duplicates);
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    eprintln!(
        "{} events, {} rolled back, {duplicates} duplicates after 2 SIGKILLs",
        written.len(),
        rolled_back.len()
    );
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_relay_sigkilled_twice_mid_stream_loses_nothing_and_stores_no_repeat() {
    relay_sigkilled_twice_loses_nothing(Kind::Nats, "nats_kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_relay_sigkilled_twice_mid_stream_loses_nothing() {
    relay_sigkilled_twice_loses_nothing(Kind::RabbitMq, "rmq_kill").await;
}

/// A steady writer for 15 s; the broker is stopped at ~4 s (SIGTERM, or SIGKILL with
/// `crash`) and started again on its data 4 s later.
async fn broker_restarted_loses_nothing(kind: Kind, prefix: &str, crash: bool) {
    let rig = Rig::new(kind, prefix, "").await;
    let writer = rig.steady_writer(15, 0, 0xb0b);
    let mut relay = Relay::start(&rig.config);
    tokio::time::sleep(Duration::from_secs(4)).await;
    if crash {
        rig.broker.kill();
    } else {
        rig.broker.stop();
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.broker.restart();
    let (written, _) = writer.await.unwrap();
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    rig.assert_duplicates(duplicates);
    let log = relay.log_text();
    assert!(
        log.contains("retrying from the last confirmed position") || log.contains("retrying"),
        "the relay never noticed the broker was gone: {log}"
    );
    eprintln!("{} events, {duplicates} duplicates", written.len());
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_server_killed_and_restarted_mid_stream_loses_nothing_and_keeps_order() {
    broker_restarted_loses_nothing(Kind::Nats, "nats_restart", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_stopped_and_restarted_mid_stream_loses_nothing_and_keeps_order() {
    broker_restarted_loses_nothing(Kind::RabbitMq, "rmq_restart", false).await;
}

/// 20 `order` events, one `stray` event no queue / stream takes, 20 more `order` events.
async fn unroutable_event_is_dead_lettered(kind: Kind, prefix: &str, reason: &str) {
    // NATS: the stream takes only `<db>.order.>` and the dead-letter subject.
    let rig = Rig::new(kind, prefix, "[sink]\nmax_record_retries = 3\n").await;
    if kind == Kind::Nats {
        let text = std::fs::read_to_string(&rig.config).unwrap();
        let narrowed = text.replace(
            &format!("\"{}.>\"", rig.db.name),
            &format!("\"{}.order.>\"", rig.db.name),
        );
        assert_ne!(text, narrowed);
        std::fs::write(&rig.config, narrowed).unwrap();
    }
    let (written, stray) = orders_around_a_stray(&rig.db).await;
    let mut relay = Relay::start(&rig.config);
    let received = rig.read(&ids(&written)).await;
    assert_exactly_written(&written, &received);
    let dead = rig.dead_letters(&ids(&stray)).await;
    assert_eq!(
        dead,
        vec![(stray[0].id.clone(), reason.to_string())],
        "dead letters; log:\n{}",
        relay.log_text()
    );
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_event_whose_subject_no_stream_takes_is_dead_lettered_and_the_rest_flows() {
    unroutable_event_is_dead_lettered(Kind::Nats, "nats_dlq", "retries_exhausted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_unroutable_event_is_dead_lettered_and_the_rest_flows() {
    unroutable_event_is_dead_lettered(Kind::RabbitMq, "rmq_dlq", "unroutable").await;
}

fn run_with(config: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(unique("sinkcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, config).unwrap();
    outboxd(&["run", "--config", path.to_str().unwrap()], &[])
}

#[test]
fn bad_sink_config_exits_2_with_one_line_naming_the_key() {
    let pg = "[postgres]\nurl = \"postgres://u@localhost/db\"\n";
    for (config, key) in [
        ("[sink]\nkind = \"pulsar\"\n", "sink.kind"),
        ("[sink]\nkind = \"nats\"\n", "nats.url"),
        ("[sink]\nkind = \"rabbitmq\"\n", "rabbitmq.url"),
        (
            "[sink]\nkind = \"rabbitmq\"\n[rabbitmq]\nurl = \"http://h\"\n",
            "rabbitmq.url",
        ),
        (
            "[sink]\nkind = \"nats\"\n[nats]\nurl = \"nats://h:4222\"\nsubject = \"a.{nope}\"\n",
            "nats.subject",
        ),
        (
            "[sink]\nkind = \"nats\"\nmax_in_flight = 0\n[nats]\nurl = \"nats://h:4222\"\n",
            "sink.max_in_flight",
        ),
        (
            "[sink]\nkind = \"nats\"\n[nats]\nurl = \"nats://h:4222\"\n[kafka]\ndelivery = \"exactly-once\"\n",
            "kafka.delivery",
        ),
        (
            "[sink]\nkind = \"rabbitmq\"\n[rabbitmq]\nurl = \"amqp://h\"\nca_file = \"/etc/hostname\"\n",
            "rabbitmq.ca_file",
        ),
    ] {
        let out = run_with(&format!("{pg}{config}"));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{config}: {err}");
        assert!(err.contains(key), "{config}: expected `{key}` in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    }
}

/// Wrong credentials are the operator's to fix: exit 2, one line, the password nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_wrong_password_exits_2_without_the_password_in_the_log() {
    let rig = Rig::new(Kind::RabbitMq, "rmq_auth", "").await;
    let text = std::fs::read_to_string(&rig.config).unwrap();
    let wrong = text.replace("guest:guest@", "guest:hunter2-wrong@");
    assert_ne!(text, wrong);
    std::fs::write(&rig.config, wrong).unwrap();
    let mut relay = Relay::start(&rig.config);
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("rabbitmq.url"), "{log}");
    assert!(
        !log.contains("hunter2"),
        "the password reached the log: {log}"
    );
}

/// Review C7: an exchange that already exists with another type refuses the relay's
/// declaration (PRECONDITION_FAILED) and closes the channel — every session would be refused
/// again, for ever. Only an operator can mend it: exit 2 naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_exchange_declared_with_another_type_exits_2_naming_the_fix() {
    // The rig declares the exchange as `topic`; the relay is told `direct`.
    let rig = Rig::new(
        Kind::RabbitMq,
        "rmq_exchange",
        "[rabbitmq]\nexchange_type = \"direct\"\n",
    )
    .await;
    let mut client = rig.db.client().await;
    write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let mut relay = Relay::start(&rig.config);
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("rabbitmq.declare_exchange"), "{log}");
}

/// `verify` reads the stream back: three messages deleted from it are exactly the three ids
/// it reports missing; after `replay`, none are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_verify_names_exactly_the_events_missing_from_the_stream_and_replay_restores_them() {
    let rig = Rig::new(Kind::Nats, "nats_verify", "").await;
    let mut client = rig.db.client().await;
    let mut written = Vec::new();
    for i in 0..12 {
        let e = [("order".to_string(), format!("agg-{i}"))];
        written.extend(write_txn(&mut client, &e, false).await.unwrap());
    }
    let mut relay = Relay::start(&rig.config);
    let received = rig.read(&ids(&written)).await;
    assert_exactly_written(&written, &received);
    relay.terminate(Duration::from_secs(20));
    // Remove three events from the stream, as a retention mistake would.
    let js = async_nats::jetstream::new(async_nats::connect(&rig.broker.url).await.unwrap());
    let stream = js.get_stream(rig.db.name.to_uppercase()).await.unwrap();
    let mut removed: Vec<String> = Vec::new();
    for r in received.iter().take(3) {
        stream.delete_message(r.offset as u64).await.unwrap();
        removed.push(r.id.clone().unwrap());
    }
    removed.sort();
    let cfg = rig.config.to_str().unwrap();
    let out = outboxd(&["verify", "--since", "1 hour", "--config", cfg], &[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let mut missing: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("missing ").map(str::to_string))
        .collect();
    missing.sort();
    assert_eq!(missing, removed, "{text}");
    let out = outboxd(&["replay", "--since", "1 hour", "--config", cfg], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = outboxd(&["verify", "--since", "1 hour", "--config", cfg], &[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("0 missing"), "{text}");
}

/// RabbitMQ cannot be read back: verify says so in one line and exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_verify_exits_2_saying_queues_cannot_be_read_back() {
    let rig = Rig::new(Kind::RabbitMq, "rmq_verify", "").await;
    let cfg = rig.config.to_str().unwrap();
    let out = outboxd(&["verify", "--since", "1 hour", "--config", cfg], &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read RabbitMQ back"), "{err}");
}

/// A broker whose certificate comes from a private CA: with `ca_file` naming that CA the
/// relay publishes over TLS; with another CA it exits 2 naming the key.
async fn relays_over_tls_with_a_private_ca(kind: Kind, prefix: &str, section: &str) {
    let certs = std::env::temp_dir().join(unique("outboxd-sink-certs"));
    stack(&["tls-certs", certs.to_str().unwrap()]);
    let ca = certs.join("ca.pem");
    let extra = format!("[{section}]\nca_file = \"{}\"\n", ca.display());
    let rig = Rig::with_certs(kind, prefix, &extra, Some(&certs)).await;
    let mut client = rig.db.client().await;
    let mut written = Vec::new();
    for i in 0..20 {
        let e = [("order".to_string(), format!("agg-{}", i % 4))];
        written.extend(write_txn(&mut client, &e, false).await.unwrap());
    }
    let mut relay = Relay::start(&rig.config);
    let received = rig.read(&ids(&written)).await;
    assert_exactly_written(&written, &received);
    relay.terminate(Duration::from_secs(20));

    let text = std::fs::read_to_string(&rig.config).unwrap();
    let other = certs.join("other-ca.pem");
    std::fs::write(
        &rig.config,
        text.replace(ca.to_str().unwrap(), other.to_str().unwrap()),
    )
    .unwrap();
    let mut relay = Relay::start(&rig.config);
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    let key = format!("{section}.ca_file");
    assert!(log.contains(&key), "expected `{key}` in: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_relays_over_tls_verifying_the_server_against_nats_ca_file() {
    relays_over_tls_with_a_private_ca(Kind::Nats, "nats_tls", "nats").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_relays_over_amqps_verifying_the_server_against_rabbitmq_ca_file() {
    relays_over_tls_with_a_private_ca(Kind::RabbitMq, "rmq_tls", "rabbitmq").await;
}

/// The path to the broker goes silent for 8 s under a steady writer (a TCP proxy stops
/// moving bytes: no RST, no FIN): the relay notices by itself (NATS: the acks time out;
/// RabbitMQ: missed heartbeats, `?heartbeat=2` here), reconnects once the path is back, and
/// every id arrives in per-aggregate order.
async fn broker_path_black_holed_loses_nothing(kind: Kind, prefix: &str) {
    let rig = Rig::new(kind, prefix, "").await;
    let port: u16 = rig
        .broker
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let proxy = common::proxy::Proxy::start(([127, 0, 0, 1], port).into());
    let text = std::fs::read_to_string(&rig.config).unwrap();
    let via = text.replace(&format!(":{port}"), &format!(":{}", proxy.port));
    let via = via.replace("/%2f\"", "/%2f?heartbeat=2\"");
    assert_ne!(text, via);
    std::fs::write(&rig.config, via).unwrap();
    let writer = rig.steady_writer(16, 0, 0xb1ac);
    let mut relay = Relay::start(&rig.config);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.black_hole(true);
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.black_hole(false);
    let (written, _) = writer.await.unwrap();
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    rig.assert_duplicates(duplicates);
    let log = relay.log_text();
    assert!(
        log.contains("retrying"),
        "the relay never noticed the silent path: {log}"
    );
    eprintln!("{} events, {duplicates} duplicates", written.len());
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_path_gone_silent_mid_stream_is_noticed_and_nothing_is_lost() {
    broker_path_black_holed_loses_nothing(Kind::Nats, "nats_silent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_path_gone_silent_mid_stream_is_noticed_and_nothing_is_lost() {
    broker_path_black_holed_loses_nothing(Kind::RabbitMq, "rmq_silent").await;
}

/// A NATS server that requires a login, and a relay with the wrong password: exit 2, the
/// last line names `nats.url`, the password appears nowhere in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_wrong_password_exits_2_without_the_password_in_the_log() {
    let dir = std::env::temp_dir().join(unique("outboxd-nats-auth"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
    let out = std::process::Command::new(script)
        .args(["nats-start", dir.to_str().unwrap()])
        .env("NATS_USER", "relay")
        .env("NATS_PASS", "right-pa55")
        .output()
        .unwrap();
    assert!(out.status.success());
    let port = String::from_utf8(out.stdout).unwrap();
    let port = port.trim().rsplit(':').next().unwrap().to_string();
    let db = TestDb::new("nats_auth").await;
    let url = format!("nats://relay:hunter2-wrong@127.0.0.1:{port}");
    let config = db.config(&kafka_brokers(), &nats_sink_config(&db, &url));
    migrate(&config);
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    stack(&["broker-stop", dir.to_str().unwrap(), "--remove"]);
    assert_eq!(status.code(), Some(2), "{log}");
    let last = log.trim().lines().last().unwrap_or_default();
    assert!(log.contains("nats.url"), "{log}");
    assert!(
        !log.contains("hunter2"),
        "the password reached the log: {log}"
    );
    eprintln!("last line: {last}");
}

/// A RabbitMQ resource alarm (here: memory) blocks every publishing connection
/// (`connection.blocked`); lapin then waits inside the publish, where the relay's loop used
/// to hang with no stall line, no metric and `/readyz` ready. Now the publish is bounded by
/// `kafka.delivery_timeout_ms`: the stall is logged, the session ends and retries, and when
/// the alarm clears every event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_memory_alarm_is_reported_as_a_stall_and_nothing_is_lost() {
    let rig = Rig::new(
        Kind::RabbitMq,
        "rmq_alarm",
        "[retry]\nunready_after_ms = 3000\n",
    )
    .await;
    let relay = Relay::start(&rig.config);
    let mut client = rig.db.client().await;
    let first = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let received = rig.read(&ids(&first)).await;
    assert_written(&first, &received, true);
    let dir = rig.broker.dir.to_str().unwrap().to_string();
    stack(&[
        "rabbitmq-ctl",
        &dir,
        "set_vm_memory_high_watermark",
        "0.0000001",
    ]);
    // Read from the queue: what follows must be the events written during the alarm.
    let mut written = Vec::new();
    for i in 0..5 {
        let events = [("order".to_string(), format!("b{i}"))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    eventually(
        Duration::from_secs(40),
        "the blocked publish is reported",
        || async { relay.log_text().contains("delivery stalled") },
    )
    .await;
    stack(&["rabbitmq-ctl", &dir, "set_vm_memory_high_watermark", "0.4"]);
    let received = rig.read(&ids(&written)).await;
    assert_written(&written, &received, true);
}

/// Table CDC through the sink: inserts, updates and deletes of a captured table arrive as
/// change events on the table's subject / routing key (`<prefix>.<schema>.<table>`), each
/// with its id and key, deletes followed by their tombstone (an empty message).
async fn table_changes_arrive_on_the_tables_destination(kind: Kind, prefix: &str) {
    let db_name_hint = prefix;
    let rig = Rig::new(kind, db_name_hint, "").await;
    let db = &rig.db;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, version int)")
        .await
        .unwrap();
    // The CDC section goes into the rig's config; the captured table joins the publication.
    let text = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        format!(
            "{text}\n[cdc]\ntables = [\"public.accounts\"]\ntopic_prefix = \"{}\"\n[cdc.snapshot]\nmode = \"never\"\n",
            db.name
        ),
    )
    .unwrap();
    migrate(&rig.config);
    if kind == Kind::RabbitMq {
        rabbitmq_queue(
            &rig.broker.url,
            &db.name,
            &format!("{}_cdc", db.name),
            &format!("{}.public.#", db.name),
        )
        .await;
    }
    let mut relay = Relay::start(&rig.config);
    let mut expect = Vec::new();
    for id in 1..=30 {
        client
            .batch_execute(&format!("INSERT INTO accounts VALUES ({id}, 1)"))
            .await
            .unwrap();
        expect.push((id, "create"));
    }
    for id in 1..=30 {
        client
            .batch_execute(&format!("UPDATE accounts SET version = 2 WHERE id = {id}"))
            .await
            .unwrap();
        expect.push((id, "update"));
    }
    for id in 1..=10 {
        client
            .batch_execute(&format!("DELETE FROM accounts WHERE id = {id}"))
            .await
            .unwrap();
        expect.extend([(id, "delete"), (id, "tombstone")]);
    }
    let (timeout, linger) = (Duration::from_secs(20), Duration::from_secs(3));
    // Ids name the change's LSN, unknown here: read until quiet, then check each change.
    let got = match kind {
        Kind::Nats => {
            let filter = format!("{}.public.>", db.name);
            nats_read(
                &rig.broker.url,
                None,
                &db.name.to_uppercase(),
                &filter,
                &HashSet::new(),
                timeout,
                linger,
            )
            .await
        }
        Kind::RabbitMq => {
            rabbitmq_read(
                &rig.broker.url,
                &format!("{}_cdc", db.name),
                &HashSet::new(),
                timeout,
                linger,
            )
            .await
        }
    };
    let mut arrived: Vec<(i32, String)> = got
        .iter()
        .map(|r| {
            let id = r.id.clone().expect("header id");
            assert!(id.starts_with("public.accounts/"), "{id}");
            let key: serde_json::Value =
                serde_json::from_str(r.key.as_deref().expect("key")).unwrap();
            (
                key["id"].as_i64().unwrap() as i32,
                r.headers["type"].clone(),
            )
        })
        .collect();
    let mut want: Vec<(i32, String)> = expect.iter().map(|(i, t)| (*i, t.to_string())).collect();
    arrived.sort();
    want.sort();
    assert_eq!(arrived, want, "every change, once");
    for r in &got {
        match r.headers["type"].as_str() {
            "tombstone" => assert!(r.payload.as_deref().is_none_or(str::is_empty)),
            op => {
                let v: serde_json::Value =
                    serde_json::from_str(r.payload.as_deref().unwrap()).unwrap();
                assert_eq!(v["source"]["table"], "accounts", "{op}");
            }
        }
    }
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_table_changes_arrive_on_the_tables_subject() {
    table_changes_arrive_on_the_tables_destination(Kind::Nats, "nats_cdc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_table_changes_arrive_on_the_tables_routing_key() {
    table_changes_arrive_on_the_tables_destination(Kind::RabbitMq, "rabbitmq_cdc").await;
}
