//! What the tests write: transactions of events, concurrent and steady writers.

use super::*;

/// An event as the test wrote it.
#[derive(Debug, Clone)]
pub struct Written {
    /// Polling mode: (transaction id, insertion sequence), the order polling guarantees.
    pub order: Option<(u64, i64)>,
    pub id: String,
    pub aggregatetype: String,
    pub aggregateid: String,
    pub seq: i64,
    pub payload: String,
}

/// Inserts one transaction of `(aggregatetype, aggregateid)` events, each taking the next
/// per-aggregate sequence number under the aggregate's row lock — so, for one aggregate,
/// sequence order is commit order. Returns the written events, or None if `rollback`.
pub async fn write_txn(
    client: &mut Client,
    events: &[(String, String)],
    rollback: bool,
) -> Result<Vec<Written>, tokio_postgres::Error> {
    write_txn_mixed(client, events, |_| false, rollback).await
}

/// A fresh database, migrated, with the aggregates table; and its config file.
pub async fn setup(prefix: &str, brokers: &str, extra: &str) -> (TestDb, PathBuf) {
    let db = TestDb::new(prefix).await;
    let config = db.config(brokers, extra);
    migrate(&config);
    create_aggregates_table(&db.client().await).await;
    (db, config)
}

/// A fresh database ([`setup`]) whose relay publishes to librdkafka's MockCluster (fault
/// injection only) holding the `order` topic with `partitions` partitions; topic creation is
/// off and `kafka_keys` adds `[kafka]` keys. Returns the cluster, its address, the database
/// and the config.
pub async fn setup_on_mock(
    prefix: &str,
    partitions: i32,
    kafka_keys: &str,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    TestDb,
    PathBuf,
) {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = mock.bootstrap_servers();
    let (db, config) = setup(
        prefix,
        &brokers,
        &format!("[kafka]\ncreate_topics = false\n{kafka_keys}"),
    )
    .await;
    mock.create_topic(&db.topic("order"), partitions, 1)
        .unwrap();
    (mock, brokers, db, config)
}

/// 20 `order` events over 5 aggregates, one `stray` event, 20 more `order` events, each in a
/// transaction of its own; returns (the `order` events, the stray one).
pub async fn orders_around_a_stray(db: &TestDb) -> (Vec<Written>, Vec<Written>) {
    let mut client = db.client().await;
    let mut written = Vec::new();
    let orders = |i: usize| [("order".to_string(), format!("agg-{}", i % 5))];
    for i in 0..20 {
        written.extend(write_txn(&mut client, &orders(i), false).await.unwrap());
    }
    let stray = write_txn(&mut client, &[("stray".into(), "agg-x".into())], false)
        .await
        .unwrap();
    for i in 0..20 {
        written.extend(write_txn(&mut client, &orders(i), false).await.unwrap());
    }
    (written, stray)
}

pub fn ids(written: &[Written]) -> HashSet<String> {
    written.iter().map(|w| w.id.clone()).collect()
}

/// Like [`write_txn`], but event `i` is written with `outbox_emit` (a logical decoding
/// message, no row) when `as_message(i)`.
pub async fn write_txn_mixed(
    client: &mut Client,
    events: &[(String, String)],
    as_message: impl Fn(usize) -> bool,
    rollback: bool,
) -> Result<Vec<Written>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut out = Vec::with_capacity(events.len());
    for (i, (agg_type, agg_id)) in events.iter().enumerate() {
        let seq: i64 = tx
            .query_one(
                "INSERT INTO aggregates (id, seq) VALUES ($1, 1) \
                 ON CONFLICT (id) DO UPDATE SET seq = aggregates.seq + 1 RETURNING seq",
                &[agg_id],
            )
            .await?
            .get(0);
        let payload = format!("{{\"agg\": \"{agg_id}\", \"seq\": {seq}}}");
        let sql = if as_message(i) {
            "SELECT outbox_emit($1, $2, 'Changed', $3::text::jsonb, '{\"traceparent\": \"00-test\"}'::jsonb)::text, $3::text::jsonb::text"
        } else {
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             VALUES ($1, $2, 'Changed', $3::text::jsonb, '{\"traceparent\": \"00-test\"}'::jsonb) \
             RETURNING id::text, payload::text"
        };
        let row = tx.query_one(sql, &[agg_type, agg_id, &payload]).await?;
        out.push(Written {
            order: None,
            id: row.get(0),
            aggregatetype: agg_type.clone(),
            aggregateid: agg_id.clone(),
            seq,
            payload: row.get(1),
        });
    }
    if rollback {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(out)
}

/// Inserts `total` events from `connections` concurrent writers, 1–20 events per transaction,
/// over `aggregates` aggregates of `types` aggregate types. Returns the committed events.
pub async fn concurrent_workload(
    db: &TestDb,
    total: usize,
    connections: usize,
    aggregates: u64,
    types: &[&str],
) -> Vec<Written> {
    let per_conn = total / connections;
    let mut handles = Vec::new();
    for c in 0..connections {
        let url = db.url.clone();
        let types: Vec<String> = types.iter().map(|s| s.to_string()).collect();
        handles.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut rng = Rng::new(0x5eed + c as u64 * 7919);
            let mut written = Vec::new();
            let mut remaining = per_conn;
            while remaining > 0 {
                let n = (rng.range(1, 20) as usize).min(remaining);
                let mut events: Vec<(String, String)> = (0..n)
                    .map(|_| {
                        let a = rng.range(0, aggregates - 1);
                        let t = &types[(a % types.len() as u64) as usize];
                        (t.clone(), format!("agg-{a}"))
                    })
                    .collect();
                // Lock aggregates in one global order: no deadlocks between writers.
                events.sort_by(|x, y| x.1.cmp(&y.1));
                written.extend(write_txn(&mut client, &events, false).await.unwrap());
                remaining -= n;
            }
            written
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all
}

/// A steady writer, for tests that do something to the relay or the broker mid-stream:
/// for `run_for`, transactions of 1–`max_per_txn` events of type `order` over `aggregates`
/// aggregates, one in `rollback_one_in` rolled back (0: none), `pause` between them.
/// Returns (committed, rolled back).
pub struct SteadyWriter {
    pub run_for: Duration,
    pub aggregates: u64,
    pub max_per_txn: u64,
    pub rollback_one_in: u64,
    pub pause: Duration,
    pub seed: u64,
}

impl SteadyWriter {
    /// The sink tests' writer: 30 aggregates, 1–6 events a transaction, 2 ms apart.
    pub fn sink_test(secs: u64, rollback_one_in: u64, seed: u64) -> SteadyWriter {
        SteadyWriter {
            run_for: Duration::from_secs(secs),
            aggregates: 30,
            max_per_txn: 6,
            rollback_one_in,
            pause: Duration::from_millis(2),
            seed,
        }
    }

    pub fn spawn(self, db: &TestDb) -> tokio::task::JoinHandle<(Vec<Written>, Vec<Written>)> {
        let db = db.clone();
        tokio::spawn(async move {
            let mut client = db.client().await;
            let mut rng = Rng::new(self.seed);
            let (mut written, mut rolled_back) = (Vec::new(), Vec::new());
            let start = Instant::now();
            while start.elapsed() < self.run_for {
                let n = rng.range(1, self.max_per_txn) as usize;
                let mut events: Vec<(String, String)> = (0..n)
                    .map(|_| {
                        let a = rng.range(0, self.aggregates - 1);
                        ("order".to_string(), format!("agg-{a}"))
                    })
                    .collect();
                // Lock aggregates in one global order: no deadlocks between writers.
                events.sort_by(|a, b| a.1.cmp(&b.1));
                let rollback = self.rollback_one_in > 0 && rng.range(1, self.rollback_one_in) == 1;
                let w = write_txn(&mut client, &events, rollback).await.unwrap();
                if rollback {
                    rolled_back.extend(w);
                } else {
                    written.extend(w);
                }
                tokio::time::sleep(self.pause).await;
            }
            (written, rolled_back)
        })
    }
}

/// Polling mode: reads each written event's (xid, sequence) from the table.
pub async fn fill_polling_order(db: &TestDb, written: &mut [Written]) {
    let rows = db
        .client()
        .await
        .query(
            "SELECT id::text, outboxd_xid::text, outboxd_seq FROM outbox",
            &[],
        )
        .await
        .unwrap();
    let order: HashMap<String, (u64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, String>(1).parse().unwrap(), r.get(2)),
            )
        })
        .collect();
    for w in written {
        w.order = Some(order[&w.id]);
    }
}
