//! Command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Transactional-outbox relay and CDC daemon: PostgreSQL → Kafka, RabbitMQ, NATS JetStream, Amazon SQS, SNS, EventBridge, Google Cloud Pub/Sub or Azure Service Bus; Debezium-compatible table change events; event contracts (JSON Schema, Avro, a Confluent-API schema registry); OpenTelemetry traces; at-least-once, exactly-once on Kafka"
)]
pub struct Cli {
    /// TOML config file (see config/outboxd.example.toml). Environment variables
    /// OUTBOXD_POSTGRES_URL and OUTBOXD_KAFKA_BROKERS override it and work without it.
    #[arg(long, short, global = true, env = "OUTBOXD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log format; the level comes from OUTBOXD_LOG or RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OUTBOXD_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the outbox table, publication and replication slot if absent. Drops nothing.
    Migrate,
    /// Relay committed outbox events to the configured broker until SIGTERM or SIGINT.
    Run,
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig,
    /// Republish retained outbox rows with their original ids (consumers dedupe).
    Replay {
        #[command(flatten)]
        selection: SelectionArgs,
    },
    /// Read the target topics back and list retained events missing from Kafka (exit 1 if
    /// any); with --table, compare a captured table's topic with the table, key by key.
    Verify {
        #[command(flatten)]
        selection: VerifyArgs,
        /// A captured table (`schema.table`): print each key whose latest event in its topic
        /// is not the table's row (exit 1 if any).
        #[arg(long, conflicts_with_all = ["since", "until", "aggregatetype"])]
        table: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Snapshot captured tables while the relay streams (their rows as `op = "r"` events),
    /// or pause, resume or stop the snapshots. Signals the running relay through the WAL.
    Snapshot {
        /// A table (`schema.table`, globs allowed); repeat for more.
        #[arg(long = "table", required_unless_present_any = ["pause", "resume", "stop"])]
        tables: Vec<String>,
        /// Only the rows matching this SQL condition (Debezium's `additional-conditions`).
        #[arg(long = "where", conflicts_with_all = ["pause", "resume", "stop"])]
        filter: Option<String>,
        /// Stop the snapshots of the tables named (all without --table).
        #[arg(long, conflicts_with_all = ["pause", "resume"])]
        stop: bool,
        /// Pause every running snapshot (streaming goes on).
        #[arg(long, conflicts_with = "resume")]
        pause: bool,
        /// Resume the paused snapshots where they stopped.
        #[arg(long)]
        resume: bool,
        /// Follow the snapshots until they end, printing progress; exit 1 unless all are done.
        #[arg(long, conflicts_with_all = ["pause", "resume", "stop"])]
        wait: bool,
    },
    /// Event contracts against a Confluent-API schema registry (schemas.registry_url): `check`
    /// exits 1 naming each schema file that breaks its subject's compatibility; `register`
    /// registers them.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Dead letters in the dead-letter topic and table: list them, show one, or redrive
    /// them to their destination once the cause is fixed (recorded: never twice).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersAction,
    },
    /// Mode, slot position and lag, WAL retention, leader, lag of the local instance, last
    /// error. Exit 0 healthy, 1 degraded, 2 cannot connect.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `outboxd schemas …`.
#[derive(Debug, Subcommand)]
pub enum SchemasAction {
    /// Check every schema file against the registry's latest version of its subject.
    Check {
        /// The schema directory (`<aggregatetype>/<type>.json`); default schemas.dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Register every schema file under its subject.
    Register {
        /// The schema directory; default schemas.dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `outboxd dead-letters …`.
#[derive(Debug, Subcommand)]
pub enum DeadLettersAction {
    /// One line per dead letter: where, when, reason, event id, destination, type, error.
    List {
        #[command(flatten)]
        filter: DeadLetterFilter,
    },
    /// Everything about the dead letters of one event: headers, key, payload, error.
    Show {
        /// The event id (header `id`).
        #[arg(long)]
        id: String,
    },
    /// Republish the matching dead letters not redriven yet to their destination with their
    /// id, key, headers and payload; exit 1 when the destination refuses one again.
    Redrive {
        #[command(flatten)]
        filter: DeadLetterFilter,
        /// Every dead letter (otherwise a filter is required).
        #[arg(long)]
        all: bool,
    },
}

/// Which dead letters `list` and `redrive` cover.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadLetterFilter {
    /// Only this reason (`too_large`, `schema_invalid`, `retries_exhausted`, …).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only events of this `type`.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Only this event id.
    #[arg(long)]
    pub id: Option<String>,
    /// Dead-lettered since: a timestamp (`2026-11-22 10:00:00+00`) or an interval back from now (`2 hours`).
    #[arg(long)]
    pub since: Option<String>,
    /// Dead-lettered before: same forms as --since.
    #[arg(long)]
    pub until: Option<String>,
}

impl DeadLetterFilter {
    /// No filter given.
    pub fn is_empty(&self) -> bool {
        self.reason.is_none()
            && self.event_type.is_none()
            && self.id.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }
}

impl From<DeadLetterFilter> for crate::dead_letter::redrive::Filter {
    fn from(a: DeadLetterFilter) -> Self {
        crate::dead_letter::redrive::Filter {
            reason: a.reason,
            event_type: a.event_type,
            id: a.id,
            since: a.since,
            until: a.until,
        }
    }
}

/// Which retained events `replay` and `verify` cover.
#[derive(Debug, Clone, clap::Args)]
pub struct SelectionArgs {
    /// Timestamp (`2026-11-22 10:00:00+00`) or interval back from now (`2 hours`).
    #[arg(long)]
    pub since: String,
    /// Same forms as --since; default: now.
    #[arg(long)]
    pub until: Option<String>,
    /// Only events of this aggregate type.
    #[arg(long)]
    pub aggregatetype: Option<String>,
}

/// `verify`'s selection: required unless `--table` is given.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Timestamp (`2026-11-22 10:00:00+00`) or interval back from now (`2 hours`).
    #[arg(long, required_unless_present = "table")]
    pub since: Option<String>,
    /// Same forms as --since; default: now.
    #[arg(long)]
    pub until: Option<String>,
    /// Only events of this aggregate type.
    #[arg(long)]
    pub aggregatetype: Option<String>,
}

impl From<VerifyArgs> for crate::replay::Selection {
    fn from(a: VerifyArgs) -> Self {
        crate::replay::Selection {
            since: a.since.unwrap_or_default(),
            until: a.until,
            aggregatetype: a.aggregatetype,
        }
    }
}

impl From<SelectionArgs> for crate::replay::Selection {
    fn from(a: SelectionArgs) -> Self {
        crate::replay::Selection {
            since: a.since,
            until: a.until,
            aggregatetype: a.aggregatetype,
        }
    }
}
