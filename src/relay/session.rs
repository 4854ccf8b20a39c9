//! The one session loop, for every source and every sink: read, route, publish, count
//! acknowledgements, confirm; Kafka transactions around it in exactly-once mode; and a
//! graceful stop.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::exactly_once::{commit, sleep_until};
use super::source::{Item, Source};
use super::Backoff;
use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::dead_letter::{dead_letter, DlqTable};
use crate::error::{Error, Result};
use crate::health::{Health, Role};
use crate::lessons::Lessons;
use crate::metrics as m;
use crate::route::{Poison, PoisonKind, Record, Router};
use crate::sink::broker::Broker;
use crate::sink::Sink;
use crate::transaction::Transactions;
use crate::window::Window;

/// A session up this long without an acknowledged event has recovered all the same (an idle
/// outbox confirms only keepalive positions).
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Messages the loop takes from the source per wake-up when they are already waiting. Each
/// pass of the loop re-arms its timers (confirmation, transaction deadline) and polls every
/// branch: in a 1,000,000-event drain's profile that was ~17 % of the relay's thread, paid
/// per message. Small enough that a stop, a due commit or a full window waits at most this
/// many messages (each checked between messages).
const READ_BATCH: usize = 64;

/// Exactly-once state of a session: when Kafka transactions commit, and the pipeline's id.
pub(super) struct Eos {
    pub transactions: Transactions,
    pub pipeline: String,
}

/// A source ready to stream (leadership held, resumed), with its sink: what opening a
/// session on either source (`super::logical::open`, `super::polling::open`) yields.
pub(super) struct Opened<S> {
    pub source: S,
    pub sink: Broker,
    /// The sink, for the start line.
    pub broker: String,
    pub eos: Option<Eos>,
}

/// What the loop needs besides the source and the sink.
pub(super) struct Context<'a> {
    pub cfg: &'a Config,
    pub router: &'a Router,
    pub health: &'a Health,
    pub tracer: Option<&'a std::sync::Arc<crate::trace::Tracer>>,
}

/// Streams from `source` into `sink` until `stop` fires (graceful stop) or an error ends
/// the session.
pub(super) async fn run<S: Source>(
    ctx: Context<'_>,
    opened: Opened<S>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
    lessons: &mut Lessons,
) -> Result<()> {
    let Context {
        cfg,
        router,
        health,
        tracer,
    } = ctx;
    let Opened {
        mut source,
        mut sink,
        broker,
        mut eos,
    } = opened;
    health.set_role(Role::Leader);
    let (suspects, dead_letters) = lessons.counts();
    tracing::info!(
        source = %source.describe(),
        sink = %broker,
        promises = %sink.promises(),
        suspects,
        dead_letters,
        "relay started; publishing from the confirmed position"
    );
    let mut window = Window::new(lessons, eos.is_some());
    window.tracer = tracer.cloned();
    let mut confirmed = source.confirmed();
    // Exactly-once: the source moves past what Kafka already holds as the stream shows it
    // (never straight to the position read back: it is proven by the stream first).
    let mut checkpoint = Checkpoint::limited(source.limit());
    let mut status_tick = tokio::time::interval(Duration::from_secs(1));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_confirm = Instant::now() - source.confirm_every();
    let mut skipped: u64 = 0;
    // Failpoint `drop_first_event` (a test of the delivery ledger).
    let mut dropped = None;

    loop {
        let ceiling = eos.as_ref().map_or(u64::MAX, |e| e.transactions.ceiling());
        let safe = checkpoint
            .safe_position()
            .map(|s| s.min(ceiling))
            .filter(|s| *s > confirmed);
        // Nothing is confirmed while the source still has to prove its resume position.
        let confirm_at = safe
            .filter(|_| source.verified())
            .map(|_| last_confirm + source.confirm_every());
        if let (Some(safe), Some(at)) = (safe, confirm_at) {
            if at <= Instant::now() {
                check_ledger(&window, safe)?;
                source.confirm(safe).await?;
                confirmed = safe;
                last_confirm = Instant::now();
                last_progress = last_confirm;
                // Progress is acknowledged events, or a session that has stayed up: a keepalive
                // confirmed at the start of every session that then fails on the same
                // transaction must not reset the backoff nor hide the failure from /readyz.
                if window.acked > 0 || started.elapsed() >= STABLE_SESSION {
                    backoff.reset();
                    health.recovered();
                }
                continue;
            }
        }
        let can_read = window.has_room(cfg.kafka.max_in_flight, cfg.kafka.max_in_flight_bytes);
        let commit_at = eos
            .as_ref()
            .and_then(|e| e.transactions.deadline(window.sent));
        tokio::select! {
            biased;
            _ = stop.changed() => {
                let state = Stopping { window, checkpoint, confirmed };
                return shutdown(cfg, source, &mut sink, state, eos.as_mut(), health).await;
            }
            _ = sleep_until(confirm_at), if confirm_at.is_some() => {}
            _ = sleep_until(commit_at), if commit_at.is_some() => {
                if let Some(e) = eos.as_mut() {
                    let dlq = DlqTable::new(source.client(), &cfg.postgres);
                    commit(cfg, &mut window, &mut sink, &dlq, e, |p| source.position(p), health).await?;
                    checkpoint.acked(window.acked);
                    window.report(health);
                }
            }
            settled = window.settle_oldest(), if !window.is_empty() => {
                let dlq = DlqTable::new(source.client(), &cfg.postgres);
                window.handle(settled, &mut sink, &dlq).await?;
                checkpoint.acked(window.acked);
                window.report(health);
            }
            // After acknowledgements (a stall check must see the acks that arrived while a
            // handler waited), before reading: a source that always has something ready (a
            // backlog, a snapshot's queued rows) must not starve the once-a-second checks —
            // the publication check raises the checkpoint's limit, so without it nothing
            // would be confirmed.
            _ = status_tick.tick() => {
                window.check_stall(cfg.kafka.delivery_timeout, health)?;
                let quiet = window.is_empty() && last_progress.elapsed() >= cfg.postgres.heartbeat_interval;
                if quiet {
                    last_progress = Instant::now();
                }
                source.tick(&mut checkpoint, quiet).await?;
            }
            msg = source.recv(), if can_read => {
                // Every message already waiting is taken in this wake-up (up to READ_BATCH):
                // the loop's checks, timers and select run once per batch, not per message.
                let mut next = Some(msg);
                for _ in 0..READ_BATCH {
                    let msg = match next.take() {
                        Some(msg) => msg,
                        None => {
                            let commit_due = eos
                                .as_ref()
                                .and_then(|e| e.transactions.deadline(window.sent))
                                .is_some_and(|at| at <= Instant::now());
                            if commit_due || !window.has_room(cfg.kafka.max_in_flight, cfg.kafka.max_in_flight_bytes) {
                                break;
                            }
                            match source.try_recv() {
                                Some(msg) => msg,
                                None => break,
                            }
                        }
                    };
                    let Some(item) = source.decode(msg?).await? else { continue };
                    let skip = eos.as_ref().is_some_and(|e| e.transactions.already_published(source.commit_position()));
                    match item {
                        Item::Boundary(position) => {
                            checkpoint.boundary(window.sent, position);
                            if let Some(e) = eos.as_mut() {
                                e.transactions.boundary(window.sent, position);
                            }
                        }
                        // Already committed to Kafka before this run: never yielded to the ledger.
                        Item::Event(_) | Item::Malformed { .. } if skip => {
                            if skipped == 0 {
                                tracing::info!(commit_position = source.commit_position(), "skipping events of source transactions already committed to Kafka (the source had not been confirmed past them)");
                            }
                            skipped += 1;
                            metrics::counter!(m::EVENTS_SKIPPED).increment(1);
                        }
                        Item::Malformed { id, reason, raw } => {
                            if let Some(e) = eos.as_mut() {
                                e.transactions.sending(window.sent);
                            }
                            let headers = id.iter().map(|i| ("id".to_string(), i.clone().into_bytes())).collect();
                            let record = Record { topic: String::new(), exchange: None, detail_type: None, binary: true, key: None, value: Some(raw), headers, partition: None, timestamp_ms: None };
                            let poison = Poison { kind: PoisonKind::MalformedMessage, detail: reason };
                            let ticket = window.ledger.yielded(id.as_deref().unwrap_or("?"), source.event_position());
                            let dlq = DlqTable::new(source.client(), &cfg.postgres);
                            dead_letter(&mut sink, &dlq, id.as_deref(), &record, &poison).await?;
                            window.settle(ticket);
                        }
                        Item::Event(event) if dropped.is_none() && crate::failpoint::active("drop_first_event") => {
                            tracing::warn!(event_id = %event.id, "failpoint drop_first_event: this event is not published");
                            dropped = Some(window.ledger.yielded(&event.id, source.event_position()));
                        }
                        Item::Event(mut event) => {
                            if let Some(e) = eos.as_mut() {
                                e.transactions.sending(window.sent);
                            }
                            let dlq = DlqTable::new(source.client(), &cfg.postgres);
                            let position = source.event_position();
                            window.publish(&mut event, position, router, &mut sink, &dlq, health).await?;
                            checkpoint.acked(window.acked);
                            if let Some(e) = &eos {
                                outgrows_its_transaction(cfg, e)?;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a stop inherits from the loop.
struct Stopping<'l> {
    window: Window<'l>,
    checkpoint: Checkpoint,
    confirmed: u64,
}

/// Stop reading, wait (bounded) for outstanding acknowledgements, commit or abort an open
/// Kafka transaction, store what was acknowledged, and make sure it was stored: an error
/// (exit code 1) when it was not, so a supervisor knows events will be repeated.
async fn shutdown<S: Source>(
    cfg: &Config,
    mut source: S,
    sink: &mut Broker,
    state: Stopping<'_>,
    eos: Option<&mut Eos>,
    health: &Health,
) -> Result<()> {
    let Stopping {
        mut window,
        mut checkpoint,
        confirmed,
    } = state;
    let deadline = tokio::time::Instant::now() + cfg.kafka.shutdown_timeout;
    {
        let dlq = DlqTable::new(source.client(), &cfg.postgres);
        while !window.is_empty() {
            match tokio::time::timeout_at(deadline, window.settle_oldest()).await {
                Ok(settled) => {
                    if let Err(e) = window.handle(settled, sink, &dlq).await {
                        tracing::warn!(error = %e, "delivery failed during shutdown; it will be resent on restart");
                        break;
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        outstanding = window.len(),
                        "shutdown timeout reached with deliveries outstanding; they will be resent on restart"
                    );
                    break;
                }
            }
        }
        checkpoint.acked(window.acked);
    }
    let mut ceiling = u64::MAX;
    if let Some(eos) = eos {
        // Commit what ended in the source; abort the rest (it is resent after a restart).
        let done = window.is_empty() && eos.transactions.committable(window.sent).is_some();
        let committed = done && {
            let dlq = DlqTable::new(source.client(), &cfg.postgres);
            let commit = commit(
                cfg,
                &mut window,
                sink,
                &dlq,
                eos,
                |p| source.position(p),
                health,
            );
            tokio::time::timeout_at(deadline, commit)
                .await
                .is_ok_and(|r| r.is_ok())
        };
        if !committed {
            sink.kafka()?.abort(Duration::from_secs(5)).await;
        }
        ceiling = eos.transactions.ceiling();
    }
    source.last_check(&mut checkpoint).await;
    let safe = checkpoint
        .safe_position()
        .unwrap_or(confirmed)
        .min(ceiling)
        .max(confirmed);
    if safe > confirmed {
        check_ledger(&window, safe)?;
    }
    source.finish(safe).await?;
    sink.flush(Duration::from_millis(100));
    Ok(())
}

/// Exactly-once: a source transaction still being published after half of
/// `transaction.timeout.ms` will not commit in time — the broker would abort the Kafka
/// transaction, the relay would resend the source transaction, and so on for ever, each
/// round looking like a fenced producer. Only a larger timeout (or smaller source
/// transactions) helps.
fn outgrows_its_transaction(cfg: &Config, eos: &Eos) -> Result<()> {
    let timeout = cfg.kafka.transaction_timeout();
    match eos.transactions.open_for() {
        Some(open) if open >= timeout / 2 => Err(Error::setup(
            format!(
                "exactly-once: one source transaction has been publishing for {} ms of the Kafka transaction timeout of {} ms and is not done; it cannot commit before it ends, and the broker would abort it and the relay resend it, for ever",
                open.as_millis(),
                timeout.as_millis()
            ),
            "raise kafka.properties \"transaction.timeout.ms\" (up to the broker's transaction.max.timeout.ms, 15 min by default) above twice the time the largest source transaction takes to publish, or write smaller transactions",
        )),
        _ => Ok(()),
    }
}

/// The delivery ledger's word before any confirmation (`crate::ledger`).
fn check_ledger(window: &Window, position: u64) -> Result<()> {
    window.ledger.check(position).map_err(|v| {
        tracing::error!(event_id = %v.event_id, event_position = v.event_position, confirm = v.confirm, "{v}; stopping before the source is confirmed");
        Error::Invariant(v.to_string())
    })
}

/// A stop that could not store what was acknowledged (exit code 1).
pub(super) fn unconfirmed(what: &str, why: String) -> Error {
    Error::Shutdown(format!(
        "acknowledged events up to {what} could not be confirmed ({why}); they will be published again after a restart"
    ))
}
