//! `outboxd migrate` with `[cdc]`: adds the captured tables to the publication and widens
//! what it publishes to the captured operations. Never drops or narrows anything; when a
//! statement is refused (say, the role does not own a table), the error names it so a DBA
//! can run it.

use tokio_postgres::Client;

use super::Outcome;
use crate::config::{quote_ident, Config};
use crate::error::{Error, Result};

pub(super) async fn migrate(client: &Client, config: &Config) -> Result<Vec<(String, Outcome)>> {
    let cfg = &config.postgres;
    let cdc = &cfg.cdc;
    let mut items = Vec::new();
    if !cdc.enabled() {
        return Ok(items);
    }
    let publication = quote_ident(&cfg.publication);
    let run = |sql: String| async move {
        client.batch_execute(&sql).await.map_err(|e| {
            Error::setup(
                format!(
                    "`{sql}` was refused: {}",
                    e.as_db_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_string())
                ),
                format!("run it as a role that may (the table's owner, or a superuser): {sql}"),
            )
        })
    };
    let row = client
        .query_one(
            "SELECT pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&cfg.publication],
        )
        .await
        .map_err(|e| Error::pg("reading the publication's operations", e))?;
    let (update, delete, truncate, via_root): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let o = &cdc.operations;
    if (o.update && !update) || (o.delete && !delete) || (o.truncate && !truncate) {
        let mut ops = vec!["insert"];
        for (now, wanted, name) in [
            (update, o.update, "update"),
            (delete, o.delete, "delete"),
            (truncate, o.truncate, "truncate"),
        ] {
            if now || wanted {
                ops.push(name);
            }
        }
        run(format!(
            "ALTER PUBLICATION {publication} SET (publish = '{}')",
            ops.join(", ")
        ))
        .await?;
        items.push((
            format!("publication {publication} publishes {}", ops.join(", ")),
            Outcome::Created,
        ));
    }
    if !via_root {
        run(format!(
            "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
        ))
        .await?;
    }
    for table in crate::cdc::catalog::captured_tables(client, cfg).await? {
        let name = table.qualified();
        if table.published {
            items.push((
                format!("{name} in publication {publication}"),
                Outcome::Existed,
            ));
            continue;
        }
        if !table.has_key() && (update || delete || o.update || o.delete) {
            // PostgreSQL refuses UPDATE and DELETE on a table without a replica identity
            // once a publication that publishes them includes it: adding it would break the
            // service's writes.
            return Err(Error::setup(
                format!("captured table {name} has no replica identity (no primary key, REPLICA IDENTITY NOTHING or DEFAULT); in publication {publication}, which publishes updates and deletes, PostgreSQL would refuse every UPDATE and DELETE of it"),
                format!("ALTER TABLE {name} REPLICA IDENTITY FULL (or add a primary key), then run migrate again; or exclude it with cdc.exclude"),
            ));
        }
        run(format!("ALTER PUBLICATION {publication} ADD TABLE {name}")).await?;
        items.push((
            format!("{name} in publication {publication}"),
            Outcome::Created,
        ));
    }
    let progress = format!("{}.outboxd_snapshot", quote_ident(&cfg.schema));
    let existed = super::relation_exists(client, &cfg.schema, "outboxd_snapshot").await?;
    crate::cdc::snapshot::progress::Progress::new(&cfg.schema, &cfg.slot)
        .ensure(client, &cfg.schema)
        .await?;
    let outcome = if existed {
        Outcome::Existed
    } else {
        Outcome::Created
    };
    items.push((format!("snapshot progress table {progress}"), outcome));
    if let Some((schema, table)) = &cdc.snapshot.signal_table {
        // Debezium's signal table: its inserts reach the relay through the publication.
        let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let published: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                &[&cfg.publication, schema, table],
            )
            .await
            .map_err(|e| Error::pg("reading the publication's tables", e))?
            .get(0);
        if published {
            items.push((
                format!("signal table {name} in publication {publication}"),
                Outcome::Existed,
            ));
        } else {
            if !super::relation_exists(client, schema, table).await? {
                run(format!(
                    "CREATE TABLE {name} (id varchar(42) PRIMARY KEY, type varchar(32) NOT NULL, data varchar(2048) NULL)"
                ))
                .await?;
            }
            run(format!("ALTER PUBLICATION {publication} ADD TABLE {name}")).await?;
            items.push((
                format!("signal table {name} in publication {publication}"),
                Outcome::Created,
            ));
        }
    }
    Ok(items)
}
