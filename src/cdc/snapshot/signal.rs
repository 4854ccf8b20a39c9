//! Signals: what starts, pauses, resumes and stops a snapshot. They come through the stream,
//! in commit order with the changes: an insert into Debezium's signal table
//! (`cdc.snapshot.signal_table`, columns `id`, `type`, `data` by position, as Debezium reads
//! them) — so a Debezium user's runbooks keep working unchanged — or a transactional logical
//! message `outboxd.signal` with the same three fields as JSON, which `outboxd snapshot`
//! writes and which needs no table.
//!
//! The payloads are Debezium's:
//!
//! ```text
//! execute-snapshot {"data-collections": ["public.orders"], "type": "incremental",
//!                   "additional-conditions": [{"data-collection": "public.orders",
//!                                              "filter": "status = 'open'"}]}
//! stop-snapshot    {"data-collections": ["public.orders"], "type": "incremental"}
//! pause-snapshot   (no data)
//! resume-snapshot  (no data)
//! ```
//!
//! `data-collections` entries are `schema.table` names or globs (Debezium reads them as
//! regular expressions; a plain name means the same in both). Debezium's older
//! `additional-condition` (one filter for every table) is accepted too. A signal outboxd
//! cannot act on is logged as an error and counted — it costs no event.

use serde::Deserialize;

/// Prefix of the logical messages `outboxd snapshot` writes.
pub const SIGNAL_PREFIX: &str = "outboxd.signal";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// Snapshot these tables (patterns), each with its filter if any.
    Execute {
        id: String,
        tables: Vec<(String, Option<String>)>,
    },
    /// Stop the snapshots of these tables (patterns); empty: every one.
    Stop {
        id: String,
        tables: Vec<String>,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "data-collections", default)]
    data_collections: Vec<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(rename = "additional-conditions", default)]
    additional_conditions: Vec<Condition>,
    #[serde(rename = "additional-condition")]
    additional_condition: Option<String>,
}

#[derive(Deserialize)]
struct Condition {
    #[serde(rename = "data-collection")]
    data_collection: String,
    filter: String,
}

/// The message `outboxd snapshot` writes: the signal table's three columns.
#[derive(Deserialize, serde::Serialize)]
pub struct Message {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Option<serde_json::Value>,
}

impl Signal {
    pub fn id(&self) -> &str {
        match self {
            Signal::Execute { id, .. }
            | Signal::Stop { id, .. }
            | Signal::Pause { id }
            | Signal::Resume { id } => id,
        }
    }
}

/// A signal from its three fields (the signal table's columns).
pub fn parse(id: &str, kind: &str, data: Option<&str>) -> Result<Signal, String> {
    let data = || -> Result<Data, String> {
        let text = data.filter(|d| !d.trim().is_empty()).unwrap_or("{}");
        serde_json::from_str(text)
            .map_err(|e| format!("`data` is not the JSON Debezium reads: {e}"))
    };
    let incremental = |d: &Data| match d.kind.as_deref() {
        None | Some("incremental") | Some("INCREMENTAL") => Ok(()),
        // A blocking snapshot stops streaming until it is done; outboxd's snapshots never
        // stop streaming, and give the same rows.
        Some("blocking") | Some("BLOCKING") => Ok(()),
        Some(other) => Err(format!(
            "snapshot type `{other}` is not `incremental` or `blocking`"
        )),
    };
    let id = id.to_string();
    match kind {
        "execute-snapshot" => {
            let d = data()?;
            incremental(&d)?;
            if d.data_collections.is_empty() {
                return Err("execute-snapshot names no `data-collections`".into());
            }
            let tables = d
                .data_collections
                .iter()
                .map(|t| {
                    let filter = d
                        .additional_conditions
                        .iter()
                        .find(|c| &c.data_collection == t)
                        .map(|c| c.filter.clone())
                        .or_else(|| d.additional_condition.clone());
                    (t.clone(), filter)
                })
                .collect();
            Ok(Signal::Execute { id, tables })
        }
        "stop-snapshot" => {
            let d = data()?;
            incremental(&d)?;
            Ok(Signal::Stop {
                id,
                tables: d.data_collections,
            })
        }
        "pause-snapshot" => Ok(Signal::Pause { id }),
        "resume-snapshot" => Ok(Signal::Resume { id }),
        other => Err(format!(
            "signal type `{other}` is not one outboxd acts on (execute-snapshot, stop-snapshot, pause-snapshot, resume-snapshot)"
        )),
    }
}

/// A signal from an `outboxd.signal` message.
pub fn parse_message(content: &[u8]) -> Result<Signal, String> {
    let m: Message = serde_json::from_slice(content)
        .map_err(|e| format!("an `outboxd.signal` message is not {{id, type, data}}: {e}"))?;
    let data = m.data.map(|d| d.to_string());
    parse(&m.id, &m.kind, data.as_deref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // The payloads as Debezium's documentation writes them.
    #[test]
    fn debeziums_documented_payloads_parse_to_what_they_ask() {
        let s = parse(
            "ad-hoc-1",
            "execute-snapshot",
            Some(r#"{"data-collections": ["schema1.table1", "schema1.table2"], "type":"incremental"}"#),
        )
        .unwrap();
        assert_eq!(
            s,
            Signal::Execute {
                id: "ad-hoc-1".into(),
                tables: vec![
                    ("schema1.table1".into(), None),
                    ("schema1.table2".into(), None)
                ]
            }
        );
        let s = parse(
            "ad-hoc-1",
            "execute-snapshot",
            Some(r#"{"data-collections": ["schema1.products"],"type":"incremental", "additional-conditions":[{"data-collection": "schema1.products", "filter": "color='blue'"}]}"#),
        )
        .unwrap();
        assert_eq!(
            s,
            Signal::Execute {
                id: "ad-hoc-1".into(),
                tables: vec![("schema1.products".into(), Some("color='blue'".into()))]
            }
        );
        let s = parse(
            "ad-hoc-1",
            "stop-snapshot",
            Some(r#"{"data-collections": ["schema1.table1", "schema1.table2"],"type":"incremental"}"#),
        )
        .unwrap();
        assert!(matches!(s, Signal::Stop { tables, .. } if tables.len() == 2));
        assert_eq!(
            parse("ad-hoc-1", "pause-snapshot", None).unwrap(),
            Signal::Pause {
                id: "ad-hoc-1".into()
            }
        );
        assert_eq!(
            parse("ad-hoc-1", "resume-snapshot", None).unwrap(),
            Signal::Resume {
                id: "ad-hoc-1".into()
            }
        );
        assert!(parse("x", "execute-snapshot", Some("{}")).is_err());
        assert!(parse("x", "log", None).is_err());
        let m = parse_message(
            br#"{"id":"cli-1","type":"execute-snapshot","data":{"data-collections":["public.t"]}}"#,
        )
        .unwrap();
        assert!(matches!(m, Signal::Execute { id, .. } if id == "cli-1"));
    }
}
