//! Background checks for readiness and metrics, independent of the relay's own connections:
//! every few seconds, the slot's lag, safe WAL size and `wal_status` from
//! `pg_replication_slots`, and whether the Kafka brokers answer a metadata request.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
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

pub async fn run(cfg: Config, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let producer: Option<FutureProducer<QuietContext>> =
        crate::sink::kafka::client_config(&cfg.kafka)
            .create_with_context(QuietContext)
            .map_err(|e| tracing::warn!(error = %e, "monitor cannot create its Kafka client"))
            .ok();
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
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
        if let Some(p) = &producer {
            let p = p.clone();
            let ok = tokio::task::spawn_blocking(move || {
                p.client()
                    .fetch_metadata(None, Duration::from_secs(4))
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            health.set_kafka_ok(ok);
        }
    }
}
