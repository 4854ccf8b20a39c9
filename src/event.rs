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
    /// A table change event (`crate::cdc`), not an outbox row: its key is the table's, and
    /// a truncate (or a keyless table's change) has none, whatever `require_key` says.
    pub change: bool,
}

/// `2026-11-22T19:50:00.158Z` from milliseconds since the epoch (UTC).
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = crate::calendar::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}
