//! Snapshots: the existing rows of a captured table, as `op = "r"` events on its topic,
//! while the stream goes on — initial (a table this pipeline never snapshotted) and
//! incremental (asked for by `outboxd snapshot` or a Debezium signal).
//!
//! The lesson they carry is Debezium's pain: a snapshot that stops streaming for hours pins
//! WAL, one that restarts from zero after a failure never ends on a large table, and one
//! that reads rows without regard to the stream can put an old row after a newer change.
//! So:
//!
//! * **Never stops streaming** — DBLog's watermarks ([`watermark`], [`chunk`]): each chunk
//!   is read between a low and a high watermark in the WAL, and a row whose key the stream
//!   changed inside that window is dropped (the stream's event is at least as new). The
//!   slot keeps confirming streamed changes; no exported snapshot is held open.
//! * **Resumable** — progress lives in PostgreSQL ([`progress`]): a chunk counts as done
//!   once the checkpoint passed its high watermark; a killed relay resumes after the last
//!   such chunk. At most the chunks not yet confirmed are read again.
//! * **Bounded** — chunks are read ahead at most four per reader; emitted rows go through
//!   the delivery window like any event.
//! * **Steerable** — [`signal`]: Debezium's signal table unchanged, or `outboxd.signal`
//!   messages; start, pause, resume, stop.
//!
//! [`Snapshots`] is the session's handle: it records signals, starts the [`runner`], and
//! tells it how far the slot was confirmed.

pub mod chunk;
pub mod progress;
pub mod request;
pub mod runner;
pub mod signal;
pub mod watermark;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tokio_postgres::Client;

use self::progress::Progress;
use self::signal::Signal;
use self::watermark::Board;
use crate::cdc::select::Glob;
use crate::config::{PostgresConfig, SnapshotMode};
use crate::error::{Error, Result};

/// The session's snapshots.
pub struct Snapshots {
    cfg: PostgresConfig,
    board: Arc<Board>,
    confirmed: watch::Sender<u64>,
    wake: Arc<Notify>,
    progress: Progress,
    task: tokio::task::JoinHandle<Result<()>>,
    finished: Arc<AtomicBool>,
}

impl Drop for Snapshots {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A run id: watermarks of other processes (or sessions) are not this one's.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}", std::process::id())
}

impl Snapshots {
    /// `None` when no table is captured. Records the initial snapshots the mode asks for
    /// (`slot_created`: the slot was created by this start) and starts the runner.
    pub async fn start(
        cfg: &PostgresConfig,
        client: &Client,
        confirmed: u64,
        slot_created: bool,
    ) -> Result<Option<Snapshots>> {
        if !cfg.cdc.enabled() {
            return Ok(None);
        }
        let progress = Progress::new(&cfg.schema, &cfg.slot);
        progress.ensure(client, &cfg.schema).await?;
        let mode = cfg.cdc.snapshot.mode;
        if mode != SnapshotMode::Never {
            let known = progress.all(client).await?;
            for t in crate::cdc::catalog::captured_tables(client, cfg).await? {
                let seen = known
                    .iter()
                    .any(|j| j.schema == t.schema && j.table == t.table);
                let again = mode == SnapshotMode::WhenNeeded && slot_created;
                if seen && !again {
                    continue;
                }
                if !t.has_primary_key && !t.has_identity_index {
                    tracing::error!(table = %format!("{}.{}", t.schema, t.table), "the table has no primary key: its existing rows cannot be snapshotted (its changes stream on); add a primary key, then `outboxd snapshot --table`");
                    continue;
                }
                let why = if again {
                    "the slot was created anew"
                } else {
                    "first captured"
                };
                tracing::info!(table = %format!("{}.{}", t.schema, t.table), why, "initial snapshot requested");
                progress
                    .request(client, &t.schema, &t.table, "initial", None, true)
                    .await?;
            }
        }
        let board = Board::new(run_id());
        let (tx, rx) = watch::channel(confirmed);
        let wake = Arc::new(Notify::new());
        let finished = Arc::new(AtomicBool::new(false));
        let runner = runner::Runner {
            cfg: cfg.clone(),
            progress: Progress::new(&cfg.schema, &cfg.slot),
            board: board.clone(),
            confirmed: rx,
            wake: wake.clone(),
        };
        let task = tokio::spawn(runner.run(finished.clone()));
        Ok(Some(Snapshots {
            cfg: cfg.clone(),
            board,
            confirmed: tx,
            wake,
            progress,
            task,
            finished,
        }))
    }

    pub fn board(&self) -> Arc<Board> {
        self.board.clone()
    }

    /// The slot was confirmed up to `lsn`.
    pub fn confirmed(&self, lsn: u64) {
        self.confirmed.send_replace(lsn);
    }

    /// The runner's failure, once it failed (the session ends with it, and the next one
    /// resumes the snapshot).
    pub async fn check(&mut self) -> Result<()> {
        if !self.task.is_finished() {
            return Ok(());
        }
        match (&mut self.task).await {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) | Err(_) => Err(Error::setup(
                "the snapshot runner ended",
                "report this as a bug in outboxd",
            )),
        }
    }

    /// `initial_only`: every snapshot is done and acknowledged.
    pub fn finished(&self) -> bool {
        self.cfg.cdc.snapshot.mode == SnapshotMode::InitialOnly
            && self.finished.load(Ordering::Relaxed)
    }

    /// A signal the stream carried at `lsn`: recorded in the progress table before the slot
    /// can pass it. A replayed signal (same id and position) is not applied twice.
    pub async fn signal(&self, client: &Client, signal: Signal, lsn: u64) -> Result<()> {
        let id = format!(
            "{}@{}",
            signal.id(),
            crate::source::pgoutput::format_lsn(lsn)
        );
        tracing::info!(signal = ?signal, "snapshot signal");
        match signal {
            Signal::Execute { tables, .. } => {
                let captured = crate::cdc::catalog::captured_tables(client, &self.cfg).await?;
                let jobs = self.progress.all(client).await?;
                for (pattern, filter) in tables {
                    let glob = Glob::new(&pattern);
                    let matched: Vec<_> = captured
                        .iter()
                        .filter(|t| glob.matches(&format!("{}.{}", t.schema, t.table)))
                        .collect();
                    if matched.is_empty() {
                        metrics::counter!(crate::metrics::SNAPSHOT_SIGNALS_REFUSED).increment(1);
                        tracing::error!(signal = %id, table = %pattern, "a snapshot signal names no captured table; nothing is snapshotted for it (check cdc.tables)");
                    }
                    for t in matched {
                        if jobs.iter().any(|j| {
                            j.schema == t.schema && j.table == t.table && j.signal_id == id
                        }) {
                            continue;
                        }
                        self.progress
                            .request(client, &t.schema, &t.table, &id, filter.as_deref(), false)
                            .await?;
                    }
                }
            }
            Signal::Stop { tables, .. } => {
                let names: Option<Vec<(String, String)>> = if tables.is_empty() {
                    None
                } else {
                    let jobs = self.progress.all(client).await?;
                    Some(
                        jobs.into_iter()
                            .filter(|j| tables.iter().any(|p| Glob::new(p).matches(&j.name())))
                            .map(|j| (j.schema, j.table))
                            .collect(),
                    )
                };
                let from = [progress::RUNNING, progress::PAUSED];
                self.progress
                    .transition(client, names.as_deref(), &from, progress::STOPPED)
                    .await?;
            }
            Signal::Pause { .. } => {
                self.progress
                    .transition(client, None, &[progress::RUNNING], progress::PAUSED)
                    .await?;
            }
            Signal::Resume { .. } => {
                self.progress
                    .transition(client, None, &[progress::PAUSED], progress::RUNNING)
                    .await?;
            }
        }
        self.wake.notify_one();
        Ok(())
    }
}
