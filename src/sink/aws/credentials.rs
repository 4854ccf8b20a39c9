//! AWS credentials from the places the SDKs look, in their order: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the profile in the
//! shared files (static keys or `credential_process`), a web identity token (EKS IRSA:
//! `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, exchanged at STS), the container endpoint
//! (ECS, EKS Pod Identity: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` / `_FULL_URI`), and the
//! EC2 instance metadata service (IMDSv2; off with `AWS_EC2_METADATA_DISABLED=true`).
//!
//! The source is chosen once, at start, from what is present — no network is touched to
//! choose. Temporary credentials are fetched again five minutes before they expire. A secret
//! never reaches a log: [`Secret`]'s `Debug` and `Display` print `<redacted>`, and messages
//! name the source (`environment (AWS_ACCESS_KEY_ID)`), never a value.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::xml;
use crate::config::aws_profile::{self as profile, Profile};

pub use crate::secret::Secret;

/// A set of credentials and where they came from. `Debug` shows neither the secret nor the
/// session token.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<String>,
    pub expires: Option<SystemTime>,
    /// Where they came from, for messages: `environment (AWS_ACCESS_KEY_ID)`, `profile
    /// relay in ~/.aws/credentials`, …
    pub source: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires", &self.expires)
            .field("source", &self.source)
            .finish()
    }
}

/// Why no credentials could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialsError {
    /// Nothing in the chain: the operator must provide credentials (exit 2).
    #[error("{0}")]
    Missing(String),
    /// A source is configured but wrong (a profile using an unsupported feature, a token file
    /// that cannot be read, a process that fails): exit 2.
    #[error("{0}")]
    Invalid(String),
    /// A source that answers over the network did not (STS, the container or instance
    /// endpoint): retried.
    #[error("{0}")]
    Unavailable(String),
}

/// Where the credentials come from.
#[derive(Debug, Clone)]
enum Source {
    /// Given by the caller (tools and tests that hold their own).
    Fixed(Credentials),
    Environment,
    Profile(Profile),
    Process {
        command: String,
        profile: String,
    },
    WebIdentity {
        token_file: String,
        role_arn: String,
        session_name: String,
        sts_endpoint: String,
    },
    Container {
        url: String,
    },
    InstanceMetadata {
        endpoint: String,
    },
}

/// The credentials of one relay: the chosen source and the last credentials it gave.
pub struct Provider {
    source: Source,
    http: reqwest::Client,
    cached: tokio::sync::Mutex<Option<Credentials>>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Provider {
    /// Chooses the source as the SDKs' default chain does. `profile_name` is `aws.profile`;
    /// `region` picks the regional STS endpoint.
    pub fn discover(
        profile_name: Option<&str>,
        region: &str,
        http: reqwest::Client,
    ) -> Result<Provider, CredentialsError> {
        let source = choose(profile_name, region)?;
        Ok(Provider {
            source,
            http,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// Always `creds`.
    pub fn fixed(creds: Credentials, http: reqwest::Client) -> Provider {
        Provider {
            source: Source::Fixed(creds),
            http,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// A short description of the source, for the start log.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Fixed(c) => c.source.clone(),
            Source::Environment => "environment (AWS_ACCESS_KEY_ID)".into(),
            Source::Profile(p) => format!("profile {} ({})", p.name, p.files.join(", ")),
            Source::Process { profile, .. } => format!("profile {profile} credential_process"),
            Source::WebIdentity { role_arn, .. } => {
                format!("web identity token (AWS_WEB_IDENTITY_TOKEN_FILE) for {role_arn}")
            }
            Source::Container { .. } => "container credentials endpoint".into(),
            Source::InstanceMetadata { .. } => "EC2 instance metadata (IMDSv2)".into(),
        }
    }

    /// Whether the source hands out temporary credentials that can be fetched anew.
    pub fn refreshable(&self) -> bool {
        !matches!(
            self.source,
            Source::Fixed(_) | Source::Environment | Source::Profile(_)
        )
    }

    /// Current credentials: cached until five minutes before they expire.
    pub async fn get(&self) -> Result<Credentials, CredentialsError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            let fresh = c
                .expires
                .is_none_or(|at| SystemTime::now() + Duration::from_secs(300) < at);
            if fresh {
                return Ok(c.clone());
            }
        }
        let creds = self.fetch().await?;
        *cached = Some(creds.clone());
        Ok(creds)
    }

    /// Forgets the cached credentials (a refusal said they expired).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn fetch(&self) -> Result<Credentials, CredentialsError> {
        let source = self.describe();
        match &self.source {
            Source::Fixed(c) => Ok(c.clone()),
            Source::Environment => from_environment(),
            Source::Profile(p) => from_profile(p),
            Source::Process { command, .. } => from_process(command, &source).await,
            Source::WebIdentity {
                token_file,
                role_arn,
                session_name,
                sts_endpoint,
            } => {
                let token = std::fs::read_to_string(token_file).map_err(|e| {
                    CredentialsError::Invalid(format!(
                        "cannot read the web identity token {token_file} (AWS_WEB_IDENTITY_TOKEN_FILE): {e}"
                    ))
                })?;
                let form = [
                    ("Action", "AssumeRoleWithWebIdentity"),
                    ("Version", "2011-06-15"),
                    ("RoleArn", role_arn.as_str()),
                    ("RoleSessionName", session_name.as_str()),
                    ("WebIdentityToken", token.trim()),
                ];
                let body = super::form_body(&form);
                let text = self
                    .request(
                        self.http
                            .post(sts_endpoint)
                            .header("content-type", "application/x-www-form-urlencoded")
                            .body(body),
                        &source,
                    )
                    .await?;
                let field = |tag: &str| xml::text(&text, tag);
                match (field("AccessKeyId"), field("SecretAccessKey")) {
                    (Some(id), Some(secret)) => Ok(Credentials {
                        access_key_id: id,
                        secret_access_key: Secret::new(secret),
                        session_token: field("SessionToken"),
                        expires: field("Expiration").and_then(|e| parse_time(&e)),
                        source,
                    }),
                    _ => Err(CredentialsError::Invalid(format!(
                        "STS refused the web identity token for {role_arn}: {}",
                        xml::text(&text, "Message")
                            .unwrap_or_else(|| "no credentials in the answer".into())
                    ))),
                }
            }
            Source::Container { url } => {
                let mut req = self.http.get(url);
                let token = match env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
                    Some(f) => std::fs::read_to_string(&f)
                        .ok()
                        .map(|t| t.trim().to_string()),
                    None => env("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
                };
                if let Some(t) = token {
                    req = req.header("authorization", t);
                }
                let text = self.request(req, &source).await?;
                from_json(&text, &source)
            }
            Source::InstanceMetadata { endpoint } => {
                let token = self
                    .request(
                        self.http
                            .put(format!("{endpoint}/latest/api/token"))
                            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
                        &source,
                    )
                    .await?;
                let base = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
                let roles = self
                    .request(
                        self.http
                            .get(&base)
                            .header("x-aws-ec2-metadata-token", token.trim()),
                        &source,
                    )
                    .await?;
                let role = roles.lines().next().unwrap_or("").trim().to_string();
                if role.is_empty() {
                    return Err(CredentialsError::Missing(
                        "the EC2 instance has no IAM role (instance metadata lists none)".into(),
                    ));
                }
                let text = self
                    .request(
                        self.http
                            .get(format!("{base}{role}"))
                            .header("x-aws-ec2-metadata-token", token.trim()),
                        &source,
                    )
                    .await?;
                from_json(&text, &source)
            }
        }
    }

    /// The body of a successful answer; a refusal (4xx) is `Invalid`, anything else
    /// `Unavailable`.
    async fn request(
        &self,
        req: reqwest::RequestBuilder,
        source: &str,
    ) -> Result<String, CredentialsError> {
        let resp = req
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| {
                CredentialsError::Unavailable(format!(
                    "{source}: {}",
                    crate::sink::http::describe(&e)
                ))
            })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            CredentialsError::Unavailable(format!("{source}: {}", crate::sink::http::describe(&e)))
        })?;
        if status.is_success() {
            Ok(text)
        } else if status.is_client_error() && status.as_u16() != 429 {
            let why = xml::text(&text, "Message").unwrap_or_else(|| format!("HTTP {status}"));
            Err(CredentialsError::Invalid(format!(
                "{source} refused: {why}"
            )))
        } else {
            Err(CredentialsError::Unavailable(format!(
                "{source}: HTTP {status}"
            )))
        }
    }
}

fn choose(profile_name: Option<&str>, region: &str) -> Result<Source, CredentialsError> {
    if env("AWS_ACCESS_KEY_ID").is_some() || env("AWS_SECRET_ACCESS_KEY").is_some() {
        return Ok(Source::Environment);
    }
    let name = profile::profile_name(profile_name);
    let profile = profile::load(&name);
    if profile.get("aws_access_key_id").is_some() {
        return Ok(Source::Profile(profile));
    }
    if let Some(command) = profile.get("credential_process") {
        return Ok(Source::Process {
            command: command.to_string(),
            profile: name,
        });
    }
    for unsupported in ["role_arn", "sso_session", "sso_start_url", "login_session"] {
        if profile.get(unsupported).is_some() {
            return Err(CredentialsError::Invalid(format!(
                "AWS profile {name} uses `{unsupported}`, which outboxd does not read; give it static keys or a credential_process (e.g. `aws configure export-credentials --profile {name} --format process`), or use a web identity token"
            )));
        }
    }
    if profile_name.is_some() && profile.files.is_empty() {
        return Err(CredentialsError::Invalid(format!(
            "aws.profile: profile {name} is in neither ~/.aws/credentials nor ~/.aws/config"
        )));
    }
    if let (Some(token_file), Some(role_arn)) =
        (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN"))
    {
        let sts_endpoint = env("AWS_ENDPOINT_URL_STS")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com/"));
        return Ok(Source::WebIdentity {
            token_file,
            role_arn,
            session_name: env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "outboxd".into()),
            sts_endpoint,
        });
    }
    if let Some(full) = env("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        return Ok(Source::Container { url: full });
    }
    if let Some(rel) = env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        return Ok(Source::Container {
            url: format!("http://169.254.170.2{rel}"),
        });
    }
    if !env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        let endpoint = env("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or_else(|| "http://169.254.169.254".into());
        return Ok(Source::InstanceMetadata {
            endpoint: endpoint.trim_end_matches('/').to_string(),
        });
    }
    Err(CredentialsError::Missing(
        "no AWS credentials: none in the environment (AWS_ACCESS_KEY_ID), the profile, a web identity token, the container endpoint, and instance metadata is off (AWS_EC2_METADATA_DISABLED)".into(),
    ))
}

fn from_environment() -> Result<Credentials, CredentialsError> {
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Ok(Credentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: env("AWS_SESSION_TOKEN"),
            expires: None,
            source: "environment (AWS_ACCESS_KEY_ID)".into(),
        }),
        (Some(_), None) => Err(CredentialsError::Invalid(
            "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
        )),
        _ => Err(CredentialsError::Invalid(
            "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into(),
        )),
    }
}

fn from_profile(p: &Profile) -> Result<Credentials, CredentialsError> {
    let source = format!("profile {} ({})", p.name, p.files.join(", "));
    match (p.get("aws_access_key_id"), p.get("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Ok(Credentials {
            access_key_id: id.to_string(),
            secret_access_key: Secret::new(secret.to_string()),
            session_token: p.get("aws_session_token").map(str::to_string),
            expires: None,
            source,
        }),
        _ => Err(CredentialsError::Invalid(format!(
            "{source}: aws_access_key_id without aws_secret_access_key"
        ))),
    }
}

async fn from_process(command: &str, source: &str) -> Result<Credentials, CredentialsError> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| CredentialsError::Invalid(format!("{source}: cannot run it: {e}")))?;
    if !out.status.success() {
        // The process's stderr is its own message, never a secret by convention; its stdout
        // (the credentials) is not shown.
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(CredentialsError::Invalid(format!(
            "{source}: exited with {}: {}",
            out.status,
            err.trim().chars().take(300).collect::<String>()
        )));
    }
    from_json(&String::from_utf8_lossy(&out.stdout), source)
}

/// The JSON the container endpoint, IMDS and `credential_process` answer with.
fn from_json(text: &str, source: &str) -> Result<Credentials, CredentialsError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| {
        CredentialsError::Invalid(format!("{source}: the answer is not credentials JSON"))
    })?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    match (field("AccessKeyId"), field("SecretAccessKey")) {
        (Some(id), Some(secret)) => Ok(Credentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: field("Token").or_else(|| field("SessionToken")),
            expires: field("Expiration").and_then(|e| parse_time(&e)),
            source: source.to_string(),
        }),
        _ => Err(CredentialsError::Invalid(format!(
            "{source}: the answer has no AccessKeyId and SecretAccessKey"
        ))),
    }
}

/// `2026-12-07T01:02:03Z` (fraction and offset `Z` or `+00:00` accepted).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let days = crate::calendar::days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let secs = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = Credentials {
            access_key_id: "AKID".into(),
            secret_access_key: Secret::new("very-secret".into()),
            session_token: Some("session-token-secret".into()),
            expires: None,
            source: "test".into(),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret") && !shown.contains("session-token-secret"));
    }

    #[test]
    fn expiration_times_parse() {
        let t = parse_time("2026-12-07T00:01:02Z").unwrap_or(UNIX_EPOCH);
        assert_eq!(super::super::sigv4::amz_date(t), "20261207T000102Z");
        assert!(parse_time("2026-12-07T00:01:02.123+00:00").is_some());
        assert!(parse_time("soon").is_none());
    }

    #[test]
    fn container_and_process_json_is_read() {
        let c = from_json(
            r#"{"AccessKeyId":"A","SecretAccessKey":"S","Token":"T","Expiration":"2030-01-01T00:00:00Z"}"#,
            "x",
        )
        .map_err(|e| e.to_string());
        let c = c
            .as_ref()
            .map(|c| (c.access_key_id.as_str(), c.session_token.as_deref()));
        assert_eq!(c, Ok(("A", Some("T"))));
        assert!(from_json("{}", "x").is_err());
    }
}
