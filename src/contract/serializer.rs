//! Events written for a schema registry's consumers (`schemas.encoding` = `json_schema` or
//! `avro`): each payload validated against its type's schema, then framed in the Confluent wire
//! format with the registry's id of that schema (`super::wire`).
//!
//! Where the schema comes from: the type's file in `schemas.dir` (looked up under its subject
//! for its id — registered first with `schemas.auto_register`), else the subject's latest
//! version in the registry. Ids are cached per subject and type for the life of the process, so
//! a registry that goes away costs nothing for what the relay has already met.
//!
//! The operational rule: **a registry problem is never the event's fault.** A registry that
//! does not answer, refuses the login, or does not hold a file's schema (a deploy that skipped
//! `outboxd schemas register`) ends the session with an error naming it; the next session
//! resends from the confirmed position after a backoff, loudly, until the registry answers —
//! nothing is dead-lettered for it and nothing passes it. Only the event's own problems make it
//! poison: a payload that breaks its schema (`schema_invalid`), a type with no schema in the
//! directory nor the registry (`schema_missing`: it cannot be written in the wire format).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::registry::{subject_for, Registry};
use super::wire::{frame, AvroSchema};
use super::{count_validation, json_verdict, Compiled, Contracts, Verdict};
use crate::config::{Encoding, SchemasConfig, SubjectStrategy};
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::poison::{Poison, PoisonKind};
use crate::record::Record;

/// How one (subject, type) is written.
enum Writer {
    /// A JSON Schema from `schemas.dir` (validated through the contracts).
    LocalJson {
        id: u32,
        index: boon::SchemaIndex,
    },
    /// A JSON Schema read from the registry, compiled on its own.
    FetchedJson {
        id: u32,
        schemas: Box<boon::Schemas>,
        index: boon::SchemaIndex,
    },
    Avro {
        id: u32,
        schema: Arc<AvroSchema>,
    },
}

/// A table's change events in one version of its Connect schema.
struct ChangeWriter {
    id: u32,
    connect: serde_json::Value,
    schema: AvroSchema,
}

/// Validates and frames events for the registry (`schemas.encoding`).
pub struct Serializer {
    encoding: Encoding,
    registry: Registry,
    strategy: SubjectStrategy,
    auto_register: bool,
    contracts: Option<Arc<Contracts>>,
    cache: Mutex<HashMap<(String, String, String), Arc<Writer>>>,
    /// (subject, the Connect schema's text) → its Avro form and id.
    changes: Mutex<HashMap<(String, String), Arc<ChangeWriter>>>,
}

/// `{"schema":S,"payload":P}` (Kafka Connect's JSON with schemas) split into `(S, P)` as text.
fn split_connect(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix("{\"schema\":")?.strip_suffix('}')?;
    let at = rest.rfind(",\"payload\":")?;
    Some((&rest[..at], &rest[at + ",\"payload\":".len()..]))
}

impl std::fmt::Debug for Serializer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serializer")
            .field("encoding", &self.encoding)
            .field("registry", &self.registry.shown())
            .finish()
    }
}

/// A registry problem at run time: transient, retried from the confirmed position.
fn registry_down(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Publish(format!(
        "schema registry: {what}: {e} (retried from the last confirmed position; no event is dead-lettered for a registry problem)"
    ))
}

impl Serializer {
    /// `None` for `schemas.encoding = "json"`. Every schema file must be of the encoding's kind
    /// (`.avsc` for `avro`, `.json` for `json_schema`): another is a setup error naming it.
    pub fn new(cfg: &SchemasConfig, contracts: Option<Arc<Contracts>>) -> Result<Option<Self>> {
        if cfg.encoding == Encoding::Json {
            return Ok(None);
        }
        if let Some(c) = &contracts {
            for (compiled, file) in c.by_type.values() {
                let fits = matches!(
                    (compiled, cfg.encoding),
                    (Compiled::Avro(_), Encoding::Avro) | (Compiled::Json(_), Encoding::JsonSchema)
                );
                if !fits {
                    return Err(Error::setup(
                        format!(
                            "schema {} is not of schemas.encoding `{}`",
                            file.path.display(),
                            cfg.encoding.label()
                        ),
                        "use .avsc files with encoding avro, .json files with json_schema",
                    ));
                }
            }
        }
        Ok(Some(Serializer {
            encoding: cfg.encoding,
            registry: Registry::new(cfg)?,
            strategy: cfg.subject_strategy,
            auto_register: cfg.auto_register,
            contracts,
            cache: Mutex::new(HashMap::new()),
            changes: Mutex::new(HashMap::new()),
        }))
    }

    /// Validates `record`'s value against the schema of (`aggregatetype`, `event_type`) and
    /// replaces it with its wire-format bytes. `Ok(Err(poison))`: the event's own problem;
    /// `Err`: the registry's (end the session).
    pub async fn serialize(
        &self,
        record: &mut Record,
        aggregatetype: &str,
        event_type: &str,
    ) -> Result<std::result::Result<(), Poison>> {
        let subject = subject_for(self.strategy, &record.topic, aggregatetype, event_type);
        let key = (
            subject.clone(),
            aggregatetype.to_string(),
            event_type.to_string(),
        );
        let cached = lookup(&self.cache, &key);
        let writer = match cached {
            Some(w) => w,
            None => match self.resolve(&subject, aggregatetype, event_type).await? {
                Some(w) => {
                    let w = Arc::new(w);
                    self.cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, w.clone());
                    w
                }
                None => {
                    count_validation(aggregatetype, event_type, "missing");
                    return Ok(Err(Poison {
                        kind: PoisonKind::SchemaMissing,
                        detail: format!(
                            "no schema for aggregatetype `{aggregatetype}`, type `{event_type}`: none in schemas.dir, none under subject `{subject}` in the registry, and schemas.encoding `{}` needs one",
                            self.encoding.label()
                        ),
                    }));
                }
            },
        };
        let payload = record.value.as_deref();
        let written = match &*writer {
            Writer::LocalJson { id, index } => {
                let verdict = match &self.contracts {
                    Some(c) => c.validate_json(*index, payload),
                    None => Verdict::Valid,
                };
                json_framed(*id, verdict, payload)
            }
            Writer::FetchedJson { id, schemas, index } => {
                json_framed(*id, json_verdict(schemas, *index, payload), payload)
            }
            Writer::Avro { id, schema } => schema.encode(payload).map(|body| frame(*id, &body)),
        };
        match written {
            Ok(bytes) => {
                count_validation(aggregatetype, event_type, "valid");
                record.value = Some(bytes);
                record.binary = true;
                Ok(Ok(()))
            }
            Err(detail) => {
                count_validation(aggregatetype, event_type, "invalid");
                Ok(Err(Poison {
                    kind: PoisonKind::SchemaInvalid,
                    detail,
                }))
            }
        }
    }

    /// A table change event in Avro (`schemas.encoding = "avro"`): its value converted along
    /// its Connect schema, registered under `<topic>-value` (a new version when the table
    /// changes), its key back to the plain JSON of the key columns. Other encodings leave
    /// change events as they are.
    pub async fn serialize_change(
        &self,
        record: &mut Record,
    ) -> Result<std::result::Result<(), Poison>> {
        if self.encoding != Encoding::Avro {
            return Ok(Ok(()));
        }
        let invalid = |detail: String| {
            Ok(Err(Poison {
                kind: PoisonKind::SchemaInvalid,
                detail,
            }))
        };
        let text = match record.value.as_deref().map(std::str::from_utf8) {
            Some(Ok(text)) => text,
            // A truncate or a tombstone: nothing to convert.
            _ => return Ok(Ok(())),
        };
        let Some((connect, payload)) = split_connect(text) else {
            return invalid("a change event without its Connect schema".into());
        };
        let subject = format!("{}-value", record.topic);
        let key = (subject.clone(), connect.to_string());
        let cached = lookup(&self.changes, &key);
        let writer = match cached {
            Some(w) => w,
            None => {
                let connect_json: serde_json::Value = match serde_json::from_str(connect) {
                    Ok(v) => v,
                    Err(e) => return invalid(format!("the Connect schema is not JSON: {e}")),
                };
                let avro = match super::connect::avro_schema(
                    &connect_json,
                    &mut std::collections::HashSet::new(),
                ) {
                    Ok(a) => a.to_string(),
                    Err(e) => return invalid(e),
                };
                let schema = match AvroSchema::parse(&avro) {
                    Ok(s) => s,
                    Err(e) => return invalid(format!("the derived Avro schema: {e}")),
                };
                let registered = async {
                    self.registry
                        .register_text(&subject, "AVRO", &avro)
                        .await
                        .map(Some)
                };
                let id = timed("register", registered)
                    .await
                    .map_err(|e| registry_down(&format!("registering {subject}"), e))?
                    .unwrap_or_default();
                tracing::info!(subject, id, "change event schema registered");
                let w = Arc::new(ChangeWriter {
                    id,
                    connect: connect_json,
                    schema,
                });
                self.changes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, w.clone());
                w
            }
        };
        let payload: serde_json::Value = match serde_json::from_str(payload) {
            Ok(v) => v,
            Err(e) => return invalid(format!("the change event is not JSON: {e}")),
        };
        let body = super::connect::avro_value(&writer.connect, &payload)
            .and_then(|v| writer.schema.encode_value(v));
        match body {
            Ok(body) => {
                record.value = Some(frame(writer.id, &body));
                record.binary = true;
                if let Some((_, key)) = record.key.as_deref().and_then(split_connect) {
                    record.key = Some(key.to_string());
                }
                Ok(Ok(()))
            }
            Err(e) => invalid(e),
        }
    }

    /// The writer of a subject and type not met before.
    async fn resolve(
        &self,
        subject: &str,
        aggregatetype: &str,
        event_type: &str,
    ) -> Result<Option<Writer>> {
        let local = self
            .contracts
            .as_ref()
            .and_then(|c| c.get(aggregatetype, event_type));
        if let Some((compiled, file)) = local {
            let found = timed("lookup", self.registry.lookup(subject, file)).await;
            let id = match found.map_err(|e| registry_down(&format!("looking up {subject}"), e))? {
                Some(id) => id,
                None if self.auto_register => {
                    let registered = async { self.registry.register(subject, file).await.map(Some) };
                    let id = timed("register", registered)
                        .await
                        .map_err(|e| registry_down(&format!("registering {subject}"), e))?
                        .unwrap_or_default();
                    tracing::info!(subject, id, file = %file.path.display(), "schema registered");
                    id
                }
                None => {
                    return Err(registry_down(
                        &format!("subject {subject}"),
                        format!(
                            "the registry does not hold {} under it; register it (outboxd schemas register) or set schemas.auto_register",
                            file.path.display()
                        ),
                    ))
                }
            };
            tracing::info!(subject, id, file = %file.path.display(), "schema id resolved");
            return Ok(Some(match compiled {
                Compiled::Json(index) => Writer::LocalJson { id, index: *index },
                Compiled::Avro(schema) => Writer::Avro {
                    id,
                    schema: schema.clone(),
                },
            }));
        }
        let latest = timed("latest", self.registry.latest(subject))
            .await
            .map_err(|e| registry_down(&format!("reading {subject}"), e))?;
        let Some(version) = latest else {
            return Ok(None);
        };
        let unusable = |why: String| {
            registry_down(&format!("subject {subject}, schema id {}", version.id), why)
        };
        let writer = match (self.encoding, version.schema_type.as_str()) {
            (Encoding::Avro, "AVRO") => Writer::Avro {
                id: version.id,
                schema: Arc::new(AvroSchema::parse(&version.schema).map_err(unusable)?),
            },
            (Encoding::JsonSchema, "JSON") => {
                let value: serde_json::Value =
                    serde_json::from_str(&version.schema).map_err(|e| unusable(e.to_string()))?;
                let url = format!("registry:///{}/{}", subject, version.id);
                let mut compiler = boon::Compiler::new();
                compiler.set_default_draft(boon::Draft::V2020_12);
                let mut schemas = Box::new(boon::Schemas::new());
                if let Err(e) = compiler.add_resource(&url, value) {
                    return Err(unusable(e.to_string()));
                }
                let index = match compiler.compile(&url, &mut schemas) {
                    Ok(index) => index,
                    Err(e) => return Err(unusable(e.to_string())),
                };
                Writer::FetchedJson {
                    id: version.id,
                    schemas,
                    index,
                }
            }
            (encoding, other) => {
                return Err(unusable(format!(
                    "it is a {other} schema and schemas.encoding is `{}`",
                    encoding.label()
                )))
            }
        };
        tracing::info!(
            subject,
            id = version.id,
            "schema read from the registry (its latest version)"
        );
        Ok(Some(writer))
    }
}

/// `payload` framed for `id` if `verdict` lets it through.
fn json_framed(
    id: u32,
    verdict: Verdict,
    payload: Option<&[u8]>,
) -> std::result::Result<Vec<u8>, String> {
    match verdict {
        Verdict::Invalid(detail) => Err(detail),
        _ => Ok(frame(id, payload.unwrap_or(b"null"))),
    }
}

/// What `cache` holds for `key` (the lock is held for the lookup only, never across a
/// registry request).
fn lookup<K: std::hash::Hash + Eq, V>(
    cache: &Mutex<HashMap<K, Arc<V>>>,
    key: &K,
) -> Option<Arc<V>> {
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .cloned()
}

/// Runs one registry request, timing and counting it.
async fn timed<T>(
    op: &'static str,
    request: impl std::future::Future<Output = Result<Option<T>>>,
) -> Result<Option<T>> {
    let started = Instant::now();
    let answer = request.await;
    metrics::histogram!(m::SCHEMA_REGISTRY_SECONDS).record(started.elapsed().as_secs_f64());
    let result = match &answer {
        Ok(Some(_)) => "ok",
        Ok(None) => "not_found",
        Err(_) => "error",
    };
    metrics::counter!(m::SCHEMA_REGISTRY_REQUESTS, "op" => op, "result" => result).increment(1);
    answer
}
