//! Refresh triggers besides replication: schedules, expiry, warming, and who reads what.
//!
//! Replication refreshes a key when a change it depends on commits. A primer's [`Policy`] adds the rest:
//! - `refresh_interval`: [`run_intervals`] queues a primer task (refresh every cached key) on a timer;
//! - `ttl`: entries are stored with an expiry ([`crate::store::Entry::expires_at_ms`]); `/fetch` never
//!   serves an expired entry as fresh, and [`sweep_expired`] refreshes expiring keys that are hot and drops
//!   expired keys that are cold (or every expired key under `on_expiry: drop`);
//! - `warm`: [`warm`] lists key parameters at boot and computes them before the HTTP server starts;
//! - `cold_after`: [`AccessLog`] remembers, in memory and bounded, when each key was last fetched; a
//!   refresh of a key nobody read for that long drops the key instead of recomputing it.
//!
//! ```text
//!  timers ──primer task──▶ queue ──▶ refresh workers (hot first; cold keys dropped)
//!  sweeper ─key task / drop─┘                ▲
//!  /fetch ──touch──▶ AccessLog ──────────────┘
//! ```
//!
//! **Architecture invariant:** every trigger goes through [`crate::refresh::Refresher`] (`compute`, `prime`
//! or the queue), so entries still carry the LSN they reflect and never go backwards.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;

use crate::queue::TaskKind;
use crate::refresh::{Refresher, now_ms};
use crate::store::Task;

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

// ---------------------------------------------------------------------------------------------------------
// Access log

const SHARDS: usize = 16;

/// When each key was last fetched, in memory, bounded.
///
/// A key with no record counts as read when the process started (the log is not persisted), so a restart
/// never makes every key cold at once. When a shard is full, its older half is forgotten: those keys then
/// count as read at boot, which errs towards recomputing.
pub struct AccessLog {
    boot: Instant,
    /// Whether this process sees the reads (it serves HTTP). Without them nothing counts as cold.
    sees_reads: std::sync::atomic::AtomicBool,
    per_shard: usize,
    shards: Vec<Mutex<HashMap<String, Instant>>>,
}

impl AccessLog {
    /// A log that remembers about `capacity` keys.
    pub fn new(capacity: usize) -> AccessLog {
        AccessLog {
            boot: Instant::now(),
            sees_reads: std::sync::atomic::AtomicBool::new(true),
            per_shard: (capacity / SHARDS).max(16),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Instant>> {
        // FNV-1a: cheap and stable; the shard only spreads lock contention.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in key.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// Record a read of `key` now.
    pub fn touch(&self, key: &str) {
        let now = Instant::now();
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = shard.get_mut(key) {
            *at = now;
            return;
        }
        if shard.len() >= self.per_shard {
            let mut times: Vec<Instant> = shard.values().copied().collect();
            let mid = times.len() / 2;
            let (_, cutoff, _) = times.select_nth_unstable(mid);
            let cutoff = *cutoff;
            shard.retain(|_, at| *at > cutoff);
        }
        shard.insert(key.to_owned(), now);
    }

    /// When `key` was last read (boot time if unknown).
    pub fn last_read(&self, key: &str) -> Instant {
        let shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(key).copied().unwrap_or(self.boot)
    }

    /// Whether `key` was read since the process started (a refresh of it goes first).
    pub fn was_read(&self, key: &str) -> Option<Instant> {
        let shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(key).copied()
    }

    /// Whether `key` was not read for `cold_after` (never, in a process that does not see the reads).
    pub fn is_cold(&self, key: &str, cold_after: Option<Duration>) -> bool {
        self.sees_reads.load(std::sync::atomic::Ordering::Relaxed)
            && cold_after.is_some_and(|after| self.last_read(key).elapsed() >= after)
    }

    /// Say whether this process sees the reads (serves HTTP). The log is kept per process, so a refresh
    /// worker in a process without the `http` role cannot tell cold keys from hot ones: it drops none.
    pub fn set_sees_reads(&self, sees: bool) {
        self.sees_reads
            .store(sees, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------------------------
// Timers

async fn sleep_or_shutdown(duration: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => false,
        _ = shutdown.wait_for(|s| *s) => true,
    }
}

/// Queue a refresh of every cached key of each primer with a `refresh_interval`, on that period, until
/// `shutdown`. With several kck processes on one store each queues it; the queue coalesces them.
pub async fn run_intervals(refresher: Arc<Refresher>, mut shutdown: watch::Receiver<bool>) {
    let mut due: Vec<(Instant, usize, Duration)> = refresher
        .catalog
        .primers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            p.policy
                .refresh_interval
                .map(|every| (Instant::now() + every, i, every))
        })
        .collect();
    if due.is_empty() {
        return;
    }
    loop {
        let Some(next) = due.iter().map(|d| d.0).min() else {
            return;
        };
        let wait = next.saturating_duration_since(Instant::now());
        if sleep_or_shutdown(wait, &mut shutdown).await {
            return;
        }
        let now = Instant::now();
        let mut tasks = Vec::new();
        for (at, i, every) in &mut due {
            if *at <= now {
                let name = refresher.catalog.primers[*i].name.clone();
                tracing::debug!(primer = %name, "Scheduled refresh of every cached key.");
                tasks.push(
                    TaskKind::Primer {
                        primer: name,
                        after: None,
                    }
                    .task(refresher.clock.visible()),
                );
                *at = now + *every;
            }
        }
        if let Err(error) = refresher.store.enqueue(tasks).await {
            tracing::error!(%error, "Cannot queue a scheduled refresh; it is tried again at the next period. Check the store.");
        }
    }
}

/// How often the sweeper looks at a primer with this `ttl`: a quarter of it, between 200 ms and 30 s.
pub fn sweep_period(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(30))
}

/// Look at the entries of every primer with a `ttl`, until `shutdown`: an entry that expires before the next
/// look is refreshed if its key is hot (so readers rarely see it expire); an expired entry whose key is cold,
/// or whose primer says `on_expiry: drop`, is removed. Each look reads every entry of those primers (the
/// store has no expiry index), so looks are spaced to take about a quarter of the time at most.
pub async fn sweep_expired(refresher: Arc<Refresher>, mut shutdown: watch::Receiver<bool>) {
    let primers: Vec<(usize, Duration)> = refresher
        .catalog
        .primers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.policy.ttl.map(|ttl| (i, sweep_period(ttl))))
        .collect();
    let Some(period) = primers.iter().map(|p| p.1).min() else {
        return;
    };
    // A sweep reads every entry of these primers: with many keys, look less often, so that sweeping takes
    // at most about a quarter of the time.
    let mut last_sweep = Duration::ZERO;
    loop {
        let pause = period.max(last_sweep * 3);
        if sleep_or_shutdown(pause, &mut shutdown).await {
            return;
        }
        let started = Instant::now();
        for &(i, own) in &primers {
            // Refresh what expires before the next look.
            let ahead = own.max(pause + last_sweep);
            if let Err(error) = sweep_primer(&refresher, i, ahead, &mut shutdown).await {
                tracing::warn!(primer = %refresher.catalog.primers[i].name, %error,
                    "Cannot look for expired entries; trying again at the next sweep. Check the store.");
            }
            if *shutdown.borrow() {
                return;
            }
        }
        last_sweep = started.elapsed();
    }
}

async fn sweep_primer(
    refresher: &Refresher,
    index: usize,
    ahead: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), crate::store::StoreError> {
    const PAGE: usize = 1000;
    let primer = &refresher.catalog.primers[index];
    let store = &refresher.store;
    let mut after: Option<String> = None;
    let (mut refreshed, mut dropped) = (0usize, 0usize);
    loop {
        let keys = store.keys(&primer.name, after.as_deref(), PAGE).await?;
        let now = now_ms();
        let soon = now.saturating_add(ahead.as_millis() as i64);
        let mut tasks: Vec<Task> = Vec::new();
        for key in &keys {
            let Some(entry) = store.get(key).await? else {
                continue;
            };
            let Some(expires) = entry.expires_at_ms else {
                continue;
            };
            let cold = refresher.access.is_cold(key, primer.policy.cold_after);
            let drop = primer.policy.on_expiry == OnExpiry::Drop || cold;
            if drop {
                if expires <= now {
                    refresher.drop_key(&primer.name, key).await?;
                    dropped += 1;
                }
            } else if expires <= soon {
                tasks.push(TaskKind::Key(key.clone()).task(entry.lsn));
                refreshed += 1;
            }
        }
        store.enqueue(tasks).await?;
        if keys.len() < PAGE || *shutdown.borrow() {
            break;
        }
        after = keys.last().cloned();
    }
    if refreshed + dropped > 0 {
        tracing::debug!(primer = %primer.name, refreshed, dropped, "Swept expiring entries.");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Warming

/// What [`warm`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmReport {
    /// Keys the warm queries listed.
    pub listed: usize,
    /// Keys computed now.
    pub computed: usize,
    /// Keys already cached and fresh (a restart).
    pub cached: usize,
    pub failed: usize,
}

/// Run every primer's `warm` query and compute the keys it lists (`concurrency` at a time) that are not
/// cached and fresh. Logs progress, and draws a progress bar when stderr is a terminal. A failing warm
/// query or key is logged and skipped: kck serves (and computes misses) without it.
pub async fn warm(refresher: &Arc<Refresher>, concurrency: usize) -> WarmReport {
    let mut report = WarmReport::default();
    let mut keys: Vec<(crate::primer::Key, String)> = Vec::new();
    for (index, primer) in refresher.catalog.primers.iter().enumerate() {
        let Some(query) = &primer.policy.warm else {
            continue;
        };
        match refresher.list_keys(index, query, &[]).await {
            Ok(listed) => {
                tracing::info!(primer = %primer.name, keys = listed.len(), "Warm query listed keys.");
                keys.extend(listed);
            }
            Err(error) => tracing::error!(primer = %primer.name, %error,
                "The warm query failed; this primer's keys are computed on their first fetch instead. Fix primers[].warm."),
        }
    }
    report.listed = keys.len();
    if keys.is_empty() {
        return report;
    }
    let started = Instant::now();
    tracing::info!(keys = keys.len(), "Warming the cache.");
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(keys.len() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "warming {bar:40} {pos}/{len} keys, {per_sec}, eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let total = keys.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let last_log = Mutex::new(Instant::now());
    let counts = Mutex::new(report);
    futures_util::stream::iter(keys)
        .for_each_concurrent(concurrency.max(1), |(key, text)| {
            let (done, last_log, counts, bar) = (&done, &last_log, &counts, &bar);
            async move {
                let fresh = matches!(refresher.store.get(&text).await, Ok(Some(e))
                    if e.expires_at_ms.is_none_or(|at| at > now_ms()));
                let outcome = if fresh {
                    Ok(true)
                } else {
                    refresher.prime(&key, &text).await.map(|_| false)
                };
                {
                    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                    match outcome {
                        Ok(true) => c.cached += 1,
                        Ok(false) => c.computed += 1,
                        Err(error) => {
                            if c.failed < 5 {
                                tracing::warn!(key = %text, %error, "Cannot warm a key; it is computed on its first fetch.");
                            }
                            c.failed += 1;
                        }
                    }
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if let Some(bar) = bar {
                    bar.inc(1);
                }
                let mut last = last_log.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= Duration::from_secs(2) {
                    *last = Instant::now();
                    tracing::info!(done = n, total, "Warming the cache.");
                }
            }
        })
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = *counts.lock().unwrap_or_else(|e| e.into_inner());
    tracing::info!(
        computed = report.computed,
        already_cached = report.cached,
        failed = report.failed,
        took = ?started.elapsed(),
        "Cache warmed."
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_remembers_and_forgets_the_oldest_half() {
        let log = AccessLog::new(0); // 16 per shard
        assert!(log.was_read("a").is_none());
        assert!(!log.is_cold("a", None));
        log.touch("a");
        assert!(log.was_read("a").is_some());
        for i in 0..10_000 {
            log.touch(&format!("k{i}"));
        }
        assert!(log.len() <= 16 * SHARDS, "{}", log.len());
        // The newest survive.
        assert!(log.was_read("k9999").is_some());
        assert!(log.is_cold("k9999", Some(Duration::ZERO)));
        assert!(!log.is_cold("k9999", Some(Duration::from_secs(3600))));
    }

    #[test]
    fn sweep_period_is_a_quarter_within_bounds() {
        assert_eq!(
            sweep_period(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
        assert_eq!(
            sweep_period(Duration::from_millis(10)),
            Duration::from_millis(200)
        );
        assert_eq!(
            sweep_period(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
    }
}
