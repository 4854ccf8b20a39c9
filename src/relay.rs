//! Wires source → route → sink → checkpoint, and owns retry and shutdown.
//!
//! One pass per batch:
//! 1. peek the slot (whole transactions, in commit order);
//! 2. route each outbox row and hand it to the producer, keeping at most
//!    `kafka.max_in_flight` deliveries outstanding (memory stays bounded whatever the backlog);
//! 3. resolve deliveries in sending order, counting the acknowledged prefix;
//! 4. advance the slot to the highest transaction end (or heartbeat) whose events were all
//!    acknowledged.
//!
//! A failed delivery ends the pass: the slot is advanced only over the acknowledged prefix,
//! the producer is recreated, and the next pass re-reads from there (duplicates carry their
//! original `id`). Transient PostgreSQL or Kafka errors restart the session after a capped,
//! jittered exponential backoff; permanent ones end the daemon.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use futures_util::StreamExt;
use rdkafka::producer::DeliveryFuture;
use tokio::sync::watch;

use crate::checkpoint::Checkpoint;
use crate::config::{Config, RetryConfig};
use crate::error::{Error, Result};
use crate::route::{to_record, TopicTemplate};
use crate::sink::kafka::{KafkaSink, SendError};
use crate::source::logical::{Change, Decoder, SlotReader};

/// Capped exponential backoff with jitter, reset after progress.
pub struct Backoff {
    cfg: RetryConfig,
    iter: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(cfg: &RetryConfig) -> Backoff {
        Backoff {
            cfg: cfg.clone(),
            iter: Self::build(cfg),
        }
    }
    fn build(cfg: &RetryConfig) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(cfg.initial_backoff)
            .with_max_delay(cfg.max_backoff)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }
    pub fn next_delay(&mut self) -> Duration {
        self.iter
            .next()
            .unwrap_or(self.cfg.max_backoff)
            .min(self.cfg.max_backoff)
    }
    pub fn reset(&mut self) {
        self.iter = Self::build(&self.cfg);
    }
}

/// Runs the relay until `stop` turns true (graceful shutdown) or a permanent error occurs.
pub async fn run(cfg: Config, mut stop: watch::Receiver<bool>) -> Result<()> {
    let template = TopicTemplate::parse(&cfg.kafka.topic_template)
        .map_err(|p| Error::setup(format!("kafka.topic_template: {p}"), "correct the template"))?;
    let mut backoff = Backoff::new(&cfg.retry);
    let mut attempt: u32 = 0;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        match session(&cfg, &template, &mut stop, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                attempt += 1;
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "relay interrupted; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One connection's life: set up, then batches until stop or error.
async fn session(
    cfg: &Config,
    template: &TopicTemplate,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<()> {
    let mut reader = SlotReader::open(&cfg.postgres).await?;
    if !reader.acquire_leadership(stop).await? {
        return Ok(());
    }
    let mut sink = KafkaSink::new(&cfg.kafka)?;
    let brokers = sink.check_reachable(Duration::from_secs(10)).await?;
    tracing::info!(
        slot = %cfg.postgres.slot,
        confirmed_lsn = %crate::source::pgoutput::format_lsn(reader.confirmed()),
        brokers,
        "relay started"
    );
    let mut decoder = Decoder::new(&cfg.postgres);
    let mut last_confirm = Instant::now();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let before = reader.confirmed();
        let pass = batch(cfg, template, &mut reader, &mut decoder, &mut sink, stop).await?;
        if reader.confirmed() > before {
            last_confirm = Instant::now();
            backoff.reset();
        }
        match pass {
            Pass::Stopped => return Ok(()),
            Pass::DeliveryFailed(reason) => {
                // The producer may be in a fatal state (idempotence); start a fresh one and
                // resend from the confirmed position.
                let delay = backoff.next_delay();
                tracing::warn!(error = %reason, retry_in_ms = delay.as_millis() as u64, confirmed_lsn = %crate::source::pgoutput::format_lsn(reader.confirmed()), "kafka delivery failed; resending from the confirmed position");
                drop(sink);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
                sink = KafkaSink::new(&cfg.kafka)?;
            }
            Pass::Full => {}
            Pass::Drained { rows } => {
                if rows == 0 && last_confirm.elapsed() >= cfg.postgres.heartbeat_interval {
                    // At most one heartbeat per interval, whether or not it is read back.
                    last_confirm = Instant::now();
                    if reader.heartbeat_if_wal_moved().await? {
                        continue; // read it back right away
                    }
                }
                if rows == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(cfg.postgres.poll_interval) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                }
            }
        }
    }
}

enum Pass {
    /// The peek hit `batch_max_changes`: more is waiting.
    Full,
    /// The peek returned everything there was.
    Drained { rows: u64 },
    /// A delivery failed; the slot covers only the acknowledged prefix.
    DeliveryFailed(String),
    /// Shutdown requested; outstanding deliveries were awaited (bounded) and confirmed.
    Stopped,
}

/// Deliveries awaiting acknowledgement, oldest first.
struct Window {
    inflight: VecDeque<DeliveryFuture>,
    sent: u64,
    acked: u64,
}

impl Window {
    /// Awaits the oldest delivery. `Err` carries the failure reason.
    async fn settle_oldest(&mut self) -> std::result::Result<(), String> {
        let Some(fut) = self.inflight.pop_front() else {
            return Ok(());
        };
        match fut.await {
            Ok(Ok(_)) => {
                self.acked += 1;
                Ok(())
            }
            Ok(Err((e, msg))) => {
                let id = rdkafka::message::Headers::iter(
                    rdkafka::Message::headers(&msg)
                        .unwrap_or(&rdkafka::message::OwnedHeaders::new()),
                )
                .find(|h| h.key == "id")
                .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
                .unwrap_or_default();
                Err(format!(
                    "event {id} to topic {}: {e}",
                    rdkafka::Message::topic(&msg)
                ))
            }
            Err(_) => Err("delivery was cancelled (producer dropped)".into()),
        }
    }
}

async fn batch(
    cfg: &Config,
    template: &TopicTemplate,
    reader: &mut SlotReader,
    decoder: &mut Decoder,
    sink: &mut KafkaSink,
    stop: &mut watch::Receiver<bool>,
) -> Result<Pass> {
    let mut window = Window {
        inflight: VecDeque::new(),
        sent: 0,
        acked: 0,
    };
    let mut checkpoint = Checkpoint::new();
    let mut rows: u64 = 0;
    let mut failure: Option<String> = None;
    let mut stopped = false;
    {
        let stream = reader.peek().await?;
        futures_util::pin_mut!(stream);
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.changed() => { stopped = true; break; }
                next = stream.next() => next,
            };
            let Some(row) = next else { break };
            let row = row.map_err(|e| Error::pg("reading the replication slot", e))?;
            rows += 1;
            let data: &[u8] = row.get(0);
            match decoder.feed(data)? {
                None => {}
                Some(Change::Boundary(lsn)) => checkpoint.boundary(window.sent, lsn),
                Some(Change::Event(event)) => {
                    let (record, warnings) = to_record(template, &event);
                    for w in warnings {
                        tracing::warn!(event_id = %event.id, "{}", w.0);
                    }
                    sink.ensure_topic(&record.topic).await;
                    loop {
                        match sink.send(&record) {
                            Ok(fut) => {
                                window.inflight.push_back(fut);
                                window.sent += 1;
                                break;
                            }
                            Err(SendError::QueueFull) if !window.inflight.is_empty() => {
                                if let Err(e) = window.settle_oldest().await {
                                    failure = Some(e);
                                    break;
                                }
                            }
                            Err(SendError::QueueFull) => {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            Err(SendError::Other(e)) => {
                                failure = Some(format!(
                                    "event {} to topic {}: {e}",
                                    event.id, record.topic
                                ));
                                break;
                            }
                        }
                    }
                    if failure.is_some() {
                        break;
                    }
                    tracing::trace!(event_id = %event.id, topic = %record.topic, "event sent");
                    while window.inflight.len() >= cfg.kafka.max_in_flight {
                        if let Err(e) = window.settle_oldest().await {
                            failure = Some(e);
                            break;
                        }
                    }
                    if failure.is_some() {
                        break;
                    }
                    checkpoint.acked(window.acked);
                }
            }
        }
    }

    // Resolve what is outstanding. On shutdown the wait is bounded; otherwise each delivery
    // resolves within librdkafka's message.timeout.ms.
    if failure.is_none() {
        let deadline = stopped.then(|| tokio::time::Instant::now() + cfg.kafka.shutdown_timeout);
        while !window.inflight.is_empty() {
            let settled = match deadline {
                Some(d) => match tokio::time::timeout_at(d, window.settle_oldest()).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(outstanding = window.inflight.len(), "shutdown timeout reached with deliveries outstanding; they will be resent on restart");
                        break;
                    }
                },
                None => window.settle_oldest().await,
            };
            if let Err(e) = settled {
                failure = Some(e);
                break;
            }
        }
    }
    checkpoint.acked(window.acked);
    if let Some(position) = checkpoint.safe_position() {
        reader.advance(position).await?;
    }
    if stopped {
        sink.flush(Duration::from_millis(100));
        tracing::info!(confirmed_lsn = %crate::source::pgoutput::format_lsn(reader.confirmed()), "stopped; acknowledged events confirmed");
        return Ok(Pass::Stopped);
    }
    if let Some(reason) = failure {
        return Ok(Pass::DeliveryFailed(reason));
    }
    if window.sent > 0 {
        tracing::debug!(events = window.sent, rows, "batch published");
    }
    if rows >= u64::from(cfg.postgres.batch_max_changes) {
        Ok(Pass::Full)
    } else {
        Ok(Pass::Drained { rows })
    }
}
