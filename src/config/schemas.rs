//! `[schemas]`: event contracts (`crate::contract`) and the schema registry
//! (`crate::contract::registry`; its password is a [`Secret`], never shown).

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::secret::Secret;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchemas {
    dir: Option<String>,
    require_schema: Option<bool>,
    registry_url: Option<String>,
    registry_username: Option<String>,
    pub(super) registry_password: Option<String>,
    registry_ca_file: Option<String>,
    subject_strategy: Option<String>,
    encoding: Option<String>,
    auto_register: Option<bool>,
}

/// How an event's payload is written to the broker (`schemas.encoding`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// The payload's JSON text, as the service wrote it.
    #[default]
    Json,
    /// The JSON text in the Confluent wire format (magic byte, schema id), for JSON Schema
    /// deserializers.
    JsonSchema,
    /// Avro binary in the Confluent wire format.
    Avro,
}

impl Encoding {
    pub fn label(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::JsonSchema => "json_schema",
            Encoding::Avro => "avro",
        }
    }
}

/// How a schema's registry subject is named (Confluent's subject name strategies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SubjectStrategy {
    /// `<topic>-value`: one schema per topic.
    Topic,
    /// `<aggregatetype>.<type>`: one per event type, whatever the topic.
    Record,
    /// `<topic>-<aggregatetype>.<type>`: one per event type per topic.
    #[default]
    TopicRecord,
}

/// `[schemas]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemasConfig {
    /// `<aggregatetype>/<type>.json` JSON Schemas; `None`: no event is checked.
    pub dir: Option<String>,
    /// Dead-letter (`schema_missing`) an event whose type has no schema.
    pub require_schema: bool,
    /// A Confluent-API schema registry (`…/apis/ccompat/v7` for Apicurio).
    pub registry_url: Option<String>,
    pub registry_username: Option<String>,
    /// `OUTBOXD_SCHEMA_REGISTRY_PASSWORD` overrides it.
    pub registry_password: Option<Secret>,
    /// A PEM CA bundle the registry's certificate must chain to.
    pub registry_ca_file: Option<String>,
    pub subject_strategy: SubjectStrategy,
    /// `json` (as written), or a registry's wire format (`json_schema`, `avro`).
    pub encoding: Encoding,
    /// Register a `schemas.dir` file under its subject when the relay first uses it (else it
    /// must be registered already: `outboxd schemas register`).
    pub auto_register: bool,
}

pub(super) fn schemas(raw: RawSchemas) -> Result<SchemasConfig, ConfigError> {
    let dir = raw.dir.filter(|d| !d.is_empty());
    if let Some(d) = &dir {
        if !std::path::Path::new(d).is_dir() {
            return Err(invalid(
                "schemas.dir",
                format!("`{d}` is not a readable directory"),
            ));
        }
    }
    let require_schema = raw.require_schema.unwrap_or(false);
    if require_schema && dir.is_none() {
        return Err(invalid(
            "schemas.require_schema",
            "needs schemas.dir (without schemas every event would be dead-lettered)",
        ));
    }
    let registry_url = raw.registry_url.filter(|u| !u.is_empty());
    if let Some(u) = &registry_url {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(invalid(
                "schemas.registry_url",
                "must start with https:// (or http://)",
            ));
        }
    }
    if let Some(ca) = &raw.registry_ca_file {
        std::fs::metadata(ca).map_err(|e| {
            invalid(
                "schemas.registry_ca_file",
                format!("cannot read `{ca}`: {e}"),
            )
        })?;
    }
    let subject_strategy = match raw.subject_strategy.as_deref().unwrap_or("topic_record") {
        "topic" => SubjectStrategy::Topic,
        "record" => SubjectStrategy::Record,
        "topic_record" => SubjectStrategy::TopicRecord,
        other => {
            return Err(invalid(
                "schemas.subject_strategy",
                format!("`{other}` is not one of: topic, record, topic_record"),
            ))
        }
    };
    let encoding = match raw.encoding.as_deref().unwrap_or("json") {
        "json" => Encoding::Json,
        "json_schema" => Encoding::JsonSchema,
        "avro" => Encoding::Avro,
        other => {
            return Err(invalid(
                "schemas.encoding",
                format!("`{other}` is not one of: json, json_schema, avro"),
            ))
        }
    };
    if encoding != Encoding::Json && registry_url.is_none() {
        return Err(invalid(
            "schemas.encoding",
            format!(
                "`{}` writes the registry's schema id into every record: set schemas.registry_url",
                encoding.label()
            ),
        ));
    }
    let auto_register = raw.auto_register.unwrap_or(false);
    if auto_register && dir.is_none() {
        return Err(invalid(
            "schemas.auto_register",
            "needs schemas.dir (the files it registers)",
        ));
    }
    Ok(SchemasConfig {
        encoding,
        auto_register,
        dir,
        require_schema,
        registry_url: registry_url.map(|u| u.trim_end_matches('/').to_string()),
        registry_username: raw.registry_username.filter(|u| !u.is_empty()),
        registry_password: raw
            .registry_password
            .filter(|p| !p.is_empty())
            .map(Secret::new),
        registry_ca_file: raw.registry_ca_file,
        subject_strategy,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::Config;

    fn key_of(schemas: &str) -> String {
        let text = format!(
            "[postgres]\nurl = \"postgres://u@localhost/db\"\n[kafka]\nbrokers = \"localhost:9092\"\n[schemas]\n{schemas}"
        );
        match Config::from_toml_str(&text, |_| None) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_wire_encoding_needs_a_registry_and_auto_register_needs_files() {
        let e = key_of("encoding = \"avro\"\n");
        assert!(
            e.contains("`schemas.encoding`") && e.contains("registry_url"),
            "{e}"
        );
        let e = key_of("encoding = \"protobuf\"\nregistry_url = \"http://r\"\n");
        assert!(
            e.contains("`schemas.encoding`") && e.contains("protobuf"),
            "{e}"
        );
        let e = key_of("auto_register = true\nregistry_url = \"http://r\"\n");
        assert!(e.contains("`schemas.auto_register`"), "{e}");
        assert_eq!(
            key_of("encoding = \"json_schema\"\nregistry_url = \"http://r\"\n"),
            "ok"
        );
    }
}
