//! Google's Pub/Sub emulator of a test's own (`scripts/stack.sh pubsub-start`) over its REST
//! API, and a reader that turns what an ordered subscription receives into [`Received`]
//! records, so the assertions written for Kafka ([`assert_exactly_written`]) apply to
//! Pub/Sub too.

use super::*;

use base64::Engine as _;
use serde_json::{json, Value};

/// The project every Pub/Sub test uses (the emulator takes any).
pub const TEST_PROJECT: &str = "outboxd-test";

/// `method` on `<url>/v1/projects/<TEST_PROJECT>/<path>`; panics on an error answer.
pub async fn pubsub_call(url: &str, method: reqwest::Method, path: &str, body: Value) -> Value {
    let answer = reqwest::Client::new()
        .request(method, format!("{url}/v1/projects/{TEST_PROJECT}/{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("pubsub {path}: {e}"));
    let status = answer.status();
    let bytes = answer.bytes().await.unwrap_or_default();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert!(status.is_success(), "pubsub {path}: {status}: {v}");
    v
}

/// Creates topic `name` and a subscription of the same name with message ordering.
pub async fn pubsub_topic_with_subscription(url: &str, name: &str) {
    pubsub_call(
        url,
        reqwest::Method::PUT,
        &format!("topics/{name}"),
        json!({}),
    )
    .await;
    pubsub_call(
        url,
        reqwest::Method::PUT,
        &format!("subscriptions/{name}"),
        json!({
            "topic": format!("projects/{TEST_PROJECT}/topics/{name}"),
            "enableMessageOrdering": true,
            "ackDeadlineSeconds": 60,
        }),
    )
    .await;
}

/// Pulls and acknowledges every message of subscription `name` until each id in `expect`
/// was seen or `timeout` passed, then `linger` more. `offset` is the receive order (an
/// ordered subscription hands one key's messages out in publish order), `key` the `key`
/// attribute, the payload the data as text.
pub async fn pubsub_read(
    url: &str,
    name: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut until = ReadUntil::new(timeout, linger);
    let path = format!("subscriptions/{name}");
    while !until.done(expect, &seen) {
        let v = pubsub_call(
            url,
            reqwest::Method::POST,
            &format!("{path}:pull"),
            json!({ "maxMessages": 1000, "returnImmediately": true }),
        )
        .await;
        let messages = v["receivedMessages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if messages.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut acks = Vec::new();
        for m in &messages {
            acks.push(m["ackId"].clone());
            let msg = &m["message"];
            let headers: HashMap<String, String> = msg["attributes"]
                .as_object()
                .map(|a| {
                    a.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            let data = base64::engine::general_purpose::STANDARD
                .decode(msg["data"].as_str().unwrap_or(""))
                .unwrap();
            let id = headers.get("id").cloned();
            if let Some(id) = &id {
                seen.insert(id.clone());
            }
            out.push(Received {
                topic: name.to_string(),
                partition: 0,
                offset: out.len() as i64,
                key: headers.get("key").cloned(),
                id,
                payload: String::from_utf8(data.clone()).ok(),
                raw_payload: Some(data),
                headers,
                timestamp_ms: None,
            });
        }
        pubsub_call(
            url,
            reqwest::Method::POST,
            &format!("{path}:acknowledge"),
            json!({ "ackIds": acks }),
        )
        .await;
    }
    out
}
