//! `outboxd verify --table T`: the proof that a captured table's topic equals the table.
//! Reads the topic from the beginning (a compacted topic keeps the latest record per key;
//! any other topic is read whole), keeps the latest event per key in offset order, and
//! compares it with the table's current row — mapped exactly as a snapshot would map it.
//! Every key whose topic state differs is named: missing from the topic, still in the topic
//! after the row was deleted, or a different value. No CDC tool offers this; users compare
//! counts by hand, and counts hide a wrong value.
//!
//! Run it when the table is quiet and the relay has caught up (a row changed while the
//! topic is read shows as a difference). A truncate is not replayed (Debezium skips
//! truncates by default): after one, verify reports the keys the topic still holds.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde_json::Value;

use crate::cdc::snapshot::chunk::{Plan, READER_SETTINGS};
use crate::config::{Config, SinkKind};
use crate::error::{Error, Result};

/// A key whose topic state is not the table's row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    /// The key as JSON (without a schema envelope).
    pub key: String,
    pub problem: &'static str,
}

#[derive(Debug, serde::Serialize)]
pub struct TableVerification {
    pub table: String,
    pub topic: String,
    pub rows: usize,
    /// Keys whose latest event is a row (not a delete or tombstone).
    pub topic_keys: usize,
    pub differ: Vec<Difference>,
}

/// The JSON without Kafka Connect's `{"schema":…,"payload":…}` wrapping, in a canonical
/// text (object keys sorted).
fn unwrap(v: Value) -> Value {
    match v {
        Value::Object(mut m)
            if m.len() == 2 && m.contains_key("schema") && m.contains_key("payload") =>
        {
            m.remove("payload").unwrap_or(Value::Null)
        }
        other => other,
    }
}

fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// What the comparison needs of a change event's value: its op and its `after`, as written.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    op: Option<&'a str>,
    #[serde(borrow)]
    after: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
}

fn raw_digest(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The key and the digest of the `after` of a change event (`None` for a delete or a
/// tombstone). `after` is compared as written: the topic's records and the rows read are
/// mapped by the same code, field for field in column order.
fn state(key: &[u8], value: Option<&[u8]>) -> Option<(String, Option<u64>)> {
    let key = canonical(&unwrap(serde_json::from_slice(key).ok()?));
    let Some(value) = value else {
        return Some((key, None));
    };
    let mut e: Envelope<'_> = serde_json::from_slice(value).ok()?;
    if let Some(p) = e.payload {
        // Kafka Connect's `{"schema":…,"payload":…}`.
        e = serde_json::from_str(p.get()).ok()?;
    }
    let after = match e.op {
        Some("d") | None => None,
        Some(_) => e
            .after
            .map(|a| a.get())
            .filter(|a| *a != "null")
            .map(raw_digest),
    };
    Some((key, after))
}

pub async fn verify_table(cfg: &Config, name: &str) -> Result<TableVerification> {
    if cfg.sink != SinkKind::Kafka {
        return Err(Error::setup(
            format!(
                "verify --table reads Kafka topics back; this pipeline's sink is {}",
                cfg.sink.as_str()
            ),
            "check the table at your consumers",
        ));
    }
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    let pg = &cfg.postgres;
    if !pg.captures(schema, table) {
        return Err(Error::setup(
            format!("table {schema}.{table} is not captured by [cdc] tables"),
            "name a captured table",
        ));
    }
    let client = crate::pg::connect(&pg.url, "outboxd-verify").await?;
    client
        .batch_execute(READER_SETTINGS)
        .await
        .map_err(|e| Error::pg("setting up the verify session", e))?;
    let plan = Plan::load(&client, pg, schema, table, None).await?;
    let topic = pg.cdc.topic(schema, table);
    let kafka = cfg.kafka.clone();
    let wanted = vec![topic.clone()];
    let latest = tokio::task::spawn_blocking(move || {
        let mut latest: HashMap<String, Option<u64>> = HashMap::new();
        crate::replay::read_topics(&kafka, &wanted, |m| {
            use rdkafka::Message as _;
            if let Some((key, after)) = m.key().and_then(|k| state(k, m.payload())) {
                latest.insert(key, after);
            }
        })
        .map(|()| latest)
    })
    .await
    .map_err(|e| Error::Kafka(format!("verify task failed: {e}")))??;
    let mut in_topic: HashMap<String, u64> = latest
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    let topic_keys = in_topic.len();
    let mut differ = Vec::new();
    let mut rows = 0;
    let mut lo: Option<Vec<String>> = None;
    loop {
        let batch = plan.rows_after(&client, lo.as_deref(), 10_000).await?;
        let Some(last) = batch.last() else { break };
        lo = Some(plan.key_texts(last));
        for row in &batch {
            rows += 1;
            let (key, after) = plan.table.key_and_after(&pg.cdc, row).map_err(|reason| {
                Error::setup(
                    format!("a row of {schema}.{table} cannot be mapped: {reason}"),
                    "see the dead-letter table for the same row",
                )
            })?;
            let key = match serde_json::from_str(&key) {
                Ok(v) => canonical(&v),
                Err(_) => key,
            };
            let after = raw_digest(&after);
            match in_topic.remove(&key) {
                None => differ.push(Difference {
                    key,
                    problem: "missing from the topic",
                }),
                Some(d) if d != after => differ.push(Difference {
                    key,
                    problem: "the topic's latest event is not the row",
                }),
                Some(_) => {}
            }
        }
    }
    let mut gone: Vec<Difference> = in_topic
        .into_keys()
        .map(|key| Difference {
            key,
            problem: "deleted from the table, still in the topic",
        })
        .collect();
    gone.sort_by(|a, b| a.key.cmp(&b.key));
    differ.extend(gone);
    Ok(TableVerification {
        table: format!("{schema}.{table}"),
        topic,
        rows,
        topic_keys,
        differ,
    })
}
