//! Backlog-drain benchmark for the sinks other than Kafka: `--events` are committed first,
//! then a real `outboxd run` starts; throughput is N / (relay start → the broker holds all N).
//! "Holds" is read from the broker itself where it can say: the stream's message count (NATS),
//! the bound queue's message count (RabbitMQ), the queue's `ApproximateNumberOfMessages` (SQS
//! on ElasticMQ; SNS on moto: the queue subscribed to the topic), what a subscription pulled
//! (Pub/Sub on its emulator), what a receiver accepted (Service Bus's AMQP 1.0 on Artemis).
//! EventBridge on moto: a bus without rules (moto passes ~10 events
//! a second through a rule), counted by the relay's `outboxd_events_published_total` — each
//! an entry `PutEvents` answered with an `EventId`. Prints events/s, the relay's CPU seconds
//! and peak RSS. Run it with `scripts/bench.sh --sink nats|rabbitmq|sqs|sns|eventbridge|pubsub|servicebus`.

#[path = "support/proc.rs"]
mod proc_stats;

#[path = "support/fresh.rs"]
mod fresh;
#[path = "support/relay.rs"]
#[allow(dead_code)]
mod relay;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, ValueEnum};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio_postgres::NoTls;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum SinkKind {
    Nats,
    Rabbitmq,
    Sqs,
    Sns,
    Eventbridge,
    Pubsub,
    Servicebus,
}

/// How the bench reads how many events the broker holds.
enum Counter {
    Nats(String, String),
    /// The connection is held (`_conn`): the channel closes with it.
    Rabbit {
        _conn: lapin::Connection,
        ch: lapin::Channel,
        queue: String,
    },
    Sqs(outboxd::sink::aws::AwsClient, String),
    /// The relay's `/metrics` at this address.
    Published(String),
    /// Pulls (and acknowledges) subscription `.1` of the emulator at `.0`, counting.
    PubSub(String, String, u64),
    /// Receives (and accepts) the AMQP 1.0 queue, counting.
    Amqp(Box<AmqpQueue>),
}

/// A receiver on an AMQP 1.0 queue and how many it received.
struct AmqpQueue {
    _connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    _session: fe2o3_amqp::session::SessionHandle<()>,
    receiver: fe2o3_amqp::Receiver,
    n: u64,
}

impl Counter {
    async fn held(&mut self) -> anyhow::Result<u64> {
        match self {
            Counter::Nats(url, stream) => nats_count(url, stream).await,
            Counter::Rabbit { ch, queue, .. } => Ok(ch
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?
                .message_count() as u64),
            Counter::Sqs(client, queue) => sqs_count(client, queue).await,
            Counter::Published(addr) => published(addr).await,
            Counter::PubSub(url, sub, n) => {
                *n += pubsub_pull(url, sub).await?;
                Ok(*n)
            }
            Counter::Amqp(q) => {
                use fe2o3_amqp::types::messaging::Body;
                use fe2o3_amqp::types::primitives::Value;
                // What arrives within 50 ms, then the count.
                while let Ok(d) = tokio::time::timeout(
                    Duration::from_millis(50),
                    q.receiver.recv::<Body<Value>>(),
                )
                .await
                {
                    q.receiver.accept(&d?).await?;
                    q.n += 1;
                }
                Ok(q.n)
            }
        }
    }
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum)]
    sink: SinkKind,
    /// The broker's URL (`scripts/stack.sh nats-start` / `rabbitmq-start` print it).
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Bytes of padding in each payload.
    #[arg(long, default_value_t = 100)]
    payload_pad: usize,
    #[arg(long, default_value = "target/release/outboxd")]
    relay: PathBuf,
    /// TOML appended to the sink's table, e.g. "channels = 1" ([aws] for SQS and SNS, e.g.
    /// "max_concurrent_requests = 32").
    #[arg(long, default_value = "")]
    extra_config: String,
    /// SQS: a standard queue instead of a FIFO one.
    #[arg(long)]
    standard: bool,
}

/// The keys the relay and the bench give ElasticMQ (it takes any).
const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "AKIAOUTBOXDBENCH0001"),
    ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fresh::Fresh { db, url, dir, .. } = fresh::database("bench_sink").await?;
    let sink = match args.sink {
        SinkKind::Nats => format!(
            "[sink]\nkind = \"nats\"\n[nats]\nurl = \"{}\"\nstream = \"{}\"\nsubject = \"{db}.{{aggregatetype}}\"\nstream_subjects = [\"{db}.>\", \"{db}_dlq\"]\ndead_letter_subject = \"{db}_dlq\"\n",
            args.url,
            db.to_uppercase()
        ),
        SinkKind::Rabbitmq => format!(
            "[sink]\nkind = \"rabbitmq\"\n[rabbitmq]\nurl = \"{}\"\nexchange = \"{db}\"\ndead_letter_queue = \"{db}_dlq\"\n",
            args.url
        ),
        SinkKind::Sqs => format!(
            "[sink]\nkind = \"sqs\"\n[sqs]\nqueue = \"{db}-{{aggregatetype}}{1}\"\ndead_letter_queue = \"{db}-dlq\"\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{0}\"\n",
            args.url,
            if args.standard { "" } else { ".fifo" }
        ),
        SinkKind::Sns => format!(
            "[sink]\nkind = \"sns\"\n[sns]\ntopic_arn = \"arn:aws:sns:us-east-1:123456789012:{db}-{{aggregatetype}}{1}\"\ndead_letter_topic_arn = \"arn:aws:sns:us-east-1:123456789012:{db}-dlq\"\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{0}\"\n",
            args.url,
            if args.standard { "" } else { ".fifo" }
        ),
        SinkKind::Eventbridge => format!(
            "[sink]\nkind = \"eventbridge\"\n[eventbridge]\nevent_bus = \"{db}-{{aggregatetype}}\"\ndead_letter_event_bus = \"{db}-dlq\"\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{0}\"\n",
            args.url,
        ),
        SinkKind::Servicebus => format!(
            "[sink]\nkind = \"servicebus\"\n[servicebus]\nconnection_string = \"Endpoint={0}/;SharedAccessKeyName=outboxd;SharedAccessKey=secret\"\nqueue = \"outboxd-{{aggregatetype}}\"\ndead_letter_queue = \"outboxd-bench-dlq\"\n",
            args.url,
        ),
        SinkKind::Pubsub => format!(
            "[sink]\nkind = \"pubsub\"\n[pubsub]\nproject = \"outboxd-bench\"\nendpoint = \"{0}\"\ntopic = \"{db}-{{aggregatetype}}\"\ndead_letter_topic = \"{db}-dlq\"\n",
            args.url,
        ),
    };
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let config = dir.join("outboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{db}\"\n[http]\naddr = \"{metrics_addr}\"\n{sink}{}\n",
            args.extra_config
        ),
    )?;
    relay::migrate(&args.relay, &config)?;
    let mut counter = match args.sink {
        SinkKind::Rabbitmq => {
            let (conn, ch) = rabbitmq_queue(&args.url, &db).await?;
            Counter::Rabbit {
                _conn: conn,
                ch,
                queue: db.clone(),
            }
        }
        SinkKind::Sqs => {
            let (client, queue) = sqs_queues(&args.url, &db, !args.standard).await?;
            Counter::Sqs(client, queue)
        }
        SinkKind::Sns => {
            let (client, queue) = sns_topics(&args.url, &db, !args.standard).await?;
            Counter::Sqs(client, queue)
        }
        SinkKind::Nats => Counter::Nats(args.url.clone(), db.to_uppercase()),
        SinkKind::Eventbridge => {
            eventbridge_buses(&args.url, &db).await?;
            Counter::Published(metrics_addr.clone())
        }
        SinkKind::Servicebus => Counter::Amqp(Box::new(amqp_queue(&args.url).await?)),
        SinkKind::Pubsub => {
            pubsub_topics(&args.url, &db).await?;
            Counter::PubSub(args.url.clone(), format!("{db}-bench"), 0)
        }
    };

    let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    let n = args.events;
    let chunk = 10_000;
    let mut lo = 1;
    while lo <= n {
        let hi = (lo + chunk - 1).min(n);
        client
            .execute(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                 SELECT 'bench', 'agg-' || (g % 1000), 'BenchEvent', jsonb_build_object('n', g, 'pad', repeat('x', $3)) \
                   FROM generate_series($1::int8, $2::int8) g",
                &[&(lo as i64), &(hi as i64), &(args.payload_pad as i32)],
            )
            .await?;
        lo = hi + 1;
    }
    println!(
        "outboxd sink bench: sink={:?} backlog={n} events payload≈{}B",
        args.sink,
        args.payload_pad + 30
    );

    let log = std::fs::File::create(dir.join("outboxd.log"))?;
    let started = Instant::now();
    let mut relay = Command::new(&args.relay)
        .args(["run", "--config"])
        .arg(&config)
        .envs(AWS_ENV)
        .stderr(Stdio::from(log))
        .stdout(Stdio::null())
        .spawn()?;
    let pid = relay.id();
    let deadline = started + Duration::from_secs(600);
    loop {
        let held = counter.held().await.unwrap_or(0);
        if held >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {held} of {n} events reached the broker in 10 minutes");
        }
        if let Some(status) = relay.try_wait()? {
            bail!("the relay exited with {status}; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let cpu = proc_stats::cpu_secs(pid).unwrap_or(0.0);
    let rss = proc_stats::peak_rss_kib(pid).unwrap_or(0);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = relay.wait();
    println!(
        "  drained {n} events in {:.2} s: {:.0} events/s; relay CPU {cpu:.2} s ({:.0} events per CPU-second); peak RSS {:.1} MiB",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        n as f64 / cpu.max(0.001),
        rss as f64 / 1024.0
    );
    Ok(())
}

fn sqs_client(url: &str) -> anyhow::Result<outboxd::sink::aws::AwsClient> {
    aws_client(url, "sqs")
}

fn aws_client(url: &str, service: &'static str) -> anyhow::Result<outboxd::sink::aws::AwsClient> {
    use outboxd::sink::aws::credentials::{Credentials, Secret};
    let cfg = outboxd::config::AwsConfig {
        region: "us-east-1".into(),
        profile: None,
        endpoint_url: Some(url.to_string()),
        request_timeout: Duration::from_secs(30),
        max_concurrent_requests: 1,
    };
    let creds = Credentials {
        access_key_id: AWS_ENV[0].1.into(),
        secret_access_key: Secret::new(AWS_ENV[1].1.into()),
        session_token: None,
        expires: None,
        source: "bench".into(),
    };
    Ok(outboxd::sink::aws::AwsClient::with_credentials(
        &cfg, service, "BENCH", creds,
    )?)
}

async fn sqs_action(
    client: &outboxd::sink::aws::AwsClient,
    action: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let answer = client
        .json(
            &format!("AmazonSQS.{action}"),
            "1.0",
            body.to_string().into_bytes(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("sqs {action}: {e}"))?;
    Ok(serde_json::from_slice(&answer)?)
}

/// The bench queue `<db>-bench[.fifo]` and the dead-letter queue; returns a client and the
/// bench queue's URL.
async fn sqs_queues(
    url: &str,
    db: &str,
    fifo: bool,
) -> anyhow::Result<(outboxd::sink::aws::AwsClient, String)> {
    let client = sqs_client(url)?;
    let mut body = serde_json::json!({ "QueueName": format!("{db}-bench{}", if fifo { ".fifo" } else { "" }) });
    if fifo {
        body["Attributes"] = serde_json::json!({ "FifoQueue": "true" });
    }
    let queue = sqs_action(&client, "CreateQueue", body).await?["QueueUrl"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    sqs_action(
        &client,
        "CreateQueue",
        serde_json::json!({ "QueueName": format!("{db}-dlq") }),
    )
    .await?;
    Ok((client, queue))
}

/// The topics `<db>-bench[.fifo]` and `<db>-dlq`, and a queue of the first's kind subscribed
/// to it with raw delivery; returns a client and that queue's URL.
async fn sns_topics(
    url: &str,
    db: &str,
    fifo: bool,
) -> anyhow::Result<(outboxd::sink::aws::AwsClient, String)> {
    let (sqs, queue) = sqs_queues(url, db, fifo).await?;
    let sns = aws_client(url, "sns")?;
    let name = format!("{db}-bench{}", if fifo { ".fifo" } else { "" });
    let mut create = vec![
        ("Action", "CreateTopic"),
        ("Version", "2010-03-31"),
        ("Name", name.as_str()),
    ];
    if fifo {
        create.extend([
            ("Attributes.entry.1.key", "FifoTopic"),
            ("Attributes.entry.1.value", "true"),
        ]);
    }
    let answer = sns
        .query(&create)
        .await
        .map_err(|e| anyhow::anyhow!("sns CreateTopic: {e}"))?;
    let arn = outboxd::sink::aws::xml::text(&answer, "TopicArn").unwrap_or_default();
    let dlq = format!("{db}-dlq");
    sns.query(&[
        ("Action", "CreateTopic"),
        ("Version", "2010-03-31"),
        ("Name", dlq.as_str()),
    ])
    .await
    .map_err(|e| anyhow::anyhow!("sns CreateTopic: {e}"))?;
    let v = sqs_action(
        &sqs,
        "GetQueueAttributes",
        serde_json::json!({ "QueueUrl": queue, "AttributeNames": ["QueueArn"] }),
    )
    .await?;
    let queue_arn = v["Attributes"]["QueueArn"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    sns.query(&[
        ("Action", "Subscribe"),
        ("Version", "2010-03-31"),
        ("TopicArn", arn.as_str()),
        ("Protocol", "sqs"),
        ("Endpoint", queue_arn.as_str()),
        ("Attributes.entry.1.key", "RawMessageDelivery"),
        ("Attributes.entry.1.value", "true"),
    ])
    .await
    .map_err(|e| anyhow::anyhow!("sns Subscribe: {e}"))?;
    Ok((sqs, queue))
}

async fn sqs_count(client: &outboxd::sink::aws::AwsClient, queue: &str) -> anyhow::Result<u64> {
    let v = sqs_action(
        client,
        "GetQueueAttributes",
        serde_json::json!({ "QueueUrl": queue, "AttributeNames": ["ApproximateNumberOfMessages"] }),
    )
    .await?;
    Ok(v["Attributes"]["ApproximateNumberOfMessages"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

async fn nats_count(url: &str, stream: &str) -> anyhow::Result<u64> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await?;
    Ok(stream.info().await?.state.messages)
}

/// A durable queue bound to the relay's exchange (so messages are routable and counted);
/// returns the connection and a channel to read its depth.
async fn rabbitmq_queue(
    url: &str,
    db: &str,
) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        db.into(),
        lapin::ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(db.into(), q, FieldTable::default())
        .await?;
    ch.queue_bind(
        db.into(),
        db.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok((conn, ch))
}

/// A port nobody listens on (the relay's `/metrics` for this run).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The relay's `outboxd_events_published_total`, summed over topics.
async fn published(addr: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("outboxd_events_published_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// The buses `<db>-bench` and `<db>-dlq`, without rules.
async fn eventbridge_buses(url: &str, db: &str) -> anyhow::Result<()> {
    let events = aws_client(url, "events")?;
    for bus in ["bench", "dlq"] {
        let body = serde_json::json!({ "Name": format!("{db}-{bus}") });
        events
            .json(
                "AWSEvents.CreateEventBus",
                "1.1",
                body.to_string().into_bytes(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("events CreateEventBus: {e}"))?;
    }
    Ok(())
}

/// `method` on the emulator's `projects/outboxd-bench/<path>`.
async fn pubsub_call(
    url: &str,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let answer = reqwest::Client::new()
        .request(method, format!("{url}/v1/projects/outboxd-bench/{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = answer.status();
    let bytes = answer.bytes().await?;
    if !status.is_success() {
        bail!(
            "pubsub {path}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

/// The topics `<db>-bench` (with an ordered subscription of the same name) and `<db>-dlq`.
async fn pubsub_topics(url: &str, db: &str) -> anyhow::Result<()> {
    use reqwest::Method;
    for t in ["bench", "dlq"] {
        pubsub_call(
            url,
            Method::PUT,
            &format!("topics/{db}-{t}"),
            serde_json::json!({}),
        )
        .await?;
    }
    let body = serde_json::json!({
        "topic": format!("projects/outboxd-bench/topics/{db}-bench"),
        "enableMessageOrdering": true,
    });
    pubsub_call(url, Method::PUT, &format!("subscriptions/{db}-bench"), body).await?;
    Ok(())
}

/// Pulls and acknowledges what subscription `sub` has; how many.
async fn pubsub_pull(url: &str, sub: &str) -> anyhow::Result<u64> {
    use reqwest::Method;
    let body = serde_json::json!({ "maxMessages": 1000, "returnImmediately": true });
    let v = pubsub_call(
        url,
        Method::POST,
        &format!("subscriptions/{sub}:pull"),
        body,
    )
    .await?;
    let acks: Vec<serde_json::Value> = v["receivedMessages"]
        .as_array()
        .map(|m| m.iter().map(|m| m["ackId"].clone()).collect())
        .unwrap_or_default();
    if !acks.is_empty() {
        let body = serde_json::json!({ "ackIds": acks });
        pubsub_call(
            url,
            Method::POST,
            &format!("subscriptions/{sub}:acknowledge"),
            body,
        )
        .await?;
    }
    Ok(acks.len() as u64)
}

/// A receiver on `outboxd-bench` of the Artemis at `url` (`scripts/bench.sh` creates it).
async fn amqp_queue(url: &str) -> anyhow::Result<AmqpQueue> {
    let mut connection = fe2o3_amqp::Connection::builder()
        .container_id("outboxd-bench-reader")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: "outboxd".into(),
            password: "secret".into(),
        })
        .open(url)
        .await?;
    let mut session = fe2o3_amqp::Session::begin(&mut connection).await?;
    let receiver = fe2o3_amqp::Receiver::attach(&mut session, "bench", "outboxd-bench").await?;
    Ok(AmqpQueue {
        _connection: connection,
        _session: session,
        receiver,
        n: 0,
    })
}
