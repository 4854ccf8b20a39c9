//! The delivery ledger: an independent check of the relay's one promise — the source (slot,
//! cursor, exactly-once position) is never confirmed past an event that was not delivered.
//!
//! The checkpoint (`crate::checkpoint`) proves that promise by *counting*: events numbered in
//! sending order, boundaries recorded with the count before them. A bug anywhere in that
//! arithmetic — a count bumped for a delivery that did not succeed, a boundary recorded with
//! the wrong count, an event that never reached the window — would move the slot past an event
//! silently, and no test that counts arrivals could tell a loss from a slow delivery. The
//! ledger keeps what the counts stand for, per event: its id, the source position that may not
//! be confirmed before it is settled, and whether its own delivery report said *delivered*
//! (or its dead letter was stored, or exactly-once skipped it as already committed). Every
//! confirmation is checked against it first; a violation stops the relay (exit code 3) with
//! the event id and both positions, before the source is told anything.
//!
//! It costs a map entry per event in flight, so it is on in debug builds and wherever
//! `OUTBOXD_CHECK_LEDGER=1` is set (the test suite and the benchmarks set it), and a no-op
//! otherwise.
//!
//! Positions follow the source's order: confirming `P` requires every event whose position
//! is *below* `P` to be settled (logical: the event's commit LSN — a slot confirmed at or
//! below a commit record decodes that transaction again; polling: the ordinal before the
//! event's own boundary).

use std::collections::BTreeMap;

/// The environment switch that turns the ledger on in a release build.
pub const ENV: &str = "OUTBOXD_CHECK_LEDGER";

/// A yielded event the ledger waits on (`None` when the ledger is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(Option<(u64, u64)>);

/// A confirmation that would pass an event that was not settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub event_id: String,
    /// The position the event was yielded at.
    pub event_position: u64,
    /// The position about to be confirmed.
    pub confirm: u64,
    /// What became of the event so far.
    pub state: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivery ledger violation: confirming position {} would pass event {} (position {}), which is {}",
            self.confirm, self.event_id, self.event_position, self.state
        )
    }
}

#[derive(Debug)]
struct Entry {
    id: String,
    /// Exactly-once: delivered inside a Kafka transaction not yet committed.
    in_transaction: bool,
}

/// Events yielded by the source and not yet settled, by (position, sequence).
#[derive(Debug, Default)]
pub struct Ledger {
    enabled: bool,
    open: BTreeMap<(u64, u64), Entry>,
    next: u64,
}

impl Ledger {
    /// On in debug builds, or when [`ENV`] is `1`.
    pub fn from_env() -> Ledger {
        let on = cfg!(debug_assertions) || std::env::var(ENV).is_ok_and(|v| v == "1");
        Ledger::new(on)
    }

    pub fn new(enabled: bool) -> Ledger {
        Ledger {
            enabled,
            open: BTreeMap::new(),
            next: 0,
        }
    }

    /// The source yielded event `id` at `position`.
    pub fn yielded(&mut self, id: &str, position: u64) -> Ticket {
        if !self.enabled {
            return Ticket(None);
        }
        self.next += 1;
        let key = (position, self.next);
        self.open.insert(
            key,
            Entry {
                id: id.to_string(),
                in_transaction: false,
            },
        );
        Ticket(Some(key))
    }

    /// The event's own delivery report said delivered, its dead letter was stored, or it
    /// was skipped as already committed (exactly-once).
    pub fn settled(&mut self, ticket: Ticket) {
        if let Ticket(Some(key)) = ticket {
            self.open.remove(&key);
        }
    }

    /// Exactly-once: delivered (or dead-lettered) inside the open Kafka transaction; settled
    /// only when it commits ([`Ledger::committed`]).
    pub fn in_transaction(&mut self, ticket: Ticket) {
        if let Ticket(Some(key)) = ticket {
            if let Some(e) = self.open.get_mut(&key) {
                e.in_transaction = true;
            }
        }
    }

    /// Exactly-once: the open Kafka transaction committed; what it held is settled.
    pub fn committed(&mut self) {
        self.open.retain(|_, e| !e.in_transaction);
    }

    /// `Err` if confirming `position` would pass an event that is not settled.
    pub fn check(&self, position: u64) -> Result<(), Violation> {
        match self.open.first_key_value() {
            Some((&(at, _), e)) if at < position => Err(Violation {
                event_id: e.id.clone(),
                event_position: at,
                confirm: position,
                state: if e.in_transaction {
                    "in a Kafka transaction not committed"
                } else {
                    "not acknowledged by the broker nor dead-lettered"
                },
            }),
            _ => Ok(()),
        }
    }

    /// Events yielded and not settled.
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn confirming_past_an_unsettled_event_is_a_violation_naming_it() {
        let mut l = Ledger::new(true);
        let a = l.yielded("a", 100);
        let b = l.yielded("b", 200);
        assert_eq!(
            l.check(100),
            Ok(()),
            "at its own commit position: decoded again"
        );
        let v = l.check(101).unwrap_err();
        assert_eq!(
            (v.event_id.as_str(), v.event_position, v.confirm),
            ("a", 100, 101)
        );
        l.settled(b);
        assert!(l.check(150).is_err(), "b settled, a still open");
        l.settled(a);
        assert_eq!(l.check(u64::MAX), Ok(()));
        assert_eq!(l.open(), 0);
    }

    #[test]
    fn exactly_once_settles_only_at_the_commit() {
        let mut l = Ledger::new(true);
        let a = l.yielded("a", 10);
        l.in_transaction(a);
        let v = l.check(11).unwrap_err();
        assert_eq!(v.state, "in a Kafka transaction not committed");
        l.committed();
        assert_eq!(l.check(11), Ok(()));
    }

    #[test]
    fn a_ledger_that_is_off_checks_nothing() {
        let mut l = Ledger::new(false);
        l.yielded("a", 1);
        assert_eq!(l.check(u64::MAX), Ok(()));
    }
}
