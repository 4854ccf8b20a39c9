//! Contiguous-acknowledgement tracking.
//!
//! Events are numbered in the order they were handed to Kafka. A *boundary* is a source
//! position that is safe to confirm once every event numbered before it was acknowledged: the
//! end LSN of a transaction's commit record, or the LSN of a non-transactional logical message
//! (everything before it in the WAL was decoded). The checkpoint is the highest boundary whose
//! events are all acknowledged — never a position with an unacknowledged event before it.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct Checkpoint {
    /// (events sent before this boundary, position)
    boundaries: VecDeque<(u64, u64)>,
    /// Events acknowledged in sending order, counted from the start.
    acked: u64,
    /// Highest position proven safe.
    safe: Option<u64>,
}

impl Checkpoint {
    pub fn new() -> Checkpoint {
        Checkpoint::default()
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
            if sent > self.acked {
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

#[cfg(test)]
mod tests {
    use super::*;

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
