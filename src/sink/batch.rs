//! The sink of a broker that takes batches of entries over HTTP (SQS `SendMessageBatch`, SNS
//! `PublishBatch`, EventBridge `PutEvents`, Pub/Sub `publish`): written once, the broker
//! named by a [`Service`].
//!
//! At connect the dead-letter destination is resolved — which proves the endpoint, the
//! credentials and a permission before anything is read. Each destination an event names is
//! resolved once per session (a queue URL, a topic's existence); one that does not exist
//! refuses its events as `Absent` — retried, then dead-lettered after
//! `sink.max_record_retries` identical refusals — while the others flow. Records go through
//! the lanes (`sink::lanes`): one request in flight per key's lane, FIFO order kept through
//! failures.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::poison::PoisonKind;
use crate::route::Record;
use crate::sink::concurrency::Concurrency;
use crate::sink::lanes::{BatchApi, Lanes, Limits};
use crate::sink::{BoxDelivery, Class, Promises, Refusal, SendError, Sink};

/// One broker's side of [`BatchSink`].
pub trait Service: BatchApi {
    /// `sqs`, `sns`, `eventbridge`, `pubsub`: in messages and metrics.
    const NAME: &'static str;
    /// The most entries a request takes.
    const MAX_ENTRIES: usize;

    /// Where the sink publishes and with what credentials, for the start line (never a
    /// secret): `at https://…, credentials from …`.
    fn origin(&self) -> String;

    /// The address of destination `name` (a queue URL, a topic ARN), `None` if the service
    /// says it does not exist. `Err`: a setup error (exit 2: credentials or a permission
    /// refused) or one that waiting can mend.
    fn resolve(&self, name: &str) -> impl Future<Output = Result<Option<Arc<str>>>> + Send;

    /// Whether a batch to `destination` may hold one record per key only: the broker answers
    /// per entry, so a key's second record could be stored while its first is refused (SQS
    /// and SNS FIFO, whose names end in `.fifo`). Not for a broker that keeps no order, nor
    /// for one whose requests are all-or-nothing.
    fn one_per_key(destination: &str) -> bool {
        destination.ends_with(".fifo")
    }

    /// The entry for `record` and its size as the service counts it; `Err` is the record's
    /// own refusal (final: it is dead-lettered).
    fn entry(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
    ) -> std::result::Result<(Self::Entry, usize), Refusal>;

    /// The entry of a dead letter (`record` carries `outboxd.dlq.*` headers).
    fn dead_letter_entry(
        &self,
        mapping: &Mapping<'_>,
        record: &Record,
    ) -> std::result::Result<(Self::Entry, usize), Refusal> {
        self.entry(mapping, record)
    }
}

/// How records become entries for one sink.
pub struct Mapping<'a> {
    /// The destination keeps order and drops repeats (SQS/SNS FIFO: group and dedup ids).
    pub fifo: bool,
    /// Prefix of deduplication ids (the outbox table).
    pub namespace: &'a str,
    /// `outboxd replay`: makes deduplication ids new.
    pub replay_suffix: Option<&'a str>,
    pub max_bytes: usize,
    /// The size key, for the refusal (`sqs.max_message_bytes`).
    pub max_bytes_key: &'static str,
}

impl Mapping<'_> {
    /// The refusal of a message or entry of `size` bytes, over the limit (final: the record's
    /// own).
    pub fn too_large(&self, size: usize) -> Refusal {
        Refusal {
            class: Class::Record(PoisonKind::TooLarge),
            code: "too_large".into(),
            detail: format!(
                "the message would be {size} bytes, over {} = {}",
                self.max_bytes_key, self.max_bytes
            ),
            alone: true,
        }
    }
}

/// What a [`BatchSink`] is configured with.
pub struct Settings {
    /// What `promises()` states: the destination keeps a key's order (FIFO, ordering keys)…
    pub per_key_order: bool,
    /// … and drops repeats (FIFO deduplication).
    pub broker_dedup: bool,
    /// The dead-letter destination and the key that names it.
    pub dead_letter: String,
    pub dead_letter_key: &'static str,
    pub max_bytes: usize,
    pub max_bytes_key: &'static str,
    /// Lanes (`aws.max_concurrent_requests`, `pubsub.max_concurrent_requests`).
    pub lanes: usize,
    pub delivery_timeout: Duration,
    /// Prefix of FIFO deduplication ids (the outbox table).
    pub namespace: String,
}

pub struct BatchSink<S: Service> {
    api: Arc<S>,
    lanes: Lanes<S::Entry>,
    /// Destination name → address (`None`: it does not exist).
    destinations: HashMap<String, Option<Arc<str>>>,
    dead_letter: Arc<str>,
    settings: Settings,
    replay_suffix: Option<String>,
}

impl<S: Service> BatchSink<S> {
    /// Resolves the dead-letter destination (exit 2 when it does not exist or the
    /// credentials are refused) and starts the lanes. Returns the sink and its start line.
    pub async fn connect(api: S, settings: Settings) -> Result<(BatchSink<S>, String)> {
        let dead_letter = match api.resolve(&settings.dead_letter).await? {
            Some(address) => address,
            None => {
                return Err(Error::setup(
                    format!(
                        "the dead-letter destination {} does not exist ({})",
                        settings.dead_letter, settings.dead_letter_key
                    ),
                    format!("create it, or point {} at one", settings.dead_letter_key),
                ))
            }
        };
        let api = Arc::new(api);
        let limits = Limits {
            max_entries: S::MAX_ENTRIES,
            max_bytes: settings.max_bytes,
        };
        let lanes = Lanes::start(
            api.clone(),
            settings.lanes,
            limits,
            Concurrency::shared(S::NAME, settings.lanes),
        );
        let line = format!(
            "{} {}, dead letters to {}",
            S::NAME,
            api.origin(),
            settings.dead_letter
        );
        Ok((
            BatchSink {
                api,
                lanes,
                destinations: HashMap::new(),
                dead_letter,
                settings,
                replay_suffix: None,
            },
            line,
        ))
    }

    /// `outboxd replay`: FIFO destinations must not drop the republished events as repeats.
    pub fn replaying(&mut self) {
        self.replay_suffix = Some(crate::sink::replay_suffix());
    }

    fn mapping(&self, fifo: bool) -> Mapping<'_> {
        Mapping {
            fifo,
            namespace: &self.settings.namespace,
            replay_suffix: self.replay_suffix.as_deref(),
            max_bytes: self.settings.max_bytes,
            max_bytes_key: self.settings.max_bytes_key,
        }
    }
}

impl<S: Service> Sink for BatchSink<S> {
    type Delivery = BoxDelivery;

    fn promises(&self) -> Promises {
        Promises {
            per_key_order: self.settings.per_key_order,
            broker_dedup: self.settings.broker_dedup,
            transactions: false,
        }
    }

    fn flush(&self, _timeout: Duration) {
        // Every delivery the window counted was answered by the service; nothing is held.
    }

    async fn send(&mut self, record: &Record) -> std::result::Result<BoxDelivery, SendError> {
        let address = match self.destinations.get(&record.topic) {
            Some(Some(address)) => address.clone(),
            Some(None) => {
                return Err(SendError::Refused(Refusal {
                    class: Class::Absent,
                    code: "NotFound".into(),
                    detail: format!("{}: {} does not exist", S::NAME, record.topic),
                    alone: true,
                }))
            }
            None => {
                return Err(SendError::Refused(Refusal {
                    class: Class::Cluster,
                    code: String::new(),
                    detail: format!("{}: {} was not resolved", S::NAME, record.topic),
                    alone: false,
                }))
            }
        };
        let fifo = S::one_per_key(&record.topic);
        let (entry, size) = self
            .api
            .entry(&self.mapping(fifo), record)
            .map_err(SendError::Refused)?;
        self.lanes.send(address, fifo, record, entry, size)
    }

    async fn ensure_topic(&mut self, record: &Record) -> Result<()> {
        if self.destinations.contains_key(&record.topic) {
            return Ok(());
        }
        let address = self.api.resolve(&record.topic).await?;
        if address.is_none() {
            tracing::warn!(destination = %record.topic, sink = S::NAME, "the destination does not exist; its events are retried and dead-lettered after sink.max_record_retries failures");
        }
        self.destinations.insert(record.topic.clone(), address);
        Ok(())
    }

    /// Sends the record to the dead-letter destination with `outboxd.dlq.reason`, `.topic`
    /// and `.error`, and waits for the service's answer.
    async fn dead_letter(
        &mut self,
        record: &Record,
        kind: PoisonKind,
        detail: &str,
    ) -> std::result::Result<(), String> {
        let dlq = crate::sink::dead_letter_record(record, kind, detail);
        let fifo = S::one_per_key(&self.settings.dead_letter);
        let (entry, _) = self
            .api
            .dead_letter_entry(&self.mapping(fifo), &dlq)
            .map_err(|r| format!("{}: {}", S::NAME, r.detail))?;
        let results = self
            .api
            .send_batch(&self.dead_letter, vec![entry])
            .await
            .map_err(|r| r.detail)?;
        match results.into_iter().next() {
            Some(Ok(())) => Ok(()),
            Some(Err(r)) => Err(r.detail),
            None => Err(format!("{}: no answer for the dead letter", S::NAME)),
        }
    }

    fn delivery_timeout(&self) -> Duration {
        self.settings.delivery_timeout
    }
}
