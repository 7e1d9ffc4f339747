//! kck: a cache that keeps itself fresh from Postgres logical replication.
//!
//! See `ARCHITECTURE.md` for the code map. Data flows one way:
//! [`replication`] → [`deps`] → [`queue`] → [`refresh`] → [`store`] ← [`http`]. Writes go the other way
//! round, through Postgres: [`http`] → [`update`] → Postgres → [`replication`]; [`freshness`] lets a
//! request wait until the cache has caught up with one.

pub mod app;
pub(crate) mod auth;
pub mod cli;
pub(crate) mod clock;
pub mod config;
pub mod deps;
pub(crate) mod freshness;
pub mod http;
pub mod invalidate;
pub mod jobs;
#[cfg(test)]
mod layers;
pub mod listen;
pub mod lsn;
pub(crate) mod openapi;
pub mod ops;
pub mod pg;
pub mod plan;
pub(crate) mod primer;
pub mod queue;
pub mod refresh;
pub mod replication;
pub mod report;
pub(crate) mod schedule;
pub mod sqlscan;
pub mod store;
pub(crate) mod telemetry;
pub(crate) mod update;
pub mod visibility;

/// What the binary's log subscriber keeps (no bound parameter values; see [`telemetry::log_keeps`]).
pub use telemetry::log_keeps;

/// Entry points for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::primer::fuzz_key as key;
    pub use crate::update::fuzz_args as updater_args;
}
