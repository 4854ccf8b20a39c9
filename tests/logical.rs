//! Logical-mode guarantees, against a real PostgreSQL cluster and a real Kafka-protocol broker
//! (Apache Kafka), or librdkafka's MockCluster where a broker must fail on cue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_from_concurrent_transactions_arrives_in_aggregate_commit_order() {
    let brokers = kafka_brokers();
    let (db, config) = setup("concurrent", &brokers, "").await;
    let mut relay = Relay::start(&config);
    let mut written = concurrent_workload(&db, 10_000, 4, 300, &["order", "customer"]).await;
    assert_eq!(written.len(), 10_000);
    // One more transaction after all others: the slot must end up confirmed past it.
    let before_last = db.current_lsn().await;
    written.extend(
        write_txn(
            &mut db.client().await,
            &[("order".into(), "last".into())],
            false,
        )
        .await
        .unwrap(),
    );
    let topics = vec![db.topic("order"), db.topic("customer")];
    let received = consume(
        &brokers,
        &topics,
        &ids(&written),
        Duration::from_secs(120),
        Duration::from_secs(1),
    );
    relay.assert_running();
    let dups = assert_exactly_written(&written, &received);
    assert_eq!(dups, 0, "no restart happened, so no event may repeat");
    // Each aggregate type went to its own topic.
    let by_id: std::collections::HashMap<&str, &Written> =
        written.iter().map(|w| (w.id.as_str(), w)).collect();
    for r in &received {
        let w = by_id[r.id.as_deref().unwrap()];
        assert_eq!(r.topic, db.topic(&w.aggregatetype));
    }
    eventually(
        Duration::from_secs(10),
        "slot confirmed past the last transaction",
        || async { db.confirmed_lsn().await > before_last },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_rolled_back_transactions_never_arrive() {
    let brokers = kafka_brokers();
    let (db, config) = setup("rollback", &brokers, "").await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut committed = Vec::new();
    let mut rolled_back = Vec::new();
    for i in 0..40 {
        let events: Vec<(String, String)> = (0..3)
            .map(|j| ("order".to_string(), format!("a{}", (i + j) % 7)))
            .collect();
        let mut events = events;
        events.sort_by(|x, y| x.1.cmp(&y.1));
        if i % 3 == 1 {
            rolled_back.extend(write_txn(&mut client, &events, true).await.unwrap());
        } else {
            committed.extend(write_txn(&mut client, &events, false).await.unwrap());
        }
    }
    // A transaction that fails on its own (constraint violation) after inserting an event.
    {
        let tx = client.transaction().await.unwrap();
        let row = tx
            .query_one(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'a1', 'Changed', '{}') RETURNING id::text",
                &[],
            )
            .await
            .unwrap();
        rolled_back.push(Written {
            order: None,
            id: row.get(0),
            aggregatetype: "order".into(),
            aggregateid: "a1".into(),
            seq: 0,
            payload: "{}".into(),
        });
        assert!(tx.batch_execute("SELECT 1/0").await.is_err());
        drop(tx);
    }
    // Committed last: once it arrived, every earlier transaction was decoded.
    committed.extend(
        write_txn(&mut client, &[("order".into(), "sentinel".into())], false)
            .await
            .unwrap(),
    );
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&committed),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    let got: HashSet<String> = received.iter().filter_map(|r| r.id.clone()).collect();
    for w in &rolled_back {
        assert!(
            !got.contains(&w.id),
            "event {} of a rolled-back transaction reached Kafka",
            w.id
        );
    }
    assert_exactly_written(&committed, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_event_lost_when_relay_killed_mid_stream() {
    let brokers = kafka_brokers();
    let (db, config) = setup("killed", &brokers, "[kafka]\nmax_in_flight = 500\n").await;
    let mut relay = Relay::start(&config);
    let writer = {
        let db = db.clone();
        tokio::spawn(async move { concurrent_workload(&db, 6_000, 3, 100, &["order"]).await })
    };
    // Kill abruptly once the relay is demonstrably mid-stream: it has confirmed something
    // and the writers are still going.
    eventually(
        Duration::from_secs(60),
        "relay confirmed a first batch",
        || async { db.confirmed_lsn().await > 0 && !writer.is_finished() },
    )
    .await;
    let confirmed_before_kill = db.confirmed_lsn().await;
    relay.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut relay = Relay::start(&config);
    let written = writer.await.unwrap();
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
        "killed at confirmed LSN {confirmed_before_kill:X}; {} records, {dups} duplicates",
        received.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_does_not_advance_while_broker_is_down_and_nothing_is_lost_after() {
    let (mock, brokers, db, config) =
        setup_on_mock("brokerdown", 3, "delivery_timeout_ms = 2000\n").await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;

    let mut before = Vec::new();
    let mut before_last = 0;
    for i in 0..20 {
        before_last = db.current_lsn().await;
        before.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("a{}", i % 5))],
                false,
            )
            .await
            .unwrap(),
        );
    }
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&before),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_exactly_written(&before, &received);
    eventually(
        Duration::from_secs(10),
        "slot confirmed the first events",
        || async { db.confirmed_lsn().await > before_last },
    )
    .await;

    mock.broker_down(1).unwrap();
    let mut during = Vec::new();
    let mut during_last = 0;
    // Upper bound of the first outage transaction's commit end. Confirming up to just before
    // its commit record is legitimate (idle keepalives); reaching its end is not.
    let mut first_commit_end_bound = 0;
    for i in 0..30 {
        during_last = db.current_lsn().await;
        let events = [("order".to_string(), format!("a{}", i % 5))];
        during.extend(write_txn(&mut client, &events, false).await.unwrap());
        if i == 0 {
            first_commit_end_bound = db.current_lsn().await;
        }
    }
    // Several delivery timeouts (2 s) and retries pass; the slot must stay before the outage's
    // first commit.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let confirmed = db.confirmed_lsn().await;
        assert!(
            confirmed < first_commit_end_bound,
            "slot advanced to {confirmed:X}, over the unacknowledged transaction ending by \
             {first_commit_end_bound:X}, while the broker was down"
        );
    }
    mock.broker_up(1).unwrap();

    let mut all = before.clone();
    all.extend(during.iter().cloned());
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&all),
        Duration::from_secs(90),
        Duration::from_secs(1),
    );
    assert_exactly_written(&all, &received);
    eventually(
        Duration::from_secs(30),
        "slot confirmed after the broker returned",
        || async { db.confirmed_lsn().await > during_last },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_confirms_acknowledged_events_and_exits_0() {
    let brokers = kafka_brokers();
    let (db, config) = setup("sigterm", &brokers, "").await;
    let mut relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut written = Vec::new();
    let mut before_last = 0;
    for i in 0..50 {
        before_last = db.current_lsn().await;
        written.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("a{}", i % 4))],
                false,
            )
            .await
            .unwrap(),
        );
    }
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_exactly_written(&written, &received);
    let status = relay.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", relay.log_text());
    assert!(
        db.confirmed_lsn().await > before_last,
        "acknowledged events were not confirmed before exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_postgres_is_unreachable_exits_non_zero() {
    // Acknowledged events that cannot be confirmed will be published again: the exit status
    // must say the stop was not clean.
    let brokers = kafka_brokers();
    let (db, _) = setup("sigterm_unreachable", &brokers, "").await;
    let proxy = common::proxy::Proxy::start(db.socket_addr());
    let config = db.via_port(proxy.port).config(&brokers, "");
    let mut relay = Relay::start(&config);
    let mut client = db.client().await;
    let written = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&written, &received);
    proxy.black_hole(true);
    let status = relay.terminate(Duration::from_secs(40));
    assert_ne!(status.code(), Some(0), "log:\n{}", relay.log_text());
    assert!(
        relay.log_text().contains("published again after a restart"),
        "log:\n{}",
        relay.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_dead_letter_wait_does_not_starve_the_servers_status_replies() {
    // The server ends a walsender that hears nothing for wal_sender_timeout (2 s here). A
    // poison event whose DLQ topic does not exist keeps the relay waiting for ~11 s; if that
    // wait starved status replies, the stream would be cut and the same transaction replayed
    // and dead-lettered again, forever.
    let brokers = kafka_brokers();
    let db = TestDb::new("starve").await;
    let config = db.config(
        &brokers,
        &format!(
            "[kafka]\ncreate_topics = false\ndelivery_timeout_ms = 6000\ndlq_topic = \"{}.missing\"\n",
            db.name
        ),
    );
    migrate(&config);
    let mut client = db.client().await;
    create_aggregates_table(&client).await;
    client
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET wal_sender_timeout = '2s'",
            db.name
        ))
        .await
        .unwrap();
    create_topic(&brokers, &db.topic("order"), 3, &[]).await;
    let relay = Relay::start(&config);
    let mut good = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let poison: String = client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             VALUES ('order', 'a', 'Bad', '{}', '[1]') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    good.extend(
        write_txn(&mut client, &[("order".into(), "a".into())], false)
            .await
            .unwrap(),
    );
    let after = db.current_lsn().await;
    eventually(
        Duration::from_secs(60),
        "slot confirmed past the poison event",
        || async { db.confirmed_lsn().await >= after },
    )
    .await;
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&good),
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    assert_exactly_written(&good, &received);
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM outboxd_dead_letter WHERE event_id = $1",
            &[&poison],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows,
        1,
        "dead-lettered once, not once per cut stream; log:\n{}",
        relay.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_the_delivery_timeout_ends_the_session_and_keeps_key_order() {
    // A record given up by the client while later records of its key are still queued lets
    // those land first; resending it then puts it after them. So librdkafka never gives a
    // record up: the relay ends the session instead, dropping the client with everything it
    // holds, and the next session resends from the confirmed position: every event lands,
    // the first copy of each in key order.
    let (mock, brokers, db, config) =
        setup_on_mock("outage", 2, "delivery_timeout_ms = 1000\n").await;
    let relay = Relay::start(&config);
    // The outage must fall inside a session: on a loaded machine the relay's start (slot,
    // checks) has taken 4 s, and an outage over before the session began stalls
    // nothing. So the writer starts once the session has.
    eventually(
        Duration::from_secs(60),
        "the relay's first session",
        || async { relay.log_text().contains("relay started") },
    )
    .await;
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut client = db.client().await;
            let mut written = Vec::new();
            for i in 0..120 {
                let events = [("order".to_string(), format!("k{}", i % 3))];
                written.extend(write_txn(&mut client, &events, false).await.unwrap());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    mock.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    mock.broker_up(1).unwrap();
    let written = writer.await.unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let dups = assert_exactly_written(&written, &received);
    let log = relay.log_text();
    assert!(
        log.contains("delivery stalled") && log.contains("ending the session"),
        "the outage is reported and ends the session; log:\n{log}"
    );
    eprintln!("{} events, {dups} repeats", written.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_outbox_lets_the_slot_advance_past_other_tables_wal() {
    let brokers = kafka_brokers();
    let (db, config) = setup(
        "idle",
        &brokers,
        "[postgres]\nheartbeat_interval_ms = 500\n",
    )
    .await;
    let _relay = Relay::start(&config);
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE noise (id serial primary key, v text)")
        .await
        .unwrap();
    for _ in 0..20 {
        client
            .batch_execute(
                "INSERT INTO noise (v) SELECT repeat('x', 200) FROM generate_series(1, 500)",
            )
            .await
            .unwrap();
    }
    let written_up_to = db.current_lsn().await;
    eventually(
        Duration::from_secs(20),
        "slot advanced past WAL of a table outside the outbox",
        || async { db.confirmed_lsn().await >= written_up_to },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_runs_as_a_password_role_with_only_replication_and_select() {
    let brokers = kafka_brokers();
    let (db, config) = setup(
        "scram",
        &brokers,
        "[postgres]\nheartbeat_interval_ms = 500\n",
    )
    .await;
    let admin = db.client().await;
    let role = unique("relay").to_lowercase();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'p@ss w0rd'; GRANT SELECT ON outbox TO {role}"
        ))
        .await
        .unwrap();
    // scram-sha-256 applies to every role but the superuser in the test cluster (pg_hba).
    let base = pg_admin_url();
    let hostport = base.split('@').nth(1).unwrap().split('/').next().unwrap();
    let url = format!("postgres://{role}:p%40ss%20w0rd@{hostport}/{}", db.name);
    let mut relay = Relay::start_with_env(&config, &[("OUTBOXD_POSTGRES_URL", url.as_str())]);
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..10 {
        let events = [("order".to_string(), format!("a{}", i % 3))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    relay.assert_running();
    assert_exactly_written(&written, &received);
    // The heartbeat fallback works for this role too: WAL from another table, slot follows.
    client
        .batch_execute("CREATE TABLE other (v text); INSERT INTO other SELECT 'x' FROM generate_series(1, 1000)")
        .await
        .unwrap();
    let after = db.current_lsn().await;
    eventually(
        Duration::from_secs(20),
        "slot advanced for the password role",
        || async { db.confirmed_lsn().await >= after },
    )
    .await;
    assert!(
        !relay.log_text().contains("p@ss w0rd"),
        "password leaked into logs"
    );
}
