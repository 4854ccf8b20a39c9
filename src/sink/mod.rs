//! Destinations. The relay drives a [`Sink`]: hand it a routed [`Record`], get a delivery
//! future that resolves once the broker has the record (or with the refusal, classified by
//! the sink that saw it), create destinations, dead-letter. Eight implementations:
//! [`kafka::KafkaSink`] (its error codes are classified in [`classify`]),
//! [`rabbitmq::RabbitSink`] (publisher confirms, mandatory) and [`nats::NatsSink`]
//! (JetStream, `Nats-Msg-Id`), [`sqs::SqsSink`], [`sns::SnsSink`],
//! [`eventbridge::EventBridgeSink`] (signed by [`aws`]) and [`pubsub::PubSubSink`] (over
//! [`gcp`]) — batches through [`lanes`], one [`batch::BatchSink`] —, and
//! [`servicebus::ServiceBusSink`] (AMQP 1.0); [`broker::Broker`] is the one the relay holds, chosen by
//! `[sink] kind`. What only Kafka does — transactions, the position topic — stays on
//! `KafkaSink` itself.

pub mod aws;
pub mod batch;
pub mod broker;
pub mod classify;
pub mod concurrency;
pub mod eventbridge;
pub mod gcp;
pub mod http;
pub mod kafka;
pub mod lanes;
pub mod nats;
pub mod positions;
pub mod pubsub;
pub mod rabbitmq;
pub mod servicebus;
pub mod sns;
pub mod sqs;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::poison::PoisonKind;
use crate::route::Record;

/// What a refusal says about the record that was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Certainly about this record: dead-letter it (once it failed alone; `crate::window`).
    Record(PoisonKind),
    /// Refused because another record of its batch was (KIP-467 `_INVALID_DIFFERENT_RECORD`):
    /// this one is fine; its batchmates are sent alone to find the culprit.
    Batchmate,
    /// About the broker or the connection: retry, never dead-letter.
    Cluster,
    /// Either: retry; dead-letter after `kafka.max_record_retries` identical failures — counted
    /// only in sessions where other records got through (else the cluster may refuse all).
    Unclear,
    /// The broker answered that the record's destination does not exist (an SQS queue, an
    /// SNS topic, an event bus): retried like [`Class::Unclear`] — an operator may create it —
    /// but every repeat counts, since the answer itself shows the broker is up. Without this, a
    /// missing destination at the head of a session (nothing sent before it, nothing acked)
    /// would be retried forever and hold every event behind it.
    Absent,
}

/// A refusal, classified by the sink that saw it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub class: Class,
    /// The broker's or client library's code (metrics, repeat counting); empty if none.
    pub code: String,
    pub detail: String,
    /// The broker judged this record by itself (not a batch it travelled in): a
    /// [`Class::Record`] refusal is believed at once.
    pub alone: bool,
}

/// Where an acknowledged record landed, as far as the broker says (Kafka: partition and
/// offset; the other sinks: nothing yet). For the event's trace span.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Landed {
    pub partition: Option<i32>,
    pub offset: Option<i64>,
}

/// A delivery future of a sink whose client hands out its own (RabbitMQ, NATS).
pub type BoxDelivery = Pin<Box<dyn Future<Output = Result<Landed, Failed>> + Send>>;

/// A delivery that did not succeed: the refusal and, where the sink still has it, the
/// record as it was sent (for the dead-letter destination).
#[derive(Debug)]
pub struct Failed {
    pub refusal: Refusal,
    pub record: Option<Box<Record>>,
}

/// Why a record could not be handed to the sink.
#[derive(Debug)]
pub enum SendError {
    /// The client's local queue is full: wait for some deliveries, then try again.
    QueueFull,
    /// Refused before it left the process (a local check of this one record).
    Refused(Refusal),
}

/// What a sink can promise; the relay states it at start, and what it cannot promise is
/// what the README says consumers must handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promises {
    /// One key's records keep their sending order through retries.
    pub per_key_order: bool,
    /// The broker drops a resent record by its id (across reconnects and restarts).
    pub broker_dedup: bool,
    /// Records and a position can be made visible atomically.
    pub transactions: bool,
}

impl std::fmt::Display for Promises {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "per-key order: {}, broker-side dedup: {}, transactions: {}",
            yes_no(self.per_key_order),
            yes_no(self.broker_dedup),
            yes_no(self.transactions)
        )
    }
}

/// A suffix unique to one `outboxd replay` (`:replay-<ms since the epoch>`), appended to the
/// ids a broker deduplicates by, so a republished event is not dropped as a repeat of its
/// first copy (the `id` header stays the event id).
pub fn replay_suffix() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(":replay-{ms}")
}

/// The record as it goes to a dead-letter destination: its headers plus
/// `outboxd.dlq.reason`, `outboxd.dlq.topic` (where it was headed) and `outboxd.dlq.error`
/// (`detail` on one line).
pub fn dead_letter_record(record: &Record, kind: PoisonKind, detail: &str) -> Record {
    let mut dlq = record.clone();
    let one_line = detail.replace(['\r', '\n'], " ");
    dlq.headers.extend([
        (
            "outboxd.dlq.reason".to_string(),
            kind.label().as_bytes().to_vec(),
        ),
        (
            "outboxd.dlq.topic".to_string(),
            record.topic.clone().into_bytes(),
        ),
        ("outboxd.dlq.error".to_string(), one_line.into_bytes()),
    ]);
    dlq
}

/// A destination the relay publishes to.
pub trait Sink {
    /// What this sink promises (see [`Promises`]).
    fn promises(&self) -> Promises;

    /// Waits up to `timeout` for what the client still holds to be delivered (a stop).
    fn flush(&self, timeout: Duration);

    /// Resolves when the broker acknowledged the record, or with why not.
    type Delivery: Future<Output = Result<Landed, Failed>> + Unpin;

    /// Hands `record` to the client (waiting only for the client's own buffer); many
    /// deliveries may be outstanding, and they resolve in sending order per key.
    fn send(&mut self, record: &Record) -> impl Future<Output = Result<Self::Delivery, SendError>>;

    /// Creates the record's destination (topic, exchange) if it is new to the relay and
    /// creation is enabled. A failure that waiting can mend is logged (delivery then fails if
    /// the destination really is missing); one only an operator can mend — RabbitMQ refusing
    /// the declaration for good — is an error (exit 2 with the fix).
    fn ensure_topic(&mut self, record: &Record) -> impl Future<Output = crate::error::Result<()>>;

    /// Sends a poison record to the dead-letter destination with its reason, and waits.
    fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> impl Future<Output = Result<(), String>>;

    /// After this long unacknowledged (or not taken by the client), a delivery ends the
    /// session.
    fn delivery_timeout(&self) -> Duration;
}
