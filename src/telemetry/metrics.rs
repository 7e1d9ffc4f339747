//! Prometheus metrics: every name kck exports is a constant here, and every recording goes through
//! [`Metrics`], so names and labels are never scattered literals.
//!
//! Each running kck has its own registry (a `PrometheusRecorder` used as a *local* recorder, not the
//! process-global one), so two instances in one process (the tests) do not mix their numbers. Event
//! counters (refreshes, fetches, HTTP answers) are recorded where the event happens; gauges that describe
//! state (lag, queue, slot) are set by the slot monitor and again just before each `/metrics` render, so a
//! scrape always sees fresh values. Counters that the replication stream already keeps as atomics
//! ([`crate::replication::StreamStats`]) are copied in at render time.
//!
//! Rendering drains histogram samples; [`Metrics::upkeep`] (run by the monitor) does the same when nobody
//! scrapes, so memory stays bounded.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use metrics::{Counter, Histogram};

use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Bytes of WAL the server wrote that kck has not acknowledged yet (server WAL position minus the slot's
/// confirmed position).
pub const REPLICATION_LAG_BYTES: &str = "kck_replication_lag_bytes";
/// How long ago the server wrote the oldest WAL kck has not acknowledged yet (0 when caught up). Its
/// resolution is the monitor interval.
pub const REPLICATION_LAG_SECONDS: &str = "kck_replication_lag_seconds";
/// 1 while a replication session holds the slot and streams.
pub const REPLICATION_STREAMING: &str = "kck_replication_streaming";
/// Transactions decoded from the slot.
pub const REPLICATION_TRANSACTIONS: &str = "kck_replication_transactions_total";
/// Row changes (INSERT, UPDATE, DELETE) decoded from the slot.
pub const REPLICATION_EVENTS: &str = "kck_replication_events_total";
/// Refresh tasks the stream queued (before coalescing).
pub const REPLICATION_TASKS_QUEUED: &str = "kck_replication_tasks_queued_total";
/// WAL the server keeps for the slot (current WAL position minus the slot's restart LSN).
pub const SLOT_RETAINED_WAL_BYTES: &str = "kck_slot_retained_wal_bytes";
/// Bytes that can still be written before the slot is in danger of being invalidated (`safe_wal_size`);
/// absent when `max_slot_wal_keep_size` is -1.
pub const SLOT_SAFE_WAL_BYTES: &str = "kck_slot_safe_wal_bytes";
/// 1 when the slot exists and a session (kck) holds it.
pub const SLOT_ACTIVE: &str = "kck_slot_active";
/// 1 for the slot's current `wal_status` (label `status`: reserved, extended, unreserved, lost, missing).
pub const SLOT_WAL_STATUS: &str = "kck_slot_wal_status";
/// Refresh tasks waiting in the queue (claimed ones included).
pub const QUEUE_DEPTH: &str = "kck_queue_depth";
/// Refresh tasks being worked on.
pub const QUEUE_CLAIMED: &str = "kck_queue_claimed";
/// Refresh tasks parked after failing the same way `refresh.park_after` times (they do not hold
/// freshness waits; `/status` lists the first ones).
pub const QUEUE_PARKED: &str = "kck_queue_parked";
/// Age of the oldest task in the queue (0 when empty).
pub const QUEUE_OLDEST_AGE_SECONDS: &str = "kck_queue_oldest_age_seconds";
/// 1 when the three queue gauges are estimates (the scylla store counts instead of scanning), else 0.
pub const QUEUE_STATS_ESTIMATED: &str = "kck_queue_stats_estimated";
/// Refresh tasks finished, by `primer` and `outcome`: `ok` (value stored, or lookup / key listing done),
/// `kept_newer` (a newer value was already stored), `not_cached` (the key is no longer cached),
/// `not_visible` (the change was not visible yet: retried), `failed` (retried with backoff), `parked`
/// (failed `refresh.park_after` times the same way: retried every `refresh.parked_retry`).
pub const REFRESHES: &str = "kck_refreshes_total";
/// Time to refresh one key (from claim to result: visibility wait and the primer query), by `primer`.
pub const REFRESH_DURATION_SECONDS: &str = "kck_refresh_duration_seconds";
/// Consecutive failed refreshes of a primer (0 when its last refresh worked).
pub const REFRESH_CONSECUTIVE_FAILURES: &str = "kck_refresh_consecutive_failures";
/// The `result` label values of [`FETCHES`] (see `ops::http::measure`).
pub const FETCH_RESULTS: [&str; 6] = ["hit", "stale", "miss", "not_cached", "bad_request", "error"];
/// `/fetch` answers by `result`: `hit`, `miss` (computed on the spot), `not_cached` (404), `error`.
pub const FETCHES: &str = "kck_fetches_total";
/// `/fetch` latency by `result`.
pub const FETCH_DURATION_SECONDS: &str = "kck_fetch_duration_seconds";
/// HTTP answers by `route` (the route pattern, e.g. `/fetch/{*key}`) and `status`.
pub const HTTP_RESPONSES: &str = "kck_http_responses_total";
/// Cached keys per `primer` (counted at most every few seconds).
pub const PRIMER_KEYS: &str = "kck_primer_keys";
/// Runs of a job by this process, by job and outcome (`ok`, `failed`).
pub const JOB_RUNS: &str = "kck_job_runs_total";
/// When a job last started in this process (Unix seconds).
pub const JOB_LAST_RUN_TIMESTAMP_SECONDS: &str = "kck_job_last_run_timestamp_seconds";
/// How long a job's last run in this process took.
pub const JOB_LAST_DURATION_SECONDS: &str = "kck_job_last_duration_seconds";
/// 1 when a job's last run in this process failed.
pub const JOB_LAST_FAILED: &str = "kck_job_last_failed";
/// 1 while the replication reader waits because the queue is at `refresh.max_queue`.
pub const QUEUE_BACKPRESSURE: &str = "kck_queue_backpressure";
/// Times the replication reader waited for the queue to shrink.
pub const QUEUE_BACKPRESSURE_WAITS: &str = "kck_queue_backpressure_waits_total";
/// Keys the store holds (registered or stored), for a store with a capacity (embedded).
pub const STORE_KEYS: &str = "kck_store_keys";
/// Bytes the store charges for them (`store.max_bytes` bounds it; the file is larger).
pub const STORE_BYTES: &str = "kck_store_bytes";
/// `store.max_entries`.
pub const STORE_MAX_KEYS: &str = "kck_store_max_keys";
/// `store.max_bytes`.
pub const STORE_MAX_BYTES: &str = "kck_store_max_bytes";
/// The size of the store's file.
pub const STORE_FILE_BYTES: &str = "kck_store_file_bytes";
/// Keys evicted (least recently used) to keep the store within its capacity.
pub const STORE_EVICTIONS: &str = "kck_store_evictions_total";
/// Compactions of the store's file (space freed by removals and evictions given back).
pub const STORE_COMPACTIONS: &str = "kck_store_compactions_total";
/// Live-key streams (`/subscribe`) open now.
pub const SUBSCRIBERS: &str = "kck_subscribers";
/// Distinct keys the open streams follow.
pub const SUBSCRIBED_KEYS: &str = "kck_subscribed_keys";
/// Events sent on live-key streams (heartbeats not counted).
pub const SUBSCRIBE_EVENTS: &str = "kck_subscribe_events_total";
/// `resync` events: a client too slow to read got every key again instead of a growing buffer.
pub const SUBSCRIBE_RESYNCS: &str = "kck_subscribe_resyncs_total";
/// Live-key streams ended because their token expired.
pub const SUBSCRIBE_EXPIRED: &str = "kck_subscribe_expired_total";
/// Always 1, with the `version` label.
pub const BUILD_INFO: &str = "kck_build_info";

/// The `wal_status` values a slot can have, and `missing` for no slot.
pub const WAL_STATUSES: [&str; 5] = ["reserved", "extended", "unreserved", "lost", "missing"];

const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One job's counters, as [`Metrics::job`] exports them.
#[derive(Debug, Clone, Copy)]
pub struct JobReading<'a> {
    pub name: &'a str,
    /// Runs started and finished, and of those, failed.
    pub runs: u64,
    pub failures: u64,
    /// When it last started (ms since the Unix epoch) and how long that run took.
    pub last_started_ms: Option<i64>,
    pub last_duration_ms: Option<u64>,
    /// Whether the last run failed.
    pub failed: bool,
}

/// One kck's metrics registry. See the module docs.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// `/fetch` answers' counter and histogram handles by result, registered once: looking a labelled
    /// metric up hashes its labels, and this is on every request's path.
    fetch_handles: Vec<(&'static str, Counter, Histogram)>,
    /// HTTP answer counters by route, then status (registered on first use).
    http_handles: RwLock<HashMap<String, HashMap<u16, Counter>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new();
        let builder = [REFRESH_DURATION_SECONDS, FETCH_DURATION_SECONDS]
            .iter()
            .fold(builder, |b, name| {
                // Only fails for empty buckets, and these are not empty.
                match b.set_buckets_for_metric(Matcher::Full(name.to_string()), &DURATION_BUCKETS) {
                    Ok(b) => b,
                    Err(_) => unreachable!("bucket list is not empty"),
                }
            });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let mut metrics = Metrics {
            recorder,
            handle,
            fetch_handles: Vec::new(),
            http_handles: RwLock::default(),
        };
        metrics.with(describe);
        metrics.fetch_handles = metrics.with(|| {
            FETCH_RESULTS
                .iter()
                .map(|&result| {
                    (
                        result,
                        metrics::counter!(FETCHES, "result" => result),
                        metrics::histogram!(FETCH_DURATION_SECONDS, "result" => result),
                    )
                })
                .collect()
        });
        metrics.with(|| {
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        });
        metrics
    }

    /// Run `f` with this registry as the recorder of the `metrics` macros.
    pub fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drain histogram samples into their buckets (bounded memory when nobody scrapes).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn gauge(&self, name: &'static str, value: f64) {
        self.with(|| metrics::gauge!(name).set(value));
    }

    /// Set a counter that is kept elsewhere as a running total.
    pub fn counter_total(&self, name: &'static str, value: u64) {
        self.with(|| metrics::counter!(name).absolute(value));
    }

    /// A refresh task finished.
    pub fn refresh(&self, primer: &str, outcome: &'static str, elapsed: Option<Duration>) {
        let primer = primer.to_string();
        self.with(|| {
            metrics::counter!(REFRESHES, "primer" => primer.clone(), "outcome" => outcome)
                .increment(1);
            if let Some(elapsed) = elapsed {
                metrics::histogram!(REFRESH_DURATION_SECONDS, "primer" => primer)
                    .record(elapsed.as_secs_f64());
            }
        });
    }

    pub fn consecutive_failures(&self, primer: &str, failures: u32) {
        let primer = primer.to_string();
        self.with(|| {
            metrics::gauge!(REFRESH_CONSECUTIVE_FAILURES, "primer" => primer).set(failures as f64)
        });
    }

    /// A job's state (the process worker's `Jobs::status`).
    pub fn job(&self, job: &JobReading<'_>) {
        let name = job.name.to_owned();
        self.with(|| {
            let ok = job.runs.saturating_sub(job.failures);
            metrics::counter!(JOB_RUNS, "job" => name.clone(), "outcome" => "ok").absolute(ok);
            metrics::counter!(JOB_RUNS, "job" => name.clone(), "outcome" => "failed")
                .absolute(job.failures);
            if let Some(at) = job.last_started_ms {
                metrics::gauge!(JOB_LAST_RUN_TIMESTAMP_SECONDS, "job" => name.clone())
                    .set(at as f64 / 1000.0);
            }
            if let Some(ms) = job.last_duration_ms {
                metrics::gauge!(JOB_LAST_DURATION_SECONDS, "job" => name.clone())
                    .set(ms as f64 / 1000.0);
            }
            metrics::gauge!(JOB_LAST_FAILED, "job" => name).set(if job.failed { 1.0 } else { 0.0 });
        });
    }

    pub fn primer_keys(&self, primer: &str, keys: u64) {
        let primer = primer.to_string();
        self.with(|| metrics::gauge!(PRIMER_KEYS, "primer" => primer).set(keys as f64));
    }

    /// A `/fetch` was answered.
    pub fn fetch(&self, result: &'static str, elapsed: Duration) {
        match self.fetch_handles.iter().find(|(r, _, _)| *r == result) {
            Some((_, counter, histogram)) => {
                counter.increment(1);
                histogram.record(elapsed.as_secs_f64());
            }
            None => self.with(|| {
                metrics::counter!(FETCHES, "result" => result).increment(1);
                metrics::histogram!(FETCH_DURATION_SECONDS, "result" => result)
                    .record(elapsed.as_secs_f64());
            }),
        }
    }

    /// Any HTTP request was answered.
    pub fn http(&self, route: &str, status: u16) {
        let known = self
            .http_handles
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
            .and_then(|by_status| by_status.get(&status))
            .cloned();
        let counter = known.unwrap_or_else(|| {
            let counter = self.with(|| {
                metrics::counter!(HTTP_RESPONSES, "route" => route.to_string(), "status" => status.to_string())
            });
            self.http_handles
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(route.to_string())
                .or_default()
                .insert(status, counter.clone());
            counter
        });
        counter.increment(1);
    }

    /// The slot's `wal_status` (or `missing`): 1 for it, 0 for the others.
    pub fn wal_status(&self, status: &str) {
        self.with(|| {
            for s in WAL_STATUSES {
                metrics::gauge!(SLOT_WAL_STATUS, "status" => s).set(if s == status {
                    1.0
                } else {
                    0.0
                });
            }
        });
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(JOB_RUNS, "Runs of a job by this process, by outcome.");
    describe_gauge!(
        JOB_LAST_RUN_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "When a job last started in this process (Unix time)."
    );
    describe_gauge!(
        JOB_LAST_DURATION_SECONDS,
        Unit::Seconds,
        "How long a job's last run in this process took."
    );
    describe_gauge!(
        JOB_LAST_FAILED,
        "1 when a job's last run in this process failed."
    );
    describe_gauge!(
        QUEUE_BACKPRESSURE,
        "1 while the replication reader waits because the queue holds refresh.max_queue tasks."
    );
    describe_gauge!(SUBSCRIBERS, "Live-key streams (/subscribe) open now.");
    describe_gauge!(
        SUBSCRIBED_KEYS,
        "Distinct keys the open live-key streams follow."
    );
    describe_counter!(
        SUBSCRIBE_EVENTS,
        "Events sent on live-key streams (heartbeats not counted)."
    );
    describe_counter!(
        SUBSCRIBE_RESYNCS,
        "resync events: a client too slow to read got every key again."
    );
    describe_counter!(
        SUBSCRIBE_EXPIRED,
        "Live-key streams ended because their token expired."
    );
    describe_counter!(
        QUEUE_BACKPRESSURE_WAITS,
        "Times the replication reader waited for the refresh queue to shrink."
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "WAL written by the server that kck has not acknowledged yet."
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "How long ago the server wrote the oldest WAL kck has not acknowledged (0 when caught up)."
    );
    describe_gauge!(
        REPLICATION_STREAMING,
        "1 while a replication session holds the slot and streams."
    );
    describe_counter!(REPLICATION_TRANSACTIONS, "Transactions decoded.");
    describe_counter!(REPLICATION_EVENTS, "Row changes decoded.");
    describe_counter!(
        REPLICATION_TASKS_QUEUED,
        "Refresh tasks queued by the stream."
    );
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL the server keeps for kck's slot."
    );
    describe_gauge!(
        SLOT_SAFE_WAL_BYTES,
        Unit::Bytes,
        "WAL that can still be written before the slot risks invalidation (max_slot_wal_keep_size)."
    );
    describe_gauge!(SLOT_ACTIVE, "1 when a session holds kck's slot.");
    describe_gauge!(SLOT_WAL_STATUS, "1 for the slot's current wal_status.");
    describe_gauge!(QUEUE_DEPTH, "Refresh tasks in the queue.");
    describe_gauge!(STORE_KEYS, "Keys the store holds (registered or stored).");
    describe_gauge!(
        STORE_BYTES,
        Unit::Bytes,
        "Bytes the store charges for its keys and entries."
    );
    describe_gauge!(
        STORE_MAX_KEYS,
        "The store's capacity in keys (store.max_entries)."
    );
    describe_gauge!(
        STORE_MAX_BYTES,
        Unit::Bytes,
        "The store's capacity in bytes (store.max_bytes)."
    );
    describe_gauge!(
        STORE_FILE_BYTES,
        Unit::Bytes,
        "The size of the store's file."
    );
    describe_counter!(
        STORE_EVICTIONS,
        "Keys evicted, least recently used first, to keep the store within its capacity."
    );
    describe_counter!(STORE_COMPACTIONS, "Compactions of the store's file.");
    describe_gauge!(QUEUE_CLAIMED, "Refresh tasks being worked on.");
    describe_gauge!(
        QUEUE_PARKED,
        "Refresh tasks parked after failing repeatedly (they do not hold freshness waits)."
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest queued refresh task."
    );
    describe_gauge!(
        QUEUE_STATS_ESTIMATED,
        "1 when kck_queue_depth, kck_queue_claimed and kck_queue_oldest_age_seconds are estimates (counters, not a scan)."
    );
    describe_counter!(REFRESHES, "Refresh tasks finished, by primer and outcome.");
    describe_histogram!(
        REFRESH_DURATION_SECONDS,
        Unit::Seconds,
        "Time to refresh one key."
    );
    describe_gauge!(
        REFRESH_CONSECUTIVE_FAILURES,
        "Consecutive failed refreshes of a primer."
    );
    describe_counter!(FETCHES, "Fetches by result (hit, miss, not_cached, error).");
    describe_histogram!(FETCH_DURATION_SECONDS, Unit::Seconds, "Fetch latency.");
    describe_counter!(HTTP_RESPONSES, "HTTP responses by route and status.");
    describe_gauge!(PRIMER_KEYS, "Cached keys per primer.");
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which kck runs."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_registries_do_not_mix_and_render_prometheus_text() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.fetch("hit", Duration::from_millis(2));
        a.fetch("hit", Duration::from_millis(3));
        b.fetch("miss", Duration::from_millis(40));
        a.refresh("user", "ok", Some(Duration::from_millis(5)));
        a.wal_status("reserved");
        let text = a.render();
        assert!(
            text.contains("kck_fetches_total{result=\"hit\"} 2"),
            "{text}"
        );
        // Every fetch result is registered up front (a series at 0, as Prometheus prefers); b's miss is
        // b's alone.
        assert!(
            text.contains("kck_fetches_total{result=\"miss\"} 0"),
            "{text}"
        );
        assert!(
            b.render().contains("kck_fetches_total{result=\"miss\"} 1"),
            "{}",
            b.render()
        );
        assert!(
            text.contains("kck_refreshes_total{primer=\"user\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kck_refresh_duration_seconds_bucket{primer=\"user\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kck_slot_wal_status{status=\"reserved\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kck_slot_wal_status{status=\"lost\"} 0"),
            "{text}"
        );
        assert!(text.contains("# HELP kck_fetches_total"), "{text}");
        assert!(text.contains("kck_build_info{version="), "{text}");
        assert!(b.render().contains("kck_fetches_total{result=\"miss\"} 1"));
    }
}
