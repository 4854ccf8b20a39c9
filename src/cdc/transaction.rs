//! `cdc.transaction_metadata`: Debezium's transaction metadata — a BEGIN record before a
//! transaction's first change event and an END record after its last, on
//! `<prefix>.transaction`, and each change event's `transaction` block (its total order and
//! its order within its table). Transactions with no captured change have none, as in
//! Debezium. Tombstones are not counted.
//!
//! Debezium names a transaction `<xid>:<lsn>`, with a different LSN in each place: the first
//! change's in BEGIN, the commit's end in END, each event's own in its block. outboxd writes
//! the same, so a consumer that joins them as Debezium's do keeps working.

use std::time::SystemTime;

use super::table::Outcome;
use super::value;
use crate::config::CdcConfig;
use crate::event::{Event, EventExtra};

const KEY_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"}],"optional":false,"name":"io.debezium.connector.common.TransactionMetadataKey","version":1}"#;
const VALUE_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"string","optional":false,"field":"status"},{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":true,"field":"event_count"},{"type":"array","items":{"type":"struct","fields":[{"type":"string","optional":false,"field":"data_collection"},{"type":"int64","optional":false,"field":"event_count"}],"optional":true,"name":"event.collection","version":1},"optional":true,"field":"data_collections"},{"type":"int64","optional":false,"field":"ts_ms"}],"optional":false,"name":"io.debezium.connector.common.TransactionMetadataValue","version":1}"#;

/// The current transaction's counts.
#[derive(Debug, Clone, Default)]
pub struct TxnOrder {
    total: u64,
    /// Per table (`schema.table`), in order of first appearance.
    tables: Vec<(String, u64)>,
}

impl TxnOrder {
    /// Counts one more event of `table`: (total order, order within the table), 1-based.
    pub fn next(&mut self, table: &str) -> (u64, u64) {
        self.total += 1;
        let n = match self.tables.iter_mut().find(|(t, _)| t == table) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.tables.push((table.to_string(), 1));
                1
            }
        };
        (self.total, n)
    }
}

fn record(
    cfg: &CdcConfig,
    status: &str,
    id: &str,
    body: String,
    commit_time: SystemTime,
) -> Outcome {
    let mut key = String::from("{\"id\":");
    value::string(&mut key, id);
    key.push('}');
    let ms = commit_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut payload = format!("{{\"status\":\"{status}\",\"id\":");
    value::string(&mut payload, id);
    payload.push_str(&body);
    payload.push_str(&format!(",\"ts_ms\":{ms}}}"));
    if cfg.schemas {
        key = super::envelope::with_schema(KEY_SCHEMA, &key);
        payload = super::envelope::with_schema(VALUE_SCHEMA, &payload);
    }
    Ok(Event {
        id: format!("transaction/{id}/{}", status.to_ascii_lowercase()),
        aggregatetype: "transaction".into(),
        aggregateid: Some(key),
        event_type: status.to_ascii_lowercase(),
        payload: Some(payload.into_bytes()),
        headers: None,
        commit_time,
        extra: EventExtra {
            topic: Some(format!("{}.transaction", cfg.topic_prefix)),
            change: true,
            ..EventExtra::default()
        },
    })
}

/// The BEGIN record; `lsn` is the transaction's first change's.
pub fn begin(cfg: &CdcConfig, xid: u32, lsn: u64, commit_time: SystemTime) -> Outcome {
    let body = ",\"event_count\":null,\"data_collections\":null".to_string();
    record(cfg, "BEGIN", &format!("{xid}:{lsn}"), body, commit_time)
}

/// The END record; `lsn` is the end of the commit record.
pub fn end(
    cfg: &CdcConfig,
    xid: u32,
    lsn: u64,
    commit_time: SystemTime,
    order: &TxnOrder,
) -> Outcome {
    let collections: Vec<String> = order
        .tables
        .iter()
        .map(|(t, n)| {
            let mut s = String::from("{\"data_collection\":");
            value::string(&mut s, t);
            s.push_str(&format!(",\"event_count\":{n}}}"));
            s
        })
        .collect();
    let body = format!(
        ",\"event_count\":{},\"data_collections\":[{}]",
        order.total,
        collections.join(",")
    );
    record(cfg, "END", &format!("{xid}:{lsn}"), body, commit_time)
}
