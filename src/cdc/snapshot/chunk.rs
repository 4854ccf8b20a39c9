//! Reading a table in primary-key chunks, and the watermarks around each read.
//!
//! A chunk is `(lo, hi]` in key order, `hi` found by an index scan (`OFFSET chunk_size - 1`)
//! up to the greatest key when the snapshot began — a row with a greater key was inserted
//! since, and its insert is in the stream. Values are read as text (the simple protocol) in
//! a session set up as the replication connection is (time zone, date style, bytea output,
//! float digits): a row read reads exactly as the same row decoded from the WAL, so its key
//! compares with the keys the stream carries and its values map the same way.
//!
//! Around each read (DBLog): a low watermark; then a wait until every transaction that had
//! an xid when it was written has ended — a transaction's commit record can precede the low
//! watermark while it is still invisible to a new snapshot (its backend leaves the ProcArray
//! only after flushing, and after any synchronous standby answered); without the wait its
//! change would be streamed before the window and the older row read would overwrite it.
//! Then the read, in one statement, read-only; then the high watermark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use super::watermark::{chunk, Board, Mark, Place, WATERMARK_PREFIX};
use crate::cdc::table::CapturedTable;
use crate::config::{quote_ident, quote_literal, CdcConfig, PostgresConfig};
use crate::error::{Error, Result};
use crate::source::pgoutput::{Column, Relation};

/// The session settings of the replication connection (`source::replication_conn`) that
/// decide how values read as text.
pub const READER_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; \
    SET bytea_output = 'hex'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; \
    SET lc_monetary = 'C'; SET standard_conforming_strings = on; SET synchronous_commit = on; \
    SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0";

/// How one table is read.
pub struct Plan {
    pub oid: u32,
    pub name: String,
    qualified: String,
    columns: String,
    key_tuple: String,
    key_order: String,
    key_desc: String,
    key_text: String,
    key_types: Vec<String>,
    filter: Option<String>,
    pub table: Arc<CapturedTable>,
}

fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| Error::pg(what, e)
}

/// The text values of a simple-protocol result.
async fn text_rows(client: &Client, sql: &str, what: &'static str) -> Result<Vec<Vec<Column>>> {
    let messages = client.simple_query(sql).await.map_err(pg(what))?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| match row.get(i) {
                        Some(v) => Column::Text(v.as_bytes().to_vec()),
                        None => Column::Null,
                    })
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

fn texts(row: Vec<Column>) -> Vec<String> {
    row.into_iter()
        .map(|c| match c {
            Column::Text(t) => String::from_utf8_lossy(&t).into_owned(),
            _ => String::new(),
        })
        .collect()
}

impl Plan {
    /// Reads the table's columns, key and types from the catalog. `Err` names why the table
    /// cannot be snapshotted (not there, no key).
    pub async fn load(
        client: &Client,
        cfg: &PostgresConfig,
        schema: &str,
        table: &str,
        filter: Option<String>,
    ) -> Result<Plan> {
        let name = format!("{schema}.{table}");
        let row = client
            .query_opt(
                "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await
            .map_err(pg("finding a table to snapshot"))?
            .ok_or_else(|| Error::setup(format!("table {name} does not exist"), "name an existing table"))?;
        let oid: u32 = row.get(0);
        let identity = row.get::<_, String>(1).bytes().next().unwrap_or(b'd');
        let cols = client
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod) \
                   FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
                    AND a.attgenerated = '' ORDER BY a.attnum",
                &[&oid],
            )
            .await
            .map_err(pg("reading a table's columns"))?;
        let columns: Vec<String> = cols.iter().map(|r| r.get(0)).collect();
        let types: Vec<u32> = cols.iter().map(|r| r.get(1)).collect();
        let catalog = crate::cdc::catalog::describe(client, oid, &types).await?;
        if catalog.key_columns.is_empty() {
            return Err(Error::setup(
                format!("table {name} has no primary key (nor replica identity index): a snapshot reads it in key order and matches its rows with the stream's changes by key"),
                format!("add a primary key to {name}"),
            ));
        }
        let rel = Relation {
            id: oid,
            namespace: schema.to_string(),
            name: table.to_string(),
            key: columns
                .iter()
                .map(|c| catalog.key_columns.contains(c))
                .collect(),
            columns: columns.clone(),
            types,
            replica_identity: identity,
            typmods: cols.iter().map(|r| r.get(2)).collect(),
        };
        let captured = CapturedTable::new(&rel, &catalog, &cfg.cdc);
        let key_types = catalog
            .key_columns
            .iter()
            .map(|k| {
                cols.iter()
                    .find(|r| r.get::<_, String>(0) == *k)
                    .map(|r| r.get::<_, String>(3))
                    .unwrap_or_else(|| "text".into())
            })
            .collect();
        let keys: Vec<String> = catalog.key_columns.iter().map(|k| quote_ident(k)).collect();
        Ok(Plan {
            oid,
            qualified: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            columns: columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", "),
            key_tuple: format!("({})", keys.join(", ")),
            key_order: keys.join(", "),
            key_desc: keys
                .iter()
                .map(|k| format!("{k} DESC"))
                .collect::<Vec<_>>()
                .join(", "),
            // Aliased: an output column named as the key column would be what ORDER BY sorts
            // (as text).
            key_text: keys
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{k}::text AS outboxd_k{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            key_types,
            filter: filter.filter(|f| !f.trim().is_empty()),
            table: Arc::new(captured),
            name,
        })
    }

    /// `('v1'::type1, …)`: a key read back as text, as SQL.
    fn literal(&self, key: &[String]) -> String {
        let parts: Vec<String> = key
            .iter()
            .zip(&self.key_types)
            .map(|(v, t)| format!("{}::{t}", quote_literal(v)))
            .collect();
        format!("({})", parts.join(", "))
    }

    fn range(&self, lo: Option<&[String]>, hi: &[String]) -> String {
        let mut cond = format!("{} <= {}", self.key_tuple, self.literal(hi));
        if let Some(lo) = lo {
            cond = format!("{} > {} AND {cond}", self.key_tuple, self.literal(lo));
        }
        cond
    }

    /// The greatest key now (`None`: the table is empty).
    pub async fn max_key(&self, client: &Client) -> Result<Option<Vec<String>>> {
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {} LIMIT 1",
            self.key_text, self.qualified, self.key_desc
        );
        let rows = text_rows(client, &sql, "reading a table's greatest key").await?;
        Ok(rows.into_iter().next().map(texts))
    }

    /// The planner's row count (`None` before the table was ever analysed).
    pub async fn estimate(&self, client: &Client) -> Result<Option<i64>> {
        let row = client
            .query_one(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = $1",
                &[&self.oid],
            )
            .await
            .map_err(pg("estimating a table's rows"))?;
        Ok(Some(row.get::<_, i64>(0)).filter(|n| *n >= 0))
    }

    /// The upper key of the chunk after `lo`: `None` when fewer than `size` rows are left
    /// up to `max` (the last chunk ends at `max`).
    pub async fn boundary(
        &self,
        client: &Client,
        lo: Option<&[String]>,
        max: &[String],
        size: u32,
    ) -> Result<Option<Vec<String>>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} OFFSET {} LIMIT 1",
            self.key_text,
            self.qualified,
            self.range(lo, max),
            self.key_order,
            size.saturating_sub(1)
        );
        let rows = text_rows(client, &sql, "finding a snapshot chunk's end").await?;
        Ok(rows.into_iter().next().map(texts))
    }

    /// Up to `limit` rows after `lo` in key order, without watermarks (`outboxd verify`).
    pub async fn rows_after(
        &self,
        client: &Client,
        lo: Option<&[String]>,
        limit: u32,
    ) -> Result<Vec<Vec<Column>>> {
        let cond = match lo {
            Some(lo) => format!("WHERE {} > {}", self.key_tuple, self.literal(lo)),
            None => String::new(),
        };
        let sql = format!(
            "SELECT {} FROM {} {cond} ORDER BY {} LIMIT {limit}",
            self.columns, self.qualified, self.key_order
        );
        text_rows(client, &sql, "reading a table's rows").await
    }

    /// A row's key as text, for [`Plan::rows_after`].
    pub fn key_texts(&self, row: &[Column]) -> Vec<String> {
        self.table
            .key_of(row)
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect()
    }

    /// Reads chunk `(lo, hi]` between its watermarks and posts it on `board` before the
    /// high watermark is written. Returns the rows read.
    #[allow(clippy::too_many_arguments)]
    pub async fn read(
        &self,
        cfg: &CdcConfig,
        client: &Client,
        board: &Board,
        id: u64,
        lo: Option<&[String]>,
        hi: &[String],
        place: Place,
    ) -> Result<usize> {
        let mark = |open| Mark {
            open,
            run: board.run.clone(),
            chunk: id,
            oid: self.oid,
        };
        let (low, xid) = emit(client, &mark(true)).await?;
        wait_for_older_transactions(client, &xid, &self.name, id).await?;
        let mut sql = format!(
            "BEGIN TRANSACTION READ ONLY; SELECT {} FROM {} WHERE {}",
            self.columns,
            self.qualified,
            self.range(lo, hi)
        );
        if let Some(f) = &self.filter {
            sql.push_str(&format!(" AND ({f})"));
        }
        sql.push_str(&format!(" ORDER BY {}; COMMIT", self.key_order));
        let rows = match text_rows(client, &sql, "reading a snapshot chunk").await {
            Ok(rows) => rows,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        let n = rows.len();
        board.post(id, chunk(cfg, &self.table, self.oid, rows, low, place));
        emit(client, &mark(false)).await?;
        Ok(n)
    }
}

/// Writes a watermark and takes a transaction id after it; returns the watermark's LSN and
/// the id. The transaction's
/// commit flushes the WAL up to it: the walsender sends only flushed WAL, and a
/// non-transactional message alone waits for the WAL writer (up to `wal_writer_delay`).
async fn emit(client: &Client, mark: &Mark) -> Result<(u64, String)> {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(false, $1, $2)::text, pg_current_xact_id()::text",
            &[&WATERMARK_PREFIX, &mark.encode()],
        )
        .await
        .map_err(pg("writing a snapshot watermark"))?;
    let lsn = crate::lsn::parse_lsn(row.get(0)).unwrap_or(0);
    Ok((lsn, row.get(1)))
}

/// Waits until every transaction that had an xid when the low watermark was written has
/// ended (see the module doc); says so when one keeps the chunk waiting.
/// `xid` was taken after the low watermark was written: every transaction older than it
/// has ended once the oldest running one is younger.
async fn wait_for_older_transactions(
    client: &Client,
    xid: &str,
    table: &str,
    chunk: u64,
) -> Result<()> {
    let started = Instant::now();
    let mut delay = Duration::from_micros(500);
    let mut warned = Duration::ZERO;
    loop {
        let row = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8",
                &[&xid],
            )
            .await
            .map_err(pg("waiting for older transactions"))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if started.elapsed() >= warned + Duration::from_secs(30) {
            warned = started.elapsed();
            tracing::warn!(table, chunk, waited_s = warned.as_secs(), "a snapshot chunk waits for transactions that were open when it began (see pg_stat_activity's backend_xid); it reads once they end");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}
