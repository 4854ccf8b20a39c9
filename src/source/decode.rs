//! pgoutput messages → events: the relation cache, outbox rows (by column name, from the
//! table or any of its partitions), table-less events (`message.rs`), the row changes of the
//! tables `[cdc]` captures (handed to `crate::cdc::stream`), and the positions that are safe
//! to confirm.
//!
//! Nothing is dropped silently. An insert into a relation that is neither the outbox, one
//! of its partitions nor a captured table stops the relay before its transaction is
//! confirmed: the publication carries rows outboxd cannot tell are not events. Whether an unknown relation is a
//! partition is asked of the catalog ([`Change::UnknownRelation`]): PostgreSQL 15 describes
//! partitions even with `publish_via_partition_root` (the inserts then name the root), and
//! without it the inserts name the partition.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::cdc::snapshot::signal::{self, Signal, SIGNAL_PREFIX};
use crate::cdc::snapshot::watermark::{Board, WATERMARK_PREFIX};
use crate::cdc::stream::{CdcStream, RowChange};
use crate::cdc::table::{Outcome, TableCatalog, TxnContext};
use crate::config::{ColumnsConfig, PostgresConfig};
use crate::error::{Error, Result};
use crate::event::{Event, EventExtra};
use crate::source::message::{message_event, OUTBOX_MESSAGE_PREFIX};
use crate::source::pgoutput::{self, Column, Message, Relation};

/// Counts a change the decoder saw and deliberately did not turn into an event.
fn ignored(kind: &'static str) {
    metrics::counter!(crate::metrics::IGNORED_CHANGES, "kind" => kind).increment(1);
}

/// What the decoder makes of one pgoutput message.
#[derive(Debug)]
pub enum Change {
    /// An outbox row or outbox message to publish.
    Event(Event),
    /// An outbox message that cannot become an event (not JSON, fields missing). It must
    /// not stall the pipeline and must not vanish: the relay dead-letters it.
    Poison {
        id: Option<String>,
        reason: String,
        raw: Vec<u8>,
    },
    /// A position that is safe to confirm once every earlier event is acknowledged.
    Boundary(u64),
    /// The stream describes a relation that is not the outbox table by name (relation OID).
    /// It may be a partition of the outbox (a publication without
    /// `publish_via_partition_root`): the relay asks the catalog and tells the decoder with
    /// [`Decoder::classify`] before feeding the next message.
    UnknownRelation(u32),
    /// The stream describes a table `[cdc]` captures (relation OID, its column types): the
    /// relay reads its key and types from the catalog and hands them over with
    /// [`Decoder::capture`] before feeding the next message.
    CapturedRelation(u32, Vec<u32>),
    /// The change events of one row change of a captured table (a delete and its
    /// tombstone, a key change's delete and create, …), or why one cannot be published.
    Changes(Vec<Outcome>),
    /// A commit whose transaction had change events, with `cdc.transaction_metadata`: its
    /// END record, then the commit's position.
    End(Vec<Outcome>, u64),
    /// A snapshot chunk's high watermark: the chunk's rows, then the watermark's position
    /// (`crate::cdc::snapshot`).
    Rows(Vec<Outcome>, u64),
    /// A snapshot signal (`crate::cdc::snapshot::signal`) and its WAL position.
    Signal(Signal, u64),
}

/// What the decoder knows of a relation the stream described.
#[derive(Debug, Clone)]
enum RelationKind {
    /// The outbox table, or one of its partitions: its rows are events.
    Outbox(OutboxColumns),
    /// Not yet classified (see [`Change::UnknownRelation`]).
    Pending(Relation),
    /// Debezium's signal table (`cdc.snapshot.signal_table`): its inserts are signals.
    Signal,
    /// Another table. An insert into it stops the relay: the publication carries rows outboxd
    /// cannot tell are not events, and skipping them could lose events.
    Foreign(String),
}

/// Column positions of the outbox table, resolved from a Relation message.
#[derive(Debug, Clone)]
struct OutboxColumns {
    id: usize,
    aggregatetype: usize,
    aggregateid: usize,
    event_type: usize,
    payload: usize,
    payload_is_bytea: bool,
    headers: Option<usize>,
    timestamp: Option<usize>,
    topic: Option<usize>,
    partition: Option<usize>,
    header_columns: Vec<(String, usize)>,
}

/// PostgreSQL's type OID of `bytea`.
const BYTEA_OID: u32 = 17;

impl OutboxColumns {
    fn resolve(rel: &Relation, names: &ColumnsConfig) -> Result<OutboxColumns> {
        let find = |name: &str| {
            if name.is_empty() {
                None
            } else {
                rel.columns.iter().position(|c| c == name)
            }
        };
        let need = |key: &str, name: &str| {
            find(name).ok_or_else(|| {
                Error::setup(
                    format!(
                        "outbox table {}.{} has no column `{name}` (postgres.columns.{key})",
                        rel.namespace, rel.name
                    ),
                    "map the table's columns in [postgres.columns], or use the Debezium-compatible shape (sql/outbox.sql)",
                )
            })
        };
        // Optional columns that were configured explicitly must exist.
        let optional = |key: &str, name: &str, default: &str| -> Result<Option<usize>> {
            match find(name) {
                Some(i) => Ok(Some(i)),
                None if name.is_empty() || name == default => Ok(None),
                None => need(key, name).map(Some),
            }
        };
        let payload = need("payload", &names.payload)?;
        let mut header_columns = Vec::new();
        for name in &names.header_columns {
            header_columns.push((name.clone(), need("header_columns", name)?));
        }
        Ok(OutboxColumns {
            id: need("id", &names.id)?,
            aggregatetype: need("aggregatetype", &names.aggregatetype)?,
            aggregateid: need("aggregateid", &names.aggregateid)?,
            event_type: need("type", &names.event_type)?,
            payload,
            payload_is_bytea: rel.types.get(payload) == Some(&BYTEA_OID),
            headers: optional("headers", &names.headers, "headers")?,
            timestamp: optional("timestamp", &names.timestamp, "created_at")?,
            topic: optional("topic", &names.topic, "")?,
            partition: optional("partition", &names.partition, "")?,
            header_columns,
        })
    }
}

/// Turns pgoutput messages into [`Change`]s. Keeps the relation cache and the current
/// transaction's commit time.
///
/// Nothing is dropped silently: an insert into a relation that is neither the outbox nor one
/// of its partitions stops the relay (exit 2, naming the relation and the commit LSN, before
/// that transaction is confirmed); logical messages with a prefix that is not outboxd's, and
/// updates, deletes or truncates (which a publication shared with other tools may carry) are
/// not events: they are counted in `outboxd_ignored_changes_total` and logged at debug level.
pub struct Decoder {
    schema: String,
    table: String,
    publication: String,
    relations: HashMap<u32, RelationKind>,
    commit_time: SystemTime,
    /// LSN of the current transaction's commit record.
    commit_lsn: u64,
    in_transaction: bool,
    /// The current transaction's xid, and whether it yielded an event.
    xid: u32,
    had_event: bool,
    /// (xid, end LSN) of the last transaction that yielded an event: the exactly-once
    /// witness (`sink::positions`).
    last_event_txn: Option<(u32, u64)>,
    /// End LSN of the last commit decoded.
    commit_end: u64,
    columns: ColumnsConfig,
    /// The tables `[cdc]` captures (`crate::cdc::stream`).
    cdc: CdcStream,
    /// `postgres.outbox`: whether the outbox table is relayed.
    outbox: bool,
    /// WAL position of the message being decoded.
    wal_start: u64,
    /// End of the last commit decoded this session (`source.sequence`).
    last_commit: Option<u64>,
    /// `cdc.snapshot.signal_table`.
    signal_table: Option<(String, String)>,
}

impl Decoder {
    pub fn new(cfg: &PostgresConfig) -> Decoder {
        Decoder {
            schema: cfg.schema.clone(),
            table: cfg.table.clone(),
            publication: cfg.publication.clone(),
            relations: HashMap::new(),
            commit_time: SystemTime::now(),
            commit_lsn: 0,
            in_transaction: false,
            xid: 0,
            had_event: false,
            last_event_txn: None,
            commit_end: 0,
            columns: cfg.columns.clone(),
            cdc: CdcStream::new(cfg),
            outbox: cfg.outbox,
            wal_start: 0,
            last_commit: None,
            signal_table: cfg.cdc.snapshot.signal_table.clone(),
        }
    }

    /// Snapshot chunks of this session come through `board`.
    pub fn attach(&mut self, board: std::sync::Arc<Board>) {
        self.cdc.attach(board);
    }

    /// Between a Begin and its Commit: no position in between is safe to confirm.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// The LSN of the current (or last) transaction's commit record.
    pub fn commit_lsn(&self) -> u64 {
        self.commit_lsn
    }

    /// The xid of the current (or last) transaction.
    pub fn xid(&self) -> u32 {
        self.xid
    }

    /// End LSN of the last commit decoded.
    pub fn commit_end(&self) -> u64 {
        self.commit_end
    }

    /// (xid, end LSN) of the last transaction that yielded an event.
    pub fn last_event_txn(&self) -> Option<(u32, u64)> {
        self.last_event_txn
    }

    fn yielded(&mut self, change: Change) -> Change {
        let yields = match &change {
            Change::Event(_) | Change::Poison { .. } => true,
            Change::Changes(c) | Change::End(c, _) => !c.is_empty(),
            _ => false,
        };
        if yields && self.in_transaction {
            self.had_event = true;
        }
        change
    }

    /// Decodes one pgoutput message; `wal_start` is its XLogData's WAL position.
    pub fn feed(&mut self, wal_start: u64, data: &[u8]) -> Result<Option<Change>> {
        self.wal_start = wal_start;
        match pgoutput::decode(data)? {
            Message::Begin {
                commit_time,
                final_lsn,
                xid,
            } => {
                self.commit_time = commit_time;
                self.commit_lsn = final_lsn;
                self.xid = xid;
                self.had_event = false;
                self.in_transaction = true;
                self.cdc.begin();
                Ok(None)
            }
            Message::Commit { end_lsn, .. } => {
                self.in_transaction = false;
                self.commit_end = end_lsn;
                self.last_commit = Some(end_lsn);
                let end = self.cdc.commit(self.xid, end_lsn, self.commit_time);
                if self.had_event {
                    self.last_event_txn = Some((self.xid, end_lsn));
                }
                Ok(Some(if end.is_empty() {
                    Change::Boundary(end_lsn)
                } else {
                    Change::End(end, end_lsn)
                }))
            }
            Message::Relation(rel) => {
                let signals = self
                    .signal_table
                    .as_ref()
                    .is_some_and(|(s, t)| *s == rel.namespace && *t == rel.name);
                if self.outbox && rel.namespace == self.schema && rel.name == self.table {
                    let cols = OutboxColumns::resolve(&rel, &self.columns)?;
                    self.relations.insert(rel.id, RelationKind::Outbox(cols));
                    Ok(None)
                } else if signals {
                    self.relations.insert(rel.id, RelationKind::Signal);
                    Ok(None)
                } else {
                    let id = rel.id;
                    match self.cdc.relation(&rel) {
                        Some(types) => {
                            self.relations.remove(&id);
                            Ok(Some(Change::CapturedRelation(id, types)))
                        }
                        None => {
                            self.relations.insert(id, RelationKind::Pending(rel));
                            Ok(Some(Change::UnknownRelation(id)))
                        }
                    }
                }
            }
            Message::Insert { relation_id, tuple } if self.cdc.owns(relation_id) => {
                self.row_change(relation_id, RowChange::Insert(&tuple))
            }
            Message::Insert { relation_id, tuple } => match self.relations.get(&relation_id) {
                Some(RelationKind::Outbox(cols)) => {
                    let event = Change::Event(self.event(cols, tuple)?);
                    Ok(Some(self.yielded(event)))
                }
                Some(RelationKind::Signal) => {
                    let text = |i: usize| match tuple.get(i) {
                        Some(Column::Text(t)) => Some(String::from_utf8_lossy(t).into_owned()),
                        _ => None,
                    };
                    let (id, kind, data) = (text(0).unwrap_or_default(), text(1).unwrap_or_default(), text(2));
                    Ok(self.signal(signal::parse(&id, &kind, data.as_deref())))
                }
                Some(RelationKind::Foreign(name))
                | Some(RelationKind::Pending(Relation { name, .. })) => {
                    Err(Error::setup(
                        format!(
                            "publication `{}` carries an insert into table {name} (relation OID {relation_id}) in the transaction committing at {}; it is neither the outbox table {}.{} nor one of its partitions, so outboxd cannot tell whether it is an event and stops rather than skip it",
                            self.publication,
                            crate::source::pgoutput::format_lsn(self.commit_lsn),
                            self.schema,
                            self.table
                        ),
                        "publish only the outbox table (ALTER PUBLICATION … DROP TABLE …), or point postgres.table at the right table; nothing from this transaction on was confirmed",
                    ))
                }
                None => Err(Error::setup(
                    format!(
                        "insert for relation {relation_id} arrived before its Relation message"
                    ),
                    "report this as a bug in outboxd",
                )),
            },
            Message::LogicalMessage {
                transactional: false,
                lsn,
                prefix,
                content,
            } if prefix == WATERMARK_PREFIX => {
                let rows = self.cdc.watermark(&content, lsn);
                // The rows' position: confirming past it needs every one acknowledged.
                self.commit_lsn = lsn;
                Ok(Some(if rows.is_empty() {
                    Change::Boundary(lsn)
                } else {
                    Change::Rows(rows, lsn)
                }))
            }
            Message::LogicalMessage {
                transactional: false,
                lsn,
                ..
            } => Ok(Some(Change::Boundary(lsn))),
            Message::LogicalMessage {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == SIGNAL_PREFIX => Ok(self.signal(signal::parse_message(&content))),
            Message::LogicalMessage {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == OUTBOX_MESSAGE_PREFIX => {
                let change = match message_event(&content, self.commit_time) {
                    Ok(event) => Change::Event(event),
                    Err((id, reason)) => Change::Poison {
                        id,
                        reason,
                        raw: content,
                    },
                };
                Ok(Some(self.yielded(change)))
            }
            // Transactional messages of other applications: not events.
            Message::LogicalMessage { prefix, .. } => {
                ignored("message");
                tracing::debug!(prefix = %prefix, commit_lsn = %crate::source::pgoutput::format_lsn(self.commit_lsn), "ignoring a logical message whose prefix is not `outbox`");
                Ok(None)
            }
            Message::Update {
                relation_id,
                old,
                new,
            } => self.row_change(relation_id, RowChange::Update(old.as_ref(), &new)),
            Message::Delete { relation_id, old } => {
                self.row_change(relation_id, RowChange::Delete(&old))
            }
            Message::Truncate { relation_ids, .. } => {
                let mut out = Vec::new();
                for id in relation_ids {
                    if let Some(Change::Changes(c)) = self.row_change(id, RowChange::Truncate)? {
                        out.extend(c);
                    }
                }
                Ok(Some(Change::Changes(out)))
            }
            Message::Other(_) => Ok(None),
        }
    }

    /// A signal, or why it cannot be acted on (logged, counted: it costs no event).
    fn signal(&self, parsed: std::result::Result<Signal, String>) -> Option<Change> {
        match parsed {
            Ok(s) => Some(Change::Signal(s, self.wal_start)),
            Err(reason) => {
                metrics::counter!(crate::metrics::SNAPSHOT_SIGNALS_REFUSED).increment(1);
                tracing::error!(commit_lsn = %crate::source::pgoutput::format_lsn(self.commit_lsn), %reason, "a snapshot signal outboxd cannot act on; ignored");
                None
            }
        }
    }

    fn txn(&self) -> TxnContext {
        TxnContext {
            commit_time: self.commit_time,
            xid: self.xid,
            lsn: self.wal_start,
            last_commit: self.last_commit,
            snapshot: "false",
        }
    }

    /// A row change: the change events of a captured table; `None` (counted as ignored)
    /// for an update, delete or truncate of the outbox or another table, which are not
    /// events.
    fn row_change(&mut self, id: u32, change: RowChange<'_>) -> Result<Option<Change>> {
        if self.cdc.owns(id) {
            let txn = self.txn();
            let out = self.cdc.change(id, change, txn)?;
            return Ok(Some(self.yielded(Change::Changes(out))));
        }
        let kind = match change {
            RowChange::Insert(_) => "insert",
            RowChange::Update(..) => "update",
            RowChange::Delete(_) => "delete",
            RowChange::Truncate => "truncate",
        };
        if !self.relations.contains_key(&id) {
            return Err(Error::setup(
                format!("{kind} for relation {id} arrived before its Relation message"),
                "report this as a bug in outboxd",
            ));
        }
        ignored(kind);
        tracing::debug!(kind, commit_lsn = %crate::source::pgoutput::format_lsn(self.commit_lsn), "ignoring a change of a table that is not captured");
        Ok(None)
    }

    /// Hands the decoder a captured table's catalog entry ([`Change::CapturedRelation`]).
    pub fn capture(&mut self, id: u32, catalog: &TableCatalog) {
        self.cdc.capture(id, catalog);
    }

    /// Tells the decoder what relation `id` ([`Change::UnknownRelation`]) is: a partition of
    /// the outbox (its rows are events, decoded by column name) or another table.
    pub fn classify(&mut self, id: u32, partition_of_outbox: bool) -> Result<()> {
        let Some(RelationKind::Pending(rel)) = self.relations.remove(&id) else {
            return Ok(());
        };
        let name = format!("{}.{}", rel.namespace, rel.name);
        let kind = if partition_of_outbox {
            // PostgreSQL 15 describes a partition even with publish_via_partition_root (its
            // inserts then name the root); without it, the inserts name the partition.
            tracing::debug!(relation = %name, "relation is a partition of the outbox; its rows are events");
            RelationKind::Outbox(OutboxColumns::resolve(&rel, &self.columns)?)
        } else {
            tracing::warn!(relation = %name, "the publication carries a table that is not the outbox; an insert into it will stop the relay");
            RelationKind::Foreign(name)
        };
        self.relations.insert(id, kind);
        Ok(())
    }

    fn event(&self, cols: &OutboxColumns, mut tuple: Vec<Column>) -> Result<Event> {
        let mut take = |i: usize| -> Option<Vec<u8>> {
            match tuple.get_mut(i) {
                Some(Column::Text(v)) => Some(std::mem::take(v)),
                _ => None,
            }
        };
        let text = |v: Option<Vec<u8>>| v.map(|b| String::from_utf8_lossy(&b).into_owned());
        let id = text(take(cols.id)).unwrap_or_default();
        let aggregatetype = text(take(cols.aggregatetype)).unwrap_or_default();
        let aggregateid = text(take(cols.aggregateid));
        let event_type = text(take(cols.event_type)).unwrap_or_default();
        let raw_payload = take(cols.payload);
        let payload = if cols.payload_is_bytea {
            match raw_payload.as_deref().map(pgoutput::decode_bytea_hex) {
                None => None,
                Some(Some(bytes)) => Some(bytes),
                Some(None) => {
                    return Err(Error::setup(
                        format!("bytea payload of event {id} is not in hex format"),
                        "leave bytea_output at its default (hex) for the replication role",
                    ))
                }
            }
        } else {
            raw_payload
        };
        let headers = cols.headers.and_then(|i| text(take(i)));
        let timestamp_ms = cols
            .timestamp
            .and_then(|i| text(take(i)))
            .and_then(|t| pgoutput::parse_timestamp_ms(&t));
        let topic = cols.topic.and_then(|i| text(take(i)));
        let partition = cols
            .partition
            .and_then(|i| text(take(i)))
            .and_then(|p| p.trim().parse().ok());
        let extra_headers = cols
            .header_columns
            .iter()
            .filter_map(|(name, i)| text(take(*i)).map(|v| (name.clone(), v)))
            .collect();
        Ok(Event {
            id,
            aggregatetype,
            aggregateid,
            event_type,
            payload,
            headers,
            commit_time: self.commit_time,
            extra: EventExtra {
                timestamp_ms,
                topic,
                partition,
                headers: extra_headers,
                binary_payload: cols.payload_is_bytea,
                change: false,
            },
        })
    }
}
