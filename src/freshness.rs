//! Freshness: knowing, and waiting until, the cache reflects a given WAL position.
//!
//! Two questions, answered without touching the replication stream (its counters and the visibility
//! clock are read, never driven):
//! - **Is the whole cache caught up to `L`?** ([`Progress::caught_up`]) Yes once the stream has durably
//!   queued every change up to `L` (`acked >= L`; with a shared store, the streaming process may be another
//!   one, which publishes its position in the store: [`ACKED_META`]) and no queued task still owes a change at or below `L`
//!   ([`Store::pending_floor`] `> L`, or the queue is empty). From then on every cached entry reflects
//!   every change up to `L`, whatever LSN it is labelled with: an entry nothing changed is not recomputed,
//!   so its own label can stay below `L` forever while it is fresh.
//! - **Has this key been written?** The [`Hub`] is told by the refresh workers and by priming after every
//!   successful store write ([`Hub::written`]) and after every finished task ([`Hub::progressed`]), and
//!   wakes whoever waits on that key or on any progress.
//!
//! [`Hub::wait_for`] combines them: it re-checks a condition when woken, and every [`POLL`] in any case
//! (the stream's counters move without a signal, and another process may write a shared store). A
//! cache hit that waits for nothing never comes here.
//!
//! [`Store::pending_floor`]: crate::store::Store::pending_floor

pub mod live;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::lsn::Lsn;
use crate::replication::StreamStats;
use crate::store::{Store, StoreResult};
use crate::visibility::VisibilityClock;

/// How often a waiter re-checks without being woken.
pub const POLL: Duration = Duration::from_millis(50);

/// How often at most "anything progressed" wakes every waiter: under a heavy refresh load, waking all of
/// them for each finished task would cost more than it saves (a skipped wake-up is made up by [`POLL`]).
const ANY_AT_MOST_EVERY: Duration = Duration::from_millis(5);

/// In-process notifications of store writes: key → waiters, plus "anything progressed".
#[derive(Debug)]
pub struct Hub {
    keys: Mutex<HashMap<String, Arc<Notify>>>,
    any: Notify,
    /// When `any` was last notified, in microseconds since `born`.
    any_at_us: std::sync::atomic::AtomicU64,
    born: std::time::Instant,
    /// Live keys' subscriptions (`/subscribe`): key → who follows it.
    pub live: live::Registry,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            keys: Mutex::default(),
            any: Notify::new(),
            any_at_us: std::sync::atomic::AtomicU64::new(0),
            born: std::time::Instant::now(),
            live: live::Registry::default(),
        }
    }
}

/// A registration to be woken when one key is written; unregisters on drop.
#[derive(Debug)]
pub struct KeyWatch<'a> {
    hub: &'a Hub,
    key: String,
    notify: Arc<Notify>,
}

impl Drop for KeyWatch<'_> {
    fn drop(&mut self) {
        let mut keys = self.hub.lock();
        // The map holds one reference and this watch one: nobody else waits on the key.
        if keys
            .get(&self.key)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify) && Arc::strong_count(n) == 2)
        {
            keys.remove(&self.key);
        }
    }
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waited<T> {
    Done(T),
    TimedOut,
    /// kck is stopping: waits end early so that shutdown does not wait for them.
    ShuttingDown,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        // Plain map updates: a panic cannot leave it half-changed.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key`'s entry was written.
    pub fn written(&self, key: &str) {
        if let Some(notify) = self.lock().get(key) {
            notify.notify_waiters();
        }
        self.live.written(key);
        self.progressed();
    }

    /// A queued task finished (the pending floor may have risen). Wakes the waiters on any progress, at
    /// most every [`ANY_AT_MOST_EVERY`].
    pub fn progressed(&self) {
        let now = u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX);
        let last = self.any_at_us.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= ANY_AT_MOST_EVERY.as_micros() as u64;
        if due
            && self
                .any_at_us
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.any.notify_waiters();
        }
    }

    /// Be woken when `key` is written.
    pub fn watch(&self, key: &str) -> KeyWatch<'_> {
        let notify = self.lock().entry(key.to_owned()).or_default().clone();
        KeyWatch {
            hub: self,
            key: key.to_owned(),
            notify,
        }
    }

    /// Run `check` until it gives `Some`, `deadline` passes, or `shutdown` turns true. It runs again
    /// whenever `key` (if given) is written or any task finishes, and at least every [`POLL`].
    pub async fn wait_for<T, E, F, Fut>(
        &self,
        key: Option<&str>,
        deadline: Instant,
        shutdown: &watch::Receiver<bool>,
        mut check: F,
    ) -> Result<Waited<T>, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let watch = key.map(|k| self.watch(k));
        let mut shutdown = shutdown.clone();
        loop {
            // Registered before checking, so that a write after the check wakes us.
            let any = self.any.notified();
            let own = watch.as_ref().map(|w| w.notify.notified());
            tokio::pin!(any, own);
            any.as_mut().enable();
            if let Some(own) = own.as_mut().as_pin_mut() {
                own.enable();
            }
            if let Some(done) = check().await? {
                return Ok(Waited::Done(done));
            }
            if *shutdown.borrow() {
                return Ok(Waited::ShuttingDown);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Waited::TimedOut);
            }
            let nap = (now + POLL).min(deadline);
            tokio::select! {
                _ = any => {}
                _ = async { if let Some(own) = own.as_pin_mut() { own.await } else { std::future::pending().await } } => {}
                _ = tokio::time::sleep_until(nap) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// How far the stream and the queue are, for the answer to a wait that timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    /// The newest position the stream received.
    pub received: Lsn,
    /// The newest position whose changes are durably queued.
    pub acked: Lsn,
    /// The oldest change a queued task still owes.
    pub pending_floor: Option<Lsn>,
    /// Tasks queued.
    pub queue_depth: u64,
}

impl Lag {
    /// As JSON fields for an error body. `target` is the LSN waited for.
    pub fn to_json(self, target: Lsn) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        map.insert("received_lsn".into(), self.received.to_string().into());
        map.insert("acked_lsn".into(), self.acked.to_string().into());
        map.insert(
            "bytes_behind".into(),
            target.0.saturating_sub(self.received.0).into(),
        );
        map.insert(
            "pending_floor".into(),
            self.pending_floor
                .map_or(serde_json::Value::Null, |f| f.to_string().into()),
        );
        map.insert("queue_depth".into(), self.queue_depth.into());
        map
    }
}

/// The store meta name under which the streaming process publishes its acknowledged position (LSN text):
/// every change up to it is durably queued. Freshness waits in processes that do not stream (split roles,
/// a standby) read it.
pub const ACKED_META: &str = "kck.acked_lsn";

/// How long a read of [`ACKED_META`] is reused (it is published at most every 50 ms).
const PUBLISHED_FOR: Duration = Duration::from_millis(20);

/// The stream's counters, the visibility clock and the store: what "caught up" is decided from.
#[derive(Clone)]
pub struct Progress {
    pub store: Arc<dyn Store>,
    pub stats: Arc<StreamStats>,
    pub clock: Arc<VisibilityClock>,
    /// The store is shared: another process may stream, and publishes its position in [`ACKED_META`].
    shared: bool,
    /// The last published position read, and when.
    published: Arc<Mutex<Option<(Instant, Lsn)>>>,
}

impl Progress {
    pub fn new(
        store: Arc<dyn Store>,
        stats: Arc<StreamStats>,
        clock: Arc<VisibilityClock>,
        shared: bool,
    ) -> Progress {
        Progress {
            store,
            stats,
            clock,
            shared,
            published: Arc::default(),
        }
    }

    /// Whether the store is shared: other processes may write it, and this process's [`Hub`] does not
    /// hear of their writes.
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// The position the streaming process (this one or, with a shared store, whichever streams) last
    /// published, read at most every [`PUBLISHED_FOR`].
    async fn published(&self) -> Lsn {
        if !self.shared {
            return Lsn::ZERO;
        }
        let cached = *self.published.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, lsn)) = cached
            && at.elapsed() < PUBLISHED_FOR
        {
            return lsn;
        }
        let lsn = match self.store.get_meta(ACKED_META).await {
            Ok(Some(bytes)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(Lsn::ZERO),
            _ => Lsn::ZERO,
        };
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), lsn));
        lsn
    }

    /// The newest position whose changes the stream has durably queued.
    pub async fn acked(&self) -> Lsn {
        Lsn(self.stats.acked.load(Ordering::Acquire)).max(self.published().await)
    }

    /// The newest position the stream received (in another process: the one it published).
    pub async fn received(&self) -> Lsn {
        Lsn(self.stats.received.load(Ordering::Acquire)).max(self.published().await)
    }

    /// The newest position the stream decoded, or that this process learnt is visible (a computation
    /// started after everything decoded is visible reflects it: see [`crate::refresh::Refresher::prime`]).
    pub fn decoded(&self) -> Lsn {
        self.clock.decoded().max(self.clock.visible())
    }

    /// Whether every cached entry reflects every change up to `lsn`. See the module docs.
    pub async fn caught_up(&self, lsn: Lsn) -> StoreResult<bool> {
        if self.acked().await < lsn {
            return Ok(false);
        }
        Ok(self
            .store
            .pending_floor()
            .await?
            .is_none_or(|floor| floor > lsn))
    }

    pub async fn lag(&self) -> Lag {
        let (floor, depth) = match (
            self.store.pending_floor().await,
            self.store.queue_stats().await,
        ) {
            (Ok(floor), Ok(stats)) => (floor, stats.depth),
            (Ok(floor), Err(_)) => (floor, 0),
            (Err(_), Ok(stats)) => (None, stats.depth),
            (Err(_), Err(_)) => (None, 0),
        };
        Lag {
            received: self.received().await,
            acked: self.acked().await,
            pending_floor: floor,
            queue_depth: depth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_wakes_its_waiter_and_watches_clean_up() {
        let hub = Arc::new(Hub::default());
        let (_tx, shutdown) = watch::channel(false);
        let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiter = {
            let (hub, written) = (hub.clone(), written.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                hub.wait_for(Some("k/1"), deadline, &shutdown, || {
                    let done = written.load(Ordering::SeqCst);
                    async move { Ok::<_, ()>(done.then_some(())) }
                })
                .await
            })
        };
        while hub.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        written.store(true, Ordering::SeqCst);
        hub.written("k/1");
        assert_eq!(waiter.await.unwrap(), Ok(Waited::Done(())));
        assert!(hub.lock().is_empty(), "the watch must unregister");
    }

    #[tokio::test]
    async fn waits_end_at_the_deadline_and_at_shutdown() {
        let hub = Hub::default();
        let (tx, shutdown) = watch::channel(false);
        let never = || async { Ok::<Option<()>, ()>(None) };
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(
            hub.wait_for(None, soon, &shutdown, never).await,
            Ok(Waited::TimedOut)
        );
        tx.send(true).unwrap();
        let later = Instant::now() + Duration::from_secs(30);
        assert_eq!(
            hub.wait_for(Some("k"), later, &shutdown, never).await,
            Ok(Waited::ShuttingDown)
        );
    }
}
