//! Contiguous-acknowledgement tracking.
//!
//! Events are numbered in the order they were handed to Kafka. A *boundary* is a source
//! position that is safe to confirm once every event numbered before it was acknowledged: the
//! end LSN of a transaction's commit record, or the LSN of a non-transactional logical message
//! (everything before it in the WAL was decoded). The checkpoint is the highest boundary whose
//! events are all acknowledged — never a position with an unacknowledged event before it.
//!
//! A second condition can hold boundaries back: a *limit* below which the source could
//! verify that nothing was missed (in logical mode: the WAL position at which the outbox
//! table was last seen in the publication). A boundary beyond the limit waits, acknowledged
//! or not, until the limit passes it; so a table that silently left the publication can never
//! let the slot pass the first event that was not relayed.

use std::collections::VecDeque;

#[derive(Debug)]
pub struct Checkpoint {
    /// (events sent before this boundary, position)
    boundaries: VecDeque<(u64, u64)>,
    /// Events acknowledged in sending order, counted from the start.
    acked: u64,
    /// Highest position proven safe.
    safe: Option<u64>,
    /// Boundaries above this position wait (`u64::MAX`: no limit).
    limit: u64,
}

impl Checkpoint {
    /// A checkpoint without a limit.
    pub fn new() -> Checkpoint {
        Checkpoint::limited(u64::MAX)
    }

    /// A checkpoint that holds back every boundary above `limit` until [`Checkpoint::limit`]
    /// raises it.
    pub fn limited(limit: u64) -> Checkpoint {
        Checkpoint {
            boundaries: VecDeque::new(),
            acked: 0,
            safe: None,
            limit,
        }
    }

    /// Raises the limit: boundaries up to `limit` may now become safe.
    pub fn limit(&mut self, limit: u64) {
        self.limit = self.limit.max(limit);
        self.settle();
    }

    /// Records that `position` becomes safe once the first `sent` events are acknowledged.
    pub fn boundary(&mut self, sent: u64, position: u64) {
        self.boundaries.push_back((sent, position));
        self.settle();
    }

    /// Records that the first `acked` events (in sending order) are acknowledged.
    pub fn acked(&mut self, acked: u64) {
        debug_assert!(acked >= self.acked);
        self.acked = self.acked.max(acked);
        self.settle();
    }

    fn settle(&mut self) {
        while let Some(&(sent, position)) = self.boundaries.front() {
            if sent > self.acked || position > self.limit {
                break;
            }
            self.safe = Some(self.safe.map_or(position, |s| s.max(position)));
            self.boundaries.pop_front();
        }
    }

    /// The highest position whose preceding events are all acknowledged, if any.
    pub fn safe_position(&self) -> Option<u64> {
        self.safe
    }
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_beyond_the_verified_limit_wait_even_when_acknowledged() {
        let mut c = Checkpoint::limited(150);
        c.boundary(1, 100);
        c.boundary(2, 200);
        c.acked(2);
        assert_eq!(c.safe_position(), Some(100), "200 is beyond the limit");
        c.limit(199);
        assert_eq!(c.safe_position(), Some(100));
        c.limit(250);
        assert_eq!(c.safe_position(), Some(200));
        c.limit(10);
        c.boundary(2, 240);
        assert_eq!(c.safe_position(), Some(240), "a limit never moves back");
    }

    #[test]
    fn position_waits_for_every_earlier_event() {
        let mut c = Checkpoint::new();
        c.boundary(2, 100); // txn A: events 0,1
        c.boundary(5, 200); // txn B: events 2,3,4
        assert_eq!(c.safe_position(), None);
        c.acked(1);
        assert_eq!(c.safe_position(), None, "event 1 of txn A not acknowledged");
        c.acked(2);
        assert_eq!(c.safe_position(), Some(100));
        c.acked(4);
        assert_eq!(
            c.safe_position(),
            Some(100),
            "txn B still has event 4 outstanding"
        );
        c.acked(5);
        assert_eq!(c.safe_position(), Some(200));
    }

    #[test]
    fn boundary_without_events_is_safe_once_earlier_events_are() {
        let mut c = Checkpoint::new();
        c.boundary(0, 50); // heartbeat before any event
        assert_eq!(c.safe_position(), Some(50));
        c.boundary(1, 60);
        c.boundary(1, 70); // heartbeat after the transaction
        assert_eq!(c.safe_position(), Some(50));
        c.acked(1);
        assert_eq!(c.safe_position(), Some(70));
    }
}
