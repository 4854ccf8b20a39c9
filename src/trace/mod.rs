//! OpenTelemetry traces through the relay: for each event whose row carries a W3C
//! `traceparent`, one span — a child of the writer's span — from the transaction's commit to
//! the broker's acknowledgement (or the dead letter), exported over OTLP.
//!
//! ## The hop nobody saw
//!
//! In an event-driven system the slowest and least visible step is often COMMIT → broker: a
//! relay that copies the `traceparent` header and nothing more leaves a hole in every trace,
//! and a consumer's span appears to follow the writer's instantly. The relay's span fills
//! that hole: it starts at the commit time (not when the relay read the row, so the wait in
//! the outbox is in it) and ends at the acknowledgement, with the event id, destination,
//! partition/offset and the number of attempts. The outgoing `traceparent` names the
//! relay's span (`tracing.propagate = "relay"`), so a consumer's span hangs under it.
//!
//! ## Tracing never costs an event
//!
//! Spans go to a bounded queue with `try_send` and are exported by a task of their own
//! ([`export`]): a collector that is slow, black-holed or gone costs spans — dropped and
//! counted (`outboxd_trace_spans_dropped_total`) — never a delay in publishing. With
//! `[tracing]` off there is no tracer: the window carries a `None` per delivery.
//!
//! A span is only finished when its event is settled; an event resent by a later session
//! (after a broker failure) keeps one span, whose `outboxd.attempts` counts the sends.
//! Exactly-once: the span ends when the record is acknowledged inside its Kafka
//! transaction; the transaction's commit follows within `kafka.transaction_ms`.

mod export;
mod otlp;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::{Propagate, SinkKind, TracingConfig};
use crate::error::Result;
use crate::event::Event;
use crate::metrics as m;
use crate::record::Record;
use crate::sink::Landed;

pub use export::Exporter;

/// A W3C trace context (`traceparent`): version 00 fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when it is not one (all-zero ids, version `ff`,
    /// wrong lengths). A later version's extra fields are ignored, as the spec asks.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let text = text.trim();
        let mut parts = text.split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || hex_to::<1>(version).is_none() {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = hex_to::<16>(trace)?;
        let span_id = hex_to::<8>(span)?;
        let flags = hex_to::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            self.flags
        )
    }
}

/// A span attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    /// A value known at compile time (no allocation per span).
    Static(&'static str),
    Int(i64),
}

/// A finished span, ready for export.
#[derive(Clone, Debug)]
pub struct SpanData {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)`: the span's status is ERROR.
    pub error: Option<String>,
}

/// An event's span, begun when it was routed and finished when it is settled.
#[derive(Debug)]
pub struct Pending {
    context: TraceParent,
    parent: Option<[u8; 8]>,
    start: SystemTime,
    id: String,
    event_type: String,
    destination: String,
    key: Option<String>,
}

/// How an event's span ended.
pub enum Outcome<'a> {
    Delivered(Landed),
    DeadLettered { reason: &'a str, detail: &'a str },
}

/// Spans the relay makes, and the queue to their exporter.
pub struct Tracer {
    cfg: TracingConfig,
    system: &'static str,
    exactly_once: bool,
    exporter: Exporter,
    /// Sends per event not yet settled (an event resent by a later session): bounded, and
    /// cleared when it grows past [`MAX_UNSETTLED`] (counts restart; spans are not lost).
    attempts: Mutex<HashMap<String, i64>>,
    rng: AtomicU64,
}

const MAX_UNSETTLED: usize = 100_000;

/// The OpenTelemetry `messaging.system` of a sink.
fn messaging_system(sink: SinkKind) -> &'static str {
    match sink {
        SinkKind::Kafka => "kafka",
        SinkKind::RabbitMq => "rabbitmq",
        SinkKind::Nats => "nats",
        SinkKind::Sqs => "aws_sqs",
        SinkKind::Sns => "aws_sns",
        SinkKind::EventBridge => "aws_eventbridge",
        SinkKind::PubSub => "gcp_pubsub",
        SinkKind::ServiceBus => "servicebus",
    }
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Tracer {
    /// The tracer of `[tracing]`, its exporter started; `None` when tracing is off.
    pub fn start(
        cfg: Option<&TracingConfig>,
        sink: SinkKind,
        exactly_once: bool,
    ) -> Result<Option<Arc<Tracer>>> {
        let Some(cfg) = cfg else {
            return Ok(None);
        };
        let exporter = Exporter::start(cfg)?;
        let mut seed = [0u8; 8];
        // A seed from the system's generator; the time if that fails (ids need only be
        // unique, not secret).
        if openssl::rand::rand_bytes(&mut seed).is_err() {
            seed = unix_ns(SystemTime::now()).to_le_bytes();
        }
        tracing::info!(endpoint = %crate::config::redact_url(&cfg.endpoint), protocol = ?cfg.protocol, propagate = ?cfg.propagate, sample_untraced = cfg.sample_untraced, "tracing: exporting a span per traced event over OTLP");
        Ok(Some(Arc::new(Tracer {
            cfg: cfg.clone(),
            system: messaging_system(sink),
            exactly_once,
            exporter,
            attempts: Mutex::new(HashMap::new()),
            rng: AtomicU64::new(u64::from_le_bytes(seed)),
        })))
    }

    /// splitmix64 over a shared counter: lock-free, never zero-only.
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn span_id(&self) -> [u8; 8] {
        loop {
            let id = self.random().to_be_bytes();
            if id != [0; 8] {
                return id;
            }
        }
    }

    /// Begins `event`'s span if its record carries a trace context (or an untraced event is
    /// sampled), and sets the outgoing `traceparent` to continue from it.
    pub fn begin(&self, event: &Event, record: &mut Record) -> Option<Box<Pending>> {
        let written = record
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(&self.cfg.context_header))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(TraceParent::parse);
        let (trace_id, parent, flags) = match written {
            Some(w) => (w.trace_id, Some(w.span_id), w.flags),
            None => {
                let share = self.cfg.sample_untraced;
                if share <= 0.0 || (self.random() >> 11) as f64 / (1u64 << 53) as f64 >= share {
                    return None;
                }
                let mut trace = [0u8; 16];
                trace[..8].copy_from_slice(&self.random().to_be_bytes());
                trace[8..].copy_from_slice(&self.span_id());
                (trace, None, 1)
            }
        };
        let context = TraceParent {
            trace_id,
            span_id: self.span_id(),
            flags,
        };
        if self.cfg.propagate == Propagate::Relay || written.is_none() {
            let value = context.header().into_bytes();
            match record
                .headers
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
            {
                Some((_, v)) => *v = value,
                None => record.headers.push(("traceparent".into(), value)),
            }
        }
        Some(Box::new(Pending {
            context,
            parent,
            start: event.commit_time,
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            destination: record.topic.clone(),
            key: record.key.clone(),
        }))
    }

    /// Counts a send of a begun span's event (a resend by a later session counts again).
    pub fn sent(&self, span: &Pending) {
        if let Ok(mut attempts) = self.attempts.lock() {
            if attempts.len() >= MAX_UNSETTLED {
                attempts.clear();
            }
            *attempts.entry(span.id.clone()).or_insert(0) += 1;
        }
    }

    /// Ends `span` with `outcome` and queues it for export (unless its trace is not sampled).
    pub fn finish(&self, span: Pending, outcome: Outcome<'_>) {
        let attempts = self
            .attempts
            .lock()
            .ok()
            .and_then(|mut a| a.remove(&span.id))
            .unwrap_or(0);
        if !span.context.sampled() {
            return;
        }
        let Pending {
            context,
            parent,
            start,
            id,
            event_type,
            destination,
            key,
        } = span;
        let mut attributes = vec![
            ("messaging.system", Value::Static(self.system)),
            ("messaging.operation.type", Value::Static("send")),
            (
                "messaging.destination.name",
                Value::Str(destination.clone()),
            ),
            ("messaging.message.id", Value::Str(id)),
            ("outboxd.event.type", Value::Str(event_type)),
            ("outboxd.attempts", Value::Int(attempts)),
            (
                "outboxd.delivery",
                Value::Str(
                    if self.exactly_once {
                        "exactly-once"
                    } else {
                        "at-least-once"
                    }
                    .into(),
                ),
            ),
        ];
        if let Some(key) = key {
            attributes.push(("messaging.message.key", Value::Str(key)));
        }
        let error = match outcome {
            Outcome::Delivered(landed) => {
                attributes.push(("outboxd.outcome", Value::Static("delivered")));
                if let Some(p) = landed.partition {
                    attributes.push((
                        "messaging.destination.partition.id",
                        Value::Str(p.to_string()),
                    ));
                }
                if let Some(o) = landed.offset {
                    // Kafka's offset; NATS JetStream's stream sequence.
                    let name = match self.system {
                        "kafka" => "messaging.kafka.offset",
                        _ => "outboxd.broker.sequence",
                    };
                    attributes.push((name, Value::Int(o)));
                }
                None
            }
            Outcome::DeadLettered { reason, detail } => {
                attributes.push(("outboxd.outcome", Value::Static("dead_lettered")));
                attributes.push(("outboxd.dead_letter.reason", Value::Str(reason.to_string())));
                Some(format!("dead-lettered ({reason}): {detail}"))
            }
        };
        let span = SpanData {
            trace_id: context.trace_id,
            span_id: context.span_id,
            parent,
            name: format!("send {destination}"),
            start_ns: unix_ns(start),
            end_ns: unix_ns(SystemTime::now()),
            attributes,
            error,
        };
        let dropped = self.exporter.queue(span);
        if dropped > 0 {
            metrics::counter!(m::TRACE_SPANS_DROPPED, "reason" => "queue_full").increment(dropped);
        }
    }

    /// Exports what is queued, waiting at most `limit` (a graceful stop).
    pub async fn flush(&self, limit: Duration) {
        self.exporter.flush(limit).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn traceparent_parses_what_the_spec_allows_and_refuses_the_rest() {
        let t =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert!(t.sampled());
        assert_eq!(
            t.header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        // A later version may add fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }
}
