//! RabbitMQ (AMQP 0-9-1) through `lapin`: one connection, one channel in confirm mode.
//!
//! ## What a confirm means, and what `mandatory` adds
//!
//! A publisher confirm (`basic.ack`) says the broker took responsibility for a message —
//! for a persistent message routed to durable queues, once it is written to them. It does
//! **not** say the message reached a queue: a message no queue is bound for is dropped by the
//! exchange and *still* acknowledged. So every message is published `mandatory`: an unroutable
//! one comes back (`basic.return`, before its ack) and is dead-lettered with reason
//! `unroutable` — never confirmed as if delivered. A `basic.nack` (the broker could not store
//! it, e.g. a queue with `x-overflow = reject-publish` is full) and a closed channel or
//! connection end the session: the relay resends from the confirmed position.
//!
//! ## Order
//!
//! One channel is one ordering scope: RabbitMQ keeps a channel's messages in publishing
//! order into each queue, so one aggregate's events stay in order while nothing fails. After
//! a failure the relay resends from its confirmed position, and a message the broker had
//! already taken after the failed one arrives again, after its predecessor's resend: consumers
//! see a repeat (same `message_id`) and, across such a failure, may see an aggregate's later
//! event before an earlier one's resend. `promises()` says so (no per-key order through
//! retries, no broker-side dedup).
//!
//! ## Mapping
//!
//! exchange and routing key from their templates (`crate::route`), body = payload,
//! `message_id` = event id, `type` = event type, `timestamp` = commit time (seconds: AMQP's
//! resolution), `delivery_mode` = 2 (persistent), `content_type` = `application/json`
//! (`application/octet-stream` for a `bytea` payload), every record header as an AMQP header
//! (long string) plus `key` = the aggregate id.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};

use super::{BoxDelivery, Class, Failed, Landed, Promises, Refusal, SendError, Sink};
use crate::config::{redact_url, RabbitMqConfig};
use crate::error::{Error, Result};
use crate::poison::PoisonKind;
use crate::route::Record;

/// Heartbeat asked for when `rabbitmq.url` has no `?heartbeat=`.
const HEARTBEAT_S: u16 = 10;

pub struct RabbitSink {
    // Dropping the connection closes it; the channel alone does not keep it open.
    _connection: Connection,
    channel: Channel,
    cfg: RabbitMqConfig,
    declared: HashSet<String>,
    delivery_timeout: Duration,
}

/// An exchange declaration the broker refuses for good (AMQP 406 or 403), as opposed to a
/// connection that broke meanwhile.
fn declaration_refused(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("PRECONDITION_FAILED") || text.contains("ACCESS_REFUSED")
}

/// A connection or channel error; bad credentials and a missing virtual host are the
/// operator's to fix (exit 2), the rest is retried.
fn connection_error(e: &lapin::Error, url: &str) -> Error {
    let text = e.to_string();
    if text.contains("ACCESS_REFUSED") || text.contains("access to vhost") {
        return Error::setup(
            format!("RabbitMQ at {} refused the login: {text}", redact_url(url)),
            "check the user, password and virtual host in rabbitmq.url (OUTBOXD_RABBITMQ_URL)",
        );
    }
    if text.contains("certificate verify failed") || text.contains("certificate") {
        return Error::setup(
            format!("TLS to RabbitMQ at {} failed: {text}", redact_url(url)),
            "check rabbitmq.ca_file (the CA that signed the server's certificate) and the host name in rabbitmq.url",
        );
    }
    if text.contains("NOT_ALLOWED") {
        return Error::setup(
            format!("RabbitMQ at {} refused the virtual host: {text}", redact_url(url)),
            "check the virtual host in rabbitmq.url (percent-encoded: `/` is `%2f`) and the user's permissions",
        );
    }
    Error::Publish(format!("rabbitmq at {}: {text}", redact_url(url)))
}

impl RabbitSink {
    /// Connects, opens a channel in confirm mode and declares the dead-letter queue.
    pub async fn connect(cfg: &RabbitMqConfig, delivery_timeout: Duration) -> Result<RabbitSink> {
        let props = ConnectionProperties::default().with_connection_name("outboxd".into());
        let tls = match &cfg.ca_file {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    Error::setup(
                        format!("rabbitmq.ca_file {path}: {e}"),
                        "point rabbitmq.ca_file at a readable PEM file",
                    )
                })?;
                OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem),
                }
            }
            None => OwnedTLSConfig::default(),
        };
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| Error::Publish(format!("rabbitmq: no runtime: {e}")))?;
        let mut uri: lapin::uri::AMQPUri = cfg.url.parse().map_err(|_| {
            Error::setup(
                "rabbitmq.url is not an AMQP URL",
                "use amqp://user:password@host:port/vhost",
            )
        })?;
        // A silently dead path (no RST, no FIN) is found by missed heartbeats, not by the
        // confirms, which simply never come: ask for 10 s unless the URL says otherwise
        // (RabbitMQ's own suggestion is 60 s).
        uri.query.heartbeat.get_or_insert(HEARTBEAT_S);
        let connect = Connection::connect_uri_with_config(uri, props, tls, runtime);
        let connection = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| {
                Error::Publish(format!(
                    "rabbitmq at {}: no answer within 10 s",
                    redact_url(&cfg.url)
                ))
            })?
            .map_err(|e| connection_error(&e, &cfg.url))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| connection_error(&e, &cfg.url))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| connection_error(&e, &cfg.url))?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(
                cfg.dead_letter_queue.as_str().into(),
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                Error::setup(
                    format!(
                        "declaring the dead-letter queue {}: {e}",
                        cfg.dead_letter_queue
                    ),
                    "let the user configure it, or declare it as a durable queue yourself",
                )
            })?;
        Ok(RabbitSink {
            _connection: connection,
            channel,
            cfg: cfg.clone(),
            declared: HashSet::new(),
            delivery_timeout,
        })
    }

    fn properties(record: &Record) -> std::result::Result<BasicProperties, Refusal> {
        let refuse = |detail: String| Refusal {
            class: Class::Record(PoisonKind::InvalidHeaders),
            code: "header".into(),
            detail,
            alone: true,
        };
        let mut headers = FieldTable::default();
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(if record.binary {
                "application/octet-stream".into()
            } else {
                "application/json".into()
            });
        for (name, value) in &record.headers {
            let short = ShortString::try_new(name.as_str())
                .map_err(|_| refuse(format!("header name longer than 255 bytes: {name:.40}…")))?;
            let text = String::from_utf8_lossy(value);
            match name.as_str() {
                "id" => {
                    if let Ok(id) = ShortString::try_new(text.as_ref()) {
                        props = props.with_message_id(id);
                    }
                }
                "type" => {
                    if let Ok(t) = ShortString::try_new(text.as_ref()) {
                        props = props.with_type(t);
                    }
                }
                _ => {}
            }
            headers.insert(
                short,
                AMQPValue::LongString(LongString::from(value.clone())),
            );
        }
        if let Some(key) = &record.key {
            headers.insert(
                "key".into(),
                AMQPValue::LongString(LongString::from(key.as_bytes().to_vec())),
            );
        }
        if let Some(ms) = record.timestamp_ms {
            props = props.with_timestamp((ms.max(0) / 1000) as u64);
        }
        Ok(props.with_headers(headers))
    }

    /// Publishes with `mandatory` and returns the confirm, unresolved.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        record: &Record,
        props: BasicProperties,
    ) -> std::result::Result<PublisherConfirm, SendError> {
        let key = ShortString::try_new(routing_key).map_err(|_| {
            SendError::Refused(Refusal {
                class: Class::Record(PoisonKind::InvalidTopic),
                code: "routing_key".into(),
                detail: "routing key longer than 255 bytes".into(),
                alone: true,
            })
        })?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let body = record.value.as_deref().unwrap_or_default();
        self.channel
            .basic_publish(exchange.into(), key, options, body, props)
            .await
            .map_err(|e| {
                SendError::Refused(Refusal {
                    class: Class::Cluster,
                    code: String::new(),
                    detail: format!("rabbitmq: {e}"),
                    alone: false,
                })
            })
    }
}

/// The record a returned message carries, as it was sent (for the dead-letter queue).
fn record_of(returned: &lapin::message::BasicReturnMessage) -> Record {
    let d = &returned.delivery;
    let mut key = None;
    let mut headers = Vec::new();
    if let Some(table) = d.properties.headers() {
        for (name, value) in table.inner() {
            if let AMQPValue::LongString(v) = value {
                if name.as_str() == "key" {
                    key = Some(String::from_utf8_lossy(v.as_bytes()).into_owned());
                } else {
                    headers.push((name.to_string(), v.as_bytes().to_vec()));
                }
            }
        }
    }
    Record {
        topic: d.routing_key.to_string(),
        exchange: Some(d.exchange.to_string()),
        detail_type: None,
        binary: d
            .properties
            .content_type()
            .as_ref()
            .is_some_and(|t| t.as_str() != "application/json"),
        key,
        value: Some(d.data.clone()),
        headers,
        partition: None,
        timestamp_ms: None,
    }
}

fn confirmation(result: lapin::Result<Confirmation>) -> std::result::Result<Landed, Failed> {
    let cluster = |detail: String| Failed {
        refusal: Refusal {
            class: Class::Cluster,
            code: String::new(),
            detail,
            alone: false,
        },
        record: None,
    };
    match result {
        Ok(Confirmation::Ack(None)) => Ok(Landed::default()),
        Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => Err(Failed {
            refusal: Refusal {
                class: Class::Record(PoisonKind::Unroutable),
                code: returned.reply_code.to_string(),
                detail: format!(
                    "returned by RabbitMQ: {} (exchange `{}`, routing key `{}`)",
                    returned.reply_text, returned.delivery.exchange, returned.delivery.routing_key
                ),
                alone: true,
            },
            record: Some(Box::new(record_of(&returned))),
        }),
        Ok(Confirmation::Nack(None)) => Err(cluster(
            "rabbitmq refused to store the message (basic.nack)".into(),
        )),
        Ok(Confirmation::NotRequested) => Err(cluster(
            "rabbitmq: the channel is not in confirm mode".into(),
        )),
        Err(e) => Err(cluster(format!("rabbitmq: {e}"))),
    }
}

impl Sink for RabbitSink {
    type Delivery = BoxDelivery;

    fn promises(&self) -> Promises {
        Promises {
            per_key_order: false,
            broker_dedup: false,
            transactions: false,
        }
    }

    fn flush(&self, _timeout: Duration) {
        // Nothing is buffered beyond the confirms the window awaits.
    }

    async fn send(&mut self, record: &Record) -> std::result::Result<BoxDelivery, SendError> {
        let props = Self::properties(record).map_err(SendError::Refused)?;
        let exchange = record.exchange.as_deref().unwrap_or(&self.cfg.exchange);
        let confirm = self.publish(exchange, &record.topic, record, props).await?;
        Ok(Box::pin(async move { confirmation(confirm.await) }))
    }

    async fn ensure_topic(&mut self, record: &Record) -> Result<()> {
        let Some(exchange) = record.exchange.as_deref() else {
            return Ok(());
        };
        if !self.cfg.declare_exchange || self.declared.contains(exchange) {
            return Ok(());
        }
        let kind = match self.cfg.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            _ => ExchangeKind::Topic,
        };
        let options = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        match self
            .channel
            .exchange_declare(exchange.into(), kind, options, FieldTable::default())
            .await
        {
            Ok(()) => {
                tracing::info!(exchange, kind = %self.cfg.exchange_type, "declared exchange");
                self.declared.insert(exchange.to_string());
                Ok(())
            }
            // A refused declaration closes the channel, and every later session would declare
            // again and be refused again (review C7): the exchange exists with other settings
            // (PRECONDITION_FAILED) or the user may not configure it (ACCESS_REFUSED). Only
            // an operator can mend that.
            Err(e) if declaration_refused(&e) => Err(Error::setup(
                format!("RabbitMQ refused to declare exchange `{exchange}` ({} durable): {e}", self.cfg.exchange_type),
                "publish to the exchange as it is with rabbitmq.declare_exchange = false, or match rabbitmq.exchange_type to it, or grant the user configure permission on it",
            )),
            Err(e) => {
                tracing::warn!(exchange, error = %e, "could not declare the exchange; publishing to it as it is");
                Ok(())
            }
        }
    }

    /// Publishes to the dead-letter queue (default exchange, routing key = the queue) with
    /// `outboxd.dlq.reason`, `outboxd.dlq.topic` (`exchange/routing key`) and
    /// `outboxd.dlq.error`, and waits for the confirm.
    async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        let mut dlq = record.clone();
        let meant = format!(
            "{}/{}",
            record.exchange.as_deref().unwrap_or(""),
            record.topic
        );
        dlq.headers.extend([
            (
                "outboxd.dlq.reason".to_string(),
                kind.label().as_bytes().to_vec(),
            ),
            ("outboxd.dlq.topic".to_string(), meant.into_bytes()),
            ("outboxd.dlq.error".to_string(), detail.as_bytes().to_vec()),
        ]);
        // Header names of a record refused for its headers are not used again as names.
        if kind == PoisonKind::InvalidHeaders {
            dlq.headers.retain(|(k, _)| k.len() <= 255);
        }
        let props = Self::properties(&dlq).map_err(|r| r.detail)?;
        let queue = self.cfg.dead_letter_queue.clone();
        let confirm = self
            .publish("", &queue, &dlq, props)
            .await
            .map_err(|e| match e {
                SendError::Refused(r) => r.detail,
                SendError::QueueFull => "queue full".into(),
            })?;
        confirmation(confirm.await)
            .map(|_| ())
            .map_err(|f| f.refusal.detail)
    }

    fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(binary: bool) -> Record {
        Record {
            topic: "order.Placed".into(),
            exchange: Some("outbox".into()),
            detail_type: None,
            binary,
            key: Some("42".into()),
            value: Some(b"{}".to_vec()),
            headers: vec![
                ("id".into(), b"e-1".to_vec()),
                ("type".into(), b"Placed".into()),
                ("tenant".into(), b"acme".into()),
            ],
            partition: None,
            timestamp_ms: Some(1_700_000_000_123),
        }
    }

    #[test]
    fn properties_carry_id_type_time_key_headers_and_the_payloads_content_type() {
        let p = RabbitSink::properties(&record(false)).unwrap();
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "e-1");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "Placed");
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        let headers = p.headers().as_ref().unwrap().inner();
        for (name, value) in [("id", "e-1"), ("tenant", "acme"), ("key", "42")] {
            match headers.get(name) {
                Some(AMQPValue::LongString(v)) => assert_eq!(v.as_bytes(), value.as_bytes()),
                other => panic!("header {name}: {other:?}"),
            }
        }
        let p = RabbitSink::properties(&record(true)).unwrap();
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/octet-stream"
        );
    }

    #[test]
    fn a_header_name_amqp_cannot_carry_is_refused_as_the_records_own() {
        let mut r = record(false);
        r.headers.push(("h".repeat(300), b"x".to_vec()));
        let refusal = RabbitSink::properties(&r).err().unwrap();
        assert_eq!(refusal.class, Class::Record(PoisonKind::InvalidHeaders));
        assert!(refusal.alone);
    }
}
