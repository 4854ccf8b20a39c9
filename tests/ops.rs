//! Operating outboxd as a sidecar: HTTP endpoints, metrics validated by promtool, status,
//! high availability, logs, and the shipped deployment files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The value of an unlabelled sample in Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn scrape(addr: &str) -> String {
    let (code, body) = http_get(addr, "/metrics").expect("relay answers /metrics");
    assert_eq!(code, 200);
    body
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/stack.sh (Debian package prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_http(
    addr: &str,
    path: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((code, body)) = http_get(addr, path) {
            if want(code, &body) {
                return (code, body);
            }
            assert!(
                Instant::now() < deadline,
                "{path} never matched; last: {code} {body}"
            );
        } else {
            assert!(Instant::now() < deadline, "{path} never answered");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_lag_rises_while_kafka_is_down_then_returns_to_zero() {
    let (mock, brokers, db, config) =
        setup_on_mock("metrics", 3, "delivery_timeout_ms = 2000\n").await;
    let addr = http_addr(&config);
    let mut relay = Relay::start(&config);
    let (_, body) = wait_http(&addr, "/readyz", Duration::from_secs(30), |c, _| c == 200).await;
    assert!(body.contains("leader"), "{body}");
    assert_eq!(http_get(&addr, "/healthz").unwrap().0, 200);

    let mut client = db.client().await;
    let mut before = Vec::new();
    for i in 0..10 {
        let events = [("order".to_string(), format!("a{}", i % 3))];
        before.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&before),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&before, &received);
    let text = scrape(&addr);
    promtool_check_metrics(&text);
    for name in [
        "outboxd_lag_seconds",
        "outboxd_events_published_total",
        "outboxd_publish_retries_total",
        "outboxd_delivery_stalls_total",
        "outboxd_commit_to_ack_seconds",
        "outboxd_replication_slot_lag_bytes",
        "outboxd_replication_slot_wal_status",
        "outboxd_inflight_events",
        "outboxd_is_leader",
        "outboxd_build_info",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    // The dashboard's panels for any running relay read what this one exports.
    let read: std::collections::HashSet<String> = dashboard_exprs()
        .iter()
        .flat_map(|e| metric_names(e))
        .collect();
    for name in [
        "outboxd_lag_seconds",
        "outboxd_events_published_total",
        "outboxd_commit_to_ack_seconds",
        "outboxd_replication_slot_lag_bytes",
        "outboxd_replication_slot_wal_status",
        "outboxd_inflight_events",
        "outboxd_is_leader",
    ] {
        assert!(read.contains(name), "the dashboard has no panel on {name}");
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "the dashboard reads {name}, which /metrics does not have:\n{text}"
        );
    }
    assert_eq!(sample(&text, "outboxd_is_leader"), Some(1.0));
    let topic_line = format!(
        "outboxd_events_published_total{{topic=\"{}\"}} 10",
        db.topic("order")
    );
    assert!(
        text.contains(&topic_line),
        "expected `{topic_line}` in:\n{text}"
    );

    mock.broker_down(1).unwrap();
    let mut during = Vec::new();
    for i in 0..5 {
        let events = [("order".to_string(), format!("a{}", i % 3))];
        during.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lag1 = sample(&scrape(&addr), "outboxd_lag_seconds").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let text = scrape(&addr);
    let lag2 = sample(&text, "outboxd_lag_seconds").unwrap();
    assert!(
        lag1 >= 2.0 && lag2 > lag1,
        "lag must rise while Kafka is down: {lag1} then {lag2}"
    );
    let (code, body) = wait_http(&addr, "/readyz", Duration::from_secs(15), |c, _| c == 503).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body.lines().count(), 1, "one-line reason: {body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(&addr);
        if sample(&text, "outboxd_delivery_stalls_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deliveries unacknowledged past kafka.delivery_timeout_ms (2 s) must be reported:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    mock.broker_up(1).unwrap();
    let mut all = before.clone();
    all.extend(during);
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&all),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_exactly_written(&all, &received);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = sample(&scrape(&addr), "outboxd_lag_seconds").unwrap();
        if lag == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag never returned to 0 (still {lag})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_http(&addr, "/readyz", Duration::from_secs(30), |c, _| c == 200).await;
    promtool_check_metrics(&scrape(&addr));
    relay.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_takes_over_when_the_leader_is_killed_mid_stream_and_nothing_is_lost() {
    let brokers = kafka_brokers();
    let (db, config_a) = setup("ha", &brokers, "[kafka]\nmax_in_flight = 500\n").await;
    let config_b = db.config(&brokers, "[kafka]\nmax_in_flight = 500\n");
    let (addr_a, addr_b) = (http_addr(&config_a), http_addr(&config_b));
    let mut a = Relay::start(&config_a);
    wait_http(&addr_a, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("leader")
    })
    .await;
    let mut b = Relay::start(&config_b);
    let (_, body) = wait_http(&addr_b, "/readyz", Duration::from_secs(30), |c, _| c == 200).await;
    assert!(
        body.contains("standby"),
        "second instance must be a ready standby: {body}"
    );
    assert_eq!(sample(&scrape(&addr_b), "outboxd_is_leader"), Some(0.0));

    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut client = db.client().await;
            let mut rng = Rng::new(42);
            let mut written = Vec::new();
            for _ in 0..600 {
                let mut events: Vec<(String, String)> = (0..rng.range(1, 8))
                    .map(|_| ("order".to_string(), format!("agg-{}", rng.range(0, 40))))
                    .collect();
                events.sort_by(|x, y| x.1.cmp(&y.1));
                written.extend(write_txn(&mut client, &events, false).await.unwrap());
            }
            written
        })
    };
    eventually(
        Duration::from_secs(30),
        "leader confirmed part of the stream",
        || async { db.confirmed_lsn().await > 0 && !writer.is_finished() },
    )
    .await;
    a.kill();
    let killed = Instant::now();
    wait_http(&addr_b, "/readyz", Duration::from_secs(20), |c, body| {
        c == 200 && body.contains("leader")
    })
    .await;
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    let written = writer.await.unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(120),
        Duration::from_secs(1),
    );
    let dups = assert_exactly_written(&written, &received);
    eprintln!(
        "takeover after {takeover:?}; {} events, {dups} duplicates",
        written.len()
    );
    assert_eq!(sample(&scrape(&addr_b), "outboxd_is_leader"), Some(1.0));
    b.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_when_the_leaders_network_goes_silent_and_nothing_is_lost() {
    // The leader reaches PostgreSQL through a proxy that stops moving bytes without closing
    // anything: PostgreSQL still sees live TCP peers, nobody says goodbye. The standby must
    // take over within postgres.stream_timeout_ms (3 s) + a few seconds.
    let brokers = kafka_brokers();
    let extra = "[postgres]\nstream_timeout_ms = 3000\n";
    let (db, _) = setup("silent", &brokers, extra).await;
    let proxy = common::proxy::Proxy::start(db.socket_addr());
    let config_a = db.via_port(proxy.port).config(&brokers, extra);
    let config_b = db.config(&brokers, extra);
    let (addr_a, addr_b) = (http_addr(&config_a), http_addr(&config_b));
    let a = Relay::start(&config_a);
    wait_http(&addr_a, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("leader")
    })
    .await;
    let _b = Relay::start(&config_b);
    wait_http(&addr_b, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("standby")
    })
    .await;
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut client = db.client().await;
            let mut written = Vec::new();
            for i in 0..300 {
                let events = [("order".to_string(), format!("k{}", i % 7))];
                written.extend(write_txn(&mut client, &events, false).await.unwrap());
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.black_hole(true);
    let silenced = Instant::now();
    wait_http(&addr_b, "/readyz", Duration::from_secs(30), |c, body| {
        c == 200 && body.contains("leader")
    })
    .await;
    let takeover = silenced.elapsed();
    assert!(
        takeover < Duration::from_secs(3 + 5 + 4),
        "takeover took {takeover:?}; leader log:\n{}",
        a.log_text()
    );
    let written = writer.await.unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let dups = assert_exactly_written(&written, &received);
    assert!(
        a.log_text().contains("no message from the server")
            || a.log_text().contains("did not answer within 3 s"),
        "the silenced leader noticed by itself; log:\n{}",
        a.log_text()
    );
    eprintln!("takeover {takeover:?} after the leader's path went silent; {dups} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_that_takes_over_never_moves_the_slot_back() {
    // The standby opened the slot long before it took over; the position it read then is
    // stale. PostgreSQL 15/16 before their 2025 minor releases accept a lower confirmed
    // position, so sending it would move the slot back (and republish what the leader had
    // confirmed).
    let brokers = kafka_brokers();
    let (db, config_a) = setup("stale", &brokers, "").await;
    let config_b = db.config(&brokers, "");
    let (addr_a, addr_b) = (http_addr(&config_a), http_addr(&config_b));
    let mut a = Relay::start(&config_a);
    wait_http(&addr_a, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("leader")
    })
    .await;
    let _b = Relay::start(&config_b);
    wait_http(&addr_b, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("standby")
    })
    .await;
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..50 {
        written.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("a{}", i % 5))],
                false,
            )
            .await
            .unwrap(),
        );
    }
    let last_written = db.current_lsn().await;
    eventually(
        Duration::from_secs(30),
        "leader confirmed everything",
        || async { db.confirmed_lsn().await >= last_written },
    )
    .await;
    let confirmed_by_leader = db.confirmed_lsn().await;
    a.kill();
    let watch_until = Instant::now() + Duration::from_secs(4);
    let mut took_over = false;
    let watcher = db.client().await;
    while Instant::now() < watch_until || !took_over {
        let now = db.confirmed_lsn().await;
        assert!(
            now >= confirmed_by_leader,
            "slot moved back from {confirmed_by_leader:X} to {now:X} when the standby took over"
        );
        // Recent PostgreSQL minor releases ignore a lower position; what the relay sends is
        // in pg_stat_replication.flush_lsn.
        let sent: Option<String> = watcher
            .query_opt(
                "SELECT r.flush_lsn::text FROM pg_stat_replication r \
                 JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
                &[&db.slot()],
            )
            .await
            .unwrap()
            .and_then(|row| row.get(0));
        if let Some(sent) = sent {
            let sent = parse_lsn(&sent);
            assert!(
                sent >= confirmed_by_leader,
                "the standby confirmed {sent:X}, below the leader's {confirmed_by_leader:X}"
            );
        }
        took_over = took_over
            || http_get(&addr_b, "/readyz").is_some_and(|(_, body)| body.contains("leader"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::from_millis(500),
    );
    assert_exactly_written(&written, &received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_and_status_exits_1_when_slot_lag_exceeds_the_threshold() {
    let brokers = kafka_brokers();
    // A cluster of its own: the shared one takes WAL from every parallel test, which can
    // exceed any small threshold before the first check.
    let cluster = PrivateCluster::start("");
    let db = cluster.db("threshold");
    let config = db.config(&brokers, "[postgres]\nmax_slot_lag_bytes = 65536\n");
    migrate(&config);
    // Hold the slot's leadership lock ourselves: the relay stays a standby, the slot stays put.
    let holder = db.client().await;
    holder
        .query_one(
            "SELECT pg_advisory_lock(hashtextextended('outboxd.slot.' || $1, 0))",
            &[&db.slot()],
        )
        .await
        .unwrap();
    let addr = http_addr(&config);
    let _relay = Relay::start(&config);
    let (_, body) = wait_http(&addr, "/readyz", Duration::from_secs(30), |c, _| c == 200).await;
    assert!(body.contains("standby"), "{body}");

    // Healthy under a generous threshold (other tests write WAL to the same cluster, so the
    // standby's idle slot lag is not zero).
    let generous = db.config(&brokers, "[postgres]\nmax_slot_lag_bytes = 100000000000\n");
    let out = outboxd(&["status", "--config", generous.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("healthy") && text.contains(db.slot()),
        "{text}"
    );

    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE filler (v text); INSERT INTO filler SELECT repeat('x', 500) FROM generate_series(1, 2000)")
        .await
        .unwrap();
    let (_, body) = wait_http(&addr, "/readyz", Duration::from_secs(20), |c, _| c == 503).await;
    assert!(body.contains("max_slot_lag_bytes"), "{body}");
    let out = outboxd(
        &["status", "--json", "--config", config.to_str().unwrap()],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["slot"]["lag_bytes"].as_i64().unwrap() > 65536,
        "{json}"
    );
    assert!(json["leader"]["pid"].as_i64().is_some(), "{json}");
    assert!(
        json["problems"][0]
            .as_str()
            .unwrap()
            .contains("max_slot_lag_bytes"),
        "{json}"
    );
}

#[tokio::test]
async fn status_exits_2_when_postgres_is_unreachable() {
    let out = outboxd(
        &["status"],
        &[
            (
                "OUTBOXD_POSTGRES_URL",
                &format!("postgres://u:pw@127.0.0.1:{}/db", free_port()),
            ),
            ("OUTBOXD_KAFKA_BROKERS", "127.0.0.1:1"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cannot connect"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_event_id_and_never_the_password() {
    let brokers = kafka_brokers();
    let (db, config) = setup("jsonlog", &brokers, "").await;
    let admin = db.client().await;
    let role = unique("logrole").to_lowercase();
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN REPLICATION PASSWORD 'Sup3rSecret'; GRANT SELECT ON outbox TO {role}"))
        .await
        .unwrap();
    let base = pg_admin_url();
    let hostport = base.split('@').nth(1).unwrap().split('/').next().unwrap();
    let url = format!("postgres://{role}:Sup3rSecret@{hostport}/{}", db.name);
    let mut relay = Relay::start_with_env(
        &config,
        &[
            ("OUTBOXD_POSTGRES_URL", url.as_str()),
            ("OUTBOXD_LOG_FORMAT", "json"),
        ],
    );
    // An event whose headers are not an object: dead-lettered and logged with its id.
    let row = admin
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             VALUES ('order', 'x1', 'Odd', '{}', '[1, 2]') RETURNING id::text",
            &[],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    let expect: HashSet<String> = [id.clone()].into();
    let received = consume(
        &brokers,
        &["outbox.dlq".to_string()],
        &expect,
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert!(received.iter().any(|r| r.id.as_deref() == Some(&id)));
    relay.terminate(Duration::from_secs(20));
    let log = relay.log_text();
    let mut found = false;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"]
            .as_str()
            .unwrap_or("")
            .contains("dead-lettered")
        {
            assert_eq!(v["event_id"].as_str(), Some(id.as_str()), "{line}");
            assert_eq!(v["reason"].as_str(), Some("invalid_headers"), "{line}");
            found = true;
        }
    }
    assert!(found, "no log line about the dead-lettered event:\n{log}");
    assert!(!log.contains("Sup3rSecret"), "password leaked:\n{log}");
}

fn yaml_parses(path: &Path) {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every PromQL expression of the shipped Grafana dashboard (`docker/grafana/outboxd.json`).
fn dashboard_exprs() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docker/grafana/outboxd.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    exprs
}

/// The `outboxd_…` metric names an expression reads (a histogram's `_bucket`, `_sum` and
/// `_count` series named by the histogram).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("outboxd_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

/// The Grafana dashboard's queries are valid PromQL (each one a recording rule that
/// `promtool check rules` accepts) over metrics the relay declares (`src/metrics.rs`); the
/// ones any running relay exports are checked against a real scrape in
/// `metrics_pass_promtool_and_lag_rises_while_kafka_is_down_then_returns_to_zero`.
#[test]
fn dashboard_queries_are_valid_promql_over_metrics_the_relay_declares() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut rules = String::from("groups:\n  - name: outboxd-dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: outboxd_dashboard:query_{i}\n        expr: {}\n",
            serde_json::Value::String(e.clone())
        ));
    }
    let file = std::env::temp_dir().join(unique("dashboard-rules") + ".yml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules", file.to_str().unwrap()])
        .output()
        .expect("promtool installed by scripts/stack.sh");
    assert!(
        out.status.success(),
        "the dashboard's queries are not valid PromQL: {}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let declared = std::fs::read_to_string(root.join("src/metrics.rs")).unwrap();
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "`{e}` reads no outboxd metric");
        for name in names {
            assert!(
                declared.contains(&format!("\"{name}\"")),
                "the dashboard reads `{name}`, which src/metrics.rs does not declare: `{e}`"
            );
        }
    }
}

#[test]
fn shipped_prometheus_files_and_manifests_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .output()
            .expect("promtool installed by scripts/stack.sh");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let rules = root.join("docker/prometheus/alerts.yml");
    let config = root.join("docker/prometheus/prometheus.yml");
    promtool(&["check", "rules", rules.to_str().unwrap()]);
    promtool(&["check", "config", "--syntax-only", config.to_str().unwrap()]);
    let alerts = std::fs::read_to_string(&rules).unwrap();
    assert!(
        alerts.contains("outboxd_lag_seconds"),
        "an alert on the lag gauge is shipped"
    );
    for f in [
        "docker/compose.yml",
        "docker/kubernetes/sidecar.yaml",
        "docker/prometheus/alerts.yml",
    ] {
        yaml_parses(&root.join(f));
    }
    let k8s = std::fs::read_to_string(root.join("docker/kubernetes/sidecar.yaml")).unwrap();
    assert!(
        k8s.contains("/healthz") && k8s.contains("/readyz"),
        "probes on /healthz and /readyz"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_stops_with_the_fix_unless_recreation_is_configured() {
    let brokers = kafka_brokers();
    let cluster = PrivateCluster::start("-c max_slot_wal_keep_size=1MB -c wal_keep_size=0");
    let topic_prefix = unique("lost").to_lowercase();
    let env = [
        ("OUTBOXD_POSTGRES_URL", cluster.url.as_str()),
        ("OUTBOXD_KAFKA_BROKERS", brokers.as_str()),
        (
            "OUTBOXD_TOPIC_TEMPLATE",
            &format!("{topic_prefix}.{{aggregatetype}}"),
        ),
    ];
    let out = outboxd(&["migrate"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = connect(&cluster.url).await;
    // With nothing confirming the slot, PostgreSQL removes WAL it still needs at a checkpoint.
    client
        .batch_execute(
            "CREATE TABLE filler (v text);
             INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal();
             INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000);
             SELECT pg_switch_wal();
             CHECKPOINT;",
        )
        .await
        .unwrap();
    let status: String = client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "lost",
        "the scenario must really invalidate the slot"
    );

    let http = format!("127.0.0.1:{}", free_port());
    let mut with_http = env.to_vec();
    with_http.push(("OUTBOXD_HTTP_ADDR", http.as_str()));
    let out = outboxd(&["run"], &with_http);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("wal_status = lost") && err.contains("recreate_lost_slot"),
        "{err}"
    );
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 1, "by default the lost slot is left alone");

    // Explicit opt-in: the slot is recreated, with a warning, and publishing resumes.
    let dir = std::env::temp_dir().join(unique("lostcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!("[postgres]\nrecreate_lost_slot = true\n[http]\naddr = \"{http}\"\n"),
    )
    .unwrap();
    let mut relay = Relay::start_with_env(&config, &env);
    eventually(Duration::from_secs(30), "slot recreated", || async {
        let c = connect(&cluster.url).await;
        c.query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outboxd'",
            &[],
        )
        .await
        .map(|r| r.get::<_, Option<String>>(0).as_deref() == Some("reserved"))
        .unwrap_or(false)
    })
    .await;
    // Wait until it streams (the recreated slot starts at the current position).
    wait_http(&http, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("leader")
    })
    .await;
    let row = client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o1', 'Placed', '{}') RETURNING id::text",
            &[],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    let received = consume(
        &brokers,
        &[format!("{topic_prefix}.order")],
        &[id.clone()].into(),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert!(received
        .iter()
        .any(|r| r.id.as_deref() == Some(id.as_str())));
    relay.assert_running();
    let log = relay.log_text();
    assert!(
        log.contains("recreating it") && log.contains("skipped"),
        "{log}"
    );
}

/// Holds the slot with PostgreSQL's own pg_recvlogical, under a chosen application_name.
fn hold_slot(db: &TestDb, application_name: &str) -> std::process::Child {
    let bindir = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/pg_recvlogical"))
        .find(|p| p.exists())
        .expect("pg_recvlogical");
    let base = pg_admin_url();
    let hostport = base.split('@').nth(1).unwrap().split('/').next().unwrap();
    let (host, port) = hostport.split_once(':').unwrap();
    Command::new(bindir)
        .args([
            "-d",
            &format!("host={host} port={port} user=postgres dbname={} application_name={application_name}", db.name),
            "-S",
            db.slot(),
            "--start",
            "--no-loop",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=outboxd",
            "-f",
            "/dev/null",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn slot_active(db: &TestDb) -> Option<i32> {
    db.client()
        .await
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_outboxd_slot_holder_is_terminated_and_a_foreign_one_is_waited_for() {
    let brokers = kafka_brokers();
    // A foreign holder (pg_recvlogical under its own name) is never terminated.
    let (db, config) = setup("foreign", &brokers, "").await;
    let mut foreign = hold_slot(&db, "pg_recvlogical");
    eventually(
        Duration::from_secs(10),
        "pg_recvlogical holds the slot",
        || async { slot_active(&db).await.is_some() },
    )
    .await;
    let addr = http_addr(&config);
    let mut relay = Relay::start(&config);
    let (_, body) = wait_http(&addr, "/readyz", Duration::from_secs(20), |c, b| {
        c == 503 && b.contains("active for PID")
    })
    .await;
    assert!(body.starts_with("not ready"), "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        foreign.try_wait().unwrap().is_none(),
        "a foreign slot holder must not be terminated"
    );
    assert!(
        relay.log_text().contains("waiting for it to end"),
        "{}",
        relay.log_text()
    );
    // Once it goes away, the relay takes the slot by itself.
    foreign.kill().unwrap();
    foreign.wait().unwrap();
    wait_http(&addr, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("leader")
    })
    .await;
    relay.kill();

    // A stale outboxd replication connection (its lock session gone) is terminated.
    let (db, config) = setup("stale", &brokers, "").await;
    let mut stale = hold_slot(&db, "outboxd-replication");
    eventually(
        Duration::from_secs(10),
        "stale holder holds the slot",
        || async { slot_active(&db).await.is_some() },
    )
    .await;
    let addr = http_addr(&config);
    let relay = Relay::start(&config);
    wait_http(&addr, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("leader")
    })
    .await;
    let mut client = db.client().await;
    let written = write_txn(
        &mut client,
        &[("order".to_string(), "a".to_string())],
        false,
    )
    .await
    .unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&written, &received);
    assert!(
        relay.log_text().contains("terminating it"),
        "{}",
        relay.log_text()
    );
    let _ = stale.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_standby_names_that_can_pick_the_relay_are_reported() {
    // With the relay's walsender as a synchronous standby every commit would wait for Kafka.
    // (synchronous_commit = local keeps this test's own commits from waiting.)
    let brokers = kafka_brokers();
    let cluster = PrivateCluster::start("-c synchronous_commit=local");
    let admin = cluster.local_client("postgres").await;
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '\"outboxd-replication\"'",
        "SELECT pg_reload_conf()",
    ] {
        admin.execute(sql, &[]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let env = [
        ("OUTBOXD_POSTGRES_URL", cluster.url.as_str()),
        ("OUTBOXD_KAFKA_BROKERS", brokers.as_str()),
        ("OUTBOXD_HTTP_ADDR", "127.0.0.1:0"),
    ];
    let out = outboxd(&["migrate"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = outboxd(&["status"], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("synchronous_standby_names"), "{text}");

    let dir = std::env::temp_dir().join(unique("syncrep"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{brokers}\"\n[http]\naddr = \"127.0.0.1:{}\"\n",
            cluster.url,
            free_port()
        ),
    )
    .unwrap();
    let relay = Relay::start(&config);
    eventually(Duration::from_secs(20), "the relay warns at start", || {
        let log = relay.log_text();
        async move { log.contains("WARN") && log.contains("every commit would wait for Kafka") }
    })
    .await;
}

/// Every connection attempt is bounded, handshake included, and logged: with the relay's path
/// to PostgreSQL black-holed (TCP accepted, no byte moves), a reconnect used to hang without a
/// line until the path came back (89 s measured). `outboxd_unable_to_publish_seconds` and
/// `/readyz` say how long publishing has been impossible; when the path returns, every event
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_into_a_silent_postgres_path_is_bounded_and_logged_per_attempt() {
    let brokers = kafka_brokers();
    let extra = "[postgres]\nstream_timeout_ms = 3000\n[retry]\nunready_after_ms = 5000\n";
    let (db, _) = setup("silentre", &brokers, extra).await;
    let proxy = common::proxy::Proxy::start(db.socket_addr());
    let via = db.via_port(proxy.port);
    let config = via.config(&brokers, extra);
    // connect_timeout = 2: each attempt (TCP, TLS, authentication) is bounded at 4 s.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(&via.url, &format!("{}?connect_timeout=2", via.url)),
    )
    .unwrap();
    let addr = http_addr(&config);
    let relay = Relay::start(&config);
    wait_http(&addr, "/readyz", Duration::from_secs(30), |c, b| {
        c == 200 && b.contains("leader")
    })
    .await;
    proxy.black_hole(true);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let log = relay.log_text();
    let attempts = log.matches("relay interrupted; retrying").count();
    assert!(
        attempts >= 3,
        "{attempts} attempts logged in 20 s; log:\n{log}"
    );
    assert!(log.contains("no answer within 4 s"), "log:\n{log}");
    let unable = sample(&scrape(&addr), "outboxd_unable_to_publish_seconds").unwrap();
    assert!(unable >= 10.0, "unable to publish for {unable} s");
    let (code, body) = http_get(&addr, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    proxy.black_hole(false);
    let mut client = db.client().await;
    let written = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_written(&written, &received, true);
}
