//! Polling source, for databases without logical replication.
//!
//! ## The gap, and how it is closed
//!
//! Sequence values are taken at INSERT, rows become visible at COMMIT. A poller that reads
//! `WHERE id > last_id` skips the rows of a transaction that took its ids early and committed
//! late — Kafka Connect JDBC's long-standing data loss. Here every row carries the writing
//! transaction's id (`outboxd_xid xid8 DEFAULT pg_current_xact_id()`) and an insertion
//! sequence (`outboxd_seq`), and a poll reads only rows of transactions older than every
//! transaction still running:
//!
//! ```sql
//! WHERE (outboxd_xid, outboxd_seq) > (cursor) AND outboxd_xid < pg_snapshot_xmin(pg_current_snapshot())
//! ORDER BY outboxd_xid, outboxd_seq
//! ```
//!
//! Every transaction id below the snapshot's xmin is finished, so its rows are either visible
//! now or never will be; a transaction that writes later gets a larger id. The cursor
//! `(xid, seq)` is stored (table `outboxd_cursor`) only after Kafka acknowledged every event up
//! to it. A long-running transaction holds xmin back: publishing waits, nothing is skipped.
//!
//! ## Order
//!
//! Events are published in transaction-id order (the order in which transactions first
//! wrote), then insertion order — not commit order. Two transactions that both write one
//! aggregate can commit in the opposite order of their ids; logical mode gives commit order.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};

use crate::config::{quote_ident, quote_literal, Config};
use crate::error::{Error, Result};
use crate::event::{Event, EventExtra};
use crate::source::pgoutput::parse_timestamp_ms;

/// A position in the outbox: (transaction id, insertion sequence).
pub type Cursor = (u64, i64);

/// The LISTEN/NOTIFY channel of a table (identifier-safe: derived from the names' hash).
pub fn channel(cfg: &Config) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{}.{}", cfg.postgres.schema, cfg.postgres.table).bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("outboxd_{h:016x}")
}

/// The stored cursor of `postgres.slot`; (0, 0) before the first store.
pub async fn read_cursor(client: &Client, cfg: &Config) -> Result<Cursor> {
    let sql = format!(
        "SELECT xid::text, seq FROM {}.outboxd_cursor WHERE name = $1",
        quote_ident(&cfg.postgres.schema)
    );
    let row = client
        .query_opt(&sql, &[&cfg.postgres.slot])
        .await
        .map_err(|e| Error::pg("reading the polling cursor (run `outboxd migrate`)", e))?;
    Ok(row.map_or((0, 0), |r| {
        (r.get::<_, String>(0).parse().unwrap_or(0), r.get(1))
    }))
}

/// Rows past `cursor`, counted up to a million: `outboxd_polling_pending_events`.
pub async fn pending_events(client: &Client, cfg: &Config, cursor: Cursor) -> Result<i64> {
    let sql = format!(
        "SELECT count(*) FROM (SELECT 1 FROM {} WHERE (outboxd_xid, outboxd_seq) > ($1::text::xid8, $2::int8) LIMIT 1000000) s",
        cfg.postgres.qualified_table()
    );
    client
        .query_one(&sql, &[&cursor.0.to_string(), &cursor.1])
        .await
        .map(|r| r.get(0))
        .map_err(|e| Error::pg("counting pending events", e))
}

/// The data type of a column of the outbox table, if it exists.
pub(crate) async fn column_type(
    client: &Client,
    cfg: &Config,
    name: &str,
) -> Result<Option<String>> {
    client
        .query_opt(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
            &[&cfg.postgres.schema, &cfg.postgres.table, &name],
        )
        .await
        .map(|r| r.map(|r| r.get::<_, String>(0)))
        .map_err(|e| Error::pg("reading the outbox table's columns", e))
}

/// The SELECT list that reads an event with the configured column mapping (11 columns plus
/// the header columns; see [`row_event`]).
pub struct EventSelect {
    pub list: String,
    pub payload_is_bytea: bool,
}

/// Checks the mapped columns exist and builds the SELECT list for them.
pub async fn event_select(client: &Client, cfg: &Config) -> Result<EventSelect> {
    let c = &cfg.postgres.columns;
    let column_type = |name: String| async move { column_type(client, cfg, &name).await };
    for (key, name) in [
        ("id", &c.id),
        ("aggregatetype", &c.aggregatetype),
        ("aggregateid", &c.aggregateid),
        ("type", &c.event_type),
        ("payload", &c.payload),
    ] {
        if column_type(name.clone()).await?.is_none() {
            return Err(Error::setup(
                format!(
                    "outbox table {} has no column `{name}` (postgres.columns.{key})",
                    cfg.postgres.qualified_table()
                ),
                "map the table's columns in [postgres.columns]",
            ));
        }
    }
    let payload_is_bytea = column_type(c.payload.clone()).await?.as_deref() == Some("bytea");
    let optional = |name: &str| {
        let name = name.to_string();
        async move {
            if name.is_empty() {
                Ok(None)
            } else {
                column_type(name.clone()).await.map(|t| t.map(|_| name))
            }
        }
    };
    let text = |col: Option<String>| {
        col.map_or("NULL::text".to_string(), |c| {
            format!("{}::text", quote_ident(&c))
        })
    };
    let headers = text(optional(&c.headers).await?);
    let timestamp = text(optional(&c.timestamp).await?);
    let topic = text(optional(&c.topic).await?);
    let partition = text(optional(&c.partition).await?);
    let mut extra = String::new();
    for h in &c.header_columns {
        if column_type(h.clone()).await?.is_none() {
            return Err(Error::setup(
                format!("outbox table has no column `{h}` (postgres.columns.header_columns)"),
                "map the table's columns in [postgres.columns]",
            ));
        }
        extra.push_str(&format!(", {}::text", quote_ident(h)));
    }
    let payload = if payload_is_bytea {
        quote_ident(&c.payload)
    } else {
        format!("convert_to({}::text, 'UTF8')", quote_ident(&c.payload))
    };
    let list = format!(
            "{}::text, {}::text, {}::text, {}::text, {payload}, {headers}, {timestamp}, {topic}, {partition}{extra}",
            quote_ident(&c.id),
            quote_ident(&c.aggregatetype),
            quote_ident(&c.aggregateid),
            quote_ident(&c.event_type),
        );
    Ok(EventSelect {
        list,
        payload_is_bytea,
    })
}

/// An event from a row read with [`event_select`]'s list starting at column `first`.
pub fn row_event(
    r: &tokio_postgres::Row,
    first: usize,
    cfg: &Config,
    payload_is_bytea: bool,
) -> Event {
    let header_columns = &cfg.postgres.columns.header_columns;
    let timestamp: Option<String> = r.get(first + 6);
    let headers = header_columns
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            r.get::<_, Option<String>>(first + 9 + i)
                .map(|v| (name.clone(), v))
        })
        .collect();
    let timestamp_ms = timestamp.as_deref().and_then(parse_timestamp_ms);
    Event {
        id: r.get::<_, Option<String>>(first).unwrap_or_default(),
        aggregatetype: r.get::<_, Option<String>>(first + 1).unwrap_or_default(),
        aggregateid: r.get(first + 2),
        event_type: r.get::<_, Option<String>>(first + 3).unwrap_or_default(),
        payload: r.get(first + 4),
        headers: r.get(first + 5),
        // Rows carry no commit time; the row's timestamp (or now) stands in.
        commit_time: timestamp_ms
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
            .unwrap_or_else(SystemTime::now),
        extra: EventExtra {
            timestamp_ms,
            topic: r.get(first + 7),
            partition: r
                .get::<_, Option<String>>(first + 8)
                .and_then(|p| p.trim().parse().ok()),
            headers,
            binary_payload: payload_is_bytea,
            change: false,
        },
    }
}

/// Reads committed outbox rows past the cursor.
pub struct Poller {
    pub client: Client,
    query: String,
    cursor: Cursor,
    name: String,
    schema: String,
    wake: Arc<Notify>,
    listener: Option<tokio::task::JoinHandle<()>>,
    listen_client: Option<Client>,
    cfg: Config,
    payload_is_bytea: bool,
    /// Payload bytes per poll at most (`kafka.max_in_flight_bytes`); one row always.
    max_bytes: i64,
}

impl Drop for Poller {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
    }
}

impl Poller {
    pub async fn open(cfg: &Config) -> Result<Poller> {
        let client = crate::pg::connect(&cfg.postgres.url, "outboxd").await?;
        client
            .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
            .await
            .map_err(|e| Error::pg("setting the session time zone", e))?;
        for needed in ["outboxd_xid", "outboxd_seq", "outboxd_written_at"] {
            if column_type(&client, cfg, needed).await?.is_none() {
                return Err(Error::setup(
                    format!(
                        "outbox table {} has no column {needed} (polling mode)",
                        cfg.postgres.qualified_table()
                    ),
                    "run `outboxd migrate` with mode = \"polling\"",
                ));
            }
        }
        let EventSelect {
            list,
            payload_is_bytea,
        } = event_select(&client, cfg).await?;
        let table = cfg.postgres.qualified_table();
        let payload = quote_ident(&cfg.postgres.columns.payload);
        let row_bytes = if payload_is_bytea {
            format!("coalesce(octet_length(o.{payload}), 0)")
        } else {
            format!("coalesce(octet_length(o.{payload}::text), 0)")
        };
        let query = format!(
            // Qualified with `o.`: an unqualified ORDER BY name would bind to the text-cast
            // output column of the same name and sort xids as strings ("1000" < "999").
            // The outer query bounds the batch by payload bytes ($4) as well as rows ($3):
            // a row is taken while the rows before it stay under the budget, so the first
            // row always is.
            "SELECT * FROM ( \
               SELECT s.*, sum(s.row_bytes) OVER (ORDER BY s.k_xid, s.k_seq ROWS UNBOUNDED PRECEDING) AS running \
                 FROM ( \
                   SELECT o.outboxd_xid::text AS cursor_xid, o.outboxd_seq AS cursor_seq, \
                          o.outboxd_written_at::text AS written_at, {list}, \
                          o.outboxd_xid AS k_xid, o.outboxd_seq AS k_seq, {row_bytes} AS row_bytes \
                     FROM {table} o \
                    WHERE (o.outboxd_xid, o.outboxd_seq) > ($1::text::xid8, $2::int8) \
                      AND o.outboxd_xid < pg_snapshot_xmin(pg_current_snapshot()) \
                    ORDER BY o.outboxd_xid, o.outboxd_seq LIMIT $3::int8) s) b \
             WHERE b.running - b.row_bytes < $4::int8"
        );
        let cursor = read_cursor(&client, cfg).await?;
        let schema = quote_ident(&cfg.postgres.schema);
        Ok(Poller {
            client,
            query,
            cursor,
            name: cfg.postgres.slot.clone(),
            schema,
            wake: Arc::new(Notify::new()),
            listener: None,
            listen_client: None,
            cfg: cfg.clone(),
            payload_is_bytea,
            max_bytes: i64::try_from(cfg.kafka.max_in_flight_bytes).unwrap_or(i64::MAX),
        })
    }

    /// Re-reads the stored cursor (after taking the leadership lock).
    pub async fn reload_cursor(&mut self) -> Result<()> {
        self.cursor = read_cursor(&self.client, &self.cfg).await?;
        Ok(())
    }

    /// Makes this pipeline's cursor row exist and name its table, before anything is read:
    /// retention deletes only below the lowest cursor of every pipeline on the table
    /// (`super::retention`), so a pipeline must be counted before its first store.
    pub async fn register(&self) -> Result<()> {
        let table = self.cfg.postgres.qualified_table();
        let sql = format!(
            "INSERT INTO {}.outboxd_cursor (name, xid, seq, relation) VALUES ($1, $2::text::xid8, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET relation = EXCLUDED.relation",
            self.schema
        );
        let xid = self.cursor.0.to_string();
        match self
            .client
            .execute(&sql, &[&self.name, &xid, &self.cursor.1, &table])
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
                Err(Error::setup(
                    format!(
                        "{}.outboxd_cursor has no column `relation` (made by an older outboxd)",
                        self.schema
                    ),
                    "run `outboxd migrate` with mode = \"polling\" (it adds the column)",
                ))
            }
            Err(e) => Err(Error::pg("registering the polling cursor", e)),
        }
    }

    /// A cursor at or past this cluster's next transaction id came from another cluster (the
    /// outbox was dumped and restored, or moved blue/green): new rows would sort below it and
    /// be skipped silently. That stops the relay (exit 2) with the way out.
    pub async fn check_cursor_in_this_cluster(&self) -> Result<()> {
        let next = self.next_xid().await?;
        if self.cursor.0 < next {
            return Ok(());
        }
        let schema = &self.schema;
        let name = quote_literal(&self.name);
        Err(Error::setup(
            format!(
                "the polling cursor (transaction {}) is ahead of this cluster's next transaction id ({next}): the outbox was moved from another cluster (dump/restore, blue/green), and new rows would sort below the cursor and be skipped",
                self.cursor.0
            ),
            format!(
                "check with `outboxd verify --since …` which events the consumers have, then restart from the table's beginning: UPDATE {schema}.outboxd_cursor SET xid = '0', seq = 0 WHERE name = {name} (retained rows are published again, with their ids)"
            ),
        ))
    }

    async fn next_xid(&self) -> Result<u64> {
        let next: String = self
            .client
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
            .await
            .map_err(|e| Error::pg("reading the next transaction id", e))?
            .get(0);
        Ok(next.parse().unwrap_or(u64::MAX))
    }

    /// Exactly-once: moves the cursor up to `pos`, the position read back from the position
    /// topic `topic` (rows up to it are in Kafka already). A cursor from another cluster is
    /// refused before it is stored.
    pub async fn adopt(&mut self, pos: Cursor, witness: Option<&str>, topic: &str) -> Result<()> {
        let next = self.next_xid().await?;
        if pos.0 >= next {
            return Err(Error::setup(
                format!(
                    "the position topic {topic} holds cursor {}/{} for this pipeline, ahead of this cluster's next transaction id ({next}): it was written for another cluster or before a restore",
                    pos.0, pos.1
                ),
                "reset the pipeline's position (README: exactly-once, resetting the position) or set kafka.transactional_id for this database",
            ));
        }
        if pos > self.cursor {
            // The row at the position must be the event Kafka holds there: after a restore
            // the xid counter can pass the position while the rows below it are new ones.
            if let Some(expected) = witness {
                let sql = format!(
                    "SELECT {}::text FROM {} WHERE (outboxd_xid, outboxd_seq) = ($1::text::xid8, $2::int8)",
                    quote_ident(&self.cfg.postgres.columns.id),
                    self.cfg.postgres.qualified_table()
                );
                let found: Option<String> = self
                    .client
                    .query_opt(&sql, &[&pos.0.to_string(), &pos.1])
                    .await
                    .map_err(|e| Error::pg("checking the position's row", e))?
                    .map(|r| r.get(0));
                if found.as_deref() != Some(expected) {
                    return Err(Error::setup(
                        format!(
                            "the position topic {topic} holds cursor {}/{} (event {expected}) for this pipeline, but this table has {} there: the table's history forked (a restore), and moving the cursor there would skip rows never published",
                            pos.0,
                            pos.1,
                            found.map_or("no row".to_string(), |id| format!("event {id}"))
                        ),
                        "check what consumers have (`outboxd verify --since …`), then reset the pipeline's position (README: exactly-once, resetting the position)",
                    ));
                }
            }
            tracing::info!(cursor = %format!("{}/{}", pos.0, pos.1), "exactly-once: the cursor moves up to the last committed Kafka transaction");
        }
        self.store(pos).await
    }

    /// The poll query ($1 cursor xid as text, $2 cursor seq, $3 limit), for EXPLAIN.
    pub fn query(&self) -> &str {
        &self.query
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// LISTENs on a connection of its own; notifications wake [`Poller::wait`].
    pub async fn listen(&mut self) -> Result<()> {
        let target = crate::pg::Target::parse(&self.cfg.postgres.url)?;
        let (client, mut connection) = target
            .config
            .connect(target.make_tls()?)
            .await
            .map_err(|e| crate::pg::connect_error(&target, e))?;
        let wake = self.wake.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                match msg {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN session ended; falling back to interval polling");
                        break;
                    }
                }
            }
        });
        self.listener = Some(task);
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(&channel(&self.cfg))))
            .await
            .map_err(|e| Error::pg("LISTEN for new outbox rows", e))?;
        self.listen_client = Some(client);
        Ok(())
    }

    /// Waits for a NOTIFY or `interval`, whichever comes first.
    pub async fn wait(&self, interval: Duration) {
        let _ = tokio::time::timeout(interval, self.wake.notified()).await;
    }

    /// The next committed rows past `after` (the stored cursor, or the last row read ahead
    /// of it), with their positions.
    pub async fn fetch(&self, after: Cursor, limit: i64) -> Result<Vec<(Event, Cursor)>> {
        let xid = after.0.to_string();
        let rows = self
            .client
            .query(&self.query, &[&xid, &after.1, &limit, &self.max_bytes])
            .await
            .map_err(|e| Error::pg("polling the outbox table", e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let pos: Cursor = (r.get::<_, String>(0).parse().unwrap_or(0), r.get(1));
            let mut event = row_event(&r, 3, &self.cfg, self.payload_is_bytea);
            // Stable across repeats, unlike the clock: a repeat carries the same record
            // timestamp (and CloudEvents ce_time) as the first copy.
            let written_ms = r
                .get::<_, Option<String>>(2)
                .as_deref()
                .and_then(parse_timestamp_ms);
            if let Some(ms) = written_ms {
                event.commit_time =
                    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
                event.extra.timestamp_ms.get_or_insert(ms);
            }
            out.push((event, pos));
        }
        Ok(out)
    }

    /// Stores the cursor; called only after Kafka acknowledged everything up to `pos`.
    pub async fn store(&mut self, pos: Cursor) -> Result<()> {
        if pos <= self.cursor {
            return Ok(());
        }
        let xid = pos.0.to_string();
        self.client
            .execute(
                &format!(
                    "INSERT INTO {}.outboxd_cursor (name, xid, seq, relation) VALUES ($1, $2::text::xid8, $3, $4) \
                     ON CONFLICT (name) DO UPDATE SET xid = EXCLUDED.xid, seq = EXCLUDED.seq, relation = EXCLUDED.relation, updated_at = now()",
                    self.schema
                ),
                &[&self.name, &xid, &pos.1, &self.cfg.postgres.qualified_table()],
            )
            .await
            .map_err(|e| Error::pg("storing the polling cursor", e))?;
        self.cursor = pos;
        Ok(())
    }

    /// Whether rows exist past `after` (committed or not yet visible as safe).
    pub async fn has_unpublished(&self, after: Cursor) -> Result<bool> {
        let xid = after.0.to_string();
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE (outboxd_xid, outboxd_seq) > ($1::text::xid8, $2::int8))",
            self.cfg.postgres.qualified_table()
        );
        self.client
            .query_one(&sql, &[&xid, &after.1])
            .await
            .map(|r| r.get(0))
            .map_err(|e| Error::pg("looking for unpublished rows", e))
    }

    /// Rows past the cursor (capped at a million): `outboxd_polling_pending_events`.
    pub async fn pending(&self) -> Result<i64> {
        pending_events(&self.client, &self.cfg, self.cursor).await
    }

    /// How long ago the first row past the cursor (in cursor order) was written, in seconds.
    pub async fn oldest_pending_age(&self, after: Cursor) -> Result<Option<f64>> {
        let sql = format!(
            "SELECT extract(epoch FROM now() - outboxd_written_at)::float8 FROM {} \
              WHERE (outboxd_xid, outboxd_seq) > ($1::text::xid8, $2::int8) \
              ORDER BY outboxd_xid, outboxd_seq LIMIT 1",
            self.cfg.postgres.qualified_table()
        );
        Ok(self
            .client
            .query_opt(&sql, &[&after.0.to_string(), &after.1])
            .await
            .map_err(|e| Error::pg("reading the oldest pending row", e))?
            .map(|r| r.get(0)))
    }

    /// The transaction that holds the snapshot horizon back longest (the one whose rows, and
    /// every later one's, polling cannot read yet): a line for the warning.
    pub async fn horizon_holder(&self) -> Result<Option<String>> {
        let row = self
            .client
            .query_opt(
                "SELECT format('pid %s (%s, transaction open for %s, application %L)', pid, state, \
                        date_trunc('second', now() - xact_start), application_name) \
                   FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
                  ORDER BY age(backend_xid) DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| Error::pg("looking up the oldest transaction", e))?;
        let prepared: i64 = self
            .client
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .map_err(|e| Error::pg("counting prepared transactions", e))?
            .get(0);
        let mut parts: Vec<String> = row.map(|r| r.get(0)).into_iter().collect();
        if prepared > 0 {
            parts.push(format!(
                "{prepared} prepared (two-phase) transaction(s): pg_prepared_xacts"
            ));
        }
        Ok((!parts.is_empty()).then(|| parts.join("; ")))
    }
}
