//! Log sequence numbers: positions in Postgres's write-ahead log.
//!
//! Every cache entry and every queued refresh carries one. The meaning kck gives an entry's LSN is exact:
//! *every committed change to a published table up to this LSN is visible in the snapshot the entry was
//! computed from*. That is what lets [`crate::store::Store::store_result`] refuse older computations.

use std::fmt;
use std::str::FromStr;

/// A WAL position, as Postgres prints it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text could not be read as an LSN.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "'{0}' is not an LSN (expected two hexadecimal numbers separated by '/', such as 16/B374D848)"
)]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(l: pgwire_replication::Lsn) -> Self {
        Lsn(l.as_u64())
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(l: Lsn) -> Self {
        pgwire_replication::Lsn::from_u64(l.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX] {
            let l = Lsn(v);
            assert_eq!(l.to_string().parse::<Lsn>(), Ok(l));
        }
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn(0)));
        assert!("16".parse::<Lsn>().is_err());
        assert!("/1".parse::<Lsn>().is_err());
        assert!("g/1".parse::<Lsn>().is_err());
        assert!("123456789/1".parse::<Lsn>().is_err());
    }
}
