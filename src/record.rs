//! The record a sink publishes: what routing makes of an event, and what the contracts'
//! serializer and the sinks work on. A leaf module, so that every stage can speak of it.

/// A record ready for the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The Kafka topic, NATS subject or AMQP routing key.
    pub topic: String,
    /// RabbitMQ: the exchange; EventBridge: the event's `Source` (`None` for the others).
    pub exchange: Option<String>,
    /// EventBridge only: the event's `DetailType`.
    pub detail_type: Option<String>,
    /// The value is bytes (a `bytea` payload), not JSON: RabbitMQ's `content_type` says so.
    pub binary: bool,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Explicit partition; `None` = by key.
    pub partition: Option<i32>,
    /// Record timestamp, ms since the epoch; `None` = the producer's clock.
    pub timestamp_ms: Option<i64>,
}

/// Approximate size of a record on the wire (key, value, headers, framing).
pub fn record_size(record: &Record) -> usize {
    let headers: usize = record
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 8)
        .sum();
    record.key.as_ref().map_or(0, String::len)
        + record.value.as_ref().map_or(0, Vec::len)
        + headers
        + 64
}
