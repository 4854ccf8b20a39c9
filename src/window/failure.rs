//! What a sink's refusal means for the session: dead-letter the record now, send its batch
//! alone to find the culprit, or end the session and resend — and whether a repeat of the
//! same refusal counts toward `retries_exhausted` (`crate::lessons`).

use crate::error::Error;
use crate::metrics as m;
use crate::route::{Poison, PoisonKind, Record};
use crate::sink::{classify, Class, Refusal};

/// Why a delivery did not succeed (see `sink::classify`).
pub enum Failure {
    /// About the cluster or the connection: resend from the confirmed position, forever.
    Cluster { code: String, message: String },
    /// About the record or the cluster: resend; the relay counts repeats of the same record.
    Unclear {
        id: Option<String>,
        code: String,
        message: String,
        /// The broker answered about this record ([`Class::Absent`]): it is up, so the
        /// repeat counts even if nothing else was acknowledged.
        answered: bool,
    },
    /// Refused for a reason about the record, but in a batch: maybe about a batchmate.
    Suspect { id: String, poison: Poison },
    /// Kafka will never accept this record.
    Poison {
        id: Option<String>,
        record: Record,
        poison: Poison,
    },
}

/// The error that ends a session for a failure that is not the record's own.
///
/// Exactly-once (`transactional`): a record refused because the producer's epoch is stale
/// means another instance initialised the same `transactional.id` — this one was fenced, as
/// much as a refused commit says so (which the relay meets first is timing). It is said and
/// handled as fencing (leave leadership, no lesson about the record), not as a failed
/// delivery. In at-least-once mode the same code is the idempotent producer's own state,
/// which a fresh producer resumes: retried like any cluster failure.
pub(super) fn failure_error(failure: Failure, others_acked: bool, transactional: bool) -> Error {
    match failure {
        Failure::Cluster { code, message } if transactional && classify::fences_named(&code) => {
            Error::Fenced(format!(
                "a delivery was refused with {code}, another instance holds the producer: {message}"
            ))
        }
        Failure::Cluster { message, .. } => Error::Publish(format!(
            "delivery failed, resending from the last confirmed position: {message}"
        )),
        Failure::Unclear {
            id,
            code,
            message,
            answered,
        } => Error::Delivery {
            event_id: id,
            code,
            others_acked: others_acked || answered,
            message: format!(
                "delivery failed, resending from the last confirmed position: {message}"
            ),
        },
        Failure::Suspect { id, poison } => Error::Suspect {
            message: format!(
                "event {id} was refused ({}: {}), maybe only because of its batch; sending it alone",
                poison.kind.label(),
                poison.detail
            ),
            event_ids: vec![id],
        },
        Failure::Poison { poison, .. } => Error::Publish(format!(
            "a refused record was not dead-lettered: {}",
            poison.detail
        )),
    }
}

/// Where a refusal surfaced: whether it can be believed to be about this record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// Refused before it left the process: a check of this one record.
    Send,
    /// In a delivery report of a record that travelled with others: maybe a batchmate's.
    InBatch,
    /// In the delivery report of a record sent alone.
    Alone,
}

/// What a sink's refusal of the record `id` to `topic` means for the session.
pub(super) fn failure(
    refusal: Refusal,
    seen: Seen,
    id: Option<String>,
    topic: &str,
    record: Option<Record>,
) -> Failure {
    let message = format!(
        "event {} to topic {topic}: {}",
        id.as_deref().unwrap_or("?"),
        refusal.detail
    );
    if !refusal.code.is_empty() {
        let label = match refusal.class {
            Class::Record(_) => "record",
            Class::Batchmate => "batchmate",
            Class::Cluster => "cluster",
            Class::Unclear | Class::Absent => "unclear",
        };
        metrics::counter!(m::DELIVERY_FAILURES, "class" => label, "code" => refusal.code.clone())
            .increment(1);
    }
    match refusal.class {
        Class::Record(kind) => {
            let poison = Poison {
                kind,
                detail: refusal.detail,
            };
            match (seen, id, record) {
                (Seen::InBatch, Some(id), _) => Failure::Suspect { id, poison },
                (_, id, Some(record)) => Failure::Poison { id, record, poison },
                // Nothing left to dead-letter: resend it.
                (_, id, None) => Failure::Unclear {
                    id,
                    code: refusal.code,
                    message,
                    answered: false,
                },
            }
        }
        // Refused for another record of its batch: find which, sending them alone.
        Class::Batchmate => match (seen, id) {
            (Seen::InBatch, Some(id)) => Failure::Suspect {
                id,
                poison: Poison {
                    kind: PoisonKind::Rejected,
                    detail: refusal.detail,
                },
            },
            (_, id) => Failure::Unclear {
                id,
                code: refusal.code,
                message,
                answered: false,
            },
        },
        Class::Cluster => Failure::Cluster {
            code: refusal.code,
            message,
        },
        Class::Unclear | Class::Absent => Failure::Unclear {
            id,
            code: refusal.code,
            message,
            answered: refusal.class == Class::Absent,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(class: Class) -> Refusal {
        Refusal {
            class,
            code: "NotFound".into(),
            detail: "gone".into(),
            alone: true,
        }
    }

    fn others_acked(class: Class) -> Option<bool> {
        let f = failure(refusal(class), Seen::Send, Some("e-1".into()), "q", None);
        match failure_error(f, false, false) {
            Error::Delivery { others_acked, .. } => Some(others_acked),
            _ => None,
        }
    }

    /// A missing destination at the head of a session: nothing else was sent, nothing acked.
    /// The broker's answer still shows it is up, so the repeat counts (else the relay would
    /// retry forever, holding every event behind it); an unclear refusal does not.
    #[test]
    fn an_absent_destination_counts_toward_retries_even_when_nothing_else_was_acked() {
        assert_eq!(others_acked(Class::Absent), Some(true));
        assert_eq!(others_acked(Class::Unclear), Some(false));
    }

    /// Issue found in a fresh-clone run: the fencing codes are in the cluster class, so a
    /// fenced exactly-once producer's refused delivery was logged as "publishing failed" and
    /// counted as a publish retry, never as fencing.
    #[test]
    fn a_delivery_refused_for_a_stale_epoch_is_fencing_only_in_exactly_once_mode() {
        let ended = |code: &str, transactional: bool| {
            let refused = Refusal {
                class: Class::Cluster,
                code: code.into(),
                detail: "old epoch".into(),
                alone: false,
            };
            let f = failure(refused, Seen::InBatch, Some("e-1".into()), "t", None);
            failure_error(f, true, transactional)
        };
        for code in ["InvalidProducerEpoch", "ProducerFenced", "Fenced"] {
            assert!(matches!(ended(code, true), Error::Fenced(_)), "{code}");
            assert!(matches!(ended(code, false), Error::Publish(_)), "{code}");
        }
        assert!(matches!(
            ended("NotLeaderForPartition", true),
            Error::Publish(_)
        ));
    }
}
