//! `[cdc.snapshot]`: how the existing rows of captured tables reach their topics (see
//! `crate::cdc::snapshot`).

use serde::Deserialize;

use super::{invalid, ConfigError};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSnapshot {
    mode: Option<String>,
    chunk_size: Option<u32>,
    readers: Option<u32>,
    signal_table: Option<String>,
}

/// Debezium's `snapshot.mode`, the values people know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Every captured table this pipeline has not snapshotted yet, while streaming.
    Initial,
    /// No snapshot unless one is asked for (`outboxd snapshot`, a signal). Debezium's
    /// `no_data` is accepted as its other name.
    Never,
    /// As `Initial`, then the relay exits once every snapshot is acknowledged.
    InitialOnly,
    /// As `Initial`, and again for every captured table whenever the slot had to be created
    /// (the stream's position was lost: changes may be missing from the topics).
    WhenNeeded,
}

/// `[cdc.snapshot]`, validated.
#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    pub mode: SnapshotMode,
    /// Rows per chunk (Debezium's `incremental.snapshot.chunk.size`).
    pub chunk_size: u32,
    /// Connections reading chunks in parallel.
    pub readers: u32,
    /// Debezium's `signal.data.collection` (`schema`, `table`): inserts into it are signals.
    pub signal_table: Option<(String, String)>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            mode: SnapshotMode::Initial,
            chunk_size: 1024,
            readers: 2,
            signal_table: None,
        }
    }
}

impl SnapshotConfig {
    /// Whether tables are snapshotted without being asked.
    pub fn automatic(&self) -> bool {
        self.mode != SnapshotMode::Never
    }
}

pub(super) fn load(raw: Option<RawSnapshot>) -> Result<SnapshotConfig, ConfigError> {
    let raw = raw.unwrap_or_default();
    let d = SnapshotConfig::default();
    let mode = match raw.mode.as_deref() {
        None | Some("initial") => SnapshotMode::Initial,
        Some("never" | "no_data") => SnapshotMode::Never,
        Some("initial_only") => SnapshotMode::InitialOnly,
        Some("when_needed") => SnapshotMode::WhenNeeded,
        Some(other) => {
            return Err(invalid(
                "cdc.snapshot.mode",
                format!(
                    "`{other}` is not one of initial, never, no_data, initial_only, when_needed"
                ),
            ))
        }
    };
    let chunk_size = raw.chunk_size.unwrap_or(d.chunk_size);
    if !(1..=1_000_000).contains(&chunk_size) {
        return Err(invalid(
            "cdc.snapshot.chunk_size",
            format!("{chunk_size} is not between 1 and 1000000"),
        ));
    }
    let readers = raw.readers.unwrap_or(d.readers);
    if !(1..=16).contains(&readers) {
        return Err(invalid(
            "cdc.snapshot.readers",
            format!("{readers} is not between 1 and 16"),
        ));
    }
    let signal_table = match raw.signal_table {
        None => None,
        Some(t) => match t.split_once('.') {
            Some((s, n)) if !s.is_empty() && !n.is_empty() && !n.contains('.') => {
                Some((s.to_string(), n.to_string()))
            }
            _ => {
                return Err(invalid(
                    "cdc.snapshot.signal_table",
                    format!("`{t}` is not of the form schema.table"),
                ))
            }
        },
    };
    Ok(SnapshotConfig {
        mode,
        chunk_size,
        readers,
        signal_table,
    })
}
