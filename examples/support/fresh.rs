//! A fresh database on the local stack for one benchmark run (shared by the benchmark
//! examples): created under a unique name, with a directory for its config and logs.

use std::path::PathBuf;

use anyhow::Context;
use tokio_postgres::NoTls;

pub struct Fresh {
    /// The database's name (also the slot's and the topic prefix's).
    pub db: String,
    pub url: String,
    /// PostgreSQL's port (for Debezium's `database.port`).
    #[allow(dead_code)]
    pub port: String,
    pub dir: PathBuf,
}

/// `<prefix>_<unix seconds>` on `OUTBOXD_TEST_PG_URL` (set by `scripts/bench.sh`).
pub async fn database(prefix: &str) -> anyhow::Result<Fresh> {
    let admin_url = std::env::var("OUTBOXD_TEST_PG_URL")
        .context("OUTBOXD_TEST_PG_URL not set; use scripts/bench.sh")?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let db = format!("{prefix}_{stamp}");
    let (admin, conn) = tokio_postgres::connect(&admin_url, NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let url = format!("{}/{db}", admin_url.rsplit_once('/').context("url")?.0);
    let port = admin_url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .context("port")?
        .to_string();
    let dir = std::env::temp_dir().join(&db);
    std::fs::create_dir_all(&dir)?;
    Ok(Fresh { db, url, port, dir })
}

impl Fresh {
    /// A connection to the database (its driver task spawned).
    #[allow(dead_code)]
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }
}
