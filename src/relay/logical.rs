//! The logical-replication source: the slot's stream, decoded (`crate::source`), as the one
//! session loop (`super::session`) reads it; and how a session on it begins and ends.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use super::exactly_once::resume_position;
use super::session::{unconfirmed, Eos, Opened};
use super::source::{Item, Source};
use crate::cdc::snapshot::Snapshots;
use crate::checkpoint::Checkpoint;
use crate::config::{Config, Delivery};
use crate::error::{Error, Result};
use crate::health::Health;
use crate::sink::broker::Broker;
use crate::sink::positions::{Position, Witness};
use crate::source::decode::{Change, Decoder};
use crate::source::logical::{acquire_leadership, LockSession, SlotReader};
use crate::source::pgoutput::format_lsn;
use crate::source::publication::{lost_publication, Published};
use crate::source::replication_conn::ReplicationConn;
use crate::source::walsender::{ReplicationMessage, ReplicationStream};
use crate::transaction::Transactions;

/// One connection's life: leadership, set up, then the loop until stop or error.
pub(super) async fn open<'a>(
    cfg: &'a Config,
    stop: &mut watch::Receiver<bool>,
    health: &'a Health,
) -> Result<Option<Opened<LogicalSource<'a>>>> {
    let mut reader = SlotReader::open(&cfg.postgres).await?;
    // Leadership is held by the replication connection itself (source::replication_conn).
    let mut repl = ReplicationConn::connect(&cfg.postgres).await?;
    let lock = LockSession::Replication(&mut repl);
    if !acquire_leadership(lock, &cfg.postgres.slot, stop, health).await? {
        return Ok(None);
    }
    // The slot may have moved while this instance waited as standby: a position read before
    // would move it back (PostgreSQL 15/16 accept a lower confirmed position).
    reader.refresh_confirmed().await?;
    let recreated = reader.ensure_slot_usable().await?;
    let published = reader.verify_publication(None).await?;
    let identity = match cfg.kafka.delivery {
        Delivery::ExactlyOnce => Some(reader.pipeline_identity().await?),
        Delivery::AtLeastOnce => None,
    };
    let pipeline = identity.as_ref().map(|(id, _)| {
        cfg.kafka
            .transactional_id
            .clone()
            .unwrap_or_else(|| id.clone())
    });
    let (mut sink, broker) = Broker::connect(cfg, pipeline.as_deref()).await?;
    let mut verify = None;
    let eos = match (pipeline, &identity) {
        (Some(pipeline), Some((_, wal_now))) => {
            let resume =
                resume_position(cfg, sink.kafka()?, &pipeline, *wal_now, reader.confirmed())
                    .await?;
            verify = resume.verify;
            Some(Eos {
                transactions: Transactions::new(
                    cfg.kafka.transaction_interval,
                    cfg.kafka.transaction_max_events,
                    resume.skip_below,
                ),
                pipeline,
            })
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
    let confirmed = reader.confirmed();
    let snapshots = Snapshots::start(&cfg.postgres, reader.client(), confirmed, recreated).await?;
    let mut decoder = Decoder::new(&cfg.postgres);
    if let Some(s) = &snapshots {
        decoder.attach(s.board());
    }
    let stream = repl.stream(4096, cfg.kafka.max_in_flight_bytes, confirmed);
    let source = LogicalSource {
        cfg,
        health,
        snapshots,
        decoder,
        reader,
        stream,
        trusted: published,
        published,
        confirmed,
        verify,
        queued: std::collections::VecDeque::new(),
    };
    Ok(Some(Opened {
        source,
        sink,
        broker,
        eos,
    }))
}

/// The slot's stream, decoded; the slot reader's SQL session for checks and the heartbeat.
pub(super) struct LogicalSource<'a> {
    cfg: &'a Config,
    health: &'a Health,
    /// The session's snapshots (`crate::cdc::snapshot`), when tables are captured.
    snapshots: Option<Snapshots>,
    reader: SlotReader,
    stream: ReplicationStream,
    decoder: Decoder,
    /// The last check that the outbox table is in the publication (`source::publication`).
    published: Published,
    /// The check before it: the checkpoint's limit (see `tick`). At start, the slot's own
    /// position stands in for it.
    trusted: Published,
    confirmed: u64,
    /// Exactly-once: the (xid, end LSN) the stream must show before anything is confirmed —
    /// the last transaction Kafka holds, proving the position read back belongs to this WAL
    /// history (`sink::positions`).
    verify: Option<(u32, u64)>,
    /// The second and later events of one row change (a delete's tombstone, a key change's
    /// create): yielded one by one, each through the window's room check.
    queued: std::collections::VecDeque<Item>,
}

/// What the session loop reads from the logical source.
pub(super) enum Incoming {
    Wire(ReplicationMessage),
    /// The next of [`LogicalSource::queued`].
    Queued,
}

impl LogicalSource<'_> {
    /// Queues the items of one change (events, or changes that cannot be published).
    fn queue(&mut self, changes: Vec<crate::cdc::table::Outcome>) {
        self.queued.extend(changes.into_iter().map(|c| match c {
            Ok(event) => Item::Event(event),
            Err((id, reason, raw)) => Item::Malformed {
                id: Some(id),
                reason,
                raw,
            },
        }));
    }

    /// Checks what the stream shows at `position` (a commit's end, a non-transactional
    /// message, a keepalive) against the witness still to be found.
    fn witness(&mut self, position: u64, commit: bool) -> Result<()> {
        let Some((xid, end)) = self.verify else {
            return Ok(());
        };
        let found = commit && position == end && self.decoder.xid() == xid;
        if found {
            tracing::info!(xid, end_lsn = %format_lsn(end), "exactly-once: the last transaction Kafka holds is in this WAL history; resuming");
            self.verify = None;
            return Ok(());
        }
        if position < end {
            return Ok(());
        }
        let seen = if commit && position == end {
            format!("transaction {} ends there instead", self.decoder.xid())
        } else {
            format!(
                "the stream passed it at {} without it",
                format_lsn(position)
            )
        };
        Err(Error::setup(
            format!(
                "exactly-once: the pipeline's last committed Kafka transaction ends with source transaction {xid} at {}, but in this database's WAL {seen}: the history forked (a restore, or a failover to a standby that had not received it), and skipping by that position would skip events never published; nothing was confirmed",
                format_lsn(end)
            ),
            "check what consumers have (`outboxd verify --since …`), then reset the pipeline's position (README: exactly-once, resetting the position) so the relay publishes from its slot",
        ))
    }
}

impl Source for LogicalSource<'_> {
    type Message = Incoming;

    fn describe(&self) -> String {
        format!(
            "slot {} at {}",
            self.cfg.postgres.slot,
            format_lsn(self.confirmed)
        )
    }

    fn client(&self) -> &Client {
        self.reader.client()
    }

    fn confirmed(&self) -> u64 {
        self.confirmed
    }

    // Nothing is confirmed beyond the last position at which the outbox table was verified
    // to be in the publication (see source::publication).
    fn limit(&self) -> u64 {
        self.confirmed.min(self.published.lsn)
    }

    fn commit_position(&self) -> u64 {
        self.decoder.commit_lsn()
    }

    // A slot confirmed at or below a commit record decodes that transaction again.
    fn event_position(&self) -> u64 {
        self.decoder.commit_lsn()
    }

    fn confirm_every(&self) -> Duration {
        Duration::ZERO
    }

    async fn recv(&mut self) -> Result<Incoming> {
        if !self.queued.is_empty() {
            return Ok(Incoming::Queued);
        }
        self.stream.recv().await.map(Incoming::Wire)
    }

    fn try_recv(&mut self) -> Option<Result<Incoming>> {
        if !self.queued.is_empty() {
            return Some(Ok(Incoming::Queued));
        }
        self.stream.try_recv().map(|m| m.map(Incoming::Wire))
    }

    async fn decode(&mut self, msg: Incoming) -> Result<Option<Item>> {
        let msg = match msg {
            Incoming::Queued => return Ok(self.queued.pop_front()),
            Incoming::Wire(msg) => msg,
        };
        match msg {
            ReplicationMessage::XLogData {
                wal_start,
                data,
                budget,
            } => {
                let change = self.decoder.feed(wal_start, &data)?;
                // The decoded event owns its bytes: free the message (and its share of the
                // read-ahead) before publishing.
                drop((data, budget));
                Ok(match change {
                    None => None,
                    Some(Change::Boundary(lsn)) => {
                        // A commit's end, or a non-transactional message's position.
                        let commit = self.decoder.commit_end() == lsn;
                        self.witness(lsn, commit)?;
                        Some(Item::Boundary(lsn))
                    }
                    Some(Change::UnknownRelation(id)) => {
                        let table = self.published.table_oid;
                        let partition = self.reader.is_outbox_partition(id, table).await?;
                        self.decoder.classify(id, partition)?;
                        None
                    }
                    Some(Change::Poison { id, reason, raw }) => {
                        Some(Item::Malformed { id, reason, raw })
                    }
                    Some(Change::Event(event)) => Some(Item::Event(event)),
                    Some(Change::CapturedRelation(id, types)) => {
                        let catalog = self.reader.describe_captured(id, &types).await?;
                        self.decoder.capture(id, &catalog);
                        None
                    }
                    Some(Change::Changes(changes)) => {
                        self.queue(changes);
                        self.queued.pop_front()
                    }
                    Some(Change::Rows(rows, lsn)) => {
                        // A snapshot chunk's rows, then the high watermark's position.
                        self.queue(rows);
                        self.witness(lsn, false)?;
                        self.queued.push_back(Item::Boundary(lsn));
                        self.queued.pop_front()
                    }
                    Some(Change::Signal(signal, lsn)) => {
                        match &self.snapshots {
                            Some(s) => s.signal(self.reader.client(), signal, lsn).await?,
                            None => {
                                tracing::error!(signal = ?signal, "a snapshot signal, but no table is captured ([cdc] tables); ignored")
                            }
                        }
                        None
                    }
                    Some(Change::End(end, lsn)) => {
                        // The END record, then the commit's position (checked like any).
                        self.queue(end);
                        self.witness(lsn, true)?;
                        self.queued.push_back(Item::Boundary(lsn));
                        self.queued.pop_front()
                    }
                })
            }
            // Everything before wal_end was sent to us; outside a transaction it is safe once
            // the events before it are acknowledged. (Replies are the status task's: see
            // source::walsender.)
            ReplicationMessage::Keepalive { wal_end, .. } => {
                if self.decoder.in_transaction() {
                    return Ok(None);
                }
                self.witness(wal_end, false)?;
                Ok(Some(Item::Boundary(wal_end)))
            }
        }
    }

    async fn confirm(&mut self, position: u64) -> Result<()> {
        self.stream.confirm(position);
        if let Some(s) = &self.snapshots {
            s.confirmed(position);
        }
        tracing::trace!(lsn = %format_lsn(position), "confirmed");
        self.confirmed = position;
        Ok(())
    }

    async fn tick(&mut self, checkpoint: &mut Checkpoint, quiet: bool) -> Result<()> {
        // Also proves the session (and with it the leadership lock) is alive.
        match self
            .reader
            .verify_publication(Some(self.published.table_oid))
            .await
        {
            Ok(p) => {
                // Up to the *previous* check's position only, and only when no transaction
                // that existed then still waits for a synchronous standby: a DDL whose commit
                // record is below a position can be invisible to a catalog snapshot taken
                // right after reading it (its backend leaves the ProcArray only after flushing
                // and after any synchronous-replication wait). A second later such a commit is
                // visible — or it is one of those waiters, and nothing moves.
                if p.vouches_for(&self.published) {
                    checkpoint.limit(self.published.lsn);
                    self.trusted = self.published;
                } else {
                    tracing::debug!("a transaction older than the last check still waits for a synchronous standby (its commit is not visible yet); the publication check vouches for nothing new");
                }
                self.published = p;
            }
            Err(e @ Error::Setup { .. }) => return Err(lost_publication(e, &self.trusted)),
            Err(e) => return Err(e),
        }
        if let Some(s) = &mut self.snapshots {
            s.check().await?;
            if s.finished() {
                tracing::info!("cdc.snapshot.mode = initial_only: every snapshot is done and acknowledged; stopping");
                self.health.finish();
            }
        }
        if quiet {
            // Normally keepalives advance an idle slot; the heartbeat is the fallback.
            self.reader.heartbeat_if_wal_moved(self.confirmed).await?;
        }
        Ok(())
    }

    fn position(&self, position: u64) -> Result<(Position, Option<Witness>)> {
        let witness = self
            .decoder
            .last_event_txn()
            .map(|(xid, end_lsn)| Witness::Txn { xid, end_lsn });
        Ok((Position::Lsn(position), witness))
    }

    fn verified(&self) -> bool {
        self.verify.is_none()
    }

    async fn last_check(&mut self, checkpoint: &mut Checkpoint) {
        // Two last checks, a second apart, let the checkpoint reach the last acknowledged
        // transaction: the first proves the previous check's position, the second the first's
        // (see `tick`).
        let table = Some(self.published.table_oid);
        let bound = Duration::from_secs(5);
        let check = self.reader.verify_publication(table);
        let Ok(Ok(first)) = tokio::time::timeout(bound, check).await else {
            return;
        };
        if first.vouches_for(&self.published) {
            checkpoint.limit(self.published.lsn);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let check = self.reader.verify_publication(table);
        if let Ok(Ok(second)) = tokio::time::timeout(bound, check).await {
            if second.vouches_for(&first) {
                checkpoint.limit(first.lsn);
            }
        }
    }

    async fn finish(self, safe: u64) -> Result<()> {
        let limit = Duration::from_secs(5);
        let at = format_lsn(safe);
        match tokio::time::timeout(limit, self.stream.finish(safe)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(unconfirmed(&at, e.to_string())),
            Err(_) => {
                return Err(unconfirmed(
                    &at,
                    "PostgreSQL did not take the status update".into(),
                ))
            }
        }
        if safe > self.reader.confirmed() {
            // The walsender applies the update when it reads it: wait until the slot shows it.
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                match tokio::time::timeout_at(deadline, self.reader.state()).await {
                    Ok(Ok(state)) if state.confirmed_flush >= safe => break,
                    Ok(Ok(_)) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(Ok(state)) => {
                        let why =
                            format!("the slot stayed at {}", format_lsn(state.confirmed_flush));
                        return Err(unconfirmed(&at, why));
                    }
                    Ok(Err(e)) => return Err(unconfirmed(&at, e.to_string())),
                    Err(_) => return Err(unconfirmed(&at, "PostgreSQL did not answer".into())),
                }
            }
        }
        tracing::info!(confirmed_lsn = %at, "stopped; acknowledged events confirmed");
        Ok(())
    }
}
