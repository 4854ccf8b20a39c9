//! The stream's half of a chunk (DBLog): between a chunk's low and high watermark the stream
//! notes every key of the chunk's table that a change touched; at the high watermark the
//! chunk's rows are emitted, less those keys — the stream already carried a change at least
//! as new as the row read. A row read from the table thus never overwrites a newer change,
//! and streaming never stops for a snapshot.
//!
//! The watermarks are non-transactional logical messages (`pg_logical_emit_message(false,
//! 'outboxd.snapshot', …)`): they need no table and reach the stream in WAL order with the
//! commits around them. A watermark of another session (a replay after a restart, whose
//! chunk is gone with that process) is passed over: its chunk is read again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::cdc::table::{CapturedTable, Outcome};
use crate::config::CdcConfig;
use crate::source::pgoutput::Column;

/// Prefix of the watermark messages.
pub const WATERMARK_PREFIX: &str = "outboxd.snapshot";

/// A row's key: the text of its key columns, in key order.
pub type Key = Vec<Vec<u8>>;

/// Which low or high watermark a message is: `<open|close> <run> <chunk> <table OID>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub open: bool,
    pub run: String,
    pub chunk: u64,
    pub oid: u32,
}

impl Mark {
    pub fn encode(&self) -> String {
        let kind = if self.open { "open" } else { "close" };
        format!("{kind} {} {} {}", self.run, self.chunk, self.oid)
    }

    pub fn decode(content: &[u8]) -> Option<Mark> {
        let text = std::str::from_utf8(content).ok()?;
        let mut parts = text.split(' ');
        let open = match parts.next()? {
            "open" => true,
            "close" => false,
            _ => return None,
        };
        let run = parts.next()?.to_string();
        let chunk = parts.next()?.parse().ok()?;
        let oid = parts.next()?.parse().ok()?;
        Some(Mark {
            open,
            run,
            chunk,
            oid,
        })
    }
}

/// `source.snapshot` of a chunk's rows: where in its table's snapshot the chunk lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A snapshot asked for while streaming (`incremental`).
    Incremental,
    /// The initial snapshot: first chunk, a middle one, the last one, or the only one.
    Initial { first: bool, last: bool },
}

/// A chunk read from the table, waiting for its high watermark: each row's key and its
/// event, made by the reader (off the stream's loop, on as many threads as readers).
pub struct Chunk {
    /// `schema.table` (`outboxd_snapshot_rows_total{table}`).
    pub table: String,
    /// Relation OID.
    pub oid: u32,
    pub rows: Vec<(Key, Outcome)>,
}

impl Place {
    /// `source.snapshot` of row `i` of `n` read.
    pub fn marker(self, i: usize, n: usize) -> &'static str {
        match self {
            Place::Incremental => "incremental",
            Place::Initial { first: true, .. } if i == 0 => "first_in_data_collection",
            Place::Initial { last: true, .. } if i + 1 == n => "last_in_data_collection",
            Place::Initial { .. } => "true",
        }
    }
}

/// The chunk of `rows` read from `table` at `lsn` (its low watermark), its events made.
pub fn chunk(
    cfg: &CdcConfig,
    table: &CapturedTable,
    oid: u32,
    rows: Vec<Vec<Column>>,
    lsn: u64,
    place: Place,
) -> Chunk {
    let n = rows.len();
    let rows = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let event = table.read(cfg, row, lsn, i, place.marker(i, n));
            (table.key_of(row), event)
        })
        .collect();
    Chunk {
        table: table.name().to_string(),
        oid,
        rows,
    }
}

/// What the snapshot runner and the stream share: chunks read and not yet emitted, and the
/// position each emitted chunk's rows took in the stream.
pub struct Board {
    /// This process's run: watermarks of other runs are not ours.
    pub run: String,
    inner: Mutex<Inner>,
    /// Woken when the stream emitted a chunk.
    pub emitted: Notify,
}

#[derive(Default)]
struct Inner {
    chunks: HashMap<u64, Chunk>,
    /// chunk → (the high watermark's LSN, rows emitted).
    emitted: BTreeMap<u64, (u64, usize)>,
}

impl Board {
    pub fn new(run: String) -> Arc<Board> {
        Arc::new(Board {
            run,
            inner: Mutex::new(Inner::default()),
            emitted: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A chunk read, before its high watermark is written.
    pub fn post(&self, id: u64, chunk: Chunk) {
        self.lock().chunks.insert(id, chunk);
    }

    fn take(&self, id: u64) -> Option<Chunk> {
        self.lock().chunks.remove(&id)
    }

    fn done(&self, id: u64, lsn: u64, rows: usize) {
        self.lock().emitted.insert(id, (lsn, rows));
        self.emitted.notify_one();
    }

    /// Where chunk `id`'s rows went (its high watermark's LSN, rows emitted), once emitted.
    pub fn emitted(&self, id: u64) -> Option<(u64, usize)> {
        self.lock().emitted.get(&id).copied()
    }

    pub fn forget(&self, id: u64) {
        self.lock().emitted.remove(&id);
    }
}

/// A chunk's open window: the keys of its table that changed since its low watermark.
struct Window {
    chunk: u64,
    oid: u32,
    keys: HashSet<Key>,
    /// The table was truncated inside the window: no row read is current.
    truncated: bool,
}

/// The stream's open windows.
#[derive(Default)]
pub struct Windows {
    board: Option<Arc<Board>>,
    open: Vec<Window>,
}

impl Windows {
    pub fn attach(&mut self, board: Arc<Board>) {
        self.board = Some(board);
        self.open.clear();
    }

    /// Whether changes of relation `oid` must be noted.
    pub fn watches(&self, oid: u32) -> bool {
        self.open.iter().any(|w| w.oid == oid)
    }

    /// A change of relation `oid` touched `key` (`None`: a truncate).
    pub fn touched(&mut self, oid: u32, key: Option<Key>) {
        for w in self.open.iter_mut().filter(|w| w.oid == oid) {
            match &key {
                Some(k) => {
                    w.keys.insert(k.clone());
                }
                None => w.truncated = true,
            }
        }
    }

    /// A watermark at `lsn`: the rows of a chunk whose window it closes, else nothing.
    pub fn mark(&mut self, content: &[u8], lsn: u64) -> Vec<Outcome> {
        let Some(board) = &self.board else {
            return Vec::new();
        };
        let Some(mark) = Mark::decode(content) else {
            tracing::warn!(lsn = %crate::source::pgoutput::format_lsn(lsn), "a snapshot watermark that outboxd cannot read; passed over");
            return Vec::new();
        };
        if mark.run != board.run {
            // Another run's (a replay after a restart): its chunk is read again.
            return Vec::new();
        }
        if mark.open {
            self.open.push(Window {
                chunk: mark.chunk,
                oid: mark.oid,
                keys: HashSet::new(),
                truncated: false,
            });
            return Vec::new();
        }
        let window = self
            .open
            .iter()
            .position(|w| w.chunk == mark.chunk)
            .map(|i| self.open.swap_remove(i));
        let Some(chunk) = board.take(mark.chunk) else {
            return Vec::new();
        };
        let Some(window) = window else {
            // The low watermark was not seen in this stream: nothing proves the rows current.
            board.done(mark.chunk, lsn, 0);
            tracing::warn!(
                chunk = mark.chunk,
                "a snapshot chunk's low watermark was not in the stream; its rows are read again"
            );
            return Vec::new();
        };
        let out: Vec<Outcome> = chunk
            .rows
            .into_iter()
            .filter(|(key, _)| !window.truncated && !window.keys.contains(key))
            .map(|(_, event)| event)
            .collect();
        let n = out.len();
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS, "table" => chunk.table)
            .increment(n as u64);
        board.done(mark.chunk, lsn, n);
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_watermark_reads_back_as_written_and_foreign_text_is_no_watermark() {
        let m = Mark {
            open: false,
            run: "r1a2".into(),
            chunk: 42,
            oid: 16384,
        };
        assert_eq!(Mark::decode(m.encode().as_bytes()), Some(m));
        assert_eq!(Mark::decode(b"open r1 x 1"), None);
        assert_eq!(Mark::decode(b"hello"), None);
    }
}
