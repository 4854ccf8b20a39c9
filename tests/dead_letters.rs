//! `outboxd dead-letters list|show|redrive` against real PostgreSQL and Kafka: dead letters in
//! the dead-letter topic and the dead-letter table are listed with their reasons, shown in
//! full, and redriven to their destination with their id, key, headers and payload — once,
//! however often the command runs — while a dead letter whose cause is not fixed yet is
//! refused again, said with why, and redriven by a later run once it is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Inserts an event; its id.
async fn insert(client: &tokio_postgres::Client, agg: &str, kind: &str, payload: &Value) -> String {
    client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ($1, 'k-1', $2, $3::text::jsonb) RETURNING id::text",
            &[&agg, &kind, &payload.to_string()],
        )
        .await
        .unwrap()
        .get(0)
}

/// `outboxd dead-letters ARGS` with `config`: (exit code, stdout).
fn dead_letters(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["--config", config.to_str().unwrap(), "dead-letters"];
    all.extend_from_slice(args);
    let out = outboxd(&all, &[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code(), format!("{text}{err}"))
}

/// How many records of each id `topic` holds (read to its end, then 1 s more).
fn copies(brokers: &str, topic: &str, ids: &[&String]) -> HashMap<String, usize> {
    let expect = ids.iter().map(|s| s.to_string()).collect();
    let got = consume(
        brokers,
        &[topic.to_string()],
        &expect,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let mut n = HashMap::new();
    for r in &got {
        if let Some(id) = &r.id {
            *n.entry(id.clone()).or_insert(0) += 1;
        }
    }
    n
}

/// Two events that break their schema (`schema_invalid`) and one whose topic Kafka cannot name
/// (`invalid_topic`) in the dead-letter topic; one of 200 kB (`too_large`, refused by the topic
/// too) in the dead-letter table. `list` names all four; `show` prints one in full; `redrive`
/// without a filter is refused; `redrive --reason schema_invalid` republishes the two with
/// their id, key, `type` header and payload and no `outboxd.dlq.*` header, and a second run
/// redrives nothing; `redrive --all` says the other two are refused again (exit 1); once the
/// cause is fixed (the 2,000-byte limit lifted) `redrive --id` republishes the large one — each
/// id exactly once in its topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_redriven_once_after_the_cause_is_fixed() {
    let brokers = kafka_brokers();
    let db = TestDb::new("redrive").await;
    let schemas = db.dir.join("schemas");
    std::fs::create_dir_all(schemas.join("order")).unwrap();
    std::fs::write(
        schemas.join("order/Placed.json"),
        r#"{"type": "object", "required": ["total"], "properties": {"total": {"type": "integer"}}}"#,
    )
    .unwrap();
    let dlq_topic = format!("{}.dlq", db.name);
    let config = db.config(
        &brokers,
        &format!(
            "[kafka]\ndlq_topic = \"{dlq_topic}\"\nmax_message_bytes = 2000\n\n[schemas]\ndir = \"{}\"\n",
            schemas.display()
        ),
    );
    migrate(&config);
    let client = db.client().await;
    create_aggregates_table(&client).await;
    let topic = db.topic("order");
    let good = insert(&client, "order", "Placed", &json!({"total": 1})).await;
    let invalid: Vec<String> = vec![
        insert(&client, "order", "Placed", &json!({"total": "one"})).await,
        insert(&client, "order", "Placed", &json!({"total": 2.5})).await,
    ];
    let stray = insert(&client, "bad type", "Placed", &json!({"total": 3})).await;
    let big = insert(
        &client,
        "order",
        "Huge",
        &json!({"blob": "x".repeat(200_000)}),
    )
    .await;
    let last = insert(&client, "order", "Placed", &json!({"total": 4})).await;
    let mut relay = Relay::start(&config);
    assert_eq!(copies(&brokers, &topic, &[&good, &last]).len(), 2);
    eventually(Duration::from_secs(30), "four dead letters", || async {
        dead_letters(&config, &["list"])
            .1
            .contains("4 dead letters")
    })
    .await;
    relay.terminate(Duration::from_secs(30));

    let (code, list) = dead_letters(&config, &["list"]);
    assert_eq!(code, Some(0), "{list}");
    for (id, reason) in [
        (&invalid[0], "schema_invalid"),
        (&invalid[1], "schema_invalid"),
        (&stray, "invalid_topic"),
        (&big, "too_large"),
    ] {
        let line = list
            .lines()
            .find(|l| l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed:\n{list}"));
        assert!(line.contains(reason), "{line}");
        let source = if id == &big { "table " } else { "topic:" };
        assert!(line.starts_with(source), "{line}");
    }
    let (code, only) = dead_letters(&config, &["list", "--reason", "schema_invalid"]);
    assert_eq!(code, Some(0));
    assert!(only.contains("2 dead letters"), "{only}");
    let (code, shown) = dead_letters(&config, &["show", "--id", &big]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("too_large") && shown.contains("\"blob\""),
        "{shown}"
    );

    let (code, text) = dead_letters(&config, &["redrive"]);
    assert_eq!(
        code,
        Some(2),
        "a redrive of everything must be asked for: {text}"
    );
    let (code, text) = dead_letters(&config, &["redrive", "--reason", "schema_invalid"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("2 redriven, 0 already"), "{text}");
    let (code, text) = dead_letters(&config, &["redrive", "--reason", "schema_invalid"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("0 redriven, 2 already redriven before"),
        "{text}"
    );
    let (code, text) = dead_letters(&config, &["redrive", "--all"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("0 redriven, 2 already redriven before, 2 refused again"),
        "{text}"
    );
    for id in [&stray, &big] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("REFUSED AGAIN") && l.contains(id.as_str())),
            "{id} is said to be refused, with why:\n{text}"
        );
    }

    // The cause fixed: the relay's 2,000-byte limit lifted.
    let fixed = db.dir.join("fixed.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&fixed, text.replace("max_message_bytes = 2000\n", "")).unwrap();
    let (code, text) = dead_letters(&fixed, &["redrive", "--id", &big]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("1 redriven"), "{text}");
    let (_, list) = dead_letters(&fixed, &["list", "--id", &big]);
    assert!(list.contains("[redriven "), "{list}");

    let redriven = [&invalid[0], &invalid[1], &big];
    let got = consume(
        &brokers,
        std::slice::from_ref(&topic),
        &redriven.iter().map(|s| s.to_string()).collect(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    for id in redriven {
        let records: Vec<_> = got
            .iter()
            .filter(|r| r.id.as_deref() == Some(id.as_str()))
            .collect();
        assert_eq!(records.len(), 1, "{id} redriven once: {records:?}");
        let r = records[0];
        assert_eq!(r.key.as_deref(), Some("k-1"));
        assert!(r.headers.contains_key("type"), "{:?}", r.headers);
        assert!(
            !r.headers.keys().any(|k| k.starts_with("outboxd.dlq.")),
            "{:?}",
            r.headers
        );
    }
    let payload = |id: &str| {
        got.iter()
            .find(|r| r.id.as_deref() == Some(id))
            .unwrap()
            .payload
            .clone()
    };
    assert_eq!(payload(&invalid[0]).as_deref(), Some(r#"{"total": "one"}"#));
    assert!(payload(&big).unwrap().len() > 200_000);
}
