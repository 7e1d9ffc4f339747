//! What every part of a running kck reports into: the Prometheus metrics (names defined once, one registry
//! per instance), the recent problems an operator should see, and the `/fetch` answer counts. Everything
//! writes here; `crate::ops` reads it for `/metrics`, `/status` and the dashboard.

pub mod events;
pub mod metrics;

use std::sync::atomic::AtomicU64;

/// What every part of a running kck reports into: the metrics registry and the recent problems.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub metrics: metrics::Metrics,
    pub events: events::EventLog,
    pub fetches: FetchCounts,
}

/// `/fetch` answers so far, for the hit ratio.
#[derive(Debug, Default)]
pub struct FetchCounts {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub not_cached: AtomicU64,
    pub errors: AtomicU64,
}
