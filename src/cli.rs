//! Command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "Transactional-outbox relay and CDC daemon: PostgreSQL → Kafka, RabbitMQ or NATS JetStream; Debezium-compatible table change events; at-least-once, exactly-once on Kafka"
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
    /// Read the target topics back and list retained events missing from Kafka (exit 1 if any).
    Verify {
        #[command(flatten)]
        selection: SelectionArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Mode, slot position and lag, WAL retention, leader, lag of the local instance, last
    /// error. Exit 0 healthy, 1 degraded, 2 cannot connect.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
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

impl From<SelectionArgs> for crate::replay::Selection {
    fn from(a: SelectionArgs) -> Self {
        crate::replay::Selection {
            since: a.since,
            until: a.until,
            aggregatetype: a.aggregatetype,
        }
    }
}
