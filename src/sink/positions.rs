//! The position topic (exactly-once delivery): the source position a Kafka transaction
//! reached is written *inside* that transaction, as one record keyed by the pipeline's
//! identity (its `transactional.id`) to a compacted topic, `outboxd.positions` by default.
//! So the events and the position become visible together or not at all.
//!
//! The PostgreSQL side (the slot's confirmed position, the polling cursor) is confirmed only
//! after the Kafka commit; a crash between the two leaves it behind. On start the relay reads
//! the last committed position back with `isolation.level=read_committed` and skips every
//! source transaction at or below it — they are already in Kafka, once.
//!
//! ## A position is only as good as the history it was written in
//!
//! The pipeline's key is the same for a restored copy of the database and for a promoted
//! standby (the system identifier does not change), but their WAL forks from the old one: a
//! position P written before the fork names a place in a history that is no longer this one,
//! and skipping every transaction below it would skip events the new history committed there
//! — never published, and the slot confirmed past them (review A4). So each position carries a
//! **witness** of the history it was written in: logical mode, the xid and end LSN of the last
//! source transaction with events the Kafka transaction held; polling, the event id of the row
//! at the cursor. On resume the relay skips only up to the witness, confirms nothing until the
//! stream shows the witness where it should be (`relay::logical`), and stops with exit code 2
//! if the history passes that point without it (polling: if the row at the cursor is not that
//! event). A position written by an older outboxd has no witness and is used as before, with a
//! warning.
//!
//! Reading back: the topic is compacted but compaction lags, so the partitions are read
//! from the end backwards in growing windows until the pipeline's key is found. An open
//! transaction of another pipeline below our last record holds the last stable offset back;
//! the read waits for it (bounded by `transaction.timeout.ms`) rather than return a stale
//! position, which would publish a committed transaction twice.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::KafkaConfig;
use crate::error::{Error, Result};
use crate::route::Record;
use crate::sink::kafka::{security_properties, KafkaSink, LogContext};

/// Where a pipeline's last Kafka transaction ended in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// Logical mode: the end LSN of the last source transaction (or keepalive position)
    /// whose events the Kafka transaction holds.
    Lsn(u64),
    /// Polling mode: the cursor (transaction id, sequence) of the last row published.
    Cursor { xid: u64, seq: i64 },
}

/// What proves a position belongs to this database's history (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Witness {
    /// Logical mode: the last source transaction with events in the Kafka transaction.
    Txn { xid: u32, end_lsn: u64 },
    /// Polling mode: the event at the cursor.
    Row { event_id: String },
}

/// A pipeline's last committed position, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub position: Position,
    /// `None` for a position written by an older outboxd.
    pub witness: Option<Witness>,
}

/// The record value: the position, its witness, and for people reading the topic, the LSN as
/// PostgreSQL prints it and the pipeline.
#[derive(Serialize, Deserialize)]
struct Value {
    pipeline: String,
    position: Position,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lsn_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    witness: Option<Witness>,
}

pub fn encode(pipeline: &str, position: Position, witness: Option<Witness>) -> Vec<u8> {
    let lsn_text = match position {
        Position::Lsn(l) => Some(crate::lsn::format_lsn(l)),
        Position::Cursor { .. } => None,
    };
    let value = Value {
        pipeline: pipeline.to_string(),
        position,
        lsn_text,
        witness,
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Option<Committed> {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .map(|v| Committed {
            position: v.position,
            witness: v.witness,
        })
}

/// Writes `pipeline`'s position into the open transaction and waits for the
/// acknowledgement (measured: a commit that must also flush the position record, and register
/// its partition, took ~150 ms longer). The topic has one partition and is compacted: the
/// newest record per pipeline is all that matters.
pub async fn write(
    sink: &mut KafkaSink,
    topic: &str,
    pipeline: &str,
    position: Position,
    witness: Option<Witness>,
) -> Result<()> {
    sink.ensure_topic_with(topic, 1, &[("cleanup.policy", "compact")])
        .await;
    let record = Record {
        exchange: None,
        detail_type: None,
        binary: false,
        topic: topic.to_string(),
        key: Some(pipeline.to_string()),
        value: Some(encode(pipeline, position, witness)),
        headers: Vec::new(),
        partition: None,
        timestamp_ms: None,
    };
    sink.send_and_wait(&record, "writing the position").await
}

/// Reads the last committed position of `pipeline` from `cfg.position_topic`; `None` when
/// the topic or the key does not exist (a first start, or a reset).
pub async fn read_last(
    cfg: &KafkaConfig,
    pipeline: &str,
    timeout: Duration,
) -> Result<Option<Committed>> {
    let cfg = cfg.clone();
    let pipeline = pipeline.to_string();
    tokio::task::spawn_blocking(move || read_last_blocking(&cfg, &pipeline, timeout))
        .await
        .map_err(|e| Error::Kafka(format!("position read task failed: {e}")))?
}

fn read_last_blocking(
    cfg: &KafkaConfig,
    pipeline: &str,
    timeout: Duration,
) -> Result<Option<Committed>> {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "outboxd-positions")
        .set("group.id", "outboxd-positions-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true");
    for (k, v) in security_properties(cfg) {
        c.set(k, v);
    }
    let consumer: BaseConsumer<LogContext> =
        c.create_with_context(LogContext::default()).map_err(|e| {
            Error::setup(
                format!(
                    "kafka consumer configuration: {}",
                    crate::sink::kafka::client_config_error(&e)
                ),
                "correct kafka.properties",
            )
        })?;
    let topic = cfg.position_topic.as_str();
    let kerr = |what: &str, e: KafkaError| Error::Kafka(format!("reading {topic}: {what}: {e}"));
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kerr("metadata", e))?;
    let Some(t) = md.topics().first() else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        // The topic does not exist (yet): nothing was ever committed.
        return Ok(None);
    }
    let partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    let deadline = Instant::now() + timeout;
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| kerr("watermarks", e))?;
        let mut window = 1_000i64;
        let mut end = high;
        while end > low {
            let start = (end - window).max(low);
            if let Some(last) = scan(&consumer, topic, p, start, high, pipeline, deadline)? {
                return Ok(last);
            }
            end = start;
            window = window.saturating_mul(8);
        }
    }
    Ok(None)
}

/// The last record of `pipeline` in offsets `start..high` of one partition: `Some(None)` when
/// it is a tombstone (the position was reset), `None` when the key is not there.
fn scan(
    consumer: &BaseConsumer<LogContext>,
    topic: &str,
    partition: i32,
    start: i64,
    high: i64,
    pipeline: &str,
    deadline: Instant,
) -> Result<Option<Option<Committed>>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| Error::Kafka(format!("reading {topic}: {e}")))?;
    consumer
        .assign(&tpl)
        .map_err(|e| Error::Kafka(format!("reading {topic}: {e}")))?;
    let mut found = None;
    loop {
        if Instant::now() >= deadline {
            return Err(Error::Kafka(format!(
                "reading the last position from {topic} partition {partition} timed out; an open transaction may hold its last stable offset back"
            )));
        }
        let polled = consumer.poll(Duration::from_millis(200));
        let at_end = matches!(polled, None | Some(Err(KafkaError::PartitionEOF(_))));
        match polled {
            None | Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Ok(m)) => {
                if m.offset() >= high {
                    break;
                }
                if m.key() == Some(pipeline.as_bytes()) {
                    match m.payload().map(decode) {
                        Some(Some(pos)) => found = Some(Some(pos)),
                        // A tombstone: the position was reset (README: resetting the position).
                        // What comes after it, if anything, is the position now; nothing
                        // before it counts (the scan does not look further back).
                        None => found = Some(None),
                        Some(None) => {
                            return Err(Error::setup(
                                format!("the record for pipeline {pipeline} at offset {} of {topic} is not a position outboxd wrote", m.offset()),
                                "delete the pipeline's key from the position topic (README: resetting the position) or point kafka.position_topic elsewhere",
                            ))
                        }
                    }
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "position topic read"),
        }
        if at_end {
            // Nothing more to read now: read_committed stops at the last stable offset.
            // Below the high watermark, another transaction is still open: wait for it.
            let position = consumer
                .position()
                .ok()
                .and_then(|tpl| {
                    tpl.find_partition(topic, partition)
                        .and_then(|e| e.offset().to_raw())
                })
                .unwrap_or(start);
            if position >= high {
                break;
            }
        }
    }
    Ok(found)
}
