//! Test harness: real PostgreSQL and a real Kafka-protocol broker, started by
//! `scripts/stack.sh` (which `scripts/test.sh` runs). Every test gets its own database, slot,
//! publication and topics, so tests run in parallel.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

mod amqp10;
mod aws;
mod brokers;
mod debezium;
mod gcp;
mod kafka;
mod pg;
pub mod proxy;
mod relay;
mod workload;

#[allow(unused_imports)] // only the Service Bus sink tests use them
pub use amqp10::*;
#[allow(unused_imports)] // only the AWS sink tests use them
pub use aws::*;
#[allow(unused_imports)] // only the sink tests use them
pub use brokers::*;
#[allow(unused_imports)] // only the Debezium comparisons use it
pub use debezium::*;
#[allow(unused_imports)] // only the Pub/Sub sink tests use them
pub use gcp::*;
pub use kafka::*;
pub use pg::*;
pub use relay::*;
pub use workload::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_postgres::{Client, NoTls};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000_000;
    format!("{prefix}_{}_{t}_{n}", std::process::id())
}

/// A port nobody listens on right now, below the kernel's ephemeral range (see
/// `scripts/stack.sh free_port`: a port from bind(0) can be taken as the source port of any
/// outgoing connection before its server binds it).
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .clamp(20001, 32768);
    let mut rng = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            ^ u64::from(std::process::id()) << 32,
    );
    for _ in 0..1000 {
        let port = rng.range(20000, u64::from(low) - 1) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small deterministic PRNG (xorshift) so workloads are varied but reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.next() % (hi_inclusive - lo + 1)
    }
}
