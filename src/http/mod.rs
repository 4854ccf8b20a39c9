//! `/metrics`, `/healthz`, `/readyz`, `/status` and the status page at `/` ([`page`]) on one
//! small HTTP/1.1 listener. A hand-rolled responder (GET only, `Connection: close`) instead of
//! an HTTP framework: five read-only endpoints do not earn hyper's build time.

pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};
use crate::health::Health;

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        Error::setup(
            format!("cannot listen on http.addr {addr}: {e}"),
            "choose a free address with http.addr or OUTBOXD_HTTP_ADDR",
        )
    })
}

/// Connections served at once; more are closed at once, so a flood cannot take the file
/// descriptors the relay needs for PostgreSQL and the broker.
const MAX_CONNECTIONS: usize = 64;

pub async fn serve(listener: TcpListener, health: Arc<Health>, metrics: PrometheusHandle) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("http: {MAX_CONNECTIONS} connections open; closing a new one");
            drop(stream);
            continue;
        };
        let health = health.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), handle(stream, &health, &metrics))
                    .await;
            drop(slot);
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    health: &Health,
    metrics: &PrometheusHandle,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let (status, content_type, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        )
    } else {
        route(path, health, metrics)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn route(
    path: &str,
    health: &Health,
    metrics: &PrometheusHandle,
) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => {
            metrics::gauge!(crate::metrics::LAG_SECONDS).set(health.lag_seconds());
            metrics::gauge!(crate::metrics::UNABLE_TO_PUBLISH)
                .set(health.failing_for().as_secs_f64());
            ("200 OK", "text/plain; version=0.0.4", metrics.render())
        }
        "/" => ("200 OK", "text/html; charset=utf-8", page::render(health)),
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" => match health.readiness() {
            Ok(what) => ("200 OK", "text/plain", format!("ready: {what}\n")),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        "/status" => (
            "200 OK",
            "application/json",
            serde_json::to_string(&health.snapshot())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}
