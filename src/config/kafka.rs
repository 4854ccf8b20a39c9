//! `[kafka]`: the broker list, topics, the producer's properties and the delivery modes —
//! validated here, each check naming its key. (The delivery-window keys it also holds may
//! come from `[sink]`: `super::sinks::merge_window_keys` moved them in and says which key the
//! operator wrote.)

use std::collections::BTreeMap;

use serde::Deserialize;

use super::load::ms;
use super::sinks::WindowKeys;
use super::{invalid, ConfigError, Delivery, KafkaConfig, SinkKind};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKafka {
    pub(super) brokers: Option<String>,
    pub(super) topic_template: Option<String>,
    pub(super) max_in_flight: Option<usize>,
    pub(super) max_in_flight_bytes: Option<usize>,
    pub(super) delivery_timeout_ms: Option<u64>,
    pub(super) shutdown_timeout_ms: Option<u64>,
    create_topics: Option<bool>,
    topic_partitions: Option<i32>,
    topic_replication_factor: Option<i32>,
    pub(super) max_record_retries: Option<u32>,
    pub(super) require_key: Option<bool>,
    pub(super) max_message_bytes: Option<usize>,
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

/// Validates `[kafka]` (`sink`: whether Kafka is the sink, so the broker list is required).
pub(super) fn validate(
    k: RawKafka,
    sink: SinkKind,
    keys: &WindowKeys,
) -> Result<KafkaConfig, ConfigError> {
    let brokers = match (k.brokers, sink) {
        (Some(b), _) => b,
        (None, SinkKind::Kafka) => {
            return Err(invalid(
                "kafka.brokers",
                "missing; set it in the config file or OUTBOXD_KAFKA_BROKERS",
            ))
        }
        (None, _) => String::new(),
    };
    if sink == SinkKind::Kafka && brokers.trim().is_empty() {
        return Err(invalid("kafka.brokers", "must not be empty"));
    }
    let topic_template = k
        .topic_template
        .unwrap_or_else(|| "outbox.event.{aggregatetype}".into());
    crate::topic::TopicTemplate::parse(&topic_template)
        .map_err(|problem| invalid("kafka.topic_template", problem))?;
    let max_in_flight = k.max_in_flight.unwrap_or(50_000);
    if !(1..=1_000_000).contains(&max_in_flight) {
        return Err(invalid(keys.max_in_flight, "must be between 1 and 1000000"));
    }
    let max_in_flight_bytes = k.max_in_flight_bytes.unwrap_or(64 << 20);
    if !((1 << 20)..=(16 << 30)).contains(&max_in_flight_bytes) {
        return Err(invalid(
            keys.max_in_flight_bytes,
            "must be between 1048576 (1 MiB) and 17179869184 (16 GiB)",
        ));
    }
    let delivery_timeout = ms(
        keys.delivery_timeout_ms,
        k.delivery_timeout_ms.unwrap_or(30_000),
        1_000,
        3_600_000,
    )?;
    let shutdown_timeout = ms(
        keys.shutdown_timeout_ms,
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
            keys.max_record_retries,
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
            keys.max_message_bytes,
            "must be between 1000 and 1000000000",
        ));
    }
    let dlq_topic = k.dlq_topic.unwrap_or_else(|| "outbox.dlq".into());
    if !crate::topic::valid_topic_name(&dlq_topic) {
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
        if let Some(problem) = weakens_acknowledgement(&name, &value) {
            return Err(invalid("kafka.properties", problem));
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
    if delivery == Delivery::ExactlyOnce && sink != SinkKind::Kafka {
        return Err(invalid(
            "kafka.delivery",
            format!(
                "exactly-once needs Kafka transactions; sink.kind = \"{}\" has none",
                sink.as_str()
            ),
        ));
    }
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
    if !crate::topic::valid_topic_name(&position_topic) {
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
    Ok(KafkaConfig {
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
    })
}

impl super::KafkaConfig {
    /// Exactly-once: librdkafka's `transaction.timeout.ms` (`kafka.properties`, default
    /// 60 s): past it the broker aborts an open transaction.
    pub fn transaction_timeout(&self) -> std::time::Duration {
        let ms = self
            .properties
            .get("transaction.timeout.ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(60_000);
        std::time::Duration::from_millis(ms)
    }
}

/// A producer property that would make a delivery report no proof the record is in the
/// log: the relay confirms its source position on those reports, so these are refused.
fn weakens_acknowledgement(name: &str, value: &str) -> Option<String> {
    match name {
        "acks" | "request.required.acks" if !matches!(value, "all" | "-1") => Some(format!(
            "`{name} = {value}` would let the broker acknowledge a record it can still lose \
             (the relay confirms the source on acknowledgements); leave it unset (all)"
        )),
        "enable.idempotence" if value != "true" => Some(format!(
            "`{name} = {value}`: without idempotence librdkafka's retries can reorder or \
             duplicate a key's events; leave it unset (true)"
        )),
        _ => None,
    }
}
