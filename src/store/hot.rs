//! The embedded store's entries, in memory: a cache hit is a hash-map lookup, not a read transaction.
//!
//! [`HotEntries`] sits in front of the `entries` table of [`super::embedded`] and is bounded by bytes
//! (`store.memory_cache`). It is filled two ways:
//! - the store's writer thread writes through: after a commit, every entry it wrote is put here and every
//!   entry it removed is taken out ([`HotEntries::committed`]);
//! - a read that missed here and found the entry in redb offers it ([`HotEntries::offer`]).
//!
//! Invariant: what this map holds for a key is what the last commit holds for it (or the key is absent).
//! The one race is a reader offering what it read from a snapshot older than a commit that the writer has
//! already applied here. Every commit bumps an epoch *before* it touches the map, and an offer is taken
//! only when the epoch is the one the reader saw *before* it opened its read transaction, checked under
//! the shard's lock that the writer also takes. So either the offer lands before the writer's update of
//! that shard (which then overwrites or removes it), or the reader sees the new epoch and drops its offer.
//!
//! Eviction is arbitrary (a `HashMap`'s iteration order) once a shard is over its share of the budget:
//! this is a front for a store that keeps everything, so a miss here costs one redb read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::Entry;

const SHARDS: usize = 32;

/// What one cached entry is charged, beyond its key and value bytes (map slot, `Entry`, allocations).
const OVERHEAD: usize = 96;

#[derive(Default)]
struct Shard {
    map: HashMap<String, Entry>,
    bytes: usize,
}

impl Shard {
    fn put(&mut self, key: &str, entry: Entry, budget: usize) {
        let cost = charge(key, &entry);
        if cost > budget {
            // Larger than the shard's whole share: not kept (a read of it goes to redb).
            self.take(key);
            return;
        }
        match self.map.get_mut(key) {
            Some(old) => {
                self.bytes = self.bytes - charge(key, old) + cost;
                *old = entry;
            }
            None => {
                self.bytes += cost;
                self.map.insert(key.to_owned(), entry);
            }
        }
        while self.bytes > budget {
            let Some(victim) = self.map.keys().find(|k| k.as_str() != key).cloned() else {
                break;
            };
            self.take(&victim);
        }
    }

    fn take(&mut self, key: &str) {
        if let Some(old) = self.map.remove(key) {
            self.bytes -= charge(key, &old);
        }
    }
}

fn charge(key: &str, entry: &Entry) -> usize {
    key.len() + entry.value.len() + OVERHEAD
}

/// See the module docs.
pub struct HotEntries {
    shards: Box<[Mutex<Shard>]>,
    /// Bumped by every commit that changes entries, before the map is updated.
    epoch: AtomicU64,
    /// Bytes per shard.
    budget: usize,
}

impl std::fmt::Debug for HotEntries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotEntries")
            .field("budget", &(self.budget * SHARDS))
            .finish_non_exhaustive()
    }
}

impl HotEntries {
    /// A map holding at most about `bytes` (0: holds nothing).
    pub fn new(bytes: usize) -> HotEntries {
        HotEntries {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            epoch: AtomicU64::new(0),
            budget: bytes / SHARDS,
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        // FNV-1a: cheap, and keys are not attacker-chosen in a way that matters for 32 shards.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        // The map holds plain data that no panic can leave half-updated.
        self.shards[(h % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Entry> {
        if self.budget == 0 {
            return None;
        }
        self.shard(key).map.get(key).cloned()
    }

    /// The epoch to pass to [`HotEntries::offer`]: read it before opening the read transaction.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A reader found `entry` in redb, in a transaction opened after it read `epoch`.
    pub fn offer(&self, key: &str, entry: &Entry, epoch: u64) {
        if self.budget == 0 {
            return;
        }
        let mut shard = self.shard(key);
        if self.epoch.load(Ordering::SeqCst) == epoch {
            shard.put(key, entry.clone(), self.budget);
        }
    }

    /// The writer committed these changes (`None`: the entry was removed). Call after the commit.
    pub fn committed(&self, changes: Vec<(String, Option<Entry>)>) {
        if changes.is_empty() {
            return;
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for (key, entry) in changes {
            let mut shard = self.shard(&key);
            match entry {
                Some(entry) if self.budget > 0 => shard.put(&key, entry, self.budget),
                _ => shard.take(&key),
            }
        }
    }

    /// Bytes charged now.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::lsn::Lsn;

    fn entry(lsn: u64, value: &str) -> Entry {
        Entry {
            value: Bytes::from(value.to_owned()),
            lsn: Lsn(lsn),
            computed_at_ms: 0,
            expires_at_ms: None,
        }
    }

    #[test]
    fn writes_go_through_and_removals_take_out() {
        let hot = HotEntries::new(1 << 20);
        hot.committed(vec![("a".into(), Some(entry(1, "1")))]);
        assert_eq!(hot.get("a"), Some(entry(1, "1")));
        hot.committed(vec![("a".into(), Some(entry(2, "2")))]);
        assert_eq!(hot.get("a"), Some(entry(2, "2")));
        hot.committed(vec![("a".into(), None)]);
        assert_eq!(hot.get("a"), None);
        assert_eq!(hot.bytes(), 0);
    }

    #[test]
    fn an_offer_older_than_a_commit_is_dropped() {
        let hot = HotEntries::new(1 << 20);
        let seen = hot.epoch();
        // The writer commits (and removes the key) after the reader opened its snapshot...
        hot.committed(vec![("a".into(), None)]);
        // ...so what the reader read is not kept.
        hot.offer("a", &entry(1, "old"), seen);
        assert_eq!(hot.get("a"), None);
        // A reader that starts now may fill it.
        let seen = hot.epoch();
        hot.offer("a", &entry(1, "x"), seen);
        assert_eq!(hot.get("a"), Some(entry(1, "x")));
    }

    #[test]
    fn the_budget_bounds_the_bytes() {
        let budget = 64 * 1024;
        let hot = HotEntries::new(budget);
        let value = "v".repeat(500);
        for i in 0..10_000 {
            hot.committed(vec![(format!("k{i}"), Some(entry(i, &value)))]);
            assert!(hot.bytes() <= budget, "{} > {budget}", hot.bytes());
        }
        // The last write is kept.
        assert!(hot.get("k9999").is_some());
        // An entry larger than a shard's share is never kept.
        hot.committed(vec![("big".into(), Some(entry(1, &"x".repeat(budget))))]);
        assert_eq!(hot.get("big"), None);
        // A zero budget keeps nothing.
        let none = HotEntries::new(0);
        none.committed(vec![("a".into(), Some(entry(1, "1")))]);
        let seen = none.epoch();
        none.offer("a", &entry(1, "1"), seen);
        assert_eq!(none.get("a"), None);
    }

    /// Readers offering what they read from a "database" while a writer commits: the map never ends
    /// up holding anything but the database's last value.
    #[test]
    fn racing_readers_never_leave_an_old_value() {
        use std::sync::Arc;
        use std::sync::RwLock;
        let hot = Arc::new(HotEntries::new(1 << 20));
        let db = Arc::new(RwLock::new(entry(0, "0")));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (hot, db, stop) = (hot.clone(), db.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if hot.get("k").is_none() {
                            let seen = hot.epoch();
                            let read = db.read().unwrap().clone();
                            std::thread::yield_now();
                            hot.offer("k", &read, seen);
                        }
                    }
                })
            })
            .collect();
        for i in 1..=20_000u64 {
            let e = entry(i, &i.to_string());
            *db.write().unwrap() = e.clone();
            // Alternate removal (forcing readers to refill) and write-through.
            hot.committed(vec![("k".into(), if i % 2 == 0 { Some(e) } else { None })]);
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        let last = db.read().unwrap().clone();
        assert!(hot.get("k").is_none_or(|e| e == last), "{:?}", hot.get("k"));
    }
}
