//! Logical-replication source: checks the slot, holds the leadership lock, writes the
//! heartbeat; [`super::decode`] turns the pgoutput stream into events.
//!
//! ## Streaming, not the SQL decoding functions
//!
//! Two ways exist to read a slot with tokio-postgres: the SQL functions
//! (`pg_logical_slot_peek_binary_changes` + `pg_replication_slot_advance`) on an ordinary
//! connection, or the streaming replication protocol, which tokio-postgres does not speak.
//! The first version used the SQL functions and was measured (BENCHMARKS.md): every peek
//! re-decodes WAL from the slot's `restart_lsn`, which on PostgreSQL 15 advances only at
//! `xl_running_xacts` records (logged every 15 s), so under a steady 10,000 events/s each peek
//! re-read tens of MB and commit→consumed latency was p50 62 ms / p99 154 ms. The streaming
//! protocol ([`super::walsender`]) decodes each record once: p50 21 ms / p99 37 ms at the same
//! load, and a backlog drains faster. The SQL connection stays for preflight checks, the
//! leadership lock and the heartbeat.
//!
//! ## Positions
//!
//! The slot is confirmed (standby status update) only to
//! * the end LSN of a commit whose events were all acknowledged, or
//! * the position of a server keepalive received *outside* a transaction — everything before
//!   it was already streamed to us, so it is safe once those events are acknowledged, or
//! * the LSN of a non-transactional logical message (the fallback heartbeat below).
//!
//! PostgreSQL ≥ 15 does not send empty transactions, so on a database that writes only to
//! other tables nothing arrives but keepalives; confirming them keeps the slot from retaining
//! WAL. As a fallback, when nothing was confirmed for `postgres.heartbeat_interval_ms` and
//! the WAL moved, the relay writes `pg_logical_emit_message(false, 'outboxd.heartbeat', '')`
//! and confirms its position when it arrives. (Confirming `pg_current_wal_flush_lsn()`
//! instead would be unsafe: the flush pointer can sit inside a commit record, and logical
//! decoding skips a transaction whose commit record starts before the confirmed position.)
//!
//! ## Slot in use
//!
//! Starting replication on a slot held by another session fails with SQLSTATE 55006
//! ("replication slot … is active for PID n"). That is transient: the relay logs it and
//! retries with backoff (a crashed holder's walsender exits once its connection times out).
//! Two outboxd instances never stream the same slot at once: each takes a session advisory
//! lock derived from the slot name first, and only the holder reads; the others wait as
//! standby.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{PostgresConfig, StaleHolder};
use crate::error::{Error, Result};
use crate::health::{Health, Role};
use crate::source::pgoutput;
use crate::source::publication::Published;

/// Prefix of the relay's heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "outboxd.heartbeat";

/// The session that holds the leadership lock: the replication connection in logical mode
/// (see `source::replication_conn`), the SQL connection in polling mode.
pub enum LockSession<'a> {
    /// The SQL session, and how long its answer may take (`postgres.stream_timeout_ms`).
    Sql(&'a Client, Duration),
    Replication(&'a mut crate::source::replication_conn::ReplicationConn),
}

impl LockSession<'_> {
    async fn try_lock(&mut self, name: &str) -> Result<bool> {
        match self {
            LockSession::Sql(client, limit) => {
                let query = async {
                    client
                        .query_one(
                            "SELECT pg_try_advisory_lock(hashtextextended('outboxd.slot.' || $1, 0))",
                            &[&name],
                        )
                        .await
                        .map(|r| r.get(0))
                        .map_err(|e| Error::pg("taking the leadership advisory lock", e))
                };
                crate::pg::within(*limit, "taking the leadership advisory lock", query).await
            }
            LockSession::Replication(conn) => conn.try_lock(name).await,
        }
    }
}

/// Waits until `session` holds the advisory lock derived from `name` (the slot, or the
/// polling cursor): one publishing instance per slot. A standby says once that it waits, and
/// that it took over. Returns `false` if `stop` fired.
pub async fn acquire_leadership(
    mut session: LockSession<'_>,
    name: &str,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    health: &Health,
) -> Result<bool> {
    let mut announced = false;
    loop {
        if session.try_lock(name).await? {
            if announced {
                tracing::info!(slot = %name, "took over: this instance now publishes");
            }
            return Ok(true);
        }
        health.set_role(Role::Standby);
        if !announced {
            tracing::info!(slot = %name, "another outboxd instance holds this slot's lock; waiting as standby");
            announced = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return Ok(false),
        }
    }
}

/// Whether `synchronous_standby_names` can pick outboxd's walsender
/// (`application_name = outboxd-replication`) as a synchronous standby: then every commit on
/// the database waits until outboxd confirmed it — that is, until Kafka acknowledged it. A
/// Kafka outage would stop the application's writes. Returns the warning, if any.
pub async fn sync_replication_risk(client: &Client) -> Result<Option<String>> {
    let names: String = client
        .query_one("SELECT current_setting('synchronous_standby_names')", &[])
        .await
        .map_err(|e| Error::pg("reading synchronous_standby_names", e))?
        .get(0);
    Ok(selects_outboxd(&names).then(|| {
        format!(
            "synchronous_standby_names = '{names}' can select outboxd's walsender (application_name {}): every commit would wait for Kafka; list your standbys by name instead",
            crate::source::walsender::APPLICATION_NAME
        )
    }))
}

/// Whether a `synchronous_standby_names` value names `*` or outboxd's application name.
fn selects_outboxd(names: &str) -> bool {
    let lower = names.to_ascii_lowercase();
    !lower.trim().is_empty()
        && (lower.contains('*') || lower.contains(crate::source::walsender::APPLICATION_NAME))
}

/// The slot as seen in `pg_replication_slots`.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: u64,
    pub active_pid: Option<i32>,
    pub wal_status: Option<String>,
}

/// A connection that reads and advances the slot.
pub struct SlotReader {
    client: Client,
    cfg: PostgresConfig,
    confirmed: u64,
    /// The captured tables' OIDs at the last check (`crate::cdc::catalog`).
    captured: crate::cdc::catalog::CapturedOids,
}

impl SlotReader {
    /// Connects and checks everything the relay needs, so that a misconfiguration is reported
    /// once, clearly, instead of as an obscure error in the middle of the stream.
    pub async fn open(cfg: &PostgresConfig) -> Result<SlotReader> {
        let client = crate::pg::connect(&cfg.url, "outboxd").await?;
        let wal_level: String = client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .map_err(|e| Error::pg("reading wal_level", e))?
            .get(0);
        if wal_level != "logical" {
            return Err(Error::setup(
                format!("PostgreSQL runs with wal_level = {wal_level}, logical replication needs `logical`"),
                "set wal_level = logical in postgresql.conf and restart PostgreSQL",
            ));
        }
        let encoding: String = client
            .query_one("SELECT current_setting('server_encoding')", &[])
            .await
            .map_err(|e| Error::pg("reading server_encoding", e))?
            .get(0);
        if encoding != "UTF8" {
            return Err(Error::setup(
                format!("database encoding is {encoding}; outboxd needs UTF8"),
                "use a UTF8 database for the outbox",
            ));
        }
        let can_replicate: bool = client
            .query_one(
                "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(|e| Error::pg("reading the role's attributes", e))?
            .get(0);
        if !can_replicate {
            return Err(Error::setup(
                "the PostgreSQL role has neither REPLICATION nor SUPERUSER, so it cannot read a replication slot",
                "ALTER ROLE <user> REPLICATION (the role also needs SELECT on the outbox table)",
            ));
        }
        if let Some(warning) = sync_replication_risk(&client).await? {
            tracing::warn!("{warning}");
        }
        // The publication and the table in it: checked again by the leader every second.
        let captured = crate::cdc::catalog::CapturedOids::default();
        crate::source::publication::verify(&client, cfg, None, &captured).await?;
        let mut reader = SlotReader {
            client,
            cfg: cfg.clone(),
            confirmed: 0,
            captured,
        };
        let state = reader.state().await?;
        reader.confirmed = state.confirmed_flush;
        Ok(reader)
    }

    /// Reads the slot's row; a missing slot, a slot of another plugin or database is a
    /// setup error.
    pub async fn state(&self) -> Result<SlotState> {
        let limit = self.cfg.stream_timeout;
        crate::pg::within(limit, "looking up the replication slot", self.read_state()).await
    }

    async fn read_state(&self) -> Result<SlotState> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin::text, slot_type, database::text = current_database()::text, \
                        confirmed_flush_lsn::text, active_pid, wal_status \
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await
            .map_err(|e| Error::pg("looking up the replication slot", e))?;
        let Some(row) = row else {
            return Err(Error::setup(
                format!("replication slot `{}` does not exist", self.cfg.slot),
                "run `outboxd migrate` with the same configuration",
            ));
        };
        let plugin: Option<String> = row.get(0);
        let slot_type: String = row.get(1);
        let same_db: Option<bool> = row.get(2);
        if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
            return Err(Error::setup(
                format!(
                    "replication slot `{}` is a {slot_type} slot with plugin {}, not a pgoutput logical slot",
                    self.cfg.slot,
                    plugin.as_deref().unwrap_or("none")
                ),
                "configure postgres.slot to a slot outboxd owns, or let `outboxd migrate` create one",
            ));
        }
        if same_db != Some(true) {
            return Err(Error::setup(
                format!(
                    "replication slot `{}` belongs to another database",
                    self.cfg.slot
                ),
                "connect to the slot's database, or configure another postgres.slot",
            ));
        }
        let confirmed: Option<String> = row.get(3);
        Ok(SlotState {
            confirmed_flush: confirmed
                .as_deref()
                .and_then(pgoutput::parse_lsn)
                .unwrap_or(0),
            active_pid: row.get(4),
            wal_status: row.get(5),
        })
    }

    /// Run by the leader before streaming: an invalidated slot (`wal_status = lost`) stops the
    /// relay with the fix, or — only with `postgres.recreate_lost_slot = true` — is dropped and
    /// recreated with a loud warning.
    /// Returns whether the slot was recreated.
    pub async fn ensure_slot_usable(&mut self) -> Result<bool> {
        let state = self.state().await?;
        if state.wal_status.as_deref() != Some("lost") {
            return Ok(false);
        }
        let slot = &self.cfg.slot;
        if !self.cfg.recreate_lost_slot {
            return Err(Error::setup(
                format!("replication slot `{slot}` is invalidated (wal_status = lost): PostgreSQL removed WAL it still needed, so events may have been skipped"),
                "set postgres.recreate_lost_slot = true (or drop the slot and run `outboxd migrate`), then check consumers for events committed meanwhile; raise max_slot_wal_keep_size",
            ));
        }
        tracing::warn!(slot = %slot, "replication slot is invalidated (wal_status = lost); recreating it because postgres.recreate_lost_slot = true. Events committed while it was lost may have been skipped: check consumers for gaps");
        self.client
            .execute("SELECT pg_drop_replication_slot($1::text::name)", &[slot])
            .await
            .map_err(|e| Error::pg("dropping the invalidated slot", e))?;
        self.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1::text::name, 'pgoutput')",
                &[slot],
            )
            .await
            .map_err(|e| Error::pg("recreating the slot", e))?;
        self.confirmed = self.state().await?.confirmed_flush;
        Ok(true)
    }

    /// The slot is active for `pid` although this instance holds the leadership lock. With
    /// `stale_slot_holder = terminate`, an outboxd replication connection is terminated (it
    /// belongs to an instance that lost its lock session, e.g. after a crash or a network
    /// split). Returns whether it was terminated.
    pub async fn resolve_stale_holder(&self) -> Result<bool> {
        let state = self.state().await?;
        let Some(pid) = state.active_pid else {
            return Ok(false);
        };
        let app: Option<String> = self
            .client
            .query_opt(
                "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .map_err(|e| Error::pg("looking up the slot's holder", e))?
            .and_then(|r| r.get(0));
        let is_outboxd = app.as_deref() == Some(crate::source::walsender::APPLICATION_NAME);
        if self.cfg.stale_slot_holder == StaleHolder::Terminate && is_outboxd {
            tracing::warn!(slot = %self.cfg.slot, pid, "slot held by a stale outboxd connection while this instance holds the lock; terminating it (postgres.stale_slot_holder = terminate)");
            let done: bool = self
                .client
                .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(|e| Error::pg("terminating the stale slot holder", e))?
                .get(0);
            return Ok(done);
        }
        tracing::warn!(slot = %self.cfg.slot, pid, application_name = app.as_deref().unwrap_or("?"), "slot is held by another session; waiting for it to end (postgres.stale_slot_holder = wait, or the holder is not outboxd)");
        Ok(false)
    }

    /// Re-reads the slot's confirmed position (after waiting for leadership: the previous
    /// leader moved it meanwhile).
    pub async fn refresh_confirmed(&mut self) -> Result<()> {
        self.confirmed = self.state().await?.confirmed_flush;
        Ok(())
    }

    /// Checks that the outbox table (the same one, if `table_oid` is given) is still
    /// published; see [`crate::source::publication`].
    pub async fn verify_publication(&self, table_oid: Option<u32>) -> Result<Published> {
        let check =
            crate::source::publication::verify(&self.client, &self.cfg, table_oid, &self.captured);
        crate::pg::within(self.cfg.stream_timeout, "checking the publication", check).await
    }

    /// A captured table's key columns and column types (`crate::cdc::catalog::describe`).
    pub async fn describe_captured(
        &self,
        oid: u32,
        types: &[u32],
    ) -> Result<crate::cdc::table::TableCatalog> {
        let query = crate::cdc::catalog::describe(&self.client, oid, types);
        crate::pg::within(
            self.cfg.stream_timeout,
            "describing a captured table",
            query,
        )
        .await
    }

    /// Whether relation `oid` is a partition of the outbox table `table_oid`.
    pub async fn is_outbox_partition(&self, oid: u32, table_oid: u32) -> Result<bool> {
        let check = crate::source::publication::is_partition_of(&self.client, oid, table_oid);
        crate::pg::within(self.cfg.stream_timeout, "looking up a relation", check).await
    }

    /// Exactly-once: the pipeline's default identity and the current WAL position
    /// (`crate::pg::pipeline_identity`).
    pub async fn pipeline_identity(&self) -> Result<(String, u64)> {
        let query = crate::pg::pipeline_identity(&self.client, &self.cfg.slot);
        crate::pg::within(
            self.cfg.stream_timeout,
            "reading the system identifier",
            query,
        )
        .await
    }

    /// The slot's confirmed position when this reader opened it.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// The SQL connection (the dead-letter table is written through it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Writes a heartbeat message if WAL was written since `confirmed`.
    pub async fn heartbeat_if_wal_moved(&self, confirmed: u64) -> Result<bool> {
        let limit = self.cfg.stream_timeout;
        crate::pg::within(limit, "writing a heartbeat", self.heartbeat(confirmed)).await
    }

    async fn heartbeat(&self, confirmed: u64) -> Result<bool> {
        let current: String = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(|e| Error::pg("reading the current WAL position", e))?
            .get(0);
        let current = pgoutput::parse_lsn(&current).unwrap_or(0);
        if current <= confirmed {
            return Ok(false);
        }
        self.client
            .execute(
                "SELECT pg_logical_emit_message(false, $1::text, ''::text)",
                &[&HEARTBEAT_PREFIX],
            )
            .await
            .map_err(|e| Error::pg("writing a heartbeat message", e))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn synchronous_standby_lists_that_can_pick_outboxd_are_recognised() {
        for risky in [
            "*",
            "ANY 1 (*)",
            "FIRST 1 (replica1, \"outboxd-replication\")",
            "outboxd-replication",
        ] {
            assert!(super::selects_outboxd(risky), "{risky}");
        }
        for safe in ["", "replica1", "FIRST 2 (replica1, replica2)"] {
            assert!(!super::selects_outboxd(safe), "{safe}");
        }
    }
}
