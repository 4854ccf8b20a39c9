//! The event a source yields and a sink publishes.

use std::time::SystemTime;

/// One outbox event, decoded from a row of the outbox table.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The dedup id; travels as Kafka header `id`.
    pub id: String,
    /// Routes the topic.
    pub aggregatetype: String,
    /// The Kafka key; `None` when the column is NULL.
    pub aggregateid: Option<String>,
    /// Travels as Kafka header `type`.
    pub event_type: String,
    /// The record value exactly as PostgreSQL prints it (JSON text for `jsonb`); `None` is a
    /// NULL payload (a tombstone).
    pub payload: Option<Vec<u8>>,
    /// The `headers` column as JSON text, if not NULL.
    pub headers: Option<String>,
    /// Commit time of the transaction that wrote the event.
    pub commit_time: SystemTime,
    /// Mapping extras (all optional; see `postgres.columns`).
    pub extra: EventExtra,
}

/// What an outbox table of another shape may add.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventExtra {
    /// Kafka record timestamp (ms since the epoch) from the timestamp column.
    pub timestamp_ms: Option<i64>,
    /// Per-row topic overriding the template.
    pub topic: Option<String>,
    /// Explicit partition.
    pub partition: Option<i32>,
    /// Extra columns to copy as headers.
    pub headers: Vec<(String, String)>,
    /// The payload column is `bytea`: passed through byte for byte.
    pub binary_payload: bool,
}
