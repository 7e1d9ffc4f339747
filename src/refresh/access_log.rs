//! Who reads what: when each key was last fetched, so that a refresh of a key nobody reads drops it
//! instead of recomputing it (`cold_after`), and workers run the hottest keys first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}
