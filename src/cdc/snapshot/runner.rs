//! The snapshot runner: one task per relay session, beside the stream. It takes the
//! snapshots the progress table says are running, one table at a time, reads each in chunks
//! over `cdc.snapshot.readers` connections in parallel, and records a chunk as done only
//! once the checkpoint passed its high watermark — every row of it and before it
//! acknowledged. Chunks read ahead are bounded (four per reader), so memory stays bounded
//! whatever the table's size: what the stream emitted sits in the delivery window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use super::chunk::{Plan, READER_SETTINGS};
use super::progress::{self, Job, Progress};
use super::watermark::{Board, Place};
use crate::config::PostgresConfig;
use crate::error::{Error, Result};

/// What the runner needs from the session.
pub struct Runner {
    pub cfg: PostgresConfig,
    pub progress: Progress,
    pub board: Arc<Board>,
    pub confirmed: watch::Receiver<u64>,
    pub wake: Arc<Notify>,
}

/// How one table's run ended.
enum Ended {
    Done,
    /// Paused, stopped, or replaced by a new request: look at the table again.
    Interrupted,
}

async fn connect(cfg: &PostgresConfig) -> Result<Client> {
    let client = crate::pg::connect(&cfg.url, "outboxd-snapshot").await?;
    client
        .batch_execute(READER_SETTINGS)
        .await
        .map_err(|e| Error::pg("setting up a snapshot reader session", e))?;
    Ok(client)
}

fn gauges(job: &Job) {
    let table = job.name();
    metrics::gauge!(crate::metrics::SNAPSHOT_ROWS_DONE, "table" => table.clone())
        .set(job.rows_done as f64);
    if let Some(n) = job.rows_estimated {
        metrics::gauge!(crate::metrics::SNAPSHOT_ROWS_ESTIMATED, "table" => table).set(n as f64);
    }
}

impl Runner {
    /// Until the session ends: every running snapshot, oldest request first.
    pub async fn run(mut self, finished: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
        let client = connect(&self.cfg).await?;
        loop {
            let jobs = self.progress.all(&client).await?;
            let running = jobs.iter().find(|j| j.state == progress::RUNNING).cloned();
            let Some(job) = running else {
                let left = jobs
                    .iter()
                    .any(|j| j.state == progress::RUNNING || j.state == progress::PAUSED);
                finished.store(!left, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                continue;
            };
            finished.store(false, std::sync::atomic::Ordering::Relaxed);
            match self.table(&client, job.clone()).await {
                Ok(Ended::Done | Ended::Interrupted) => {}
                Err(e @ Error::Setup { .. }) => {
                    tracing::error!(table = %job.name(), error = %e, "snapshot failed; its table's changes stream on");
                    let reason = e.to_string();
                    self.progress
                        .end(&client, &job, progress::FAILED, Some(&reason))
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the job's row still says it runs, as this request.
    async fn still(&self, client: &Client, job: &Job) -> Result<bool> {
        Ok(self
            .progress
            .get(client, &job.schema, &job.table)
            .await?
            .is_some_and(|j| j.state == progress::RUNNING && j.generation == job.generation))
    }

    async fn table(&mut self, client: &Client, mut job: Job) -> Result<Ended> {
        if !self.cfg.captures(&job.schema, &job.table) {
            // Its rows would go to a topic nothing streams to any more.
            return Err(Error::setup(
                format!("table {} is not captured any more (cdc.tables)", job.name()),
                "capture it again, or ignore this snapshot",
            ));
        }
        let plan = Plan::load(
            client,
            &self.cfg,
            &job.schema,
            &job.table,
            job.filter.clone(),
        )
        .await?;
        if job.max_key.is_none() {
            let max = plan.max_key(client).await?;
            let estimate = plan.estimate(client).await?;
            let Some(max) = max else {
                tracing::info!(table = %job.name(), "snapshot: the table is empty");
                self.progress
                    .end(client, &job, progress::DONE, None)
                    .await?;
                return Ok(Ended::Done);
            };
            self.progress
                .begin(client, &job, Some(&max), estimate)
                .await?;
            job.max_key = Some(max);
            job.rows_estimated = estimate;
            tracing::info!(table = %job.name(), rows_estimated = estimate, filter = job.filter.as_deref().unwrap_or(""), signal = %job.signal_id, "snapshot started");
        } else {
            tracing::info!(table = %job.name(), rows_done = job.rows_done, chunks_done = job.chunks_done, "snapshot resumed after its last acknowledged chunk");
        }
        let max = job.max_key.clone().unwrap_or_default();
        let size = self.cfg.cdc.snapshot.chunk_size;
        let readers = self.cfg.cdc.snapshot.readers as usize;
        let plan = Arc::new(plan);
        let mut idle = Vec::new();
        for _ in 0..readers {
            idle.push(connect(&self.cfg).await?);
        }
        let mut reading: JoinSet<Result<(Client, u64, usize)>> = JoinSet::new();
        // Chunks handed out, in key order: id → (upper key, rows read once read).
        let mut pending: BTreeMap<u64, (Vec<String>, Option<usize>)> = BTreeMap::new();
        let mut next_id = 0u64;
        let mut lo = job.done_key.clone();
        let mut exhausted = false;
        let mut first = job.initial && job.chunks_done == 0;
        let started = Instant::now();
        let rows_at_start = job.rows_done;
        let mut logged = Instant::now();
        let mut saved = Instant::now();
        let mut dirty = false;
        let mut interrupted = false;
        loop {
            // Hand out chunks while a reader is free and not too many wait for the stream
            // (those hold rows in memory; emitted ones are in the delivery window).
            loop {
                let unemitted = pending
                    .iter()
                    .filter(|(id, (_, read))| {
                        *read != Some(0) && self.board.emitted(**id).is_none()
                    })
                    .count();
                let room =
                    unemitted < readers * AHEAD_PER_READER && pending.len() < MAX_UNCONFIRMED;
                if exhausted || interrupted || idle.is_empty() || !room {
                    break;
                }
                let hi = match plan.boundary(client, lo.as_deref(), &max, size).await? {
                    Some(hi) => hi,
                    None => {
                        exhausted = true;
                        max.clone()
                    }
                };
                let Some(reader) = idle.pop() else { break };
                next_id += 1;
                let id = next_id;
                let place = if job.initial {
                    Place::Initial {
                        first,
                        last: exhausted,
                    }
                } else {
                    Place::Incremental
                };
                first = false;
                tracing::debug!(table = %job.name(), chunk = id, lo = ?lo, hi = ?hi, "snapshot chunk handed out");
                pending.insert(id, (hi.clone(), None));
                let from = lo.replace(hi.clone());
                let (plan, board, cdc) = (plan.clone(), self.board.clone(), self.cfg.cdc.clone());
                reading.spawn(async move {
                    let n = plan
                        .read(&cdc, &reader, &board, id, from.as_deref(), &hi, place)
                        .await?;
                    Ok((reader, id, n))
                });
            }
            if pending.is_empty() {
                break;
            }
            tokio::select! {
                r = reading.join_next(), if !reading.is_empty() => {
                    let (reader, id, n) = r.ok_or_else(|| Error::setup("snapshot reader vanished", "report this as a bug in outboxd"))?
                        .map_err(|e| Error::setup(format!("a snapshot reader failed: {e}"), "report this as a bug in outboxd"))??;
                    idle.push(reader);
                    tracing::debug!(table = %job.name(), chunk = id, rows = n, "snapshot chunk read");
                    if let Some(p) = pending.get_mut(&id) {
                        p.1 = Some(n);
                    }
                }
                _ = self.board.emitted.notified() => {}
                _ = self.confirmed.changed() => {}
                _ = self.wake.notified() => {
                    interrupted |= !self.still(client, &job).await?;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    interrupted |= !self.still(client, &job).await?;
                }
            }
            // The acknowledged prefix: chunks read, emitted, and confirmed past.
            let confirmed = *self.confirmed.borrow();
            while let Some((&id, (hi, read))) = pending.first_key_value() {
                let Some(read) = *read else { break };
                let rows = if read == 0 {
                    0
                } else {
                    match self.board.emitted(id) {
                        Some((lsn, rows)) if lsn <= confirmed => rows,
                        _ => break,
                    }
                };
                job.done_key = Some(hi.clone());
                job.rows_done += rows as i64;
                job.chunks_done += 1;
                self.board.forget(id);
                pending.remove(&id);
                dirty = true;
            }
            if interrupted && reading.is_empty() {
                break;
            }
            if dirty && (saved.elapsed() >= Duration::from_secs(1) || pending.is_empty()) {
                self.progress.advance(client, &job).await?;
                gauges(&job);
                saved = Instant::now();
                dirty = false;
            }
            if logged.elapsed() >= Duration::from_secs(10) {
                logged = Instant::now();
                log_progress(&job, rows_at_start, started.elapsed());
            }
        }
        if dirty {
            self.progress.advance(client, &job).await?;
        }
        gauges(&job);
        if interrupted {
            let now = self.progress.get(client, &job.schema, &job.table).await?;
            tracing::info!(table = %job.name(), rows_done = job.rows_done, state = now.map(|j| j.state).unwrap_or_default(), "snapshot interrupted by a signal");
            return Ok(Ended::Interrupted);
        }
        self.progress
            .end(client, &job, progress::DONE, None)
            .await?;
        let secs = started.elapsed().as_secs_f64().max(0.001);
        tracing::info!(table = %job.name(), rows = job.rows_done, chunks = job.chunks_done, seconds = format!("{secs:.1}"), rows_per_s = ((job.rows_done - rows_at_start) as f64 / secs) as u64, "snapshot done: every row acknowledged");
        Ok(Ended::Done)
    }
}

/// Chunks read ahead per reader that the stream has not emitted yet (they hold rows).
const AHEAD_PER_READER: usize = 4;

/// Chunks emitted and not yet confirmed past (their keys only are kept): a confirmation
/// that stalls this long stops the reading.
const MAX_UNCONFIRMED: usize = 10_000;

fn log_progress(job: &Job, rows_at_start: i64, elapsed: Duration) {
    let rate = (job.rows_done - rows_at_start) as f64 / elapsed.as_secs_f64().max(0.001);
    let eta = job
        .rows_estimated
        .filter(|_| rate > 0.0)
        .map(|n| ((n - job.rows_done).max(0) as f64 / rate) as u64);
    tracing::info!(table = %job.name(), rows_done = job.rows_done, rows_estimated = job.rows_estimated, rows_per_s = rate as u64, eta_s = eta, "snapshot progress");
}
