//! The CQL data model of the ScyllaDB / Cassandra store, as pure functions: table and statement text,
//! entry encoding, LSN → write timestamp, TTLs and queue buckets.
//!
//! [`super::scylla`] is a thin layer that runs these statements with the driver; everything here is
//! decided without a server, so it is unit-tested on every machine (no CQL server runs on ours). This
//! module does not depend on the `scylla` crate and is compiled without the `scylla` feature too.
//!
//! # Tables (keyspace `kck` by default; `sql/scylla.cql` is the same text for that keyspace)
//!
//! | table           | primary key                                  | holds |
//! |-----------------|----------------------------------------------|-------|
//! | `cache_entries` | `key`                                        | `entry blob`: the encoded [`Entry`](super::Entry), written `USING TIMESTAMP <lsn>` |
//! | `key_index`     | `((primer), key)`                            | the keys of a primer, in key order (for paging) |
//! | `key_primers`   | `((key), primer)`                            | the reverse, for `is_registered` |
//! | `queue_tasks`   | `((bucket), id, lsn, enqueued_at_us)`        | one row per enqueue of a task: the task is pending while it has a row |
//! | `queue_order`   | `((bucket), enqueued_at_us, id, lsn)`        | the same rows in enqueue order: where claims look |
//! | `queue_leases`  | `((bucket), id)`                             | claims and retries (lease deadline, not-before, attempts), written only with lightweight transactions |
//! | `meta`          | `name`                                       | `value blob` |
//!
//! `entries` is not used as a table name: it is a reserved word in Cassandra's CQL.
//!
//! # Monotonic entries without read-before-write
//!
//! An entry is written `USING TIMESTAMP t` with `t` = its LSN as a signed 64-bit number
//! ([`lsn_timestamp`]). Cassandra and ScyllaDB keep, per cell, the write with the highest timestamp, so an
//! older computation that arrives late never replaces a newer one, on every replica, whatever the order the
//! writes arrive in. Limits:
//! - LSNs above 2^63 − 1 cannot be stored ([`lsn_timestamp`] refuses them). Postgres would need to write
//!   8 EiB of WAL to get there.
//! - Timestamps are not microseconds here. Nothing else may write `cache_entries` with ordinary
//!   (clock) timestamps: a hand-made `DELETE` without `USING TIMESTAMP` would shadow the key until its LSN
//!   passes the current time in microseconds. Use `TRUNCATE` to empty the table.
//! - Equal timestamps (equal LSNs) are decided by the database's tie-break rule, which compares cells
//!   (a deletion beats a live cell, and, depending on the version, an expiring cell beats a plain one,
//!   the later expiry wins, and the greater value wins). The whole entry is one cell, so the result is
//!   always one of the two writes whole, the same on every replica. The encoding starts with
//!   `computed_at_ms` (order-preserving), so where values decide, the later computation wins.
//!
//! # The refresh queue
//!
//! A task id hashes to one of [`QUEUE_BUCKETS`] buckets ([`bucket_of`]); each bucket is one partition of
//! `queue_tasks`, `queue_order` and `queue_leases`, so enqueues and claims spread over the cluster and no
//! partition is hot. Enqueuing writes a row to `queue_order`, then the same row to `queue_tasks`: no read,
//! no lightweight transaction, and repeats of an id simply add rows. Coalescing happens when reading: a
//! task's LSN is the largest of its rows, its place in line (and `enqueued_at_ms`) the oldest. Claims read
//! the head of every bucket's `queue_order` (from a scan floor below which only tombstones of finished
//! tasks lie, see [`next_floor`]), merge them oldest first, and take each task with a
//! lightweight transaction on its `queue_leases` row (`INSERT ... IF NOT EXISTS`, or `UPDATE ... IF` the
//! lease is as read, expired and due), so two workers never hold one task at once. Finishing deletes the
//! task's rows whose LSN is at most the claim's (rows added since stay: the newer change still needs a
//! refresh) and then the lease.

use std::fmt::Write as _;

use super::codec::Layout;
use super::{Consistency, KeyspaceReplication};
use super::{StoreError, StoreResult};
use crate::lsn::Lsn;

/// Queue partitions per table. Changing it is a schema change (tasks would be looked for in the wrong
/// bucket): it is recorded in `meta` by `kck store init` and checked when a store opens.
pub const QUEUE_BUCKETS: i32 = 16;

/// The value of the `meta` row [`SCHEMA_META`] that `kck store init` writes and every process checks.
pub const SCHEMA_VERSION: &str = "kck-scylla-1 buckets=16";
/// The `meta` name of [`SCHEMA_VERSION`].
pub const SCHEMA_META: &str = "kck.schema";

/// The tables kck needs, in creation order.
pub const TABLES: [&str; 7] = [
    "cache_entries",
    "key_index",
    "key_primers",
    "queue_tasks",
    "queue_order",
    "queue_leases",
    "meta",
];

/// Queue tables hold short-lived rows that are deleted when done. A deleted row that comes back (a
/// replica that missed the deletion for longer than this) is a refresh done twice, which is harmless, so
/// their tombstones are purged after an hour rather than the default ten days, which keeps claim scans
/// short.
pub const QUEUE_GC_GRACE_SECONDS: u32 = 3600;

/// How far below the oldest row it saw a process keeps scanning a bucket's `queue_order` (see
/// [`next_floor`]): more than any clock skew between kck processes plus a write's latency.
pub const FLOOR_MARGIN_US: i64 = 60_000_000;

/// How often a process forgets its scan floors and reads every bucket from the start again, which catches
/// a row written below a floor by a process whose clock is off by more than [`FLOOR_MARGIN_US`].
pub const FLOOR_RESET: std::time::Duration = std::time::Duration::from_secs(60);

/// The longest TTL CQL accepts (20 years).
pub const MAX_TTL_SECONDS: i64 = 630_720_000;

// ---------------------------------------------------------------------------------------------------
// Schema

/// `CREATE KEYSPACE` for `keyspace`. `disable_tablets` adds ScyllaDB's `tablets = {'enabled': false}`
/// (lightweight transactions, which the queue uses, need vnode keyspaces on older ScyllaDB versions);
/// Cassandra rejects that option, so [`super::scylla`] retries without it.
pub fn create_keyspace(
    keyspace: &str,
    replication: &KeyspaceReplication,
    disable_tablets: bool,
) -> String {
    let mut s = format!(
        "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {}",
        replication_map(replication)
    );
    if disable_tablets {
        s.push_str(" AND tablets = {'enabled': false}");
    }
    s
}

/// The CQL map of a keyspace replication.
pub fn replication_map(replication: &KeyspaceReplication) -> String {
    match replication {
        KeyspaceReplication::Simple { replication_factor } => {
            format!("{{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}")
        }
        KeyspaceReplication::NetworkTopology { datacenters } => {
            let mut s = String::from("{'class': 'NetworkTopologyStrategy'");
            for (dc, n) in datacenters {
                let _ = write!(s, ", '{}': {n}", dc.replace('\'', "''"));
            }
            s.push('}');
            s
        }
    }
}

/// The data centres a keyspace replication names that the cluster does not have (`cluster`: the
/// `data_center` of `system.local` and of every `system.peers` row), or `None` when all are known. Cassandra
/// refuses such a keyspace ("Unrecognized strategy option"); this says which names it does have.
pub fn unknown_datacenters(
    replication: &KeyspaceReplication,
    cluster: &[String],
) -> Option<String> {
    let KeyspaceReplication::NetworkTopology { datacenters } = replication else {
        return None;
    };
    let unknown: Vec<&str> = datacenters
        .iter()
        .map(|(dc, _)| dc.as_str())
        .filter(|dc| !cluster.iter().any(|c| c == dc))
        .collect();
    if unknown.is_empty() {
        return None;
    }
    let mut known: Vec<&str> = cluster.iter().map(String::as_str).collect();
    known.sort_unstable();
    known.dedup();
    Some(format!(
        "store.replication names data centre(s) {} that the cluster does not have; its data centres are: {} \
         (names are case-sensitive and must match `nodetool status`)",
        unknown.join(", "),
        if known.is_empty() {
            "(none found)".to_owned()
        } else {
            known.join(", ")
        }
    ))
}

/// `CREATE TABLE IF NOT EXISTS` for every table of [`TABLES`], in that order.
pub fn create_tables(keyspace: &str) -> Vec<String> {
    let g = QUEUE_GC_GRACE_SECONDS;
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.cache_entries (\n    key text PRIMARY KEY,\n    entry blob\n) WITH comment = 'kck cache entries, written USING TIMESTAMP <lsn>'"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.key_index (\n    primer text,\n    key text,\n    PRIMARY KEY ((primer), key)\n) WITH CLUSTERING ORDER BY (key ASC)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.key_primers (\n    key text,\n    primer text,\n    PRIMARY KEY ((key), primer)\n)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_tasks (\n    bucket int,\n    id text,\n    lsn bigint,\n    enqueued_at_us bigint,\n    PRIMARY KEY ((bucket), id, lsn, enqueued_at_us)\n) WITH gc_grace_seconds = {g}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_order (\n    bucket int,\n    enqueued_at_us bigint,\n    id text,\n    lsn bigint,\n    PRIMARY KEY ((bucket), enqueued_at_us, id, lsn)\n) WITH gc_grace_seconds = {g}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_leases (\n    bucket int,\n    id text,\n    lease_until_ms bigint,\n    not_before_ms bigint,\n    attempts int,\n    claim_lsn bigint,\n    PRIMARY KEY ((bucket), id)\n) WITH gc_grace_seconds = {g}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.meta (\n    name text PRIMARY KEY,\n    value blob\n)"
        ),
    ]
}

/// The whole schema as a CQL script (what `sql/scylla.cql` holds for keyspace `kck`).
pub fn schema_script(keyspace: &str, replication: &KeyspaceReplication) -> String {
    let mut s = String::from(
        "-- kck's ScyllaDB / Cassandra schema. `kck store init --config FILE` runs the same statements for the\n\
         -- configured keyspace and replication (generated by src/store/cql.rs; a unit test keeps this file in step).\n\
         -- On Cassandra, drop the `AND tablets = ...` clause (ScyllaDB only).\n\n",
    );
    s.push_str(&create_keyspace(keyspace, replication, true));
    s.push_str(";\n");
    for t in create_tables(keyspace) {
        s.push('\n');
        s.push_str(&t);
        s.push_str(";\n");
    }
    let _ = write!(
        s,
        "\nINSERT INTO {keyspace}.meta (name, value) VALUES ('{SCHEMA_META}', textAsBlob('{SCHEMA_VERSION}'));\n"
    );
    s
}

// ---------------------------------------------------------------------------------------------------
// Statements

/// The text of every statement the backend prepares, for one keyspace.
#[derive(Debug, Clone)]
pub struct Statements {
    pub get_entry: String,
    pub entry_writetime: String,
    pub put_entry: String,
    pub delete_entry: String,
    pub index_key: String,
    pub index_key_reverse: String,
    pub unindex_key: String,
    pub unindex_key_reverse: String,
    pub is_registered: String,
    pub keys_first: String,
    pub keys_after: String,
    pub insert_order: String,
    pub insert_task: String,
    pub delete_order: String,
    pub delete_task: String,
    pub order_head: String,
    pub order_after: String,
    pub task_versions: String,
    pub bucket_tasks: String,
    pub bucket_leases: String,
    pub lease_insert: String,
    pub lease_take: String,
    pub lease_release: String,
    pub lease_retry: String,
    pub lease_delete: String,
    pub get_meta: String,
    pub put_meta: String,
    /// Named leases ([`crate::store::Store::try_lease`]) are `meta` rows named `lease:NAME` holding the
    /// holder, written only by lightweight transactions and expiring by TTL.
    pub named_lease_insert: String,
    pub named_lease_renew: String,
    pub named_lease_release: String,
    pub list_tables: String,
}

impl Statements {
    pub fn new(ks: &str) -> Statements {
        // Statements that touch the same kind of row bind the same values in the same order, so that a
        // batch of them can take one `Vec` of values.
        Statements {
            get_entry: format!("SELECT entry FROM {ks}.cache_entries WHERE key = ?"),
            entry_writetime: format!(
                "SELECT WRITETIME(entry) FROM {ks}.cache_entries WHERE key = ?"
            ),
            put_entry: format!(
                "INSERT INTO {ks}.cache_entries (key, entry) VALUES (?, ?) USING TIMESTAMP ? AND TTL ?"
            ),
            delete_entry: format!("DELETE FROM {ks}.cache_entries USING TIMESTAMP ? WHERE key = ?"),
            index_key: format!("INSERT INTO {ks}.key_index (primer, key) VALUES (?, ?)"),
            index_key_reverse: format!("INSERT INTO {ks}.key_primers (primer, key) VALUES (?, ?)"),
            unindex_key: format!("DELETE FROM {ks}.key_index WHERE primer = ? AND key = ?"),
            unindex_key_reverse: format!(
                "DELETE FROM {ks}.key_primers WHERE primer = ? AND key = ?"
            ),
            is_registered: format!("SELECT primer FROM {ks}.key_primers WHERE key = ? LIMIT 1"),
            keys_first: format!("SELECT key FROM {ks}.key_index WHERE primer = ? LIMIT ?"),
            keys_after: format!(
                "SELECT key FROM {ks}.key_index WHERE primer = ? AND key > ? LIMIT ?"
            ),
            insert_order: format!(
                "INSERT INTO {ks}.queue_order (bucket, id, lsn, enqueued_at_us) VALUES (?, ?, ?, ?)"
            ),
            insert_task: format!(
                "INSERT INTO {ks}.queue_tasks (bucket, id, lsn, enqueued_at_us) VALUES (?, ?, ?, ?)"
            ),
            delete_order: format!(
                "DELETE FROM {ks}.queue_order WHERE bucket = ? AND id = ? AND lsn = ? AND enqueued_at_us = ?"
            ),
            delete_task: format!(
                "DELETE FROM {ks}.queue_tasks WHERE bucket = ? AND id = ? AND lsn = ? AND enqueued_at_us = ?"
            ),
            order_head: format!(
                "SELECT enqueued_at_us, id, lsn FROM {ks}.queue_order WHERE bucket = ? AND enqueued_at_us >= ? LIMIT ?"
            ),
            order_after: format!(
                "SELECT enqueued_at_us, id, lsn FROM {ks}.queue_order WHERE bucket = ? AND (enqueued_at_us, id, lsn) > (?, ?, ?) LIMIT ?"
            ),
            task_versions: format!(
                "SELECT lsn, enqueued_at_us FROM {ks}.queue_tasks WHERE bucket = ? AND id = ?"
            ),
            bucket_tasks: format!(
                "SELECT id, enqueued_at_us FROM {ks}.queue_tasks WHERE bucket = ?"
            ),
            bucket_leases: format!(
                "SELECT id, lease_until_ms, not_before_ms, attempts, claim_lsn FROM {ks}.queue_leases WHERE bucket = ?"
            ),
            lease_insert: format!(
                "INSERT INTO {ks}.queue_leases (bucket, id, lease_until_ms, not_before_ms, attempts, claim_lsn) VALUES (?, ?, ?, 0, 0, ?) IF NOT EXISTS"
            ),
            lease_take: format!(
                "UPDATE {ks}.queue_leases SET lease_until_ms = ?, attempts = ?, claim_lsn = ? WHERE bucket = ? AND id = ? IF lease_until_ms = ? AND not_before_ms = ? AND attempts = ? AND claim_lsn = ?"
            ),
            lease_release: format!(
                "UPDATE {ks}.queue_leases SET lease_until_ms = 0 WHERE bucket = ? AND id = ? IF attempts = ? AND claim_lsn = ?"
            ),
            lease_retry: format!(
                "UPDATE {ks}.queue_leases SET lease_until_ms = 0, not_before_ms = ?, attempts = ? WHERE bucket = ? AND id = ? IF attempts = ? AND claim_lsn = ?"
            ),
            lease_delete: format!(
                "DELETE FROM {ks}.queue_leases WHERE bucket = ? AND id = ? IF attempts = ? AND claim_lsn = ?"
            ),
            get_meta: format!("SELECT value FROM {ks}.meta WHERE name = ?"),
            put_meta: format!("INSERT INTO {ks}.meta (name, value) VALUES (?, ?)"),
            named_lease_insert: format!(
                "INSERT INTO {ks}.meta (name, value) VALUES (?, ?) IF NOT EXISTS USING TTL ?"
            ),
            named_lease_renew: format!(
                "UPDATE {ks}.meta USING TTL ? SET value = ? WHERE name = ? IF value = ?"
            ),
            named_lease_release: format!("DELETE FROM {ks}.meta WHERE name = ? IF value = ?"),
            list_tables: "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?"
                .to_owned(),
        }
    }
}

/// The serial consistency that goes with a consistency level: `LOCAL_SERIAL` for the `LOCAL_*` levels
/// (lightweight transactions stay within the data centre), else `SERIAL`.
pub fn serial_is_local(consistency: Consistency) -> bool {
    consistency.is_local()
}

// ---------------------------------------------------------------------------------------------------
// Entries

/// Maps an LSN to the write timestamp of its entry: the same number, as CQL's signed 64-bit timestamp.
/// Order-preserving, so last-write-wins keeps the entry with the highest LSN.
pub fn lsn_timestamp(lsn: Lsn) -> StoreResult<i64> {
    i64::try_from(lsn.0).map_err(|_| {
        StoreError::failed(format!(
            "LSN {lsn} is above 7FFFFFFF/FFFFFFFF, the largest the scylla store can order (entries are \
             written with the LSN as their 64-bit signed CQL timestamp)"
        ))
    })
}

/// The inverse of [`lsn_timestamp`]: the LSN of an entry whose write timestamp is `ts`.
pub fn timestamp_lsn(ts: i64) -> StoreResult<Lsn> {
    u64::try_from(ts).map(Lsn).map_err(|_| {
        StoreError::Corrupt(format!(
            "an entry has the negative write timestamp {ts}; something other than kck wrote cache_entries"
        ))
    })
}

/// The latest expiry Cassandra 4.0 (and ScyllaDB) can store: `2038-01-19T03:14:06Z`, in seconds since the
/// Unix epoch (`Cell.MAX_DELETION_TIME`, `i32::MAX - 1`). A write whose `now + TTL` passes it is refused
/// ("exceeds maximum supported expiration date").
pub const MAX_EXPIRY_SECONDS: i64 = i32::MAX as i64 - 1;

/// Seconds kept between `now + TTL` and [`MAX_EXPIRY_SECONDS`], for the server's clock being ahead of ours.
pub const EXPIRY_CLOCK_MARGIN_SECONDS: i64 = 86_400;

/// The `USING TTL` of an entry stored at `now_ms`: the seconds until `expires_at_ms`, rounded up, at
/// least 1 (an entry that has already expired goes at once), and 0 (no TTL) without an expiry.
///
/// Clamped to what the server accepts: at most CQL's 20 years ([`MAX_TTL_SECONDS`]), and such that
/// `now + TTL` stays a day below [`MAX_EXPIRY_SECONDS`] (Cassandra 4.0 refuses expiries past 2038-01-19).
/// A clamped entry goes earlier than its `expires_at_ms` (it is then a miss, computed again), never later.
/// When even a TTL of 1 s would pass that date (a clock past 2038), no TTL is used: the entry is kept,
/// which the store contract allows (readers compare `expires_at_ms` themselves).
pub fn ttl_seconds(expires_at_ms: Option<i64>, now_ms: i64) -> i32 {
    let Some(expires) = expires_at_ms else {
        return 0;
    };
    let left_ms = i128::from(expires) - i128::from(now_ms);
    if left_ms <= 0 {
        return 1;
    }
    let secs = (left_ms + 999) / 1000;
    let now_s = i128::from(now_ms.div_euclid(1000));
    let server_limit = i128::from(MAX_EXPIRY_SECONDS - EXPIRY_CLOCK_MARGIN_SECONDS) - now_s;
    let limit = server_limit.min(i128::from(MAX_TTL_SECONDS));
    if limit < 1 {
        return 0;
    }
    secs.min(limit) as i32
}

/// How an entry is laid out in its one `entry` cell: [`Layout::Ordered`], big-endian and order-preserving,
/// `computed_at_ms` first, so that of two entries with the same LSN (same write timestamp), the one
/// computed later compares greater.
pub const ENTRY_LAYOUT: Layout = Layout::Ordered;

// ---------------------------------------------------------------------------------------------------
// Queue

/// The queue bucket of a task id: FNV-1a (64-bit) of its bytes, modulo [`QUEUE_BUCKETS`]. Stable across
/// processes, versions and platforms (it decides where every process looks for the task).
pub fn bucket_of(id: &str) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % QUEUE_BUCKETS as u64) as i32
}

/// An LSN as a CQL `bigint` of the queue tables (the same 64 bits; only compared for equality there).
pub fn lsn_bigint(lsn: Lsn) -> i64 {
    lsn.0 as i64
}

pub fn bigint_lsn(v: i64) -> Lsn {
    Lsn(v as u64)
}

/// One row of `queue_order` (and its twin in `queue_tasks`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderRow {
    pub enqueued_at_us: i64,
    pub id: String,
    pub lsn: i64,
    pub bucket: i32,
}

/// Merges the heads of the buckets into one list, oldest first (ties by id), each id once (at its oldest
/// row, which is its place in line).
pub fn merge_heads(heads: Vec<Vec<OrderRow>>) -> Vec<OrderRow> {
    let mut all: Vec<OrderRow> = heads.into_iter().flatten().collect();
    all.sort();
    let mut seen = std::collections::HashSet::new();
    all.retain(|r| seen.insert(r.id.clone()));
    all
}

/// Where the next scan of a bucket's `queue_order` may start, after a scan that started at `floor` and
/// found its first row at `first_us` (`None`: the bucket was empty from `floor` on) at `now_us`.
///
/// Finished tasks leave tombstones at the head of their bucket until compaction purges them (after
/// [`QUEUE_GC_GRACE_SECONDS`]); a scan from the very start would read every one of them. Every row below
/// the first one found is gone, and a new row is written with its writer's clock (about now), so the
/// next scan can start a margin below the oldest live row, or below now when there is none. A retried
/// task keeps its old row, which is live, so the floor never passes it. The floor never goes down (until
/// the periodic reset, [`FLOOR_RESET`]).
pub fn next_floor(floor: i64, first_us: Option<i64>, now_us: i64) -> i64 {
    floor.max(first_us.unwrap_or(now_us).saturating_sub(FLOOR_MARGIN_US))
}

/// A task's versions (its `queue_tasks` rows) coalesced: (largest LSN, oldest enqueue in µs).
pub fn coalesce(versions: &[(i64, i64)]) -> Option<(Lsn, i64)> {
    let lsn = versions.iter().map(|(l, _)| bigint_lsn(*l)).max()?;
    let first = versions.iter().map(|(_, e)| *e).min()?;
    Some((lsn, first))
}

/// A `queue_leases` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// 0 when not claimed.
    pub lease_until_ms: i64,
    pub not_before_ms: i64,
    pub attempts: i32,
    pub claim_lsn: i64,
}

impl Lease {
    /// Whether a claim holds the task at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.lease_until_ms > now_ms
    }

    /// Whether a worker may claim the task at `now_ms`.
    pub fn is_claimable(&self, now_ms: i64) -> bool {
        !self.is_live(now_ms) && self.not_before_ms <= now_ms
    }

    /// The attempts a new claim records: a claim whose lease ran out without being finished or retried
    /// counts as one.
    pub fn next_attempts(&self) -> i32 {
        if self.lease_until_ms > 0 {
            self.attempts.saturating_add(1)
        } else {
            self.attempts
        }
    }
}

/// `now + lease` in ms, saturating.
pub fn lease_until(now_ms: i64, lease: std::time::Duration) -> i64 {
    let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_add(ms.max(1))
}

/// A clock of microseconds since the Unix epoch that never repeats or goes back within a process, for
/// `enqueued_at_us` (it orders the queue and is part of the row key, so two enqueues never share a row).
#[derive(Debug, Default)]
pub struct MicrosClock {
    last: std::sync::atomic::AtomicI64,
}

impl MicrosClock {
    pub fn next(&self) -> i64 {
        self.next_after(now_us())
    }

    /// [`MicrosClock::next`] with the wall clock given.
    pub fn next_after(&self, wall_us: i64) -> i64 {
        use std::sync::atomic::Ordering;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall_us.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }
}

pub use crate::clock::{now_ms, now_us};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::tests::entry;

    /// Of two entries with one LSN (one write timestamp), the database keeps the greater cell value
    /// where values decide the tie: that must be the one computed later, whatever the values.
    #[test]
    fn equal_lsn_ties_favour_the_later_computation() {
        let pairs = [
            (entry(10, 100, None, "zzz"), entry(10, 101, None, "aaa")),
            (entry(10, -1, None, "b"), entry(10, 0, None, "a")),
            (
                entry(10, i64::MIN, None, "b"),
                entry(10, i64::MAX, None, "a"),
            ),
            (entry(10, 5, Some(9), "b"), entry(10, 6, None, "a")),
        ];
        for (earlier, later) in pairs {
            assert!(
                ENTRY_LAYOUT.encode(&later) > ENTRY_LAYOUT.encode(&earlier),
                "{later:?} must encode greater than {earlier:?}"
            );
        }
        // Same computation time: the value decides, deterministically.
        assert!(
            ENTRY_LAYOUT.encode(&entry(20, 1, None, "v20b"))
                > ENTRY_LAYOUT.encode(&entry(20, 1, None, "v20"))
        );
    }

    #[test]
    fn lsn_timestamps_preserve_order_and_refuse_what_does_not_fit() {
        let lsns = [0u64, 1, 0x16_B374_D848, 1 << 40, i64::MAX as u64];
        for w in lsns.windows(2) {
            assert!(lsn_timestamp(Lsn(w[0])).unwrap() < lsn_timestamp(Lsn(w[1])).unwrap());
        }
        for l in lsns {
            assert_eq!(
                timestamp_lsn(lsn_timestamp(Lsn(l)).unwrap()).unwrap(),
                Lsn(l)
            );
        }
        let err = lsn_timestamp(Lsn(1 << 63)).unwrap_err().to_string();
        assert!(
            err.contains("80000000/0") && err.contains("7FFFFFFF/FFFFFFFF"),
            "{err}"
        );
        assert!(lsn_timestamp(Lsn(u64::MAX)).is_err());
        assert!(matches!(timestamp_lsn(-1), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn ttls() {
        let now = 1_700_000_000_000;
        assert_eq!(ttl_seconds(None, now), 0);
        assert_eq!(ttl_seconds(Some(now + 1), now), 1);
        assert_eq!(ttl_seconds(Some(now + 1000), now), 1);
        assert_eq!(ttl_seconds(Some(now + 1001), now), 2);
        assert_eq!(ttl_seconds(Some(now + 60_000), now), 60);
        // Already expired: gone as soon as possible (a TTL of 0 would mean "never").
        assert_eq!(ttl_seconds(Some(now), now), 1);
        assert_eq!(ttl_seconds(Some(i64::MIN), now), 1);
    }

    /// Cassandra 4.0 refuses a write whose `now + TTL` passes 2038-01-19T03:14:06Z: the TTL is clamped so
    /// that it stays a day below, whatever the entry's expiry, and CQL's 20-year cap holds too.
    #[test]
    fn ttls_are_clamped_below_the_servers_last_expiry() {
        let limit_s = MAX_EXPIRY_SECONDS - EXPIRY_CLOCK_MARGIN_SECONDS;
        for now in [
            1_700_000_000_000i64, // 2023: 20 years would pass 2038
            2_000_000_000_000,    // 2033
            (limit_s - 10) * 1000,
            (limit_s - 1) * 1000 + 999,
        ] {
            for expires in [
                now + 12 * 365 * 86_400_000,
                now + 40 * 365 * 86_400_000,
                i64::MAX,
            ] {
                let ttl = ttl_seconds(Some(expires), now);
                assert!(ttl >= 1, "now {now}: TTL {ttl}");
                assert!(
                    now.div_euclid(1000) + i64::from(ttl) <= limit_s,
                    "now {now}, expires {expires}: TTL {ttl} passes the server's limit"
                );
                assert!(i64::from(ttl) <= MAX_TTL_SECONDS);
            }
        }
        // A near expiry is not touched.
        let now = 2_000_000_000_000;
        assert_eq!(ttl_seconds(Some(now + 3_600_000), now), 3600);
        // In 1990, 20 years is the cap.
        assert_eq!(
            ttl_seconds(Some(i64::MAX), 631_152_000_000),
            MAX_TTL_SECONDS as i32
        );
        // Past the limit (a clock in 2038): no TTL rather than a refused write.
        assert_eq!(ttl_seconds(Some(i64::MAX), limit_s * 1000), 0);
        assert_eq!(ttl_seconds(Some(i64::MAX), i64::MAX - 5), 0);
        assert_eq!(
            ttl_seconds(Some(i64::MAX), i64::MIN),
            MAX_TTL_SECONDS as i32
        );
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        // Fixed values: every process, version and platform must agree on them.
        assert_eq!(bucket_of(""), (0xcbf2_9ce4_8422_2325u64 % 16) as i32);
        assert_eq!(bucket_of("a"), (0xaf63_dc4c_8601_ec8cu64 % 16) as i32);
        let mut counts = [0usize; QUEUE_BUCKETS as usize];
        for i in 0..16_000 {
            let b = bucket_of(&format!("k:orders_by_user/{i}"));
            assert!((0..QUEUE_BUCKETS).contains(&b));
            counts[b as usize] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven buckets: {counts:?}");
        }
    }

    #[test]
    fn heads_merge_oldest_first_each_id_once() {
        let row = |enq, id: &str, lsn, bucket| OrderRow {
            enqueued_at_us: enq,
            id: id.to_owned(),
            lsn,
            bucket,
        };
        let merged = merge_heads(vec![
            vec![row(3, "c", 1, 0), row(5, "a", 9, 0)],
            vec![row(1, "a", 5, 0), row(2, "b", 1, 1), row(4, "b", 2, 1)],
            vec![],
        ]);
        let ids: Vec<(&str, i64)> = merged
            .iter()
            .map(|r| (r.id.as_str(), r.enqueued_at_us))
            .collect();
        assert_eq!(ids, vec![("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(coalesce(&[(5, 1), (9, 5), (3, 7)]), Some((Lsn(9), 1)));
        assert_eq!(coalesce(&[]), None);
    }

    #[test]
    fn scan_floors_stay_a_margin_below_the_oldest_row_and_never_go_down() {
        let m = FLOOR_MARGIN_US;
        let start = i64::MIN;
        // The oldest row is at 1000 s: scan from 1000 s minus the margin next time.
        assert_eq!(
            next_floor(start, Some(1_000_000_000), 2_000_000_000),
            1_000_000_000 - m
        );
        // Empty bucket: a margin below now.
        assert_eq!(next_floor(start, None, 2_000_000_000), 2_000_000_000 - m);
        // Never down, even when an older row shows up (a retried task found by a rescan).
        assert_eq!(
            next_floor(1_500_000_000, Some(1_000_000_000), 2_000_000_000),
            1_500_000_000
        );
        // No overflow at the edges.
        assert_eq!(next_floor(start, Some(i64::MIN), 0), start);
        assert_eq!(next_floor(start, None, i64::MIN + 5), start);
    }

    #[test]
    fn leases() {
        let free = Lease {
            lease_until_ms: 0,
            not_before_ms: 0,
            attempts: 2,
            claim_lsn: 5,
        };
        assert!(free.is_claimable(100));
        assert_eq!(free.next_attempts(), 2);
        let held = Lease {
            lease_until_ms: 200,
            ..free
        };
        assert!(held.is_live(100) && !held.is_claimable(100));
        assert!(held.is_claimable(200), "a lease ends at its deadline");
        assert_eq!(
            held.next_attempts(),
            3,
            "an expired claim counts as an attempt"
        );
        let delayed = Lease {
            not_before_ms: 150,
            ..free
        };
        assert!(!delayed.is_claimable(100) && delayed.is_claimable(150));
        assert_eq!(lease_until(100, std::time::Duration::from_millis(1)), 101);
        assert_eq!(lease_until(100, std::time::Duration::ZERO), 101);
        assert_eq!(
            lease_until(i64::MAX - 1, std::time::Duration::from_secs(9)),
            i64::MAX
        );
    }

    #[test]
    fn micros_clock_never_repeats_or_goes_back() {
        let c = MicrosClock::default();
        assert_eq!(c.next_after(100), 100);
        assert_eq!(c.next_after(100), 101);
        assert_eq!(c.next_after(50), 102, "a wall clock going back does not");
        assert_eq!(c.next_after(500), 500);
        assert!(c.next() > 500);
    }

    #[test]
    fn schema_statements() {
        let nts = KeyspaceReplication::NetworkTopology {
            datacenters: vec![("dc1".into(), 3), ("eu-west.2".into(), 2)],
        };
        assert_eq!(
            create_keyspace("kck", &nts, false),
            "CREATE KEYSPACE IF NOT EXISTS kck WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3, 'eu-west.2': 2}"
        );
        let simple = KeyspaceReplication::Simple {
            replication_factor: 1,
        };
        assert_eq!(
            create_keyspace("k2", &simple, true),
            "CREATE KEYSPACE IF NOT EXISTS k2 WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1} AND tablets = {'enabled': false}"
        );
        let tables = create_tables("ks");
        assert_eq!(tables.len(), TABLES.len());
        for (sql, name) in tables.iter().zip(TABLES) {
            assert!(
                sql.starts_with(&format!("CREATE TABLE IF NOT EXISTS ks.{name} (")),
                "{sql}"
            );
        }
        // Every statement names the keyspace's tables, never a bare `entries`.
        let st = Statements::new("ks");
        let all = format!("{st:?}");
        assert!(!all.contains(" entries"), "{all}");
        assert!(st.put_entry.contains("USING TIMESTAMP ? AND TTL ?"));
        assert!(st.lease_take.contains(" IF lease_until_ms = ?"));
    }

    #[test]
    fn data_centres_must_be_the_clusters() {
        let cluster = vec!["datacenter1".to_owned(), "datacenter1".to_owned()];
        let nts = |dcs: &[&str]| KeyspaceReplication::NetworkTopology {
            datacenters: dcs.iter().map(|d| ((*d).to_owned(), 3)).collect(),
        };
        assert_eq!(unknown_datacenters(&nts(&["datacenter1"]), &cluster), None);
        let err = unknown_datacenters(&nts(&["dc1", "datacenter1", "DC2"]), &cluster).unwrap();
        assert!(
            err.contains("data centre(s) dc1, DC2 that the cluster does not have")
                && err.contains("its data centres are: datacenter1 (")
                && err.contains("nodetool status"),
            "{err}"
        );
        let simple = KeyspaceReplication::Simple {
            replication_factor: 1,
        };
        assert_eq!(unknown_datacenters(&simple, &[]), None);
        assert!(
            unknown_datacenters(&nts(&["a"]), &[])
                .unwrap()
                .contains("(none found)")
        );
    }

    /// `sql/scylla.cql` is the schema `kck store init` creates for the default keyspace.
    #[test]
    fn the_schema_file_matches_the_code() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/scylla.cql");
        let text = std::fs::read_to_string(file).unwrap();
        let expected = schema_script(
            "kck",
            &KeyspaceReplication::Simple {
                replication_factor: 1,
            },
        );
        assert!(
            text == expected,
            "{file} is out of date; regenerate it with:\n  KCK_WRITE_SCHEMA=1 cargo test --lib write_schema_file_when_asked\n--- expected ---\n{expected}"
        );
    }

    /// Writes `sql/scylla.cql` when `KCK_WRITE_SCHEMA` is set (see the test above).
    #[test]
    fn write_schema_file_when_asked() {
        if std::env::var_os("KCK_WRITE_SCHEMA").is_none() {
            return;
        }
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/scylla.cql");
        let text = schema_script(
            "kck",
            &KeyspaceReplication::Simple {
                replication_factor: 1,
            },
        );
        std::fs::write(file, text).unwrap();
    }
}
