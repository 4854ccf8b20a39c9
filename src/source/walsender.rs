//! A minimal client of PostgreSQL's streaming replication protocol (a `replication=database`
//! connection, `START_REPLICATION … LOGICAL`, CopyBoth). tokio-postgres does not speak it;
//! the message encoding and SCRAM come from `postgres-protocol`, which tokio-postgres itself
//! is built on, so this adds no dependency to the build.
//!
//! A reader task owns the socket's read half and forwards decoded messages over a bounded
//! channel (so a slow Kafka backs up into TCP, not into memory). A status task owns the write
//! half and sends standby status updates: when the relay confirms a higher position, when the
//! server asks for a reply, and every second regardless.
//!
//! ## Why status updates have a task of their own
//!
//! The server ends a walsender that hears nothing for `wal_sender_timeout` (60 s by default,
//! often lowered). If status updates were sent from the relay's loop, any long wait there —
//! Kafka's queue full, a dead-letter delivery, a topic being created, a slow catalog query —
//! would starve them; the server would cut the stream, the session would replay the same
//! transaction, wait again, and be cut again, forever. The status task answers whatever the
//! relay is doing, always with the last position the relay confirmed, which is safe.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::config::{quote_ident, quote_literal, PostgresConfig};
use crate::error::{Error, Result};
use crate::source::pgoutput::format_lsn;

/// `application_name` of the replication connection; identifies a stale holder as outboxd.
pub const APPLICATION_NAME: &str = "outboxd-replication";

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// What the server sends once streaming.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// A pgoutput message.
    XLogData { data: bytes::Bytes },
    /// The server's position; `reply_requested` asks for a status update now.
    Keepalive { wal_end: u64, reply_requested: bool },
}

/// A started logical replication stream.
pub struct ReplicationStream {
    rx: mpsc::Receiver<Result<ReplicationMessage>>,
    /// The position to confirm; only ever raised.
    confirmed: watch::Sender<u64>,
    reader_task: tokio::task::JoinHandle<()>,
    status_task: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        self.reader_task.abort();
        if let Some(t) = &self.status_task {
            t.abort();
        }
    }
}

/// Seconds-based PostgreSQL epoch offset, for status update timestamps.
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    (unix.as_micros() as i64) - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

/// An ErrorResponse from the server, with its SQLSTATE.
fn server_error(context: &str, body: &[u8]) -> Error {
    let mut code = None;
    let mut message = String::new();
    let mut detail = None;
    let mut hint = None;
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = Some(value),
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    let mut text = message;
    if let Some(d) = detail {
        text.push_str(&format!("; detail: {d}"));
    }
    if let Some(h) = hint {
        text.push_str(&format!("; hint: {h}"));
    }
    Error::Replication {
        context: context.to_string(),
        sqlstate: code,
        message: text,
    }
}

fn io_error(context: &str, e: std::io::Error) -> Error {
    Error::Replication {
        context: context.to_string(),
        sqlstate: None,
        message: e.to_string(),
    }
}

/// Reads one backend message: (tag, body).
async fn read_message(r: &mut Reader) -> std::io::Result<(u8, BytesMut)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if !(4..=1 << 30).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid message length {len}"),
        ));
    }
    let mut body = BytesMut::zeroed(len as usize - 4);
    r.read_exact(&mut body).await?;
    Ok((head[0], body))
}

/// Connects within `timeout`; errors name the target.
async fn within<T>(
    timeout: Duration,
    target: &str,
    connect: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    let context = format!("connecting for replication to {target}");
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Err(io_error(&context, std::io::ErrorKind::TimedOut.into())),
        Ok(r) => r.map_err(|e| io_error(&context, e)),
    }
}

async fn send(w: &mut Writer, buf: &mut BytesMut, context: &str) -> Result<()> {
    w.write_all(buf).await.map_err(|e| io_error(context, e))?;
    w.flush().await.map_err(|e| io_error(context, e))?;
    buf.clear();
    Ok(())
}

impl ReplicationStream {
    /// Connects with `replication=database`, authenticates, and starts streaming the slot
    /// from its confirmed position.
    pub async fn start(
        cfg: &PostgresConfig,
        channel_capacity: usize,
        confirmed: u64,
    ) -> Result<ReplicationStream> {
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
            ],
            &mut buf,
        )
        .map_err(|e| io_error("encoding startup", e))?;
        send(&mut writer, &mut buf, "sending startup").await?;
        authenticate(&mut reader, &mut writer, &user, pgcfg.get_password()).await?;

        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (\"proto_version\" '1', \"publication_names\" {}, \"messages\" 'true')",
            quote_ident(&cfg.slot),
            quote_literal(&quote_ident(&cfg.publication)),
        );
        frontend::query(&command, &mut buf)
            .map_err(|e| io_error("encoding START_REPLICATION", e))?;
        send(&mut writer, &mut buf, "sending START_REPLICATION").await?;
        loop {
            let (tag, body) = read_message(&mut reader)
                .await
                .map_err(|e| io_error("starting replication", e))?;
            match tag {
                b'W' => break, // CopyBothResponse
                b'E' => return Err(server_error("starting replication", &body)),
                b'N' | b'S' => {}
                other => {
                    return Err(io_error(
                        "starting replication",
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("unexpected message {:?}", other as char),
                        ),
                    ))
                }
            }
        }

        let (tx, rx) = mpsc::channel(channel_capacity.max(1));
        let (reply_tx, reply_rx) = mpsc::channel(1);
        let (confirmed_tx, confirmed_rx) = watch::channel(confirmed);
        let reader_task = tokio::spawn(read_loop(reader, tx.clone(), reply_tx));
        let status_task = tokio::spawn(status_loop(writer, confirmed_rx, reply_rx, tx));
        Ok(ReplicationStream {
            rx,
            confirmed: confirmed_tx,
            reader_task,
            status_task: Some(status_task),
        })
    }

    /// The next message; `None` never happens before an error is delivered.
    pub async fn recv(&mut self) -> Result<ReplicationMessage> {
        match self.rx.recv().await {
            Some(m) => m,
            None => Err(io_error(
                "reading the replication stream",
                std::io::ErrorKind::UnexpectedEof.into(),
            )),
        }
    }

    /// Everything up to `lsn` is durably handled: the status task tells the server. A lower
    /// position than one confirmed before is ignored (PostgreSQL before its 2025 minor
    /// releases would move the slot back).
    pub fn confirm(&self, lsn: u64) {
        self.confirmed.send_if_modified(|c| {
            let higher = lsn > *c;
            if higher {
                *c = lsn;
            }
            higher
        });
    }

    /// Confirms `lsn`, sends that status update at once and ends the stream politely
    /// (CopyDone, Terminate). `Err` if the update could not be written.
    pub async fn finish(mut self, lsn: u64) -> Result<()> {
        self.confirm(lsn);
        let Some(task) = self.status_task.take() else {
            return Ok(());
        };
        // Closing the channel tells the status task to send the last position and stop.
        let (closed, _) = watch::channel(0);
        drop(std::mem::replace(&mut self.confirmed, closed));
        match task.await {
            Ok(r) => r,
            Err(e) => Err(io_error(
                "confirming the last position",
                std::io::Error::other(e.to_string()),
            )),
        }
    }
}

/// Sends standby status updates: on a higher confirmed position, on the server's request,
/// every second; on close, a last one followed by CopyDone and Terminate. A write error is
/// also reported to the relay through the message channel.
async fn status_loop(
    mut w: Writer,
    mut confirmed: watch::Receiver<u64>,
    mut reply: mpsc::Receiver<()>,
    errors: mpsc::Sender<Result<ReplicationMessage>>,
) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let closing = tokio::select! {
            changed = confirmed.changed() => changed.is_err(),
            _ = reply.recv() => false,
            _ = tick.tick() => false,
        };
        let lsn = *confirmed.borrow_and_update();
        if let Err(e) = send_status(&mut w, lsn).await {
            let _ = errors.try_send(Err(io_error(&e.0, e.1)));
            return Err(io_error(
                &e.0,
                std::io::Error::other("status update failed"),
            ));
        }
        tracing::trace!(lsn = %format_lsn(lsn), "status update sent");
        if closing {
            let mut buf = BytesMut::new();
            frontend::copy_done(&mut buf);
            frontend::terminate(&mut buf);
            let _ = w.write_all(&buf).await;
            let _ = w.flush().await;
            return Ok(());
        }
    }
}

/// One standby status update: written, flushed and applied all `lsn`.
async fn send_status(
    w: &mut Writer,
    lsn: u64,
) -> std::result::Result<(), (String, std::io::Error)> {
    let context = || format!("confirming {}", format_lsn(lsn));
    let mut body = Vec::with_capacity(34);
    body.push(b'r');
    body.extend_from_slice(&lsn.to_be_bytes()); // written
    body.extend_from_slice(&lsn.to_be_bytes()); // flushed
    body.extend_from_slice(&lsn.to_be_bytes()); // applied
    body.extend_from_slice(&pg_now_micros().to_be_bytes());
    body.push(0); // no reply requested
    let mut buf = BytesMut::new();
    frontend::CopyData::new(&body[..])
        .map_err(|e| (context(), e))?
        .write(&mut buf);
    w.write_all(&buf).await.map_err(|e| (context(), e))?;
    w.flush().await.map_err(|e| (context(), e))
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
            return Err(crate::pg::tls_problem(text, tls)
                .map(|p| p(described))
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
        return Err(crate::pg::tls_problem(&text, tls)
            .map(|p| p(described))
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

async fn read_loop(
    mut r: Reader,
    tx: mpsc::Sender<Result<ReplicationMessage>>,
    reply: mpsc::Sender<()>,
) {
    loop {
        let msg = match read_message(&mut r).await {
            Err(e) => Err(io_error("reading the replication stream", e)),
            Ok((b'd', mut body)) => match body.first() {
                Some(b'w') if body.len() >= 25 => {
                    body.advance(25); // tag, start LSN, end LSN, send time
                    Ok(ReplicationMessage::XLogData {
                        data: body.freeze(),
                    })
                }
                Some(b'k') if body.len() >= 18 => {
                    body.advance(1);
                    let wal_end = body.get_u64();
                    let _time = body.get_i64();
                    let reply_requested = body.get_u8() == 1;
                    if reply_requested {
                        // Answered by the status task at once, whatever the relay is doing.
                        let _ = reply.try_send(());
                    }
                    Ok(ReplicationMessage::Keepalive {
                        wal_end,
                        reply_requested,
                    })
                }
                _ => continue,
            },
            Ok((b'E', body)) => Err(server_error("replication stream", &body)),
            Ok((b'c', _)) | Ok((b'C', _)) => Err(io_error(
                "replication stream",
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server ended the stream"),
            )),
            Ok(_) => continue, // NoticeResponse, ParameterStatus
        };
        let fatal = msg.is_err();
        if tx.send(msg).await.is_err() || fatal {
            return;
        }
    }
}
