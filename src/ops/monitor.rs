//! The slot monitor: a task that reads kck's slot every few seconds (default 2 s).
//!
//! Each reading gives the lag in bytes (server WAL position minus the slot's confirmed position), the WAL
//! the slot retains, its `wal_status` and `safe_wal_size`. The lag in seconds comes from the readings
//! themselves: each one records the server's WAL position and the time; the lag is the age of the oldest
//! reading whose position kck has not acknowledged yet (0 when it has acknowledged them all), so its
//! resolution is the monitor interval.
//!
//! The monitor logs, once per change, when the slot retains more than `source.max_retained_wal`, when its
//! `wal_status` becomes `extended`, `unreserved` (about to be invalidated) or `lost`, and when the slot
//! disappears. It does not act on a lost slot itself: Postgres ends the session that held it, and the
//! replication supervisor applies `source.on_slot_lost` when it reconnects.
//!
//! Every reading is also a point of the short history the dashboard draws.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::lsn::Lsn;
use crate::ops::Ops;
use crate::ops::size::format_bytes;
use crate::replication::{self, SlotInfo};
use crate::telemetry::metrics as m;

/// History points kept (at the default 2 s interval: 10 minutes).
pub const HISTORY: usize = 300;
/// WAL position readings kept for the lag in seconds (at 2 s: more than 5 hours).
const SAMPLES: usize = 10_000;

/// One point of the dashboard's charts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    pub at_ms: i64,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub retained_wal_bytes: Option<u64>,
    pub queue_depth: Option<u64>,
    /// Running totals: the dashboard draws their rates.
    pub refreshes: u64,
    pub refresh_failures: u64,
    pub fetch_hits: u64,
    pub fetch_misses: u64,
}

/// The monitor's latest reading.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub at_ms: i64,
    /// `None` with no error: the slot does not exist.
    pub slot: Option<SlotInfo>,
    pub lag_seconds: Option<f64>,
    /// Why the slot could not be read.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    reading: Option<Reading>,
    /// (server WAL position, when), oldest first.
    samples: VecDeque<(Lsn, i64)>,
    history: VecDeque<HistoryPoint>,
    /// What was last reported, so that each change is logged once.
    reported_status: Option<String>,
    reported_retained: bool,
    reported_missing: bool,
}

/// The monitor's readings, shared with `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct SlotWatch {
    state: Mutex<State>,
}

impl SlotWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn reading(&self) -> Option<Reading> {
        self.lock().reading.clone()
    }

    pub fn history(&self) -> Vec<HistoryPoint> {
        self.lock().history.iter().cloned().collect()
    }

    /// Record the server WAL position seen at `at_ms` and return the lag in seconds for `confirmed`.
    fn lag_seconds(&self, current: Option<Lsn>, confirmed: Option<Lsn>, at_ms: i64) -> Option<f64> {
        let mut state = self.lock();
        if let Some(current) = current {
            if state.samples.len() == SAMPLES {
                state.samples.pop_front();
            }
            state.samples.push_back((current, at_ms));
        }
        let confirmed = confirmed?;
        while state
            .samples
            .front()
            .is_some_and(|(lsn, _)| *lsn <= confirmed)
        {
            state.samples.pop_front();
        }
        Some(match state.samples.front() {
            // The oldest moment the server had WAL that kck has not acknowledged.
            Some((_, since)) => (at_ms - since).max(0) as f64 / 1000.0,
            None => 0.0,
        })
    }
}

/// Read the slot every `interval` until `shutdown`.
pub async fn run(
    ops: std::sync::Arc<Ops>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tick(&ops, &mut client).await;
        ops.telemetry.metrics.upkeep();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// One reading: slot, gauges, history, and the log lines that a change calls for.
pub async fn tick(ops: &Ops, client: &mut Option<tokio_postgres::Client>) {
    let at_ms = now_ms();
    let slot_name = &ops.source.config.slot;
    let read = async {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = Some(ops.source.connect().await?);
        }
        match client.as_ref() {
            Some(c) => replication::read_slot(c, slot_name).await,
            None => Ok(None),
        }
    };
    let reading = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(slot)) => {
            let lag_seconds = slot.as_ref().and_then(|s| {
                ops.watch
                    .lag_seconds(s.current_wal, s.confirmed_flush, at_ms)
            });
            Reading {
                at_ms,
                slot,
                lag_seconds,
                error: None,
            }
        }
        Ok(Err(error)) => {
            *client = None;
            Reading {
                at_ms,
                error: Some(error.to_string()),
                ..Reading::default()
            }
        }
        Err(_) => {
            *client = None;
            Reading {
                at_ms,
                error: Some("Postgres did not answer within 10 s".into()),
                ..Reading::default()
            }
        }
    };
    report(ops, &reading);
    let queue = ops.store.queue_stats().await.ok();
    set_gauges(ops, Some(&reading), queue.as_ref());
    let (refreshes, refresh_failures) = ops.refresher.health.totals();
    let fetches = &ops.telemetry.fetches;
    let point = HistoryPoint {
        at_ms,
        lag_bytes: reading.slot.as_ref().and_then(SlotInfo::lag_bytes),
        lag_seconds: reading.lag_seconds,
        retained_wal_bytes: reading.slot.as_ref().and_then(SlotInfo::retained_bytes),
        queue_depth: queue.map(|q| q.depth),
        refreshes,
        refresh_failures,
        fetch_hits: fetches.hits.load(Ordering::Relaxed),
        fetch_misses: fetches.misses.load(Ordering::Relaxed),
    };
    let mut state = ops.watch.lock();
    if state.history.len() == HISTORY {
        state.history.pop_front();
    }
    state.history.push_back(point);
    state.reading = Some(reading);
}

/// Log (and record as events) what changed since the last reading.
fn report(ops: &Ops, reading: &Reading) {
    let telemetry = &ops.telemetry;
    let config = &ops.source.config;
    let slot_name = &config.slot;
    let mut state = ops.watch.lock();
    let Some(slot) = &reading.slot else {
        if reading.error.is_none() && !state.reported_missing {
            state.reported_missing = true;
            let message = format!(
                "Replication slot '{slot_name}' does not exist any more (someone dropped it). Changes made \
                 since are not seen; kck creates the slot again when its stream reconnects and then \
                 refreshes every cached key. If kck should stop using this database, stop kck."
            );
            tracing::error!(slot = %slot_name, "{message}");
            telemetry.events.error("slot", message);
        }
        return;
    };
    state.reported_missing = false;
    let status = slot.wal_status.clone().unwrap_or_default();
    if state.reported_status.as_deref() != Some(status.as_str()) {
        let behind = slot.lag_bytes().map_or_else(|| "?".into(), format_bytes);
        match status.as_str() {
            "lost" => {
                let what = match config.on_slot_lost {
                    crate::pg::SlotLostPolicy::Fail => {
                        "source.on_slot_lost is 'fail': kck stops when its stream reconnects. Run `kck slot \
                         drop --config FILE --yes-drop-the-slot` and start kck again to rebuild the cache, \
                         or set source.on_slot_lost: recreate."
                    }
                    crate::pg::SlotLostPolicy::Recreate => {
                        "source.on_slot_lost is 'recreate': kck drops and creates the slot again when its \
                         stream reconnects, and refreshes every cached key."
                    }
                };
                let message = format!(
                    "Replication slot '{slot_name}' was invalidated (wal_status = lost): Postgres removed WAL \
                     kck had not read, so changes were missed. {what}"
                );
                tracing::error!(slot = %slot_name, "{message}");
                telemetry.events.error("slot", message);
            }
            "unreserved" => {
                let message = format!(
                    "Replication slot '{slot_name}' is about to be invalidated (wal_status = unreserved): it \
                     retains more WAL than max_slot_wal_keep_size and kck is {behind} behind. Unless kck \
                     catches up before the next checkpoint, Postgres removes the WAL and the slot is lost. \
                     Look at `kck status` for what holds kck back."
                );
                tracing::error!(slot = %slot_name, "{message}");
                telemetry.events.error("slot", message);
            }
            "extended" if state.reported_status.is_some() => {
                let message = format!(
                    "Replication slot '{slot_name}' retains more WAL than max_wal_size (wal_status = \
                     extended); kck is {behind} behind."
                );
                tracing::warn!(slot = %slot_name, "{message}");
                telemetry.events.warn("slot", message);
            }
            "reserved" if state.reported_status.is_some() => {
                tracing::info!(slot = %slot_name, "The slot's WAL is back within max_wal_size (wal_status = reserved).");
            }
            _ => {}
        }
        state.reported_status = Some(status);
    }
    let retained = slot.retained_bytes().unwrap_or(0);
    let over = retained > config.max_retained_wal;
    if state.reading.is_none() {
        // The first reading, right after start-up, where `slot::prepare` already warned.
        state.reported_retained = over;
    } else if over && !state.reported_retained {
        drop(state);
        crate::ops::slot::warn_if_retaining(slot, config.max_retained_wal, telemetry);
        ops.watch.lock().reported_retained = true;
    } else if !over && state.reported_retained {
        state.reported_retained = false;
        tracing::info!(
            slot = %slot_name,
            retained = %format_bytes(retained),
            "The slot's retained WAL is back under source.max_retained_wal."
        );
    }
}

/// Set the state gauges from the latest reading and queue statistics.
pub fn set_gauges(ops: &Ops, reading: Option<&Reading>, queue: Option<&crate::store::QueueStats>) {
    let metrics = &ops.telemetry.metrics;
    let stats = &ops.stats;
    metrics.gauge(
        m::REPLICATION_STREAMING,
        if stats.streaming.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    metrics.counter_total(
        m::REPLICATION_TRANSACTIONS,
        stats.transactions.load(Ordering::Relaxed),
    );
    metrics.counter_total(m::REPLICATION_EVENTS, stats.rows.load(Ordering::Relaxed));
    metrics.gauge(
        m::QUEUE_BACKPRESSURE,
        if stats.throttled.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    metrics.counter_total(
        m::QUEUE_BACKPRESSURE_WAITS,
        stats.backpressure_waits.load(Ordering::Relaxed),
    );
    let hub = &ops.refresher.hub;
    let live = &hub.live.stats;
    metrics.gauge(
        m::SUBSCRIBERS,
        live.subscribers.load(Ordering::Relaxed) as f64,
    );
    metrics.gauge(m::SUBSCRIBED_KEYS, hub.live.followed_keys() as f64);
    metrics.counter_total(
        m::SUBSCRIBE_EVENTS,
        live.events_sent.load(Ordering::Relaxed),
    );
    metrics.counter_total(m::SUBSCRIBE_RESYNCS, live.resyncs.load(Ordering::Relaxed));
    metrics.counter_total(m::SUBSCRIBE_EXPIRED, live.expired.load(Ordering::Relaxed));
    for job in ops.jobs.status() {
        metrics.job(&m::JobReading {
            name: &job.name,
            runs: job.runs,
            failures: job.failures,
            last_started_ms: job.last_started_ms,
            last_duration_ms: job.last_duration_ms,
            failed: job.last_error.is_some(),
        });
    }
    metrics.counter_total(
        m::REPLICATION_TASKS_QUEUED,
        stats.tasks_queued.load(Ordering::Relaxed),
    );
    if let Some(cap) = ops.store.capacity() {
        metrics.gauge(m::STORE_KEYS, cap.keys as f64);
        metrics.gauge(m::STORE_BYTES, cap.bytes as f64);
        metrics.gauge(m::STORE_MAX_KEYS, cap.max_keys as f64);
        metrics.gauge(m::STORE_MAX_BYTES, cap.max_bytes as f64);
        metrics.gauge(m::STORE_FILE_BYTES, cap.file_bytes as f64);
        metrics.counter_total(m::STORE_EVICTIONS, cap.evictions);
        metrics.counter_total(m::STORE_COMPACTIONS, cap.compactions);
    }
    if let Some(queue) = queue {
        metrics.gauge(m::QUEUE_DEPTH, queue.depth as f64);
        metrics.gauge(m::QUEUE_CLAIMED, queue.claimed as f64);
        metrics.gauge(m::QUEUE_PARKED, queue.parked as f64);
        let age = queue
            .oldest_enqueued_at_ms
            .map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
        metrics.gauge(m::QUEUE_OLDEST_AGE_SECONDS, age);
        metrics.gauge(
            m::QUEUE_STATS_ESTIMATED,
            if queue.estimated { 1.0 } else { 0.0 },
        );
    }
    let Some(reading) = reading else {
        return;
    };
    if reading.error.is_some() {
        return;
    }
    match &reading.slot {
        None => {
            metrics.wal_status("missing");
            metrics.gauge(m::SLOT_ACTIVE, 0.0);
        }
        Some(slot) => {
            metrics.wal_status(slot.wal_status.as_deref().unwrap_or("missing"));
            metrics.gauge(m::SLOT_ACTIVE, if slot.active { 1.0 } else { 0.0 });
            if let Some(lag) = slot.lag_bytes() {
                metrics.gauge(m::REPLICATION_LAG_BYTES, lag as f64);
            }
            if let Some(retained) = slot.retained_bytes() {
                metrics.gauge(m::SLOT_RETAINED_WAL_BYTES, retained as f64);
            }
            if let Some(safe) = slot.safe_wal_size {
                metrics.gauge(m::SLOT_SAFE_WAL_BYTES, safe as f64);
            }
        }
    }
    if let Some(lag) = reading.lag_seconds {
        metrics.gauge(m::REPLICATION_LAG_SECONDS, lag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_seconds_is_the_age_of_the_oldest_unacknowledged_reading() {
        let watch = SlotWatch::default();
        // Caught up: every reading is acknowledged.
        assert_eq!(
            watch.lag_seconds(Some(Lsn(100)), Some(Lsn(100)), 1_000),
            Some(0.0)
        );
        // The server moves on; kck does not acknowledge.
        assert_eq!(
            watch.lag_seconds(Some(Lsn(200)), Some(Lsn(100)), 3_000),
            Some(0.0)
        );
        assert_eq!(
            watch.lag_seconds(Some(Lsn(300)), Some(Lsn(100)), 5_000),
            Some(2.0)
        );
        assert_eq!(
            watch.lag_seconds(Some(Lsn(300)), Some(Lsn(150)), 9_000),
            Some(6.0)
        );
        // kck acknowledges 200: the reading at 5 s (300) is the oldest unacknowledged one.
        assert_eq!(
            watch.lag_seconds(Some(Lsn(300)), Some(Lsn(200)), 10_000),
            Some(5.0)
        );
        assert_eq!(
            watch.lag_seconds(Some(Lsn(300)), Some(Lsn(300)), 11_000),
            Some(0.0)
        );
        assert_eq!(watch.lag_seconds(Some(Lsn(300)), None, 12_000), None);
    }
}
