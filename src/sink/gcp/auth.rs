//! OAuth 2.0 access tokens for Google Cloud, from where Google's client libraries look
//! (application default credentials), in their order:
//!
//! 1. the file `pubsub.credentials_file`, else `GOOGLE_APPLICATION_CREDENTIALS` — a
//!    service-account key (a JWT signed RS256 with its private key, exchanged at its
//!    `token_uri`) or an authorized user (`gcloud auth application-default login`: a refresh
//!    token exchanged at Google's token endpoint);
//! 2. gcloud's application-default file (`~/.config/gcloud/application_default_credentials.json`,
//!    `$CLOUDSDK_CONFIG/…`);
//! 3. the metadata server (GCE, GKE Workload Identity, Cloud Run: `GCE_METADATA_HOST` or
//!    `metadata.google.internal`).
//!
//! A token is cached and fetched again 5 minutes before it expires. A file that cannot be
//! read or parsed, or a private key that does not load, is exit 2 naming the file and never
//! its secret; the emulator needs none.

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use serde_json::Value;
use tokio::sync::Mutex;

use super::{GcpError, GcpKind};
use crate::error::Error;
use crate::sink::aws::credentials::Secret;

/// The scope the relay asks for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/pubsub";
const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// Where tokens come from.
enum Source {
    /// The emulator: no token.
    None,
    ServiceAccount {
        email: String,
        key_id: String,
        key: PKey<Private>,
        token_uri: String,
    },
    AuthorizedUser {
        client_id: String,
        client_secret: Secret,
        refresh_token: Secret,
        token_uri: String,
    },
    Metadata {
        host: String,
    },
}

/// A token source with its cache.
pub struct Auth {
    source: Source,
    /// For messages: `service account a@b (file /x.json)`, never a secret.
    describe: String,
    cached: Mutex<Option<(Secret, Instant)>>,
    http: reqwest::Client,
}

fn setup(file: &str, problem: String) -> Error {
    Error::setup(
        format!("Google credentials file {file}: {problem}"),
        "point pubsub.credentials_file (or GOOGLE_APPLICATION_CREDENTIALS) at a service-account key or an authorized-user file",
    )
}

impl Auth {
    /// No credentials (the emulator).
    pub fn none(http: reqwest::Client) -> Auth {
        Auth {
            source: Source::None,
            describe: "none (the emulator)".into(),
            cached: Mutex::new(None),
            http,
        }
    }

    /// Application default credentials: `file` (the config's), else the environment's,
    /// gcloud's, or the metadata server. Reads the file now: exit 2 when it is unusable.
    pub fn discover(file: Option<&str>, http: reqwest::Client) -> crate::error::Result<Auth> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let gcloud = env("CLOUDSDK_CONFIG")
            .or_else(|| env("HOME").map(|h| format!("{h}/.config/gcloud")))
            .map(|d| format!("{d}/application_default_credentials.json"))
            .filter(|f| std::path::Path::new(f).exists());
        let file = file
            .map(str::to_string)
            .or_else(|| env("GOOGLE_APPLICATION_CREDENTIALS"))
            .or(gcloud);
        let Some(file) = file else {
            let host =
                env("GCE_METADATA_HOST").unwrap_or_else(|| "metadata.google.internal".into());
            return Ok(Auth {
                describe: format!("the metadata server ({host})"),
                source: Source::Metadata { host },
                cached: Mutex::new(None),
                http,
            });
        };
        let text = std::fs::read_to_string(&file).map_err(|e| setup(&file, e.to_string()))?;
        let (source, describe) = parse(&text).map_err(|p| setup(&file, p))?;
        Ok(Auth {
            source,
            describe: format!("{describe} (file {file})"),
            cached: Mutex::new(None),
            http,
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The `Authorization` header's value, `None` for the emulator.
    pub async fn header(&self) -> Result<Option<String>, GcpError> {
        if matches!(self.source, Source::None) {
            return Ok(None);
        }
        let mut cached = self.cached.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(Some(format!("Bearer {}", token.expose())));
            }
        }
        let (token, lifetime) = self.fetch().await?;
        let header = format!("Bearer {token}");
        let refresh_at = Instant::now() + lifetime.saturating_sub(Duration::from_secs(300));
        *cached = Some((Secret::new(token), refresh_at));
        Ok(Some(header))
    }

    /// A new token and its lifetime.
    async fn fetch(&self) -> Result<(String, Duration), GcpError> {
        let request = match &self.source {
            Source::None => return Err(credentials("no credentials".into())),
            Source::ServiceAccount {
                email,
                key_id,
                key,
                token_uri,
            } => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let jwt = jwt(email, key_id, key, token_uri, now).map_err(credentials)?;
                self.http.post(token_uri).form(&[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", jwt.as_str()),
                ])
            }
            Source::AuthorizedUser {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
            } => self.http.post(token_uri).form(&[
                ("grant_type", "refresh_token"),
                ("client_id", client_id.as_str()),
                ("client_secret", client_secret.expose()),
                ("refresh_token", refresh_token.expose()),
            ]),
            Source::Metadata { host } => self
                .http
                .get(format!(
                    "http://{host}/computeMetadata/v1/instance/service-accounts/default/token?scopes={SCOPE}"
                ))
                .header("Metadata-Flavor", "Google"),
        };
        let answer = request
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| GcpError {
                kind: GcpKind::Transport,
                status: String::new(),
                message: format!(
                    "fetching a token from {}: {}",
                    self.describe,
                    crate::sink::http::describe(&e)
                ),
            })?;
        let status = answer.status();
        let bytes = answer.bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            // The token endpoint's `error` (`invalid_grant`, …) names the problem; its
            // description never holds the secret.
            let what = body["error_description"]
                .as_str()
                .or_else(|| body["error"].as_str())
                .unwrap_or("refused");
            let message = format!(
                "the token endpoint refused {}: {status}: {what}",
                self.describe
            );
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                GcpError {
                    kind: GcpKind::Server,
                    status: status.to_string(),
                    message,
                }
            } else {
                credentials(message)
            });
        }
        let token = body["access_token"].as_str().ok_or_else(|| {
            credentials("the token endpoint answered without access_token".into())
        })?;
        let lifetime = body["expires_in"].as_u64().unwrap_or(3600);
        Ok((token.to_string(), Duration::from_secs(lifetime)))
    }
}

fn credentials(message: String) -> GcpError {
    GcpError {
        kind: GcpKind::Credentials,
        status: "UNAUTHENTICATED".into(),
        message,
    }
}

/// A credentials file's source and its description; `Err` says what is wrong (never a
/// secret).
fn parse(text: &str) -> Result<(Source, String), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("no `{k}`"))
    };
    match v.get("type").and_then(Value::as_str) {
        Some("service_account") => {
            let email = field("client_email")?;
            let pem = field("private_key")?;
            let key = PKey::private_key_from_pem(pem.as_bytes())
                .map_err(|_| "`private_key` is not a PEM private key".to_string())?;
            let describe = format!("service account {email}");
            Ok((
                Source::ServiceAccount {
                    email,
                    key_id: field("private_key_id").unwrap_or_default(),
                    key,
                    token_uri: field("token_uri").unwrap_or_else(|_| GOOGLE_TOKEN_URI.into()),
                },
                describe,
            ))
        }
        Some("authorized_user") => {
            let client_id = field("client_id")?;
            Ok((
                Source::AuthorizedUser {
                    client_secret: Secret::new(field("client_secret")?),
                    refresh_token: Secret::new(field("refresh_token")?),
                    token_uri: field("token_uri").unwrap_or_else(|_| GOOGLE_TOKEN_URI.into()),
                    client_id,
                },
                "authorized user".into(),
            ))
        }
        Some(other) => Err(format!(
            "type `{other}` is not supported (service_account, authorized_user); for workload identity federation run on a platform with a metadata server or use a service-account key"
        )),
        None => Err("no `type`".into()),
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The signed assertion a service account exchanges for a token (RFC 7523): RS256 over
/// `header.claims`, valid for an hour from `now`.
fn jwt(
    email: &str,
    key_id: &str,
    key: &PKey<Private>,
    token_uri: &str,
    now: u64,
) -> Result<String, String> {
    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": key_id });
    let claims = serde_json::json!({
        "iss": email,
        "scope": SCOPE,
        "aud": token_uri,
        "iat": now,
        "exp": now + 3600,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = Signer::new(MessageDigest::sha256(), key)
        .and_then(|mut s| {
            s.update(signing_input.as_bytes())?;
            s.sign_to_vec()
        })
        .map_err(|e| format!("signing the token request: {e}"))?;
    Ok(format!("{signing_input}.{}", b64(&signature)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use openssl::rsa::Rsa;
    use openssl::sign::Verifier;

    fn key() -> PKey<Private> {
        PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
    }

    #[test]
    fn a_service_account_jwt_verifies_with_its_public_key_and_claims_the_pubsub_scope() {
        let key = key();
        let jwt = jwt(
            "relay@p.iam.gserviceaccount.com",
            "kid-1",
            &key,
            GOOGLE_TOKEN_URI,
            1_700_000_000,
        )
        .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let dec = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .unwrap()
        };
        let header: Value = serde_json::from_slice(&dec(parts[0])).unwrap();
        let claims: Value = serde_json::from_slice(&dec(parts[1])).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "kid-1");
        assert_eq!(claims["iss"], "relay@p.iam.gserviceaccount.com");
        assert_eq!(claims["scope"], SCOPE);
        assert_eq!(claims["aud"], GOOGLE_TOKEN_URI);
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            3600
        );
        let public = PKey::public_key_from_pem(&key.public_key_to_pem().unwrap()).unwrap();
        let mut v = Verifier::new(MessageDigest::sha256(), &public).unwrap();
        v.update(format!("{}.{}", parts[0], parts[1]).as_bytes())
            .unwrap();
        assert!(
            v.verify(&dec(parts[2])).unwrap(),
            "the signature does not verify"
        );
    }

    #[test]
    fn a_bad_credentials_file_is_described_without_its_secret() {
        let pem = String::from_utf8(key().private_key_to_pem_pkcs8().unwrap()).unwrap();
        let good = serde_json::json!({
            "type": "service_account", "client_email": "a@b", "private_key": pem, "private_key_id": "k"
        });
        let (_, describe) = parse(&good.to_string()).unwrap();
        assert_eq!(describe, "service account a@b");
        let broken = serde_json::json!({
            "type": "service_account", "client_email": "a@b", "private_key": "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
        });
        let e = parse(&broken.to_string()).err().unwrap();
        assert!(e.contains("private_key") && !e.contains("c2VjcmV0"), "{e}");
        let user = serde_json::json!({
            "type": "authorized_user", "client_id": "c", "client_secret": "s3cr3t", "refresh_token": "r3fr3sh"
        });
        let (source, describe) = parse(&user.to_string()).unwrap();
        assert_eq!(describe, "authorized user");
        let Source::AuthorizedUser {
            client_secret,
            refresh_token,
            ..
        } = source
        else {
            panic!("not an authorized user")
        };
        assert_eq!(
            format!("{client_secret:?} {refresh_token:?}"),
            "<redacted> <redacted>"
        );
        for (text, says) in [
            ("{", "not JSON"),
            ("{}", "no `type`"),
            (r#"{"type": "external_account"}"#, "not supported"),
            (
                r#"{"type": "authorized_user", "client_id": "c"}"#,
                "client_secret",
            ),
        ] {
            assert!(parse(text).err().unwrap().contains(says), "{text}");
        }
    }
}
