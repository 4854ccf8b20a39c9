//! The change event's JSON: Debezium's envelope (`before`, `after`, `source`, `transaction`,
//! `op`, `ts_ms`/`ts_us`/`ts_ns`) in the field order and number formatting of Debezium's
//! JSON converter without schemas, so a consumer written for Debezium reads it unchanged.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use super::value::string;

/// `source.version`: says which program wrote the event (Debezium writes its own version).
pub const SOURCE_VERSION: &str = concat!("outboxd-", env!("CARGO_PKG_VERSION"));

/// The `source` block's schema (Debezium 3.6's `io.debezium.connector.postgresql.Source`).
const SOURCE_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"version"},{"type":"string","optional":false,"field":"connector"},{"type":"string","optional":false,"field":"name"},{"type":"int64","optional":false,"field":"ts_ms"},{"type":"string","optional":true,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"},"default":"false","field":"snapshot"},{"type":"string","optional":false,"field":"db"},{"type":"string","optional":true,"field":"sequence"},{"type":"int64","optional":true,"field":"ts_us"},{"type":"int64","optional":true,"field":"ts_ns"},{"type":"string","optional":false,"field":"schema"},{"type":"string","optional":false,"field":"table"},{"type":"int64","optional":true,"field":"txId"},{"type":"int64","optional":true,"field":"lsn"},{"type":"int64","optional":true,"field":"xmin"},{"type":"string","optional":true,"field":"origin"},{"type":"int64","optional":true,"field":"origin_lsn"}],"optional":false,"name":"io.debezium.connector.postgresql.Source","version":1,"field":"source"}"#;

/// The `transaction` block's schema, and the fields after it.
const TAIL_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":false,"field":"total_order"},{"type":"int64","optional":false,"field":"data_collection_order"}],"optional":true,"name":"event.block","version":1,"field":"transaction"},{"type":"string","optional":false,"field":"op"},{"type":"int64","optional":true,"field":"ts_ms"},{"type":"int64","optional":true,"field":"ts_us"},{"type":"int64","optional":true,"field":"ts_ns"}"#;

/// The whole value schema (`schemas.enable=true`) of a table whose row schema (its
/// `fields` array) is `fields`; `name` is `<prefix>.<schema>.<table>`.
pub fn value_schema(name: &str, fields: &str) -> String {
    let row = |field: &str| {
        format!(
            r#"{{"type":"struct","fields":{fields},"optional":true,"name":"{name}.Value","field":"{field}"}}"#
        )
    };
    format!(
        r#"{{"type":"struct","fields":[{},{},{SOURCE_SCHEMA},{TAIL_SCHEMA}],"optional":false,"name":"{name}.Envelope","version":2}}"#,
        row("before"),
        row("after")
    )
}

/// The key schema: the key columns' `fields`.
pub fn key_schema(name: &str, fields: &str) -> String {
    format!(r#"{{"type":"struct","fields":{fields},"optional":false,"name":"{name}.Key"}}"#)
}

/// `{"schema":…,"payload":…}`: Kafka Connect's JSON converter with `schemas.enable=true`.
pub fn with_schema(schema: &str, payload: &str) -> String {
    let mut out = String::with_capacity(schema.len() + payload.len() + 24);
    out.push_str("{\"schema\":");
    out.push_str(schema);
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push('}');
    out
}

/// Where a change came from: the `source` block.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    /// `topic.prefix` (`source.name`).
    pub name: &'a str,
    pub db: &'a str,
    pub schema: &'a str,
    pub table: &'a str,
    pub commit_time: SystemTime,
    pub xid: u32,
    /// The change's WAL position.
    pub lsn: u64,
    /// End of the last commit decoded before this transaction (`None` before the first of
    /// the session): the first half of `source.sequence`.
    pub last_commit: Option<u64>,
    /// `cdc.transaction_metadata`: the event's place in its transaction (total order, order
    /// within its table).
    pub order: Option<(u64, u64)>,
    /// `source.snapshot`: `false` for a streamed change; a snapshot row's place
    /// (`incremental`, `true`, `first_in_data_collection`, …).
    pub snapshot: &'a str,
}

/// Debezium's `op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    Truncate,
    /// A row read by a snapshot.
    Read,
}

impl Op {
    pub fn letter(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn times(out: &mut String, us: i64, ns: Option<i64>) {
    let _ = write!(
        out,
        "\"ts_ms\":{},\"ts_us\":{us},\"ts_ns\":{}",
        us.div_euclid(1000),
        ns.unwrap_or(us * 1000)
    );
}

/// The whole value. `before` and `after` are the JSON objects of the rows (already
/// written), or `None` for `null`.
pub fn write(before: Option<&str>, after: Option<&str>, source: &Source<'_>, op: Op) -> String {
    let mut out =
        String::with_capacity(before.map_or(4, str::len) + after.map_or(4, str::len) + 512);
    out.push_str("{\"before\":");
    out.push_str(before.unwrap_or("null"));
    out.push_str(",\"after\":");
    out.push_str(after.unwrap_or("null"));
    out.push_str(",\"source\":{\"version\":");
    string(&mut out, SOURCE_VERSION);
    out.push_str(",\"connector\":\"postgresql\",\"name\":");
    string(&mut out, source.name);
    let commit_us = micros(source.commit_time);
    let _ = write!(out, ",\"ts_ms\":{}", commit_us.div_euclid(1000));
    out.push_str(",\"snapshot\":");
    string(&mut out, source.snapshot);
    out.push_str(",\"db\":");
    string(&mut out, source.db);
    // `["<last commit>","<lsn>"]` as a JSON string (its quotes escaped).
    out.push_str(",\"sequence\":\"[");
    match source.last_commit {
        Some(c) => {
            let _ = write!(out, "\\\"{c}\\\"");
        }
        None => out.push_str("null"),
    }
    let _ = write!(out, ",\\\"{}\\\"]\"", source.lsn);
    let _ = write!(out, ",\"ts_us\":{commit_us},\"ts_ns\":{}", commit_us * 1000);
    out.push_str(",\"schema\":");
    string(&mut out, source.schema);
    out.push_str(",\"table\":");
    string(&mut out, source.table);
    let _ = write!(
        out,
        ",\"txId\":{},\"lsn\":{},\"xmin\":null,\"origin\":null,\"origin_lsn\":null}},\"transaction\":",
        source.xid, source.lsn,
    );
    match source.order {
        // Debezium names the transaction by its xid and the event's own LSN here.
        Some((total, table)) => {
            let _ = write!(
                out,
                "{{\"id\":\"{}:{}\",\"total_order\":{total},\"data_collection_order\":{table}}}",
                source.xid, source.lsn
            );
        }
        None => out.push_str("null"),
    }
    let _ = write!(out, ",\"op\":\"{}\",", op.letter());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    times(&mut out, now / 1000, Some(now));
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_envelope_has_debeziums_fields_in_debeziums_order() {
        let source = Source {
            name: "dbz",
            db: "shop",
            schema: "public",
            table: "t",
            commit_time: UNIX_EPOCH + Duration::from_micros(1_796_163_121_790_849),
            xid: 736,
            lsn: 26_675_312,
            last_commit: None,
            order: None,
            snapshot: "false",
        };
        let v = write(None, Some(r#"{"id":1}"#), &source, Op::Create);
        let expected = r#"{"before":null,"after":{"id":1},"source":{"version":"outboxd-"#;
        assert!(v.starts_with(expected), "{v}");
        let rest = r#"","connector":"postgresql","name":"dbz","ts_ms":1796163121790,"snapshot":"false","db":"shop","sequence":"[null,\"26675312\"]","ts_us":1796163121790849,"ts_ns":1796163121790849000,"schema":"public","table":"t","txId":736,"lsn":26675312,"xmin":null,"origin":null,"origin_lsn":null},"transaction":null,"op":"c","ts_ms":"#;
        assert!(v.contains(rest), "{v}");
        let parsed: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert!(parsed["ts_ns"].as_i64().unwrap() > 1_796_163_121_790_849_000);
    }
}
