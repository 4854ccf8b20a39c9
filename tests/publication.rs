//! No silent loss through the publication: a partitioned outbox, a table dropped and recreated
//! under a running relay, a foreign table in the publication. Real PostgreSQL, real Kafka.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::Client;

const PARTITIONED_OUTBOX: &str = "
    CREATE TABLE outbox (
        id            uuid        NOT NULL DEFAULT gen_random_uuid(),
        aggregatetype text        NOT NULL,
        aggregateid   text        NOT NULL,
        type          text        NOT NULL,
        payload       jsonb,
        headers       jsonb,
        created_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (id, created_at)
    ) PARTITION BY RANGE (created_at);
    DO $$ BEGIN
        EXECUTE format('CREATE TABLE outbox_last_month PARTITION OF outbox FOR VALUES FROM (MINVALUE) TO (%L)', date_trunc('month', now()));
        EXECUTE format('CREATE TABLE outbox_this_month PARTITION OF outbox FOR VALUES FROM (%L) TO (MAXVALUE)', date_trunc('month', now()));
    END $$;";

/// Writes `n` single-event transactions over 5 aggregates; even events are dated 40 days
/// back, so they land in the other partition.
async fn write_dated(client: &mut Client, prefix: &str, n: usize) -> Vec<Written> {
    let mut out = Vec::new();
    for i in 0..n {
        let agg = format!("{prefix}{}", i % 5);
        let tx = client.transaction().await.unwrap();
        let seq: i64 = tx
            .query_one(
                "INSERT INTO aggregates (id, seq) VALUES ($1, 1) \
                 ON CONFLICT (id) DO UPDATE SET seq = aggregates.seq + 1 RETURNING seq",
                &[&agg],
            )
            .await
            .unwrap()
            .get(0);
        let payload = format!("{{\"agg\": \"{agg}\", \"seq\": {seq}}}");
        let row = tx
            .query_one(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers, created_at) \
                 VALUES ('order', $1, 'Changed', $2::text::jsonb, '{\"traceparent\": \"00-test\"}', \
                         now() - CASE WHEN $3 THEN interval '40 days' ELSE interval '0' END) \
                 RETURNING id::text, payload::text",
                &[&agg, &payload, &(i % 2 == 0)],
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        out.push(Written {
            order: None,
            id: row.get(0),
            aggregatetype: "order".into(),
            aggregateid: agg,
            seq,
            payload: row.get(1),
        });
    }
    out
}

async fn partitioned_setup(prefix: &str) -> (TestDb, std::path::PathBuf) {
    let db = TestDb::new(prefix).await;
    let client = db.client().await;
    client.batch_execute(PARTITIONED_OUTBOX).await.unwrap();
    create_aggregates_table(&client).await;
    let config = db.config(&kafka_brokers(), "");
    migrate(&config);
    (db, config)
}

async fn rows_per_partition(client: &Client) -> Vec<(String, i64)> {
    client
        .query(
            "SELECT tableoid::regclass::text, count(*) FROM outbox GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_outbox_relays_every_event_from_every_partition_in_order() {
    let (db, config) = partitioned_setup("partitioned").await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;
    let written = write_dated(&mut client, "p", 40).await;
    assert_eq!(
        rows_per_partition(&client).await,
        vec![
            ("outbox_last_month".to_string(), 20),
            ("outbox_this_month".to_string(), 20)
        ],
        "the rows must land in both partitions"
    );
    let received = consume(
        &kafka_brokers(),
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    assert_exactly_written(&written, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_decoded_under_a_partition_name_are_not_lost_when_the_publication_is_fixed() {
    // Events committed while the publication named each partition (publish_via_partition_root
    // off) are still in the slot when the operator fixes the publication: the relay must
    // decode them as outbox rows, not skip them.
    let (db, config) = partitioned_setup("leafnamed").await;
    let mut client = db.client().await;
    client
        .batch_execute("ALTER PUBLICATION outboxd SET (publish_via_partition_root = false)")
        .await
        .unwrap();
    let written = write_dated(&mut client, "l", 10).await;
    client
        .batch_execute("ALTER PUBLICATION outboxd SET (publish_via_partition_root = true)")
        .await
        .unwrap();
    let _relay = Relay::start(&config);
    let received = consume(
        &kafka_brokers(),
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    assert_exactly_written(&written, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_refuses_a_partitioned_outbox_published_under_partition_names() {
    let (db, config) = partitioned_setup("viaroot").await;
    db.client()
        .await
        .batch_execute("ALTER PUBLICATION outboxd SET (publish_via_partition_root = false)")
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(2), "log:\n{}", relay.log_text());
    assert!(
        relay
            .log_text()
            .contains("SET (publish_via_partition_root = true)"),
        "the fix is named; log:\n{}",
        relay.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_recreated_under_a_running_relay_stops_it_before_the_slot_passes_the_lost_event() {
    let brokers = kafka_brokers();
    let (db, config) = setup("recreated", &brokers, "").await;
    let mut relay = Relay::start(&config);
    let mut client = db.client().await;
    let first = write_txn(&mut client, &[("order".into(), "a1".into())], false)
        .await
        .unwrap();
    let got = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&first),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&first, &got);

    // A schema migration recreates the table: the new one is not in the publication.
    let ddl = outboxd::migrate::OUTBOX_TABLE_DDL.replace("{table}", "outbox");
    client
        .batch_execute(&format!("DROP TABLE outbox; {ddl}"))
        .await
        .unwrap();
    let before_lost = db.current_lsn().await;
    let lost = write_txn(&mut client, &[("order".into(), "a1".into())], false)
        .await
        .unwrap();
    // Idle WAL afterwards, so keepalives could carry the slot past the lost event.
    client
        .batch_execute("SELECT pg_logical_emit_message(false, 'noise', 'x')")
        .await
        .unwrap();

    let status = relay.wait_exit(Duration::from_secs(30));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(
        log.contains("dropped and recreated") && log.contains("outboxd replay --since"),
        "says what happened and how to recover; log:\n{log}"
    );
    let confirmed = db.confirmed_lsn().await;
    assert!(
        confirmed <= before_lost,
        "slot confirmed {confirmed:X} past the first event it could not relay (written after {before_lost:X})"
    );

    // Recovery as the message says: publish the table again, replay, restart.
    assert!(log.contains("ALTER PUBLICATION \"outboxd\" ADD TABLE \"public\".\"outbox\""));
    client
        .batch_execute("ALTER PUBLICATION outboxd ADD TABLE outbox")
        .await
        .unwrap();
    let since = log
        .split("replay --since '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap()
        .to_string();
    let out = outboxd(
        &[
            "replay",
            "--config",
            config.to_str().unwrap(),
            "--since",
            &since,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _relay = Relay::start(&config);
    let mut all = first.clone();
    all.extend(lost);
    let got = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&all),
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    assert_exactly_written(&all, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_into_a_foreign_table_in_the_publication_stops_the_relay_naming_it() {
    let brokers = kafka_brokers();
    let (db, config) = setup("foreign", &brokers, "").await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE not_events (id int PRIMARY KEY); \
             ALTER PUBLICATION outboxd ADD TABLE not_events;",
        )
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = db.current_lsn().await;
    client
        .batch_execute("INSERT INTO not_events VALUES (1)")
        .await
        .unwrap();
    let status = relay.wait_exit(Duration::from_secs(30));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(
        log.contains("public.not_events"),
        "names the table; log:\n{log}"
    );
    assert!(db.confirmed_lsn().await <= before);
}

/// PostgreSQL 15+ lets a publication filter rows or leave columns out; pgoutput then drops
/// the filtered inserts (or the columns) and the slot would pass them. The relay stops with
/// exit code 2 naming the filter or the column, before the slot passes the first event
/// written after the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_filter_or_a_column_list_on_the_outbox_stops_the_relay_naming_it() {
    let brokers = kafka_brokers();
    for (i, (alter, named)) in [
        (
            "SET TABLE outbox WHERE (aggregatetype <> 'hidden')",
            "row filter",
        ),
        (
            "SET TABLE outbox (id, aggregatetype, aggregateid, type, payload, created_at)",
            "without column `headers`",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (db, config) = setup(&format!("pubfilter{i}"), &brokers, "").await;
        let mut relay = Relay::start(&config);
        let mut client = db.client().await;
        let first = write_txn(&mut client, &[("order".into(), "a".into())], false)
            .await
            .unwrap();
        let got = consume(
            &brokers,
            &[db.topic("order")],
            &ids(&first),
            Duration::from_secs(30),
            Duration::ZERO,
        );
        assert_exactly_written(&first, &got);
        client
            .batch_execute(&format!("ALTER PUBLICATION outboxd {alter}"))
            .await
            .unwrap();
        let before = db.current_lsn().await;
        write_txn(&mut client, &[("hidden".into(), "a".into())], false)
            .await
            .unwrap();
        client
            .batch_execute("SELECT pg_logical_emit_message(false, 'noise', 'x')")
            .await
            .unwrap();
        let status = relay.wait_exit(Duration::from_secs(30));
        let log = relay.log_text();
        assert_eq!(status.code(), Some(2), "{alter}: log:\n{log}");
        assert!(log.contains(named), "{alter}: `{named}` in:\n{log}");
        let confirmed = db.confirmed_lsn().await;
        assert!(
            confirmed <= before,
            "{alter}: slot confirmed {confirmed:X} past {before:X}"
        );
    }
}

/// The publication check reads a WAL position, then the catalog. A DDL whose commit record is
/// below that position can still be invisible to the catalog: its backend waits for a
/// synchronous standby before it leaves the ProcArray. Here it waits for good (a standby
/// that does not exist; the test's other sessions commit with `synchronous_commit = local`),
/// so the outbox has left the publication for the decoder while every check still sees it.
/// The relay must not confirm past the first event written after the DDL (it used to: the
/// check passed and keepalives carried the slot over the lost event); once the wait ends, the
/// check fails and the relay stops with exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_change_still_invisible_to_the_check_never_lets_the_slot_pass_an_event() {
    let brokers = kafka_brokers();
    let cluster =
        PrivateCluster::start("-c synchronous_standby_names=nobody -c synchronous_commit=local");
    let db = cluster.db("invisible");
    let config = db.config(&brokers, "");
    migrate(&config);
    let mut client = db.client().await;
    create_aggregates_table(&client).await;
    let mut relay = Relay::start(&config);
    let first = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let got = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&first),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&first, &got);
    // The DDL commits locally and waits for the standby: invisible to every snapshot.
    let ddl = db.client().await;
    let pid: i32 = ddl
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let waiting = tokio::spawn(async move {
        ddl.batch_execute(
            "SET synchronous_commit = on; ALTER PUBLICATION outboxd DROP TABLE outbox",
        )
        .await
    });
    eventually(
        Duration::from_secs(10),
        "the DDL waits for the standby",
        || async {
            db.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep'",
                &[&pid],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
        },
    )
    .await;
    let before_lost = db.current_lsn().await;
    write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    for _ in 0..5 {
        client
            .batch_execute("SELECT pg_logical_emit_message(false, 'noise', 'x')")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let confirmed = db.confirmed_lsn().await;
        assert!(
            confirmed <= before_lost,
            "slot confirmed {confirmed:X} past the event written after the invisible DDL ({before_lost:X})"
        );
    }
    relay.assert_running();
    // The wait ends (cancelled: the commit stands); the check now fails.
    client
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    let _ = waiting.await;
    let status = relay.wait_exit(Duration::from_secs(30));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(log.contains("is not in publication"), "log:\n{log}");
    let confirmed = db.confirmed_lsn().await;
    assert!(
        confirmed <= before_lost,
        "slot confirmed {confirmed:X} past {before_lost:X}"
    );
}
