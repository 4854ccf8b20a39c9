//! The AWS shared files (`~/.aws/credentials`, `~/.aws/config`, or `AWS_SHARED_CREDENTIALS_FILE`
//! / `AWS_CONFIG_FILE`): the settings of one profile, as the AWS CLI and SDKs read them.

use std::collections::HashMap;
use std::path::PathBuf;

/// The settings of one profile, from both files (the credentials file wins). `Debug` shows
/// the settings' names only: their values include the secret key.
#[derive(Default, Clone)]
pub struct Profile {
    pub name: String,
    pub settings: HashMap<String, String>,
    /// Where the settings were found (for messages; never their values).
    pub files: Vec<String>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.settings.keys().collect();
        names.sort();
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("settings", &names)
            .field("files", &self.files)
            .finish()
    }
}

impl Profile {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// The profile in use: `explicit` (`aws.profile`), else `AWS_PROFILE`, else `default`.
pub fn profile_name(explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()))
        .unwrap_or_else(|| "default".into())
}

fn home_file(env: &str, rest: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws").join(rest))
}

/// Reads profile `name` from the config file, then the credentials file over it. Files that
/// do not exist are skipped.
pub fn load(name: &str) -> Profile {
    let mut profile = Profile {
        name: name.to_string(),
        ..Profile::default()
    };
    let sources = [
        (home_file("AWS_CONFIG_FILE", "config"), true),
        (
            home_file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            false,
        ),
    ];
    for (path, is_config) in sources {
        let Some(path) = path else { continue };
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let found = section(&text, name, is_config);
        if !found.is_empty() {
            profile.files.push(path.display().to_string());
            profile.settings.extend(found);
        }
    }
    profile
}

/// The `key = value` lines of profile `name`: `[name]` in the credentials file; `[profile
/// name]` (or `[default]`) in the config file.
fn section(text: &str, name: &str, is_config: bool) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let header = header.trim();
            let this = if is_config && header != "default" {
                header
                    .strip_prefix("profile")
                    .filter(|r| r.starts_with(char::is_whitespace))
                    .map(str::trim)
            } else {
                Some(header)
            };
            inside = this == Some(name);
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::section;

    #[test]
    fn sections_are_read_as_the_cli_reads_them() {
        let config = "[default]\nregion = eu-west-1\n[profile relay]\nregion=us-east-2\n\
                      credential_process = /bin/creds --x\n[profilex]\nregion = no\n";
        assert_eq!(section(config, "default", true)["region"], "eu-west-1");
        let relay = section(config, "relay", true);
        assert_eq!(relay["region"], "us-east-2");
        assert_eq!(relay["credential_process"], "/bin/creds --x");
        assert!(section(config, "x", true).is_empty());
        let creds = "# c\n[relay]\naws_access_key_id = AKID\naws_secret_access_key = s=e/c\n";
        assert_eq!(
            section(creds, "relay", false)["aws_secret_access_key"],
            "s=e/c"
        );
    }
}
