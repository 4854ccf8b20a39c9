//! Per-key order across a failed delivery: said when it breaks, never silent.
//!
//! A producer pipelines a partition's batches (librdkafka: up to five requests in flight with
//! idempotence). When the broker refuses one batch for good — a record of it the topic will
//! not take, say an old timestamp — librdkafka fails that batch back to the relay, but the
//! batches behind it are answered `OUT_OF_ORDER_SEQUENCE_NUMBER`, re-sent under a bumped
//! producer epoch and **written** (librdkafka issue #4953; the Java client does the same).
//! The relay then resends the refused batch's good records from the confirmed position:
//! nothing is lost, but a later event of the same key was written before an earlier one's
//! first copy. Seen once in a fresh-clone run of
//! `kafka_errors::timestamp_the_topic_refuses_is_dead_lettered_and_the_rest_flows_on`.
//!
//! The window cannot take a written record back; what it can do is notice, while it drains
//! the deliveries behind a failure, that one of them shares a key with a record that failed
//! before it — and say so, naming both events (`outboxd_key_order_breaks_total`), so that a
//! consumer's owner learns of it from the relay, not from their data. Kafka's
//! `max.in.flight.requests.per.connection = 1` (`[kafka.properties]`) closes the window at
//! the cost of throughput.

use std::hash::{Hash, Hasher};

use crate::metrics as m;
use crate::route::Record;

/// A record's destination and key, hashed: which deliveries share an order. `None` for a
/// record without a key (no order is promised between those).
pub(super) fn order_key(record: &Record) -> Option<u64> {
    let key = record.key.as_ref()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    record.topic.hash(&mut h);
    key.hash(&mut h);
    Some(h.finish())
}

/// The records that failed so far while a window drains (to be resent), by order key.
#[derive(Default)]
pub(super) struct Resent {
    keys: Vec<(u64, String)>,
}

impl Resent {
    /// Event `id` (order key `key`) failed and will be resent.
    pub(super) fn add(&mut self, key: Option<u64>, id: &str) {
        if let Some(k) = key {
            self.keys.push((k, id.to_string()));
        }
    }

    /// Event `id` (order key `key`, destination `topic`) was acknowledged after the failures
    /// seen so far: if one of them had its key, that key's order is broken. Returns whether.
    pub(super) fn acknowledged(&self, key: Option<u64>, id: &str, topic: &str) -> bool {
        let Some(k) = key else { return false };
        let Some((_, earlier)) = self.keys.iter().find(|(f, _)| *f == k) else {
            return false;
        };
        metrics::counter!(m::KEY_ORDER_BREAKS).increment(1);
        tracing::error!(
            event_id = %id,
            earlier_event_id = %earlier,
            %topic,
            "per-key order broken: event {id} was written to {topic} while event {earlier} of the same key, sent before it, failed; {earlier} is resent after it (the producer wrote the batches behind a refused one; kafka.properties max.in.flight.requests.per.connection = 1 prevents this, at a cost in throughput)"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, key: Option<&str>) -> Record {
        Record {
            topic: topic.into(),
            exchange: None,
            detail_type: None,
            binary: false,
            key: key.map(str::to_string),
            value: None,
            headers: Vec::new(),
            partition: None,
            timestamp_ms: None,
        }
    }

    #[test]
    fn a_later_record_of_a_failed_records_key_is_a_break_and_other_keys_are_not() {
        let mut resent = Resent::default();
        resent.add(order_key(&record("t", Some("a"))), "e1");
        assert!(resent.acknowledged(order_key(&record("t", Some("a"))), "e2", "t"));
        assert!(!resent.acknowledged(order_key(&record("t", Some("b"))), "e3", "t"));
        assert!(!resent.acknowledged(order_key(&record("u", Some("a"))), "e4", "u"));
        assert!(!resent.acknowledged(order_key(&record("t", None)), "e5", "t"));
    }
}
