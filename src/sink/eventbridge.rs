//! Amazon EventBridge: `PutEvents` (JSON 1.1), the service side of `batch::BatchSink`.
//!
//! ## What an event carries
//!
//! `EventBusName` is the rendered `eventbridge.event_bus`, `Source` and `DetailType` the
//! rendered `eventbridge.source` / `eventbridge.detail_type` (checked by routing: a `Source`
//! of `aws.…` or an empty one is poison `invalid_topic`), `Time` the commit time. `Detail` is
//! the payload — which EventBridge takes only as a JSON **object**: a payload that is an
//! array, a string, a number, not JSON at all, `bytea`, or missing is poison
//! `invalid_payload`, dead-lettered with its reason, never sent and never dropped.
//!
//! EventBridge has no headers and makes its own event `id` (a new one for every put, so a
//! resend after a crash cannot be told from a new event by it). The relay therefore adds one
//! member to the payload's object: `"outboxd": {"id": <event id>, "type": …, <the other
//! headers>, "key": <aggregate id>}` — consumers deduplicate by `detail.outboxd.id`. The
//! payload's own text is kept as it was (the member is spliced in before its closing brace,
//! member order and number formatting untouched); a payload that already has a member
//! `outboxd` is poison (`invalid_payload`) rather than overwritten.
//!
//! ## What EventBridge promises
//!
//! No order and no deduplication: `promises()` says so, and the lanes batch a key's events
//! together. Entries are answered in request order (`Entries[i]`, `FailedEntryCount`): a
//! refused entry is poison when EventBridge blames its content (`MalformedDetail`,
//! `InvalidArgument`), retried when it is a throttle, an internal failure or a permission
//! (`NotAuthorizedForSourceException`, `AccessDeniedException`, KMS) — never dead-lettered —
//! and another code is retried, then dead-lettered after `max_record_retries`.
//!
//! ## Dead letters
//!
//! A poison event goes to `eventbridge.dead_letter_event_bus` as `Source` `outboxd`,
//! `DetailType` `outboxd.dead_letter`, and a `Detail` that always is an object:
//! `{"outboxd": {<headers with outboxd.dlq.reason/.topic/.error>, "key", "source",
//! "detail_type"}, "payload": <the payload as JSON if it is JSON, else as a string, or base64
//! with "encoding": "base64">}`. One too large even so goes to the dead-letter table.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::aws::message::{request_refusal, BatchResults, Mapping};
use super::aws::{kind_of, resolve_error, AwsClient, Kind};
use super::batch::{BatchSink, Service, Settings};
use super::lanes::BatchApi;
use super::{Class, Refusal};
use crate::config::{Config, KafkaConfig};
use crate::error::Result;
use crate::poison::PoisonKind;
use crate::route::Record;

/// The EventBridge sink.
pub type EventBridgeSink = BatchSink<EventBridgeApi>;

/// The member of `Detail` that carries the event id, headers and key.
const META: &str = "outboxd";

/// One `PutEvents` entry (the bus is the batch's).
#[derive(Debug, Clone, PartialEq)]
pub struct PutEntry {
    source: String,
    detail_type: String,
    detail: String,
    /// Seconds since the epoch.
    time: Option<f64>,
}

impl PutEntry {
    /// The size EventBridge counts: 14 bytes for `Time`, then `Source`, `DetailType` and
    /// `Detail` in UTF-8.
    fn size(&self) -> usize {
        14 + self.source.len() + self.detail_type.len() + self.detail.len()
    }
}

/// What to grant when EventBridge denies the relay (the fix of the exit-2 message).
const PERMISSIONS: &str = "grant events:DescribeEventBus and events:PutEvents on the event buses";

/// The EventBridge API the lanes call.
pub struct EventBridgeApi {
    client: AwsClient,
}

/// The `outboxd` member: the headers (text, lossy), then `key`.
fn meta(record: &Record) -> Map<String, Value> {
    let mut meta = Map::new();
    for (name, value) in &record.headers {
        meta.insert(
            name.clone(),
            Value::String(String::from_utf8_lossy(value).into_owned()),
        );
    }
    if let Some(key) = &record.key {
        meta.insert("key".into(), Value::String(key.clone()));
    }
    meta
}

fn poison(kind: PoisonKind, detail: String) -> Refusal {
    Refusal {
        class: Class::Record(kind),
        code: kind.label().into(),
        detail,
        alone: true,
    }
}

/// The payload's JSON object text with the `outboxd` member spliced in before its closing
/// brace; `Err` says why the payload cannot be a `Detail`.
fn detail(record: &Record) -> std::result::Result<String, String> {
    let value = record.value.as_deref().unwrap_or_default();
    if record.binary {
        return Err("the payload is bytes; EventBridge's Detail must be a JSON object".into());
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| "the payload is not UTF-8; EventBridge's Detail must be a JSON object")?
        .trim();
    if text.is_empty() {
        return Err("the payload is empty; EventBridge's Detail must be a JSON object".into());
    }
    let object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(other) => {
            let what = match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            };
            return Err(format!(
                "the payload is {what}; EventBridge's Detail must be a JSON object"
            ));
        }
        Err(e) => {
            return Err(format!(
                "the payload is not JSON ({e}); EventBridge's Detail must be a JSON object"
            ))
        }
    };
    if object.contains_key(META) {
        return Err(format!(
            "the payload already has a member `{META}`, where the relay puts the event id and headers"
        ));
    }
    let meta = Value::Object(meta(record)).to_string();
    // A JSON object's text ends with `}`; splice before it.
    let body = text[..text.len() - 1].trim_end();
    let separator = if object.is_empty() { "" } else { ", " };
    Ok(format!("{body}{separator}\"{META}\": {meta}}}"))
}

fn time(record: &Record) -> Option<f64> {
    record.timestamp_ms.map(|ms| ms as f64 / 1000.0)
}

fn sized(
    mapping: &Mapping<'_>,
    entry: PutEntry,
) -> std::result::Result<(PutEntry, usize), Refusal> {
    let size = entry.size();
    if size > mapping.max_bytes {
        return Err(mapping.too_large(size));
    }
    Ok((entry, size))
}

impl BatchApi for EventBridgeApi {
    type Entry = PutEntry;

    async fn send_batch(
        &self,
        bus: &str,
        entries: Vec<PutEntry>,
    ) -> std::result::Result<Vec<std::result::Result<(), Refusal>>, Refusal> {
        let mut results = BatchResults::new("eventbridge", entries.len());
        let entries: Vec<Value> = entries
            .into_iter()
            .map(|e| {
                let mut v = json!({
                    "EventBusName": bus,
                    "Source": e.source,
                    "DetailType": e.detail_type,
                    "Detail": e.detail,
                });
                if let Some(t) = e.time {
                    v["Time"] = json!(t);
                }
                v
            })
            .collect();
        let body = json!({ "Entries": entries }).to_string().into_bytes();
        let answer = self
            .client
            .json("AWSEvents.PutEvents", "1.1", body)
            .await
            .map_err(|e| request_refusal("eventbridge", &e))?;
        let v: Value = serde_json::from_slice(&answer).map_err(|e| Refusal {
            class: Class::Cluster,
            code: String::new(),
            detail: format!("eventbridge: the PutEvents answer is not JSON: {e}"),
            alone: false,
        })?;
        let answered = v
            .get("Entries")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        // Entries are answered in request order.
        for (i, e) in answered.iter().enumerate() {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
            let code = text("ErrorCode");
            if code.is_empty() {
                if !text("EventId").is_empty() {
                    results.stored(&i.to_string());
                }
            } else {
                let the_service_s = matches!(
                    kind_of(code, 0),
                    Kind::Throttled | Kind::Server | Kind::Denied | Kind::Credentials
                );
                results.refused(&i.to_string(), code, text("ErrorMessage"), !the_service_s);
            }
        }
        Ok(results.finish())
    }
}

impl Service for EventBridgeApi {
    const NAME: &'static str = "eventbridge";
    const MAX_ENTRIES: usize = 10;

    fn origin(&self) -> String {
        self.client.origin()
    }

    /// `DescribeEventBus`: the name or ARN is the address.
    async fn resolve(&self, bus: &str) -> Result<Option<Arc<str>>> {
        let body = json!({ "Name": bus }).to_string().into_bytes();
        match self
            .client
            .json("AWSEvents.DescribeEventBus", "1.1", body)
            .await
        {
            Ok(_) => Ok(Some(bus.into())),
            Err(e) if e.code.contains("ResourceNotFound") => Ok(None),
            Err(e) => Err(resolve_error(Self::NAME, PERMISSIONS, &e, &self.client)),
        }
    }

    /// EventBridge keeps no order and drops no repeat.
    fn one_per_key(_bus: &str) -> bool {
        false
    }

    fn entry(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
    ) -> std::result::Result<(PutEntry, usize), Refusal> {
        let detail = detail(record).map_err(|d| poison(PoisonKind::InvalidPayload, d))?;
        let entry = PutEntry {
            source: record.exchange.clone().unwrap_or_default(),
            detail_type: record.detail_type.clone().unwrap_or_default(),
            detail,
            time: time(record),
        };
        sized(mapping, entry)
    }

    fn dead_letter_entry(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
    ) -> std::result::Result<(PutEntry, usize), Refusal> {
        let mut meta = meta(record);
        for (name, value) in [
            ("source", &record.exchange),
            ("detail_type", &record.detail_type),
        ] {
            if let Some(v) = value {
                meta.insert(name.into(), Value::String(v.clone()));
            }
        }
        let value = record.value.as_deref().unwrap_or_default();
        let payload = match std::str::from_utf8(value) {
            _ if record.value.is_none() => Value::Null,
            Ok(text) if !record.binary => {
                serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
            }
            _ => {
                meta.insert("encoding".into(), Value::String("base64".into()));
                Value::String(base64::engine::general_purpose::STANDARD.encode(value))
            }
        };
        let entry = PutEntry {
            source: "outboxd".into(),
            detail_type: "outboxd.dead_letter".into(),
            detail: json!({ META: meta, "payload": payload }).to_string(),
            time: time(record),
        };
        sized(mapping, entry)
    }
}

/// Builds the client (credentials from the default chain), checks the dead-letter bus and
/// starts the lanes.
pub async fn connect(cfg: &Config, window: &KafkaConfig) -> Result<(EventBridgeSink, String)> {
    let api = EventBridgeApi {
        client: AwsClient::new(&cfg.aws, "events", "EVENTBRIDGE")?,
    };
    BatchSink::connect(
        api,
        Settings {
            per_key_order: false,
            broker_dedup: false,
            dead_letter: cfg.eventbridge.dead_letter_event_bus.clone(),
            dead_letter_key: "eventbridge.dead_letter_event_bus",
            max_bytes: cfg.eventbridge.max_entry_bytes,
            max_bytes_key: "eventbridge.max_entry_bytes",
            lanes: cfg.aws.max_concurrent_requests,
            delivery_timeout: window.delivery_timeout,
            namespace: String::new(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(value: Option<&str>, binary: bool) -> Record {
        Record {
            topic: "orders".into(),
            exchange: Some("shop.orders".into()),
            detail_type: Some("OrderPlaced".into()),
            binary,
            key: Some("order-7".into()),
            value: value.map(|v| v.as_bytes().to_vec()),
            headers: vec![
                ("id".into(), b"e-1".to_vec()),
                ("type".into(), b"OrderPlaced".to_vec()),
            ],
            partition: None,
            timestamp_ms: Some(1_700_000_000_123),
        }
    }

    fn mapping(max_bytes: usize) -> Mapping<'static> {
        Mapping {
            fifo: false,
            namespace: "",
            replay_suffix: None,
            max_bytes,
            max_bytes_key: "eventbridge.max_entry_bytes",
        }
    }

    fn api() -> EventBridgeApi {
        let cfg = crate::config::AwsConfig {
            region: "us-east-1".into(),
            profile: None,
            endpoint_url: Some("http://127.0.0.1:1".into()),
            request_timeout: std::time::Duration::from_secs(1),
            max_concurrent_requests: 1,
        };
        let creds = crate::sink::aws::credentials::Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: crate::sink::aws::credentials::Secret::new("s".into()),
            session_token: None,
            expires: None,
            source: "test".into(),
        };
        EventBridgeApi {
            client: AwsClient::with_credentials(&cfg, "events", "EVENTBRIDGE", creds).unwrap(),
        }
    }

    #[test]
    fn the_detail_is_the_payload_text_with_the_id_headers_and_key_spliced_in() {
        let (entry, size) = api()
            .entry(
                &mapping(10_000),
                &record(Some(r#"{"total": 10.50, "a": [1]}"#), false),
            )
            .unwrap();
        assert_eq!(
            entry.detail,
            r#"{"total": 10.50, "a": [1], "outboxd": {"id":"e-1","key":"order-7","type":"OrderPlaced"}}"#
        );
        let parsed: Value = serde_json::from_str(&entry.detail).unwrap();
        assert_eq!(parsed["outboxd"]["id"], "e-1");
        assert_eq!(entry.source, "shop.orders");
        assert_eq!(entry.detail_type, "OrderPlaced");
        assert_eq!(entry.time, Some(1_700_000_000.123));
        assert_eq!(
            size,
            14 + "shop.orders".len() + "OrderPlaced".len() + entry.detail.len()
        );
        let (empty, _) = api()
            .entry(&mapping(10_000), &record(Some("{ }"), false))
            .unwrap();
        assert!(
            serde_json::from_str::<Value>(&empty.detail).is_ok(),
            "{}",
            empty.detail
        );
    }

    #[test]
    fn a_payload_that_is_not_a_json_object_is_poison_with_its_reason() {
        for (payload, binary, says) in [
            (Some("[1, 2]"), false, "an array"),
            (Some("\"text\""), false, "a string"),
            (Some("42"), false, "a number"),
            (Some("not json"), false, "not JSON"),
            (None, false, "empty"),
            (Some("{}"), true, "bytes"),
            (Some(r#"{"outboxd": 1}"#), false, "member `outboxd`"),
        ] {
            let refusal = api()
                .entry(&mapping(10_000), &record(payload, binary))
                .unwrap_err();
            assert_eq!(
                refusal.class,
                Class::Record(PoisonKind::InvalidPayload),
                "{payload:?}"
            );
            assert!(
                refusal.detail.contains(says),
                "{payload:?}: {}",
                refusal.detail
            );
        }
    }

    #[test]
    fn an_entry_over_the_limit_is_too_large_naming_the_key() {
        let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(2_000));
        let refusal = api()
            .entry(&mapping(1_024), &record(Some(&big), false))
            .unwrap_err();
        assert_eq!(refusal.class, Class::Record(PoisonKind::TooLarge));
        assert!(
            refusal.detail.contains("eventbridge.max_entry_bytes"),
            "{}",
            refusal.detail
        );
    }

    #[test]
    fn a_dead_letter_detail_is_an_object_whatever_the_payload() {
        for (payload, binary) in [
            (Some("[1]"), false),
            (Some("not json"), false),
            (Some("\u{1}"), true),
            (None, false),
        ] {
            let dlq = crate::sink::dead_letter_record(
                &record(payload, binary),
                PoisonKind::InvalidPayload,
                "why",
            );
            let (entry, _) = api().dead_letter_entry(&mapping(10_000), &dlq).unwrap();
            let v: Value = serde_json::from_str(&entry.detail).unwrap();
            assert_eq!(v["outboxd"]["id"], "e-1");
            assert_eq!(v["outboxd"]["outboxd.dlq.reason"], "invalid_payload");
            assert_eq!(v["outboxd"]["source"], "shop.orders");
            assert_eq!(entry.source, "outboxd");
            assert_eq!(entry.detail_type, "outboxd.dead_letter");
            if binary {
                assert_eq!(v["outboxd"]["encoding"], "base64");
            }
        }
    }
}
