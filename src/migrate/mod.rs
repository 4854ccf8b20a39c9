//! `outboxd migrate`: creates what the relay needs, idempotently. Never drops anything, and
//! alters only the publication, to add what `[cdc]` captures (`cdc.rs`); reports what it
//! created and what was already there.

mod cdc;
mod polling;

use crate::config::{quote_ident, quote_literal, Config, Mode};
use crate::error::{Error, Result};

/// The outbox table, Debezium-compatible. `{table}` is replaced by the quoted name.
/// Kept identical to `sql/outbox.sql` (a unit test checks it).
pub const OUTBOX_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS {table} (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb,
    headers       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
)";

/// Where poison events go when the dead-letter topic refuses them too. `{schema}` is replaced
/// by the quoted schema. Kept identical to `sql/outbox.sql`.
pub const DEAD_LETTER_DDL: &str = "CREATE TABLE IF NOT EXISTS {schema}.outboxd_dead_letter (
    seq              bigserial   PRIMARY KEY,
    event_id         text,
    topic            text        NOT NULL,
    key              text,
    payload          bytea,
    headers          jsonb,
    reason           text        NOT NULL,
    error            text,
    dead_lettered_at timestamptz NOT NULL DEFAULT now()
)";

/// The redrive log (`outboxd dead-letters redrive`): one row per dead letter redriven. `{schema}` is the quoted schema. Kept
/// identical to `sql/outbox.sql`.
pub const REDRIVEN_DDL: &str = "CREATE TABLE IF NOT EXISTS {schema}.outboxd_redriven (
    source      text        NOT NULL,
    position    text        NOT NULL,
    event_id    text,
    topic       text        NOT NULL,
    redriven_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, position)
)";

/// Table-less events: writes the event as a transactional logical decoding message, which
/// outboxd relays exactly like a row. Kept identical to `sql/outbox.sql`.
pub const OUTBOX_EMIT_DDL: &str = "CREATE OR REPLACE FUNCTION {schema}.outbox_emit(
    aggregatetype text, aggregateid text, type text, payload jsonb, headers jsonb DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    event_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(true, 'outbox', json_build_object(
        'id', event_id, 'aggregatetype', aggregatetype, 'aggregateid', aggregateid,
        'type', type, 'payload', payload, 'headers', headers)::text);
    RETURN event_id;
END
$fn$";

/// Whether a table, index or other relation `schema.name` exists.
pub(crate) async fn relation_exists(
    client: &tokio_postgres::Client,
    schema: &str,
    name: &str,
) -> Result<bool> {
    catalog_has(
        client,
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
        schema,
        name,
    )
    .await
}

/// Whether a function `schema.name` exists.
async fn function_exists(
    client: &tokio_postgres::Client,
    schema: &str,
    name: &str,
) -> Result<bool> {
    catalog_has(
        client,
        "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1 AND p.proname = $2",
        schema,
        name,
    )
    .await
}

async fn catalog_has(
    client: &tokio_postgres::Client,
    sql: &str,
    schema: &str,
    name: &str,
) -> Result<bool> {
    client
        .query_opt(sql, &[&schema, &name])
        .await
        .map(|r| r.is_some())
        .map_err(|e| Error::pg(format!("looking up {schema}.{name}"), e))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Existed,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub items: Vec<(String, Outcome)>,
}

pub async fn migrate(config: &Config) -> Result<Report> {
    let cfg = &config.postgres;
    let client = crate::pg::connect(&cfg.url, "outboxd-migrate").await?;
    let pg = |what: &'static str| move |e| Error::pg(what, e);
    let mut items = Vec::new();

    let wal_level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(pg("reading wal_level"))?
        .get(0);
    if wal_level != "logical" && config.mode == Mode::Logical {
        return Err(Error::setup(
            format!("PostgreSQL runs with wal_level = {wal_level}; a logical replication slot needs `logical`"),
            "set wal_level = logical in postgresql.conf and restart PostgreSQL, or use mode = \"polling\"",
        ));
    }

    let schema_exists = client
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&cfg.schema],
        )
        .await
        .map_err(pg("looking up the schema"))?
        .is_some();
    if !schema_exists {
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(&cfg.schema)
            ))
            .await
            .map_err(pg("creating the schema"))?;
        items.push((
            format!("schema {}", quote_ident(&cfg.schema)),
            Outcome::Created,
        ));
    }

    let table = cfg.qualified_table();
    let table_exists = !cfg.outbox
        || client
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&cfg.schema, &cfg.table],
            )
            .await
            .map_err(pg("looking up the outbox table"))?
            .is_some();
    if !cfg.outbox {
        // A table-CDC-only pipeline (postgres.outbox = false): no outbox table.
    } else if table_exists {
        items.push((format!("table {table}"), Outcome::Existed));
    } else {
        client
            .batch_execute(&OUTBOX_TABLE_DDL.replace("{table}", &table))
            .await
            .map_err(pg("creating the outbox table"))?;
        items.push((format!("table {table}"), Outcome::Created));
    }

    let schema_q = quote_ident(&cfg.schema);
    for (kind, name, ddl, label) in [
        (
            "r",
            "outboxd_dead_letter",
            DEAD_LETTER_DDL,
            "dead-letter table",
        ),
        ("r", "outboxd_redriven", REDRIVEN_DDL, "redrive log"),
        ("f", "outbox_emit", OUTBOX_EMIT_DDL, "function"),
    ] {
        let what = format!("{label} {schema_q}.{}", quote_ident(name));
        let found = if kind == "f" {
            function_exists(&client, &cfg.schema, name).await?
        } else {
            relation_exists(&client, &cfg.schema, name).await?
        };
        if found {
            items.push((what, Outcome::Existed));
        } else {
            client
                .batch_execute(&ddl.replace("{schema}", &schema_q))
                .await
                .map_err(pg("creating outboxd's helper objects"))?;
            items.push((what, Outcome::Created));
        }
    }

    if config.mode == Mode::Polling {
        items.extend(polling::migrate(&client, config).await?);
        return Ok(Report { items });
    }

    let publication = client
        .query_opt(
            "SELECT pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t \
                     WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3) \
               FROM pg_publication p WHERE p.pubname = $1",
            &[&cfg.publication, &cfg.schema, &cfg.table],
        )
        .await
        .map_err(pg("looking up the publication"))?;
    let pub_name = quote_ident(&cfg.publication);
    match publication {
        None => {
            client
                // A partitioned outbox publishes its rows under its own name, not the
                // partition's (the decoder matches the table by name).
                .batch_execute(&if cfg.outbox {
                    format!(
                        "CREATE PUBLICATION {pub_name} FOR TABLE {table} \
                         WITH (publish = 'insert', publish_via_partition_root = true)"
                    )
                } else {
                    // Table CDC only: the captured tables are added below.
                    format!(
                        "CREATE PUBLICATION {pub_name} \
                         WITH (publish = 'insert', publish_via_partition_root = true)"
                    )
                })
                .await
                .map_err(pg("creating the publication"))?;
            items.push((format!("publication {pub_name}"), Outcome::Created));
            items.extend(cdc::migrate(&client, config).await?);
        }
        Some(row) => {
            let inserts: bool = row.get(0);
            let has_table: bool = row.get(1);
            if cfg.outbox && (!inserts || !has_table) {
                return Err(Error::setup(
                    format!("publication {pub_name} exists but does not publish inserts of {table}"),
                    format!("ALTER PUBLICATION {pub_name} ADD TABLE {table}; ALTER PUBLICATION {pub_name} SET (publish = 'insert') — or configure another postgres.publication"),
                ));
            }
            items.extend(cdc::migrate(&client, config).await?);
            // The same check the relay makes at start (partitioned table published via root).
            let captured = crate::cdc::catalog::CapturedOids::default();
            crate::source::publication::verify(&client, cfg, None, &captured).await?;
            items.push((format!("publication {pub_name}"), Outcome::Existed));
        }
    }

    let slot = client
        .query_opt(
            "SELECT plugin::text, database::text = current_database()::text \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(pg("looking up the replication slot"))?;
    match slot {
        None => {
            // PostgreSQL ≥ 17: a failover slot is synchronized to physical standbys, so the
            // relay continues from the same position after a database failover.
            let version: i32 = client
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await
                .map_err(pg("reading the server version"))?
                .get(0);
            let (sql, label) = if version >= 170_000 {
                (
                    "SELECT pg_create_logical_replication_slot($1::text::name, 'pgoutput', false, false, true)",
                    "failover ",
                )
            } else {
                (
                    "SELECT pg_create_logical_replication_slot($1::text::name, 'pgoutput')",
                    "",
                )
            };
            client
                .execute(sql, &[&cfg.slot])
                .await
                .map_err(pg("creating the replication slot"))?;
            items.push((
                format!("{label}replication slot {}", quote_literal(&cfg.slot)),
                Outcome::Created,
            ));
        }
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let same_db: Option<bool> = row.get(1);
            if plugin.as_deref() != Some("pgoutput") || same_db != Some(true) {
                return Err(Error::setup(
                    format!(
                        "replication slot {} exists but is not a pgoutput slot of this database",
                        quote_literal(&cfg.slot)
                    ),
                    "configure another postgres.slot; outboxd never drops a slot it did not create",
                ));
            }
            items.push((
                format!("replication slot {}", quote_literal(&cfg.slot)),
                Outcome::Existed,
            ));
        }
    }
    Ok(Report { items })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    #[test]
    fn shipped_sql_matches_the_ddl_migrate_runs() {
        let shipped = include_str!("../../sql/outbox.sql");
        let ddl = super::OUTBOX_TABLE_DDL.replace("{table}", "public.outbox");
        assert!(
            shipped.contains(&format!("{ddl};")),
            "sql/outbox.sql drifted from migrate.rs"
        );
        for helper in [super::DEAD_LETTER_DDL, super::REDRIVEN_DDL] {
            let ddl = helper.replace("{schema}", "public");
            assert!(
                shipped.contains(&format!("{ddl};")),
                "sql/outbox.sql drifted from {ddl}"
            );
        }
    }
}
