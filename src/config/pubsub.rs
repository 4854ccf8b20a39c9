//! `[pubsub]`: Google Cloud Pub/Sub. Credentials are never keys of the file: they come from
//! where Google's client libraries look (`crate::sink::gcp::auth`); the file may name a
//! credentials *file* (`credentials_file`), whose private key is never logged.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::topic::TopicTemplate;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPubSub {
    project: Option<String>,
    topic: Option<String>,
    dead_letter_topic: Option<String>,
    ordering_keys: Option<bool>,
    endpoint: Option<String>,
    credentials_file: Option<String>,
    max_message_bytes: Option<usize>,
    request_timeout_ms: Option<u64>,
    max_concurrent_requests: Option<usize>,
}

/// `[pubsub]`.
#[derive(Clone, Debug)]
pub struct PubSubConfig {
    /// The project of the topics (`GOOGLE_CLOUD_PROJECT` when unset). Empty: not used.
    pub project: String,
    /// Topic-id template (`{aggregatetype}`, `{type}`).
    pub topic: String,
    /// The topic poison events go to, with their reason as attributes (must exist).
    pub dead_letter_topic: String,
    /// `orderingKey` = the aggregate id: a subscription with message ordering receives one
    /// key's messages in publish order.
    pub ordering_keys: bool,
    /// `https://pubsub.googleapis.com` by default (a regional one keeps ordering keys within
    /// a region); `PUBSUB_EMULATOR_HOST` (`host:port`) or an `http://` URL: the emulator,
    /// without credentials.
    pub endpoint: String,
    /// A service-account or authorized-user JSON file (else `GOOGLE_APPLICATION_CREDENTIALS`,
    /// gcloud's application-default file, the metadata server).
    pub credentials_file: Option<String>,
    /// A message's limit (data, attributes, ordering key), and a request's.
    pub max_message_bytes: usize,
    pub request_timeout: Duration,
    /// Publish requests in flight at once (lanes; one key's records share one).
    pub max_concurrent_requests: usize,
}

impl PubSubConfig {
    /// Talks to the emulator: plain HTTP, no credentials.
    pub fn emulator(&self) -> bool {
        self.endpoint.starts_with("http://")
    }
}

pub(super) fn pubsub(raw: RawPubSub, used: bool) -> Result<PubSubConfig, ConfigError> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let project = match raw.project.or_else(|| env("GOOGLE_CLOUD_PROJECT")) {
        Some(p) => p,
        None if used => {
            return Err(invalid(
                "pubsub.project",
                "missing; set it or GOOGLE_CLOUD_PROJECT (the project id of the topics)",
            ))
        }
        None => String::new(),
    };
    if used
        && !(project.len() >= 6
            && project.len() <= 30
            && project.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b':'
            }))
    {
        return Err(invalid(
            "pubsub.project",
            format!("`{project}` is not a project id (6–30 lowercase letters, digits, hyphens)"),
        ));
    }
    let topic = raw.topic.unwrap_or_else(|| "outbox-{aggregatetype}".into());
    TopicTemplate::parse(&topic).map_err(|p| invalid("pubsub.topic", p))?;
    let dead_letter_topic = raw
        .dead_letter_topic
        .unwrap_or_else(|| "outboxd-dead-letter".into());
    if let Err(p) = crate::topic::Naming::PubSubTopic.check(&dead_letter_topic) {
        return Err(invalid("pubsub.dead_letter_topic", p));
    }
    let endpoint = match (raw.endpoint, env("PUBSUB_EMULATOR_HOST")) {
        (Some(e), _) => e,
        (None, Some(host)) => format!("http://{host}"),
        (None, None) => "https://pubsub.googleapis.com".into(),
    };
    if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
        return Err(invalid(
            "pubsub.endpoint",
            "must start with https:// (or http:// for the emulator)",
        ));
    }
    let max = raw.max_message_bytes.unwrap_or(7_000_000);
    if !(1_024..=10_000_000).contains(&max) {
        return Err(invalid(
            "pubsub.max_message_bytes",
            "must be between 1024 and 10000000 (Pub/Sub's largest message)",
        ));
    }
    let timeout = raw.request_timeout_ms.unwrap_or(10_000);
    if !(100..=300_000).contains(&timeout) {
        return Err(invalid(
            "pubsub.request_timeout_ms",
            "must be between 100 and 300000 milliseconds",
        ));
    }
    let lanes = raw.max_concurrent_requests.unwrap_or(8);
    if !(1..=256).contains(&lanes) {
        return Err(invalid(
            "pubsub.max_concurrent_requests",
            "must be between 1 and 256",
        ));
    }
    Ok(PubSubConfig {
        project,
        topic,
        dead_letter_topic,
        ordering_keys: raw.ordering_keys.unwrap_or(true),
        endpoint: endpoint.trim_end_matches('/').to_string(),
        credentials_file: raw.credentials_file.filter(|f| !f.is_empty()),
        max_message_bytes: max,
        request_timeout: Duration::from_millis(timeout),
        max_concurrent_requests: lanes,
    })
}
