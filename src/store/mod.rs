//! The store: cache entries, the per-primer key index, and the durable refresh queue.
//!
//! [`Store`] is the one contract every backend keeps; [`embedded`] (redb, the default, one process) and
//! `scylla` (ScyllaDB or Cassandra, shared by many processes; the `scylla` Cargo feature) implement it,
//! [`cql`] holds the ScyllaDB data model, [`codec`] the byte encoding of an [`Entry`] that both use, and
//! `conformance` is the test suite every backend must pass.
//!
//! # Contract
//! - **Entries never go backwards.** [`Store::store_result`] writes an entry only if no entry with a higher
//!   LSN is stored for that key, and reports [`Stored::KeptNewer`] with that LSN when one is. An equal LSN
//!   is a recomputation of the same state: the embedded store replaces the entry; a backend that cannot
//!   compare and write atomically (ScyllaDB) keeps one of the two whole (see [`cql`]: the later
//!   computation where the database's tie-break compares values) and reports `Written`.
//!   Under concurrent writes to one key, `Written` means the entry was written; a newer one may have
//!   replaced it since. `KeptNewer` is never reported for an entry that was kept.
//! - **LSNs up to 2^63 − 1.** A backend may refuse (with an error) an entry whose LSN is above
//!   `7FFFFFFF/FFFFFFFF` (ScyllaDB orders entries by a signed 64-bit timestamp); Postgres would need to
//!   write 8 EiB of WAL to get there. The embedded store takes any LSN.
//! - **Expired entries.** An entry whose `expires_at_ms` has passed may be dropped ([`Store::get`] then
//!   answers `None`, as for a key never stored; ScyllaDB drops it with a TTL), or kept as it was (the
//!   embedded store; readers compare `expires_at_ms` themselves). It is never changed.
//! - **Removal.** After [`Store::remove_key`], a backend that orders by LSN without reading (ScyllaDB)
//!   shadows the removed LSN: the key can be stored again from a higher LSN (kck's labels only grow).
//! - **Capacity (embedded).** A backend with a capacity ([`Store::capacity`]) evicts the least recently
//!   used keys past it, entry and index record together, as [`Store::remove_key`] would; a task queued
//!   for an evicted key stays queued (its refresh finds the key unregistered). Such a backend writes the
//!   result of [`Store::finish`] and [`Store::store_if_registered`] only for a key still registered, so
//!   a computation that began before its key was evicted or removed never brings it back (the stream
//!   stopped queueing its changes). A backend without a capacity may write them regardless.
//! - **Enqueue is durable.** When [`Store::enqueue`] returns `Ok`, the tasks survive a crash (of kck, and
//!   for ScyllaDB of fewer replicas than the configured consistency needs). The replication stream
//!   acknowledges a position to Postgres only after that.
//! - **Tasks coalesce.** One pending task per [`Task::id`]; enqueuing an id that is pending raises its LSN to
//!   the larger of the two, lowers its floor to the smaller of the two (see below), and keeps its place in
//!   line (and its `enqueued_at_ms`).
//! - **Oldest first.** [`Store::claim`] hands out the tasks enqueued first (retried tasks keep their place
//!   once due). With several processes on ScyllaDB, "first" follows each process's clock, so tasks
//!   enqueued within clock skew of each other may come out of order.
//! - **At-least-once, never twice at once.** A claimed task is not handed to another worker while its lease
//!   lasts. A claimed task that is neither finished nor retried (its worker died) is handed out again once
//!   its lease runs out (embedded: also after a restart), with one more attempt. Finishing a task whose LSN
//!   was raised while it was claimed keeps it queued (the newer change still needs a refresh) and
//!   releases it.
//! - **Finish.** [`Store::finish`] stores the result, queues the follow-ups and removes the task. The
//!   embedded store does it in one transaction; ScyllaDB does it in that order, so a crash part-way leaves
//!   the task to run again when its lease runs out, and loses nothing.
//! - **Lazy durability.** A backend may make [`Store::finish`], [`Store::store_result`] and
//!   [`Store::register_key`] durable lazily: a crash may then lose one whole (never half of one), which
//!   only makes a refresh run again.
//! - **Leases are exclusive.** [`Store::try_lease`] gives a named lease to one holder at a time, until it
//!   runs out or is released.
//! - **The pending floor.** Every pending task (claimed or not, due or delayed) has a *floor*: the lowest
//!   change LSN it still owes a refresh for ([`Task::floor`], at most [`Task::lsn`]).
//!   [`Store::pending_floor`] answers a lower bound of the lowest floor of all pending tasks, and `None`
//!   only when nothing is pending. `/update?wait=fresh` and `/fetch?min_lsn` rely on it: once the stream
//!   has durably queued everything up to `L` and the pending floor is above `L` (or nothing is pending),
//!   every change up to `L` is reflected in every cached entry. A lower bound is always safe; the tighter
//!   it is, the sooner waits end. The trait's default is `Some(0)` while anything is queued (waits then
//!   last until the queue drains). The embedded store is exact, moving floors like this:
//!   - a new task's floor is its [`Task::floor`];
//!   - coalescing keeps the smaller floor: `floor = min(pending.floor, task.floor)`;
//!   - [`Store::finish`] that keeps a task (its LSN was raised after the claim) sets its floor to
//!     `max(floor, claim.lsn + 1)`: the refresh just done saw every change up to `claim.lsn`;
//!   - the follow-ups of [`Store::finish`] inherit the finished task's floor: each is enqueued with
//!     `floor = min(follow_up.floor, floor of the task being finished)` (when that task is still pending),
//!     so that a lookup or primer-page task hands its debt on to the key tasks it creates, in the same
//!     atomic write (a backend whose `finish` is not atomic must queue the follow-ups before it removes
//!     the task, so that the debt is never unaccounted for);
//!   - [`Store::retry`] leaves the floor as it is.
//! - **Parking.** [`Store::park`] gives a claim back like [`Store::retry`], but the task no longer owes
//!   its floor: a task that keeps failing the same way (a key whose query Postgres refuses every time)
//!   must not hold every freshness wait. A parked task stays queued (and counted in
//!   [`QueueStats::parked`]) and is claimed again after its delay; enqueuing its id again unparks it
//!   (the new change's floor counts, and it is due at once). Finishing it removes it as usual. A backend
//!   that cannot drop a floor may keep the default (a plain retry: safe, waits last until it works).

pub mod codec;
pub mod cql;
#[cfg(test)]
mod cql_model;
pub mod cql_queue;
pub mod embedded;
mod hot;
#[cfg(feature = "scylla")]
pub mod scylla;
mod settings;
#[cfg(any(test, feature = "test-utils"))]
pub mod slow;

pub use settings::{
    Capacity, Consistency, DEFAULT_CQL_PORT, DEFAULT_KEYSPACE, KeyspaceReplication, ScyllaConfig,
    StoreConfig,
};

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::lsn::Lsn;

/// One cached value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The JSON document, exactly as served.
    pub value: Bytes,
    /// Every published change up to this LSN is reflected in `value`.
    pub lsn: Lsn,
    /// When the value was computed, in milliseconds since the Unix epoch.
    pub computed_at_ms: i64,
    /// When the entry stops being fresh, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<i64>,
}

/// A unit of refresh work. Its `id` says what to do to the layers above; the store treats it as opaque
/// text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    /// The commit LSN of the newest change that asked for this task: the refresh must see it.
    pub lsn: Lsn,
    /// The commit LSN of the oldest change this task still owes a refresh for (`floor <= lsn`). Until the
    /// task is finished, [`Store::pending_floor`] is at most this. Usually equal to `lsn`; lower when the
    /// task stands for several changes (the stream's batch coalesced them).
    pub floor: Lsn,
}

impl Task {
    /// A task for one change: its floor is its LSN.
    pub fn new(id: impl Into<String>, lsn: Lsn) -> Task {
        Task {
            id: id.into(),
            lsn,
            floor: lsn,
        }
    }
}

/// A task handed to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: String,
    /// The task's LSN when it was claimed.
    pub lsn: Lsn,
    /// How many times it was claimed before and not finished.
    pub attempts: u32,
    /// When the task was first enqueued (ms since the Unix epoch).
    pub enqueued_at_ms: i64,
}

/// What [`Store::store_result`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The entry was written.
    Written,
    /// A newer entry (of this LSN, higher than the one offered) was kept.
    KeptNewer(Lsn),
}

/// Size and age of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub depth: u64,
    pub claimed: u64,
    /// `enqueued_at_ms` of the oldest pending task.
    pub oldest_enqueued_at_ms: Option<i64>,
    /// Of `depth`, tasks parked after failing repeatedly ([`Store::park`]): they do not hold the pending
    /// floor.
    pub parked: u64,
    /// The figures are estimates, not counts (the CQL store keeps counters rather than scanning): `depth`
    /// also counts enqueues no claimer has looked at yet (several of one id count several times until
    /// then), and a counter write lost in a crash, or repeated by a retry, stays off by that much.
    pub estimated: bool,
}

/// How full a store with a capacity is ([`Store::capacity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CapacityStats {
    /// Keys held (registered or stored).
    pub keys: u64,
    /// Bytes charged for them (keys and entries; see `store.max_bytes`).
    pub bytes: u64,
    pub max_keys: u64,
    pub max_bytes: u64,
    /// Keys evicted since the process started.
    pub evictions: u64,
    /// Compactions of the file since the process started.
    pub compactions: u64,
    /// The size of the store's file on disk.
    pub file_bytes: u64,
}

/// The cause of a [`StoreError::Backend`]: the error of the database, driver or system call underneath.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The backend failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `context` says what failed (the operation, and the path or statement it was on); `source` is the
    /// error underneath, when there is one, and is not repeated in the text (print the chain to see it).
    #[error("store backend error: {context}")]
    Backend {
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// `context` failed because of `source`.
    pub fn backend(
        context: impl Into<Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> StoreError {
        StoreError::Backend {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// `context` failed, and says it all (no error underneath).
    pub fn failed(context: impl Into<Cow<'static, str>>) -> StoreError {
        StoreError::Backend {
            context: context.into(),
            source: None,
        }
    }

    /// The same error, its context preceded by `outer` (`outer: context`); other errors as they are.
    pub fn within(self, outer: impl std::fmt::Display) -> StoreError {
        match self {
            StoreError::Backend { context, source } => StoreError::Backend {
                context: format!("{outer}: {context}").into(),
                source,
            },
            other => other,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A cache store and refresh queue. See the module docs for the contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The entry for `key`, if one is stored.
    async fn get(&self, key: &str) -> StoreResult<Option<Entry>>;

    /// Whether `key` is in the key index (stored, or registered by [`Store::register_key`]).
    async fn is_registered(&self, key: &str) -> StoreResult<bool>;

    /// Put `key` in the index of `primer` without a value, so that changes to it are refreshed while its
    /// first value is being computed.
    async fn register_key(&self, primer: &str, key: &str) -> StoreResult<()>;

    /// Store `entry` for `key` (and index it under `primer`) unless a newer entry is stored.
    async fn store_result(&self, primer: &str, key: &str, entry: Entry) -> StoreResult<Stored>;

    /// [`Store::store_result`], but only while `key` is registered: `None` (nothing written) when it is
    /// not, because it was removed or evicted after it was registered. A fetch's miss stores its result
    /// this way, so that a key evicted while its value was computed stays out (the stream stopped
    /// queueing its changes when it left the index; stored again, it would go stale). The default is
    /// `store_result`: right for a backend that never removes keys on its own (the scylla store).
    async fn store_if_registered(
        &self,
        primer: &str,
        key: &str,
        entry: Entry,
    ) -> StoreResult<Option<Stored>> {
        self.store_result(primer, key, entry).await.map(Some)
    }

    /// How full the store is, for a backend with a capacity (the embedded store); `None` otherwise.
    /// Cheap: counters the backend keeps, read without I/O (but the file's size).
    fn capacity(&self) -> Option<CapacityStats> {
        None
    }

    /// Remove `key`'s entry and its index record.
    async fn remove_key(&self, primer: &str, key: &str) -> StoreResult<()>;

    /// Keys indexed under `primer`, in key order, after `after` (exclusive), at most `limit`.
    async fn keys(
        &self,
        primer: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>>;

    /// How many keys are indexed under `primer` (for `kck status`). The default pages through
    /// [`Store::keys`]; a backend that can count cheaper should override it. Callers cache the answer for a
    /// few seconds, so it may be approximate for a backend that cannot count exactly.
    async fn key_count(&self, primer: &str) -> StoreResult<u64> {
        const PAGE: usize = 10_000;
        let mut count = 0u64;
        let mut after: Option<String> = None;
        loop {
            let keys = self.keys(primer, after.as_deref(), PAGE).await?;
            count += keys.len() as u64;
            if keys.len() < PAGE {
                return Ok(count);
            }
            after = keys.into_iter().next_back();
        }
    }

    /// Durably add tasks, coalescing by id.
    async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()>;

    /// Claim up to `max` pending tasks that are not claimed and are due, oldest first. A claim lasts
    /// `lease`; past it another worker may claim the task again.
    async fn claim(&self, max: usize, lease: Duration) -> StoreResult<Vec<Claim>>;

    /// Finish a claim: in one atomic write, store `result` (as [`Store::store_result`] would), enqueue
    /// `follow_up`, and remove the task unless its LSN was raised after it was claimed.
    async fn finish(
        &self,
        claim: &Claim,
        result: Option<(&str, &str, Entry)>,
        follow_up: Vec<Task>,
    ) -> StoreResult<Option<Stored>>;

    /// Give a claim back to be retried no sooner than `delay` from now.
    async fn retry(&self, claim: &Claim, delay: Duration) -> StoreResult<()>;

    /// Give a claim that keeps failing back to be retried no sooner than `delay` from now, parked: it no
    /// longer holds the pending floor until its id is enqueued again (see "Parking" in the module docs).
    /// The default is [`Store::retry`] (the task keeps its floor).
    async fn park(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        self.retry(claim, delay).await
    }

    /// Up to `limit` ids of parked tasks, in id order (for `/status`). The default knows of none.
    async fn parked(&self, limit: usize) -> StoreResult<Vec<String>> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// Wait until a task may be claimable or `timeout` passes.
    async fn wait_for_tasks(&self, timeout: Duration);

    async fn queue_stats(&self) -> StoreResult<QueueStats>;

    /// [`QueueStats::depth`] alone, for the stream's backpressure (asked before every batch it writes):
    /// a backend whose full stats cost more than its depth should override it.
    async fn queue_depth(&self) -> StoreResult<u64> {
        Ok(self.queue_stats().await?.depth)
    }

    /// A lower bound of the lowest floor of all pending tasks (claimed or not, due or delayed), or `None`
    /// when the queue is empty: no change older than it can still be missing from a cached entry. See "The
    /// pending floor" in the module docs. Called by freshness waits (every 50 ms while a client waits), so
    /// it should be a point lookup, not a scan of the queue.
    ///
    /// The default is safe but loose: `Some(0)` while the queue holds any task, so waits last until it
    /// drains. A backend should track floors exactly (the embedded store does).
    async fn pending_floor(&self) -> StoreResult<Option<Lsn>> {
        Ok((self.queue_stats().await?.depth > 0).then_some(Lsn::ZERO))
    }

    /// Small named values kck keeps about itself (for example the config fingerprint).
    async fn get_meta(&self, name: &str) -> StoreResult<Option<Bytes>>;
    async fn put_meta(&self, name: &str, value: Bytes) -> StoreResult<()>;

    /// Take or renew the lease `name` for `holder` for `ttl` from now. Returns true if `holder` holds it
    /// now: it was free, its previous holder's lease ran out, or `holder` already held it (then it is
    /// extended). Atomic across every process sharing the store: at most one holder at a time, so that
    /// work guarded by one lease name (for example a scheduled job) runs at most once at a time.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool>;

    /// Give up the lease `name` if `holder` holds it (otherwise do nothing).
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()>;
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn backend_errors_keep_their_cause_out_of_their_text() {
        let e =
            StoreError::backend("commit", std::io::Error::other("disk on fire")).within("finish");
        assert_eq!(e.to_string(), "store backend error: finish: commit");
        assert_eq!(e.source().unwrap().to_string(), "disk on fire");

        let e = StoreError::failed("store_result: the key is empty");
        assert_eq!(
            e.to_string(),
            "store backend error: store_result: the key is empty"
        );
        assert!(e.source().is_none());

        assert!(matches!(StoreError::Closed.within("x"), StoreError::Closed));
        let e = StoreError::Corrupt("entry 'k'".into()).within("x");
        assert_eq!(e.to_string(), "store data is corrupt: entry 'k'");
    }
}
