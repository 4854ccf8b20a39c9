//! The EventBridge sink against moto's server (an AWS emulator, not AWS): each bus has a rule
//! sending every event to an SQS queue, and what the queue received is what the bus took.
//! Every committed id arrives with its key, headers and payload through relay crashes
//! (EventBridge keeps no order and drops no repeat: repeats carry the same
//! `detail.outboxd.id`), and an event EventBridge cannot carry — a payload that is not a JSON
//! object, one over the size limit, one for a bus that does not exist — is dead-lettered with
//! its reason while the rest flows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use outboxd::sink::aws::AwsClient;

/// moto, a database, the buses `<db>-order` and `<db>-dlq` with a queue each, and a relay
/// config publishing `order` events to the first.
struct Rig {
    _moto: PrivateBroker,
    db: TestDb,
    config: PathBuf,
    client: AwsClient,
    queue_url: String,
    dlq_url: String,
}

impl Rig {
    async fn new(prefix: &str, extra: &str) -> Rig {
        let moto = PrivateBroker::start_with("moto", &[]);
        let db = TestDb::new(prefix).await;
        let queue_url = eventbridge_bus_with_queue(&moto.url, &format!("{}-order", db.name)).await;
        let dlq_url = eventbridge_bus_with_queue(&moto.url, &format!("{}-dlq", db.name)).await;
        // moto passes ~10 events a second through a rule, one request at a time (Python's
        // lock): beside the whole suite on 2 cores, 8 lanes' requests took over the default
        // 10 s, each session ended at its first timeout and resent its window, and a 6 s
        // writer's 51 events were not through in 90 s (a full run, 2026-12-07). The bound is
        // moto's, not the relay's: give each request 30 s.
        let sink = format!(
            "[sink]\nkind = \"eventbridge\"\n\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\nrequest_timeout_ms = 30000\n\n\
             [eventbridge]\nevent_bus = \"{db}-{{aggregatetype}}\"\ndead_letter_event_bus = \"{db}-dlq\"\n",
            url = moto.url,
            db = db.name,
        );
        let config = emulator_config(&db, &sink, extra, true).await;
        Rig {
            client: sqs_client(&moto.url),
            _moto: moto,
            db,
            config,
            queue_url,
            dlq_url,
        }
    }

    fn relay(&self) -> Relay {
        Relay::start_with_env(&self.config, &aws_env())
    }

    async fn read(&self, url: &str, expect: &HashSet<String>) -> Vec<Received> {
        let (timeout, linger) = (Duration::from_secs(90), Duration::from_secs(1));
        eventbridge_read(&self.client, url, expect, timeout, linger).await
    }
}

/// A writer for 6 s (a transaction every 150 ms: moto passes ~10 events a second through a
/// rule), the relay SIGKILLed twice: every committed
/// id reaches the rule's target with its key, payload, `type` and `traceparent`, `Source`
/// `outboxd.order` and `DetailType` `Changed`; none rolled back; the start line promises no
/// order and no dedup, and `/readyz` checks EventBridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eventbridge_relay_sigkilled_twice_mid_stream_delivers_every_event_with_its_id_and_headers()
{
    let rig = Rig::new("eb_kill", "").await;
    let writer = SteadyWriter {
        pause: Duration::from_millis(150),
        max_per_txn: 3,
        ..SteadyWriter::sink_test(6, 10, 0xeb)
    }
    .spawn(&rig.db);
    let mut relay = relay_sigkilled_twice(|| rig.relay()).await;
    let (written, rolled_back) = writer.await.unwrap();
    let received = rig.read(&rig.queue_url, &ids(&written)).await;
    let repeats = assert_written_in_any_order(&normalized(&written), &received);
    for r in &received {
        let h = |k: &str| r.headers.get(k).map(String::as_str);
        assert_eq!(h("eventbridge.source"), Some("outboxd.order"), "{r:?}");
        assert_eq!(h("eventbridge.detail-type"), Some("Changed"), "{r:?}");
    }
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    eprintln!(
        "{} events after 2 SIGKILLs, {repeats} repeats",
        written.len()
    );
    relay.assert_running();
    assert_ready_with_the_broker_reachable(&rig.config).await;
    assert!(
        relay
            .log_text()
            .contains("per-key order: no, broker-side dedup: no"),
        "EventBridge's promises"
    );
}

/// Between 40 `order` events: an array payload and a string payload (EventBridge's Detail
/// must be an object: `invalid_payload`), an event for a bus that does not exist
/// (`retries_exhausted`) — all three on the dead-letter bus with their reasons — and one over
/// `eventbridge.max_entry_bytes` (too large for the dead-letter bus as well: the dead-letter
/// table, `too_large`). Every other event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eventbridge_event_it_cannot_carry_is_dead_lettered_with_its_reason_and_the_rest_flows() {
    let rig = Rig::new(
        "eb_dlq",
        "[sink]\nmax_record_retries = 3\n\n[eventbridge]\nmax_entry_bytes = 4096\n",
    )
    .await;
    let (written, stray) = orders_around_a_stray(&rig.db).await;
    let client = rig.db.client().await;
    let mut poison = vec![(stray[0].id.clone(), "retries_exhausted".to_string())];
    for payload in ["[1, 2]", "\"text\""] {
        let row = client
            .query_one(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'agg-0', 'Odd', $1::text::jsonb) RETURNING id::text",
                &[&payload],
            )
            .await
            .unwrap();
        poison.push((row.get(0), "invalid_payload".to_string()));
    }
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(6_000));
    let big_id: String = client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'agg-0', 'Big', $1::text::jsonb) RETURNING id::text",
            &[&big],
        )
        .await
        .unwrap()
        .get(0);
    let mut relay = rig.relay();
    let received = rig.read(&rig.queue_url, &ids(&written)).await;
    assert_written_in_any_order(&normalized(&written), &received);
    let expect: HashSet<String> = poison.iter().map(|(id, _)| id.clone()).collect();
    let mut dead = dead_letter_reasons(rig.read(&rig.dlq_url, &expect).await);
    // A session that ends after a dead letter (a stall while moto is slow) sends it again
    // from the confirmed position: the same id, at least once.
    dead.sort();
    dead.dedup();
    poison.sort();
    assert_eq!(dead, poison, "dead letters; log:\n{}", relay.log_text());
    let (reason, error) = dead_letter_row(&client, &big_id).await;
    assert_eq!(reason, "too_large");
    assert!(error.contains("eventbridge.max_entry_bytes"), "{error}");
    relay.assert_running();
}
