//! Typed, validated configuration.
//!
//! Sources, later ones win: built-in defaults, the TOML file given with `--config`, then the
//! environment (`OUTBOXD_POSTGRES_URL`, `OUTBOXD_KAFKA_BROKERS`, …). Every key with its default
//! is documented in `config/outboxd.example.toml`. Validation errors name the key and the
//! problem in one line; the binary maps them to exit code 2.
//!
//! Secrets (the password in the PostgreSQL URL, librdkafka properties whose name mentions a
//! password, secret or key) are redacted in `Debug`, so a config can be logged safely.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

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
    /// A delivery not acknowledged within this time is reported as stalled (never given up:
    /// librdkafka's `message.timeout.ms` is 0).
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

// ---------------------------------------------------------------------------------------------
// Raw (file) form. Every field optional so that defaults and the environment fill the gaps.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Option<String>,
    #[serde(default)]
    polling: RawPolling,
    #[serde(default)]
    postgres: RawPostgres,
    #[serde(default)]
    kafka: RawKafka,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    http: RawHttp,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolling {
    interval_ms: Option<u64>,
    batch_size: Option<i64>,
    notify: Option<bool>,
    retention_hours: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    addr: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: Option<String>,
    table: Option<String>,
    slot: Option<String>,
    publication: Option<String>,
    heartbeat_interval_ms: Option<u64>,
    stream_timeout_ms: Option<u64>,
    max_slot_lag_bytes: Option<u64>,
    stale_slot_holder: Option<String>,
    recreate_lost_slot: Option<bool>,
    #[serde(default)]
    columns: RawColumns,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawColumns {
    id: Option<String>,
    aggregatetype: Option<String>,
    aggregateid: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    payload: Option<String>,
    headers: Option<String>,
    timestamp: Option<String>,
    topic: Option<String>,
    partition: Option<String>,
    header_columns: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: Option<String>,
    topic_template: Option<String>,
    max_in_flight: Option<usize>,
    max_in_flight_bytes: Option<usize>,
    delivery_timeout_ms: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    create_topics: Option<bool>,
    topic_partitions: Option<i32>,
    topic_replication_factor: Option<i32>,
    max_record_retries: Option<u32>,
    require_key: Option<bool>,
    max_message_bytes: Option<usize>,
    dlq_topic: Option<String>,
    cloudevents: Option<bool>,
    cloudevents_source: Option<String>,
    delivery: Option<String>,
    transactional_id: Option<String>,
    position_topic: Option<String>,
    transaction_ms: Option<u64>,
    transaction_max_events: Option<u64>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    unready_after_ms: Option<u64>,
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
];

impl Config {
    /// Loads the file (if any), applies the environment, validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let raw = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                parse_raw(&text, &path.display().to_string())?
            }
            None => RawConfig::default(),
        };
        Self::from_raw(raw, |name| std::env::var(name).ok())
    }

    /// Parses TOML text and applies overrides from `env` (used by tests with a fake env).
    pub fn from_toml_str(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Self::from_raw(parse_raw(text, "<string>")?, env)
    }

    fn from_raw(
        mut raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let env_nonempty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = env_nonempty("OUTBOXD_POSTGRES_URL") {
            raw.postgres.url = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_TABLE") {
            raw.postgres.table = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_SLOT") {
            raw.postgres.slot = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_PUBLICATION") {
            raw.postgres.publication = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_KAFKA_BROKERS") {
            raw.kafka.brokers = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_TOPIC_TEMPLATE") {
            raw.kafka.topic_template = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_MODE") {
            raw.mode = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_HTTP_ADDR") {
            raw.http.addr = Some(v);
        }

        let mode = match raw.mode.as_deref().unwrap_or("logical") {
            "logical" => Mode::Logical,
            "polling" => Mode::Polling,
            other => {
                return Err(invalid(
                    "mode",
                    format!("`{other}` is not one of: logical, polling"),
                ))
            }
        };
        let pr = raw.polling;
        let batch_size = pr.batch_size.unwrap_or(1000);
        if !(1..=100_000).contains(&batch_size) {
            return Err(invalid(
                "polling.batch_size",
                "must be between 1 and 100000",
            ));
        }
        let polling = PollingConfig {
            interval: ms(
                "polling.interval_ms",
                pr.interval_ms.unwrap_or(500),
                1,
                3_600_000,
            )?,
            batch_size,
            notify: pr.notify.unwrap_or(true),
            retention: {
                let hours = pr.retention_hours.unwrap_or(168.0);
                if !(0.0..=1_000_000.0).contains(&hours) {
                    return Err(invalid(
                        "polling.retention_hours",
                        "must be between 0 and 1000000",
                    ));
                }
                Duration::from_secs_f64(hours * 3600.0)
            },
        };
        let p = raw.postgres;
        let url = p.url.ok_or_else(|| {
            invalid(
                "postgres.url",
                "missing; set it in the config file or OUTBOXD_POSTGRES_URL",
            )
        })?;
        // TLS parameters (sslmode verify-ca/verify-full, sslrootcert, …) are libpq's, not
        // tokio-postgres's: taken out first (crate::pg::tls).
        let (rest, _) = crate::pg::tls::split_url(&url).map_err(|e| invalid("postgres.url", e))?;
        match rest.parse::<tokio_postgres::Config>() {
            // The parser's message never echoes the password back.
            Err(e) => {
                return Err(invalid(
                    "postgres.url",
                    format!("not a valid connection string: {e}"),
                ))
            }
            // The SQL connection would try the hosts in turn, the replication connection
            // could land on another: the leadership lock on one server, the stream on another.
            Ok(c) if c.get_hosts().len() > 1 => {
                return Err(invalid(
                    "postgres.url",
                    "several hosts are not supported (the leadership lock and the replication stream must be on one server); use one host name that always points at the primary",
                ))
            }
            Ok(_) => {}
        }
        let (schema, table) = split_table(p.table.as_deref().unwrap_or("public.outbox"))?;
        let slot = p.slot.unwrap_or_else(|| "outboxd".into());
        validate_slot_name(&slot)?;
        let publication = p.publication.unwrap_or_else(|| "outboxd".into());
        validate_identifier("postgres.publication", &publication)?;
        let heartbeat_interval = ms(
            "postgres.heartbeat_interval_ms",
            p.heartbeat_interval_ms.unwrap_or(10_000),
            100,
            3_600_000,
        )?;

        let stream_timeout = ms(
            "postgres.stream_timeout_ms",
            p.stream_timeout_ms.unwrap_or(30_000),
            1_000,
            3_600_000,
        )?;
        let max_slot_lag_bytes = p.max_slot_lag_bytes.unwrap_or(1 << 30);
        let stale_slot_holder = match p.stale_slot_holder.as_deref().unwrap_or("terminate") {
            "terminate" => StaleHolder::Terminate,
            "wait" => StaleHolder::Wait,
            other => {
                return Err(invalid(
                    "postgres.stale_slot_holder",
                    format!("`{other}` is not one of: terminate, wait"),
                ))
            }
        };
        let recreate_lost_slot = p.recreate_lost_slot.unwrap_or(false);
        let c = p.columns;
        let columns = ColumnsConfig {
            id: c.id.unwrap_or_else(|| "id".into()),
            aggregatetype: c.aggregatetype.unwrap_or_else(|| "aggregatetype".into()),
            aggregateid: c.aggregateid.unwrap_or_else(|| "aggregateid".into()),
            event_type: c.event_type.unwrap_or_else(|| "type".into()),
            payload: c.payload.unwrap_or_else(|| "payload".into()),
            headers: c.headers.unwrap_or_else(|| "headers".into()),
            timestamp: c.timestamp.unwrap_or_else(|| "created_at".into()),
            topic: c.topic.unwrap_or_default(),
            partition: c.partition.unwrap_or_default(),
            header_columns: c.header_columns.unwrap_or_default(),
        };
        for (name, value) in [
            ("id", &columns.id),
            ("aggregatetype", &columns.aggregatetype),
            ("aggregateid", &columns.aggregateid),
            ("type", &columns.event_type),
            ("payload", &columns.payload),
        ] {
            if value.is_empty() {
                return Err(invalid(
                    "postgres.columns",
                    format!("`{name}` must name a column"),
                ));
            }
        }

        let addr_text = raw.http.addr.unwrap_or_else(|| "0.0.0.0:9465".into());
        let addr = addr_text.parse().map_err(|_| {
            invalid(
                "http.addr",
                format!("`{addr_text}` is not an IP:port address"),
            )
        })?;

        let k = raw.kafka;
        let brokers = k.brokers.ok_or_else(|| {
            invalid(
                "kafka.brokers",
                "missing; set it in the config file or OUTBOXD_KAFKA_BROKERS",
            )
        })?;
        if brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        let topic_template = k
            .topic_template
            .unwrap_or_else(|| "outbox.event.{aggregatetype}".into());
        crate::route::TopicTemplate::parse(&topic_template)
            .map_err(|problem| invalid("kafka.topic_template", problem))?;
        let max_in_flight = k.max_in_flight.unwrap_or(50_000);
        if !(1..=1_000_000).contains(&max_in_flight) {
            return Err(invalid(
                "kafka.max_in_flight",
                "must be between 1 and 1000000",
            ));
        }
        let max_in_flight_bytes = k.max_in_flight_bytes.unwrap_or(64 << 20);
        if !((1 << 20)..=(16 << 30)).contains(&max_in_flight_bytes) {
            return Err(invalid(
                "kafka.max_in_flight_bytes",
                "must be between 1048576 (1 MiB) and 17179869184 (16 GiB)",
            ));
        }
        let delivery_timeout = ms(
            "kafka.delivery_timeout_ms",
            k.delivery_timeout_ms.unwrap_or(30_000),
            1_000,
            3_600_000,
        )?;
        let shutdown_timeout = ms(
            "kafka.shutdown_timeout_ms",
            k.shutdown_timeout_ms.unwrap_or(10_000),
            0,
            600_000,
        )?;
        let topic_partitions = k.topic_partitions.unwrap_or(-1);
        if topic_partitions != -1 && !(1..=10_000).contains(&topic_partitions) {
            return Err(invalid(
                "kafka.topic_partitions",
                "must be between 1 and 10000, or -1 for the broker default",
            ));
        }
        let max_record_retries = k.max_record_retries.unwrap_or(10);
        if !(1..=10_000).contains(&max_record_retries) {
            return Err(invalid(
                "kafka.max_record_retries",
                "must be between 1 and 10000",
            ));
        }
        let topic_replication_factor = k.topic_replication_factor.unwrap_or(-1);
        if topic_replication_factor != -1 && !(1..=32).contains(&topic_replication_factor) {
            return Err(invalid(
                "kafka.topic_replication_factor",
                "must be between 1 and 32, or -1 for the broker default",
            ));
        }
        let max_message_bytes = k.max_message_bytes.unwrap_or(1_000_000);
        if !(1_000..=1_000_000_000).contains(&max_message_bytes) {
            return Err(invalid(
                "kafka.max_message_bytes",
                "must be between 1000 and 1000000000",
            ));
        }
        let dlq_topic = k.dlq_topic.unwrap_or_else(|| "outbox.dlq".into());
        if !crate::route::valid_topic_name(&dlq_topic) {
            return Err(invalid(
                "kafka.dlq_topic",
                format!("`{dlq_topic}` is not a legal Kafka topic name"),
            ));
        }
        let mut properties = BTreeMap::new();
        for (name, value) in k.properties {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(invalid(
                        "kafka.properties",
                        format!("property `{name}` must be a string, number or boolean"),
                    ))
                }
            };
            if name == "bootstrap.servers" {
                return Err(invalid(
                    "kafka.properties",
                    "set `kafka.brokers` instead of `bootstrap.servers`",
                ));
            }
            properties.insert(name, value);
        }
        let delivery = match k.delivery.as_deref().unwrap_or("at-least-once") {
            "at-least-once" => Delivery::AtLeastOnce,
            "exactly-once" => Delivery::ExactlyOnce,
            other => {
                return Err(invalid(
                    "kafka.delivery",
                    format!("`{other}` is not one of at-least-once, exactly-once"),
                ))
            }
        };
        if properties.contains_key("transactional.id") {
            return Err(invalid(
                "kafka.properties",
                "set `kafka.transactional_id` (with kafka.delivery = \"exactly-once\") instead of `transactional.id`",
            ));
        }
        if let Some(id) = &k.transactional_id {
            if id.is_empty() || id.len() > 200 {
                return Err(invalid(
                    "kafka.transactional_id",
                    "must be between 1 and 200 characters",
                ));
            }
        }
        let position_topic = k
            .position_topic
            .unwrap_or_else(|| "outboxd.positions".into());
        if !crate::route::valid_topic_name(&position_topic) {
            return Err(invalid(
                "kafka.position_topic",
                format!("`{position_topic}` is not a legal Kafka topic name"),
            ));
        }
        let transaction_interval = ms(
            "kafka.transaction_ms",
            k.transaction_ms.unwrap_or(50),
            1,
            600_000,
        )?;
        let transaction_max_events = k.transaction_max_events.unwrap_or(10_000);
        if !(1..=10_000_000).contains(&transaction_max_events) {
            return Err(invalid(
                "kafka.transaction_max_events",
                "must be between 1 and 10000000",
            ));
        }

        let r = raw.retry;
        let initial_backoff = ms(
            "retry.initial_backoff_ms",
            r.initial_backoff_ms.unwrap_or(250),
            1,
            600_000,
        )?;
        let max_backoff = ms(
            "retry.max_backoff_ms",
            r.max_backoff_ms.unwrap_or(30_000),
            1,
            3_600_000,
        )?;
        let unready_after = ms(
            "retry.unready_after_ms",
            r.unready_after_ms.unwrap_or(60_000),
            0,
            86_400_000,
        )?;
        if max_backoff < initial_backoff {
            return Err(invalid(
                "retry.max_backoff_ms",
                "must not be smaller than retry.initial_backoff_ms",
            ));
        }

        Ok(Config {
            mode,
            polling,
            postgres: PostgresConfig {
                url,
                schema,
                table,
                slot,
                publication,
                heartbeat_interval,
                stream_timeout,
                max_slot_lag_bytes,
                stale_slot_holder,
                recreate_lost_slot,
                columns,
            },
            kafka: KafkaConfig {
                brokers,
                topic_template,
                max_in_flight,
                max_in_flight_bytes,
                delivery_timeout,
                shutdown_timeout,
                create_topics: k.create_topics.unwrap_or(true),
                topic_partitions,
                topic_replication_factor,
                max_record_retries,
                require_key: k.require_key.unwrap_or(true),
                max_message_bytes,
                dlq_topic,
                cloudevents: k.cloudevents.unwrap_or(false),
                cloudevents_source: k.cloudevents_source.unwrap_or_else(|| "/outboxd".into()),
                properties,
                delivery,
                transactional_id: k.transactional_id,
                position_topic,
                transaction_interval,
                transaction_max_events,
            },
            retry: RetryConfig {
                initial_backoff,
                max_backoff,
                unready_after,
            },
            http: HttpConfig { addr },
        })
    }
}

fn parse_raw(text: &str, path: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_string(),
        // toml's message spans several lines (a code excerpt); keep the operator's one line.
        reason: e
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_string()
            + &e.span()
                .map(|s| format!(" (at byte {})", s.start))
                .unwrap_or_default(),
    })
}

fn ms(key: &'static str, value: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max} milliseconds, got {value}"),
        ));
    }
    Ok(Duration::from_millis(value))
}

/// `schema.table` or `table` (schema `public`). Names are taken literally (case kept) and
/// always quoted in SQL, so they may not contain a dot themselves.
fn split_table(value: &str) -> Result<(String, String), ConfigError> {
    let (schema, table) = match value.split_once('.') {
        Some((s, t)) => (s.to_string(), t.to_string()),
        None => ("public".to_string(), value.to_string()),
    };
    if table.contains('.') {
        return Err(invalid(
            "postgres.table",
            "expected `schema.table` or `table`",
        ));
    }
    validate_identifier("postgres.table", &schema)?;
    validate_identifier("postgres.table", &table)?;
    Ok((schema, table))
}

fn validate_identifier(key: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(key, "name must not be empty"));
    }
    if name.len() > 63 {
        return Err(invalid(
            key,
            format!("`{name}` is longer than PostgreSQL's 63-byte limit"),
        ));
    }
    if name.contains('\0') {
        return Err(invalid(key, "name must not contain NUL"));
    }
    Ok(())
}

/// PostgreSQL allows only lower-case letters, digits and underscores in slot names.
fn validate_slot_name(name: &str) -> Result<(), ConfigError> {
    validate_identifier("postgres.slot", name)?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            "postgres.slot",
            format!("`{name}` may contain only lower-case letters, digits and underscores"),
        ));
    }
    Ok(())
}

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
}

/// The URL with any password replaced, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    // The heuristic below knows the shapes (userinfo, password=…); the parser knows the
    // password itself, however it is written: every spelling of it is blanked as well.
    let mut out = redact_shapes(url);
    let password = crate::pg::tls::split_url(url)
        .ok()
        .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().ok())
        .and_then(|c| {
            c.get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        });
    if let Some(p) = password.filter(|p| !p.is_empty()) {
        for spelling in [
            p.clone(),
            percent_encode(&p),
            p.replace('\\', "\\\\").replace('\'', "\\'"),
        ] {
            out = out.replace(&spelling, "***");
        }
    }
    out
}

/// Every byte outside `[A-Za-z0-9-._~]` percent-encoded.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The shapes a password takes in a URL (`user:password@`, `?password=`) or a key/value
/// string (`password=x`, `password = 'a b'`).
fn redact_shapes(url: &str) -> String {
    // URL form: scheme://user:password@host...
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        // The password may contain '/', '?' or '#': the userinfo ends at the last '@'
        // before the path, so look for '@' first.
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                let redacted = format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
                return redact_kv(&redacted);
            }
        }
        return redact_kv(url);
    }
    redact_kv(url)
}

/// Redacts `password=...` (also `password = '…'`) in key=value connection strings and URL
/// query strings.
fn redact_kv(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(pos) = lower.find("password") else {
            break;
        };
        let after_key = &rest[pos + "password".len()..];
        let trimmed = after_key.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            out.push_str(&rest[..pos + "password".len()]);
            rest = after_key;
            continue;
        };
        let value = value.trim_start();
        out.push_str(&rest[..pos]);
        out.push_str("password=***");
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            // A quoted value ends at the first quote not escaped by a backslash.
            let mut escaped = false;
            let mut end = quoted.len();
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = i + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end.min(quoted.len())
        } else {
            value.find([' ', '&']).unwrap_or(value.len())
        };
        rest = &value[end.min(value.len())..];
    }
    out.push_str(rest);
    out
}

fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n.contains("secret") || n.contains("key") || n.contains("token")
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("stream_timeout", &self.stream_timeout)
            .field("max_slot_lag_bytes", &self.max_slot_lag_bytes)
            .field("stale_slot_holder", &self.stale_slot_holder)
            .field("recreate_lost_slot", &self.recreate_lost_slot)
            .field("columns", &self.columns)
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_template", &self.topic_template)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("max_record_retries", &self.max_record_retries)
            .field("require_key", &self.require_key)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("dlq_topic", &self.dlq_topic)
            .field("cloudevents", &self.cloudevents)
            .field("cloudevents_source", &self.cloudevents_source)
            .field("properties", &props)
            .field("delivery", &self.delivery)
            .field("transactional_id", &self.transactional_id)
            .field("position_topic", &self.position_topic)
            .field("transaction_interval", &self.transaction_interval)
            .field("transaction_max_events", &self.transaction_max_events)
            .finish()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("mode", &self.mode)
            .field("polling", &self.polling)
            .field("postgres", &self.postgres)
            .field("kafka", &self.kafka)
            .field("retry", &self.retry)
            .field("http", &self.http)
            .finish()
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
        let text = include_str!("../config/outboxd.example.toml");
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
        assert_eq!(c.http.addr, d.http.addr);
        assert_eq!(c.postgres.columns, d.postgres.columns);
        assert_eq!(c.mode, d.mode);
        assert_eq!(format!("{:?}", c.polling), format!("{:?}", d.polling));
        assert_eq!(c.retry.max_backoff, d.retry.max_backoff);
        assert_eq!(c.retry.initial_backoff, d.retry.initial_backoff);
        assert_eq!(c.retry.unready_after, d.retry.unready_after);
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
            let encoded = super::percent_encode(&password);
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
