//! A minimal client of PostgreSQL's streaming replication protocol (a `replication=database`
//! connection, `START_REPLICATION … LOGICAL`, CopyBoth). tokio-postgres does not speak it;
//! the message encoding and SCRAM come from `postgres-protocol`, which tokio-postgres itself
//! is built on, so this adds no dependency to the build.
//!
//! A reader task owns the socket's read half and forwards decoded messages over a bounded
//! channel (so a slow Kafka backs up into TCP, not into memory); the relay owns the write half
//! and sends standby status updates (the confirmed position) as acknowledgements arrive.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

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
    writer: Writer,
    reader_task: tokio::task::JoinHandle<()>,
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        self.reader_task.abort();
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
    pub async fn start(cfg: &PostgresConfig, channel_capacity: usize) -> Result<ReplicationStream> {
        let pgcfg: tokio_postgres::Config = cfg
            .url
            .parse()
            .map_err(|e| Error::pg("parsing postgres.url", e))?;
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
                let target = format!("{host}:{port}");
                let connect = tokio::net::TcpStream::connect((host.as_str(), port));
                let s = within(timeout, &target, connect).await?;
                let _ = s.set_nodelay(true);
                let (r, w) = tokio::io::split(s);
                (Box::new(r), Box::new(w))
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
        let reader_task = tokio::spawn(read_loop(reader, tx));
        Ok(ReplicationStream {
            rx,
            writer,
            reader_task,
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

    /// Standby status update: everything up to `flushed` is durably handled.
    pub async fn send_status(&mut self, flushed: u64, reply: bool) -> Result<()> {
        let mut body = Vec::with_capacity(34);
        body.push(b'r');
        body.extend_from_slice(&flushed.to_be_bytes()); // written
        body.extend_from_slice(&flushed.to_be_bytes()); // flushed
        body.extend_from_slice(&flushed.to_be_bytes()); // applied
        body.extend_from_slice(&pg_now_micros().to_be_bytes());
        body.push(u8::from(reply));
        let mut buf = BytesMut::new();
        frontend::CopyData::new(&body[..])
            .map_err(|e| io_error("encoding status update", e))?
            .write(&mut buf);
        send(
            &mut self.writer,
            &mut buf,
            &format!("confirming {}", format_lsn(flushed)),
        )
        .await
    }

    /// Ends the stream politely (CopyDone, Terminate); errors are irrelevant at this point.
    pub async fn close(mut self) {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        frontend::terminate(&mut buf);
        let _ = self.writer.write_all(&buf).await;
        let _ = self.writer.flush().await;
    }
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

async fn read_loop(mut r: Reader, tx: mpsc::Sender<Result<ReplicationMessage>>) {
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
