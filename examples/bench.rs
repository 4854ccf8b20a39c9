//! Benchmark: throughput, commit→consumed latency and peak RSS of a real `outboxd run` process
//! against the local stack (real PostgreSQL, real broker). Run it with `scripts/bench.sh`.
//!
//! Modes:
//! * `live` (default): the relay runs while writers commit events, as fast as they can or at
//!   `--rate` events/s. Throughput is N / (first commit → last event consumed). Latency is
//!   measured per event from the writer's COMMIT returning to a consumer reading the record,
//!   which includes the broker's fetch path, so it is an upper bound of commit→ack.
//! * `backlog`: all events are committed first, then the relay starts; throughput is
//!   N / (relay start → last event consumed): how fast a backlog drains.
//!
//! `--system debezium` measures Debezium's PostgreSQL connector with the Outbox EventRouter on
//! Kafka Connect (`bench/debezium/debezium.sh`) on the same workload and topic instead. In
//! backlog mode Debezium is started (and streaming) first, then paused with SIGSTOP while the
//! backlog is written, and resumed: its drain time excludes the JVM's start, outboxd's
//! includes its own. CPU is the relay process's user + system time from the first commit
//! (backlog: from the relay's start or resume) to the last event consumed.

#[path = "support/fresh.rs"]
mod fresh;
#[path = "support/latency.rs"]
mod latency;
#[path = "support/proc.rs"]
mod proc_stats;
#[path = "support/relay.rs"]
mod relay;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_postgres::NoTls;

use relay::Relay;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Mode {
    Live,
    Backlog,
}

/// What the relay writes (`schemas.encoding`), each with the bench event's schema.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Encoding {
    /// No schemas: the payload's JSON text.
    Plain,
    /// The JSON text, checked against a JSON Schema.
    Json,
    /// The JSON text in the Confluent wire format (needs OUTBOXD_BENCH_REGISTRY).
    JsonSchema,
    /// Avro in the Confluent wire format (needs OUTBOXD_BENCH_REGISTRY).
    Avro,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum System {
    Outboxd,
    Debezium,
}

#[derive(Parser, Debug)]
struct Args {
    /// The relay to measure.
    #[arg(long, value_enum, default_value_t = System::Outboxd)]
    system: System,
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Events per second across all writers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 4)]
    writers: u64,
    /// Events per transaction.
    #[arg(long, default_value_t = 10)]
    txn_size: u64,
    /// Bytes of padding in each payload.
    #[arg(long, default_value_t = 100)]
    payload_pad: usize,
    #[arg(long, value_enum, default_value_t = Mode::Live)]
    mode: Mode,
    /// The outboxd binary to measure.
    #[arg(long, default_value = "target/release/outboxd")]
    relay: PathBuf,
    /// How the relay reads PostgreSQL: logical or polling.
    #[arg(long, default_value = "logical")]
    read: String,
    /// Extra TOML appended to the relay's config (e.g. "[kafka.properties]\nlinger.ms = 1").
    #[arg(long, default_value = "")]
    extra_config: String,
    /// Every this many seconds, print the outbox table's rows and size (0 = never): shows
    /// whether polling-mode retention keeps up with the insert rate.
    #[arg(long, default_value_t = 0)]
    table_report_secs: u64,
    /// Schemas and the wire format: `scripts/bench.sh --registry` starts the registry the
    /// encodings other than plain and json need.
    #[arg(long, value_enum, default_value_t = Encoding::Plain)]
    encoding: Encoding,
    /// Every event written with a sampled W3C `traceparent` in its headers (`scripts/bench.sh
    /// --tracing` runs the same workload with `[tracing]` off, then on).
    #[arg(long)]
    traced: bool,
}

/// The `[schemas]` section of `encoding`, its schema file written under `dir`.
fn schemas_config(encoding: Encoding, dir: &std::path::Path) -> anyhow::Result<String> {
    let (file, text, wire) = match encoding {
        Encoding::Plain => return Ok(String::new()),
        Encoding::Json | Encoding::JsonSchema => (
            "BenchEvent.json",
            r#"{"type": "object", "required": ["n", "pad"],
                "properties": {"n": {"type": "integer"}, "pad": {"type": "string"}}}"#,
            if encoding == Encoding::Json {
                "json"
            } else {
                "json_schema"
            },
        ),
        Encoding::Avro => (
            "BenchEvent.avsc",
            r#"{"type": "record", "name": "BenchEvent",
                "fields": [{"name": "n", "type": "long"}, {"name": "pad", "type": "string"}]}"#,
            "avro",
        ),
    };
    let schemas = dir.join("schemas");
    std::fs::create_dir_all(schemas.join("bench"))?;
    std::fs::write(schemas.join("bench").join(file), text)?;
    let mut section = format!(
        "[schemas]\ndir = \"{}\"\nencoding = \"{wire}\"\n",
        schemas.display()
    );
    if wire != "json" {
        let url = std::env::var("OUTBOXD_BENCH_REGISTRY")
            .context("--encoding json-schema|avro needs a registry: scripts/bench.sh --registry")?;
        section.push_str(&format!("registry_url = \"{url}\"\nauto_register = true\n"));
    }
    Ok(section)
}

/// The bench event's `n`: from its JSON text, or from the Confluent wire format (JSON after
/// the 5-byte header; Avro: `n` is the record's first field, a zigzag varint long).
fn event_number(payload: &[u8]) -> Option<u64> {
    let json = |b: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(b)
            .ok()?
            .get("n")?
            .as_u64()
    };
    match payload {
        [0, _, _, _, _, b'{', ..] => json(&payload[5..]),
        [0, _, _, _, _, rest @ ..] => {
            let (mut value, mut shift) = (0u64, 0);
            for byte in rest {
                value |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return Some((value >> 1) ^ (value & 1).wrapping_neg());
                }
                shift += 7;
            }
            None
        }
        _ => json(payload),
    }
}

struct Arrivals {
    at: Vec<Option<Instant>>,
    count: u64,
    /// Records in the Confluent wire format (`--encoding json-schema|avro`).
    framed: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    TRACED.store(args.traced, std::sync::atomic::Ordering::Relaxed);
    let brokers = std::env::var("OUTBOXD_TEST_KAFKA")
        .context("OUTBOXD_TEST_KAFKA not set; use scripts/bench.sh")?;
    let fresh::Fresh {
        db,
        url,
        port: pg_port,
        dir,
    } = fresh::database("bench").await?;
    let config = dir.join("outboxd.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"{}\"\n[postgres]\nurl = \"{url}\"\nslot = \"{db}\"\n[kafka]\nbrokers = \"{brokers}\"\ntopic_template = \"{db}.{{aggregatetype}}\"\n{}\n{}",
            args.read,
            args.extra_config,
            schemas_config(args.encoding, &dir)?
        ),
    )?;
    let topic = format!("{db}.bench");
    relay::migrate(&args.relay, &config)?;

    let n = args.events;
    let commits: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; n as usize + 1]));
    let arrivals = Arc::new(Mutex::new(Arrivals {
        at: vec![None; n as usize + 1],
        count: 0,
        framed: 0,
    }));

    let log = std::fs::File::create(dir.join("outboxd.log"))?;
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    let start_relay = || -> anyhow::Result<Relay> {
        match args.system {
            System::Outboxd => Ok(Relay::Outboxd(
                Command::new(&args.relay)
                    .args(["run", "--config"])
                    .arg(&config)
                    .stderr(Stdio::from(log.try_clone()?))
                    .stdout(Stdio::null())
                    .spawn()?,
            )),
            System::Debezium => debezium(&dir.join("debezium"), &brokers, &pg_port, &db),
        }
    };
    if args.system == System::Debezium {
        // Debezium makes its own slot and publication.
        client
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot('{db}'); DROP PUBLICATION outboxd;"
            ))
            .await?;
    }

    // Warm-up event 0: the relay is connected and the topic exists before timing starts.
    // Debezium (snapshot.mode=no_data) publishes only what is committed after it started.
    let mut relay = None;
    if args.system == System::Debezium {
        relay = Some(start_relay()?);
    }
    insert(&client, 0, 0, args.payload_pad).await?;
    if args.mode == Mode::Live && relay.is_none() {
        relay = Some(start_relay()?);
    }
    let consumer = spawn_consumer(brokers.clone(), topic.clone(), arrivals.clone(), n)?;

    if args.mode == Mode::Live || relay.is_some() {
        wait_for(&arrivals, 0, Duration::from_secs(120)).await?;
    }
    if let (Mode::Backlog, Some(r)) = (args.mode, &relay) {
        r.signal("-STOP");
    }
    let mut cpu_from = relay.as_ref().and_then(|r| proc_stats::cpu_secs(r.pid()));
    println!(
        "outboxd bench: read={} mode={:?} encoding={:?} traced={} tracing={} events={n} writers={} txn_size={} rate={} payload≈{}B",
        args.read,
        args.mode,
        args.encoding,
        args.traced,
        if args.extra_config.contains("[tracing]") { "on" } else { "off" },
        args.writers,
        args.txn_size,
        if args.rate == 0 {
            "max".to_string()
        } else {
            format!("{}/s", args.rate)
        },
        args.payload_pad + 30
    );

    // A second slot at the same point, for the raw decode rate (backlog mode).
    let raw_slot = format!("{db}_raw");
    if args.mode == Mode::Backlog && args.system == System::Outboxd {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&raw_slot],
            )
            .await
            .context("creating the raw-decode slot")?;
    }
    let first_commit = Instant::now();
    let reporter = (args.table_report_secs > 0).then(|| {
        let url = url.clone();
        let every = Duration::from_secs(args.table_report_secs);
        tokio::spawn(async move {
            let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await else {
                return;
            };
            tokio::spawn(conn);
            println!("  t(s)   rows in outbox   table+indexes");
            loop {
                tokio::time::sleep(every).await;
                let row = client
                    .query_one(
                        "SELECT count(*), pg_total_relation_size('outbox') FROM outbox",
                        &[],
                    )
                    .await;
                if let Ok(r) = row {
                    let (rows, bytes): (i64, i64) = (r.get(0), r.get(1));
                    println!(
                        "  {:>4}   {rows:>14}   {:>9.1} MiB",
                        first_commit.elapsed().as_secs(),
                        bytes as f64 / 1048576.0
                    );
                }
            }
        })
    });
    let mut writers = Vec::new();
    let per_writer = n / args.writers;
    for w in 0..args.writers {
        let url = url.clone();
        let commits = commits.clone();
        let (txn_size, pad, rate, writers_n) =
            (args.txn_size, args.payload_pad, args.rate, args.writers);
        writers.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(conn);
            let lo = 1 + w * per_writer;
            let hi = if w == writers_n - 1 {
                n
            } else {
                lo + per_writer - 1
            };
            let per_sec = if rate == 0 {
                0.0
            } else {
                rate as f64 / writers_n as f64
            };
            let start = Instant::now();
            let mut next = lo;
            let mut done = 0u64;
            while next <= hi {
                let end = (next + txn_size - 1).min(hi);
                if per_sec > 0.0 {
                    let due = start + Duration::from_secs_f64(done as f64 / per_sec);
                    tokio::time::sleep_until(due.into()).await;
                }
                insert(&client, next, end, pad).await?;
                let t = Instant::now();
                let mut c = commits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                for i in next..=end {
                    c[i as usize] = Some(t);
                }
                drop(c);
                done += end - next + 1;
                next = end + 1;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let last_commit = Instant::now();
    if let Some(r) = reporter {
        r.abort();
    }
    let raw_decode = match (args.mode, args.system) {
        (Mode::Backlog, System::Outboxd) => {
            Some(raw_decode_rate(&client, &url, &db, &raw_slot, n).await?)
        }
        _ => None,
    };
    let relay_start = Instant::now();
    match (args.mode, &relay) {
        (Mode::Backlog, Some(r)) => {
            cpu_from = proc_stats::cpu_secs(r.pid());
            r.signal("-CONT");
        }
        (Mode::Backlog, None) => {
            relay = Some(start_relay()?);
            cpu_from = Some(0.0);
        }
        (Mode::Live, _) => {}
    }
    let deadline = Duration::from_secs(600);
    let sampler = relay
        .as_ref()
        .map(|r| proc_stats::RssSampler::start(r.pid()));
    wait_for_all(&arrivals, n, deadline).await?;
    let relay = relay.context("relay not started")?;
    let rss_kib = proc_stats::peak_rss_kib(relay.pid()).unwrap_or(0);
    let (anon_kib, file_kib) = sampler.map_or((0, 0), proc_stats::RssSampler::finish);
    let cpu = proc_stats::cpu_secs(relay.pid()).unwrap_or(0.0) - cpu_from.unwrap_or(0.0);
    relay.stop(&dir.join("debezium"));
    drop(consumer);

    let arr = arrivals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let commits = commits.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let last_arrival = (1..=n as usize)
        .filter_map(|i| arr.at[i])
        .max()
        .context("no arrivals")?;
    let insert_secs = (last_commit - first_commit).as_secs_f64();
    println!(
        "committed: {n} events in {insert_secs:.2} s ({:.0} events/s into PostgreSQL)",
        n as f64 / insert_secs
    );
    match args.mode {
        Mode::Live => {
            let secs = (last_arrival - first_commit).as_secs_f64();
            println!(
                "throughput: {:.0} events/s (first commit → last event consumed, {secs:.2} s)",
                n as f64 / secs
            );
            let mut lat: Vec<f64> = (1..=n as usize)
                .filter_map(|i| {
                    Some((arr.at[i]?.saturating_duration_since(commits[i]?)).as_secs_f64() * 1000.0)
                })
                .collect();
            println!("latency commit → consumed: {}", latency::summary(&mut lat));
        }
        Mode::Backlog => {
            let secs = (last_arrival - relay_start).as_secs_f64();
            println!("throughput: {:.0} events/s (relay start, Debezium: resume → last event consumed, {secs:.2} s, backlog drain)", n as f64 / secs);
            if let Some((stream, peek)) = raw_decode {
                let drain = n as f64 / secs;
                println!(
                    "raw pgoutput decode of the same backlog: streamed to pg_recvlogical {stream:.0} events/s (the drain is {:.2}× it), peeked through SQL {peek:.0} events/s ({:.2}×)",
                    drain / stream,
                    drain / peek
                );
            }
        }
    }
    println!(
        "relay ({:?}) CPU: {cpu:.2} s = {:.2} CPU-s per 100k events, {:.0} events per CPU-second",
        args.system,
        cpu * 100_000.0 / n as f64,
        n as f64 / cpu.max(0.001)
    );
    println!(
        "relay peak RSS: {:.1} MiB (largest sampled: RssAnon {:.1} MiB, RssFile {:.1} MiB)",
        rss_kib as f64 / 1024.0,
        anon_kib as f64 / 1024.0,
        file_kib as f64 / 1024.0
    );
    if args.encoding != Encoding::Plain {
        // `arr` holds the arrivals' lock.
        println!(
            "records in the Confluent wire format: {} of {n}",
            arr.framed
        );
    }
    Ok(())
}

/// Debezium on the bench database, routing aggregate type `bench` to `<db>.bench`.
fn debezium(dir: &std::path::Path, brokers: &str, port: &str, db: &str) -> anyhow::Result<Relay> {
    Relay::debezium(
        dir,
        brokers,
        &[
            format!("database.port={port}"),
            format!("database.dbname={db}"),
            format!("slot.name={db}_dbz"),
            format!("publication.name={db}_dbz"),
            format!("transforms.outbox.route.topic.replacement={db}.${{routedByValue}}"),
        ],
    )
}

/// Set by `--traced`: every event carries a sampled `traceparent` of its own.
static TRACED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn insert(
    client: &tokio_postgres::Client,
    lo: u64,
    hi: u64,
    pad: usize,
) -> anyhow::Result<()> {
    let headers = if TRACED.load(std::sync::atomic::Ordering::Relaxed) {
        "jsonb_build_object('traceparent', '00-' || md5(g::text) || '-' || left(md5('w' || g), 16) || '-01')"
    } else {
        "NULL"
    };
    client
        .execute(
            &format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
                 SELECT 'bench', 'agg-' || (g % 1000), 'BenchEvent', jsonb_build_object('n', g, 'pad', repeat('x', $3)), {headers} \
                   FROM generate_series($1::int8, $2::int8) g"
            ),
            &[&(lo as i64), &(hi as i64), &(pad as i32)],
        )
        .await?;
    Ok(())
}

fn spawn_consumer(
    brokers: String,
    topic: String,
    arrivals: Arc<Mutex<Arrivals>>,
    n: u64,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "outboxd-bench")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    Ok(std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            if let Ok(md) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                if let Some(t) = md.topics().first() {
                    if t.error().is_none() && !t.partitions().is_empty() {
                        let mut tpl = TopicPartitionList::new();
                        for p in t.partitions() {
                            let _ = tpl.add_partition_offset(&topic, p.id(), Offset::Beginning);
                        }
                        if consumer.assign(&tpl).is_ok() {
                            break;
                        }
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(120) {
                eprintln!("bench: topic {topic} never appeared");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        loop {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                if let Ok(a) = arrivals.lock() {
                    if a.count > n {
                        return;
                    }
                }
                continue;
            };
            let now = Instant::now();
            let Some(payload) = m.payload() else { continue };
            let Some(i) = event_number(payload) else {
                continue;
            };
            if let Ok(mut a) = arrivals.lock() {
                if let Some(slot) = a.at.get_mut(i as usize) {
                    if slot.is_none() {
                        *slot = Some(now);
                        a.count += 1;
                        a.framed += u64::from(payload.first() == Some(&0));
                    }
                }
                if a.count > n {
                    return;
                }
            }
        }
    }))
}

async fn wait_for(
    arrivals: &Arc<Mutex<Arrivals>>,
    i: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if arrivals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.at[i].is_some() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("event {i} did not arrive within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_all(
    arrivals: &Arc<Mutex<Arrivals>>,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        // `count` includes the warm-up event 0.
        let got = arrivals
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .count
            .saturating_sub(1);
        if got >= n {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("only {got} of {n} events arrived within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How fast PostgreSQL itself decodes the backlog with pgoutput, measured in the same run
/// as the drain — the ceiling any relay of a slot works under on this machine: a second
/// slot made at the same point streamed over the replication protocol to `pg_recvlogical`
/// (into /dev/null), and the relay's slot (`slot`) peeked (not consumed) through SQL. Returns
/// (streamed, peeked) events per second; drops the second slot.
async fn raw_decode_rate(
    client: &tokio_postgres::Client,
    url: &str,
    slot: &str,
    raw_slot: &str,
    n: u64,
) -> anyhow::Result<(f64, f64)> {
    let end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    // The server's own client binaries: the same major version as the walsender.
    let bindir: String = client
        .query_one("SELECT setting FROM pg_config WHERE name = 'BINDIR'", &[])
        .await
        .context("asking the server for its BINDIR")?
        .get(0);
    let bin = PathBuf::from(bindir).join("pg_recvlogical");
    let start = Instant::now();
    let status = Command::new(bin)
        .args([
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
            "-o",
            "proto_version=1",
        ])
        .args(["-o", "publication_names=outboxd", "-o", "messages=true"])
        .arg(format!("--slot={raw_slot}"))
        .arg(format!("--endpos={end}"))
        .arg(format!("--dbname={url}"))
        .status()?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    let stream = n as f64 / start.elapsed().as_secs_f64();
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&raw_slot])
        .await?;
    let start = Instant::now();
    client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', 'outboxd', 'messages', 'true')",
            &[&slot],
        )
        .await
        .context("peeking the slot's changes")?;
    Ok((stream, n as f64 / start.elapsed().as_secs_f64()))
}
