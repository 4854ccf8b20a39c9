//! Snapshot benchmark: a table of `--rows` rows (the 10 columns of `bench_cdc`), snapshotted
//! by a real `outboxd run` or by Debezium's PostgreSQL connector on Kafka Connect — its
//! initial snapshot (`snapshot.mode=initial`) or an incremental one (a signal, after
//! streaming started). Run it with `scripts/bench.sh --snapshot [--compare debezium]`.
//!
//! Rows/s over the span the rows were processed in: from the first snapshot row's `ts_ms`
//! (the envelope's processing time, which both write) to the last — so neither a JVM's start
//! nor the reading back counts. CPU: the relay process's user + system time from when it
//! was handed the snapshot (incremental: the signal; initial: its start — for Debezium that
//! includes the JVM's start, which the incremental run shows alone as `cpu_at_signal_s`) to
//! the last row read back; per 100k rows. Peak RSS.

#[path = "support/fresh.rs"]
mod fresh;
#[path = "support/proc.rs"]
mod proc_stats;
#[path = "support/relay.rs"]
mod relay;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use relay::Relay;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum System {
    Outboxd,
    Debezium,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Kind {
    /// The snapshot at first start.
    Initial,
    /// A snapshot asked for while streaming.
    Incremental,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum, default_value_t = System::Outboxd)]
    system: System,
    #[arg(long, value_enum, default_value_t = Kind::Initial)]
    kind: Kind,
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    #[arg(long, default_value = "target/release/outboxd")]
    relay: PathBuf,
    /// Extra TOML appended to the relay's config (e.g. "[kafka]\nmax_in_flight_bytes = 8388608").
    #[arg(long, default_value = "")]
    extra_config: String,
}

const TABLE: &str =
    "CREATE TABLE bench_snap (id bigint PRIMARY KEY, seq bigint NOT NULL, c1 int, c2 bigint, \
     c3 text, c4 text, c5 numeric(12,2), c6 timestamptz, c7 boolean, c8 jsonb);\
     CREATE TABLE debezium_signal (id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, data varchar(2048) NULL)";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let brokers = std::env::var("OUTBOXD_TEST_KAFKA").context("use scripts/bench.sh")?;
    let fresh = fresh::database("bench_snap").await?;
    let client = fresh.connect().await?;
    let fresh::Fresh { db, url, port, dir } = fresh;
    client.batch_execute(TABLE).await?;
    client
        .batch_execute(&format!(
            "INSERT INTO bench_snap SELECT g, g, g::int, g * 7, 'text-' || g, md5(g::text), g / 100.0, now(), g % 2 = 0, jsonb_build_object('g', g) FROM generate_series(1, {}) g; ANALYZE bench_snap",
            args.rows
        ))
        .await?;
    let mode = match args.kind {
        Kind::Initial => "initial",
        Kind::Incremental => "never",
    };
    let config = dir.join("outboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{db}\"\noutbox = false\n[kafka]\nbrokers = \"{brokers}\"\n\
             [http]\naddr = \"127.0.0.1:0\"\n\
             [cdc]\ntables = [\"public.bench_snap\"]\ntopic_prefix = \"{db}\"\n\
             [cdc.snapshot]\nmode = \"{mode}\"\nsignal_table = \"public.debezium_signal\"\n{}\n",
            args.extra_config
        ),
    )?;
    let topic = format!("{db}.public.bench_snap");
    println!(
        "outboxd bench (snapshot): system={:?} kind={:?} rows={} columns=10",
        args.system, args.kind, args.rows
    );
    let relay = match args.system {
        System::Outboxd => {
            relay::migrate(&args.relay, &config)?;
            let log = std::fs::File::create(dir.join("relay.log"))?;
            Relay::Outboxd(
                Command::new(&args.relay)
                    .args(["run", "--config"])
                    .arg(&config)
                    .env("OUTBOXD_LOG", "info")
                    .stderr(Stdio::from(log))
                    .stdout(Stdio::null())
                    .spawn()?,
            )
        }
        System::Debezium => {
            let snapshot = match args.kind {
                Kind::Initial => "initial",
                Kind::Incremental => "no_data",
            };
            let mode = format!("snapshot.mode={snapshot}");
            let properties = relay::debezium_properties(
                &port,
                &db,
                &[
                    &mode,
                    "transforms=",
                    "table.include.list=public.bench_snap,public.debezium_signal",
                    "signal.data.collection=public.debezium_signal",
                ],
            );
            Relay::debezium(&dir.join("debezium"), &brokers, &properties)?
        }
    };
    if args.kind == Kind::Incremental {
        // Once streaming: outboxd's slot is active; Debezium's start returns when it streams.
        if args.system == System::Outboxd {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let active: bool = client
                    .query_one(
                        "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots WHERE slot_name = $1",
                        &[&db],
                    )
                    .await?
                    .get(0);
                if active {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the relay did not start streaming");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        client
            .batch_execute(r#"INSERT INTO debezium_signal VALUES ('bench-1', 'execute-snapshot', '{"data-collections": ["public.bench_snap"], "type": "incremental"}')"#)
            .await?;
    }
    let rows = args.rows;
    let pid = relay.pid();
    let cpu_at_signal = proc_stats::cpu_secs(pid).unwrap_or(0.0);
    let reader = std::thread::spawn(move || read_rows(&brokers, &topic, rows, pid));
    let measured = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let rss = proc_stats::peak_rss_kib(pid).unwrap_or(0);
    relay.stop(&dir.join("debezium"));
    let secs = (measured.span_ms as f64 / 1000.0).max(0.001);
    let cpu = match args.kind {
        Kind::Incremental => measured.cpu_end - cpu_at_signal,
        Kind::Initial => measured.cpu_end,
    };
    println!(
        "rows={} seconds={secs:.1} rows_per_s={:.0} cpu_s={cpu:.1} cpu_s_per_100k_rows={:.2} cpu_at_signal_s={cpu_at_signal:.1} peak_rss_mib={:.1}",
        measured.rows,
        measured.rows as f64 / secs,
        cpu / (measured.rows as f64 / 100_000.0),
        rss as f64 / 1024.0
    );
    Ok(())
}

struct Measured {
    rows: u64,
    /// Last row's `ts_ms` − first row's.
    span_ms: i64,
    /// The relay's CPU when the last row was read back.
    cpu_end: f64,
}

/// Reads the topic until `rows` snapshot rows (`"op":"r"`) arrived.
fn read_rows(brokers: &str, topic: &str, rows: u64, pid: u32) -> anyhow::Result<Measured> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outboxd-bench-snapshot")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let start = Instant::now();
    loop {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            if let Some(t) = md
                .topics()
                .first()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            {
                let mut tpl = TopicPartitionList::new();
                for p in t.partitions() {
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                }
                consumer.assign(&tpl)?;
                break;
            }
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("topic {topic} never appeared");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut first, mut last, mut n) = (i64::MAX, i64::MIN, 0u64);
    let deadline = Instant::now() + Duration::from_secs(3600);
    while n < rows {
        if Instant::now() > deadline {
            bail!("only {n} of {rows} rows arrived within an hour");
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        else {
            continue;
        };
        if v["op"] != "r" {
            continue;
        }
        let ts = v["ts_ms"].as_i64().unwrap_or(0);
        first = first.min(ts);
        last = last.max(ts);
        n += 1;
    }
    Ok(Measured {
        rows: n,
        span_ms: last - first,
        cpu_end: proc_stats::cpu_secs(pid).unwrap_or(0.0),
    })
}
