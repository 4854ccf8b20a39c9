//! Event → Kafka record: topic from a template, key, headers, value.

use crate::contract::Verdict;
use crate::event::{rfc3339_ms, Event};
pub use crate::poison::{Poison, PoisonKind};
pub use crate::record::{record_size, Record};
pub use crate::topic::{valid_amqp_name, valid_topic_name, Naming, TopicTemplate};

/// The string members of a `headers` JSON object (`null` members left out, `id`/`type`
/// ignored with a warning); `Err` says why it is not an object of strings.
fn string_headers(
    text: &str,
    warnings: &mut Vec<RouteWarning>,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let map = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(serde_json::Value::Null) => return Ok(Vec::new()),
        Ok(_) => return Err("`headers` is not a JSON object".into()),
        Err(e) => return Err(format!("`headers` is not valid JSON: {e}")),
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        match value {
            serde_json::Value::Null => {}
            _ if name == "id" || name == "type" => warnings.push(RouteWarning(format!(
                "headers member `{name}` ignored: the relay sets `{name}` itself"
            ))),
            serde_json::Value::String(s) => out.push((name, s.into_bytes())),
            other => return Err(format!("headers member `{name}` is {other}, not a string")),
        }
    }
    Ok(out)
}

/// A routed record and the warnings worth logging.
pub type Routed = (Record, Vec<RouteWarning>);
/// A poison event: the record as far as it could be built (for the dead-letter destination)
/// and why.
pub type Rejected = Box<(Record, Poison)>;

/// Event → record, with the checks that make an event poison.
#[derive(Debug, Clone)]
pub struct Router {
    /// Topic, subject or routing key.
    pub template: TopicTemplate,
    /// RabbitMQ: the exchange template; EventBridge: the `Source` template.
    pub exchange: Option<TopicTemplate>,
    /// EventBridge: the `DetailType` template.
    pub detail_type: Option<TopicTemplate>,
    /// The event contracts (`schemas.dir`), checked before an event is published
    /// (`schemas.encoding = "json"`; otherwise the serializer checks them).
    pub contracts: Option<std::sync::Arc<crate::contract::Contracts>>,
    /// Writes events in a registry's wire format (`schemas.encoding` other than `json`), after
    /// routing: it may need the registry, which routing never waits for.
    pub serializer: Option<std::sync::Arc<crate::contract::serializer::Serializer>>,
    /// The rule a rendered destination must follow.
    pub naming: Naming,
    pub require_key: bool,
    pub max_message_bytes: usize,
    /// `Some(source)`: add CloudEvents binary-mode headers with this `ce_source`.
    pub cloudevents_source: Option<String>,
    /// Destinations an event may not name (the relay's own: dead-letter and position topics,
    /// the dead-letter subject).
    pub reserved: Vec<String>,
}

/// A routing problem worth a warning; the record is still produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteWarning(pub String);

impl Router {
    pub fn from_config(cfg: &crate::config::Config) -> crate::error::Result<Router> {
        use crate::config::SinkKind;
        let parse = |key: &str, text: &str| {
            TopicTemplate::parse(text).map_err(|p| {
                crate::error::Error::setup(format!("{key}: {p}"), "correct the template")
            })
        };
        let mut detail_type = None;
        let (template, exchange, naming) = match cfg.sink {
            SinkKind::Kafka => (
                parse("kafka.topic_template", &cfg.kafka.topic_template)?,
                None,
                Naming::KafkaTopic,
            ),
            SinkKind::RabbitMq => (
                parse("rabbitmq.routing_key", &cfg.rabbitmq.routing_key)?,
                Some(parse("rabbitmq.exchange", &cfg.rabbitmq.exchange)?),
                Naming::AmqpRoutingKey,
            ),
            SinkKind::Nats => (
                parse("nats.subject", &cfg.nats.subject)?,
                None,
                Naming::NatsSubject,
            ),
            SinkKind::Sqs => (parse("sqs.queue", &cfg.sqs.queue)?, None, Naming::SqsQueue),
            SinkKind::Sns => (
                parse("sns.topic_arn", &cfg.sns.topic_arn)?,
                None,
                Naming::SnsTopicArn,
            ),
            SinkKind::ServiceBus => (
                parse("servicebus.queue", &cfg.servicebus.queue)?,
                None,
                Naming::ServiceBusEntity,
            ),
            SinkKind::PubSub => (
                parse("pubsub.topic", &cfg.pubsub.topic)?,
                None,
                Naming::PubSubTopic,
            ),
            SinkKind::EventBridge => {
                let eb = &cfg.eventbridge;
                detail_type = Some(parse("eventbridge.detail_type", &eb.detail_type)?);
                (
                    parse("eventbridge.event_bus", &eb.event_bus)?,
                    Some(parse("eventbridge.source", &eb.source)?),
                    Naming::EventBus,
                )
            }
        };
        let contracts = crate::contract::Contracts::load(&cfg.schemas)?.map(std::sync::Arc::new);
        let serializer =
            crate::contract::serializer::Serializer::new(&cfg.schemas, contracts.clone())?
                .map(std::sync::Arc::new);
        Ok(Router {
            template,
            exchange,
            detail_type,
            contracts: if serializer.is_some() {
                None
            } else {
                contracts
            },
            serializer,
            naming,
            require_key: cfg.kafka.require_key,
            max_message_bytes: cfg.kafka.max_message_bytes,
            cloudevents_source: cfg
                .kafka
                .cloudevents
                .then(|| cfg.kafka.cloudevents_source.clone()),
            reserved: match cfg.sink {
                SinkKind::Kafka => vec![
                    cfg.kafka.dlq_topic.clone(),
                    cfg.kafka.position_topic.clone(),
                ],
                SinkKind::Nats => vec![cfg.nats.dead_letter_subject.clone()],
                SinkKind::Sqs => vec![cfg.sqs.dead_letter_queue.clone()],
                SinkKind::Sns => vec![cfg.sns.dead_letter_topic_arn.clone()],
                SinkKind::EventBridge => vec![cfg.eventbridge.dead_letter_event_bus.clone()],
                SinkKind::PubSub => vec![cfg.pubsub.dead_letter_topic.clone()],
                SinkKind::ServiceBus => vec![cfg.servicebus.dead_letter_queue.clone()],
                SinkKind::RabbitMq => Vec::new(),
            },
        })
    }

    /// The record's other address parts: a RabbitMQ exchange name; an EventBridge `Source`
    /// (1–256 characters, not `aws.…`, which AWS keeps for its own services) and `DetailType`
    /// (1–128 characters).
    fn check_parts(&self, record: &Record) -> Result<(), String> {
        let exchange = record.exchange.as_deref().unwrap_or_default();
        match self.naming {
            Naming::AmqpRoutingKey if !valid_amqp_name(exchange) => Err(format!(
                "`{exchange}` is not a legal RabbitMQ exchange name"
            )),
            Naming::EventBus => {
                let detail_type = record.detail_type.as_deref().unwrap_or_default();
                if exchange.is_empty()
                    || exchange.chars().count() > 256
                    || exchange.to_ascii_lowercase().starts_with("aws.")
                {
                    Err(format!(
                        "`{exchange}` is not an EventBridge Source (1–256 characters, not `aws.…`)"
                    ))
                } else if detail_type.is_empty() || detail_type.chars().count() > 128 {
                    Err(format!(
                        "`{detail_type}` is not an EventBridge DetailType (1–128 characters)"
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Builds the record: headers `id` and `type` first, then every member of the `headers`
    /// object (string values; `null` members are left out). `Err` carries the record as far
    /// as it could be built (for the dead-letter destination) and why it is poison.
    pub fn route(&self, event: &Event) -> Result<Routed, Rejected> {
        self.route_with_value(event, event.payload.clone())
    }

    /// [`Router::route`] with the value given, so that a caller that owns the event can move
    /// its payload into the record instead of copying it (a 100 MB row is copied often enough
    /// between the socket and the producer).
    pub fn route_with_value(
        &self,
        event: &Event,
        value: Option<Vec<u8>>,
    ) -> Result<Routed, Rejected> {
        let mut warnings = Vec::new();
        let commit_ms = event
            .commit_time
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let timestamp_ms = event.extra.timestamp_ms.unwrap_or(commit_ms);
        let mut record = Record {
            topic: match &event.extra.topic {
                Some(t) if !t.is_empty() => t.clone(),
                _ => self.template.render(event),
            },
            exchange: self.exchange.as_ref().map(|t| t.render(event)),
            detail_type: self.detail_type.as_ref().map(|t| t.render(event)),
            binary: event.extra.binary_payload,
            key: event.aggregateid.clone(),
            value,
            headers: vec![
                ("id".to_string(), event.id.clone().into_bytes()),
                ("type".to_string(), event.event_type.clone().into_bytes()),
            ],
            partition: event.extra.partition,
            timestamp_ms: Some(timestamp_ms),
        };
        for (name, value) in &event.extra.headers {
            record
                .headers
                .push((name.clone(), value.clone().into_bytes()));
        }
        if let Some(source) = &self.cloudevents_source {
            let content_type = if event.extra.binary_payload {
                "application/octet-stream"
            } else {
                "application/json"
            };
            record.headers.extend([
                ("ce_specversion".to_string(), b"1.0".to_vec()),
                ("ce_id".to_string(), event.id.clone().into_bytes()),
                ("ce_source".to_string(), source.clone().into_bytes()),
                ("ce_type".to_string(), event.event_type.clone().into_bytes()),
                ("ce_time".to_string(), rfc3339_ms(timestamp_ms).into_bytes()),
                ("content-type".to_string(), content_type.as_bytes().to_vec()),
            ]);
        }
        let poison =
            |record: Record, kind, detail: String| Err(Box::new((record, Poison { kind, detail })));
        if let Some(text) = &event.headers {
            match string_headers(text, &mut warnings) {
                Ok(extra) => record.headers.extend(extra),
                Err(detail) => {
                    record
                        .headers
                        .push(("outboxd.headers".into(), text.clone().into_bytes()));
                    return poison(record, PoisonKind::InvalidHeaders, detail);
                }
            }
        }
        if let Err(detail) = self.naming.check(&record.topic) {
            return poison(record, PoisonKind::InvalidTopic, detail);
        }
        // A per-row destination (or a template led by a placeholder) must not reach the
        // relay's own topics.
        if self.reserved.contains(&record.topic) {
            let detail = format!("`{}` is the relay's own destination", record.topic);
            return poison(record, PoisonKind::InvalidTopic, detail);
        }
        if let Err(detail) = self.check_parts(&record) {
            return poison(record, PoisonKind::InvalidTopic, detail);
        }
        if let (Some(contracts), false) = (&self.contracts, event.extra.change) {
            let verdict = contracts.check(
                &event.aggregatetype,
                &event.event_type,
                record.value.as_deref(),
            );
            crate::contract::count_validation(
                &event.aggregatetype,
                &event.event_type,
                verdict.label(),
            );
            match verdict {
                Verdict::Invalid(detail) => {
                    return poison(record, PoisonKind::SchemaInvalid, detail);
                }
                Verdict::Missing => {
                    let detail = format!(
                        "no schema for aggregatetype `{}`, type `{}` and schemas.require_schema is on",
                        event.aggregatetype, event.event_type
                    );
                    return poison(record, PoisonKind::SchemaMissing, detail);
                }
                Verdict::Valid | Verdict::NoSchema => {}
            }
        }
        if self.require_key && record.key.is_none() && !event.extra.change {
            return poison(
                record,
                PoisonKind::MissingKey,
                "aggregateid is NULL and kafka.require_key is on".into(),
            );
        }
        let size = record_size(&record);
        if size > self.max_message_bytes {
            let detail = format!(
                "about {size} bytes, over kafka.max_message_bytes = {}",
                self.max_message_bytes
            );
            return poison(record, PoisonKind::TooLarge, detail);
        }
        Ok((record, warnings))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;

    fn event(headers: Option<&str>) -> Event {
        Event {
            id: "6f1c".into(),
            aggregatetype: "order".into(),
            aggregateid: Some("42".into()),
            event_type: "OrderPlaced".into(),
            payload: Some(br#"{"total": 10}"#.to_vec()),
            headers: headers.map(str::to_string),
            commit_time: SystemTime::UNIX_EPOCH,
            extra: Default::default(),
        }
    }

    fn router(template: &str) -> Router {
        Router {
            template: TopicTemplate::parse(template).unwrap(),
            exchange: None,
            detail_type: None,
            contracts: None,
            serializer: None,
            naming: Naming::KafkaTopic,
            require_key: true,
            max_message_bytes: 1_000_000,
            cloudevents_source: None,
            reserved: vec!["outbox.dlq".into(), "outboxd.positions".into()],
        }
    }

    #[test]
    fn rfc3339_formats_utc_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_229_896_789), "2024-02-29T18:04:56.789Z");
    }

    #[test]
    fn mapping_extras_and_cloudevents_headers() {
        let mut e = event(None);
        e.extra = crate::event::EventExtra {
            timestamp_ms: Some(1_709_229_896_789),
            topic: Some("override.topic".into()),
            partition: Some(2),
            headers: vec![("tenant".into(), "acme".into())],
            binary_payload: true,
            change: false,
        };
        let mut r = router("t");
        r.cloudevents_source = Some("/orders".into());
        let (rec, _) = r.route(&e).unwrap();
        assert_eq!(rec.topic, "override.topic");
        assert_eq!(rec.partition, Some(2));
        assert_eq!(rec.timestamp_ms, Some(1_709_229_896_789));
        let h: std::collections::HashMap<_, _> = rec.headers.into_iter().collect();
        assert_eq!(h["tenant"], b"acme");
        assert_eq!(h["ce_id"], b"6f1c");
        assert_eq!(h["ce_source"], b"/orders");
        assert_eq!(h["ce_type"], b"OrderPlaced");
        assert_eq!(h["ce_time"], b"2024-02-29T18:04:56.789Z");
        assert_eq!(h["content-type"], b"application/octet-stream");
    }

    #[test]
    fn template_renders_placeholders() {
        let t = TopicTemplate::parse("outbox.{aggregatetype}.{type}").unwrap();
        assert_eq!(t.render(&event(None)), "outbox.order.OrderPlaced");
    }

    #[test]
    fn template_rejects_unknown_placeholder() {
        let e = TopicTemplate::parse("x.{aggregate}").unwrap_err();
        assert!(e.contains("{aggregate}"), "{e}");
        assert!(TopicTemplate::parse("x.{type").is_err());
        assert!(TopicTemplate::parse("x}").is_err());
    }

    #[test]
    fn record_carries_id_type_and_string_headers() {
        let (r, w) = router("outbox.event.{aggregatetype}")
            .route(&event(Some(r#"{"traceparent":"00-ab","z":null}"#)))
            .unwrap();
        assert!(w.is_empty());
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(r.key.as_deref(), Some("42"));
        assert_eq!(r.value.as_deref(), Some(&br#"{"total": 10}"#[..]));
        assert_eq!(
            r.headers,
            vec![
                ("id".into(), b"6f1c".to_vec()),
                ("type".into(), b"OrderPlaced".to_vec()),
                ("traceparent".into(), b"00-ab".to_vec()),
            ]
        );
    }

    #[test]
    fn headers_that_are_not_an_object_of_strings_are_poison() {
        for h in ["[1,2]", r#"{"n": 3}"#, "not json"] {
            let (r, p) = *router("t").route(&event(Some(h))).unwrap_err();
            assert_eq!(p.kind, PoisonKind::InvalidHeaders, "{h}");
            assert_eq!(r.headers[0], ("id".into(), b"6f1c".to_vec()));
        }
    }

    #[test]
    fn illegal_topic_missing_key_and_oversize_are_poison() {
        let mut e = event(None);
        e.aggregatetype = "bad topic!".into();
        assert_eq!(
            router("x.{aggregatetype}").route(&e).unwrap_err().1.kind,
            PoisonKind::InvalidTopic
        );
        let mut e = event(None);
        e.aggregateid = None;
        assert_eq!(
            router("t").route(&e).unwrap_err().1.kind,
            PoisonKind::MissingKey
        );
        let mut r = router("t");
        r.require_key = false;
        assert!(r.route(&e).is_ok());
        r.max_message_bytes = 50;
        assert_eq!(
            r.route(&event(None)).unwrap_err().1.kind,
            PoisonKind::TooLarge
        );
    }

    #[test]
    fn an_event_may_not_name_the_relays_own_destinations() {
        let mut e = event(None);
        e.extra.topic = Some("outboxd.positions".into());
        assert_eq!(
            router("t").route(&e).unwrap_err().1.kind,
            PoisonKind::InvalidTopic
        );
        let mut r = router("{aggregatetype}");
        r.naming = Naming::NatsSubject;
        let mut e = event(None);
        e.aggregatetype = "$JS.API.STREAM.PURGE.ORDERS".into();
        assert_eq!(r.route(&e).unwrap_err().1.kind, PoisonKind::InvalidTopic);
        e.aggregatetype = "_INBOX.x".into();
        assert_eq!(r.route(&e).unwrap_err().1.kind, PoisonKind::InvalidTopic);
        e.aggregatetype = "orders".into();
        assert!(r.route(&e).is_ok());
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(valid_topic_name("outbox.event.order_v1-x"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name(".."));
        assert!(!valid_topic_name("a/b"));
        assert!(!valid_topic_name(&"a".repeat(250)));
    }
}
