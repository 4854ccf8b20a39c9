//! The span exporter: a bounded queue and a task that sends batches over OTLP/HTTP
//! (protobuf) or OTLP/gRPC.
//!
//! The relay never waits on it: [`Exporter::queue`] appends to a batch under a short lock and
//! hands a full batch to the task with a `try_send` — one wake-up per `tracing.max_batch`
//! spans, not one per span (a wake-up costs more than the span). A batch the collector does
//! not take within `tracing.timeout_ms` is dropped and counted, so a black-holed collector
//! holds at most the queue (`tracing.max_queue` spans, in batches), and publishing goes on at
//! its own pace. Failures are logged at most once a minute.
//!
//! gRPC without a gRPC stack: a unary call is an HTTP/2 POST of a length-prefixed message
//! with `content-type: application/grpc`; the call's status comes in `grpc-status`, in the
//! headers when the server answers at once (an error), else in the trailers. The client here
//! cannot read trailers, so a call is taken as done when the response headers carry no error
//! status and its body (the response message) arrives whole.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::otlp::export_request;
use super::{SpanData, Value};
use crate::config::{OtlpProtocol, TracingConfig};
use crate::error::{Error, Result};
use crate::metrics as m;

enum Msg {
    Batch(Vec<SpanData>),
    Flush(oneshot::Sender<()>),
}

/// The queue to the export task: the batch being filled, and full batches on their way.
pub struct Exporter {
    filling: std::sync::Arc<Mutex<Vec<SpanData>>>,
    max_batch: usize,
    tx: mpsc::Sender<Msg>,
}

/// What the export task holds.
struct Task {
    client: reqwest::Client,
    url: String,
    protocol: OtlpProtocol,
    headers: reqwest::header::HeaderMap,
    timeout: Duration,
    resource: Vec<(String, Value)>,
    flush: Duration,
    last_warning: Option<Instant>,
    /// The batch spans are appended to, taken at every tick (a partial batch waits at most
    /// `tracing.flush_ms`).
    filling: std::sync::Arc<Mutex<Vec<SpanData>>>,
}

fn client(cfg: &TracingConfig) -> Result<reqwest::Client> {
    let mut builder = crate::sink::http::builder();
    if cfg.protocol == OtlpProtocol::Grpc {
        // Plain-text gRPC is HTTP/2 from the first byte; over TLS, ALPN agrees on h2.
        builder = if cfg.endpoint.starts_with("http://") {
            builder.http2_prior_knowledge()
        } else {
            builder.http2_adaptive_window(true)
        };
    } else {
        builder = builder.http1_only();
    }
    if let Some(ca) = &cfg.ca_file {
        let cert = crate::sink::http::ca_certificate("tracing.ca_file", ca).map_err(|problem| {
            Error::setup(
                problem,
                "point tracing.ca_file at a readable PEM CA certificate",
            )
        })?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| {
        Error::setup(
            format!("tracing: building the OTLP client: {e}"),
            "check [tracing]",
        )
    })
}

impl Exporter {
    /// Starts the export task on the current runtime.
    pub fn start(cfg: &TracingConfig) -> Result<Exporter> {
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &cfg.headers {
            let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_str(value.expose()),
            ) else {
                // The value is a secret: the error names the header only.
                return Err(Error::setup(
                    format!("tracing.headers: the value of `{name}` is not a valid header value"),
                    "use printable ASCII in header values",
                ));
            };
            headers.insert(name, value);
        }
        let filling = std::sync::Arc::new(Mutex::new(Vec::with_capacity(cfg.max_batch)));
        let url = match cfg.protocol {
            OtlpProtocol::HttpProtobuf => cfg.endpoint.clone(),
            OtlpProtocol::Grpc => format!(
                "{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                cfg.endpoint
            ),
        };
        let mut resource = vec![
            (
                "service.name".to_string(),
                Value::Str(cfg.service_name.clone()),
            ),
            (
                "service.version".to_string(),
                Value::Str(env!("CARGO_PKG_VERSION").into()),
            ),
        ];
        resource.extend(
            cfg.resource
                .iter()
                .map(|(k, v)| (k.clone(), Value::Str(v.clone()))),
        );
        let task = Task {
            client: client(cfg)?,
            url,
            protocol: cfg.protocol,
            headers,
            timeout: cfg.timeout,
            resource,
            flush: cfg.flush,
            last_warning: None,
            filling: filling.clone(),
        };
        // Room for max_queue spans in full batches (and one flush request).
        let (tx, rx) = mpsc::channel((cfg.max_queue / cfg.max_batch).max(1) + 1);
        tokio::spawn(task.run(rx));
        Ok(Exporter {
            filling,
            max_batch: cfg.max_batch,
            tx,
        })
    }

    /// Queues a finished span; returns how many spans were dropped for want of room (a full
    /// batch the task has no room for).
    pub fn queue(&self, span: SpanData) -> u64 {
        let full = {
            let mut filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
            filling.push(span);
            if filling.len() < self.max_batch {
                return 0;
            }
            std::mem::replace(&mut *filling, Vec::with_capacity(self.max_batch))
        };
        let n = full.len() as u64;
        match self.tx.try_send(Msg::Batch(full)) {
            Ok(()) => 0,
            Err(_) => n,
        }
    }

    /// Exports what is queued, waiting at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (ack, done) = oneshot::channel();
        let _ = tokio::time::timeout(limit, async {
            if self.tx.send(Msg::Flush(ack)).await.is_ok() {
                let _ = done.await;
            }
        })
        .await;
    }
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(self.flush);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Batch(mut batch)) => self.export(&mut batch).await,
                    Some(Msg::Flush(ack)) => {
                        let mut batch = self.take_partial();
                        self.export(&mut batch).await;
                        let _ = ack.send(());
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    let mut batch = self.take_partial();
                    self.export(&mut batch).await;
                }
            }
        }
    }

    /// The batch being filled, however small.
    fn take_partial(&self) -> Vec<SpanData> {
        let mut filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *filling)
    }

    async fn export(&mut self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = export_request(&self.resource, batch);
        batch.clear();
        match tokio::time::timeout(self.timeout, self.send(body)).await {
            Ok(Ok(())) => {
                metrics::counter!(m::TRACE_SPANS_EXPORTED).increment(n);
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e,
                    _ => format!(
                        "no answer within {} ms (tracing.timeout_ms)",
                        self.timeout.as_millis()
                    ),
                };
                metrics::counter!(m::TRACE_SPANS_DROPPED, "reason" => "export_failed").increment(n);
                if self
                    .last_warning
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(spans = n, error = %why, "tracing: the collector did not take a batch of spans; dropped (publishing is not affected; logged at most once a minute)");
                }
            }
        }
    }

    async fn send(&self, message: Vec<u8>) -> std::result::Result<(), String> {
        let request = match self.protocol {
            OtlpProtocol::HttpProtobuf => self
                .client
                .post(&self.url)
                .header("content-type", "application/x-protobuf")
                .body(message),
            OtlpProtocol::Grpc => {
                let mut framed = Vec::with_capacity(message.len() + 5);
                framed.push(0);
                framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
                framed.extend_from_slice(&message);
                self.client
                    .post(&self.url)
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(framed)
            }
        };
        let response = request
            .headers(self.headers.clone())
            .send()
            .await
            .map_err(|e| crate::sink::http::describe(&e))?;
        let status = response.status();
        let grpc_status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let grpc_message = response
            .headers()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .bytes()
            .await
            .map_err(|e| crate::sink::http::describe(&e))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!("HTTP {status}: {text}"));
        }
        match grpc_status.as_deref() {
            None | Some("0") => Ok(()),
            Some(code) => Err(format!(
                "gRPC status {code}: {}",
                grpc_message.unwrap_or_default()
            )),
        }
    }
}
