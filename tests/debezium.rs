//! Side by side with Debezium: the PostgreSQL connector and its Outbox EventRouter on Kafka
//! Connect (`bench/debezium/debezium.sh`), on the same outbox table as outboxd, each with its
//! own slot and publication. The same rows, relayed by both, compared record by record; and
//! a switch-over from Debezium to outboxd on Debezium's own slot and publication.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A Kafka Connect worker running Debezium's connector. Stopped on drop.
struct Debezium {
    dir: PathBuf,
}

impl Debezium {
    /// Debezium on `db` with its own `slot` and publication, routing to
    /// `<prefix>${routedByValue}`; `extra` connector properties are appended.
    fn start(db: &TestDb, slot: &str, publication: &str, prefix: &str, extra: &[&str]) -> Debezium {
        let dir = std::env::temp_dir().join(unique("debezium"));
        let port = db.socket_addr().port().to_string();
        let mut args = vec![
            "start".to_string(),
            dir.display().to_string(),
            kafka_brokers(),
            format!("database.port={port}"),
            format!("database.dbname={}", db.name),
            format!("slot.name={slot}"),
            format!("publication.name={publication}"),
            format!("transforms.outbox.route.topic.replacement={prefix}${{routedByValue}}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/debezium/debezium.sh");
        let status = Command::new(script).args(&args).status().unwrap();
        assert!(status.success(), "debezium.sh start failed");
        Debezium { dir }
    }

    fn stop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/debezium/debezium.sh");
        let _ = Command::new(script)
            .args(["stop", self.dir.to_str().unwrap()])
            .status();
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        self.stop();
    }
}

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

/// Both on the settings the README's "Coming from Debezium" table gives (Debezium:
/// `extended.headers.enabled=false`, the `type` column as header `type`; outboxd: the
/// `headers` column not read), every record is identical: topic, partition, key bytes, value
/// bytes and every header — for JSON payloads of every shape, `null`, 500 kB, and 30 keys.
/// Record timestamps differ (printed): Debezium stamps the commit time, outboxd `created_at`.
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
    let mut clock = Vec::new();
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
        clock.push(o.timestamp_ms.zip(d.timestamp_ms).map(|(a, b)| b - a));
    }
    eprintln!("record timestamp, Debezium minus outboxd (ms): {clock:?}");
}
