//! The HTTP endpoint: the status page at `/` in a real browser, and its exposure (review E3): `/status` names slots, topics and errors, so it
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

/// Debian's chromium, headless, as root (no sandbox), with a profile of its own.
fn chromium(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .args(args)
        .output()
        .expect("chromium (scripts/stack.sh installs Debian's package)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The status page at `/`, loaded in a real browser (Debian's chromium, headless): it names
/// the role (leader), the slot's confirmed position as PostgreSQL reports it, the lag chart,
/// the event dead-lettered for a topic Kafka cannot name — whose destination, built from an
/// `aggregatetype` holding HTML, is shown as text and never parsed as markup — and the last
/// error (the relay's replication connection terminated by an administrator). A screenshot
/// is taken and is a PNG of some substance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_role_position_lag_dead_letters_and_the_last_error_in_a_browser() {
    let brokers = kafka_brokers();
    let (db, config) = setup("page", &brokers, "").await;
    let addr = http_addr(&config);
    let _relay = Relay::start(&config);
    db.streaming().await;
    let client = db.client().await;
    let insert = |agg: &'static str| {
        let client = &client;
        async move {
            let id: String = client
                .query_one(
                    "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                     VALUES ($1, 'k-1', 'Happened', '{}') RETURNING id::text",
                    &[&agg],
                )
                .await
                .unwrap()
                .get(0);
            id
        }
    };
    insert("order").await;
    let poison = insert("bad <b>type</b>").await;
    insert("order").await;
    eventually(
        Duration::from_secs(30),
        "the dead letter on the page",
        || async { http_get(&addr, "/").is_some_and(|(_, page)| page.contains(&poison)) },
    )
    .await;
    client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .unwrap();
    db.streaming().await;
    // The page shows the position the monitor last read (every 5 s). Other databases' WAL
    // moves the slot on all the time, so the page's position is checked to lie between the
    // slot's position before the page was loaded and after.
    let lsn = || {
        let client = &client;
        let slot = db.slot().to_string();
        async move {
            let row = client
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    let shown = |page: &str| -> Option<String> {
        let rest = page.split("<code id=\"position\">").nth(1)?;
        Some(rest.split('<').next()?.to_string())
    };
    let before = lsn().await;
    let within = |p: String, lo: String, hi: String| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT $1::text::pg_lsn BETWEEN $2::text::pg_lsn AND $3::text::pg_lsn",
                    &[&p, &lo, &hi],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    eventually(
        Duration::from_secs(30),
        "the page shows the slot's position",
        || async {
            let page = http_get(&addr, "/").map(|(_, p)| p).unwrap_or_default();
            match shown(&page) {
                Some(p) if page.contains("class=\"role leader\"") => {
                    within(p, before.clone(), lsn().await).await
                }
                _ => false,
            }
        },
    )
    .await;

    let url = format!("http://{addr}/");
    let dom = String::from_utf8(chromium(&db.dir, &["--dump-dom", &url]).stdout).unwrap();
    assert!(
        dom.contains("<span id=\"role\" class=\"role leader\">leader</span>"),
        "{dom}"
    );
    let position = shown(&dom).unwrap_or_else(|| panic!("no position: {dom}"));
    let after = lsn().await;
    assert!(
        within(position.clone(), before.clone(), after.clone()).await,
        "the page's position {position} is not the slot's (between {before} and {after})"
    );
    assert!(
        dom.contains("<svg id=\"lag-chart\"") && dom.contains("<polyline"),
        "{dom}"
    );
    let row = dom
        .split("<tr>")
        .find(|r| r.contains(&poison))
        .unwrap_or_else(|| panic!("dead letter {poison} not on the page: {dom}"));
    assert!(row.contains("invalid_topic"), "{row}");
    assert!(
        row.contains("&lt;b&gt;type&lt;/b&gt;"),
        "the destination is not shown as text: {row}"
    );
    assert!(
        !dom.contains("<b>type</b>"),
        "the destination was parsed as markup: {dom}"
    );
    let error = dom.split("id=\"last-error\"").nth(1).unwrap_or_default();
    assert!(error.contains("terminat"), "last error: {error}");

    let shot = db.dir.join("status.png");
    chromium(
        &db.dir,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1000",
            &url,
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
