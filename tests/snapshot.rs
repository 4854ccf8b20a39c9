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

/// Every record's `id` header by key, in offset order, read from the beginning to the end
/// (key and header only: a million records in a debug build); and the record count.
fn ids_by_key(brokers: &str, topic: &str) -> (usize, HashMap<String, Vec<String>>) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("snapread"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(10);
    let md = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in md.topics()[0].partitions() {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), timeout).unwrap();
        ends.insert(p.id(), high);
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut n = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    ends.retain(|_, high| *high > 0);
    while !ends.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} took over 5 minutes"
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.unwrap();
        n += 1;
        let id = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        if let Some(k) = m.key() {
            out.entry(String::from_utf8_lossy(k).into_owned())
                .or_default()
                .push(id);
        }
        if ends
            .get(&m.partition())
            .is_some_and(|high| m.offset() + 1 >= *high)
        {
            ends.remove(&m.partition());
        }
    }
    (n, out)
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
/// (about 200 a second) until `stop`; returns the number of transactions.
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
            // A steady service's rate, not a flood: the stream keeps up in a debug build.
            tokio::time::sleep(Duration::from_millis(4)).await;
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

/// A 400,000-row table (`OUTBOXD_SNAPSHOT_ROWS` to change it; 1,000,000 in a soak run)
/// snapshotted while writers insert, update and delete, and the relay is SIGKILLed three times
/// mid-snapshot: each restart resumes after the last acknowledged chunk (progress never goes
/// back), no more rows are read twice than were unconfirmed at the kills, every key's events
/// are in order, and at the end the topic equals the table for every key (`verify --table`:
/// 0 differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_three_times_resumes_and_ends_with_the_topic_equal_to_the_table() {
    let rows: i64 = std::env::var("OUTBOXD_SNAPSHOT_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let db = TestDb::new("snapkill").await;
    items_table(&db, rows).await;
    let config = config(&db, &["public.items"], "chunk_size = 2048");
    migrate(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writers(&db, rows + 10_000, stop.clone());
    // Info level: a debug line per delivered record would be most of the relay's work.
    let quiet = [("OUTBOXD_LOG", "info")];
    let mut relay = Relay::start_with_env(&config, &quiet);
    let kills = 3;
    for k in 1..=kills {
        let at = rows * k / (kills + 1);
        eventually(
            Duration::from_secs(300),
            &format!("{at} rows acknowledged"),
            || async {
                snapshot_state(&db, "public.items")
                    .await
                    .is_some_and(|(_, done, _)| done >= at)
            },
        )
        .await;
        relay.kill();
        let (_, before, _) = snapshot_state(&db, "public.items").await.unwrap();
        relay = Relay::start_with_env(&config, &quiet);
        eventually(Duration::from_secs(60), "the snapshot resumed", || async {
            relay
                .log_text()
                .contains("snapshot resumed after its last acknowledged chunk")
        })
        .await;
        let (_, after, _) = snapshot_state(&db, "public.items").await.unwrap();
        assert!(
            after >= before,
            "progress went back from {before} to {after}"
        );
    }
    wait_state(&db, "public.items", "done", Duration::from_secs(600)).await;
    stop.store(true, Ordering::Relaxed);
    let txns = writes.await.unwrap();
    caught_up(&db).await;
    relay.assert_running();
    let (code, out) = verify_table(&config, "public.items");
    assert_eq!(code, 0, "verify --table found differences:\n{out}");

    let topic = format!("{}.public.items", db.name);
    let (records, keys) = ids_by_key(&kafka_brokers(), &topic);
    let mut reads = 0usize;
    let mut keys_read = 0usize;
    for (key, ids) in &keys {
        // First occurrences (a restart repeats what was not confirmed) are in WAL order.
        let mut seen = HashSet::new();
        let firsts: Vec<&String> = ids.iter().filter(|id| seen.insert(id.as_str())).collect();
        let lsns: Vec<u64> = firsts.iter().map(|id| lsn_of(id)).collect();
        assert!(
            lsns.windows(2).all(|w| w[0] <= w[1]),
            "key {key}: {firsts:#?}"
        );
        let r = firsts
            .iter()
            .filter(|id| id.split('/').nth(2) == Some("r"))
            .count();
        reads += r;
        keys_read += usize::from(r > 0);
    }
    let reread = reads - keys_read;
    eprintln!(
        "{rows} rows, {txns} writer transactions, {records} records, {reads} snapshot rows for {keys_read} keys: {reread} read again after {kills} kills"
    );
    // Restarting from zero would read ~1.5 × the table again; resuming reads again only the
    // chunks not yet confirmed at each kill (well under one confirmation interval's worth).
    assert!(
        reread as i64 <= kills * 150_000.min(rows / 4),
        "{reread} rows were read again after {kills} kills"
    );
    assert!(
        keys_read as i64 > rows / 2,
        "only {keys_read} keys had a snapshot row"
    );
}

/// Inserts a Debezium signal (`id`, `type`, `data`) as its documentation writes them.
async fn signal(db: &TestDb, id: &str, kind: &str, data: Option<&str>) {
    db.client()
        .await
        .execute(
            "INSERT INTO debezium_signal (id, type, data) VALUES ($1, $2, $3)",
            &[&id, &kind, &data],
        )
        .await
        .unwrap();
}

/// Debezium's signal-table payloads, copied from its documentation: `execute-snapshot` with
/// `additional-conditions` snapshots exactly the rows matching the filter; then a whole-table
/// snapshot is paused (no chunk while paused), resumed, and stopped before it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debeziums_signal_table_payloads_start_pause_resume_and_stop_an_incremental_snapshot() {
    let db = TestDb::new("snapsig").await;
    items_table(&db, 300_000).await;
    db.client()
        .await
        .batch_execute("CREATE TABLE debezium_signal (id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, data varchar(2048) NULL)")
        .await
        .unwrap();
    let config = config(
        &db,
        &["public.*"],
        "mode = \"never\"\nchunk_size = 100\nreaders = 1\nsignal_table = \"public.debezium_signal\"",
    );
    migrate(&config);
    let _relay = Relay::start_with_env(&config, &[("OUTBOXD_LOG", "info")]);
    db.streaming().await;
    // mode = "never": nothing is snapshotted unasked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(snapshot_state(&db, "public.items").await.is_none());

    signal(
        &db,
        "ad-hoc-1",
        "execute-snapshot",
        Some(r#"{"data-collections": ["public.items"],"type":"incremental", "additional-conditions":[{"data-collection": "public.items", "filter": "id <= 2000 AND id % 2 = 0"}]}"#),
    )
    .await;
    wait_state(&db, "public.items", "done", Duration::from_secs(60)).await;
    let topic = format!("{}.public.items", db.name);
    let got = changes(&consume_count(
        &kafka_brokers(),
        std::slice::from_ref(&topic),
        1000,
        Duration::from_secs(60),
        Duration::from_secs(2),
    ));
    let keys: HashSet<String> = got
        .iter()
        .filter(|c| c.op == "r")
        .map(|c| c.key.clone())
        .collect();
    let expected: HashSet<String> = (1..=1000)
        .map(|i| format!("{{\"id\":{}}}", i * 2))
        .collect();
    assert_eq!(keys, expected, "the filtered snapshot's rows");
    assert!(got.iter().all(|c| c.snapshot == "incremental"));
    // The signal table's own rows are signals, not change events.
    assert!(!got.iter().any(|c| c.key.contains("ad-hoc")));

    signal(
        &db,
        "ad-hoc-2",
        "execute-snapshot",
        Some(r#"{"data-collections": ["public.items"], "type":"incremental"}"#),
    )
    .await;
    eventually(
        Duration::from_secs(60),
        "the whole-table snapshot runs",
        || async {
            snapshot_state(&db, "public.items")
                .await
                .is_some_and(|(s, done, _)| s == "running" && done > 0)
        },
    )
    .await;
    signal(&db, "ad-hoc-3", "pause-snapshot", None).await;
    wait_state(&db, "public.items", "paused", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, paused_at, chunks) = snapshot_state(&db, "public.items").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (state, still, chunks_still) = snapshot_state(&db, "public.items").await.unwrap();
    assert_eq!(
        (state.as_str(), still, chunks_still),
        ("paused", paused_at, chunks),
        "a paused snapshot moved"
    );
    assert!(paused_at < 300_000, "the snapshot ended before the pause");

    signal(&db, "ad-hoc-4", "resume-snapshot", None).await;
    eventually(
        Duration::from_secs(60),
        "the snapshot goes on after resume",
        || async {
            snapshot_state(&db, "public.items")
                .await
                .is_some_and(|(s, done, _)| s == "running" && done > paused_at)
        },
    )
    .await;
    signal(
        &db,
        "ad-hoc-5",
        "stop-snapshot",
        Some(r#"{"data-collections": ["public.items"], "type":"incremental"}"#),
    )
    .await;
    wait_state(&db, "public.items", "stopped", Duration::from_secs(30)).await;
    let (_, at_stop, _) = snapshot_state(&db, "public.items").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (state, after_stop, _) = snapshot_state(&db, "public.items").await.unwrap();
    assert_eq!((state.as_str(), after_stop), ("stopped", at_stop));
    assert!(at_stop < 300_000, "the snapshot ended before the stop");
}

/// `outboxd snapshot --table … --where … --wait` snapshots the matching rows and returns when
/// they are acknowledged; `outboxd verify --table` then names each key whose topic state is
/// not the table's — a change the relay has not published yet (it was stopped), a delete —
/// exits 1, and 0 again once the relay caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_table_names_every_key_whose_topic_state_differs_and_passes_once_caught_up() {
    let db = TestDb::new("snapver").await;
    items_table(&db, 3_000).await;
    let config = config(&db, &["public.items"], "mode = \"never\"");
    migrate(&config);
    let mut relay = Relay::start(&config);
    let cfg = config.to_str().unwrap();
    let out = outboxd(
        &[
            "snapshot",
            "--table",
            "public.items",
            "--where",
            "id > 1000",
            "--wait",
            "--config",
            cfg,
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("public.items: done (2000 rows)"), "{text}");
    // Rows 1..=1000 were not snapshotted: verify names each as missing.
    let (code, out) = verify_table(&config, "public.items");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1000 differ"), "{out}");
    for i in [1, 500, 1000] {
        assert!(
            out.contains(&format!("{{\"id\":{i}}} missing from the topic")),
            "{out}"
        );
    }
    let out = outboxd(
        &[
            "snapshot",
            "--table",
            "public.items",
            "--wait",
            "--config",
            cfg,
        ],
        &[],
    );
    assert!(out.status.success());
    let (code, out) = verify_table(&config, "public.items");
    assert_eq!(code, 0, "{out}");

    // Changes the stopped relay has not published: a different value and a deleted row.
    relay.terminate(Duration::from_secs(30));
    db.client()
        .await
        .batch_execute("UPDATE items SET qty = 42 WHERE id = 7; DELETE FROM items WHERE id = 9")
        .await
        .unwrap();
    let (code, out) = verify_table(&config, "public.items");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("2 differ"), "{out}");
    assert!(
        out.contains("{\"id\":7} the topic's latest event is not the row"),
        "{out}"
    );
    assert!(
        out.contains("{\"id\":9} deleted from the table, still in the topic"),
        "{out}"
    );
    let _relay = Relay::start(&config);
    caught_up(&db).await;
    let (code, out) = verify_table(&config, "public.items");
    assert_eq!(code, 0, "{out}");
}

/// `mode = "initial_only"`: the relay snapshots every captured table, then exits 0 by
/// itself once every row is acknowledged — and the topics equal the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_only_exits_0_once_every_table_is_snapshotted_and_acknowledged() {
    let db = TestDb::new("snaponly").await;
    items_table(&db, 5_000).await;
    db.client()
        .await
        .batch_execute("CREATE TABLE tags (k text PRIMARY KEY, v int); INSERT INTO tags SELECT 'tag-' || g, g FROM generate_series(1, 300) g")
        .await
        .unwrap();
    let config = config(
        &db,
        &["public.items", "public.tags"],
        "mode = \"initial_only\"",
    );
    migrate(&config);
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{status}; log:\n{}", relay.log_text());
    assert!(relay
        .log_text()
        .contains("initial_only: every snapshot is done"));
    for table in ["public.items", "public.tags"] {
        assert_eq!(snapshot_state(&db, table).await.unwrap().0, "done");
        let (code, out) = verify_table(&config, table);
        assert_eq!(code, 0, "{table}: {out}");
    }
    let (_, out) = verify_table(&config, "public.tags");
    assert!(
        out.contains("300 rows") && out.contains("300 keys"),
        "{out}"
    );
}
