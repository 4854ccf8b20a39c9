//! Kafka transactions around a session (`kafka.delivery = "exactly-once"`): where the
//! pipeline resumes, and how a transaction commits with its position. When to commit is
//! `crate::transaction`'s.

use std::time::Instant;

use super::session::Eos;
use crate::config::Config;
use crate::dead_letter::DlqTable;
use crate::error::{Error, Result};
use crate::health::Health;
use crate::metrics as m;
use crate::sink::broker::Broker;
use crate::sink::kafka::KafkaSink;
use crate::sink::positions::{self, Committed, Position, Witness};
use crate::source::pgoutput::format_lsn;
use crate::source::polling::Cursor;
use crate::window::Window;

/// Where an exactly-once pipeline resumes in logical mode.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Resume {
    /// Source transactions committing below this are already in Kafka.
    pub skip_below: u64,
    /// The witness the stream must show before anything is confirmed: the (xid, end LSN) of
    /// the last transaction with events Kafka holds (`sink::positions`), when the slot is not
    /// already past it.
    pub verify: Option<(u32, u64)>,
}

/// Exactly-once: registers the producer (fencing any earlier one with the same
/// `transactional.id`) and reads the pipeline's last committed position back. A position
/// beyond this database's WAL belongs to another database (or a restored copy): stopping is
/// the only safe answer, since skipping to it could skip events never published. One within
/// it is trusted only as far as its witness, which the stream must show (`slot_confirmed`:
/// the slot's position; a slot already past the witness has nothing to prove).
pub(super) async fn resume_position(
    cfg: &Config,
    sink: &KafkaSink,
    pipeline: &str,
    wal_now: u64,
    slot_confirmed: u64,
) -> Result<Resume> {
    let committed = registered_position(cfg, sink, pipeline).await?;
    let resume = match committed.map(|c| (c.position, c.witness)) {
        None => Resume::default(),
        Some((Position::Lsn(lsn), witness)) if lsn <= wal_now => match witness {
            Some(Witness::Txn { xid, end_lsn }) => Resume {
                skip_below: end_lsn,
                verify: (end_lsn > slot_confirmed).then_some((xid, end_lsn)),
            },
            _ => {
                tracing::warn!(pipeline, position = %format_lsn(lsn), "exactly-once: the last position was written by an older outboxd without a witness of its WAL history; resuming by it unchecked (after a restore or failover, reset it: README, exactly-once)");
                Resume {
                    skip_below: lsn,
                    verify: None,
                }
            }
        },
        Some((Position::Lsn(lsn), _)) => {
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
        Some((Position::Cursor { .. }, _)) => {
            return Err(Error::setup(
                format!("the position topic {} holds a polling cursor for pipeline {pipeline}, which runs in logical mode", cfg.kafka.position_topic),
                "give each pipeline its own kafka.transactional_id, or reset the position",
            ))
        }
    };
    tracing::info!(pipeline, skip_below = %format_lsn(resume.skip_below), verify = resume.verify.is_some(), "exactly-once: resuming after the last committed Kafka transaction");
    Ok(resume)
}

/// Registers the producer (fencing earlier ones) and reads the last committed position.
async fn registered_position(
    cfg: &Config,
    sink: &KafkaSink,
    pipeline: &str,
) -> Result<Option<Committed>> {
    let timeout = cfg.kafka.delivery_timeout;
    sink.init_transactions(timeout).await?;
    positions::read_last(&cfg.kafka, pipeline, timeout * 2).await
}

/// Polling mode's [`resume_position`]: the cursor of the last committed Kafka transaction,
/// and the event id its row must hold (`None` from an older outboxd).
pub(super) async fn resume_cursor(
    cfg: &Config,
    sink: &KafkaSink,
    pipeline: &str,
) -> Result<Option<(Cursor, Option<String>)>> {
    match registered_position(cfg, sink, pipeline)
        .await?
        .map(|c| (c.position, c.witness))
    {
        None => Ok(None),
        Some((Position::Cursor { xid, seq }, witness)) => Ok(Some((
            (xid, seq),
            match witness {
                Some(Witness::Row { event_id }) => Some(event_id),
                _ => None,
            },
        ))),
        Some((Position::Lsn(_), _)) => Err(Error::setup(
            format!("the position topic {} holds a replication position for pipeline {pipeline}, which runs in polling mode", cfg.kafka.position_topic),
            "give each pipeline its own kafka.transactional_id, or reset the position",
        )),
    }
}

/// Writes `position` into the open transaction and commits it.
async fn commit_with_position(
    cfg: &Config,
    sink: &mut KafkaSink,
    pipeline: &str,
    (position, witness): (Position, Option<Witness>),
) -> Result<()> {
    let started = Instant::now();
    positions::write(sink, &cfg.kafka.position_topic, pipeline, position, witness).await?;
    sink.commit(cfg.kafka.delivery_timeout).await?;
    metrics::counter!(m::TRANSACTIONS_COMMITTED).increment(1);
    metrics::histogram!(m::TRANSACTION_COMMIT).record(started.elapsed().as_secs_f64());
    Ok(())
}

/// Exactly-once: commits the open Kafka transaction with its position (`describe` turns the
/// source's position into the record written to the position topic).
pub(super) async fn commit(
    cfg: &Config,
    window: &mut Window<'_>,
    sink: &mut Broker,
    dlq: &DlqTable<'_>,
    eos: &mut Eos,
    describe: impl Fn(u64) -> Result<(Position, Option<Witness>)>,
    health: &Health,
) -> Result<()> {
    let Some(position) = eos.transactions.committable(window.sent) else {
        return Ok(());
    };
    let started = Instant::now();
    // Every record acknowledged first: a refused one is named (and dead-lettered in the next
    // transaction) rather than only failing the commit.
    while !window.is_empty() {
        let settled = window
            .settle_reporting(cfg.kafka.delivery_timeout, health)
            .await?;
        window.handle(settled, sink, dlq).await?;
    }
    let drained = started.elapsed();
    let record = describe(position)?;
    commit_with_position(cfg, sink.kafka()?, &eos.pipeline, record).await?;
    window.ledger.committed();
    eos.transactions.committed(position);
    tracing::debug!(
        position,
        drained_ms = drained.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "kafka transaction committed"
    );
    Ok(())
}

/// Sleeps until `at`, or forever.
pub(super) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
