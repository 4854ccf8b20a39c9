//! Events written for a schema registry's consumers (`schemas.encoding = "avro"`) against a real
//! Confluent-API registry (Apicurio Registry, its schemas in a file so a killed registry comes
//! back with them) and decoded by a real consumer — confluent-kafka's `AvroDeserializer` from
//! PyPI, never outboxd's code. Invalid payloads are dead-lettered with their reason, and a
//! registry that dies mid-stream costs nothing: known subjects flow from the cache, a new one
//! waits, loudly, for the registry, and nothing is dead-lettered for it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PLACED: &str = r#"{"type": "record", "name": "Placed", "namespace": "shop.order",
  "fields": [{"name": "orderId", "type": "string"}, {"name": "total", "type": "long"},
             {"name": "note", "type": ["null", "string"], "default": null}]}"#;
const SHIPPED: &str = r#"{"type": "record", "name": "Shipped", "namespace": "shop.order",
  "fields": [{"name": "orderId", "type": "string"}, {"name": "carrier", "type": "string"}]}"#;

/// Inserts an event; its id.
async fn insert(client: &tokio_postgres::Client, agg: &str, kind: &str, payload: &Value) -> String {
    client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ($1, $2, $3, $4::text::jsonb) RETURNING id::text",
            &[&agg, &format!("{agg}-{}", payload["orderId"].as_str().unwrap_or("x")), &kind, &payload.to_string()],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every record of `topic` (until `ids` distinct ids were read) as confluent-kafka's
/// deserializer decodes it: `{"id", "schema_id", "value"}` per record, in the topic's order
/// per partition. A record it cannot decode fails the test.
fn decoded_lines(topic: &str, registry: &str, kind: &str, ids: usize) -> Vec<Value> {
    let python = String::from_utf8(stack(&["python-consumer"]).stdout).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/consumers/confluent_decode.py"
    );
    // Bounded from outside as well: a consumer that hangs fails the test, never stalls it.
    let out = Command::new("timeout")
        .args([
            "90",
            python.trim(),
            script,
            &kafka_brokers(),
            topic,
            registry,
            kind,
            &ids.to_string(),
            "60",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(
                v.get("error").is_none(),
                "confluent-kafka could not decode: {line}"
            );
            v
        })
        .collect()
}

/// [`decoded_lines`] by event id: id → (schema id, value).
fn decoded(topic: &str, registry: &str, ids: usize) -> HashMap<String, (u64, Value)> {
    decoded_lines(topic, registry, "avro", ids)
        .into_iter()
        .map(|v| {
            let id = v["id"].as_str().unwrap().to_string();
            (id, (v["schema_id"].as_u64().unwrap(), v["value"].clone()))
        })
        .collect()
}

/// Avro on the wire, read back by confluent-kafka: 12 `Placed` events of 4 orders decode to
/// what was written; a `Placed` without `orderId` and one whose `total` is text are
/// dead-lettered `schema_invalid`, an `invoice` event (no schema anywhere) `schema_missing`.
/// Then the registry is SIGKILLed: more `Placed` events flow (their id is cached), a first
/// `Shipped` event waits — the log names the registry, nothing is dead-lettered — until the
/// registry is back, then it and the events behind it arrive. Every id asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_decode_with_confluent_kafka_and_a_registry_outage_loses_nothing() {
    let brokers = kafka_brokers();
    let registry = PrivateBroker::start_with("apicurio", &[]);
    let db = TestDb::new("avro").await;
    let schemas = db.dir.join("schemas");
    std::fs::create_dir_all(schemas.join("order")).unwrap();
    std::fs::write(schemas.join("order/Placed.avsc"), PLACED).unwrap();
    std::fs::write(schemas.join("order/Shipped.avsc"), SHIPPED).unwrap();
    let dlq_topic = format!("{}.dlq", db.name);
    let config = db.config(
        &brokers,
        &format!(
            "[kafka]\ndlq_topic = \"{dlq_topic}\"\n\n[schemas]\ndir = \"{}\"\nregistry_url = \"{}\"\n\
             encoding = \"avro\"\nauto_register = true\n",
            schemas.display(),
            registry.url
        ),
    );
    migrate(&config);
    let client = db.client().await;
    create_aggregates_table(&client).await;
    let topic = db.topic("order");
    let mut written: HashMap<String, Value> = HashMap::new();
    for n in 0..12 {
        let p = json!({"orderId": format!("o-{}", n % 4), "total": n * 100});
        written.insert(insert(&client, "order", "Placed", &p).await, p);
    }
    let mut poison = HashMap::new();
    for p in [
        json!({"total": 1}),
        json!({"orderId": "o-9", "total": "ten"}),
    ] {
        poison.insert(
            insert(&client, "order", "Placed", &p).await,
            "schema_invalid",
        );
    }
    let invoice = insert(&client, "invoice", "Issued", &json!({"orderId": "i"})).await;
    poison.insert(invoice, "schema_missing");
    let mut relay = Relay::start(&config);
    let wait_for = |ids: HashSet<String>| {
        consume(
            &brokers,
            std::slice::from_ref(&topic),
            &ids,
            Duration::from_secs(60),
            Duration::ZERO,
        )
    };
    wait_for(written.keys().cloned().collect());

    registry.kill();
    let mut cached = HashSet::new();
    for n in 0..3 {
        let p =
            json!({"orderId": format!("o-{n}"), "total": 7, "note": "while the registry is down"});
        let id = insert(&client, "order", "Placed", &p).await;
        cached.insert(id.clone());
        written.insert(id, p);
    }
    wait_for(cached);
    let shipped = json!({"orderId": "o-1", "carrier": "post"});
    let shipped_id = insert(&client, "order", "Shipped", &shipped).await;
    written.insert(shipped_id.clone(), shipped);
    let behind = json!({"orderId": "o-2", "total": 5});
    written.insert(insert(&client, "order", "Placed", &behind).await, behind);
    eventually(
        Duration::from_secs(30),
        "the relay to name the registry",
        || async { relay.log_text().contains("schema registry") },
    )
    .await;
    registry.restart();

    let all = decoded(&topic, &registry.url, written.len());
    for (id, payload) in &written {
        let (schema_id, value) = all.get(id).unwrap_or_else(|| {
            panic!(
                "{id} ({payload}) was not decoded; log:\n{}",
                relay.log_text()
            )
        });
        assert!(*schema_id > 0, "{id}");
        for (k, v) in payload.as_object().unwrap() {
            assert_eq!(&value[k], v, "{id}: {value}");
        }
    }
    let unexpected: Vec<_> = all.keys().filter(|id| !written.contains_key(*id)).collect();
    assert!(
        unexpected.is_empty(),
        "not written or poison: {unexpected:?}"
    );

    let dead = consume(
        &brokers,
        &[dlq_topic],
        &poison.keys().cloned().collect(),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    let reasons: HashMap<String, String> = dead
        .iter()
        .map(|r| {
            let reason = r
                .headers
                .get("outboxd.dlq.reason")
                .cloned()
                .unwrap_or_default();
            (r.id.clone().unwrap_or_default(), reason)
        })
        .collect();
    let expected: HashMap<String, String> = poison
        .iter()
        .map(|(id, r)| (id.clone(), r.to_string()))
        .collect();
    assert_eq!(
        reasons,
        expected,
        "only the poison is dead-lettered; log:\n{}",
        relay.log_text()
    );
    relay.assert_running();
}

/// Table CDC in Avro, as Debezium's Avro converter writes it, decoded by confluent-kafka: the
/// change event's Connect schema becomes an Avro schema registered under `<topic>-value`
/// (a `numeric` an Avro decimal, a column name that is no Avro name adjusted), the key stays
/// the key columns' JSON, a delete's tombstone stays empty — and a column added mid-stream
/// registers a new version: the events after the ALTER carry another schema id and the new
/// column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_change_events_in_avro_decode_with_confluent_kafka_and_a_new_column_is_a_new_version() {
    let registry = PrivateBroker::start_with("apicurio", &[]);
    let db = TestDb::new("cdcavro").await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2), \"first-seen\" date)",
        )
        .await
        .unwrap();
    let config = db.config(
        &kafka_brokers(),
        &format!(
            "[cdc]\ntables = [\"public.customers\"]\ntopic_prefix = \"{}\"\n[cdc.snapshot]\nmode = \"never\"\n\n\
             [schemas]\nregistry_url = \"{}\"\nencoding = \"avro\"\n",
            db.name, registry.url
        ),
    );
    migrate(&config);
    let mut relay = Relay::start(&config);
    db.streaming().await;
    client
        .batch_execute(
            "INSERT INTO customers VALUES (1, 'ada', 10.50, '2026-12-07');
             INSERT INTO customers VALUES (2, 'bob', NULL, NULL);
             UPDATE customers SET name = 'ada l' WHERE id = 1;
             DELETE FROM customers WHERE id = 2;
             ALTER TABLE customers ADD COLUMN email text;
             INSERT INTO customers VALUES (3, 'cy', 1.00, NULL, 'cy@example.com');",
        )
        .await
        .unwrap();
    let topic = format!("{}.public.customers", db.name);
    let mut lines = decoded_lines(&topic, &registry.url, "avro", 6);
    // By the change's LSN (the id's middle part), a delete before its tombstone.
    lines.sort_by_key(|v| {
        let id = v["id"].as_str().unwrap().to_string();
        let lsn: u64 = id.split('/').nth(1).unwrap().parse().unwrap();
        (lsn, id.ends_with('x'))
    });
    let summary: Vec<(String, Value, Value)> = lines
        .iter()
        .map(|v| {
            let value = &v["value"];
            (
                v["id"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_string(),
                value["op"].clone(),
                value["after"].clone(),
            )
        })
        .collect();
    let after = |id: i64, name: &str, price: Value, first: Value| json!({"id": id, "name": name, "price": price, "first_seen": first});
    // Avro's date is days since the epoch: 2026-12-07 is day 20,794.
    assert_eq!(
        summary,
        vec![
            (
                "c".into(),
                json!("c"),
                after(1, "ada", json!("10.50"), json!(20794))
            ),
            (
                "c".into(),
                json!("c"),
                after(2, "bob", Value::Null, Value::Null)
            ),
            (
                "u".into(),
                json!("u"),
                after(1, "ada l", json!("10.50"), json!(20794))
            ),
            ("d".into(), json!("d"), Value::Null),
            ("x".into(), Value::Null, Value::Null),
            ("c".into(), json!("c"), {
                let mut a = after(3, "cy", json!("1.00"), Value::Null);
                a["email"] = json!("cy@example.com");
                a
            }),
        ],
        "log:\n{}",
        relay.log_text()
    );
    let ids: Vec<u64> = lines
        .iter()
        .filter_map(|v| v["schema_id"].as_u64())
        .collect();
    assert_eq!(ids.len(), 5, "every change framed, the tombstone empty");
    assert!(
        ids[..4].iter().all(|i| *i == ids[0]),
        "one version before the ALTER: {ids:?}"
    );
    assert_ne!(ids[4], ids[0], "a new version after it: {ids:?}");
    assert_eq!(lines[3]["value"]["before"]["id"], json!(2));
    relay.assert_running();
}

/// JSON Schema on the wire (`encoding = "json_schema"`), read back by confluent-kafka's
/// `JSONDeserializer` with the writer's schema from the registry: every valid event decodes to
/// its payload under the id the registry gave `order/Placed.json`; one that breaks the schema
/// is dead-lettered `schema_invalid`, never framed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_records_decode_with_confluent_kafka_and_invalid_ones_are_dead_lettered() {
    let brokers = kafka_brokers();
    let registry = PrivateBroker::start_with("apicurio", &[]);
    let db = TestDb::new("jsonwire").await;
    let schemas = db.dir.join("schemas");
    std::fs::create_dir_all(schemas.join("order")).unwrap();
    std::fs::write(
        schemas.join("order/Placed.json"),
        r#"{"type": "object", "required": ["orderId", "total"],
            "properties": {"orderId": {"type": "string"}, "total": {"type": "integer"}}}"#,
    )
    .unwrap();
    let dlq_topic = format!("{}.dlq", db.name);
    let config = db.config(
        &brokers,
        &format!(
            "[kafka]\ndlq_topic = \"{dlq_topic}\"\n\n[schemas]\ndir = \"{}\"\nregistry_url = \"{}\"\n\
             encoding = \"json_schema\"\nauto_register = true\n",
            schemas.display(),
            registry.url
        ),
    );
    migrate(&config);
    let client = db.client().await;
    create_aggregates_table(&client).await;
    let mut written = HashMap::new();
    for n in 0..5 {
        let p = json!({"orderId": format!("o-{n}"), "total": n});
        written.insert(insert(&client, "order", "Placed", &p).await, p);
    }
    let bad = insert(
        &client,
        "order",
        "Placed",
        &json!({"orderId": "o-9", "total": "ten"}),
    )
    .await;
    let relay = Relay::start(&config);
    let lines = decoded_lines(
        &db.topic("order"),
        &registry.url,
        "json_schema",
        written.len(),
    );
    let got: HashMap<String, Value> = lines
        .iter()
        .map(|v| {
            assert!(v["schema_id"].as_u64().unwrap() > 0, "{v}");
            (v["id"].as_str().unwrap().to_string(), v["value"].clone())
        })
        .collect();
    assert_eq!(got, written, "log:\n{}", relay.log_text());
    let dead = consume(
        &brokers,
        &[dlq_topic],
        &HashSet::from([bad.clone()]),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_eq!(dead[0].headers["outboxd.dlq.reason"], "schema_invalid");
    assert!(
        dead[0].headers["outboxd.dlq.error"].contains("/total"),
        "{:?}",
        dead[0].headers
    );
}
