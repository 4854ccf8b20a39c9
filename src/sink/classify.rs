//! Every librdkafka error code, classified on purpose.
//!
//! A failed delivery is one of three things, and treating it as the wrong one costs events or
//! freezes the slot:
//!
//! * **About the record itself** ([`Class::Record`]): the same record will fail the same way
//!   forever — an explicit partition the topic does not have, a timestamp the topic's
//!   `message.timestamp.*.max.ms` refuses, an illegal topic name, a record the broker's
//!   validation rejects. It is dead-lettered with its reason and the stream flows on — once
//!   it failed alone, not just in a batch (see `crate::window`).
//! * **About the cluster or the connection** ([`Class::Cluster`]): authorization, a broker or
//!   leader away, timeouts, too few in-sync replicas, a corrupt message on the wire, a batch
//!   too large for the broker. Dead-lettering here would dead-letter the whole stream, so the
//!   relay retries with capped backoff — forever, loudly: an error line per attempt, the
//!   `outboxd_delivery_failures_total` metric, `/readyz` failing after
//!   `retry.unready_after_ms`.
//! * **Could be either** ([`Class::Unclear`]): an unknown server error, a batch rejected as
//!   too large by the broker (one record or many?). Retried like the cluster class; if the
//!   *same record* fails with the *same code* `kafka.max_record_retries` times in a row, it is
//!   dead-lettered with reason `retries_exhausted`.
//!
//! The table below lists every code librdkafka defines (a unit test walks them all, so a code
//! added by a newer librdkafka fails the build's tests until someone classifies it). Codes
//! that only consumers, groups, transactions or admin requests produce are in the cluster
//! class: if one ever reaches the produce path, retrying is the side that loses nothing.

use rdkafka::error::RDKafkaErrorCode as C;

use crate::poison::PoisonKind;

pub use super::Class;

/// Where the error surfaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `produce()` refused the record locally (it never left the process).
    Send,
    /// The delivery report (whether the refusal is about this record or a batchmate is
    /// the window's question: `crate::window`).
    Delivery,
}

/// Classifies `code` raised at `stage`.
pub fn classify(code: C, stage: Stage) -> Class {
    match (code, stage) {
        // Refused locally by size: librdkafka compared this record with message.max.bytes.
        (C::MessageSizeTooLarge, Stage::Send) => Class::Record(PoisonKind::TooLarge),
        _ => table(code).unwrap_or(Class::Unclear),
    }
}

/// The codes that say another instance's `init_transactions` replaced this producer's epoch:
/// the broker's `ProducerFenced` and `InvalidProducerEpoch`, and librdkafka's own `Fenced`.
/// One list for every place that asks — a refused delivery (`crate::window`) and a refused
/// transactional call (`sink::kafka`) — so the two cannot disagree about what fencing is.
const FENCING: [C; 3] = [C::ProducerFenced, C::InvalidProducerEpoch, C::Fenced];

/// `code` says another instance fenced this producer (in exactly-once mode; in at-least-once
/// mode the same codes are the idempotent producer's own state, see the table below).
pub fn fences(code: C) -> bool {
    FENCING.contains(&code)
}

/// [`fences`] for a refusal's code as the Kafka sink writes it (the code's name).
pub fn fences_named(code: &str) -> bool {
    FENCING.iter().any(|c| format!("{c:?}") == code)
}

/// The table. `None` only for codes it does not list (the unit test keeps that empty).
pub fn table(code: C) -> Option<Class> {
    use Class::{Batchmate, Cluster, Record, Unclear};
    Some(match code {
        // ---- About the record ------------------------------------------------------------
        C::UnknownPartition => Record(PoisonKind::UnknownPartition),
        C::InvalidTimestamp => Record(PoisonKind::InvalidTimestamp),
        C::InvalidTopic => Record(PoisonKind::InvalidTopic),
        // The broker validated the record and refused it (e.g. no key on a compacted topic).
        C::InvalidRecord => Record(PoisonKind::Rejected),

        // ---- Either ----------------------------------------------------------------------
        // From the broker: the batch, which may hold one record or many, exceeds a limit.
        C::MessageSizeTooLarge | C::InvalidMessageSize => Unclear,
        C::Unknown | C::Fail | C::BadMessage | C::InvalidArgument | C::PolicyViolation => Unclear,
        C::InvalidRequest | C::Inconsistent => Unclear,

        // ---- About the cluster or the connection -----------------------------------------
        // Authorization and authentication: an ACL or a credential, fixed by an operator.
        C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::DelegationTokenAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::SSL
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::SecurityDisabled
        | C::UnacceptableCredential
        | C::PrincipalDeserializationFailure
        | C::InvalidPrincipalType => Cluster,
        // Brokers, leaders, replicas, the network, timeouts.
        C::MessageTimedOut
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue
        | C::NetworkException
        | C::BrokerTransportFailure
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::AllBrokersDown
        | C::Resolve
        | C::BrokerNotAvailable
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::ReplicaNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::EligibleLeadersNotAvailable
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::ISRInsufficient
        | C::KafkaStorageError
        | C::LogDirNotFound
        | C::ThrottlingQuotaExceeded
        | C::ListenerNotFound
        | C::NodeUpdate
        | C::UnknownBroker
        | C::RebootstrapRequired
        | C::NotController
        | C::StaleControllerEpoch
        | C::StaleBrokerEpoch
        | C::ReassignmentInProgress
        | C::CriticalSystemResource
        | C::FileSystem => Cluster,
        // The topic is missing: created by the relay, by the operator, or never — an event is
        // never skipped because its topic does not exist.
        C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownTopicId => Cluster,
        // "Corrupt message": a CRC mismatch happens on the wire or in the broker.
        C::InvalidMessage | C::BadCompression | C::UnsupportedCompressionType => Cluster,
        // A batch larger than the broker's segment size: about the batch, not one record.
        C::MessageBatchTooLarge => Cluster,
        // Another record of the same batch was invalid; this one is fine, the culprit is found
        // by sending the batch's failed records alone (`crate::window`).
        C::InvalidDifferentRecord => Batchmate,
        // The idempotent/transactional producer's state: a fresh producer resumes.
        C::OutOfOrderSequenceNumber
        | C::DuplicateSequenceNumber
        | C::InvalidProducerEpoch
        | C::InvalidProducerIdMapping
        | C::UnknownProducerId
        | C::ProducerFenced
        | C::Fenced
        | C::Fatal
        | C::GaplessGuarantee
        | C::InvalidTransactionalState
        | C::InvalidTransactionTimeout
        | C::ConcurrentTransactions
        | C::TransactionCoordinatorFenced
        | C::InvalidRequiredAcks => Cluster,
        // The local queue and purges: the relay's own backpressure and shutdown.
        C::QueueFull | C::PurgeQueue | C::PurgeInflight | C::Retry | C::Interrupted => Cluster,
        // Versions and configuration of the cluster or client.
        C::UnsupportedVersion
        | C::UnsupportedForMessageFormat
        | C::UnsupportedFeature
        | C::NotImplemented
        | C::NotConfigured
        | C::InvalidConfig
        | C::UnknownProtocol
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::InvalidReplicaAssignment
        | C::TopicAlreadyExists
        | C::TopicDeletionDisabled
        | C::InconsistentVoterSet
        | C::InvalidUpdateVersion
        | C::FeatureUpdateFailed
        | C::TelemetryTooLarge
        | C::State
        | C::Conflict
        | C::Outdated
        | C::WaitCache
        | C::ReadOnly
        | C::NoEnt
        | C::Underflow
        | C::InvalidType
        | C::Application
        | C::Noop
        | C::Partial
        | C::PollExceeded
        | C::InProgress
        | C::PreviousInProgress
        | C::ResourceNotFound
        | C::DuplicateResource
        | C::OperationNotAttempted
        | C::ElectionNotNeeded
        | C::NoReassignmentInProgress => Cluster,
        // Consumers, groups and offsets: never from the produce path.
        C::OffsetOutOfRange
        | C::PartitionEOF
        | C::NoOffset
        | C::OffsetNotAvailable
        | C::OffsetMetadataTooLarge
        | C::InvalidCommitOffsetSize
        | C::UnstableOffsetCommit
        | C::AutoOffsetReset
        | C::LogTruncation
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::WaitingForCoordinator
        | C::IllegalGeneration
        | C::InconsistentGroupProtocol
        | C::InvalidGroupId
        | C::UnknownMemberId
        | C::InvalidSessionTimeout
        | C::RebalanceInProgress
        | C::UnknownGroup
        | C::ExistingSubscription
        | C::AssignPartitions
        | C::RevokePartitions
        | C::AssignmentLost
        | C::NonEmptyGroup
        | C::GroupIdNotFound
        | C::GroupMaxSizeReached
        | C::GroupSubscribedToTopic
        | C::MemberIdRequired
        | C::FencedInstanceId
        | C::UnreleasedInstanceId
        | C::FencedMemberEpoch
        | C::StaleMemberEpoch
        | C::UnsupportedAssignor
        | C::UnknownSubscriptionId
        | C::FetchSessionIdNotFound
        | C::InvalidFetchSessionEpoch
        | C::KeySerialization
        | C::ValueSerialization
        | C::KeyDeserialization
        | C::ValueDeserialization
        | C::DelegationTokenAuthDisabled
        | C::DelegationTokenNotFound
        | C::DelegationTokenOwnerMismatch
        | C::DelegationTokenRequestNotAllowed
        | C::DelegationTokenExpired => Cluster,
        // Not errors.
        C::NoError | C::Begin | C::End | C::EndAll => Cluster,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaRespErr;

    /// Before one list, a refused transactional call knew `ProducerFenced` and
    /// `InvalidProducerEpoch` but not librdkafka's `Fenced`, which the refused delivery's list
    /// had: the same fencing read as fencing in one place and as a failure in the other.
    #[test]
    fn fencing_is_one_list_read_the_same_by_code_and_by_name() {
        for code in [C::ProducerFenced, C::InvalidProducerEpoch, C::Fenced] {
            assert!(fences(code), "{code:?}");
            assert!(fences_named(&format!("{code:?}")), "{code:?}");
        }
        for code in [
            C::NotLeaderForPartition,
            C::OutOfOrderSequenceNumber,
            C::TransactionCoordinatorFenced,
        ] {
            assert!(!fences(code), "{code:?}");
            assert!(!fences_named(&format!("{code:?}")), "{code:?}");
        }
        assert!(!fences_named(""));
    }

    #[test]
    fn every_librdkafka_error_code_is_classified_on_purpose() {
        let mut unlisted = Vec::new();
        let mut seen = 0;
        for raw in -300..=300 {
            let Ok(resp) = RDKafkaRespErr::try_from(raw) else {
                continue;
            };
            let code = C::from(resp);
            seen += 1;
            if table(code).is_none() {
                unlisted.push(format!("{code:?} ({raw})"));
            }
        }
        assert!(seen > 150, "walked only {seen} codes");
        assert!(
            unlisted.is_empty(),
            "classify these librdkafka error codes in sink/classify.rs: {unlisted:?}"
        );
    }

    #[test]
    fn record_errors_are_dead_lettered_and_cluster_errors_never_are() {
        assert_eq!(
            classify(C::UnknownPartition, Stage::Send),
            Class::Record(PoisonKind::UnknownPartition)
        );
        assert_eq!(
            classify(C::InvalidTimestamp, Stage::Delivery),
            Class::Record(PoisonKind::InvalidTimestamp)
        );
        assert_eq!(
            classify(C::MessageSizeTooLarge, Stage::Send),
            Class::Record(PoisonKind::TooLarge)
        );
        assert_eq!(
            classify(C::MessageSizeTooLarge, Stage::Delivery),
            Class::Unclear
        );
        assert_eq!(
            classify(C::InvalidDifferentRecord, Stage::Delivery),
            Class::Batchmate
        );
        for cluster in [
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::InvalidMessage,
            C::MessageBatchTooLarge,
            C::MessageTimedOut,
            C::RequestTimedOut,
            C::UnknownTopicOrPartition,
        ] {
            assert_eq!(
                classify(cluster, Stage::Delivery),
                Class::Cluster,
                "{cluster:?}"
            );
        }
    }
}
