//! The sink of an AWS service that takes batches of entries with a result per entry (SQS
//! `SendMessageBatch`, SNS `PublishBatch`, EventBridge `PutEvents`): written once, the
//! service named by a [`Service`].
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

use super::message::{Mapping, Message};
use super::{credentials_error, AwsClient, AwsError, Kind};
use crate::error::{Error, Result};
use crate::poison::PoisonKind;
use crate::route::Record;
use crate::sink::lanes::{BatchApi, Lanes, Limits};
use crate::sink::{BoxDelivery, Class, Promises, Refusal, SendError, Sink};

/// One AWS service's side of [`AwsSink`].
pub trait Service: BatchApi {
    /// `sqs`, `sns`: in messages and metrics.
    const NAME: &'static str;
    /// What to grant when the service denies the relay (the fix of the exit-2 message).
    const PERMISSIONS: &'static str;

    fn client(&self) -> &AwsClient;

    /// The address of destination `name` (a queue URL, a topic ARN), `None` if the service
    /// says it does not exist.
    fn resolve(
        &self,
        name: &str,
    ) -> impl Future<Output = std::result::Result<Option<Arc<str>>, AwsError>> + Send;

    /// Whether `destination` keeps a key's order and drops repeats (an SQS queue or SNS
    /// topic whose name ends in `.fifo`).
    fn fifo(destination: &str) -> bool {
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

/// [`Service::entry`] of the services whose entries are [`Message`]s (SQS, SNS).
pub fn message_entry(
    mapping: &Mapping<'_>,
    record: &Record,
) -> std::result::Result<(Message, usize), Refusal> {
    let message = mapping.message(record)?;
    let size = message.size;
    Ok((message, size))
}

/// What an [`AwsSink`] is configured with.
pub struct Settings {
    /// The destination template is FIFO (what `promises()` states).
    pub fifo: bool,
    /// The dead-letter destination and the key that names it.
    pub dead_letter: String,
    pub dead_letter_key: &'static str,
    pub max_bytes: usize,
    pub max_bytes_key: &'static str,
    /// Lanes (`aws.max_concurrent_requests`).
    pub lanes: usize,
    pub delivery_timeout: Duration,
    /// Prefix of FIFO deduplication ids (the outbox table).
    pub namespace: String,
}

pub struct AwsSink<S: Service> {
    api: Arc<S>,
    lanes: Lanes<S::Entry>,
    /// Destination name → address (`None`: it does not exist).
    destinations: HashMap<String, Option<Arc<str>>>,
    dead_letter: Arc<str>,
    settings: Settings,
    replay_suffix: Option<String>,
}

impl<S: Service> AwsSink<S> {
    /// Resolves the dead-letter destination (exit 2 when it does not exist or the
    /// credentials are refused) and starts the lanes. Returns the sink and its start line.
    pub async fn connect(api: S, settings: Settings) -> Result<(AwsSink<S>, String)> {
        let source = api.client().credentials_source();
        let dead_letter = match api.resolve(&settings.dead_letter).await {
            Ok(Some(address)) => address,
            Ok(None) => {
                return Err(Error::setup(
                    format!(
                        "the dead-letter destination {} does not exist ({})",
                        settings.dead_letter, settings.dead_letter_key
                    ),
                    format!("create it, or point {} at one", settings.dead_letter_key),
                ))
            }
            Err(e) => return Err(start_error::<S>(&e, &source, api.client())),
        };
        let api = Arc::new(api);
        let limits = Limits {
            max_entries: 10,
            max_bytes: settings.max_bytes,
        };
        let lanes = Lanes::start(api.clone(), settings.lanes, limits);
        let line = format!(
            "{} at {}, credentials from {source}, dead letters to {}",
            S::NAME,
            api.client().endpoint(),
            settings.dead_letter
        );
        Ok((
            AwsSink {
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

/// An error while resolving at start (or a destination later): refused credentials or a
/// missing permission are exit 2 naming where the credentials came from (never their
/// secret); the rest is retried.
fn start_error<S: Service>(e: &AwsError, source: &str, client: &AwsClient) -> Error {
    let name = S::NAME.to_uppercase();
    match e.kind {
        Kind::Credentials if e.code == "Credentials" => credentials_error(
            super::credentials::CredentialsError::Invalid(e.message.clone()),
        ),
        Kind::Credentials => Error::setup(
            format!(
                "{name} at {} refused the AWS credentials from {source}: {e}",
                client.endpoint()
            ),
            "check the access key and secret (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the profile) and aws.region",
        ),
        Kind::Denied => Error::setup(
            format!("{name} denied the relay's identity ({source}): {e}"),
            S::PERMISSIONS,
        ),
        _ => Error::Publish(format!("{} at {}: {e}", S::NAME, client.endpoint())),
    }
}

impl<S: Service> Sink for AwsSink<S> {
    type Delivery = BoxDelivery;

    fn promises(&self) -> Promises {
        Promises {
            per_key_order: self.settings.fifo,
            broker_dedup: self.settings.fifo,
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
        let fifo = S::fifo(&record.topic);
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
        match self.api.resolve(&record.topic).await {
            Ok(address) => {
                if address.is_none() {
                    tracing::warn!(destination = %record.topic, sink = S::NAME, "the destination does not exist; its events are retried and dead-lettered after sink.max_record_retries failures");
                }
                self.destinations.insert(record.topic.clone(), address);
                Ok(())
            }
            Err(e) => {
                let source = self.api.client().credentials_source();
                Err(start_error::<S>(&e, &source, self.api.client()))
            }
        }
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
        let fifo = S::fifo(&self.settings.dead_letter);
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
