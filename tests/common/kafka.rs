//! Kafka for the tests: reading topics back, asserting on every id, brokers of a test's
//! own (single, SASL_SSL, a 3-node cluster).

use super::*;

pub fn kafka_brokers() -> String {
    std::env::var("OUTBOXD_TEST_KAFKA").expect(
        "OUTBOXD_TEST_KAFKA is not set: run the tests with scripts/test.sh (it starts PostgreSQL and the broker)",
    )
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

/// A consumed Kafka message as the tests compare it.
fn received<M: Message>(m: &M) -> Received {
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
    Received {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        id: headers.get("id").cloned(),
        headers,
        payload: m.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
        raw_payload: m.payload().map(<[u8]>::to_vec),
        timestamp_ms: m.timestamp().to_millis(),
    }
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

/// Reads `topics` from the beginning until at least `n` records are there (each read lingers
/// `linger` for more) or `timeout` passed — for records whose ids are not known beforehand
/// (table CDC ids carry the change's LSN).
pub fn consume_count(
    brokers: &str,
    topics: &[String],
    n: usize,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = consume(
            brokers,
            topics,
            &HashSet::new(),
            Duration::from_secs(30),
            linger,
        );
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
    }
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
                let r = received(&m);
                if let Some(id) = &r.id {
                    seen.insert(id.clone());
                }
                out.push(r);
            }
        }
    }
    let missing: Vec<&String> = expect.iter().filter(|id| !seen.contains(*id)).collect();
    if !missing.is_empty() {
        // What the guarantee is about is what Kafka holds: a fresh reader's records (those
        // this one did not get) count too, and the lines say so when it matters.
        let more = diagnose_missing(brokers, topics, &missing, &out, isolation);
        out.extend(more);
    }
    out
}

/// Evidence for an expected id that never arrived (issue 16: was it never in Kafka, or did
/// the reader miss it?): each partition's watermarks, how many records this reader got from
/// it, and whether a second, fresh reader finds the missing ids. Returns the records the
/// second reader got that the first did not (by topic, partition and offset).
fn diagnose_missing(
    brokers: &str,
    topics: &[String],
    missing: &[&String],
    got: &[Received],
    isolation: &str,
) -> Vec<Received> {
    let read: HashSet<(String, i32, i64)> = got
        .iter()
        .map(|r| (r.topic.clone(), r.partition, r.offset))
        .collect();
    let mut more = Vec::new();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", isolation)
        .set("group.id", unique("diagnose"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
            continue;
        };
        for t in md.topics() {
            for p in t.partitions() {
                let marks = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5));
                let read = got
                    .iter()
                    .filter(|r| r.topic == *topic && r.partition == p.id())
                    .count();
                eprintln!(
                    "diagnose: {topic} [{}] leader {} watermarks {marks:?}, {read} records read",
                    p.id(),
                    p.leader()
                );
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .unwrap();
            }
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut found = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && found.len() < missing.len() {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let r = received(&m);
            if let Some(id) = &r.id {
                if missing.contains(&id) && found.insert(id.clone()) {
                    eprintln!(
                        "diagnose: a second reader finds missing {id} at {} [{}] offset {}",
                        r.topic, r.partition, r.offset
                    );
                }
            }
            if !read.contains(&(r.topic.clone(), r.partition, r.offset)) {
                more.push(r);
            }
        }
    }
    eprintln!(
        "diagnose: {} of {} missing ids found by a second reader",
        found.len(),
        missing.len()
    );
    more
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
    check_written(written, received, headers, true)
}

/// [`assert_exactly_written`] for a broker that promises no order (EventBridge, standard
/// queues): every committed id arrived, nothing else did, each with its key, payload and
/// headers; returns the number of repeats.
pub fn assert_written_in_any_order(written: &[Written], received: &[Received]) -> usize {
    check_written(written, received, true, false)
}

fn check_written(
    written: &[Written],
    received: &[Received],
    headers: bool,
    in_order: bool,
) -> usize {
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
        if !in_order {
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
    assert_none_missing(written, &first_seen);
    duplicates
}

/// Asserts every written id is in `arrived`.
pub fn assert_none_missing(written: &[Written], arrived: &HashSet<&str>) {
    let missing: Vec<&str> = written
        .iter()
        .map(|w| w.id.as_str())
        .filter(|id| !arrived.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} committed events never arrived, e.g. {:?}",
        missing.len(),
        written.len(),
        &missing[..missing.len().min(5)]
    );
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
    /// A broker of the test's own that every client reaches through a TCP proxy of the
    /// tests' own (it advertises the proxy's address); the proxy's address is `.1`'s port.
    pub fn behind_proxy() -> (PrivateKafka, super::proxy::Proxy) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let kafka = PrivateKafka::start(&[&format!(
            "advertised.listeners=PLAINTEXT://127.0.0.1:{port}"
        )]);
        let proxy = super::proxy::Proxy::start_on(listener, kafka.brokers.parse().unwrap());
        (kafka, proxy)
    }

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
