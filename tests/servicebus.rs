//! The Service Bus sink's AMQP 1.0 path against Apache ActiveMQ Artemis (a real AMQP 1.0
//! broker of a test's own; Service Bus's emulator runs only in Docker, which this machine
//! lacks): what only Service Bus does — its connection strings, `SessionId` as `group-id`,
//! `MessageId` for duplicate detection — is unit-tested against its documented forms
//! (`config::servicebus`, `sink::servicebus`). Every committed id arrives with `message-id` =
//! event id and `group-id` = aggregate id, in per-aggregate order, through relay crashes and a
//! crash of the broker; an event for a queue that does not exist is dead-lettered while the
//! rest flows; a wrong key or bad config exits 2 without the key in the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// Artemis with the queues `<db>-order` and `<db>-dlq`, a database, and a relay config
/// publishing `order` events to the first.
struct Rig {
    broker: PrivateBroker,
    db: TestDb,
    config: PathBuf,
}

impl Rig {
    async fn new(prefix: &str, extra: &str) -> Rig {
        let db = TestDb::new(prefix).await;
        let (order, dlq) = (format!("{}-order", db.name), format!("{}-dlq", db.name));
        let broker = PrivateBroker::start_with("artemis", &[order.as_str(), dlq.as_str()]);
        let sink = format!(
            "[sink]\nkind = \"servicebus\"\n\n[servicebus]\nconnection_string = \"{cs}\"\n\
             queue = \"{db}-{{aggregatetype}}\"\ndead_letter_queue = \"{dlq}\"\n",
            cs = servicebus_connection_string(&broker.url, ARTEMIS_PASSWORD),
            db = db.name,
        );
        let config = emulator_config(&db, &sink, extra, false).await;
        Rig { broker, db, config }
    }

    fn relay(&self) -> Relay {
        Relay::start(&self.config)
    }

    async fn read(&self, queue: &str, expect: &HashSet<String>) -> Vec<Received> {
        let queue = format!("{}-{queue}", self.db.name);
        let (timeout, linger) = (Duration::from_secs(120), Duration::from_secs(1));
        amqp_read(&self.broker.url, &queue, expect, timeout, linger).await
    }
}

/// 10,000 events from 8 concurrent writers over 30 aggregates: every id arrives once, in
/// per-aggregate order, each with `message-id` = its event id and `group-id` (the Service Bus
/// session) = its aggregate id; `/readyz` checks the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servicebus_10000_concurrent_events_arrive_in_order_with_message_and_session_ids() {
    let rig = Rig::new("sb_order", "").await;
    let mut relay = rig.relay();
    let written = concurrent_workload(&rig.db, 10_000, 8, 30, &["order"]).await;
    let received = rig.read("order", &ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    assert_eq!(duplicates, 0, "an event arrived twice without a failure");
    for r in &received {
        let id = r.id.as_deref().unwrap();
        assert_eq!(
            r.headers.get("message-id").map(String::as_str),
            Some(format!("String({id:?})").as_str()),
            "message-id of {id}"
        );
    }
    relay.assert_running();
    assert_ready_with_the_broker_reachable(&rig.config).await;
}

/// A writer for 14 s; the relay SIGKILLed twice, then the broker SIGKILLed and started again
/// on its journal: every committed id arrives, each aggregate's events in commit order
/// (repeats only of the same id), none rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servicebus_relay_and_broker_killed_mid_stream_lose_nothing_and_keep_order() {
    let rig = Rig::new("sb_kill", "").await;
    let writer = SteadyWriter::sink_test(14, 10, 0x5b).spawn(&rig.db);
    let mut relay = relay_sigkilled_twice(|| rig.relay()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.broker.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.broker.restart();
    let (written, rolled_back) = writer.await.unwrap();
    let received = rig.read("order", &ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    let log = relay.log_text();
    assert!(
        log.contains("retrying"),
        "the relay never noticed the broker's crash: {log}"
    );
    eprintln!("{} events, {duplicates} repeats", written.len());
    relay.assert_running();
}

/// 20 `order` events, one `stray` event whose queue does not exist (the attach is refused
/// `amqp:not-found`), 20 more: the stray one is retried, then dead-lettered to the
/// dead-letter queue with its reason, and every other event arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servicebus_event_for_a_missing_queue_is_dead_lettered_and_the_rest_flows() {
    let rig = Rig::new("sb_dlq", "[sink]\nmax_record_retries = 3\n").await;
    let (written, stray) = orders_around_a_stray(&rig.db).await;
    let mut relay = rig.relay();
    let received = rig.read("order", &ids(&written)).await;
    assert_exactly_written(&written, &received);
    let mut dead = dead_letter_reasons(rig.read("dlq", &ids(&stray)).await);
    dead.dedup();
    assert_eq!(
        dead,
        vec![(stray[0].id.clone(), "retries_exhausted".to_string())],
        "dead letters; log:\n{}",
        relay.log_text()
    );
    relay.assert_running();
}

/// A connection string with the wrong key: exit 2 naming the key's name and
/// `servicebus.connection_string`, the key itself never in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servicebus_wrong_key_exits_2_without_the_key_in_the_log() {
    let rig = Rig::new("sb_auth", "").await;
    let wrong = "Wr0ngK3y-do-not-log";
    let text = std::fs::read_to_string(&rig.config).unwrap().replace(
        &format!("SharedAccessKey={ARTEMIS_PASSWORD}"),
        &format!("SharedAccessKey={wrong}"),
    );
    std::fs::write(&rig.config, text).unwrap();
    let out = outboxd(&["run", "--config", rig.config.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("servicebus.connection_string") && err.contains(ARTEMIS_USER),
        "{err}"
    );
    assert!(!err.contains(wrong), "the key reached the log: {err}");
}

/// Config an operator must fix is exit 2 with one line naming the key, never the key's value.
#[test]
fn bad_servicebus_config_exits_2_with_one_line_naming_the_key() {
    let dir = std::env::temp_dir().join(unique("sbcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cs =
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=n;SharedAccessKey=s3cr3t";
    for (config, key) in [
        ("[servicebus]\n".to_string(), "servicebus.connection_string"),
        (
            "[servicebus]\nconnection_string = \"Endpoint=sb://ns/;SharedAccessKeyName=n;SharedAccessSignature=SharedAccessSignature sig=s3cr3t\"\n".to_string(),
            "servicebus.connection_string",
        ),
        (
            format!("[servicebus]\nconnection_string = \"{cs}\"\ndead_letter_queue = \"-bad\"\n"),
            "servicebus.dead_letter_queue",
        ),
        (
            format!("[servicebus]\nconnection_string = \"{cs}\"\nqueue = \"q-{{nope}}\"\n"),
            "servicebus.queue",
        ),
    ] {
        let path = dir.join("c.toml");
        let text = format!(
            "[postgres]\nurl = \"postgres://u@localhost/db\"\n[sink]\nkind = \"servicebus\"\n{config}"
        );
        std::fs::write(&path, text).unwrap();
        let out = outboxd(&["run", "--config", path.to_str().unwrap()], &[]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{config}: {err}");
        assert!(err.contains(key), "{config}: expected `{key}` in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
        assert!(!err.contains("s3cr3t"), "the key reached the log: {err}");
    }
}
