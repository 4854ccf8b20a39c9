//! The polling source: committed rows past a cursor (`crate::source::polling`), as the one
//! session loop (`super::session`) reads them; and how a session on it begins and ends.
//!
//! Rows are read ahead of the stored cursor: each row gets an ordinal (the position the loop
//! counts with) and the source remembers which cursor each ordinal stands for, so the cursor
//! stored is always that of a row whose predecessors were all acknowledged. Storing is an
//! UPDATE, so it happens at most every [`CONFIRM_EVERY`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use super::exactly_once::resume_cursor;
use super::session::{unconfirmed, Eos, Opened};
use super::source::{Item, Source};
use crate::checkpoint::Checkpoint;
use crate::config::{Config, Delivery};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::health::Health;
use crate::metrics as m;
use crate::pg::{pipeline_identity, within};
use crate::sink::broker::Broker;
use crate::sink::positions::{Position, Witness};
use crate::source::logical::{acquire_leadership, LockSession};
use crate::source::polling::{Cursor, Poller};
use crate::transaction::Transactions;

/// The cursor row is updated at most this often while events flow.
const CONFIRM_EVERY: Duration = Duration::from_millis(100);

/// Rows pending this long are warned about (once per such interval), naming the transaction
/// that holds them back.
const HELD_WARN: Duration = Duration::from_secs(60);

/// Polling mode: leadership by an advisory lock on the SQL session, then the loop.
pub(super) async fn open<'a>(
    cfg: &'a Config,
    stop: &mut watch::Receiver<bool>,
    health: &'a Health,
) -> Result<Option<Opened<PollingSource<'a>>>> {
    let mut poller = Poller::open(cfg).await?;
    let lock = LockSession::Sql(&poller.client, cfg.postgres.stream_timeout);
    if !acquire_leadership(lock, &cfg.postgres.slot, stop, health).await? {
        return Ok(None);
    }
    // Another instance may have moved the cursor while this one waited for the lock.
    poller.reload_cursor().await?;
    poller.check_cursor_in_this_cluster().await?;
    poller.register().await?;
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
    let eos = match pipeline {
        None => None,
        Some(pipeline) => {
            if let Some((pos, witness)) = resume_cursor(cfg, sink.kafka()?, &pipeline).await? {
                let adopt = poller.adopt(pos, witness.as_deref(), &cfg.kafka.position_topic);
                within(limit, "storing the cursor", adopt).await?;
            }
            // Ordinals start at 1 each session: position 0 is the cursor adopted above.
            let transactions = Transactions::new(
                cfg.kafka.transaction_interval,
                cfg.kafka.transaction_max_events,
                0,
            );
            Some(Eos {
                transactions,
                pipeline,
            })
        }
    };
    if cfg.polling.notify {
        if let Err(e) = poller.listen().await {
            tracing::warn!(error = %e, "LISTEN failed; polling every polling.interval_ms instead");
        }
    }
    let source = PollingSource {
        cfg,
        read: poller.cursor(),
        poller,
        batch: VecDeque::new(),
        boundary: None,
        ordinal: 0,
        cursors: VecDeque::new(),
        last_pending: Instant::now() - Duration::from_secs(60),
        last_held_warning: None,
        health,
        // Retention runs beside publishing, on its own connection; it ends with the session.
        _retention: AbortOnDrop(tokio::spawn(crate::source::retention::retention_loop(
            cfg.clone(),
        ))),
    };
    Ok(Some(Opened {
        source,
        sink,
        broker,
        eos,
    }))
}

/// Rows past the cursor, read ahead in batches.
pub(super) struct PollingSource<'a> {
    cfg: &'a Config,
    poller: Poller,
    /// The last row read (ahead of the stored cursor).
    read: Cursor,
    batch: VecDeque<(Event, Cursor)>,
    /// The ordinal of the row just yielded, to be yielded as a boundary next.
    boundary: Option<u64>,
    ordinal: u64,
    /// (ordinal, cursor, event id) of rows yielded and not yet stored, oldest first.
    cursors: VecDeque<(u64, Cursor, String)>,
    last_pending: Instant,
    last_held_warning: Option<Instant>,
    health: &'a Health,
    _retention: AbortOnDrop,
}

impl PollingSource<'_> {
    /// Forgets the rows up to `position` and returns the cursor of the last of them: the
    /// cursor to store once they are all acknowledged.
    fn take_cursor(&mut self, position: u64) -> Option<Cursor> {
        let mut cursor = None;
        while let Some((o, c, _)) = self.cursors.front() {
            if *o > position {
                break;
            }
            cursor = Some(*c);
            self.cursors.pop_front();
        }
        cursor
    }

    fn cursor_of(&self, position: u64) -> Result<(Cursor, &str)> {
        self.cursors
            .iter()
            .find(|(o, _, _)| *o == position)
            .map(|(_, c, id)| (*c, id.as_str()))
            .ok_or_else(|| Error::Decode(format!("no cursor for polling position {position}")))
    }
}

impl Source for PollingSource<'_> {
    type Message = Item;

    fn describe(&self) -> String {
        let (xid, seq) = self.poller.cursor();
        format!("polling cursor {xid}/{seq}")
    }

    fn client(&self) -> &Client {
        &self.poller.client
    }

    fn confirmed(&self) -> u64 {
        0
    }

    fn limit(&self) -> u64 {
        u64::MAX
    }

    fn commit_position(&self) -> u64 {
        // Exactly-once adopts the committed cursor before reading: nothing to skip.
        u64::MAX
    }

    // The row's own boundary is its ordinal.
    fn event_position(&self) -> u64 {
        self.ordinal.saturating_sub(1)
    }

    fn confirm_every(&self) -> Duration {
        CONFIRM_EVERY
    }

    async fn recv(&mut self) -> Result<Item> {
        if let Some(b) = self.boundary.take() {
            return Ok(Item::Boundary(b));
        }
        let limit = self.cfg.postgres.stream_timeout;
        loop {
            if let Some((event, cursor)) = self.batch.pop_front() {
                self.ordinal += 1;
                self.cursors
                    .push_back((self.ordinal, cursor, event.id.clone()));
                self.boundary = Some(self.ordinal);
                return Ok(Item::Event(event));
            }
            let fetch = self.poller.fetch(self.read, self.cfg.polling.batch_size);
            let batch = within(limit, "polling", fetch).await?;
            if let Some((_, last)) = batch.last() {
                self.read = *last;
                self.batch = batch.into();
                continue;
            }
            // A dump/restore under a running relay shows up as a cursor from the future.
            let check = self.poller.check_cursor_in_this_cluster();
            within(limit, "checking the cursor", check).await?;
            // Rows that exist but are not yet safe to read (a transaction anywhere in the
            // cluster holds the snapshot's xmin back) send no second NOTIFY: look again soon.
            let unpublished = self.poller.has_unpublished(self.read);
            let wait = if within(limit, "polling", unpublished).await? {
                self.cfg.polling.interval.min(Duration::from_millis(200))
            } else {
                self.cfg.polling.interval
            };
            self.poller.wait(wait).await;
        }
    }

    async fn decode(&mut self, item: Item) -> Result<Option<Item>> {
        Ok(Some(item))
    }

    async fn confirm(&mut self, position: u64) -> Result<()> {
        if let Some(c) = self.take_cursor(position) {
            let limit = self.cfg.postgres.stream_timeout;
            within(limit, "storing the cursor", self.poller.store(c)).await?;
        }
        Ok(())
    }

    async fn tick(&mut self, _checkpoint: &mut Checkpoint, _quiet: bool) -> Result<()> {
        if self.last_pending.elapsed() >= Duration::from_secs(5) {
            self.last_pending = Instant::now();
            let limit = self.cfg.postgres.stream_timeout;
            let pending = within(limit, "counting pending rows", self.poller.pending()).await?;
            metrics::gauge!(m::POLLING_PENDING).set(pending as f64);
            // Rows the relay has not read (past what it read ahead): their age is lag too.
            let age = within(
                limit,
                "reading the oldest pending row",
                self.poller.oldest_pending_age(self.read),
            )
            .await?;
            let written =
                age.map(|a| std::time::SystemTime::now() - Duration::from_secs_f64(a.max(0.0)));
            self.health.set_oldest_pending(written);
            if age.is_some_and(|a| a >= HELD_WARN.as_secs_f64())
                && self
                    .last_held_warning
                    .is_none_or(|t| t.elapsed() >= HELD_WARN)
            {
                self.last_held_warning = Some(Instant::now());
                let holder = within(
                    limit,
                    "looking up the oldest transaction",
                    self.poller.horizon_holder(),
                )
                .await?
                .unwrap_or_else(|| "no transaction found (it may have just ended)".into());
                tracing::warn!(pending, oldest_s = age.unwrap_or(0.0) as u64, holder = %holder, "rows committed more than a minute ago are not published yet: a transaction that holds the snapshot horizon back keeps them unreadable (polling reads only rows older than every running transaction); end it, or it ends by itself");
            }
        }
        Ok(())
    }

    fn position(&self, position: u64) -> Result<(Position, Option<Witness>)> {
        let ((xid, seq), id) = self.cursor_of(position)?;
        let witness = Witness::Row {
            event_id: id.to_string(),
        };
        Ok((Position::Cursor { xid, seq }, Some(witness)))
    }

    async fn last_check(&mut self, _checkpoint: &mut Checkpoint) {}

    async fn finish(mut self, safe: u64) -> Result<()> {
        let stored = self.take_cursor(safe);
        if let Some(c) = stored {
            let limit = self.cfg.postgres.stream_timeout;
            if let Err(e) = within(limit, "storing the cursor", self.poller.store(c)).await {
                return Err(unconfirmed(
                    &format!("cursor {}/{}", c.0, c.1),
                    e.to_string(),
                ));
            }
        }
        let (xid, seq) = self.poller.cursor();
        tracing::info!(cursor = %format!("{xid}/{seq}"), "stopped; acknowledged events stored in the cursor");
        Ok(())
    }
}

/// Aborts a background task when the session that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
