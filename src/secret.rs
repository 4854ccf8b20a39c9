//! A secret string (a password, a key, a token): `Debug` shows `<redacted>`, so a secret
//! held in a config or a client never reaches a log line by accident; `expose` is the one
//! way to read it, where it is sent.

/// A secret string: shown as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}
