//! What a failed session teaches the next ([`Lessons`]), kept by the relay across sessions
//! and lent to each session's window (`crate::window`).
//!
//! A refusal that is about a record cannot be believed while the record travelled in a batch:
//! a broker that refuses a batch refuses every record in it (KIP-467 brokers name the culprit
//! and answer `_INVALID_DIFFERENT_RECORD` for the others). So a session that meets such a
//! refusal ends, and the next sends records one at a time until every **suspect** — each
//! record of the refused batch that failed — has been settled alone; a suspect refused alone
//! is poison, and is **dead-lettered** in its place from then on. Both are sets: a backfill
//! may put several refused records in one source transaction, and the slot cannot pass any of
//! them until the transaction is whole, so every session resends all of them — one remembered
//! record would be overwritten by the next, for ever (review A2). A suspect leaves the set
//! when it settles alone, and what a session did not reach is handed back (review C3: a
//! suspect remembered for ever kept every later session one record at a time).
//!
//! An error that could be about the record or the cluster (`sink::classify::Class::Unclear`)
//! is retried; identical failures of the same record in a row — counted only while other
//! records are acknowledged in the same session, else the whole cluster may be refusing — are
//! dead-lettered after `kafka.max_record_retries` with reason `retries_exhausted`.

use std::collections::{HashMap, HashSet};

use crate::error::Error;
use crate::poison::{Poison, PoisonKind};

/// The most dead-letter decisions remembered; past it they are forgotten (and learned again,
/// at the cost of a few sessions, if their events come back).
const MAX_DEAD_LETTERS: usize = 10_000;

#[derive(Debug, Default)]
pub struct Lessons {
    /// Dead-letter these events instead of sending them: refused alone, or failed the same
    /// way too often.
    dead_letter: HashMap<String, Poison>,
    /// Records of a refused batch not yet settled alone: while any is left, records go one at
    /// a time.
    suspects: HashSet<String>,
    /// (event id, code, count) of identical unclear failures in a row.
    last: Option<(String, String, u32)>,
}

impl Lessons {
    /// Whether records must travel one at a time (a suspect is still to be settled alone).
    pub fn isolating(&self) -> bool {
        !self.suspects.is_empty()
    }

    /// Suspects and dead-letter decisions, for the session's start line.
    pub fn counts(&self) -> (usize, usize) {
        (self.suspects.len(), self.dead_letter.len())
    }

    /// Event `id` was settled alone: it is no longer a suspect.
    pub fn settled_alone(&mut self, id: &str) {
        self.suspects.remove(id);
    }

    /// Why event `id` must be dead-lettered instead of sent, if it must.
    pub fn dead_letter(&self, id: &str) -> Option<&Poison> {
        self.dead_letter.get(id)
    }

    fn decide(&mut self, id: &str, poison: Poison) {
        if self.dead_letter.len() >= MAX_DEAD_LETTERS {
            self.dead_letter.clear();
        }
        self.suspects.remove(id);
        self.dead_letter.insert(id.to_string(), poison);
    }

    /// Learns from the error that ended a session.
    pub fn learn(&mut self, e: &Error, max: u32) {
        match e {
            Error::Suspect { event_ids, .. } => {
                self.suspects.extend(
                    event_ids
                        .iter()
                        .filter(|id| !self.dead_letter.contains_key(*id))
                        .cloned(),
                );
            }
            Error::Refused { event_id, poison } => self.decide(event_id, poison.clone()),
            Error::Delivery {
                event_id: Some(id),
                code,
                message,
                others_acked,
            } => {
                if !others_acked {
                    // Nothing else got through either: maybe the whole cluster refuses.
                    // Retry, and never dead-letter on this evidence.
                    return;
                }
                let count = match &self.last {
                    Some((i, c, n)) if i == id && c == code => n + 1,
                    _ => 1,
                };
                if count >= max {
                    tracing::error!(event_id = %id, code = %code, count, "the same record failed the same way too often; it will be dead-lettered (retries_exhausted)");
                    self.decide(
                        id,
                        Poison {
                            kind: PoisonKind::RetriesExhausted,
                            detail: format!("failed {count} times in a row: {message}"),
                        },
                    );
                    self.last = None;
                } else {
                    self.last = Some((id.clone(), code.clone(), count));
                }
            }
            // A failure of the cluster breaks the series.
            _ => self.last = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(id: &str) -> Error {
        Error::Refused {
            event_id: id.into(),
            poison: Poison {
                kind: PoisonKind::InvalidTimestamp,
                detail: "old".into(),
            },
        }
    }

    #[test]
    fn two_refused_records_of_one_transaction_are_both_remembered() {
        let mut l = Lessons::default();
        l.learn(
            &Error::Suspect {
                event_ids: vec!["x".into(), "a".into(), "y".into()],
                message: String::new(),
            },
            3,
        );
        assert!(l.isolating());
        l.settled_alone("a");
        l.learn(&refused("x"), 3);
        l.learn(&refused("y"), 3);
        assert!(l.dead_letter("x").is_some() && l.dead_letter("y").is_some());
        assert!(!l.isolating(), "every suspect settled or decided");
    }

    #[test]
    fn a_settled_suspect_no_longer_slows_later_sessions() {
        let mut l = Lessons::default();
        l.learn(
            &Error::Suspect {
                event_ids: vec!["x".into()],
                message: String::new(),
            },
            3,
        );
        l.settled_alone("x");
        assert!(!l.isolating());
    }

    #[test]
    fn unclear_failures_dead_letter_only_while_others_get_through() {
        let mut l = Lessons::default();
        let failed = |others_acked| Error::Delivery {
            event_id: Some("x".into()),
            code: "Unknown".into(),
            message: String::new(),
            others_acked,
        };
        l.learn(&failed(false), 2);
        l.learn(&failed(false), 2);
        assert!(l.dead_letter("x").is_none());
        l.learn(&failed(true), 2);
        l.learn(&failed(true), 2);
        assert_eq!(
            l.dead_letter("x").map(|p| p.kind),
            Some(PoisonKind::RetriesExhausted)
        );
    }
}
