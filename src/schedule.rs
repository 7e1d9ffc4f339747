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

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::queue::TaskKind;
use crate::refresh::Refresher;
use crate::store::Task;

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
            tracing::error!(error = %crate::report::Chain(&error), "Cannot queue a scheduled refresh; it is tried again at the next period. Check the store.");
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
                tracing::warn!(primer = %refresher.catalog.primers[i].name, error = %crate::report::Chain(&error),
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
            let drop = primer.policy.on_expiry == crate::primer::OnExpiry::Drop || cold;
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
            Err(error) => {
                tracing::error!(primer = %primer.name, error = %crate::report::Chain(&error),
                "The warm query failed; this primer's keys are computed on their first fetch instead. Fix primers[].warm.")
            }
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
                                tracing::warn!(key = %text, error = %crate::report::Chain(&error), "Cannot warm a key; it is computed on its first fetch.");
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
