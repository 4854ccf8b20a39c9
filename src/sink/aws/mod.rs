//! One small AWS client for the AWS sinks: an HTTPS POST signed with Signature Version 4,
//! in the JSON protocol (SQS, EventBridge) or the query protocol (SNS, STS), and an error
//! classified by its code.
//!
//! ## Why not the official `aws-sdk-*` crates
//!
//! Measured here (2 cores): `aws-config` with `aws-sdk-sqs`, `-sns` and `-eventbridge`
//! resolve to 224 crates — among them `aws-lc-sys` (a C library built with cmake) and two
//! generations of hyper and rustls — while the relay needs five API actions. `reqwest` over
//! the system's OpenSSL adds about twenty crates to what outboxd already builds, and the test
//! command stays within its time on a fresh machine. What the SDK would have given, and
//! where it is here: the signing (`sigv4`, pinned by botocore's signatures and proven
//! against a server that checks them), the default credentials chain (`credentials`), the
//! endpoint override (`aws.endpoint_url`, `AWS_ENDPOINT_URL_<SERVICE>`, `AWS_ENDPOINT_URL`),
//! and retries — which the relay does itself, from the confirmed position, never inside a
//! request (a client-side retry of a batch would reorder a FIFO group behind its successors).

pub mod credentials;
pub mod message;
pub mod sigv4;
pub mod xml;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credentials::{CredentialsError, Provider};

use crate::config::AwsConfig;
use crate::error::Error;

/// What an AWS error means for the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No answer (connect, TLS, timeout, a connection reset): retry.
    Transport,
    /// Throttled: retry, slower.
    Throttled,
    /// The service failed (5xx, `InternalError`): retry.
    Server,
    /// The credentials were refused (unknown key, bad signature, expired): an operator must
    /// act (exit 2) — unless they are temporary and can be fetched again.
    Credentials,
    /// The credentials are good but lack a permission (`AccessDenied`): exit 2.
    Denied,
    /// The request was refused for what it says (a missing queue, a bad parameter).
    Request,
}

/// An AWS error: its kind, code and message (never a secret: AWS messages name the access
/// key id at most).
#[derive(Debug, Clone)]
pub struct AwsError {
    pub kind: Kind,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for AwsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

/// The kind of an error code (`status`: the HTTP status, 0 for a per-entry error).
pub fn kind_of(code: &str, status: u16) -> Kind {
    // Codes may come namespaced (`KMS.ThrottlingException`, `AWS.SimpleQueueService.…`).
    let short = code.rsplit('.').next().unwrap_or(code);
    match short {
        "ThrottlingException"
        | "Throttling"
        | "Throttled"
        | "RequestThrottled"
        | "RequestThrottledException"
        | "TooManyRequestsException"
        | "ProvisionedThroughputExceededException"
        | "RequestLimitExceeded"
        | "BandwidthLimitExceeded"
        | "LimitExceededException"
        | "SlowDown"
        | "PriorRequestNotComplete"
        | "KMSThrottlingException" => Kind::Throttled,
        "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "SignatureDoesNotMatch"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidAccessKeyId"
        | "AuthFailure"
        | "ExpiredToken"
        | "ExpiredTokenException"
        | "RequestExpired"
        | "InvalidToken"
        | "InvalidSecurity" => Kind::Credentials,
        "AccessDenied"
        | "AccessDeniedException"
        | "AuthorizationError"
        | "KMSAccessDeniedException"
        | "KMSDisabledException"
        | "KMSInvalidStateException"
        | "KMSNotFoundException"
        | "KMSOptInRequired"
        | "NotAuthorizedForSourceException"
        | "NotAuthorizedForDetailTypeException" => Kind::Denied,
        "InternalError"
        | "InternalFailure"
        | "InternalErrorException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "KMSInternalException" => Kind::Server,
        _ if status == 429 => Kind::Throttled,
        _ if status >= 500 => Kind::Server,
        _ if status == 403 => Kind::Denied,
        _ => Kind::Request,
    }
}

/// `application/x-www-form-urlencoded` of `pairs`, as AWS's query protocol reads it.
pub fn form_body(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&crate::config::percent_encode(k));
        out.push('=');
        out.push_str(&crate::config::percent_encode(v));
    }
    out
}

/// A client of one AWS service at one endpoint.
pub struct AwsClient {
    http: reqwest::Client,
    url: reqwest::Url,
    /// The `Host` header as reqwest sends it, which is what is signed.
    host: String,
    region: String,
    /// The signing name (`sqs`, `sns`, `events`).
    service: &'static str,
    credentials: Arc<Provider>,
    timeout: Duration,
}

impl AwsClient {
    /// A client of `service` (`env_name`: its `AWS_ENDPOINT_URL_<NAME>`), with the
    /// credentials of the default chain. No request is made.
    pub fn new(
        cfg: &AwsConfig,
        service: &'static str,
        env_name: &str,
    ) -> crate::error::Result<AwsClient> {
        Self::build(cfg, service, env_name, None)
    }

    /// [`AwsClient::new`] with credentials of the caller's (tools, tests).
    pub fn with_credentials(
        cfg: &AwsConfig,
        service: &'static str,
        env_name: &str,
        creds: credentials::Credentials,
    ) -> crate::error::Result<AwsClient> {
        Self::build(cfg, service, env_name, Some(creds))
    }

    fn build(
        cfg: &AwsConfig,
        service: &'static str,
        env_name: &str,
        fixed: Option<credentials::Credentials>,
    ) -> crate::error::Result<AwsClient> {
        let region = resolve_region(cfg)?;
        let endpoint = endpoint(cfg, service, env_name, &region);
        let url = reqwest::Url::parse(&endpoint).map_err(|e| {
            Error::setup(
                format!("aws.endpoint_url `{endpoint}` is not a URL: {e}"),
                "set aws.endpoint_url (or AWS_ENDPOINT_URL) to https://host[:port]/",
            )
        })?;
        let Some(host) = url.host_str() else {
            return Err(Error::setup(
                format!("aws.endpoint_url `{endpoint}` has no host"),
                "set aws.endpoint_url (or AWS_ENDPOINT_URL) to https://host[:port]/",
            ));
        };
        let host = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        if url.scheme() == "http" {
            tracing::warn!(endpoint = %endpoint, "the {service} endpoint is plain http: requests and their signatures cross the network unencrypted (meant for local emulators)");
        }
        let http = crate::sink::http::client(service)?;
        let credentials = match fixed {
            Some(c) => Provider::fixed(c, http.clone()),
            None => Provider::discover(cfg.profile.as_deref(), &region, http.clone())
                .map_err(credentials_error)?,
        };
        Ok(AwsClient {
            http,
            url,
            host,
            region,
            service,
            credentials: Arc::new(credentials),
            timeout: cfg.request_timeout,
        })
    }

    /// `at <endpoint>, credentials from <source>`: the start line's (never a secret).
    pub fn origin(&self) -> String {
        format!(
            "at {}, credentials from {}",
            self.endpoint(),
            self.credentials_source()
        )
    }

    /// Where the credentials come from (for the start log).
    pub fn credentials_source(&self) -> String {
        self.credentials.describe()
    }

    /// The endpoint (for messages).
    pub fn endpoint(&self) -> &str {
        self.url.as_str()
    }

    /// A JSON-protocol action (`X-Amz-Target: <target>`, `application/x-amz-json-<version>`);
    /// the answer's body on success.
    pub async fn json(
        &self,
        target: &str,
        version: &str,
        body: Vec<u8>,
    ) -> Result<bytes::Bytes, AwsError> {
        let content_type = format!("application/x-amz-json-{version}");
        let headers = [
            ("content-type", content_type.as_str()),
            ("x-amz-target", target),
        ];
        self.post(&headers, body).await
    }

    /// A query-protocol action: `pairs` form-encoded; the answer's XML on success.
    pub async fn query(&self, pairs: &[(&str, &str)]) -> Result<String, AwsError> {
        let body = form_body(pairs).into_bytes();
        let headers = [(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )];
        let bytes = self.post(&headers, body).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn post(
        &self,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<bytes::Bytes, AwsError> {
        let creds = self.credentials.get().await.map_err(|e| AwsError {
            kind: match e {
                CredentialsError::Unavailable(_) => Kind::Transport,
                _ => Kind::Credentials,
            },
            code: "Credentials".into(),
            message: e.to_string(),
        })?;
        let signed = sigv4::sign(
            &sigv4::Request {
                host: &self.host,
                path: self.url.path(),
                headers,
                body: &body,
            },
            &creds,
            &self.region,
            self.service,
            SystemTime::now(),
        );
        let mut req = self
            .http
            .post(self.url.clone())
            .timeout(self.timeout)
            .header("x-amz-date", &signed.amz_date)
            .header("authorization", &signed.authorization);
        if let Some(token) = &signed.security_token {
            req = req.header("x-amz-security-token", token);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        // reqwest's message names the URL already ("error sending request for url (…)").
        let transport = |e: reqwest::Error| AwsError {
            kind: Kind::Transport,
            code: String::new(),
            message: crate::sink::http::describe(&e),
        };
        let resp = req.body(body).send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let json_type = resp
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(':').next().unwrap_or(v).to_string());
        let bytes = resp.bytes().await.map_err(transport)?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let err = parse_error(status, json_type.as_deref(), &bytes);
        if err.kind == Kind::Credentials && self.credentials.refreshable() {
            // Temporary credentials may have been revoked or expired early: fetch them anew
            // for the next request.
            self.credentials.invalidate().await;
        }
        Err(err)
    }
}

/// The endpoint of `service`: `aws.endpoint_url`, `AWS_ENDPOINT_URL_<NAME>`,
/// `AWS_ENDPOINT_URL`, else `https://<service>.<region>.amazonaws.com/`.
fn endpoint(cfg: &AwsConfig, service: &str, env_name: &str, region: &str) -> String {
    cfg.endpoint_url
        .clone()
        .or_else(|| std::env::var(format!("AWS_ENDPOINT_URL_{env_name}")).ok())
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| format!("https://{service}.{region}.amazonaws.com/"))
}

/// `host:port` of the endpoint of `service` (the monitor's reachability probe).
pub fn endpoint_host(cfg: &AwsConfig, service: &str, env_name: &str) -> Option<String> {
    let region = resolve_region(cfg).ok()?;
    let url = reqwest::Url::parse(&endpoint(cfg, service, env_name, &region)).ok()?;
    Some(format!(
        "{}:{}",
        url.host_str()?,
        url.port_or_known_default()?
    ))
}

/// The region configuration resolved (`crate::config` names `aws.region` when none is
/// found); an empty one only in a config built by hand.
fn resolve_region(cfg: &AwsConfig) -> crate::error::Result<String> {
    if cfg.region.is_empty() {
        return Err(Error::setup(
            "aws.region is not set, nor AWS_REGION, AWS_DEFAULT_REGION or the profile's region",
            "set aws.region (like eu-west-1) or AWS_REGION",
        ));
    }
    Ok(cfg.region.clone())
}

/// A credentials problem at start: exit 2, unless the source may answer later.
pub fn credentials_error(e: CredentialsError) -> Error {
    match e {
        CredentialsError::Unavailable(m) => Error::Publish(format!("AWS credentials: {m}")),
        other => Error::setup(
            other.to_string(),
            "provide AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile via aws.profile or AWS_PROFILE, a web identity token, or an instance role)",
        ),
    }
}

/// The code and message of an error answer: JSON (`__type`, `message`) or query XML
/// (`<Error><Code>`).
fn parse_error(status: u16, json_type: Option<&str>, body: &[u8]) -> AwsError {
    let text = String::from_utf8_lossy(body);
    let (code, message) = if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let code = v
            .get("__type")
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .or_else(|| json_type.map(str::to_string))
            .unwrap_or_default();
        let message = ["message", "Message", "errorMessage"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|m| m.as_str()))
            .unwrap_or("")
            .to_string();
        // `com.amazonaws.sqs#QueueDoesNotExist`, `…:http://internal…`
        let code = code.rsplit('#').next().unwrap_or(&code).to_string();
        let code = code.split(':').next().unwrap_or(&code).to_string();
        (code, message)
    } else {
        (
            xml::text(&text, "Code").unwrap_or_default(),
            xml::text(&text, "Message").unwrap_or_else(|| text.chars().take(200).collect()),
        )
    };
    let message = if message.is_empty() {
        format!("HTTP {status}")
    } else {
        message
    };
    AwsError {
        kind: kind_of(&code, status),
        code,
        message,
    }
}

/// An error while resolving a destination (at start, or one an event names): refused
/// credentials or a missing permission are exit 2 naming where the credentials came from
/// (never their secret) and what to grant (`permissions`); the rest is retried.
pub fn resolve_error(
    service: &str,
    permissions: &str,
    e: &AwsError,
    client: &AwsClient,
) -> crate::error::Error {
    use crate::error::Error;
    let source = client.credentials_source();
    let name = service.to_uppercase();
    match e.kind {
        Kind::Credentials if e.code == "Credentials" => credentials_error(
            credentials::CredentialsError::Invalid(e.message.clone()),
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
            permissions,
        ),
        _ => Error::Publish(format!("{service} at {}: {e}", client.endpoint())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_read_from_json_and_xml_answers_and_classified() {
        let e = parse_error(
            400,
            None,
            br#"{"Message":"The specified queue does not exist.","__type":"com.amazonaws.sqs#QueueDoesNotExist"}"#,
        );
        assert_eq!(
            (e.kind, e.code.as_str()),
            (Kind::Request, "QueueDoesNotExist")
        );
        let e = parse_error(
            403,
            None,
            b"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidClientTokenId</Code>\
              <Message>The security token included in the request is invalid.</Message></Error></ErrorResponse>",
        );
        assert_eq!(
            (e.kind, e.code.as_str()),
            (Kind::Credentials, "InvalidClientTokenId")
        );
        let e = parse_error(400, Some("ThrottlingException"), br#"{"message":"slow"}"#);
        assert_eq!(e.kind, Kind::Throttled);
        assert_eq!(parse_error(503, None, b"").kind, Kind::Server);
        assert_eq!(kind_of("KMS.ThrottlingException", 0), Kind::Throttled);
        assert_eq!(kind_of("AccessDeniedException", 400), Kind::Denied);
    }

    #[test]
    fn forms_encode_as_aws_reads_them() {
        assert_eq!(
            form_body(&[("Action", "Publish"), ("Message", "a b/+=&é")]),
            "Action=Publish&Message=a%20b%2F%2B%3D%26%C3%A9"
        );
    }
}
