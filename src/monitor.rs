//! Background checks for readiness and metrics, independent of the relay's own connections:
//! every few seconds, the slot's lag, safe WAL size and `wal_status` from
//! `pg_replication_slots`, and whether the configured sink's broker answers: Kafka a metadata
//! request; RabbitMQ, NATS, SQS and SNS a TCP connection to the URL's (endpoint's) first host (their credentials
//! and protocol are proven by the relay's own session, which fails loudly when they do not
//! work). Probing Kafka for another sink made `/readyz` fail for ever ("Kafka is not
//! reachable") while the relay published — a pod that never became ready.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::{Config, SinkKind};
use crate::health::{Health, SlotFacts};
use crate::metrics as m;

/// The monitor's Kafka client logs quietly: the relay already reports broker trouble.
#[derive(Clone, Default)]
struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, msg: &str) {
        tracing::debug!(target: "librdkafka::monitor", facility = fac, "{msg}");
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka::monitor", error = %error, "{reason}");
    }
}

const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Reads the slot's row. Shared with `outboxd status`.
pub async fn slot_facts(client: &Client, slot: &str) -> Result<SlotFacts, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, \
                    CASE WHEN pg_is_in_recovery() THEN NULL \
                         ELSE (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 END, \
                    safe_wal_size, wal_status, active_pid \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(match row {
        None => SlotFacts {
            slot: slot.to_string(),
            ..SlotFacts::default()
        },
        Some(r) => SlotFacts {
            slot: slot.to_string(),
            confirmed_lsn: r.get(0),
            lag_bytes: r.get(1),
            safe_wal_size_bytes: r.get(2),
            wal_status: r.get(3),
            active_pid: r.get(4),
        },
    })
}

/// `host:port` of the first server of an AMQP or NATS URL (`default_port` when it has none).
pub fn first_host(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let first = rest.split(',').next()?;
    let authority = first.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return None;
    }
    let has_port = match host.rsplit_once(':') {
        Some((h, p)) => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':'),
        None => false,
    };
    Some(if has_port && !host.ends_with(']') {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    })
}

/// How the monitor probes the configured sink.
enum Probe {
    Kafka(FutureProducer<QuietContext>),
    Tcp(String),
    None,
}

impl Probe {
    fn new(cfg: &Config) -> Probe {
        match cfg.sink {
            SinkKind::Kafka => crate::sink::kafka::client_config(&cfg.kafka)
                .create_with_context(QuietContext)
                .map(Probe::Kafka)
                // The value is not shown: it may be a secret (kafka.properties).
                .unwrap_or_else(|_| {
                    tracing::warn!("monitor cannot create its Kafka client (kafka.properties)");
                    Probe::None
                }),
            SinkKind::RabbitMq => {
                let tls = cfg.rabbitmq.url.starts_with("amqps://");
                first_host(&cfg.rabbitmq.url, if tls { 5671 } else { 5672 })
                    .map_or(Probe::None, Probe::Tcp)
            }
            SinkKind::Nats => first_host(&cfg.nats.url, 4222).map_or(Probe::None, Probe::Tcp),
            SinkKind::Sqs => crate::sink::aws::endpoint_host(&cfg.aws, "sqs", "SQS")
                .map_or(Probe::None, Probe::Tcp),
            SinkKind::Sns => crate::sink::aws::endpoint_host(&cfg.aws, "sns", "SNS")
                .map_or(Probe::None, Probe::Tcp),
            SinkKind::ServiceBus => {
                let url = &cfg.servicebus.url;
                let tls = url.starts_with("amqps://");
                first_host(url, if tls { 5671 } else { 5672 }).map_or(Probe::None, Probe::Tcp)
            }
            SinkKind::PubSub => {
                let url = &cfg.pubsub.endpoint;
                let tls = url.starts_with("https://");
                first_host(url, if tls { 443 } else { 80 }).map_or(Probe::None, Probe::Tcp)
            }
            SinkKind::EventBridge => {
                crate::sink::aws::endpoint_host(&cfg.aws, "events", "EVENTBRIDGE")
                    .map_or(Probe::None, Probe::Tcp)
            }
        }
    }

    async fn reachable(&self) -> bool {
        let limit = Duration::from_secs(4);
        match self {
            Probe::Kafka(p) => {
                let p = p.clone();
                tokio::task::spawn_blocking(move || p.client().fetch_metadata(None, limit).is_ok())
                    .await
                    .unwrap_or(false)
            }
            Probe::Tcp(addr) => {
                matches!(
                    tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr.as_str()))
                        .await,
                    Ok(Ok(_))
                )
            }
            Probe::None => false,
        }
    }
}

pub async fn run(cfg: Config, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let probe = Probe::new(&cfg);
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        health.sample_lag();
        if client.as_ref().is_none_or(Client::is_closed) {
            client = crate::pg::connect(&cfg.postgres.url, "outboxd-monitor")
                .await
                .ok();
        }
        match &client {
            None => health.set_postgres_ok(false),
            Some(c) => match slot_facts(c, &cfg.postgres.slot).await {
                Ok(facts) => {
                    health.set_postgres_ok(true);
                    if let Some(lag) = facts.lag_bytes {
                        metrics::gauge!(m::SLOT_LAG_BYTES).set(lag as f64);
                    }
                    if let Some(safe) = facts.safe_wal_size_bytes {
                        metrics::gauge!(m::SLOT_SAFE_WAL_SIZE).set(safe as f64);
                    }
                    for status in WAL_STATUSES {
                        let v = if facts.wal_status.as_deref() == Some(status) {
                            1.0
                        } else {
                            0.0
                        };
                        metrics::gauge!(m::SLOT_WAL_STATUS, "wal_status" => status).set(v);
                    }
                    health.set_slot(facts);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "monitor query failed");
                    health.set_postgres_ok(false);
                    client = None;
                }
            },
        }
        health.set_broker_ok(probe.reachable().await);
    }
}

#[cfg(test)]
mod tests {
    use super::first_host;

    #[test]
    fn the_first_host_of_a_url_with_its_port() {
        let cases = [
            ("amqp://u:p@rabbit:5673/vhost", 5672, Some("rabbit:5673")),
            ("amqps://u:p@rabbit/vhost", 5671, Some("rabbit:5671")),
            ("nats://a:4222,nats://b:4222", 4222, Some("a:4222")),
            ("nats://tok@127.0.0.1", 4222, Some("127.0.0.1:4222")),
            ("tls://[::1]:4443", 4222, Some("[::1]:4443")),
            ("nats://", 4222, None),
        ];
        for (url, port, want) in cases {
            assert_eq!(first_host(url, port).as_deref(), want, "{url}");
        }
    }
}
