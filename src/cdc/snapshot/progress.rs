//! Where a snapshot stands, kept in PostgreSQL (`<schema>.outboxd_snapshot`, one row per
//! pipeline and table) — not in the relay's memory and not in a second store: a relay killed
//! mid-snapshot resumes after the last chunk whose rows the broker acknowledged (the
//! checkpoint passed its high watermark), never from zero. A signal is recorded here when
//! the stream carries it, before the slot can be confirmed past it.

use tokio_postgres::Client;

use crate::config::quote_ident;
use crate::error::{Error, Result};

/// The progress table (`outboxd migrate` creates it; the relay too, when absent).
pub const SNAPSHOT_DDL: &str = "CREATE TABLE IF NOT EXISTS {schema}.outboxd_snapshot (
    pipeline text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    signal_id text NOT NULL,
    filter text,
    initial boolean NOT NULL DEFAULT false,
    state text NOT NULL,
    max_key text[],
    done_key text[],
    rows_done bigint NOT NULL DEFAULT 0,
    rows_estimated bigint,
    chunks_done bigint NOT NULL DEFAULT 0,
    error text,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (pipeline, schema_name, table_name)
)";

/// A snapshot's state.
pub const RUNNING: &str = "running";
pub const PAUSED: &str = "paused";
pub const DONE: &str = "done";
pub const STOPPED: &str = "stopped";
pub const FAILED: &str = "failed";

/// One table's snapshot, as its row says.
#[derive(Debug, Clone)]
pub struct Job {
    pub schema: String,
    pub table: String,
    pub signal_id: String,
    pub filter: Option<String>,
    pub initial: bool,
    pub state: String,
    pub max_key: Option<Vec<String>>,
    pub done_key: Option<Vec<String>>,
    pub rows_done: i64,
    pub rows_estimated: Option<i64>,
    pub chunks_done: i64,
    pub error: Option<String>,
    /// `started_at` in microseconds: a new request for the table changes it.
    pub generation: i64,
    /// Seconds from `started_at` to `finished_at` (or now).
    pub elapsed: f64,
}

impl Job {
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// The progress table of a pipeline whose outbox schema is `schema`.
pub struct Progress {
    table: String,
    pipeline: String,
}

fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| Error::pg(what, e)
}

const COLUMNS: &str = "schema_name, table_name, signal_id, filter, initial, state, max_key, done_key, \
     rows_done, rows_estimated, chunks_done, error, \
     (extract(epoch from started_at) * 1000000)::bigint, extract(epoch from coalesce(finished_at, now()) - started_at)::float8";

fn job(r: &tokio_postgres::Row) -> Job {
    Job {
        schema: r.get(0),
        table: r.get(1),
        signal_id: r.get(2),
        filter: r.get(3),
        initial: r.get(4),
        state: r.get(5),
        max_key: r.get(6),
        done_key: r.get(7),
        rows_done: r.get(8),
        rows_estimated: r.get(9),
        chunks_done: r.get(10),
        error: r.get(11),
        generation: r.get(12),
        elapsed: r.get(13),
    }
}

impl Progress {
    pub fn new(schema: &str, pipeline: &str) -> Progress {
        Progress {
            table: format!("{}.outboxd_snapshot", quote_ident(schema)),
            pipeline: pipeline.to_string(),
        }
    }

    /// Creates the table when absent (asking first: `CREATE TABLE IF NOT EXISTS` needs the
    /// CREATE privilege on the schema even when the table exists).
    pub async fn ensure(&self, client: &Client, schema: &str) -> Result<()> {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table])
            .await
            .map_err(pg("looking for the snapshot progress table"))?
            .get(0);
        if exists {
            return Ok(());
        }
        client
            .batch_execute(&SNAPSHOT_DDL.replace("{schema}", &quote_ident(schema)))
            .await
            .map_err(|e| {
                Error::setup(
                    format!("creating the snapshot progress table {}: {e}", self.table),
                    "run `outboxd migrate` as a role that may create tables in the outbox's schema",
                )
            })
    }

    /// Every snapshot of this pipeline, oldest first.
    pub async fn all(&self, client: &Client) -> Result<Vec<Job>> {
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM {} WHERE pipeline = $1 ORDER BY started_at, schema_name, table_name",
                    self.table
                ),
                &[&self.pipeline],
            )
            .await
            .map_err(pg("reading the snapshots' progress"))?;
        Ok(rows.iter().map(job).collect())
    }

    pub async fn get(&self, client: &Client, schema: &str, table: &str) -> Result<Option<Job>> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM {} WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                    self.table
                ),
                &[&self.pipeline, &schema, &table],
            )
            .await
            .map_err(pg("reading a snapshot's progress"))?;
        Ok(row.as_ref().map(job))
    }

    /// Asks for a snapshot of `schema.table` (from its start; replaces an earlier one).
    pub async fn request(
        &self,
        client: &Client,
        schema: &str,
        table: &str,
        signal_id: &str,
        filter: Option<&str>,
        initial: bool,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (pipeline, schema_name, table_name, signal_id, filter, initial, state) \
                     VALUES ($1, $2, $3, $4, $5, $6, 'running') \
                     ON CONFLICT (pipeline, schema_name, table_name) DO UPDATE SET \
                       signal_id = excluded.signal_id, filter = excluded.filter, initial = excluded.initial, \
                       state = 'running', max_key = NULL, done_key = NULL, rows_done = 0, \
                       rows_estimated = NULL, chunks_done = 0, error = NULL, \
                       started_at = clock_timestamp(), updated_at = now(), finished_at = NULL",
                    self.table
                ),
                &[&self.pipeline, &schema, &table, &signal_id, &filter, &initial],
            )
            .await
            .map_err(pg("recording a snapshot request"))?;
        Ok(())
    }

    /// Moves the snapshots in state `from` (of `tables`, or all) to `to`; how many moved.
    pub async fn transition(
        &self,
        client: &Client,
        tables: Option<&[(String, String)]>,
        from: &[&str],
        to: &str,
    ) -> Result<u64> {
        let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
        let (schemas, names): (Vec<String>, Vec<String>) =
            tables.unwrap_or_default().iter().cloned().unzip();
        let all = tables.is_none();
        client
            .execute(
                &format!(
                    "UPDATE {} SET state = $2, updated_at = now(), \
                       finished_at = CASE WHEN $2 IN ('stopped', 'done') THEN now() ELSE NULL END \
                     WHERE pipeline = $1 AND state = ANY($3) \
                       AND ($4 OR (schema_name, table_name) IN (SELECT * FROM unnest($5::text[], $6::text[])))",
                    self.table
                ),
                &[&self.pipeline, &to, &from, &all, &schemas, &names],
            )
            .await
            .map_err(pg("changing a snapshot's state"))
    }

    /// The table's greatest key when the snapshot began, and its estimated row count.
    pub async fn begin(
        &self,
        client: &Client,
        job: &Job,
        max_key: Option<&[String]>,
        estimate: Option<i64>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET max_key = $4, rows_estimated = $5, updated_at = now() \
                     WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                    self.table
                ),
                &[&self.pipeline, &job.schema, &job.table, &max_key, &estimate],
            )
            .await
            .map_err(pg("recording a snapshot's start"))?;
        Ok(())
    }

    /// Every row up to `done_key` is acknowledged.
    pub async fn advance(&self, client: &Client, job: &Job) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET done_key = $4, rows_done = $5, chunks_done = $6, updated_at = now() \
                     WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3 AND state = 'running'",
                    self.table
                ),
                &[
                    &self.pipeline,
                    &job.schema,
                    &job.table,
                    &job.done_key,
                    &job.rows_done,
                    &job.chunks_done,
                ],
            )
            .await
            .map_err(pg("recording a snapshot's progress"))?;
        Ok(())
    }

    /// The snapshot ended: `done`, or `failed` with the reason.
    pub async fn end(
        &self,
        client: &Client,
        job: &Job,
        state: &str,
        error: Option<&str>,
    ) -> Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET state = $4, error = $5, done_key = $6, rows_done = $7, chunks_done = $8, \
                       updated_at = now(), finished_at = now() \
                     WHERE pipeline = $1 AND schema_name = $2 AND table_name = $3",
                    self.table
                ),
                &[
                    &self.pipeline,
                    &job.schema,
                    &job.table,
                    &state,
                    &error,
                    &job.done_key,
                    &job.rows_done,
                    &job.chunks_done,
                ],
            )
            .await
            .map_err(pg("recording a snapshot's end"))?;
        Ok(())
    }
}
