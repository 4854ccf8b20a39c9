//! Table and column selection: `schema.table[.column]` globs.

/// A glob over a dotted name: `*` matches any run of characters except `.`, `?` one
/// character; everything else matches itself. `public.*` is every table of `public`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern has no wildcard (names one table).
    pub fn is_literal(&self) -> bool {
        !self.0.contains(['*', '?'])
    }

    pub fn matches(&self, name: &str) -> bool {
        fn go(p: &[u8], s: &[u8]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some((b'*', rest)) => {
                    let mut i = 0;
                    loop {
                        if go(rest, &s[i..]) {
                            return true;
                        }
                        if i == s.len() || s[i] == b'.' {
                            return false;
                        }
                        i += 1;
                    }
                }
                Some((b'?', rest)) => !s.is_empty() && s[0] != b'.' && go(rest, &s[1..]),
                Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
            }
        }
        go(self.0.as_bytes(), name.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;

    #[test]
    fn globs_match_within_one_name_part() {
        assert!(Glob::new("public.*").matches("public.orders"));
        assert!(!Glob::new("public.*").matches("sales.orders"));
        assert!(Glob::new("*.orders").matches("sales.orders"));
        assert!(Glob::new("public.order?").matches("public.orders"));
        assert!(!Glob::new("public.order?").matches("public.order"));
        assert!(Glob::new("public.users.password*").matches("public.users.password_hash"));
        assert!(!Glob::new("public.*").matches("public.users.x"));
        assert!(Glob::new("public.users").is_literal());
    }
}
