//! `[cdc]`: which tables' row changes the relay captures beside the outbox, and how their
//! change events look (see `crate::cdc`). Off (no table captured) unless `tables` is set.

use std::sync::Arc;

use serde::Deserialize;

use super::{invalid, ConfigError};
use crate::cdc::select::Glob;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCdc {
    tables: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    topic_prefix: Option<String>,
    topic_template: Option<String>,
    /// `schema.table` glob → template, overriding `topic_template` for those tables.
    topics: Option<std::collections::BTreeMap<String, String>>,
    column_exclude: Option<Vec<String>>,
    column_include: Option<Vec<String>>,
    skipped_operations: Option<Vec<String>>,
    tombstones_on_delete: Option<bool>,
    unavailable_value_placeholder: Option<String>,
    toast: Option<String>,
    schemas: Option<bool>,
    transaction_metadata: Option<bool>,
    decimal_handling_mode: Option<String>,
    time_precision_mode: Option<String>,
    binary_handling_mode: Option<String>,
    interval_handling_mode: Option<String>,
    hstore_handling_mode: Option<String>,
    snapshot: Option<super::snapshot::RawSnapshot>,
}

/// What an unchanged TOASTed value (not in the WAL) becomes in a change event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToastMode {
    /// Debezium's placeholder text (`unavailable_value_placeholder`).
    Placeholder,
    /// The column is left out of `after`; header `outboxd.unavailable` names it.
    Omit,
}

/// Debezium's `*.handling.mode` and `time.precision.mode` options, with its defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Modes {
    pub decimal: DecimalMode,
    pub time: TimeMode,
    pub binary: BinaryMode,
    pub interval: IntervalMode,
    pub hstore: HstoreMode,
}

/// `decimal.handling.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DecimalMode {
    #[default]
    Precise,
    Double,
    String,
}

/// `time.precision.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimeMode {
    #[default]
    Adaptive,
    AdaptiveTimeMicroseconds,
    Connect,
}

/// `binary.handling.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BinaryMode {
    #[default]
    Bytes,
    Base64,
    Base64UrlSafe,
    Hex,
}

/// `interval.handling.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IntervalMode {
    #[default]
    Numeric,
    String,
}

/// `hstore.handling.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HstoreMode {
    #[default]
    Json,
    Map,
}

fn mode<T: Copy>(
    key: &'static str,
    value: Option<String>,
    choices: &[(&str, T)],
    default: T,
) -> Result<T, ConfigError> {
    let Some(v) = value else { return Ok(default) };
    choices
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, m)| *m)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            invalid(key, format!("`{v}` is not one of {}", names.join(", ")))
        })
}

/// Which row operations are captured (Debezium's `skipped.operations`, inverted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operations {
    pub create: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
}

/// `[cdc]`, validated.
#[derive(Clone, Debug)]
pub struct CdcConfig {
    /// `schema.table` globs (`*`, `?`) of the tables to capture; empty: CDC off.
    pub tables: Vec<Glob>,
    pub exclude: Vec<Glob>,
    /// `topic.prefix` in Debezium's terms: `source.name`, and `{prefix}` in the template.
    pub topic_prefix: String,
    /// `{prefix}`, `{schema}`, `{table}`: the Kafka topic, NATS subject or AMQP routing key.
    pub topic_template: String,
    /// `[cdc.topics]`: per-table templates, most specific first (a literal name before
    /// globs, a longer glob before a shorter).
    pub topics: Vec<(Glob, String)>,
    /// `schema.table.column` globs.
    pub column_exclude: Vec<Glob>,
    pub column_include: Vec<Glob>,
    pub operations: Operations,
    pub tombstones_on_delete: bool,
    pub unavailable_value_placeholder: String,
    pub toast: ToastMode,
    /// Kafka Connect's `schemas.enable=true`: key and value as `{"schema":…,"payload":…}`.
    pub schemas: bool,
    /// Debezium's `provide.transaction.metadata`: BEGIN/END records on
    /// `<prefix>.transaction` and each event's `transaction` block.
    pub transaction_metadata: bool,
    pub modes: Modes,
    /// `[cdc.snapshot]`.
    pub snapshot: super::snapshot::SnapshotConfig,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            tables: Vec::new(),
            exclude: Vec::new(),
            topic_prefix: "outboxd".into(),
            topic_template: "{prefix}.{schema}.{table}".into(),
            topics: Vec::new(),
            column_exclude: Vec::new(),
            column_include: Vec::new(),
            operations: Operations {
                create: true,
                update: true,
                delete: true,
                // Debezium's default (`skipped.operations=t`).
                truncate: false,
            },
            tombstones_on_delete: true,
            unavailable_value_placeholder: "__debezium_unavailable_value".into(),
            toast: ToastMode::Placeholder,
            schemas: false,
            transaction_metadata: false,
            modes: Modes::default(),
            snapshot: super::snapshot::SnapshotConfig::default(),
        }
    }
}

impl CdcConfig {
    pub fn enabled(&self) -> bool {
        !self.tables.is_empty()
    }

    /// Whether `schema.table` is captured.
    pub fn captures(&self, schema: &str, table: &str) -> bool {
        let name = format!("{schema}.{table}");
        self.tables.iter().any(|g| g.matches(&name))
            && !self.exclude.iter().any(|g| g.matches(&name))
    }

    /// Whether column `column` of `schema.table` goes into the events.
    pub fn includes_column(&self, schema: &str, table: &str, column: &str) -> bool {
        let name = format!("{schema}.{table}.{column}");
        if !self.column_include.is_empty() && !self.column_include.iter().any(|g| g.matches(&name))
        {
            return false;
        }
        !self.column_exclude.iter().any(|g| g.matches(&name))
    }

    /// The topic (subject, routing key) of a table's events.
    pub fn topic(&self, schema: &str, table: &str) -> String {
        let name = format!("{schema}.{table}");
        let template = self
            .topics
            .iter()
            .find(|(g, _)| g.matches(&name))
            .map_or(&self.topic_template, |(_, t)| t);
        template
            .replace("{prefix}", &self.topic_prefix)
            .replace("{schema}", schema)
            .replace("{table}", table)
    }
}

fn globs(
    key: &'static str,
    list: Option<Vec<String>>,
    parts: usize,
) -> Result<Vec<Glob>, ConfigError> {
    list.unwrap_or_default()
        .into_iter()
        .map(|p| {
            if p.split('.').count() != parts || p.split('.').any(str::is_empty) {
                let shape = if parts == 2 {
                    "schema.table"
                } else {
                    "schema.table.column"
                };
                return Err(invalid(
                    key,
                    format!("`{p}` is not of the form {shape} (globs `*` and `?` allowed)"),
                ));
            }
            Ok(Glob::new(&p))
        })
        .collect()
}

fn check_template(key: &'static str, template: &str) -> Result<(), ConfigError> {
    let rest = template
        .replace("{prefix}", "")
        .replace("{schema}", "")
        .replace("{table}", "");
    if rest.contains(['{', '}']) || template.is_empty() {
        return Err(invalid(
            key,
            format!("`{template}`: only {{prefix}}, {{schema}} and {{table}} may be used"),
        ));
    }
    Ok(())
}

pub(super) fn load(raw: RawCdc) -> Result<Arc<CdcConfig>, ConfigError> {
    let d = CdcConfig::default();
    let tables = globs("cdc.tables", raw.tables, 2)?;
    let exclude = globs("cdc.exclude", raw.exclude, 2)?;
    let column_exclude = globs("cdc.column_exclude", raw.column_exclude, 3)?;
    let column_include = globs("cdc.column_include", raw.column_include, 3)?;
    if !column_exclude.is_empty() && !column_include.is_empty() {
        return Err(invalid(
            "cdc.column_include",
            "set either cdc.column_include or cdc.column_exclude, not both",
        ));
    }
    let topic_prefix = raw.topic_prefix.unwrap_or(d.topic_prefix);
    if topic_prefix.is_empty() {
        return Err(invalid("cdc.topic_prefix", "must not be empty"));
    }
    let topic_template = raw.topic_template.unwrap_or(d.topic_template);
    check_template("cdc.topic_template", &topic_template)?;
    let mut topics = Vec::new();
    for (pattern, template) in raw.topics.unwrap_or_default() {
        let glob = globs("cdc.topics", Some(vec![pattern]), 2)?.remove(0);
        check_template("cdc.topics", &template)?;
        topics.push((glob, template));
    }
    topics.sort_by_key(|(g, _)| (!g.is_literal(), std::cmp::Reverse(g.as_str().len())));
    let mut operations = Operations {
        create: true,
        update: true,
        delete: true,
        truncate: true,
    };
    for op in raw.skipped_operations.unwrap_or_else(|| vec!["t".into()]) {
        match op.as_str() {
            "c" => operations.create = false,
            "u" => operations.update = false,
            "d" => operations.delete = false,
            "t" => operations.truncate = false,
            "none" => {}
            other => {
                return Err(invalid(
                    "cdc.skipped_operations",
                    format!("`{other}` is not one of c, u, d, t, none"),
                ))
            }
        }
    }
    let toast = match raw.toast.as_deref() {
        None | Some("placeholder") => ToastMode::Placeholder,
        Some("omit") => ToastMode::Omit,
        Some(other) => {
            return Err(invalid(
                "cdc.toast",
                format!("`{other}` is not `placeholder` or `omit`"),
            ))
        }
    };
    let modes = Modes {
        decimal: mode(
            "cdc.decimal_handling_mode",
            raw.decimal_handling_mode,
            &[
                ("precise", DecimalMode::Precise),
                ("double", DecimalMode::Double),
                ("string", DecimalMode::String),
            ],
            DecimalMode::Precise,
        )?,
        time: mode(
            "cdc.time_precision_mode",
            raw.time_precision_mode,
            &[
                ("adaptive", TimeMode::Adaptive),
                (
                    "adaptive_time_microseconds",
                    TimeMode::AdaptiveTimeMicroseconds,
                ),
                ("connect", TimeMode::Connect),
            ],
            TimeMode::Adaptive,
        )?,
        binary: mode(
            "cdc.binary_handling_mode",
            raw.binary_handling_mode,
            &[
                ("bytes", BinaryMode::Bytes),
                ("base64", BinaryMode::Base64),
                ("base64-url-safe", BinaryMode::Base64UrlSafe),
                ("hex", BinaryMode::Hex),
            ],
            BinaryMode::Bytes,
        )?,
        interval: mode(
            "cdc.interval_handling_mode",
            raw.interval_handling_mode,
            &[
                ("numeric", IntervalMode::Numeric),
                ("string", IntervalMode::String),
            ],
            IntervalMode::Numeric,
        )?,
        hstore: mode(
            "cdc.hstore_handling_mode",
            raw.hstore_handling_mode,
            &[("json", HstoreMode::Json), ("map", HstoreMode::Map)],
            HstoreMode::Json,
        )?,
    };
    Ok(Arc::new(CdcConfig {
        tables,
        exclude,
        topic_prefix,
        topic_template,
        topics,
        column_exclude,
        column_include,
        operations,
        tombstones_on_delete: raw.tombstones_on_delete.unwrap_or(d.tombstones_on_delete),
        unavailable_value_placeholder: raw
            .unavailable_value_placeholder
            .unwrap_or(d.unavailable_value_placeholder),
        toast,
        schemas: raw.schemas.unwrap_or(false),
        transaction_metadata: raw.transaction_metadata.unwrap_or(false),
        modes,
        snapshot: super::snapshot::load(raw.snapshot)?,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn per_table_topics_override_the_template_most_specific_first() {
        let raw: RawCdc = toml::from_str(
            r#"
            tables = ["public.*", "sales.*"]
            topic_prefix = "shop"
            [topics]
            "public.*" = "{prefix}.pub.{table}"
            "public.orders" = "orders-cdc"
            "public.order*" = "{table}-by-glob"
            "#,
        )
        .unwrap();
        let cfg = load(raw).unwrap();
        assert_eq!(cfg.topic("public", "orders"), "orders-cdc");
        assert_eq!(cfg.topic("public", "order_lines"), "order_lines-by-glob");
        assert_eq!(cfg.topic("public", "users"), "shop.pub.users");
        assert_eq!(cfg.topic("sales", "leads"), "shop.sales.leads");
        let bad: RawCdc = toml::from_str("[topics]\n\"public.t\" = \"{type}\"\n").unwrap();
        assert!(load(bad).unwrap_err().to_string().contains("cdc.topics"));
    }
}
