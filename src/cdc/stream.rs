//! The captured tables as the replication stream describes them, and the events their row
//! changes become — what `source::decode` hands a change of a relation that is not the
//! outbox. Keeps the Relation in force for each captured table (a schema change arrives as a
//! new Relation message before the first change that uses it) and the transaction metadata.

use std::collections::HashMap;
use std::sync::Arc;

use super::snapshot::watermark::{Board, Windows};
use super::table::{CapturedTable, Outcome, TableCatalog, TxnContext};
use super::transaction::{self, TxnOrder};
use crate::config::CdcConfig;
use crate::error::{Error, Result};
use crate::source::pgoutput::{Column, OldTuple, Relation};

/// A row change of some relation, as pgoutput sends it.
pub enum RowChange<'a> {
    Insert(&'a [Column]),
    Update(Option<&'a OldTuple>, &'a [Column]),
    Delete(&'a OldTuple),
    Truncate,
}

enum State {
    /// Awaiting its catalog entry.
    Pending(Relation),
    Resolved(Box<CapturedTable>),
}

pub struct CdcStream {
    cfg: Arc<CdcConfig>,
    /// The outbox's schema and table: outboxd's own tables there are never captured
    /// (`PostgresConfig::is_own_table`).
    own: crate::config::PostgresConfig,
    tables: HashMap<u32, State>,
    /// `cdc.transaction_metadata`: the current transaction's counts, once it had a change.
    order: Option<TxnOrder>,
    /// The LSN of the current transaction's first change event (its BEGIN's id).
    begun: Option<u64>,
    /// Snapshot chunks' open windows (`super::snapshot::watermark`).
    windows: Windows,
}

impl CdcStream {
    pub fn new(own: &crate::config::PostgresConfig) -> CdcStream {
        CdcStream {
            cfg: own.cdc.clone(),
            own: own.clone(),
            tables: HashMap::new(),
            order: None,
            begun: None,
            windows: Windows::default(),
        }
    }

    /// Snapshot chunks of this session come through `board`.
    pub fn attach(&mut self, board: std::sync::Arc<Board>) {
        self.windows.attach(board);
    }

    /// A snapshot watermark at `lsn`: the rows of the chunk it closes, if any.
    pub fn watermark(&mut self, content: &[u8], lsn: u64) -> Vec<Outcome> {
        self.windows.mark(content, lsn)
    }

    pub fn config(&self) -> &CdcConfig {
        &self.cfg
    }

    /// A Relation message: `Some(type OIDs)` when the table is captured (the caller reads
    /// its catalog entry and calls [`CdcStream::capture`]), `None` when it is not.
    pub fn relation(&mut self, rel: &Relation) -> Option<Vec<u32>> {
        if !(self.cfg.enabled() && self.own.captures(&rel.namespace, &rel.name)) {
            return None;
        }
        if matches!(self.tables.get(&rel.id), Some(State::Resolved(_))) {
            metrics::counter!(crate::metrics::CDC_SCHEMA_CHANGES).increment(1);
            tracing::info!(table = %format!("{}.{}", rel.namespace, rel.name), columns = %rel.columns.join(","), "captured table's columns described again; its later changes use them");
        }
        self.tables.insert(rel.id, State::Pending(rel.clone()));
        Some(rel.types.clone())
    }

    pub fn capture(&mut self, id: u32, catalog: &TableCatalog) {
        if let Some(State::Pending(rel)) = self.tables.remove(&id) {
            let table = CapturedTable::new(&rel, catalog, &self.cfg);
            tracing::debug!(table = %format!("{}.{}", rel.namespace, rel.name), key = table.has_key(), "capturing the table's changes");
            self.tables.insert(id, State::Resolved(Box::new(table)));
        }
    }

    /// Whether relation `id` is a captured table.
    pub fn owns(&self, id: u32) -> bool {
        self.tables.contains_key(&id)
    }

    pub fn begin(&mut self) {
        self.order = None;
        self.begun = None;
    }

    /// The events of a change of relation `id` (which [`CdcStream::owns`]).
    pub fn change(
        &mut self,
        id: u32,
        change: RowChange<'_>,
        txn: TxnContext,
    ) -> Result<Vec<Outcome>> {
        let table = match self.tables.get(&id) {
            Some(State::Resolved(t)) => t,
            _ => {
                return Err(Error::setup(
                    format!(
                    "a change of relation {id} arrived before its Relation message was resolved"
                ),
                    "report this as a bug in outboxd",
                ))
            }
        };
        if self.windows.watches(id) {
            let key = |t: &[Column]| Some(table.key_of(t));
            match &change {
                RowChange::Insert(new) => self.windows.touched(id, key(new)),
                RowChange::Update(old, new) => {
                    if let Some(old) = old {
                        self.windows.touched(id, key(&old.tuple));
                    }
                    self.windows.touched(id, key(new));
                }
                RowChange::Delete(old) => self.windows.touched(id, key(&old.tuple)),
                RowChange::Truncate => self.windows.touched(id, None),
            }
        }
        let cfg = &self.cfg;
        let ops = &cfg.operations;
        let mut order = self.order.take();
        if cfg.transaction_metadata && order.is_none() {
            order = Some(TxnOrder::default());
        }
        let out = match change {
            RowChange::Insert(new) if ops.create => table.insert(cfg, &txn, &mut order, new),
            RowChange::Update(old, new) if ops.update => {
                table.update(cfg, &txn, &mut order, old, new)
            }
            RowChange::Delete(old) if ops.delete => table.delete(cfg, &txn, &mut order, old),
            RowChange::Truncate if ops.truncate => table.truncate(cfg, &txn, &mut order),
            _ => Vec::new(),
        };
        table.changes.increment(out.len() as u64);
        self.order = order;
        if cfg.transaction_metadata && self.begun.is_none() && !out.is_empty() {
            self.begun = Some(txn.lsn);
            let mut with_begin = vec![transaction::begin(cfg, txn.xid, txn.lsn, txn.commit_time)];
            with_begin.extend(out);
            return Ok(with_begin);
        }
        Ok(out)
    }

    /// At a commit: the END record of a transaction that had change events.
    pub fn commit(
        &mut self,
        xid: u32,
        end_lsn: u64,
        commit_time: std::time::SystemTime,
    ) -> Vec<Outcome> {
        match (self.begun.take(), self.order.take()) {
            (Some(_), Some(order)) => vec![transaction::end(
                &self.cfg,
                xid,
                end_lsn,
                commit_time,
                &order,
            )],
            _ => Vec::new(),
        }
    }
}
