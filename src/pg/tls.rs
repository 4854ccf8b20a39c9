//! TLS to PostgreSQL, with libpq's semantics, for the SQL connections and the replication
//! connection alike.
//!
//! Managed PostgreSQL (RDS, Cloud SQL, Azure, Supabase, Neon) requires TLS. `postgres.url`
//! takes libpq's parameters — `sslmode` (`disable`, `prefer` (the default), `require`,
//! `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or `system` for the operating
//! system's store), `sslcert` and `sslkey` (a client certificate) — in both URL
//! (`?sslmode=verify-full&sslrootcert=/ca.pem`) and `key=value` form. tokio-postgres knows only
//! `disable`/`prefer`/`require` and none of the file parameters, so they are taken out of the
//! URL here and applied to an OpenSSL connector.
//!
//! As in libpq: `require` encrypts without checking the certificate — unless `sslrootcert` is
//! given, then it checks the chain like `verify-ca`; `verify-ca` checks the chain;
//! `verify-full` also checks that the host in the URL is a name (or IP address) in the
//! certificate. A server that refuses TLS is an error for `require` and above, and a
//! plaintext session for `prefer`.
//!
//! One TLS stack for the whole binary: OpenSSL, which librdkafka already links for Kafka's
//! TLS, so the binary carries one implementation and one trust store, not two.

use std::fmt;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode, String> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                "sslmode `{other}` is not one of: disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }

    /// Whether a server without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// The TLS parameters of `postgres.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl TlsSettings {
    /// Whether the server's certificate chain is checked.
    pub fn verifies_chain(&self) -> bool {
        matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull)
            || (self.mode == SslMode::Require && self.root_cert.is_some())
    }

    /// The OpenSSL connector for these settings. Errors name the file that could not be used.
    pub fn connector(&self) -> Result<SslConnector, String> {
        let mut b = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| format!("setting up TLS: {e}"))?;
        if self.verifies_chain() {
            match self.root_cert.as_deref() {
                Some("system") => b
                    .set_default_verify_paths()
                    .map_err(|e| format!("loading the system's CA certificates: {e}"))?,
                Some(path) => {
                    readable("sslrootcert", path)?;
                    b.set_ca_file(path)
                        .map_err(|e| format!("sslrootcert `{path}` is not a PEM file: {e}"))?
                }
                None => {
                    return Err(format!(
                        "sslmode={} needs sslrootcert (a PEM file with the CA that signed the server's certificate, or `system`)",
                        self.mode
                    ))
                }
            }
            b.set_verify(SslVerifyMode::PEER);
        } else {
            b.set_verify(SslVerifyMode::NONE);
        }
        if let Some(cert) = &self.cert {
            readable("sslcert", cert)?;
            b.set_certificate_chain_file(cert)
                .map_err(|e| format!("cannot use sslcert `{cert}`: {e}"))?;
        }
        if let Some(key) = &self.key {
            readable("sslkey", key)?;
            b.set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| format!("cannot use sslkey `{key}`: {e}"))?;
        }
        Ok(b.build())
    }

    /// The mode tokio-postgres understands.
    pub fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// A clear line for a file that cannot be read (OpenSSL's own error stack is hard to read).
fn readable(what: &str, path: &str) -> Result<(), String> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("cannot read {what} `{path}`: {e}"))
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits `postgres.url` into the part tokio-postgres parses and the TLS settings. Both the
/// URL form and the `key=value` form are understood. Errors never echo the URL (it may hold
/// a password).
pub fn split_url(url: &str) -> Result<(String, TlsSettings), String> {
    let mut found: Vec<(String, String)> = Vec::new();
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if TLS_KEYS.contains(&k) {
                        found.push((k.to_string(), percent_decode(v)?));
                    } else {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, raw, value) in key_values(url)? {
            if TLS_KEYS.contains(&k.as_str()) {
                found.push((k, value));
            } else {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    let mut tls = TlsSettings {
        mode: SslMode::Prefer,
        root_cert: None,
        cert: None,
        key: None,
    };
    for (k, v) in found {
        match k.as_str() {
            "sslmode" => tls.mode = SslMode::parse(&v)?,
            "sslrootcert" => tls.root_cert = Some(v),
            "sslcert" => tls.cert = Some(v),
            _ => tls.key = Some(v),
        }
    }
    Ok((rest, tls))
}

/// `key=value` pairs of a libpq connection string: (key, the pair's original text, value).
fn key_values(s: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Ok(out);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!("expected `=` after `{key}`"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let mut end = s.len();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            let mut closed = false;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, e)) = chars.next() {
                            value.push(e);
                        }
                    }
                    '\'' => {
                        closed = true;
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("unterminated quoted value of `{key}`"));
            }
        } else {
            while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                value.push(c);
                end = i + c.len_utf8();
            }
        }
        out.push((key, s[start..end].to_string(), value));
    }
}

fn percent_decode(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("invalid percent-encoding in a TLS parameter")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a TLS parameter is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_both_url_forms() {
        let (rest, tls) = split_url(
            "postgres://u:p@db:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/app?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some("/etc/ca.pem"));

        let (rest, tls) = split_url(
            "host=db user=u password='it\\'s x' sslmode = verify-ca sslrootcert='/my ca.pem' dbname=app",
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert.as_deref(), Some("/my ca.pem"));
        assert!(!rest.contains("ssl"), "{rest}");
        assert!(rest.contains("dbname=app"), "{rest}");
    }

    #[test]
    fn default_is_prefer_and_bad_modes_are_named() {
        assert_eq!(
            split_url("postgres://h/db").unwrap().1.mode,
            SslMode::Prefer
        );
        let e = split_url("postgres://h/db?sslmode=strict").unwrap_err();
        assert!(e.contains("sslmode `strict`"), "{e}");
        let e = split_url("postgres://u:secret@h/db?sslmode=verify-full")
            .unwrap()
            .1
            .connector()
            .err()
            .unwrap();
        assert!(e.contains("sslrootcert"), "{e}");
        assert!(!e.contains("secret"));
    }
}
