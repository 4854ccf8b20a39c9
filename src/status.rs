//! `outboxd status`: one screen (or `--json`) about the relay and its slot, read from
//! PostgreSQL and, when one runs at `http.addr`, from the local instance's `/status`.
//!
//! Exit codes: 0 healthy, 1 degraded (slot lag over `postgres.max_slot_lag_bytes`,
//! `wal_status` unreserved or lost, slot missing, no leader), 2 cannot connect to PostgreSQL.

use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::health::SlotFacts;

#[derive(Debug, Serialize)]
pub struct Leader {
    pub pid: i32,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub since: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub mode: &'static str,
    /// `kafka`, `rabbitmq` or `nats`.
    pub sink: &'static str,
    /// `at-least-once` or `exactly-once` (with the position topic).
    pub delivery: String,
    /// `[schemas]`: what is checked and how events are written (`None`: nothing is).
    pub schemas: Option<String>,
    pub slot: SlotFacts,
    pub slot_exists: bool,
    pub max_slot_lag_bytes: u64,
    pub leader: Option<Leader>,
    /// From the local instance, when it answers.
    pub instance: Option<serde_json::Value>,
    pub instance_addr: String,
    /// Polling mode: the stored cursor `xid/seq` and rows past it.
    pub cursor: Option<String>,
    pub pending_events: Option<i64>,
    /// `[cdc]`: the tables the selection captures now (`schema.table`).
    pub captured: Vec<String>,
    /// `[cdc]`: every table's last snapshot (`crate::cdc::snapshot::progress`).
    pub snapshots: Vec<SnapshotLine>,
    /// Worth knowing, not degraded (exit code unchanged): e.g. a captured table whose large
    /// values an UPDATE may leave out of the WAL.
    pub warnings: Vec<String>,
    pub problems: Vec<String>,
}

/// A table's snapshot, as `status` shows it.
#[derive(Debug, Serialize)]
pub struct SnapshotLine {
    pub table: String,
    pub state: String,
    pub rows_done: i64,
    pub rows_estimated: Option<i64>,
    /// Rows acknowledged per second since the snapshot began (or resumed counting).
    pub rows_per_second: f64,
    pub eta_seconds: Option<u64>,
    pub signal: String,
    pub filter: Option<String>,
    pub error: Option<String>,
}

impl SnapshotLine {
    fn from_job(j: crate::cdc::snapshot::progress::Job) -> SnapshotLine {
        let rate = if j.elapsed > 0.0 {
            j.rows_done as f64 / j.elapsed
        } else {
            0.0
        };
        let running = j.state == crate::cdc::snapshot::progress::RUNNING;
        let eta = j
            .rows_estimated
            .filter(|_| running && rate > 0.0)
            .map(|n| ((n - j.rows_done).max(0) as f64 / rate) as u64);
        SnapshotLine {
            table: j.name(),
            state: j.state,
            rows_done: j.rows_done,
            rows_estimated: j.rows_estimated,
            rows_per_second: rate.round(),
            eta_seconds: eta,
            signal: j.signal_id,
            filter: j.filter,
            error: j.error,
        }
    }
}

impl Status {
    pub fn exit_code(&self) -> u8 {
        if self.problems.is_empty() {
            0
        } else {
            1
        }
    }
}

pub async fn gather(cfg: &Config) -> Result<Status> {
    let client = tokio::time::timeout(
        Duration::from_secs(10),
        crate::pg::connect(&cfg.postgres.url, "outboxd-status"),
    )
    .await
    .map_err(|_| {
        Error::setup(
            "PostgreSQL did not answer within 10 s",
            "check postgres.url and the network",
        )
    })??;
    let slot = crate::monitor::slot_facts(&client, &cfg.postgres.slot)
        .await
        .map_err(|e| Error::pg("reading pg_replication_slots", e))?;
    let slot_exists = slot.confirmed_lsn.is_some() || slot.wal_status.is_some();
    let leader = client
        .query_opt(
            "WITH k AS (SELECT hashtextextended('outboxd.slot.' || $1, 0) AS key) \
             SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start::text \
               FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid, k \
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                AND l.classid::text::bigint = (k.key >> 32) & 4294967295 \
                AND l.objid::text::bigint = k.key & 4294967295",
            &[&cfg.postgres.slot],
        )
        .await
        .map_err(|e| Error::pg("looking up the leader", e))?
        .map(|r| Leader {
            pid: r.get(0),
            application_name: r.get(1),
            client_addr: r.get(2),
            since: r.get(3),
        });
    let instance_addr = local_addr(cfg);
    let instance = fetch_instance_status(&instance_addr).await;

    let mut problems = Vec::new();
    if let Some(warning) = crate::source::logical::sync_replication_risk(&client).await? {
        problems.push(warning);
    }
    let (mut cursor, mut pending_events) = (None, None);
    if cfg.mode == crate::config::Mode::Polling {
        let (xid, seq) = crate::source::polling::read_cursor(&client, cfg).await?;
        let pending = crate::source::polling::pending_events(&client, cfg, (xid, seq)).await?;
        cursor = Some(format!("{xid}/{seq}"));
        pending_events = Some(pending);
        if leader.is_none() {
            problems
                .push("no outboxd instance holds the cursor's lock: nothing is publishing".into());
        }
    } else if !slot_exists {
        problems.push(format!(
            "replication slot `{}` does not exist (run `outboxd migrate`)",
            cfg.postgres.slot
        ));
    }
    if let Some(lag) = slot.lag_bytes {
        if lag > 0 && lag as u64 > cfg.postgres.max_slot_lag_bytes {
            problems.push(format!(
                "slot lag {} exceeds postgres.max_slot_lag_bytes ({})",
                bytes(lag),
                bytes(cfg.postgres.max_slot_lag_bytes as i64)
            ));
        }
    }
    match slot.wal_status.as_deref() {
        Some("lost") => problems.push("slot is invalidated (wal_status = lost)".into()),
        Some("unreserved") => {
            problems.push("slot is about to lose WAL it needs (wal_status = unreserved)".into())
        }
        _ => {}
    }
    if slot_exists && leader.is_none() {
        problems.push("no outboxd instance holds the slot's lock: nothing is publishing".into());
    }
    let (mut captured, mut warnings, mut snapshots) = (Vec::new(), Vec::new(), Vec::new());
    if cfg.postgres.cdc.enabled() {
        let ops = &cfg.postgres.cdc.operations;
        for t in crate::cdc::catalog::captured_tables(&client, &cfg.postgres).await? {
            let name = t.qualified();
            if !t.published {
                problems.push(format!("captured table {name} is not in the publication"));
            }
            if (ops.update || ops.delete) && !t.has_key() {
                problems.push(format!("captured table {name} has no key for its updates and deletes (ALTER TABLE {name} REPLICA IDENTITY FULL)"));
            }
            if t.toastable && t.replica_identity != b'f' {
                warnings.push(format!("captured table {name}: unchanged TOASTed values arrive as the placeholder (REPLICA IDENTITY FULL to have them)"));
            }
            captured.push(format!("{}.{}", t.schema, t.table));
        }
        let progress =
            crate::cdc::snapshot::progress::Progress::new(&cfg.postgres.schema, &cfg.postgres.slot);
        // Absent until the relay (or migrate) created it.
        if let Ok(jobs) = progress.all(&client).await {
            for j in jobs {
                if j.state == crate::cdc::snapshot::progress::FAILED {
                    problems.push(format!(
                        "the snapshot of {} failed: {}",
                        j.name(),
                        j.error.as_deref().unwrap_or("see the relay's log")
                    ));
                }
                snapshots.push(SnapshotLine::from_job(j));
            }
        }
    }
    Ok(Status {
        mode: cfg.mode.as_str(),
        sink: cfg.sink.as_str(),
        delivery: match cfg.kafka.delivery {
            crate::config::Delivery::AtLeastOnce => "at-least-once".into(),
            crate::config::Delivery::ExactlyOnce => format!(
                "exactly-once (positions in topic {})",
                cfg.kafka.position_topic
            ),
        },
        schemas: schemas_line(&cfg.schemas),
        slot,
        slot_exists,
        max_slot_lag_bytes: cfg.postgres.max_slot_lag_bytes,
        leader,
        instance,
        instance_addr,
        cursor,
        pending_events,
        captured,
        snapshots,
        warnings,
        problems,
    })
}

/// `[schemas]` in one line: the files, the encoding, the registry (its password never shown).
fn schemas_line(s: &crate::config::SchemasConfig) -> Option<String> {
    if s.dir.is_none() && s.encoding == crate::config::Encoding::Json {
        return None;
    }
    let mut line = format!("encoding {}", s.encoding.label());
    if let Some(dir) = &s.dir {
        line.push_str(&format!(", files in {dir}"));
        if s.require_schema {
            line.push_str(" (required)");
        }
    }
    if let (Some(url), false) = (&s.registry_url, s.encoding == crate::config::Encoding::Json) {
        line.push_str(&format!(", registry {}", crate::config::redact_url(url)));
        if s.auto_register {
            line.push_str(" (auto-register)");
        }
    }
    Some(line)
}

fn local_addr(cfg: &Config) -> String {
    let addr = cfg.http.addr;
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

async fn fetch_instance_status(addr: &str) -> Option<serde_json::Value> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /status HTTP/1.0\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let body = text.split_once("\r\n\r\n")?.1;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()
        .flatten()
}

pub fn bytes(n: i64) -> String {
    let f = n as f64;
    if n.abs() < 1024 {
        format!("{n} B")
    } else if f.abs() < 1024.0 * 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else if f.abs() < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", f / 1024.0 / 1024.0)
    } else {
        format!("{:.1} GiB", f / 1024.0 / 1024.0 / 1024.0)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.slot;
        writeln!(f, "outboxd status")?;
        writeln!(f, "  mode:          {}", self.mode)?;
        writeln!(f, "  sink:          {}", self.sink)?;
        writeln!(f, "  delivery:      {}", self.delivery)?;
        if let Some(schemas) = &self.schemas {
            writeln!(f, "  schemas:       {schemas}")?;
        }
        if let Some(cursor) = &self.cursor {
            writeln!(f, "  cursor:        {cursor} (xid/seq)")?;
            writeln!(
                f,
                "  pending:       {} events past the cursor",
                self.pending_events.unwrap_or(0)
            )?;
        } else if self.slot_exists {
            let active = match s.active_pid {
                Some(pid) => format!("streaming to pid {pid}"),
                None => "not streaming".into(),
            };
            writeln!(f, "  slot:          {} ({active})", s.slot)?;
            writeln!(
                f,
                "  confirmed LSN: {}",
                s.confirmed_lsn.as_deref().unwrap_or("-")
            )?;
            writeln!(
                f,
                "  slot lag:      {} (threshold {})",
                s.lag_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                bytes(self.max_slot_lag_bytes as i64)
            )?;
            writeln!(
                f,
                "  wal_status:    {} (safe_wal_size {})",
                s.wal_status.as_deref().unwrap_or("-"),
                s.safe_wal_size_bytes
                    .map(bytes)
                    .unwrap_or_else(|| "unlimited".into())
            )?;
        } else {
            writeln!(f, "  slot:          {} (missing)", s.slot)?;
        }
        match &self.leader {
            Some(l) => writeln!(
                f,
                "  leader:        pid {} {} from {} since {}",
                l.pid,
                l.application_name.as_deref().unwrap_or(""),
                l.client_addr.as_deref().unwrap_or("local socket"),
                l.since.as_deref().unwrap_or("?")
            )?,
            None => writeln!(f, "  leader:        none")?,
        }
        match &self.instance {
            Some(i) => {
                let lag = i.get("lag_seconds").and_then(|v| v.as_f64()).unwrap_or(0.0);
                let role = i.get("role").and_then(|v| v.as_str()).unwrap_or("?");
                writeln!(f, "  local instance ({}): {role}", self.instance_addr)?;
                writeln!(f, "  oldest unacknowledged event: {lag:.1} s old")?;
                let err = i
                    .get("last_error")
                    .and_then(|v| v.as_str())
                    .unwrap_or("none");
                writeln!(f, "  last error:    {err}")?;
            }
            None => {
                writeln!(
                    f,
                    "  local instance ({}): not answering",
                    self.instance_addr
                )?;
                writeln!(f, "  oldest unacknowledged event: unknown")?;
                writeln!(f, "  last error:    unknown")?;
            }
        }
        if !self.captured.is_empty() {
            writeln!(
                f,
                "  captured:      {} tables ({})",
                self.captured.len(),
                self.captured.join(", ")
            )?;
        }
        for s in &self.snapshots {
            let of = s
                .rows_estimated
                .map_or(String::new(), |n| format!(" of ~{n}"));
            let eta = s
                .eta_seconds
                .map_or(String::new(), |e| format!(", ETA {e} s"));
            let filter = s
                .filter
                .as_deref()
                .map_or(String::new(), |w| format!(", where {w}"));
            writeln!(
                f,
                "  snapshot:      {} {}: {} rows{of} acknowledged, {} rows/s{eta}{filter}",
                s.table, s.state, s.rows_done, s.rows_per_second
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning:       {w}")?;
        }
        if self.problems.is_empty() {
            write!(f, "  health:        healthy")
        } else {
            write!(f, "  health:        DEGRADED: {}", self.problems.join("; "))
        }
    }
}
