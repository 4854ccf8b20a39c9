//! Snapshots (`[cdc.snapshot]`, `outboxd snapshot`, Debezium's signal table) on real
//! PostgreSQL and Kafka: every existing row reaches its topic as an `op = "r"` event while
//! writers change the table; a snapshot row never overwrites a newer change; a relay killed
//! mid-snapshot resumes after its last acknowledged chunk; Debezium's signal payloads start,
//! pause, resume and stop one; and `outboxd verify --table` proves — or disproves — that the
//! topic equals the table, key by key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `[cdc]` capturing `tables`, topic prefix `<db>`; `snapshot` lines go to `[cdc.snapshot]`.
fn config(db: &TestDb, tables: &[&str], snapshot: &str) -> std::path::PathBuf {
    let list = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    db.config(
        &kafka_brokers(),
        &format!(
            "[cdc]\ntables = [{list}]\ntopic_prefix = \"{}\"\n[cdc.snapshot]\n{snapshot}\n",
            db.name
        ),
    )
}

/// One record of a table topic: key, op, `after`, id, `source.snapshot`.
#[derive(Debug, Clone)]
struct Change {
    key: String,
    op: String,
    after: Option<Value>,
    id: String,
    snapshot: String,
}

fn changes(records: &[Received]) -> Vec<Change> {
    records
        .iter()
        .filter_map(|r| {
            let key = r.key.clone()?;
            let id = r.headers.get("id").cloned().unwrap_or_default();
            let Some(p) = r.payload.as_deref() else {
                return Some(Change {
                    key,
                    op: "tombstone".into(),
                    after: None,
                    id,
                    snapshot: String::new(),
                });
            };
            let v: Value = serde_json::from_str(p).unwrap();
            Some(Change {
                key,
                op: v["op"].as_str().unwrap().to_string(),
                after: Some(v["after"].clone()).filter(|a| !a.is_null()),
                id,
                snapshot: v["source"]["snapshot"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Each key's records in offset order (one key, one partition).
fn by_key(changes: &[Change]) -> HashMap<String, Vec<Change>> {
    let mut out: HashMap<String, Vec<Change>> = HashMap::new();
    for c in changes {
        out.entry(c.key.clone()).or_default().push(c.clone());
    }
    out
}

/// The WAL position in a change event's id (`schema.table/<lsn>/<op>[/<n>]`).
fn lsn_of(id: &str) -> u64 {
    id.split('/').nth(1).unwrap().parse().unwrap()
}

/// `outboxd verify --table`: (exit code, output).
fn verify_table(config: &std::path::Path, table: &str) -> (i32, String) {
    let out = outboxd(
        &[
            "verify",
            "--table",
            table,
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The state of `table`'s snapshot in the progress table.
async fn snapshot_state(db: &TestDb, table: &str) -> Option<(String, i64, i64)> {
    let c = db.client().await;
    c.query_opt(
        "SELECT state, rows_done, chunks_done FROM outboxd_snapshot WHERE schema_name || '.' || table_name = $1",
        &[&table],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

async fn wait_state(db: &TestDb, table: &str, state: &str, within: Duration) {
    let (db2, t, s) = (db, table.to_string(), state.to_string());
    eventually(
        within,
        &format!("the snapshot of {table} is {state}"),
        || {
            let (t, s) = (t.clone(), s.clone());
            async move {
                snapshot_state(db2, &t)
                    .await
                    .is_some_and(|(st, ..)| st == s)
            }
        },
    )
    .await;
}

/// Waits until the slot is confirmed past everything written so far.
async fn caught_up(db: &TestDb) {
    let target = db.current_lsn().await;
    eventually(
        Duration::from_secs(120),
        "the relay confirmed everything written",
        || async move { db.confirmed_lsn().await >= target },
    )
    .await;
}

/// Random inserts, updates and deletes of `items` (ids 1..=`span`) in small transactions
/// until `stop`; returns the number of transactions.
fn writers(db: &TestDb, span: i64, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let url = db.url.clone();
    tokio::spawn(async move {
        let client = connect(&url).await;
        let mut rng = Rng::new(7);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let id = rng.range(1, span as u64) as i64;
            let sql = match rng.range(0, 9) {
                0..=5 => format!("UPDATE items SET qty = qty + 1, note = 'w{n}' WHERE id = {id}"),
                6 | 7 => format!(
                    "INSERT INTO items VALUES ({id}, 'new {n}', 1, now()) ON CONFLICT (id) DO UPDATE SET note = 'upsert {n}'"
                ),
                _ => format!("DELETE FROM items WHERE id = {id}"),
            };
            client.batch_execute(&sql).await.unwrap();
            n += 1;
        }
        n
    })
}

async fn items_table(db: &TestDb, rows: i64) {
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, note text, qty int, at timestamptz);
             INSERT INTO items SELECT g, 'row ' || g, 0, '2026-01-01 00:00:00+00' FROM generate_series(1, {rows}) g;
             ANALYZE items;"
        ))
        .await
        .unwrap();
}

/// For every key, a snapshot row carries the state the key's previous event left (or the
/// row as it was before any change): it never puts an older row after a newer change.
fn assert_no_snapshot_row_goes_back(
    keys: &HashMap<String, Vec<Change>>,
    original: impl Fn(&str, &Value) -> bool,
) {
    for (key, events) in keys {
        let mut state: Option<Value> = None;
        let mut seen = HashSet::new();
        for e in events {
            if !seen.insert(e.id.clone()) {
                continue; // a repeat after a restart
            }
            if e.op == "r" {
                let after = e.after.as_ref().unwrap();
                match &state {
                    Some(expected) => assert_eq!(
                        after, expected,
                        "key {key}: the snapshot row {} is not the state its previous event left; history {events:#?}",
                        e.id
                    ),
                    None => assert!(
                        original(key, after),
                        "key {key}: the snapshot row {} is not the original row; history {events:#?}",
                        e.id
                    ),
                }
            }
            state = e
                .after
                .clone()
                .or(state.filter(|_| e.op != "d" && e.op != "tombstone"));
            if e.op == "d" || e.op == "tombstone" {
                state = None;
            }
        }
    }
}

/// The initial snapshot of a table under writers: every row that exists arrives as an
/// `op = "r"` event, streamed changes each arrive once, no snapshot row goes back in time,
/// and at the end the topic equals the table (`verify --table`: 0 differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_snapshot_under_writers_leaves_the_topic_equal_to_the_table() {
    let db = TestDb::new("snapinit").await;
    let rows = 20_000;
    items_table(&db, rows).await;
    let config = config(&db, &["public.items"], "chunk_size = 500");
    migrate(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writers(&db, rows + 2_000, stop.clone());
    let mut relay = Relay::start(&config);
    wait_state(&db, "public.items", "done", Duration::from_secs(120)).await;
    stop.store(true, Ordering::Relaxed);
    let txns = writes.await.unwrap();
    caught_up(&db).await;
    relay.assert_running();
    let (code, out) = verify_table(&config, "public.items");
    assert_eq!(code, 0, "verify --table found differences:\n{out}");
    assert!(out.contains("0 differ"), "{out}");

    let topic = format!("{}.public.items", db.name);
    let got = changes(&consume_count(
        &kafka_brokers(),
        &[topic],
        1,
        Duration::from_secs(60),
        Duration::from_secs(3),
    ));
    // Each streamed change and each snapshot row once: no restart happened.
    let mut ids = HashSet::new();
    for c in &got {
        assert!(ids.insert(c.id.clone()), "event {} arrived twice", c.id);
    }
    let keys = by_key(&got);
    let original = |key: &str, after: &Value| {
        let id = serde_json::from_str::<Value>(key).unwrap()["id"]
            .as_i64()
            .unwrap();
        after["note"] == format!("row {id}") && after["qty"] == 0
    };
    assert_no_snapshot_row_goes_back(&keys, original);
    // Every original key that no writer touched arrived as exactly one snapshot row.
    let reads = got.iter().filter(|c| c.op == "r").count();
    let untouched = (1..=rows)
        .filter(|i| {
            keys.get(&format!("{{\"id\":{i}}}"))
                .is_some_and(|e| e.len() == 1)
        })
        .count();
    assert!(
        untouched > 5_000,
        "only {untouched} keys untouched by {txns} writes"
    );
    for (key, events) in &keys {
        if events.len() == 1 && events[0].op != "c" && events[0].op != "u" {
            assert_eq!(events[0].op, "r", "key {key}: {events:?}");
        }
        // Within a key, positions never go back (a snapshot row sits at its chunk's high
        // watermark, in WAL order with the changes around it).
        let lsns: Vec<u64> = events.iter().map(|e| lsn_of(&e.id)).collect();
        assert!(
            lsns.windows(2).all(|w| w[0] <= w[1]),
            "key {key}: {events:#?}"
        );
    }
    let places: HashSet<&str> = got
        .iter()
        .filter(|c| c.op == "r")
        .map(|c| c.snapshot.as_str())
        .collect();
    assert!(
        places.contains("first_in_data_collection") && places.contains("true"),
        "{places:?}"
    );
    assert!(reads >= untouched, "{reads} snapshot rows");
    assert!(
        txns > 100,
        "the writers ran only {txns} transactions during the snapshot"
    );
}
