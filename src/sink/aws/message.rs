//! What SQS and SNS share: how a record becomes a message (body, String attributes within
//! the limit of ten, FIFO group and deduplication ids), and what a refusal of one entry of a
//! batch (`BatchResultErrorEntry`, the same shape in both) means for the relay.
//!
//! ## What a message carries
//!
//! The body is the payload. SQS and SNS take only text of XML's characters and at least one
//! of them: a `bytea` payload, or text with a character they refuse, is sent base64-encoded
//! with the attribute `outboxd.encoding = base64`; a missing or empty payload (a table's
//! tombstone) is the body `null`. Headers (`id`, `type`, the outbox's `headers`, `key` = the
//! aggregate id) become String message attributes. At most 10 are taken per message, with
//! names of letters, digits, `-`, `_`, `.` and non-empty values: the ones that do not fit or
//! cannot be attributes travel in one attribute `outboxd.headers`, a JSON object — nothing is
//! dropped.
//!
//! ## FIFO ids
//!
//! `MessageGroupId` = the aggregate id; `MessageDeduplicationId` = `<schema>.<table>:<event
//! id>`. Either is replaced by its SHA-256 in hex when it is longer than 128 characters or
//! holds a character the services refuse (anything but ASCII letters, digits and
//! punctuation): one key always gives one group.

use base64::Engine as _;
use serde_json::{Map, Value};

use super::Kind;
use crate::poison::PoisonKind;
use crate::route::Record;
use crate::sink::{Class, Refusal};

pub use crate::sink::batch::Mapping;

/// The most attributes a message may have.
const MAX_ATTRIBUTES: usize = 10;

/// A record as an SQS or SNS message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub body: String,
    /// String attributes, at most ten.
    pub attributes: Vec<(String, String)>,
    /// FIFO only.
    pub group: Option<String>,
    /// FIFO only.
    pub dedup: Option<String>,
    /// The size the service counts: body, attribute names, types and values.
    pub size: usize,
}

/// Whether the services take `s` as message text: XML's characters (#x9, #xA, #xD,
/// #x20–#xD7FF, #xE000–#xFFFD, #x10000–#x10FFFF).
fn xml_text(s: &str) -> bool {
    s.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
    })
}

/// A group or deduplication id the services take: `s` if it is 1–128 ASCII letters, digits
/// and punctuation, else its SHA-256 in hex.
pub fn fifo_id(s: &str) -> String {
    if !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()) {
        s.to_string()
    } else {
        super::sigv4::sha256_hex(s.as_bytes())
    }
}

/// A message attribute name the services take.
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

impl Mapping<'_> {
    /// The message for `record`; `Err` (the record's own, final) when it is larger than
    /// `max_bytes`.
    pub fn message(&self, record: &Record) -> Result<Message, Refusal> {
        let mut attributes: Vec<(String, String)> = Vec::new();
        let value = record.value.as_deref().unwrap_or_default();
        let body = match std::str::from_utf8(value) {
            _ if value.is_empty() => "null".to_string(),
            Ok(text) if !record.binary && xml_text(text) => text.to_string(),
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
            if attribute_name(name) && !text.is_empty() && xml_text(&text) {
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
            return Err(self.too_large(size));
        }
        let (group, dedup) = if self.fifo {
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
            (
                Some(fifo_id(record.key.as_deref().unwrap_or("-"))),
                Some(fifo_id(&dedup)),
            )
        } else {
            (None, None)
        };
        Ok(Message {
            body,
            attributes,
            group,
            dedup,
            size,
        })
    }
}

/// `Service::entry` of the services whose entries are [`Message`]s (SQS, SNS).
pub fn message_entry(mapping: &Mapping<'_>, record: &Record) -> Result<(Message, usize), Refusal> {
    let message = mapping.message(record)?;
    let size = message.size;
    Ok((message, size))
}

/// A refusal of a whole request: about the service, the connection or the credentials —
/// never the one record's (every entry's outcome is unknown). A destination deleted under
/// the relay, or a request the service will not take as it is (`Kind::Request`), is retried
/// and dead-lettered once the same record failed the same way often enough.
pub fn request_refusal(service: &str, e: &super::AwsError) -> Refusal {
    Refusal {
        class: match e.kind {
            Kind::Request => Class::Unclear,
            _ => Class::Cluster,
        },
        code: e.code.clone(),
        detail: format!("{service}: {e}"),
        alone: false,
    }
}

/// A refusal of one entry of a batch (`BatchResultErrorEntry`): poison only when the
/// service blames the entry's content; throttles, internal errors, KMS and permission
/// problems are the service's (retried, never dead-lettered); another code the sender is
/// blamed for is retried and dead-lettered after `max_record_retries` identical refusals.
pub fn entry_refusal(service: &str, code: &str, message: &str, sender_fault: bool) -> Refusal {
    let detail = format!("{service}: {code}: {message}");
    let class = match super::kind_of(code, 0) {
        Kind::Request if code.contains("TooLong") || code.contains("TooLarge") => {
            Class::Record(PoisonKind::TooLarge)
        }
        Kind::Request
            if sender_fault
                && matches!(
                    code,
                    "InvalidMessageContents"
                        | "InvalidParameterValue"
                        | "InvalidParameter"
                        | "InvalidAttributeValue"
                        | "InvalidAttributeName"
                        | "MissingParameter"
                        | "InvalidBatchEntryId"
                        | "ValidationError"
                        | "MalformedDetail"
                        | "InvalidArgument"
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

/// The per-entry results of a batch answer (SQS's JSON, SNS's XML: the same shape), by the
/// entry ids `0..n` the request gave.
pub struct BatchResults {
    service: &'static str,
    slots: Vec<Option<Result<(), Refusal>>>,
}

impl BatchResults {
    pub fn new(service: &'static str, n: usize) -> BatchResults {
        BatchResults {
            service,
            slots: (0..n).map(|_| None).collect(),
        }
    }

    fn slot(&mut self, id: &str) -> Option<&mut Option<Result<(), Refusal>>> {
        id.trim()
            .parse::<usize>()
            .ok()
            .and_then(|i| self.slots.get_mut(i))
    }

    /// Entry `id` was stored.
    pub fn stored(&mut self, id: &str) {
        if let Some(slot) = self.slot(id) {
            *slot = Some(Ok(()));
        }
    }

    /// Entry `id` was refused.
    pub fn refused(&mut self, id: &str, code: &str, message: &str, sender_fault: bool) {
        let service = self.service;
        if let Some(slot) = self.slot(id) {
            *slot = Some(Err(entry_refusal(service, code, message, sender_fault)));
        }
    }

    /// One result per entry; an entry the answer does not name is a failure of the service.
    pub fn finish(self) -> Vec<Result<(), Refusal>> {
        let service = self.service;
        self.slots
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Refusal {
                        class: Class::Cluster,
                        code: String::new(),
                        detail: format!(
                            "{service}: the answer names this entry neither successful nor failed"
                        ),
                        alone: false,
                    })
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)], value: Option<&[u8]>, key: Option<&str>) -> Record {
        Record {
            topic: "orders.fifo".into(),
            exchange: None,
            detail_type: None,
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
            max_bytes_key: "sqs.max_message_bytes",
        }
    }

    fn message(fifo: bool, r: &Record) -> Message {
        mapping(fifo)
            .message(r)
            .map_err(|r| r.detail)
            .unwrap_or_else(|d| panic!("{d}"))
    }

    fn attribute<'m>(m: &'m Message, name: &str) -> Option<&'m str> {
        m.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_fifo_message_is_grouped_by_aggregate_and_deduplicated_by_event_id() {
        let r = record(
            &[("id", "e-1"), ("type", "Placed")],
            Some(b"{}"),
            Some("order-7"),
        );
        let m = message(true, &r);
        assert_eq!(m.group.as_deref(), Some("order-7"));
        assert_eq!(m.dedup.as_deref(), Some("public.outbox:e-1"));
        assert_eq!(m.body, "{}");
        assert_eq!(attribute(&m, "id"), Some("e-1"));
        assert_eq!(attribute(&m, "key"), Some("order-7"));
        let m = message(false, &r);
        assert_eq!(
            (m.group, m.dedup),
            (None, None),
            "standard queues refuse them"
        );
    }

    #[test]
    fn ids_the_services_refuse_become_their_sha256() {
        assert_eq!(fifo_id("{\"id\":42}"), "{\"id\":42}");
        assert_eq!(fifo_id(&"x".repeat(129)).len(), 64);
        assert_eq!(fifo_id("tenant é"), fifo_id("tenant é"));
        assert_ne!(fifo_id("tenant é"), "tenant é");
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
        let m = message(false, &record(&h, Some(b"{}"), Some("k")));
        assert_eq!(m.attributes.len(), 10);
        let overflow: Map<String, Value> = attribute(&m, "outboxd.headers")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default();
        let mut names: Vec<&str> = m
            .attributes
            .iter()
            .map(|(k, _)| k.as_str())
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
    fn bodies_the_services_cannot_carry_as_text_are_base64_and_empty_ones_null() {
        let m = message(false, &record(&[("id", "1")], Some(b"a\x00b"), None));
        assert_eq!(m.body, "YQBi");
        assert_eq!(attribute(&m, "outboxd.encoding"), Some("base64"));
        let m = message(false, &record(&[("id", "1")], None, None));
        assert_eq!(m.body, "null");
        let big = vec![b'x'; 262_145];
        let refused = mapping(false).message(&record(&[], Some(&big), None)).err();
        assert_eq!(
            refused.map(|r| r.class),
            Some(Class::Record(PoisonKind::TooLarge))
        );
    }

    #[test]
    fn entry_refusals_are_poison_only_when_about_the_entry() {
        let class = |code, sender| entry_refusal("sqs", code, "m", sender).class;
        assert_eq!(
            class("InvalidMessageContents", true),
            Class::Record(PoisonKind::Rejected)
        );
        assert_eq!(class("ThrottlingException", true), Class::Cluster);
        assert_eq!(class("KMS.AccessDeniedException", true), Class::Cluster);
        assert_eq!(class("InternalError", false), Class::Cluster);
        assert_eq!(class("SomethingNew", true), Class::Unclear);
    }
}
