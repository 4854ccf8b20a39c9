//! One error type for the library. Its kind decides, in one place, whether retrying can help:
//! transient errors (network, broker down, a slot briefly in use) are retried with capped
//! backoff; permanent ones (bad credentials, missing privileges, `wal_level` not logical, a
//! missing slot) stop the daemon with a message that names the fix (exit code 2).

use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    /// A PostgreSQL error with what we were doing when it happened. Its message already
    /// carries the server's message, detail and hint on one line, so the driver's error is
    /// not a `source` (its text spans lines and would repeat them).
    #[error("{context}: {}", describe_pg(.pg))]
    Postgres {
        context: String,
        pg: tokio_postgres::Error,
    },

    /// An error on the replication connection (which tokio-postgres does not handle).
    #[error("{context}: {message}{}", .sqlstate.as_ref().map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default())]
    Replication {
        context: String,
        /// None for I/O errors.
        sqlstate: Option<String>,
        message: String,
    },

    /// The database is not set up the way the relay needs; retrying will not help.
    #[error("{problem}; fix: {fix}")]
    Setup { problem: String, fix: String },

    #[error("kafka: {0}")]
    Kafka(String),

    /// Publishing to the sink failed for a reason about the broker or the connection (any
    /// sink; the message names it): transient, resent from the confirmed position.
    #[error("{0}")]
    Publish(String),

    /// A delivery failed with an error that may be about the record or about the cluster
    /// (`sink::classify`): retried; the relay counts identical failures of the same record.
    #[error("publishing: {message}")]
    Delivery {
        event_id: Option<String>,
        /// librdkafka's error code name.
        code: String,
        message: String,
        /// Other records were acknowledged in the same session: the cluster accepts records,
        /// so a repeat of this failure is about this record.
        others_acked: bool,
    },

    /// Records were refused for a reason about a record, while in a batch: the next session
    /// sends each alone to learn which is the one (`crate::lessons`).
    #[error("publishing: {message}")]
    Suspect {
        event_ids: Vec<String>,
        message: String,
    },

    /// Exactly-once: another instance with our `transactional.id` initialised its producer
    /// after us; this one must stop publishing and leave leadership (transient: it may lead
    /// again later, with a fresh producer).
    #[error("kafka: fenced: {0}")]
    Fenced(String),

    /// Exactly-once: Kafka refused this record alone, inside a transaction that must now be
    /// aborted; the next session dead-letters it in its place (`crate::window`).
    #[error("kafka refused event {event_id} ({}: {}); its transaction is aborted and the next one dead-letters it", poison.kind.label(), poison.detail)]
    Refused {
        event_id: String,
        poison: crate::poison::Poison,
    },

    /// PostgreSQL did not answer in time (a dead network path): transient.
    #[error("{0}")]
    Timeout(String),

    /// Stopping did not complete: acknowledged work was not confirmed (exit code 1).
    #[error("{0}")]
    Shutdown(String),

    /// The relay was about to break its own promise (`crate::ledger`): a bug, never retried
    /// (exit code 3).
    #[error("{0}")]
    Invariant(String),

    /// A pgoutput message we could not decode: a bug or an incompatible server.
    #[error("decoding the replication stream: {0}")]
    Decode(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// PostgreSQL's message plus its detail and hint, on one line.
fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            // Include the cause (e.g. "Connection refused") which Display alone omits.
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                s.push_str(&format!(": {cause}"));
                src = cause.source();
            }
            s
        }
    }
}

impl Error {
    pub fn pg(context: impl Into<String>, source: tokio_postgres::Error) -> Error {
        Error::Postgres {
            context: context.into(),
            pg: source,
        }
    }

    pub fn setup(problem: impl Into<String>, fix: impl Into<String>) -> Error {
        Error::Setup {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Whether retrying the same operation later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Config(_) | Error::Setup { .. } | Error::Decode(_) | Error::Invariant(_) => {
                false
            }
            Error::Kafka(_)
            | Error::Publish(_)
            | Error::Delivery { .. }
            | Error::Suspect { .. }
            | Error::Shutdown(_)
            | Error::Fenced(_)
            | Error::Refused { .. }
            | Error::Timeout(_) => true,
            Error::Postgres { pg, .. } => match pg.code() {
                // No SQLSTATE: I/O error, connection closed, timeout.
                None => true,
                Some(code) => pg_code_is_transient(code.code()),
            },
            Error::Replication { sqlstate, .. } => {
                sqlstate.as_deref().is_none_or(pg_code_is_transient)
            }
        }
    }

    /// The server answered with an SQLSTATE (it is reachable).
    pub fn has_sqlstate(&self) -> bool {
        self.sqlstate().is_some()
    }

    /// "replication slot … is active for PID n".
    pub fn is_slot_in_use(&self) -> bool {
        self.sqlstate() == Some("55006")
    }

    fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Postgres { pg, .. } => pg.code().map(SqlState::code),
            Error::Replication { sqlstate, .. } => sqlstate.as_deref(),
            _ => None,
        }
    }

    /// For permanent PostgreSQL errors, the fix an operator should apply.
    pub fn fix(&self) -> Option<&'static str> {
        let code = self.sqlstate()?;
        Some(if code.starts_with("28") {
            "check the user and password in postgres.url (OUTBOXD_POSTGRES_URL) and pg_hba.conf (host … replication lines do not apply: outboxd connects to the database)"
        } else if code == SqlState::INVALID_CATALOG_NAME.code() {
            "create the database or correct the database name in postgres.url"
        } else if code == SqlState::INSUFFICIENT_PRIVILEGE.code() {
            "grant the role REPLICATION (ALTER ROLE … REPLICATION) and SELECT on the outbox table, or use a role that has them"
        } else if code == SqlState::UNDEFINED_OBJECT.code()
            || code == SqlState::UNDEFINED_TABLE.code()
        {
            "run `outboxd migrate` with the same configuration"
        } else if code == SqlState::CONFIGURATION_LIMIT_EXCEEDED.code() {
            "free a replication slot or WAL sender (SELECT slot_name, active FROM pg_replication_slots; pg_drop_replication_slot('…') for one nobody uses) or raise max_replication_slots / max_wal_senders and restart PostgreSQL"
        } else if code == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE.code() {
            "set wal_level = logical (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL, or use mode = \"polling\""
        } else if code == SqlState::READ_ONLY_SQL_TRANSACTION.code() {
            "point postgres.url at the primary: this server is a read-only standby"
        } else {
            return None;
        })
    }
}

/// Whether waiting can mend a PostgreSQL error, decided class by class (everything else is
/// an operator's to fix: exit code 2 with the fix):
///
/// * retried — connection problems (08); insufficient resources that pass (53100 disk full,
///   53200 out of memory, 53300 too many connections); serialization and deadlocks (40);
///   an administrator's restart or a server starting up (57P01–57P03), a cancelled query
///   (57014); an object in use (55006: the slot is held by another session) or a lock not
///   available (55P03); system errors (58); a read-only standby (25006: after a failover the
///   address may point at the new primary soon);
/// * not retried — 53400 configuration limit exceeded ("all replication slots are in use",
///   `max_wal_senders`): no amount of waiting frees a slot someone else holds for good; and
///   every other class: authentication (28), privileges (42501), missing objects (3D000,
///   42P01, 42704), a server not set up for logical decoding (55000), syntax and features
///   (42, 0A).
fn pg_code_is_transient(c: &str) -> bool {
    c.starts_with("08")
        || c.starts_with("40")
        || c.starts_with("58")
        || matches!(
            c,
            "53100"
                | "53200"
                | "53300"
                | "57P01"
                | "57P02"
                | "57P03"
                | "55006"
                | "55P03"
                | "57014"
                | "25006"
        )
}
