//! The outbox table must stay in the publication, or events vanish without an error.
//!
//! pgoutput sends a table's rows only while the table is in the publication *as of the WAL
//! position being decoded*. Three ordinary operations break that silently:
//!
//! * **A partitioned outbox** (say, one partition a month, so old events are retired by
//!   dropping a partition): without `publish_via_partition_root = true`, pgoutput reports each
//!   row under its leaf partition's name. `outboxd migrate` creates the publication with that
//!   option, and the relay refuses a publication that lacks it for a partitioned table.
//! * **A table dropped and recreated** by a schema migration: the new table is not in the
//!   publication, so its rows are not decoded at all; nothing arrives that could be noticed.
//! * **A table removed from the publication**, or the publication altered not to publish
//!   inserts.
//! * **A row filter or a column list** (PostgreSQL 15+: `SET TABLE outbox WHERE (…)` or
//!   `SET TABLE outbox (id, …)`): pgoutput drops the filtered inserts, or the columns left
//!   out (an event published without its headers or timestamp). The check refuses both,
//!   naming the filter or the missing column.
//!
//! So the relay checks at start and then every second ([`verify`]) that the table it started
//! with (same OID) is still published with inserts, and remembers the WAL insert position read
//! *before* each successful check. The checkpoint never confirms a position beyond the
//! position of the check *before* the last successful one (a second of lag: a DDL committed
//! just below a position may not be visible to the check that read it) ([`crate::checkpoint::Checkpoint::limited`]): if the check fails, the slot
//! has not passed the first event that could have been missed, and the relay stops with exit
//! code 2 and the way to recover (fix the publication, `outboxd replay --since …` for rows
//! written in between, restart).
//!
//! Limit: a table removed from the publication and added back between two checks (within a
//! second) is not detected; rows written in that window are not relayed.

use std::time::SystemTime;

use tokio_postgres::Client;

use crate::config::{quote_ident, PostgresConfig};
use crate::error::{Error, Result};
use crate::source::pgoutput::{format_lsn, parse_lsn};

/// A successful check: the table, and a WAL position up to which it was published.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// WAL insert position read before the catalog was checked.
    pub lsn: u64,
    /// The outbox table's OID; a different OID means the table was dropped and recreated.
    pub table_oid: u32,
    /// When the check ran.
    pub at: SystemTime,
    /// The next transaction id when the position was read: a transaction with a commit
    /// record below the position has a lower one.
    pub next_xid: u64,
    /// The oldest transaction waiting for a synchronous standby then (committed locally,
    /// invisible to every snapshot), if any.
    pub oldest_waiter: Option<u64>,
}

/// Checks that the outbox table (with OID `expected_oid`, if given) is in the publication and
/// that the publication publishes its inserts under the table's own name.
/// With `[cdc]`, the captured tables are checked too (`crate::cdc::catalog::verify`), after
/// the same WAL position was read; `captured` keeps their OIDs between checks.
pub async fn verify(
    client: &Client,
    cfg: &PostgresConfig,
    expected_oid: Option<u32>,
    captured: &crate::cdc::catalog::CapturedOids,
) -> Result<Published> {
    let at = SystemTime::now();
    // Read the position first, then the catalog. A change whose commit record is below the
    // position is *not* always visible yet (its backend leaves the ProcArray after writing the
    // commit record and after any synchronous-replication wait), so the relay confirms up to
    // a check's position only once a later check passed too (`relay::logical`).
    // In the same statement: the next transaction id (every transaction that could have a
    // commit record below the position has a lower one), and the oldest transaction that
    // committed locally but waits for a synchronous standby — it still runs to every
    // snapshot, so a DDL among such waiters is invisible to the catalog query below. (Seen
    // in pg_stat_activity by a superuser or a member of pg_read_all_stats / pg_monitor; for
    // other roles the column reads NULL and the second-long margin of `relay::logical` is
    // the only guard.) Its xid, 32-bit there, is placed on the 64-bit counter by its age.
    let row = client
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, \
                    pg_snapshot_xmax(pg_current_snapshot())::text::int8, \
                    (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8 - max(age(backend_xid)) \
                       FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND backend_xid IS NOT NULL)",
            &[],
        )
        .await
        .map_err(|e| Error::pg("reading the current WAL position", e))?;
    let lsn: String = row.get(0);
    let next_xid = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
    let oldest_waiter = row
        .get::<_, Option<i64>>(2)
        .map(|x| u64::try_from(x).unwrap_or(0));
    let lsn = parse_lsn(&lsn).unwrap_or(0);
    if !cfg.outbox {
        // A table-CDC-only pipeline: no outbox table to check, only the captured tables.
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&cfg.publication],
            )
            .await
            .map_err(|e| Error::pg("looking up the publication", e))?
            .is_some();
        if !exists {
            return Err(Error::setup(
                format!(
                    "publication {} does not exist",
                    quote_ident(&cfg.publication)
                ),
                "run `outboxd migrate` with the same configuration",
            ));
        }
        crate::cdc::catalog::verify(client, cfg, captured).await?;
        return Ok(Published {
            lsn,
            table_oid: 0,
            at,
            next_xid,
            oldest_waiter,
        });
    }
    let row = client
        .query_opt(
            "SELECT (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE n.nspname = $2 AND c.relname = $3 AND c.relkind IN ('r', 'p')), \
                    (SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                      WHERE n.nspname = $2 AND c.relname = $3), \
                    p.pubinsert, p.pubviaroot, \
                    EXISTS (SELECT 1 FROM pg_publication_tables t \
                             WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
               FROM pg_publication p WHERE p.pubname = $1",
            &[&cfg.publication, &cfg.schema, &cfg.table],
        )
        .await
        .map_err(|e| Error::pg("checking that the outbox table is in the publication", e))?;
    let table = cfg.qualified_table();
    let publication = quote_ident(&cfg.publication);
    let Some(row) = row else {
        return Err(Error::setup(
            format!("publication {publication} does not exist"),
            "run `outboxd migrate` with the same configuration",
        ));
    };
    let oid: Option<u32> = row.get(0);
    let relkind: Option<String> = row.get(1);
    let inserts: bool = row.get(2);
    let via_root: bool = row.get(3);
    let listed: bool = row.get(4);
    let Some(oid) = oid else {
        return Err(Error::setup(
            format!("outbox table {table} does not exist"),
            "create it (`outboxd migrate`) or correct postgres.table",
        ));
    };
    if let Some(expected) = expected_oid {
        if oid != expected {
            return Err(Error::setup(
                format!("outbox table {table} was dropped and recreated (OID {expected} became {oid}); rows written to the new table before it joined publication {publication} are not in the replication stream"),
                format!("make sure {publication} publishes the new table (ALTER PUBLICATION {publication} ADD TABLE {table})"),
            ));
        }
    }
    let partitioned = relkind.as_deref() == Some("p");
    if partitioned && !via_root {
        return Err(Error::setup(
            format!("outbox table {table} is partitioned but publication {publication} publishes its rows under each partition's name"),
            format!("ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"),
        ));
    }
    if !listed {
        return Err(Error::setup(
            format!("outbox table {table} is not in publication {publication}, so its rows are not in the replication stream"),
            format!("ALTER PUBLICATION {publication} ADD TABLE {table}"),
        ));
    }
    if !inserts {
        return Err(Error::setup(
            format!("publication {publication} does not publish inserts"),
            format!("ALTER PUBLICATION {publication} SET (publish = 'insert')"),
        ));
    }
    published_whole(client, cfg, &publication, &table).await?;
    crate::cdc::catalog::verify(client, cfg, captured).await?;
    Ok(Published {
        lsn,
        table_oid: oid,
        at,
        next_xid,
        oldest_waiter,
    })
}

/// PostgreSQL 15+: the publication carries every row of the outbox (no row filter) and every
/// column the relay maps (no column list that leaves one out).
async fn published_whole(
    client: &Client,
    cfg: &PostgresConfig,
    publication: &str,
    table: &str,
) -> Result<()> {
    let row = client
        .query_opt(
            "SELECT t.rowfilter, t.attnames::text[],                     ARRAY(SELECT a.attname::text FROM pg_attribute a                            WHERE a.attrelid = format('%I.%I', $2::text, $3::text)::regclass                              AND a.attnum > 0 AND NOT a.attisdropped)                FROM pg_publication_tables t               WHERE current_setting('server_version_num')::int >= 150000                 AND t.pubname = $1 AND t.schemaname = $2 AND t.tablename = $3",
            &[&cfg.publication, &cfg.schema, &cfg.table],
        )
        .await;
    let row = match row {
        Ok(row) => row,
        // PostgreSQL before 15 has neither column (nor row filters and column lists).
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
            return Ok(())
        }
        Err(e) => {
            return Err(Error::pg(
                "checking the publication's row filter and columns",
                e,
            ))
        }
    };
    let Some(row) = row else { return Ok(()) };
    let filter: Option<String> = row.get(0);
    let published: Vec<String> = row.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
    let existing: Vec<String> = row.get(2);
    if let Some(filter) = filter {
        return Err(Error::setup(
            format!("publication {publication} publishes only the rows of {table} matching the row filter `{filter}`: the others are never in the replication stream"),
            format!("ALTER PUBLICATION {publication} SET TABLE {table} (no WHERE clause)"),
        ));
    }
    let c = &cfg.columns;
    let mapped = [
        &c.id,
        &c.aggregatetype,
        &c.aggregateid,
        &c.event_type,
        &c.payload,
        &c.headers,
        &c.timestamp,
        &c.topic,
        &c.partition,
    ]
    .into_iter()
    .chain(&c.header_columns);
    for column in mapped {
        if !column.is_empty() && existing.contains(column) && !published.contains(column) {
            return Err(Error::setup(
                format!("publication {publication} publishes a column list of {table} without column `{column}`: events would be published without it"),
                format!("ALTER PUBLICATION {publication} SET TABLE {table} (all columns, no column list)"),
            ));
        }
    }
    Ok(())
}

impl Published {
    /// Whether this check vouches for `earlier`'s position: no transaction that existed when
    /// `earlier` read it still waits for a standby now (its commit, possibly below that
    /// position, would still be invisible). Waiters younger than that are irrelevant: their
    /// commit records are above it — so ordinary synchronous replication, whose waits last
    /// milliseconds, never holds the limit back for more than a check.
    pub fn vouches_for(&self, earlier: &Published) -> bool {
        // `age()` counts from the latest completed xid, at most the running transactions
        // below the next one: the margin keeps the estimate on the safe side.
        const MARGIN: u64 = 1_000;
        self.oldest_waiter
            .is_none_or(|w| w >= earlier.next_xid.saturating_add(MARGIN))
    }
}

/// The error a failed check mid-stream becomes: what happened, since when events may be
/// missing, and how to recover them.
pub fn lost_publication(problem: Error, last_good: &Published) -> Error {
    let ms = last_good
        .at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let since = crate::event::rfc3339_ms(ms);
    let (problem, fix) = match problem {
        Error::Setup { problem, fix } => (problem, fix),
        other => return other,
    };
    Error::setup(
        format!(
            "{problem}. Events written to it after {since} may not have been relayed; the slot is confirmed no further than {} (the last position at which the table was verified)",
            format_lsn(last_good.lsn)
        ),
        format!("{fix}; then republish what was written since with `outboxd replay --since '{since}'` (repeats keep their id) and restart outboxd"),
    )
}

/// Whether relation `oid` is a partition (at any depth) of the table `root_oid`. A relation
/// that no longer exists is not.
pub async fn is_partition_of(client: &Client, oid: u32, root_oid: u32) -> Result<bool> {
    let root: Option<u32> = client
        .query_one("SELECT pg_partition_root($1::oid)::oid", &[&oid])
        .await
        .map_err(|e| Error::pg("looking up a relation's partition root", e))?
        .get(0);
    Ok(root == Some(root_oid) && oid != root_oid)
}

#[cfg(test)]
mod tests {
    use super::Published;

    fn check(next_xid: u64, oldest_waiter: Option<u64>) -> Published {
        Published {
            lsn: 0,
            table_oid: 1,
            at: std::time::SystemTime::UNIX_EPOCH,
            next_xid,
            oldest_waiter,
        }
    }

    #[test]
    fn only_a_transaction_older_than_the_earlier_check_still_waiting_holds_the_limit() {
        let earlier = check(10_000, None);
        assert!(check(12_000, None).vouches_for(&earlier));
        // Ordinary synchronous replication: a commit that began after the earlier check.
        assert!(check(12_000, Some(11_500)).vouches_for(&earlier));
        // A transaction that existed at the earlier check and waits still (an invisible DDL).
        assert!(!check(12_000, Some(9_990)).vouches_for(&earlier));
    }
}
