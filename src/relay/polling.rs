//! The polling session: fetch committed rows past the cursor, publish, store the cursor.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::exactly_once::{commit_cursor, resume_cursor};
use super::Backoff;
use crate::config::{Config, Delivery};
use crate::dead_letter::DlqTable;
use crate::error::{Error, Result};
use crate::health::{Health, Role};
use crate::metrics as m;
use crate::pg::{pipeline_identity, within};
use crate::route::Router;
use crate::sink::broker::Broker;
use crate::source::logical::{acquire_leadership, LockSession};
use crate::source::polling::{Cursor, Poller};
use crate::window::{Hints, Window};

/// Polling mode: fetch committed rows past the cursor, publish them with many in flight,
/// store the cursor once Kafka acknowledged them; wait for a NOTIFY or the interval when idle.
pub(super) async fn session(
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
    let limit = cfg.postgres.stream_timeout;
    let pipeline = match (cfg.kafka.delivery, &cfg.kafka.transactional_id) {
        (Delivery::AtLeastOnce, _) => None,
        (Delivery::ExactlyOnce, Some(id)) => Some(id.clone()),
        (Delivery::ExactlyOnce, None) => {
            let table = format!("{}.{}", cfg.postgres.schema, cfg.postgres.table);
            let identity = pipeline_identity(&poller.client, &table);
            Some(
                within(limit, "reading the system identifier", identity)
                    .await?
                    .0,
            )
        }
    };
    let (mut sink, broker) = Broker::connect(cfg, pipeline.as_deref()).await?;
    if let Some(p) = &pipeline {
        if let Some(pos) = resume_cursor(cfg, sink.kafka()?, p).await? {
            let adopt = poller.adopt(pos, &cfg.kafka.position_topic);
            within(limit, "storing the cursor", adopt).await?;
        }
    }
    if cfg.polling.notify {
        if let Err(e) = poller.listen().await {
            tracing::warn!(error = %e, "LISTEN failed; polling every polling.interval_ms instead");
        }
    }
    health.set_role(Role::Leader);
    let (xid, seq) = poller.cursor();
    tracing::info!(cursor = %format!("{xid}/{seq}"), sink = %broker, promises = %crate::sink::Sink::promises(&sink), "relay started (polling mode)");
    // Retention runs beside publishing, on its own connection; it ends with the session.
    let _retention = AbortOnDrop(tokio::spawn(crate::source::polling::retention_loop(
        cfg.clone(),
    )));
    let mut last_pending = Instant::now() - Duration::from_secs(60);
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
        // Exactly-once: one Kafka transaction per batch.
        let mut window = Window::new(hints.clone(), pipeline.is_some());
        // Each row's position, safe to store once this many sent events are acknowledged.
        let mut bounds: Vec<(u64, Cursor)> = Vec::new();
        let dlq = DlqTable::new(&poller.client, &cfg.postgres);
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
        let drained = window.is_empty();
        hints = window.into_hints();
        let txn_open = match &pipeline {
            Some(_) => sink.kafka()?.txn_open(),
            None => false,
        };
        if let (Some(p), true) = (&pipeline, txn_open) {
            // The cursor is stored only after the transaction holding its rows committed,
            // and a transaction commits only whole: every record in it acknowledged.
            match (stored, &outcome) {
                (Some(pos), Ok(())) if drained => commit_cursor(cfg, &mut sink, p, pos).await?,
                _ => {
                    sink.kafka()?.abort(cfg.kafka.delivery_timeout).await;
                    outcome?;
                    continue;
                }
            }
        }
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

/// Aborts a background task when the session that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
