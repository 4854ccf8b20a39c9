//! Table CDC benchmark: a 10-column table under an insert/update/delete mix (per transaction
//! of 10 changes: 6 inserts, 3 updates, 1 delete), captured by a real `outboxd run` (`[cdc]`)
//! or by Debezium's PostgreSQL connector on Kafka Connect (no EventRouter, JSON converter
//! without schemas) — the same table, rows and Kafka. Run it with `scripts/bench.sh --cdc`.
//!
//! Every change is numbered: inserts and updates write the number into column `seq`; a
//! delete's number is looked up by the deleted key. Latency is per change, writer's COMMIT
//! returning → a consumer reading the change event, split at the broker's append (the topic
//! is created first with `message.timestamp.type=LogAppendTime`). `--mode backlog` commits every change
//! first and measures the drain (Debezium: started first, paused with SIGSTOP meanwhile).
//! CPU is the relay process's user + system time over the measured span; RSS its peak. With
//! a broker of `scripts/stack.sh` it also says how many of the slowest changes waited through
//! one of the broker's stop-the-world collections (its GC log, `support/broker_gc.rs`).

#[path = "support/broker_gc.rs"]
mod broker_gc;
#[path = "support/fresh.rs"]
mod fresh;
#[path = "support/latency.rs"]
mod latency;
#[path = "support/proc.rs"]
mod proc_stats;
#[path = "support/relay.rs"]
mod relay;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, Timestamp, TopicPartitionList};
use tokio_postgres::NoTls;

use relay::Relay;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Mode {
    Live,
    Backlog,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum System {
    Outboxd,
    Debezium,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum, default_value_t = System::Outboxd)]
    system: System,
    /// Changes (a multiple of 10).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Changes per second across all writers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long, default_value_t = 4)]
    writers: u64,
    #[arg(long, value_enum, default_value_t = Mode::Live)]
    mode: Mode,
    #[arg(long, default_value = "target/release/outboxd")]
    relay: PathBuf,
    /// Extra TOML appended to the relay's config (e.g. "[sink]\nmax_in_flight_bytes = 8388608").
    #[arg(long, default_value = "")]
    extra_config: String,
}

/// Shared between writers and the consumer.
struct Book {
    commit: Vec<Option<Instant>>,
    arrival: Vec<Option<Instant>>,
    /// The record's Kafka timestamp (the topic's LogAppendTime: when the broker appended it)
    /// to its arrival, in ms: the part of the latency after the broker took the record.
    after_append: Vec<Option<f64>>,
    /// A deleted key → the delete's change number.
    deletes: HashMap<i64, usize>,
    arrived: u64,
    /// Value bytes of the records counted (the mean record size).
    value_bytes: u64,
}

const TABLE: &str =
    "CREATE TABLE bench_cdc (id bigint PRIMARY KEY, seq bigint NOT NULL, c1 int, c2 bigint, \
     c3 text, c4 text, c5 numeric(12,2), c6 timestamptz, c7 boolean, c8 jsonb)";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Instants on the wall clock (ms since the epoch): the broker stamps and logs in it.
    let (anchor, anchor_ms) = (
        Instant::now(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0,
    );
    let wall_ms =
        |t: Instant| anchor_ms + t.saturating_duration_since(anchor).as_secs_f64() * 1000.0;
    let brokers = std::env::var("OUTBOXD_TEST_KAFKA").context("use scripts/bench.sh")?;
    let fresh = fresh::database("bench_cdc").await?;
    let client = fresh.connect().await?;
    let fresh::Fresh { db, url, port, dir } = fresh;
    client.batch_execute(TABLE).await?;
    let config = dir.join("outboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{db}\"\n[kafka]\nbrokers = \"{brokers}\"\n\
             [cdc]\ntables = [\"public.bench_cdc\"]\ntopic_prefix = \"{db}\"\n{}\n",
            args.extra_config
        ),
    )?;
    if args.system == System::Outboxd {
        relay::migrate(&args.relay, &config)?;
    }
    let n = (args.events / 10).max(1) * 10;
    let book = Arc::new(Mutex::new(Book {
        commit: vec![None; n as usize + 1],
        arrival: vec![None; n as usize + 1],
        after_append: vec![None; n as usize + 1],
        deletes: HashMap::new(),
        arrived: 0,
        value_bytes: 0,
    }));
    let log = std::fs::File::create(dir.join("relay.log"))?;
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
            System::Debezium => debezium(&dir.join("debezium"), &brokers, &port, &db),
        }
    };
    // The topic up front, stamped by the broker (LogAppendTime), so the latency splits at the
    // broker; otherwise as either system would create it (the broker's 3 partitions).
    let topic = format!("{db}.public.bench_cdc");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))
                .set("message.timestamp.type", "LogAppendTime")],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    // Warm-up change 0 (id 0): the relay streams and the topic exists before timing starts.
    let mut relay = None;
    if args.system == System::Debezium || args.mode == Mode::Live {
        relay = Some(start_relay()?);
    }
    client
        .batch_execute("INSERT INTO bench_cdc (id, seq) VALUES (0, 0)")
        .await?;
    let consumer = spawn_consumer(brokers.clone(), topic, book.clone(), n)?;
    if relay.is_some() {
        wait_until(&book, Duration::from_secs(120), |b| b.arrival[0].is_some()).await?;
    }
    if let (Mode::Backlog, Some(r)) = (args.mode, &relay) {
        r.signal("-STOP");
    }
    let mut cpu_from = relay.as_ref().and_then(|r| proc_stats::cpu_secs(r.pid()));
    println!(
        "outboxd bench (table CDC): system={:?} mode={:?} changes={n} writers={} rate={} mix=6 insert/3 update/1 delete per transaction, 10 columns",
        args.system,
        args.mode,
        args.writers,
        if args.rate == 0 { "max".to_string() } else { format!("{}/s", args.rate) }
    );
    let first_commit = Instant::now();
    let txns = n / 10;
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let (url, book) = (url.clone(), book.clone());
        let (rate, writers_n) = (args.rate, args.writers);
        writers.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
            tokio::spawn(conn);
            let per_sec = if rate == 0 { 0.0 } else { rate as f64 / 10.0 / writers_n as f64 };
            let start = Instant::now();
            let mut done = 0u64;
            // Transaction t (this writer's every writers_n-th) holds changes 10t+1 ..= 10t+10.
            let mut t = w;
            while t < txns {
                if per_sec > 0.0 {
                    tokio::time::sleep_until((start + Duration::from_secs_f64(done as f64 / per_sec)).into()).await;
                }
                let base = (10 * t) as i64;
                // Inserts 1–6 (ids base+1..=base+6), updates 7–9 of ids base+1..=base+3, and
                // delete 10 of id base+4.
                if let Ok(mut b) = book.lock() {
                    b.deletes.insert(base + 4, (base + 10) as usize);
                }
                let sql = format!(
                    "BEGIN;\
                     INSERT INTO bench_cdc SELECT g, g, g::int, g * 7, 'text-' || g, md5(g::text), g / 100.0, now(), g % 2 = 0, jsonb_build_object('g', g) FROM generate_series({}, {}) g;\
                     UPDATE bench_cdc SET seq = id + 6, c1 = c1 + 1 WHERE id = {};\
                     UPDATE bench_cdc SET seq = id + 6, c1 = c1 + 1 WHERE id = {};\
                     UPDATE bench_cdc SET seq = id + 6, c1 = c1 + 1 WHERE id = {};\
                     DELETE FROM bench_cdc WHERE id = {};\
                     COMMIT;",
                    base + 1,
                    base + 6,
                    base + 1,
                    base + 2,
                    base + 3,
                    base + 4
                );
                client.batch_execute(&sql).await?;
                let now = Instant::now();
                if let Ok(mut b) = book.lock() {
                    for i in 1..=10 {
                        b.commit[(base + i) as usize] = Some(now);
                    }
                }
                done += 1;
                t += writers_n;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let last_commit = Instant::now();
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
    wait_until(&book, Duration::from_secs(900), |b| b.arrived > n).await?;
    let relay = relay.context("relay not started")?;
    let rss_kib = proc_stats::peak_rss_kib(relay.pid()).unwrap_or(0);
    let cpu = proc_stats::cpu_secs(relay.pid()).unwrap_or(0.0) - cpu_from.unwrap_or(0.0);
    relay.stop(&dir.join("debezium"));
    drop(consumer);
    let b = book.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let last_arrival = (1..=n as usize)
        .filter_map(|i| b.arrival[i])
        .max()
        .context("no arrivals")?;
    let insert_secs = (last_commit - first_commit).as_secs_f64();
    println!(
        "committed: {n} changes in {insert_secs:.2} s ({:.0} changes/s into PostgreSQL); change events of {} bytes on average",
        n as f64 / insert_secs,
        b.value_bytes / b.arrived.max(1)
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
                    Some(
                        b.arrival[i]?
                            .saturating_duration_since(b.commit[i]?)
                            .as_secs_f64()
                            * 1000.0,
                    )
                })
                .collect();
            println!("latency commit → consumed: {}", latency::summary(&mut lat));
            // Split at the broker's LogAppendTime (ms resolution): before it PostgreSQL, the
            // stream, the relay (or Connect), librdkafka's linger and the produce request;
            // after it the broker's fetch path and the consumer.
            let mut after: Vec<f64> = b.after_append[1..].iter().flatten().copied().collect();
            let mut before: Vec<f64> = (1..=n as usize)
                .filter_map(|i| {
                    let total = b.arrival[i]?.saturating_duration_since(b.commit[i]?);
                    Some(total.as_secs_f64() * 1000.0 - b.after_append[i]?)
                })
                .collect();
            println!(
                "  commit → appended by the broker (±1 ms): {}",
                latency::summary(&mut before)
            );
            println!("  appended → consumed: {}", latency::summary(&mut after));
            let gc_log =
                std::env::var_os("OUTBOXD_STACK_DIR").map(|d| Path::new(&d).join("kafka-gc.log"));
            if let Some(pauses) = gc_log.as_deref().and_then(broker_gc::pauses) {
                let spans: Vec<(f64, f64)> = (1..=n as usize)
                    .filter_map(|i| {
                        let start = wall_ms(b.commit[i]?);
                        Some((start, wall_ms(b.arrival[i]?) - b.after_append[i]?))
                    })
                    .collect();
                let (line, mut clear) = broker_gc::summary(&pauses, &spans);
                println!("  the broker's stop-the-world collections meanwhile: {line}");
                println!(
                    "  commit → appended of the changes that waited through none: {}",
                    latency::summary(&mut clear)
                );
            }
        }
        Mode::Backlog => {
            let secs = (last_arrival - relay_start).as_secs_f64();
            println!("throughput: {:.0} events/s (relay start, Debezium: resume → last event consumed, {secs:.2} s, backlog drain)", n as f64 / secs);
        }
    }
    println!(
        "relay ({:?}) CPU: {cpu:.2} s = {:.2} CPU-s per 100k events, {:.0} events per CPU-second",
        args.system,
        cpu * 100_000.0 / n as f64,
        n as f64 / cpu.max(0.001)
    );
    println!("relay peak RSS: {:.1} MiB", rss_kib as f64 / 1024.0);
    Ok(())
}

/// Debezium's connector on the bench table, its JSON converter without schemas.
fn debezium(dir: &Path, brokers: &str, port: &str, db: &str) -> anyhow::Result<Relay> {
    let properties = relay::debezium_properties(
        port,
        db,
        &[
            "transforms=",
            "table.include.list=public.bench_cdc",
            "tombstones.on.delete=true",
        ],
    );
    Relay::debezium(dir, brokers, &properties)
}

/// The change number an event carries: `after.seq`, or for a delete the number recorded for
/// its key. Tombstones carry none. Only the three fields read are parsed (serde skips the
/// rest), so the consumer's own cost stays small beside the systems measured.
fn change_number(payload: &[u8], book: &Book) -> Option<usize> {
    #[derive(serde::Deserialize)]
    struct Row {
        id: Option<i64>,
        seq: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Change<'a> {
        op: &'a str,
        before: Option<Row>,
        after: Option<Row>,
    }
    let v: Change<'_> = serde_json::from_slice(payload).ok()?;
    match v.op {
        "d" => book.deletes.get(&v.before?.id?).copied(),
        _ => v.after?.seq.map(|s| s as usize),
    }
}

fn spawn_consumer(
    brokers: String,
    topic: String,
    book: Arc<Mutex<Book>>,
    n: u64,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "outboxd-bench-cdc")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    Ok(std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            if let Ok(md) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
                if let Some(t) = md
                    .topics()
                    .first()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                {
                    let mut tpl = TopicPartitionList::new();
                    for p in t.partitions() {
                        let _ = tpl.add_partition_offset(&topic, p.id(), Offset::Beginning);
                    }
                    if consumer.assign(&tpl).is_ok() {
                        break;
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
                if book.lock().map(|b| b.arrived > n).unwrap_or(true) {
                    return;
                }
                continue;
            };
            let now = Instant::now();
            let wall_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0);
            let Some(payload) = m.payload() else { continue };
            let Ok(mut b) = book.lock() else { return };
            if let Some(i) = change_number(payload, &b) {
                if b.arrival.get(i) == Some(&None) {
                    b.arrival[i] = Some(now);
                    b.arrived += 1;
                    b.value_bytes += payload.len() as u64;
                    if let Timestamp::LogAppendTime(appended) = m.timestamp() {
                        b.after_append[i] = Some((wall_ms - appended as f64).max(0.0));
                    }
                }
            }
            if b.arrived > n {
                return;
            }
        }
    }))
}

async fn wait_until(
    book: &Arc<Mutex<Book>>,
    timeout: Duration,
    done: impl Fn(&Book) -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if done(&*book.lock().map_err(|_| anyhow::anyhow!("poisoned"))?) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let got = book.lock().map(|b| b.arrived).unwrap_or(0);
            bail!("only {got} changes arrived within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
