//! Amazon SNS: `PublishBatch` (query protocol), the service side of `batch::BatchSink`.
//!
//! A topic whose ARN ends in `.fifo` gets the same `MessageGroupId` (aggregate id) and
//! `MessageDeduplicationId` (event id) as an SQS FIFO queue, and SNS keeps a group's order
//! into FIFO subscriptions and drops a repeat for five minutes; the lanes keep the order
//! through failures (see `sink::lanes`). Standard topics promise neither. Messages carry the
//! payload as `Message` and the headers as String message attributes (`aws::message`); a
//! subscription with raw message delivery hands both to SQS as they are.

use std::sync::Arc;

use super::aws::message::{message_entry, request_refusal, BatchResults, Mapping, Message};
use super::aws::{resolve_error, xml, AwsClient, AwsError};
use super::batch::{BatchSink, Service, Settings};
use super::lanes::BatchApi;
use super::Refusal;
use crate::config::{Config, KafkaConfig};
use crate::error::Result;
use crate::route::Record;

/// The SNS sink.
pub type SnsSink = BatchSink<SnsApi>;

/// What to grant when the service denies the relay (the fix of the exit-2 message).
const PERMISSIONS: &str = "grant sns:GetTopicAttributes and sns:Publish on the topics (and kms:GenerateDataKey, kms:Decrypt for an encrypted topic)";

/// The SNS API the lanes call.
pub struct SnsApi {
    client: AwsClient,
}

/// The form fields of a `PublishBatch` of `entries` to `topic_arn`.
fn publish_batch(topic_arn: &str, entries: Vec<Message>) -> Vec<(String, String)> {
    let mut form = vec![
        ("Action".to_string(), "PublishBatch".to_string()),
        ("Version".to_string(), "2010-03-31".to_string()),
        ("TopicArn".to_string(), topic_arn.to_string()),
    ];
    for (i, m) in entries.into_iter().enumerate() {
        let p = format!("PublishBatchRequestEntries.member.{}", i + 1);
        form.push((format!("{p}.Id"), i.to_string()));
        form.push((format!("{p}.Message"), m.body));
        for (j, (name, value)) in m.attributes.into_iter().enumerate() {
            let a = format!("{p}.MessageAttributes.entry.{}", j + 1);
            form.push((format!("{a}.Name"), name));
            form.push((format!("{a}.Value.DataType"), "String".into()));
            form.push((format!("{a}.Value.StringValue"), value));
        }
        if let Some(g) = m.group {
            form.push((format!("{p}.MessageGroupId"), g));
        }
        if let Some(d) = m.dedup {
            form.push((format!("{p}.MessageDeduplicationId"), d));
        }
    }
    form
}

impl BatchApi for SnsApi {
    type Entry = Message;

    async fn send_batch(
        &self,
        topic_arn: &str,
        entries: Vec<Message>,
    ) -> std::result::Result<Vec<std::result::Result<(), Refusal>>, Refusal> {
        let mut results = BatchResults::new("sns", entries.len());
        let form = publish_batch(topic_arn, entries);
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let answer = self
            .client
            .query(&form)
            .await
            .map_err(|e| request_refusal("sns", &e))?;
        let members = |list: &str| {
            xml::elements(&answer, list)
                .first()
                .map(|l| xml::elements(l, "member"))
                .unwrap_or_default()
        };
        for ok in members("Successful") {
            results.stored(&xml::text(ok, "Id").unwrap_or_default());
        }
        for failed in members("Failed") {
            let text = |tag: &str| xml::text(failed, tag).unwrap_or_default();
            let sender = text("SenderFault").eq_ignore_ascii_case("true");
            results.refused(&text("Id"), &text("Code"), &text("Message"), sender);
        }
        Ok(results.finish())
    }
}

impl Service for SnsApi {
    const NAME: &'static str = "sns";
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

    /// `GetTopicAttributes`: the ARN is the address; `NotFound` means no such topic.
    async fn resolve(&self, arn: &str) -> Result<Option<Arc<str>>> {
        self.lookup(arn)
            .await
            .map_err(|e| resolve_error(Self::NAME, PERMISSIONS, &e, &self.client))
    }
}

impl SnsApi {
    async fn lookup(&self, arn: &str) -> std::result::Result<Option<Arc<str>>, AwsError> {
        let form = [
            ("Action", "GetTopicAttributes"),
            ("Version", "2010-03-31"),
            ("TopicArn", arn),
        ];
        match self.client.query(&form).await {
            Ok(_) => Ok(Some(arn.into())),
            Err(e) if e.code == "NotFound" || e.code == "NotFoundException" => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Builds the client (credentials from the default chain), checks the dead-letter topic
/// and starts the lanes. `namespace` prefixes deduplication ids (the outbox table).
pub async fn connect(
    cfg: &Config,
    window: &KafkaConfig,
    namespace: &str,
) -> Result<(SnsSink, String)> {
    let api = SnsApi {
        client: AwsClient::new(&cfg.aws, "sns", "SNS")?,
    };
    let lanes = cfg.aws.max_concurrent_requests;
    BatchSink::connect(
        api,
        Settings {
            per_key_order: cfg.sns.topic_arn.ends_with(".fifo"),
            broker_dedup: cfg.sns.topic_arn.ends_with(".fifo"),
            dead_letter: cfg.sns.dead_letter_topic_arn.clone(),
            dead_letter_key: "sns.dead_letter_topic_arn",
            max_bytes: cfg.sns.max_message_bytes,
            max_bytes_key: "sns.max_message_bytes",
            lanes,
            delivery_timeout: window.delivery_timeout,
            namespace: namespace.to_string(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_batch_numbers_entries_and_attributes_from_one() {
        let m = Message {
            body: "{}".into(),
            attributes: vec![("id".into(), "e-1".into())],
            group: Some("order-7".into()),
            dedup: Some("public.outbox:e-1".into()),
            size: 0,
        };
        let form = publish_batch("arn:aws:sns:us-east-1:000000000000:t.fifo", vec![m]);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let p = "PublishBatchRequestEntries.member.1";
        assert_eq!(get(&format!("{p}.Id")), Some("0"));
        assert_eq!(get(&format!("{p}.Message")), Some("{}"));
        assert_eq!(
            get(&format!("{p}.MessageAttributes.entry.1.Name")),
            Some("id")
        );
        assert_eq!(
            get(&format!("{p}.MessageAttributes.entry.1.Value.StringValue")),
            Some("e-1")
        );
        assert_eq!(get(&format!("{p}.MessageGroupId")), Some("order-7"));
    }

    #[test]
    fn a_publish_batch_answer_is_read_entry_by_entry() {
        let answer = "<PublishBatchResponse><PublishBatchResult><Successful><member><Id>0</Id>\
                      <MessageId>m</MessageId></member></Successful><Failed><member><Id>1</Id>\
                      <Code>InvalidParameter</Code><Message>bad</Message><SenderFault>true</SenderFault>\
                      </member></Failed></PublishBatchResult></PublishBatchResponse>";
        let mut results = BatchResults::new("sns", 3);
        for ok in xml::elements(xml::elements(answer, "Successful")[0], "member") {
            results.stored(&xml::text(ok, "Id").unwrap_or_default());
        }
        for f in xml::elements(xml::elements(answer, "Failed")[0], "member") {
            results.refused(
                &xml::text(f, "Id").unwrap_or_default(),
                "InvalidParameter",
                "bad",
                true,
            );
        }
        let r = results.finish();
        assert!(r[0].is_ok());
        assert!(matches!(&r[1], Err(e) if matches!(e.class, crate::sink::Class::Record(_))));
        assert!(matches!(&r[2], Err(e) if e.class == crate::sink::Class::Cluster));
    }
}
