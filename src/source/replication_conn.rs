//! The replication connection (`replication=database`): TLS, authentication, the leadership
//! lock, then START_REPLICATION.
//!
//! ## Leadership lives on the replication connection
//!
//! Only the instance holding a session advisory lock derived from the slot streams it. The
//! lock used to be held by the relay's SQL connection; when a leader's network vanished
//! silently, PostgreSQL kept that idle session — and the lock — until its TCP keepalive gave
//! up (hours), while nobody streamed. A `replication=database` connection also runs SQL, so the
//! lock is taken on the very connection that then streams: the walsender holds it, and the
//! server ends a walsender that has not heard a status update for `wal_sender_timeout`, which
//! outboxd sets for its connection to `postgres.stream_timeout_ms` + 5 s. So a standby takes
//! over within about that time of the leader's path going dark, and the old leader — whose
//! reader hears nothing for `postgres.stream_timeout_ms` — has stopped before then. Each
//! socket also has TCP keepalives and a TCP user timeout of `postgres.stream_timeout_ms`.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{quote_ident, quote_literal, PostgresConfig};
use crate::error::{Error, Result};
use crate::source::walsender::{
    io_error, read_message, send, server_error, within, Reader, ReplicationStream, Writer,
    APPLICATION_NAME,
};

/// An authenticated `replication=database` connection, not yet streaming.
pub struct ReplicationConn {
    reader: Reader,
    writer: Writer,
    stream_timeout: Duration,
}

impl ReplicationConn {
    /// Connects (TLS as `postgres.url` says) and authenticates, within
    /// [`crate::pg::attempt_bound`]: a path that accepts the connection and then moves no
    /// byte would otherwise hold the handshake for ever, without a line in the log.
    pub async fn connect(cfg: &PostgresConfig) -> Result<ReplicationConn> {
        let target = crate::pg::Target::parse(&cfg.url)?;
        let bound = crate::pg::attempt_bound(&target.config);
        match tokio::time::timeout(bound, Self::connect_unbounded(cfg)).await {
            Ok(connected) => connected,
            Err(_) => Err(Error::Timeout(format!(
                "connecting for replication to {}: no answer within {} s (TCP connected, no handshake: a silent network path?)",
                target.describe(),
                bound.as_secs()
            ))),
        }
    }

    async fn connect_unbounded(cfg: &PostgresConfig) -> Result<ReplicationConn> {
        let stream_timeout = cfg.stream_timeout;
        let target = crate::pg::Target::parse(&cfg.url)?;
        let pgcfg = &target.config;
        let port = pgcfg.get_ports().first().copied().unwrap_or(5432);
        let timeout = pgcfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let (mut reader, mut writer): (Reader, Writer) = match pgcfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let target = path.display().to_string();
                let s = within(timeout, &target, tokio::net::UnixStream::connect(&path)).await?;
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
            }
            host => {
                let host = match host {
                    Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                    _ => "localhost".to_string(),
                };
                let address = format!("{host}:{port}");
                let connect = tokio::net::TcpStream::connect((host.as_str(), port));
                let s = within(timeout, &address, connect).await?;
                let _ = s.set_nodelay(true);
                dead_peer_detection(&s, stream_timeout);
                let described = target.describe();
                match start_tls(s, &target, &host, &described).await? {
                    Stream::Plain(s) => {
                        let (r, w) = tokio::io::split(s);
                        (Box::new(r), Box::new(w))
                    }
                    Stream::Tls(s) => {
                        let (r, w) = tokio::io::split(*s);
                        (Box::new(r), Box::new(w))
                    }
                }
            }
        };

        let user = pgcfg.get_user().unwrap_or("postgres").to_string();
        let dbname = pgcfg.get_dbname().unwrap_or(&user).to_string();
        let wal_sender_timeout = format!(
            "{}ms",
            (stream_timeout + Duration::from_secs(5)).as_millis()
        );
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", user.as_str()),
                ("database", dbname.as_str()),
                ("replication", "database"),
                ("application_name", APPLICATION_NAME),
                ("client_encoding", "UTF8"),
                // Column values arrive in text form: make timestamps and bytea predictable.
                ("TimeZone", "UTC"),
                ("DateStyle", "ISO"),
                ("bytea_output", "hex"),
                // …and the other values table CDC parses (crate::cdc::value).
                ("IntervalStyle", "postgres"),
                ("extra_float_digits", "1"),
                ("lc_monetary", "C"),
                // The server ends this walsender (and releases the leadership lock it holds)
                // when no status update arrives for this long.
                ("wal_sender_timeout", wal_sender_timeout.as_str()),
            ],
            &mut buf,
        )
        .map_err(|e| io_error("encoding startup", e))?;
        send(&mut writer, &mut buf, "sending startup").await?;
        authenticate(&mut reader, &mut writer, &user, pgcfg.get_password()).await?;

        Ok(ReplicationConn {
            reader,
            writer,
            stream_timeout,
        })
    }

    /// Runs a query that returns one row of one column; its text, or `None` for NULL.
    async fn query_one(&mut self, sql: &str, what: &str) -> Result<Option<String>> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|e| io_error(what, e))?;
        send(&mut self.writer, &mut buf, what).await?;
        let mut value = None;
        let mut error = None;
        loop {
            let (tag, body) =
                tokio::time::timeout(self.stream_timeout, read_message(&mut self.reader))
                    .await
                    .map_err(|_| io_error(what, std::io::ErrorKind::TimedOut.into()))?
                    .map_err(|e| io_error(what, e))?;
            match tag {
                b'D' => value = data_row_first(&body),
                b'E' => error = Some(server_error(what, &body)),
                b'Z' => break, // ReadyForQuery
                _ => {}        // RowDescription, CommandComplete, notices
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(value),
        }
    }

    /// Tries to take the leadership lock of `name` (the slot) on this connection.
    pub async fn try_lock(&mut self, name: &str) -> Result<bool> {
        let sql = format!(
            "SELECT pg_try_advisory_lock(hashtextextended({}, 0))",
            quote_literal(&format!("outboxd.slot.{name}"))
        );
        let got = self
            .query_one(&sql, "taking the leadership advisory lock")
            .await?;
        Ok(got.as_deref() == Some("t"))
    }

    /// START_REPLICATION from the slot's confirmed position. On an error (say, the slot is
    /// active for another session) the connection stays usable: the caller may retry.
    pub async fn start(&mut self, cfg: &PostgresConfig) -> Result<()> {
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (\"proto_version\" '1', \"publication_names\" {}, \"messages\" 'true')",
            quote_ident(&cfg.slot),
            quote_literal(&quote_ident(&cfg.publication)),
        );
        let mut buf = BytesMut::new();
        frontend::query(&command, &mut buf)
            .map_err(|e| io_error("encoding START_REPLICATION", e))?;
        send(&mut self.writer, &mut buf, "sending START_REPLICATION").await?;
        let mut error = None;
        loop {
            let (tag, body) = read_message(&mut self.reader)
                .await
                .map_err(|e| io_error("starting replication", e))?;
            match tag {
                b'W' => return Ok(()), // CopyBothResponse
                b'E' => error = Some(server_error("starting replication", &body)),
                b'Z' => {
                    return Err(error.unwrap_or_else(|| {
                        io_error(
                            "starting replication",
                            std::io::ErrorKind::InvalidData.into(),
                        )
                    }))
                }
                _ => {}
            }
        }
    }

    /// Streams (after a successful [`ReplicationConn::start`]).
    pub fn stream(
        self,
        channel_capacity: usize,
        read_ahead_bytes: usize,
        confirmed: u64,
    ) -> ReplicationStream {
        ReplicationStream::spawn(
            self.reader,
            self.writer,
            channel_capacity,
            read_ahead_bytes,
            confirmed,
            self.stream_timeout,
        )
    }
}

/// The first column of a DataRow message as text.
fn data_row_first(body: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    if len < 0 {
        return None;
    }
    let bytes = body.get(6..6 + len as usize)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

/// TCP keepalives every few seconds and a user timeout: a dead peer ends the socket in about
/// `timeout` instead of the kernel's two hours.
pub(crate) fn dead_peer_detection(s: &tokio::net::TcpStream, timeout: Duration) {
    let sock = socket2::SockRef::from(s);
    let idle = (timeout / 3).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle)
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalives");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(timeout)) {
        tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
    }
}

/// The replication connection's socket, after TLS negotiation.
enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_openssl::SslStream<tokio::net::TcpStream>>),
}

/// The SSLRequest handshake libpq does (tokio-postgres does it for the SQL connections):
/// TLS when the server accepts it, plaintext only when `sslmode` allows.
async fn start_tls(
    mut s: tokio::net::TcpStream,
    target: &crate::pg::Target,
    host: &str,
    described: &str,
) -> Result<Stream> {
    let tls = &target.tls;
    if tls.mode == crate::pg::tls::SslMode::Disable {
        return Ok(Stream::Plain(s));
    }
    let context = "negotiating TLS for replication";
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    s.write_all(&buf).await.map_err(|e| io_error(context, e))?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer)
        .await
        .map_err(|e| io_error(context, e))?;
    if answer[0] != b'S' {
        if tls.mode.requires_tls() {
            let text = "server does not support TLS";
            return Err(crate::pg::tls_problem(text, tls, described)
                .unwrap_or_else(|| io_error(context, std::io::Error::other(text))));
        }
        return Ok(Stream::Plain(s));
    }
    let connector = target.make_tls_connector()?;
    let ssl = connector
        .configure()
        .map_err(|e| io_error(context, std::io::Error::other(e.to_string())))?
        .verify_hostname(tls.mode == crate::pg::tls::SslMode::VerifyFull)
        .into_ssl(host)
        .map_err(|e| io_error(context, std::io::Error::other(e.to_string())))?;
    let mut stream = tokio_openssl::SslStream::new(ssl, s)
        .map_err(|e| io_error(context, std::io::Error::other(e.to_string())))?;
    if let Err(e) = std::pin::Pin::new(&mut stream).connect().await {
        let verify = stream.ssl().verify_result();
        let text = if verify == openssl::x509::X509VerifyResult::OK {
            e.to_string()
        } else {
            format!("certificate verify failed ({})", verify.error_string())
        };
        return Err(crate::pg::tls_problem(&text, tls, described)
            .unwrap_or_else(|| io_error(context, std::io::Error::other(text))));
    }
    Ok(Stream::Tls(Box::new(stream)))
}

async fn authenticate(
    r: &mut Reader,
    w: &mut Writer,
    user: &str,
    password: Option<&[u8]>,
) -> Result<()> {
    let mut buf = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    let need_password = || {
        Error::setup(
            "PostgreSQL asks for a password but postgres.url has none",
            "put the password in postgres.url (OUTBOXD_POSTGRES_URL)",
        )
    };
    loop {
        let (tag, mut body) = read_message(r)
            .await
            .map_err(|e| io_error("authenticating", e))?;
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(io_error(
                        "authenticating",
                        std::io::ErrorKind::InvalidData.into(),
                    ));
                }
                let code = body.get_i32();
                match code {
                    0 => {}
                    3 => {
                        frontend::password_message(password.ok_or_else(need_password)?, &mut buf)
                            .map_err(|e| io_error("authenticating", e))?;
                        send(w, &mut buf, "authenticating").await?;
                    }
                    5 => {
                        let mut salt = [0u8; 4];
                        if body.len() < 4 {
                            return Err(io_error("authenticating", std::io::ErrorKind::InvalidData.into()));
                        }
                        body.copy_to_slice(&mut salt);
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            password.ok_or_else(need_password)?,
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut buf)
                            .map_err(|e| io_error("authenticating", e))?;
                        send(w, &mut buf, "authenticating").await?;
                    }
                    10 => {
                        let mechanisms: Vec<&[u8]> = body[..].split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                        if !mechanisms.contains(&SCRAM_SHA_256.as_bytes()) {
                            return Err(Error::setup(
                                "PostgreSQL offers no SASL mechanism outboxd supports (SCRAM-SHA-256)",
                                "allow scram-sha-256 or md5 for this role in pg_hba.conf",
                            ));
                        }
                        let s = ScramSha256::new(password.ok_or_else(need_password)?, ChannelBinding::unsupported());
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut buf)
                            .map_err(|e| io_error("authenticating", e))?;
                        send(w, &mut buf, "authenticating").await?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| io_error("authenticating", std::io::ErrorKind::InvalidData.into()))?;
                        s.update(&body).map_err(|e| io_error("authenticating (SCRAM)", e))?;
                        frontend::sasl_response(s.message(), &mut buf).map_err(|e| io_error("authenticating", e))?;
                        send(w, &mut buf, "authenticating").await?;
                    }
                    12 => {
                        let s = scram.as_mut().ok_or_else(|| io_error("authenticating", std::io::ErrorKind::InvalidData.into()))?;
                        s.finish(&body).map_err(|e| io_error("authenticating (SCRAM)", e))?;
                    }
                    other => {
                        return Err(Error::setup(
                            format!("PostgreSQL asks for authentication method {other}, which outboxd does not support"),
                            "use scram-sha-256, md5, password or trust for this role in pg_hba.conf",
                        ))
                    }
                }
            }
            b'E' => return Err(server_error("connecting for replication", &body)),
            b'Z' => return Ok(()), // ReadyForQuery
            _ => {}                // ParameterStatus, BackendKeyData, NoticeResponse
        }
    }
}
