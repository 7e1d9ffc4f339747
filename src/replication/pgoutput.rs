//! Decoder for the `pgoutput` logical decoding protocol, version 1.
//!
//! pgwire-replication hands us each change as the raw bytes of one pgoutput message (and decodes only
//! Begin/Commit itself). This module turns those bytes into [`Message`]s. It is pure: no IO, no state
//! (the relation map lives in the stream session in `super`), and it never panics on any input, however
//! malformed: every problem is a [`DecodeError`]. It is fuzzed (`fuzz/`) and unit-tested with hand-built
//! messages.
//!
//! Only protocol version 1 is understood: no streaming (v2) or two-phase (v3) messages, and no xid field
//! in Relation/Type/Insert/Update/Delete/Truncate/Message. Column values are zero-copy slices of the
//! input [`Bytes`]; declared lengths and counts are checked against the bytes actually present before
//! anything is allocated for them.
//!
//! Reference: <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>

// The no-panic guarantee, checked by clippy for the decoder (the tests opt out).
#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]

use bytes::Bytes;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `B`: start of a transaction.
    Begin {
        final_lsn: u64,
        commit_time_micros: i64,
        xid: u32,
    },
    /// `C`: end of a transaction.
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_micros: i64,
    },
    /// `O`: replication origin of the following changes (ignored by kck).
    Origin { commit_lsn: u64, name: String },
    /// `R`: the shape of a table. Sent before the first change to it in a session, and again after any
    /// schema change.
    Relation(Relation),
    /// `Y`: a data type (ignored by kck; values are in text form).
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    /// `I`: a new row.
    Insert { relation_id: u32, new: Tuple },
    /// `U`: a changed row. `old` is present when the replica identity is FULL (`old_is_key == false`) or
    /// when the key columns changed (`old_is_key == true`, only key columns are non-null).
    Update {
        relation_id: u32,
        old: Option<Tuple>,
        old_is_key: bool,
        new: Tuple,
    },
    /// `D`: a deleted row: the old key (`old_is_key == true`) or the whole old row (REPLICA IDENTITY FULL).
    Delete {
        relation_id: u32,
        old: Tuple,
        old_is_key: bool,
    },
    /// `T`: one TRUNCATE of one or more tables.
    Truncate { options: u8, relation_ids: Vec<u32> },
    /// `M`: a logical decoding message from `pg_logical_emit_message` (ignored by kck).
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

/// A table's shape as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The column values of one row image, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<Value>);

/// One column value in a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value whose data was not sent.
    UnchangedToast,
    /// `t`: the value in Postgres's text output form.
    Text(Bytes),
    /// `b`: the value in binary form (only when binary mode is requested; kck does not request it).
    Binary(Bytes),
}

/// The bytes are not a valid pgoutput v1 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error(
        "pgoutput message {message:?} ends early: needed {needed} more bytes at offset {offset}"
    )]
    Truncated {
        message: char,
        offset: usize,
        needed: usize,
    },
    #[error(
        "pgoutput message {message:?} has {0} bytes left over after decoding",
        extra
    )]
    TrailingBytes { message: char, extra: usize },
    #[error(
        "pgoutput message {message:?} has a string that is not NUL-terminated UTF-8 at offset {offset}"
    )]
    BadString { message: char, offset: usize },
    #[error("pgoutput message {message:?} has unexpected tag {tag:?} at offset {offset}")]
    UnexpectedTag {
        message: char,
        tag: char,
        offset: usize,
    },
    #[error(
        "pgoutput message {message:?} has negative length or count {length} at offset {offset}"
    )]
    BadLength {
        message: char,
        offset: usize,
        length: i32,
    },
}

/// Decode one pgoutput message.
///
/// `data` is one whole message, starting with its type byte. Text and binary column values in the
/// result are zero-copy slices of `data`. Every byte must be consumed: anything left over is
/// [`DecodeError::TrailingBytes`].
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = data.first() else {
        return Err(DecodeError::Empty);
    };
    let mut c = Cursor {
        data,
        pos: 1,
        message: char::from(tag),
    };
    let message = match tag {
        b'B' => decode_begin(&mut c)?,
        b'C' => decode_commit(&mut c)?,
        b'O' => decode_origin(&mut c)?,
        b'R' => decode_relation(&mut c)?,
        b'Y' => decode_type(&mut c)?,
        b'I' => decode_insert(&mut c)?,
        b'U' => decode_update(&mut c)?,
        b'D' => decode_delete(&mut c)?,
        b'T' => decode_truncate(&mut c)?,
        b'M' => decode_logical_message(&mut c)?,
        _ => return Err(DecodeError::UnknownMessage(char::from(tag))),
    };
    c.finish()?;
    Ok(message)
}

/// `B`: Int64 final LSN, Int64 commit timestamp, Int32 xid.
fn decode_begin(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Begin {
        final_lsn: c.u64()?,
        commit_time_micros: c.i64()?,
        xid: c.u32()?,
    })
}

/// `C`: Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit timestamp.
fn decode_commit(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Commit {
        flags: c.u8()?,
        commit_lsn: c.u64()?,
        end_lsn: c.u64()?,
        commit_time_micros: c.i64()?,
    })
}

/// `O`: Int64 commit LSN, String origin name.
fn decode_origin(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Origin {
        commit_lsn: c.u64()?,
        name: c.cstr()?,
    })
}

/// Fewest bytes one column of a Relation message can take: flags, an empty name's NUL, type OID,
/// type modifier.
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

/// `R`: Int32 relation OID, String namespace, String name, Int8 replica identity, Int16 column count,
/// then per column Int8 flags, String name, Int32 type OID, Int32 type modifier.
fn decode_relation(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    let id = c.u32()?;
    let namespace = c.cstr()?;
    let name = c.cstr()?;
    let replica_identity = c.u8()?;
    let count = usize::from(c.u16()?);
    c.ensure(count.saturating_mul(MIN_RELATION_COLUMN_LEN))?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        columns.push(Column {
            flags: c.u8()?,
            name: c.cstr()?,
            type_oid: c.u32()?,
            type_modifier: c.i32()?,
        });
    }
    Ok(Message::Relation(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    }))
}

/// `Y`: Int32 type OID, String namespace, String name.
fn decode_type(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    Ok(Message::Type {
        id: c.u32()?,
        namespace: c.cstr()?,
        name: c.cstr()?,
    })
}

/// `I`: Int32 relation OID, `N`, TupleData.
fn decode_insert(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    let relation_id = c.u32()?;
    c.expect_tag(b'N')?;
    Ok(Message::Insert {
        relation_id,
        new: c.tuple()?,
    })
}

/// `U`: Int32 relation OID, optionally `K` or `O` and the old TupleData, then `N` and the new
/// TupleData.
fn decode_update(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    let relation_id = c.u32()?;
    let at = c.pos;
    let (old, old_is_key) = match c.u8()? {
        b'N' => (None, false),
        tag @ (b'K' | b'O') => {
            let old = c.tuple()?;
            c.expect_tag(b'N')?;
            (Some(old), tag == b'K')
        }
        tag => return Err(c.unexpected_tag(tag, at)),
    };
    Ok(Message::Update {
        relation_id,
        old,
        old_is_key,
        new: c.tuple()?,
    })
}

/// `D`: Int32 relation OID, `K` or `O`, the old TupleData.
fn decode_delete(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    let relation_id = c.u32()?;
    let at = c.pos;
    let old_is_key = match c.u8()? {
        b'K' => true,
        b'O' => false,
        tag => return Err(c.unexpected_tag(tag, at)),
    };
    Ok(Message::Delete {
        relation_id,
        old: c.tuple()?,
        old_is_key,
    })
}

/// `T`: Int32 relation count, Int8 options (1 CASCADE, 2 RESTART IDENTITY), Int32 relation OIDs.
fn decode_truncate(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    let count = c.len_i32()?;
    let options = c.u8()?;
    c.ensure(count.saturating_mul(4))?;
    let mut relation_ids = Vec::with_capacity(count);
    for _ in 0..count {
        relation_ids.push(c.u32()?);
    }
    Ok(Message::Truncate {
        options,
        relation_ids,
    })
}

/// `M`: Int8 flags (1 = transactional), Int64 LSN, String prefix, Int32 length, content.
fn decode_logical_message(c: &mut Cursor<'_>) -> Result<Message, DecodeError> {
    let transactional = c.u8()? & 1 != 0;
    let lsn = c.u64()?;
    let prefix = c.cstr()?;
    let len = c.len_i32()?;
    Ok(Message::LogicalMessage {
        transactional,
        lsn,
        prefix,
        content: c.bytes(len)?,
    })
}

/// A read position in one message. Invariant: `pos <= data.len()`: every read checks that enough bytes
/// remain before it advances `pos`.
struct Cursor<'a> {
    data: &'a Bytes,
    pos: usize,
    /// The message type, for errors.
    message: char,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn rest(&self) -> &'a [u8] {
        let data: &'a [u8] = self.data;
        data.get(self.pos..).unwrap_or_default()
    }

    #[inline]
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    #[inline]
    fn truncated(&self, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            offset: self.pos,
            needed,
        }
    }

    #[cold]
    fn unexpected_tag(&self, tag: u8, offset: usize) -> DecodeError {
        DecodeError::UnexpectedTag {
            message: self.message,
            tag: char::from(tag),
            offset,
        }
    }

    /// Fail unless at least `n` bytes are left. Used before allocating for a declared count, so that a
    /// bogus count can't cause a huge allocation.
    #[inline]
    fn ensure(&self, n: usize) -> Result<(), DecodeError> {
        let remaining = self.remaining();
        if n > remaining {
            Err(self.truncated(n.saturating_sub(remaining)))
        } else {
            Ok(())
        }
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let rest = self.rest();
        match rest.first_chunk::<N>() {
            Some(chunk) => {
                self.pos = self.pos.saturating_add(N);
                Ok(*chunk)
            }
            None => Err(self.truncated(N.saturating_sub(rest.len()))),
        }
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array().map(u8::from_be_bytes)
    }

    #[inline]
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    #[inline]
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    #[inline]
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    #[inline]
    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_be_bytes)
    }

    #[inline]
    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_be_bytes)
    }

    /// An Int32 length or count, which must not be negative.
    #[inline]
    fn len_i32(&mut self) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let len = self.i32()?;
        usize::try_from(len).map_err(|_| DecodeError::BadLength {
            message: self.message,
            offset,
            length: len,
        })
    }

    /// `n` bytes as a zero-copy slice of the message.
    #[inline]
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.ensure(n)?;
        let start = self.pos;
        self.pos = self.pos.saturating_add(n);
        // In bounds: `ensure` checked that `start + n <= data.len()`.
        Ok(self.data.slice(start..self.pos))
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = self.rest();
        let bad = || DecodeError::BadString {
            message: self.message,
            offset: self.pos,
        };
        let len = rest.iter().position(|&b| b == 0).ok_or_else(bad)?;
        let s = rest
            .get(..len)
            .and_then(|s| std::str::from_utf8(s).ok())
            .ok_or_else(bad)?;
        // Skip the string and its NUL, which `position` found, so this stays within `data`.
        self.pos = self.pos.saturating_add(len).saturating_add(1);
        Ok(s.to_owned())
    }

    /// A one-byte tag that must be `want`.
    #[inline]
    fn expect_tag(&mut self, want: u8) -> Result<(), DecodeError> {
        let at = self.pos;
        match self.u8()? {
            tag if tag == want => Ok(()),
            tag => Err(self.unexpected_tag(tag, at)),
        }
    }

    /// TupleData: Int16 column count, then per column `n` (null), `u` (unchanged TOAST), or `t`/`b`
    /// followed by an Int32 length and that many bytes.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = usize::from(self.u16()?);
        // Every column takes at least its one-byte kind.
        self.ensure(count)?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let at = self.pos;
            let value = match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.len_i32()?;
                    Value::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.len_i32()?;
                    Value::Binary(self.bytes(len)?)
                }
                tag => return Err(self.unexpected_tag(tag, at)),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
mod tests {
    use super::*;

    /// Builds message bytes by hand, big-endian like Postgres.
    struct W(Vec<u8>);

    impl W {
        fn new(tag: u8) -> Self {
            W(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn cstr(self, v: &str) -> Self {
            self.raw(v.as_bytes()).u8(0)
        }
        /// A `t` column value.
        fn text(self, v: &[u8]) -> Self {
            self.u8(b't').i32(len(v)).raw(v)
        }
        /// A `b` column value.
        fn bin(self, v: &[u8]) -> Self {
            self.u8(b'b').i32(len(v)).raw(v)
        }
        fn done(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn len(v: &[u8]) -> i32 {
        i32::try_from(v.len()).expect("test value too long")
    }

    fn tuple(v: &W, t: &Tuple) -> W {
        let mut w = W(v.0.clone()).u16(u16::try_from(t.0.len()).expect("too many columns"));
        for value in &t.0 {
            w = match value {
                Value::Null => w.u8(b'n'),
                Value::UnchangedToast => w.u8(b'u'),
                Value::Text(b) => w.text(b),
                Value::Binary(b) => w.bin(b),
            };
        }
        w
    }

    /// The inverse of [`decode`], for round-trip tests.
    fn encode(m: &Message) -> Bytes {
        let w = match m {
            Message::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => W::new(b'B')
                .u64(*final_lsn)
                .i64(*commit_time_micros)
                .u32(*xid),
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time_micros,
            } => W::new(b'C')
                .u8(*flags)
                .u64(*commit_lsn)
                .u64(*end_lsn)
                .i64(*commit_time_micros),
            Message::Origin { commit_lsn, name } => W::new(b'O').u64(*commit_lsn).cstr(name),
            Message::Relation(r) => {
                let n = u16::try_from(r.columns.len()).expect("too many columns");
                let mut w = W::new(b'R')
                    .u32(r.id)
                    .cstr(&r.namespace)
                    .cstr(&r.name)
                    .u8(r.replica_identity)
                    .u16(n);
                for c in &r.columns {
                    w = w
                        .u8(c.flags)
                        .cstr(&c.name)
                        .u32(c.type_oid)
                        .i32(c.type_modifier);
                }
                w
            }
            Message::Type {
                id,
                namespace,
                name,
            } => W::new(b'Y').u32(*id).cstr(namespace).cstr(name),
            Message::Insert { relation_id, new } => {
                tuple(&W::new(b'I').u32(*relation_id).u8(b'N'), new)
            }
            Message::Update {
                relation_id,
                old,
                old_is_key,
                new,
            } => {
                let mut w = W::new(b'U').u32(*relation_id);
                if let Some(old) = old {
                    w = tuple(&w.u8(if *old_is_key { b'K' } else { b'O' }), old);
                }
                tuple(&w.u8(b'N'), new)
            }
            Message::Delete {
                relation_id,
                old,
                old_is_key,
            } => {
                let w = W::new(b'D')
                    .u32(*relation_id)
                    .u8(if *old_is_key { b'K' } else { b'O' });
                tuple(&w, old)
            }
            Message::Truncate {
                options,
                relation_ids,
            } => {
                let mut w = W::new(b'T').i32(len_of(relation_ids)).u8(*options);
                for id in relation_ids {
                    w = w.u32(*id);
                }
                w
            }
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            } => W::new(b'M')
                .u8(u8::from(*transactional))
                .u64(*lsn)
                .cstr(prefix)
                .i32(len(content))
                .raw(content),
        };
        w.done()
    }

    fn len_of<T>(v: &[T]) -> i32 {
        i32::try_from(v.len()).expect("test list too long")
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// `bytes` decodes to `expected`, and `expected` encodes back to `bytes`.
    #[track_caller]
    fn check(bytes: Bytes, expected: Message) {
        assert_eq!(decode(&bytes), Ok(expected.clone()), "decoding {bytes:?}");
        assert_eq!(encode(&expected), bytes, "encoding {expected:?}");
    }

    #[track_caller]
    fn check_err(bytes: Bytes, expected: DecodeError) {
        assert_eq!(decode(&bytes), Err(expected), "decoding {bytes:?}");
    }

    #[test]
    fn decodes_every_message_type() {
        check(
            W::new(b'B')
                .u64(0x0000_0001_0000_0010)
                .i64(-5)
                .u32(742)
                .done(),
            Message::Begin {
                final_lsn: 0x0000_0001_0000_0010,
                commit_time_micros: -5,
                xid: 742,
            },
        );
        check(
            W::new(b'C')
                .u8(0)
                .u64(17)
                .u64(u64::MAX)
                .i64(i64::MAX)
                .done(),
            Message::Commit {
                flags: 0,
                commit_lsn: 17,
                end_lsn: u64::MAX,
                commit_time_micros: i64::MAX,
            },
        );
        check(
            W::new(b'O').u64(99).cstr("upstream").done(),
            Message::Origin {
                commit_lsn: 99,
                name: "upstream".into(),
            },
        );
        check(
            W::new(b'R')
                .u32(16384)
                .cstr("public")
                .cstr("café")
                .u8(b'd')
                .u16(2)
                .u8(1)
                .cstr("id")
                .u32(23)
                .i32(-1)
                .u8(0)
                .cstr("name")
                .u32(1043)
                .i32(104)
                .done(),
            Message::Relation(Relation {
                id: 16384,
                namespace: "public".into(),
                name: "café".into(),
                replica_identity: b'd',
                columns: vec![
                    Column {
                        flags: 1,
                        name: "id".into(),
                        type_oid: 23,
                        type_modifier: -1,
                    },
                    Column {
                        flags: 0,
                        name: "name".into(),
                        type_oid: 1043,
                        type_modifier: 104,
                    },
                ],
            }),
        );
        // A table with no columns, in pg_catalog (sent as an empty namespace).
        check(
            W::new(b'R')
                .u32(1)
                .cstr("")
                .cstr("t")
                .u8(b'n')
                .u16(0)
                .done(),
            Message::Relation(Relation {
                id: 1,
                namespace: String::new(),
                name: "t".into(),
                replica_identity: b'n',
                columns: vec![],
            }),
        );
        check(
            W::new(b'Y').u32(70000).cstr("public").cstr("mood").done(),
            Message::Type {
                id: 70000,
                namespace: "public".into(),
                name: "mood".into(),
            },
        );
        check(
            W::new(b'I')
                .u32(16384)
                .u8(b'N')
                .u16(4)
                .text(b"42")
                .u8(b'n')
                .u8(b'u')
                .bin(&[0, 1, 2])
                .done(),
            Message::Insert {
                relation_id: 16384,
                new: Tuple(vec![
                    text("42"),
                    Value::Null,
                    Value::UnchangedToast,
                    Value::Binary(Bytes::from_static(&[0, 1, 2])),
                ]),
            },
        );
        check(
            W::new(b'I')
                .u32(7)
                .u8(b'N')
                .u16(2)
                .text(b"")
                .text("é\0x".as_bytes())
                .done(),
            Message::Insert {
                relation_id: 7,
                new: Tuple(vec![text(""), text("é\0x")]),
            },
        );
        check(
            W::new(b'I').u32(7).u8(b'N').u16(0).done(),
            Message::Insert {
                relation_id: 7,
                new: Tuple(vec![]),
            },
        );
        // Update without an old tuple (key unchanged, replica identity DEFAULT).
        check(
            W::new(b'U')
                .u32(5)
                .u8(b'N')
                .u16(2)
                .text(b"1")
                .u8(b'u')
                .done(),
            Message::Update {
                relation_id: 5,
                old: None,
                old_is_key: false,
                new: Tuple(vec![text("1"), Value::UnchangedToast]),
            },
        );
        // Update that changed the key: the old key comes first.
        check(
            W::new(b'U')
                .u32(5)
                .u8(b'K')
                .u16(2)
                .text(b"1")
                .u8(b'n')
                .u8(b'N')
                .u16(2)
                .text(b"2")
                .text(b"x")
                .done(),
            Message::Update {
                relation_id: 5,
                old: Some(Tuple(vec![text("1"), Value::Null])),
                old_is_key: true,
                new: Tuple(vec![text("2"), text("x")]),
            },
        );
        // Update with REPLICA IDENTITY FULL: the whole old row.
        check(
            W::new(b'U')
                .u32(5)
                .u8(b'O')
                .u16(2)
                .text(b"1")
                .text(b"w")
                .u8(b'N')
                .u16(2)
                .text(b"1")
                .text(b"x")
                .done(),
            Message::Update {
                relation_id: 5,
                old: Some(Tuple(vec![text("1"), text("w")])),
                old_is_key: false,
                new: Tuple(vec![text("1"), text("x")]),
            },
        );
        check(
            W::new(b'D')
                .u32(5)
                .u8(b'K')
                .u16(2)
                .text(b"1")
                .u8(b'n')
                .done(),
            Message::Delete {
                relation_id: 5,
                old: Tuple(vec![text("1"), Value::Null]),
                old_is_key: true,
            },
        );
        check(
            W::new(b'D')
                .u32(5)
                .u8(b'O')
                .u16(2)
                .text(b"1")
                .text(b"w")
                .done(),
            Message::Delete {
                relation_id: 5,
                old: Tuple(vec![text("1"), text("w")]),
                old_is_key: false,
            },
        );
        check(
            W::new(b'T').i32(3).u8(3).u32(1).u32(2).u32(u32::MAX).done(),
            Message::Truncate {
                options: 3,
                relation_ids: vec![1, 2, u32::MAX],
            },
        );
        check(
            W::new(b'T').i32(0).u8(0).done(),
            Message::Truncate {
                options: 0,
                relation_ids: vec![],
            },
        );
        check(
            W::new(b'M')
                .u8(1)
                .u64(123)
                .cstr("kck")
                .i32(3)
                .raw(&[0, 0xff, b'a'])
                .done(),
            Message::LogicalMessage {
                transactional: true,
                lsn: 123,
                prefix: "kck".into(),
                content: Bytes::from_static(&[0, 0xff, b'a']),
            },
        );
        check(
            W::new(b'M').u8(0).u64(0).cstr("").i32(0).done(),
            Message::LogicalMessage {
                transactional: false,
                lsn: 0,
                prefix: String::new(),
                content: Bytes::new(),
            },
        );
    }

    #[test]
    fn values_are_zero_copy_slices_of_the_input() {
        let data = W::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(2)
            .text(b"hello")
            .bin(b"world")
            .done();
        let Ok(Message::Insert { new, .. }) = decode(&data) else {
            panic!("did not decode")
        };
        let range = data.as_ptr_range();
        for value in &new.0 {
            let (Value::Text(b) | Value::Binary(b)) = value else {
                panic!("unexpected {value:?}")
            };
            assert!(range.contains(&b.as_ptr()), "{value:?} was copied");
        }
        let data = W::new(b'M').u8(0).u64(0).cstr("p").i32(2).raw(b"hi").done();
        let Ok(Message::LogicalMessage { content, .. }) = decode(&data) else {
            panic!()
        };
        assert!(
            data.as_ptr_range().contains(&content.as_ptr()),
            "content was copied"
        );
    }

    #[test]
    fn rejects_empty_and_unknown_messages() {
        check_err(Bytes::new(), DecodeError::Empty);
        // Streaming (v2) and two-phase (v3) messages are not part of protocol v1.
        for tag in [
            b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p', b'X', 0, 0xff,
        ] {
            check_err(
                W::new(tag).u32(1).done(),
                DecodeError::UnknownMessage(char::from(tag)),
            );
        }
    }

    #[test]
    fn rejects_truncated_messages() {
        use DecodeError::Truncated;
        let t = |message, offset, needed| Truncated {
            message,
            offset,
            needed,
        };
        check_err(W::new(b'B').done(), t('B', 1, 8));
        check_err(W::new(b'B').u64(1).i64(2).u8(0).done(), t('B', 17, 3));
        check_err(W::new(b'C').done(), t('C', 1, 1));
        check_err(W::new(b'R').u32(1).cstr("s").cstr("t").done(), t('R', 9, 1));
        check_err(
            W::new(b'R')
                .u32(1)
                .cstr("s")
                .cstr("t")
                .u8(b'd')
                .u8(0)
                .done(),
            t('R', 10, 1),
        );
        // The column count promises more than the message holds.
        check_err(
            W::new(b'R')
                .u32(1)
                .cstr("s")
                .cstr("t")
                .u8(b'd')
                .u16(2)
                .done(),
            t('R', 12, 20),
        );
        check_err(
            W::new(b'R')
                .u32(1)
                .cstr("")
                .cstr("")
                .u8(b'd')
                .u16(u16::MAX)
                .u8(0)
                .done(),
            t('R', 10, 655_349),
        );
        check_err(W::new(b'I').u32(1).done(), t('I', 5, 1));
        check_err(W::new(b'I').u32(1).u8(b'N').done(), t('I', 6, 2));
        check_err(
            W::new(b'I').u32(1).u8(b'N').u16(3).u8(b'n').done(),
            t('I', 8, 2),
        );
        check_err(
            W::new(b'I').u32(1).u8(b'N').u16(1).u8(b't').u8(0).done(),
            t('I', 9, 3),
        );
        check_err(
            W::new(b'I')
                .u32(1)
                .u8(b'N')
                .u16(1)
                .text(b"abc")
                .done()
                .slice(..14),
            t('I', 13, 2),
        );
        // A huge declared length or count fails cleanly, without allocating for it.
        check_err(
            W::new(b'I')
                .u32(1)
                .u8(b'N')
                .u16(1)
                .u8(b't')
                .i32(i32::MAX)
                .raw(b"ab")
                .done(),
            t('I', 13, 2_147_483_645),
        );
        check_err(
            W::new(b'I').u32(1).u8(b'N').u16(u16::MAX).u8(b'n').done(),
            t('I', 8, 65534),
        );
        check_err(
            W::new(b'T').i32(i32::MAX).u8(0).u32(1).done(),
            t('T', 6, 8_589_934_584),
        );
        check_err(
            W::new(b'M').u8(0).u64(1).cstr("p").i32(i32::MAX).done(),
            t('M', 16, 2_147_483_647),
        );
        // Update: old tuple but no new one.
        check_err(
            W::new(b'U').u32(1).u8(b'K').u16(1).text(b"1").done(),
            t('U', 14, 1),
        );
        check_err(W::new(b'D').u32(1).u8(b'K').done(), t('D', 6, 2));
    }

    #[test]
    fn rejects_trailing_bytes() {
        check_err(
            W::new(b'B').u64(1).i64(2).u32(3).u8(0).done(),
            DecodeError::TrailingBytes {
                message: 'B',
                extra: 1,
            },
        );
        check_err(
            W::new(b'I')
                .u32(1)
                .u8(b'N')
                .u16(1)
                .text(b"a")
                .raw(b"xyz")
                .done(),
            DecodeError::TrailingBytes {
                message: 'I',
                extra: 3,
            },
        );
        // A protocol v2 (streaming) Insert carries an xid first; read as v1 the relation id is the
        // xid and the 'N' tag is not where it should be.
        check_err(
            W::new(b'I').u32(900).u32(1).u8(b'N').u16(0).done(),
            DecodeError::UnexpectedTag {
                message: 'I',
                tag: '\0',
                offset: 5,
            },
        );
    }

    #[test]
    fn rejects_bad_strings() {
        let bad = |message, offset| DecodeError::BadString { message, offset };
        // No NUL terminator.
        check_err(W::new(b'O').u64(1).raw(b"abc").done(), bad('O', 9));
        check_err(W::new(b'O').u64(1).done(), bad('O', 9));
        check_err(
            W::new(b'Y').u32(1).cstr("ns").raw(b"name").done(),
            bad('Y', 8),
        );
        // Not UTF-8.
        check_err(
            W::new(b'O').u64(1).raw(&[b'a', 0xff, 0]).done(),
            bad('O', 9),
        );
        check_err(
            W::new(b'R')
                .u32(1)
                .raw(&[0xc3, 0])
                .cstr("t")
                .u8(b'd')
                .u16(0)
                .done(),
            bad('R', 5),
        );
        check_err(
            W::new(b'R')
                .u32(1)
                .cstr("s")
                .cstr("t")
                .u8(b'd')
                .u16(1)
                .u8(0)
                .raw(&[0xed, 0xa0, 0x80, 0])
                .u32(23)
                .i32(-1)
                .done(),
            bad('R', 13),
        );
        check_err(W::new(b'M').u8(0).u64(1).raw(b"p").done(), bad('M', 10));
    }

    #[test]
    fn rejects_unexpected_tags() {
        let tag = |message, tag, offset| DecodeError::UnexpectedTag {
            message,
            tag,
            offset,
        };
        check_err(W::new(b'I').u32(1).u8(b'K').u16(0).done(), tag('I', 'K', 5));
        check_err(W::new(b'U').u32(1).u8(b'X').u16(0).done(), tag('U', 'X', 5));
        check_err(
            W::new(b'U').u32(1).u8(b'K').u16(0).u8(b'O').u16(0).done(),
            tag('U', 'O', 8),
        );
        check_err(W::new(b'D').u32(1).u8(b'N').u16(0).done(), tag('D', 'N', 5));
        check_err(
            W::new(b'I').u32(1).u8(b'N').u16(2).u8(b'n').u8(b'x').done(),
            tag('I', 'x', 9),
        );
        check_err(
            W::new(b'D').u32(1).u8(b'O').u16(1).u8(0).done(),
            tag('D', '\0', 8),
        );
    }

    #[test]
    fn rejects_negative_lengths() {
        let neg = |message, offset, length| DecodeError::BadLength {
            message,
            offset,
            length,
        };
        check_err(
            W::new(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).done(),
            neg('I', 9, -1),
        );
        check_err(
            W::new(b'I')
                .u32(1)
                .u8(b'N')
                .u16(1)
                .u8(b'b')
                .i32(i32::MIN)
                .done(),
            neg('I', 9, i32::MIN),
        );
        check_err(W::new(b'T').i32(-2).u8(0).done(), neg('T', 1, -2));
        check_err(
            W::new(b'M').u8(0).u64(1).cstr("p").i32(-7).done(),
            neg('M', 12, -7),
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        let shown = |bytes: Bytes| decode(&bytes).expect_err("should fail").to_string();
        assert_eq!(shown(Bytes::new()), "empty pgoutput message");
        assert_eq!(
            shown(W::new(b'S').done()),
            "unknown pgoutput message type 'S'"
        );
        assert_eq!(
            shown(W::new(b'B').u32(0).done()),
            "pgoutput message 'B' ends early: needed 4 more bytes at offset 1"
        );
        assert_eq!(
            shown(W::new(b'T').i32(0).u8(0).u8(9).done()),
            "pgoutput message 'T' has 1 bytes left over after decoding"
        );
        assert_eq!(
            shown(W::new(b'O').u64(0).raw(b"x").done()),
            "pgoutput message 'O' has a string that is not NUL-terminated UTF-8 at offset 9"
        );
        assert_eq!(
            shown(W::new(b'D').u32(0).u8(b'N').done()),
            "pgoutput message 'D' has unexpected tag 'N' at offset 5"
        );
        assert_eq!(
            shown(W::new(b'T').i32(-1).done()),
            "pgoutput message 'T' has negative length or count -1 at offset 1"
        );
    }

    /// xorshift64*: small, deterministic, good enough to generate test inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        fn bool(&mut self) -> bool {
            self.next() & 1 == 1
        }
        fn bytes(&mut self, max: usize) -> Bytes {
            let n = self.below(max + 1);
            (0..n).map(|_| self.byte()).collect()
        }
        fn string(&mut self) -> String {
            const PIECES: &[&str] = &["a", "Z", "_", " ", "0", "é", "日", "🦀", "\u{7f}"];
            (0..self.below(8))
                .map(|_| PIECES[self.below(PIECES.len())])
                .collect()
        }
        fn tuple(&mut self) -> Tuple {
            Tuple(
                (0..self.below(6))
                    .map(|_| match self.below(4) {
                        0 => Value::Null,
                        1 => Value::UnchangedToast,
                        2 => Value::Text(self.bytes(12)),
                        _ => Value::Binary(self.bytes(12)),
                    })
                    .collect(),
            )
        }
        fn message(&mut self) -> Message {
            match self.below(10) {
                0 => Message::Begin {
                    final_lsn: self.next(),
                    commit_time_micros: self.next() as i64,
                    xid: self.next() as u32,
                },
                1 => Message::Commit {
                    flags: self.byte(),
                    commit_lsn: self.next(),
                    end_lsn: self.next(),
                    commit_time_micros: self.next() as i64,
                },
                2 => Message::Origin {
                    commit_lsn: self.next(),
                    name: self.string(),
                },
                3 => Message::Relation(Relation {
                    id: self.next() as u32,
                    namespace: self.string(),
                    name: self.string(),
                    replica_identity: b"dnfi"[self.below(4)],
                    columns: (0..self.below(5))
                        .map(|_| Column {
                            flags: self.byte() & 1,
                            name: self.string(),
                            type_oid: self.next() as u32,
                            type_modifier: self.next() as i32,
                        })
                        .collect(),
                }),
                4 => Message::Type {
                    id: self.next() as u32,
                    namespace: self.string(),
                    name: self.string(),
                },
                5 => Message::Insert {
                    relation_id: self.next() as u32,
                    new: self.tuple(),
                },
                6 => {
                    let old = self.bool().then(|| self.tuple());
                    let old_is_key = old.is_some() && self.bool();
                    Message::Update {
                        relation_id: self.next() as u32,
                        old,
                        old_is_key,
                        new: self.tuple(),
                    }
                }
                7 => Message::Delete {
                    relation_id: self.next() as u32,
                    old: self.tuple(),
                    old_is_key: self.bool(),
                },
                8 => Message::Truncate {
                    options: self.byte() & 3,
                    relation_ids: (0..self.below(5)).map(|_| self.next() as u32).collect(),
                },
                _ => Message::LogicalMessage {
                    transactional: self.bool(),
                    lsn: self.next(),
                    prefix: self.string(),
                    content: self.bytes(20),
                },
            }
        }
    }

    #[test]
    fn random_messages_round_trip_and_every_prefix_fails() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5000 {
            let message = rng.message();
            let bytes = encode(&message);
            assert_eq!(
                decode(&bytes),
                Ok(message.clone()),
                "round trip of {bytes:?}"
            );
            for cut in 0..bytes.len() {
                assert!(
                    decode(&bytes.slice(..cut)).is_err(),
                    "prefix {cut} of {bytes:?} decoded"
                );
            }
            let mut longer = bytes.to_vec();
            longer.push(rng.byte());
            let extra = DecodeError::TrailingBytes {
                message: char::from(bytes[0]),
                extra: 1,
            };
            assert_eq!(decode(&Bytes::from(longer)), Err(extra));
        }
    }

    /// What a batch of arbitrary inputs decoded to, to show that the inputs reach every error path.
    #[derive(Default)]
    struct Outcomes {
        ok: usize,
        errors: std::collections::HashSet<std::mem::Discriminant<DecodeError>>,
    }

    impl Outcomes {
        /// Decode `bytes` (a panic fails the test). Whatever decodes must re-encode to something that
        /// decodes to the same value.
        #[track_caller]
        fn decode(&mut self, bytes: &Bytes) {
            match decode(bytes) {
                Ok(message) => {
                    self.ok += 1;
                    assert_eq!(decode(&encode(&message)), Ok(message), "from {bytes:?}");
                }
                Err(e) => {
                    self.errors.insert(std::mem::discriminant(&e));
                }
            }
        }

        #[track_caller]
        fn assert_varied(&self, min_ok: usize) {
            assert!(self.ok >= min_ok, "only {} inputs decoded", self.ok);
            assert_eq!(
                self.errors.len(),
                7,
                "not all 7 DecodeError variants were hit"
            );
        }
    }

    #[test]
    fn never_panics_on_random_bytes() {
        const TAGS: &[u8] = b"BCORYIUDTM";
        const TUPLE_BYTES: &[u8] = b"NKOntub";
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut outcomes = Outcomes::default();
        for _ in 0..200_000 {
            let n = rng.below(48);
            let mut v: Vec<u8> = (0..n)
                .map(|_| match rng.below(4) {
                    // Bias towards bytes that steer the decoder deeper: tags, small counts, NULs.
                    0 => TUPLE_BYTES[rng.below(TUPLE_BYTES.len())],
                    1 => rng.byte() & 3,
                    _ => rng.byte(),
                })
                .collect();
            if let Some(first) = v.first_mut()
                && rng.below(8) != 0
            {
                *first = TAGS[rng.below(TAGS.len())];
            }
            outcomes.decode(&Bytes::from(v));
        }
        outcomes.assert_varied(100);
    }

    #[test]
    fn never_panics_on_mutated_messages() {
        const SPECIAL: &[[u8; 4]] = &[
            [0xff; 4],
            [0x7f, 0xff, 0xff, 0xff],
            [0x80, 0, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0xff, 0xff],
        ];
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let mut outcomes = Outcomes::default();
        for _ in 0..200_000 {
            let mut v = encode(&rng.message()).to_vec();
            for _ in 0..=rng.below(3) {
                let at = rng.below(v.len() + 1);
                match rng.below(6) {
                    0 => {
                        if let Some(b) = v.get_mut(at) {
                            *b = rng.byte();
                        }
                    }
                    1 => v.truncate(at),
                    2 => v.insert(at, rng.byte()),
                    3 => {
                        if at < v.len() {
                            v.remove(at);
                        }
                    }
                    4 => {
                        let special = SPECIAL[rng.below(SPECIAL.len())];
                        for (i, b) in special.into_iter().enumerate() {
                            if let Some(slot) = v.get_mut(at + i) {
                                *slot = b;
                            }
                        }
                    }
                    _ => {
                        if let Some(b) = v.get_mut(at) {
                            *b ^= 1 << rng.below(8);
                        }
                    }
                }
            }
            outcomes.decode(&Bytes::from(v));
        }
        outcomes.assert_varied(10_000);
    }
}
