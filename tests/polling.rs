//! Polling mode (`mode = "polling"`), for databases without logical replication: gap-free
//! reads by (transaction id, sequence), against real PostgreSQL and the real broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

const POLLING: &str = "mode = \"polling\"\n[polling]\ninterval_ms = 200\n";

async fn setup_polling(prefix: &str, extra: &str) -> (TestDb, std::path::PathBuf, String) {
    let brokers = kafka_brokers();
    let (db, config) = setup(prefix, &brokers, &format!("{POLLING}{extra}")).await;
    (db, config, brokers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polling_delivers_10k_concurrent_events_in_transaction_id_order() {
    let (db, config, brokers) = setup_polling("pconc", "").await;
    let mut relay = Relay::start(&config);
    let mut written = concurrent_workload(&db, 10_000, 4, 300, &["order", "customer"]).await;
    fill_polling_order(&db, &mut written).await;
    let topics = vec![db.topic("order"), db.topic("customer")];
    let received = consume(
        &brokers,
        &topics,
        &ids(&written),
        Duration::from_secs(120),
        Duration::from_secs(1),
    );
    relay.assert_running();
    assert_eq!(assert_exactly_written(&written, &received), 0);
    // The cursor is stored once everything is acknowledged.
    let max = written.iter().map(|w| w.order.unwrap()).max().unwrap();
    eventually(
        Duration::from_secs(10),
        "cursor stored at the last event",
        || async {
            let row = db
                .client()
                .await
                .query_opt("SELECT xid::text, seq FROM outboxd_cursor", &[])
                .await
                .unwrap();
            row.is_some_and(|r| {
                (
                    r.get::<_, String>(0).parse::<u64>().unwrap(),
                    r.get::<_, i64>(1),
                ) == max
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_that_inserts_first_and_commits_last_is_not_skipped() {
    let (db, config, brokers) = setup_polling("pgap", "").await;
    let _relay = Relay::start(&config);
    // The slow transaction takes its xid and sequence first...
    let mut slow = db.client().await;
    let tx = slow.transaction().await.unwrap();
    let slow_id: String = tx
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'slow', 'Changed', '{}') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // ...many others commit meanwhile (with `id > last_id` polling, the slow row is lost)...
    let mut client = db.client().await;
    let mut fast = Vec::new();
    for i in 0..50 {
        fast.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("f{}", i % 5))],
                false,
            )
            .await
            .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // ...and it commits last.
    tx.commit().await.unwrap();
    let mut expect = ids(&fast);
    expect.insert(slow_id.clone());
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &expect,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let got: HashSet<String> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(
        got.contains(&slow_id),
        "the slow transaction's event was skipped"
    );
    fill_polling_order(&db, &mut fast).await;
    assert_exactly_written(
        &fast,
        &received
            .into_iter()
            .filter(|r| r.id.as_deref() != Some(&slow_id))
            .collect::<Vec<_>>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_running_unrelated_transaction_delays_publishing_but_loses_nothing() {
    let (db, config, brokers) = setup_polling("plong", "").await;
    let _relay = Relay::start(&config);
    let mut other = db.client().await;
    other
        .batch_execute("CREATE TABLE unrelated (v int)")
        .await
        .unwrap();
    let tx = other.transaction().await.unwrap();
    tx.batch_execute("INSERT INTO unrelated VALUES (1)")
        .await
        .unwrap(); // takes an xid, stays open
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..20 {
        written.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("a{}", i % 3))],
                false,
            )
            .await
            .unwrap(),
        );
    }
    // Held back by the open transaction (its xid bounds the snapshot's xmin): after several
    // polls nothing was published, so the cursor (registered at the session's start) has
    // not moved.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored: i64 = client
        .query_one(
            "SELECT count(*) FROM outboxd_cursor WHERE xid <> '0'::xid8 OR seq <> 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "published past a running transaction");
    tx.rollback().await.unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    fill_polling_order(&db, &mut written).await;
    assert_exactly_written(&written, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_event_lost_when_polling_relay_killed_mid_stream() {
    let (db, config, brokers) = setup_polling("pkill", "[polling]\nbatch_size = 200\n").await;
    let mut relay = Relay::start(&config);
    let writer = {
        let db = db.clone();
        tokio::spawn(async move { concurrent_workload(&db, 6_000, 3, 100, &["order"]).await })
    };
    eventually(
        Duration::from_secs(60),
        "cursor stored (or the writer done)",
        || async {
            let stored = db
                .client()
                .await
                .query_opt("SELECT 1 FROM outboxd_cursor", &[])
                .await
                .unwrap()
                .is_some();
            // Mid-stream if the writer is still going; under load it may finish first, and
            // the kill then still comes after a stored cursor.
            stored || writer.is_finished()
        },
    )
    .await;
    relay.kill();
    let mut relay = Relay::start(&config);
    let mut written = writer.await.unwrap();
    fill_polling_order(&db, &mut written).await;
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(120),
        Duration::from_secs(1),
    );
    relay.assert_running();
    let dups = assert_exactly_written(&written, &received);
    eprintln!(
        "{} records, {dups} duplicates after the kill",
        received.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_polling_relay_well_before_its_interval() {
    let (db, config, brokers) = setup_polling("pnotify", "[polling]\ninterval_ms = 60000\n").await;
    let _relay = Relay::start(&config);
    tokio::time::sleep(Duration::from_secs(2)).await; // idle: waiting up to 60 s
    let mut client = db.client().await;
    let written = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(20),
        Duration::ZERO,
    );
    assert_eq!(
        received.len(),
        1,
        "the NOTIFY trigger must wake the relay (interval is 60 s)"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_query_is_one_index_range_scan_on_a_million_published_rows() {
    let (db, config, _) = setup_polling("pexplain", "").await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'order', 'a' || (g % 1000), 'Changed', '{}' FROM generate_series(1, 1000000) g; \
             ANALYZE outbox;",
        )
        .await
        .unwrap();
    let (xid, seq): (String, i64) = {
        let r = client
            .query_one(
                "SELECT max(outboxd_xid)::text, max(outboxd_seq) FROM outbox",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    // EXPLAIN the relay's own poll query, with the cursor at the end of the published rows.
    let cfg = outboxd::config::Config::load(Some(&config)).unwrap();
    let poller = outboxd::source::polling::Poller::open(&cfg).await.unwrap();
    let limit = 1000i64;
    let plan: String = client
        .query(
            &format!("EXPLAIN {}", poller.query()),
            &[&xid, &seq, &limit, &(64i64 << 20)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("{plan}");
    assert!(
        plan.contains("Index Scan using outbox_outboxd_poll"),
        "{plan}"
    );
    assert!(
        plan.contains("Index Cond"),
        "the cursor must bound the scan:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan") && !plan.contains("Sort"),
        "{plan}"
    );
}

#[tokio::test]
async fn migrate_in_polling_mode_adds_columns_index_cursor_and_trigger_idempotently() {
    let (db, config, _) = setup_polling("pmigrate", "").await;
    let out = outboxd(&["migrate", "--config", config.to_str().unwrap()], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for item in [
        "outboxd_xid",
        "outboxd_seq",
        "outbox_outboxd_poll",
        "outboxd_cursor",
        "trigger outboxd_notify",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains(item) && l.contains("already exists")),
            "{item}: {text}"
        );
    }
    // The service's INSERTs stay as they were: no new column needs a value.
    db.client()
        .await
        .batch_execute("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'x', 'T', '{}')")
        .await
        .unwrap();
    let slots: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "polling mode needs no replication slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_past_the_retention_are_deleted_unpublished_ones_are_kept() {
    // About one second of retention.
    let (db, config, brokers) =
        setup_polling("pretain", "[polling]\nretention_hours = 0.0003\n").await;
    let mut client = db.client().await;
    // Held back: an open transaction keeps these rows unpublished for now.
    let mut other = db.client().await;
    let mut relay = Relay::start(&config);
    let mut published = Vec::new();
    for i in 0..20 {
        published.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("a{}", i % 4))],
                false,
            )
            .await
            .unwrap(),
        );
    }
    fill_polling_order(&db, &mut published).await;
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&published),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&published, &received);
    let tx = other.transaction().await.unwrap();
    tx.batch_execute("CREATE TEMP TABLE hold (v int); INSERT INTO hold VALUES (1)")
        .await
        .unwrap();
    let held = write_txn(&mut client, &[("order".into(), "held".into())], false)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(40),
        "published rows deleted after the retention",
        || async {
            let ids: Vec<String> = published.iter().map(|w| w.id.clone()).collect();
            let left: i64 = db
                .client()
                .await
                .query_one(
                    "SELECT count(*) FROM outbox WHERE id::text = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .get(0);
            left == 0
        },
    )
    .await;
    let still: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE id::text = $1",
            &[&held[0].id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1, "a row not yet published must never be deleted");
    tx.rollback().await.unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&held),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert!(received
        .iter()
        .any(|r| r.id.as_deref() == Some(held[0].id.as_str())));
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_up_while_the_relay_is_never_idle() {
    // About one second of retention, and a writer that never lets a poll come back empty.
    let (db, config, _) = setup_polling(
        "pkeepup",
        "[polling]\nretention_hours = 0.0003\nbatch_size = 50\n",
    )
    .await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;
    let started = Instant::now();
    let mut written = 0usize;
    while started.elapsed() < Duration::from_secs(12) {
        let events: Vec<(String, String)> = (0..20)
            .map(|i| ("order".to_string(), format!("a{i}")))
            .collect();
        written += write_txn(&mut client, &events, false).await.unwrap().len();
    }
    // Still under load: published rows written more than 5 s ago must be gone.
    let stale: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox o JOIN outboxd_cursor c ON c.name = $1 \
             WHERE (o.outboxd_xid, o.outboxd_seq) <= (c.xid, c.seq) \
               AND o.created_at < now() - interval '5 seconds'",
            &[&db.slot()],
        )
        .await
        .unwrap()
        .get(0);
    let total: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stale, 0,
        "{stale} published rows older than 5 s are still there ({total} rows left of {written} written)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_from_another_cluster_stops_the_relay_with_the_fix() {
    // After a dump/restore into another cluster the stored cursor can be far ahead of the new
    // cluster's transaction ids: new rows would sort below it and be skipped.
    let (db, config, _) = setup_polling("pmoved", "").await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outboxd_cursor (name, xid, seq) VALUES ($1, '999999999999', 7)",
            &[&db.slot()],
        )
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(20));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(
        log.contains("ahead of this cluster") && log.contains("UPDATE"),
        "log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_carries_the_first_copys_timestamp_without_a_timestamp_column() {
    let (db, config, brokers) = setup_polling(
        "prepeat",
        "[postgres.columns]\ntimestamp = \"\"\n[kafka]\ncloudevents = true\n",
    )
    .await;
    let mut client = db.client().await;
    let written = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    let first = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_eq!(relay.terminate(Duration::from_secs(20)).code(), Some(0));
    // Publish everything again, as a crash before the cursor was stored would.
    client
        .execute("UPDATE outboxd_cursor SET xid = '0', seq = 0", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _relay = Relay::start(&config);
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while all.len() < 2 && Instant::now() < deadline {
        all = consume(
            &brokers,
            &[db.topic("order")],
            &ids(&written),
            Duration::from_secs(5),
            Duration::from_millis(500),
        );
    }
    assert_eq!(all.len(), 2, "the event and its repeat: {all:?}");
    assert_eq!(first.len(), 1);
    assert_eq!(
        all[0].timestamp_ms, all[1].timestamp_ms,
        "record timestamps differ"
    );
    assert_eq!(
        all[0].headers.get("ce_time"),
        all[1].headers.get("ce_time"),
        "ce_time differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_batches_are_bounded_by_bytes_and_always_take_one_row() {
    // kafka.max_in_flight_bytes (1 MiB here) bounds a poll as well as batch_size: rows are
    // taken while the rows before them stay under it, so a row larger than the budget still
    // comes, alone.
    let (db, config, _) = setup_polling("pbytes", "[kafka]\nmax_in_flight_bytes = 1048576\n").await;
    let client = db.client().await;
    for kb in [600i32, 600, 600, 3000, 10] {
        client
            .execute(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                 VALUES ('order', 'a', 'Changed', jsonb_build_object('pad', repeat('x', $1 * 1000)))",
                &[&kb],
            )
            .await
            .unwrap();
    }
    let cfg = outboxd::config::Config::load(Some(&config)).unwrap();
    let mut poller = outboxd::source::polling::Poller::open(&cfg).await.unwrap();
    // Rows are fetched once no older transaction can still commit before them, and another
    // test's open transaction on this cluster can hold that horizon back for a while (a run
    // saw an empty first fetch): wait until every transaction up to the inserts has ended,
    // so the batches show the byte bound alone.
    let after: i64 = client
        .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await
        .unwrap()
        .get(0);
    eventually(
        Duration::from_secs(60),
        "the snapshot horizon passes the inserts",
        || async {
            let xmin: i64 = client
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            xmin > after
        },
    )
    .await;
    let mut sizes = Vec::new();
    loop {
        let batch = poller.fetch(poller.cursor(), 1000).await.unwrap();
        let Some((_, last)) = batch.last().cloned() else {
            break;
        };
        sizes.push(batch.len());
        poller.store(last).await.unwrap();
    }
    // 600+600 kB (the second starts at 600 kB < 1 MiB; a third would start at 1.2 MB), then
    // 600 kB + the 3 MB row (it starts at 600 kB), then the 10 kB row: at most the budget plus
    // one row, however large.
    assert_eq!(sizes, vec![2, 2, 1]);
}

/// Two pipelines on one outbox table (here: two relays with their own cursor names and
/// topics; in production a Kafka and a NATS fan-out, or blue/green relays). Retention of one
/// deletes only rows every pipeline's cursor has passed: the other, stopped meanwhile, still
/// finds every event when it comes back, and the rows go once both have published them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_of_one_pipeline_keeps_the_rows_another_pipeline_has_not_published() {
    let (db, config, brokers) =
        setup_polling("ptwo", "[polling]\nretention_hours = 0.0003\n").await;
    let text = std::fs::read_to_string(&config).unwrap();
    let other = config.with_extension("b.toml");
    let addr = http_addr(&config);
    std::fs::write(
        &other,
        text.replace(
            &format!("slot = \"{}\"", db.slot()),
            &format!("slot = \"{}_b\"", db.slot()),
        )
        .replace(
            &format!("topic_template = \"{}.", db.name),
            &format!("topic_template = \"{}_b.", db.name),
        )
        .replace("retention_hours = 0.0003", "retention_hours = 168")
        .replace(&addr, &format!("127.0.0.1:{}", free_port())),
    )
    .unwrap();
    // Pipeline B runs once (it is counted from its first session), then stops.
    let mut b = Relay::start(&other);
    eventually(Duration::from_secs(30), "pipeline B started", || async {
        b.log_text().contains("relay started")
    })
    .await;
    assert!(b.terminate(Duration::from_secs(30)).success());
    drop(b);
    // Pipeline A publishes, and its retention runs every second.
    let _a = Relay::start(&config);
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..20 {
        let events = [("order".to_string(), format!("a{}", i % 4))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    fill_polling_order(&db, &mut written).await;
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&written, &received);
    // Several retention passes of A while B is away.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _b = Relay::start(&other);
    let received = consume(
        &brokers,
        &[format!("{}_b.order", db.name)],
        &ids(&written),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&written, &received);
    eventually(
        Duration::from_secs(30),
        "rows deleted once both pipelines published them",
        || async {
            let left: i64 = db
                .client()
                .await
                .query_one("SELECT count(*) FROM outbox", &[])
                .await
                .unwrap()
                .get(0);
            left == 0
        },
    )
    .await;
}

/// Any transaction on the cluster that holds an xid holds the polling horizon back: rows
/// committed after it are not readable yet, nothing is in flight, and the lag used to read 0
/// while nothing was published (the shipped lag alert never fired). The oldest pending row's
/// age is lag now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_held_back_by_an_open_transaction_count_as_lag_though_nothing_is_in_flight() {
    let (db, config, brokers) = setup_polling("pheld", "").await;
    let _relay = Relay::start(&config);
    let addr = http_addr(&config);
    let lag = |addr: String| async move {
        http_get(&addr, "/metrics").and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with("outboxd_lag_seconds "))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
    };
    let mut holder = db.client().await;
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("CREATE TEMP TABLE hold (v int); INSERT INTO hold VALUES (1)")
        .await
        .unwrap();
    let mut client = db.client().await;
    let mut held = write_txn(&mut client, &[("order".into(), "h".into())], false)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "lag of the held row rises", || {
        let addr = addr.clone();
        async move { lag(addr).await.is_some_and(|l| l >= 3.0) }
    })
    .await;
    tx.commit().await.unwrap();
    fill_polling_order(&db, &mut held).await;
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&held),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&held, &received);
    eventually(Duration::from_secs(30), "lag back to 0", || {
        let addr = addr.clone();
        async move { lag(addr).await.is_some_and(|l| l < 1.0) }
    })
    .await;
}
