//! Secrets never reach logs or status output: the password in a PostgreSQL URL (however it
//! is spelled) and librdkafka properties whose name says password, secret, key or token are
//! replaced in `Debug` and in every URL the relay prints.

use std::fmt;

use super::*;

/// The URL with any password replaced, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    // The heuristic below knows the shapes (userinfo, password=…); the parser knows the
    // password itself, however it is written: every spelling of it is blanked as well.
    let mut out = redact_shapes(url);
    let password = crate::pg::tls::split_url(url)
        .ok()
        .and_then(|(rest, _)| rest.parse::<tokio_postgres::Config>().ok())
        .and_then(|c| {
            c.get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        });
    if let Some(p) = password.filter(|p| !p.is_empty()) {
        for spelling in [
            p.clone(),
            percent_encode(&p),
            p.replace('\\', "\\\\").replace('\'', "\\'"),
        ] {
            out = out.replace(&spelling, "***");
        }
    }
    out
}

/// Every byte outside `[A-Za-z0-9-._~]` (RFC 3986's unreserved) percent-encoded: URLs'
/// userinfo here, AWS's form bodies and signatures, registry subjects.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The shapes a password takes in a URL (`user:password@`, `?password=`) or a key/value
/// string (`password=x`, `password = 'a b'`).
fn redact_shapes(url: &str) -> String {
    // URL form: scheme://user:password@host...
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        // The password may contain '/', '?' or '#': the userinfo ends at the last '@'
        // before the path, so look for '@' first.
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                let redacted = format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
                return redact_kv(&redacted);
            }
        }
        return redact_kv(url);
    }
    redact_kv(url)
}

/// Redacts `password=...` (also `password = '…'`) in key=value connection strings and URL
/// query strings.
fn redact_kv(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let lower = rest.to_ascii_lowercase();
        let Some(pos) = lower.find("password") else {
            break;
        };
        let after_key = &rest[pos + "password".len()..];
        let trimmed = after_key.trim_start();
        let Some(value) = trimmed.strip_prefix('=') else {
            out.push_str(&rest[..pos + "password".len()]);
            rest = after_key;
            continue;
        };
        let value = value.trim_start();
        out.push_str(&rest[..pos]);
        out.push_str("password=***");
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            // A quoted value ends at the first quote not escaped by a backslash.
            let mut escaped = false;
            let mut end = quoted.len();
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = i + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end.min(quoted.len())
        } else {
            value.find([' ', '&']).unwrap_or(value.len())
        };
        rest = &value[end.min(value.len())..];
    }
    out.push_str(rest);
    out
}

/// Whether a `kafka.properties` value may be a secret: any name about passwords, secrets,
/// keys, tokens or credentials, and every `sasl.` property but the mechanism, the user name
/// and the Kerberos service name (so a mistyped `sasl.pasword` or `sasl.oauthbearer.config`,
/// which carries a client secret, is hidden too).
pub(crate) fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    let sasl_public = [
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.kerberos.service.name",
    ];
    n.contains("password")
        || n.contains("secret")
        || n.contains("key")
        || n.contains("token")
        || n.contains("credential")
        || (n.starts_with("sasl.") && !sasl_public.contains(&n.as_str()))
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("stream_timeout", &self.stream_timeout)
            .field("max_slot_lag_bytes", &self.max_slot_lag_bytes)
            .field("stale_slot_holder", &self.stale_slot_holder)
            .field("recreate_lost_slot", &self.recreate_lost_slot)
            .field("outbox", &self.outbox)
            .field("columns", &self.columns)
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_template", &self.topic_template)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("max_record_retries", &self.max_record_retries)
            .field("require_key", &self.require_key)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("dlq_topic", &self.dlq_topic)
            .field("cloudevents", &self.cloudevents)
            .field("cloudevents_source", &self.cloudevents_source)
            .field("properties", &props)
            .field("delivery", &self.delivery)
            .field("transactional_id", &self.transactional_id)
            .field("position_topic", &self.position_topic)
            .field("transaction_interval", &self.transaction_interval)
            .field("transaction_max_events", &self.transaction_max_events)
            .finish()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("mode", &self.mode)
            .field("polling", &self.polling)
            .field("postgres", &self.postgres)
            .field("kafka", &self.kafka)
            .field("retry", &self.retry)
            .field("http", &self.http)
            .field("sink", &self.sink)
            .field("rabbitmq", &self.rabbitmq)
            .field("nats", &self.nats)
            .field("aws", &self.aws)
            .field("sqs", &self.sqs)
            .field("sns", &self.sns)
            .field("eventbridge", &self.eventbridge)
            .field("pubsub", &self.pubsub)
            .field("servicebus", &self.servicebus)
            .field("schemas", &self.schemas)
            .field("tracing", &self.tracing)
            .finish()
    }
}

impl fmt::Debug for super::AwsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsConfig")
            .field("region", &self.region)
            .field("profile", &self.profile)
            .field(
                "endpoint_url",
                &self.endpoint_url.as_deref().map(redact_url),
            )
            .field("request_timeout", &self.request_timeout)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .finish()
    }
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("exchange_type", &self.exchange_type)
            .field("declare_exchange", &self.declare_exchange)
            .field("routing_key", &self.routing_key)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("subject", &self.subject)
            .field("stream", &self.stream)
            .field("create_stream", &self.create_stream)
            .field("stream_subjects", &self.stream_subjects)
            .field("duplicate_window", &self.duplicate_window)
            .field("dead_letter_subject", &self.dead_letter_subject)
            .field("ack_timeout", &self.ack_timeout)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}
