//! Dead-lettering: a poison event goes to the dead-letter topic with its reason and, if even
//! that refuses it, to the relay-owned table `<schema>.outboxd_dead_letter` (created by
//! `outboxd migrate`). Logged with its id and counted; only if both fail does the session fail
//! and retry — a poison event is never dropped.

pub mod redrive;

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::metrics as m;
use crate::route::{Poison, Record};
use crate::sink::Sink;

/// The relay-owned dead-letter table of a schema.
pub struct DlqTable<'a> {
    pub client: &'a Client,
    pub schema: &'a str,
    /// Bound of the INSERT (`postgres.stream_timeout_ms`).
    pub timeout: Duration,
}

impl<'a> DlqTable<'a> {
    /// The dead-letter table of `cfg.schema`, written through `client`.
    pub fn new(client: &'a Client, cfg: &'a crate::config::PostgresConfig) -> DlqTable<'a> {
        DlqTable {
            client,
            schema: &cfg.schema,
            timeout: cfg.stream_timeout,
        }
    }

    /// The last resort for a poison event the DLQ topic refused: a row in the relay-owned
    /// table `<schema>.outboxd_dead_letter` (created by `outboxd migrate`).
    pub async fn insert(
        &self,
        event_id: Option<&str>,
        record: &crate::route::Record,
        reason: &str,
        detail: &str,
    ) -> Result<()> {
        let headers: serde_json::Map<String, serde_json::Value> = record
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::Value::String(String::from_utf8_lossy(v).into_owned()),
                )
            })
            .collect();
        let headers = serde_json::Value::Object(headers).to_string();
        let sql = format!(
            "INSERT INTO {}.outboxd_dead_letter (event_id, topic, key, payload, headers, reason, error) \
             VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7)",
            crate::config::quote_ident(self.schema)
        );
        let insert = async {
            self.client
                .execute(
                    &sql,
                    &[
                        &event_id,
                        &record.topic,
                        &record.key,
                        &record.value,
                        &headers,
                        &reason,
                        &detail,
                    ],
                )
                .await
                .map_err(|e| Error::pg("writing to the dead-letter table", e))
        };
        crate::pg::within(self.timeout, "writing to the dead-letter table", insert).await?;
        Ok(())
    }
}

/// Sends a poison event to the dead-letter topic or, if that fails, the dead-letter table.
/// Logged with its id and counted; only if both fail does the session fail (and retry).
pub async fn dead_letter<S: Sink>(
    sink: &mut S,
    dlq: &DlqTable<'_>,
    event_id: Option<&str>,
    record: &Record,
    poison: &Poison,
) -> Result<()> {
    let reason = poison.kind.label();
    let id = event_id.unwrap_or("?");
    // Bounded: a broker that stops taking writes (RabbitMQ's connection.blocked) must not hold
    // the loop; the table takes the event instead.
    let limit = sink.delivery_timeout() + Duration::from_secs(5);
    let sent = tokio::time::timeout(limit, sink.dead_letter(record, poison.kind, &poison.detail))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the dead-letter destination did not answer within {} s",
                limit.as_secs()
            ))
        });
    let to = match sent {
        Ok(()) => {
            tracing::error!(event_id = id, reason, topic = %record.topic, detail = %poison.detail, "poison event dead-lettered to the DLQ topic");
            "dead-letter destination"
        }
        Err(dlq_error) => {
            dlq.insert(event_id, record, reason, &poison.detail).await?;
            tracing::error!(event_id = id, reason, topic = %record.topic, detail = %poison.detail, dlq_error = %dlq_error, "poison event dead-lettered to the outboxd_dead_letter table (the DLQ topic refused it)");
            "outboxd_dead_letter table"
        }
    };
    crate::health::note_dead_letter(crate::health::DeadLetterNote {
        at: std::time::SystemTime::now(),
        event_id: id.to_string(),
        reason,
        destination: record.topic.clone(),
        to,
        detail: poison.detail.clone(),
    });
    metrics::counter!(m::EVENTS_DEAD_LETTERED, "reason" => reason).increment(1);
    Ok(())
}
