//! The CQL data model of the ScyllaDB / Cassandra store, as pure functions: table and statement text,
//! entry encoding, LSN → write timestamp, TTLs, and the refresh queue's rows and decisions.
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
//! | `queue_log`     | `((shard, slice), pos, id)`                  | append-only queue events ([`LogRow`]); partitions deleted whole |
//! | `queue_tasks`   | `id`                                         | a task's state ([`TaskState`], written only by lightweight transactions on `ver`) and `req_lsn` |
//! | `queue_floors`  | `((level), slice)`                           | per-slice minimums of floor and enqueue time ([`Mark`]) |
//! | `queue_holders` | `((k), holder)`                              | each claiming process's heads and debts ([`HolderRow`]) |
//! | `queue_counts`  | `((k), shard)`                               | depth counters ([`Counts`], estimates) |
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
//! See [`super::cql_queue`] for how it runs and ARCHITECTURE.md ("The CQL refresh queue") for its cost per
//! operation. In short: enqueues append events to `queue_log` (no read, no lightweight transaction);
//! claimers read each shard's log forward from their heads and decide each task's fate from its
//! `queue_tasks` row ([`decide`]); the row's state changes only by `UPDATE ... IF ver = ?`, so the lease and
//! the task's existence are decided together; nothing is deleted inside a log partition, and partitions
//! every head has passed are deleted whole.

use std::fmt::Write as _;

use super::codec::Layout;
use super::{Consistency, KeyspaceReplication};
use super::{StoreError, StoreResult};
use crate::lsn::Lsn;

/// The value of the `meta` row [`SCHEMA_META`] that `kck store init` writes and every process checks.
/// A keyspace made for another layout (`kck-scylla-1`: the queue of row deletes) is refused.
pub const SCHEMA_VERSION: &str = "kck-scylla-2 shards=16";
/// The `meta` name of [`SCHEMA_VERSION`].
pub const SCHEMA_META: &str = "kck.schema";
/// The `meta` row holding the position below which every queue log partition is retired (µs; written by
/// `kck store init` as its time, raised by claimers): where a claimer with nothing better starts reading.
pub const QUEUE_START_META: &str = "kck.queue.start";

/// The tables kck needs, in creation order.
pub const TABLES: [&str; 9] = [
    "cache_entries",
    "key_index",
    "key_primers",
    "queue_log",
    "queue_tasks",
    "queue_floors",
    "queue_holders",
    "queue_counts",
    "meta",
];

/// Tombstones of the queue tables (retired log partitions, expired task rows, retired summary ranges) are
/// purged after an hour rather than the default ten days: none is ever read by the hot path, and one that
/// came back (a replica that missed the deletion for longer) would only be read past again.
pub const QUEUE_GC_GRACE_SECONDS: u32 = 3600;

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
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_log (\n    shard int,\n    slice bigint,\n    pos bigint,\n    id text,\n    lsn bigint,\n    floor bigint,\n    enq bigint,\n    PRIMARY KEY ((shard, slice), pos, id)\n) WITH gc_grace_seconds = {g} AND comment = 'kck refresh queue: append-only events, partitions retired whole'"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_tasks (\n    id text PRIMARY KEY,\n    req_lsn bigint,\n    ver bigint,\n    pending boolean,\n    done_lsn bigint,\n    floor bigint,\n    enq bigint,\n    lease_until_ms bigint,\n    not_before_ms bigint,\n    attempts int,\n    claim_lsn bigint\n) WITH gc_grace_seconds = {g} AND comment = 'kck refresh queue: one row per task id, state written by lightweight transactions on ver'"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_floors (\n    level tinyint,\n    slice bigint,\n    floor bigint,\n    oldest bigint,\n    PRIMARY KEY ((level), slice)\n) WITH gc_grace_seconds = {g} AND comment = 'kck refresh queue: least floor and enqueue time per slice, kept as minimums by write timestamp'"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_holders (\n    k int,\n    holder text,\n    reading_to bigint,\n    heads frozen<list<bigint>>,\n    floor bigint,\n    oldest bigint,\n    until bigint,\n    PRIMARY KEY ((k), holder)\n) WITH gc_grace_seconds = {g} AND comment = 'kck refresh queue: what each claimer has read and holds'"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {keyspace}.queue_counts (\n    k int,\n    shard int,\n    events counter,\n    open counter,\n    claimed counter,\n    PRIMARY KEY ((k), shard)\n) WITH comment = 'kck refresh queue: depth estimates'"
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
    pub log_insert: String,
    pub log_read: String,
    pub log_retire: String,
    pub task_request: String,
    pub task_read: String,
    pub task_cas: String,
    pub floor_min: String,
    pub oldest_min: String,
    pub floors_read: String,
    pub floors_retire: String,
    pub holder_put: String,
    pub holders_read: String,
    pub counts_add: String,
    pub counts_read: String,
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
            log_insert: format!(
                "INSERT INTO {ks}.queue_log (shard, slice, pos, id, lsn, floor, enq) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ),
            log_read: format!(
                "SELECT pos, id, lsn, floor, enq FROM {ks}.queue_log WHERE shard = ? AND slice = ? AND pos >= ? AND pos <= ? LIMIT ?"
            ),
            log_retire: format!("DELETE FROM {ks}.queue_log WHERE shard = ? AND slice = ?"),
            task_request: format!(
                "UPDATE {ks}.queue_tasks USING TIMESTAMP ? AND TTL ? SET req_lsn = ? WHERE id = ?"
            ),
            task_read: format!(
                "SELECT req_lsn, ver, pending, done_lsn, floor, enq, lease_until_ms, not_before_ms, attempts, claim_lsn FROM {ks}.queue_tasks WHERE id = ?"
            ),
            task_cas: format!(
                "UPDATE {ks}.queue_tasks USING TTL ? SET ver = ?, pending = ?, done_lsn = ?, floor = ?, enq = ?, lease_until_ms = ?, not_before_ms = ?, attempts = ?, claim_lsn = ? WHERE id = ? IF ver = ?"
            ),
            floor_min: format!(
                "UPDATE {ks}.queue_floors USING TIMESTAMP ? SET floor = ? WHERE level = ? AND slice = ?"
            ),
            oldest_min: format!(
                "UPDATE {ks}.queue_floors USING TIMESTAMP ? SET oldest = ? WHERE level = ? AND slice = ?"
            ),
            floors_read: format!(
                "SELECT slice, floor, oldest FROM {ks}.queue_floors WHERE level = ? AND slice >= ? AND slice < ?"
            ),
            floors_retire: format!(
                "DELETE FROM {ks}.queue_floors USING TIMESTAMP ? WHERE level = ? AND slice >= ? AND slice < ?"
            ),
            holder_put: format!(
                "INSERT INTO {ks}.queue_holders (k, holder, reading_to, heads, floor, oldest, until) VALUES (0, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ),
            holders_read: format!(
                "SELECT holder, reading_to, heads, floor, oldest, until FROM {ks}.queue_holders WHERE k = 0"
            ),
            counts_add: format!(
                "UPDATE {ks}.queue_counts SET events = events + ?, open = open + ?, claimed = claimed + ? WHERE k = 0 AND shard = ?"
            ),
            counts_read: format!("SELECT events, open, claimed FROM {ks}.queue_counts WHERE k = 0"),
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
//
// See "The refresh queue" in the module docs (and ARCHITECTURE.md) for the design; this part holds its
// rows and every decision about them, as pure functions.

/// Log shards: a task id hashes to one ([`bucket_of`]); each shard's log is read in order by every claimer.
pub const QUEUE_BUCKETS: i32 = 16;

/// Width of one `queue_log` partition (a shard's events of 10 s), in µs. A partition is deleted whole once
/// every claimer has read past it; no row is ever deleted inside one.
pub const LOG_SLICE_US: i64 = 10_000_000;

/// Width of a fine `queue_floors` summary (level [`FINE`]), in µs. The pending floor is exact up to the end
/// of the fine slice the claimers' heads are in, and bounded by summaries beyond it.
pub const FINE_SLICE_US: i64 = 50_000;

/// `queue_floors` levels: fine slices ([`FINE_SLICE_US`]) and coarse ones ([`LOG_SLICE_US`]).
pub const FINE: i8 = 0;
pub const COARSE: i8 = 1;

/// How long a finished task's row is kept (it answers "already done" to older events of the same id):
/// 7 days. An event older than that for a finished task refreshes it once more, which is harmless.
pub const DONE_TTL_SECONDS: i32 = 7 * 86_400;

/// How long a claimer's `queue_holders` row outlives its last write (a process that stopped).
pub const HOLDER_TTL_SECONDS: i32 = 86_400;

/// Summaries keep a minimum without reading: each value is written `USING TIMESTAMP MIN_BASE - value`, so
/// the smallest value has the highest timestamp and wins on every replica. Values are clamped to
/// `0..MIN_BASE`; retiring summaries deletes them at `MIN_BASE`.
pub const MIN_BASE: i64 = 1 << 62;

/// The write timestamp of `value` in a min-keeping cell (see [`MIN_BASE`]).
pub fn min_timestamp(value: i64) -> i64 {
    MIN_BASE - value.clamp(0, MIN_BASE - 1)
}

/// The queue shard of a task id: FNV-1a (64-bit) of its bytes, modulo [`QUEUE_BUCKETS`]. Stable across
/// processes, versions and platforms (it decides where every process looks for the task).
pub fn bucket_of(id: &str) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % QUEUE_BUCKETS as u64) as i32
}

/// The slice of width `width` a position falls in.
pub fn slice_of(pos_us: i64, width: i64) -> i64 {
    pos_us.div_euclid(width)
}

/// An LSN as a CQL `bigint` of the queue tables (the same 64 bits).
pub fn lsn_bigint(lsn: Lsn) -> i64 {
    lsn.0 as i64
}

pub fn bigint_lsn(v: i64) -> Lsn {
    Lsn(v as u64)
}

/// One `queue_log` row: an event about task `id` at position `pos` (µs since the epoch) of shard `shard`
/// (partition `(shard, slice_of(pos, LOG_SLICE_US))`).
///
/// - an **enqueue**: `lsn` and `floor` set, `enq` unset (the task was asked for at `pos`);
/// - a **look** (a released, retried or deferred task is due at `pos`): `floor` and `enq` carry the task's
///   debt and first enqueue time, `lsn` is set only for a deferred enqueue;
/// - a **lease check** (a claim's lease ends at `pos`): nothing set; it carries no debt (the claimer's
///   `queue_holders` row does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub shard: i32,
    pub pos: i64,
    pub id: String,
    pub lsn: Option<i64>,
    pub floor: Option<i64>,
    pub enq: Option<i64>,
}

impl LogRow {
    /// The enqueue time this event stands for, if it stands for a debt.
    pub fn oldest(&self) -> Option<i64> {
        match (self.enq, self.lsn) {
            (Some(e), _) => Some(e),
            (None, Some(_)) => Some(self.pos),
            (None, None) => None,
        }
    }

    /// Whether this is an enqueue (counted in the queue's `events` counter until resolved).
    pub fn is_enqueue(&self) -> bool {
        self.lsn.is_some() && self.enq.is_none()
    }
}

/// A `queue_floors` write: the minimum floor and enqueue time of the events in one slice of a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub level: i8,
    pub slice: i64,
    pub floor: Option<i64>,
    pub oldest: Option<i64>,
}

/// The [`Mark`]s that cover `rows`: per fine and coarse slice, the least floor and enqueue time.
pub fn marks_for(rows: &[LogRow]) -> Vec<Mark> {
    let mut by: std::collections::BTreeMap<(i8, i64), (Option<i64>, Option<i64>)> =
        std::collections::BTreeMap::new();
    let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for r in rows {
        let (floor, oldest) = (r.floor, r.oldest());
        if floor.is_none() && oldest.is_none() {
            continue;
        }
        for (level, width) in [(FINE, FINE_SLICE_US), (COARSE, LOG_SLICE_US)] {
            let e = by.entry((level, slice_of(r.pos, width))).or_default();
            *e = (min(e.0, floor), min(e.1, oldest));
        }
    }
    by.into_iter()
        .map(|((level, slice), (floor, oldest))| Mark {
            level,
            slice,
            floor,
            oldest,
        })
        .collect()
}

/// The state of a task as the `queue_tasks` row holds it, written only by lightweight transactions that
/// compare `ver` (a fresh random number with every write), so that whoever read the row last decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskState {
    pub ver: i64,
    /// Queued (claimed, released or retried) rather than done.
    pub pending: bool,
    /// The claim LSN of the last finish that left the task done (every change up to it is reflected).
    pub done_lsn: Option<i64>,
    /// The oldest change LSN the pending task owes a refresh for.
    pub floor: i64,
    /// When the pending task was first enqueued (µs).
    pub enq: i64,
    /// 0 when not claimed.
    pub lease_until_ms: i64,
    pub not_before_ms: i64,
    pub attempts: i32,
    pub claim_lsn: i64,
}

impl TaskState {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.lease_until_ms > now_ms
    }

    pub fn is_claimable(&self, now_ms: i64) -> bool {
        self.pending && !self.is_live(now_ms) && self.not_before_ms <= now_ms
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

    /// Whether `claim` (its attempts and LSN) is the claim this state records.
    pub fn is_claim(&self, attempts: i32, claim_lsn: i64) -> bool {
        self.pending && self.attempts == attempts && self.claim_lsn == claim_lsn
    }
}

/// A `queue_tasks` row as read: `req_lsn` (the largest LSN ever enqueued for the id, written by enqueue
/// without reading, `USING TIMESTAMP <lsn>`) and the state, when a claim ever wrote one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskRead {
    pub req_lsn: Option<i64>,
    pub state: Option<TaskState>,
}

/// The events of one id in one claim round's page, together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub shard: i32,
    /// Position of its first event (its place in line).
    pub first: i64,
    pub lsn: Option<i64>,
    pub floor: Option<i64>,
    pub enq: Option<i64>,
    pub enqueues: u32,
    /// The events, by `(pos, id)`.
    pub events: Vec<(i64, String)>,
}

/// Groups a page's events by id, in the order of each id's first event.
pub fn group_events(rows: Vec<LogRow>) -> Vec<Group> {
    let mut rows = rows;
    rows.sort_by(|a, b| (a.pos, &a.id).cmp(&(b.pos, &b.id)));
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    let opt_max = |a: Option<i64>, b: Option<i64>| a.max(b);
    let opt_min = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for r in rows {
        let i = *index.entry(r.id.clone()).or_insert_with(|| {
            groups.push(Group {
                id: r.id.clone(),
                shard: r.shard,
                first: r.pos,
                lsn: None,
                floor: None,
                enq: None,
                enqueues: 0,
                events: Vec::new(),
            });
            groups.len() - 1
        });
        let g = &mut groups[i];
        g.lsn = opt_max(g.lsn, r.lsn);
        g.floor = opt_min(g.floor, r.floor);
        g.enq = opt_min(g.enq, r.oldest());
        if r.is_enqueue() {
            g.enqueues += 1;
        }
        g.events.push((r.pos, r.id));
    }
    groups
}

/// What a claim round does with a [`Group`] after reading its task's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Take the task: write `state` if the row's `ver` is still the one read. `opened`: the task was done
    /// (or never seen) and is pending from now on.
    Claim { state: TaskState, opened: bool },
    /// Nothing to do: already done, claimed, or waiting for its own event.
    Skip,
    /// The task is claimed or delayed, and these events owe changes older than its floor: copy them (one
    /// look event) to `at` (µs, when the task is next looked at), whose summaries keep that debt counted.
    Defer { at: i64 },
}

/// Decides a group's fate. `until_ms`: the lease a claim takes; `ver`: the version it writes.
pub fn decide(read: &TaskRead, g: &Group, now_ms: i64, until_ms: i64, ver: i64) -> Decision {
    let req = read.req_lsn.max(g.lsn);
    let claim =
        |claim_lsn: i64, floor: i64, enq: i64, attempts: i32, done_lsn, opened| Decision::Claim {
            state: TaskState {
                ver,
                pending: true,
                done_lsn,
                floor,
                enq,
                lease_until_ms: until_ms,
                not_before_ms: 0,
                attempts,
                claim_lsn,
            },
            opened,
        };
    match read.state {
        None | Some(TaskState { pending: false, .. }) => {
            let done = read.state.and_then(|s| s.done_lsn);
            // Only an enqueue newer than the last finish opens the task again; a look or lease check of a
            // finished task, or an enqueue it already reflects, is nothing to do.
            match (g.lsn, req) {
                (Some(l), Some(req)) if done.is_none_or(|d| l > d) => {
                    let floor = g.floor.unwrap_or(l).min(l);
                    claim(req, floor, g.enq.unwrap_or(g.first), 0, done, true)
                }
                _ => Decision::Skip,
            }
        }
        Some(s) => {
            if s.is_claimable(now_ms) {
                let floor = g.floor.map_or(s.floor, |f| f.min(s.floor));
                let claim_lsn = req.unwrap_or(s.claim_lsn).max(s.claim_lsn);
                claim(
                    claim_lsn,
                    floor,
                    s.enq,
                    s.next_attempts(),
                    s.done_lsn,
                    false,
                )
            } else if g.floor.is_some_and(|f| f < s.floor) {
                let at_ms = s.lease_until_ms.max(s.not_before_ms).max(now_ms);
                Decision::Defer {
                    at: at_ms.saturating_mul(1000),
                }
            } else {
                Decision::Skip
            }
        }
    }
}

/// What finishing a claim does to its task's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The row records another claim (the lease ran out and another worker took it, or this one was
    /// retried or finished already): leave it.
    NotOurs,
    /// Done: every change the task was asked for is reflected.
    Done(TaskState),
    /// Raised while claimed: released, still owing the changes after the claim's LSN; a look event at once
    /// makes it claimable again.
    Raised(TaskState),
}

/// `again`: a follow-up of the finish has the task's own id (it is then a new task, at the same LSN).
pub fn finish_state(
    read: &TaskRead,
    attempts: i32,
    claim_lsn: i64,
    again: bool,
    ver: i64,
) -> Finish {
    let Some(s) = read.state.filter(|s| s.is_claim(attempts, claim_lsn)) else {
        return Finish::NotOurs;
    };
    let released = TaskState {
        ver,
        lease_until_ms: 0,
        not_before_ms: 0,
        ..s
    };
    if again {
        // Its follow-up's event carries the floor it owes.
        Finish::Raised(TaskState {
            floor: s.floor.max(claim_lsn),
            ..released
        })
    } else if read.req_lsn.is_some_and(|r| r > claim_lsn) {
        Finish::Raised(TaskState {
            floor: s.floor.max(claim_lsn.saturating_add(1)),
            ..released
        })
    } else {
        Finish::Done(TaskState {
            pending: false,
            done_lsn: Some(s.done_lsn.map_or(claim_lsn, |d| d.max(claim_lsn))),
            ..released
        })
    }
}

/// A retried claim's state: released, due at `not_before_ms`, one more attempt.
pub fn retry_state(
    read: &TaskRead,
    attempts: i32,
    claim_lsn: i64,
    not_before_ms: i64,
    ver: i64,
) -> Option<TaskState> {
    let s = read.state.filter(|s| s.is_claim(attempts, claim_lsn))?;
    Some(TaskState {
        ver,
        lease_until_ms: 0,
        not_before_ms,
        attempts: attempts.saturating_add(1),
        ..s
    })
}

/// A claimer's `queue_holders` row: what it has read and what it holds. Written whole (no read), before
/// each claim round reads past `reading_to`, and after claims finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRow {
    pub holder: String,
    /// The claimer reads no event past this position until it has written a larger one; a writer in
    /// another process that finds its event at or below it copies the event above it.
    pub reading_to: i64,
    /// Per shard: every event before this position is resolved.
    pub heads: Vec<i64>,
    /// The least floor and first enqueue time of its live claims.
    pub floor: Option<i64>,
    pub oldest: Option<i64>,
    /// The latest lease end of those claims (µs): once every head passed it, their lease checks were
    /// resolved and this row's debts moved elsewhere.
    pub until: i64,
}

/// The queue's counters (sums over shards): enqueue events not resolved yet, tasks resolved and pending,
/// and live claims. Counter updates are not idempotent, so these are estimates: exact while no write of
/// them is lost or repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub events: i64,
    pub open: i64,
    pub claimed: i64,
}

impl Counts {
    pub fn add(&mut self, o: Counts) {
        self.events += o.events;
        self.open += o.open;
        self.claimed += o.claimed;
    }

    pub fn is_zero(&self) -> bool {
        *self == Counts::default()
    }
}

/// `now + lease` in ms, saturating.
pub fn lease_until(now_ms: i64, lease: std::time::Duration) -> i64 {
    let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_add(ms.max(1))
}

/// A clock of microseconds since the Unix epoch that never repeats or goes back within a process, for
/// event positions (they order the log and are part of its key, so two events never share a row).
#[derive(Debug, Default)]
pub struct MicrosClock {
    last: std::sync::atomic::AtomicI64,
}

impl MicrosClock {
    pub fn next(&self) -> i64 {
        self.next_after(now_us())
    }

    /// The last position handed out (0 before the first).
    pub fn peek(&self) -> i64 {
        self.last.load(std::sync::atomic::Ordering::Relaxed)
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

    fn ev(pos: i64, id: &str, lsn: Option<i64>, floor: Option<i64>, enq: Option<i64>) -> LogRow {
        LogRow {
            shard: bucket_of(id),
            pos,
            id: id.to_owned(),
            lsn,
            floor,
            enq,
        }
    }

    #[test]
    fn events_group_by_id_in_order_of_their_first() {
        let groups = group_events(vec![
            ev(30, "c", Some(1), Some(1), None),
            ev(50, "a", Some(9), Some(7), None),
            ev(10, "a", Some(5), Some(5), None),
            ev(20, "b", Some(1), Some(1), None),
            ev(40, "b", None, None, None),
            ev(45, "a", None, Some(2), Some(3)),
        ]);
        let ids: Vec<(&str, i64)> = groups.iter().map(|g| (g.id.as_str(), g.first)).collect();
        assert_eq!(ids, vec![("a", 10), ("b", 20), ("c", 30)]);
        let a = &groups[0];
        assert_eq!(
            (a.lsn, a.floor, a.enq, a.enqueues),
            (Some(9), Some(2), Some(3), 2)
        );
        assert_eq!(a.events.len(), 3);
        assert_eq!((groups[1].lsn, groups[1].enqueues), (Some(1), 1));
    }

    #[test]
    fn marks_keep_the_least_floor_and_enqueue_time_per_slice() {
        let f = FINE_SLICE_US;
        let marks = marks_for(&[
            ev(f + 1, "a", Some(9), Some(7), None),
            ev(f + 2, "b", Some(3), Some(3), None),
            ev(2 * f, "c", None, Some(1), Some(5)),
            ev(2 * f + 1, "d", None, None, None),
        ]);
        assert_eq!(
            marks,
            vec![
                Mark {
                    level: FINE,
                    slice: 1,
                    floor: Some(3),
                    oldest: Some(f + 1)
                },
                Mark {
                    level: FINE,
                    slice: 2,
                    floor: Some(1),
                    oldest: Some(5)
                },
                Mark {
                    level: COARSE,
                    slice: 0,
                    floor: Some(1),
                    oldest: Some(5)
                },
            ]
        );
        // The smallest value wins by timestamp.
        assert!(min_timestamp(1) > min_timestamp(2));
        assert_eq!(min_timestamp(-5), MIN_BASE);
        assert!(min_timestamp(i64::MAX) > 0);
    }

    fn group(lsn: Option<i64>, floor: Option<i64>) -> Group {
        let mut g = group_events(vec![ev(100, "t", lsn, floor, None)]).remove(0);
        if lsn.is_none() {
            g.enq = None;
        }
        g
    }

    fn state(pending: bool) -> TaskState {
        TaskState {
            ver: 1,
            pending,
            done_lsn: Some(10),
            floor: 12,
            enq: 50,
            lease_until_ms: 0,
            not_before_ms: 0,
            attempts: 0,
            claim_lsn: 10,
        }
    }

    #[test]
    fn a_claim_needs_the_row_as_read() {
        let now = 1_000;
        let new = TaskRead {
            req_lsn: Some(8),
            state: None,
        };
        // A new task: claimed with the largest requested LSN, its own floor and first enqueue.
        match decide(&new, &group(Some(5), Some(4)), now, 2_000, 7) {
            Decision::Claim { state, opened } => {
                assert!(opened && state.pending);
                assert_eq!(
                    (state.claim_lsn, state.floor, state.enq, state.ver),
                    (8, 4, 100, 7)
                );
                assert_eq!((state.lease_until_ms, state.attempts), (2_000, 0));
            }
            d => panic!("{d:?}"),
        }
        // A lease check or look of a task never seen: nothing.
        assert_eq!(
            decide(&TaskRead::default(), &group(None, None), now, 2_000, 7),
            Decision::Skip
        );

        // Done at 10: an enqueue it reflects is nothing, a newer one opens it again.
        let done = TaskRead {
            req_lsn: Some(11),
            state: Some(state(false)),
        };
        assert_eq!(
            decide(&done, &group(Some(10), Some(10)), now, 2_000, 7),
            Decision::Skip
        );
        assert_eq!(
            decide(&done, &group(None, None), now, 2_000, 7),
            Decision::Skip
        );
        assert!(matches!(
            decide(&done, &group(Some(11), Some(11)), now, 2_000, 7),
            Decision::Claim { opened: true, .. }
        ));

        // Claimed by someone else: skipped, or deferred to its lease's end if it owes older changes.
        let held = TaskRead {
            req_lsn: Some(20),
            state: Some(TaskState {
                lease_until_ms: 5_000,
                ..state(true)
            }),
        };
        assert_eq!(
            decide(&held, &group(Some(20), Some(15)), now, 2_000, 7),
            Decision::Skip
        );
        assert_eq!(
            decide(&held, &group(Some(20), Some(3)), now, 2_000, 7),
            Decision::Defer { at: 5_000_000 }
        );
        // Retried and not due: the same.
        let delayed = TaskRead {
            req_lsn: Some(20),
            state: Some(TaskState {
                not_before_ms: 9_000,
                ..state(true)
            }),
        };
        assert_eq!(
            decide(&delayed, &group(None, Some(12)), now, 2_000, 7),
            Decision::Skip
        );
        assert_eq!(
            decide(&delayed, &group(Some(13), Some(11)), now, 2_000, 7),
            Decision::Defer { at: 9_000_000 }
        );
        // Released or its lease ran out: claimed again, keeping its place and floor, one more attempt.
        let expired = TaskRead {
            req_lsn: Some(20),
            state: Some(TaskState {
                lease_until_ms: 900,
                attempts: 2,
                ..state(true)
            }),
        };
        match decide(&expired, &group(None, None), now, 2_000, 7) {
            Decision::Claim { state, opened } => {
                assert!(!opened);
                assert_eq!(
                    (state.claim_lsn, state.floor, state.enq, state.attempts),
                    (20, 12, 50, 3)
                );
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn finishing_and_retrying_need_the_claim_the_row_records() {
        let claimed = TaskState {
            lease_until_ms: 5_000,
            attempts: 1,
            claim_lsn: 20,
            ..state(true)
        };
        let read = TaskRead {
            req_lsn: Some(20),
            state: Some(claimed),
        };
        match finish_state(&read, 1, 20, false, 9) {
            Finish::Done(s) => {
                assert!(!s.pending);
                assert_eq!((s.done_lsn, s.lease_until_ms, s.ver), (Some(20), 0, 9));
            }
            f => panic!("{f:?}"),
        }
        // Raised while claimed: released, owing what came after the claim.
        let raised = TaskRead {
            req_lsn: Some(25),
            ..read
        };
        match finish_state(&raised, 1, 20, false, 9) {
            Finish::Raised(s) => {
                assert!(s.pending);
                assert_eq!(
                    (s.floor, s.lease_until_ms, s.not_before_ms, s.enq),
                    (21, 0, 0, 50)
                );
            }
            f => panic!("{f:?}"),
        }
        // Another claim (or none) is recorded: not ours.
        assert_eq!(finish_state(&read, 2, 20, false, 9), Finish::NotOurs);
        assert_eq!(finish_state(&read, 1, 19, false, 9), Finish::NotOurs);
        let done = TaskRead {
            req_lsn: Some(20),
            state: Some(state(false)),
        };
        assert_eq!(finish_state(&done, 0, 10, false, 9), Finish::NotOurs);
        assert_eq!(
            finish_state(&TaskRead::default(), 0, 10, false, 9),
            Finish::NotOurs
        );

        let r = retry_state(&read, 1, 20, 7_000, 9).unwrap();
        assert_eq!(
            (r.lease_until_ms, r.not_before_ms, r.attempts, r.pending),
            (0, 7_000, 2, true)
        );
        assert_eq!(retry_state(&read, 0, 20, 7_000, 9), None);
    }

    #[test]
    fn lease_ends() {
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
        assert!(st.task_cas.ends_with(" IF ver = ?"));
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
