//! Azure Service Bus over AMQP 1.0 (`fe2o3-amqp`): one connection (SASL PLAIN with the
//! connection string's shared access key name and key, TLS for `sb://`), one session, one
//! sender link per queue or topic.
//!
//! ## What a message carries
//!
//! `message-id` = the event id — Service Bus's duplicate detection, where the entity has it
//! on, drops a repeat within its window —, `group-id` (Service Bus's `SessionId`) = the
//! aggregate id with `servicebus.sessions` (a session receiver gets one aggregate's messages
//! in order), the body one `data` section of the payload's bytes, `content-type`
//! `application/json` (or `application/octet-stream` for `bytea`), the headers (`id`, `type`,
//! the outbox's `headers`) and `key` as string application properties, `durable`. Ids over
//! Service Bus's 128 characters are replaced by their SHA-256 in hex (one id, one hash).
//!
//! ## Outcomes
//!
//! A message is confirmed when its delivery is settled `accepted`. `rejected` with
//! `amqp:link:message-size-exceeded` is `too_large`; another rejection is about the message
//! (`rejected`) once it was sent alone; `released`/`modified`, a detached link or a dropped
//! connection are the broker's: the session ends and the next resends from the confirmed
//! position. A queue that does not exist (the attach is refused `amqp:not-found`) refuses its
//! events — retried, then dead-lettered `retries_exhausted` — while the others flow.
//!
//! ## Order
//!
//! Messages go out on one link per entity in commit order, and a key's messages are stored
//! in that order while nothing fails. A message the broker refuses on its own (`released`)
//! between accepted ones is resent after its successors, as with RabbitMQ: the start line
//! says `per-key order: no`.

use std::collections::HashMap;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::SenderAttachError;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{AmqpError, ErrorCondition, LinkError};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Header, Message, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Sender, Session};

use super::{BoxDelivery, Class, Failed, Landed, Promises, Refusal, SendError, Sink};
use crate::config::{KafkaConfig, ServiceBusConfig};
use crate::error::{Error, Result};
use crate::poison::PoisonKind;
use crate::route::Record;

/// Service Bus's longest `MessageId` and `SessionId`.
const MAX_ID: usize = 128;

pub struct ServiceBusSink {
    /// Held: the session and links end with it.
    _connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    /// Entity → its sender, `None` when the broker said it does not exist.
    senders: HashMap<String, Option<Sender>>,
    cfg: ServiceBusConfig,
    delivery_timeout: Duration,
}

/// `s` if Service Bus takes it as an id, else its SHA-256 in hex.
fn id(s: &str) -> String {
    if !s.is_empty() && s.len() <= MAX_ID {
        s.to_string()
    } else {
        crate::sink::aws::sigv4::sha256_hex(s.as_bytes())
    }
}

/// The AMQP message of `record`, and its size (body and properties).
pub fn message(record: &Record, sessions: bool) -> (Message<Data>, usize) {
    let event_id = record
        .headers
        .iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let mut properties = Properties::builder()
        .message_id(id(&event_id))
        .content_type(if record.binary {
            "application/octet-stream"
        } else {
            "application/json"
        });
    if let (true, Some(key)) = (sessions, &record.key) {
        properties = properties.group_id(id(key));
    }
    let mut size = event_id.len() + record.key.as_ref().map_or(0, String::len);
    let mut application = ApplicationProperties::builder();
    let key = record
        .key
        .as_ref()
        .map(|k| ("key".to_string(), k.as_bytes().to_vec()));
    for (name, value) in record.headers.iter().chain(key.iter()) {
        let value = String::from_utf8_lossy(value).into_owned();
        size += name.len() + value.len();
        application = application.insert(name.clone(), value);
    }
    let body = record.value.clone().unwrap_or_default();
    size += body.len();
    let message = Message::builder()
        .header(Header::builder().durable(true).build())
        .properties(properties.build())
        .application_properties(application.build())
        .data(Binary::from(body))
        .build();
    (message, size)
}

/// What a settled outcome other than `accepted` means.
fn outcome_refusal(outcome: &Outcome) -> Option<Refusal> {
    let (class, code, detail) = match outcome {
        Outcome::Accepted(_) => return None,
        Outcome::Rejected(r) => {
            let condition = r.error.as_ref().map(|e| &e.condition);
            let text = r
                .error
                .as_ref()
                .map(|e| {
                    format!(
                        "{:?}: {}",
                        e.condition,
                        e.description.clone().unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "rejected".into());
            match condition {
                Some(ErrorCondition::LinkError(LinkError::MessageSizeExceeded)) => (
                    Class::Record(PoisonKind::TooLarge),
                    "message-size-exceeded",
                    text,
                ),
                Some(ErrorCondition::AmqpError(
                    AmqpError::ResourceLimitExceeded | AmqpError::InternalError,
                )) => (Class::Cluster, "rejected", text),
                _ => (Class::Record(PoisonKind::Rejected), "rejected", text),
            }
        }
        Outcome::Released(_) => (Class::Cluster, "released", "released".to_string()),
        Outcome::Modified(_) => (Class::Cluster, "modified", "modified".to_string()),
        #[allow(unreachable_patterns)]
        _ => (Class::Cluster, "other", "unexpected outcome".to_string()),
    };
    Some(Refusal {
        class,
        code: code.into(),
        detail: format!("servicebus: {detail}"),
        alone: false,
    })
}

/// Whether an attach was refused because the entity does not exist.
fn not_found(e: &SenderAttachError) -> bool {
    matches!(e, SenderAttachError::RemoteClosedWithError(err)
        if err.condition == ErrorCondition::AmqpError(AmqpError::NotFound))
}

impl ServiceBusSink {
    /// Connects (exit 2 when the broker refuses the key, naming the key's *name* only) and
    /// attaches to the dead-letter queue (exit 2 when it does not exist).
    pub async fn connect(
        cfg: &ServiceBusConfig,
        window: &KafkaConfig,
    ) -> Result<(ServiceBusSink, String)> {
        if cfg.url.starts_with("amqp://") {
            tracing::warn!(url = %cfg.url, "the servicebus endpoint is plain amqp://: the key crosses the network unencrypted (meant for local brokers and the emulator)");
        }
        let mut connection = Connection::builder()
            .container_id(format!("outboxd-{}", std::process::id()))
            .sasl_profile(SaslProfile::Plain {
                username: cfg.key_name.clone(),
                password: cfg.key.expose().to_string(),
            })
            .open(cfg.url.as_str())
            .await
            .map_err(|e| match e {
                fe2o3_amqp::connection::OpenError::SaslError { code, .. } => Error::setup(
                    format!(
                        "Service Bus at {} refused the shared access key `{}` ({code:?})",
                        cfg.url, cfg.key_name
                    ),
                    "check servicebus.connection_string (SharedAccessKeyName, SharedAccessKey)",
                ),
                other => Error::Publish(format!("servicebus at {}: {other}", cfg.url)),
            })?;
        let session = Session::begin(&mut connection).await.map_err(|e| {
            Error::Publish(format!(
                "servicebus at {}: beginning a session: {e}",
                cfg.url
            ))
        })?;
        let mut sink = ServiceBusSink {
            _connection: connection,
            session,
            senders: HashMap::new(),
            cfg: cfg.clone(),
            delivery_timeout: window.delivery_timeout,
        };
        let dlq = cfg.dead_letter_queue.clone();
        sink.attach(&dlq).await?;
        if matches!(sink.senders.get(&dlq), Some(None)) {
            return Err(Error::setup(
                format!(
                    "the dead-letter queue {dlq} does not exist (servicebus.dead_letter_queue)"
                ),
                "create it, or point servicebus.dead_letter_queue at one",
            ));
        }
        let line = format!(
            "servicebus at {}, key {}, dead letters to {dlq}",
            cfg.url, cfg.key_name
        );
        Ok((sink, line))
    }

    /// Attaches a sender to `entity` unless there is one; `None` stored when it does not
    /// exist.
    async fn attach(&mut self, entity: &str) -> Result<()> {
        if self.senders.contains_key(entity) {
            return Ok(());
        }
        let name = format!("outboxd-{entity}");
        match Sender::attach(&mut self.session, name, entity).await {
            Ok(sender) => {
                self.senders.insert(entity.to_string(), Some(sender));
                Ok(())
            }
            Err(e) if not_found(&e) => {
                tracing::warn!(destination = %entity, sink = "servicebus", "the queue does not exist; its events are retried and dead-lettered after sink.max_record_retries failures");
                self.senders.insert(entity.to_string(), None);
                Ok(())
            }
            Err(e) => Err(Error::Publish(format!(
                "servicebus: attaching to {entity}: {e}"
            ))),
        }
    }

    /// Sends `record` on `entity`'s link; the future resolves with its outcome.
    async fn publish(
        &mut self,
        entity: &str,
        record: &Record,
    ) -> std::result::Result<BoxDelivery, SendError> {
        let (message, size) = message(record, self.cfg.sessions);
        if size > self.cfg.max_message_bytes {
            return Err(SendError::Refused(Refusal {
                class: Class::Record(PoisonKind::TooLarge),
                code: "too_large".into(),
                detail: format!(
                    "the message would be about {size} bytes, over servicebus.max_message_bytes = {}",
                    self.cfg.max_message_bytes
                ),
                alone: true,
            }));
        }
        let sender = match self.senders.get_mut(entity) {
            Some(Some(sender)) => sender,
            Some(None) => {
                return Err(SendError::Refused(Refusal {
                    class: Class::Absent,
                    code: "not-found".into(),
                    detail: format!("servicebus: {entity} does not exist"),
                    alone: true,
                }))
            }
            None => {
                return Err(SendError::Refused(Refusal {
                    class: Class::Cluster,
                    code: String::new(),
                    detail: format!("servicebus: {entity} was not attached"),
                    alone: false,
                }))
            }
        };
        let cluster = |detail: String| Refusal {
            class: Class::Cluster,
            code: String::new(),
            detail,
            alone: false,
        };
        let delivery = sender
            .send_batchable(message)
            .await
            .map_err(|e| SendError::Refused(cluster(format!("servicebus: sending: {e}"))))?;
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(outcome) => match outcome_refusal(&outcome) {
                    None => Ok(Landed::default()),
                    Some(refusal) => Err(Failed {
                        refusal,
                        record: None,
                    }),
                },
                Err(e) => Err(Failed {
                    refusal: cluster(format!("servicebus: no outcome: {e}")),
                    record: None,
                }),
            }
        }))
    }
}

impl Sink for ServiceBusSink {
    type Delivery = BoxDelivery;

    fn promises(&self) -> Promises {
        Promises {
            per_key_order: false,
            broker_dedup: false,
            transactions: false,
        }
    }

    fn flush(&self, _timeout: Duration) {
        // Every delivery the window counted was settled `accepted` by the broker.
    }

    async fn send(&mut self, record: &Record) -> std::result::Result<BoxDelivery, SendError> {
        let entity = record.topic.clone();
        self.publish(&entity, record).await
    }

    async fn ensure_topic(&mut self, record: &Record) -> Result<()> {
        let entity = record.topic.clone();
        self.attach(&entity).await
    }

    /// Sends to `servicebus.dead_letter_queue` with `outboxd.dlq.reason`, `.topic`, `.error`
    /// application properties, and waits for the outcome.
    async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        let dlq = super::dead_letter_record(record, kind, detail);
        let entity = self.cfg.dead_letter_queue.clone();
        let delivery = self.publish(&entity, &dlq).await.map_err(|e| match e {
            SendError::Refused(r) => r.detail,
            SendError::QueueFull => "the link has no credit".into(),
        })?;
        delivery.await.map(|_| ()).map_err(|f| f.refusal.detail)
    }

    fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(key: Option<&str>) -> Record {
        Record {
            topic: "orders".into(),
            exchange: None,
            detail_type: None,
            binary: false,
            key: key.map(str::to_string),
            value: Some(br#"{"total": 10}"#.to_vec()),
            headers: vec![
                ("id".into(), b"6f1c".to_vec()),
                ("type".into(), b"OrderPlaced".to_vec()),
            ],
            partition: None,
            timestamp_ms: None,
        }
    }

    /// Service Bus's documented AMQP mapping: `MessageId` is `message-id`, `SessionId` is
    /// `group-id`, `ContentType` is `content-type`, the properties are application
    /// properties.
    #[test]
    fn the_event_id_is_the_message_id_and_the_aggregate_the_session() {
        let (m, size) = message(&record(Some("order-7")), true);
        let p = m.properties.unwrap();
        assert_eq!(
            format!("{:?}", p.message_id),
            format!(
                "{:?}",
                Some(fe2o3_amqp::types::messaging::MessageId::from(
                    "6f1c".to_string()
                ))
            )
        );
        assert_eq!(p.group_id.as_deref(), Some("order-7"));
        assert_eq!(
            p.content_type.as_deref().map(|s| s.as_str()),
            Some("application/json")
        );
        let app = m.application_properties.unwrap();
        for (k, v) in [("id", "6f1c"), ("type", "OrderPlaced"), ("key", "order-7")] {
            assert_eq!(
                app.0.get(k),
                Some(&fe2o3_amqp::types::primitives::SimpleValue::String(
                    v.into()
                )),
                "{k}"
            );
        }
        assert!(m.header.unwrap().durable);
        assert!(size > 13);
        let (m, _) = message(&record(Some("order-7")), false);
        assert!(m.properties.unwrap().group_id.is_none());
        let long = "k".repeat(200);
        let (m, _) = message(&record(Some(&long)), true);
        assert_eq!(m.properties.unwrap().group_id.unwrap().len(), 64);
    }

    #[test]
    fn outcomes_other_than_accepted_are_classified() {
        use fe2o3_amqp::types::definitions;
        use fe2o3_amqp::types::messaging::{Accepted, Rejected, Released};
        assert!(outcome_refusal(&Outcome::Accepted(Accepted {})).is_none());
        let rejected = |condition: ErrorCondition| {
            Outcome::Rejected(Rejected {
                error: Some(definitions::Error::new(condition, None, None)),
            })
        };
        let class = |o: &Outcome| outcome_refusal(o).unwrap().class;
        assert_eq!(
            class(&rejected(ErrorCondition::LinkError(
                LinkError::MessageSizeExceeded
            ))),
            Class::Record(PoisonKind::TooLarge)
        );
        assert_eq!(
            class(&rejected(ErrorCondition::AmqpError(AmqpError::DecodeError))),
            Class::Record(PoisonKind::Rejected)
        );
        assert_eq!(
            class(&rejected(ErrorCondition::AmqpError(
                AmqpError::ResourceLimitExceeded
            ))),
            Class::Cluster
        );
        assert_eq!(class(&Outcome::Released(Released {})), Class::Cluster);
    }
}
