//! Live keys' registry: key → the subscriptions that follow it, so that a store write wakes only the
//! subscribers of the key written, and tells each which of its keys changed.
//!
//! [`super::Hub::written`] marks the key in every [`Inbox`] that follows it. An inbox holds the indices
//! of its changed keys, at most `buffer` of them: one more and it is *overflowed* instead (it forgets the
//! indices and its subscriber sends `resync` and every key's current value). A subscriber takes its
//! inbox when it is ready to send (its client read what came before), so a client too slow to read costs
//! at most `buffer` indices, never a queue of values.
//!
//! With a shared store (ScyllaDB), another process's writes reach no hub of this one: a poller
//! ([`Registry::poll_once`]) reads every followed key once per interval and reports the ones whose value
//! changed as written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::store::{Store, StoreResult};

/// What a subscription's inbox holds: the indices of its changed keys (each once), or overflowed.
#[derive(Debug, Default)]
struct Pending {
    changed: Vec<u32>,
    /// One bit per key: whether its index is in `changed`.
    marked: Vec<u64>,
    overflowed: bool,
}

/// One subscription's changed keys, and how to wake it.
#[derive(Debug)]
pub struct Inbox {
    notify: Notify,
    pending: Mutex<Pending>,
    buffer: usize,
}

/// What a subscriber takes from its inbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// These keys (indices into the subscription's key list) were written.
    Changed(Vec<u32>),
    /// More keys changed than the buffer holds: send every key again.
    Overflowed,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Plain field updates: a panic cannot leave it half-changed.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark(&self, index: u32) {
        let mut p = self.lock();
        if p.overflowed {
            return;
        }
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if p.marked.len() <= word {
            p.marked.resize(word + 1, 0);
        }
        if p.marked[word] & bit != 0 {
            return;
        }
        if p.changed.len() >= self.buffer {
            p.overflowed = true;
            p.changed = Vec::new();
            p.marked = Vec::new();
        } else {
            p.marked[word] |= bit;
            p.changed.push(index);
        }
        drop(p);
        // A permit is kept when the subscriber is not waiting yet: no wake-up is lost.
        self.notify.notify_one();
    }

    /// Wait until something is in the inbox (returns at once if something already is).
    pub async fn ready(&self) {
        self.notify.notified().await;
    }

    /// Take what the inbox holds (`None`: nothing, a stale wake-up).
    pub fn take(&self) -> Option<Taken> {
        let mut p = self.lock();
        if p.overflowed {
            *p = Pending::default();
            return Some(Taken::Overflowed);
        }
        if p.changed.is_empty() {
            return None;
        }
        p.marked.iter_mut().for_each(|w| *w = 0);
        Some(Taken::Changed(std::mem::take(&mut p.changed)))
    }
}

/// The subscriptions of one key, and what the poller last saw of it.
#[derive(Debug, Default)]
struct Followers {
    inboxes: Vec<(Arc<Inbox>, u32)>,
    /// The poller's last reading: the value's hash (`Some(None)`: no entry). `None`: not read yet.
    seen: Option<Option<u64>>,
}

/// Counters for `/status` and metrics.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub subscribers: AtomicUsize,
    pub events_sent: AtomicU64,
    pub resyncs: AtomicU64,
    pub expired: AtomicU64,
}

/// Key → followers. Part of [`super::Hub`].
#[derive(Debug, Default)]
pub struct Registry {
    keys: Mutex<HashMap<Arc<str>, Followers>>,
    pub stats: LiveStats,
    /// Whether the shared-store poller runs.
    poller: std::sync::atomic::AtomicBool,
}

/// A subscription's registration: its keys stay followed until it is dropped.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<super::Hub>,
    keys: Vec<Arc<str>>,
    pub inbox: Arc<Inbox>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.hub.live.lock();
        for key in &self.keys {
            if let Some(f) = map.get_mut(key) {
                if let Some(i) = f
                    .inboxes
                    .iter()
                    .position(|(inbox, _)| Arc::ptr_eq(inbox, &self.inbox))
                {
                    f.inboxes.swap_remove(i);
                }
                if f.inboxes.is_empty() {
                    map.remove(key);
                }
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Followers>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key` was written: mark it in each inbox that follows it.
    pub(super) fn written(&self, key: &str) {
        let map = self.lock();
        if let Some(f) = map.get(key) {
            for (inbox, index) in &f.inboxes {
                inbox.mark(*index);
            }
        }
    }

    /// Distinct keys followed.
    pub fn followed_keys(&self) -> usize {
        self.lock().len()
    }

    /// Read every followed key once (`concurrency` reads at a time); report those whose value changed
    /// since the last reading (or that were not read yet) as written, through `hub`. Returns how many
    /// keys were read.
    pub async fn poll_once(
        &self,
        hub: &super::Hub,
        store: &dyn Store,
        concurrency: usize,
    ) -> StoreResult<usize> {
        use futures_util::StreamExt;
        let keys: Vec<Arc<str>> = self.lock().keys().cloned().collect();
        let count = keys.len();
        let mut reads = futures_util::stream::iter(keys)
            .map(|key| async move {
                let read = store.get(&key).await;
                (key, read)
            })
            .buffer_unordered(concurrency.max(1));
        while let Some((key, read)) = reads.next().await {
            let key = &key;
            let now = read?.map(|e| xxhash_rust::xxh3::xxh3_64(&e.value));
            let changed = {
                let mut map = self.lock();
                match map.get_mut(key) {
                    Some(f) if f.seen != Some(now) => {
                        f.seen = Some(now);
                        true
                    }
                    _ => false,
                }
            };
            if changed {
                hub.written(key);
            }
        }
        Ok(count)
    }

    /// True the first time only: whoever gets it starts the poller.
    pub fn claim_poller(&self) -> bool {
        !self.poller.swap(true, Ordering::AcqRel)
    }
}

impl super::Hub {
    /// Follow `keys` (each given once); `buffer` bounds the inbox (see the module docs).
    pub fn subscribe(self: &Arc<Self>, keys: &[String], buffer: usize) -> Subscription {
        let inbox = Arc::new(Inbox {
            notify: Notify::new(),
            pending: Mutex::default(),
            buffer: buffer.max(1),
        });
        let mut shared = Vec::with_capacity(keys.len());
        let mut map = self.live.lock();
        for (i, key) in keys.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            let key: Arc<str> = match map.get_key_value(key.as_str()) {
                Some((k, _)) => k.clone(),
                None => Arc::from(key.as_str()),
            };
            map.entry(key.clone())
                .or_default()
                .inboxes
                .push((inbox.clone(), index));
            shared.push(key);
        }
        drop(map);
        Subscription {
            hub: self.clone(),
            keys: shared,
            inbox,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freshness::Hub;

    #[test]
    fn a_write_reaches_only_the_subscribers_of_its_key() {
        let hub = Arc::new(Hub::default());
        let a = hub.subscribe(&["k/1".into(), "k/2".into()], 8);
        let b = hub.subscribe(&["k/3".into()], 8);
        hub.written("k/2");
        hub.written("k/2");
        assert_eq!(a.inbox.take(), Some(Taken::Changed(vec![1])));
        assert_eq!(a.inbox.take(), None);
        assert_eq!(b.inbox.take(), None);
        hub.written("k/3");
        assert_eq!(b.inbox.take(), Some(Taken::Changed(vec![0])));
        drop(a);
        drop(b);
        assert_eq!(hub.live.followed_keys(), 0);
    }

    #[test]
    fn more_changes_than_the_buffer_overflow_the_inbox() {
        let hub = Arc::new(Hub::default());
        let keys: Vec<String> = (0..100).map(|i| format!("k/{i}")).collect();
        let s = hub.subscribe(&keys, 2);
        hub.written("k/70");
        hub.written("k/70");
        hub.written("k/3");
        assert_eq!(s.inbox.take(), Some(Taken::Changed(vec![70, 3])));
        for k in ["k/1", "k/2", "k/99"] {
            hub.written(k);
        }
        assert_eq!(s.inbox.take(), Some(Taken::Overflowed));
        assert_eq!(s.inbox.take(), None);
        hub.written("k/5");
        assert_eq!(s.inbox.take(), Some(Taken::Changed(vec![5])));
    }
}
