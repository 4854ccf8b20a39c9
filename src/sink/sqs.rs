//! Amazon SQS: `SendMessageBatch` (JSON protocol) through the lanes of `sink::lanes`.
//!
//! ## FIFO queues
//!
//! A queue whose name ends in `.fifo` gets `MessageGroupId` = the aggregate id (SQS keeps
//! one group's messages in order) and `MessageDeduplicationId` = `<schema>.<table>:<event
//! id>` (SQS drops a repeat of it for five minutes). Either is replaced by its SHA-256 in hex
//! when it is longer than 128 characters or holds one SQS refuses (anything but ASCII
//! letters, digits and punctuation) — the same key always gives the same group. With the
//! lanes' rules (one batch in flight per key, one record per key in a batch, a lane stopped
//! after a refusal that is not the record's own) a group is stored in commit order even
//! across failures and restarts within those five minutes; a resend after more than five
//! minutes is stored again, with the same `id` attribute.
//!
//! Standard queues promise neither order nor deduplication; the relay sends the same way.
//!
//! ## What a message carries
//!
//! The body is the payload. SQS takes only text of XML's characters and at least one of
//! them: a `bytea` payload, or text with a character SQS refuses, is sent base64-encoded with
//! the attribute `outboxd.encoding = base64`; a missing or empty payload (a table's tombstone)
//! is the body `null`. Headers (`id`, `type`, the outbox's `headers`, `key` = the aggregate
//! id) become String message attributes. SQS takes at most 10 per message, with names of
//! letters, digits, `-`, `_`, `.` and non-empty values: the ones that do not fit or cannot be
//! attributes travel in one attribute `outboxd.headers`, a JSON object — nothing is dropped.
//!
//! ## Refusals
//!
//! A batch answers entry by entry. An entry refused with `SenderFault` and a code about its
//! content (`InvalidMessageContents`, too long, an invalid attribute) is poison, dead-lettered
//! to `sqs.dead_letter_queue` with `outboxd.dlq.reason` / `.topic` / `.error` (or the table
//! when that refuses it too); a throttle, an internal error, a credentials or KMS problem is
//! retried from the confirmed position, never dead-lettered; another refusal is retried and
//! dead-lettered after `max_record_retries` identical ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::aws::{credentials_error, AwsClient, AwsError, Kind};
use super::lanes::{BatchApi, Lanes, Limits};
use super::{BoxDelivery, Class, Promises, Refusal, SendError, Sink};
use crate::config::{KafkaConfig, SqsConfig};
use crate::error::{Error, Result};
use crate::poison::PoisonKind;
use crate::route::Record;

/// SQS's most attributes per message.
const MAX_ATTRIBUTES: usize = 10;

/// The SQS API the lanes call.
struct SqsApi {
    client: AwsClient,
}

/// One message of a `SendMessageBatch`, without its `Id` (given at batch time).
pub struct Entry(Map<String, Value>);

impl BatchApi for SqsApi {
    type Entry = Entry;

    async fn send_batch(
        &self,
        queue_url: &str,
        entries: Vec<Entry>,
    ) -> std::result::Result<Vec<std::result::Result<(), Refusal>>, Refusal> {
        let n = entries.len();
        let entries: Vec<Value> = entries
            .into_iter()
            .enumerate()
            .map(|(i, Entry(mut m))| {
                m.insert("Id".into(), Value::String(i.to_string()));
                Value::Object(m)
            })
            .collect();
        let body = json!({ "QueueUrl": queue_url, "Entries": entries });
        let answer = self
            .client
            .json(
                "AmazonSQS.SendMessageBatch",
                "1.0",
                body.to_string().into_bytes(),
            )
            .await
            .map_err(|e| request_refusal(&e))?;
        let v: Value = serde_json::from_slice(&answer).map_err(|e| Refusal {
            class: Class::Cluster,
            code: String::new(),
            detail: format!("sqs: the SendMessageBatch answer is not JSON: {e}"),
            alone: false,
        })?;
        let mut results: Vec<Option<std::result::Result<(), Refusal>>> =
            (0..n).map(|_| None).collect();
        let index = |e: &Value| {
            e.get("Id")
                .and_then(Value::as_str)
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < n)
        };
        for ok in v
            .get("Successful")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(i) = index(ok) {
                results[i] = Some(Ok(()));
            }
        }
        for failed in v
            .get("Failed")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(i) = index(failed) {
                let text = |k: &str| failed.get(k).and_then(Value::as_str).unwrap_or("");
                let sender = failed
                    .get("SenderFault")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                results[i] = Some(Err(entry_refusal(text("Code"), text("Message"), sender)));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Refusal {
                        class: Class::Cluster,
                        code: String::new(),
                        detail: "sqs: the answer names this entry neither successful nor failed"
                            .into(),
                        alone: false,
                    })
                })
            })
            .collect())
    }
}

/// A refusal of a whole request: about the service, the connection or the credentials —
/// never the one record's (every entry's outcome is unknown).
fn request_refusal(e: &AwsError) -> Refusal {
    let class = match e.kind {
        // A queue deleted under the relay, a request SQS will not take as it is: retried,
        // and dead-lettered once the same record failed the same way often enough.
        Kind::Request => Class::Unclear,
        _ => Class::Cluster,
    };
    Refusal {
        class,
        code: e.code.clone(),
        detail: format!("sqs: {e}"),
        alone: false,
    }
}

/// A refusal of one entry of a batch (`BatchResultErrorEntry`).
fn entry_refusal(code: &str, message: &str, sender_fault: bool) -> Refusal {
    let detail = format!("sqs: {code}: {message}");
    let class = match super::aws::kind_of(code, 0) {
        Kind::Request if code.contains("TooLong") || code.contains("TooLarge") => {
            Class::Record(PoisonKind::TooLarge)
        }
        Kind::Request
            if sender_fault
                && matches!(
                    code,
                    "InvalidMessageContents"
                        | "InvalidParameterValue"
                        | "InvalidAttributeValue"
                        | "InvalidAttributeName"
                        | "MissingParameter"
                        | "InvalidBatchEntryId"
                ) =>
        {
            Class::Record(PoisonKind::Rejected)
        }
        Kind::Request if sender_fault => Class::Unclear,
        _ => Class::Cluster,
    };
    Refusal {
        class,
        code: code.to_string(),
        detail,
        alone: true,
    }
}

/// Whether SQS takes `s` as message text: XML's characters (#x9, #xA, #xD, #x20–#xD7FF,
/// #xE000–#xFFFD, #x10000–#x10FFFF).
fn sqs_text(s: &str) -> bool {
    s.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
    })
}

/// A group or deduplication id SQS takes: `s` if it is 1–128 ASCII letters, digits and
/// punctuation, else its SHA-256 in hex.
fn sqs_id(s: &str) -> String {
    if !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()) {
        s.to_string()
    } else {
        super::aws::sigv4::sha256_hex(s.as_bytes())
    }
}

/// A message attribute name SQS takes.
fn attribute_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// How one record becomes an SQS message.
pub struct Mapping<'a> {
    pub fifo: bool,
    /// Prefix of deduplication ids (the outbox table).
    pub namespace: &'a str,
    /// `outboxd replay`: makes deduplication ids new.
    pub replay_suffix: Option<&'a str>,
    pub max_bytes: usize,
}

impl Mapping<'_> {
    /// The message for `record` and its size as SQS counts it (body, attribute names, types
    /// and values); `Err` when it is larger than `max_bytes`.
    pub fn entry(&self, record: &Record) -> std::result::Result<(Entry, usize), Refusal> {
        let mut attributes: Vec<(String, String)> = Vec::new();
        let value = record.value.as_deref().unwrap_or_default();
        let body = match std::str::from_utf8(value) {
            _ if value.is_empty() => "null".to_string(),
            Ok(text) if !record.binary && sqs_text(text) => text.to_string(),
            _ => {
                attributes.push(("outboxd.encoding".into(), "base64".into()));
                base64::engine::general_purpose::STANDARD.encode(value)
            }
        };
        let mut overflow = Map::new();
        let key = record
            .key
            .as_ref()
            .map(|k| ("key".to_string(), k.as_bytes().to_vec()));
        for (name, value) in record.headers.iter().chain(key.iter()) {
            let text = String::from_utf8_lossy(value);
            if attribute_name(name) && !text.is_empty() && sqs_text(&text) {
                attributes.push((name.clone(), text.into_owned()));
            } else {
                overflow.insert(name.clone(), Value::String(text.into_owned()));
            }
        }
        // Room for `outboxd.headers` when anything overflows.
        let room =
            MAX_ATTRIBUTES - usize::from(!overflow.is_empty() || attributes.len() > MAX_ATTRIBUTES);
        if attributes.len() > room {
            for (name, value) in attributes.drain(room..) {
                overflow.insert(name, Value::String(value));
            }
        }
        if !overflow.is_empty() {
            attributes.push((
                "outboxd.headers".into(),
                Value::Object(overflow).to_string(),
            ));
        }
        let size = body.len()
            + attributes
                .iter()
                .map(|(k, v)| k.len() + "String".len() + v.len())
                .sum::<usize>();
        if size > self.max_bytes {
            return Err(Refusal {
                class: Class::Record(PoisonKind::TooLarge),
                code: "too_large".into(),
                detail: format!(
                    "sqs: the message would be {size} bytes, over sqs.max_message_bytes = {}",
                    self.max_bytes
                ),
                alone: true,
            });
        }
        let mut m = Map::new();
        m.insert("MessageBody".into(), Value::String(body));
        let attrs: Map<String, Value> = attributes
            .into_iter()
            .map(|(k, v)| (k, json!({ "DataType": "String", "StringValue": v })))
            .collect();
        if !attrs.is_empty() {
            m.insert("MessageAttributes".into(), Value::Object(attrs));
        }
        if self.fifo {
            let group = record.key.as_deref().unwrap_or("-");
            m.insert("MessageGroupId".into(), Value::String(sqs_id(group)));
            let id = record
                .headers
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            let dedup = format!(
                "{}:{id}{}",
                self.namespace,
                self.replay_suffix.unwrap_or("")
            );
            m.insert(
                "MessageDeduplicationId".into(),
                Value::String(sqs_id(&dedup)),
            );
        }
        Ok((Entry(m), size))
    }
}

pub struct SqsSink {
    api: Arc<SqsApi>,
    lanes: Lanes<Entry>,
    /// Queue name → URL (`None`: SQS said it does not exist).
    queues: HashMap<String, Option<Arc<str>>>,
    dead_letter_url: Arc<str>,
    cfg: SqsConfig,
    namespace: String,
    replay_suffix: Option<String>,
    delivery_timeout: Duration,
}

impl SqsSink {
    /// Builds the client (credentials from the default chain), resolves the dead-letter
    /// queue — which proves the credentials and the endpoint — and starts the lanes.
    pub async fn connect(
        cfg: &crate::config::Config,
        window: &KafkaConfig,
        namespace: &str,
    ) -> Result<(SqsSink, String)> {
        let client = AwsClient::new(&cfg.aws, "sqs", "SQS")?;
        let source = client.credentials_source();
        let api = Arc::new(SqsApi { client });
        let dlq = &cfg.sqs.dead_letter_queue;
        let dead_letter_url = match queue_url(&api.client, dlq).await {
            Ok(Some(url)) => url,
            Ok(None) => return Err(Error::setup(
                format!("the dead-letter queue {dlq} does not exist (sqs.dead_letter_queue)"),
                "create it (a .fifo name for a FIFO queue) or point sqs.dead_letter_queue at one",
            )),
            Err(e) => return Err(start_error(&e, &source, &api.client)),
        };
        let lanes_n = cfg.aws.max_concurrent_requests;
        let depth = window.max_in_flight / lanes_n + 16;
        let limits = Limits {
            max_entries: 10,
            max_bytes: cfg.sqs.max_message_bytes,
        };
        let lanes = Lanes::start(api.clone(), lanes_n, depth, limits);
        let line = format!(
            "sqs at {}, credentials from {source}, dead letters to {dlq}",
            api.client.endpoint()
        );
        Ok((
            SqsSink {
                api,
                lanes,
                queues: HashMap::new(),
                dead_letter_url,
                cfg: cfg.sqs.clone(),
                namespace: namespace.to_string(),
                replay_suffix: None,
                delivery_timeout: window.delivery_timeout,
            },
            line,
        ))
    }

    /// `outboxd replay`: FIFO queues must not drop the republished events as repeats.
    pub fn replaying(&mut self) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        self.replay_suffix = Some(format!(":replay-{ms}"));
    }

    fn mapping(&self, fifo: bool) -> Mapping<'_> {
        Mapping {
            fifo,
            namespace: &self.namespace,
            replay_suffix: self.replay_suffix.as_deref(),
            max_bytes: self.cfg.max_message_bytes,
        }
    }
}

/// The URL of queue `name`, or `None` if SQS says it does not exist.
async fn queue_url(
    client: &AwsClient,
    name: &str,
) -> std::result::Result<Option<Arc<str>>, AwsError> {
    let body = json!({ "QueueName": name }).to_string().into_bytes();
    match client.json("AmazonSQS.GetQueueUrl", "1.0", body).await {
        Ok(answer) => {
            let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            match v.get("QueueUrl").and_then(Value::as_str) {
                Some(url) => Ok(Some(url.into())),
                None => Err(AwsError {
                    kind: Kind::Server,
                    code: String::new(),
                    message: "GetQueueUrl answered without a QueueUrl".into(),
                }),
            }
        }
        Err(e) if e.code.contains("QueueDoesNotExist") || e.code.contains("NonExistentQueue") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// An error while connecting: refused credentials or a missing permission are exit 2 naming
/// where the credentials came from (never their secret); the rest is retried.
fn start_error(e: &AwsError, source: &str, client: &AwsClient) -> Error {
    match e.kind {
        Kind::Credentials if e.code == "Credentials" => credentials_error(
            super::aws::credentials::CredentialsError::Invalid(e.message.clone()),
        ),
        Kind::Credentials => Error::setup(
            format!(
                "SQS at {} refused the AWS credentials from {source}: {e}",
                client.endpoint()
            ),
            "check the access key and secret (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the profile) and aws.region",
        ),
        Kind::Denied => Error::setup(
            format!("SQS denied the relay's identity ({source}): {e}"),
            "grant sqs:GetQueueUrl and sqs:SendMessage on the queues (and kms:GenerateDataKey, kms:Decrypt for an encrypted queue)",
        ),
        _ => Error::Publish(format!("sqs at {}: {e}", client.endpoint())),
    }
}

impl Sink for SqsSink {
    type Delivery = BoxDelivery;

    fn promises(&self) -> Promises {
        let fifo = self.cfg.queue.ends_with(".fifo");
        Promises {
            per_key_order: fifo,
            broker_dedup: fifo,
            transactions: false,
        }
    }

    fn flush(&self, _timeout: Duration) {
        // Every delivery the window counted was answered by SQS; nothing is held.
    }

    async fn send(&mut self, record: &Record) -> std::result::Result<BoxDelivery, SendError> {
        let url = match self.queues.get(&record.topic) {
            Some(Some(url)) => url.clone(),
            Some(None) => {
                return Err(SendError::Refused(Refusal {
                    class: Class::Unclear,
                    code: "QueueDoesNotExist".into(),
                    detail: format!("sqs: queue {} does not exist", record.topic),
                    alone: true,
                }))
            }
            None => {
                return Err(SendError::Refused(Refusal {
                    class: Class::Cluster,
                    code: String::new(),
                    detail: format!("sqs: queue {} was not resolved", record.topic),
                    alone: false,
                }))
            }
        };
        let fifo = record.topic.ends_with(".fifo");
        let (entry, size) = self
            .mapping(fifo)
            .entry(record)
            .map_err(SendError::Refused)?;
        self.lanes.send(url, fifo, record, entry, size)
    }

    async fn ensure_topic(&mut self, record: &Record) -> Result<()> {
        if self.queues.contains_key(&record.topic) {
            return Ok(());
        }
        match queue_url(&self.api.client, &record.topic).await {
            Ok(url) => {
                if url.is_none() {
                    tracing::warn!(queue = %record.topic, "SQS queue does not exist; its events are retried and dead-lettered after sink.max_record_retries failures");
                }
                self.queues.insert(record.topic.clone(), url);
                Ok(())
            }
            Err(e) => {
                let source = self.api.client.credentials_source();
                Err(start_error(&e, &source, &self.api.client))
            }
        }
    }

    /// Sends the record to `sqs.dead_letter_queue` with `outboxd.dlq.reason`, `.topic` and
    /// `.error`, and waits for SQS's answer.
    async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        let mut dlq = record.clone();
        let one_line = detail.replace(['\r', '\n'], " ");
        dlq.headers.extend([
            (
                "outboxd.dlq.reason".to_string(),
                kind.label().as_bytes().to_vec(),
            ),
            (
                "outboxd.dlq.topic".to_string(),
                record.topic.clone().into_bytes(),
            ),
            ("outboxd.dlq.error".to_string(), one_line.into_bytes()),
        ]);
        let fifo = self.cfg.dead_letter_queue.ends_with(".fifo");
        let (entry, _) = self.mapping(fifo).entry(&dlq).map_err(|r| r.detail)?;
        let results = self
            .api
            .send_batch(&self.dead_letter_url, vec![entry])
            .await
            .map_err(|r| r.detail)?;
        match results.into_iter().next() {
            Some(Ok(())) => Ok(()),
            Some(Err(r)) => Err(r.detail),
            None => Err("sqs: no answer for the dead letter".into()),
        }
    }

    fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)], value: Option<&[u8]>, key: Option<&str>) -> Record {
        Record {
            topic: "orders.fifo".into(),
            exchange: None,
            binary: false,
            key: key.map(str::to_string),
            value: value.map(<[u8]>::to_vec),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            partition: None,
            timestamp_ms: None,
        }
    }

    fn mapping(fifo: bool) -> Mapping<'static> {
        Mapping {
            fifo,
            namespace: "public.outbox",
            replay_suffix: None,
            max_bytes: 262_144,
        }
    }

    fn attrs(e: &Entry) -> Map<String, Value> {
        e.0.get("MessageAttributes")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn a_fifo_message_is_grouped_by_aggregate_and_deduplicated_by_event_id() {
        let r = record(
            &[("id", "e-1"), ("type", "Placed")],
            Some(b"{}"),
            Some("order-7"),
        );
        let (e, _) = mapping(true)
            .entry(&r)
            .map_err(|r| r.detail)
            .unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(e.0["MessageGroupId"], "order-7");
        assert_eq!(e.0["MessageDeduplicationId"], "public.outbox:e-1");
        assert_eq!(e.0["MessageBody"], "{}");
        let a = attrs(&e);
        assert_eq!(a["id"]["StringValue"], "e-1");
        assert_eq!(a["key"]["StringValue"], "order-7");
        let (e, _) = mapping(false)
            .entry(&r)
            .map_err(|r| r.detail)
            .unwrap_or_else(|d| panic!("{d}"));
        assert!(
            e.0.get("MessageGroupId").is_none(),
            "a standard queue refuses group ids"
        );
    }

    #[test]
    fn ids_sqs_refuses_become_their_sha256() {
        assert_eq!(sqs_id("{\"id\":42}"), "{\"id\":42}");
        let long = "x".repeat(129);
        assert_eq!(sqs_id(&long).len(), 64);
        assert_eq!(sqs_id("tenant é"), sqs_id("tenant é"));
        assert_ne!(sqs_id("tenant é"), "tenant é");
    }

    #[test]
    fn headers_beyond_ten_or_unfit_travel_in_one_json_attribute_and_none_is_lost() {
        let headers: Vec<(String, String)> = (0..12)
            .map(|i| (format!("h{i}"), format!("v{i}")))
            .collect();
        let mut h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        h.push(("bad name", "x"));
        h.push(("empty", ""));
        let (e, _) = mapping(false)
            .entry(&record(&h, Some(b"{}"), Some("k")))
            .map_err(|r| r.detail)
            .unwrap_or_else(|d| panic!("{d}"));
        let a = attrs(&e);
        assert_eq!(a.len(), 10);
        let overflow: Map<String, Value> = a["outboxd.headers"]["StringValue"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let mut names: Vec<&str> = a
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "outboxd.headers")
            .collect();
        names.extend(overflow.keys().map(String::as_str));
        names.sort_unstable();
        let mut want: Vec<&str> = h.iter().map(|(k, _)| *k).collect();
        want.push("key");
        want.sort_unstable();
        assert_eq!(names, want);
    }

    #[test]
    fn bodies_sqs_cannot_carry_as_text_are_base64_and_empty_ones_null() {
        let (e, _) = mapping(false)
            .entry(&record(&[("id", "1")], Some(b"a\x00b"), None))
            .map_err(|r| r.detail)
            .unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(e.0["MessageBody"], "YQBi");
        assert_eq!(attrs(&e)["outboxd.encoding"]["StringValue"], "base64");
        let (e, _) = mapping(false)
            .entry(&record(&[("id", "1")], None, None))
            .map_err(|r| r.detail)
            .unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(e.0["MessageBody"], "null");
        let big = vec![b'x'; 262_145];
        let refused = mapping(false).entry(&record(&[], Some(&big), None)).err();
        assert_eq!(
            refused.map(|r| r.class),
            Some(Class::Record(PoisonKind::TooLarge))
        );
    }

    #[test]
    fn entry_refusals_are_poison_only_when_about_the_entry() {
        assert_eq!(
            entry_refusal("InvalidMessageContents", "bad", true).class,
            Class::Record(PoisonKind::Rejected)
        );
        assert_eq!(
            entry_refusal("ThrottlingException", "slow", true).class,
            Class::Cluster
        );
        assert_eq!(
            entry_refusal("KMS.AccessDeniedException", "no", true).class,
            Class::Cluster
        );
        assert_eq!(
            entry_refusal("InternalError", "oops", false).class,
            Class::Cluster
        );
        assert_eq!(
            entry_refusal("SomethingNew", "?", true).class,
            Class::Unclear
        );
    }
}
