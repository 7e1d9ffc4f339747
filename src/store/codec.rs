//! The byte encoding of an [`Entry`], one codec for every backend.
//!
//! An encoded entry is a 26-byte header and the value:
//!
//! | bytes | holds |
//! |-------|-------|
//! | 0     | the format, [`FORMAT`] |
//! | 1..9  | [`Layout::Compact`]: `lsn`; [`Layout::Ordered`]: `computed_at_ms` |
//! | 9..17 | [`Layout::Compact`]: `computed_at_ms`; [`Layout::Ordered`]: `lsn` |
//! | 17    | 1 if `expires_at_ms` is set, else 0 |
//! | 18..26| `expires_at_ms` (0 when not set) |
//! | 26..  | `value` |
//!
//! The two layouts differ only in the order of the two numbers and in how numbers are written; both are
//! stored on disk or in a database already, so neither changes.

use bytes::Bytes;

use super::{Entry, StoreError, StoreResult};
use crate::lsn::Lsn;

/// The format byte every encoded entry starts with.
pub const FORMAT: u8 = 1;
/// format (1), two numbers (8 + 8), expiry flag (1), expires_at_ms (8).
pub const HEADER: usize = 1 + 8 + 8 + 1 + 8;
const EXPIRY_FLAG: usize = 17;
const EXPIRES_AT: usize = 18;

/// How the header's numbers are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Little-endian, `lsn` first (the embedded store).
    Compact,
    /// Big-endian and order-preserving (signed numbers with their sign bit flipped), `computed_at_ms`
    /// first: comparing two encoded entries byte by byte compares their `computed_at_ms` first. ScyllaDB
    /// relies on it to break ties between entries of one LSN (see [`super::cql`]).
    Ordered,
}

impl Layout {
    fn lsn_at(self) -> usize {
        match self {
            Layout::Compact => 1,
            Layout::Ordered => 9,
        }
    }

    fn computed_at(self) -> usize {
        match self {
            Layout::Compact => 9,
            Layout::Ordered => 1,
        }
    }

    fn put_u64(self, v: u64) -> [u8; 8] {
        match self {
            Layout::Compact => v.to_le_bytes(),
            Layout::Ordered => v.to_be_bytes(),
        }
    }

    fn get_u64(self, b: [u8; 8]) -> u64 {
        match self {
            Layout::Compact => u64::from_le_bytes(b),
            Layout::Ordered => u64::from_be_bytes(b),
        }
    }

    fn put_i64(self, v: i64) -> [u8; 8] {
        match self {
            Layout::Compact => v.to_le_bytes(),
            Layout::Ordered => ((v as u64) ^ (1 << 63)).to_be_bytes(),
        }
    }

    fn get_i64(self, b: [u8; 8]) -> i64 {
        match self {
            Layout::Compact => i64::from_le_bytes(b),
            Layout::Ordered => (u64::from_be_bytes(b) ^ (1 << 63)) as i64,
        }
    }

    /// How many bytes `entry` encodes to.
    pub fn encoded_len(entry: &Entry) -> usize {
        HEADER + entry.value.len()
    }

    /// Encodes `entry` into `buf`, which must be [`Layout::encoded_len`] bytes long (a store that writes
    /// in place reserves exactly that).
    pub fn encode_into(self, entry: &Entry, buf: &mut [u8]) {
        assert_eq!(buf.len(), Layout::encoded_len(entry), "entry buffer size");
        buf[0] = FORMAT;
        let lsn = self.lsn_at();
        buf[lsn..lsn + 8].copy_from_slice(&self.put_u64(entry.lsn.0));
        let computed = self.computed_at();
        buf[computed..computed + 8].copy_from_slice(&self.put_i64(entry.computed_at_ms));
        buf[EXPIRY_FLAG] = u8::from(entry.expires_at_ms.is_some());
        buf[EXPIRES_AT..HEADER].copy_from_slice(&self.put_i64(entry.expires_at_ms.unwrap_or(0)));
        buf[HEADER..].copy_from_slice(&entry.value);
    }

    /// Encodes `entry`.
    pub fn encode(self, entry: &Entry) -> Vec<u8> {
        let mut buf = vec![0; Layout::encoded_len(entry)];
        self.encode_into(entry, &mut buf);
        buf
    }

    /// Decodes [`Layout::encode`]'s bytes; `key` names the entry in errors. Bytes that are not an entry
    /// give [`StoreError::Corrupt`].
    pub fn decode(self, key: &str, bytes: &[u8]) -> StoreResult<Entry> {
        let expires = check_header(key, bytes)?;
        Ok(Entry {
            lsn: Lsn(self.get_u64(take8(bytes, self.lsn_at()))),
            computed_at_ms: self.get_i64(take8(bytes, self.computed_at())),
            expires_at_ms: expires.then(|| self.get_i64(take8(bytes, EXPIRES_AT))),
            value: Bytes::copy_from_slice(&bytes[HEADER..]),
        })
    }

    /// Only the LSN of an encoded entry (checking its header as [`Layout::decode`] does).
    pub fn decode_lsn(self, key: &str, bytes: &[u8]) -> StoreResult<Lsn> {
        check_header(key, bytes)?;
        Ok(Lsn(self.get_u64(take8(bytes, self.lsn_at()))))
    }
}

/// Checks the format byte, the length and the expiry flag; answers whether the entry has an expiry.
fn check_header(key: &str, bytes: &[u8]) -> StoreResult<bool> {
    if bytes.len() < HEADER {
        return Err(StoreError::Corrupt(format!(
            "entry '{key}' is {} bytes, shorter than its {HEADER}-byte header",
            bytes.len()
        )));
    }
    if bytes[0] != FORMAT {
        return Err(StoreError::Corrupt(format!(
            "entry '{key}' has unknown format {} (expected {FORMAT})",
            bytes[0]
        )));
    }
    match bytes[EXPIRY_FLAG] {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(StoreError::Corrupt(format!(
            "entry '{key}' has an invalid expiry flag {other}"
        ))),
    }
}

/// The 8 bytes at `at` (the caller has checked the header's length).
fn take8(bytes: &[u8], at: usize) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    b
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const LAYOUTS: [Layout; 2] = [Layout::Compact, Layout::Ordered];

    /// An entry from its parts (for the tests of the layouts' users too).
    pub(crate) fn entry(lsn: u64, computed_at_ms: i64, expires: Option<i64>, value: &str) -> Entry {
        Entry {
            value: Bytes::from(value.to_owned()),
            lsn: Lsn(lsn),
            computed_at_ms,
            expires_at_ms: expires,
        }
    }

    #[test]
    fn entries_round_trip_in_both_layouts() {
        for layout in LAYOUTS {
            for e in [
                entry(
                    0x16_B374_D848,
                    1_700_000_000_123,
                    Some(1_700_000_060_123),
                    "{\"a\":1}",
                ),
                entry(0, 0, None, ""),
                entry(1, 1, None, "x"),
                entry(u64::MAX, i64::MIN, None, ""),
                entry(u64::MAX, i64::MIN, Some(i64::MIN), "x"),
                entry(1, i64::MAX, Some(i64::MAX), &"y".repeat(1000)),
                entry(7, -5, Some(-1), "neg"),
            ] {
                let bytes = layout.encode(&e);
                assert_eq!(bytes.len(), Layout::encoded_len(&e));
                assert_eq!(layout.decode("k", &bytes).unwrap(), e, "{layout:?}");
                assert_eq!(layout.decode_lsn("k", &bytes).unwrap(), e.lsn, "{layout:?}");
                let mut buf = vec![0; Layout::encoded_len(&e)];
                layout.encode_into(&e, &mut buf);
                assert_eq!(buf, bytes);
            }
        }
    }

    /// The bytes already on disk and in databases: the layouts must never change.
    #[test]
    fn the_layouts_are_pinned() {
        let e = entry(
            0x0102_0304_0506_0708,
            0x1112_1314_1516_1718,
            Some(0x2122_2324_2526_2728),
            "v",
        );
        let compact: Vec<u8> = [1u8]
            .into_iter()
            .chain([8, 7, 6, 5, 4, 3, 2, 1])
            .chain([0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11])
            .chain([1])
            .chain([0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21])
            .chain(*b"v")
            .collect();
        assert_eq!(Layout::Compact.encode(&e), compact);
        let ordered: Vec<u8> = [1u8]
            .into_iter()
            .chain([0x91, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18])
            .chain([1, 2, 3, 4, 5, 6, 7, 8])
            .chain([1])
            .chain([0xA1, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28])
            .chain(*b"v")
            .collect();
        assert_eq!(Layout::Ordered.encode(&e), ordered);
        // Without an expiry, its number is 0 as the layout writes it.
        let none = Layout::Ordered.encode(&entry(0, 0, None, ""));
        assert_eq!(none[17..], [0, 0x80, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Layout::Compact.encode(&entry(0, 0, None, ""))[17..], [0; 9]);
    }

    #[test]
    fn decoding_garbage_is_a_corrupt_error_naming_the_key() {
        for layout in LAYOUTS {
            let short = layout.decode("p/1", &[1, 2, 3]).unwrap_err().to_string();
            assert!(
                short.contains("'p/1'") && short.contains("shorter"),
                "{short}"
            );
            assert!(matches!(
                layout.decode("k", &[1, 2]),
                Err(StoreError::Corrupt(_))
            ));
            let mut bad = layout.encode(&entry(1, 1, None, "v"));
            bad[0] = 9;
            assert!(matches!(
                layout.decode("k", &bad),
                Err(StoreError::Corrupt(_))
            ));
            let mut bad_format = vec![0; HEADER];
            bad_format[0] = 9;
            assert!(matches!(
                layout.decode("k", &bad_format),
                Err(StoreError::Corrupt(_))
            ));
            let mut bad = layout.encode(&entry(1, 1, None, "v"));
            bad[17] = 2;
            assert!(matches!(
                layout.decode("k", &bad),
                Err(StoreError::Corrupt(_))
            ));
            let mut bad_flag = vec![0; HEADER];
            bad_flag[0] = FORMAT;
            bad_flag[17] = 2;
            assert!(matches!(
                layout.decode_lsn("k", &bad_flag),
                Err(StoreError::Corrupt(_))
            ));
        }
    }

    /// Whatever the bytes, decoding answers (an entry or an error) and never panics.
    #[test]
    fn decoding_any_bytes_never_panics() {
        let good = Layout::Compact.encode(&entry(5, 6, Some(7), "value"));
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for layout in LAYOUTS {
            for len in 0..good.len() {
                let cut = &good[..len];
                let _ = layout.decode("k", cut);
                let _ = layout.decode_lsn("k", cut);
            }
            for _ in 0..2000 {
                let len = (next() % 40) as usize;
                let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if len > 0 && next() % 2 == 0 {
                    bytes[0] = FORMAT;
                }
                if len > 17 && next() % 2 == 0 {
                    bytes[17] = (next() % 2) as u8;
                }
                let decoded = layout.decode("k", &bytes);
                assert_eq!(
                    decoded.as_ref().map(|e| e.lsn).ok(),
                    layout.decode_lsn("k", &bytes).ok()
                );
                if let Ok(e) = decoded {
                    assert_eq!(layout.decode("k", &layout.encode(&e)).unwrap(), e);
                }
            }
        }
    }
}
