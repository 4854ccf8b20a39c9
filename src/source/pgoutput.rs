//! Decoder for the pgoutput logical replication protocol (version 1): Begin, Commit,
//! Relation, Insert, Update, Delete, Truncate and logical decoding Messages. Type and Origin
//! messages are recognised and skipped (type names are read from the catalog instead).
//!
//! Reference: PostgreSQL documentation, "Logical Replication Message Formats".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        commit_time: SystemTime,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        /// End of the commit record: the position to confirm once the transaction is done.
        end_lsn: u64,
        commit_time: SystemTime,
    },
    Relation(Relation),
    Insert {
        relation_id: u32,
        tuple: Vec<Column>,
    },
    /// `old` is the replica identity's columns (`'K'`) or the whole old row (`'O'`, REPLICA
    /// IDENTITY FULL); absent when the identity did not change (DEFAULT, USING INDEX).
    Update {
        relation_id: u32,
        old: Option<OldTuple>,
        new: Vec<Column>,
    },
    Delete {
        relation_id: u32,
        old: OldTuple,
    },
    Truncate {
        relation_ids: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// `pg_logical_emit_message`. A non-transactional message's `lsn` is a safe position to
    /// confirm: everything before it in the WAL has been decoded.
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
    /// Type, Origin, and tags of later protocol versions: not used.
    Other(u8),
}

/// The old row an Update or Delete carries.
#[derive(Debug, Clone, PartialEq)]
pub struct OldTuple {
    /// `true`: the whole old row (REPLICA IDENTITY FULL); `false`: the replica identity's
    /// columns only, the others [`Column::Null`].
    pub full: bool,
    pub tuple: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<String>,
    /// Type OID of each column.
    pub types: Vec<u32>,
    /// `relreplident`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Whether each column is part of the replica identity (the key of a change event).
    pub key: Vec<bool>,
    /// Type modifier of each column (`-1`: none), e.g. a `numeric(10,2)`'s scale.
    pub typmods: Vec<i32>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Null,
    /// An unchanged TOASTed value (never in an INSERT).
    Unchanged,
    /// Text representation.
    Text(Vec<u8>),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("pgoutput message has an empty body")]
    Empty,
    #[error("pgoutput string is not NUL-terminated UTF-8")]
    BadString,
    #[error("unknown tuple column kind {0:#04x}")]
    BadColumnKind(u8),
    #[error("unexpected byte {found:#04x} where {expected} was expected")]
    Unexpected { expected: &'static str, found: u8 },
}

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

pub fn pg_timestamp(micros_since_2000: i64) -> SystemTime {
    let unix = micros_since_2000.saturating_add(PG_EPOCH_OFFSET_MICROS);
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_micros(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(unix.unsigned_abs())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(self.u64(what)? as i64)
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::BadString)?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| DecodeError::BadString)?;
        self.buf = &self.buf[end + 1..];
        Ok(s.to_string())
    }
}

/// Decodes one pgoutput message (the payload of one XLogData message).
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data };
    let tag = r.u8("message tag").map_err(|_| DecodeError::Empty)?;
    match tag {
        b'B' => Ok(Message::Begin {
            final_lsn: r.u64("Begin final LSN")?,
            commit_time: pg_timestamp(r.i64("Begin timestamp")?),
            xid: r.u32("Begin xid")?,
        }),
        b'C' => {
            let _flags = r.u8("Commit flags")?;
            Ok(Message::Commit {
                commit_lsn: r.u64("Commit LSN")?,
                end_lsn: r.u64("Commit end LSN")?,
                commit_time: pg_timestamp(r.i64("Commit timestamp")?),
            })
        }
        b'R' => {
            let id = r.u32("Relation id")?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8("Relation replica identity")?;
            let ncols = r.i16("Relation column count")?;
            let n = ncols.max(0) as usize;
            let mut columns = Vec::with_capacity(n);
            let mut types = Vec::with_capacity(n);
            let mut key = Vec::with_capacity(n);
            let mut typmods = Vec::with_capacity(n);
            for _ in 0..ncols {
                key.push(r.u8("column flags")? & 1 == 1);
                columns.push(r.cstr()?);
                types.push(r.u32("column type")?);
                typmods.push(r.u32("column type modifier")? as i32);
            }
            Ok(Message::Relation(Relation {
                id,
                // pgoutput sends an empty namespace for pg_catalog.
                namespace: if namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    namespace
                },
                name,
                columns,
                types,
                replica_identity,
                key,
                typmods,
            }))
        }
        b'U' => {
            let relation_id = r.u32("Update relation id")?;
            let mut marker = r.u8("Update tuple marker")?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                old = Some(OldTuple {
                    full: marker == b'O',
                    tuple: decode_tuple(&mut r)?,
                });
                marker = r.u8("Update new tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::Unexpected {
                    expected: "'N' (new tuple)",
                    found: marker,
                });
            }
            Ok(Message::Update {
                relation_id,
                old,
                new: decode_tuple(&mut r)?,
            })
        }
        b'D' => {
            let relation_id = r.u32("Delete relation id")?;
            let marker = r.u8("Delete tuple marker")?;
            if marker != b'K' && marker != b'O' {
                return Err(DecodeError::Unexpected {
                    expected: "'K' or 'O' (old tuple)",
                    found: marker,
                });
            }
            Ok(Message::Delete {
                relation_id,
                old: OldTuple {
                    full: marker == b'O',
                    tuple: decode_tuple(&mut r)?,
                },
            })
        }
        b'T' => {
            let n = r.u32("Truncate relation count")?;
            let options = r.u8("Truncate options")?;
            let mut relation_ids = Vec::with_capacity(n.min(1024) as usize);
            for _ in 0..n {
                relation_ids.push(r.u32("Truncate relation id")?);
            }
            Ok(Message::Truncate {
                relation_ids,
                cascade: options & 1 == 1,
                restart_identity: options & 2 == 2,
            })
        }
        b'I' => {
            let relation_id = r.u32("Insert relation id")?;
            let n = r.u8("Insert tuple marker")?;
            if n != b'N' {
                return Err(DecodeError::Unexpected {
                    expected: "'N' (new tuple)",
                    found: n,
                });
            }
            Ok(Message::Insert {
                relation_id,
                tuple: decode_tuple(&mut r)?,
            })
        }
        b'M' => {
            let flags = r.u8("Message flags")?;
            let lsn = r.u64("Message LSN")?;
            let prefix = r.cstr()?;
            let len = r.u32("Message length")? as usize;
            let content = r.take(len, "Message content")?.to_vec();
            Ok(Message::LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            })
        }
        other => Ok(Message::Other(other)),
    }
}

fn decode_tuple(r: &mut Reader<'_>) -> Result<Vec<Column>, DecodeError> {
    let n = r.i16("tuple column count")?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        match r.u8("tuple column kind")? {
            b'n' => cols.push(Column::Null),
            b'u' => cols.push(Column::Unchanged),
            b't' | b'b' => {
                let len = r.u32("column length")? as usize;
                cols.push(Column::Text(r.take(len, "column value")?.to_vec()));
            }
            other => return Err(DecodeError::BadColumnKind(other)),
        }
    }
    Ok(cols)
}

/// `bytea` in PostgreSQL's hex output (`\\x0a0b…`) → bytes.
pub fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// PostgreSQL's ISO timestamp text (`2026-11-22 19:50:00.158607+00`, or without an offset
/// for `timestamp`) → milliseconds since the Unix epoch.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    let (date, rest) = text.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let split = rest.find(['+', '-']).unwrap_or(rest.len());
    let (time, offset) = rest.split_at(split);
    let mut t = time.splitn(3, ':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    let offset_secs = if offset.is_empty() {
        0
    } else {
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let mut o = offset[1..].split(':');
        let oh: i64 = o.next()?.parse().ok()?;
        let om: i64 = o.next().map_or(Some(0), |v| v.parse().ok())?;
        sign * (oh * 3600 + om * 60)
    };
    let days = crate::calendar::days_from_civil(y, m, day);
    let secs = days * 86_400 + hh * 3600 + mm * 60 - offset_secs;
    Some(secs * 1000 + (sec * 1000.0).round() as i64)
}

pub use crate::lsn::{format_lsn, parse_lsn};

/// Every decoding error is an error of the relay (exit code 2: a bug or an incompatible
/// server, never transient).
impl From<DecodeError> for crate::error::Error {
    fn from(e: DecodeError) -> Self {
        crate::error::Error::Decode(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    #[test]
    fn decodes_begin_and_commit() {
        let mut b = vec![b'B'];
        b.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        b.extend_from_slice(&1_000_000i64.to_be_bytes());
        b.extend_from_slice(&77u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: UNIX_EPOCH + Duration::from_micros(946_684_801_000_000),
                xid: 77
            }
        );
        let mut c = vec![b'C', 0];
        c.extend_from_slice(&5u64.to_be_bytes());
        c.extend_from_slice(&9u64.to_be_bytes());
        c.extend_from_slice(&0i64.to_be_bytes());
        assert!(matches!(
            decode(&c).unwrap(),
            Message::Commit {
                commit_lsn: 5,
                end_lsn: 9,
                ..
            }
        ));
    }

    #[test]
    fn decodes_relation_and_insert() {
        let mut r = vec![b'R'];
        r.extend_from_slice(&16384u32.to_be_bytes());
        cstr(&mut r, "public");
        cstr(&mut r, "outbox");
        r.push(b'd');
        r.extend_from_slice(&2i16.to_be_bytes());
        for name in ["id", "payload"] {
            r.push(1);
            cstr(&mut r, name);
            r.extend_from_slice(&25u32.to_be_bytes());
            r.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        assert_eq!(
            decode(&r).unwrap(),
            Message::Relation(Relation {
                id: 16384,
                namespace: "public".into(),
                name: "outbox".into(),
                columns: vec!["id".into(), "payload".into()],
                types: vec![25, 25],
                replica_identity: b'd',
                key: vec![true, true],
                typmods: vec![-1, -1],
            })
        );

        let mut i = vec![b'I'];
        i.extend_from_slice(&16384u32.to_be_bytes());
        i.push(b'N');
        i.extend_from_slice(&2i16.to_be_bytes());
        i.push(b't');
        i.extend_from_slice(&3u32.to_be_bytes());
        i.extend_from_slice(b"abc");
        i.push(b'n');
        assert_eq!(
            decode(&i).unwrap(),
            Message::Insert {
                relation_id: 16384,
                tuple: vec![Column::Text(b"abc".to_vec()), Column::Null]
            }
        );
    }

    fn tuple(out: &mut Vec<u8>, values: &[Option<&str>]) {
        out.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(t) => {
                    out.push(b't');
                    out.extend_from_slice(&(t.len() as u32).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
            }
        }
    }

    #[test]
    fn decodes_update_delete_and_truncate() {
        let text = |s: &str| Column::Text(s.as_bytes().to_vec());
        // An update with the whole old row (REPLICA IDENTITY FULL).
        let mut u = vec![b'U'];
        u.extend_from_slice(&7u32.to_be_bytes());
        u.push(b'O');
        tuple(&mut u, &[Some("1"), Some("a")]);
        u.push(b'N');
        tuple(&mut u, &[Some("1"), Some("b")]);
        assert_eq!(
            decode(&u).unwrap(),
            Message::Update {
                relation_id: 7,
                old: Some(OldTuple {
                    full: true,
                    tuple: vec![text("1"), text("a")]
                }),
                new: vec![text("1"), text("b")],
            }
        );
        // Without an old tuple (the key did not change).
        let mut u = vec![b'U'];
        u.extend_from_slice(&7u32.to_be_bytes());
        u.push(b'N');
        tuple(&mut u, &[Some("1"), None]);
        assert!(matches!(
            decode(&u).unwrap(),
            Message::Update { old: None, .. }
        ));
        let mut d = vec![b'D'];
        d.extend_from_slice(&7u32.to_be_bytes());
        d.push(b'K');
        tuple(&mut d, &[Some("1"), None]);
        assert_eq!(
            decode(&d).unwrap(),
            Message::Delete {
                relation_id: 7,
                old: OldTuple {
                    full: false,
                    tuple: vec![text("1"), Column::Null]
                }
            }
        );
        let mut t = vec![b'T'];
        t.extend_from_slice(&2u32.to_be_bytes());
        t.push(3);
        t.extend_from_slice(&7u32.to_be_bytes());
        t.extend_from_slice(&8u32.to_be_bytes());
        assert_eq!(
            decode(&t).unwrap(),
            Message::Truncate {
                relation_ids: vec![7, 8],
                cascade: true,
                restart_identity: true
            }
        );
        let mut bad = vec![b'D'];
        bad.extend_from_slice(&7u32.to_be_bytes());
        bad.push(b'N');
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn decodes_logical_message() {
        let mut m = vec![b'M', 0];
        m.extend_from_slice(&42u64.to_be_bytes());
        cstr(&mut m, "outboxd.heartbeat");
        m.extend_from_slice(&2u32.to_be_bytes());
        m.extend_from_slice(b"hi");
        assert_eq!(
            decode(&m).unwrap(),
            Message::LogicalMessage {
                transactional: false,
                lsn: 42,
                prefix: "outboxd.heartbeat".into(),
                content: b"hi".to_vec()
            }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for msg in [
            &b"B\x00\x01"[..],
            b"C",
            b"R\x00\x00\x00\x01abc",
            b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x09ab",
            b"",
        ] {
            assert!(decode(msg).is_err(), "{msg:?}");
        }
    }

    #[test]
    fn decodes_bytea_hex_and_timestamps() {
        assert_eq!(decode_bytea_hex(b"\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_bytea_hex(b"00ff"), None);
        assert_eq!(parse_timestamp_ms("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(
            parse_timestamp_ms("2000-01-01 00:00:00.5+00"),
            Some(946_684_800_500)
        );
        assert_eq!(
            parse_timestamp_ms("2000-01-01 02:00:00+02"),
            Some(946_684_800_000)
        );
        assert_eq!(
            parse_timestamp_ms("2024-02-29 12:34:56.789-05:30"),
            Some(1_709_229_896_789)
        );
        assert_eq!(parse_timestamp_ms("garbage"), None);
    }

    #[test]
    fn lsn_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nope"), None);
    }
}
