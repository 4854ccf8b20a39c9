//! Side by side with Debezium: the PostgreSQL connector and its Outbox EventRouter on Kafka
//! Connect (`bench/debezium/debezium.sh`), on the same outbox table as outboxd, each with its
//! own slot and publication. The same rows, relayed by both, compared record by record; and
//! a switch-over from Debezium to outboxd on Debezium's own slot and publication.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;

/// One row of the comparison: what to insert.
struct Row {
    aggregatetype: &'static str,
    aggregateid: String,
    payload: Option<String>,
    headers: Option<&'static str>,
}

fn rows() -> Vec<Row> {
    let big = format!(r#"{{"blob": "{}", "n": 1}}"#, "x".repeat(500 * 1024));
    let payloads: Vec<Option<String>> = vec![
        Some(r#"{"orderId": 1001, "total": 25.50}"#.into()),
        Some(r#"{"nested": {"a": [1, 2, {"b": null}], "c": {"d": true}}}"#.into()),
        Some(r#"{"text": "grüße — 日本語 — emoji 🎉", "quote": "\"q\""}"#.into()),
        Some(r#"{"big": 123456789012345678901234567890, "small": 1e-30, "neg": -0.5}"#.into()),
        Some(r#"[1, "two", 3.0]"#.into()),
        Some(r#""just a string""#.into()),
        None,
        Some(big),
    ];
    let mut out = Vec::new();
    for (i, payload) in payloads.into_iter().enumerate() {
        out.push(Row {
            aggregatetype: if i % 2 == 0 { "order" } else { "customer" },
            aggregateid: format!("agg-{}", i % 3),
            payload,
            headers: if i % 3 == 0 {
                Some(r#"{"traceparent": "00-abc-01", "tenant": "t1"}"#)
            } else {
                None
            },
        });
    }
    for i in 0..30 {
        out.push(Row {
            aggregatetype: "order",
            aggregateid: format!("key-{i}"),
            payload: Some(format!(r#"{{"i": {i}}}"#)),
            headers: None,
        });
    }
    out
}

/// Inserts `rows` one transaction each; returns their ids in order.
async fn insert(db: &TestDb, rows: &[Row]) -> Vec<String> {
    let client = db.client().await;
    let mut ids = Vec::new();
    for r in rows {
        let row = client
            .query_one(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
                 VALUES ($1, $2, 'Changed', $3::text::jsonb, $4::text::jsonb) RETURNING id::text",
                &[&r.aggregatetype, &r.aggregateid, &r.payload, &r.headers],
            )
            .await
            .unwrap();
        ids.push(row.get(0));
    }
    ids
}

fn by_id(received: Vec<Received>) -> HashMap<String, Received> {
    received
        .into_iter()
        .map(|r| (r.id.clone().expect("record without id header"), r))
        .collect()
}

/// Both on the settings the "Coming from Debezium" table (docs/from-debezium.md) gives (Debezium:
/// `extended.headers.enabled=false`, the `type` column as header `type`; outboxd: the
/// `headers` column not read), every record is identical: topic, partition, key bytes, value
/// bytes and every header — for JSON payloads of every shape, `null`, 500 kB, and 30 keys.
/// Record timestamps differ (README): Debezium's is when it processed the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_and_outboxd_write_the_same_records_for_the_same_rows() {
    let brokers = kafka_brokers();
    let db = TestDb::new("dbzcompat").await;
    let ours = format!("{}.ox.", db.name);
    let theirs = format!("{}.dbz.", db.name);
    let config = db.config(
        &brokers,
        &format!(
            "[kafka]\ntopic_template = \"{ours}{{aggregatetype}}\"\n\
             [postgres.columns]\nheaders = \"\"\n"
        ),
    );
    migrate(&config);
    let slot = format!("{}_dbz", db.name);
    let debezium = Debezium::start(
        &db,
        &slot,
        &slot,
        &theirs,
        &[
            "extended.headers.enabled=false",
            "transforms.outbox.table.fields.additional.placement=type:header:type",
        ],
    );
    let _relay = Relay::start(&config);
    let rows = rows();
    let ids = insert(&db, &rows).await;
    let expect = ids.iter().cloned().collect();
    let topics = |p: &str| vec![format!("{p}order"), format!("{p}customer")];
    let a = by_id(consume(
        &brokers,
        &topics(&ours),
        &expect,
        Duration::from_secs(90),
        Duration::ZERO,
    ));
    let b = by_id(consume(
        &brokers,
        &topics(&theirs),
        &expect,
        Duration::from_secs(90),
        Duration::ZERO,
    ));
    drop(debezium);
    for (id, row) in ids.iter().zip(&rows) {
        let o = a.get(id).unwrap_or_else(|| panic!("outboxd lacks {id}"));
        let d = b.get(id).unwrap_or_else(|| panic!("Debezium lacks {id}"));
        let what = format!(
            "event {id} ({} {:?})",
            row.aggregateid,
            row.payload.as_ref().map(|p| &p[..p.len().min(60)])
        );
        assert_eq!(
            o.topic.strip_prefix(&ours),
            d.topic.strip_prefix(&theirs),
            "topic of {what}"
        );
        assert_eq!(o.partition, d.partition, "partition of {what}");
        assert_eq!(o.key, d.key, "key of {what}");
        assert_eq!(o.raw_payload, d.raw_payload, "value bytes of {what}");
        assert_eq!(
            o.headers.get("id"),
            d.headers.get("id"),
            "id header of {what}"
        );
        let sorted =
            |h: &HashMap<String, String>| h.clone().into_iter().collect::<BTreeMap<_, _>>();
        assert_eq!(sorted(&o.headers), sorted(&d.headers), "headers of {what}");
        // Debezium stamps the time it processed the change; outboxd `created_at`.
        assert!(o.timestamp_ms.is_some() && d.timestamp_ms.is_some());
    }
}

/// The switch-over a Debezium user makes: Debezium relays part of a steady stream and is
/// stopped (SIGTERM: Connect commits its offsets, Debezium confirms its slot); outboxd starts
/// on Debezium's own slot and publication and continues. Every id arrives; repeats are only
/// of what Debezium had not confirmed; each key stays on one partition and in commit order
/// across the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outboxd_continues_on_debeziums_slot_without_a_gap() {
    let brokers = kafka_brokers();
    let db = TestDb::new("dbzswitch").await;
    let slot = format!("{}_dbz", db.name);
    // The table (and the aggregates the writers sequence), from a scratch config whose slot
    // and publication are dropped again: Debezium creates its own.
    let scratch = db.config(&brokers, "");
    migrate(&scratch);
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{0}'); DROP PUBLICATION outboxd;",
            db.slot()
        ))
        .await
        .unwrap();
    create_aggregates_table(&client).await;
    let mut debezium = Debezium::start(
        &db,
        &slot,
        &slot,
        &format!("{}.", db.name),
        &["extended.headers.enabled=false"],
    );
    let writer = SteadyWriter {
        run_for: Duration::from_secs(14),
        aggregates: 25,
        max_per_txn: 4,
        rollback_one_in: 0,
        pause: Duration::from_millis(5),
        seed: 0xdb2,
    }
    .spawn(&db);
    tokio::time::sleep(Duration::from_secs(5)).await;
    debezium.stop();
    let confirmed_by_debezium = db_confirmed(&db, &slot).await;
    let config = db.config(
        &brokers,
        &format!("[postgres]\nslot = \"{slot}\"\npublication = \"{slot}\"\n"),
    );
    let mut relay = Relay::start(&config);
    let (written, _) = writer.await.unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(90),
        Duration::from_secs(1),
    );
    // Debezium's records carry no `type` or `traceparent` header (see the compatibility test).
    let duplicates = assert_written(&written, &received, false);
    // One key, one partition, before and after the switch.
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    for r in &received {
        let key = r.key.as_deref().unwrap();
        let p = *partition_of.entry(key).or_insert(r.partition);
        assert_eq!(p, r.partition, "key {key} moved partitions at the switch");
    }
    // Whose record is whose: outboxd's carry a `type` header, Debezium's (on its defaults)
    // do not. Both relayed part of the stream, and an id repeats only across the switch:
    // once by Debezium (published, not yet confirmed), once by outboxd.
    let from_outboxd = |r: &Received| r.headers.contains_key("type");
    let mut copies: HashMap<&str, (u32, u32)> = HashMap::new();
    for r in &received {
        let c = copies.entry(r.id.as_deref().unwrap()).or_default();
        if from_outboxd(r) {
            c.1 += 1;
        } else {
            c.0 += 1;
        }
    }
    let by_debezium = copies.values().filter(|c| c.0 > 0).count();
    let by_outboxd = copies.values().filter(|c| c.1 > 0).count();
    assert!(
        by_debezium > 100 && by_outboxd > 100,
        "Debezium relayed {by_debezium}, outboxd {by_outboxd}"
    );
    for (id, c) in &copies {
        assert!(
            c.0 <= 1 && c.1 <= 1,
            "event {id}: {} copies from Debezium, {} from outboxd",
            c.0,
            c.1
        );
    }
    relay.assert_running();
    eprintln!(
        "{} events, {} records: {by_debezium} by Debezium, {by_outboxd} by outboxd, {duplicates} repeats (Debezium had confirmed up to {confirmed_by_debezium:X})",
        written.len(),
        received.len()
    );
}

/// The confirmed position of `slot` in `db`.
async fn db_confirmed(db: &TestDb, slot: &str) -> u64 {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    parse_lsn(&row.get::<_, String>(0))
}
