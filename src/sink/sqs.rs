//! Amazon SQS: `SendMessageBatch` (JSON protocol), the service side of `batch::BatchSink`.
//!
//! ## FIFO queues
//!
//! A queue whose name ends in `.fifo` gets `MessageGroupId` = the aggregate id (SQS keeps one
//! group's messages in order) and `MessageDeduplicationId` = `<schema>.<table>:<event id>`
//! (SQS drops a repeat of it for five minutes) — see `aws::message`. With the lanes' rules
//! (one batch in flight per key, one record per key in a batch, a lane stopped after a
//! refusal that is not the record's own) a group is stored in commit order even across
//! failures and restarts within those five minutes; a resend after more than five minutes is
//! stored again, with the same `id` attribute. Standard queues promise neither order nor
//! deduplication; the relay sends the same way, without the two ids (SQS refuses them there).
//!
//! ## Refusals
//!
//! A batch answers entry by entry. An entry refused with `SenderFault` and a code about its
//! content (`InvalidMessageContents`, too long, an invalid attribute) is poison, dead-lettered
//! to `sqs.dead_letter_queue` with `outboxd.dlq.reason` / `.topic` / `.error` (or the table
//! when that refuses it too); a throttle, an internal error, a credentials or KMS problem is
//! retried from the confirmed position, never dead-lettered; another refusal is retried and
//! dead-lettered after `max_record_retries` identical ones.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::aws::message::{message_entry, request_refusal, BatchResults, Mapping, Message};
use super::aws::{resolve_error, AwsClient, AwsError, Kind};
use super::batch::{BatchSink, Service, Settings};
use super::lanes::BatchApi;
use super::{Class, Refusal};
use crate::config::{Config, KafkaConfig};
use crate::error::Result;
use crate::route::Record;

/// The SQS sink.
pub type SqsSink = BatchSink<SqsApi>;

/// What to grant when the service denies the relay (the fix of the exit-2 message).
const PERMISSIONS: &str = "grant sqs:GetQueueUrl and sqs:SendMessage on the queues (and kms:GenerateDataKey, kms:Decrypt for an encrypted queue)";

/// The SQS API the lanes call.
pub struct SqsApi {
    client: AwsClient,
}

/// One entry of a `SendMessageBatch`.
fn entry(id: usize, m: Message) -> Value {
    let mut e = Map::new();
    e.insert("Id".into(), Value::String(id.to_string()));
    e.insert("MessageBody".into(), Value::String(m.body));
    if !m.attributes.is_empty() {
        let attrs: Map<String, Value> = m
            .attributes
            .into_iter()
            .map(|(k, v)| (k, json!({ "DataType": "String", "StringValue": v })))
            .collect();
        e.insert("MessageAttributes".into(), Value::Object(attrs));
    }
    if let Some(g) = m.group {
        e.insert("MessageGroupId".into(), Value::String(g));
    }
    if let Some(d) = m.dedup {
        e.insert("MessageDeduplicationId".into(), Value::String(d));
    }
    Value::Object(e)
}

impl BatchApi for SqsApi {
    type Entry = Message;

    async fn send_batch(
        &self,
        queue_url: &str,
        entries: Vec<Message>,
    ) -> std::result::Result<Vec<std::result::Result<(), Refusal>>, Refusal> {
        let mut results = BatchResults::new("sqs", entries.len());
        let entries: Vec<Value> = entries
            .into_iter()
            .enumerate()
            .map(|(i, m)| entry(i, m))
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
            .map_err(|e| request_refusal("sqs", &e))?;
        let v: Value = serde_json::from_slice(&answer).map_err(|e| Refusal {
            class: Class::Cluster,
            code: String::new(),
            detail: format!("sqs: the SendMessageBatch answer is not JSON: {e}"),
            alone: false,
        })?;
        let list = |k: &str| {
            v.get(k)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        for ok in list("Successful") {
            results.stored(ok.get("Id").and_then(Value::as_str).unwrap_or(""));
        }
        for failed in list("Failed") {
            let text = |k: &str| failed.get(k).and_then(Value::as_str).unwrap_or("");
            let sender = failed
                .get("SenderFault")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            results.refused(text("Id"), text("Code"), text("Message"), sender);
        }
        Ok(results.finish())
    }
}

impl Service for SqsApi {
    const NAME: &'static str = "sqs";
    const MAX_ENTRIES: usize = 10;

    fn origin(&self) -> String {
        self.client.origin()
    }

    fn entry(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
    ) -> std::result::Result<(Message, usize), Refusal> {
        message_entry(mapping, record)
    }

    /// `GetQueueUrl`.
    async fn resolve(&self, name: &str) -> Result<Option<Arc<str>>> {
        self.lookup(name)
            .await
            .map_err(|e| resolve_error(Self::NAME, PERMISSIONS, &e, &self.client))
    }
}

impl SqsApi {
    async fn lookup(&self, name: &str) -> std::result::Result<Option<Arc<str>>, AwsError> {
        let body = json!({ "QueueName": name }).to_string().into_bytes();
        match self.client.json("AmazonSQS.GetQueueUrl", "1.0", body).await {
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
            Err(e)
                if e.code.contains("QueueDoesNotExist") || e.code.contains("NonExistentQueue") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Builds the client (credentials from the default chain), resolves the dead-letter queue
/// and starts the lanes. `namespace` prefixes deduplication ids (the outbox table).
pub async fn connect(
    cfg: &Config,
    window: &KafkaConfig,
    namespace: &str,
) -> Result<(SqsSink, String)> {
    let api = SqsApi {
        client: AwsClient::new(&cfg.aws, "sqs", "SQS")?,
    };
    let lanes = cfg.aws.max_concurrent_requests;
    BatchSink::connect(
        api,
        Settings {
            per_key_order: cfg.sqs.queue.ends_with(".fifo"),
            broker_dedup: cfg.sqs.queue.ends_with(".fifo"),
            dead_letter: cfg.sqs.dead_letter_queue.clone(),
            dead_letter_key: "sqs.dead_letter_queue",
            max_bytes: cfg.sqs.max_message_bytes,
            max_bytes_key: "sqs.max_message_bytes",
            lanes,
            delivery_timeout: window.delivery_timeout,
            namespace: namespace.to_string(),
        },
    )
    .await
}
