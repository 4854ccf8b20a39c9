//! A small Google Cloud REST client for the Pub/Sub sink: JSON over HTTPS with an OAuth 2.0
//! bearer token (`auth`), errors classified by Google's canonical status.
//!
//! ## Why REST, not `google-cloud-pubsub` or gRPC
//!
//! The official crate and a gRPC client (tonic, prost, the published protos) bring an HTTP/2
//! stack, a second TLS stack and a code generator for the one call the relay makes —
//! `topics.publish` — plus `topics.get` to check a topic. The REST form of both is the same
//! API (the emulator serves it too), and the client libraries' publisher adds what the relay
//! must not have: its own retries and its own per-ordering-key pause. The relay's lanes keep
//! one request in flight per key and, after a failed publish, stop the lane and resend from
//! the confirmed position — what "resume publishing" means for an ordering key, done where
//! the checkpoint can see it.

pub mod auth;

use std::time::Duration;

use serde_json::Value;

use crate::config::PubSubConfig;
use auth::Auth;

/// What an error means for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcpKind {
    /// No answer (connect, TLS, timeout).
    Transport,
    /// `RESOURCE_EXHAUSTED`, 429.
    Throttled,
    /// 5xx, `UNAVAILABLE`, `INTERNAL`, `DEADLINE_EXCEEDED`, `ABORTED`.
    Server,
    /// `UNAUTHENTICATED`, 401, or no token.
    Credentials,
    /// `PERMISSION_DENIED`, 403.
    Denied,
    /// `NOT_FOUND`, 404.
    NotFound,
    /// Anything else the request was refused for (`INVALID_ARGUMENT`, …).
    Request,
}

/// An error of one call.
#[derive(Debug, Clone)]
pub struct GcpError {
    pub kind: GcpKind,
    /// The canonical status (`NOT_FOUND`) or HTTP status; empty for a transport error.
    pub status: String,
    pub message: String,
}

impl std::fmt::Display for GcpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.status.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.status, self.message)
        }
    }
}

/// The kind of an error answer.
pub fn kind_of(http: u16, status: &str) -> GcpKind {
    match (status, http) {
        ("RESOURCE_EXHAUSTED", _) | (_, 429) => GcpKind::Throttled,
        ("UNAUTHENTICATED", _) | (_, 401) => GcpKind::Credentials,
        ("PERMISSION_DENIED", _) | (_, 403) => GcpKind::Denied,
        ("NOT_FOUND", _) | (_, 404) => GcpKind::NotFound,
        ("UNAVAILABLE" | "INTERNAL" | "DEADLINE_EXCEEDED" | "ABORTED" | "UNKNOWN", _) => {
            GcpKind::Server
        }
        (_, s) if s >= 500 => GcpKind::Server,
        _ => GcpKind::Request,
    }
}

/// A client of one project's Pub/Sub.
pub struct GcpClient {
    http: reqwest::Client,
    /// `<endpoint>/v1/projects/<project>`.
    base: String,
    endpoint: String,
    auth: Auth,
    timeout: Duration,
}

impl GcpClient {
    /// The client of `cfg`: no credentials for the emulator (an `http://` endpoint), else
    /// application default credentials (the file is read now: exit 2 when unusable).
    pub fn new(cfg: &PubSubConfig) -> crate::error::Result<GcpClient> {
        let http = crate::sink::http::client("pubsub")?;
        let auth = if cfg.emulator() {
            tracing::warn!(endpoint = %cfg.endpoint, "the pubsub endpoint is plain http, without credentials: the emulator");
            Auth::none(http.clone())
        } else {
            Auth::discover(cfg.credentials_file.as_deref(), http.clone())?
        };
        Ok(GcpClient {
            http,
            base: format!("{}/v1/projects/{}", cfg.endpoint, cfg.project),
            endpoint: cfg.endpoint.clone(),
            auth,
            timeout: cfg.request_timeout,
        })
    }

    /// `at <endpoint>, credentials from <source>` (never a secret).
    pub fn origin(&self) -> String {
        format!(
            "at {}, credentials from {}",
            self.endpoint,
            self.auth.describe()
        )
    }

    /// `method` on `<base>/<path>` with a JSON `body`; the answer's JSON.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, GcpError> {
        let mut req = self
            .http
            .request(method, format!("{}/{path}", self.base))
            .timeout(self.timeout);
        if let Some(header) = self.auth.header().await? {
            req = req.header("authorization", header);
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let transport = |e: reqwest::Error| GcpError {
            kind: GcpKind::Transport,
            status: String::new(),
            message: crate::sink::http::describe(&e),
        };
        let answer = req.send().await.map_err(transport)?;
        let http = answer.status();
        let bytes = answer.bytes().await.map_err(transport)?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if http.is_success() {
            return Ok(v);
        }
        let status = v["error"]["status"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| http.as_u16().to_string());
        let message = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
        Err(GcpError {
            kind: kind_of(http.as_u16(), &status),
            status,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_canonical_status_then_http_status() {
        assert_eq!(kind_of(429, "RESOURCE_EXHAUSTED"), GcpKind::Throttled);
        assert_eq!(kind_of(503, "UNAVAILABLE"), GcpKind::Server);
        assert_eq!(kind_of(401, "UNAUTHENTICATED"), GcpKind::Credentials);
        assert_eq!(kind_of(403, "PERMISSION_DENIED"), GcpKind::Denied);
        assert_eq!(kind_of(404, "NOT_FOUND"), GcpKind::NotFound);
        assert_eq!(kind_of(400, "INVALID_ARGUMENT"), GcpKind::Request);
        assert_eq!(kind_of(502, "502"), GcpKind::Server);
    }
}
