//! `[aws]` (what every AWS sink shares: region, profile, endpoint, request limits), `[sqs]`,
//! `[sns]` and `[eventbridge]`. Credentials are never keys of the file: they come from the SDKs' default chain
//! (`crate::sink::aws::credentials`), so a config file holds no AWS secret.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::topic::TopicTemplate;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAws {
    region: Option<String>,
    profile: Option<String>,
    endpoint_url: Option<String>,
    request_timeout_ms: Option<u64>,
    max_concurrent_requests: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSns {
    topic_arn: Option<String>,
    dead_letter_topic_arn: Option<String>,
    max_message_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEventBridge {
    event_bus: Option<String>,
    source: Option<String>,
    detail_type: Option<String>,
    dead_letter_event_bus: Option<String>,
    max_entry_bytes: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSqs {
    queue: Option<String>,
    dead_letter_queue: Option<String>,
    max_message_bytes: Option<usize>,
}

/// `[aws]`: shared by the AWS sinks (`Debug` in `redact.rs`: the endpoint may hold userinfo).
#[derive(Clone)]
pub struct AwsConfig {
    /// `aws.region`; when unset, `AWS_REGION`, `AWS_DEFAULT_REGION` or the profile's region
    /// (resolved by the client, which names `aws.region` when none is found). Empty: unset.
    pub region: String,
    /// The shared-files profile (`AWS_PROFILE` when unset).
    pub profile: Option<String>,
    /// Overrides the service endpoint (`AWS_ENDPOINT_URL_<SERVICE>` / `AWS_ENDPOINT_URL`
    /// otherwise; default `https://<service>.<region>.amazonaws.com/`).
    pub endpoint_url: Option<String>,
    /// One request's bound: past it the request counts as failed (the session resends).
    pub request_timeout: Duration,
    /// Batch requests in flight at once (lanes; one key's records share one).
    pub max_concurrent_requests: usize,
}

/// `[sqs]`.
#[derive(Clone, Debug)]
pub struct SqsConfig {
    /// Queue-name template (`{aggregatetype}`, `{type}`); a name ending in `.fifo` is a FIFO
    /// queue (group = aggregate id, deduplication id = event id).
    pub queue: String,
    /// The queue poison events go to, with their reason as attributes.
    pub dead_letter_queue: String,
    /// A message's size limit (body and attributes): 262,144 by default; 1,048,576 where
    /// the queue allows it.
    pub max_message_bytes: usize,
}

/// `used`: an AWS sink is configured, so a region must be found (`aws.region`,
/// `AWS_REGION`, `AWS_DEFAULT_REGION`, or the profile's `region` in the shared config file).
/// `[sns]`.
#[derive(Clone, Debug)]
pub struct SnsConfig {
    /// Topic-ARN template (`{aggregatetype}`, `{type}`); an ARN ending in `.fifo` is a FIFO
    /// topic (group = aggregate id, deduplication id = event id).
    pub topic_arn: String,
    /// The topic poison events go to, with their reason as attributes.
    pub dead_letter_topic_arn: String,
    /// A message's size limit (body and attributes), at most SNS's 262,144.
    pub max_message_bytes: usize,
}

/// `[eventbridge]`.
#[derive(Clone, Debug)]
pub struct EventBridgeConfig {
    /// Event-bus template (`{aggregatetype}`, `{type}`): a bus name or ARN.
    pub event_bus: String,
    /// The events' `Source` template (default `outboxd.{aggregatetype}`).
    pub source: String,
    /// The events' `DetailType` template (default `{type}`).
    pub detail_type: String,
    /// The bus poison events go to (`Source` `outboxd`, `DetailType` `outboxd.dead_letter`).
    pub dead_letter_event_bus: String,
    /// An entry's size limit as EventBridge counts it (source, detail type, detail, time),
    /// at most its 262,144; a request holds at most that much too.
    pub max_entry_bytes: usize,
}

pub(super) fn eventbridge(
    raw: RawEventBridge,
    used: bool,
) -> Result<EventBridgeConfig, ConfigError> {
    let template = |key: &'static str, value: Option<String>, default: &str| {
        let value = value.unwrap_or_else(|| default.to_string());
        TopicTemplate::parse(&value).map_err(|p| invalid(key, p))?;
        Ok::<_, ConfigError>(value)
    };
    let event_bus = template("eventbridge.event_bus", raw.event_bus, "default")?;
    let source = template("eventbridge.source", raw.source, "outboxd.{aggregatetype}")?;
    if source.to_ascii_lowercase().starts_with("aws.") {
        return Err(invalid(
            "eventbridge.source",
            "must not start with `aws.` (AWS keeps those sources for its own services)",
        ));
    }
    let detail_type = template("eventbridge.detail_type", raw.detail_type, "{type}")?;
    let dead_letter_event_bus = match raw.dead_letter_event_bus {
        Some(b) => b,
        None if used => {
            return Err(invalid(
                "eventbridge.dead_letter_event_bus",
                "missing: the event bus (name or ARN) poison events go to",
            ))
        }
        None => String::new(),
    };
    if used {
        if let Err(p) = crate::topic::Naming::EventBus.check(&dead_letter_event_bus) {
            return Err(invalid("eventbridge.dead_letter_event_bus", p));
        }
    }
    let max = raw.max_entry_bytes.unwrap_or(262_144);
    if !(1_024..=262_144).contains(&max) {
        return Err(invalid(
            "eventbridge.max_entry_bytes",
            "must be between 1024 and 262144 (EventBridge's largest entry)",
        ));
    }
    Ok(EventBridgeConfig {
        event_bus,
        source,
        detail_type,
        dead_letter_event_bus,
        max_entry_bytes: max,
    })
}

pub(super) fn sns(raw: RawSns, used: bool) -> Result<SnsConfig, ConfigError> {
    let missing = |key| {
        invalid(
            key,
            "missing: an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
        )
    };
    let topic_arn = match raw.topic_arn {
        Some(t) => t,
        None if used => return Err(missing("sns.topic_arn")),
        None => String::new(),
    };
    if !topic_arn.is_empty() {
        TopicTemplate::parse(&topic_arn).map_err(|p| invalid("sns.topic_arn", p))?;
    }
    let dead_letter_topic_arn = match raw.dead_letter_topic_arn {
        Some(t) => t,
        None if used => return Err(missing("sns.dead_letter_topic_arn")),
        None => String::new(),
    };
    if used {
        if let Err(p) = crate::topic::Naming::SnsTopicArn.check(&dead_letter_topic_arn) {
            return Err(invalid("sns.dead_letter_topic_arn", p));
        }
    }
    let max = raw.max_message_bytes.unwrap_or(262_144);
    if !(1_024..=262_144).contains(&max) {
        return Err(invalid(
            "sns.max_message_bytes",
            "must be between 1024 and 262144 (SNS's largest message)",
        ));
    }
    Ok(SnsConfig {
        topic_arn,
        dead_letter_topic_arn,
        max_message_bytes: max,
    })
}

pub(super) fn aws(raw: RawAws, used: bool) -> Result<AwsConfig, ConfigError> {
    let timeout = raw.request_timeout_ms.unwrap_or(10_000);
    if !(100..=300_000).contains(&timeout) {
        return Err(invalid(
            "aws.request_timeout_ms",
            "must be between 100 and 300000 milliseconds",
        ));
    }
    let lanes = raw.max_concurrent_requests.unwrap_or(8);
    if !(1..=256).contains(&lanes) {
        return Err(invalid(
            "aws.max_concurrent_requests",
            "must be between 1 and 256",
        ));
    }
    if let Some(e) = &raw.endpoint_url {
        if !(e.starts_with("https://") || e.starts_with("http://")) {
            return Err(invalid(
                "aws.endpoint_url",
                "must start with https:// (or http:// for a local emulator)",
            ));
        }
    }
    let profile = raw.profile.filter(|p| !p.is_empty());
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let region = match raw.region {
        Some(r) => r,
        None if used => env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| {
                let name = super::aws_profile::profile_name(profile.as_deref());
                super::aws_profile::load(&name)
                    .get("region")
                    .map(str::to_string)
            })
            .ok_or_else(|| {
                invalid(
                    "aws.region",
                    "missing; set it, AWS_REGION, or the profile's region (like eu-west-1)",
                )
            })?,
        None => String::new(),
    };
    if !region
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(invalid(
            "aws.region",
            format!("`{region}` is not a region name (like eu-west-1)"),
        ));
    }
    Ok(AwsConfig {
        region,
        profile,
        endpoint_url: raw.endpoint_url,
        request_timeout: Duration::from_millis(timeout),
        max_concurrent_requests: lanes,
    })
}

pub(super) fn sqs(raw: RawSqs) -> Result<SqsConfig, ConfigError> {
    let queue = raw.queue.unwrap_or_else(|| "outbox-{aggregatetype}".into());
    TopicTemplate::parse(&queue).map_err(|p| invalid("sqs.queue", p))?;
    let dead_letter_queue = raw
        .dead_letter_queue
        .unwrap_or_else(|| "outboxd-dead-letter".into());
    if let Err(p) = crate::topic::Naming::SqsQueue.check(&dead_letter_queue) {
        return Err(invalid("sqs.dead_letter_queue", p));
    }
    let max = raw.max_message_bytes.unwrap_or(262_144);
    if !(1_024..=1_048_576).contains(&max) {
        return Err(invalid(
            "sqs.max_message_bytes",
            "must be between 1024 and 1048576 (SQS's largest message)",
        ));
    }
    Ok(SqsConfig {
        queue,
        dead_letter_queue,
        max_message_bytes: max,
    })
}
