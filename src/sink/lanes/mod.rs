//! Batching for the sinks whose brokers take records in batch requests with a result per
//! entry (SQS `SendMessageBatch`, and the same shape elsewhere): one loop, written once.
//!
//! ## Order, and why a batch is never all-or-nothing
//!
//! Records go to one of N *lanes* by a hash of (destination, key); a lane sends one batch at
//! a time and waits for its answer, so one key's records reach the broker in sending order
//! while N requests are in flight for different keys. A batch request answers entry by
//! entry: some entries may be stored while others are refused, so each record's delivery
//! resolves with its own entry's result — never with the batch's.
//!
//! A refusal that is not about the record itself (throttling, an internal error, no answer)
//! *breaks* the lane: every record queued behind it in that lane fails at once without
//! being sent, and the session ends and resends from the confirmed position. Were the lane
//! to go on, a later record of the same key could be stored before the refused one's resend
//! — a FIFO queue would then hold a group out of order, and its deduplication would drop the
//! resend of the later record, not repair the order. For the same reason a batch for a
//! destination that keeps order holds at most one record per key: were the first refused and
//! the second stored in the same request, nothing could undo it. A refusal about the record
//! alone (too large, invalid) does not break the lane: that record is dead-lettered and the
//! key's later records follow it.
//!
//! ## A short queue per lane
//!
//! A lane queues at most [`QUEUED_BATCHES`] batches; beyond that `send` answers "queue full"
//! and the window waits for acknowledgements. So a record handed to the sink is sent within a
//! few requests' time, and the window's stall bound (`delivery_timeout_ms`) measures the
//! broker, not a queue in front of it. Measured: with the lanes holding the window's 10,000
//! records, a server answering a `PublishBatch` in ~100 ms (moto) kept records queued longer
//! than a 5 s bound, and every session ended as a stall after a few hundred events.
//!
//! The lanes end with the sink (their tasks are aborted on drop): a request of a session that
//! ended cannot be answered into the next one.
//!
//! ## Fewer requests at once after the endpoint failed one
//!
//! How many lanes may have a request in flight together is [`Concurrency`]'s limit, learned
//! across sessions: a session whose request the endpoint failed for its own reasons (no
//! answer in time, throttled, a server error) halves it once for the next session, and
//! answered requests grow it back (see `sink::concurrency`). Which lane a record takes does
//! not change.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use super::concurrency::Concurrency;
use super::{BoxDelivery, Class, Failed, Landed, Refusal, SendError};
use crate::route::Record;

/// How many full batches a lane queues behind the one in flight.
pub const QUEUED_BATCHES: usize = 3;

/// The limits of one batch request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

/// A broker API that takes a batch of entries for one destination and answers per entry.
pub trait BatchApi: Send + Sync + 'static {
    type Entry: Send + 'static;

    /// Sends `entries` to `dest`. `Ok` holds one result per entry, in order; `Err` is a
    /// refusal of the whole request (every entry's outcome unknown).
    fn send_batch(
        &self,
        dest: &str,
        entries: Vec<Self::Entry>,
    ) -> impl Future<Output = Result<Vec<Result<(), Refusal>>, Refusal>> + Send;
}

/// One record on its way: its entry, where it goes, and who waits for its result.
struct Item<E> {
    dest: Arc<str>,
    /// One key per batch, for destinations that keep order.
    key: Option<u64>,
    entry: E,
    bytes: usize,
    /// The record, handed back with a refusal about it (for the dead-letter destination).
    record: Box<Record>,
    done: oneshot::Sender<Result<Landed, Failed>>,
}

/// The lanes of one sink (one session).
pub struct Lanes<E> {
    senders: Vec<mpsc::Sender<Item<E>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// One session's share of the [`Concurrency`] limit: the permits its lanes take per request,
/// and whether it already halved the limit (once per session: the requests that fail together
/// in one burst are one sign of congestion, not several).
struct Gate {
    concurrency: Arc<Concurrency>,
    permits: Semaphore,
    halved: AtomicBool,
}

impl Gate {
    fn answered(&self) {
        if self.concurrency.answered() {
            self.permits.add_permits(1);
        }
    }

    fn failed(&self) {
        if !self.halved.swap(true, Ordering::Relaxed) {
            self.concurrency.failed();
        }
    }
}

impl<E: Send + 'static> Lanes<E> {
    /// `n` lanes over `api`, each queueing up to [`QUEUED_BATCHES`] batches, with at most
    /// `concurrency`'s limit of them sending at once.
    pub fn start<A: BatchApi<Entry = E>>(
        api: Arc<A>,
        n: usize,
        limits: Limits,
        concurrency: Arc<Concurrency>,
    ) -> Lanes<E> {
        let depth = limits.max_entries * QUEUED_BATCHES;
        let limit = concurrency.limit();
        if limit < concurrency.max() {
            tracing::info!(
                requests_in_flight = limit,
                max = concurrency.max(),
                "sending fewer requests at once: the endpoint failed one in an earlier session"
            );
        }
        let gate = Arc::new(Gate {
            permits: Semaphore::new(limit.max(1)),
            concurrency,
            halved: AtomicBool::new(false),
        });
        let mut senders = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let (tx, rx) = mpsc::channel(depth.max(1));
            senders.push(tx);
            tasks.push(tokio::spawn(run_lane(
                api.clone(),
                rx,
                limits,
                gate.clone(),
            )));
        }
        Lanes { senders, tasks }
    }

    /// Queues `entry` for `dest`; `ordered`: the destination keeps per-key order (one record
    /// per key in a batch). The delivery resolves with the entry's own result.
    pub fn send(
        &self,
        dest: Arc<str>,
        ordered: bool,
        record: &Record,
        entry: E,
        bytes: usize,
    ) -> Result<BoxDelivery, SendError> {
        let mut h = DefaultHasher::new();
        dest.hash(&mut h);
        record.key.hash(&mut h);
        let hash = h.finish();
        let lane = &self.senders[(hash % self.senders.len() as u64) as usize];
        let (done, result) = oneshot::channel();
        let item = Item {
            dest,
            key: ordered.then_some(hash),
            entry,
            bytes,
            record: Box::new(record.clone()),
            done,
        };
        lane.try_send(item).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SendError::Refused(lane_gone()),
        })?;
        Ok(Box::pin(async move {
            result.await.unwrap_or_else(|_| {
                Err(Failed {
                    refusal: lane_gone(),
                    record: None,
                })
            })
        }))
    }
}

impl<E> Drop for Lanes<E> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lane_gone() -> Refusal {
    Refusal {
        class: Class::Cluster,
        code: String::new(),
        detail: "the sink's sending task ended".into(),
        alone: false,
    }
}

/// Whether a refusal leaves the lane usable (it is about the record alone).
fn breaks_lane(r: &Refusal) -> bool {
    !matches!(r.class, Class::Record(_))
}

async fn run_lane<A: BatchApi>(
    api: Arc<A>,
    mut rx: mpsc::Receiver<Item<A::Entry>>,
    limits: Limits,
    gate: Arc<Gate>,
) {
    let mut queued: VecDeque<Item<A::Entry>> = VecDeque::new();
    let mut broken: Option<String> = None;
    loop {
        if queued.is_empty() {
            match rx.recv().await {
                Some(item) => queued.push_back(item),
                None => return,
            }
        }
        while queued.len() < limits.max_entries * 4 {
            match rx.try_recv() {
                Ok(item) => queued.push_back(item),
                Err(_) => break,
            }
        }
        if let Some(reason) = &broken {
            for item in queued.drain(..) {
                let _ = item.done.send(Err(Failed {
                    refusal: Refusal {
                        class: Class::Cluster,
                        code: String::new(),
                        detail: format!(
                            "not sent: an earlier record of its lane failed ({reason})"
                        ),
                        alone: false,
                    },
                    record: None,
                }));
            }
            continue;
        }
        let batch = take_batch(&mut queued, limits);
        let Some(first) = batch.first() else { continue };
        let dest = first.dest.clone();
        let mut entries = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for item in batch {
            entries.push(item.entry);
            waiting.push((item.done, item.record));
        }
        // The semaphore is never closed; were it, the request goes without a permit.
        let permit = gate.permits.acquire().await.ok();
        let answer = api.send_batch(&dest, entries).await;
        drop(permit);
        match &answer {
            Ok(_) => gate.answered(),
            Err(refusal) if refusal.class == Class::Cluster => gate.failed(),
            Err(_) => {}
        }
        match answer {
            Ok(results) => {
                let mut results = results.into_iter();
                for (done, record) in waiting {
                    let result = results.next().unwrap_or_else(|| {
                        Err(Refusal {
                            class: Class::Cluster,
                            code: String::new(),
                            detail: "the broker's answer has no result for this entry".into(),
                            alone: false,
                        })
                    });
                    let result = result.map(|()| Landed::default()).map_err(|refusal| {
                        if breaks_lane(&refusal) && broken.is_none() {
                            broken = Some(refusal.detail.clone());
                        }
                        Failed {
                            refusal,
                            record: Some(record),
                        }
                    });
                    let _ = done.send(result);
                }
            }
            Err(refusal) => {
                // The whole request was refused (a broker whose requests are all-or-nothing,
                // or no answer): every record gets the refusal and, for a dead letter when it
                // travelled alone and the refusal is about it, the record.
                broken = Some(refusal.detail.clone());
                for (done, record) in waiting {
                    let _ = done.send(Err(Failed {
                        refusal: refusal.clone(),
                        record: Some(record),
                    }));
                }
            }
        }
    }
}

/// The longest prefix of `queued` that fits one request: one destination, the limits, and at
/// most one record per key where order is kept. Never skips a record (order within a lane).
fn take_batch<E>(queued: &mut VecDeque<Item<E>>, limits: Limits) -> Vec<Item<E>> {
    let mut batch: Vec<Item<E>> = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queued.front() {
        if let Some(first) = batch.first() {
            let fits = next.dest == first.dest
                && batch.len() < limits.max_entries
                && bytes + next.bytes <= limits.max_bytes
                && next
                    .key
                    .is_none_or(|k| batch.iter().all(|b| b.key != Some(k)));
            if !fits {
                break;
            }
        }
        let Some(item) = queued.pop_front() else {
            break;
        };
        bytes += item.bytes;
        batch.push(item);
    }
    batch
}

#[cfg(test)]
mod tests;
