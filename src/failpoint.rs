//! Failpoints: named faults a test can switch on in a debug build (`OUTBOXD_FAILPOINT=name`)
//! to prove that a check catches the bug it is there for. A release build compiles every
//! failpoint to `false`.
//!
//! * `drop_first_event` — the session loop forgets the first event it reads (yields it to the
//!   delivery ledger, never publishes it): the bug class the ledger exists to stop.
//! * `implicit_ack_first_record` — the Kafka sink does not send the first record and reports
//!   it delivered without an offset, as librdkafka does when it wrongly infers a failed
//!   batch was written (issue 16, `sink::kafka::topics`): the relay must not believe it.

/// Whether failpoint `name` is switched on.
pub fn active(name: &str) -> bool {
    cfg!(debug_assertions)
        && std::env::var("OUTBOXD_FAILPOINT").is_ok_and(|v| v.split(',').any(|f| f == name))
}
