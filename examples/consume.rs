//! Prints records of a topic from the beginning: partition, offset, key, headers, value.
//! Used by the demo (`scripts/demo.sh`). Reads by partition assignment (no consumer group).
//!
//!   cargo run --example consume -- --brokers 127.0.0.1:9092 --topic outbox.event.order --count 3

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Stop after this many records.
    #[arg(long, default_value_t = 10)]
    count: usize,
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", "outboxd-demo-consume")
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the consumer")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(&args.topic), Duration::from_secs(5));
        if let Ok(md) = md {
            if let Some(t) = md.topics().first() {
                if t.error().is_none() && !t.partitions().is_empty() {
                    break t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>();
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "topic {} did not appear within {}s",
                args.topic,
                args.timeout_secs
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(&args.topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut n = 0;
    while n < args.count {
        if Instant::now() > deadline {
            bail!(
                "only {n} of {} records arrived within {}s",
                args.count,
                args.timeout_secs
            );
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = msg?;
        let headers: Vec<String> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|hd| {
                        format!(
                            "{}={}",
                            hd.key,
                            String::from_utf8_lossy(hd.value.unwrap_or_default())
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{}[{}]@{} key={} headers={{{}}} value={}",
            m.topic(),
            m.partition(),
            m.offset(),
            m.key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_else(|| "null".into()),
            headers.join(", "),
            m.payload()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_else(|| "null".into()),
        );
        n += 1;
    }
    Ok(())
}
