//! A primer's refresh policy besides replication: schedules, expiry, warming, coldness, concurrency and
//! batching. Plain data: the triggers that act on it live in `crate::schedule` and `crate::refresh`.

use std::time::Duration;

/// What to do with an entry whose `ttl` ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExpiry {
    /// Recompute it if it is hot (read within `cold_after`), drop it if it is cold. The default.
    #[default]
    Refresh,
    /// Always drop it; the next fetch computes it as a miss.
    Drop,
}

/// A primer's batch query: many keys of the primer in one round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchQuery {
    /// Takes `$1`, an array of key parameter values; returns the primer's rows for all of them, each row
    /// led by `key_column`.
    pub query: String,
    /// The first column of `query`'s rows: the key parameter the row belongs to. Removed from the rows.
    pub key_column: String,
}

/// How and when one primer's keys are refreshed besides replication. Every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Recompute every cached key on this period.
    pub refresh_interval: Option<Duration>,
    /// An entry stops being fresh this long after it was computed.
    pub ttl: Option<Duration>,
    pub on_expiry: OnExpiry,
    /// An expired or invalidated entry may still be served (marked stale) for this long past its expiry
    /// while its refresh runs.
    pub stale_while_revalidate: Option<Duration>,
    /// A query (no parameters) listing key parameters to compute at boot.
    pub warm: Option<String>,
    /// A key nobody fetched for this long is dropped rather than recomputed (the primer's, else the global
    /// `refresh.cold_after`; `None`: never cold).
    pub cold_after: Option<Duration>,
    /// At most this many refreshes of this primer run at once (`None`: up to `refresh.workers`).
    pub concurrency: Option<usize>,
    pub batch: Option<BatchQuery>,
}
