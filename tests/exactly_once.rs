//! Exactly-once delivery (`kafka.delivery = "exactly-once"`) on Apache Kafka: a
//! `read_committed` consumer sees every committed event once — across SIGKILLs at random
//! points, a crash between the Kafka commit and the slot confirmation, and an old leader
//! resumed after a standby took over (fenced) — and no event of a rolled-back transaction.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::*;

const EXACTLY_ONCE: &str = "[kafka]\ndelivery = \"exactly-once\"\n";

/// The README's reset of a pipeline's position: a tombstone for its key.
async fn reset_position(brokers: &str, topic: &str, pipeline: &str) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::<str, [u8]>::to(topic).key(pipeline),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// Every written id exactly once, in per-aggregate order, nothing else.
fn assert_each_once(written: &[Written], received: &[Received]) {
    let dups = assert_exactly_written(written, received);
    assert_eq!(
        dups,
        0,
        "a read_committed consumer saw {dups} duplicates of {} events",
        written.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_consumer_sees_each_event_once_and_no_rolled_back_one() {
    let brokers = kafka_brokers();
    let (db, config) = setup("eos_basic", &brokers, EXACTLY_ONCE).await;
    let mut relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut written = Vec::new();
    let mut rolled_back = Vec::new();
    for i in 0..60 {
        let events = vec![("order".to_string(), format!("agg-{}", i % 7)); 1 + i % 4];
        if i % 5 == 4 {
            rolled_back.extend(write_txn(&mut client, &events, true).await.unwrap());
        } else {
            written.extend(write_txn(&mut client, &events, false).await.unwrap());
        }
    }
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_each_once(&written, &received);
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    relay.assert_running();
    // The slot follows the committed Kafka transactions.
    let last = db.current_lsn().await;
    eventually(Duration::from_secs(15), "slot confirmed", || async {
        db.confirmed_lsn().await >= last
    })
    .await;
}

/// The state a crash between the Kafka commit and the slot confirmation leaves: Kafka holds
/// events (and their position) the slot has not passed. Made deterministic with a copy of
/// the slot taken before those events: a relay on the copy (same pipeline identity) is
/// handed them again by PostgreSQL and must skip them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_to_kafka_but_not_confirmed_in_the_slot_are_not_published_again() {
    let brokers = kafka_brokers();
    let pipeline = unique("pipeline");
    let extra = format!("{EXACTLY_ONCE}transactional_id = \"{pipeline}\"\n");
    let (db, config) = setup("eos_gap", &brokers, &extra).await;
    let mut client = db.client().await;
    let mut relay = Relay::start(&config);
    let mut written = Vec::new();
    for i in 0..10 {
        let events = vec![("order".to_string(), format!("agg-{}", i % 3)); 2];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    let topic = db.topic("order");
    consume(
        &brokers,
        std::slice::from_ref(&topic),
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    let last = db.current_lsn().await;
    eventually(Duration::from_secs(15), "slot confirmed", || async {
        db.confirmed_lsn().await >= last
    })
    .await;
    relay.kill();
    // The copy stays where the slot is now; the original moves on with the next events.
    let copy = format!("{}_copy", db.slot());
    client
        .execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&db.slot(), &copy],
        )
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    let mut later = Vec::new();
    for i in 0..10 {
        let events = vec![("order".to_string(), format!("agg-{}", i % 3)); 3];
        later.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    consume(
        &brokers,
        std::slice::from_ref(&topic),
        &ids(&later),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    relay.kill();
    written.extend(later);

    // The relay on the copy is sent `later` again by PostgreSQL: Kafka already has it.
    let text = std::fs::read_to_string(&config).unwrap();
    let on_copy = config.with_extension("copy.toml");
    std::fs::write(
        &on_copy,
        text.replace(
            &format!("slot = \"{}\"", db.slot()),
            &format!("slot = \"{copy}\""),
        ),
    )
    .unwrap();
    let relay = Relay::start(&on_copy);
    let mut last_events = Vec::new();
    for i in 0..5 {
        let events = vec![("order".to_string(), format!("agg-{}", i % 3)); 1];
        last_events.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    written.extend(last_events);
    let received = consume(
        &brokers,
        &[topic],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    assert_each_once(&written, &received);
    let log = relay.log_text();
    assert!(
        log.contains("already committed to Kafka"),
        "the relay on the copy skipped what Kafka had: {log}"
    );
}

/// Writers commit (and roll back) for 25 s while the relay is SIGKILLed every 0.3–2.5 s and
/// restarted; then every committed id must be in Kafka once, in per-aggregate order.
/// `before` goes in front of the `[kafka]` table (top-level keys), `kafka` into it.
async fn killed_at_random_points(prefix: &str, before: &str, kafka: &str) {
    let polling = before.contains("polling");
    let brokers = kafka_brokers();
    let extra = format!("{before}{EXACTLY_ONCE}{kafka}");
    let (db, config) = setup(prefix, &brokers, &extra).await;
    let writer = SteadyWriter {
        run_for: Duration::from_secs(25),
        aggregates: 30,
        max_per_txn: 6,
        rollback_one_in: 10,
        pause: Duration::from_millis(2),
        seed: 0xe05,
    }
    .spawn(&db);
    let mut rng = Rng::new(0x5161);
    let mut kills = 0;
    while !writer.is_finished() {
        let mut relay = Relay::start(&config);
        tokio::time::sleep(Duration::from_millis(rng.range(300, 2_500))).await;
        relay.kill();
        kills += 1;
    }
    let (mut written, rolled_back) = writer.await.unwrap();
    if polling {
        fill_polling_order(&db, &mut written).await;
    }
    let mut relay = Relay::start(&config);
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(120),
        Duration::from_secs(2),
    );
    assert!(kills >= 8, "only {kills} kills");
    assert_each_once(&written, &received);
    // What the README warns of: read_uncommitted also shows records of aborted transactions.
    let uncommitted = consume_isolated(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_millis(500),
        "read_uncommitted",
    );
    eprintln!(
        "{kills} kills, {} events: read_committed saw each once; read_uncommitted saw {} records",
        written.len(),
        uncommitted.len()
    );
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_sigkilled_at_random_points_while_writers_commit_publishes_each_event_once() {
    killed_at_random_points("eos_kills", "", "transaction_ms = 20\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polling_relay_sigkilled_at_random_points_publishes_each_event_once() {
    killed_at_random_points(
        "eos_pkills",
        "mode = \"polling\"\n[polling]\ninterval_ms = 100\nbatch_size = 50\n",
        "",
    )
    .await;
}

fn signal(relay: &Relay, sig: &str) {
    Command::new("kill")
        .args([sig, &relay.child.id().to_string()])
        .status()
        .unwrap();
}

/// Two instances with the same `transactional.id`: the leader is paused (SIGSTOP) with a
/// Kafka transaction open, the standby takes over (its producer fences the paused one), and
/// the old leader is resumed: it must not publish anything, twice or at all, and must go back
/// to waiting as standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_resumed_after_a_standby_took_over_publishes_nothing_twice_and_stands_by() {
    let brokers = kafka_brokers();
    // A short stream timeout: PostgreSQL drops the paused leader's walsender quickly.
    let extra =
        format!("{EXACTLY_ONCE}transaction_ms = 5000\n[postgres]\nstream_timeout_ms = 3000\n");
    let (db, config) = setup("eos_fence", &brokers, &extra).await;
    let mut client = db.client().await;
    let mut a = Relay::start(&config);
    let mut written = Vec::new();
    let first: Vec<_> = (0..5)
        .map(|i| ("order".to_string(), format!("agg-{i}")))
        .collect();
    written.extend(write_txn(&mut client, &first, false).await.unwrap());
    consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    // A transaction the leader receives and sends, but (transaction_ms = 5 s) does not commit.
    let open: Vec<_> = (0..5)
        .map(|i| ("order".to_string(), format!("agg-{i}")))
        .collect();
    written.extend(write_txn(&mut client, &open, false).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    signal(&a, "-STOP");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut b = Relay::start_with_env(&config, &[("OUTBOXD_HTTP_ADDR", addr.as_str())]);
    let more: Vec<_> = (0..5)
        .map(|i| ("order".to_string(), format!("agg-{i}")))
        .collect();
    written.extend(write_txn(&mut client, &more, false).await.unwrap());
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_each_once(&written, &received);
    signal(&a, "-CONT");
    // The old leader wakes with its transaction open: whatever it tries now is fenced.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    assert_each_once(&written, &after);
    b.assert_running();
    a.assert_running();
    // On waking, the old leader meets whichever comes first: Kafka's fence on its commit, or
    // Kafka refusing the records it read from its socket buffer with a stale epoch — both
    // said as fencing ("fenced by another instance") — or PostgreSQL ending a session that
    // did not answer it during the pause ("relay interrupted"; before the relay told its own
    // pause from a silent PostgreSQL, a check in flight at the pause also ended this way).
    // Every route ends its session with its transaction aborted; it finds the slot held, waits
    // as standby and publishes nothing (checked above). A stale epoch is never reported as a
    // failed publish to retry (it once was).
    let log = a.log_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("publishing failed") && l.contains("InvalidProducerEpoch")),
        "a fenced delivery was reported as a failed publish: {log}"
    );
    let woke = log
        .find("fenced by another instance")
        .or_else(|| log.find("relay interrupted; retrying"))
        .unwrap_or_else(|| panic!("the old leader was neither fenced nor interrupted: {log}"));
    assert!(
        log[woke..].contains("waiting as standby"),
        "the old leader did not leave leadership: {log}"
    );
}

/// The README's reset of a pipeline's position is a tombstone for its key. The relay reads it
/// as "no position" (it used to call the tombstone "not a position outboxd wrote" and exit 2
/// until compaction removed it, days later) and resumes from the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_reset_by_tombstone_resumes_the_pipeline_instead_of_exiting_2() {
    let brokers = kafka_brokers();
    let pipeline = unique("pipeline");
    let positions = format!("{pipeline}.positions");
    let extra = format!(
        "{EXACTLY_ONCE}transactional_id = \"{pipeline}\"\nposition_topic = \"{positions}\"\n"
    );
    let (db, config) = setup("eos_reset", &brokers, &extra).await;
    let mut client = db.client().await;
    let mut relay = Relay::start(&config);
    let mut written = Vec::new();
    for i in 0..5 {
        let events = [("order".to_string(), format!("agg-{i}"))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    let topic = db.topic("order");
    consume(
        &brokers,
        std::slice::from_ref(&topic),
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert!(relay.terminate(Duration::from_secs(30)).success());
    drop(relay);
    reset_position(&brokers, &positions, &pipeline).await;
    let mut relay = Relay::start(&config);
    let mut later = Vec::new();
    for i in 0..5 {
        let events = [("order".to_string(), format!("agg-{i}"))];
        later.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    written.extend(later);
    let received = consume(
        &brokers,
        &[topic],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    relay.assert_running();
    assert_each_once(&written, &received);
}

/// A database restored from a backup, or a promoted standby, keeps the pipeline's identity
/// but not its WAL history: the position Kafka holds names a place in the old one. Here the
/// old history is a cluster whose pipeline committed a position, the new one another cluster
/// with the same pipeline id, a new slot and events written below that position. The relay
/// used to skip them (their commit LSNs are below the position): now the witness the position
/// carries is not in the new history, and the relay stops with exit code 2 before confirming
/// anything; after the documented reset, every event of the new history arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_from_another_wal_history_stops_the_relay_before_it_skips_an_event() {
    let brokers = kafka_brokers();
    let pipeline = unique("pipeline");
    let positions = format!("{pipeline}.positions");
    let extra = format!(
        "{EXACTLY_ONCE}transactional_id = \"{pipeline}\"\nposition_topic = \"{positions}\"\n"
    );
    let name = unique("forked").to_lowercase();
    let on = |cluster: &PrivateCluster| {
        // The same name on both clusters: the same slot name and topics.
        let db = TestDb {
            name: name.clone(),
            ..cluster.db("forked")
        };
        let config = db.config(&brokers, &extra);
        migrate(&config);
        (db, config)
    };
    // The old history: its pipeline commits a position.
    let old = PrivateCluster::start("");
    let (db, config) = on(&old);
    create_aggregates_table(&db.client().await).await;
    let mut relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut first = Vec::new();
    for i in 0..5 {
        let events = [("order".to_string(), format!("old-{i}"))];
        first.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    consume(
        &brokers,
        &[db.topic("order")],
        &ids(&first),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert!(relay.terminate(Duration::from_secs(30)).success());
    let old_end = db.current_lsn().await;
    drop((relay, client, old));

    // The new history: a new slot, and events committed below the old position.
    let new = PrivateCluster::start("");
    let (db, config) = on(&new);
    let mut client = db.client().await;
    create_aggregates_table(&client).await;
    let mut written = Vec::new();
    let mut i = 0;
    while db.current_lsn().await <= old_end + 1_000_000 {
        let events = [("order".to_string(), format!("new-{}", i % 4))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
        client
            .batch_execute("SELECT pg_logical_emit_message(false, 'pad', repeat('x', 200000))")
            .await
            .unwrap();
        i += 1;
    }
    let confirmed_before = db.confirmed_lsn().await;
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(log.contains("the history forked"), "log:\n{log}");
    assert_eq!(
        db.confirmed_lsn().await,
        confirmed_before,
        "nothing confirmed"
    );
    drop(relay);

    // The documented reset.
    reset_position(&brokers, &positions, &pipeline).await;
    let relay = Relay::start(&config);
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let new_ids = ids(&written);
    let ours: Vec<Received> = received
        .into_iter()
        .filter(|r| r.id.as_ref().is_some_and(|id| new_ids.contains(id)))
        .collect();
    assert_each_once(&written, &ours);
    drop(relay);
}

/// A source transaction larger than a Kafka transaction can hold in time (here 150,000
/// events against a 3 s `transaction.timeout.ms`) cannot commit before it ends: the broker
/// aborted it, the relay resent it, for ever, each round reported as "fenced by another
/// instance". Now the relay stops with exit code 2 naming the setting to raise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_transaction_longer_than_the_kafka_transaction_timeout_exits_2_naming_it() {
    let brokers = kafka_brokers();
    let extra =
        format!("{EXACTLY_ONCE}[kafka.properties]\n\"transaction.timeout.ms\" = \"3000\"\n");
    let (db, config) = setup("eos_long", &brokers, &extra).await;
    db.client()
        .await
        .batch_execute(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'order', 'a' || (i % 100), 'Changed', jsonb_build_object('i', i, 'pad', repeat('x', 200)) \
               FROM generate_series(1, 150000) i",
        )
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(120));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    assert!(log.contains("transaction.timeout.ms"), "log:\n{log}");
    assert!(!log.contains("fenced by another instance"), "log:\n{log}");
}
