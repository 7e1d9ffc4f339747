//! The embedded store: one redb file, nothing to install.
//!
//! [`EmbeddedStore`] keeps cache entries, the per-primer key index and the refresh queue in
//! `DIR/kck.redb`, a [redb](https://docs.rs/redb) database, so that a single kck process needs no
//! external service. It implements the [`Store`] contract (see [`super`]).
//!
//! # Tables
//! | table                  | key                   | value                                          |
//! |------------------------|-----------------------|------------------------------------------------|
//! | `entries`              | key                   | encoded [`Entry`] (see below)                  |
//! | `key_index`            | (primer, key)         | `()`: the keys of a primer, in key order       |
//! | `key_primers`          | (key, primer)         | `()`: the reverse, for [`Store::is_registered`] |
//! | `queue_tasks`          | task id               | (seq, lsn, enqueued_at_ms, attempts, not_before_ms) |
//! | `queue_ready`          | seq                   | task id: tasks that are due, oldest first      |
//! | `queue_delayed`        | (not_before_ms, seq)  | task id: retried tasks, soonest due first       |
//! | `queue_delayed_by_seq` | seq                   | task id: the same tasks, oldest first          |
//! | `queue_task_floor`     | task id               | the task's floor (see [`Store::pending_floor`]) |
//! | `queue_floor`          | (floor, task id)      | `()`: the floors in order, for `pending_floor`  |
//! | `meta`                 | name                  | bytes                                          |
//! | `leases`               | name                  | (holder, expires_at_ms)                        |
//!
//! An encoded entry is a 26-byte header followed by the value: format byte (1), LSN (u64 LE),
//! `computed_at_ms` (i64 LE), expiry flag (0 or 1), `expires_at_ms` (i64 LE, 0 without expiry).
//!
//! # Invariants
//! - Every task in `queue_tasks` is in exactly one order table: `queue_ready` under its seq when its
//!   `not_before_ms` is 0, otherwise `queue_delayed` under (`not_before_ms`, seq) and
//!   `queue_delayed_by_seq` under seq. A retried task keeps its seq (its place among the oldest) and
//!   stays in `queue_delayed` until it is finished, even once it is due: claims take due delayed
//!   tasks first, then ready ones, so tasks waiting out a backoff are never scanned.
//! - Seqs grow with every new task (the writer keeps the next one in memory, starting after the
//!   largest stored one), so seq order is enqueue order and the oldest task is the smaller of the
//!   first keys of `queue_ready` and `queue_delayed_by_seq`.
//! - Every key in `key_index` is in `key_primers` and the reverse. `store_result` indexes the key.
//! - Every task in `queue_tasks` has one row in `queue_task_floor` and the matching (floor, id) in
//!   `queue_floor`, and nothing else is in either, so the pending floor is the first key of
//!   `queue_floor`. (A store written before floors existed gets them at open: floor = the task's LSN.)
//! - An entry's LSN never decreases: the comparison runs inside the write transaction that replaces it.
//!
//! # Writes: group commit
//! One writer thread owns every write. Callers send it a request and await a oneshot reply; the
//! writer takes every request waiting in its channel (up to a budget), applies them in one write
//! transaction, commits it, and only then answers them all. So concurrent `enqueue` calls share fsyncs.
//! A commit is durable (fsync) when one of its writes must be (`enqueue`, `retry`, `remove_key`,
//! `put_meta`) or the last durable commit is a second old; `finish`, `store_result` and `register_key`
//! alone commit without an fsync: a crash may lose them whole, which only makes a refresh run again. If any request of a batch fails, the transaction is abandoned and the
//! batch is redone one request per transaction, so one bad request fails alone.
//!
//! # Reads
//! `get`, `is_registered`, `keys`, `queue_stats`, `get_meta`, `claim` read a snapshot with
//! `begin_read` on the caller's thread: they are short point lookups or bounded scans.
//!
//! # Claims
//! Claims live in memory (id → lease deadline and the claim's LSN and attempts): after a restart every
//! task is claimable again, which is what at-least-once asks. A claim that outlives its lease is handed
//! out again, with one more attempt. Claiming holds the claims lock while it reads, and the writer
//! releases a claim only after the commit that finished or retried it, so a claim never sees a task
//! that is released but not yet committed as finished.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};
use tokio::sync::{Notify, oneshot};

use super::codec::Layout;
use super::hot::HotEntries;
use super::{
    Capacity, CapacityStats, Claim, Entry, QueueStats, Store, StoreError, StoreResult, Stored, Task,
};
use crate::clock::now_ms;
use crate::lsn::Lsn;

/// The database file inside the store directory.
pub const FILE_NAME: &str = "kck.redb";

/// redb's own page cache. Its default is 1 GiB, which a large store fills (kck's memory would grow with
/// the store); hits are served from [`HotEntries`], so redb's cache only needs the write path and the
/// queue's pages.
const REDB_CACHE: usize = 32 << 20;

/// Bytes of entries kept in memory in front of redb unless `store.memory_cache` says otherwise.
pub const DEFAULT_MEMORY_CACHE: usize = 64 << 20;

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const KEY_INDEX: TableDefinition<(&str, &str), ()> = TableDefinition::new("key_index");
const KEY_PRIMERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("key_primers");
const TASKS: TableDefinition<&str, TaskRow> = TableDefinition::new("queue_tasks");
const READY: TableDefinition<u64, &str> = TableDefinition::new("queue_ready");
const DELAYED: TableDefinition<(i64, u64), &str> = TableDefinition::new("queue_delayed");
const DELAYED_BY_SEQ: TableDefinition<u64, &str> = TableDefinition::new("queue_delayed_by_seq");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const LEASES: TableDefinition<&str, (&str, i64)> = TableDefinition::new("leases");
const TASK_FLOOR: TableDefinition<&str, u64> = TableDefinition::new("queue_task_floor");
const FLOORS: TableDefinition<(u64, &str), ()> = TableDefinition::new("queue_floor");
/// key → (access stamp, bytes charged): every key the index holds, for the capacity and eviction.
const KEY_STAMP: TableDefinition<&str, (u64, u64)> = TableDefinition::new("key_stamp");
/// (access stamp, key): the keys, least recently read or written first.
const KEY_ORDER: TableDefinition<(u64, &str), ()> = TableDefinition::new("key_order");
/// The `meta` row holding the bytes charged for every key (u64 LE). Missing in a store written before
/// capacities existed: then [`EmbeddedStore::prepare`] stamps every key.
const CAPACITY_BYTES_META: &str = "kck.capacity_bytes";
/// Most keys one commit evicts (the rest go with the next commits), so a lowered limit never makes one
/// huge transaction.
const MAX_EVICTIONS_PER_COMMIT: u64 = 4096;
/// What a key costs beyond its bytes: its rows in five tables and their B-tree slots.
const KEY_OVERHEAD: u64 = 64;
/// A key is kept in five tables (`entries`, both indexes, both access-order tables).
const KEY_COPIES: u64 = 5;

/// What [`Capacity`] charges a key: its copies, its encoded entry (if any) and [`KEY_OVERHEAD`].
fn charge(key: &str, entry_len: usize) -> u64 {
    KEY_COPIES * key.len() as u64 + entry_len as u64 + KEY_OVERHEAD
}
/// Tasks parked after failing repeatedly ([`Store::park`]): they have no floor row.
const PARKED: TableDefinition<&str, ()> = TableDefinition::new("queue_parked");

/// (seq, lsn, enqueued_at_ms, attempts, not_before_ms); `not_before_ms == 0` means ready.
type TaskRow = (u64, u64, i64, u32, i64);

/// Most work one write transaction takes: requests count 1, plus 1 per task or result they carry.
const MAX_BATCH_WEIGHT: usize = 8192;

// ---------------------------------------------------------------------------------------------------
// Entry encoding

/// How entries are laid out in [`ENTRIES`] (see [`super::codec`]).
const LAYOUT: Layout = Layout::Compact;

// ---------------------------------------------------------------------------------------------------
// Errors

/// Turns a redb error into a [`StoreError`] that says which operation failed.
fn redb_error(op: &str, err: impl Into<redb::Error>) -> StoreError {
    match err.into() {
        redb::Error::Corrupted(msg) => StoreError::Corrupt(format!("{op}: {msg}")),
        other => StoreError::backend(op.to_owned(), other),
    }
}

trait Context<T> {
    fn ctx(self, op: &str) -> StoreResult<T>;
}

impl<T, E: Into<redb::Error>> Context<T> for Result<T, E> {
    fn ctx(self, op: &str) -> StoreResult<T> {
        self.map_err(|e| redb_error(op, e))
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------------
// Shared state: claims and the wake-up signal

/// A live (or expired, not yet replaced) claim.
#[derive(Debug, Clone, Copy)]
struct ClaimRecord {
    deadline: Instant,
    lsn: Lsn,
    attempts: u32,
}

impl ClaimRecord {
    fn matches(&self, claim: &Claim) -> bool {
        self.lsn == claim.lsn && self.attempts == claim.attempts
    }
}

#[derive(Default)]
struct Shared {
    claims: Mutex<HashMap<String, ClaimRecord>>,
    /// Woken after every commit that may have made a task claimable.
    tasks_changed: Notify,
    /// Keys read since the last commit, for the access order.
    touched: Touches,
    /// What the last commit left (see [`CapacityStats`]).
    keys: AtomicU64,
    bytes: AtomicU64,
    evictions: AtomicU64,
    compactions: AtomicU64,
}

/// Keys read (hits) since the writer last moved them to the front of the access order: a read costs
/// one shard lock and, the first time a key is read between two commits, one allocation. Bounded: when
/// a shard is full, further reads of new keys are not recorded (those keys keep their older place).
struct Touches {
    shards: Box<[Mutex<std::collections::HashSet<String>>]>,
}

const TOUCH_SHARDS: usize = 16;
/// Keys one shard remembers between two commits.
const TOUCHES_PER_SHARD: usize = 4096;

impl Default for Touches {
    fn default() -> Touches {
        Touches {
            shards: (0..TOUCH_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Touches {
    fn touch(&self, key: &str) {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in key.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
        let shard = &self.shards[(h % TOUCH_SHARDS as u64) as usize];
        let mut set = shard.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() < TOUCHES_PER_SHARD && !set.contains(key) {
            set.insert(key.to_owned());
        }
    }

    fn take(&self) -> Vec<String> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut set = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(set.drain());
        }
        out
    }
}

impl Shared {
    fn claims(&self) -> MutexGuard<'_, HashMap<String, ClaimRecord>> {
        // The map holds plain data that no panic can leave half-updated.
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------------------------------
// Writer requests

enum Op {
    RegisterKey {
        primer: String,
        key: String,
    },
    StoreResult {
        primer: String,
        key: String,
        entry: Entry,
        /// Only if the key is registered (else nothing is written: [`Reply::Finished`] `None`).
        if_registered: bool,
    },
    RemoveKey {
        primer: String,
        key: String,
    },
    Enqueue {
        tasks: Vec<Task>,
    },
    Finish {
        claim: Claim,
        result: Option<(String, String, Entry)>,
        follow_up: Vec<Task>,
    },
    Retry {
        claim: Claim,
        not_before_ms: i64,
    },
    Park {
        claim: Claim,
        not_before_ms: i64,
    },
    PutMeta {
        name: String,
        value: Bytes,
    },
    /// Compact the file (outside any transaction: see [`Writer::compact`]).
    Compact,
    TryLease {
        name: String,
        holder: String,
        ttl_ms: i64,
    },
    ReleaseLease {
        name: String,
        holder: String,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::RegisterKey { .. } => "register_key",
            Op::StoreResult { .. } => "store_result",
            Op::RemoveKey { .. } => "remove_key",
            Op::Enqueue { .. } => "enqueue",
            Op::Finish { .. } => "finish",
            Op::Retry { .. } => "retry",
            Op::Park { .. } => "park",
            Op::PutMeta { .. } => "put_meta",
            Op::Compact => "compact",
            Op::TryLease { .. } => "try_lease",
            Op::ReleaseLease { .. } => "release_lease",
        }
    }

    /// Whether the write must be on disk before its caller hears back. The others are committed without
    /// an fsync (redb makes them durable with the next durable commit, at most a second later): a crash
    /// may lose a recent `finish` (its task stays queued and the refresh runs again), a result or a
    /// registration (computed again on the next miss). That is the contract's at-least-once, and it takes
    /// an fsync off every refresh. Leases need no fsync either: only one process opens an embedded store,
    /// and a crash that loses a lease also ended its holder.
    fn must_be_durable(&self) -> bool {
        matches!(
            self,
            Op::Enqueue { .. }
                | Op::Retry { .. }
                | Op::Park { .. }
                | Op::RemoveKey { .. }
                | Op::PutMeta { .. }
        )
    }

    fn weight(&self) -> usize {
        match self {
            Op::Enqueue { tasks } => 1 + tasks.len(),
            Op::Finish { follow_up, .. } => 2 + follow_up.len(),
            _ => 1,
        }
    }
}

/// What a request answers.
#[derive(Debug)]
enum Reply {
    Unit,
    Stored(Stored),
    Finished(Option<Stored>),
    Leased(bool),
}

/// What to do once the transaction that applied a request has committed.
enum Effect {
    None,
    /// The queue gained a task that may be claimable.
    Wake,
    /// Release the claim on this task (only if it is still this claim, unless the task is gone).
    Release {
        claim: Claim,
        task_gone: bool,
        wake: bool,
    },
}

struct Request {
    op: Op,
    reply: oneshot::Sender<StoreResult<Reply>>,
}

// ---------------------------------------------------------------------------------------------------
// The writer thread

/// Every table, opened for writing in one transaction.
struct Tables<'t> {
    entries: Table<'t, &'static str, &'static [u8]>,
    key_index: Table<'t, (&'static str, &'static str), ()>,
    key_primers: Table<'t, (&'static str, &'static str), ()>,
    tasks: Table<'t, &'static str, TaskRow>,
    ready: Table<'t, u64, &'static str>,
    delayed: Table<'t, (i64, u64), &'static str>,
    delayed_by_seq: Table<'t, u64, &'static str>,
    meta: Table<'t, &'static str, &'static [u8]>,
    leases: Table<'t, &'static str, (&'static str, i64)>,
    task_floor: Table<'t, &'static str, u64>,
    floors: Table<'t, (u64, &'static str), ()>,
    key_stamp: Table<'t, &'static str, (u64, u64)>,
    key_order: Table<'t, (u64, &'static str), ()>,
    /// The next access stamp (the writer's, copied back after a commit).
    next_stamp: u64,
    /// Bytes charged for every key (see [`charge`]).
    bytes: u64,
    /// Keys evicted in this transaction.
    evicted: u64,
    parked: Table<'t, &'static str, ()>,
    /// Entries written (`Some`) and removed (`None`) in this transaction, for [`HotEntries::committed`].
    changes: Vec<(String, Option<Entry>)>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        let op = "open tables for writing";
        Ok(Tables {
            entries: txn.open_table(ENTRIES).ctx(op)?,
            key_index: txn.open_table(KEY_INDEX).ctx(op)?,
            key_primers: txn.open_table(KEY_PRIMERS).ctx(op)?,
            tasks: txn.open_table(TASKS).ctx(op)?,
            ready: txn.open_table(READY).ctx(op)?,
            delayed: txn.open_table(DELAYED).ctx(op)?,
            delayed_by_seq: txn.open_table(DELAYED_BY_SEQ).ctx(op)?,
            meta: txn.open_table(META).ctx(op)?,
            leases: txn.open_table(LEASES).ctx(op)?,
            task_floor: txn.open_table(TASK_FLOOR).ctx(op)?,
            floors: txn.open_table(FLOORS).ctx(op)?,
            key_stamp: txn.open_table(KEY_STAMP).ctx(op)?,
            key_order: txn.open_table(KEY_ORDER).ctx(op)?,
            next_stamp: 0,
            bytes: 0,
            evicted: 0,
            parked: txn.open_table(PARKED).ctx(op)?,
            changes: Vec::new(),
        })
    }

    fn index_key(&mut self, primer: &str, key: &str) -> StoreResult<()> {
        let op = "index key";
        if self.key_index.get((primer, key)).ctx(op)?.is_none() {
            self.key_index.insert((primer, key), ()).ctx(op)?;
        }
        if self.key_primers.get((key, primer)).ctx(op)?.is_none() {
            self.key_primers.insert((key, primer), ()).ctx(op)?;
        }
        Ok(())
    }

    /// `bump`: the key moves to the front of the access order (a fetch's result or a registration);
    /// a refresh (`finish`) leaves its place as it is.
    fn store_result(
        &mut self,
        primer: &str,
        key: &str,
        entry: &Entry,
        bump: bool,
    ) -> StoreResult<Stored> {
        let op = "store_result";
        let stored_lsn = match self.entries.get(key).ctx(op)? {
            Some(bytes) => Some(LAYOUT.decode_lsn(key, bytes.value())?),
            None => None,
        };
        if let Some(stored) = stored_lsn
            && stored > entry.lsn
        {
            return Ok(Stored::KeptNewer(stored));
        }
        let mut slot = self
            .entries
            .insert_reserve(key, Layout::encoded_len(entry))
            .ctx(op)?;
        LAYOUT.encode_into(entry, slot.as_mut());
        drop(slot);
        self.changes.push((key.to_owned(), Some(entry.clone())));
        self.index_key(primer, key)?;
        self.stamp(key, Some(charge(key, Layout::encoded_len(entry))), bump)?;
        Ok(Stored::Written)
    }

    fn remove_key(&mut self, primer: &str, key: &str) -> StoreResult<()> {
        let op = "remove_key";
        let had_entry = self.entries.remove(key).ctx(op)?.is_some();
        if had_entry {
            self.changes.push((key.to_owned(), None));
        }
        self.key_index.remove((primer, key)).ctx(op)?;
        self.key_primers.remove((key, primer)).ctx(op)?;
        if self.registered(key)? {
            // Still indexed under another primer: charged for its key alone now.
            if had_entry {
                self.stamp(key, Some(charge(key, 0)), false)?;
            }
        } else {
            self.unstamp(key)?;
        }
        Ok(())
    }

    /// Whether `key` is in the index under any primer.
    fn registered(&self, key: &str) -> StoreResult<bool> {
        let op = "is_registered";
        let mut range = self.key_primers.range((key, "")..).ctx(op)?;
        match range.next() {
            Some(item) => Ok(item.ctx(op)?.0.value().0 == key),
            None => Ok(false),
        }
    }

    /// Records `key` in the access order, charged `bytes` (`None`: what it was charged, or its key
    /// alone when new). `bump`: it becomes the most recently used key; else a new key does, and a known
    /// key keeps its place.
    fn stamp(&mut self, key: &str, bytes: Option<u64>, bump: bool) -> StoreResult<()> {
        let op = "access order";
        let old = self.key_stamp.get(key).ctx(op)?.map(|g| g.value());
        let bytes = bytes
            .or(old.map(|(_, b)| b))
            .unwrap_or_else(|| charge(key, 0));
        let stamp = match old {
            Some((stamp, _)) if !bump => stamp,
            _ => {
                self.next_stamp += 1;
                self.next_stamp
            }
        };
        if old == Some((stamp, bytes)) {
            return Ok(());
        }
        if let Some((old_stamp, old_bytes)) = old {
            self.bytes = self.bytes.saturating_sub(old_bytes);
            if old_stamp != stamp {
                self.key_order.remove((old_stamp, key)).ctx(op)?;
                self.key_order.insert((stamp, key), ()).ctx(op)?;
            }
        } else {
            self.key_order.insert((stamp, key), ()).ctx(op)?;
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.key_stamp.insert(key, (stamp, bytes)).ctx(op)?;
        Ok(())
    }

    /// Takes `key` out of the access order (it is no longer indexed).
    fn unstamp(&mut self, key: &str) -> StoreResult<()> {
        let op = "access order";
        if let Some((stamp, bytes)) = self.key_stamp.remove(key).ctx(op)?.map(|g| g.value()) {
            self.key_order.remove((stamp, key)).ctx(op)?;
            self.bytes = self.bytes.saturating_sub(bytes);
        }
        Ok(())
    }

    /// Moves keys read since the last commit to the front of the access order (those still held).
    fn touch(&mut self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            if self
                .key_stamp
                .get(key.as_str())
                .ctx("access order")?
                .is_some()
            {
                self.stamp(key, None, true)?;
            }
        }
        Ok(())
    }

    /// Evicts the least recently used keys (entry and registration) while the store holds more than
    /// `capacity`, at most [`MAX_EVICTIONS_PER_COMMIT`] of them. A task queued for an evicted key finds
    /// it unregistered and does nothing; its next fetch is a miss.
    fn evict(&mut self, capacity: Capacity) -> StoreResult<()> {
        let op = "evict";
        let mut evicted = 0;
        while evicted < MAX_EVICTIONS_PER_COMMIT
            && (self.key_stamp.len().ctx(op)? > capacity.max_entries
                || self.bytes > capacity.max_bytes)
        {
            let Some(key) = self
                .key_order
                .first()
                .ctx(op)?
                .map(|(k, _)| k.value().1.to_owned())
            else {
                break;
            };
            if self.entries.remove(key.as_str()).ctx(op)?.is_some() {
                self.changes.push((key.clone(), None));
            }
            let mut primers = Vec::new();
            for item in self.key_primers.range((key.as_str(), "")..).ctx(op)? {
                let (k, _) = item.ctx(op)?;
                let (k, p) = k.value();
                if k != key {
                    break;
                }
                primers.push(p.to_owned());
            }
            for p in primers {
                self.key_index.remove((p.as_str(), key.as_str())).ctx(op)?;
                self.key_primers
                    .remove((key.as_str(), p.as_str()))
                    .ctx(op)?;
            }
            self.unstamp(&key)?;
            evicted += 1;
        }
        self.evicted += evicted;
        Ok(())
    }

    /// Adds or coalesces `tasks`. `inherit`: a floor every task's floor is lowered to (the floor of
    /// the task whose follow-ups these are).
    fn enqueue(
        &mut self,
        tasks: &[Task],
        inherit: Option<u64>,
        next_seq: &mut u64,
        now: i64,
    ) -> StoreResult<()> {
        let op = "enqueue";
        for task in tasks {
            let id = task.id.as_str();
            let floor = task.floor.min(task.lsn).0.min(inherit.unwrap_or(u64::MAX));
            let existing = self.tasks.get(id).ctx(op)?.map(|g| g.value());
            match existing {
                Some((seq, lsn, enqueued_at, attempts, not_before)) => {
                    // A parked task asked for again owes this change: unparked, and due at once.
                    let unparked = self.parked.remove(id).ctx(op)?.is_some();
                    if unparked && not_before != 0 {
                        self.unorder(seq, not_before, op)?;
                        self.ready.insert(seq, id).ctx(op)?;
                    }
                    if task.lsn.0 > lsn || unparked {
                        let not_before = if unparked { 0 } else { not_before };
                        let row: TaskRow =
                            (seq, task.lsn.0.max(lsn), enqueued_at, attempts, not_before);
                        self.tasks.insert(id, row).ctx(op)?;
                    }
                    let old = self.task_floor.get(id).ctx(op)?.map(|g| g.value());
                    if old.is_none_or(|old| floor < old) {
                        self.set_floor(id, old, Some(floor), op)?;
                    }
                }
                None => {
                    let seq = *next_seq;
                    *next_seq += 1;
                    let row: TaskRow = (seq, task.lsn.0, now, 0, 0);
                    self.tasks.insert(id, row).ctx(op)?;
                    self.ready.insert(seq, id).ctx(op)?;
                    self.set_floor(id, None, Some(floor), op)?;
                }
            }
        }
        Ok(())
    }

    /// Moves task `id`'s floor from `old` to `new` (`None`: no floor row) in both floor tables.
    fn set_floor(
        &mut self,
        id: &str,
        old: Option<u64>,
        new: Option<u64>,
        op: &str,
    ) -> StoreResult<()> {
        if old == new {
            return Ok(());
        }
        if let Some(old) = old {
            self.floors.remove((old, id)).ctx(op)?;
        }
        match new {
            Some(new) => {
                self.task_floor.insert(id, new).ctx(op)?;
                self.floors.insert((new, id), ()).ctx(op)?;
            }
            None => {
                self.task_floor.remove(id).ctx(op)?;
            }
        }
        Ok(())
    }

    /// Removes `id` from whichever order table holds it.
    fn unorder(&mut self, seq: u64, not_before: i64, op: &str) -> StoreResult<()> {
        if not_before == 0 {
            self.ready.remove(seq).ctx(op)?;
        } else {
            self.delayed.remove((not_before, seq)).ctx(op)?;
            self.delayed_by_seq.remove(seq).ctx(op)?;
        }
        Ok(())
    }

    /// Removes the task unless its LSN was raised past `claim.lsn` (then its floor rises past
    /// `claim.lsn`). Returns whether no task is left, and the task's floor before (for its follow-ups
    /// to inherit), if it was pending.
    fn finish_task(&mut self, claim: &Claim) -> StoreResult<(bool, Option<u64>)> {
        let op = "finish";
        let id = claim.id.as_str();
        let Some((seq, lsn, _, _, not_before)) = self.tasks.get(id).ctx(op)?.map(|g| g.value())
        else {
            return Ok((true, None));
        };
        let floor = self.task_floor.get(id).ctx(op)?.map(|g| g.value());
        self.parked.remove(id).ctx(op)?;
        if lsn > claim.lsn.0 {
            // Every change up to the claim's LSN was seen by the refresh just done.
            let raised = floor
                .unwrap_or(lsn)
                .max(claim.lsn.0.saturating_add(1))
                .min(lsn);
            self.set_floor(id, floor, Some(raised), op)?;
            return Ok((false, floor));
        }
        self.tasks.remove(id).ctx(op)?;
        self.unorder(seq, not_before, op)?;
        self.set_floor(id, floor, None, op)?;
        Ok((true, floor))
    }

    fn retry(&mut self, claim: &Claim, not_before_ms: i64) -> StoreResult<()> {
        let op = "retry";
        let Some((seq, lsn, enqueued_at, attempts, old_not_before)) = self
            .tasks
            .get(claim.id.as_str())
            .ctx(op)?
            .map(|g| g.value())
        else {
            return Ok(());
        };
        let not_before = not_before_ms.max(1);
        let attempts = attempts.max(claim.attempts).saturating_add(1);
        self.unorder(seq, old_not_before, op)?;
        let row: TaskRow = (seq, lsn, enqueued_at, attempts, not_before);
        self.tasks.insert(claim.id.as_str(), row).ctx(op)?;
        self.delayed
            .insert((not_before, seq), claim.id.as_str())
            .ctx(op)?;
        self.delayed_by_seq.insert(seq, claim.id.as_str()).ctx(op)?;
        Ok(())
    }

    /// A retry that also takes the task's floor away: it is parked until enqueued again.
    fn park(&mut self, claim: &Claim, not_before_ms: i64) -> StoreResult<()> {
        let op = "park";
        let id = claim.id.as_str();
        if self.tasks.get(id).ctx(op)?.is_none() {
            return Ok(());
        }
        self.retry(claim, not_before_ms)?;
        let floor = self.task_floor.get(id).ctx(op)?.map(|g| g.value());
        self.set_floor(id, floor, None, op)?;
        self.parked.insert(id, ()).ctx(op)?;
        Ok(())
    }

    fn apply(&mut self, op: &Op, next_seq: &mut u64, now: i64) -> StoreResult<(Reply, Effect)> {
        Ok(match op {
            Op::RegisterKey { primer, key } => {
                self.index_key(primer, key)?;
                self.stamp(key, None, true)?;
                (Reply::Unit, Effect::None)
            }
            Op::StoreResult {
                primer,
                key,
                entry,
                if_registered: false,
            } => (
                Reply::Stored(self.store_result(primer, key, entry, true)?),
                Effect::None,
            ),
            Op::StoreResult {
                primer,
                key,
                entry,
                if_registered: true,
            } => {
                let stored = if self.registered(key)? {
                    Some(self.store_result(primer, key, entry, true)?)
                } else {
                    None
                };
                (Reply::Finished(stored), Effect::None)
            }
            Op::RemoveKey { primer, key } => {
                self.remove_key(primer, key)?;
                (Reply::Unit, Effect::None)
            }
            Op::Enqueue { tasks } => {
                self.enqueue(tasks, None, next_seq, now)?;
                (Reply::Unit, Effect::Wake)
            }
            Op::Finish {
                claim,
                result,
                follow_up,
            } => {
                // Only for a key still registered: one removed or evicted since its refresh began
                // stays out (the stream no longer queues its changes, so it would go stale).
                let stored = match result {
                    Some((primer, key, entry)) if self.registered(key)? => {
                        Some(self.store_result(primer, key, entry, false)?)
                    }
                    _ => None,
                };
                // The task goes first, so that a follow-up with the same id is a new task.
                let (task_gone, floor) = self.finish_task(claim)?;
                self.enqueue(follow_up, floor, next_seq, now)?;
                (
                    Reply::Finished(stored),
                    Effect::Release {
                        claim: claim.clone(),
                        task_gone,
                        wake: !task_gone || !follow_up.is_empty(),
                    },
                )
            }
            Op::Retry {
                claim,
                not_before_ms,
            } => {
                self.retry(claim, *not_before_ms)?;
                (
                    Reply::Unit,
                    Effect::Release {
                        claim: claim.clone(),
                        task_gone: false,
                        wake: true,
                    },
                )
            }
            // Handled by the writer before it opens a transaction.
            Op::Compact => (Reply::Unit, Effect::None),
            Op::Park {
                claim,
                not_before_ms,
            } => {
                self.park(claim, *not_before_ms)?;
                (
                    Reply::Unit,
                    Effect::Release {
                        claim: claim.clone(),
                        task_gone: false,
                        wake: true,
                    },
                )
            }
            Op::PutMeta { name, value } => {
                self.meta
                    .insert(name.as_str(), &value[..])
                    .ctx("put_meta")?;
                (Reply::Unit, Effect::None)
            }
            Op::TryLease {
                name,
                holder,
                ttl_ms,
            } => {
                let op = "try_lease";
                let current = self.leases.get(name.as_str()).ctx(op)?.map(|g| {
                    let (h, until) = g.value();
                    (h.to_owned(), until)
                });
                let free = match &current {
                    None => true,
                    Some((h, until)) => h == holder || *until <= now,
                };
                if free {
                    let until = now.saturating_add(*ttl_ms);
                    self.leases
                        .insert(name.as_str(), (holder.as_str(), until))
                        .ctx(op)?;
                }
                (Reply::Leased(free), Effect::None)
            }
            Op::ReleaseLease { name, holder } => {
                let op = "release_lease";
                let mine = self
                    .leases
                    .get(name.as_str())
                    .ctx(op)?
                    .is_some_and(|g| g.value().0 == holder.as_str());
                if mine {
                    self.leases.remove(name.as_str()).ctx(op)?;
                }
                (Reply::Unit, Effect::None)
            }
        })
    }
}

struct Writer {
    db: Arc<RwLock<Database>>,
    shared: Arc<Shared>,
    hot: Arc<HotEntries>,
    rx: mpsc::Receiver<Request>,
    next_seq: u64,
    capacity: Capacity,
    /// The database file (for its size).
    path: PathBuf,
    /// The last access stamp handed out.
    last_stamp: u64,
    /// Bytes charged for every key, as committed.
    bytes: u64,
    last_durable: std::time::Instant,
    /// A commit since the last durable one was not durable.
    durable_pending: bool,
    /// Keys were removed or evicted since the last look at the file's free space.
    freed: bool,
    /// When the writer last looked at the file's free space (`None`: not since open).
    last_space_check: Option<Instant>,
}

/// How often, at most, the writer looks at the file's free space after removals or evictions (the
/// look walks every table's pages).
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(60);
/// A file smaller than this is never compacted on its own.
const COMPACT_MIN_FILE: u64 = 16 << 20;

/// Read access to the database: compaction ([`Writer::compact`]) needs it alone.
fn shared_db(db: &RwLock<Database>) -> RwLockReadGuard<'_, Database> {
    // A panic cannot leave the database half-changed through this lock (redb's own state is its own).
    db.read().unwrap_or_else(|e| e.into_inner())
}

/// The longest a non-durable commit waits for a durable one.
const DURABLE_AT_LEAST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Writer {
    fn run(mut self) {
        loop {
            // With a non-durable commit outstanding, wait at most until it is due to be made durable.
            let first = if self.durable_pending {
                let due = DURABLE_AT_LEAST_EVERY.saturating_sub(self.last_durable.elapsed());
                match self.rx.recv_timeout(due) {
                    Ok(req) => req,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.make_durable();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.rx.recv() {
                    Ok(req) => req,
                    Err(_) => break,
                }
            };
            let mut weight = first.op.weight();
            let mut batch = vec![first];
            while weight < MAX_BATCH_WEIGHT {
                match self.rx.try_recv() {
                    Ok(req) => {
                        weight += req.op.weight();
                        batch.push(req);
                    }
                    Err(_) => break,
                }
            }
            let (compacts, batch): (Vec<Request>, Vec<Request>) =
                batch.into_iter().partition(|r| matches!(r.op, Op::Compact));
            self.freed |= batch.iter().any(|r| matches!(r.op, Op::RemoveKey { .. }));
            if !batch.is_empty() {
                self.process(batch);
            }
            if !compacts.is_empty() || self.space_check_due() {
                let result = self.compact(!compacts.is_empty());
                for req in compacts {
                    let _ = req.reply.send(match &result {
                        Ok(()) => Ok(Reply::Unit),
                        Err(e) => Err(StoreError::failed(format!(
                            "compact: {}",
                            crate::report::Chain(e)
                        ))),
                    });
                }
            }
        }
        if self.durable_pending {
            self.make_durable();
        }
        // Every handle is gone and every request answered.
    }

    fn space_check_due(&self) -> bool {
        self.freed
            && self
                .last_space_check
                .is_none_or(|at| at.elapsed() >= SPACE_CHECK_EVERY)
    }

    /// Gives the file's free pages back to the system, when asked (`forced`) or when more than half of
    /// a file of at least [`COMPACT_MIN_FILE`] is free. Readers of redb wait meanwhile (hits served from
    /// memory do not); it is rare: after removals or evictions, at most every [`SPACE_CHECK_EVERY`].
    fn compact(&mut self, forced: bool) -> Result<(), redb::Error> {
        self.last_space_check = Some(Instant::now());
        self.freed = false;
        if !forced {
            let stats = {
                let db = shared_db(&self.db);
                db.begin_write().map_err(redb::Error::from).and_then(|txn| {
                    let stats = txn.stats().map_err(redb::Error::from);
                    let _ = txn.abort();
                    stats
                })
            };
            let file = std::fs::metadata(&self.path).map_or(0, |m| m.len());
            match stats {
                Ok(stats) if file >= COMPACT_MIN_FILE && stats.fragmented_bytes() * 2 > file => {}
                Ok(_) => return Ok(()),
                Err(error) => {
                    tracing::warn!(error = %crate::report::Chain(&error), "Cannot read the store's free space.");
                    return Err(error);
                }
            }
        }
        if self.durable_pending {
            self.make_durable();
        }
        let before = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        let result = {
            let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
            db.compact()
        };
        match result {
            Ok(_) => {
                let after = std::fs::metadata(&self.path).map_or(0, |m| m.len());
                self.shared.compactions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(before, after, "Compacted the store's file.");
                Ok(())
            }
            Err(error) => {
                let error = redb::Error::from(error);
                tracing::warn!(error = %crate::report::Chain(&error), "Cannot compact the store's file.");
                Err(error)
            }
        }
    }

    /// An empty durable commit: makes the non-durable commits before it durable.
    fn make_durable(&mut self) {
        let result = shared_db(&self.db)
            .begin_write()
            .map_err(|e| e.to_string())
            .and_then(|txn| txn.commit().map_err(|e| e.to_string()));
        match result {
            Ok(()) => {
                self.last_durable = std::time::Instant::now();
                self.durable_pending = false;
            }
            Err(error) => {
                tracing::error!(%error, "Cannot make the store's recent writes durable; retrying.");
                self.last_durable = std::time::Instant::now();
            }
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        let ops: Vec<&Op> = batch.iter().map(|r| &r.op).collect();
        match self.commit(&ops) {
            Ok(outcomes) => self.complete(batch, outcomes),
            Err(err) if batch.len() == 1 => {
                if let Some(req) = batch.into_iter().next() {
                    let _ = req.reply.send(Err(err));
                }
            }
            Err(_) => {
                // Redo one request per transaction, so that only the failing ones fail.
                for req in batch {
                    match self.commit(&[&req.op]) {
                        Ok(outcomes) => self.complete(vec![req], outcomes),
                        Err(err) => {
                            let _ = req.reply.send(Err(err));
                        }
                    }
                }
            }
        }
    }

    /// Applies `ops` in one transaction: durable when one of them must be (see [`Op::must_be_durable`]) or
    /// the last durable commit is a second old.
    fn commit(&mut self, ops: &[&Op]) -> StoreResult<Vec<(Reply, Effect)>> {
        let db = shared_db(&self.db);
        let mut txn = db.begin_write().ctx("begin write transaction")?;
        let durable = ops.iter().any(|op| op.must_be_durable())
            || self.last_durable.elapsed() >= DURABLE_AT_LEAST_EVERY;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::backend("set durability", e))?;
        }
        let now = now_ms();
        let mut next_seq = self.next_seq;
        let mut outcomes = Vec::with_capacity(ops.len());
        let touched = self.shared.touched.take();
        let (changes, last_stamp, bytes, evicted, keys) = {
            let mut tables = Tables::open(&txn)?;
            tables.next_stamp = self.last_stamp;
            tables.bytes = self.bytes;
            tables.touch(&touched)?;
            for op in ops {
                let outcome = tables
                    .apply(op, &mut next_seq, now)
                    .map_err(|e| e.within(op.name()))?;
                outcomes.push(outcome);
            }
            tables.evict(self.capacity)?;
            if tables.bytes != self.bytes {
                tables
                    .meta
                    .insert(CAPACITY_BYTES_META, &tables.bytes.to_le_bytes()[..])
                    .ctx("capacity")?;
            }
            let keys = tables.key_stamp.len().ctx("capacity")?;
            (
                std::mem::take(&mut tables.changes),
                tables.next_stamp,
                tables.bytes,
                tables.evicted,
                keys,
            )
        };
        // Seqs and stamps handed to a transaction that then fails to commit are skipped, never reused.
        self.next_seq = next_seq;
        self.last_stamp = last_stamp;
        txn.commit().ctx("commit")?;
        self.bytes = bytes;
        self.shared.keys.store(keys, Ordering::Relaxed);
        self.shared.bytes.store(bytes, Ordering::Relaxed);
        self.freed |= evicted > 0;
        if evicted > 0 {
            self.shared.evictions.fetch_add(evicted, Ordering::Relaxed);
            tracing::debug!(
                evicted,
                keys,
                bytes,
                "Evicted the least recently used keys."
            );
        }
        // Committed: readers of redb see these now, and so do readers of the hot entries.
        self.hot.committed(changes);
        if durable {
            self.last_durable = std::time::Instant::now();
        }
        self.durable_pending = !durable;
        Ok(outcomes)
    }

    fn complete(&self, batch: Vec<Request>, outcomes: Vec<(Reply, Effect)>) {
        let mut wake = false;
        {
            let mut claims = None;
            for (_, effect) in &outcomes {
                match effect {
                    Effect::None => {}
                    Effect::Wake => wake = true,
                    Effect::Release {
                        claim,
                        task_gone,
                        wake: w,
                    } => {
                        wake |= *w;
                        let claims = claims.get_or_insert_with(|| self.shared.claims());
                        let mine = claims.get(&claim.id).is_some_and(|r| r.matches(claim));
                        if *task_gone || mine {
                            claims.remove(&claim.id);
                        }
                    }
                }
            }
        }
        if wake {
            self.shared.tasks_changed.notify_waiters();
        }
        for (req, (reply, _)) in batch.into_iter().zip(outcomes) {
            let _ = req.reply.send(Ok(reply));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The store

/// A read transaction, and the database shared with other readers while it lasts (compaction waits).
struct Reading<'a> {
    txn: ReadTransaction,
    _db: RwLockReadGuard<'a, Database>,
}

impl std::ops::Deref for Reading<'_> {
    type Target = ReadTransaction;
    fn deref(&self) -> &ReadTransaction {
        &self.txn
    }
}

/// Where the writer starts, read from the file at open.
struct Prepared {
    next_seq: u64,
    last_stamp: u64,
    bytes: u64,
    keys: u64,
}

/// The redb-backed [`Store`]. Cloning gives another handle to the same store; when the last handle
/// is dropped, the writer finishes the queued writes and the file is closed.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: Arc<RwLock<Database>>,
    shared: Arc<Shared>,
    hot: Arc<HotEntries>,
    capacity: Capacity,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain what is queued and stop; joining it releases its
        // handle on the database, so that the file is closed (and unlocked) when this returns.
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the store in `dir` (creating the directory and `dir/kck.redb` if needed), with the default
    /// in-memory front ([`DEFAULT_MEMORY_CACHE`] bytes).
    pub fn open(dir: &Path) -> StoreResult<EmbeddedStore> {
        EmbeddedStore::open_with(dir, DEFAULT_MEMORY_CACHE)
    }

    /// [`EmbeddedStore::open`] keeping at most about `memory_cache` bytes of entries in memory (see
    /// [`super::hot`]; 0: every read is a redb read).
    pub fn open_with(dir: &Path, memory_cache: usize) -> StoreResult<EmbeddedStore> {
        EmbeddedStore::open_configured(dir, memory_cache, Capacity::default())
    }

    /// [`EmbeddedStore::open_with`], holding at most `capacity` (the least recently used keys are
    /// evicted past it).
    pub fn open_configured(
        dir: &Path,
        memory_cache: usize,
        capacity: Capacity,
    ) -> StoreResult<EmbeddedStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::backend(
                format!("cannot create the store directory {}", dir.display()),
                e,
            )
        })?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(REDB_CACHE)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::failed(format!(
                    "cannot open the store {}: another kck process is using this store",
                    path.display()
                )),
                other => redb_error(&format!("cannot open the store {}", path.display()), other),
            })?;
        let prepared = Self::prepare(&db).map_err(|e| match e {
            StoreError::Corrupt(m) => {
                StoreError::Corrupt(format!("opening the store {}: {m}", path.display()))
            }
            other => other.within(format_args!("opening the store {}", path.display())),
        })?;
        let db = Arc::new(RwLock::new(db));
        let shared = Arc::new(Shared::default());
        shared.keys.store(prepared.keys, Ordering::Relaxed);
        shared.bytes.store(prepared.bytes, Ordering::Relaxed);
        let hot = Arc::new(HotEntries::new(memory_cache));
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            hot: hot.clone(),
            rx,
            next_seq: prepared.next_seq,
            capacity,
            last_stamp: prepared.last_stamp,
            bytes: prepared.bytes,
            last_durable: std::time::Instant::now(),
            durable_pending: false,
            freed: false,
            last_space_check: None,
            path: path.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("kck-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::backend("cannot start the store writer thread", e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                path,
                db,
                shared,
                hot,
                capacity,
                tx: Some(tx),
                writer: Some(writer),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Creates every table (so that readers can open them) and returns what the writer starts from.
    fn prepare(db: &Database) -> StoreResult<Prepared> {
        let txn = db.begin_write().ctx("begin write transaction")?;
        let next_seq;
        let (last_stamp, bytes, keys);
        {
            let mut tables = Tables::open(&txn)?;
            (last_stamp, bytes) = Self::prepare_access_order(&mut tables)?;
            keys = tables.key_stamp.len().ctx("capacity")?;
            let last_ready = tables
                .ready
                .last()
                .ctx("read queue")?
                .map(|(k, _)| k.value());
            let last_delayed = tables
                .delayed_by_seq
                .last()
                .ctx("read queue")?
                .map(|(k, _)| k.value());
            next_seq = last_ready.max(last_delayed).map_or(0, |s| s + 1);
            Self::backfill_floors(tables)?;
        }
        txn.commit().ctx("commit")?;
        Ok(Prepared {
            next_seq,
            last_stamp,
            bytes,
            keys,
        })
    }

    /// The last access stamp and the bytes charged. A store written before capacities existed (no
    /// bytes row in `meta`) gets every indexed key stamped, in key order, and charged.
    fn prepare_access_order(tables: &mut Tables<'_>) -> StoreResult<(u64, u64)> {
        let op = "prepare the access order";
        let last_stamp = tables
            .key_order
            .last()
            .ctx(op)?
            .map_or(0, |(k, _)| k.value().0);
        let stored = tables
            .meta
            .get(CAPACITY_BYTES_META)
            .ctx(op)?
            .and_then(|g| <[u8; 8]>::try_from(g.value()).ok())
            .map(u64::from_le_bytes);
        if let Some(bytes) = stored {
            return Ok((last_stamp, bytes));
        }
        let mut keys: Vec<(String, usize)> = Vec::new();
        for item in tables.key_primers.iter().ctx(op)? {
            let (k, _) = item.ctx(op)?;
            let key = k.value().0;
            if keys.last().is_some_and(|(last, _)| last == key) {
                continue;
            }
            let len = tables
                .entries
                .get(key)
                .ctx(op)?
                .map_or(0, |g| g.value().len());
            keys.push((key.to_owned(), len));
        }
        tables.next_stamp = last_stamp;
        tables.bytes = 0;
        for (key, len) in keys {
            tables.stamp(&key, Some(charge(&key, len)), false)?;
        }
        tables
            .meta
            .insert(CAPACITY_BYTES_META, &tables.bytes.to_le_bytes()[..])
            .ctx(op)?;
        Ok((tables.next_stamp, tables.bytes))
    }

    /// Gives every task without a floor (a store written before floors existed) the floor = its LSN;
    /// parked tasks have none on purpose.
    fn backfill_floors(mut tables: Tables<'_>) -> StoreResult<()> {
        let op = "backfill task floors";
        let owing = tables.task_floor.len().ctx(op)? + tables.parked.len().ctx(op)?;
        if owing == tables.tasks.len().ctx(op)? {
            return Ok(());
        }
        let mut missing = Vec::new();
        for item in tables.tasks.iter().ctx(op)? {
            let (id, row) = item.ctx(op)?;
            if tables.task_floor.get(id.value()).ctx(op)?.is_none()
                && tables.parked.get(id.value()).ctx(op)?.is_none()
            {
                missing.push((id.value().to_owned(), row.value().1));
            }
        }
        for (id, lsn) in missing {
            tables.set_floor(&id, None, Some(lsn), op)?;
        }
        Ok(())
    }

    async fn call(&self, op: Op) -> StoreResult<Reply> {
        let (reply, rx) = oneshot::channel();
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Request { op, reply })
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn read(&self) -> StoreResult<Reading<'_>> {
        let db = shared_db(&self.inner.db);
        let txn = db.begin_read().ctx("begin read transaction")?;
        Ok(Reading { txn, _db: db })
    }

    /// Gives the file's free pages (left by removals and evictions) back to the system now, and
    /// returns once it is done. The writer also does it on its own when more than half of a large file
    /// is free. Reads that miss the memory front wait meanwhile.
    pub async fn compact(&self) -> StoreResult<()> {
        self.call(Op::Compact).await.map(|_| ())
    }

    /// How long until some task may be claimable: zero if one is now, `None` if the queue is empty.
    fn next_claimable_in(&self) -> StoreResult<Option<Duration>> {
        let op = "wait_for_tasks";
        let claims = self.inner.shared.claims();
        let now = Instant::now();
        let now_ms = now_ms();
        let live = |id: &str| claims.get(id).is_some_and(|r| r.deadline > now);
        let txn = self.read()?;
        let ready = txn.open_table(READY).ctx(op)?;
        for item in ready.iter().ctx(op)? {
            let (_, id) = item.ctx(op)?;
            if !live(id.value()) {
                return Ok(Some(Duration::ZERO));
            }
        }
        let mut soonest: Option<Duration> = None;
        let delayed = txn.open_table(DELAYED).ctx(op)?;
        for item in delayed.iter().ctx(op)? {
            let (k, id) = item.ctx(op)?;
            if live(id.value()) {
                continue;
            }
            let (not_before, _) = k.value();
            let ms = u64::try_from(not_before.saturating_sub(now_ms)).unwrap_or(0);
            soonest = Some(Duration::from_millis(ms));
            break;
        }
        // A lease running out makes its task claimable again.
        for record in claims.values() {
            if record.deadline > now {
                let left = record.deadline - now;
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
            }
        }
        Ok(soonest)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Entry>> {
        let hot = &self.inner.hot;
        if let Some(entry) = hot.get(key) {
            self.inner.shared.touched.touch(key);
            return Ok(Some(entry));
        }
        // Read before the transaction opens: see `super::hot` for why.
        let epoch = hot.epoch();
        let txn = self.read()?;
        let entries = txn.open_table(ENTRIES).ctx("get")?;
        match entries.get(key).ctx("get")? {
            Some(bytes) => {
                let entry = LAYOUT.decode(key, bytes.value())?;
                hot.offer(key, &entry, epoch);
                self.inner.shared.touched.touch(key);
                Ok(Some(entry))
            }
            None => Ok(None),
        }
    }

    async fn is_registered(&self, key: &str) -> StoreResult<bool> {
        let op = "is_registered";
        let txn = self.read()?;
        let table = txn.open_table(KEY_PRIMERS).ctx(op)?;
        let mut range = table.range((key, "")..).ctx(op)?;
        match range.next() {
            Some(item) => {
                let (k, _) = item.ctx(op)?;
                Ok(k.value().0 == key)
            }
            None => Ok(false),
        }
    }

    async fn register_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.call(Op::RegisterKey {
            primer: primer.to_owned(),
            key: key.to_owned(),
        })
        .await
        .map(|_| ())
    }

    async fn store_result(&self, primer: &str, key: &str, entry: Entry) -> StoreResult<Stored> {
        match self
            .call(Op::StoreResult {
                primer: primer.to_owned(),
                key: key.to_owned(),
                entry,
                if_registered: false,
            })
            .await?
        {
            Reply::Stored(stored) => Ok(stored),
            other => Err(unexpected("store_result", other)),
        }
    }

    async fn store_if_registered(
        &self,
        primer: &str,
        key: &str,
        entry: Entry,
    ) -> StoreResult<Option<Stored>> {
        match self
            .call(Op::StoreResult {
                primer: primer.to_owned(),
                key: key.to_owned(),
                entry,
                if_registered: true,
            })
            .await?
        {
            Reply::Finished(stored) => Ok(stored),
            other => Err(unexpected("store_if_registered", other)),
        }
    }

    fn capacity(&self) -> Option<CapacityStats> {
        let shared = &self.inner.shared;
        Some(CapacityStats {
            keys: shared.keys.load(Ordering::Relaxed),
            bytes: shared.bytes.load(Ordering::Relaxed),
            max_keys: self.inner.capacity.max_entries,
            max_bytes: self.inner.capacity.max_bytes,
            evictions: shared.evictions.load(Ordering::Relaxed),
            compactions: shared.compactions.load(Ordering::Relaxed),
            file_bytes: std::fs::metadata(&self.inner.path).map_or(0, |m| m.len()),
        })
    }

    async fn remove_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.call(Op::RemoveKey {
            primer: primer.to_owned(),
            key: key.to_owned(),
        })
        .await
        .map(|_| ())
    }

    async fn keys(
        &self,
        primer: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        let op = "keys";
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let txn = self.read()?;
        let table = txn.open_table(KEY_INDEX).ctx(op)?;
        let range = match after {
            Some(after) => table.range((
                std::ops::Bound::Excluded((primer, after)),
                std::ops::Bound::Unbounded,
            )),
            None => table.range((
                std::ops::Bound::Included((primer, "")),
                std::ops::Bound::Unbounded,
            )),
        }
        .ctx(op)?;
        for item in range {
            let (k, _) = item.ctx(op)?;
            let (p, key) = k.value();
            if p != primer {
                break;
            }
            out.push(key.to_owned());
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    async fn key_count(&self, primer: &str) -> StoreResult<u64> {
        let op = "key_count";
        let txn = self.read()?;
        let table = txn.open_table(KEY_INDEX).ctx(op)?;
        let mut count = 0;
        for item in table.range((primer, "")..).ctx(op)? {
            let (k, _) = item.ctx(op)?;
            if k.value().0 != primer {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        self.call(Op::Enqueue { tasks }).await.map(|_| ())
    }

    async fn claim(&self, max: usize, lease: Duration) -> StoreResult<Vec<Claim>> {
        let op = "claim";
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let mut claims = self.inner.shared.claims();
        let now = Instant::now();
        let now_ms = now_ms();
        let deadline = now
            .checked_add(lease)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        let txn = self.read()?;
        let tasks = txn.open_table(TASKS).ctx(op)?;
        let delayed = txn.open_table(DELAYED).ctx(op)?;
        let ready = txn.open_table(READY).ctx(op)?;

        let mut take = |id: &str, out: &mut Vec<Claim>| -> StoreResult<()> {
            let previous = claims.get(id).copied();
            if previous.is_some_and(|r| r.deadline > now) {
                return Ok(());
            }
            let Some((_, lsn, enqueued_at_ms, attempts, _)) =
                tasks.get(id).ctx(op)?.map(|g| g.value())
            else {
                tracing::error!(
                    task = id,
                    "queue order names a task that does not exist; skipped"
                );
                return Ok(());
            };
            // A claim whose lease ran out counts as an attempt.
            let attempts = match previous {
                Some(r) if r.attempts >= attempts => r.attempts.saturating_add(1),
                _ => attempts,
            };
            let lsn = Lsn(lsn);
            claims.insert(
                id.to_owned(),
                ClaimRecord {
                    deadline,
                    lsn,
                    attempts,
                },
            );
            out.push(Claim {
                id: id.to_owned(),
                lsn,
                attempts,
                enqueued_at_ms,
            });
            Ok(())
        };

        // Retried tasks whose delay is over, then the rest, oldest first.
        for item in delayed.range(..=(now_ms, u64::MAX)).ctx(op)? {
            if out.len() == max {
                return Ok(out);
            }
            let (_, id) = item.ctx(op)?;
            take(id.value(), &mut out)?;
        }
        for item in ready.iter().ctx(op)? {
            if out.len() == max {
                break;
            }
            let (_, id) = item.ctx(op)?;
            take(id.value(), &mut out)?;
        }
        Ok(out)
    }

    async fn finish(
        &self,
        claim: &Claim,
        result: Option<(&str, &str, Entry)>,
        follow_up: Vec<Task>,
    ) -> StoreResult<Option<Stored>> {
        let op = Op::Finish {
            claim: claim.clone(),
            result: result.map(|(p, k, e)| (p.to_owned(), k.to_owned(), e)),
            follow_up,
        };
        match self.call(op).await? {
            Reply::Finished(stored) => Ok(stored),
            other => Err(unexpected("finish", other)),
        }
    }

    async fn retry(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        let not_before_ms = now_ms().saturating_add(duration_ms(delay));
        self.call(Op::Retry {
            claim: claim.clone(),
            not_before_ms,
        })
        .await
        .map(|_| ())
    }

    async fn park(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        let not_before_ms = now_ms().saturating_add(duration_ms(delay));
        self.call(Op::Park {
            claim: claim.clone(),
            not_before_ms,
        })
        .await
        .map(|_| ())
    }

    async fn parked(&self, limit: usize) -> StoreResult<Vec<String>> {
        let op = "parked";
        let txn = self.read()?;
        let parked = txn.open_table(PARKED).ctx(op)?;
        let mut out = Vec::new();
        for item in parked.iter().ctx(op)?.take(limit) {
            let (id, _) = item.ctx(op)?;
            out.push(id.value().to_owned());
        }
        Ok(out)
    }

    async fn wait_for_tasks(&self, timeout: Duration) {
        // Registered before looking, so that a commit after the look wakes us.
        let notified = self.inner.shared.tasks_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let wait = match self.next_claimable_in() {
            Ok(Some(d)) => d.min(timeout),
            Ok(None) => timeout,
            Err(err) => {
                tracing::warn!(error = %crate::report::Chain(&err), "cannot look at the queue; waiting");
                timeout
            }
        };
        if wait.is_zero() {
            return;
        }
        let _ = tokio::time::timeout(wait, notified).await;
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        let op = "queue_stats";
        let claimed = {
            let claims = self.inner.shared.claims();
            let now = Instant::now();
            claims.values().filter(|r| r.deadline > now).count() as u64
        };
        let txn = self.read()?;
        let tasks = txn.open_table(TASKS).ctx(op)?;
        let depth = tasks.len().ctx(op)?;
        let first_ready = txn
            .open_table(READY)
            .ctx(op)?
            .first()
            .ctx(op)?
            .map(|(k, v)| (k.value(), v.value().to_owned()));
        let first_delayed = txn
            .open_table(DELAYED_BY_SEQ)
            .ctx(op)?
            .first()
            .ctx(op)?
            .map(|(k, v)| (k.value(), v.value().to_owned()));
        let oldest = match (first_ready, first_delayed) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let oldest_enqueued_at_ms = match oldest {
            Some((_, id)) => tasks.get(id.as_str()).ctx(op)?.map(|g| g.value().2),
            None => None,
        };
        let parked = txn.open_table(PARKED).ctx(op)?.len().ctx(op)?;
        Ok(QueueStats {
            depth,
            claimed: claimed.min(depth),
            oldest_enqueued_at_ms,
            parked,
            estimated: false,
        })
    }

    async fn pending_floor(&self) -> StoreResult<Option<Lsn>> {
        let op = "pending_floor";
        let txn = self.read()?;
        let floors = txn.open_table(FLOORS).ctx(op)?;
        Ok(floors.first().ctx(op)?.map(|(k, _)| Lsn(k.value().0)))
    }

    async fn get_meta(&self, name: &str) -> StoreResult<Option<Bytes>> {
        let txn = self.read()?;
        let meta = txn.open_table(META).ctx("get_meta")?;
        Ok(meta
            .get(name)
            .ctx("get_meta")?
            .map(|v| Bytes::copy_from_slice(v.value())))
    }

    async fn put_meta(&self, name: &str, value: Bytes) -> StoreResult<()> {
        self.call(Op::PutMeta {
            name: name.to_owned(),
            value,
        })
        .await
        .map(|_| ())
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        let op = Op::TryLease {
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl_ms: duration_ms(ttl),
        };
        match self.call(op).await? {
            Reply::Leased(held) => Ok(held),
            other => Err(unexpected("try_lease", other)),
        }
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        self.call(Op::ReleaseLease {
            name: name.to_owned(),
            holder: holder.to_owned(),
        })
        .await
        .map(|_| ())
    }
}

fn unexpected(op: &str, reply: Reply) -> StoreError {
    StoreError::failed(format!(
        "{op}: the store writer gave an unexpected reply {reply:?}"
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::conformance;

    const LONG: Duration = Duration::from_secs(60);

    fn entry(lsn: u64, value: &str) -> Entry {
        Entry {
            value: Bytes::from(value.to_owned()),
            lsn: Lsn(lsn),
            computed_at_ms: 1_700_000_000_000,
            expires_at_ms: Some(1_700_000_060_000),
        }
    }

    fn task(id: &str, lsn: u64) -> Task {
        Task::new(id, Lsn(lsn))
    }

    /// `dir/store-N`, N counting up: a fresh store for each test of a suite.
    fn numbered(dir: &Path, n: &AtomicUsize) -> PathBuf {
        dir.join(format!("store-{}", n.fetch_add(1, Ordering::Relaxed)))
    }

    fn ids(claims: &[Claim]) -> Vec<&str> {
        claims.iter().map(|c| c.id.as_str()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        conformance::run_all(|| {
            let path = numbered(dir.path(), &n);
            async move { EmbeddedStore::open(&path).unwrap() }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parks_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        conformance::parking(|| {
            let path = numbered(dir.path(), &n);
            async move { EmbeddedStore::open(&path).unwrap() }
        })
        .await;
    }

    /// The same suite with no entries in memory: every read goes to redb.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite_without_its_memory_front() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        conformance::run_all(|| {
            let path = numbered(dir.path(), &n);
            async move { EmbeddedStore::open_with(&path, 0).unwrap() }
        })
        .await;
    }

    /// Reads served from memory follow every write, removal and refused (older) result, and what is
    /// in memory is what a reopened store (redb alone) reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn its_memory_front_follows_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..300u64 {
                    let key = format!("p/{}", i % 7);
                    match (i + w) % 5 {
                        0 => s.remove_key("p", &key).await.unwrap(),
                        _ => {
                            let lsn = i * 4 + w;
                            s.store_result("p", &key, entry(lsn, &lsn.to_string()))
                                .await
                                .unwrap();
                        }
                    }
                    let _ = s.get(&key).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut seen = Vec::new();
        for i in 0..7 {
            seen.push(s.get(&format!("p/{i}")).await.unwrap());
        }
        // An older result is refused, and memory still answers the newer one.
        s.store_result("p", "p/9", entry(10, "new")).await.unwrap();
        assert_eq!(s.get("p/9").await.unwrap(), Some(entry(10, "new")));
        assert_eq!(
            s.store_result("p", "p/9", entry(5, "old")).await.unwrap(),
            Stored::KeptNewer(Lsn(10))
        );
        assert_eq!(s.get("p/9").await.unwrap(), Some(entry(10, "new")));
        drop(s);
        let reopened = EmbeddedStore::open_with(dir.path(), 0).unwrap();
        for (i, before) in seen.into_iter().enumerate() {
            assert_eq!(
                reopened.get(&format!("p/{i}")).await.unwrap(),
                before,
                "p/{i}"
            );
        }
    }

    /// Past its capacity it evicts the least recently used keys, and nothing brings one back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_bounded_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        for memory in [DEFAULT_MEMORY_CACHE, 0] {
            conformance::bounded(|| {
                let path = numbered(dir.path(), &n);
                async move {
                    let capacity = Capacity {
                        max_entries: 3,
                        max_bytes: 1 << 30,
                    };
                    EmbeddedStore::open_configured(&path, memory, capacity).unwrap()
                }
            })
            .await;
        }
    }

    /// `max_bytes` bounds what the keys and entries are charged; the count and the charge survive a
    /// reopen, and a store written before capacities existed is charged at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_bytes_evicts_and_the_charge_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let capacity = Capacity {
            max_entries: 1_000,
            max_bytes: 10 * charge("p/00", 26 + 100),
        };
        let big = "x".repeat(100);
        {
            let s = EmbeddedStore::open_configured(dir.path(), 0, capacity).unwrap();
            for i in 0..30 {
                s.store_result("p", &format!("p/{i:02}"), entry(1, &big))
                    .await
                    .unwrap();
            }
            let cap = s.capacity().unwrap();
            assert_eq!(cap.keys, 10, "{cap:?}");
            assert!(cap.bytes <= capacity.max_bytes, "{cap:?}");
            assert_eq!(cap.evictions, 20);
            assert_eq!(s.keys("p", None, 100).await.unwrap()[0], "p/20");
        }
        let s = EmbeddedStore::open_configured(dir.path(), 0, capacity).unwrap();
        let cap = s.capacity().unwrap();
        assert_eq!((cap.keys, cap.bytes), (10, 10 * charge("p/00", 26 + 100)));
        // The oldest of the survivors goes first after the reopen too.
        s.store_result("p", "p/99", entry(1, &big)).await.unwrap();
        assert_eq!(s.get("p/20").await.unwrap(), None);
        drop(s);
        // Without the bytes row (a store from before capacities): charged again at open.
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(KEY_STAMP).unwrap();
            txn.delete_table(KEY_ORDER).unwrap();
            txn.open_table(META)
                .unwrap()
                .remove(CAPACITY_BYTES_META)
                .unwrap();
            txn.commit().unwrap();
        }
        let s = EmbeddedStore::open_configured(dir.path(), 0, capacity).unwrap();
        let after = s.capacity().unwrap();
        assert_eq!(after.keys, 10);
        assert!(
            after.bytes > 0 && after.bytes <= capacity.max_bytes,
            "{after:?}"
        );
    }

    /// Space freed by evictions and removals goes back to the system with a compaction, and the store
    /// reads and writes as before after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_gives_freed_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let capacity = Capacity {
            max_entries: 100,
            max_bytes: 1 << 30,
        };
        let s = EmbeddedStore::open_configured(dir.path(), 0, capacity).unwrap();
        let value = "v".repeat(20_000);
        for chunk in 0..10 {
            let keys: Vec<String> = (0..200)
                .map(|i| format!("p/{:04}", chunk * 200 + i))
                .collect();
            let writes = keys
                .iter()
                .map(|k| s.store_result("p", k, entry(1, &value)));
            for w in futures_util::future::join_all(writes).await {
                w.unwrap();
            }
        }
        let grown = std::fs::metadata(s.path()).unwrap().len();
        // Drop almost everything: the file keeps its size until compacted.
        for i in 1_900..1_999 {
            s.remove_key("p", &format!("p/{i:04}")).await.unwrap();
        }
        let before = std::fs::metadata(s.path()).unwrap().len();
        s.compact().await.unwrap();
        let after = std::fs::metadata(s.path()).unwrap().len();
        eprintln!(
            "store file: {grown} bytes at most 100 keys of 20 kB, {before} after removals, {after} compacted"
        );
        assert!(after * 4 < before, "{before} -> {after}");
        assert_eq!(s.capacity().unwrap().compactions, 1);
        assert_eq!(s.capacity().unwrap().keys, 1);
        assert_eq!(s.get("p/1999").await.unwrap(), Some(entry(1, &value)));
        s.store_result("p", "p/x", entry(2, "x")).await.unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.keys("p", None, 10).await.unwrap(), vec!["p/1999", "p/x"]);
    }

    /// The embedded store keeps floors exactly, not just a lower bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn its_pending_floor_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        conformance::exact_pending_floor(|| {
            let path = numbered(dir.path(), &n);
            async move { EmbeddedStore::open(&path).unwrap() }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopening_keeps_entries_index_queue_and_meta_and_resets_claims() {
        let dir = tempfile::tempdir().unwrap();
        let oldest;
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.store_result("p", "p/1", entry(7, "one")).await.unwrap();
            s.register_key("p", "p/2").await.unwrap();
            s.put_meta("fingerprint", Bytes::from_static(b"f1"))
                .await
                .unwrap();
            s.enqueue(vec![task("a", 1), task("b", 2), task("c", 3)])
                .await
                .unwrap();
            let claims = s.claim(10, LONG).await.unwrap();
            assert_eq!(ids(&claims), vec!["a", "b", "c"]);
            s.retry(&claims[2], LONG).await.unwrap();
            oldest = s.queue_stats().await.unwrap().oldest_enqueued_at_ms;
            assert!(oldest.is_some());
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.get("p/1").await.unwrap(), Some(entry(7, "one")));
        assert!(s.is_registered("p/2").await.unwrap());
        assert_eq!(s.keys("p", None, 10).await.unwrap(), vec!["p/1", "p/2"]);
        assert_eq!(
            s.get_meta("fingerprint").await.unwrap(),
            Some(Bytes::from_static(b"f1"))
        );
        let st = s.queue_stats().await.unwrap();
        assert_eq!(
            st,
            QueueStats {
                depth: 3,
                claimed: 0,
                oldest_enqueued_at_ms: oldest,
                parked: 0,
                estimated: false,
            }
        );
        assert_eq!(s.pending_floor().await.unwrap(), Some(Lsn(1)));
        // New tasks line up after the stored ones (seqs are not reused).
        s.enqueue(vec![task("d", 4)]).await.unwrap();
        // Claims did not survive; the retried task is still delayed.
        let claims = s.claim(10, LONG).await.unwrap();
        assert_eq!(ids(&claims), vec!["a", "b", "d"]);
        assert_eq!(claims[1].lsn, Lsn(2));
        // Never backwards holds across the reopen.
        assert_eq!(
            s.store_result("p", "p/1", entry(6, "older")).await.unwrap(),
            Stored::KeptNewer(Lsn(7))
        );
        drop(s);
        // And a retried task keeps its attempts.
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.queue_stats().await.unwrap().depth, 4);
        assert_eq!(ids(&s.claim(10, LONG).await.unwrap()), vec!["a", "b", "d"]);
    }

    /// Set in the environment of the child process that [`survives_a_crash`] starts.
    const CRASH_DIR_ENV: &str = "KCK_STORE_TEST_CRASH_DIR";

    /// Not a test of its own: in the child process of [`survives_a_crash`] it writes and then aborts,
    /// with no destructor or clean shutdown; otherwise it does nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_helper_process() {
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
            return;
        };
        let s = EmbeddedStore::open(Path::new(&dir)).unwrap();
        s.store_result("p", "p/1", entry(7, "one")).await.unwrap();
        s.register_key("p", "p/2").await.unwrap();
        s.put_meta("fingerprint", Bytes::from_static(b"f1"))
            .await
            .unwrap();
        s.enqueue((0..100).map(|i| task(&format!("t{i}"), i)).collect())
            .await
            .unwrap();
        let c = s.claim(1, LONG).await.unwrap().remove(0);
        s.finish(
            &c,
            Some(("p", "p/3", entry(9, "three"))),
            vec![task("f", 9)],
        )
        .await
        .unwrap();
        std::process::abort();
    }

    /// What `enqueue` and the other durable writes acknowledged survives the process dying; a `finish` not
    /// yet made durable is lost whole or kept whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::embedded::tests::crash_helper_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the helper process was meant to abort");
        let s = EmbeddedStore::open(dir.path()).unwrap();
        // Written before a durable write (put_meta, enqueue): durable with it.
        assert_eq!(s.get("p/1").await.unwrap(), Some(entry(7, "one")));
        assert_eq!(
            s.get_meta("fingerprint").await.unwrap(),
            Some(Bytes::from_static(b"f1"))
        );
        assert_eq!(s.queue_stats().await.unwrap().depth, 100);
        // The last finish was not durable: it either happened whole or not at all (then its task is
        // still queued and the refresh runs again).
        let finished = s.get("p/3").await.unwrap();
        let claims = s.claim(1000, LONG).await.unwrap();
        assert_eq!(claims.len(), 100);
        if finished.is_some() {
            assert_eq!(finished, Some(entry(9, "three")));
            assert_eq!(
                s.keys("p", None, 10).await.unwrap(),
                vec!["p/1", "p/2", "p/3"]
            );
            assert_eq!(claims[0].id, "t1", "t0 was finished");
            assert_eq!(claims[99].id, "f");
        } else {
            assert_eq!(s.keys("p", None, 10).await.unwrap(), vec!["p/1", "p/2"]);
            assert_eq!(claims[0].id, "t0", "the finish was lost whole");
            assert!(claims.iter().all(|c| c.id != "f"));
        }
        // The store still writes after recovery.
        s.enqueue(vec![task("after", 1)]).await.unwrap();
        assert_eq!(ids(&s.claim(10, LONG).await.unwrap()), vec!["after"]);
    }

    /// A store written before task floors existed gets them when opened: each task's floor is its LSN.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_without_floors_gets_them_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.enqueue(vec![task("a", 7), task("b", 4), Task::new("c", Lsn(9))])
                .await
                .unwrap();
        }
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(TASK_FLOOR).unwrap();
            txn.delete_table(FLOORS).unwrap();
            txn.commit().unwrap();
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.pending_floor().await.unwrap(), Some(Lsn(4)));
        let claims = s.claim(10, LONG).await.unwrap();
        let b = claims.iter().find(|c| c.id == "b").unwrap();
        s.finish(b, None, Vec::new()).await.unwrap();
        assert_eq!(s.pending_floor().await.unwrap(), Some(Lsn(7)));
    }

    /// A parked task stays parked across a restart: reopening (and its floor backfill) gives it no floor.
    #[tokio::test]
    async fn parked_tasks_stay_parked_when_reopened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::open(dir.path()).unwrap();
            s.enqueue(vec![task("a", 7), task("b", 4)]).await.unwrap();
            let claims = s.claim(10, LONG).await.unwrap();
            let b = claims.iter().find(|c| c.id == "b").unwrap();
            s.park(b, LONG).await.unwrap();
            assert_eq!(s.pending_floor().await.unwrap(), Some(Lsn(7)));
        }
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.pending_floor().await.unwrap(), Some(Lsn(7)));
        let stats = s.queue_stats().await.unwrap();
        assert_eq!((stats.depth, stats.parked), (2, 1));
        assert_eq!(s.parked(10).await.unwrap(), vec!["b".to_string()]);
    }

    #[tokio::test]
    async fn opening_an_open_store_again_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("another kck process is using this store"),
            "{err}"
        );
        assert!(
            err.contains(&dir.path().join(FILE_NAME).display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn open_creates_missing_directories_and_names_a_bad_path() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        let s = EmbeddedStore::open(&nested).unwrap();
        assert_eq!(s.path(), nested.join(FILE_NAME));
        assert!(nested.join(FILE_NAME).is_file());

        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = EmbeddedStore::open(&file).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_failed_open_keeps_its_cause_and_says_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = EmbeddedStore::open(&file).unwrap_err();
        let text = err.to_string();
        let cause = std::error::Error::source(&err)
            .expect("the system's error is kept as the source")
            .to_string();
        assert!(
            text.contains("cannot create the store directory") && text.contains("not-a-dir"),
            "{text}"
        );
        assert!(!text.contains(&cause), "{text} repeats {cause}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_entry_is_reported_and_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        drop(EmbeddedStore::open(dir.path()).unwrap());
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ENTRIES)
                .unwrap()
                .insert("bad", &b"xx"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let s = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        assert!(matches!(s.get("bad").await, Err(StoreError::Corrupt(_))));
        // A bad write batched with good ones fails alone.
        let mut handles = Vec::new();
        for i in 0..20u64 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                if i % 5 == 0 {
                    let r = s.store_result("p", "bad", entry(i, "v")).await;
                    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
                } else {
                    s.enqueue(vec![task(&format!("t{i}"), i)]).await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(s.queue_stats().await.unwrap().depth, 16);
        // Removing the key clears it.
        s.remove_key("p", "bad").await.unwrap();
        assert_eq!(s.get("bad").await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_wakes_when_a_retried_task_falls_due() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.enqueue(vec![task("a", 1)]).await.unwrap();
        let c = s.claim(1, LONG).await.unwrap().remove(0);
        s.retry(&c, Duration::from_millis(100)).await.unwrap();
        let start = Instant::now();
        s.wait_for_tasks(LONG).await;
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited for the timeout"
        );
        let start = Instant::now();
        loop {
            let claims = s.claim(1, LONG).await.unwrap();
            if !claims.is_empty() {
                assert_eq!(claims[0].attempts, 1);
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And when a lease runs out.
        let start = Instant::now();
        s.enqueue(vec![task("b", 1)]).await.unwrap();
        let _ = s.claim(1, Duration::from_millis(100)).await.unwrap();
        s.wait_for_tasks(LONG).await;
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "waited for the timeout"
        );
    }

    #[tokio::test]
    async fn a_store_whose_writer_is_gone_says_closed() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path()).unwrap();
        // Stand-in for a writer thread that died: its channel is closed.
        let (tx, rx) = mpsc::channel::<Request>();
        drop(rx);
        let broken = EmbeddedStore {
            inner: Arc::new(Inner {
                path: s.inner.path.clone(),
                db: s.inner.db.clone(),
                shared: s.inner.shared.clone(),
                hot: s.inner.hot.clone(),
                capacity: s.inner.capacity,
                tx: Some(tx),
                writer: None,
            }),
        };
        assert!(matches!(
            broken.enqueue(vec![task("a", 1)]).await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(
            broken.put_meta("x", Bytes::new()).await,
            Err(StoreError::Closed)
        ));
        // Reads still work.
        assert_eq!(broken.get("k").await.unwrap(), None);
    }
}
