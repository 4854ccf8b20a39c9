//! Wires source → route → sink → checkpoint, and owns retry and shutdown.
//!
//! One continuous pass per session, the same for every source and sink:
//! 1. the source yields events in its order (the slot: whole transactions in commit order;
//!    polling: rows by transaction id and sequence) and boundaries — positions that are safe
//!    once everything before them is acknowledged;
//! 2. each event is routed and handed to the sink, with at most `max_in_flight` deliveries
//!    outstanding — when the window is full the relay stops reading, so a backlog stays in
//!    PostgreSQL, not in memory;
//! 3. deliveries are resolved in sending order, counting the acknowledged prefix;
//! 4. the highest boundary whose events were all acknowledged is stored as the source's
//!    confirmed position (the slot's, or the cursor row).
//!
//! A failed delivery ends the session: nothing after the acknowledged prefix was confirmed,
//! the client is dropped, and after a capped, jittered exponential backoff a new session
//! resumes from the confirmed position (duplicates carry their original `id`). Transient
//! PostgreSQL or broker errors do the same; permanent ones end the daemon.
//!
//! Files: [`session`] (the one loop, for every source and sink, and its graceful stop),
//! [`source`] (what the loop needs from a source), [`logical`] and [`polling`] (the two
//! sources, and how a session on each begins), [`exactly_once`] (Kafka transactions around
//! the loop).

mod exactly_once;
mod logical;
mod polling;
mod session;
mod source;

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::watch;

use crate::config::{Config, Mode, RetryConfig};
use crate::error::{Error, Result};
use crate::health::{Health, Role};
use crate::lessons::Lessons;
use crate::metrics as m;
use crate::route::Router;

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
pub async fn run(cfg: Config, mut stop: watch::Receiver<bool>, health: Arc<Health>) -> Result<()> {
    let router = Router::from_config(&cfg)?;
    let delivery = match cfg.kafka.delivery {
        crate::config::Delivery::AtLeastOnce => "at-least-once",
        crate::config::Delivery::ExactlyOnce => "exactly-once",
    };
    metrics::gauge!(m::SINK_INFO, "sink" => cfg.sink.as_str(), "delivery" => delivery).set(1.0);
    let exactly_once = cfg.kafka.delivery == crate::config::Delivery::ExactlyOnce;
    let tracer = crate::trace::Tracer::start(cfg.tracing.as_ref(), cfg.sink, exactly_once)?;
    let result = sessions(&cfg, &router, &mut stop, &health, tracer.as_ref()).await;
    if let Some(tracer) = &tracer {
        // Spans of what was delivered before the stop; bounded, so a dead collector never
        // holds the exit.
        tracer.flush(Duration::from_secs(2)).await;
    }
    result
}

/// Sessions, one after the other, with backoff between failures, until a stop or a
/// permanent error.
async fn sessions(
    cfg: &Config,
    router: &Router,
    stop: &mut watch::Receiver<bool>,
    health: &Arc<Health>,
    tracer: Option<&Arc<crate::trace::Tracer>>,
) -> Result<()> {
    let mut backoff = Backoff::new(&cfg.retry);
    let mut attempt: u32 = 0;
    let mut lessons = Lessons::default();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let ctx = session::Context {
            cfg,
            router,
            health,
            tracer,
        };
        // Open a session on the configured source (waiting as standby while another
        // instance leads), then the one loop.
        // `publishing`: the error (if any) ended a session that was publishing.
        let (result, publishing) = match cfg.mode {
            Mode::Logical => match logical::open(cfg, stop, health).await {
                Ok(Some(opened)) => (
                    session::run(ctx, opened, stop, &mut backoff, &mut lessons).await,
                    true,
                ),
                other => (other.map(|_| ()), false),
            },
            Mode::Polling => match polling::open(cfg, stop, health).await {
                Ok(Some(opened)) => (
                    session::run(ctx, opened, stop, &mut backoff, &mut lessons).await,
                    true,
                ),
                other => (other.map(|_| ()), false),
            },
        };
        health.set_role(Role::Starting);
        match result {
            Ok(()) => return Ok(()),
            // Stopping: acknowledged work that could not be confirmed is the exit status
            // (1); a transient error while stopping outside a session (say, PostgreSQL still
            // unreachable) only ends the retries.
            Err(e @ Error::Shutdown(_)) => {
                health.record_error(&e.to_string());
                return Err(e);
            }
            Err(e) if *stop.borrow() => {
                health.record_error(&e.to_string());
                if !e.is_transient() {
                    return Err(e);
                }
                if publishing {
                    // The stop came while a handler failed: the graceful stop did not run.
                    return Err(session::unconfirmed(
                        "the last confirmed position",
                        e.to_string(),
                    ));
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                attempt += 1;
                health.record_error(&e.to_string());
                health.failing();
                let delay = backoff.next_delay();
                if let Error::Fenced(_) = e {
                    // Another instance took over our transactional.id: this session ended
                    // (and with it leadership); try again as a standby.
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "fenced by another instance; stopped publishing and left leadership");
                } else if matches!(
                    e,
                    Error::Kafka(_)
                        | Error::Publish(_)
                        | Error::Delivery { .. }
                        | Error::Suspect { .. }
                        | Error::Refused { .. }
                ) {
                    metrics::counter!(m::PUBLISH_RETRIES).increment(1);
                    lessons.learn(&e, cfg.kafka.max_record_retries);
                    // Loud: a delivery that keeps failing holds the slot back.
                    tracing::error!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "publishing failed; retrying from the last confirmed position");
                } else {
                    tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "relay interrupted; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            Err(e) => {
                health.record_error(&e.to_string());
                return Err(e);
            }
        }
    }
}
