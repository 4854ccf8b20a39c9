//! PostgreSQL connections for SQL (tokio-postgres), with TLS ([`tls`]).

pub mod tls;

use std::time::Duration;

use postgres_openssl::MakeTlsConnector;
use tokio_postgres::Client;

use crate::error::{Error, Result};

/// `postgres.url` parsed: what tokio-postgres takes, and the TLS settings it does not know.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: tls::TlsSettings,
    /// Why the server's certificate was refused, once a handshake failed on it.
    pub refusal: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target> {
        let (rest, tls) = tls::split_url(url)
            .map_err(|e| Error::setup(format!("postgres.url: {e}"), "correct postgres.url"))?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| Error::pg("parsing postgres.url", e))?;
        config.ssl_mode(tls.tokio_mode());
        Ok(Target {
            config,
            tls,
            refusal: Default::default(),
        })
    }

    /// The OpenSSL connector of these settings.
    pub fn make_tls_connector(&self) -> Result<openssl::ssl::SslConnector> {
        self.tls.connector().map_err(|e| {
            Error::setup(
                format!("TLS to PostgreSQL: {e}"),
                "correct the ssl parameters of postgres.url",
            )
        })
    }

    /// The connector tokio-postgres uses; hostname checks only for `verify-full`. Why a
    /// certificate was refused ("self-signed certificate", "hostname mismatch") is kept in
    /// [`Target::refusal`] for the error line.
    pub fn make_tls(&self) -> Result<MakeTlsConnector> {
        let mut make = MakeTlsConnector::new(self.make_tls_connector()?);
        let full = self.tls.mode == tls::SslMode::VerifyFull;
        let mode = if self.tls.verifies_chain() {
            openssl::ssl::SslVerifyMode::PEER
        } else {
            openssl::ssl::SslVerifyMode::NONE
        };
        let refusal = self.refusal.clone();
        make.set_callback(move |c, _| {
            c.set_verify_hostname(full);
            let refusal = refusal.clone();
            c.set_verify_callback(mode, move |ok, ctx| {
                if !ok {
                    if let Ok(mut r) = refusal.lock() {
                        r.get_or_insert_with(|| ctx.error().error_string().to_string());
                    }
                }
                ok
            });
            Ok(())
        });
        Ok(make)
    }

    /// How long one connection attempt (TCP, TLS, authentication) may take: twice the connect
    /// timeout (`connect_timeout` in `postgres.url`, 10 s by default).
    pub fn attempt_bound(c: &tokio_postgres::Config) -> Duration {
        c.get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10))
            * 2
    }

    /// `user@host:port/dbname` without the password.
    pub fn describe(&self) -> String {
        describe_target(&self.config)
    }
}

/// A connection error, classified: a TLS handshake that failed on the certificate, or a
/// server that refuses TLS when the mode requires it, cannot be fixed by retrying (exit 2).
pub fn connect_error(target: &Target, e: tokio_postgres::Error) -> Error {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(cause) = src {
        text.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    if let Some(reason) = target.refusal.lock().ok().and_then(|r| r.clone()) {
        text = format!("certificate verify failed ({reason})");
    }
    let described = target.describe();
    tls_problem(&text, &target.tls, &described)
        .unwrap_or_else(|| Error::pg(format!("connecting to PostgreSQL at {described}"), e))
}

/// A permanent TLS problem described by `text` (connecting to `target`), if it is one.
pub fn tls_problem(text: &str, tls: &tls::TlsSettings, target: &str) -> Option<Error> {
    let (problem, fix): (&str, String) = if text.contains("certificate verify failed") {
        (
            "the server's certificate was not accepted",
            format!(
                "check that sslrootcert is the CA that signed the server's certificate{}",
                if tls.mode == tls::SslMode::VerifyFull {
                    " and that the host in postgres.url is a name in it (sslmode=verify-full)"
                } else {
                    ""
                }
            ),
        )
    } else if text.contains("server does not support TLS") {
        (
            "the server does not accept TLS",
            format!(
                "enable ssl on the server, or connect with a lower sslmode than {}",
                tls.mode
            ),
        )
    } else {
        return None;
    };
    // "certificate verify failed (self-signed certificate in certificate chain)" → the part
    // in parentheses; OpenSSL's error stack is left out.
    let detail = text
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(d, _)| format!(" ({d})"))
        .unwrap_or_default();
    Some(Error::setup(
        format!(
            "TLS to PostgreSQL at {target} (sslmode={}): {problem}{detail}",
            tls.mode
        ),
        fix,
    ))
}

/// `f`, or a transient error if PostgreSQL does not answer within `limit`: a session behind a
/// dead network path must not hold the relay (or its leadership) forever.
///
/// A deadline seen more than [`PAUSED`] after it passed means the relay itself did not run
/// meanwhile — its process stopped (SIGSTOP, a frozen VM or container, a starved CPU) — and
/// PostgreSQL's answer may be waiting in the socket, read by a task that has not run yet. It
/// is awaited once more, for `limit`, instead of the session being torn down and PostgreSQL
/// blamed for the relay's own pause. Bounded: at most twice `limit` of the relay's running
/// time, so a dead path still ends the session.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let started = tokio::time::Instant::now();
    let mut f = std::pin::pin!(f);
    match tokio::time::timeout(limit, &mut f).await {
        Ok(r) => return r,
        Err(_) => {
            let late = started.elapsed().saturating_sub(limit);
            if late > PAUSED {
                tracing::warn!(what, late_ms = late.as_millis() as u64, "the relay did not run for a while (a stopped process, a frozen VM, a starved CPU); waiting once more for PostgreSQL's answer");
                if let Ok(r) = tokio::time::timeout(limit, f).await {
                    return r;
                }
            }
        }
    }
    Err(Error::Timeout(format!(
        "{what}: PostgreSQL did not answer within {} s (postgres.stream_timeout_ms)",
        limit.as_secs()
    )))
}

/// How late a deadline must be seen to say the relay, not PostgreSQL, stopped.
const PAUSED: Duration = Duration::from_secs(1);

/// Connects, spawning the connection task. `application_name` shows in `pg_stat_activity`.
pub async fn connect(url: &str, application_name: &str) -> Result<Client> {
    let target = Target::parse(url)?;
    let make = target.make_tls()?;
    let mut config = target.config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    // A dead peer ends the session in about half a minute on both sides, not the kernels'
    // two hours: client-side keepalives and user timeout, and the same asked of the server
    // for its end of the session (a leadership lock in polling mode lives on it).
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    let server_side = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 \
                       -c tcp_keepalives_count=3 -c tcp_user_timeout=30000";
    let options = match config.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {server_side}"),
        _ => server_side.to_string(),
    };
    config.options(&options);
    // The whole attempt is bounded, not only the TCP connect (`connect_timeout`): on a path
    // that accepts the connection and then moves no byte, TLS and authentication would wait
    // for ever, without a line in the log.
    let bound = attempt_bound(&config);
    let (client, connection) = match tokio::time::timeout(bound, config.connect(make)).await {
        Ok(connected) => connected.map_err(|e| connect_error(&target, e))?,
        Err(_) => {
            return Err(Error::Timeout(format!(
                "connecting to PostgreSQL at {}: no answer within {} s (TCP connected, no handshake: a silent network path?)",
                target.describe(),
                bound.as_secs()
            )))
        }
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// How long one connection attempt (TCP, TLS, authentication) may take: twice the connect
/// timeout (`connect_timeout` in `postgres.url`, 10 s by default).
pub fn attempt_bound(c: &tokio_postgres::Config) -> Duration {
    c.get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10))
        * 2
}

/// `user@host:port/dbname` without the password.
fn describe_target(c: &tokio_postgres::Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{}:{}/{}",
        c.get_user().unwrap_or("?"),
        host,
        port,
        c.get_dbname().unwrap_or("?")
    )
}

/// Exactly-once: the default identity of a pipeline (its `transactional.id` and position
/// key): `outboxd-<system identifier>-<database>-<name>`, the same for every instance
/// relaying this database's `name` (slot or table), different for any other cluster. Also
/// returns the current WAL position, to check a position read back against.
pub async fn pipeline_identity(client: &Client, name: &str) -> Result<(String, u64)> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
             current_database()::text, pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .map_err(|e| Error::pg("reading the system identifier", e))?;
    let (sysid, db, lsn): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    let lsn = crate::lsn::parse_lsn(&lsn).unwrap_or(0);
    Ok((format!("outboxd-{sysid}-{db}-{name}"), lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay's own process stopped (SIGSTOP, a frozen VM, a starved CPU) while it waited
    /// on PostgreSQL: its deadline passes while nothing of it runs. The answer, which may be
    /// waiting in the socket, is awaited once more instead of the session being torn down
    /// with "PostgreSQL did not answer" — PostgreSQL was not the one that stopped.
    #[tokio::test(flavor = "current_thread")]
    async fn a_deadline_passed_while_the_relay_itself_was_paused_is_not_blamed_on_postgresql() {
        let limit = Duration::from_millis(100);
        // The answer comes from another task (as tokio-postgres's connection task reads it
        // from the socket), run after the pause only when the deadline was already seen.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // Nothing of the runtime runs for 1.2 s, as if the process were stopped.
            std::thread::sleep(Duration::from_millis(1200));
            tokio::task::yield_now().await;
            let _ = tx.send(7);
        });
        let answer = async { rx.await.map_err(|_| Error::Timeout("sender gone".into())) };
        assert_eq!(within(limit, "reading", answer).await.ok(), Some(7));
    }

    /// A dead path still ends at the deadline: nothing is waited for twice when the relay ran.
    #[tokio::test(flavor = "current_thread")]
    async fn postgresql_silent_past_the_deadline_is_a_timeout() {
        let limit = Duration::from_millis(100);
        let started = std::time::Instant::now();
        let never = std::future::pending::<Result<()>>();
        assert!(matches!(
            within(limit, "reading", never).await,
            Err(Error::Timeout(_))
        ));
        assert!(started.elapsed() < Duration::from_millis(1000));
    }
}
