//! `outboxd snapshot`: asks the running relay for a snapshot (or to pause, resume or stop
//! one) by writing the signal into the WAL as an `outboxd.signal` message — the relay acts
//! on it when its stream reaches it, in commit order, whichever instance leads; no table,
//! no port, nothing to authenticate beyond PostgreSQL. `--wait` follows the progress table
//! until the snapshot ends.

use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use super::progress::{self, Progress};
use super::signal::{Message, SIGNAL_PREFIX};
use crate::config::PostgresConfig;
use crate::error::{Error, Result};

/// What `outboxd snapshot` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Execute,
    Pause,
    Resume,
    Stop,
}

/// Writes the signal; returns its id.
pub async fn send(
    client: &Client,
    action: Action,
    tables: &[String],
    filter: Option<&str>,
) -> Result<String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let id = format!("cli-{nanos:x}");
    let (kind, data) = match action {
        Action::Execute => {
            let mut data = json!({"data-collections": tables, "type": "incremental"});
            if let Some(f) = filter {
                data["additional-conditions"] = tables
                    .iter()
                    .map(|t| json!({"data-collection": t, "filter": f}))
                    .collect();
            }
            ("execute-snapshot", Some(data))
        }
        Action::Stop => (
            "stop-snapshot",
            Some(json!({"data-collections": tables, "type": "incremental"})),
        ),
        Action::Pause => ("pause-snapshot", None),
        Action::Resume => ("resume-snapshot", None),
    };
    let message = Message {
        id: id.clone(),
        kind: kind.into(),
        data,
    };
    let text = serde_json::to_string(&message)
        .map_err(|e| Error::setup(format!("encoding the signal: {e}"), "report this as a bug"))?;
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&SIGNAL_PREFIX, &text],
        )
        .await
        .map_err(|e| Error::pg("writing the snapshot signal", e))?;
    Ok(id)
}

/// Follows the snapshots of `tables` (`schema.table`) asked by signal `id` until each
/// ended; prints a progress line every few seconds. `Ok(true)` when every one is done.
pub async fn wait(
    client: &Client,
    cfg: &PostgresConfig,
    id: &str,
    tables: &[String],
) -> Result<bool> {
    let progress = Progress::new(&cfg.schema, &cfg.slot);
    let mut last = std::time::Instant::now();
    loop {
        let jobs = progress.all(client).await?;
        let mine: Vec<_> = jobs
            .iter()
            .filter(|j| j.signal_id.starts_with(&format!("{id}@")))
            .filter(|j| {
                tables
                    .iter()
                    .any(|t| crate::cdc::select::Glob::new(t).matches(&j.name()))
            })
            .collect();
        let ended = |s: &str| matches!(s, progress::DONE | progress::FAILED | progress::STOPPED);
        if !mine.is_empty() && mine.iter().all(|j| ended(&j.state)) {
            for j in &mine {
                println!(
                    "{}: {} ({} rows{})",
                    j.name(),
                    j.state,
                    j.rows_done,
                    j.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            return Ok(mine.iter().all(|j| j.state == progress::DONE));
        }
        if last.elapsed() >= Duration::from_secs(5) {
            last = std::time::Instant::now();
            if mine.is_empty() {
                println!("waiting for the relay to take the signal (is it running?)");
            }
            for j in &mine {
                println!(
                    "{}: {} {} of ~{} rows",
                    j.name(),
                    j.state,
                    j.rows_done,
                    j.rows_estimated.map_or("?".into(), |n| n.to_string())
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
