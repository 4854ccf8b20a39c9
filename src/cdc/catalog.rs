//! What the catalog must say for table CDC to lose nothing, checked at start and with the
//! outbox's publication check every second (`source::publication`):
//!
//! * every table the `[cdc]` selection matches is in the publication — a table created
//!   later that matches a pattern, too: pgoutput never sends the rows of a table outside
//!   the publication, so nothing would arrive that could be noticed;
//! * none was dropped and recreated (a new OID): rows written before the new table joined
//!   the publication are not in the stream;
//! * no row filter and no column list that leaves a captured column out (PostgreSQL 15+);
//! * the publication publishes every operation that is captured;
//! * a table whose updates or deletes are captured has a key to name the row by (a primary
//!   key, a replica identity index, or REPLICA IDENTITY FULL). Without one PostgreSQL writes
//!   no old row — and refuses the table's UPDATE and DELETE statements outright once a
//!   publication that publishes them includes it. A table captured for inserts only
//!   (`skipped_operations` with `u` and `d`) needs no key; its events have none.
//!
//! A failed check is a setup error: at start exit 2, mid-stream the relay stops before the
//! slot passes the first row that could have been missed.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_postgres::Client;

use super::table::TableCatalog;
use super::types::TypeInfo;
use crate::config::{quote_ident, PostgresConfig};
use crate::error::{Error, Result};

/// The OIDs of the captured tables at the last check, by `schema.table`.
pub type CapturedOids = Mutex<HashMap<String, u32>>;

/// A table the selection matches, as the catalog describes it.
#[derive(Debug, Clone)]
pub struct CapturedEntry {
    pub schema: String,
    pub table: String,
    pub oid: u32,
    pub replica_identity: u8,
    pub has_primary_key: bool,
    pub has_identity_index: bool,
    pub published: bool,
    /// Has a column whose values can be stored out of line (TOASTed).
    pub toastable: bool,
}

impl CapturedEntry {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    /// Whether its changes can name their row.
    pub fn has_key(&self) -> bool {
        match self.replica_identity {
            b'f' => true,
            b'd' => self.has_primary_key,
            b'i' => self.has_identity_index,
            _ => false,
        }
    }
}

/// Every ordinary or partitioned table (not a partition) the selection captures; outboxd's
/// own tables (the outbox, the dead-letter table) are never captured.
pub async fn captured_tables(client: &Client, cfg: &PostgresConfig) -> Result<Vec<CapturedEntry>> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.oid, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident), \
                    EXISTS (SELECT 1 FROM pg_publication_tables t \
                             WHERE t.pubname = $1 AND t.schemaname = n.nspname AND t.tablename = c.relname), \
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
                             AND NOT a.attisdropped AND a.attstorage IN ('x', 'e')) \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                AND n.nspname NOT LIKE 'pg\\_toast%'",
            &[&cfg.publication],
        )
        .await
        .map_err(|e| Error::pg("listing the tables captured by [cdc]", e))?;
    Ok(rows
        .iter()
        .map(|r| CapturedEntry {
            schema: r.get(0),
            table: r.get(1),
            oid: r.get(2),
            replica_identity: r.get::<_, String>(3).bytes().next().unwrap_or(b'd'),
            has_primary_key: r.get(4),
            has_identity_index: r.get(5),
            published: r.get(6),
            toastable: r.get(7),
        })
        .filter(|e| cfg.captures(&e.schema, &e.table))
        .collect())
}

/// The checks of the module doc. `known` holds the OIDs of the previous check (empty at
/// start) and is updated.
pub async fn verify(client: &Client, cfg: &PostgresConfig, known: &CapturedOids) -> Result<()> {
    let cdc = &cfg.cdc;
    if !cdc.enabled() {
        return Ok(());
    }
    let publication = quote_ident(&cfg.publication);
    let tables = captured_tables(client, cfg).await?;
    for literal in cdc.tables.iter().filter(|g| g.is_literal()) {
        if !tables
            .iter()
            .any(|t| literal.matches(&format!("{}.{}", t.schema, t.table)))
            && !cdc.exclude.iter().any(|x| x.matches(literal.as_str()))
        {
            tracing::warn!(table = literal.as_str(), "cdc.tables names a table that does not exist (yet); its changes are captured once it exists and is in the publication");
        }
    }
    let ops = client
        .query_opt(
            "SELECT pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(|e| Error::pg("reading the publication's operations", e))?;
    if let Some(row) = ops {
        let (update, delete, truncate): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
        let o = &cdc.operations;
        if (o.update && !update) || (o.delete && !delete) || (o.truncate && !truncate) {
            let mut want = vec!["insert", "update", "delete"];
            if o.truncate {
                want.push("truncate");
            }
            return Err(Error::setup(
                format!("publication {publication} does not publish every operation [cdc] captures (update {update}, delete {delete}, truncate {truncate}): those changes are never in the replication stream"),
                format!("ALTER PUBLICATION {publication} SET (publish = '{}'), or list them in cdc.skipped_operations", want.join(", ")),
            ));
        }
    }
    let lock = || match known.lock() {
        Ok(k) => k,
        Err(poisoned) => poisoned.into_inner(),
    };
    let previous = lock().clone();
    let mut seen = HashMap::new();
    for t in &tables {
        let name = format!("{}.{}", t.schema, t.table);
        let qualified = t.qualified();
        if let Some(&before) = previous.get(&name) {
            if before != t.oid {
                return Err(Error::setup(
                    format!("captured table {qualified} was dropped and recreated (OID {before} became {}); rows written to the new table before it joined publication {publication} are not in the replication stream", t.oid),
                    format!("make sure {publication} publishes the new table (ALTER PUBLICATION {publication} ADD TABLE {qualified})"),
                ));
            }
        }
        if !t.published {
            return Err(Error::setup(
                format!("captured table {qualified} (cdc.tables) is not in publication {publication}, so its changes are not in the replication stream"),
                format!("ALTER PUBLICATION {publication} ADD TABLE {qualified} (or run `outboxd migrate`), or exclude it with cdc.exclude"),
            ));
        }
        let writes = cdc.operations.update || cdc.operations.delete;
        if writes && !t.has_key() {
            return Err(Error::setup(
                format!("captured table {qualified} has no key for its updates and deletes (no primary key, REPLICA IDENTITY {}): PostgreSQL writes no old row, so those events could not name their row", identity_name(t.replica_identity)),
                format!("ALTER TABLE {qualified} REPLICA IDENTITY FULL (or add a primary key); or capture its inserts only (u and d in cdc.skipped_operations)"),
            ));
        }
        if previous.is_empty() && t.toastable && t.replica_identity != b'f' {
            tracing::warn!(table = %qualified, "captured table has columns PostgreSQL may store out of line (TOAST) and REPLICA IDENTITY is not FULL: an UPDATE that leaves such a value unchanged does not write it, so its change event carries cdc.unavailable_value_placeholder (or leaves it out with cdc.toast = \"omit\"); ALTER TABLE … REPLICA IDENTITY FULL to have every value");
        }
        seen.insert(name, t.oid);
    }
    published_whole(client, cfg, &tables).await?;
    *lock() = seen;
    Ok(())
}

fn identity_name(ident: u8) -> &'static str {
    match ident {
        b'n' => "NOTHING",
        b'f' => "FULL",
        b'i' => "USING INDEX",
        _ => "DEFAULT",
    }
}

/// PostgreSQL 15+: no row filter, no column list without a captured column.
async fn published_whole(
    client: &Client,
    cfg: &PostgresConfig,
    tables: &[CapturedEntry],
) -> Result<()> {
    let rows = client
        .query(
            "SELECT t.schemaname::text, t.tablename::text, t.rowfilter, t.attnames::text[], \
                    ARRAY(SELECT a.attname::text FROM pg_attribute a \
                           WHERE a.attrelid = format('%I.%I', t.schemaname, t.tablename)::regclass \
                             AND a.attnum > 0 AND NOT a.attisdropped) \
               FROM pg_publication_tables t \
              WHERE current_setting('server_version_num')::int >= 150000 AND t.pubname = $1",
            &[&cfg.publication],
        )
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) => {
            return Ok(())
        }
        Err(e) => return Err(Error::pg("checking the publication's row filters", e)),
    };
    let publication = quote_ident(&cfg.publication);
    for row in rows {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let Some(entry) = tables
            .iter()
            .find(|t| t.schema == schema && t.table == table)
        else {
            continue;
        };
        let qualified = entry.qualified();
        if let Some(filter) = row.get::<_, Option<String>>(2) {
            return Err(Error::setup(
                format!("publication {publication} publishes only the rows of captured table {qualified} matching the row filter `{filter}`: changes of the others are never in the replication stream"),
                format!("ALTER PUBLICATION {publication} SET TABLE {qualified} (no WHERE clause) — SET replaces the whole table list, so list every table"),
            ));
        }
        let listed: Vec<String> = row.get::<_, Option<Vec<String>>>(3).unwrap_or_default();
        let existing: Vec<String> = row.get(4);
        if let Some(missing) = existing.iter().find(|c| {
            !listed.is_empty() && !listed.contains(c) && cfg.cdc.includes_column(&schema, &table, c)
        }) {
            return Err(Error::setup(
                format!("publication {publication} publishes a column list of captured table {qualified} without column `{missing}`: its change events would lack it"),
                format!("publish all of {qualified}'s columns, and leave columns out with cdc.column_exclude instead"),
            ));
        }
    }
    Ok(())
}

/// The key columns and the types of relation `oid` (a Relation message's id is the table's
/// OID), for [`super::table::CapturedTable::new`].
pub async fn describe(client: &Client, oid: u32, type_oids: &[u32]) -> Result<TableCatalog> {
    let row = client
        .query_one(
            "SELECT current_database()::text, \
                    ARRAY(SELECT a.attname::text FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, n), pg_attribute a \
                           WHERE i.indrelid = $1 AND i.indisprimary AND a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n), \
                    ARRAY(SELECT a.attname::text FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, n), pg_attribute a \
                           WHERE i.indrelid = $1 AND i.indisreplident AND a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n), \
                    ARRAY(SELECT a.attname::text FROM pg_attribute a \
                           WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull)",
            &[&oid],
        )
        .await
        .map_err(|e| Error::pg("reading a captured table's key", e))?;
    let db: String = row.get(0);
    let primary: Vec<String> = row.get(1);
    let identity: Vec<String> = row.get(2);
    let not_null: Vec<String> = row.get(3);
    let mut types = HashMap::new();
    let mut wanted: Vec<u32> = type_oids.to_vec();
    // Domains name their base type, arrays their element: follow them (a few rounds).
    for _ in 0..4 {
        wanted.retain(|o| !types.contains_key(o));
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            break;
        }
        let rows = client
            .query(
                "SELECT t.oid, t.typname::text, t.typtype::text, t.typbasetype, t.typtypmod, \
                        CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END, \
                        ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) \
                   FROM pg_type t WHERE t.oid = ANY($1)",
                &[&wanted],
            )
            .await
            .map_err(|e| Error::pg("reading a captured table's column types", e))?;
        let mut next = Vec::new();
        for r in rows {
            let info = TypeInfo {
                oid: r.get(0),
                name: r.get(1),
                kind: r.get::<_, String>(2).bytes().next().unwrap_or(b'b'),
                base: r.get(3),
                base_typmod: r.get(4),
                element: r.get(5),
                labels: r.get(6),
            };
            next.extend([info.base, info.element].into_iter().filter(|&o| o != 0));
            types.insert(info.oid, info);
        }
        wanted = next;
    }
    Ok(TableCatalog {
        db,
        key_columns: if primary.is_empty() {
            identity
        } else {
            primary
        },
        types,
        not_null,
    })
}
