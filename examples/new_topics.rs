//! Soak probe for the first records to new topics: round after round, a fresh sink (the
//! relay's own producer and admin client, `outboxd::sink::kafka::KafkaSink`) creates
//! `--topics` new topics and sends interleaved records to them at once, as a relay does when
//! it starts on a backlog; every delivery report is awaited (bounded) and every id is read
//! back. Prints a line per anomaly (a report slower than `--slow-secs`, a failed report, an id
//! reported delivered that is not in its topic) and a summary.
//!
//!   cargo run --release --example new_topics -- --brokers 127.0.0.1:9092 --rounds 50

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures_util::future::join_all;
use outboxd::config::Config;
use outboxd::route::Record;
use outboxd::sink::kafka::KafkaSink;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    brokers: String,
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    #[arg(long, default_value_t = 12)]
    topics: u32,
    /// Records per topic (the first is the topic's first record).
    #[arg(long, default_value_t = 4)]
    per_topic: u32,
    #[arg(long, default_value_t = 10)]
    slow_secs: u64,
    /// Extra `[kafka]` TOML lines.
    #[arg(long, default_value = "")]
    extra: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let toml = format!(
        "[postgres]\nurl = \"postgres://x@127.0.0.1/x\"\n[kafka]\nbrokers = \"{}\"\n{}\n",
        args.brokers, args.extra
    );
    let cfg = Config::from_toml_str(&toml, |_| None).context("config")?;
    let run = std::process::id();
    let (mut slow, mut failed, mut missing, mut total) = (0u32, 0u32, 0u32, 0u32);
    for round in 0..args.rounds {
        let mut sink = KafkaSink::new(&cfg.kafka, None)?;
        sink.check_reachable(Duration::from_secs(10)).await?;
        let topics: Vec<String> = (0..args.topics)
            .map(|t| format!("probe_{run}_{round}_{t}"))
            .collect();
        let mut pending = Vec::new();
        let mut ids = HashSet::new();
        for n in 0..args.per_topic {
            for (t, topic) in topics.iter().enumerate() {
                let id = format!("{round}-{t}-{n}");
                sink.ensure_topic(topic).await;
                let record = Record {
                    topic: topic.clone(),
                    exchange: None,
                    detail_type: None,
                    binary: false,
                    key: Some(format!("k{}", n % 3)),
                    value: Some(format!("{{\"n\":{n}}}").into_bytes()),
                    headers: vec![("id".into(), id.clone().into_bytes())],
                    partition: None,
                    timestamp_ms: None,
                };
                let sent = Instant::now();
                match sink.send(&record) {
                    Ok(d) => pending.push((id.clone(), sent, d)),
                    Err(e) => println!("round {round}: {id} refused at send: {e:?}"),
                }
                ids.insert(id);
            }
        }
        total += ids.len() as u32;
        let limit = Duration::from_secs(args.slow_secs * 6);
        let reports = join_all(pending.into_iter().map(|(id, sent, d)| async move {
            let r = tokio::time::timeout(limit, d).await;
            (id, sent.elapsed(), r)
        }))
        .await;
        for (id, took, r) in reports {
            match r {
                Ok(Ok(_)) if took > Duration::from_secs(args.slow_secs) => {
                    slow += 1;
                    println!("round {round}: {id} delivered after {took:?}");
                }
                Ok(Ok(_)) => {}
                Ok(Err(f)) => {
                    failed += 1;
                    println!(
                        "round {round}: {id} failed after {took:?}: {}",
                        f.refusal.detail
                    );
                }
                Err(_) => {
                    slow += 1;
                    println!("round {round}: {id} no report after {took:?}");
                }
            }
        }
        let seen = read_back(&args.brokers, &topics, &ids)?;
        for id in ids.difference(&seen) {
            missing += 1;
            println!("round {round}: {id} not in its topic");
        }
        drop(sink);
    }
    println!(
        "new_topics: {total} records in {} rounds: {slow} slow, {failed} failed, {missing} missing",
        args.rounds
    );
    Ok(())
}

fn read_back(
    brokers: &str,
    topics: &[String],
    ids: &HashSet<String>,
) -> anyhow::Result<HashSet<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outboxd-probe")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&tpl)?;
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !ids.is_subset(&seen) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            if let Some(h) = m.headers() {
                for h in h.iter() {
                    if h.key == "id" {
                        if let Some(v) = h.value {
                            seen.insert(String::from_utf8_lossy(v).into_owned());
                        }
                    }
                }
            }
        }
    }
    Ok(seen)
}
