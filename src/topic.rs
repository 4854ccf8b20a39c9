//! Topic names: the template that makes them from an event, and Kafka's rule for them.
//! A leaf module: configuration validates templates with it, routing renders them.

use crate::event::Event;

/// A topic template such as `outbox.event.{aggregatetype}`.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    AggregateType,
    Type,
}

impl TopicTemplate {
    /// Parses a template; placeholders are `{aggregatetype}` and `{type}`.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{template}`"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "aggregatetype" => Part::AggregateType,
                "type" => Part::Type,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` (known: {{aggregatetype}}, {{type}})"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in `{template}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(TopicTemplate { parts })
    }

    pub fn render(&self, event: &Event) -> String {
        self.render_parts(&event.aggregatetype, &event.event_type)
    }

    /// The name for an event of `aggregatetype` and `event_type`.
    pub fn render_parts(&self, aggregatetype: &str, event_type: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::AggregateType => out.push_str(aggregatetype),
                Part::Type => out.push_str(event_type),
            }
        }
        out
    }
}

/// Kafka's rule for topic names: 1–249 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A NATS subject one publishes to: dot-separated tokens, none empty, no whitespace, no
/// wildcards (`*`, `>`), and not the server's own (`$JS.API.…` — a row could otherwise purge
/// or delete a stream with the relay's rights —, `$SYS`, `_INBOX`).
pub fn valid_nats_subject(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('$')
        && !name.starts_with("_INBOX.")
        && name
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(char::is_whitespace))
}

/// A RabbitMQ exchange or queue name: 1–255 of `[A-Za-z0-9._:-]`.
pub fn valid_amqp_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// An AMQP routing key: at most 255 bytes (a short string).
pub fn valid_routing_key(name: &str) -> bool {
    name.len() <= 255
}

/// An SQS queue name: 1–80 letters, digits, `-` and `_`, the `.fifo` suffix of a FIFO queue
/// included in the 80.
pub fn valid_sqs_queue(name: &str) -> bool {
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    !base.is_empty()
        && name.len() <= 80
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An SNS topic ARN: `arn:PARTITION:sns:REGION:ACCOUNT:NAME`, the name 1–256 letters,
/// digits, `-` and `_` (`.fifo` for a FIFO topic).
pub fn valid_sns_topic_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [arn_word, partition, service, region, account, name] = parts[..] else {
        return false;
    };
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    arn_word == "arn"
        && !partition.is_empty()
        && service == "sns"
        && !region.is_empty()
        && !account.is_empty()
        && !base.is_empty()
        && name.len() <= 256
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An EventBridge event bus: its name (1–256 of letters, digits, `.`, `-`, `_`, `/`) or its
/// ARN (`arn:PARTITION:events:REGION:ACCOUNT:event-bus/NAME`).
pub fn valid_event_bus(bus: &str) -> bool {
    let name = if bus.starts_with("arn:") {
        let parts: Vec<&str> = bus.splitn(6, ':').collect();
        match parts[..] {
            [_, partition, "events", region, account, resource]
                if !partition.is_empty() && !region.is_empty() && !account.is_empty() =>
            {
                match resource.strip_prefix("event-bus/") {
                    Some(name) => name,
                    None => return false,
                }
            }
            _ => return false,
        }
    } else {
        bus
    };
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

/// A topic id Pub/Sub takes: 3–255 of letters, digits, `-_.~+%`, starting with a letter, not
/// `goog…`.
pub fn valid_pubsub_topic(id: &str) -> bool {
    id.len() >= 3
        && id.len() <= 255
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && !id.to_ascii_lowercase().starts_with("goog")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+%".contains(&b))
}

/// A Service Bus queue or topic name: 1–260 of letters, digits, `.`, `-`, `_`, `/`, starting
/// and ending with a letter or digit.
pub fn valid_servicebus_entity(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 260
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

/// Which broker's rule a rendered destination name must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    KafkaTopic,
    NatsSubject,
    /// A routing key (the exchange is checked with [`valid_amqp_name`]).
    AmqpRoutingKey,
    SqsQueue,
    SnsTopicArn,
    /// An EventBridge event bus (name or ARN).
    EventBus,
    /// A Pub/Sub topic id (in `pubsub.project`).
    PubSubTopic,
    /// A Service Bus queue or topic.
    ServiceBusEntity,
}

impl Naming {
    /// `Err` says why `name` is not a legal destination.
    pub fn check(self, name: &str) -> Result<(), String> {
        let (ok, what) = match self {
            Naming::KafkaTopic => (valid_topic_name(name), "a legal Kafka topic name"),
            Naming::NatsSubject => (
                valid_nats_subject(name),
                "a NATS subject without wildcards, not `$…` or `_INBOX.…`",
            ),
            Naming::AmqpRoutingKey => {
                (valid_routing_key(name), "an AMQP routing key (≤ 255 bytes)")
            }
            Naming::SqsQueue => (
                valid_sqs_queue(name),
                "an SQS queue name (1–80 of letters, digits, `-`, `_`; `.fifo` for FIFO)",
            ),
            Naming::SnsTopicArn => (
                valid_sns_topic_arn(name),
                "an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME, the name of letters, digits, `-`, `_`; `.fifo` for FIFO)",
            ),
            Naming::EventBus => (
                valid_event_bus(name),
                "an EventBridge event bus name (1–256 of letters, digits, `.`, `-`, `_`, `/`) or ARN",
            ),
            Naming::PubSubTopic => (
                valid_pubsub_topic(name),
                "a Pub/Sub topic id (3–255 of letters, digits, `-_.~+%`, starting with a letter, not `goog…`)",
            ),
            Naming::ServiceBusEntity => (
                valid_servicebus_entity(name),
                "a Service Bus queue or topic name (1–260 of letters, digits, `.`, `-`, `_`, `/`, starting and ending with a letter or digit)",
            ),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("`{name}` is not {what}"))
        }
    }
}
