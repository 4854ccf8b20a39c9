//! One error type for the library. Its kind decides, in one place, whether retrying can help:
//! transient errors (network, broker down, a slot briefly in use) are retried with capped
//! backoff; permanent ones (bad credentials, missing privileges, `wal_level` not logical, a
//! missing slot) stop the daemon with a message that names the fix (exit code 2).

use tokio_postgres::error::SqlState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    /// A PostgreSQL error with what we were doing when it happened.
    #[error("{context}: {}", describe_pg(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
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
            source,
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
            Error::Postgres { source, .. } => match source.code() {
                // No SQLSTATE: I/O error, connection closed, timeout.
                None => true,
                Some(code) => pg_code_is_transient(code.code()),
            },
            Error::Replication { sqlstate, .. } => {
                sqlstate.as_deref().is_none_or(pg_code_is_transient)
            }
        }
    }

    /// "replication slot … is active for PID n".
    pub fn is_slot_in_use(&self) -> bool {
        self.sqlstate() == Some("55006")
    }

    fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Postgres { source, .. } => source.code().map(SqlState::code),
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
        } else {
            return None;
        })
    }
}

/// Transient SQLSTATEs: connection problems (08), insufficient resources (53), operator
/// intervention such as a restart (57P01–57P03), serialization/deadlock (40), object in use
/// (55006: the slot is held by another session), lock not available (55P03), system errors (58).
fn pg_code_is_transient(c: &str) -> bool {
    c.starts_with("08")
        || c.starts_with("53")
        || c.starts_with("40")
        || c.starts_with("58")
        || matches!(c, "57P01" | "57P02" | "57P03" | "55006" | "55P03" | "57014")
}
