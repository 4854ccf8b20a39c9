//! Metric names — a contract: dashboards and alerts depend on them. Described once here;
//! rendered in Prometheus text format by `/metrics`.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Age of the oldest committed event not yet acknowledged by Kafka (0 when caught up).
pub const LAG_SECONDS: &str = "outboxd_lag_seconds";
/// Seconds publishing has kept failing (no event acknowledged since), 0 when it works.
pub const UNABLE_TO_PUBLISH: &str = "outboxd_unable_to_publish_seconds";
/// Records acknowledged by Kafka, by topic.
pub const EVENTS_PUBLISHED: &str = "outboxd_events_published_total";
/// Events sent to the dead-letter destination, by reason.
pub const EVENTS_DEAD_LETTERED: &str = "outboxd_events_dead_lettered_total";
/// Event payloads checked against their type's schema, by aggregate type, type and result.
pub const SCHEMA_VALIDATIONS: &str = "outboxd_schema_validations_total";
/// Schema registry requests at run time, by operation (lookup, register, latest) and result.
pub const SCHEMA_REGISTRY_REQUESTS: &str = "outboxd_schema_registry_requests_total";
/// Seconds a schema registry request took at run time.
pub const SCHEMA_REGISTRY_SECONDS: &str = "outboxd_schema_registry_request_seconds";
/// Changes in the replication stream that are deliberately not events, by kind (a logical
/// message of another prefix, an update, a delete, a truncate).
pub const IGNORED_CHANGES: &str = "outboxd_ignored_changes_total";
/// Table CDC: change events decoded, by table and op.
pub const CDC_CHANGES: &str = "outboxd_cdc_changes_total";
/// Table CDC: a captured table's columns described again mid-stream (a schema change).
pub const CDC_SCHEMA_CHANGES: &str = "outboxd_cdc_schema_changes_total";
/// Snapshots: rows emitted (`op = "r"`), by table.
pub const SNAPSHOT_ROWS: &str = "outboxd_snapshot_rows_total";
/// Snapshots: rows acknowledged so far in the table's current snapshot.
pub const SNAPSHOT_ROWS_DONE: &str = "outboxd_snapshot_rows_done";
/// Snapshots: the planner's row count when the table's snapshot began.
pub const SNAPSHOT_ROWS_ESTIMATED: &str = "outboxd_snapshot_rows_estimated";
/// Snapshots: signals that named nothing outboxd could act on.
pub const SNAPSHOT_SIGNALS_REFUSED: &str = "outboxd_snapshot_signals_refused_total";
/// Failed deliveries by class (record, cluster, unclear; see `sink::classify`) and
/// librdkafka error code.
pub const DELIVERY_FAILURES: &str = "outboxd_delivery_failures_total";
/// Times a delivery stayed unacknowledged past `kafka.delivery_timeout_ms` (reported, not
/// given up).
pub const DELIVERY_STALLS: &str = "outboxd_delivery_stalls_total";
/// Times publishing restarted from the confirmed position after a failed delivery.
pub const PUBLISH_RETRIES: &str = "outboxd_publish_retries_total";
/// Exactly-once: Kafka transactions committed (each with its source position).
pub const TRANSACTIONS_COMMITTED: &str = "outboxd_kafka_transactions_committed_total";
/// Exactly-once: writing the position record and committing a Kafka transaction
/// (the relay reads nothing meanwhile).
pub const TRANSACTION_COMMIT: &str = "outboxd_kafka_transaction_commit_seconds";
/// Exactly-once: events skipped after a restart because the Kafka transaction holding them
/// had committed before the source position was confirmed.
pub const EVENTS_SKIPPED: &str = "outboxd_events_skipped_total";
/// A later event of a key written while an earlier one of the key failed and is resent after
/// it (`window::order`): per-key order broken, said by event ids in the log.
pub const KEY_ORDER_BREAKS: &str = "outboxd_key_order_breaks_total";
/// Tracing: spans the collector took.
pub const TRACE_SPANS_EXPORTED: &str = "outboxd_trace_spans_exported_total";
/// Tracing: spans dropped, by reason (queue_full, export_failed); publishing never waits.
pub const TRACE_SPANS_DROPPED: &str = "outboxd_trace_spans_dropped_total";
/// Commit timestamp → Kafka acknowledgement.
pub const COMMIT_TO_ACK: &str = "outboxd_commit_to_ack_seconds";
/// Current WAL position minus the slot's confirmed position.
pub const SLOT_LAG_BYTES: &str = "outboxd_replication_slot_lag_bytes";
/// `pg_replication_slots.safe_wal_size`: WAL that can still be written before the slot is
/// in danger of being invalidated (absent when max_slot_wal_keep_size is unlimited).
pub const SLOT_SAFE_WAL_SIZE: &str = "outboxd_replication_slot_safe_wal_size_bytes";
/// 1 for the slot's current `wal_status` (reserved, extended, unreserved, lost).
pub const SLOT_WAL_STATUS: &str = "outboxd_replication_slot_wal_status";
/// Rows past the cursor (polling mode only).
pub const POLLING_PENDING: &str = "outboxd_polling_pending_events";
/// Published rows deleted by polling-mode retention.
pub const POLLING_DELETED: &str = "outboxd_polling_rows_deleted_total";
/// Requests a batch sink (SQS, SNS, EventBridge, Pub/Sub) may have in flight at once, by sink:
/// `max_concurrent_requests`, lower after the endpoint failed a request (`sink::concurrency`).
pub const SINK_REQUESTS_ALLOWED: &str = "outboxd_sink_requests_in_flight_allowed";
/// Deliveries handed to the producer and not yet acknowledged.
pub const INFLIGHT: &str = "outboxd_inflight_events";
/// 1 while this instance holds the slot's lock and publishes.
pub const IS_LEADER: &str = "outboxd_is_leader";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "outboxd_build_info";
/// Always 1, labelled with the sink (`kafka`, `rabbitmq`, `nats`) and delivery mode.
pub const SINK_INFO: &str = "outboxd_sink_info";
/// NATS: publishes the stream acknowledged as duplicates of an id it already held.
pub const DUPLICATES_DROPPED: &str = "outboxd_broker_duplicates_dropped_total";

/// Installs the global recorder and describes every metric. Call once.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(TRANSACTION_COMMIT.to_string()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full(COMMIT_TO_ACK.to_string()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    // Spawned by the recorder owner: keeps histogram buckets from growing without bound.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .map_err(|e| e.to_string())?;
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest committed event not yet acknowledged by the broker (0 when caught up)"
    );
    describe_gauge!(
        UNABLE_TO_PUBLISH,
        Unit::Seconds,
        "How long publishing has kept failing — connections refused or timing out, deliveries failing or stalled (0 when it works)"
    );
    describe_counter!(
        EVENTS_PUBLISHED,
        "Records acknowledged by the broker, by topic (subject, routing key)"
    );
    describe_gauge!(
        SINK_INFO,
        "The broker published to (label sink) and the delivery mode"
    );
    describe_counter!(
        DUPLICATES_DROPPED,
        "NATS: publishes the stream dropped as repeats of an event id within its duplicate window"
    );
    describe_counter!(
        EVENTS_DEAD_LETTERED,
        "Events sent to the dead-letter destination, by reason"
    );
    describe_counter!(
        SCHEMA_VALIDATIONS,
        "Event payloads checked against their type's schema (schemas.dir), by aggregatetype, type and result: valid, invalid, no_schema, missing"
    );
    describe_counter!(
        SCHEMA_REGISTRY_REQUESTS,
        "Schema registry requests at run time (schemas.encoding), by op (lookup, register, latest) and result (ok, not_found, error)"
    );
    describe_histogram!(
        SCHEMA_REGISTRY_SECONDS,
        "Seconds a schema registry request took at run time"
    );
    describe_counter!(
        PUBLISH_RETRIES,
        "Times publishing restarted from the confirmed position after a failed delivery"
    );
    describe_counter!(
        IGNORED_CHANGES,
        "Changes in the replication stream that are deliberately not events, by kind"
    );
    describe_counter!(
        CDC_CHANGES,
        "Table CDC: change events decoded, by table and op"
    );
    describe_counter!(
        CDC_SCHEMA_CHANGES,
        "Table CDC: captured tables whose columns were described again mid-stream"
    );
    describe_counter!(SNAPSHOT_ROWS, "Snapshots: rows emitted (op r), by table");
    describe_gauge!(
        SNAPSHOT_ROWS_DONE,
        "Snapshots: rows acknowledged in the table's current snapshot"
    );
    describe_gauge!(
        SNAPSHOT_ROWS_ESTIMATED,
        "Snapshots: the planner's row count when the table's snapshot began"
    );
    describe_counter!(
        SNAPSHOT_SIGNALS_REFUSED,
        "Snapshots: signals outboxd could not act on (logged with the reason)"
    );
    describe_counter!(
        DELIVERY_FAILURES,
        "Failed deliveries by class (record, cluster, unclear) and the broker's or client's error code"
    );
    describe_counter!(
        DELIVERY_STALLS,
        "Deliveries unacknowledged past kafka.delivery_timeout_ms (reported, still retried)"
    );
    describe_counter!(
        TRANSACTIONS_COMMITTED,
        "Exactly-once: Kafka transactions committed with their source position"
    );
    describe_histogram!(
        TRANSACTION_COMMIT,
        Unit::Seconds,
        "Exactly-once: writing the position record and committing one Kafka transaction"
    );
    describe_counter!(
        EVENTS_SKIPPED,
        "Exactly-once: events skipped after a restart, already committed to Kafka"
    );
    describe_histogram!(
        COMMIT_TO_ACK,
        Unit::Seconds,
        "Commit timestamp to the broker's acknowledgement"
    );
    describe_gauge!(
        SLOT_LAG_BYTES,
        Unit::Bytes,
        "Current WAL position minus the slot's confirmed position"
    );
    describe_gauge!(
        SLOT_SAFE_WAL_SIZE,
        Unit::Bytes,
        "WAL that can still be written before the slot risks invalidation"
    );
    describe_gauge!(SLOT_WAL_STATUS, "1 for the slot's current wal_status");
    describe_gauge!(POLLING_PENDING, "Outbox rows past the polling cursor");
    describe_counter!(
        POLLING_DELETED,
        "Published rows deleted by polling-mode retention"
    );
    describe_gauge!(INFLIGHT, "Deliveries awaiting Kafka's acknowledgement");
    describe_gauge!(
        SINK_REQUESTS_ALLOWED,
        "Requests a batch sink may have in flight at once: max_concurrent_requests, halved after the endpoint failed a request, grown back as requests are answered"
    );
    describe_gauge!(
        IS_LEADER,
        "1 while this instance holds the slot's lock and publishes"
    );
    describe_gauge!(BUILD_INFO, "Build information");
    describe_counter!(
        KEY_ORDER_BREAKS,
        "Later events of a key written while an earlier event of the key failed and is resent after them (per-key order broken; the log names both)"
    );
    describe_counter!(
        TRACE_SPANS_EXPORTED,
        "Tracing: spans the OTLP collector took"
    );
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "Tracing: spans dropped (queue_full, export_failed); publishing never waits on tracing"
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!(IS_LEADER).set(0.0);
    metrics::gauge!(LAG_SECONDS).set(0.0);
    metrics::gauge!(INFLIGHT).set(0.0);
    metrics::counter!(PUBLISH_RETRIES).absolute(0);
    metrics::counter!(DELIVERY_STALLS).absolute(0);
}
