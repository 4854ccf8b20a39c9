//! The file and the environment → a validated [`Config`]: every field optional in the raw
//! form, so defaults and the environment fill the gaps; each check names its key.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::sinks;
use super::*;

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
    kafka: super::kafka::RawKafka,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    sink: sinks::RawSink,
    #[serde(default)]
    rabbitmq: sinks::RawRabbitMq,
    #[serde(default)]
    nats: sinks::RawNats,
    #[serde(default)]
    aws: super::aws::RawAws,
    #[serde(default)]
    sqs: super::aws::RawSqs,
    #[serde(default)]
    sns: super::aws::RawSns,
    #[serde(default)]
    eventbridge: super::aws::RawEventBridge,
    #[serde(default)]
    pubsub: super::pubsub::RawPubSub,
    #[serde(default)]
    servicebus: super::servicebus::RawServiceBus,
    #[serde(default)]
    schemas: super::schemas::RawSchemas,
    #[serde(default)]
    cdc: super::cdc::RawCdc,
    #[serde(default)]
    tracing: super::traces::RawTracing,
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
    outbox: Option<bool>,
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
struct RawRetry {
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    unready_after_ms: Option<u64>,
}

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
        if let Some(v) = env_nonempty("OUTBOXD_SINK") {
            raw.sink.kind = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_RABBITMQ_URL") {
            raw.rabbitmq.url = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_NATS_URL") {
            raw.nats.url = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_SCHEMA_REGISTRY_PASSWORD") {
            raw.schemas.registry_password = Some(v);
        }
        if let Some(v) = env_nonempty("OUTBOXD_SERVICEBUS_CONNECTION_STRING") {
            raw.servicebus.connection_string = Some(v);
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
        let outbox = p.outbox.unwrap_or(true);
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

        // Loopback unless asked: /status shows error text (table and host names, event ids);
        // a sidecar or a container image opts in to 0.0.0.0 explicitly.
        let addr_text = raw.http.addr.unwrap_or_else(|| "127.0.0.1:9465".into());
        let addr = addr_text.parse().map_err(|_| {
            invalid(
                "http.addr",
                format!("`{addr_text}` is not an IP:port address"),
            )
        })?;

        let sink = sinks::sink_kind(&raw.sink)?;
        let keys = sinks::merge_window_keys(&mut raw.sink, &mut raw.kafka)?;
        let rabbitmq = sinks::rabbitmq(raw.rabbitmq, sink == SinkKind::RabbitMq)?;
        let nats = sinks::nats(raw.nats, sink == SinkKind::Nats)?;
        let aws = super::aws::aws(
            raw.aws,
            matches!(sink, SinkKind::Sqs | SinkKind::Sns | SinkKind::EventBridge),
        )?;
        let sqs = super::aws::sqs(raw.sqs)?;
        let sns = super::aws::sns(raw.sns, sink == SinkKind::Sns)?;
        let eventbridge = super::aws::eventbridge(raw.eventbridge, sink == SinkKind::EventBridge)?;
        let pubsub = super::pubsub::pubsub(raw.pubsub, sink == SinkKind::PubSub)?;
        let servicebus =
            super::servicebus::servicebus(raw.servicebus, sink == SinkKind::ServiceBus)?;
        let schemas = super::schemas::schemas(raw.schemas)?;
        let tracing = super::traces::tracing(raw.tracing, &env)?;
        if sink == SinkKind::EventBridge && schemas.encoding != super::Encoding::Json {
            return Err(invalid(
                "schemas.encoding",
                "EventBridge's Detail is a JSON object: it cannot carry the registry's wire format (use json)",
            ));
        }
        let mut cdc = super::cdc::load(raw.cdc)?;
        // Avro change events are converted from their Kafka Connect schema
        // (`crate::contract::connect`), which the change event then carries.
        if schemas.encoding == super::Encoding::Avro {
            std::sync::Arc::make_mut(&mut cdc).schemas = true;
        }
        if !outbox && !cdc.enabled() {
            return Err(invalid(
                "postgres.outbox",
                "false relays no outbox table, so cdc.tables must name tables to capture",
            ));
        }
        if !outbox && mode == Mode::Polling {
            return Err(invalid(
                "postgres.outbox",
                "false needs mode = \"logical\" (polling reads the outbox table)",
            ));
        }
        if cdc.enabled() && mode == Mode::Polling {
            return Err(invalid(
                "cdc.tables",
                "table CDC needs mode = \"logical\" (a polling relay reads only the outbox table)",
            ));
        }
        let kafka = super::kafka::validate(raw.kafka, sink, &keys)?;

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
                outbox,
                cdc,
            },
            kafka,
            retry: RetryConfig {
                initial_backoff,
                max_backoff,
                unready_after,
            },
            http: HttpConfig { addr },
            sink,
            rabbitmq,
            nats,
            aws,
            sqs,
            sns,
            eventbridge,
            pubsub,
            servicebus,
            schemas,
            tracing,
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

pub(super) fn ms(
    key: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
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
