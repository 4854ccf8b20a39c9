//! NATS JetStream through `async-nats`: every event is a JetStream publish whose `PubAck`
//! (the stream stored it) is what the window awaits.
//!
//! ## Deduplication, and what it makes the guarantee
//!
//! Each message carries `Nats-Msg-Id` = `<schema>.<table>:<event id>` (namespaced: the
//! stream dedups per stream, whatever table an id came from). The stream drops a message whose id it has
//! seen within its duplicate window (`nats.duplicate_window_ms`, default 2 minutes, set when
//! the relay creates the stream) and acknowledges it as a duplicate. So a resend after a relay
//! crash, a lost ack or a reconnect is stored once as long as it happens within the window of
//! the first copy: within the window, delivery into the stream is effectively exactly-once;
//! beyond it (a relay down for longer than the window with unconfirmed events), at-least-once,
//! with the repeat carrying the same id.
//!
//! ## Order
//!
//! One connection publishes in order, and the stream stores in arrival order, so one
//! aggregate's events are stored in order while nothing fails. The client's automatic
//! reconnect would break that: messages it buffered while the server was away reach the new
//! connection *before* the lost ones are resent. So a session never reconnects: on the
//! client's `Disconnected` event the sink refuses further publishes, the session ends, and
//! the next one connects afresh and resends from the confirmed position — the stored prefix
//! is dropped as duplicates, the rest follows in order.
//!
//! The client's connection task, though, outlives the handles the sink drops: after a
//! disconnect it sleeps before reconnecting, holding what it had buffered, and once
//! reconnected it writes it — stale copies after newer events, past the duplicate window, and
//! one leaked task with its buffers per lost connection. So each session's client lives in a
//! runtime of its own ([`Isolated`], one thread) that is shut down with the sink: the task and
//! everything it holds end with the session. What can still reorder: the stream refusing one message and storing the
//! next (a rare per-message error); the refused one's resend lands after it. `promises()`
//! says so: no strict per-key order through retries.
//!
//! ## Flow control
//!
//! The client refuses a publish beyond `max_in_flight` outstanding acks (it is told not to
//! wait: waiting there, inside the relay's send, would deadlock against the window that holds
//! the acks) — that is the window's "queue full", and the relay settles acks first.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::context::{
    ContextBuilder, PublishAckFuture, PublishError, PublishErrorKind,
};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::{ConnectErrorKind, HeaderMap, HeaderName};
use bytes::Bytes;

use super::{BoxDelivery, Class, Failed, Landed, Promises, Refusal, SendError, Sink};
use crate::config::{redact_url, KafkaConfig, NatsConfig};
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::poison::PoisonKind;
use crate::route::Record;

pub struct NatsSink {
    js: async_nats::jetstream::Context,
    /// The client reported its connection lost: publish nothing more on it.
    disconnected: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Holds the client's connection task; dropped (and with it the task) with the sink.
    _runtime: Isolated,
    cfg: NatsConfig,
    delivery_timeout: Duration,
    /// `outboxd replay`: appended to `Nats-Msg-Id`, so the stream's dedup does not drop a
    /// republished event (the `id` header stays the event id).
    replay_suffix: Option<String>,
    /// Prefix of every `Nats-Msg-Id`: the outbox table (`schema.table`).
    namespace: String,
}

/// A current-thread runtime on a thread of its own, shut down when dropped: every task the
/// NATS client spawned on it (the connection task above all) ends then.
struct Isolated {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Isolated {
    fn start() -> Result<Isolated> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Publish(format!("nats: starting the client's runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("outboxd-nats".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime drops its tasks.
                drop(rt);
            })
            .map_err(|e| Error::Publish(format!("nats: starting the client's thread: {e}")))?;
        Ok(Isolated {
            handle,
            stop: Some(stop),
        })
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The TLS settings of `nats.*` (the relay's connection and `verify`'s).
fn tls_options(cfg: &NatsConfig) -> async_nats::ConnectOptions {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(ca) = &cfg.ca_file {
        options = options.add_root_certificates(ca.into()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
        options = options.add_client_certificate(cert.into(), key.into());
    }
    options
}

impl NatsSink {
    /// Connects, and creates the stream if configured (or checks it exists). `window` gives
    /// the relay-wide delivery settings.
    /// `namespace` prefixes every `Nats-Msg-Id` (the outbox table).
    pub async fn connect(
        cfg: &NatsConfig,
        window: &KafkaConfig,
        namespace: &str,
    ) -> Result<NatsSink> {
        let url = redact_url(&cfg.url);
        let runtime = Isolated::start()?;
        // The client asks this callback for the delay of its first connection too.
        let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let disconnected = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lost = disconnected.clone();
        let options = tls_options(cfg)
            .name("outboxd")
            .connection_timeout(Duration::from_secs(10))
            // Never reconnect within a session (see "Order" above): what the client still
            // buffers would reach the server after a gap. The acks time out, the session
            // ends, and the next one connects afresh and resends from the confirmed position.
            .reconnect_delay_callback(move |_| {
                if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    Duration::ZERO
                } else {
                    Duration::from_secs(86_400)
                }
            })
            .event_callback(move |event| {
                let lost = lost.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!("nats connected"),
                        async_nats::Event::Disconnected => {
                            lost.store(true, std::sync::atomic::Ordering::SeqCst);
                            tracing::warn!(
                                "nats connection lost; this session publishes nothing more on it"
                            );
                        }
                        event => tracing::warn!(%event, "nats connection event"),
                    }
                }
            });
        let target = cfg.url.clone();
        let client = runtime
            .handle
            .spawn(async move { options.connect(target.as_str()).await })
            .await
            .map_err(|e| Error::Publish(format!("nats at {url}: connecting: {e}")))?
            .map_err(|e| match e.kind() {
                // rustls reports a certificate it cannot verify as an I/O error.
                ConnectErrorKind::Io if e.to_string().contains("certificate") => Error::setup(
                    format!("TLS to NATS at {url} failed: {e}"),
                    "check nats.ca_file (the CA that signed the server's certificate), the host name in nats.url, and nats.cert_file / nats.key_file",
                ),
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    Error::setup(
                        format!("NATS at {url} refused the login: {e}"),
                        "check the user and password (or token) in nats.url (OUTBOXD_NATS_URL)",
                    )
                }
                // A certificate that does not verify will not verify on the next try either.
                ConnectErrorKind::Tls => Error::setup(
                    format!("TLS to NATS at {url} failed: {e}"),
                    "check nats.ca_file (the CA that signed the server's certificate), the host name in nats.url, and nats.cert_file / nats.key_file",
                ),
                ConnectErrorKind::ServerParse => Error::setup(
                    format!("nats.url is not a NATS server address: {e}"),
                    "use nats://host:port",
                ),
                _ => Error::Publish(format!("nats at {url}: {e}")),
            })?;
        let js = ContextBuilder::new()
            .timeout(cfg.ack_timeout)
            .max_ack_inflight(window.max_in_flight.max(1))
            .backpressure_on_inflight(false)
            .build(client);
        if cfg.create_stream {
            let config = StreamConfig {
                name: cfg.stream.clone(),
                subjects: cfg.stream_subjects.clone(),
                duplicate_window: cfg.duplicate_window,
                storage: StorageType::File,
                ..StreamConfig::default()
            };
            js.get_or_create_stream(config).await.map_err(|e| {
                use async_nats::jetstream::context::CreateStreamErrorKind as K;
                let transient = match e.kind() {
                    K::JetStreamUnavailable | K::TimedOut | K::Response => true,
                    K::JetStream(j) => j.code() >= 500,
                    _ => false,
                };
                stream_error(
                    &url,
                    &cfg.stream,
                    e.to_string(),
                    "creating the stream",
                    transient,
                )
            })?;
        } else {
            js.get_stream(cfg.stream.as_str()).await.map_err(|e| {
                use async_nats::jetstream::context::GetStreamErrorKind as K;
                let transient = match e.kind() {
                    K::Request => true,
                    K::JetStream(j) => j.code() >= 500,
                    _ => false,
                };
                stream_error(
                    &url,
                    &cfg.stream,
                    e.to_string(),
                    "finding the stream",
                    transient,
                )
            })?;
        }
        Ok(NatsSink {
            js,
            disconnected,
            _runtime: runtime,
            cfg: cfg.clone(),
            delivery_timeout: window.delivery_timeout,
            replay_suffix: None,
            namespace: namespace.to_string(),
        })
    }

    /// `outboxd replay` republishes on purpose: a replayed event must not be dropped as a
    /// repeat of its first copy (the stream remembers ids for its duplicate window, even of
    /// messages since deleted), so its `Nats-Msg-Id` gets a suffix unique to this replay.
    pub fn replaying(&mut self) {
        self.replay_suffix = Some(super::replay_suffix());
    }

    fn headers(&self, record: &Record) -> std::result::Result<HeaderMap, Refusal> {
        let mut map = HeaderMap::new();
        let mut add = |name: &str, value: &[u8]| {
            let refuse = |detail: String| Refusal {
                class: Class::Record(PoisonKind::InvalidHeaders),
                code: "header".into(),
                detail,
                alone: true,
            };
            let header = HeaderName::try_from(name)
                .map_err(|_| refuse(format!("`{name:.40}` is not a NATS header name")))?;
            let text = String::from_utf8_lossy(value);
            if text.contains(['\r', '\n']) {
                return Err(refuse(format!(
                    "the value of header `{name:.40}` contains a line break"
                )));
            }
            map.insert(header, text.as_ref());
            Ok(())
        };
        for (name, value) in &record.headers {
            if name == "id" {
                // The stream dedups per stream: ids are namespaced with the outbox table, so
                // two tables (or pipelines) sharing a stream with colliding ids (bigint ids,
                // app-chosen ones) never drop each other's events as "duplicates".
                let suffix = self.replay_suffix.as_deref().unwrap_or("");
                let msg_id = [
                    self.namespace.as_bytes(),
                    b":",
                    value.as_slice(),
                    suffix.as_bytes(),
                ]
                .concat();
                add("Nats-Msg-Id", &msg_id)?;
            }
            add(name, value)?;
        }
        if let Some(key) = &record.key {
            add("key", key.as_bytes())?;
        }
        Ok(map)
    }

    async fn publish(
        &self,
        subject: &str,
        record: &Record,
        headers: HeaderMap,
    ) -> std::result::Result<PublishAckFuture, SendError> {
        if self.disconnected.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(SendError::Refused(Refusal {
                class: Class::Cluster,
                code: String::new(),
                detail: "nats: the connection was lost; a new session reconnects and resends"
                    .into(),
                alone: false,
            }));
        }
        let payload = Bytes::from(record.value.clone().unwrap_or_default());
        self.js
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::MaxAckPending => SendError::QueueFull,
                PublishErrorKind::MaxPayloadExceeded => SendError::Refused(Refusal {
                    class: Class::Record(PoisonKind::TooLarge),
                    code: "max_payload".into(),
                    detail: format!("nats: {e}"),
                    alone: true,
                }),
                _ => SendError::Refused(Refusal {
                    class: Class::Cluster,
                    code: String::new(),
                    detail: format!("nats: {e}"),
                    alone: false,
                }),
            })
    }
}

/// Every `id` header in the stream, by subject (`outboxd verify`): an ephemeral consumer
/// reads from the first message to the last one stored when it began.
pub async fn read_back(cfg: &NatsConfig) -> Result<HashMap<String, HashSet<String>>> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use futures_util::StreamExt;
    let url = redact_url(&cfg.url);
    let fail = |doing: &str, e: String| Error::Publish(format!("nats at {url}: {doing}: {e}"));
    let client = tls_options(cfg)
        .connect(cfg.url.as_str())
        .await
        .map_err(|e| fail("connecting", e.to_string()))?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(cfg.stream.as_str())
        .await
        .map_err(|e| fail("finding the stream", e.to_string()))?;
    let last = stream
        .info()
        .await
        .map_err(|e| fail("reading the stream", e.to_string()))?
        .state
        .last_sequence;
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    if last == 0 {
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..pull::Config::default()
        })
        .await
        .map_err(|e| fail("creating a reader", e.to_string()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| fail("reading", e.to_string()))?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(fail("reading", e.to_string())),
            Ok(None) | Err(_) => {
                return Err(fail("reading", "the stream stopped answering".into()))
            }
        };
        if let Some(id) = msg.headers.as_ref().and_then(|h| h.get("id")) {
            out.entry(msg.subject.to_string())
                .or_default()
                .insert(id.to_string());
        }
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(last);
        if seq >= last {
            return Ok(out);
        }
    }
}

/// A stream that cannot be created or found: `transient` — by the client's error kind and
/// the JetStream code (no responders, a timeout, 503 "JetStream cluster not available" during
/// a meta-leader election), never by the message text — is retried; the rest only an
/// operator can fix (exit code 2).
fn stream_error(url: &str, stream: &str, e: String, doing: &str, transient: bool) -> Error {
    if transient {
        return Error::Publish(format!("nats at {url}: {doing} {stream}: {e}"));
    }
    Error::setup(
        format!("nats at {url}: {doing} {stream}: {e}"),
        "check nats.stream and nats.stream_subjects (a subject may belong to another stream), or that the server runs with JetStream (-js)",
    )
}

/// What a JetStream publish error says about the record.
fn refusal(e: &PublishError) -> Refusal {
    let detail = format!("nats: {e}");
    let (class, code) = match e.kind() {
        // Nobody answers on that subject: no stream covers it (or JetStream is restarting).
        PublishErrorKind::StreamNotFound => (Class::Unclear, "no_stream"),
        PublishErrorKind::TimedOut => (Class::Cluster, ""),
        PublishErrorKind::BrokenPipe => (Class::Cluster, ""),
        _ if detail.contains("exceeds maximum") => {
            (Class::Record(PoisonKind::TooLarge), "exceeds_maximum")
        }
        _ => (Class::Unclear, "other"),
    };
    Refusal {
        class,
        code: code.into(),
        detail,
        alone: true,
    }
}

impl Sink for NatsSink {
    type Delivery = BoxDelivery;

    fn promises(&self) -> Promises {
        Promises {
            per_key_order: false,
            broker_dedup: true,
            transactions: false,
        }
    }

    fn flush(&self, _timeout: Duration) {
        // Nothing is held that matters: every publish the window counted was acknowledged by
        // the stream (a PubAck means it is stored), and what was not is resent on restart.
    }

    async fn send(&mut self, record: &Record) -> std::result::Result<BoxDelivery, SendError> {
        let headers = self.headers(record).map_err(SendError::Refused)?;
        let ack = self.publish(&record.topic, record, headers).await?;
        Ok(Box::pin(async move {
            match ack.await {
                Ok(ack) => {
                    if ack.duplicate {
                        metrics::counter!(m::DUPLICATES_DROPPED).increment(1);
                    }
                    Ok(Landed {
                        partition: None,
                        offset: i64::try_from(ack.sequence).ok(),
                    })
                }
                Err(e) => Err(Failed {
                    refusal: refusal(&e),
                    record: None,
                }),
            }
        }))
    }

    async fn ensure_topic(&mut self, _record: &Record) -> crate::error::Result<()> {
        // Subjects need no creating; the stream was made (or found) at connect.
        Ok(())
    }

    /// Publishes to `nats.dead_letter_subject` with `outboxd.dlq.reason`, `outboxd.dlq.topic`
    /// and `outboxd.dlq.error` (and the event's `Nats-Msg-Id`), and waits for the ack.
    async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        let mut dlq = super::dead_letter_record(record, kind, detail);
        if kind == PoisonKind::InvalidHeaders {
            dlq.headers.retain(|(k, v)| {
                HeaderName::try_from(k.as_str()).is_ok()
                    && !v.contains(&b'\n')
                    && !v.contains(&b'\r')
            });
        }
        let headers = self.headers(&dlq).map_err(|r| r.detail)?;
        let subject = self.cfg.dead_letter_subject.clone();
        let ack = self
            .publish(&subject, &dlq, headers)
            .await
            .map_err(|e| match e {
                SendError::Refused(r) => r.detail,
                SendError::QueueFull => "too many acks outstanding".into(),
            })?;
        ack.await.map(|_| ()).map_err(|e| format!("nats: {e}"))
    }

    fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::Isolated;

    /// What makes a lost connection's client task end with its session: a task spawned on
    /// the sink's runtime (as async-nats spawns its connection task) is dropped with it,
    /// even while it sleeps (as the task does before reconnecting).
    #[tokio::test]
    async fn a_task_on_the_sinks_runtime_ends_when_the_sink_is_dropped() {
        let runtime = Isolated::start()
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let (held, gone) = tokio::sync::oneshot::channel::<()>();
        runtime.handle.spawn(async move {
            let _held = held;
            tokio::time::sleep(std::time::Duration::from_secs(86_400)).await;
        });
        drop(runtime);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), gone).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the sleeping task still holds its state"
        );
    }
}
