//! Google Cloud Pub/Sub: `topics.publish` over REST (`sink::gcp`), the service side of
//! `batch::BatchSink`.
//!
//! ## Ordering keys, and a failed publish
//!
//! With `pubsub.ordering_keys` (the default) every message carries `orderingKey` = the
//! aggregate id, and a subscription with message ordering receives one key's messages in the
//! order they were published. A publish request is all-or-nothing (`messageIds` for every
//! message, or an error for the request), so a batch may hold many messages of one key. What
//! Google's publisher libraries do after a failed publish — pause the key until the
//! application resumes it, so that nothing later of that key is published before the failed
//! message — the lanes do here: one request in flight per lane (a key stays in one lane),
//! and a refused request stops its lane, ends the session, and the next session resends from
//! the confirmed position. A key's messages are therefore published in commit order across
//! failures and restarts; a resend repeats messages the subscription may already have (same
//! `id` attribute): Pub/Sub has no publish-side deduplication.
//!
//! ## What a message carries
//!
//! `data` = the payload's bytes (any bytes; empty for a NULL payload), attributes = the
//! headers (`id`, `type`, the outbox's `headers`) and `key` = the aggregate id. Pub/Sub's
//! limits are checked before sending: at most 100 attributes, names of 1–256 bytes not
//! starting with `goog`, values of at most 1,024 bytes — an event whose headers break them is
//! poison `invalid_headers`, naming the header; a message over `pubsub.max_message_bytes`
//! (data, attributes and ordering key) is `too_large`. The aggregate id is attribute `key`
//! and the ordering key, so one over 1,024 bytes is `invalid_headers` too.
//!
//! ## Refusals
//!
//! A refused request: throttling (`RESOURCE_EXHAUSTED`), `UNAVAILABLE`/5xx, no answer,
//! refused credentials or permission → retried from the confirmed position, loudly, never
//! dead-lettered; a topic deleted under the relay (`NOT_FOUND`) → retried, then
//! dead-lettered `retries_exhausted`; `INVALID_ARGUMENT` → about some message of the
//! request: its records become suspects, are sent alone, and the one refused alone is
//! dead-lettered (`rejected`).

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::batch::{BatchSink, Mapping, Service, Settings};
use super::gcp::{GcpClient, GcpError, GcpKind};
use super::lanes::BatchApi;
use super::{Class, Refusal};
use crate::config::{Config, KafkaConfig};
use crate::error::{Error, Result};
use crate::poison::PoisonKind;
use crate::route::Record;

/// The Pub/Sub sink.
pub type PubSubSink = BatchSink<PubSubApi>;

const MAX_ATTRIBUTES: usize = 100;
const MAX_ATTRIBUTE_NAME: usize = 256;
const MAX_ATTRIBUTE_VALUE: usize = 1_024;

/// One message of a publish request.
#[derive(Debug, Clone, PartialEq)]
pub struct PubMessage {
    data: Vec<u8>,
    attributes: Vec<(String, String)>,
    ordering_key: Option<String>,
}

impl PubMessage {
    fn json(&self) -> Value {
        let attributes: Map<String, Value> = self
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut m = json!({
            "data": base64::engine::general_purpose::STANDARD.encode(&self.data),
            "attributes": attributes,
        });
        if let Some(k) = &self.ordering_key {
            m["orderingKey"] = Value::String(k.clone());
        }
        m
    }

    /// The size Pub/Sub counts: data, attribute names and values, ordering key.
    fn size(&self) -> usize {
        self.data.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.ordering_key.as_ref().map_or(0, String::len)
    }
}

/// The Pub/Sub API the lanes call.
pub struct PubSubApi {
    client: GcpClient,
    ordering_keys: bool,
}

/// The attributes of `record`: its headers and `key`; `Err` names the one Pub/Sub would
/// refuse.
fn attributes(record: &Record) -> std::result::Result<Vec<(String, String)>, String> {
    let key = record
        .key
        .as_ref()
        .map(|k| ("key".to_string(), k.as_bytes().to_vec()));
    let mut out = Vec::new();
    for (name, value) in record.headers.iter().chain(key.iter()) {
        let value = String::from_utf8_lossy(value).into_owned();
        if name.is_empty()
            || name.len() > MAX_ATTRIBUTE_NAME
            || name.to_ascii_lowercase().starts_with("goog")
        {
            return Err(format!(
                "header `{name}` cannot be a Pub/Sub attribute (1–256 bytes, not `goog…`)"
            ));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE {
            return Err(format!(
                "header `{name}` is {} bytes, over Pub/Sub's 1024 for an attribute value",
                value.len()
            ));
        }
        out.push((name.clone(), value));
    }
    if out.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "{} headers, over Pub/Sub's 100 attributes",
            out.len()
        ));
    }
    Ok(out)
}

impl PubSubApi {
    fn message(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
        attributes: Vec<(String, String)>,
    ) -> std::result::Result<(PubMessage, usize), Refusal> {
        // `attributes` refused a key longer than an attribute value, which is also the
        // ordering key's limit.
        let ordering_key = record.key.clone().filter(|_| self.ordering_keys);
        let message = PubMessage {
            data: record.value.clone().unwrap_or_default(),
            attributes,
            ordering_key,
        };
        let size = message.size();
        if size > mapping.max_bytes {
            return Err(mapping.too_large(size));
        }
        Ok((message, size))
    }
}

/// What a refused publish request means.
fn request_refusal(e: &GcpError, n: usize) -> Refusal {
    let class = match e.kind {
        GcpKind::NotFound => Class::Absent,
        GcpKind::Request => Class::Record(PoisonKind::Rejected),
        _ => Class::Cluster,
    };
    Refusal {
        class,
        code: e.status.clone(),
        detail: format!("pubsub: {e}"),
        // Only a request of one message is about that message.
        alone: n == 1,
    }
}

impl BatchApi for PubSubApi {
    type Entry = PubMessage;

    async fn send_batch(
        &self,
        topic: &str,
        entries: Vec<PubMessage>,
    ) -> std::result::Result<Vec<std::result::Result<(), Refusal>>, Refusal> {
        let n = entries.len();
        let messages: Vec<Value> = entries.iter().map(PubMessage::json).collect();
        let body = json!({ "messages": messages });
        let answer = self
            .client
            .call(
                reqwest::Method::POST,
                &format!("topics/{topic}:publish"),
                Some(&body),
            )
            .await
            .map_err(|e| request_refusal(&e, n))?;
        let ids = answer
            .get("messageIds")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if ids != n {
            return Err(Refusal {
                class: Class::Cluster,
                code: String::new(),
                detail: format!("pubsub: {ids} message ids for {n} messages"),
                alone: false,
            });
        }
        Ok((0..n).map(|_| Ok(())).collect())
    }
}

impl Service for PubSubApi {
    const NAME: &'static str = "pubsub";
    /// Pub/Sub takes 1,000 a request; 100 is its client libraries' batch, and a lane queues
    /// three batches: measured on a 20,000-event backlog against the emulator, 1,000 held
    /// ~90 MiB of records in the lanes' queues for no gain in events/s.
    const MAX_ENTRIES: usize = 100;

    fn origin(&self) -> String {
        self.client.origin()
    }

    /// `topics.get`: the topic id is the address.
    async fn resolve(&self, topic: &str) -> Result<Option<Arc<str>>> {
        match self
            .client
            .call(reqwest::Method::GET, &format!("topics/{topic}"), None)
            .await
        {
            Ok(_) => Ok(Some(topic.into())),
            Err(e) if e.kind == GcpKind::NotFound => Ok(None),
            Err(e) => Err(resolve_error(&e, &self.client)),
        }
    }

    /// A publish request is all-or-nothing: a batch may hold a key's many messages.
    fn one_per_key(_topic: &str) -> bool {
        false
    }

    fn entry(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
    ) -> std::result::Result<(PubMessage, usize), Refusal> {
        let attributes = attributes(record).map_err(|detail| Refusal {
            class: Class::Record(PoisonKind::InvalidHeaders),
            code: "invalid_headers".into(),
            detail,
            alone: true,
        })?;
        self.message(mapping, record, attributes)
    }

    /// The dead letter's own `outboxd.dlq.error` is cut to an attribute's 1,024 bytes; one
    /// whose headers Pub/Sub refuses goes to the dead-letter table, whole.
    fn dead_letter_entry(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
    ) -> std::result::Result<(PubMessage, usize), Refusal> {
        let mut record = record.clone();
        for (name, value) in record.headers.iter_mut() {
            if name == "outboxd.dlq.error" && value.len() > MAX_ATTRIBUTE_VALUE {
                let text = String::from_utf8_lossy(value).into_owned();
                let mut cut = MAX_ATTRIBUTE_VALUE - 3;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                *value = format!("{}…", &text[..cut]).into_bytes();
            }
        }
        self.entry(mapping, &record)
    }
}

/// An error while checking a topic: refused credentials or permission are exit 2 naming the
/// credentials' source (never a secret); the rest is retried.
fn resolve_error(e: &GcpError, client: &GcpClient) -> Error {
    let origin = client.origin();
    match e.kind {
        GcpKind::Credentials => Error::setup(
            format!("Pub/Sub {origin} refused the credentials: {e}"),
            "check pubsub.credentials_file / GOOGLE_APPLICATION_CREDENTIALS (or the metadata server's service account)",
        ),
        GcpKind::Denied => Error::setup(
            format!("Pub/Sub {origin} denied the relay: {e}"),
            "grant roles/pubsub.publisher and roles/pubsub.viewer (pubsub.topics.get, pubsub.topics.publish) on the topics",
        ),
        _ => Error::Publish(format!("pubsub {origin}: {e}")),
    }
}

/// Builds the client, checks the dead-letter topic and starts the lanes.
pub async fn connect(cfg: &Config, window: &KafkaConfig) -> Result<(PubSubSink, String)> {
    let ps = &cfg.pubsub;
    let api = PubSubApi {
        client: GcpClient::new(ps)?,
        ordering_keys: ps.ordering_keys,
    };
    BatchSink::connect(
        api,
        Settings {
            per_key_order: ps.ordering_keys,
            broker_dedup: false,
            dead_letter: ps.dead_letter_topic.clone(),
            dead_letter_key: "pubsub.dead_letter_topic",
            max_bytes: ps.max_message_bytes,
            max_bytes_key: "pubsub.max_message_bytes",
            lanes: ps.max_concurrent_requests,
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

    fn record(headers: &[(&str, String)], key: Option<String>) -> Record {
        Record {
            topic: "orders".into(),
            exchange: None,
            detail_type: None,
            binary: true,
            key,
            value: Some(vec![0, 159, 146, 150]),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
                .collect(),
            partition: None,
            timestamp_ms: None,
        }
    }

    fn api(ordering_keys: bool) -> PubSubApi {
        let cfg = crate::config::Config::from_toml_str(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[sink]\nkind = \"pubsub\"\n[pubsub]\nproject = \"outboxd-test\"\nendpoint = \"http://127.0.0.1:1\"\n",
            |_| None,
        )
        .unwrap();
        PubSubApi {
            client: GcpClient::new(&cfg.pubsub).unwrap(),
            ordering_keys,
        }
    }

    fn mapping(max_bytes: usize) -> Mapping<'static> {
        Mapping {
            fifo: false,
            namespace: "",
            replay_suffix: None,
            max_bytes,
            max_bytes_key: "pubsub.max_message_bytes",
        }
    }

    #[test]
    fn a_message_carries_the_bytes_headers_key_and_ordering_key() {
        let r = record(
            &[("id", "e-1".into()), ("type", "Placed".into())],
            Some("order-7".into()),
        );
        let (m, size) = api(true).entry(&mapping(10_000), &r).unwrap();
        let v = m.json();
        assert_eq!(v["data"], "AJ+Slg==");
        assert_eq!(v["attributes"]["id"], "e-1");
        assert_eq!(v["attributes"]["key"], "order-7");
        assert_eq!(v["orderingKey"], "order-7");
        assert_eq!(
            size,
            4 + "ide-1typePlacedkeyorder-7".len() + "order-7".len()
        );
        let (m, _) = api(false).entry(&mapping(10_000), &r).unwrap();
        assert!(m.json().get("orderingKey").is_none());
        let long = "k".repeat(2_000);
        let refusal = api(true)
            .entry(&mapping(10_000), &record(&[("id", "e".into())], Some(long)))
            .unwrap_err();
        assert!(
            refusal.detail.contains("`key` is 2000 bytes"),
            "{}",
            refusal.detail
        );
    }

    #[test]
    fn headers_pub_sub_would_refuse_are_poison_naming_the_header() {
        for (headers, says) in [
            (vec![("googx", "1".to_string())], "`googx`"),
            (vec![("big", "v".repeat(1_025))], "`big` is 1025 bytes"),
        ] {
            let r = record(&headers, None);
            let refusal = api(true).entry(&mapping(100_000), &r).unwrap_err();
            assert_eq!(refusal.class, Class::Record(PoisonKind::InvalidHeaders));
            assert!(refusal.detail.contains(says), "{}", refusal.detail);
        }
        let many: Vec<(&str, String)> = Vec::new();
        let mut r = record(&many, None);
        r.headers = (0..101).map(|i| (format!("h{i}"), b"v".to_vec())).collect();
        assert!(api(true).entry(&mapping(100_000), &r).is_err());
        let big = record(&[("id", "e".into())], None);
        let refusal = api(true).entry(&mapping(5), &big).unwrap_err();
        assert_eq!(refusal.class, Class::Record(PoisonKind::TooLarge));
    }

    #[test]
    fn a_dead_letter_error_is_cut_to_an_attribute_and_the_rest_kept() {
        let r = record(&[("id", "e-1".into())], None);
        let dlq = crate::sink::dead_letter_record(&r, PoisonKind::Rejected, &"é".repeat(2_000));
        let (m, _) = api(true)
            .dead_letter_entry(&mapping(100_000), &dlq)
            .unwrap();
        let error = m
            .attributes
            .iter()
            .find(|(k, _)| k == "outboxd.dlq.error")
            .unwrap();
        assert!(error.1.len() <= MAX_ATTRIBUTE_VALUE && error.1.ends_with('…'));
        assert!(m
            .attributes
            .iter()
            .any(|(k, v)| k == "outboxd.dlq.reason" && v == "rejected"));
    }

    #[test]
    fn a_refused_request_is_about_its_message_only_when_it_held_one() {
        let e = |kind, status: &str| GcpError {
            kind,
            status: status.into(),
            message: "m".into(),
        };
        let invalid = e(GcpKind::Request, "INVALID_ARGUMENT");
        assert!(!request_refusal(&invalid, 5).alone);
        assert!(request_refusal(&invalid, 1).alone);
        assert_eq!(
            request_refusal(&invalid, 1).class,
            Class::Record(PoisonKind::Rejected)
        );
        assert_eq!(
            request_refusal(&e(GcpKind::NotFound, "NOT_FOUND"), 3).class,
            Class::Absent
        );
        for kind in [
            GcpKind::Throttled,
            GcpKind::Server,
            GcpKind::Transport,
            GcpKind::Denied,
            GcpKind::Credentials,
        ] {
            assert_eq!(request_refusal(&e(kind, "X"), 1).class, Class::Cluster);
        }
    }
}
