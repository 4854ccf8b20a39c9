//! The logical-replication session: stream, publish, confirm; and a graceful stop.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::exactly_once::{commit, resume_position, sleep_until};
use super::Backoff;
use crate::checkpoint::Checkpoint;
use crate::config::{Config, Delivery};
use crate::dead_letter::{dead_letter, DlqTable};
use crate::error::{Error, Result};
use crate::health::{Health, Role};
use crate::metrics as m;
use crate::route::{Poison, PoisonKind, Record, Router};
use crate::sink::broker::Broker;
use crate::sink::Sink;
use crate::source::decode::{Change, Decoder};
use crate::source::logical::{acquire_leadership, LockSession, SlotReader};
use crate::source::pgoutput::format_lsn;
use crate::source::publication::lost_publication;
use crate::source::replication_conn::ReplicationConn;
use crate::source::walsender::{ReplicationMessage, ReplicationStream};
use crate::transaction::Transactions;
use crate::window::{Hints, Window};

/// One connection's life: set up, then stream until stop or error.
pub(super) async fn session(
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
    let dlq = DlqTable::new(reader.client(), &cfg.postgres);
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
    let (mut sink, broker) = Broker::connect(cfg, pipeline.as_deref()).await?;
    let mut confirmed = reader.confirmed();
    let mut eos = match (&pipeline, &exactly_once) {
        (Some(pipeline), Some((_, wal_now))) => {
            let resume = resume_position(cfg, sink.kafka()?, pipeline, *wal_now).await?;
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
        sink = %broker,
        promises = %crate::sink::Sink::promises(&sink),
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
                        let record = Record { topic: String::new(), exchange: None, key: None, value: Some(raw), headers: id.iter().map(|i| ("id".to_string(), i.clone().into_bytes())).collect(), partition: None, timestamp_ms: None };
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

/// Stop reading, wait (bounded) for outstanding acknowledgements, confirm what was
/// acknowledged, and check that the confirmation reached the slot: an error (exit code 1)
/// when it did not, so a supervisor knows events will be repeated.
async fn shutdown(
    cfg: &Config,
    stream: ReplicationStream,
    sink: &mut Broker,
    reader: &SlotReader,
    (mut window, mut checkpoint, confirmed, table_oid): (Window, Checkpoint, u64, u32),
    eos: Option<(&mut Transactions, &str)>,
    health: &Health,
) -> Result<()> {
    let dlq = DlqTable::new(reader.client(), &cfg.postgres);
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
            sink.kafka()?.abort(Duration::from_secs(5)).await;
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
