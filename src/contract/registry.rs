//! A Confluent-API schema registry (Confluent Schema Registry, Apicurio's `ccompat` API,
//! Karapace…): the checks a service runs in its CI before a deploy — `outboxd schemas
//! check` — and the registration after it — `outboxd schemas register`.
//!
//! A schema file's subject follows `schemas.subject_strategy`: `topic_record` (default:
//! `<topic>-<aggregatetype>.<type>`, one subject per event type per topic, as Confluent's
//! TopicRecordNameStrategy), `topic` (`<topic>-value`), `record` (`<aggregatetype>.<type>`).
//! The topic is the one `kafka.topic_template` gives the type. `check` asks the registry
//! whether each file is compatible with the subject's latest version under the subject's
//! compatibility level (the registry's rule; BACKWARD is Confluent's default): a file that
//! breaks it is named with its subject, and the command exits 1; a subject the registry does
//! not have yet has nothing to break.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::SchemaFile;
use crate::config::{percent_encode, Config, SubjectStrategy};
use crate::error::{Error, Result};
use crate::topic::TopicTemplate;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A registry client.
pub struct Registry {
    http: reqwest::Client,
    url: String,
    /// `url` with any password in it replaced: what messages show.
    shown: String,
    auth: Option<(String, crate::secret::Secret)>,
}

fn setup(problem: String) -> Error {
    Error::setup(
        problem,
        "check schemas.registry_url, schemas.registry_username / OUTBOXD_SCHEMA_REGISTRY_PASSWORD and schemas.registry_ca_file",
    )
}

/// The subject of `file` under `strategy`, `template` rendering its topic.
pub fn subject(strategy: SubjectStrategy, template: &TopicTemplate, file: &SchemaFile) -> String {
    let topic = template.render_parts(&file.aggregatetype, &file.event_type);
    subject_for(strategy, &topic, &file.aggregatetype, &file.event_type)
}

/// The subject of an event of (`aggregatetype`, `event_type`) published to `topic`.
pub fn subject_for(
    strategy: SubjectStrategy,
    topic: &str,
    aggregatetype: &str,
    event_type: &str,
) -> String {
    match strategy {
        SubjectStrategy::Topic => format!("{topic}-value"),
        SubjectStrategy::Record => format!("{aggregatetype}.{event_type}"),
        SubjectStrategy::TopicRecord => format!("{topic}-{aggregatetype}.{event_type}"),
    }
}

/// A registered schema version as the registry returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub id: u32,
    /// `AVRO`, `JSON` or `PROTOBUF`.
    pub schema_type: String,
    pub schema: String,
}

/// What `check` found for one file.
#[derive(Debug, PartialEq, Eq)]
pub enum Compatibility {
    Compatible,
    /// The registry has no such subject yet.
    New,
    /// Why, as the registry says (may be empty).
    Breaks(Vec<String>),
}

impl Registry {
    pub fn new(cfg: &crate::config::SchemasConfig) -> Result<Registry> {
        let url = cfg
            .registry_url
            .clone()
            .ok_or_else(|| setup("schemas.registry_url is not set".into()))?;
        let mut builder = crate::sink::http::builder()
            .timeout(Duration::from_secs(30))
            .http1_only();
        if let Some(ca) = &cfg.registry_ca_file {
            let cert =
                crate::sink::http::ca_certificate("schemas.registry_ca_file", ca).map_err(setup)?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| setup(format!("building the registry client: {e}")))?;
        let auth = cfg.registry_username.clone().map(|u| {
            (
                u,
                cfg.registry_password
                    .clone()
                    .unwrap_or_else(|| crate::secret::Secret::new(String::new())),
            )
        });
        let shown = crate::config::redact_url(&url);
        Ok(Registry {
            http,
            url,
            shown,
            auth,
        })
    }

    /// The registry's address, for messages (any password in it replaced).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// POST `path` with `body`: the answer's status and JSON. An unanswered request or a
    /// refused login is an error naming the registry (never the password).
    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.request(path, Some(body)).await
    }

    /// POST `path` with `body`, or GET it: the answer's status and JSON.
    async fn request(&self, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let url = format!("{}/{path}", self.url);
        let mut req = match body {
            Some(body) => self
                .http
                .post(url)
                .header("content-type", CONTENT_TYPE)
                .body(body.to_string()),
            None => self.http.get(url).header("accept", CONTENT_TYPE),
        };
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        let answer = req.send().await.map_err(|e| {
            setup(format!(
                "schema registry {}: {}",
                self.shown,
                crate::sink::http::describe(&e)
            ))
        })?;
        let status = answer.status().as_u16();
        let bytes = answer.bytes().await.unwrap_or_default();
        if status == 401 || status == 403 {
            return Err(setup(format!(
                "schema registry {} refused the login ({status})",
                self.shown
            )));
        }
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    fn body(file: &SchemaFile) -> Result<Value> {
        let text = std::fs::read_to_string(&file.path)
            .map_err(|e| setup(format!("{}: {e}", file.path.display())))?;
        Ok(json!({ "schemaType": file.schema_type(), "schema": text }))
    }

    /// The id under which `subject` holds exactly `file`'s schema; `None` when it does not.
    pub async fn lookup(&self, subject: &str, file: &SchemaFile) -> Result<Option<u32>> {
        let path = format!("subjects/{}", percent_encode(subject));
        let (status, v) = self.post(&path, &Self::body(file)?).await?;
        match (status, v.get("id").and_then(Value::as_u64)) {
            (200, Some(id)) => Ok(u32::try_from(id).ok()),
            (404, _) => Ok(None),
            _ => Err(setup(format!(
                "schema registry {}: looking up {subject}: {status} {v}",
                self.shown
            ))),
        }
    }

    /// `subject`'s latest version; `None` when the registry has no such subject.
    pub async fn latest(&self, subject: &str) -> Result<Option<Version>> {
        let path = format!("subjects/{}/versions/latest", percent_encode(subject));
        let (status, v) = self.request(&path, None).await?;
        let id = v.get("id").and_then(Value::as_u64);
        let schema = v.get("schema").and_then(Value::as_str);
        match (status, id, schema) {
            (200, Some(id), Some(schema)) => Ok(Some(Version {
                id: u32::try_from(id).unwrap_or(u32::MAX),
                schema_type: v
                    .get("schemaType")
                    .and_then(Value::as_str)
                    .unwrap_or("AVRO")
                    .to_string(),
                schema: schema.to_string(),
            })),
            (404, _, _) => Ok(None),
            _ => Err(setup(format!(
                "schema registry {}: reading {subject}: {status} {v}",
                self.shown
            ))),
        }
    }

    /// Is `file` compatible with `subject`'s latest version?
    pub async fn check(&self, subject: &str, file: &SchemaFile) -> Result<Compatibility> {
        let path = format!(
            "compatibility/subjects/{}/versions/latest?verbose=true",
            percent_encode(subject)
        );
        let (status, v) = self.post(&path, &Self::body(file)?).await?;
        match (status, v.get("is_compatible").and_then(Value::as_bool)) {
            (404, _) => Ok(Compatibility::New),
            (200, Some(true)) => Ok(Compatibility::Compatible),
            (200, Some(false)) => Ok(Compatibility::Breaks(
                v.get("messages")
                    .and_then(Value::as_array)
                    .map(|m| {
                        m.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            )),
            _ => Err(setup(format!(
                "schema registry {}: checking {subject}: {status} {v}",
                self.shown
            ))),
        }
    }

    /// Registers `file` under `subject`; its schema id.
    pub async fn register(&self, subject: &str, file: &SchemaFile) -> Result<u32> {
        self.register_body(subject, &Self::body(file)?).await
    }

    /// Registers the schema `text` of `schema_type` under `subject` (the registry answers
    /// the existing id when it already holds it); its id.
    pub async fn register_text(&self, subject: &str, schema_type: &str, text: &str) -> Result<u32> {
        let body = json!({ "schemaType": schema_type, "schema": text });
        self.register_body(subject, &body).await
    }

    async fn register_body(&self, subject: &str, body: &Value) -> Result<u32> {
        let path = format!("subjects/{}/versions", percent_encode(subject));
        let (status, v) = self.post(&path, body).await?;
        match (status, v.get("id").and_then(Value::as_u64)) {
            (200, Some(id)) if u32::try_from(id).is_ok() => Ok(id as u32),
            _ => Err(setup(format!(
                "schema registry {}: registering {subject}: {status} {v}",
                self.shown
            ))),
        }
    }
}

/// `outboxd schemas check|register`: every file of `dir` (default `schemas.dir`), one line
/// each. `check` returns 1 when a file breaks its subject's compatibility, else 0.
pub async fn run(cfg: &Config, dir: Option<&Path>, register: bool) -> Result<u8> {
    let dir = match (dir, &cfg.schemas.dir) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(d)) => d.into(),
        (None, None) => {
            return Err(Error::setup(
                "no schema directory",
                "pass --dir or set schemas.dir",
            ))
        }
    };
    let registry = Registry::new(&cfg.schemas)?;
    let template = TopicTemplate::parse(&cfg.kafka.topic_template)
        .map_err(|p| Error::setup(format!("kafka.topic_template: {p}"), "correct the template"))?;
    let files = super::schema_files(&dir)?;
    // A file that does not compile must not reach the registry, nor pass the check.
    super::Contracts::load(&crate::config::SchemasConfig {
        dir: Some(dir.to_string_lossy().into_owned()),
        ..Default::default()
    })?;
    let mut broken = 0;
    for file in &files {
        let subject = subject(cfg.schemas.subject_strategy, &template, file);
        let shown = file.path.display();
        if register {
            let id = registry.register(&subject, file).await?;
            println!("registered {subject} ({shown}): id {id}");
            continue;
        }
        match registry.check(&subject, file).await? {
            Compatibility::Compatible => println!("compatible {subject} ({shown})"),
            Compatibility::New => println!("new {subject} ({shown}): nothing registered to break"),
            Compatibility::Breaks(why) => {
                broken += 1;
                let why = if why.is_empty() {
                    String::new()
                } else {
                    format!(": {}", why.join("; "))
                };
                println!(
                    "INCOMPATIBLE {subject} ({shown}) with its latest registered version{why}"
                );
            }
        }
    }
    if !register {
        println!("{} schemas checked, {broken} incompatible", files.len());
    }
    Ok(u8::from(broken > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_strategy() {
        let t = TopicTemplate::parse("shop.{aggregatetype}").unwrap_or_else(|_| unreachable!());
        let f = SchemaFile {
            aggregatetype: "order".into(),
            event_type: "Placed".into(),
            path: "/x".into(),
        };
        assert_eq!(
            subject(SubjectStrategy::TopicRecord, &t, &f),
            "shop.order-order.Placed"
        );
        assert_eq!(subject(SubjectStrategy::Topic, &t, &f), "shop.order-value");
        assert_eq!(subject(SubjectStrategy::Record, &t, &f), "order.Placed");
    }
}
