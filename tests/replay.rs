//! `outboxd verify` proves delivery (or lists exactly what is missing); `outboxd replay`
//! republishes retained events with their original ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_lists_exactly_the_events_missing_from_kafka_and_replay_restores_them() {
    let kafka = kafka_brokers();
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let elsewhere = mock.bootstrap_servers();
    let (db, config) = setup("verify", &kafka, "").await;
    // The same slot, once published to another cluster: those records are not in this one.
    let config_elsewhere = db.config(&elsewhere, "[kafka]\ncreate_topics = false\n");
    mock.create_topic(&db.topic("order"), 1, 1).unwrap();
    let mut client = db.client().await;

    let mut relay = Relay::start(&config_elsewhere);
    let mut lost = Vec::new();
    for i in 0..5 {
        lost.extend(
            write_txn(&mut client, &[("order".into(), format!("a{i}"))], false)
                .await
                .unwrap(),
        );
    }
    let got = consume(
        &elsewhere,
        &[db.topic("order")],
        &ids(&lost),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&lost, &got);
    assert_eq!(relay.terminate(Duration::from_secs(20)).code(), Some(0));

    let mut relay = Relay::start(&config);
    let mut kept = Vec::new();
    for i in 0..5 {
        kept.extend(
            write_txn(&mut client, &[("order".into(), format!("b{i}"))], false)
                .await
                .unwrap(),
        );
    }
    let got = consume(
        &kafka,
        &[db.topic("order")],
        &ids(&kept),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    assert_exactly_written(&kept, &got);
    assert_eq!(relay.terminate(Duration::from_secs(20)).code(), Some(0));

    let cfg = config.to_str().unwrap();
    let out = outboxd(&["verify", "--since", "1 hour", "--config", cfg], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let missing: HashSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("missing "))
        .map(str::to_string)
        .collect();
    assert_eq!(
        missing,
        ids(&lost),
        "verify must report exactly the events that never reached this cluster:\n{text}"
    );
    assert!(text.contains("checked 10 retained events"), "{text}");

    // --aggregatetype narrows the selection; a window in the future selects nothing.
    let out = outboxd(
        &[
            "verify",
            "--since",
            "1 hour",
            "--aggregatetype",
            "customer",
            "--config",
            cfg,
        ],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = outboxd(&["verify", "--since", "2999-01-01", "--config", cfg], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("checked 0 retained events"));

    let out = outboxd(&["replay", "--since", "1 hour", "--config", cfg], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 10 events"));
    let mut all = lost.clone();
    all.extend(kept.iter().cloned());
    let got = consume(
        &kafka,
        &[db.topic("order")],
        &ids(&all),
        Duration::from_secs(30),
        Duration::ZERO,
    );
    // Replayed records are exact copies: same ids, keys, headers and payloads.
    assert_exactly_written(&all, &got);
    let out = outboxd(
        &["verify", "--since", "1 hour", "--config", cfg, "--json"],
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["missing"].as_array().unwrap().len(), 0);
}
