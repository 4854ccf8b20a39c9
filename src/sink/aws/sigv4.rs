//! AWS Signature Version 4 for the POST requests the AWS sinks make (JSON and query
//! protocols: the whole request is the body, the path is the endpoint's, no query string).
//!
//! Pinned by signatures botocore computed for the same requests (the unit tests), and proven
//! against a server that checks them (moto with IAM authentication on, `tests/aws_sinks.rs`).

use std::time::{SystemTime, UNIX_EPOCH};

use openssl::sha::Sha256;

use super::credentials::Credentials;

/// The headers a signed request carries besides its own: `X-Amz-Date`, `Authorization` and,
/// with temporary credentials, `X-Amz-Security-Token`.
pub struct Signed {
    pub amz_date: String,
    pub authorization: String,
    pub security_token: Option<String>,
}

/// What is signed: `host` as the HTTP `Host` header will carry it (`host[:port]`, the port
/// only when not the scheme's default), the endpoint's path, and the headers besides host and
/// the date (lower-case names, sorted by the caller or not: they are sorted here).
pub struct Request<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(data);
    h.finish()
}

/// HMAC-SHA256 (RFC 2104) over OpenSSL's SHA-256: infallible, no key object.
fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(&block.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(&block.map(|b| b ^ 0x5c));
    outer.update(&inner.finish());
    outer.finish()
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Lower-case hex SHA-256 of `data` (also the sinks' stand-in for an id too long or with
/// characters a broker refuses).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&sha256(data))
}

/// `YYYYMMDDTHHMMSSZ` of a time.
pub fn amz_date(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = crate::calendar::civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Signs `req` for `service` in `region` at `at`.
pub fn sign(
    req: &Request<'_>,
    creds: &Credentials,
    region: &str,
    service: &str,
    at: SystemTime,
) -> Signed {
    let amz_date = amz_date(at);
    let day = &amz_date[..8];
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    headers.push(("host".into(), req.host.to_string()));
    headers.push(("x-amz-date".into(), amz_date.clone()));
    if let Some(token) = &creds.session_token {
        headers.push(("x-amz-security-token".into(), token.clone()));
    }
    headers.sort();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical = format!("POST\n{}\n\n", canonical_path(req.path));
    for (k, v) in &headers {
        canonical.push_str(k);
        canonical.push(':');
        canonical.push_str(v);
        canonical.push('\n');
    }
    canonical.push('\n');
    canonical.push_str(&signed_headers);
    canonical.push('\n');
    canonical.push_str(&sha256_hex(req.body));
    let scope = format!("{day}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let secret = format!("AWS4{}", creds.secret_access_key.expose());
    let key = hmac(secret.as_bytes(), day.as_bytes());
    let key = hmac(&key, region.as_bytes());
    let key = hmac(&key, service.as_bytes());
    let key = hmac(&key, b"aws4_request");
    let signature = hex(&hmac(&key, to_sign.as_bytes()));
    Signed {
        authorization: format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            creds.access_key_id
        ),
        amz_date,
        security_token: creds.session_token.clone(),
    }
}

/// The canonical URI: every path segment URI-encoded (again: services other than S3 encode
/// the already-encoded path once more); `/` when empty.
fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::aws::credentials::{Credentials, Secret};
    use std::time::Duration;

    fn at() -> SystemTime {
        // 2026-12-07T00:01:02Z, the time botocore signed the expected requests at.
        let days = crate::calendar::days_from_civil(2026, 12, 7) as u64;
        UNIX_EPOCH + Duration::from_secs(days * 86_400 + 62)
    }

    fn creds(token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: token.map(str::to_string),
            expires: None,
            source: "test".into(),
        }
    }

    const HEADERS: &[(&str, &str)] = &[
        ("Content-Type", "application/x-amz-json-1.0"),
        ("X-Amz-Target", "AmazonSQS.GetQueueUrl"),
    ];
    const BODY: &[u8] = br#"{"QueueName":"orders.fifo"}"#;

    #[test]
    fn signatures_equal_botocores_for_the_same_requests() {
        let req = Request {
            host: "sqs.eu-west-1.amazonaws.com",
            path: "/",
            headers: HEADERS,
            body: BODY,
        };
        let s = sign(&req, &creds(Some("tok/en+=")), "eu-west-1", "sqs", at());
        assert_eq!(s.amz_date, "20261207T000102Z");
        assert_eq!(
            s.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261207/eu-west-1/sqs/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, \
             Signature=a118460f423264990aa548e50c45d0e0d28bb42d797d0a1314d1db0b11787add"
        );
        assert_eq!(s.security_token.as_deref(), Some("tok/en+="));
        // A local endpoint: the port is part of the signed host.
        let req = Request {
            host: "127.0.0.1:9324",
            ..req
        };
        let s = sign(&req, &creds(None), "us-east-1", "sqs", at());
        assert!(
            s.authorization.ends_with(
                "SignedHeaders=content-type;host;x-amz-date;x-amz-target, \
                 Signature=b47c6dcd7a576dd7b631fd058554e02c66c677c07d27068eebfe5a369dba3869"
            ),
            "{}",
            s.authorization
        );
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        assert_eq!(
            hex(&hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
