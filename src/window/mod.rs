//! The delivery window: records handed to the producer and not yet acknowledged, resolved
//! in sending order, so the checkpoint can count the acknowledged prefix.
//!
//! ## A refused record, or a refused batch?
//!
//! librdkafka sends a partition's records in batches, and a broker that refuses a batch
//! refuses every record in it: measured with Apache Kafka 4.3, a topic limited by
//! `message.timestamp.before.max.ms` answered `INVALID_TIMESTAMP` for the one old record
//! *and* the good records batched with it (KIP-467 brokers may instead name the culprit and
//! answer `_INVALID_DIFFERENT_RECORD` for the others). Dead-lettering on a delivery error
//! would dead-letter innocent events. So an error that is about a record (`sink::classify`)
//! is not believed at delivery time unless the record travelled alone: the window drains the
//! rest of its deliveries, every record of them that was refused becomes a *suspect*, the
//! session ends, and the next one sends records one at a time until each suspect has been
//! settled alone (`crate::lessons`): one session for the whole batch, not one per batchmate.
//! Errors raised by `produce()` itself (local checks of one record) need no such proof.
//!
//! Files: `failure.rs` (what a failed delivery means), `order.rs` (a key's records landing
//! out of order, made loud), `stall.rs` (a delivery never acknowledged ends the session),
//! `meters.rs` (the per-event metrics).

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use std::future::Future;
use std::sync::Arc;

use crate::dead_letter::{dead_letter, DlqTable};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::health::Health;
use crate::ledger::{Ledger, Ticket};
use crate::lessons::Lessons;
use crate::metrics as m;
use crate::route::{Poison, Record, Router};
use crate::sink::broker::BrokerDelivery;
use crate::sink::{Class, Failed, Landed, SendError, Sink};
use crate::trace::{Outcome, Pending, Tracer};

mod failure;
mod meters;
mod order;
mod stall;
pub use failure::Failure;
use failure::{failure, failure_error, Seen};
use meters::Meters;

/// The bytes of a record the window counts: key, value, header names and values.
fn record_bytes(r: &Record) -> usize {
    r.key.as_ref().map_or(0, String::len)
        + r.value.as_ref().map_or(0, Vec::len)
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// A delivery awaiting acknowledgement.
struct InFlight<D> {
    fut: D,
    /// Sent while records travel one at a time: its report is about it alone.
    alone: bool,
    /// The event's entry in the delivery ledger.
    ticket: Ticket,
    /// Key, value and header bytes handed to the producer.
    bytes: usize,
    id: String,
    sent_at: Instant,
    topic: String,
    commit_time: SystemTime,
    /// The event's trace span (`[tracing]` on and the event traced).
    span: Option<Box<Pending>>,
    /// Its destination and key, hashed (`order::order_key`).
    order_key: Option<u64>,
}

/// What the window remembers of the delivery settled last, for the failure it may carry.
#[derive(Default)]
struct LastSettled {
    /// Its entry in the delivery ledger.
    ticket: Ticket,
    /// Its trace span, kept only when it failed (a delivered one's span has ended).
    span: Option<Box<Pending>>,
    /// Its destination and key, hashed (`order::order_key`).
    order_key: Option<u64>,
}

/// Deliveries awaiting acknowledgement, oldest first; `D` is the sink's delivery future.
pub struct Window<'l, D = BrokerDelivery> {
    inflight: VecDeque<InFlight<D>>,
    /// Events handed to the producer (or dead-lettered) so far.
    pub sent: u64,
    /// Events acknowledged (or dead-lettered) so far, in sending order.
    pub acked: u64,
    /// Bytes of the deliveries outstanding.
    bytes: usize,
    /// What earlier sessions taught (suspects, dead-letter decisions); updated as suspects
    /// settle, so what this session did not reach is still there for the next.
    lessons: &'l mut Lessons,
    /// Exactly-once: records travel inside Kafka transactions.
    transactional: bool,
    /// What each event's own delivery report said (`crate::ledger`), checked at every
    /// confirmation.
    pub ledger: Ledger,
    /// The delivery settled last: a failure handed to [`Window::handle`] is about it.
    last: LastSettled,
    /// Spans per event (`crate::trace`); `None` when tracing is off.
    pub tracer: Option<Arc<Tracer>>,
    /// The per-event metrics, registered once per session (see [`Meters`]).
    meters: Meters,
}

impl<'l, D> Window<'l, D>
where
    D: Future<Output = std::result::Result<Landed, Failed>> + Unpin,
{
    pub fn new(lessons: &'l mut Lessons, transactional: bool) -> Window<'l, D> {
        Window {
            inflight: VecDeque::new(),
            sent: 0,
            acked: 0,
            bytes: 0,
            lessons,
            transactional,
            ledger: Ledger::from_env(),
            last: LastSettled::default(),
            tracer: None,
            meters: Meters::new(),
        }
    }

    /// Ends an event's span (if it has one) with `outcome`.
    fn end_span(&self, span: Option<Box<Pending>>, outcome: Outcome<'_>) {
        if let (Some(tracer), Some(span)) = (&self.tracer, span) {
            tracer.finish(*span, outcome);
        }
    }

    /// Dead-letters the record of event `id` and settles its ticket and span.
    async fn dead_lettered<S: Sink<Delivery = D>>(
        &mut self,
        sink: &mut S,
        dlq: &DlqTable<'_>,
        id: Option<&str>,
        record: &Record,
        poison: &Poison,
        (ticket, span): (Ticket, Option<Box<Pending>>),
    ) -> Result<()> {
        dead_letter(sink, dlq, id, record, poison).await?;
        self.settle(ticket);
        self.end_span(
            span,
            Outcome::DeadLettered {
                reason: poison.kind.label(),
                detail: &poison.detail,
            },
        );
        Ok(())
    }

    /// The event of `ticket` was delivered or dead-lettered: settled, or (exactly-once)
    /// settled once its Kafka transaction commits.
    pub fn settle(&mut self, ticket: Ticket) {
        if self.transactional {
            self.ledger.in_transaction(ticket);
        } else {
            self.ledger.settled(ticket);
        }
    }

    /// No delivery outstanding.
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Deliveries outstanding.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    /// Whether another record may be sent: fewer than `max` deliveries and `max_bytes` bytes
    /// outstanding (one is always admitted, however large), or none while a suspect record is
    /// being isolated.
    pub fn has_room(&self, max: usize, max_bytes: usize) -> bool {
        if self.inflight.is_empty() {
            return true;
        }
        let max = if self.lessons.isolating() { 1 } else { max };
        self.inflight.len() < max && self.bytes < max_bytes
    }

    /// Publishes the oldest unacknowledged commit time (the lag) and the in-flight count.
    pub fn report(&self, health: &Health) {
        health.set_inflight(
            self.inflight.front().map(|f| f.commit_time),
            self.inflight.len(),
        );
        self.meters.inflight.set(self.inflight.len() as f64);
    }

    /// Awaits the oldest delivery. Cancel-safe: the delivery is removed only once resolved.
    /// `Err` carries the failure reason, naming the event id.
    pub async fn settle_oldest(&mut self) -> std::result::Result<(), Failure> {
        let Some(front) = self.inflight.front_mut() else {
            return Ok(());
        };
        let result = (&mut front.fut).await;
        let Some(done) = self.inflight.pop_front() else {
            return Ok(());
        };
        self.bytes = self.bytes.saturating_sub(done.bytes);
        self.last = LastSettled {
            ticket: done.ticket,
            span: None,
            order_key: done.order_key,
        };
        // Sent while records travel one at a time: whatever it says is about this record.
        let alone = done.alone;
        if alone {
            self.lessons.settled_alone(&done.id);
        }
        match result {
            Ok(landed) => {
                self.acked += 1;
                self.settle(done.ticket);
                self.end_span(done.span, Outcome::Delivered(landed));
                self.meters.published(&done.topic).increment(1);
                if let Ok(age) = SystemTime::now().duration_since(done.commit_time) {
                    self.meters.commit_to_ack.record(age.as_secs_f64());
                }
                Ok(())
            }
            Err(Failed { refusal, record }) => {
                self.last.span = done.span;
                let seen = if alone || refusal.alone {
                    Seen::Alone
                } else {
                    Seen::InBatch
                };
                Err(failure(
                    refusal,
                    seen,
                    Some(done.id),
                    &done.topic,
                    record.map(|r| *r),
                ))
            }
        }
    }

    /// Routes one event and hands it to the producer, or dead-letters it if it is poison
    /// (routing rejects it, or librdkafka refuses it for good). Waits for deliveries to
    /// drain while librdkafka's queue is full. Transient producer errors end the session.
    pub async fn publish<S: Sink<Delivery = D>>(
        &mut self,
        event: &mut Event,
        position: u64,
        router: &Router,
        sink: &mut S,
        dlq: &DlqTable<'_>,
        health: &Health,
    ) -> Result<()> {
        let ticket = self.ledger.yielded(&event.id, position);
        let payload = event.payload.take();
        let (mut record, rejected) = match router.route_with_value(event, payload) {
            Ok((record, warnings)) => {
                for w in warnings {
                    tracing::warn!(event_id = %event.id, "{}", w.0);
                }
                (record, None)
            }
            Err(rejected) => {
                let (record, poison) = *rejected;
                (record, Some(poison))
            }
        };
        // The span begins here, so that a dead letter ends it too; the outgoing
        // `traceparent` now names it.
        let span = match &self.tracer {
            Some(tracer) => tracer.begin(event, &mut record),
            None => None,
        };
        let id = Some(event.id.as_str());
        if let Some(poison) = rejected {
            return self
                .dead_lettered(sink, dlq, id, &record, &poison, (ticket, span))
                .await;
        }
        // The registry's wire format (`schemas.encoding`); a registry problem ends the session.
        if let Some(serializer) = &router.serializer {
            // Left as it was when the event is poison: the dead letter carries the JSON.
            let written = if event.extra.change {
                serializer.serialize_change(&mut record).await?
            } else {
                serializer
                    .serialize(&mut record, &event.aggregatetype, &event.event_type)
                    .await?
            };
            if let Err(poison) = written {
                return self
                    .dead_lettered(sink, dlq, id, &record, &poison, (ticket, span))
                    .await;
            }
        }
        if let Some(poison) = self.lessons.dead_letter(&event.id).cloned() {
            return self
                .dead_lettered(sink, dlq, id, &record, &poison, (ticket, span))
                .await;
        }
        let limit = sink.delivery_timeout();
        match tokio::time::timeout(limit, sink.ensure_topic(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(self.refused_to_take(
                    &event.id,
                    &record.topic,
                    "create its destination",
                    limit,
                    health,
                ))
            }
        }
        let mut span = span;
        loop {
            let sent = match tokio::time::timeout(limit, sink.send(&record)).await {
                Ok(sent) => sent,
                Err(_) => {
                    return Err(self.refused_to_take(
                        &event.id,
                        &record.topic,
                        "take",
                        limit,
                        health,
                    ))
                }
            };
            match sent {
                Ok(fut) => {
                    let bytes = record_bytes(&record);
                    self.bytes += bytes;
                    let alone = self.lessons.isolating();
                    if let (Some(tracer), Some(s)) = (&self.tracer, &span) {
                        tracer.sent(s);
                    }
                    self.inflight.push_back(InFlight {
                        fut,
                        alone,
                        ticket,
                        bytes,
                        id: event.id.clone(),
                        sent_at: Instant::now(),
                        topic: record.topic.clone(),
                        commit_time: event.commit_time,
                        span: span.take(),
                        order_key: order::order_key(&record),
                    });
                    self.sent += 1;
                    self.report(health);
                    tracing::trace!(event_id = %event.id, topic = %record.topic, "event sent");
                    return Ok(());
                }
                Err(SendError::QueueFull) => {
                    // librdkafka's queue is full: let deliveries drain.
                    let settled = self
                        .settle_reporting(sink.delivery_timeout(), health)
                        .await?;
                    self.handle(settled, sink, dlq).await?;
                }
                Err(SendError::Refused(refusal)) => {
                    let id = Some(event.id.clone());
                    return match failure(
                        refusal,
                        Seen::Send,
                        id,
                        &record.topic,
                        Some(record.clone()),
                    ) {
                        Failure::Poison { id, record, poison } => {
                            let span = span.take();
                            self.dead_lettered(
                                sink,
                                dlq,
                                id.as_deref(),
                                &record,
                                &poison,
                                (ticket, span),
                            )
                            .await
                        }
                        other => Err(self.ended(other, self.acked > 0)),
                    };
                }
            }
        }
    }

    /// The error that ends the session for `failure` (`failure::failure_error`, told whether
    /// records travel in Kafka transactions, where a stale epoch means fenced).
    fn ended(&self, failure: Failure, others_acked: bool) -> Error {
        failure_error(failure, others_acked, self.transactional)
    }

    /// The sink did not `what` the record of event `id` within `limit`: a client that waits
    /// for the broker's permission to write (RabbitMQ's `connection.blocked` under a memory or
    /// disk alarm, a full client buffer) would otherwise hold the loop where no stall is
    /// reported and no stop is seen. The session ends loudly; the next resends.
    fn refused_to_take(
        &self,
        id: &str,
        topic: &str,
        what: &str,
        limit: Duration,
        health: &Health,
    ) -> Error {
        health.failing();
        metrics::counter!(m::DELIVERY_STALLS).increment(1);
        let message = format!(
            "delivery stalled: the broker did not let the client {what} event {id} (destination {topic}) within {} s (kafka.delivery_timeout_ms) — a broker resource alarm (RabbitMQ connection.blocked) or a full client buffer; ending the session",
            limit.as_secs()
        );
        tracing::error!(event_id = %id, topic = %topic, "{message}");
        Error::Publish(message)
    }

    /// Acts on a settled delivery: a poison record is dead-lettered and counts as handled;
    /// a transient failure ends the session (resend from the confirmed position).
    pub async fn handle<S: Sink<Delivery = D>>(
        &mut self,
        settled: std::result::Result<(), Failure>,
        sink: &mut S,
        dlq: &DlqTable<'_>,
    ) -> Result<()> {
        match settled {
            Ok(()) => Ok(()),
            // A refusal at delivery leaves a Kafka transaction fit only for aborting: the
            // dead letter goes into the next one, in place of the record.
            Err(Failure::Poison {
                id: Some(id),
                poison,
                ..
            }) if self.transactional => Err(Error::Refused {
                event_id: id,
                poison,
            }),
            Err(Failure::Poison { id, record, poison }) => {
                self.acked += 1;
                let (ticket, span) = (self.last.ticket, self.last.span.take());
                self.dead_lettered(sink, dlq, id.as_deref(), &record, &poison, (ticket, span))
                    .await
            }
            Err(other @ Failure::Unclear { .. }) => {
                // Was it this record, or the cluster? Let the rest of the window settle: if
                // anything else is acknowledged, the cluster accepts records.
                let mut others_acked = self.acked > 0;
                let mut resent = order::Resent::default();
                if let Failure::Unclear { id: Some(id), .. } = &other {
                    resent.add(self.last.order_key, id);
                }
                let deadline = tokio::time::Instant::now() + sink.delivery_timeout();
                while let Some(f) = self.inflight.pop_front() {
                    match tokio::time::timeout_at(deadline, f.fut).await {
                        Ok(Ok(_)) => {
                            others_acked = true;
                            resent.acknowledged(f.order_key, &f.id, &f.topic);
                        }
                        Ok(_) => resent.add(f.order_key, &f.id),
                        Err(_) => break,
                    }
                }
                Err(self.ended(other, others_acked))
            }
            Err(Failure::Suspect { id, poison }) => {
                // Which records of the refused batch failed? Every one is a suspect, so the
                // next session settles them all alone at once (not one session each).
                let mut suspects = vec![id.clone()];
                let mut resent = order::Resent::default();
                resent.add(self.last.order_key, &id);
                let deadline = tokio::time::Instant::now() + sink.delivery_timeout();
                while let Some(f) = self.inflight.pop_front() {
                    match tokio::time::timeout_at(deadline, f.fut).await {
                        Ok(Err(Failed { refusal, .. })) => {
                            resent.add(f.order_key, &f.id);
                            if matches!(refusal.class, Class::Record(_) | Class::Batchmate) {
                                suspects.push(f.id)
                            }
                        }
                        Ok(Ok(_)) => {
                            resent.acknowledged(f.order_key, &f.id, &f.topic);
                        }
                        Err(_) => break,
                    }
                }
                let n = suspects.len();
                match self.ended(Failure::Suspect { id, poison }, false) {
                    Error::Suspect { message, .. } => Err(Error::Suspect {
                        message: format!("{message} (with {} more of its batch)", n - 1),
                        event_ids: suspects,
                    }),
                    other => Err(other),
                }
            }
            Err(other) => Err(self.ended(other, false)),
        }
    }
}
