//! `[tracing]`: OpenTelemetry spans over OTLP (`crate::trace`). A key set in the file wins;
//! where it is not, the standard `OTEL_*` variables are honoured (`OTEL_SDK_DISABLED`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP[_TRACES]_{ENDPOINT,
//! PROTOCOL, HEADERS, CERTIFICATE, TIMEOUT}`, `OTEL_BSP_{MAX_QUEUE_SIZE,
//! MAX_EXPORT_BATCH_SIZE, SCHEDULE_DELAY}`). Header values (an API key, a bearer token) are
//! [`Secret`]s: never in a log line or `check-config`'s output.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::secret::Secret;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTracing {
    enabled: Option<bool>,
    protocol: Option<String>,
    endpoint: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    ca_file: Option<String>,
    timeout_ms: Option<u64>,
    service_name: Option<String>,
    context_header: Option<String>,
    propagate: Option<String>,
    sample_untraced: Option<f64>,
    max_queue: Option<usize>,
    max_batch: Option<usize>,
    flush_ms: Option<u64>,
}

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP, protobuf body (`POST …/v1/traces`), port 4318 by convention.
    HttpProtobuf,
    /// OTLP/gRPC (`TraceService/Export` over HTTP/2), port 4317 by convention.
    Grpc,
}

/// Which span the outgoing `traceparent` names as the consumer's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagate {
    /// The relay's span: a consumer's span hangs under the publish.
    Relay,
    /// The writer's, as written (the header passes through untouched).
    Writer,
}

/// `[tracing]`, validated. `Debug` (`check-config`) shows the endpoint without a password
/// and the header values as `<redacted>`.
#[derive(Clone, PartialEq)]
pub struct TracingConfig {
    pub protocol: OtlpProtocol,
    /// The full URL requests go to (for gRPC, the server's base URL).
    pub endpoint: String,
    pub headers: Vec<(String, Secret)>,
    pub ca_file: Option<String>,
    pub timeout: Duration,
    /// The resource's `service.name`.
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`, besides `service.name` and `service.version`.
    pub resource: Vec<(String, String)>,
    /// The record header that carries the writer's W3C trace context: `traceparent` (from
    /// the `headers` column), or a column listed in `postgres.columns.header_columns`.
    pub context_header: String,
    pub propagate: Propagate,
    /// Events without a trace context: the share given a trace of their own (0: none).
    pub sample_untraced: f64,
    /// Spans held for export at most; past it, spans are dropped and counted.
    pub max_queue: usize,
    pub max_batch: usize,
    pub flush: Duration,
}

impl std::fmt::Debug for TracingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracingConfig")
            .field("protocol", &self.protocol)
            .field("endpoint", &super::redact_url(&self.endpoint))
            .field("headers", &self.headers)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("service_name", &self.service_name)
            .field("resource", &self.resource)
            .field("context_header", &self.context_header)
            .field("propagate", &self.propagate)
            .field("sample_untraced", &self.sample_untraced)
            .field("max_queue", &self.max_queue)
            .field("max_batch", &self.max_batch)
            .field("flush", &self.flush)
            .finish()
    }
}

fn env_any(env: &impl Fn(&str) -> Option<String>, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
}

fn env_number<T: std::str::FromStr>(
    env: &impl Fn(&str) -> Option<String>,
    names: &[&'static str],
) -> Result<Option<T>, ConfigError> {
    match env_any(env, names) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(names[0], format!("`{v}` is not a number"))),
    }
}

/// `k1=v1,k2=v2` with percent-encoded values (the OTel environment's list form).
fn key_values(text: &str, key: &'static str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for item in text.split(',').filter(|i| !i.trim().is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(invalid(key, "each item must be name=value"));
        };
        out.push((k.trim().to_string(), percent_decode(v.trim())));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn tracing(
    raw: RawTracing,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<TracingConfig>, ConfigError> {
    let disabled_by_env = env_any(env, &["OTEL_SDK_DISABLED"]).is_some_and(|v| v.trim() == "true");
    if !raw.enabled.unwrap_or(false) || disabled_by_env {
        return Ok(None);
    }
    let protocol_text = raw
        .protocol
        .or_else(|| {
            env_any(
                env,
                &[
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                ],
            )
        })
        .unwrap_or_else(|| "http/protobuf".into());
    let protocol = match protocol_text.as_str() {
        "http/protobuf" | "http" => OtlpProtocol::HttpProtobuf,
        "grpc" => OtlpProtocol::Grpc,
        other => {
            return Err(invalid(
                "tracing.protocol",
                format!(
                    "`{other}` is not one of: http/protobuf, grpc (http/json is not supported)"
                ),
            ))
        }
    };
    // A signal-specific endpoint is the full URL; the general one is a base.
    let (base, full) = match raw.endpoint.filter(|e| !e.is_empty()) {
        Some(e) => (e, false),
        None => match env_any(env, &["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]) {
            Some(e) => (e, true),
            None => match env_any(env, &["OTEL_EXPORTER_OTLP_ENDPOINT"]) {
                Some(e) => (e, false),
                None => match protocol {
                    OtlpProtocol::HttpProtobuf => ("http://localhost:4318".into(), false),
                    OtlpProtocol::Grpc => ("http://localhost:4317".into(), false),
                },
            },
        },
    };
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(invalid(
            "tracing.endpoint",
            "must start with http:// or https://",
        ));
    }
    let endpoint = match protocol {
        OtlpProtocol::HttpProtobuf
            if !full && !base.trim_end_matches('/').ends_with("/v1/traces") =>
        {
            format!("{}/v1/traces", base.trim_end_matches('/'))
        }
        _ => base.trim_end_matches('/').to_string(),
    };
    let headers: Vec<(String, String)> = match raw.headers {
        Some(h) => h.into_iter().collect(),
        None => match env_any(
            env,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ],
        ) {
            Some(text) => key_values(&text, "OTEL_EXPORTER_OTLP_HEADERS")?,
            None => Vec::new(),
        },
    };
    for (name, _) in &headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(invalid(
                "tracing.headers",
                format!("`{name}` is not a valid header name"),
            ));
        }
    }
    let ca_file = raw.ca_file.or_else(|| {
        env_any(
            env,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ],
        )
    });
    if let Some(ca) = &ca_file {
        std::fs::metadata(ca)
            .map_err(|e| invalid("tracing.ca_file", format!("cannot read `{ca}`: {e}")))?;
    }
    let timeout_ms = match raw.timeout_ms {
        Some(t) => t,
        None => env_number(
            env,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ],
        )?
        .unwrap_or(10_000),
    };
    if !(100..=120_000).contains(&timeout_ms) {
        return Err(invalid(
            "tracing.timeout_ms",
            "must be between 100 and 120000",
        ));
    }
    let service_name = raw
        .service_name
        .or_else(|| env_any(env, &["OTEL_SERVICE_NAME"]))
        .unwrap_or_else(|| "outboxd".into());
    let resource = match env_any(env, &["OTEL_RESOURCE_ATTRIBUTES"]) {
        Some(text) => key_values(&text, "OTEL_RESOURCE_ATTRIBUTES")?
            .into_iter()
            .filter(|(k, _)| k != "service.name")
            .collect(),
        None => Vec::new(),
    };
    let context_header = raw
        .context_header
        .unwrap_or_else(|| "traceparent".into())
        .to_ascii_lowercase();
    let propagate = match raw.propagate.as_deref().unwrap_or("relay") {
        "relay" => Propagate::Relay,
        "writer" => Propagate::Writer,
        other => {
            return Err(invalid(
                "tracing.propagate",
                format!("`{other}` is not one of: relay, writer"),
            ))
        }
    };
    let sample_untraced = raw.sample_untraced.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&sample_untraced) {
        return Err(invalid(
            "tracing.sample_untraced",
            "must be between 0 and 1",
        ));
    }
    let max_queue = match raw.max_queue {
        Some(n) => n,
        None => env_number(env, &["OTEL_BSP_MAX_QUEUE_SIZE"])?.unwrap_or(2048),
    };
    let max_batch = match raw.max_batch {
        Some(n) => n,
        None => env_number(env, &["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"])?.unwrap_or(512),
    };
    if !(1..=1_000_000).contains(&max_queue) {
        return Err(invalid(
            "tracing.max_queue",
            "must be between 1 and 1000000",
        ));
    }
    if !(1..=max_queue).contains(&max_batch) {
        return Err(invalid(
            "tracing.max_batch",
            "must be between 1 and tracing.max_queue",
        ));
    }
    let flush_ms = match raw.flush_ms {
        Some(n) => n,
        None => env_number(env, &["OTEL_BSP_SCHEDULE_DELAY"])?.unwrap_or(1000),
    };
    if !(10..=60_000).contains(&flush_ms) {
        return Err(invalid("tracing.flush_ms", "must be between 10 and 60000"));
    }
    Ok(Some(TracingConfig {
        protocol,
        endpoint,
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), Secret::new(v)))
            .collect(),
        ca_file,
        timeout: Duration::from_millis(timeout_ms),
        service_name,
        resource,
        context_header,
        propagate,
        sample_untraced,
        max_queue,
        max_batch,
        flush: Duration::from_millis(flush_ms),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::Config;
    use super::*;

    fn load(tracing: &str, env: &[(&str, &str)]) -> Result<Option<TracingConfig>, String> {
        let text = format!(
            "[postgres]\nurl = \"postgres://u@localhost/db\"\n[kafka]\nbrokers = \"localhost:9092\"\n[tracing]\n{tracing}"
        );
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml_str(&text, |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .map(|c| c.tracing)
        .map_err(|e| e.to_string())
    }

    #[test]
    fn tracing_is_off_unless_enabled_and_otel_variables_fill_what_the_file_leaves_out() {
        assert_eq!(load("", &[]).unwrap(), None);
        let t = load(
            "enabled = true\n",
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret,x-tenant=a"),
                ("OTEL_SERVICE_NAME", "relay-eu"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(t.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(t.headers[0].0, "api-key");
        assert_eq!(t.headers[0].1.expose(), "s=cret");
        assert_eq!(t.service_name, "relay-eu");
        let shown = format!("{t:?}");
        assert!(
            !shown.contains("s=cret") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert_eq!(
            t.resource,
            vec![("deployment.environment".into(), "prod".into())]
        );
        // The file wins; a traces-specific endpoint is used as it is.
        let t = load(
            "enabled = true\nprotocol = \"grpc\"\n",
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (t.protocol, t.endpoint.as_str()),
            (OtlpProtocol::Grpc, "http://c:4317")
        );
        assert_eq!(
            load("enabled = true\n", &[("OTEL_SDK_DISABLED", "true")]).unwrap(),
            None
        );
    }

    #[test]
    fn bad_tracing_settings_name_their_key() {
        for (text, key) in [
            (
                "enabled = true\nprotocol = \"http/json\"\n",
                "tracing.protocol",
            ),
            (
                "enabled = true\nendpoint = \"collector:4318\"\n",
                "tracing.endpoint",
            ),
            (
                "enabled = true\nsample_untraced = 2.0\n",
                "tracing.sample_untraced",
            ),
            (
                "enabled = true\npropagate = \"both\"\n",
                "tracing.propagate",
            ),
            (
                "enabled = true\nmax_queue = 10\nmax_batch = 20\n",
                "tracing.max_batch",
            ),
        ] {
            let e = load(text, &[]).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        }
    }
}
