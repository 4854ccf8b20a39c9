//! The Kafka producer: an idempotent producer (`enable.idempotence=true`, `acks=all`), so
//! librdkafka's internal retries neither duplicate nor reorder records within a partition.
//!
//! The sink never awaits one send at a time: the relay keeps a bounded window of
//! deliveries ([`KafkaDelivery`]) and resolves them in order. A missing topic is created
//! through the admin API (when `kafka.create_topics` is on) before the first record goes to
//! it; a topic that does not exist is never a reason to skip an event.
//!
//! Files: `context.rs` (librdkafka's logs and errors, refused credentials), `topics.rs`
//! (creating topics, and not writing to one before its partition leaders serve it — the
//! vanished first events of issue 16), `transactions.rs` (exactly-once: the transactional
//! producer's operations).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::error::{Error, Result};
use crate::route::{PoisonKind, Record};
use crate::sink::classify::{classify, Stage};
use crate::sink::{Class, Failed, Landed, Promises, Refusal, SendError, Sink};

mod context;
mod topics;
mod transactions;

use context::{config_error, unusable_credentials};
pub use context::{config_error as client_config_error, LogContext};
use transactions::transactional_config;

/// The librdkafka configuration the relay uses: safe defaults first, then the operator's
/// `kafka.properties`, which win.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "outboxd")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // The Java client's partitioner (murmur2), not librdkafka's CRC32 default: a key lands
        // on the same partition as with Debezium or any Java producer on the same topic.
        .set("partitioner", "murmur2_random")
        // Never time a record out: librdkafka retries it, in order, until the broker takes it.
        // A timed-out record with later ones of the same partition still queued could let
        // those land first and the retry after them — out of order for the key. The relay
        // reports a stalled window itself (kafka.delivery_timeout_ms, `window`).
        .set("message.timeout.ms", "0")
        .set(
            "queue.buffering.max.messages",
            (cfg.max_in_flight.max(50_000) * 2).to_string(),
        )
        // librdkafka's queue holds what the window lets through (twice its byte bound, and at
        // least one largest record), so the window, not a QueueFull, is what waits.
        .set(
            "queue.buffering.max.kbytes",
            ((cfg.max_in_flight_bytes * 2 + cfg.max_message_bytes * 2) / 1024).to_string(),
        );
    c.set(
        "message.max.bytes",
        (cfg.max_message_bytes + 64 * 1024).to_string(),
    );
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    // librdkafka's `debug` contexts log at debug level: let them through to `tracing`
    // (shown with OUTBOXD_LOG=librdkafka=debug).
    if cfg.properties.contains_key("debug") {
        c.set_log_level(RDKafkaLogLevel::Debug);
    }
    c
}

/// The `kafka.properties` that every client of the relay needs — how to reach and trust the
/// brokers (TLS, SASL, certificate verification, name resolution, sockets) — as opposed to
/// producer-only settings: the admin client and the position reader must agree with the
/// producer (a development CA with verification off for the producer only made the
/// exactly-once restart fail for ever with a misleading "timed out").
pub fn security_properties(cfg: &KafkaConfig) -> impl Iterator<Item = (&String, &String)> {
    const KEYS: [&str; 4] = [
        "enable.ssl.certificate.verification",
        "client.dns.lookup",
        "broker.address.family",
        "client.rack",
    ];
    cfg.properties.iter().filter(|(k, _)| {
        k.starts_with("security.")
            || k.starts_with("ssl.")
            || k.starts_with("sasl.")
            || k.starts_with("socket.")
            || KEYS.contains(&k.as_str())
    })
}

/// `-1` (KIP-464) reads as "broker default" in logs.
fn broker_default(n: i32) -> String {
    if n == -1 {
        "broker default".into()
    } else {
        n.to_string()
    }
}

pub struct KafkaSink {
    producer: FutureProducer<LogContext>,
    /// Exactly-once: a Kafka transaction is open (begun at the first record after a commit).
    txn_open: bool,
    transactional: bool,
    admin: Option<AdminClient<LogContext>>,
    known_topics: HashSet<String>,
    /// Asks partition leaders for offsets before a new topic's first record (`topics`).
    leader_probe: Option<std::sync::Arc<rdkafka::consumer::BaseConsumer<LogContext>>>,
    cfg: KafkaConfig,
    context: LogContext,
}

/// A Kafka delivery report as the relay reads it (see [`Sink::Delivery`]). With
/// `outboxd::delivery=debug` each report is logged with the event's id, topic, partition and
/// offset — what to compare with the broker's log when a reader misses a record the relay
/// was told was written (the label is only kept when that target is enabled).
pub struct KafkaDelivery {
    /// `None`: failpoint `implicit_ack_first_record` — never sent, reported delivered
    /// without an offset, as librdkafka's implicit acknowledgement does.
    report: Option<DeliveryFuture>,
    label: Option<Box<(String, String)>>,
}

impl Future for KafkaDelivery {
    type Output = std::result::Result<Landed, Failed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let report = match &mut self.report {
            Some(f) => std::task::ready!(Pin::new(f).poll(cx)),
            None => Ok(Ok(rdkafka::producer::future_producer::Delivery {
                partition: 0,
                offset: rdkafka::Offset::Invalid.to_raw().unwrap_or(-1001),
                timestamp: rdkafka::Timestamp::NotAvailable,
            })),
        };
        Poll::Ready(match report {
            // librdkafka reports success without an offset when it only *inferred* the
            // record was written: its batch failed (say, NOT_LEADER on a partition the
            // broker had just been given), a later batch of the partition was accepted, and
            // librdkafka "implicitly acks" the earlier one (or the broker answered
            // DUPLICATE_SEQUENCE_NUMBER). Since KIP-360 a broker accepts any first sequence
            // from a producer new to a partition, so that inference can be wrong: the first
            // records to a just-created topic were lost this way (issue 16). No offset, no
            // proof: the session ends and resends from the last confirmed position.
            Ok(Ok(d)) if d.offset < 0 => Err(Failed {
                refusal: unproven_delivery(d.partition, self.label.as_deref()),
                record: None,
            }),
            Ok(Ok(d)) => {
                if let Some(label) = &self.label {
                    let (id, topic) = (&label.0, &label.1);
                    tracing::debug!(target: "outboxd::delivery", %id, %topic, partition = d.partition, offset = d.offset, "delivered");
                }
                Ok(Landed {
                    partition: Some(d.partition),
                    offset: Some(d.offset),
                })
            }
            Ok(Err((e, msg))) => Err(Failed {
                refusal: refusal(&e, Stage::Delivery),
                record: Some(Box::new(record_of(&msg))),
            }),
            Err(_) => Err(Failed {
                refusal: Refusal {
                    class: Class::Cluster,
                    code: String::new(),
                    detail: "delivery was cancelled (producer dropped)".into(),
                    alone: false,
                },
                record: None,
            }),
        })
    }
}

/// Failpoint `implicit_ack_first_record` fires once per process.
static IMPLICIT_ACK_FIRED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A success report that carries no offset (see [`KafkaDelivery`]): retried, never believed.
fn unproven_delivery(partition: i32, label: Option<&(String, String)>) -> Refusal {
    let about = match label {
        Some((id, topic)) => format!(" (event {id}, {topic} [{partition}])"),
        None => format!(" (partition {partition})"),
    };
    Refusal {
        class: Class::Cluster,
        code: "NoOffset".into(),
        detail: format!(
            "librdkafka reported a record delivered without an offset{about}: it inferred the \
             write from a later batch, which is no proof; resending from the last confirmed \
             position"
        ),
        alone: false,
    }
}

/// The id and topic a delivery report is logged with, when `outboxd::delivery` logs at debug.
fn delivery_label(record: &Record) -> Option<Box<(String, String)>> {
    if !tracing::enabled!(target: "outboxd::delivery", tracing::Level::DEBUG) {
        return None;
    }
    let id = record
        .headers
        .iter()
        .find(|(k, _)| k == "id")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    Some(Box::new((id, record.topic.clone())))
}

/// A librdkafka error, classified (`sink::classify`); one without a code is about the
/// client or the connection.
fn refusal(e: &KafkaError, stage: Stage) -> Refusal {
    match e.rdkafka_error_code() {
        Some(code) => Refusal {
            class: classify(code, stage),
            code: format!("{code:?}"),
            detail: e.to_string(),
            alone: false,
        },
        None => Refusal {
            class: Class::Cluster,
            code: String::new(),
            detail: e.to_string(),
            alone: false,
        },
    }
}

/// The record a failed delivery report carries, as it was sent.
fn record_of(msg: &OwnedMessage) -> Record {
    let headers = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Record {
        exchange: None,
        detail_type: None,
        binary: false,
        topic: msg.topic().to_string(),
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        value: msg.payload().map(<[u8]>::to_vec),
        headers,
        partition: None,
        timestamp_ms: None,
    }
}

impl KafkaSink {
    /// An idempotent producer (at-least-once), or with `transactional_id` a transactional
    /// one: call [`KafkaSink::init_transactions`] before the first record.
    pub fn new(cfg: &KafkaConfig, transactional_id: Option<&str>) -> Result<KafkaSink> {
        let context = LogContext::default();
        let config = match transactional_id {
            Some(id) => transactional_config(cfg, id),
            None => client_config(cfg),
        };
        let producer: FutureProducer<LogContext> =
            config.create_with_context(context.clone()).map_err(|e| {
                Error::setup(
                    format!("kafka producer configuration: {}", config_error(&e)),
                    "correct kafka.properties",
                )
            })?;
        let admin = if cfg.create_topics {
            let mut ac = ClientConfig::new();
            ac.set("bootstrap.servers", &cfg.brokers)
                .set("client.id", "outboxd-admin");
            // Security settings apply to the admin connection too; producer-only keys do not.
            for (k, v) in security_properties(cfg) {
                ac.set(k, v);
            }
            Some(ac.create_with_context(context.clone()).map_err(|e| {
                Error::setup(
                    format!("kafka admin client configuration: {}", config_error(&e)),
                    "correct kafka.properties",
                )
            })?)
        } else {
            None
        };
        Ok(KafkaSink {
            producer,
            admin,
            known_topics: HashSet::new(),
            leader_probe: None,
            cfg: cfg.clone(),
            context,
            txn_open: false,
            transactional: transactional_id.is_some(),
        })
    }

    /// Asks the cluster for its metadata: proves the brokers are reachable and authenticate us.
    /// Credentials or trust that can never work are a setup error (exit code 2), not a
    /// reason to retry forever; an unreachable cluster is retried.
    pub async fn check_reachable(&self, timeout: Duration) -> Result<usize> {
        let producer = self.producer.clone();
        let md =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
                .await
                .map_err(|e| Error::Kafka(format!("metadata task failed: {e}")))?;
        match md {
            Ok(md) => Ok(md.brokers().len()),
            Err(e) => {
                let last = self.context.last_error.lock().ok().and_then(|l| l.clone());
                Err(
                    match last.and_then(|(code, reason)| unusable_credentials(code, &reason)) {
                        Some(setup) => setup,
                        None => {
                            Error::Kafka(format!("cannot reach brokers {}: {e}", self.cfg.brokers))
                        }
                    },
                )
            }
        }
    }

    /// Sends `record` and waits for its acknowledgement; errors read as a transactional
    /// producer's (fenced, or the transaction must end). `what` names it in errors.
    pub async fn send_and_wait(&mut self, record: &Record, what: &str) -> Result<()> {
        let fut = match self.produce(record) {
            Ok(f) => f,
            Err(SendError::QueueFull) => {
                return Err(Error::Kafka(format!("{what}: local queue full")))
            }
            Err(SendError::Refused(r)) => return Err(self.txn_failure(what, r.detail)),
        };
        match tokio::time::timeout(self.cfg.delivery_timeout, fut).await {
            Ok(Ok(Ok(d))) if d.offset < 0 => Err(Error::Kafka(format!(
                "{what}: {}",
                unproven_delivery(d.partition, None).detail
            ))),
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((e, _)))) => Err(self.txn_error(what, e)),
            Ok(Err(_)) => Err(Error::Kafka(format!("{what}: delivery cancelled"))),
            Err(_) => Err(Error::Kafka(format!("{what}: timed out"))),
        }
    }

    /// Hands a record to librdkafka; the future resolves when Kafka acknowledged it (or
    /// delivery finally failed). Exactly-once: inside the open transaction, begun here if
    /// none is.
    pub fn send(&mut self, record: &Record) -> std::result::Result<KafkaDelivery, SendError> {
        let label = delivery_label(record);
        if crate::failpoint::active("implicit_ack_first_record")
            && !IMPLICIT_ACK_FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::warn!(topic = %record.topic, "failpoint implicit_ack_first_record: not sent, reported delivered with offset -1001");
            return Ok(KafkaDelivery {
                report: None,
                label,
            });
        }
        Ok(KafkaDelivery {
            report: Some(self.produce(record)?),
            label,
        })
    }

    /// Hands `record` to librdkafka (see [`KafkaSink::send`]).
    fn produce(&mut self, record: &Record) -> std::result::Result<DeliveryFuture, SendError> {
        if self.transactional && !self.txn_open {
            self.producer
                .begin_transaction()
                .map_err(|e| SendError::Refused(refusal(&e, Stage::Send)))?;
            self.txn_open = true;
        }
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        let mut fr: FutureRecord<'_, str, [u8]> = FutureRecord::to(&record.topic).headers(headers);
        if let Some(key) = &record.key {
            fr = fr.key(key.as_str());
        }
        if let Some(value) = &record.value {
            fr = fr.payload(value.as_slice());
        }
        if let Some(p) = record.partition {
            fr = fr.partition(p);
        }
        if let Some(ts) = record.timestamp_ms {
            fr = fr.timestamp(ts);
        }
        match self.producer.send_result(fr) {
            Ok(f) => Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((e, _)) => Err(SendError::Refused(refusal(&e, Stage::Send))),
        }
    }

    /// Sends a poison record to the dead-letter topic and waits for the acknowledgement: the
    /// original key, value and headers plus `outboxd.dlq.reason`, `outboxd.dlq.topic` (where
    /// it was meant to go) and `outboxd.dlq.error`.
    pub async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        let mut dlq = record.clone();
        dlq.topic = self.cfg.dlq_topic.clone();
        dlq.partition = None; // the DLQ topic has partitions of its own
        dlq.headers.push((
            "outboxd.dlq.reason".into(),
            kind.label().as_bytes().to_vec(),
        ));
        dlq.headers
            .push(("outboxd.dlq.topic".into(), record.topic.as_bytes().to_vec()));
        dlq.headers
            .push(("outboxd.dlq.error".into(), detail.as_bytes().to_vec()));
        let topic = dlq.topic.clone();
        self.ensure_topic(&topic).await;
        let fut = match self.send(&dlq) {
            Ok(f) => f,
            Err(SendError::QueueFull) => return Err("local queue full".into()),
            Err(SendError::Refused(r)) => return Err(r.detail),
        };
        match tokio::time::timeout(self.cfg.delivery_timeout + Duration::from_secs(5), fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(failed)) => Err(failed.refusal.detail),
            Err(_) => Err("timed out".into()),
        }
    }

    /// librdkafka's `message.timeout.ms`.
    pub fn delivery_timeout(&self) -> Duration {
        self.cfg.delivery_timeout
    }

    /// Waits up to `timeout` for librdkafka to deliver what it holds.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "kafka flush incomplete");
        }
    }
}

impl Sink for KafkaSink {
    type Delivery = KafkaDelivery;

    /// The idempotent producer keeps a partition's order through retries; its dedup covers
    /// one producer session only, so a resend after a restart is a second copy (exactly-once
    /// mode hides it from `read_committed` consumers instead).
    fn promises(&self) -> Promises {
        Promises {
            per_key_order: true,
            broker_dedup: false,
            transactions: true,
        }
    }

    fn flush(&self, timeout: Duration) {
        KafkaSink::flush(self, timeout)
    }

    async fn send(&mut self, record: &Record) -> std::result::Result<KafkaDelivery, SendError> {
        KafkaSink::send(self, record)
    }

    async fn ensure_topic(&mut self, record: &Record) -> Result<()> {
        KafkaSink::ensure_topic(self, &record.topic).await;
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        KafkaSink::dead_letter(self, record, kind, detail).await
    }

    fn delivery_timeout(&self) -> Duration {
        KafkaSink::delivery_timeout(self)
    }
}
