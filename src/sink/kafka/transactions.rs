//! Exactly-once: the transactional producer's configuration and its operations — init
//! (fencing), commit, abort — and how their errors read (fenced, or end the session). When to
//! commit is `crate::transaction`'s; the relay drives it (`crate::relay`).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;

use super::{client_config, KafkaSink};
use crate::config::KafkaConfig;
use crate::error::{Error, Result};
use crate::sink::classify;

/// The producer configuration for exactly-once delivery: a transactional producer. A
/// record that times out fails its transaction (which is then aborted and resent whole), so
/// unlike at-least-once mode a timeout cannot reorder anything: `message.timeout.ms` follows
/// `transaction.timeout.ms`, as librdkafka requires.
pub(super) fn transactional_config(cfg: &KafkaConfig, transactional_id: &str) -> ClientConfig {
    let mut c = client_config(cfg);
    let txn_timeout = cfg
        .properties
        .get("transaction.timeout.ms")
        .cloned()
        .unwrap_or_else(|| "60000".into());
    c.set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", &txn_timeout)
        .set("message.timeout.ms", &txn_timeout);
    c
}

/// A transactional operation's error: fenced (another instance took over: the producer
/// failed for good, or the broker said fenced), or anything else (the session ends and
/// resends from the last committed position).
fn txn_error(
    what: &str,
    detail: String,
    fenced_code: bool,
    fatal: Option<(RDKafkaErrorCode, String)>,
) -> Error {
    match fatal {
        // The producer itself is done for (librdkafka purges its queue): say why.
        Some((code, reason)) => Error::Fenced(format!(
            "{what}: {detail}; the producer failed for good ({code:?}: {reason}); another instance with the same transactional.id took over"
        )),
        None if fenced_code => Error::Fenced(format!(
            "{what}: {detail}; another instance with the same transactional.id took over"
        )),
        None => Error::Kafka(format!("{what}: {detail}")),
    }
}

/// A transactional call's error says this producer was fenced: a fencing code
/// (`sink::classify`'s one list), or a transactional error librdkafka calls fatal.
fn says_fenced(e: &KafkaError) -> bool {
    e.rdkafka_error_code().is_some_and(classify::fences)
        || matches!(e, KafkaError::Transaction(r) if r.is_fatal())
}

impl KafkaSink {
    /// Exactly-once: registers this producer's `transactional.id` with the cluster, which
    /// fences every earlier producer with the same id and aborts its open transaction.
    pub async fn init_transactions(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.init_transactions(timeout))
            .await
            .map_err(|e| Error::Kafka(format!("init_transactions task failed: {e}")))?
            .map_err(|e| self.txn_error("initialising transactions", e))
    }

    /// A transactional operation's error, read together with the producer's fatal error.
    pub(super) fn txn_error(&self, what: &str, e: KafkaError) -> Error {
        txn_error(
            what,
            e.to_string(),
            says_fenced(&e),
            self.producer.client().fatal_error(),
        )
    }

    /// [`KafkaSink::txn_error`] for a refusal already classified.
    pub(super) fn txn_failure(&self, what: &str, detail: String) -> Error {
        txn_error(what, detail, false, self.producer.client().fatal_error())
    }

    /// Exactly-once: a transaction is open.
    pub fn txn_open(&self) -> bool {
        self.txn_open
    }

    /// Exactly-once: commits the open transaction (every record sent since it began is
    /// flushed first). An error leaves the transaction aborted or the producer fenced: the
    /// session must end and resend from the last committed position.
    pub async fn commit(&mut self, timeout: Duration) -> Result<()> {
        if !self.txn_open {
            return Ok(());
        }
        // rdkafka's commit_transaction flushes first, and its flush polls in steps of 100 ms
        // while librdkafka still counts an event (say, a delivery report the producer's own
        // thread is about to serve): measured, a 100 ms stall in one commit of ten. Every
        // record is acknowledged by now, so wait (briefly) for that count to reach zero.
        for _ in 0..100 {
            if self.producer.in_flight_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let producer = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || producer.commit_transaction(timeout))
            .await
            .map_err(|e| Error::Kafka(format!("commit task failed: {e}")))?;
        self.txn_open = false;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = self.txn_error("committing a transaction", e);
                if !matches!(err, Error::Fenced(_)) {
                    self.abort(timeout).await;
                }
                Err(err)
            }
        }
    }

    /// Exactly-once: aborts the open transaction, if any (best effort: a producer that
    /// cannot abort is dropped with the session, and its transaction times out or is
    /// aborted by the next `init_transactions`).
    pub async fn abort(&mut self, timeout: Duration) {
        if !self.transactional {
            return;
        }
        self.txn_open = false;
        let producer = self.producer.clone();
        match tokio::task::spawn_blocking(move || producer.abort_transaction(timeout)).await {
            Ok(Ok(())) => tracing::info!("kafka transaction aborted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "aborting the kafka transaction failed"),
            Err(e) => tracing::warn!(error = %e, "abort task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transactional call refused with librdkafka's own `Fenced` reads as fencing, as the
    /// broker's two codes do (it was "end the session and resend": the list here lacked it).
    #[test]
    fn a_transactional_call_refused_with_any_fencing_code_reads_as_fenced() {
        for code in [
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::InvalidProducerEpoch,
            RDKafkaErrorCode::Fenced,
        ] {
            assert!(
                says_fenced(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        assert!(!says_fenced(&KafkaError::MessageProduction(
            RDKafkaErrorCode::NotCoordinator
        )));
        assert!(matches!(
            txn_error("committing", "x".into(), true, None),
            Error::Fenced(_)
        ));
        assert!(matches!(
            txn_error("committing", "x".into(), false, None),
            Error::Kafka(_)
        ));
    }
}
