//! Topics the relay creates while events stream to them — issue 16's vanished first events.
//!
//! A broker names itself a new partition's leader in its metadata a few milliseconds before it
//! accepts writes for it. The producer's first request to the partition then fails
//! (NOT_LEADER) while its next, pipelined behind it, is accepted — a broker takes any first
//! sequence number from a producer new to a partition (KIP-360) — and librdkafka reports the
//! failed request's records delivered ("implicitly acked"), without an offset, never written.
//! Seen as: the first 2–5 records of a just-created topic's partitions missing, every later
//! one there, the delivery ledger silent. The relay now waits for every partition's leader to
//! serve a new topic before writing to it, and never believes a delivery report without an
//! offset (`outboxd::sink::kafka::topics`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// Waits until the relay behind `config` is ready (it holds the slot and reaches the broker).
async fn wait_ready(config: &std::path::Path) {
    let addr = http_addr(config);
    eventually(Duration::from_secs(30), "relay ready", || async {
        http_get(&addr, "/readyz").is_some_and(|(code, _)| code == 200)
    })
    .await;
}

/// For each of `topics` new aggregate types in turn, `writers` concurrent writers commit
/// one-event transactions to it for `phase` — a steady stream into a topic the relay is just
/// creating, so each partition gets several produce requests while its leader takes over.
async fn stream_into_new_topics(
    db: &TestDb,
    topics: usize,
    writers: usize,
    phase: Duration,
    before_each: impl Fn(usize),
) -> Vec<Written> {
    let mut written = Vec::new();
    for t in 0..topics {
        before_each(t);
        let mut handles = Vec::new();
        for w in 0..writers {
            let db = db.clone();
            handles.push(tokio::spawn(async move {
                let mut client = db.client().await;
                let mut out = Vec::new();
                let start = Instant::now();
                let mut i = 0;
                while start.elapsed() < phase {
                    // Each writer its own keys: no lock waits between writers.
                    let key = format!("t{t}-w{w}-k{}", i % 2);
                    let events = [(format!("t{t}"), key)];
                    out.extend(write_txn(&mut client, &events, false).await.unwrap());
                    i += 1;
                }
                out
            }));
        }
        for h in handles {
            written.extend(h.await.unwrap());
        }
    }
    written
}

const TOPICS: usize = 20;
const PHASE: Duration = Duration::from_millis(300);

/// The relay reaches its broker through a TCP proxy of the tests' own that delays every byte
/// (4 to 20 ms each way, in turn per topic, as a broker in another zone or region): that
/// sweeps the moment the producer's first requests arrive across the broker's lag in taking
/// over a new partition, whatever this machine's speed. Before the fix this lost 1 of 5,091
/// ids in 1 of 3 runs in isolation (a race: it can pass on broken code; run it in a loop to
/// judge a change here); its original, `ops::standby_that_takes_over…`, lost 3–5 of 50 in 2
/// of about 85 runs, 3 at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_streaming_into_topics_the_relay_is_creating_all_arrive_in_key_order() {
    let (kafka, proxy) = PrivateKafka::behind_proxy();
    let brokers = format!("127.0.0.1:{}", proxy.port);
    let (db, config) = setup("newtopics", &brokers, "").await;
    let relay = Relay::start(&config);
    wait_ready(&config).await;
    let written = stream_into_new_topics(&db, TOPICS, 3, PHASE, |t| {
        proxy.set_latency(Duration::from_millis(4 * (t as u64 % 5 + 1)));
    })
    .await;
    let topics: Vec<String> = (0..TOPICS).map(|t| db.topic(&format!("t{t}"))).collect();
    let received = consume(
        &kafka.brokers,
        &topics,
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    // Every id, each first arrival in commit order for its key: a record lost and resent
    // later would arrive after its key's newer events.
    assert_exactly_written(&written, &received);
    let log = relay.log_text();
    assert!(
        !log.contains("without an offset"),
        "a delivery was reported without an offset (the relay resent it, but the key's order \
         was already broken):\n{}",
        log.lines()
            .filter(|l| l.contains("without an offset"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_reported_without_an_offset_is_resent_not_believed() {
    // What librdkafka's wrong inference looks like to the relay, made to happen on purpose:
    // the failpoint reports the first record delivered without an offset and never sends it.
    let brokers = kafka_brokers();
    let (db, config) = setup("nooffset", &brokers, "").await;
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..5 {
        let events = [("order".to_string(), format!("agg-{i}"))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    let relay = Relay::start_with_env(
        &config,
        &[("OUTBOXD_FAILPOINT", "implicit_ack_first_record")],
    );
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    assert_exactly_written(&written, &received);
    let log = relay.log_text();
    assert!(
        log.contains("failpoint implicit_ack_first_record"),
        "the failpoint fired:\n{log}"
    );
    assert!(
        log.contains("without an offset"),
        "the relay said why it resent:\n{log}"
    );
}

/// Deterministic, with librdkafka's MockCluster for the fault. The first produce request is
/// refused `NOT_LEADER`, 300 ms late (the broker's round trip), while the relay's next records
/// — one event every 20 ms — go out behind it: with fewer than 5 records in flight librdkafka
/// pipelines a partition's requests. The mock, like a real broker for a producer new to a
/// partition, takes the second request's sequence number as the first; librdkafka then
/// reports the refused records delivered without an offset. Before the fix they were lost
/// with the delivery ledger silent; now the session ends and resends them (the resend puts
/// them after their key's newer events: order is what the leader wait protects, above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_request_followed_by_an_accepted_one_loses_nothing() {
    let (mock, brokers, db, config) =
        setup_on_mock("implicitack", 3, "delivery_timeout_ms = 10000\n").await;
    let relay = Relay::start(&config);
    wait_ready(&config).await;
    // Warm up: the producer learns the topic (else the first records wait for its metadata
    // and leave in one batch per partition, too many to pipeline behind).
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..5 {
        let events = [("order".to_string(), format!("a{i}"))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    mock.broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
    );
    for i in 0..30 {
        let events = [("order".to_string(), format!("a{}", i % 5))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let got: HashSet<&str> = received.iter().filter_map(|r| r.id.as_deref()).collect();
    assert_none_missing(&written, &got);
    assert!(
        got.iter().all(|id| written.iter().any(|w| w.id == *id)),
        "a record that was never committed arrived"
    );
    assert!(
        relay.log_text().contains("without an offset"),
        "the fault did not happen (no delivery was reported without an offset): the test \
         proves nothing"
    );
}
