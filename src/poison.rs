//! Why an event can never be published as it is. A leaf module: routing, the sinks'
//! error classification, the window and errors all speak of poison.

/// Why an event can never become a Kafka record as it is. Poison events are dead-lettered,
/// never retried forever and never dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonKind {
    /// Larger than `kafka.max_message_bytes`, or rejected by the broker as too large.
    TooLarge,
    /// An explicit partition the topic does not have.
    UnknownPartition,
    /// A record timestamp the topic refuses (`message.timestamp.before/after.max.ms`).
    InvalidTimestamp,
    /// The same record failed the same way `kafka.max_record_retries` times in a row.
    RetriesExhausted,
    /// The topic name is not a legal Kafka topic name.
    InvalidTopic,
    /// `aggregateid` is NULL while `kafka.require_key` is on.
    MissingKey,
    /// `headers` is not a JSON object of strings.
    InvalidHeaders,
    /// A table-less event whose message is not the outbox JSON.
    MalformedMessage,
    /// A payload the broker cannot carry as it is: EventBridge's `Detail` must be a JSON
    /// object.
    InvalidPayload,
    /// The payload does not match its type's schema (`crate::contract`).
    SchemaInvalid,
    /// Its type has no schema and `schemas.require_schema` is on.
    SchemaMissing,
    /// RabbitMQ returned it: no queue is bound to its exchange and routing key.
    Unroutable,
    /// Another permanent rejection by the broker.
    Rejected,
}

impl PoisonKind {
    /// The `reason` label of `outboxd_events_dead_lettered_total` and the DLQ header.
    pub fn label(self) -> &'static str {
        match self {
            PoisonKind::TooLarge => "too_large",
            PoisonKind::UnknownPartition => "unknown_partition",
            PoisonKind::InvalidTimestamp => "invalid_timestamp",
            PoisonKind::RetriesExhausted => "retries_exhausted",
            PoisonKind::InvalidTopic => "invalid_topic",
            PoisonKind::MissingKey => "missing_key",
            PoisonKind::InvalidHeaders => "invalid_headers",
            PoisonKind::MalformedMessage => "malformed_message",
            PoisonKind::InvalidPayload => "invalid_payload",
            PoisonKind::SchemaInvalid => "schema_invalid",
            PoisonKind::SchemaMissing => "schema_missing",
            PoisonKind::Unroutable => "unroutable",
            PoisonKind::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Poison {
    pub kind: PoisonKind,
    pub detail: String,
}
