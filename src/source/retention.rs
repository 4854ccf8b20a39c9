//! Polling mode's retention: published rows (at or below the stored cursor) older than
//! `polling.retention_hours` are deleted beside publishing, on a connection and cadence of
//! their own.
//!
//! The lesson: cleaning only when a poll came back empty cannot keep up with a table that is
//! never empty (measured in BENCHMARKS.md, "Polling retention under steady load"); so chunk
//! after chunk while there is more to delete, then a pause of a second, and never a row a
//! cursor has not passed — *any* pipeline's cursor on the table, not only this one's: two
//! pipelines on one table (a Kafka and a NATS fan-out, a migration to a new sink, blue/green
//! relays with other names) would otherwise delete each other's unpublished rows, silently.
//! Each pipeline's cursor row names its table (`relation`, written at every session start);
//! rows of an older outboxd without it count too, so an abandoned pipeline holds retention
//! back until its row is deleted — the safe side.

use std::time::Duration;

use tokio_postgres::Client;

use super::polling::read_cursor;
use crate::config::Config;
use crate::error::Error;

/// Rows deleted per statement: short transactions, short locks, no bloat in one go.
const RETENTION_CHUNK: i64 = 5_000;

/// Deletes published rows (at or below the stored cursor) written longer ago than
/// `polling.retention_hours`, on a connection and cadence of its own: chunk after chunk while
/// there is more to delete, then a pause of a second. (Cleaning only when a poll came back
/// empty could not keep up with a table that is never empty.) Errors are logged and retried.
pub async fn retention_loop(cfg: Config) {
    let retention = cfg.polling.retention;
    if retention.is_zero() {
        return;
    }
    let table = cfg.postgres.qualified_table();
    let cursors = format!(
        "{}.outboxd_cursor",
        crate::config::quote_ident(&cfg.postgres.schema)
    );
    let floor = format!(
        "SELECT xid::text, seq FROM {cursors} WHERE relation = $1 OR relation IS NULL \
          ORDER BY xid, seq LIMIT 1"
    );
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} \
           WHERE (outboxd_xid, outboxd_seq) <= ($1::text::xid8, $2::int8) \
             AND outboxd_written_at < now() - make_interval(secs => $3::float8) \
           ORDER BY outboxd_xid, outboxd_seq LIMIT $4::int8))"
    );
    let mut client: Option<Client> = None;
    loop {
        let c = match &client {
            Some(c) => c,
            None => match crate::pg::connect(&cfg.postgres.url, "outboxd-retention").await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    tracing::warn!(error = %e, "retention: cannot connect; trying again in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            },
        };
        let deleted = async {
            // The lowest cursor of every pipeline on the table (this one's included: its
            // row exists from the session's start).
            let (xid, seq): (u64, i64) = match c
                .query_opt(&floor, &[&table])
                .await
                .map_err(|e| Error::pg("reading the pipelines' cursors", e))?
            {
                Some(r) => (r.get::<_, String>(0).parse().unwrap_or(0), r.get(1)),
                None => read_cursor(c, &cfg).await?,
            };
            c.execute(
                &sql,
                &[
                    &xid.to_string(),
                    &seq,
                    &retention.as_secs_f64(),
                    &RETENTION_CHUNK,
                ],
            )
            .await
            .map_err(|e| Error::pg("deleting published rows past the retention", e))
        }
        .await;
        match deleted {
            Ok(n) => {
                if n > 0 {
                    metrics::counter!(crate::metrics::POLLING_DELETED).increment(n);
                    tracing::debug!(
                        deleted = n,
                        "deleted published rows past polling.retention_hours"
                    );
                }
                if (n as i64) < RETENTION_CHUNK {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: delete failed; trying again in 5 s");
                client = None;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}
