//! Kafka compatibility defaults: a key lands on the partition the Java client (and so
//! Debezium) would choose, and topics the relay creates take the broker's own defaults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Partition of each key among 6, as Apache Kafka's Java client computes it
/// (`Utils.toPositive(Utils.murmur2(key)) % 6`, kafka-clients 4.3.1, run with the broker's own
/// jars: see the commit that added this table).
const JAVA_PARTITIONS: &[(&str, i32)] = &[
    ("order-1", 4),
    ("order-2", 3),
    ("order-3", 3),
    ("customer-42", 3),
    ("customer-43", 5),
    ("a", 4),
    ("b", 2),
    ("c", 4),
    ("d", 5),
    ("e", 2),
    ("9f8c1a", 1),
    ("ü-unicode", 5),
    ("long-key-0123456789-0123456789-0123456789", 5),
    ("agg-0", 1),
    ("agg-1", 3),
    ("agg-2", 4),
    ("agg-3", 5),
    ("agg-4", 4),
    ("agg-5", 1),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_lands_on_the_partition_the_java_client_chooses() {
    let brokers = kafka_brokers();
    let (db, config) = setup("murmur", &brokers, "").await;
    create_topic(&brokers, &db.topic("order"), 6, &[]).await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut written = Vec::new();
    for (key, _) in JAVA_PARTITIONS {
        written.extend(
            write_txn(&mut client, &[("order".into(), key.to_string())], false)
                .await
                .unwrap(),
        );
    }
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::from_millis(200),
    );
    assert_exactly_written(&written, &received);
    let got: HashMap<&str, i32> = received
        .iter()
        .map(|r| (r.key.as_deref().unwrap(), r.partition))
        .collect();
    let wrong: Vec<String> = JAVA_PARTITIONS
        .iter()
        .filter(|(k, p)| got.get(k) != Some(p))
        .map(|(k, p)| format!("{k}: java {p}, outboxd {:?}", got.get(k)))
        .collect();
    assert!(
        wrong.is_empty(),
        "keys on another partition than the Java client's: {wrong:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_the_relay_creates_take_the_brokers_default_partitions() {
    let kafka = PrivateKafka::start(&["num.partitions=5"]);
    let (db, config) = setup("brokerdefault", &kafka.brokers, "").await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;
    let written = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let received = consume(
        &kafka.brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&written, &received);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(&db.topic("order")), Duration::from_secs(10))
        .unwrap();
    let partitions: HashSet<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    assert_eq!(
        partitions.len(),
        5,
        "the broker's num.partitions, not a default of outboxd's"
    );
}
