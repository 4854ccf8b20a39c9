//! Event contracts: a JSON Schema per event type, checked before an event is published.
//!
//! The contract between a service and its consumers is the event's shape. A renamed field
//! (`orderId` → `id`) written by one deploy reaches every consumer and breaks them; checked
//! here, the event is dead-lettered (`schema_invalid`, the first failing location and why in
//! `outboxd.dlq.error`) and never reaches the main topic, while the events after it flow.
//!
//! Schemas are files: `schemas.dir/<aggregatetype>/<type>.json` (JSON Schema, draft 2020-12
//! unless the file's `$schema` says otherwise; `$ref`s to sibling files resolve) or
//! `<type>.avsc` (Avro: the payload must resolve into it). All are compiled at start: a file
//! that does not parse or compile stops the relay with exit 2 naming it — a contract the relay
//! cannot read would otherwise pass everything. An event whose type has no schema is published
//! as it is, or dead-lettered `schema_missing` with `schemas.require_schema`. Table change
//! events (CDC) are not checked: their shape is the table's.
//!
//! With `schemas.encoding` other than `json`, [`serializer`] takes over: it validates the same
//! way and writes the record in the Confluent wire format for the registry's consumers.

pub mod connect;
pub mod registry;
pub mod serializer;
pub mod wire;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::SchemasConfig;
use crate::error::{Error, Result};

/// A compiled schema.
#[derive(Clone)]
pub enum Compiled {
    Json(boon::SchemaIndex),
    Avro(Arc<wire::AvroSchema>),
}

/// The compiled schemas of `schemas.dir`.
pub struct Contracts {
    schemas: boon::Schemas,
    /// (aggregatetype, type) → the compiled schema and its file.
    by_type: HashMap<(String, String), (Compiled, SchemaFile)>,
    require: bool,
}

impl std::fmt::Debug for Contracts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contracts")
            .field("types", &self.by_type.len())
            .field("require", &self.require)
            .finish()
    }
}

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// The type has no schema and none is required.
    NoSchema,
    /// The type has no schema and `require_schema` is on.
    Missing,
    /// `location: message` of the first failing part.
    Invalid(String),
}

impl Verdict {
    /// The metric's `result` label.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Valid => "valid",
            Verdict::NoSchema => "no_schema",
            Verdict::Missing => "missing",
            Verdict::Invalid(_) => "invalid",
        }
    }
}

fn unreadable(path: &Path, problem: impl std::fmt::Display) -> Error {
    Error::setup(
        format!("schema {}: {problem}", path.display()),
        "fix or remove the file (schemas.dir holds <aggregatetype>/<type>.json JSON Schemas)",
    )
}

/// A schema file: `<dir>/<aggregatetype>/<type>.json` or `.avsc`.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    pub aggregatetype: String,
    pub event_type: String,
    /// Absolute.
    pub path: std::path::PathBuf,
}

impl SchemaFile {
    /// Avro (`.avsc`), else JSON Schema.
    pub fn is_avro(&self) -> bool {
        self.path.extension().and_then(|e| e.to_str()) == Some("avsc")
    }

    /// The registry's `schemaType`.
    pub fn schema_type(&self) -> &'static str {
        if self.is_avro() {
            "AVRO"
        } else {
            "JSON"
        }
    }
}

/// The schema files under `dir`, sorted; an unreadable directory or file is an error naming
/// it.
pub fn schema_files(dir: &Path) -> Result<Vec<SchemaFile>> {
    let read = |p: &Path| std::fs::read_dir(p).map_err(|e| unreadable(p, e));
    let name = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for aggregate in read(dir)? {
        let aggregate = aggregate.map_err(|e| unreadable(dir, e))?.path();
        if !aggregate.is_dir() {
            continue;
        }
        for file in read(&aggregate)? {
            let path = file.map_err(|e| unreadable(&aggregate, e))?.path();
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("json" | "avsc")
            ) {
                continue;
            }
            let path = path.canonicalize().map_err(|e| unreadable(&path, e))?;
            let aggregatetype = aggregate
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(SchemaFile {
                aggregatetype,
                event_type: name(&path),
                path,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

impl Contracts {
    /// Compiles every `<aggregatetype>/<type>.json` under `cfg.dir`; `None` when no directory
    /// is configured.
    pub fn load(cfg: &SchemasConfig) -> Result<Option<Contracts>> {
        let Some(dir) = &cfg.dir else {
            return Ok(None);
        };
        let mut compiler = boon::Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        let mut schemas = boon::Schemas::new();
        let mut by_type = HashMap::new();
        for file in schema_files(Path::new(dir))? {
            let compiled = if file.is_avro() {
                let text =
                    std::fs::read_to_string(&file.path).map_err(|e| unreadable(&file.path, e))?;
                let avro = wire::AvroSchema::parse(&text).map_err(|e| unreadable(&file.path, e))?;
                Compiled::Avro(Arc::new(avro))
            } else {
                let index = compiler
                    .compile(&file.path.to_string_lossy(), &mut schemas)
                    .map_err(|e| unreadable(&file.path, e))?;
                Compiled::Json(index)
            };
            let key = (file.aggregatetype.clone(), file.event_type.clone());
            if by_type.insert(key, (compiled, file.clone())).is_some() {
                return Err(unreadable(
                    &file.path,
                    "a second schema for the same type (one of .json or .avsc per type)",
                ));
            }
        }
        tracing::info!(dir = %dir, types = by_type.len(), require_schema = cfg.require_schema, "event schemas loaded");
        Ok(Some(Contracts {
            schemas,
            by_type,
            require: cfg.require_schema,
        }))
    }

    /// Checks `payload` (JSON text; `None` is JSON `null`) against the schema of
    /// (`aggregatetype`, `event_type`).
    pub fn check(&self, aggregatetype: &str, event_type: &str, payload: Option<&[u8]>) -> Verdict {
        let key = (aggregatetype.to_string(), event_type.to_string());
        let Some((compiled, _)) = self.by_type.get(&key) else {
            return if self.require {
                Verdict::Missing
            } else {
                Verdict::NoSchema
            };
        };
        let index = match compiled {
            Compiled::Json(index) => index,
            Compiled::Avro(avro) => {
                return match avro.encode(payload) {
                    Ok(_) => Verdict::Valid,
                    Err(e) => Verdict::Invalid(e),
                }
            }
        };
        self.validate_json(*index, payload)
    }

    /// The schema of (`aggregatetype`, `event_type`) and its file, if `schemas.dir` has one.
    pub fn get(&self, aggregatetype: &str, event_type: &str) -> Option<&(Compiled, SchemaFile)> {
        self.by_type
            .get(&(aggregatetype.to_string(), event_type.to_string()))
    }

    /// Checks `payload` against the compiled JSON Schema `index`.
    pub fn validate_json(&self, index: boon::SchemaIndex, payload: Option<&[u8]>) -> Verdict {
        json_verdict(&self.schemas, index, payload)
    }
}

/// Counts one check in `outboxd_schema_validations_total` (the router's and the serializer's).
pub fn count_validation(aggregatetype: &str, event_type: &str, result: &'static str) {
    metrics::counter!(
        crate::metrics::SCHEMA_VALIDATIONS,
        "aggregatetype" => aggregatetype.to_string(),
        "type" => event_type.to_string(),
        "result" => result
    )
    .increment(1);
}

/// Checks `payload` (JSON text; `None` is JSON `null`) against `schemas`' schema `index`.
pub fn json_verdict(
    schemas: &boon::Schemas,
    index: boon::SchemaIndex,
    payload: Option<&[u8]>,
) -> Verdict {
    let value: serde_json::Value = match payload {
        None => serde_json::Value::Null,
        Some(bytes) => match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => return Verdict::Invalid(format!("the payload is not JSON: {e}")),
        },
    };
    match schemas.validate(&value, index) {
        Ok(()) => Verdict::Valid,
        Err(e) => {
            // The first leaf: where the payload breaks the contract, and how.
            let mut leaf = &e;
            while let Some(first) = leaf.causes.first() {
                leaf = first;
            }
            let at = leaf.instance_location.to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            Verdict::Invalid(format!("{at}: {}", leaf.kind))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn contracts(files: &[(&str, &str)], require: bool) -> Result<Option<Contracts>> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("outboxd-schemas-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        Contracts::load(&SchemasConfig {
            dir: Some(dir.to_string_lossy().into_owned()),
            require_schema: require,
            ..Default::default()
        })
    }

    const ORDER_PLACED: &str = r#"{
        "type": "object",
        "required": ["orderId", "total"],
        "properties": {"orderId": {"type": "string"}, "total": {"type": "number", "minimum": 0}}
    }"#;

    #[test]
    fn a_payload_is_checked_against_its_types_schema_naming_where_it_breaks() {
        let c = contracts(&[("order/OrderPlaced.json", ORDER_PLACED)], false)
            .unwrap()
            .unwrap();
        let check = |p: &str| c.check("order", "OrderPlaced", Some(p.as_bytes()));
        assert_eq!(check(r#"{"orderId": "o-1", "total": 10}"#), Verdict::Valid);
        match check(r#"{"id": "o-1", "total": 10}"#) {
            Verdict::Invalid(d) => assert!(d.contains("orderId"), "{d}"),
            v => panic!("{v:?}"),
        }
        match check(r#"{"orderId": "o-1", "total": -1}"#) {
            Verdict::Invalid(d) => assert_eq!(d, "/total: must be >=0, but got -1"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(check("not json"), Verdict::Invalid(d) if d.contains("not JSON")));
        assert_eq!(c.check("order", "Shipped", Some(b"{}")), Verdict::NoSchema);
        assert_eq!(
            c.check("invoice", "OrderPlaced", Some(b"{}")),
            Verdict::NoSchema
        );
    }

    #[test]
    fn require_schema_makes_a_type_without_one_missing() {
        let c = contracts(&[("order/OrderPlaced.json", ORDER_PLACED)], true)
            .unwrap()
            .unwrap();
        assert_eq!(c.check("order", "Shipped", Some(b"{}")), Verdict::Missing);
    }

    #[test]
    fn a_schema_that_does_not_parse_or_compile_is_an_error_naming_the_file() {
        for text in ["{ not json", r#"{"type": 12}"#] {
            let e = contracts(&[("order/Bad.json", text)], false).unwrap_err();
            assert!(e.to_string().contains("Bad.json"), "{e}");
        }
    }
}
