//! The floor under the relay's Kafka side: librdkafka alone, configured as the relay configures
//! it (`outboxd::sink::kafka::client_config` of a `[kafka]` section), producing the bench's
//! records — key, `id` header, the same payload size — at the same rate and in the same bursts
//! (one burst per source transaction), every delivery report awaited as the relay awaits them.
//! No PostgreSQL, no decode, no routing: what this process spends per event is what librdkafka
//! and its threads cost at that rate, the part of the relay's CPU no change of ours can remove.
//!
//! Prints events/s, produce → acknowledged p50/p99, CPU-s per 100k events and peak RSS of this
//! process (the records are built before timing starts). Run it with `scripts/bench.sh
//! --librdkafka --rate 10000 --events 200000`.

#[path = "support/latency.rs"]
mod latency;
#[path = "support/proc.rs"]
mod proc_stats;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events per second; 0 = as fast as librdkafka takes them.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Records per burst (the bench's events per source transaction).
    #[arg(long, default_value_t = 10)]
    txn_size: u64,
    /// Bytes of padding in each payload (the bench's default).
    #[arg(long, default_value_t = 100)]
    payload_pad: usize,
    /// librdkafka's own C interface only (a `BaseProducer` served by this thread between
    /// bursts, no async runtime, no futures): the floor of the library itself.
    #[arg(long)]
    base: bool,
    /// The same `BaseProducer`, its delivery reports served on the tokio runtime: librdkafka
    /// writes to a pipe when reports wait (`rd_kafka_queue_io_event_enable`), the reactor wakes
    /// the producing task, which serves them — no polling thread, no future per record. What
    /// the relay's delivery path could spend if it were built that way.
    #[arg(long, conflicts_with = "base")]
    io_event: bool,
    /// Extra TOML inside `[kafka]` (e.g. "linger.ms" under `[kafka.properties]`).
    #[arg(long, default_value = "")]
    extra_config: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let brokers = std::env::var("OUTBOXD_TEST_KAFKA")
        .context("OUTBOXD_TEST_KAFKA not set; use scripts/bench.sh --librdkafka")?;
    let dir = std::env::temp_dir().join(format!("outboxd-librdkafka-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("outboxd.toml");
    std::fs::write(
        &file,
        format!(
            "[postgres]\nurl = \"postgres://unused@127.0.0.1/unused\"\n[kafka]\nbrokers = \"{brokers}\"\n{}\n",
            args.extra_config
        ),
    )?;
    let config = outboxd::config::Config::load(Some(&file)).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::remove_dir_all(&dir)?;
    let topic = format!("librdkafka_floor_{}", std::process::id());
    // Three partitions, as the broker's default gives the bench's relay-created topic.
    let admin: AdminClient<DefaultClientContext> =
        outboxd::sink::kafka::client_config(&config.kafka).create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }

    // The records, built before timing: what the relay decodes and routes is not measured here.
    let records: Vec<(String, String, String)> = (1..=args.events)
        .map(|i| {
            let id = format!("00000000-0000-0000-0000-{i:012}");
            let key = format!("order-{}", i % 1000);
            let payload = format!(
                "{{\"order\":{i},\"pad\":\"{}\"}}",
                "x".repeat(args.payload_pad)
            );
            (id, key, payload)
        })
        .collect();

    let pid = std::process::id();
    let per_burst = args.txn_size.max(1) as usize;
    let (elapsed, cpu, latencies) = if args.io_event {
        let cfg = outboxd::sink::kafka::client_config(&config.kafka);
        io_floor(cfg, &Load::new(&topic, &records, args.rate, per_burst)).await?
    } else if args.base {
        let cfg = outboxd::sink::kafka::client_config(&config.kafka);
        let (topic, rate) = (topic.clone(), args.rate);
        tokio::task::spawn_blocking(move || {
            base_floor(cfg, &Load::new(&topic, &records, rate, per_burst))
        })
        .await??
    } else {
        let producer: FutureProducer =
            outboxd::sink::kafka::client_config(&config.kafka).create()?;
        // Warm-up: the producer knows the topic's leaders before timing starts.
        let (id, key, payload) = &records[0];
        send(&producer, &topic, id, key, payload)
            .await
            .context("warm-up record")?;
        let (cpu0, start) = (proc_stats::cpu_secs(pid).unwrap_or(0.0), Instant::now());
        let latencies = future_floor(&producer, &topic, &records, args.rate, per_burst).await?;
        let cpu = proc_stats::cpu_secs(pid).unwrap_or(0.0) - cpu0;
        (start.elapsed().as_secs_f64(), cpu, latencies)
    };
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    let n = args.events as f64;
    println!(
        "librdkafka alone: {} events, rate {}, {} per burst, payload≈{}B",
        args.events,
        if args.rate == 0 {
            "max".to_string()
        } else {
            format!("{}/s", args.rate)
        },
        per_burst,
        args.payload_pad
    );
    println!("throughput: {:.0} events/s ({elapsed:.2} s)", n / elapsed);
    println!(
        "latency produce → acknowledged: {}",
        latency::summary(&mut ms)
    );
    println!(
        "librdkafka CPU: {cpu:.2} s = {:.2} CPU-s per 100k events, {:.0} events per CPU-second",
        cpu / n * 100_000.0,
        n / cpu.max(0.001)
    );
    println!(
        "peak RSS: {:.1} MiB (the records built up front included)",
        proc_stats::peak_rss_kib(pid).unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

/// When burst `b` is due at `rate` events/s.
fn due(start: Instant, b: usize, per_burst: usize, rate: u64) -> Option<Instant> {
    (rate > 0).then(|| start + Duration::from_secs_f64((b * per_burst) as f64 / rate as f64))
}

/// rust-rdkafka's `FutureProducer` on tokio, as the relay uses it: produce → acknowledged.
async fn future_floor(
    producer: &FutureProducer,
    topic: &str,
    records: &[(String, String, String)],
    rate: u64,
    per_burst: usize,
) -> anyhow::Result<Vec<Duration>> {
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(records.len());
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for (b, burst) in records.chunks(per_burst).enumerate() {
        if let Some(due) = due(start, b, per_burst, rate) {
            tokio::time::sleep_until(due.into()).await;
            // Reports of earlier bursts, without waiting: the relay settles them as they come.
            while let Some(Some(r)) = futures_util::FutureExt::now_or_never(next(&mut pending)) {
                latencies.push(r?);
            }
        }
        for (id, key, payload) in burst {
            let sent = Instant::now();
            let fut = send(producer, topic, id, key, payload);
            pending.push(async move { fut.await.map(|()| sent.elapsed()) });
        }
    }
    while let Some(r) = next(&mut pending).await {
        latencies.push(r?);
    }
    Ok(latencies)
}

/// Delivery reports of the `BaseProducer`: each record's send time comes back as its opaque.
struct Reports(std::sync::Mutex<Vec<Result<Duration, String>>>);

impl rdkafka::ClientContext for Reports {}

impl rdkafka::producer::ProducerContext for Reports {
    type DeliveryOpaque = Box<Instant>;

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, sent: Box<Instant>) {
        let r = match result {
            Ok(_) => Ok(sent.elapsed()),
            Err((e, _)) => Err(e.to_string()),
        };
        if let Ok(mut v) = self.0.lock() {
            v.push(r);
        }
    }
}

type Base = rdkafka::producer::BaseProducer<Reports>;

fn base_producer(cfg: rdkafka::ClientConfig) -> anyhow::Result<Base> {
    Ok(cfg.create_with_context(Reports(std::sync::Mutex::new(Vec::new())))?)
}

/// How many reports have come back.
fn reports(p: &Base) -> usize {
    p.context().0.lock().map(|v| v.len()).unwrap_or(0)
}

/// One record as the relay sends it (key, `id` header, payload), its send time as opaque.
fn base_record<'a>(
    topic: &'a str,
    (id, key, payload): &'a (String, String, String),
) -> rdkafka::producer::BaseRecord<'a, str, str, Box<Instant>> {
    rdkafka::producer::BaseRecord::with_opaque_to(topic, Box::new(Instant::now()))
        .key(key.as_str())
        .payload(payload.as_str())
        .headers(OwnedHeaders::new().insert(Header {
            key: "id",
            value: Some(id.as_str()),
        }))
}

/// Queues `record`; a refusal ends the benchmark.
fn enqueue<'a>(
    producer: &Base,
    record: rdkafka::producer::BaseRecord<'a, str, str, Box<Instant>>,
) -> anyhow::Result<()> {
    producer
        .send(record)
        .map_err(|(e, _)| anyhow::anyhow!("not queued: {e}"))
}

/// The warm-up record: acknowledged before timing starts, so the producer knows the leaders.
fn warm_up_record(topic: &str) -> rdkafka::producer::BaseRecord<'_, str, str, Box<Instant>> {
    rdkafka::producer::BaseRecord::with_opaque_to(topic, Box::new(Instant::now()))
        .key("warm-up")
        .payload("warm-up")
}

/// The reports collected so far, taken out; one failed delivery ends the benchmark.
fn take_reports(producer: &Base) -> anyhow::Result<Vec<Duration>> {
    let taken = std::mem::take(
        &mut *producer
            .context()
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?,
    );
    taken
        .into_iter()
        .map(|r| r.map_err(|e| anyhow::anyhow!("not delivered: {e}")))
        .collect()
}

/// What to produce, and how fast: the bench's records at its rate, in its bursts.
#[derive(Clone, Copy)]
struct Load<'a> {
    topic: &'a str,
    records: &'a [(String, String, String)],
    rate: u64,
    per_burst: usize,
}

impl<'a> Load<'a> {
    fn new(
        topic: &'a str,
        records: &'a [(String, String, String)],
        rate: u64,
        per_burst: usize,
    ) -> Self {
        Load {
            topic,
            records,
            rate,
            per_burst,
        }
    }
}

/// librdkafka's C interface alone: this thread produces each burst when it is due and serves
/// delivery reports (`rd_kafka_poll`) while it waits for the next.
fn base_floor(
    cfg: rdkafka::ClientConfig,
    load: &Load<'_>,
) -> anyhow::Result<(f64, f64, Vec<Duration>)> {
    let Load {
        topic,
        records,
        rate,
        per_burst,
    } = *load;
    let producer = base_producer(cfg)?;
    enqueue(&producer, warm_up_record(topic))?;
    while reports(&producer) == 0 {
        producer.poll(Duration::from_millis(100));
    }
    take_reports(&producer)?;
    let pid = std::process::id();
    let (cpu0, start) = (proc_stats::cpu_secs(pid).unwrap_or(0.0), Instant::now());
    for (b, burst) in records.chunks(per_burst).enumerate() {
        if let Some(due) = due(start, b, per_burst, rate) {
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                // poll's timeout is whole milliseconds: less than one would spin.
                if due - now < Duration::from_millis(1) {
                    std::thread::sleep(due - now);
                    producer.poll(Duration::ZERO);
                } else {
                    producer.poll(due - now);
                }
            }
        }
        for record in burst {
            enqueue(&producer, base_record(topic, record))?;
        }
    }
    while reports(&producer) < records.len() {
        producer.poll(Duration::from_millis(100));
    }
    let cpu = proc_stats::cpu_secs(pid).unwrap_or(0.0) - cpu0;
    Ok((start.elapsed().as_secs_f64(), cpu, take_reports(&producer)?))
}

/// `--io-event`: one task on the runtime produces each burst when it is due and serves the
/// delivery reports whenever librdkafka signals, through a pipe the reactor watches, that
/// some wait.
async fn io_floor(
    cfg: rdkafka::ClientConfig,
    load: &Load<'_>,
) -> anyhow::Result<(f64, f64, Vec<Duration>)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use tokio::io::unix::AsyncFd;

    let producer = base_producer(cfg)?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        anyhow::bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let rk = rdkafka::client::Client::native_ptr(producer.client());
    // SAFETY: the main queue of a live client; the write end outlives the producer (dropped
    // after it, below); the payload is a static byte.
    let queue = unsafe { rdkafka::bindings::rd_kafka_queue_get_main(rk) };
    unsafe {
        rdkafka::bindings::rd_kafka_queue_io_event_enable(
            queue,
            write_end.as_raw_fd(),
            b"1".as_ptr().cast(),
            1,
        )
    };
    // SAFETY: an OwnedFd stays open and returns the same descriptor while the AsyncFd owns it.
    let signal = unsafe { AsyncFd::register(read_end) }
        .map_err(|e| anyhow::anyhow!("registering the report pipe: {e}"))?;
    let waiting = || unsafe { rdkafka::bindings::rd_kafka_queue_length(queue) };
    let serve = |p: &Base| {
        while waiting() > 0 {
            p.poll(Duration::ZERO);
        }
    };
    let mut drain = [0u8; 64];
    let wait_signal = async |drain: &mut [u8]| -> anyhow::Result<()> {
        let mut guard = signal.readable().await?;
        // SAFETY: reading into a buffer of the given length from a descriptor we own.
        while unsafe {
            libc::read(
                guard.get_inner().as_raw_fd(),
                drain.as_mut_ptr().cast(),
                drain.len(),
            )
        } > 0
        {}
        guard.clear_ready();
        Ok(())
    };
    enqueue(&producer, warm_up_record(load.topic))?;
    while reports(&producer) == 0 {
        tokio::time::timeout(Duration::from_millis(100), wait_signal(&mut drain))
            .await
            .ok();
        serve(&producer);
    }
    take_reports(&producer)?;
    let pid = std::process::id();
    let (cpu0, start) = (proc_stats::cpu_secs(pid).unwrap_or(0.0), Instant::now());
    let mut bursts = load.records.chunks(load.per_burst).enumerate().peekable();
    while bursts.peek().is_some() || reports(&producer) < load.records.len() {
        let due = bursts
            .peek()
            .map(|(b, _)| due(start, *b, load.per_burst, load.rate).unwrap_or(start));
        tokio::select! {
            _ = tokio::time::sleep_until(due.unwrap_or(start).into()), if due.is_some() => {
                if let Some((_, burst)) = bursts.next() {
                    for record in burst {
                        enqueue(&producer, base_record(load.topic, record))?;
                    }
                }
            }
            r = wait_signal(&mut drain) => r?,
        }
        serve(&producer);
    }
    let cpu = proc_stats::cpu_secs(pid).unwrap_or(0.0) - cpu0;
    let (elapsed, latencies) = (start.elapsed().as_secs_f64(), take_reports(&producer)?);
    // SAFETY: the handle from rd_kafka_queue_get_main, released once, before the client.
    unsafe { rdkafka::bindings::rd_kafka_queue_destroy(queue) };
    drop(producer);
    drop(write_end);
    Ok((elapsed, cpu, latencies))
}

async fn next<S: futures_util::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    futures_util::StreamExt::next(s).await
}

/// One record as the relay sends it: key, `id` header, JSON payload; resolves on its report.
fn send(
    producer: &FutureProducer,
    topic: &str,
    id: &str,
    key: &str,
    payload: &str,
) -> impl std::future::Future<Output = anyhow::Result<()>> {
    let headers = OwnedHeaders::new().insert(Header {
        key: "id",
        value: Some(id),
    });
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .headers(headers);
    let queued = producer.send_result(record).map_err(|(e, _)| e);
    async move {
        match queued?.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(anyhow::anyhow!("not delivered: {e}")),
            Err(_) => Err(anyhow::anyhow!("report channel closed")),
        }
    }
}
