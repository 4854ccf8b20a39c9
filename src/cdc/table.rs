//! One captured table: its columns as the Relation in force describes them, and the change
//! events its inserts, updates, deletes and truncates become.
//!
//! * The key is the primary key (or, without one, the replica identity index) as a JSON
//!   object, as Debezium's; a table with neither has no key.
//! * `before` follows the replica identity: DEFAULT and USING INDEX carry the old key only
//!   (the other columns `null`, as Debezium writes them) on a delete or a key change; FULL
//!   carries the whole old row.
//! * An update that changes the key is a delete of the old key (and its tombstone) and a
//!   create of the new one, so a compacted topic keeps no row under the old key.
//! * An unchanged TOASTed value is not in the WAL: it is taken from the old row when
//!   REPLICA IDENTITY FULL sent one, otherwise it becomes the configured placeholder, or it
//!   is left out and named in header `outboxd.unavailable` — never a silent `null`.

use std::collections::HashMap;
use std::time::SystemTime;

use super::envelope::{self, Op, Source};
use super::transaction::TxnOrder;
use super::types::{self, ColType, Fragment, TypeInfo};
use super::value;
use crate::config::{CdcConfig, ToastMode};
use crate::event::{Event, EventExtra};
use crate::source::pgoutput::{Column, OldTuple, Relation};

/// What the catalog says of a captured table when its Relation message arrives.
#[derive(Debug, Clone, Default)]
pub struct TableCatalog {
    /// `current_database()`: `source.db`.
    pub db: String,
    /// The primary key's columns in index order; else the replica identity index's; else
    /// empty.
    pub key_columns: Vec<String>,
    /// Every type the columns use (domains' base types and arrays' elements included).
    pub types: HashMap<u32, TypeInfo>,
    /// Columns declared NOT NULL (`"optional":false` in the schema).
    pub not_null: Vec<String>,
}

#[derive(Debug, Clone)]
struct Col {
    name: String,
    ty: ColType,
    included: bool,
    schema: Fragment,
    optional: bool,
}

/// `schemas.enable=true`: the value and key schemas, fixed for the Relation in force.
#[derive(Debug, Clone)]
struct Schemas {
    value: String,
    key: String,
}

/// A captured relation, resolved.
#[derive(Debug, Clone)]
pub struct CapturedTable {
    pub schema: String,
    pub table: String,
    /// `schema.table`.
    name: String,
    /// `outboxd_cdc_changes_total{table}`.
    pub changes: metrics::Counter,
    topic: String,
    db: String,
    columns: Vec<Col>,
    /// Positions of the key columns in the tuple, in key order.
    key: Vec<usize>,
    /// Debezium's `topic.prefix` (`source.name`).
    prefix: String,
    schemas: Option<Schemas>,
}

/// The transaction a change belongs to.
#[derive(Debug, Clone, Copy)]
pub struct TxnContext {
    pub commit_time: SystemTime,
    pub xid: u32,
    /// The change's WAL position.
    pub lsn: u64,
    pub last_commit: Option<u64>,
    /// `source.snapshot`: `"false"` for a streamed change.
    pub snapshot: &'static str,
}

/// An event, or a change that cannot become one: (event id, reason, the row's raw text).
pub type Outcome = Result<Event, (String, String, Vec<u8>)>;

/// A row as JSON, and the columns left out because their value was not in the WAL.
struct RowJson {
    json: String,
    unavailable: Vec<String>,
}

impl CapturedTable {
    pub fn new(rel: &Relation, catalog: &TableCatalog, cfg: &CdcConfig) -> CapturedTable {
        let lookup = |oid: u32| catalog.types.get(&oid).cloned();
        let columns = rel
            .columns
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let resolved = types::resolve(
                    rel.types.get(i).copied().unwrap_or(0),
                    rel.typmods.get(i).copied().unwrap_or(-1),
                    &lookup,
                    &cfg.modes,
                );
                Col {
                    name: name.clone(),
                    ty: resolved.ty,
                    included: cfg.includes_column(&rel.namespace, &rel.name, name),
                    schema: resolved.schema,
                    optional: !catalog.not_null.contains(name),
                }
            })
            .collect::<Vec<_>>();
        let key: Vec<usize> = catalog
            .key_columns
            .iter()
            .filter_map(|k| rel.columns.iter().position(|c| c == k))
            .collect();
        let schemas = cfg.schemas.then(|| {
            let fields = |cols: &mut dyn Iterator<Item = &Col>| {
                let mut out = String::from("[");
                for (n, c) in cols.enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    c.schema.write(&mut out, c.optional, Some(&c.name));
                }
                out.push(']');
                out
            };
            let name = format!("{}.{}.{}", cfg.topic_prefix, rel.namespace, rel.name);
            Schemas {
                value: envelope::value_schema(
                    &name,
                    &fields(&mut columns.iter().filter(|c| c.included)),
                ),
                key: envelope::key_schema(&name, &fields(&mut key.iter().map(|&i| &columns[i]))),
            }
        });
        let name = format!("{}.{}", rel.namespace, rel.name);
        CapturedTable {
            schema: rel.namespace.clone(),
            table: rel.name.clone(),
            changes: metrics::counter!(crate::metrics::CDC_CHANGES, "table" => name.clone()),
            name,
            topic: cfg.topic(&rel.namespace, &rel.name),
            db: catalog.db.clone(),
            columns,
            key,
            prefix: cfg.topic_prefix.clone(),
            schemas,
        }
    }

    /// `schema.table`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn has_key(&self) -> bool {
        !self.key.is_empty()
    }

    /// The events of an insert.
    pub fn insert(
        &self,
        cfg: &CdcConfig,
        txn: &TxnContext,
        order: &mut Option<TxnOrder>,
        new: &[Column],
    ) -> Vec<Outcome> {
        vec![self.event(cfg, txn, order, Op::Create, None, Some((new, None)))]
    }

    /// The events of an update (a delete and a create when the key changed).
    pub fn update(
        &self,
        cfg: &CdcConfig,
        txn: &TxnContext,
        order: &mut Option<TxnOrder>,
        old: Option<&OldTuple>,
        new: &[Column],
    ) -> Vec<Outcome> {
        let full_old = old.filter(|o| o.full).map(|o| o.tuple.as_slice());
        if let Some(old) = old {
            let key_changed = self
                .key
                .iter()
                .any(|&i| old.tuple.get(i) != new.get(i) && new.get(i) != Some(&Column::Unchanged));
            if key_changed {
                let mut out = self.delete(cfg, txn, order, old);
                if cfg.operations.create {
                    out.push(self.event(cfg, txn, order, Op::Create, None, Some((new, full_old))));
                }
                return out;
            }
        }
        let before = old.map(|o| o.tuple.as_slice());
        vec![self.event(cfg, txn, order, Op::Update, before, Some((new, full_old)))]
    }

    /// The events of a delete: the delete, then its tombstone (unless turned off).
    pub fn delete(
        &self,
        cfg: &CdcConfig,
        txn: &TxnContext,
        order: &mut Option<TxnOrder>,
        old: &OldTuple,
    ) -> Vec<Outcome> {
        let mut out = vec![self.event(cfg, txn, order, Op::Delete, Some(&old.tuple), None)];
        if cfg.tombstones_on_delete {
            if let Some(Ok(delete)) = out.first() {
                let mut tombstone = delete.clone();
                tombstone.id = self.event_id(txn, "x");
                tombstone.event_type = "tombstone".into();
                tombstone.payload = None;
                out.push(Ok(tombstone));
            }
        }
        out
    }

    pub fn truncate(
        &self,
        cfg: &CdcConfig,
        txn: &TxnContext,
        order: &mut Option<TxnOrder>,
    ) -> Vec<Outcome> {
        vec![self.event(cfg, txn, order, Op::Truncate, None, None)]
    }

    /// A row a snapshot read (`op = "r"`) in the chunk whose low watermark is at `lsn`;
    /// `ordinal` is its place among the chunk's rows (the dedup id's last part).
    pub fn read(
        &self,
        cfg: &CdcConfig,
        row: &[Column],
        lsn: u64,
        ordinal: usize,
        place: &'static str,
    ) -> Outcome {
        let txn = TxnContext {
            commit_time: SystemTime::now(),
            xid: 0,
            lsn,
            last_commit: None,
            snapshot: place,
        };
        let id = format!("{}/{lsn}/r/{ordinal}", self.name);
        match self.event(cfg, &txn, &mut None, Op::Read, None, Some((row, None))) {
            Ok(mut e) => {
                e.id = id;
                Ok(e)
            }
            Err((_, reason, raw)) => Err((id, reason, raw)),
        }
    }

    /// A row's key and `after` JSON as its events carry them (`outboxd verify --table`).
    pub fn key_and_after(
        &self,
        cfg: &CdcConfig,
        row: &[Column],
    ) -> Result<(String, String), String> {
        Ok((self.key_json(row)?, self.row(cfg, row, None)?.json))
    }

    /// The text of the key columns of `tuple`, in key order (snapshot windows compare them).
    pub fn key_of(&self, tuple: &[Column]) -> Vec<Vec<u8>> {
        self.key
            .iter()
            .map(|&i| match tuple.get(i) {
                Some(Column::Text(t)) => t.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The key columns' names, in key order.
    pub fn key_columns(&self) -> Vec<&str> {
        self.key
            .iter()
            .map(|&i| self.columns[i].name.as_str())
            .collect()
    }

    fn event_id(&self, txn: &TxnContext, op: &str) -> String {
        format!("{}/{}/{op}", self.name, txn.lsn)
    }

    /// One event. `after` is the new tuple and the old row to fill unchanged TOASTed values
    /// from (REPLICA IDENTITY FULL).
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        cfg: &CdcConfig,
        txn: &TxnContext,
        order: &mut Option<TxnOrder>,
        op: Op,
        before: Option<&[Column]>,
        after: Option<(&[Column], Option<&[Column]>)>,
    ) -> Outcome {
        let id = self.event_id(txn, op.letter());
        let raw = || raw_row(&self.columns, after.map(|a| a.0).or(before));
        let fail = |reason: String| Err((id.clone(), reason, raw()));
        let before_json = match before.map(|b| self.row(cfg, b, None)) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => return fail(e),
        };
        let after_json = match after.map(|(n, fill)| self.row(cfg, n, fill)) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => return fail(e),
        };
        let key_source = after.map(|a| a.0).or(before);
        let key = match (op, key_source) {
            (Op::Truncate, _) | (_, None) => None,
            (_, Some(t)) if self.has_key() => match self.key_json(t) {
                Ok(k) => Some(k),
                Err(e) => return fail(e),
            },
            _ => None,
        };
        let source = Source {
            name: &self.prefix,
            db: &self.db,
            schema: &self.schema,
            table: &self.table,
            commit_time: txn.commit_time,
            xid: txn.xid,
            lsn: txn.lsn,
            last_commit: txn.last_commit,
            order: order.as_mut().map(|o| o.next(&self.name)),
            snapshot: txn.snapshot,
        };
        let mut payload = envelope::write(
            before_json.as_ref().map(|r| r.json.as_str()),
            after_json.as_ref().map(|r| r.json.as_str()),
            &source,
            op,
        );
        let mut key = key;
        if let Some(s) = &self.schemas {
            payload = envelope::with_schema(&s.value, &payload);
            key = key.map(|k| envelope::with_schema(&s.key, &k));
        }
        let mut headers = Vec::new();
        if let Some(a) = &after_json {
            if !a.unavailable.is_empty() {
                headers.push(("outboxd.unavailable".to_string(), a.unavailable.join(",")));
            }
        }
        Ok(Event {
            id,
            aggregatetype: self.name.clone(),
            aggregateid: key,
            event_type: match op {
                Op::Create => "create",
                Op::Update => "update",
                Op::Delete => "delete",
                Op::Truncate => "truncate",
                Op::Read => "read",
            }
            .into(),
            payload: Some(payload.into_bytes()),
            headers: None,
            commit_time: txn.commit_time,
            extra: EventExtra {
                topic: Some(self.topic.clone()),
                headers,
                change: true,
                ..EventExtra::default()
            },
        })
    }

    fn key_json(&self, tuple: &[Column]) -> Result<String, String> {
        let mut out = String::with_capacity(64);
        out.push('{');
        for (n, &i) in self.key.iter().enumerate() {
            let col = &self.columns[i];
            if n > 0 {
                out.push(',');
            }
            value::string(&mut out, &col.name);
            out.push(':');
            match tuple.get(i) {
                Some(Column::Text(t)) => write_value(&mut out, col, t)?,
                _ => out.push_str("null"),
            }
        }
        out.push('}');
        Ok(out)
    }

    /// About how long the JSON object of `tuple` is (names, quotes, values that grow by a
    /// quarter), so that it is written into one allocation instead of regrowing ~8 times.
    fn json_size(&self, tuple: &[Column]) -> usize {
        let values: usize = tuple
            .iter()
            .map(|c| match c {
                Column::Text(t) => t.len(),
                _ => 4,
            })
            .sum();
        let names: usize = self.columns.iter().map(|c| c.name.len() + 4).sum();
        names + values + values / 4 + 16
    }

    fn row(
        &self,
        cfg: &CdcConfig,
        tuple: &[Column],
        fill: Option<&[Column]>,
    ) -> Result<RowJson, String> {
        let mut out = String::with_capacity(self.json_size(tuple));
        out.push('{');
        let mut unavailable = Vec::new();
        let mut first = true;
        for (i, col) in self.columns.iter().enumerate() {
            if !col.included {
                continue;
            }
            let value = match tuple.get(i) {
                Some(Column::Unchanged) => match fill.and_then(|f| f.get(i)) {
                    Some(c @ (Column::Text(_) | Column::Null)) => Some(c),
                    _ if cfg.toast == ToastMode::Omit => {
                        unavailable.push(col.name.clone());
                        continue;
                    }
                    _ => None,
                },
                other => other,
            };
            if !first {
                out.push(',');
            }
            first = false;
            value::string(&mut out, &col.name);
            out.push(':');
            match value {
                Some(Column::Text(t)) => write_value(&mut out, col, t)?,
                Some(Column::Null | Column::Unchanged) => out.push_str("null"),
                // Unchanged TOAST, no old row: the placeholder.
                None => placeholder(&mut out, &col.ty, &cfg.unavailable_value_placeholder),
            }
        }
        out.push('}');
        Ok(RowJson {
            json: out,
            unavailable,
        })
    }
}

fn write_value(out: &mut String, col: &Col, text: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(text)
        .map_err(|_| format!("column `{}`: value is not UTF-8", col.name))?;
    value::write(out, &col.ty, text).map_err(|e| format!("column `{}`: {e}", col.name))
}

/// Debezium's placeholder for a value that is not in the WAL, in the column's JSON shape
/// where it has one (bytes: base64 of the text; arrays: a one-element array).
fn placeholder(out: &mut String, ty: &ColType, text: &str) {
    match ty {
        ColType::Bytes(mode) => value::string(out, &value::encode_binary(*mode, text.as_bytes())),
        ColType::Array(element) => {
            out.push('[');
            placeholder(out, element, text);
            out.push(']');
        }
        _ => value::string(out, text),
    }
}

/// The row's raw text as a JSON object of strings, for the dead-letter record of a change
/// that could not be mapped.
fn raw_row(columns: &[Col], tuple: Option<&[Column]>) -> Vec<u8> {
    let mut out = String::from("{");
    for (i, (col, v)) in columns.iter().zip(tuple.unwrap_or_default()).enumerate() {
        if !col.included {
            continue;
        }
        if i > 0 && out.len() > 1 {
            out.push(',');
        }
        value::string(&mut out, &col.name);
        out.push(':');
        match v {
            Column::Text(t) => value::string(&mut out, &String::from_utf8_lossy(t)),
            Column::Null => out.push_str("null"),
            Column::Unchanged => out.push_str("\"(unchanged TOAST)\""),
        }
    }
    out.push('}');
    out.into_bytes()
}
