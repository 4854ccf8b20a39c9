//! How many batch requests the lanes (`sink::lanes`) may have in flight together, learned
//! across sessions: halved when the endpoint fails a request for its own reasons, grown back
//! one step per round of requests it answers (additive increase, multiplicative decrease).
//!
//! ## The lesson
//!
//! Seen with moto under load: every request took longer than `aws.request_timeout_ms` with
//! eight in flight. The session ended at the first timeout (a lane that got no answer breaks,
//! see `sink::lanes`), the next resent the whole window with eight in flight again, which
//! loaded the endpoint again — nothing was lost, but progress nearly stopped. A throttling or
//! failing endpoint (HTTP 429/5xx) is the same shape. So the limit outlives the session that
//! learned it: the next session sends at most half as many requests at once, and only
//! requests answered grow it back to `max_concurrent_requests`.
//!
//! Only how many requests are in flight changes, never which lane a record takes: a key's
//! records still go through one lane, one request at a time, in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The limit of one sink, shared by its sessions.
#[derive(Debug)]
pub struct Concurrency {
    name: &'static str,
    max: usize,
    limit: AtomicUsize,
    /// Requests answered since the limit last grew.
    answered: AtomicUsize,
}

impl Concurrency {
    /// A limit starting at `max` (at least 1).
    pub fn new(name: &'static str, max: usize) -> Concurrency {
        let max = max.max(1);
        Concurrency {
            name,
            max,
            limit: AtomicUsize::new(max),
            answered: AtomicUsize::new(0),
        }
    }

    /// The process's limit for sink `name` (`sqs`, `pubsub`, …): what an earlier session
    /// learned carries into the next.
    pub fn shared(name: &'static str, max: usize) -> Arc<Concurrency> {
        static ALL: OnceLock<Mutex<HashMap<&'static str, Arc<Concurrency>>>> = OnceLock::new();
        let all = ALL.get_or_init(|| Mutex::new(HashMap::new()));
        match all.lock() {
            Ok(mut all) => all
                .entry(name)
                .or_insert_with(|| Arc::new(Concurrency::new(name, max)))
                .clone(),
            // A panic elsewhere poisoned the map: this session learns on its own.
            Err(_) => Arc::new(Concurrency::new(name, max)),
        }
    }

    /// Requests allowed in flight now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// The endpoint failed a whole request for its own reasons (no answer in time, throttled,
    /// a server error): halve the limit (not below 1). Returns the new limit.
    pub fn failed(&self) -> usize {
        self.answered.store(0, Ordering::Relaxed);
        let before = self
            .limit
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some((l / 2).max(1))
            })
            .unwrap_or(1);
        let now = (before / 2).max(1);
        if now < before {
            tracing::warn!(
                sink = self.name,
                requests_in_flight = now,
                max = self.max,
                "the endpoint failed a request: the next session sends fewer requests at once, growing back as requests are answered"
            );
        }
        self.publish(now);
        now
    }

    /// The endpoint answered a request: one step toward `max` per round of `limit` answers.
    /// Returns true when the limit grew (the caller lets one more request through).
    pub fn answered(&self) -> bool {
        let limit = self.limit();
        if limit >= self.max {
            return false;
        }
        if self.answered.fetch_add(1, Ordering::Relaxed) + 1 < limit {
            return false;
        }
        self.answered.store(0, Ordering::Relaxed);
        let grew = self
            .limit
            .compare_exchange(limit, limit + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if grew {
            self.publish(limit + 1);
            if limit + 1 == self.max {
                tracing::info!(
                    sink = self.name,
                    requests_in_flight = self.max,
                    "the endpoint answers again: back to the configured requests at once"
                );
            }
        }
        grew
    }

    fn publish(&self, limit: usize) {
        metrics::gauge!(crate::metrics::SINK_REQUESTS_ALLOWED, "sink" => self.name)
            .set(limit as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit halves on each failed request down to one, and comes back to the maximum
    /// only through answered requests, one step per round of `limit` answers.
    #[test]
    fn a_failing_endpoint_halves_the_requests_in_flight_and_answers_grow_them_back() {
        let c = Concurrency::new("test", 8);
        assert_eq!(c.limit(), 8);
        assert!(!c.answered(), "at the maximum it does not grow");
        assert_eq!(c.failed(), 4);
        assert_eq!(c.failed(), 2);
        assert_eq!(c.failed(), 1);
        assert_eq!(c.failed(), 1, "never below one");
        // 1 → 2 after one answer, 2 → 3 after two more, 3 → 4 after three …
        let mut answers = 0;
        while c.limit() < 8 {
            c.answered();
            answers += 1;
            assert!(answers < 100, "never grew back");
        }
        assert_eq!(answers, 1 + 2 + 3 + 4 + 5 + 6 + 7);
        assert_eq!(c.failed(), 4);
    }

    #[test]
    fn the_limit_a_session_learned_is_the_next_sessions() {
        let a = Concurrency::shared("test-shared", 6);
        a.failed();
        let b = Concurrency::shared("test-shared", 6);
        assert_eq!(b.limit(), 3);
    }
}
