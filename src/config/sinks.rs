//! `[sink]`, `[rabbitmq]` and `[nats]`: which broker the relay publishes to, and the settings
//! of the two non-Kafka ones (Kafka's are `[kafka]`, validated in `load.rs`).
//!
//! The delivery-window keys (`max_in_flight`, `max_in_flight_bytes`, `delivery_timeout_ms`,
//! `shutdown_timeout_ms`, `max_record_retries`, `max_message_bytes`, `require_key`) apply to
//! every sink. They were `[kafka]` keys before there was another sink, so they are accepted
//! in either section, never both: [`merge_window_keys`] moves them and remembers where each
//! came from, so an error names the key the operator wrote.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError, NatsConfig, RabbitMqConfig, SinkKind};
use crate::topic::TopicTemplate;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    pub(super) kind: Option<String>,
    max_in_flight: Option<usize>,
    max_in_flight_bytes: Option<usize>,
    delivery_timeout_ms: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    max_record_retries: Option<u32>,
    max_message_bytes: Option<usize>,
    require_key: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRabbitMq {
    pub(super) url: Option<String>,
    exchange: Option<String>,
    exchange_type: Option<String>,
    declare_exchange: Option<bool>,
    routing_key: Option<String>,
    dead_letter_queue: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNats {
    pub(super) url: Option<String>,
    subject: Option<String>,
    stream: Option<String>,
    create_stream: Option<bool>,
    stream_subjects: Option<Vec<String>>,
    duplicate_window_ms: Option<u64>,
    dead_letter_subject: Option<String>,
    ack_timeout_ms: Option<u64>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

/// Where each delivery-window key was set: `sink.…` or `kafka.…`.
pub(super) struct WindowKeys {
    pub max_in_flight: &'static str,
    pub max_in_flight_bytes: &'static str,
    pub delivery_timeout_ms: &'static str,
    pub shutdown_timeout_ms: &'static str,
    pub max_record_retries: &'static str,
    pub max_message_bytes: &'static str,
}

/// Moves the delivery-window keys set in `[sink]` into `[kafka]`'s raw form (where they are
/// validated), refusing a key set in both.
pub(super) fn merge_window_keys(
    sink: &mut RawSink,
    kafka: &mut super::kafka::RawKafka,
) -> Result<WindowKeys, ConfigError> {
    fn take<T>(
        from_sink: &mut Option<T>,
        into: &mut Option<T>,
        sink_key: &'static str,
        kafka_key: &'static str,
    ) -> Result<&'static str, ConfigError> {
        match (from_sink.take(), into.is_some()) {
            (Some(_), true) => Err(invalid(
                sink_key,
                format!("also set as `{kafka_key}`; keep one (the [sink] one)"),
            )),
            (Some(v), false) => {
                *into = Some(v);
                Ok(sink_key)
            }
            (None, _) => Ok(kafka_key),
        }
    }
    let keys = WindowKeys {
        max_in_flight: take(
            &mut sink.max_in_flight,
            &mut kafka.max_in_flight,
            "sink.max_in_flight",
            "kafka.max_in_flight",
        )?,
        max_in_flight_bytes: take(
            &mut sink.max_in_flight_bytes,
            &mut kafka.max_in_flight_bytes,
            "sink.max_in_flight_bytes",
            "kafka.max_in_flight_bytes",
        )?,
        delivery_timeout_ms: take(
            &mut sink.delivery_timeout_ms,
            &mut kafka.delivery_timeout_ms,
            "sink.delivery_timeout_ms",
            "kafka.delivery_timeout_ms",
        )?,
        shutdown_timeout_ms: take(
            &mut sink.shutdown_timeout_ms,
            &mut kafka.shutdown_timeout_ms,
            "sink.shutdown_timeout_ms",
            "kafka.shutdown_timeout_ms",
        )?,
        max_record_retries: take(
            &mut sink.max_record_retries,
            &mut kafka.max_record_retries,
            "sink.max_record_retries",
            "kafka.max_record_retries",
        )?,
        max_message_bytes: take(
            &mut sink.max_message_bytes,
            &mut kafka.max_message_bytes,
            "sink.max_message_bytes",
            "kafka.max_message_bytes",
        )?,
    };
    take(
        &mut sink.require_key,
        &mut kafka.require_key,
        "sink.require_key",
        "kafka.require_key",
    )?;
    Ok(keys)
}

pub(super) fn sink_kind(sink: &RawSink) -> Result<SinkKind, ConfigError> {
    match sink.kind.as_deref().unwrap_or("kafka") {
        "kafka" => Ok(SinkKind::Kafka),
        "rabbitmq" => Ok(SinkKind::RabbitMq),
        "nats" => Ok(SinkKind::Nats),
        "sqs" => Ok(SinkKind::Sqs),
        "sns" => Ok(SinkKind::Sns),
        "eventbridge" => Ok(SinkKind::EventBridge),
        "pubsub" => Ok(SinkKind::PubSub),
        "servicebus" => Ok(SinkKind::ServiceBus),
        other => Err(invalid(
            "sink.kind",
            format!(
                "`{other}` is not one of: kafka, rabbitmq, nats, sqs, sns, eventbridge, pubsub, servicebus"
            ),
        )),
    }
}

/// A file the relay must be able to read (a CA or client certificate): checked here, so a
/// typo is exit 2 naming the key, not a TLS error later.
fn readable(key: &'static str, path: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(path) = path else {
        return Ok(None);
    };
    std::fs::metadata(&path).map_err(|e| invalid(key, format!("cannot read `{path}`: {e}")))?;
    Ok(Some(path))
}

fn template(key: &'static str, text: &str) -> Result<(), ConfigError> {
    TopicTemplate::parse(text)
        .map(|_| ())
        .map_err(|p| invalid(key, p))
}

/// `url` is required only when this is the sink in use.
fn url(
    key: &'static str,
    value: Option<String>,
    used: bool,
    schemes: &[&str],
    env: &str,
) -> Result<String, ConfigError> {
    let Some(url) = value else {
        if used {
            return Err(invalid(
                key,
                format!("missing; set it in the config file or {env}"),
            ));
        }
        return Ok(String::new());
    };
    if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
        // Never echo the URL: it may hold a password.
        return Err(invalid(
            key,
            format!("must start with {}://", schemes.join("://, ")),
        ));
    }
    Ok(url)
}

pub(super) fn rabbitmq(raw: RawRabbitMq, used: bool) -> Result<RabbitMqConfig, ConfigError> {
    let url = url(
        "rabbitmq.url",
        raw.url,
        used,
        &["amqp", "amqps"],
        "OUTBOXD_RABBITMQ_URL",
    )?;
    if used && url.parse::<lapin::uri::AMQPUri>().is_err() {
        // Never echo the URL: it may hold a password.
        return Err(invalid(
            "rabbitmq.url",
            "not an AMQP URL (amqp://user:password@host:port/vhost, the vhost percent-encoded)",
        ));
    }
    let exchange = raw.exchange.unwrap_or_else(|| "outbox".into());
    template("rabbitmq.exchange", &exchange)?;
    let exchange_type = raw.exchange_type.unwrap_or_else(|| "topic".into());
    if !["topic", "direct", "fanout", "headers"].contains(&exchange_type.as_str()) {
        return Err(invalid(
            "rabbitmq.exchange_type",
            format!("`{exchange_type}` is not one of: topic, direct, fanout, headers"),
        ));
    }
    let routing_key = raw
        .routing_key
        .unwrap_or_else(|| "{aggregatetype}.{type}".into());
    template("rabbitmq.routing_key", &routing_key)?;
    let dead_letter_queue = raw
        .dead_letter_queue
        .unwrap_or_else(|| "outboxd.dead_letter".into());
    if !crate::topic::valid_amqp_name(&dead_letter_queue) {
        return Err(invalid(
            "rabbitmq.dead_letter_queue",
            "must be 1–255 of letters, digits, `-`, `_`, `.`, `:`",
        ));
    }
    let ca_file = readable("rabbitmq.ca_file", raw.ca_file)?;
    // A CA with a plaintext URL would be ignored: the operator believes TLS is on while the
    // credentials cross the network in clear text.
    if ca_file.is_some() && !url.is_empty() && !url.starts_with("amqps://") {
        return Err(invalid(
            "rabbitmq.ca_file",
            "is set but rabbitmq.url is not amqps://: the connection would not use TLS",
        ));
    }
    Ok(RabbitMqConfig {
        ca_file,
        url,
        exchange,
        exchange_type,
        declare_exchange: raw.declare_exchange.unwrap_or(true),
        routing_key,
        dead_letter_queue,
    })
}

pub(super) fn nats(raw: RawNats, used: bool) -> Result<NatsConfig, ConfigError> {
    let url = url(
        "nats.url",
        raw.url,
        used,
        &["nats", "tls"],
        "OUTBOXD_NATS_URL",
    )?;
    let subject = raw
        .subject
        .unwrap_or_else(|| "outbox.{aggregatetype}.{type}".into());
    template("nats.subject", &subject)?;
    let stream = raw.stream.unwrap_or_else(|| "OUTBOX".into());
    if stream.is_empty()
        || stream
            .chars()
            .any(|c| c.is_whitespace() || ".*>/\\".contains(c))
    {
        return Err(invalid(
            "nats.stream",
            "must be a stream name: not empty, no whitespace, `.`, `*`, `>`, `/` or `\\`",
        ));
    }
    let dead_letter_subject = raw
        .dead_letter_subject
        .unwrap_or_else(|| "outboxd.dead_letter".into());
    if !crate::topic::valid_nats_subject(&dead_letter_subject) {
        return Err(invalid(
            "nats.dead_letter_subject",
            "must be a subject without wildcards (dot-separated, no empty tokens, no whitespace)",
        ));
    }
    let stream_subjects = raw
        .stream_subjects
        .unwrap_or_else(|| vec!["outbox.>".into(), dead_letter_subject.clone()]);
    if stream_subjects.is_empty() {
        return Err(invalid("nats.stream_subjects", "must not be empty"));
    }
    let duplicate_window = raw.duplicate_window_ms.unwrap_or(120_000);
    if !(1_000..=7 * 86_400_000).contains(&duplicate_window) {
        return Err(invalid(
            "nats.duplicate_window_ms",
            "must be between 1000 and 604800000 milliseconds",
        ));
    }
    let ack_timeout = raw.ack_timeout_ms.unwrap_or(5_000);
    if !(100..=600_000).contains(&ack_timeout) {
        return Err(invalid(
            "nats.ack_timeout_ms",
            "must be between 100 and 600000 milliseconds",
        ));
    }
    let ca_file = readable("nats.ca_file", raw.ca_file)?;
    let cert_file = readable("nats.cert_file", raw.cert_file)?;
    let key_file = readable("nats.key_file", raw.key_file)?;
    if cert_file.is_some() != key_file.is_some() {
        return Err(invalid(
            "nats.cert_file",
            "a client certificate needs both nats.cert_file and nats.key_file",
        ));
    }
    Ok(NatsConfig {
        ca_file,
        cert_file,
        key_file,
        url,
        subject,
        stream,
        create_stream: raw.create_stream.unwrap_or(true),
        stream_subjects,
        duplicate_window: Duration::from_millis(duplicate_window),
        dead_letter_subject,
        ack_timeout: Duration::from_millis(ack_timeout),
    })
}
