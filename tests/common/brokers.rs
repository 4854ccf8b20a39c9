//! RabbitMQ and NATS servers of a test's own (`scripts/stack.sh nats-start` /
//! `rabbitmq-start`), and readers that turn what they hold into [`Received`] records, so the
//! Kafka assertions ([`assert_written`]) apply to every sink.

use super::*;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures_util::StreamExt;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

/// A broker server of a test's own; stopped and removed on drop.
pub struct PrivateBroker {
    pub dir: PathBuf,
    /// NATS: `tls://localhost:…` when started with certificates.
    pub url: String,
    /// RabbitMQ with certificates: the AMQPS listener's URL.
    pub tls_url: Option<String>,
    /// The CA of the server's certificate, when started with certificates.
    pub ca: Option<PathBuf>,
    kind: &'static str,
    certs: Option<PathBuf>,
    /// The start's extra arguments, given again on a restart.
    extra: Vec<String>,
}

impl PrivateBroker {
    /// `kind`: "nats" or "rabbitmq". With TLS: a throwaway CA in `certs` (`stack.sh tls-certs`), server certificate for
    /// `localhost`.
    pub fn start(kind: &'static str, certs: Option<&Path>) -> PrivateBroker {
        let certs_arg = certs.map(|c| c.to_str().unwrap().to_string());
        let extra: Vec<&str> = certs_arg.iter().map(String::as_str).collect();
        let mut broker = Self::start_with(kind, &extra);
        broker.ca = certs.map(|c| c.join("ca.pem"));
        broker.certs = certs.map(Path::to_path_buf);
        broker
    }

    /// `kind`-start with extra arguments (`moto`: `1` turns authentication on).
    pub fn start_with(kind: &'static str, extra: &[&str]) -> PrivateBroker {
        let dir = std::env::temp_dir().join(unique(&format!("outboxd-{kind}")));
        let mut args = vec![format!("{kind}-start"), dir.to_str().unwrap().to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = stack(&args);
        let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let tls_url = std::fs::read_to_string(dir.join("tls_url"))
            .ok()
            .map(|u| u.trim().to_string());
        PrivateBroker {
            dir,
            url,
            tls_url,
            ca: None,
            kind,
            certs: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Stops the server (SIGTERM, a clean stop), keeping its data and port.
    pub fn stop(&self) {
        stack(&["broker-stop", self.dir.to_str().unwrap()]);
    }

    /// SIGKILLs the server, keeping its data and port.
    pub fn kill(&self) {
        stack(&["broker-kill", self.dir.to_str().unwrap()]);
    }

    /// Starts the server again on its data and port.
    pub fn restart(&self) {
        let mut args = vec![
            format!("{}-start", self.kind),
            self.dir.to_str().unwrap().to_string(),
        ];
        // The start's arguments: the certificates' directory, `memory`, …
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        stack(&args);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let _ = Command::new(script)
            .args(["broker-stop", self.dir.to_str().unwrap(), "--remove"])
            .status();
    }
}

/// The dead letters read back: event id → `outboxd.dlq.reason`.
pub fn dead_letter_reasons(got: Vec<Received>) -> Vec<(String, String)> {
    got.into_iter()
        .map(|r| {
            let reason = r.headers.get("outboxd.dlq.reason").cloned();
            (r.id.unwrap_or_default(), reason.unwrap_or_default())
        })
        .collect()
}

/// When a reader of a queue stops: once every expected id was seen and `linger` more has
/// passed (repeats still arriving), or at `timeout`.
pub struct ReadUntil {
    deadline: Instant,
    linger: Duration,
    linger_until: Option<Instant>,
}

impl ReadUntil {
    pub fn new(timeout: Duration, linger: Duration) -> ReadUntil {
        ReadUntil {
            deadline: Instant::now() + timeout,
            linger,
            linger_until: None,
        }
    }

    pub fn done(&mut self, expect: &HashSet<String>, seen: &HashSet<String>) -> bool {
        let now = Instant::now();
        if self.linger_until.is_none() && expect.iter().all(|id| seen.contains(id)) {
            self.linger_until = Some(now + self.linger);
        }
        now >= self.linger_until.unwrap_or(self.deadline)
    }
}

/// The config lines that point a test's relay at NATS: stream `<DB>` over subjects
/// `<db>.>`, dead letters to `<db>_dlq` (in the same stream).
pub fn nats_sink_config(db: &TestDb, url: &str) -> String {
    format!(
        "[sink]\nkind = \"nats\"\n\n[nats]\nurl = \"{url}\"\nstream = \"{stream}\"\n\
         subject = \"{db}.{{aggregatetype}}.{{type}}\"\nstream_subjects = [\"{db}.>\", \"{db}_dlq\"]\n\
         dead_letter_subject = \"{db}_dlq\"\nack_timeout_ms = 2000\n",
        db = db.name,
        stream = db.name.to_uppercase(),
    )
}

/// The config lines that point a test's relay at RabbitMQ: topic exchange `<db>`, routing
/// key `{aggregatetype}.{type}`, dead letters to queue `<db>_dlq`.
pub fn rabbitmq_sink_config(db: &TestDb, url: &str) -> String {
    format!(
        "[sink]\nkind = \"rabbitmq\"\n\n[rabbitmq]\nurl = \"{url}\"\nexchange = \"{db}\"\n\
         dead_letter_queue = \"{db}_dlq\"\n",
        db = db.name,
    )
}

fn header_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Reads every message of `stream` (subjects matching `filter`) from the start until each id
/// in `expect` was seen or `timeout` passed, then `linger` more. `offset` is the stream
/// sequence, `topic` the stream (one order for the whole stream), `key` the `key` header.
pub async fn nats_read(
    url: &str,
    ca: Option<&Path>,
    stream: &str,
    filter: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(ca) = ca {
        options = options.add_root_certificates(ca.to_path_buf());
    }
    let client = options.connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // The relay creates the stream when it starts: wait for it.
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "stream {stream}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let consumer = stream
        .create_consumer(PullConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..PullConfig::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut linger_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let until = match linger_until {
            Some(l) => l,
            None if expect.iter().all(|id| seen.contains(id)) => {
                linger_until = Some(now + linger);
                continue;
            }
            None => deadline,
        };
        if now >= until {
            break;
        }
        let Ok(Some(msg)) = tokio::time::timeout(until - now, messages.next()).await else {
            break;
        };
        let msg = msg.unwrap();
        let info = msg.info().unwrap();
        let offset = info.stream_sequence as i64;
        let mut headers = HashMap::new();
        if let Some(h) = &msg.headers {
            for (name, values) in h.iter() {
                if let Some(v) = values.first() {
                    headers.insert(name.to_string(), v.to_string());
                }
            }
        }
        let id = headers.get("id").cloned();
        if let Some(id) = &id {
            seen.insert(id.clone());
        }
        out.push(Received {
            topic: msg.subject.to_string(),
            partition: 0,
            offset,
            key: headers.get("key").cloned(),
            id,
            payload: Some(String::from_utf8_lossy(&msg.payload).into_owned()),
            raw_payload: Some(msg.payload.to_vec()),
            headers,
            timestamp_ms: None,
        });
        msg.ack().await.unwrap();
    }
    // One order for the whole stream: assert_written sorts by (topic, partition, offset).
    for r in &mut out {
        r.topic = String::new();
    }
    out
}

/// Declares a durable queue bound to `exchange` (a topic exchange, declared here if missing)
/// with `binding`, so the relay's messages are routable before it starts.
pub async fn rabbitmq_queue(url: &str, exchange: &str, queue: &str, binding: &str) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        binding.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// Takes every message from `queue` (basic.get, acknowledged) until each id in `expect` was
/// seen or `timeout` passed, then `linger` more. `offset` is the arrival order in the queue.
pub async fn rabbitmq_read(
    url: &str,
    queue: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut until = ReadUntil::new(timeout, linger);
    while !until.done(expect, &seen) {
        let got = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        let Some(msg) = got else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let d = &msg.delivery;
        let mut headers = HashMap::new();
        if let Some(table) = d.properties.headers() {
            for (k, v) in table.inner() {
                if let Some(text) = header_text(v) {
                    headers.insert(k.to_string(), text);
                }
            }
        }
        let id = d.properties.message_id().as_ref().map(|s| s.to_string());
        if let Some(id) = &id {
            seen.insert(id.clone());
        }
        out.push(Received {
            topic: String::new(),
            partition: 0,
            offset: out.len() as i64,
            key: headers.get("key").cloned(),
            id,
            payload: Some(String::from_utf8_lossy(&d.data).into_owned()),
            raw_payload: Some(d.data.clone()),
            headers,
            timestamp_ms: d.properties.timestamp().map(|s| s as i64 * 1000),
        });
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// Waits (10 s at most) for event `id` in the dead-letter table; its `(reason, error)`. The
/// table is at-least-once like the dead-letter topic: a session that ends after writing the row
/// (a stall while an emulator is slow) writes it again from the confirmed position, so there
/// may be several rows — each must carry the same reason.
pub async fn dead_letter_row(client: &tokio_postgres::Client, id: &str) -> (String, String) {
    for _ in 0..50 {
        let rows = client
            .query(
                "SELECT reason, error FROM outboxd_dead_letter WHERE event_id = $1 ORDER BY seq",
                &[&id],
            )
            .await
            .unwrap();
        if let Some(first) = rows.first() {
            let reasons: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            assert!(
                reasons.iter().all(|r| *r == reasons[0]),
                "event {id} dead-lettered with different reasons: {reasons:?}"
            );
            return (first.get(0), first.get(1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("event {id} never reached the dead-letter table");
}

/// A TCP proxy in front of `url` (`http://127.0.0.1:PORT`), and `config`'s `key = "url"`
/// line pointed at it.
pub fn route_through_proxy(config: &Path, key: &str, url: &str) -> proxy::Proxy {
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = proxy::Proxy::start(([127, 0, 0, 1], port).into());
    let text = std::fs::read_to_string(config).unwrap();
    let via = text.replace(
        &format!("{key} = \"{url}\""),
        &format!("{key} = \"http://127.0.0.1:{}\"", proxy.port),
    );
    assert_ne!(text, via, "no `{key} = \"{url}\"` in the config");
    std::fs::write(config, via).unwrap();
    proxy
}
