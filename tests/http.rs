//! The HTTP endpoint's exposure (review E3): `/status` names slots, topics and errors, so it
//! listens on loopback unless `http.addr` says otherwise (the container image and manifests
//! set `0.0.0.0:9465`), and a flood of idle connections cannot take the file descriptors the
//! relay needs for PostgreSQL and the broker: at most 64 are served at once, more are closed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// The port the relay listens on without `http.addr` (docs/configuration.md).
const DEFAULT_PORT: u16 = 9465;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_http_addr_the_endpoint_listens_on_loopback_only() {
    let brokers = kafka_brokers();
    let (_db, config) = setup("httpdefault", &brokers, "").await;
    // The harness's config names a free port; this one must use the default.
    let text = std::fs::read_to_string(&config).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !(l.starts_with("addr = \"127.0.0.1:") || *l == "[http]"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, text).unwrap();
    let _relay = Relay::start(&config);
    let local = format!("127.0.0.1:{DEFAULT_PORT}");
    eventually(Duration::from_secs(30), "the endpoint answers", || async {
        http_get(&local, "/healthz").is_some()
    })
    .await;
    // 127.0.0.2 is this machine too (all of 127/8 is loopback): only a listener on every
    // address (0.0.0.0) answers there.
    let other = format!("127.0.0.2:{DEFAULT_PORT}");
    assert!(
        TcpStream::connect_timeout(&other.parse().unwrap(), Duration::from_secs(2)).is_err(),
        "the endpoint answers on {other}: it listens beyond 127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_serves_64_connections_at_once_and_closes_the_next() {
    let brokers = kafka_brokers();
    let (_db, config) = setup("httpcap", &brokers, "").await;
    let addr = http_addr(&config);
    let _relay = Relay::start(&config);
    eventually(Duration::from_secs(30), "the endpoint answers", || async {
        http_get(&addr, "/healthz").is_some()
    })
    .await;
    // 64 idle connections: each waits for a request the relay never gets.
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(&addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
    let mut buf = Vec::new();
    let read = extra.read_to_end(&mut buf);
    let held = matches!(&read, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    assert!(
        buf.is_empty() && !held,
        "the 65th connection was served or held open ({read:?}, {} bytes)",
        buf.len()
    );
    drop(idle);
    eventually(
        Duration::from_secs(15),
        "served again once the idle connections closed",
        || async { http_get(&addr, "/healthz").is_some() },
    )
    .await;
}
