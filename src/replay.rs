//! `outboxd replay` and `outboxd verify`, over the events still retained in the outbox table.
//!
//! * replay republishes retained events with their original ids (consumers dedupe), e.g. to
//!   rebuild a downstream service.
//! * verify reads the target topics back and lists every retained event whose id is not in
//!   Kafka — a proof that nothing was lost, or the exact list of what was. NATS: the stream
//!   is read back the same way (by subject). RabbitMQ cannot be read back (a queue hands a
//!   message to one consumer and removes it): verify says so and exits 2.
//!
//! Both select rows by the timestamp column (`postgres.columns.timestamp`, default
//! `created_at`). Table-less events (`outbox_emit`) leave no row and are not covered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::{quote_ident, Config, SinkKind};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::route::Router;
use crate::sink::broker::{Broker, BrokerDelivery};
use crate::sink::SendError;
use crate::sink::Sink;
use crate::source::polling::{event_select, row_event};

/// Which retained events: `since`/`until` are PostgreSQL timestamps (`2026-11-22 10:00`,
/// ISO 8601) or intervals back from now (`2 hours`, `1 day`).
#[derive(Debug, Clone)]
pub struct Selection {
    pub since: String,
    pub until: Option<String>,
    pub aggregatetype: Option<String>,
}

/// Retained events of the selection, in timestamp order.
pub async fn retained(cfg: &Config, sel: &Selection) -> Result<Vec<Event>> {
    if !cfg.postgres.outbox {
        return Err(Error::setup(
            "replay and verify read the outbox table, and postgres.outbox is false (a table-CDC-only pipeline)",
            "run them with the configuration of the pipeline that relays the outbox",
        ));
    }
    let timestamp = &cfg.postgres.columns.timestamp;
    if timestamp.is_empty() {
        return Err(Error::setup(
            "replay and verify select events by time, but postgres.columns.timestamp is empty",
            "map a timestamp column in [postgres.columns]",
        ));
    }
    let client = crate::pg::connect(&cfg.postgres.url, "outboxd-replay").await?;
    client
        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
        .await
        .map_err(|e| Error::pg("setting the session time zone", e))?;
    let since = time_bound(&client, &sel.since).await?;
    let until = match &sel.until {
        Some(u) => time_bound(&client, u).await?,
        None => "infinity".to_string(),
    };
    let select = event_select(&client, cfg).await?;
    let ts = quote_ident(timestamp);
    // Qualified with `o.`: unqualified ORDER BY names would bind to the text-cast outputs.
    let sql = format!(
        "SELECT {} FROM {} o WHERE o.{ts} >= $1::text::timestamptz AND o.{ts} < $2::text::timestamptz \
           AND ($3::text IS NULL OR o.{}::text = $3::text) ORDER BY o.{ts}, o.{}",
        select.list,
        cfg.postgres.qualified_table(),
        quote_ident(&cfg.postgres.columns.aggregatetype),
        quote_ident(&cfg.postgres.columns.id),
    );
    let rows = client
        .query(&sql, &[&since, &until, &sel.aggregatetype])
        .await
        .map_err(|e| Error::pg("reading retained events", e))?;
    Ok(rows
        .iter()
        .map(|r| row_event(r, 0, cfg, select.payload_is_bytea))
        .collect())
}

/// A timestamp (`2026-11-22 10:00:00+00`) or an interval back from now (`2 hours`) as
/// PostgreSQL's timestamptz text; anything else is a setup error naming it.
pub(crate) async fn time_bound(client: &tokio_postgres::Client, text: &str) -> Result<String> {
    let row = match client
        .query_one("SELECT $1::text::timestamptz::text", &[&text])
        .await
    {
        Ok(r) => r,
        Err(_) => client
            .query_one("SELECT (now() - $1::text::interval)::text", &[&text])
            .await
            .map_err(|_| {
                Error::setup(
                    format!("`{text}` is neither a timestamp nor an interval"),
                    "use e.g. `2026-11-22 10:00:00+00` or `2 hours`",
                )
            })?,
    };
    Ok(row.get(0))
}

/// Republishes the selection; returns (published, skipped as poison).
pub async fn replay(cfg: &Config, sel: &Selection) -> Result<(usize, usize)> {
    let events = retained(cfg, sel).await?;
    let router = Router::from_config(cfg)?;
    let (mut sink, _) = Broker::connect(cfg, None).await?;
    sink.replaying();
    let mut pending = VecDeque::with_capacity(events.len());
    let mut published = 0;
    let mut poison = 0;
    for event in &events {
        let mut record = match router.route(event) {
            Ok((record, _)) => record,
            Err(rejected) => {
                let (_, p) = *rejected;
                tracing::warn!(event_id = %event.id, reason = p.kind.label(), "not replayed: {}", p.detail);
                poison += 1;
                continue;
            }
        };
        // Replayed in the wire format the relay writes (`schemas.encoding`).
        if let Some(serializer) = &router.serializer {
            let written = serializer
                .serialize(&mut record, &event.aggregatetype, &event.event_type)
                .await?;
            if let Err(p) = written {
                tracing::warn!(event_id = %event.id, reason = p.kind.label(), "not replayed: {}", p.detail);
                poison += 1;
                continue;
            }
        }
        sink.ensure_topic(&record).await?;
        loop {
            match sink.send(&record).await {
                Ok(f) => {
                    pending.push_back((event.id.clone(), f));
                    break;
                }
                // The client holds too many: wait for the oldest acknowledgement.
                Err(SendError::QueueFull) => match pending.pop_front() {
                    Some((id, f)) => {
                        acknowledged(&id, f).await?;
                        published += 1;
                    }
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                Err(SendError::Refused(r)) => {
                    return Err(Error::Publish(format!("event {}: {}", event.id, r.detail)))
                }
            }
        }
    }
    for (id, f) in pending {
        acknowledged(&id, f).await?;
        published += 1;
    }
    Ok((published, poison))
}

async fn acknowledged(id: &str, delivery: BrokerDelivery) -> Result<()> {
    delivery
        .await
        .map(|_| ())
        .map_err(|failed| Error::Publish(format!("event {id}: {}", failed.refusal.detail)))
}

/// The outcome of `outboxd verify`.
#[derive(Debug, serde::Serialize)]
pub struct Verification {
    pub checked: usize,
    pub topics: Vec<String>,
    /// Retained event ids absent from their topic.
    pub missing: Vec<String>,
}

/// Reads every target topic of the selection up to its current end and lists the retained
/// events whose id never appeared there.
pub async fn verify(cfg: &Config, sel: &Selection) -> Result<Verification> {
    let events = retained(cfg, sel).await?;
    let router = Router::from_config(cfg)?;
    let mut by_topic: HashMap<String, Vec<String>> = HashMap::new();
    for event in &events {
        // Poison events are expected in the dead-letter topic, under their own id.
        let topic = match (router.route(event), cfg.sink) {
            (Ok((record, _)), _) => record.topic,
            (Err(_), SinkKind::Nats) => cfg.nats.dead_letter_subject.clone(),
            (Err(_), SinkKind::Sqs) => cfg.sqs.dead_letter_queue.clone(),
            (Err(_), SinkKind::Sns) => cfg.sns.dead_letter_topic_arn.clone(),
            (Err(_), SinkKind::EventBridge) => cfg.eventbridge.dead_letter_event_bus.clone(),
            (Err(_), SinkKind::PubSub) => cfg.pubsub.dead_letter_topic.clone(),
            (Err(_), SinkKind::ServiceBus) => cfg.servicebus.dead_letter_queue.clone(),
            (Err(_), _) => cfg.kafka.dlq_topic.clone(),
        };
        by_topic.entry(topic).or_default().push(event.id.clone());
    }
    let mut topics: Vec<String> = by_topic.keys().cloned().collect();
    topics.sort();
    let seen = match cfg.sink {
        SinkKind::Kafka => {
            let kafka = cfg.kafka.clone();
            let wanted = topics.clone();
            tokio::task::spawn_blocking(move || read_ids(&kafka, &wanted))
                .await
                .map_err(|e| Error::Kafka(format!("verify task failed: {e}")))??
        }
        SinkKind::Nats => crate::sink::nats::read_back(&cfg.nats).await?,
        SinkKind::RabbitMq => {
            return Err(Error::setup(
                "verify cannot read RabbitMQ back: a queue hands each message to one consumer and removes it",
                "check deliveries at your consumers (message_id = event id), or replay what they miss",
            ))
        }
        SinkKind::Sns => {
            return Err(Error::setup(
                "verify cannot read SNS back: a topic keeps nothing, it hands each message to its subscriptions",
                "check deliveries at the subscriptions (the `id` message attribute), or replay what they miss",
            ))
        }
        SinkKind::ServiceBus => {
            return Err(Error::setup(
                "verify cannot read Service Bus back: receiving takes a queue's messages from its consumers (peeking reads only what they have not yet taken)",
                "check deliveries at your consumers (MessageId = event id), or replay what they miss",
            ))
        }
        SinkKind::PubSub => {
            return Err(Error::setup(
                "verify cannot read Pub/Sub back: a topic keeps nothing for a subscription created after the fact (unless the topic retains messages), and reading the relay's consumers' subscriptions would take their messages",
                "check deliveries at the subscriptions (the `id` attribute), or replay what they miss",
            ))
        }
        SinkKind::EventBridge => {
            return Err(Error::setup(
                "verify cannot read EventBridge back: a bus keeps nothing, it hands each event to the targets of its rules (an archive replays events, it cannot be read)",
                "check deliveries at the targets (`detail.outboxd.id`), or replay what they miss",
            ))
        }
        SinkKind::Sqs => {
            return Err(Error::setup(
                "verify cannot read SQS back: receiving a message hides it from the queue's consumers, and only deleting removes it",
                "check deliveries at your consumers (the `id` message attribute), or replay what they miss",
            ))
        }
    };
    let mut missing = Vec::new();
    for (topic, ids) in &by_topic {
        let present = seen.get(topic);
        for id in ids {
            if !present.is_some_and(|p| p.contains(id)) {
                missing.push(id.clone());
            }
        }
    }
    missing.sort();
    Ok(Verification {
        checked: events.len(),
        topics,
        missing,
    })
}

/// All `id` headers in `topics`, read from the beginning to the high watermark.
fn read_ids(
    cfg: &crate::config::KafkaConfig,
    topics: &[String],
) -> Result<HashMap<String, HashSet<String>>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for topic in topics {
        out.entry(topic.clone()).or_default();
    }
    read_topics(cfg, topics, |m| {
        if let Some(id) = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "id"))
            .and_then(|h| h.value)
        {
            out.entry(m.topic().to_string())
                .or_default()
                .insert(String::from_utf8_lossy(id).into_owned());
        }
    })?;
    Ok(out)
}

/// Every record of `topics` from the beginning to the high watermark, in offset order per
/// partition (blocking: run it on a blocking thread).
pub(crate) fn read_topics(
    cfg: &crate::config::KafkaConfig,
    topics: &[String],
    mut record: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<()> {
    let mut cc = rdkafka::ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", "outboxd-verify")
        .set("enable.auto.commit", "false");
    for (k, v) in &cfg.properties {
        if k.starts_with("security.") || k.starts_with("ssl.") || k.starts_with("sasl.") {
            cc.set(k, v);
        }
    }
    let consumer: BaseConsumer = cc.create().map_err(|e| {
        Error::Kafka(format!(
            "creating the verify consumer: {}",
            crate::sink::kafka::client_config_error(&e)
        ))
    })?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| Error::Kafka(format!("metadata of {topic}: {e}")))?;
        for t in md.topics() {
            if t.error().is_some() {
                continue; // a topic that does not exist holds none of the ids
            }
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p.id(), timeout)
                    .map_err(|e| Error::Kafka(format!("watermarks of {topic}/{}: {e}", p.id())))?;
                if high > low {
                    tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))
                        .map_err(|e| Error::Kafka(e.to_string()))?;
                    remaining.insert((topic.clone(), p.id()), high);
                }
            }
        }
    }
    if remaining.is_empty() {
        return Ok(());
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::Kafka(format!("assigning partitions: {e}")))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    // Read until every partition reached its high watermark, then until the topics have been
    // quiet for two seconds: some brokers report a watermark inside the last record batch.
    let mut last_message = std::time::Instant::now();
    while !remaining.is_empty() || last_message.elapsed() < Duration::from_secs(2) {
        if std::time::Instant::now() > deadline {
            return Err(Error::Kafka(
                "reading the topics back took longer than 5 minutes".into(),
            ));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        last_message = std::time::Instant::now();
        let m = msg.map_err(|e| Error::Kafka(format!("reading back: {e}")))?;
        let key = (m.topic().to_string(), m.partition());
        record(&m);
        if remaining
            .get(&key)
            .is_some_and(|high| m.offset() + 1 >= *high)
        {
            // Reached the end seen at the start; records acknowledged just before may not
            // have been counted by the broker yet, so look once more.
            let (_, now_high) = consumer
                .fetch_watermarks(&key.0, key.1, timeout)
                .map_err(|e| Error::Kafka(format!("watermarks of {}/{}: {e}", key.0, key.1)))?;
            if m.offset() + 1 >= now_high {
                remaining.remove(&key);
            } else {
                remaining.insert(key, now_high);
            }
        }
    }
    Ok(())
}
