//! Exactly-once delivery (`kafka.delivery = "exactly-once"`): when Kafka transactions
//! commit, and what the source may confirm.
//!
//! * A Kafka transaction begins with the first record after a commit and commits at a source
//!   transaction boundary once it is `kafka.transaction_ms` old or holds
//!   `kafka.transaction_max_events` events — many small source transactions per Kafka
//!   transaction. It never commits inside a source transaction: a source transaction larger
//!   than the bounds stays whole in one Kafka transaction (a consumer sees all of it or none),
//!   so it must be published within `transaction.timeout.ms` (librdkafka's default, 60 s,
//!   up to the broker's `transaction.max.timeout.ms`). One that cannot — it would be aborted
//!   by the broker and resent, taking as long again, for ever, each time reported as a
//!   fenced producer — stops the relay (exit code 2) once it has been open for half the
//!   timeout, naming the setting to raise (`relay::session`).
//! * The position reached rides inside the same transaction (`sink::positions`).
//! * The source is confirmed only up to the last *committed* position: while a transaction
//!   is open nothing it holds is confirmed, acknowledged or not (an acknowledged record of
//!   an aborted transaction is not delivered).
//! * After a restart, source transactions that end at or below the position read back are
//!   skipped: a crash between the Kafka commit and the slot confirmation repeats nothing.

use std::time::{Duration, Instant};

/// The state of a pipeline's Kafka transactions.
#[derive(Debug)]
pub struct Transactions {
    interval: Duration,
    max_events: u64,
    /// The open transaction: when it began, and the events sent before it.
    open: Option<(Instant, u64)>,
    /// The last source boundary (position, events sent before it) seen while the current
    /// transaction is open: where a commit now would end.
    boundary: Option<(u64, u64)>,
    /// The position of the last committed transaction, or the one read back at start.
    committed: u64,
    /// Source transactions whose commit LSN is below this are already in Kafka.
    resume_after: u64,
}

impl Transactions {
    /// `resume_after`: the position read back from the position topic (0: none).
    pub fn new(interval: Duration, max_events: u64, resume_after: u64) -> Transactions {
        Transactions {
            interval,
            max_events,
            open: None,
            boundary: None,
            committed: resume_after,
            resume_after,
        }
    }

    /// Whether the events of the source transaction committing at `commit_lsn` were
    /// committed to Kafka before this run started.
    pub fn already_published(&self, commit_lsn: u64) -> bool {
        commit_lsn < self.resume_after
    }

    /// A record is about to be sent; `sent` events were sent before it.
    pub fn sending(&mut self, sent: u64) {
        if self.open.is_none() {
            self.open = Some((Instant::now(), sent));
        }
    }

    /// A source position that ends everything before it; `sent` events were sent before it.
    pub fn boundary(&mut self, sent: u64, position: u64) {
        if self.open.is_some() {
            self.boundary = Some((position, sent));
        } else {
            // Nothing is open: nothing stands between the last commit and this position.
            self.committed = self.committed.max(position);
        }
    }

    /// The position a commit now would record: only when every event sent so far belongs to
    /// a source transaction that ended (`sent` events sent in all).
    pub fn committable(&self, sent: u64) -> Option<u64> {
        let (position, before) = self.boundary?;
        (self.open.is_some() && before == sent).then_some(position)
    }

    /// When the open transaction should commit: `None` while it cannot (nothing open, or
    /// inside a source transaction); now once it holds `max_events`; else when it is
    /// `interval` old.
    pub fn deadline(&self, sent: u64) -> Option<Instant> {
        self.committable(sent)?;
        let (since, first) = self.open?;
        if sent - first >= self.max_events {
            Some(Instant::now())
        } else {
            Some(since + self.interval)
        }
    }

    /// How long the open Kafka transaction has been open, if one is.
    pub fn open_for(&self) -> Option<Duration> {
        self.open.map(|(since, _)| since.elapsed())
    }

    /// The open transaction committed with `position`.
    pub fn committed(&mut self, position: u64) {
        self.committed = self.committed.max(position);
        self.open = None;
        self.boundary = None;
    }

    /// The highest source position that may be confirmed: the last committed one while a
    /// transaction is open, anything the checkpoint allows otherwise.
    pub fn ceiling(&self) -> u64 {
        if self.open.is_some() {
            self.committed
        } else {
            u64::MAX
        }
    }

    /// The position of the last commit.
    pub fn last_committed(&self) -> u64 {
        self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_of_an_open_transaction_is_confirmed_and_commits_wait_for_a_boundary() {
        let mut t = Transactions::new(Duration::ZERO, 1_000, 100);
        assert_eq!(t.ceiling(), u64::MAX, "nothing open");
        t.boundary(0, 150); // keepalive while idle
        assert_eq!(t.last_committed(), 150);
        t.sending(0);
        t.sending(1);
        assert_eq!(t.ceiling(), 150, "open: only the last commit");
        assert_eq!(t.committable(2), None, "no boundary yet");
        t.boundary(2, 200);
        assert_eq!(t.committable(2), Some(200));
        t.sending(2); // the next source transaction began
        assert_eq!(t.committable(3), None, "inside a source transaction");
        t.boundary(3, 300);
        assert!(t.deadline(3).is_some_and(|d| d <= Instant::now()));
        t.committed(300);
        assert_eq!(t.ceiling(), u64::MAX);
        assert_eq!(t.last_committed(), 300);
    }

    #[test]
    fn source_transactions_below_the_position_read_back_are_skipped() {
        let t = Transactions::new(Duration::from_secs(1), 10, 500);
        assert!(
            t.already_published(499),
            "its commit record starts before 500"
        );
        assert!(
            !t.already_published(500),
            "the next transaction starts at the end"
        );
    }

    #[test]
    fn a_transaction_is_due_by_size_before_its_time() {
        let mut t = Transactions::new(Duration::from_secs(3600), 3, 0);
        t.sending(10);
        t.boundary(12, 100);
        assert!(t.deadline(12).is_some_and(|d| d > Instant::now()));
        t.boundary(13, 200);
        assert!(t.deadline(13).is_some_and(|d| d <= Instant::now()));
    }
}
