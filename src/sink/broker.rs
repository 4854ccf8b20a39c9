//! The sink the relay holds, chosen by `[sink] kind`: one session loop, one window and one
//! checkpoint path serve every broker, and this enum is the only place that names them all.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::eventbridge::EventBridgeSink;
use super::kafka::{KafkaDelivery, KafkaSink};
use super::nats::NatsSink;
use super::pubsub::PubSubSink;
use super::rabbitmq::RabbitSink;
use super::servicebus::ServiceBusSink;
use super::sns::SnsSink;
use super::sqs::SqsSink;
use super::{BoxDelivery, Failed, Landed, Promises, SendError, Sink};
use crate::config::{Config, SinkKind};
use crate::error::{Error, Result};
use crate::poison::PoisonKind;
use crate::route::Record;

/// One of the sinks.
pub enum Broker {
    Kafka(KafkaSink),
    RabbitMq(RabbitSink),
    Nats(NatsSink),
    Sqs(SqsSink),
    Sns(SnsSink),
    EventBridge(EventBridgeSink),
    PubSub(PubSubSink),
    ServiceBus(ServiceBusSink),
}

/// The delivery future of a [`Broker`].
pub enum BrokerDelivery {
    Kafka(KafkaDelivery),
    Other(BoxDelivery),
}

impl Future for BrokerDelivery {
    type Output = std::result::Result<Landed, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            BrokerDelivery::Kafka(d) => Pin::new(d).poll(cx),
            BrokerDelivery::Other(d) => d.as_mut().poll(cx),
        }
    }
}

impl Broker {
    /// Connects to the configured broker and checks it answers; `pipeline` is the Kafka
    /// transactional id (exactly-once). Returns the sink and a line for the start log.
    pub async fn connect(cfg: &Config, pipeline: Option<&str>) -> Result<(Broker, String)> {
        let timeout = Duration::from_secs(10);
        match cfg.sink {
            SinkKind::Kafka => {
                let sink = KafkaSink::new(&cfg.kafka, pipeline)?;
                let brokers = sink.check_reachable(timeout).await?;
                Ok((Broker::Kafka(sink), format!("kafka, {brokers} brokers")))
            }
            SinkKind::RabbitMq => {
                let sink = RabbitSink::connect(&cfg.rabbitmq, cfg.kafka.delivery_timeout).await?;
                Ok((Broker::RabbitMq(sink), "rabbitmq".into()))
            }
            SinkKind::Nats => {
                let namespace = format!("{}.{}", cfg.postgres.schema, cfg.postgres.table);
                let sink = NatsSink::connect(&cfg.nats, &cfg.kafka, &namespace).await?;
                let stream = cfg.nats.stream.clone();
                Ok((Broker::Nats(sink), format!("nats, stream {stream}")))
            }
            SinkKind::Sqs => {
                let namespace = format!("{}.{}", cfg.postgres.schema, cfg.postgres.table);
                let (sink, line) = super::sqs::connect(cfg, &cfg.kafka, &namespace).await?;
                Ok((Broker::Sqs(sink), line))
            }
            SinkKind::Sns => {
                let namespace = format!("{}.{}", cfg.postgres.schema, cfg.postgres.table);
                let (sink, line) = super::sns::connect(cfg, &cfg.kafka, &namespace).await?;
                Ok((Broker::Sns(sink), line))
            }
            SinkKind::EventBridge => {
                let (sink, line) = super::eventbridge::connect(cfg, &cfg.kafka).await?;
                Ok((Broker::EventBridge(sink), line))
            }
            SinkKind::PubSub => {
                let (sink, line) = super::pubsub::connect(cfg, &cfg.kafka).await?;
                Ok((Broker::PubSub(sink), line))
            }
            SinkKind::ServiceBus => {
                let (sink, line) = ServiceBusSink::connect(&cfg.servicebus, &cfg.kafka).await?;
                Ok((Broker::ServiceBus(sink), line))
            }
        }
    }

    /// `outboxd replay`: republishing on purpose, past any broker-side dedup (NATS).
    pub fn replaying(&mut self) {
        match self {
            Broker::Nats(s) => s.replaying(),
            Broker::Sqs(s) => s.replaying(),
            Broker::Sns(s) => s.replaying(),
            _ => {}
        }
    }

    /// The Kafka sink, for what only Kafka does (transactions, the position topic).
    pub fn kafka(&mut self) -> Result<&mut KafkaSink> {
        match self {
            Broker::Kafka(k) => Ok(k),
            // Configuration refuses exactly-once with another sink; this is the backstop.
            _ => Err(Error::setup(
                "exactly-once delivery needs sink.kind = \"kafka\"",
                "set kafka.delivery = \"at-least-once\" or publish to Kafka",
            )),
        }
    }
}

impl Sink for Broker {
    type Delivery = BrokerDelivery;

    fn promises(&self) -> Promises {
        match self {
            Broker::Kafka(s) => s.promises(),
            Broker::RabbitMq(s) => s.promises(),
            Broker::Nats(s) => s.promises(),
            Broker::Sqs(s) => s.promises(),
            Broker::Sns(s) => s.promises(),
            Broker::EventBridge(s) => s.promises(),
            Broker::PubSub(s) => s.promises(),
            Broker::ServiceBus(s) => s.promises(),
        }
    }

    fn flush(&self, timeout: Duration) {
        match self {
            Broker::Kafka(s) => Sink::flush(s, timeout),
            Broker::RabbitMq(s) => s.flush(timeout),
            Broker::Nats(s) => s.flush(timeout),
            Broker::Sqs(s) => s.flush(timeout),
            Broker::Sns(s) => s.flush(timeout),
            Broker::EventBridge(s) => s.flush(timeout),
            Broker::PubSub(s) => s.flush(timeout),
            Broker::ServiceBus(s) => s.flush(timeout),
        }
    }

    async fn send(&mut self, record: &Record) -> std::result::Result<BrokerDelivery, SendError> {
        Ok(match self {
            Broker::Kafka(s) => BrokerDelivery::Kafka(Sink::send(s, record).await?),
            Broker::RabbitMq(s) => BrokerDelivery::Other(s.send(record).await?),
            Broker::Nats(s) => BrokerDelivery::Other(s.send(record).await?),
            Broker::Sqs(s) => BrokerDelivery::Other(s.send(record).await?),
            Broker::Sns(s) => BrokerDelivery::Other(s.send(record).await?),
            Broker::EventBridge(s) => BrokerDelivery::Other(s.send(record).await?),
            Broker::PubSub(s) => BrokerDelivery::Other(s.send(record).await?),
            Broker::ServiceBus(s) => BrokerDelivery::Other(s.send(record).await?),
        })
    }

    async fn ensure_topic(&mut self, record: &Record) -> crate::error::Result<()> {
        match self {
            Broker::Kafka(s) => Sink::ensure_topic(s, record).await,
            Broker::RabbitMq(s) => s.ensure_topic(record).await,
            Broker::Nats(s) => s.ensure_topic(record).await,
            Broker::Sqs(s) => s.ensure_topic(record).await,
            Broker::Sns(s) => s.ensure_topic(record).await,
            Broker::EventBridge(s) => s.ensure_topic(record).await,
            Broker::PubSub(s) => s.ensure_topic(record).await,
            Broker::ServiceBus(s) => s.ensure_topic(record).await,
        }
    }

    async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        match self {
            Broker::Kafka(s) => Sink::dead_letter(s, record, kind, detail).await,
            Broker::RabbitMq(s) => s.dead_letter(record, kind, detail).await,
            Broker::Nats(s) => s.dead_letter(record, kind, detail).await,
            Broker::Sqs(s) => s.dead_letter(record, kind, detail).await,
            Broker::Sns(s) => s.dead_letter(record, kind, detail).await,
            Broker::EventBridge(s) => s.dead_letter(record, kind, detail).await,
            Broker::PubSub(s) => s.dead_letter(record, kind, detail).await,
            Broker::ServiceBus(s) => s.dead_letter(record, kind, detail).await,
        }
    }

    fn delivery_timeout(&self) -> Duration {
        match self {
            Broker::Kafka(s) => Sink::delivery_timeout(s),
            Broker::RabbitMq(s) => s.delivery_timeout(),
            Broker::Nats(s) => s.delivery_timeout(),
            Broker::Sqs(s) => s.delivery_timeout(),
            Broker::Sns(s) => s.delivery_timeout(),
            Broker::EventBridge(s) => s.delivery_timeout(),
            Broker::PubSub(s) => s.delivery_timeout(),
            Broker::ServiceBus(s) => s.delivery_timeout(),
        }
    }
}
