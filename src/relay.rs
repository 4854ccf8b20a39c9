//! Wires source → route → sink → checkpoint, and owns retry and shutdown.
//!
//! One continuous pass per session:
//! 1. the replication stream delivers whole transactions in commit order;
//! 2. each outbox row is routed and handed to the producer, with at most
//!    `kafka.max_in_flight` deliveries outstanding — when the window is full the relay stops
//!    reading, so a backlog stays in PostgreSQL, not in memory;
//! 3. deliveries are resolved in sending order, counting the acknowledged prefix;
//! 4. the highest transaction end (or idle keepalive position) whose events were all
//!    acknowledged is sent to PostgreSQL as the slot's confirmed position.
//!
//! A failed delivery ends the session: nothing after the acknowledged prefix was confirmed,
//! the producer is dropped, and after a capped, jittered exponential backoff a new session
//! resumes from the slot's confirmed position (duplicates carry their original `id`).
//! Transient PostgreSQL or Kafka errors do the same; permanent ones end the daemon.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio::sync::watch;

use crate::checkpoint::Checkpoint;
use crate::config::{Config, Delivery, Mode, RetryConfig};
use crate::dead_letter::{dead_letter, DlqTable};
use crate::error::{Error, Result};
use crate::health::{Health, Role};
use crate::metrics as m;
use crate::pg::within;
use crate::route::{Poison, PoisonKind, Record, Router};
use crate::sink::kafka::KafkaSink;
use crate::sink::positions::{self, Position};
use crate::source::decode::{Change, Decoder};
use crate::source::logical::{acquire_leadership, LockSession, SlotReader};
use crate::source::pgoutput::format_lsn;
use crate::source::polling::{Cursor, Poller};
use crate::source::publication::lost_publication;
use crate::source::replication_conn::ReplicationConn;
use crate::source::walsender::{ReplicationMessage, ReplicationStream};
use crate::transaction::Transactions;
use crate::window::{Hints, Repeats, Window};

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
    let mut backoff = Backoff::new(&cfg.retry);
    let mut attempt: u32 = 0;
    let mut repeats = Repeats::default();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let hints = repeats.hints.clone();
        let result = match cfg.mode {
            Mode::Logical => session(&cfg, &router, &mut stop, &mut backoff, &health, hints).await,
            Mode::Polling => {
                session_polling(&cfg, &router, &mut stop, &mut backoff, &health, hints).await
            }
        };
        health.set_role(Role::Starting);
        match result {
            Ok(()) => return Ok(()),
            // Stopping: acknowledged work that could not be confirmed is the exit status
            // (1); any other error while stopping (say, PostgreSQL still unreachable) only
            // ends the retries.
            Err(e @ Error::Shutdown(_)) => {
                health.record_error(&e.to_string());
                return Err(e);
            }
            Err(_) if *stop.borrow() => return Ok(()),
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
                        | Error::Delivery { .. }
                        | Error::Suspect { .. }
                        | Error::Refused { .. }
                ) {
                    metrics::counter!(m::PUBLISH_RETRIES).increment(1);
                    repeats.record(&e, cfg.kafka.max_record_retries);
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

/// One connection's life: set up, then stream until stop or error.
async fn session(
    cfg: &Config,
    router: &Router,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
    health: &Health,
    hints: Hints,
) -> Result<()> {
    let mut reader = SlotReader::open(&cfg.postgres).await?;
    // Leadership is held by the replication connection itself (source::replication_conn).
    let mut repl = ReplicationConn::connect(&cfg.postgres).await?;
    let lock = LockSession::Replication(&mut repl);
    if !acquire_leadership(lock, &cfg.postgres.slot, stop, health).await? {
        return Ok(());
    }
    // The slot may have moved while this instance waited as standby: a position read before
    // would move it back (PostgreSQL 15/16 accept a lower confirmed position).
    reader.refresh_confirmed().await?;
    reader.ensure_slot_usable().await?;
    let mut published = reader.verify_publication(None).await?;
    let dlq = reader.dlq_table();
    let exactly_once = match cfg.kafka.delivery {
        Delivery::ExactlyOnce => Some(reader.pipeline_identity().await?),
        Delivery::AtLeastOnce => None,
    };
    let pipeline = exactly_once.as_ref().map(|(id, _)| {
        cfg.kafka
            .transactional_id
            .clone()
            .unwrap_or_else(|| id.clone())
    });
    let mut sink = KafkaSink::new(&cfg.kafka, pipeline.as_deref())?;
    let brokers = sink.check_reachable(Duration::from_secs(10)).await?;
    let mut confirmed = reader.confirmed();
    let mut eos = match (&pipeline, &exactly_once) {
        (Some(pipeline), Some((_, wal_now))) => {
            let resume = resume_position(cfg, &sink, pipeline, *wal_now).await?;
            Some(Transactions::new(
                cfg.kafka.transaction_interval,
                cfg.kafka.transaction_max_events,
                resume,
            ))
        }
        _ => None,
    };
    match repl.start(&cfg.postgres).await {
        Err(e) if e.is_slot_in_use() && reader.resolve_stale_holder().await? => {
            // The stale holder is gone (its backend exits asynchronously): try again shortly.
            tokio::time::sleep(Duration::from_millis(500)).await;
            repl.start(&cfg.postgres).await?
        }
        other => other?,
    }
    let mut stream = repl.stream(4096, cfg.kafka.max_in_flight_bytes, confirmed);
    health.set_role(Role::Leader);
    tracing::info!(
        slot = %cfg.postgres.slot,
        confirmed_lsn = %format_lsn(confirmed),
        brokers,
        "relay started; streaming from the confirmed position"
    );
    let mut decoder = Decoder::new(&cfg.postgres);
    let mut window = Window::new(hints, eos.is_some());
    // Nothing is confirmed beyond the last position at which the outbox table was verified to
    // be in the publication (see source::publication).
    let mut checkpoint = Checkpoint::limited(published.lsn);
    if let Some(e) = &eos {
        // Already in Kafka: the slot may move up to it now.
        checkpoint.boundary(0, e.last_committed());
    }
    let mut status_tick = tokio::time::interval(Duration::from_secs(1));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress = Instant::now();
    let mut skipped: u64 = 0;

    loop {
        let ceiling = eos.as_ref().map_or(u64::MAX, Transactions::ceiling);
        if let Some(safe) = checkpoint.safe_position().map(|s| s.min(ceiling)) {
            if safe > confirmed {
                stream.confirm(safe);
                tracing::trace!(lsn = %format_lsn(safe), "confirmed");
                confirmed = safe;
                last_progress = Instant::now();
                backoff.reset();
                health.recovered();
            }
        }
        let can_read = window.has_room(cfg.kafka.max_in_flight, cfg.kafka.max_in_flight_bytes);
        let commit_at = eos.as_ref().and_then(|e| e.deadline(window.sent));
        tokio::select! {
            biased;
            _ = stop.changed() => {
                let state = (window, checkpoint, confirmed, published.table_oid);
                let eos = eos.as_mut().zip(pipeline.as_deref());
                return shutdown(cfg, stream, &mut sink, &reader, state, eos, health).await;
            }
            _ = sleep_until(commit_at), if commit_at.is_some() => {
                if let (Some(e), Some(p)) = (eos.as_mut(), pipeline.as_deref()) {
                    commit(cfg, &mut window, &mut sink, &dlq, e, p, health).await?;
                    checkpoint.acked(window.acked);
                    window.report(health);
                }
            }
            settled = window.settle_oldest(), if !window.is_empty() => {
                window.handle(settled, &mut sink, &dlq).await?;
                checkpoint.acked(window.acked);
                window.report(health);
            }
            msg = stream.recv(), if can_read => match msg? {
                ReplicationMessage::XLogData { data, budget } => {
                    let change = decoder.feed(&data)?;
                    // The decoded event owns its bytes: free the message (and its share of
                    // the read-ahead) before publishing.
                    drop((data, budget));
                    let skip = eos.as_ref().is_some_and(|e| e.already_published(decoder.commit_lsn()));
                    match change {
                    None => {}
                    Some(Change::Boundary(lsn)) => {
                        checkpoint.boundary(window.sent, lsn);
                        if let Some(e) = eos.as_mut() {
                            e.boundary(window.sent, lsn);
                        }
                    }
                    Some(Change::UnknownRelation(id)) => {
                        let partition = reader.is_outbox_partition(id, published.table_oid).await?;
                        decoder.classify(id, partition)?;
                    }
                    Some(Change::Event(_) | Change::Poison { .. }) if skip => {
                        if skipped == 0 {
                            tracing::info!(commit_lsn = %format_lsn(decoder.commit_lsn()), "skipping events of source transactions already committed to Kafka (the slot had not been confirmed past them)");
                        }
                        skipped += 1;
                        metrics::counter!(m::EVENTS_SKIPPED).increment(1);
                    }
                    Some(Change::Poison { id, reason, raw }) => {
                        if let Some(e) = eos.as_mut() {
                            e.sending(window.sent);
                        }
                        let record = Record { topic: String::new(), key: None, value: Some(raw), headers: id.iter().map(|i| ("id".to_string(), i.clone().into_bytes())).collect(), partition: None, timestamp_ms: None };
                        let poison = Poison { kind: PoisonKind::MalformedMessage, detail: reason };
                        dead_letter(&mut sink, &dlq, id.as_deref(), &record, &poison).await?;
                    }
                    Some(Change::Event(mut event)) => {
                        if let Some(e) = eos.as_mut() {
                            e.sending(window.sent);
                        }
                        window.publish(&mut event, router, &mut sink, &dlq, health).await?;
                        checkpoint.acked(window.acked);
                    }
                    }
                }
                ReplicationMessage::Keepalive { wal_end, .. } => {
                    // Everything before wal_end was sent to us; outside a transaction it is
                    // safe once the events before it are acknowledged. (Replies are the
                    // status task's: see source::walsender.)
                    if !decoder.in_transaction() {
                        checkpoint.boundary(window.sent, wal_end);
                        if let Some(e) = eos.as_mut() {
                            e.boundary(window.sent, wal_end);
                        }
                    }
                }
            },
            _ = status_tick.tick() => {
                window.report_stall(cfg.kafka.delivery_timeout, health);
                // Also proves the session (and with it the leadership lock) is alive.
                match reader.verify_publication(Some(published.table_oid)).await {
                    Ok(p) => {
                        checkpoint.limit(p.lsn);
                        published = p;
                    }
                    Err(e @ Error::Setup { .. }) => return Err(lost_publication(e, &published)),
                    Err(e) => return Err(e),
                }
                if window.is_empty()
                    && last_progress.elapsed() >= cfg.postgres.heartbeat_interval
                {
                    // Normally keepalives advance an idle slot; the heartbeat is the fallback.
                    last_progress = Instant::now();
                    reader.heartbeat_if_wal_moved(confirmed).await?;
                }
            }
        }
    }
}

/// Polling mode: fetch committed rows past the cursor, publish them with many in flight,
/// store the cursor once Kafka acknowledged them; wait for a NOTIFY or the interval when idle.
async fn session_polling(
    cfg: &Config,
    router: &Router,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
    health: &Health,
    mut hints: Hints,
) -> Result<()> {
    let mut poller = Poller::open(cfg).await?;
    let lock = LockSession::Sql(&poller.client, cfg.postgres.stream_timeout);
    if !acquire_leadership(lock, &cfg.postgres.slot, stop, health).await? {
        return Ok(());
    }
    // Another instance may have moved the cursor while this one waited for the lock.
    poller.reload_cursor().await?;
    poller.check_cursor_in_this_cluster().await?;
    let mut sink = KafkaSink::new(&cfg.kafka, None)?;
    let brokers = sink.check_reachable(Duration::from_secs(10)).await?;
    if cfg.polling.notify {
        if let Err(e) = poller.listen().await {
            tracing::warn!(error = %e, "LISTEN failed; polling every polling.interval_ms instead");
        }
    }
    health.set_role(Role::Leader);
    let (xid, seq) = poller.cursor();
    tracing::info!(cursor = %format!("{xid}/{seq}"), brokers, "relay started (polling mode)");
    // Retention runs beside publishing, on its own connection; it ends with the session.
    let _retention = AbortOnDrop(tokio::spawn(crate::source::polling::retention_loop(
        cfg.clone(),
    )));
    let mut last_pending = Instant::now() - Duration::from_secs(60);
    let limit = cfg.postgres.stream_timeout;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if last_pending.elapsed() >= Duration::from_secs(5) {
            last_pending = Instant::now();
            let pending = within(limit, "counting pending rows", poller.pending()).await?;
            metrics::gauge!(m::POLLING_PENDING).set(pending as f64);
        }
        let batch = within(limit, "polling", poller.fetch(cfg.polling.batch_size)).await?;
        let full = batch.len() as i64 >= cfg.polling.batch_size;
        if batch.is_empty() {
            // A dump/restore under a running relay shows up as a cursor from the future.
            within(
                limit,
                "checking the cursor",
                poller.check_cursor_in_this_cluster(),
            )
            .await?;
            // Rows that exist but are not yet safe to read (a transaction anywhere in the
            // cluster holds the snapshot's xmin back) send no second NOTIFY: look again soon.
            let wait = if within(limit, "polling", poller.has_unpublished()).await? {
                cfg.polling.interval.min(Duration::from_millis(200))
            } else {
                cfg.polling.interval
            };
            tokio::select! {
                _ = poller.wait(wait) => {}
                _ = stop.changed() => return Ok(()),
            }
            continue;
        }
        let mut window = Window::new(hints.clone(), false);
        // Each row's position, safe to store once this many sent events are acknowledged.
        let mut bounds: Vec<(u64, Cursor)> = Vec::new();
        let dlq = DlqTable {
            client: &poller.client,
            schema: &cfg.postgres.schema,
            timeout: cfg.postgres.stream_timeout,
        };
        let mut outcome: Result<()> = Ok(());
        for (mut event, pos) in batch {
            if *stop.borrow() {
                break;
            }
            if let Err(e) = window
                .publish(&mut event, router, &mut sink, &dlq, health)
                .await
            {
                outcome = Err(e);
                break;
            }
            // Sent or dead-lettered: either way the row is done once the events sent before
            // (and including) it are acknowledged.
            bounds.push((window.sent, pos));
            while !window.has_room(cfg.kafka.max_in_flight, cfg.kafka.max_in_flight_bytes) {
                let settled = window
                    .settle_reporting(cfg.kafka.delivery_timeout, health)
                    .await;
                if let Err(e) = window.handle(settled, &mut sink, &dlq).await {
                    outcome = Err(e);
                    break;
                }
            }
            if outcome.is_err() {
                break;
            }
        }
        let deadline =
            (*stop.borrow()).then(|| tokio::time::Instant::now() + cfg.kafka.shutdown_timeout);
        while outcome.is_ok() && !window.is_empty() {
            let settled = match deadline {
                Some(d) => match tokio::time::timeout_at(d, window.settle_oldest()).await {
                    Ok(s) => s,
                    Err(_) => break,
                },
                None => {
                    window
                        .settle_reporting(cfg.kafka.delivery_timeout, health)
                        .await
                }
            };
            if let Err(e) = window.handle(settled, &mut sink, &dlq).await {
                outcome = Err(e);
            }
        }
        window.report(health);
        // Store the position after the acknowledged prefix.
        let stored = bounds
            .iter()
            .take_while(|(needed, _)| *needed <= window.acked)
            .map(|(_, pos)| *pos)
            .last();
        hints = window.into_hints();
        if let Some(pos) = stored {
            if let Err(e) = within(limit, "storing the cursor", poller.store(pos)).await {
                if *stop.borrow() {
                    return Err(Error::Shutdown(format!(
                        "acknowledged events up to cursor {}/{} could not be stored ({e}); they will be published again after a restart",
                        pos.0, pos.1
                    )));
                }
                return Err(e);
            }
            backoff.reset();
            health.recovered();
        }
        outcome?;
        if *stop.borrow() {
            tracing::info!("stopped; acknowledged events stored in the cursor");
            return Ok(());
        }
        if !full {
            tokio::select! {
                _ = poller.wait(cfg.polling.interval) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}

/// Exactly-once: registers the producer (fencing any earlier one with the same
/// `transactional.id`) and reads the pipeline's last committed position back. A position
/// beyond this database's WAL belongs to another database (or a restored copy): stopping is
/// the only safe answer, since skipping to it could skip events never published.
async fn resume_position(
    cfg: &Config,
    sink: &KafkaSink,
    pipeline: &str,
    wal_now: u64,
) -> Result<u64> {
    let timeout = cfg.kafka.delivery_timeout;
    sink.init_transactions(timeout).await?;
    let read = positions::read_last(&cfg.kafka, pipeline, timeout * 2).await?;
    let resume = match read {
        None => 0,
        Some(Position::Lsn(lsn)) if lsn <= wal_now => lsn,
        Some(Position::Lsn(lsn)) => {
            return Err(Error::setup(
                format!(
                    "the position topic {} holds {} for pipeline {pipeline}, beyond this database's WAL ({}): it was written for another database or before a restore",
                    cfg.kafka.position_topic,
                    format_lsn(lsn),
                    format_lsn(wal_now)
                ),
                "reset the pipeline's position (README: exactly-once, resetting the position) or set kafka.transactional_id for this database",
            ))
        }
        Some(Position::Cursor { .. }) => {
            return Err(Error::setup(
                format!("the position topic {} holds a polling cursor for pipeline {pipeline}, which runs in logical mode", cfg.kafka.position_topic),
                "give each pipeline its own kafka.transactional_id, or reset the position",
            ))
        }
    };
    tracing::info!(pipeline, position = %format_lsn(resume), "exactly-once: resuming after the last committed Kafka transaction");
    Ok(resume)
}

/// Exactly-once: commits the open Kafka transaction with its position. Every record of it
/// is acknowledged first, so a refused one is known before the commit (and aborts it).
async fn commit(
    cfg: &Config,
    window: &mut Window,
    sink: &mut KafkaSink,
    dlq: &DlqTable<'_>,
    eos: &mut Transactions,
    pipeline: &str,
    health: &Health,
) -> Result<()> {
    let Some(position) = eos.committable(window.sent) else {
        return Ok(());
    };
    while !window.is_empty() {
        let settled = window
            .settle_reporting(cfg.kafka.delivery_timeout, health)
            .await;
        window.handle(settled, sink, dlq).await?;
    }
    sink.write_position(pipeline, Position::Lsn(position))
        .await?;
    sink.commit(cfg.kafka.delivery_timeout).await?;
    eos.committed(position);
    metrics::counter!(m::TRANSACTIONS_COMMITTED).increment(1);
    tracing::trace!(position = %format_lsn(position), "kafka transaction committed");
    Ok(())
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Aborts a background task when the session that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stop reading, wait (bounded) for outstanding acknowledgements, confirm what was
/// acknowledged, and check that the confirmation reached the slot: an error (exit code 1)
/// when it did not, so a supervisor knows events will be repeated.
async fn shutdown(
    cfg: &Config,
    stream: ReplicationStream,
    sink: &mut KafkaSink,
    reader: &SlotReader,
    (mut window, mut checkpoint, confirmed, table_oid): (Window, Checkpoint, u64, u32),
    eos: Option<(&mut Transactions, &str)>,
    health: &Health,
) -> Result<()> {
    let dlq = reader.dlq_table();
    let dlq = &dlq;
    let deadline = tokio::time::Instant::now() + cfg.kafka.shutdown_timeout;
    while !window.is_empty() {
        match tokio::time::timeout_at(deadline, window.settle_oldest()).await {
            Ok(settled) => {
                if let Err(e) = window.handle(settled, sink, dlq).await {
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
    let mut ceiling = u64::MAX;
    if let Some((eos, pipeline)) = eos {
        // Commit what ended in the source; abort the rest (it is resent after a restart).
        let done = window.is_empty() && eos.committable(window.sent).is_some();
        let committed = done
            && tokio::time::timeout_at(
                deadline,
                commit(cfg, &mut window, sink, dlq, eos, pipeline, health),
            )
            .await
            .is_ok_and(|r| r.is_ok());
        if !committed {
            sink.abort(Duration::from_secs(5)).await;
        }
        ceiling = eos.ceiling();
    }
    let limit = Duration::from_secs(5);
    // One last check that the outbox is published lets the checkpoint reach the last
    // acknowledged transaction (it holds back what was decoded after the previous check).
    if let Ok(Ok(p)) = tokio::time::timeout(limit, reader.verify_publication(Some(table_oid))).await
    {
        checkpoint.limit(p.lsn);
    }
    let safe = checkpoint
        .safe_position()
        .unwrap_or(confirmed)
        .min(ceiling)
        .max(confirmed);
    let unconfirmed = |why: String| {
        Error::Shutdown(format!(
            "acknowledged events up to {} could not be confirmed ({why}); they will be published again after a restart",
            format_lsn(safe)
        ))
    };
    match tokio::time::timeout(limit, stream.finish(safe)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(unconfirmed(e.to_string())),
        Err(_) => {
            return Err(unconfirmed(
                "PostgreSQL did not take the status update".into(),
            ))
        }
    }
    if safe > reader.confirmed() {
        // The walsender applies the update when it reads it: wait until the slot shows it.
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, reader.state()).await {
                Ok(Ok(state)) if state.confirmed_flush >= safe => break,
                Ok(Ok(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Ok(state)) => {
                    return Err(unconfirmed(format!(
                        "the slot stayed at {}",
                        format_lsn(state.confirmed_flush)
                    )))
                }
                Ok(Err(e)) => return Err(unconfirmed(e.to_string())),
                Err(_) => return Err(unconfirmed("PostgreSQL did not answer".into())),
            }
        }
    }
    sink.flush(Duration::from_millis(100));
    tracing::info!(confirmed_lsn = %format_lsn(safe), "stopped; acknowledged events confirmed");
    Ok(())
}
