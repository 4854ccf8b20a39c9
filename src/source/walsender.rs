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
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::source::pgoutput::format_lsn;

/// `application_name` of the replication connection; identifies a stale holder as outboxd.
pub const APPLICATION_NAME: &str = "outboxd-replication";

pub(crate) type Reader = Box<dyn AsyncRead + Unpin + Send>;
pub(crate) type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// What the server sends once streaming.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// A pgoutput message.
    XLogData {
        /// The WAL position of the change (for Begin: the transaction's first record; for
        /// Commit: the end of the commit record).
        wal_start: u64,
        data: bytes::Bytes,
        /// Its share of the read-ahead byte budget, returned when the message is dropped.
        budget: Option<tokio::sync::OwnedSemaphorePermit>,
    },
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
pub(crate) fn server_error(context: &str, body: &[u8]) -> Error {
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

pub(crate) fn io_error(context: &str, e: std::io::Error) -> Error {
    Error::Replication {
        context: context.to_string(),
        sqlstate: None,
        message: e.to_string(),
    }
}

/// Reads one backend message: (tag, body).
pub(crate) async fn read_message(r: &mut Reader) -> std::io::Result<(u8, BytesMut)> {
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
pub(crate) async fn within<T>(
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

pub(crate) async fn send(w: &mut Writer, buf: &mut BytesMut, context: &str) -> Result<()> {
    w.write_all(buf).await.map_err(|e| io_error(context, e))?;
    w.flush().await.map_err(|e| io_error(context, e))?;
    buf.clear();
    Ok(())
}

impl ReplicationStream {
    /// Streams over `reader`/`writer`, on which the server answered START_REPLICATION with
    /// CopyBothResponse: spawns the reader and the status task.
    pub(crate) fn spawn(
        reader: Reader,
        writer: Writer,
        channel_capacity: usize,
        read_ahead_bytes: usize,
        confirmed: u64,
        stream_timeout: Duration,
    ) -> ReplicationStream {
        let (tx, rx) = mpsc::channel(channel_capacity.max(1));
        let budget = ReadAhead::new(read_ahead_bytes);
        let (reply_tx, reply_rx) = mpsc::channel(1);
        let (confirmed_tx, confirmed_rx) = watch::channel(confirmed);
        let reader_task = tokio::spawn(read_loop(
            reader,
            tx.clone(),
            reply_tx,
            stream_timeout,
            budget,
        ));
        let status_task = tokio::spawn(status_loop(writer, confirmed_rx, reply_rx, tx));
        ReplicationStream {
            rx,
            confirmed: confirmed_tx,
            reader_task,
            status_task: Some(status_task),
        }
    }

    /// The next message; `None` never happens before an error is delivered.
    pub async fn recv(&mut self) -> Result<ReplicationMessage> {
        self.rx.recv().await.unwrap_or_else(|| Err(reader_gone()))
    }

    /// The next message if one is already waiting (never waits): `None` when there is none.
    pub fn try_recv(&mut self) -> Option<Result<ReplicationMessage>> {
        match self.rx.try_recv() {
            Ok(m) => Some(m),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(reader_gone())),
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
    let mut reader_alive = true;
    loop {
        // The periodic update asks the server to answer: its keepalive proves the path works
        // both ways (the reader's stream timeout).
        let (closing, ask) = tokio::select! {
            changed = confirmed.changed() => (changed.is_err(), false),
            // Once the reader task has ended, `recv` answers `None` at once: without the
            // guard this loop would write status updates as fast as the socket takes them.
            asked = reply.recv(), if reader_alive => {
                reader_alive = asked.is_some();
                if !reader_alive {
                    continue;
                }
                (false, false)
            }
            _ = tick.tick() => (false, true),
        };
        let lsn = *confirmed.borrow_and_update();
        if let Err(e) = send_status(&mut w, lsn, ask).await {
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
    reply_requested: bool,
) -> std::result::Result<(), (String, std::io::Error)> {
    let context = || format!("confirming {}", format_lsn(lsn));
    let mut body = Vec::with_capacity(34);
    body.push(b'r');
    body.extend_from_slice(&lsn.to_be_bytes()); // written
    body.extend_from_slice(&lsn.to_be_bytes()); // flushed
    body.extend_from_slice(&lsn.to_be_bytes()); // applied
    body.extend_from_slice(&pg_now_micros().to_be_bytes());
    body.push(u8::from(reply_requested));
    let mut buf = BytesMut::new();
    frontend::CopyData::new(&body[..])
        .map_err(|e| (context(), e))?
        .write(&mut buf);
    w.write_all(&buf).await.map_err(|e| (context(), e))?;
    w.flush().await.map_err(|e| (context(), e))
}

/// The bytes of the stream read ahead of the relay, bounded: with 1 MB rows, 4,096 queued
/// messages would be 4 GB. A message larger than the whole budget still passes, alone.
struct ReadAhead {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    total: u32,
}

impl ReadAhead {
    fn new(bytes: usize) -> ReadAhead {
        let total = u32::try_from(bytes.clamp(1, 1 << 30)).unwrap_or(1 << 30);
        ReadAhead {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
        }
    }

    async fn take(&self, len: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = u32::try_from(len).unwrap_or(u32::MAX).clamp(1, self.total);
        self.permits.clone().acquire_many_owned(n).await.ok()
    }
}

/// The reader task ended without a last message (it always sends its error first).
fn reader_gone() -> Error {
    io_error(
        "reading the replication stream",
        std::io::ErrorKind::UnexpectedEof.into(),
    )
}

async fn read_loop(
    mut r: Reader,
    tx: mpsc::Sender<Result<ReplicationMessage>>,
    reply: mpsc::Sender<()>,
    stream_timeout: Duration,
    budget: ReadAhead,
) {
    loop {
        // The status task asks for a reply every second, so a healthy server is never silent
        // this long; a silent one is behind a dead network path (postgres.stream_timeout_ms).
        let read = tokio::time::timeout(stream_timeout, read_message(&mut r)).await;
        let msg = match read {
            Err(_) => Err(io_error(
                "reading the replication stream",
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no message from the server for {} s (postgres.stream_timeout_ms); reconnecting",
                        stream_timeout.as_secs()
                    ),
                ),
            )),
            Ok(Err(e)) => Err(io_error("reading the replication stream", e)),
            Ok(read) => match read {
            Err(e) => Err(io_error("reading the replication stream", e)),
            Ok((b'd', mut body)) => match body.first() {
                Some(b'w') if body.len() >= 25 => {
                    body.advance(1);
                    let wal_start = body.get_u64();
                    body.advance(16); // end LSN, send time
                    let budget = budget.take(body.len()).await;
                    Ok(ReplicationMessage::XLogData {
                        wal_start,
                        data: body.freeze(),
                        budget,
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
            },
        };
        let fatal = msg.is_err();
        if tx.send(msg).await.is_err() || fatal {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use super::*;

    /// A writer that counts what it is asked to write.
    struct Counting(Arc<AtomicUsize>);

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Review C9: once the reader task has ended (its reply sender dropped), the status task
    /// must not write an update each time the closed channel answers `None` — a busy loop
    /// filling the socket. Half a second allows the first periodic update only.
    #[tokio::test]
    async fn status_task_does_not_spin_once_the_reader_has_ended() {
        let writes = Arc::new(AtomicUsize::new(0));
        let (_confirm, confirmed) = watch::channel(0u64);
        let (reply_tx, reply) = mpsc::channel(1);
        let (errors, _errors_rx) = mpsc::channel(1);
        drop(reply_tx);
        let task = tokio::spawn(status_loop(
            Box::new(Counting(writes.clone())),
            confirmed,
            reply,
            errors,
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        task.abort();
        let n = writes.load(Ordering::SeqCst);
        assert!(n <= 4, "{n} writes in 500 ms with the reader gone");
    }
}
