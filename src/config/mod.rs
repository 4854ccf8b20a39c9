//! Typed, validated configuration.
//!
//! Sources, later ones win: built-in defaults, the TOML file given with `--config`, then the
//! environment (`OUTBOXD_POSTGRES_URL`, `OUTBOXD_KAFKA_BROKERS`, …). Every key with its default
//! is documented in `config/outboxd.example.toml`. Validation errors name the key and the
//! problem in one line; the binary maps them to exit code 2.
//!
//! Secrets (the password in the PostgreSQL URL, librdkafka properties whose name mentions a
//! password, secret or key) are redacted in `Debug`, so a config can be logged safely.
//!
//! Files: `load.rs` turns the file and the environment into a validated [`Config`];
//! `redact.rs` keeps secrets out of `Debug` output and logs.

mod aws;
pub mod aws_profile;
mod cdc;
mod kafka;
mod load;
mod pubsub;
mod redact;
mod schemas;
mod servicebus;
mod sinks;
mod snapshot;
mod traces;

pub use aws::{AwsConfig, EventBridgeConfig, SnsConfig, SqsConfig};
pub use cdc::{
    BinaryMode, CdcConfig, DecimalMode, HstoreMode, IntervalMode, Modes, Operations, TimeMode,
    ToastMode,
};
pub use pubsub::PubSubConfig;
pub use redact::percent_encode;
pub use redact::redact_url;
pub use schemas::{Encoding, SchemasConfig, SubjectStrategy};
pub use servicebus::ServiceBusConfig;
pub use snapshot::{SnapshotConfig, SnapshotMode};
pub use traces::{OtlpProtocol, Propagate, TracingConfig};

use std::collections::BTreeMap;
use std::time::Duration;

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("config key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// The whole configuration, validated.
#[derive(Clone)]
pub struct Config {
    pub mode: Mode,
    pub polling: PollingConfig,
    pub postgres: PostgresConfig,
    pub kafka: KafkaConfig,
    pub retry: RetryConfig,
    pub http: HttpConfig,
    /// The broker the relay publishes to (`[sink] kind`).
    pub sink: SinkKind,
    pub rabbitmq: RabbitMqConfig,
    pub nats: NatsConfig,
    /// `[aws]`: shared by the AWS sinks.
    pub aws: AwsConfig,
    pub sqs: SqsConfig,
    pub sns: SnsConfig,
    pub eventbridge: EventBridgeConfig,
    pub pubsub: PubSubConfig,
    pub servicebus: ServiceBusConfig,
    pub schemas: SchemasConfig,
    /// `[tracing]`: `None` when off.
    pub tracing: Option<TracingConfig>,
}

/// Which broker the relay publishes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    Kafka,
    RabbitMq,
    Nats,
    /// Amazon SQS (standard and FIFO queues).
    Sqs,
    /// Amazon SNS (standard and FIFO topics).
    Sns,
    EventBridge,
    PubSub,
    ServiceBus,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::RabbitMq => "rabbitmq",
            SinkKind::Nats => "nats",
            SinkKind::Sqs => "sqs",
            SinkKind::Sns => "sns",
            SinkKind::EventBridge => "eventbridge",
            SinkKind::PubSub => "pubsub",
            SinkKind::ServiceBus => "servicebus",
        }
    }
}

/// `[rabbitmq]`: AMQP 0-9-1 with publisher confirms (see `crate::sink::rabbitmq`).
#[derive(Clone)]
pub struct RabbitMqConfig {
    /// `amqp://user:password@host:port/vhost` (`amqps://` for TLS); the password is never
    /// logged.
    pub url: String,
    /// Exchange template (`{aggregatetype}`, `{type}`).
    pub exchange: String,
    /// The type of the exchanges the relay declares.
    pub exchange_type: String,
    /// Declare (durable) each exchange before the first message to it.
    pub declare_exchange: bool,
    /// Routing-key template.
    pub routing_key: String,
    /// A durable queue the relay declares and dead-letters into (default exchange).
    pub dead_letter_queue: String,
    /// `amqps://`: PEM file of the CA(s) the server's certificate must chain to (default:
    /// the system's).
    pub ca_file: Option<String>,
}

/// `[nats]`: JetStream with `Nats-Msg-Id` deduplication (see `crate::sink::nats`).
#[derive(Clone)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:port` (`tls://` for TLS); the password is never logged.
    pub url: String,
    /// Subject template (`{aggregatetype}`, `{type}`).
    pub subject: String,
    /// The stream the subjects belong to.
    pub stream: String,
    /// Create the stream (with `stream_subjects`) if it does not exist.
    pub create_stream: bool,
    pub stream_subjects: Vec<String>,
    /// The stream's duplicate window, when the relay creates it: a repeat of an event id
    /// within it is dropped by the server.
    pub duplicate_window: Duration,
    /// Where poison events go (must belong to a stream).
    pub dead_letter_subject: String,
    /// How long a publish waits for the stream's acknowledgement before it is retried.
    pub ack_timeout: Duration,
    /// PEM file of the CA(s) the server's certificate must chain to; setting it requires
    /// TLS (default: the system's roots, TLS only with `tls://`).
    pub ca_file: Option<String>,
    /// A client certificate and its key (PEM), for servers that verify clients.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// How outboxd reads PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A pgoutput logical replication slot (commit order).
    Logical,
    /// Gap-free polling of the outbox table by (transaction id, sequence), for databases
    /// without logical replication.
    Polling,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Logical => "logical",
            Mode::Polling => "polling",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PollingConfig {
    /// Longest wait between two polls when idle (a NOTIFY wakes the relay earlier).
    pub interval: Duration,
    /// Rows per poll.
    pub batch_size: i64,
    /// LISTEN for the trigger `outboxd migrate` installs, to publish within milliseconds.
    pub notify: bool,
    /// Published rows older than this are deleted in small chunks; zero keeps everything.
    pub retention: Duration,
}

#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// `/metrics`, `/healthz`, `/readyz`, `/status`.
    pub addr: std::net::SocketAddr,
}

/// What to do when the slot is held by another session although this instance holds the
/// slot's leadership lock (so the holder cannot be a healthy outboxd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleHolder {
    /// Terminate the holder if it is an outboxd replication connection
    /// (`application_name = outboxd-replication`); wait for anything else.
    Terminate,
    /// Wait until the holder goes away (wal_sender_timeout ends a dead one).
    Wait,
}

#[derive(Clone)]
pub struct PostgresConfig {
    /// libpq-style URL or key=value string. Contains the password: never log it.
    pub url: String,
    pub schema: String,
    pub table: String,
    pub slot: String,
    pub publication: String,
    /// When nothing was confirmed for this long, write a tiny non-transactional logical
    /// message so the slot can advance past WAL written by other tables.
    pub heartbeat_interval: Duration,
    /// No message from the server on the replication stream for this long means a dead
    /// network path: reconnect. Also bounds the relay's SQL calls and sets the TCP user
    /// timeout; the server's `wal_sender_timeout` for outboxd's walsender is this + 5 s.
    pub stream_timeout: Duration,
    /// Above this many bytes of slot lag, `/readyz` fails and `outboxd status` exits 1.
    pub max_slot_lag_bytes: u64,
    pub stale_slot_holder: StaleHolder,
    /// Recreate an invalidated slot (`wal_status = lost`) instead of stopping. Events written
    /// while the slot was lost may have been skipped.
    pub recreate_lost_slot: bool,
    pub columns: ColumnsConfig,
    /// `false`: no outbox table is relayed — a table-CDC-only pipeline (`[cdc]` required).
    pub outbox: bool,
    /// `[cdc]`: the tables whose row changes are captured beside the outbox (read from the
    /// same slot, so they are part of what is read from PostgreSQL).
    pub cdc: std::sync::Arc<CdcConfig>,
}

/// Column names of the outbox table, so an existing table of another shape works unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnsConfig {
    pub id: String,
    pub aggregatetype: String,
    pub aggregateid: String,
    pub event_type: String,
    pub payload: String,
    /// Optional: a JSON object of extra headers.
    pub headers: String,
    /// Optional: the Kafka record timestamp (commit time when absent).
    pub timestamp: String,
    /// Optional: a per-row topic that overrides `kafka.topic_template` when not NULL.
    pub topic: String,
    /// Optional: an explicit partition (integer) instead of the key's hash.
    pub partition: String,
    /// Extra columns copied as headers (named like the column) when not NULL.
    pub header_columns: Vec<String>,
}

#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic_template: String,
    /// Upper bound of deliveries awaiting Kafka's acknowledgement; bounds the relay's memory.
    pub max_in_flight: usize,
    /// Upper bound of the bytes (key, value, headers) awaiting acknowledgement, and (again as
    /// much) of the replication stream read ahead; one record is always admitted, however
    /// large.
    pub max_in_flight_bytes: usize,
    /// A delivery not acknowledged within this time ends the session (`crate::window`:
    /// librdkafka's `message.timeout.ms` is 0, so the relay is what bounds it).
    pub delivery_timeout: Duration,
    /// How long a graceful shutdown waits for outstanding acknowledgements.
    pub shutdown_timeout: Duration,
    /// Create a missing topic through the admin API before the first record is sent to it.
    pub create_topics: bool,
    /// Partitions of a topic the relay creates; -1 = the broker's `num.partitions`.
    pub topic_partitions: i32,
    /// Replicas of a topic the relay creates; -1 = the broker's `default.replication.factor`.
    pub topic_replication_factor: i32,
    /// A record that fails with the same error of the "could be either" class
    /// (`sink::classify`) this many times in a row is dead-lettered (`retries_exhausted`).
    pub max_record_retries: u32,
    /// An event whose aggregateid is NULL is poison (dead-lettered) instead of sent unkeyed.
    pub require_key: bool,
    /// Records larger than this are poison (dead-lettered). librdkafka's `message.max.bytes`
    /// is set above it unless configured in `kafka.properties`.
    pub max_message_bytes: usize,
    /// Add CloudEvents binary-mode headers (`ce_specversion`, `ce_id`, `ce_source`,
    /// `ce_type`, `ce_time`, `content-type`).
    pub cloudevents: bool,
    pub cloudevents_source: String,
    /// Where poison events go; if even that fails, the relay-owned table
    /// `<schema>.outboxd_dead_letter`.
    pub dlq_topic: String,
    /// Passed verbatim to librdkafka (TLS, SASL, compression, linger, …).
    pub properties: BTreeMap<String, String>,
    /// At-least-once (the default) or exactly-once (see `crate::transaction`).
    pub delivery: Delivery,
    /// Exactly-once: the producer's `transactional.id`; `None` derives it from the database
    /// and slot (or polling table), the same for every instance of one pipeline.
    pub transactional_id: Option<String>,
    /// Exactly-once: the compacted topic the source position is written to, inside each
    /// Kafka transaction.
    pub position_topic: String,
    /// Exactly-once: a Kafka transaction is committed at the first source transaction
    /// boundary after it is this old…
    pub transaction_interval: Duration,
    /// …or holds this many events.
    pub transaction_max_events: u64,
}

/// What a consumer may see (README, "Delivery modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Every committed event, possibly more than once after a crash or a retry.
    AtLeastOnce,
    /// A `read_committed` consumer sees every committed event exactly once.
    ExactlyOnce,
}

#[derive(Clone, Debug)]
pub struct RetryConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// While publishing keeps failing for longer than this, `/readyz` fails.
    pub unready_after: Duration,
}

/// Environment variables read by [`Config::load`], with the key each one overrides.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("OUTBOXD_MODE", "mode"),
    ("OUTBOXD_POSTGRES_URL", "postgres.url"),
    ("OUTBOXD_TABLE", "postgres.table"),
    ("OUTBOXD_SLOT", "postgres.slot"),
    ("OUTBOXD_PUBLICATION", "postgres.publication"),
    ("OUTBOXD_KAFKA_BROKERS", "kafka.brokers"),
    ("OUTBOXD_TOPIC_TEMPLATE", "kafka.topic_template"),
    ("OUTBOXD_HTTP_ADDR", "http.addr"),
    ("OUTBOXD_SINK", "sink.kind"),
    ("OUTBOXD_RABBITMQ_URL", "rabbitmq.url"),
    ("OUTBOXD_NATS_URL", "nats.url"),
];

/// Quotes an SQL identifier: `a"b` becomes `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal (for DDL, where parameters cannot be used).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl PostgresConfig {
    /// `"schema"."table"`, quoted for SQL.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// Whether `schema.table` is one of outboxd's own tables — the outbox, or an
    /// `outboxd_…` table beside it (the dead-letter table) — which `[cdc]` never captures,
    /// whatever its patterns match: a dead letter would otherwise become a change event.
    pub fn is_own_table(&self, schema: &str, table: &str) -> bool {
        let signals = self
            .cdc
            .snapshot
            .signal_table
            .as_ref()
            .is_some_and(|(s, t)| s == schema && t == table);
        signals || schema == self.schema && (table == self.table || table.starts_with("outboxd_"))
    }

    /// Whether `[cdc]` captures `schema.table`.
    pub fn captures(&self, schema: &str, table: &str) -> bool {
        self.cdc.captures(schema, table) && !self.is_own_table(schema, table)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MIN: &str = "[postgres]\nurl = \"postgres://u:s3cret@localhost/db\"\n[kafka]\nbrokers = \"localhost:9092\"\n";

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = Config::from_toml_str(MIN, no_env).unwrap();
        assert_eq!(c.postgres.schema, "public");
        assert_eq!(c.postgres.table, "outbox");
        assert_eq!(c.postgres.slot, "outboxd");
        assert_eq!(c.postgres.publication, "outboxd");
        assert_eq!(c.kafka.topic_template, "outbox.event.{aggregatetype}");
    }

    #[test]
    fn environment_overrides_file_and_works_without_file() {
        let env = |k: &str| match k {
            "OUTBOXD_POSTGRES_URL" => Some("postgres://other@h/db".to_string()),
            "OUTBOXD_KAFKA_BROKERS" => Some("k:1".to_string()),
            _ => None,
        };
        let c = Config::from_toml_str(MIN, env).unwrap();
        assert_eq!(c.postgres.url, "postgres://other@h/db");
        assert_eq!(c.kafka.brokers, "k:1");
        let c = Config::from_toml_str("", env).unwrap();
        assert_eq!(c.kafka.brokers, "k:1");
    }

    #[test]
    fn missing_url_names_the_key_and_the_env_var() {
        let e = Config::from_toml_str("[kafka]\nbrokers=\"x:1\"", no_env).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("postgres.url") && msg.contains("OUTBOXD_POSTGRES_URL"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = Config::from_toml_str(&format!("{MIN}slott = \"x\"\n"), no_env).unwrap_err();
        assert!(e.to_string().contains("slott"), "{e}");
    }

    #[test]
    fn invalid_slot_name_is_rejected() {
        let e = Config::from_toml_str(
            &MIN.replace("[kafka]", "slot = \"Bad-Slot\"\n[kafka]"),
            no_env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("postgres.slot"), "{e}");
    }

    #[test]
    fn delivery_mode_and_its_keys_are_validated_by_name() {
        let c = Config::from_toml_str(MIN, no_env).unwrap();
        assert_eq!(c.kafka.delivery, Delivery::AtLeastOnce);
        let eos = MIN.replace("[kafka]", "[kafka]\ndelivery = \"exactly-once\"");
        let c = Config::from_toml_str(&eos, no_env).unwrap();
        assert_eq!(c.kafka.delivery, Delivery::ExactlyOnce);
        assert_eq!(c.kafka.position_topic, "outboxd.positions");
        for (text, key) in [
            ("delivery = \"exactly_once\"", "kafka.delivery"),
            ("position_topic = \"a b\"", "kafka.position_topic"),
            ("transaction_ms = 0", "kafka.transaction_ms"),
            ("transaction_max_events = 0", "kafka.transaction_max_events"),
            ("transactional_id = \"\"", "kafka.transactional_id"),
        ] {
            let e =
                Config::from_toml_str(&MIN.replace("[kafka]", &format!("[kafka]\n{text}")), no_env)
                    .unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        let raw = format!("{MIN}[kafka.properties]\n\"transactional.id\" = \"x\"\n");
        let e = Config::from_toml_str(&raw, no_env).unwrap_err();
        assert!(e.to_string().contains("kafka.transactional_id"), "{e}");
    }

    #[test]
    fn debug_output_never_contains_secrets() {
        let text = format!(
            "{MIN}[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\"ssl.key.password\" = \"k3y\"\n"
        );
        let c = Config::from_toml_str(&text, no_env).unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("s3cret") && !dbg.contains("hunter2") && !dbg.contains("k3y"),
            "{dbg}"
        );
        assert!(dbg.contains("postgres://u:***@localhost/db"), "{dbg}");
    }

    #[test]
    fn redacts_key_value_passwords() {
        assert_eq!(
            redact_url("host=a password=xyz user=b"),
            "host=a password=*** user=b"
        );
        assert_eq!(
            redact_url("postgres://a@h/db?password=xyz&x=1"),
            "postgres://a@h/db?password=***&x=1"
        );
    }

    #[test]
    fn example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../config/outboxd.example.toml");
        let c = Config::from_toml_str(text, no_env).unwrap();
        let d = Config::from_toml_str(MIN, no_env).unwrap();
        assert_eq!(
            format!("{:?}", c.kafka).replace("localhost:9092", "X"),
            format!("{:?}", d.kafka).replace("localhost:9092", "X")
        );
        assert_eq!(c.postgres.heartbeat_interval, d.postgres.heartbeat_interval);
        assert_eq!(c.postgres.stream_timeout, d.postgres.stream_timeout);
        assert_eq!(c.postgres.max_slot_lag_bytes, d.postgres.max_slot_lag_bytes);
        assert_eq!(c.postgres.stale_slot_holder, d.postgres.stale_slot_holder);
        assert_eq!(c.postgres.recreate_lost_slot, d.postgres.recreate_lost_slot);
        assert_eq!(c.postgres.outbox, d.postgres.outbox);
        assert_eq!(
            format!("{:?}", c.postgres.cdc),
            format!("{:?}", d.postgres.cdc)
        );
        assert_eq!(c.http.addr, d.http.addr);
        assert_eq!(c.postgres.columns, d.postgres.columns);
        assert_eq!(c.mode, d.mode);
        assert_eq!(format!("{:?}", c.polling), format!("{:?}", d.polling));
        assert_eq!(c.retry.max_backoff, d.retry.max_backoff);
        assert_eq!(c.retry.initial_backoff, d.retry.initial_backoff);
        assert_eq!(c.retry.unready_after, d.retry.unready_after);
        assert_eq!(c.sink, d.sink);
        assert_eq!(format!("{:?}", c.rabbitmq), format!("{:?}", d.rabbitmq));
        assert_eq!(format!("{:?}", c.nats), format!("{:?}", d.nats));
        assert_eq!(format!("{:?}", c.aws), format!("{:?}", d.aws));
        assert_eq!(format!("{:?}", c.sqs), format!("{:?}", d.sqs));
        assert_eq!(format!("{:?}", c.sns), format!("{:?}", d.sns));
        assert_eq!(
            format!("{:?}", c.eventbridge),
            format!("{:?}", d.eventbridge)
        );
        assert_eq!(format!("{:?}", c.pubsub), format!("{:?}", d.pubsub));
        assert_eq!(format!("{:?}", c.servicebus), format!("{:?}", d.servicebus));
        // [tracing] is off in the example; turned on, its values are the defaults.
        let on = |t: &str| {
            Config::from_toml_str(&t.replace("enabled = false", "enabled = true"), no_env)
                .unwrap()
                .tracing
        };
        assert_eq!(c.tracing, None);
        assert_eq!(
            on(text),
            on(&format!("{MIN}\n[tracing]\nenabled = false\n"))
        );
        assert_eq!(c.schemas, d.schemas);
    }

    #[test]
    fn window_keys_in_sink_apply_and_clash_with_the_same_key_in_kafka() {
        let nats = "[postgres]\nurl = \"postgres://u@h/db\"\n[nats]\nurl = \"nats://h:4222\"\n";
        let c = Config::from_toml_str(
            &format!("{nats}[sink]\nkind = \"nats\"\nmax_in_flight = 7\n"),
            no_env,
        )
        .unwrap();
        assert_eq!(c.sink, SinkKind::Nats);
        assert_eq!(c.kafka.max_in_flight, 7);
        let e = Config::from_toml_str(
            &format!(
                "{nats}[sink]\nkind = \"nats\"\nmax_in_flight = 7\n[kafka]\nmax_in_flight = 8\n"
            ),
            no_env,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("sink.max_in_flight") && e.contains("kafka.max_in_flight"),
            "{e}"
        );
        let e = Config::from_toml_str(
            &format!("{nats}[sink]\nkind = \"nats\"\nmax_in_flight = 0\n"),
            no_env,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("`sink.max_in_flight`"), "{e}");
    }

    #[test]
    fn sink_urls_are_redacted_in_debug() {
        let c = Config::from_toml_str(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[sink]\nkind = \"rabbitmq\"\n[rabbitmq]\nurl = \"amqp://u:s3cret@h/%2f\"\n[nats]\nurl = \"nats://n:t0ken@h:4222\"\n",
            no_env,
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken"),
            "{shown}"
        );
    }

    #[test]
    fn no_generated_password_survives_redaction_in_any_url_form() {
        let alphabet: Vec<char> = "abcXYZ019/?#@:&=% '\"\\;,.-_~+!$*()[]{}".chars().collect();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..2000 {
            let len = 6 + (next() % 12) as usize;
            let password: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let encoded = super::redact::percent_encode(&password);
            let escaped = password.replace('\\', "\\\\").replace('\'', "\\'");
            let forms = [
                format!("postgres://app:{encoded}@db.example.com:5432/app?sslmode=require"),
                format!("postgres://app@db.example.com/app?password={encoded}&sslmode=require"),
                format!("host=db user=app password='{escaped}' dbname=app"),
                format!("host=db user=app password = '{escaped}' dbname=app"),
            ];
            for url in forms {
                let out = redact_url(&url);
                assert!(
                    !out.contains(&password) && !out.contains(&encoded) && !out.contains(&escaped),
                    "case {case}: password {password:?} survives in {out:?} (from {url:?})"
                );
            }
        }
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
