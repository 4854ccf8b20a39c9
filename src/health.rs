//! What this instance knows about itself, shared by the relay, the monitor and the HTTP
//! endpoints. A plain mutex: it is never held across an `.await`.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Connecting, or retrying after an error.
    Starting,
    /// Healthy, waiting for the slot's lock.
    Standby,
    /// Holds the lock and publishes.
    Leader,
}

/// Facts about the slot, refreshed by the monitor.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotFacts {
    pub slot: String,
    pub confirmed_lsn: Option<String>,
    pub lag_bytes: Option<i64>,
    pub safe_wal_size_bytes: Option<i64>,
    pub wal_status: Option<String>,
    pub active_pid: Option<i32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub mode: &'static str,
    pub role: Role,
    pub postgres_reachable: bool,
    /// The configured sink (`sink`) answered the monitor's last probe.
    pub broker_reachable: bool,
    pub sink: &'static str,
    pub lag_seconds: f64,
    pub inflight: usize,
    pub slot: SlotFacts,
    pub max_slot_lag_bytes: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub version: &'static str,
}

#[derive(Debug)]
struct Inner {
    role: Role,
    postgres_ok: bool,
    broker_ok: bool,
    last_error: Option<(SystemTime, String)>,
    oldest_unacked_commit: Option<SystemTime>,
    /// Polling: when the oldest row not yet published was written (it may be held back by
    /// the snapshot horizon, with nothing in flight).
    oldest_pending: Option<SystemTime>,
    inflight: usize,
    slot: SlotFacts,
    /// Since when publishing keeps failing (None after progress).
    failing_since: Option<SystemTime>,
    /// The lag at each monitor tick, oldest first (the status page's chart).
    lag_history: VecDeque<(SystemTime, f64)>,
}

/// Lag samples kept: one per monitor tick (5 s) for 15 minutes.
const LAG_SAMPLES: usize = 180;

/// Dead letters kept for the status page, newest last.
const RECENT_DEAD_LETTERS: usize = 20;

/// An event dead-lettered by this process (the status page lists the latest).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterNote {
    #[serde(skip)]
    pub at: SystemTime,
    pub event_id: String,
    pub reason: &'static str,
    /// Where the event was going.
    pub destination: String,
    /// Where it went: the dead-letter topic (or subject, queue) or the table.
    pub to: &'static str,
    pub detail: String,
}

/// Process-wide, like the metrics: dead letters are written from places that do not hold a
/// [`Health`] (the window's settle path), and one process runs one relay.
static DEAD_LETTERS: Mutex<VecDeque<DeadLetterNote>> = Mutex::new(VecDeque::new());

/// Notes a dead letter for the status page (the newest [`RECENT_DEAD_LETTERS`]).
pub fn note_dead_letter(mut note: DeadLetterNote) {
    if note.detail.len() > 300 {
        let mut cut = 300;
        while !note.detail.is_char_boundary(cut) {
            cut -= 1;
        }
        note.detail.truncate(cut);
        note.detail.push('…');
    }
    let mut g = DEAD_LETTERS.lock().unwrap_or_else(|e| e.into_inner());
    if g.len() >= RECENT_DEAD_LETTERS {
        g.pop_front();
    }
    g.push_back(note);
}

/// The latest dead letters, oldest first.
pub fn recent_dead_letters() -> Vec<DeadLetterNote> {
    DEAD_LETTERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect()
}

#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
    mode: &'static str,
    /// The configured sink (`[sink] kind`): the broker readiness is about.
    sink: &'static str,
    max_slot_lag_bytes: u64,
    unready_after: std::time::Duration,
    /// The relay's work is done (`cdc.snapshot.mode = initial_only`): stop as on SIGTERM.
    finished: tokio::sync::Notify,
}

impl Health {
    /// Asks for a graceful stop: the work is done.
    pub fn finish(&self) {
        self.finished.notify_one();
    }

    /// Resolves once [`Health::finish`] was called.
    pub async fn finished(&self) {
        self.finished.notified().await;
    }

    pub fn new(
        mode: &'static str,
        sink: &'static str,
        slot: &str,
        max_slot_lag_bytes: u64,
        unready_after: std::time::Duration,
    ) -> Health {
        Health {
            inner: Mutex::new(Inner {
                role: Role::Starting,
                postgres_ok: false,
                broker_ok: false,
                last_error: None,
                oldest_unacked_commit: None,
                oldest_pending: None,
                inflight: 0,
                slot: SlotFacts {
                    slot: slot.to_string(),
                    ..SlotFacts::default()
                },
                failing_since: None,
                lag_history: VecDeque::new(),
            }),
            max_slot_lag_bytes,
            unready_after,
            mode,
            sink,
            finished: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_role(&self, role: Role) {
        self.lock().role = role;
        metrics::gauge!(crate::metrics::IS_LEADER).set(if role == Role::Leader {
            1.0
        } else {
            0.0
        });
    }

    pub fn set_postgres_ok(&self, ok: bool) {
        self.lock().postgres_ok = ok;
    }

    /// Whether the configured sink's broker answered the monitor's probe.
    pub fn set_broker_ok(&self, ok: bool) {
        self.lock().broker_ok = ok;
    }

    /// A session failed; publishing is failing from now on unless it already was.
    pub fn failing(&self) {
        let mut g = self.lock();
        g.failing_since.get_or_insert_with(SystemTime::now);
    }

    /// The position moved forward: publishing works.
    pub fn recovered(&self) {
        self.lock().failing_since = None;
    }

    pub fn record_error(&self, error: &str) {
        self.lock().last_error = Some((SystemTime::now(), error.to_string()));
    }

    /// The commit time of the oldest event handed to Kafka and not yet acknowledged, and the
    /// number in flight. Kept across a failed session: those events will be resent.
    pub fn set_inflight(&self, oldest_commit: Option<SystemTime>, inflight: usize) {
        let mut g = self.lock();
        g.oldest_unacked_commit = oldest_commit;
        g.inflight = inflight;
    }

    pub fn set_slot(&self, facts: SlotFacts) {
        self.lock().slot = facts;
    }

    /// How long publishing has kept failing (0 when it works).
    pub fn failing_for(&self) -> std::time::Duration {
        self.lock()
            .failing_since
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default()
    }

    /// Polling: when the oldest row the relay has not published yet was written.
    pub fn set_oldest_pending(&self, written: Option<SystemTime>) {
        self.lock().oldest_pending = written;
    }

    /// Age of the oldest event not yet acknowledged: in flight, or (polling) still waiting
    /// in the table — held back by a transaction that holds the snapshot horizon, the lag
    /// would otherwise read 0 while nothing is published.
    pub fn lag_seconds(&self) -> f64 {
        let g = self.lock();
        let age = |t: Option<SystemTime>| {
            t.and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or(0.0, |d| d.as_secs_f64())
        };
        age(g.oldest_unacked_commit).max(age(g.oldest_pending))
    }

    /// Records the lag now (the monitor calls this at every tick).
    pub fn sample_lag(&self) {
        let lag = self.lag_seconds();
        let mut g = self.lock();
        if g.lag_history.len() >= LAG_SAMPLES {
            g.lag_history.pop_front();
        }
        g.lag_history.push_back((SystemTime::now(), lag));
    }

    /// The lag samples of the last minutes, oldest first.
    pub fn lag_history(&self) -> Vec<(SystemTime, f64)> {
        self.lock().lag_history.iter().copied().collect()
    }

    /// When the last error was recorded, and what it said.
    pub fn last_error(&self) -> Option<(SystemTime, String)> {
        self.lock().last_error.clone()
    }

    /// `Ok(what)` when ready, `Err(reason)` otherwise — one line each.
    pub fn readiness(&self) -> Result<&'static str, String> {
        let g = self.lock();
        if !g.postgres_ok {
            return Err("PostgreSQL is not reachable".into());
        }
        if !g.broker_ok {
            return Err(format!("the broker ({}) is not reachable", self.sink));
        }
        if g.slot.wal_status.as_deref() == Some("lost") {
            return Err(format!(
                "replication slot {} is invalidated (wal_status = lost)",
                g.slot.slot
            ));
        }
        if let Some(since) = g.failing_since {
            let failing = SystemTime::now().duration_since(since).unwrap_or_default();
            if failing >= self.unready_after {
                return Err(format!(
                    "publishing has been failing for {} s (retry.unready_after_ms): {}",
                    failing.as_secs(),
                    g.last_error
                        .as_ref()
                        .map(|(_, e)| e.as_str())
                        .unwrap_or("?")
                ));
            }
        }
        if let Some(lag) = g.slot.lag_bytes {
            if lag > 0 && lag as u64 > self.max_slot_lag_bytes {
                return Err(format!(
                    "replication slot lag {lag} bytes exceeds postgres.max_slot_lag_bytes = {}",
                    self.max_slot_lag_bytes
                ));
            }
        }
        match g.role {
            Role::Leader => Ok("leader, publishing"),
            Role::Standby => Ok("standby"),
            Role::Starting => Err(match &g.last_error {
                Some((_, e)) => format!("not publishing: {e}"),
                None => "starting".into(),
            }),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let lag_seconds = self.lag_seconds();
        let g = self.lock();
        Snapshot {
            mode: self.mode,
            role: g.role,
            postgres_reachable: g.postgres_ok,
            broker_reachable: g.broker_ok,
            sink: self.sink,
            lag_seconds,
            inflight: g.inflight,
            slot: g.slot.clone(),
            max_slot_lag_bytes: self.max_slot_lag_bytes,
            last_error: g.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: g.last_error.as_ref().map(|(t, _)| {
                let secs = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                format!("{secs} (unix seconds)")
            }),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}
