//! Outbox semantics beyond rows: table-less events and poison events. Real PostgreSQL, real
//! Apache Kafka; every event id is checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_less_events_are_relayed_like_rows_in_commit_order() {
    let brokers = kafka_brokers();
    let (db, config) = setup("tableless", &brokers, "").await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut committed = Vec::new();
    let mut rolled_back = Vec::new();
    for t in 0..60u64 {
        let mut events: Vec<(String, String)> = (0..(t % 4 + 1))
            .map(|j| ("order".to_string(), format!("a{}", (t + j) % 5)))
            .collect();
        events.sort_by(|x, y| x.1.cmp(&y.1));
        // Rows and messages alternate inside one transaction.
        let written = write_txn_mixed(
            &mut client,
            &events,
            |i| (i + t as usize) % 2 == 0,
            t % 7 == 3,
        )
        .await
        .unwrap();
        if t % 7 == 3 {
            rolled_back.extend(written);
        } else {
            committed.extend(written);
        }
    }
    // Not ours: a non-transactional outbox message and another prefix.
    client
        .batch_execute(
            "SELECT pg_logical_emit_message(false, 'outbox', '{\"id\":\"nontx\",\"aggregatetype\":\"order\",\"aggregateid\":\"a1\",\"type\":\"X\",\"payload\":{}}');
             SELECT pg_logical_emit_message(true, 'other', '{\"id\":\"other\",\"aggregatetype\":\"order\",\"aggregateid\":\"a1\",\"type\":\"X\",\"payload\":{}}');",
        )
        .await
        .unwrap();
    committed.extend(
        write_txn_mixed(
            &mut client,
            &[("order".into(), "last".into())],
            |_| true,
            false,
        )
        .await
        .unwrap(),
    );
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&committed),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    assert_exactly_written(&committed, &received);
    let got: HashSet<String> = received.iter().filter_map(|r| r.id.clone()).collect();
    for w in &rolled_back {
        assert!(!got.contains(&w.id), "rolled-back event {} arrived", w.id);
    }
    assert!(
        !got.contains("nontx") && !got.contains("other"),
        "foreign messages must be ignored"
    );
    // Both kinds were exercised: the message events left no row behind.
    let all: Vec<String> = committed.iter().map(|w| w.id.clone()).collect();
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox WHERE id::text = ANY($1)",
            &[&all],
        )
        .await
        .unwrap()
        .get(0);
    let messages = all.len() as i64 - rows;
    assert!(
        rows > 30 && messages > 30,
        "{rows} rows, {messages} messages"
    );
}

/// Reads the DLQ topic: event id → (reason, intended topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered_and_the_events_after_them_arrive_in_order() {
    let brokers = kafka_brokers();
    let db = TestDb::new("poison").await;
    let dlq_topic = format!("{}.dlq", db.name);
    let config = db.config(&brokers, &format!("[kafka]\ndlq_topic = \"{dlq_topic}\"\n"));
    migrate(&config);
    let mut client = db.client().await;
    create_aggregates_table(&client).await;
    client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN aggregateid DROP NOT NULL")
        .await
        .unwrap();
    let relay = Relay::start(&config);

    let mut good = Vec::new();
    let mut poison: HashMap<String, &str> = HashMap::new();
    let poisons = [
        ("invalid_headers", "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) VALUES ('order', 'p', 'Bad', '{}', '[1, 2]') RETURNING id::text"),
        ("invalid_headers", "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) VALUES ('order', 'p', 'Bad', '{}', '{\"n\": 3}') RETURNING id::text"),
        ("missing_key", "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', NULL, 'Bad', '{}') RETURNING id::text"),
        ("invalid_topic", "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('no such/topic!', 'p', 'Bad', '{}') RETURNING id::text"),
    ];
    for (i, (reason, sql)) in poisons.iter().enumerate() {
        good.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("a{}", i % 2))],
                false,
            )
            .await
            .unwrap(),
        );
        // The poison shares a transaction with a good event of the same aggregate.
        let tx = client.transaction().await.unwrap();
        let id: String = tx.query_one(*sql, &[]).await.unwrap().get(0);
        tx.commit().await.unwrap();
        poison.insert(id, reason);
        good.extend(
            write_txn(
                &mut client,
                &[("order".into(), format!("a{}", i % 2))],
                false,
            )
            .await
            .unwrap(),
        );
    }
    // A malformed table-less event (not JSON): dead-lettered without an id of its own.
    client
        .batch_execute("BEGIN; SELECT pg_logical_emit_message(true, 'outbox', 'not json'); COMMIT;")
        .await
        .unwrap();
    good.extend(
        write_txn(&mut client, &[("order".into(), "a0".into())], false)
            .await
            .unwrap(),
    );

    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&good),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_exactly_written(&good, &received);
    let expect: HashSet<String> = poison.keys().cloned().collect();
    let dead = dlq(&brokers, &dlq_topic, &expect);
    for (id, reason) in &poison {
        let (got_reason, intended) = dead
            .get(id)
            .unwrap_or_else(|| panic!("poison event {id} ({reason}) not in the DLQ"));
        assert_eq!(got_reason, reason, "{id}");
        if *reason != "invalid_topic" {
            assert_eq!(intended, &db.topic("order"));
        }
    }
    let log = relay.log_text();
    for id in poison.keys() {
        assert!(
            log.contains(id.as_str()),
            "dead-lettered event {id} must be logged with its id"
        );
    }
    assert!(log.contains("malformed_message"), "{log}");
    let text = http_get(&http_addr(&config), "/metrics").unwrap().1;
    assert!(
        text.contains("outboxd_events_dead_lettered_total{reason=\"invalid_headers\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_event_too_large_even_for_the_dlq_lands_in_the_dead_letter_table() {
    let brokers = kafka_brokers();
    let (db, config) = setup("oversize", &brokers, "[kafka]\nmax_message_bytes = 2000\n").await;
    let _relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut good = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    // 200 kB: over max_message_bytes, and over librdkafka's limit for the DLQ topic too.
    let big: String = client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             VALUES ('order', 'a', 'Huge', jsonb_build_object('blob', repeat('x', 200000))) RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    good.extend(
        write_txn(&mut client, &[("order".into(), "a".into())], false)
            .await
            .unwrap(),
    );
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&good),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_exactly_written(&good, &received);
    eventually(Duration::from_secs(20), "oversize event in the dead-letter table", || async {
        let row = db
            .client()
            .await
            .query_opt("SELECT reason, length(payload), topic FROM outboxd_dead_letter WHERE event_id = $1", &[&big])
            .await
            .unwrap();
        row.is_some_and(|r| r.get::<_, String>(0) == "too_large" && r.get::<_, i32>(1) > 200_000)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_of_another_shape_is_mapped_by_configuration() {
    let brokers = kafka_brokers();
    let db = TestDb::new("mapping").await;
    let client = db.client().await;
    // An existing outbox of another shape: other column names, a bytea payload, a per-row
    // topic, an explicit partition, a tenant to copy as a header, its own timestamp.
    client
        .batch_execute(
            "CREATE TABLE events (
                event_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                kind text NOT NULL, entity text NOT NULL, entity_id text NOT NULL,
                body bytea, meta jsonb, occurred_at timestamptz NOT NULL,
                destination text, part int, tenant text)",
        )
        .await
        .unwrap();
    let routed = format!("{}.routed", db.name);
    let config = db.config(
        &brokers,
            "[postgres]\ntable = \"public.events\"\n\
             [postgres.columns]\nid = \"event_id\"\naggregatetype = \"entity\"\naggregateid = \"entity_id\"\n\
             type = \"kind\"\npayload = \"body\"\nheaders = \"meta\"\ntimestamp = \"occurred_at\"\n\
             topic = \"destination\"\npartition = \"part\"\nheader_columns = [\"tenant\"]\n\
             [kafka]\ncloudevents = true\ncloudevents_source = \"/orders-service\"\n"
    );
    migrate(&config);
    let _relay = Relay::start(&config);
    let binary: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    let plain: String = client
        .query_one(
            "INSERT INTO events (kind, entity, entity_id, body, meta, occurred_at, tenant) \
             VALUES ('Shipped', 'order', 'o-1', $1, '{\"traceparent\": \"00-x\"}', '2024-02-29 18:04:56.789+00', 'acme') \
             RETURNING event_id::text",
            &[&binary],
        )
        .await
        .unwrap()
        .get(0);
    let routed_id: String = client
        .query_one(
            "INSERT INTO events (kind, entity, entity_id, body, occurred_at, destination, part) \
             VALUES ('Audited', 'order', 'o-1', 'x', now(), $1, 2) RETURNING event_id::text",
            &[&routed],
        )
        .await
        .unwrap()
        .get(0);
    let received = consume(
        &brokers,
        &[db.topic("order"), routed.clone()],
        &[plain.clone(), routed_id.clone()].into(),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    let first = received
        .iter()
        .find(|r| r.id.as_deref() == Some(&plain))
        .expect("mapped event");
    assert_eq!(first.topic, db.topic("order"));
    assert_eq!(first.key.as_deref(), Some("o-1"));
    assert_eq!(
        first.raw_payload.as_deref(),
        Some(&binary[..]),
        "bytea passed through byte for byte"
    );
    assert_eq!(
        first.timestamp_ms,
        Some(1_709_229_896_789),
        "record timestamp from occurred_at"
    );
    let h = &first.headers;
    assert_eq!(h["type"], "Shipped");
    assert_eq!(h["traceparent"], "00-x");
    assert_eq!(h["tenant"], "acme");
    assert_eq!(h["ce_specversion"], "1.0");
    assert_eq!(h["ce_id"], plain);
    assert_eq!(h["ce_source"], "/orders-service");
    assert_eq!(h["ce_type"], "Shipped");
    assert_eq!(h["ce_time"], "2024-02-29T18:04:56.789Z");
    assert_eq!(h["content-type"], "application/octet-stream");
    let second = received
        .iter()
        .find(|r| r.id.as_deref() == Some(&routed_id))
        .expect("routed event");
    assert_eq!(second.topic, routed, "per-row topic overrides the template");
    assert_eq!(second.partition, 2, "partition column");
    assert!(
        !second.headers.contains_key("tenant"),
        "NULL extra columns add no header"
    );
}

/// Event contracts (`schemas.dir`): `order/Changed.json` requires `agg` (a string) and `seq`
/// (an integer ≥ 1). Valid events arrive in order; one with `seq` missing and one with `agg`
/// a number are dead-lettered `schema_invalid` with where they break in `outboxd.dlq.error`,
/// never reaching the topic, and the events after them flow; an `invoice` event (no schema)
/// passes. Then a schema that does not compile stops the next relay with exit 2 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payloads_breaking_their_types_schema_are_dead_lettered_and_valid_ones_flow() {
    let brokers = kafka_brokers();
    let db = TestDb::new("contract").await;
    let schemas = db.dir.join("schemas");
    std::fs::create_dir_all(schemas.join("order")).unwrap();
    std::fs::write(
        schemas.join("order/Changed.json"),
        r#"{"type": "object", "required": ["agg", "seq"],
            "properties": {"agg": {"type": "string"}, "seq": {"type": "integer", "minimum": 1}}}"#,
    )
    .unwrap();
    let dlq_topic = format!("{}.dlq", db.name);
    let config = db.config(
        &brokers,
        &format!(
            "[kafka]\ndlq_topic = \"{dlq_topic}\"\n\n[schemas]\ndir = \"{}\"\n",
            schemas.display()
        ),
    );
    migrate(&config);
    let mut client = db.client().await;
    create_aggregates_table(&client).await;
    let mut relay = Relay::start(&config);
    let mut good = Vec::new();
    let mut broken = HashMap::new();
    for (i, (payload, at)) in [
        (r#"{"agg": "a0"}"#, "seq"),
        (r#"{"agg": 7, "seq": 1}"#, "/agg"),
    ]
    .iter()
    .enumerate()
    {
        good.extend(
            write_txn(&mut client, &[("order".into(), format!("a{i}"))], false)
                .await
                .unwrap(),
        );
        let id: String = client
            .query_one(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'a0', 'Changed', $1::text::jsonb) RETURNING id::text",
                &[payload],
            )
            .await
            .unwrap()
            .get(0);
        broken.insert(id, *at);
    }
    let invoice: String = client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('invoice', 'i1', 'Issued', '[1]') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    good.extend(
        write_txn(&mut client, &[("order".into(), "a0".into())], false)
            .await
            .unwrap(),
    );
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&good),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    assert_exactly_written(&good, &received);
    let expect: HashSet<String> = broken.keys().cloned().collect();
    let dead = consume(
        &brokers,
        std::slice::from_ref(&dlq_topic),
        &expect,
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    for (id, at) in &broken {
        let d = dead
            .iter()
            .find(|r| r.id.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("{id} is not in the DLQ"));
        let h = |k: &str| d.headers.get(k).cloned().unwrap_or_default();
        assert_eq!(h("outboxd.dlq.reason"), "schema_invalid", "{id}");
        assert!(
            h("outboxd.dlq.error").contains(at),
            "{id}: {}",
            h("outboxd.dlq.error")
        );
    }
    let invoices = consume(
        &brokers,
        &[db.topic("invoice")],
        &HashSet::from([invoice.clone()]),
        Duration::from_secs(60),
        Duration::from_millis(200),
    );
    assert_eq!(
        invoices
            .iter()
            .filter_map(|r| r.id.clone())
            .collect::<Vec<_>>(),
        vec![invoice]
    );
    relay.assert_running();
    drop(relay);

    std::fs::write(schemas.join("order/Broken.json"), r#"{"type": 12}"#).unwrap();
    let out = outboxd(&["run", "--config", config.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Broken.json"), "{err}");
}

/// A service's CI against a real Confluent-API registry (Apicurio Registry, BACKWARD):
/// `schemas register` registers each file under its subject (`<topic>-<aggregatetype>.<type>`),
/// `schemas check` passes the same file, then exits 1 naming the subject once `orderId` is
/// renamed `id` (a consumer reading the old shape would break), and exits 2 naming the
/// registry when it is down — a check that could not run never passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_check_exits_1_on_a_backward_breaking_rename_and_2_when_the_registry_is_down() {
    let registry = PrivateBroker::start_with("apicurio", &[]);
    let answer = reqwest::Client::new()
        .put(format!("{}/config", registry.url))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(r#"{"compatibility": "BACKWARD"}"#)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let dir = std::env::temp_dir().join(unique("schemas"));
    std::fs::create_dir_all(dir.join("order")).unwrap();
    let schema = |field: &str| {
        format!(
            r#"{{"type": "object", "required": ["{field}"], "properties": {{"{field}": {{"type": "string"}}}}}}"#
        )
    };
    std::fs::write(dir.join("order/Placed.json"), schema("orderId")).unwrap();
    let config = dir.join("outboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"postgres://u@localhost/db\"\n[kafka]\nbrokers = \"localhost:9092\"\n\
             topic_template = \"shop.{{aggregatetype}}\"\n[schemas]\ndir = \"{}\"\nregistry_url = \"{}\"\n",
            dir.display(),
            registry.url
        ),
    )
    .unwrap();
    let run = |action: &str| {
        let out = outboxd(
            &["--config", config.to_str().unwrap(), "schemas", action],
            &[],
        );
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let subject = "shop.order-order.Placed";
    let (code, out, err) = run("register");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("registered {subject}")), "{out}");
    let (code, out, err) = run("check");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("compatible {subject}")), "{out}");
    std::fs::write(dir.join("order/Placed.json"), schema("id")).unwrap();
    let (code, out, err) = run("check");
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains(&format!("INCOMPATIBLE {subject}")), "{out}");
    registry.kill();
    let (code, out, err) = run("check");
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains(&registry.url), "{err}");
}
