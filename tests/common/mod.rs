//! Test harness: real PostgreSQL and a real Kafka-protocol broker, started by
//! `scripts/stack.sh` (which `scripts/test.sh` runs). Every test gets its own database, slot,
//! publication and topics, so tests run in parallel.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_postgres::{Client, NoTls};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The stack's addresses; a test run without them is a setup mistake, not a pass.
pub fn pg_admin_url() -> String {
    std::env::var("OUTBOXD_TEST_PG_URL").expect(
        "OUTBOXD_TEST_PG_URL is not set: run the tests with scripts/test.sh (it starts PostgreSQL and the broker)",
    )
}

pub fn kafka_brokers() -> String {
    std::env::var("OUTBOXD_TEST_KAFKA").expect(
        "OUTBOXD_TEST_KAFKA is not set: run the tests with scripts/test.sh (it starts PostgreSQL and the broker)",
    )
}

pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000_000;
    format!("{prefix}_{}_{t}_{n}", std::process::id())
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh database with its own slot name and topic prefix.
#[derive(Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub dir: PathBuf,
}

impl TestDb {
    pub async fn new(prefix: &str) -> TestDb {
        let name = unique(prefix).to_lowercase();
        let admin = connect(&pg_admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        let url = db_url(&pg_admin_url(), &name);
        let dir = std::env::temp_dir().join(format!("outboxd-test-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        TestDb { name, url, dir }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// The slot is named after the database (slot names are cluster-wide).
    pub fn slot(&self) -> &str {
        &self.name
    }

    /// Topic template unique to this test: `<db>.{aggregatetype}`.
    pub fn topic(&self, aggregatetype: &str) -> String {
        format!("{}.{aggregatetype}", self.name)
    }

    /// Writes a config file for this database and the given brokers.
    pub fn config(&self, brokers: &str, extra: &str) -> PathBuf {
        let path = self.dir.join(format!("{}.toml", unique("cfg")));
        let text = format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{slot}\"\n\n\
             [kafka]\nbrokers = \"{brokers}\"\ntopic_template = \"{db}.{{aggregatetype}}\"\n\
             delivery_timeout_ms = 5000\nshutdown_timeout_ms = 5000\n\n\
             [retry]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\n\
             [http]\naddr = \"127.0.0.1:{port}\"\n\n{extra}\n",
            port = free_port(),
            url = self.url,
            slot = self.slot(),
            db = self.name,
        );
        // Keys of `extra` before its first table header belong at the top level.
        let (root, rest) =
            match (extra.starts_with('[').then_some(0)).or(extra.find("\n[").map(|i| i + 1)) {
                Some(i) => extra.split_at(i),
                None => (extra, ""),
            };
        let text = merge_sections(&format!("{root}\n{}", text.replace(extra, rest)));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The slot's confirmed_flush_lsn as a number.
    pub async fn confirmed_lsn(&self) -> u64 {
        let c = self.client().await;
        let row = c
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot()],
            )
            .await
            .unwrap();
        parse_lsn(&row.get::<_, String>(0))
    }

    pub async fn current_lsn(&self) -> u64 {
        let c = self.client().await;
        let row = c
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap();
        parse_lsn(&row.get::<_, String>(0))
    }
}

/// Lets `extra` add or replace keys of sections the base config already has (TOML forbids
/// repeating a table header or a key).
fn merge_sections(text: &str) -> String {
    let mut order: Vec<String> = vec![String::new()];
    let mut sections: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.to_string();
            if !sections.contains_key(&current) {
                order.push(current.clone());
            }
            sections.entry(current.clone()).or_default();
        } else if let Some((k, _)) = t.split_once('=') {
            let entries = sections.entry(current.clone()).or_default();
            let key = k.trim().to_string();
            entries.retain(|(existing, _)| *existing != key);
            entries.push((key, line.to_string()));
        }
    }
    let mut out = String::new();
    for s in order {
        if !s.is_empty() {
            out.push_str(&s);
            out.push('\n');
        }
        for (_, l) in sections.get(&s).map(Vec::as_slice).unwrap_or_default() {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The `http.addr` written into a config file by [`TestDb::config`].
pub fn http_addr(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().find(|l| l.starts_with("addr = ")).unwrap();
    line.trim_start_matches("addr = ")
        .trim_matches('"')
        .to_string()
}

/// GET `path` from a relay's HTTP listener: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

pub fn db_url(admin_url: &str, db: &str) -> String {
    let base = admin_url.rsplit_once('/').unwrap().0;
    format!("{base}/{db}")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_outboxd")
}

/// Runs `outboxd <args>` to completion with a clean environment.
pub fn outboxd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTBOXD_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub fn migrate(config: &Path) {
    let out = outboxd(&["migrate", "--config", config.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running `outboxd run` process. Killed on drop.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
}

impl Relay {
    pub fn start(config: &Path) -> Relay {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Relay {
        let log = config.with_extension(format!("{}.log", unique("relay")));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config", config.to_str().unwrap()]);
        for (k, _) in std::env::vars() {
            if k.starts_with("OUTBOXD_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("OUTBOXD_LOG", "info,outboxd=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Relay { child, log }
    }

    /// SIGKILL: no chance to confirm anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.wait_exit(within)
    }

    /// Waits for the relay to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay still running after {within:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("relay exited with {status}; log:\n{}", self.log_text());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

pub async fn create_aggregates_table(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS aggregates (id text PRIMARY KEY, seq bigint NOT NULL)",
        )
        .await
        .unwrap();
}

/// A record as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub id: Option<String>,
    pub headers: HashMap<String, String>,
    pub payload: Option<String>,
    pub raw_payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

/// Reads `topics` from the beginning (partition assignment, no consumer group) until every id
/// in `expect` was seen or `timeout` passed; then keeps reading for `linger` to catch records
/// that should not be there.
pub fn consume(
    brokers: &str,
    topics: &[String],
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    consume_isolated(brokers, topics, expect, timeout, linger, "read_committed")
}

/// [`consume`] with the given `isolation.level` (`read_committed`, librdkafka's default, or
/// `read_uncommitted`).
pub fn consume_isolated(
    brokers: &str,
    topics: &[String],
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
    isolation: &str,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", isolation)
        .set("group.id", unique("verify"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let deadline = Instant::now() + timeout;
    // Wait for the topics to exist (the relay creates them).
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        loop {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
            if let Ok(md) = md {
                if let Some(t) = md.topics().first() {
                    if t.error().is_none() && !t.partitions().is_empty() {
                        for p in t.partitions() {
                            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                                .unwrap();
                        }
                        break;
                    }
                }
            }
            assert!(Instant::now() < deadline, "topic {topic} never appeared");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    consumer.assign(&tpl).unwrap();
    // A topic seconds old may not show every partition in its first metadata: look again
    // every second and read any partition that appears.
    let mut assigned: HashSet<(String, i32)> = tpl
        .elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect();
    let mut last_refresh = Instant::now();
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut linger_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if let Some(l) = linger_until {
            if now >= l {
                break;
            }
        } else if expect.iter().all(|id| seen.contains(id)) {
            linger_until = Some(now + linger);
        } else if now >= deadline {
            break;
        }
        if last_refresh.elapsed() >= Duration::from_secs(1) {
            last_refresh = Instant::now();
            let mut more = TopicPartitionList::new();
            for topic in topics {
                if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
                    for t in md.topics() {
                        for p in t.partitions() {
                            if assigned.insert((topic.clone(), p.id())) {
                                more.add_partition_offset(topic, p.id(), Offset::Beginning)
                                    .unwrap();
                            }
                        }
                    }
                }
            }
            if more.count() > 0 {
                consumer.incremental_assign(&more).unwrap();
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            hd.value
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default(),
                        );
                    }
                }
                let id = headers.get("id").cloned();
                if let Some(id) = &id {
                    seen.insert(id.clone());
                }
                out.push(Received {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    id,
                    headers,
                    payload: m.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
                    raw_payload: m.payload().map(<[u8]>::to_vec),
                    timestamp_ms: m.timestamp().to_millis(),
                });
            }
        }
    }
    out
}

/// Asserts the at-least-once contract on every id:
/// * every written id was received;
/// * nothing was received that was not written (no rolled-back or foreign events);
/// * every copy of an id carries the original key, type and payload (duplicates are exact);
/// * per aggregate, the first arrival of each event follows commit order (sequence order).
///
/// Returns the number of duplicates seen.
pub fn assert_exactly_written(written: &[Written], received: &[Received]) -> usize {
    assert_written(written, received, true)
}

/// [`assert_exactly_written`], optionally without the `type` and `traceparent` headers (a
/// relay that does not write them: Debezium on its defaults).
pub fn assert_written(written: &[Written], received: &[Received], headers: bool) -> usize {
    let by_id: HashMap<&str, &Written> = written.iter().map(|w| (w.id.as_str(), w)).collect();
    let mut first_seen: HashSet<&str> = HashSet::new();
    let mut duplicates = 0;
    // Records of one key share a partition; read order within a partition is offset order.
    let mut ordered: Vec<&Received> = received.iter().collect();
    ordered
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let mut last_seq: HashMap<&str, (u64, i64)> = HashMap::new();
    for r in ordered {
        let id = r.id.as_deref().expect("record without header `id`");
        let w = by_id.get(id).unwrap_or_else(|| {
            panic!(
                "received event {id} that was never committed (topic {})",
                r.topic
            )
        });
        assert_eq!(
            r.key.as_deref(),
            Some(w.aggregateid.as_str()),
            "key of {id}"
        );
        assert_eq!(
            r.payload.as_deref(),
            Some(w.payload.as_str()),
            "payload of {id}"
        );
        if headers {
            assert_eq!(
                r.headers.get("type").map(String::as_str),
                Some("Changed"),
                "type header of {id}"
            );
            assert_eq!(
                r.headers.get("traceparent").map(String::as_str),
                Some("00-test"),
                "traceparent of {id}"
            );
        }
        if !first_seen.insert(w.id.as_str()) {
            duplicates += 1;
            continue;
        }
        // Logical mode: per-aggregate commit order (seq); polling: (xid, sequence) order.
        let key = w.order.unwrap_or((0, w.seq));
        let last = last_seq.entry(w.aggregateid.as_str()).or_insert((0, 0));
        assert!(
            key > *last,
            "aggregate {} out of order: {key:?} (event {id}) arrived after {last:?}",
            w.aggregateid,
        );
        *last = key;
    }
    let missing: Vec<&str> = written
        .iter()
        .map(|w| w.id.as_str())
        .filter(|id| !first_seen.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} committed events never arrived, e.g. {:?}",
        missing.len(),
        written.len(),
        &missing[..missing.len().min(5)]
    );
    duplicates
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

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small deterministic PRNG (xorshift) so workloads are varied but reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.next() % (hi_inclusive - lo + 1)
    }
}

/// Reads a dead-letter topic: event id → (`outboxd.dlq.reason`, `outboxd.dlq.topic`).
pub fn dlq(
    brokers: &str,
    topic: &str,
    expect: &HashSet<String>,
) -> HashMap<String, (String, String)> {
    consume(
        brokers,
        &[topic.to_string()],
        expect,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .into_iter()
    .filter_map(|r| {
        let id = r.id.clone()?;
        Some((
            id,
            (
                r.headers
                    .get("outboxd.dlq.reason")
                    .cloned()
                    .unwrap_or_default(),
                r.headers
                    .get("outboxd.dlq.topic")
                    .cloned()
                    .unwrap_or_default(),
            ),
        ))
    })
    .collect()
}

/// Creates `topic` with `partitions` and topic configs `configs` through the admin API.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// A broker of a test's own (`scripts/stack.sh kafka-start`), with extra server properties.
/// Stopped and removed on drop.
pub struct PrivateKafka {
    pub dir: PathBuf,
    pub brokers: String,
}

impl PrivateKafka {
    pub fn start(properties: &[&str]) -> PrivateKafka {
        let dir = std::env::temp_dir().join(unique("outboxd-kafka"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let out = Command::new(script)
            .arg("kafka-start")
            .arg(&dir)
            .args(properties)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "kafka-start failed");
        let brokers = String::from_utf8(out.stdout).unwrap().trim().to_string();
        PrivateKafka { dir, brokers }
    }
}

impl PrivateKafka {
    /// A broker with a SASL_SSL listener (SCRAM-SHA-256 user `user`/`password`, throwaway CA
    /// in `dir/certs`). `brokers` is its plaintext address (for verifying consumers),
    /// the returned string the SASL_SSL one.
    pub fn start_sasl(user: &str, password: &str) -> (PrivateKafka, String) {
        let dir = std::env::temp_dir().join(unique("outboxd-kafka-sasl"));
        let out = stack(&["kafka-start-sasl", dir.to_str().unwrap(), user, password]);
        let sasl = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let brokers = std::fs::read_to_string(dir.join("bootstrap"))
            .unwrap()
            .trim()
            .to_string();
        (PrivateKafka { dir, brokers }, sasl)
    }

    /// An `n`-node KRaft cluster (replication `n`, `min.insync.replicas` n-1).
    pub fn start_cluster(n: u32, properties: &[&str]) -> PrivateKafka {
        let dir = std::env::temp_dir().join(unique("outboxd-kafka-cluster"));
        let n = n.to_string();
        let mut args = vec!["kafka-cluster-start", dir.to_str().unwrap(), &n];
        args.extend_from_slice(properties);
        let out = stack(&args);
        let brokers = String::from_utf8(out.stdout).unwrap().trim().to_string();
        PrivateKafka { dir, brokers }
    }

    /// SIGKILL node `i` of a cluster.
    pub fn kill_node(&self, i: u32) {
        stack(&[
            "kafka-node-kill",
            self.dir.to_str().unwrap(),
            &i.to_string(),
        ]);
    }

    /// Starts node `i` of a cluster again on its data and waits until it is up.
    pub fn start_node(&self, i: u32) {
        stack(&[
            "kafka-node-start",
            self.dir.to_str().unwrap(),
            &i.to_string(),
        ]);
    }
}

/// Runs `scripts/stack.sh args…`, failing the test if it fails.
pub fn stack(args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
    let out = Command::new(script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "stack.sh {args:?} failed");
    out
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let _ = Command::new(script)
            .arg("kafka-stop")
            .arg(&self.dir)
            .status();
    }
}

impl TestDb {
    /// This database reached through `port` on loopback (a [`proxy::Proxy`]).
    pub fn via_port(&self, port: u16) -> TestDb {
        let (head, db) = self.url.rsplit_once('/').unwrap();
        let (userhost, _) = head.rsplit_once(':').unwrap();
        TestDb {
            url: format!("{userhost}:{port}/{db}"),
            ..self.clone()
        }
    }

    /// The server's address, for a proxy in front of it.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        let head = self.url.rsplit_once('/').unwrap().0;
        let hostport = head.rsplit_once('@').unwrap().1;
        hostport.parse().unwrap()
    }
}

/// A PostgreSQL cluster of a test's own (`scripts/stack.sh pg-start`) with extra server
/// options and, if given, its own pg_hba.conf. Stopped and removed on drop.
pub struct PrivateCluster {
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
}

impl PrivateCluster {
    pub fn start(options: &str) -> PrivateCluster {
        Self::start_with(unique("cluster"), options, None)
    }

    pub fn start_with(name: String, options: &str, hba: Option<&str>) -> PrivateCluster {
        let dir = std::env::temp_dir().join(name);
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let mut cmd = Command::new(&script);
        cmd.args([
            "pg-start",
            dir.to_str().unwrap(),
            &port.to_string(),
            options,
        ]);
        if let Some(hba) = hba {
            cmd.env("OUTBOXD_PG_HBA", hba);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PrivateCluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            port,
        }
    }

    /// A superuser connection over the cluster's Unix socket (TCP may demand TLS).
    pub async fn local_client(&self, db: &str) -> Client {
        let url = format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.join("pg").display(),
            self.port
        );
        connect(&url).await
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let _ = Command::new(script)
            .args(["pg-stop", self.dir.to_str().unwrap()])
            .output();
    }
}
