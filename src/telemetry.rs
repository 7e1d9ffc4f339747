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

/// Whether kck's log keeps an event, whatever `KCK_LOG` asks for (the binary's subscriber applies it).
///
/// - tokio-postgres logs, at debug, every statement it runs "with parameters: [...]": the bound values
///   are key and row values (an updater's arguments), which kck's logs never carry. Its debug and trace
///   events are left out.
/// - The CQL driver logs every warning a database response carries, once per response (a tombstone
///   warning on a hot query is thousands of lines a minute); the scylla store logs them itself, once per
///   kind with a count, so the driver's own event is left out.
pub fn log_keeps(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    if target.starts_with("tokio_postgres") && *meta.level() >= tracing::Level::DEBUG {
        return false;
    }
    !(target.starts_with("scylla::") && meta.fields().field("warning").is_some())
}
