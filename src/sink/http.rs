//! What the HTTP-speaking sinks (AWS, Pub/Sub) and the schema registry client share: one
//! way to build a client over the system's OpenSSL, and one way to say what went wrong.
//!
//! A pooled connection left idle behind a NAT or load balancer can be dropped without a FIN;
//! idle connections are retired after 50 s (under the usual 60 s idle limits) and probed with
//! TCP keepalives, and a connect is bounded at 5 s — a request's own bound is the caller's.

use std::time::Duration;

use crate::error::{Error, Result};

/// The connection settings every HTTP client of the relay starts from (the cloud sinks, the
/// schema registry, the OTLP exporter): a connect attempt bounded at 5 s, idle connections
/// dropped after 50 s (before the usual 60 s load-balancer idle cut, which would otherwise
/// fail the next request on a dead connection), TCP keepalive every 15 s.
pub fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(50))
        .tcp_keepalive(Duration::from_secs(15))
}

/// A PEM CA certificate to trust, read from `path`; the error names `key` (the setting).
pub fn ca_certificate(key: &str, path: &str) -> std::result::Result<reqwest::Certificate, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{key}: cannot read `{path}`: {e}"))?;
    reqwest::Certificate::from_pem(&pem)
        .map_err(|e| format!("{key}: `{path}` is not a PEM certificate: {e}"))
}

/// A client for `who` (in the error if it cannot be built).
pub fn client(who: &str) -> Result<reqwest::Client> {
    builder()
        // HTTP/1.1 as measured with the services and their emulators (the h2 feature is
        // there for OTLP/gRPC, `crate::trace`).
        .http1_only()
        .build()
        .map_err(|e| Error::Publish(format!("{who}: building the HTTP client: {e}")))
}

/// A reqwest error in one line, with its cause (reqwest's Display alone says "error sending
/// request").
pub fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    // reqwest names the request's URL, which may carry a password (`https://u:p@registry`).
    crate::config::redact_url(&s)
}
