//! The ScyllaDB / Cassandra store: many kck processes share one cluster.
//!
//! [`ScyllaStore`] implements the [`Store`] contract on the tables described in [`super::cql`], which
//! also holds every decision that can be made without a server (statement text, encodings, timestamps,
//! buckets). This module only runs statements: it prepares them once, marks the idempotent ones so the
//! driver may retry them, pages through scans, and turns driver errors into [`StoreError`]s that say
//! which operation failed.
//!
//! # How the contract is kept
//! - **Entries never go backwards** without a read: each entry is written `USING TIMESTAMP <lsn>`, and the
//!   cluster keeps the highest timestamp. [`Store::store_result`] then reads the entry's write time back
//!   (one small read at the same consistency) to report [`Stored::KeptNewer`] when a newer entry won.
//! - **The queue** is [`CqlQueue`] over [`Cql`], this module's implementation of its statements: an
//!   append-only log read forward from per-process heads, one row per task written by lightweight
//!   transactions (the lease and the task's state decided together), counters for its depth. See
//!   [`super::cql_queue`].
//! - **Enqueue is durable** once every row is written at the configured consistency (`local_quorum` by
//!   default).
//! - **Finish is ordered, not atomic**: the result is stored, follow-ups queued, then the task's row is
//!   closed. A crash in between leaves the task claimed until its lease runs out, and then it runs again
//!   (at-least-once); nothing is lost.
//! - **Waiting** for tasks polls the cluster ([`POLL`]) and wakes at once for this process's own writes.
//! - **Server warnings** (a tombstone warning, a large batch) are logged once per kind, then counted
//!   ([`Warnings`]); the driver's own per-response log line is filtered out by the binary.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency as CqlConsistency, SerialConsistency, Statement};
use scylla::value::{CqlValue, Row};

use super::cql::{
    self, Counts, HolderRow, LogRow, Mark, QUEUE_START_META, SCHEMA_META, SCHEMA_VERSION,
    Statements, TABLES, TaskRead, TaskState,
};
use super::cql_queue::{CqlQueue, QueueBackend};
use super::{BoxError, Claim, Entry, QueueStats, Store, StoreError, StoreResult, Stored, Task};
use super::{Consistency, ScyllaConfig};
use crate::lsn::Lsn;

pub use super::cql_queue::POLL;
/// Statements run at once by one call (enqueue of a large batch).
const CONCURRENCY: usize = 64;
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns a driver error into a [`StoreError`] naming the operation (and keeping the error as its source).
fn cql_err<E: Into<BoxError>>(op: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::backend(op, e)
}

fn consistency(c: Consistency) -> CqlConsistency {
    match c {
        Consistency::One => CqlConsistency::One,
        Consistency::Two => CqlConsistency::Two,
        Consistency::Three => CqlConsistency::Three,
        Consistency::Quorum => CqlConsistency::Quorum,
        Consistency::All => CqlConsistency::All,
        Consistency::LocalOne => CqlConsistency::LocalOne,
        Consistency::LocalQuorum => CqlConsistency::LocalQuorum,
        Consistency::EachQuorum => CqlConsistency::EachQuorum,
    }
}

/// Connect a session to the configured cluster (no keyspace selected: statements name it).
pub async fn connect(config: &ScyllaConfig) -> StoreResult<Session> {
    let serial = if cql::serial_is_local(config.consistency) {
        SerialConsistency::LocalSerial
    } else {
        SerialConsistency::Serial
    };
    let profile = ExecutionProfile::builder()
        .consistency(consistency(config.consistency))
        .serial_consistency(Some(serial))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .build()
        .into_handle();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile);
    if let Some(user) = &config.username {
        builder = builder.user(user, config.password.clone().unwrap_or_default());
    }
    if let Some(ca) = &config.tls_ca_file {
        builder = builder.tls_context(Some(tls_context(ca)?));
    }
    builder.build().await.map_err(|e| {
        StoreError::backend(
            format!(
                "cannot connect to the scylla store at {}",
                config.nodes.join(", ")
            ),
            e,
        )
    })
}

/// A rustls client config that trusts the certificate authorities in `ca_file` (PEM).
fn tls_context(ca_file: &std::path::Path) -> StoreResult<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let what = |m: &str| format!("store.tls.ca_file {}: {m}", ca_file.display());
    fn bad<E: Into<BoxError>>(what: String) -> impl FnOnce(E) -> StoreError {
        move |e| StoreError::backend(what, e)
    }
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(bad(what("cannot read it")))?;
    for cert in certs {
        let cert = cert.map_err(bad(what("not a PEM certificate")))?;
        roots.add(cert).map_err(bad(what("unusable certificate")))?;
    }
    if roots.is_empty() {
        return Err(StoreError::failed(what("holds no certificate")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(bad(what("cannot set up TLS")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Create the keyspace and tables if they are missing, and record the schema version. Idempotent.
pub async fn init_schema(config: &ScyllaConfig) -> StoreResult<()> {
    let session = connect(config).await?;
    let ks = &config.keyspace;
    if matches!(
        config.replication,
        super::KeyspaceReplication::NetworkTopology { .. }
    ) {
        let dcs = cluster_datacenters(&session).await?;
        if let Some(message) = cql::unknown_datacenters(&config.replication, &dcs) {
            return Err(StoreError::failed(message));
        }
    }
    // ScyllaDB: a vnode keyspace (lightweight transactions); Cassandra does not know the option.
    let with_tablets = cql::create_keyspace(ks, &config.replication, true);
    if let Err(e) = session.query_unpaged(with_tablets, ()).await {
        let text = e.to_string();
        if !(text.contains("tablets") || text.contains("Unrecognized") || text.contains("Unknown"))
        {
            return Err(StoreError::backend(format!("creating keyspace {ks}"), e));
        }
        session
            .query_unpaged(cql::create_keyspace(ks, &config.replication, false), ())
            .await
            .map_err(cql_err("creating the keyspace"))?;
    }
    for table in cql::create_tables(ks) {
        session
            .query_unpaged(table, ())
            .await
            .map_err(cql_err("creating a table"))?;
    }
    session
        .await_schema_agreement()
        .await
        .map_err(cql_err("waiting for schema agreement"))?;
    let mut put = Statement::new(Statements::new(ks).put_meta);
    put.set_is_idempotent(true);
    session
        .query_unpaged(put, (SCHEMA_META, SCHEMA_VERSION.as_bytes()))
        .await
        .map_err(cql_err("recording the schema version"))?;
    // Where claimers start reading the queue log: now, unless a queue already runs on this keyspace.
    let start = Statement::new(format!(
        "INSERT INTO {ks}.meta (name, value) VALUES (?, ?) IF NOT EXISTS"
    ));
    session
        .query_unpaged(
            start,
            (QUEUE_START_META, cql::now_us().to_be_bytes().as_slice()),
        )
        .await
        .map_err(cql_err("recording the queue's start"))?;
    tracing::info!(keyspace = %ks, tables = TABLES.len(), "The scylla store's schema is ready.");
    Ok(())
}

/// The data centre of every node the cluster knows (`system.local` and `system.peers`), as `nodetool
/// status` names them.
async fn cluster_datacenters(session: &Session) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    for q in [
        "SELECT data_center FROM system.local",
        "SELECT data_center FROM system.peers",
    ] {
        let op = "reading the cluster's data centres";
        let r = session.query_unpaged(q, ()).await.map_err(cql_err(op))?;
        for row in rows(r, op)?
            .rows::<(Option<String>,)>()
            .map_err(cql_err(op))?
        {
            if let Some(dc) = row.map_err(cql_err(op))?.0 {
                out.push(dc);
            }
        }
    }
    Ok(out)
}

/// Server warnings, logged once per kind and then counted: a warning on a hot query would otherwise be
/// a log line per response.
#[derive(Default)]
pub struct Warnings {
    kinds: Mutex<HashMap<String, WarningKind>>,
}

struct WarningKind {
    /// Since the last line logged about it.
    count: u64,
    total: u64,
    logged: Instant,
}

/// How often a warning already logged is logged again with its count.
const WARNING_EVERY: Duration = Duration::from_secs(60);
/// Kinds remembered at most (others are still logged, without their own count).
const WARNING_KINDS: usize = 64;

impl Warnings {
    /// A warning's kind: its text with numbers and quoted values left out, so that "Read 0 live rows and
    /// 1200 tombstone cells for query SELECT ... WHERE p = 1" and its repeats are one kind.
    pub fn kind(text: &str) -> String {
        let mut out = String::with_capacity(text.len().min(160));
        let mut in_quote = false;
        let mut last_digit = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '-' && chars.peek().is_some_and(char::is_ascii_digit) {
                continue;
            }
            if c == '\'' {
                in_quote = !in_quote;
                if in_quote {
                    out.push_str("'…'");
                }
                continue;
            }
            if in_quote {
                continue;
            }
            if c.is_ascii_digit() {
                if !last_digit {
                    out.push('N');
                }
                last_digit = true;
                continue;
            }
            last_digit = false;
            out.push(c);
            if out.len() >= 160 {
                break;
            }
        }
        out
    }

    /// Note the warnings of one response (`op`: what kck was doing).
    pub fn note<'a>(&self, op: &str, warnings: impl Iterator<Item = &'a str>) {
        for text in warnings {
            let kind = Warnings::kind(text);
            let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            match kinds.get_mut(&kind) {
                Some(k) => {
                    k.count += 1;
                    k.total += 1;
                    if k.logged.elapsed() >= WARNING_EVERY {
                        tracing::warn!(
                            op,
                            warning = text,
                            repeats = k.count,
                            total = k.total,
                            "The database keeps warning (one line per minute per kind; the count is since the last line)."
                        );
                        k.count = 0;
                        k.logged = now;
                    }
                }
                None => {
                    tracing::warn!(
                        op,
                        warning = text,
                        "The database warned (logged once per kind, then counted once a minute)."
                    );
                    if kinds.len() < WARNING_KINDS {
                        kinds.insert(
                            kind,
                            WarningKind {
                                count: 0,
                                total: 1,
                                logged: now,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Every kind seen, with how many times (for tests and status).
    pub fn totals(&self) -> Vec<(String, u64)> {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, u64)> = kinds.iter().map(|(k, v)| (k.clone(), v.total)).collect();
        out.sort();
        out
    }
}

/// Every prepared statement.
struct Prepared {
    get_entry: PreparedStatement,
    entry_writetime: PreparedStatement,
    put_entry: PreparedStatement,
    delete_entry: PreparedStatement,
    index: Batch,
    unindex: Batch,
    is_registered: PreparedStatement,
    keys_first: PreparedStatement,
    keys_after: PreparedStatement,
    log_insert: PreparedStatement,
    log_read: PreparedStatement,
    log_retire: PreparedStatement,
    task_request: PreparedStatement,
    task_read: PreparedStatement,
    task_cas: PreparedStatement,
    floor_min: PreparedStatement,
    oldest_min: PreparedStatement,
    floors_read: PreparedStatement,
    floors_retire: PreparedStatement,
    holder_put: PreparedStatement,
    holders_read: PreparedStatement,
    counts_add: PreparedStatement,
    counts_read: PreparedStatement,
    get_meta: PreparedStatement,
    put_meta: PreparedStatement,
    put_start: PreparedStatement,
    named_lease_insert: PreparedStatement,
    named_lease_renew: PreparedStatement,
    named_lease_release: PreparedStatement,
}

/// The session and statements every part of the store shares; [`QueueBackend`] for the queue.
pub struct Cql {
    session: Session,
    st: Prepared,
    pub warnings: Warnings,
}

impl Cql {
    /// Run a prepared statement once (the driver retries the idempotent ones), noting server warnings.
    async fn run(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        op: &'static str,
    ) -> StoreResult<QueryResult> {
        let result = self
            .session
            .execute_unpaged(statement, values)
            .await
            .map_err(cql_err(op))?;
        if result.warnings().next().is_some() {
            self.warnings.note(op, result.warnings());
        }
        Ok(result)
    }

    async fn batch(
        &self,
        batch: &Batch,
        values: impl scylla::serialize::batch::BatchValues,
        op: &'static str,
    ) -> StoreResult<()> {
        let result = self
            .session
            .batch(batch, values)
            .await
            .map_err(cql_err(op))?;
        if result.warnings().next().is_some() {
            self.warnings.note(op, result.warnings());
        }
        Ok(())
    }

    /// Run a lightweight transaction; whether it applied.
    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        op: &'static str,
    ) -> StoreResult<bool> {
        let result = self.run(statement, values, op).await?;
        let row = rows(result, op)?
            .maybe_first_row::<Row>()
            .map_err(cql_err(op))?;
        match row.and_then(|r| r.columns.into_iter().next().flatten()) {
            Some(CqlValue::Boolean(applied)) => Ok(applied),
            other => Err(StoreError::failed(format!(
                "{op}: a lightweight transaction answered without [applied] ({other:?})"
            ))),
        }
    }

    /// Run every future, some at once; the first error.
    async fn all<F>(&self, futures: Vec<F>) -> StoreResult<()>
    where
        F: std::future::Future<Output = StoreResult<()>>,
    {
        stream::iter(futures)
            .buffer_unordered(CONCURRENCY)
            .try_for_each(|()| async { Ok(()) })
            .await
    }
}

#[async_trait]
impl QueueBackend for Cql {
    async fn append(&self, rows: &[LogRow]) -> StoreResult<()> {
        let writes = rows
            .iter()
            .map(|r| async move {
                let slice = cql::slice_of(r.pos, cql::LOG_SLICE_US);
                self.run(
                    &self.st.log_insert,
                    (r.shard, slice, r.pos, r.id.as_str(), r.lsn, r.floor, r.enq),
                    "queueing a task",
                )
                .await
                .map(drop)
            })
            .collect();
        self.all(writes).await
    }

    async fn request(&self, id: &str, lsn: i64) -> StoreResult<()> {
        // Timestamped with the LSN: the largest LSN asked for wins, whatever order the writes arrive in.
        self.run(
            &self.st.task_request,
            (lsn, cql::DONE_TTL_SECONDS, lsn, id),
            "queueing a task",
        )
        .await
        .map(drop)
    }

    async fn mark(&self, marks: &[Mark]) -> StoreResult<()> {
        let mut writes = Vec::new();
        for m in marks {
            for (st, v) in [
                (&self.st.floor_min, m.floor),
                (&self.st.oldest_min, m.oldest),
            ] {
                if let Some(v) = v {
                    let (level, slice) = (m.level, m.slice);
                    writes.push(async move {
                        self.run(
                            st,
                            (cql::min_timestamp(v), v, level, slice),
                            "queueing a task",
                        )
                        .await
                        .map(drop)
                    });
                }
            }
        }
        self.all(writes).await
    }

    async fn read_log(
        &self,
        shard: i32,
        slice: i64,
        from: i64,
        to: i64,
        limit: usize,
    ) -> StoreResult<Vec<LogRow>> {
        let op = "reading the queue";
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let r = self
            .run(&self.st.log_read, (shard, slice, from, to, limit), op)
            .await?;
        let mut out = Vec::new();
        for row in rows(r, op)?
            .rows::<(i64, String, Option<i64>, Option<i64>, Option<i64>)>()
            .map_err(cql_err(op))?
        {
            let (pos, id, lsn, floor, enq) = row.map_err(cql_err(op))?;
            out.push(LogRow {
                shard,
                pos,
                id,
                lsn,
                floor,
                enq,
            });
        }
        Ok(out)
    }

    async fn read_task(&self, id: &str) -> StoreResult<TaskRead> {
        let op = "reading a task";
        let r = self.run(&self.st.task_read, (id,), op).await?;
        type TaskRow = (
            Option<i64>,
            Option<i64>,
            Option<bool>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i32>,
            Option<i64>,
        );
        let Some(row) = rows(r, op)?
            .maybe_first_row::<TaskRow>()
            .map_err(cql_err(op))?
        else {
            return Ok(TaskRead::default());
        };
        let (req_lsn, ver, pending, done_lsn, floor, enq, until, not_before, attempts, claim_lsn) =
            row;
        Ok(TaskRead {
            req_lsn,
            state: ver.map(|ver| TaskState {
                ver,
                pending: pending.unwrap_or(false),
                done_lsn,
                floor: floor.unwrap_or(0),
                enq: enq.unwrap_or(0),
                lease_until_ms: until.unwrap_or(0),
                not_before_ms: not_before.unwrap_or(0),
                attempts: attempts.unwrap_or(0),
                claim_lsn: claim_lsn.unwrap_or(0),
            }),
        })
    }

    async fn cas_task(
        &self,
        id: &str,
        expect: Option<i64>,
        s: &TaskState,
        ttl_s: i32,
    ) -> StoreResult<bool> {
        self.lwt(
            &self.st.task_cas,
            (
                ttl_s,
                s.ver,
                s.pending,
                s.done_lsn,
                s.floor,
                s.enq,
                s.lease_until_ms,
                s.not_before_ms,
                s.attempts,
                s.claim_lsn,
                id,
                expect,
            ),
            "claiming or closing a task",
        )
        .await
    }

    async fn holders(&self) -> StoreResult<Vec<HolderRow>> {
        let op = "reading the queue's claimers";
        let r = self.run(&self.st.holders_read, (), op).await?;
        let mut out = Vec::new();
        type HRow = (
            String,
            Option<i64>,
            Option<Vec<i64>>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        );
        for row in rows(r, op)?.rows::<HRow>().map_err(cql_err(op))? {
            let (holder, reading_to, heads, floor, oldest, until) = row.map_err(cql_err(op))?;
            out.push(HolderRow {
                holder,
                reading_to: reading_to.unwrap_or(0),
                heads: heads.unwrap_or_default(),
                floor,
                oldest,
                until: until.unwrap_or(0),
            });
        }
        Ok(out)
    }

    async fn put_holder(&self, h: &HolderRow) -> StoreResult<()> {
        self.run(
            &self.st.holder_put,
            (
                h.holder.as_str(),
                h.reading_to,
                &h.heads,
                h.floor,
                h.oldest,
                h.until,
                cql::HOLDER_TTL_SECONDS,
            ),
            "publishing the queue's heads",
        )
        .await
        .map(drop)
    }

    async fn read_marks(&self, level: i8, from: i64, to: i64) -> StoreResult<Vec<Mark>> {
        let op = "reading the queue's floors";
        let r = self
            .run(&self.st.floors_read, (level, from, to), op)
            .await?;
        let mut out = Vec::new();
        for row in rows(r, op)?
            .rows::<(i64, Option<i64>, Option<i64>)>()
            .map_err(cql_err(op))?
        {
            let (slice, floor, oldest) = row.map_err(cql_err(op))?;
            out.push(Mark {
                level,
                slice,
                floor,
                oldest,
            });
        }
        Ok(out)
    }

    async fn add_counts(&self, shard: i32, d: Counts) -> StoreResult<()> {
        self.run(
            &self.st.counts_add,
            (
                scylla::value::Counter(d.events),
                scylla::value::Counter(d.open),
                scylla::value::Counter(d.claimed),
                shard,
            ),
            "counting the queue",
        )
        .await
        .map(drop)
    }

    async fn counts(&self) -> StoreResult<Counts> {
        let op = "reading the queue's size";
        let r = self.run(&self.st.counts_read, (), op).await?;
        let mut c = Counts::default();
        type CRow = (
            Option<scylla::value::Counter>,
            Option<scylla::value::Counter>,
            Option<scylla::value::Counter>,
        );
        for row in rows(r, op)?.rows::<CRow>().map_err(cql_err(op))? {
            let (e, o, cl) = row.map_err(cql_err(op))?;
            c.add(Counts {
                events: e.map_or(0, |c| c.0),
                open: o.map_or(0, |c| c.0),
                claimed: cl.map_or(0, |c| c.0),
            });
        }
        Ok(c)
    }

    async fn retire_log(&self, shard: i32, slice: i64) -> StoreResult<()> {
        self.run(
            &self.st.log_retire,
            (shard, slice),
            "retiring the queue's log",
        )
        .await
        .map(drop)
    }

    async fn retire_marks(&self, level: i8, from: i64, to: i64) -> StoreResult<()> {
        self.run(
            &self.st.floors_retire,
            (cql::MIN_BASE, level, from, to),
            "retiring the queue's floors",
        )
        .await
        .map(drop)
    }

    async fn get_start(&self) -> StoreResult<Option<i64>> {
        let op = "reading the queue's start";
        let r = self.run(&self.st.get_meta, (QUEUE_START_META,), op).await?;
        let v = rows(r, op)?
            .maybe_first_row::<(Option<Vec<u8>>,)>()
            .map_err(cql_err(op))?
            .and_then(|(v,)| v);
        match v {
            None => Ok(None),
            Some(b) => <[u8; 8]>::try_from(b.as_slice())
                .map(|b| Some(i64::from_be_bytes(b)))
                .map_err(|_| {
                    StoreError::Corrupt(format!(
                        "meta '{QUEUE_START_META}' holds {} bytes, not 8",
                        b.len()
                    ))
                }),
        }
    }

    async fn put_start(&self, pos: i64) -> StoreResult<()> {
        // Timestamped with the position: the furthest start wins.
        self.run(
            &self.st.put_start,
            (QUEUE_START_META, pos.to_be_bytes().as_slice(), pos),
            "recording the queue's start",
        )
        .await
        .map(drop)
    }
}

/// The ScyllaDB / Cassandra [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

struct Inner {
    keyspace: String,
    queue: CqlQueue<Cql>,
    registered: Registered,
}

/// Keys this process knows are in the key index (it read or wrote them there), so that the replication
/// stream, which asks for every key a changed row maps to, does not wait for a cluster read each time.
/// Only "yes" is remembered: a key removed by another process still answers yes here, which costs one
/// refresh that finds the key is not cached; "no" is always asked (another process may cache the key).
/// Bounded: a shard that fills up is emptied.
struct Registered {
    shards: Vec<Mutex<std::collections::HashSet<String>>>,
}

/// Keys remembered per shard of [`Registered`] (16 shards).
const REGISTERED_PER_SHARD: usize = 16_384;

impl Registered {
    fn new() -> Registered {
        Registered {
            shards: (0..16).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        let i = cql::bucket_of(key) as usize % self.shards.len();
        // A set of plain strings: a panic cannot leave it half-changed.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contains(&self, key: &str) -> bool {
        self.shard(key).contains(key)
    }

    fn insert(&self, key: &str) {
        let mut shard = self.shard(key);
        if shard.len() >= REGISTERED_PER_SHARD {
            shard.clear();
        }
        shard.insert(key.to_owned());
    }

    fn remove(&self, key: &str) {
        self.shard(key).remove(key);
    }
}

impl std::fmt::Debug for ScyllaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaStore")
            .field("keyspace", &self.inner.keyspace)
            .finish_non_exhaustive()
    }
}

impl ScyllaStore {
    /// Connect, check the schema (creating it first when `config.init`), and prepare every statement.
    pub async fn open(config: &ScyllaConfig) -> StoreResult<ScyllaStore> {
        if config.init {
            init_schema(config).await?;
        }
        let session = connect(config).await?;
        let ks = &config.keyspace;
        check_schema(&session, ks).await?;
        let st = prepare(&session, ks).await?;
        tracing::info!(keyspace = %ks, nodes = %config.nodes.join(","), consistency = config.consistency.name(), "Opened the scylla store.");
        Ok(ScyllaStore {
            inner: Arc::new(Inner {
                keyspace: ks.clone(),
                queue: CqlQueue::new(Cql {
                    session,
                    st,
                    warnings: Warnings::default(),
                }),
                registered: Registered::new(),
            }),
        })
    }

    fn c(&self) -> &Cql {
        self.inner.queue.backend()
    }

    fn st(&self) -> &Prepared {
        &self.c().st
    }

    /// The keyspace this store uses.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    /// The server warnings seen so far, by kind, with their counts.
    pub fn warnings(&self) -> Vec<(String, u64)> {
        self.c().warnings.totals()
    }

    async fn index_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.c()
            .batch(
                &self.st().index,
                ((primer, key), (primer, key)),
                "indexing a key",
            )
            .await
    }

    /// The LSN of `key`'s entry, from its write time (no value transferred).
    async fn stored_lsn(&self, key: &str) -> StoreResult<Option<Lsn>> {
        let op = "reading an entry's LSN";
        let r = self.c().run(&self.st().entry_writetime, (key,), op).await?;
        let row = rows(r, op)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(cql_err(op))?;
        match row.and_then(|(ts,)| ts) {
            Some(ts) => Ok(Some(cql::timestamp_lsn(ts)?)),
            None => Ok(None),
        }
    }

    async fn write_entry(&self, primer: &str, key: &str, entry: &Entry) -> StoreResult<Stored> {
        if key.is_empty() {
            return Err(StoreError::failed("store_result: the key is empty"));
        }
        let ts = cql::lsn_timestamp(entry.lsn)?;
        let ttl = cql::ttl_seconds(entry.expires_at_ms, cql::now_ms());
        // Indexed first: an entry is never stored without being found by `keys` and `is_registered`.
        self.index_key(primer, key).await?;
        self.c()
            .run(
                &self.st().put_entry,
                (key, cql::ENTRY_LAYOUT.encode(entry), ts, ttl),
                "storing an entry",
            )
            .await?;
        match self.stored_lsn(key).await? {
            Some(stored) if stored > entry.lsn => Ok(Stored::KeptNewer(stored)),
            _ => Ok(Stored::Written),
        }
    }
}

fn rows(
    result: QueryResult,
    op: &'static str,
) -> StoreResult<scylla::response::query_result::QueryRowsResult> {
    result.into_rows_result().map_err(cql_err(op))
}

async fn check_schema(session: &Session, ks: &str) -> StoreResult<()> {
    let statements = Statements::new(ks);
    let r = session
        .query_unpaged(statements.list_tables.clone(), (ks,))
        .await
        .map_err(cql_err("reading the schema"))?;
    let mut present = Vec::new();
    for row in rows(r, "reading the schema")?
        .rows::<(String,)>()
        .map_err(cql_err("reading the schema"))?
    {
        present.push(row.map_err(cql_err("reading the schema"))?.0);
    }
    let r = session
        .query_unpaged(statements.get_meta.clone(), (SCHEMA_META,))
        .await
        .map_err(cql_err("reading the schema version"))?;
    let version = rows(r, "reading the schema version")?
        .maybe_first_row::<(Option<Vec<u8>>,)>()
        .map_err(cql_err("reading the schema version"))?
        .and_then(|(v,)| v);
    if let Some(v) = &version
        && v != SCHEMA_VERSION.as_bytes()
    {
        return Err(StoreError::failed(format!(
            "the scylla store's keyspace '{ks}' was created for '{}', but this kck needs '{SCHEMA_VERSION}': \
             use another keyspace, or drop this one and run `kck store init`",
            String::from_utf8_lossy(v)
        )));
    }
    let missing: Vec<&str> = TABLES
        .iter()
        .copied()
        .filter(|t| !present.iter().any(|p| p == t))
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::failed(format!(
            "the scylla store's keyspace '{ks}' lacks table(s) {}: create them with `kck store init --config FILE` \
             (or set store.init: true)",
            missing.join(", ")
        )));
    }
    match version {
        Some(_) => Ok(()),
        None => Err(StoreError::failed(format!(
            "the scylla store's keyspace '{ks}' has no schema version: run `kck store init --config FILE` \
             (or set store.init: true)"
        ))),
    }
}

async fn prepare(session: &Session, ks: &str) -> StoreResult<Prepared> {
    let text = Statements::new(ks);
    let p = |q: String, idempotent: bool| async move {
        let mut st = session
            .prepare(q.clone())
            .await
            .map_err(|e| StoreError::backend(format!("preparing `{q}`"), e))?;
        st.set_is_idempotent(idempotent);
        Ok::<PreparedStatement, StoreError>(st)
    };
    let batch = |a: PreparedStatement, b: PreparedStatement| {
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(a);
        batch.append_statement(b);
        batch.set_is_idempotent(true);
        batch
    };
    Ok(Prepared {
        get_entry: p(text.get_entry, true).await?,
        entry_writetime: p(text.entry_writetime, true).await?,
        // Its timestamp is explicit, so a repeat writes the same cell.
        put_entry: p(text.put_entry, true).await?,
        delete_entry: p(text.delete_entry, true).await?,
        index: batch(
            p(text.index_key, true).await?,
            p(text.index_key_reverse, true).await?,
        ),
        unindex: batch(
            p(text.unindex_key, true).await?,
            p(text.unindex_key_reverse, true).await?,
        ),
        is_registered: p(text.is_registered, true).await?,
        keys_first: p(text.keys_first, true).await?,
        keys_after: p(text.keys_after, true).await?,
        log_insert: p(text.log_insert, true).await?,
        log_read: p(text.log_read, true).await?,
        log_retire: p(text.log_retire, true).await?,
        task_request: p(text.task_request, true).await?,
        task_read: p(text.task_read, true).await?,
        // Lightweight transactions are not idempotent: a retried one may report the outcome of the first.
        task_cas: p(text.task_cas, false).await?,
        floor_min: p(text.floor_min, true).await?,
        oldest_min: p(text.oldest_min, true).await?,
        floors_read: p(text.floors_read, true).await?,
        floors_retire: p(text.floors_retire, true).await?,
        holder_put: p(text.holder_put, true).await?,
        holders_read: p(text.holders_read, true).await?,
        // Counter updates are not idempotent either (a repeat counts twice).
        counts_add: p(text.counts_add, false).await?,
        counts_read: p(text.counts_read, true).await?,
        get_meta: p(text.get_meta, true).await?,
        put_meta: p(text.put_meta, true).await?,
        put_start: p(
            format!("INSERT INTO {ks}.meta (name, value) VALUES (?, ?) USING TIMESTAMP ?"),
            true,
        )
        .await?,
        named_lease_insert: p(text.named_lease_insert, false).await?,
        named_lease_renew: p(text.named_lease_renew, false).await?,
        named_lease_release: p(text.named_lease_release, false).await?,
    })
}

#[async_trait]
impl Store for ScyllaStore {
    async fn get(&self, key: &str) -> StoreResult<Option<Entry>> {
        if key.is_empty() {
            return Ok(None);
        }
        let r = self.c().run(&self.st().get_entry, (key,), "get").await?;
        let row = rows(r, "get")?
            .maybe_first_row::<(Option<Vec<u8>>,)>()
            .map_err(cql_err("get"))?;
        match row.and_then(|(b,)| b) {
            Some(bytes) => Ok(Some(cql::ENTRY_LAYOUT.decode(key, &bytes)?)),
            None => Ok(None),
        }
    }

    async fn is_registered(&self, key: &str) -> StoreResult<bool> {
        if key.is_empty() {
            return Ok(false);
        }
        if self.inner.registered.contains(key) {
            return Ok(true);
        }
        let r = self
            .c()
            .run(&self.st().is_registered, (key,), "is_registered")
            .await?;
        let found = rows(r, "is_registered")?.rows_num() > 0;
        if found {
            self.inner.registered.insert(key);
        }
        Ok(found)
    }

    async fn register_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        if key.is_empty() || primer.is_empty() {
            return Err(StoreError::failed(
                "register_key: the primer and the key must not be empty",
            ));
        }
        self.index_key(primer, key).await
    }

    async fn store_result(&self, primer: &str, key: &str, entry: Entry) -> StoreResult<Stored> {
        self.write_entry(primer, key, &entry).await
    }

    async fn remove_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        if key.is_empty() || primer.is_empty() {
            return Ok(());
        }
        self.inner.registered.remove(key);
        // Deleted at the entry's own timestamp: shadows exactly what is stored, and any later entry with a
        // higher LSN is visible again.
        let r = self
            .c()
            .run(&self.st().entry_writetime, (key,), "remove_key")
            .await?;
        let ts = rows(r, "remove_key")?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(cql_err("remove_key"))?
            .and_then(|(ts,)| ts);
        if let Some(ts) = ts {
            self.c()
                .run(&self.st().delete_entry, (ts, key), "remove_key")
                .await?;
        }
        self.c()
            .batch(
                &self.st().unindex,
                ((primer, key), (primer, key)),
                "remove_key",
            )
            .await
    }

    async fn keys(
        &self,
        primer: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<String>> {
        if limit == 0 || primer.is_empty() {
            return Ok(Vec::new());
        }
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let r = match after {
            None => {
                self.c()
                    .run(&self.st().keys_first, (primer, limit), "keys")
                    .await?
            }
            Some(after) => {
                self.c()
                    .run(&self.st().keys_after, (primer, after, limit), "keys")
                    .await?
            }
        };
        let mut out = Vec::new();
        for row in rows(r, "keys")?
            .rows::<(String,)>()
            .map_err(cql_err("keys"))?
        {
            out.push(row.map_err(cql_err("keys"))?.0);
        }
        Ok(out)
    }

    async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()> {
        self.inner.queue.enqueue(tasks).await
    }

    async fn claim(&self, max: usize, lease: Duration) -> StoreResult<Vec<Claim>> {
        self.inner.queue.claim(max, lease).await
    }

    async fn finish(
        &self,
        claim: &Claim,
        result: Option<(&str, &str, Entry)>,
        follow_up: Vec<Task>,
    ) -> StoreResult<Option<Stored>> {
        let stored = match result {
            Some((primer, key, entry)) => Some(self.write_entry(primer, key, &entry).await?),
            None => None,
        };
        self.inner.queue.finish(claim, follow_up).await?;
        Ok(stored)
    }

    async fn retry(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        self.inner.queue.retry(claim, delay).await
    }

    async fn wait_for_tasks(&self, timeout: Duration) {
        self.inner.queue.wait_for_tasks(timeout).await
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        self.inner.queue.queue_stats().await
    }

    async fn queue_depth(&self) -> StoreResult<u64> {
        self.inner.queue.queue_depth().await
    }

    async fn pending_floor(&self) -> StoreResult<Option<Lsn>> {
        self.inner.queue.pending_floor().await
    }

    async fn get_meta(&self, name: &str) -> StoreResult<Option<Bytes>> {
        let r = self
            .c()
            .run(&self.st().get_meta, (name,), "get_meta")
            .await?;
        let row = rows(r, "get_meta")?
            .maybe_first_row::<(Option<Vec<u8>>,)>()
            .map_err(cql_err("get_meta"))?;
        Ok(row.map(|(v,)| Bytes::from(v.unwrap_or_default())))
    }

    async fn put_meta(&self, name: &str, value: Bytes) -> StoreResult<()> {
        self.c()
            .run(&self.st().put_meta, (name, value.as_ref()), "put_meta")
            .await
            .map(drop)
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        // CQL TTLs are whole seconds: round up, so a lease never ends before it was asked to.
        let ttl_s = i32::try_from(ttl.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
        let row = format!("lease:{name}");
        let holder = holder.as_bytes();
        if self
            .c()
            .lwt(
                &self.st().named_lease_insert,
                (row.as_str(), holder, ttl_s),
                "taking a lease",
            )
            .await?
        {
            return Ok(true);
        }
        // Held: renew it if it is ours.
        self.c()
            .lwt(
                &self.st().named_lease_renew,
                (ttl_s, holder, row.as_str(), holder),
                "renewing a lease",
            )
            .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        let row = format!("lease:{name}");
        self.c()
            .lwt(
                &self.st().named_lease_release,
                (row.as_str(), holder.as_bytes()),
                "releasing a lease",
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KeyspaceReplication;
    use crate::store::conformance;

    /// `KCK_TEST_SCYLLA=host:port` names a ScyllaDB or Cassandra node to run the suite against.
    const ENV: &str = "KCK_TEST_SCYLLA";

    fn test_config(node: &str, keyspace: &str) -> ScyllaConfig {
        ScyllaConfig {
            nodes: node.split(',').map(str::to_owned).collect(),
            keyspace: keyspace.to_owned(),
            replication: KeyspaceReplication::Simple {
                replication_factor: 1,
            },
            consistency: Consistency::Quorum,
            username: std::env::var("KCK_TEST_SCYLLA_USER").ok(),
            password: std::env::var("KCK_TEST_SCYLLA_PASSWORD").ok(),
            tls_ca_file: None,
            init: true,
        }
    }

    fn node() -> Option<String> {
        let node = std::env::var(ENV).ok().filter(|v| !v.is_empty());
        if node.is_none() {
            // Straight to stderr, past the test harness's capture, so that it shows in every run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: set {ENV}=host:9042 to run the Scylla store tests against a node"
            );
        }
        node
    }

    /// The conformance suite on a real cluster, in a fresh keyspace (dropped afterwards); each property
    /// starts from empty tables and a newly opened store. Skipped, and saying so, when no node is given.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite() {
        let Some(node) = node() else { return };
        let keyspace = format!("kck_test_{:x}", cql::now_us());
        let config = test_config(&node, &keyspace);
        init_schema(&config).await.expect("init the test keyspace");
        let admin = connect(&config).await.expect("connect");
        let open = ScyllaConfig {
            init: false,
            ..config.clone()
        };
        let seen: Arc<Mutex<Vec<ScyllaStore>>> = Arc::default();
        let run = conformance::run_all(|| {
            let admin = &admin;
            let keyspace = &keyspace;
            let open = &open;
            let seen = seen.clone();
            async move {
                for table in TABLES {
                    if table != "meta" {
                        admin
                            .query_unpaged(format!("TRUNCATE {keyspace}.{table}"), ())
                            .await
                            .expect("truncate");
                    }
                }
                admin
                    .query_unpaged(
                        format!("DELETE FROM {keyspace}.meta WHERE name IN ('fingerprint', 'binary', 'empty')"),
                        (),
                    )
                    .await
                    .expect("clear meta");
                let store = Box::pin(ScyllaStore::open(open))
                    .await
                    .expect("open the store");
                seen.lock().unwrap().push(store.clone());
                store
            }
        });
        // On the heap: the suite's future is large.
        let outcome =
            futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(Box::pin(run)))
                .await;
        let _ = admin
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
            .await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        let warnings: Vec<(String, u64)> = seen
            .lock()
            .unwrap()
            .iter()
            .flat_map(|s| s.warnings())
            .collect();
        assert!(
            warnings.is_empty(),
            "the server warned about kck's queries: {warnings:?}"
        );
    }

    /// TTLs are clamped to what the server accepts: an entry expiring in 30 years is stored (Cassandra
    /// 4.0 refuses any expiry past 2038-01-19).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_far_expiry_is_stored() {
        let Some(node) = node() else { return };
        let keyspace = format!("kck_test_ttl_{:x}", cql::now_us());
        let store = ScyllaStore::open(&test_config(&node, &keyspace))
            .await
            .expect("open");
        let now = cql::now_ms();
        let entry = Entry {
            value: Bytes::from_static(b"{}"),
            lsn: Lsn(7),
            computed_at_ms: now,
            expires_at_ms: Some(now + 30 * 365 * 86_400_000),
        };
        let stored = store.store_result("p", "p/1", entry.clone()).await;
        let admin = connect(&test_config(&node, &keyspace))
            .await
            .expect("connect");
        let _ = admin
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
            .await;
        assert_eq!(
            stored.expect("a 30-year expiry must be stored"),
            Stored::Written
        );
    }

    /// A data centre the cluster does not have is refused by `kck store init`, naming the ones it has.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn init_names_the_clusters_data_centres() {
        let Some(node) = node() else { return };
        let config = ScyllaConfig {
            replication: KeyspaceReplication::NetworkTopology {
                datacenters: vec![("dc1".into(), 3)],
            },
            ..test_config(&node, &format!("kck_test_dc_{:x}", cql::now_us()))
        };
        let err = init_schema(&config).await.unwrap_err().to_string();
        assert!(
            err.contains(
                "data centre(s) dc1 that the cluster does not have; its data centres are: "
            ),
            "{err}"
        );
    }

    /// Without a node to talk to, connecting fails with a message naming the nodes.
    #[tokio::test]
    async fn an_unreachable_cluster_is_a_clear_error() {
        let config = ScyllaConfig {
            init: false,
            ..test_config("127.0.0.1:1", "kck")
        };
        let err = ScyllaStore::open(&config).await.unwrap_err().to_string();
        assert!(
            err.contains("cannot connect to the scylla store at 127.0.0.1:1"),
            "{err}"
        );
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let err = tls_context(&path).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("no certificate"),
            "{err}"
        );
        let err = tls_context(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn warnings_are_one_kind_whatever_their_numbers() {
        let a = "Read 0 live rows and 1200 tombstone cells for query SELECT * FROM kck.queue_log WHERE shard = 3 LIMIT 32; token 123 (see tombstone_warn_threshold)";
        let b = "Read 2 live rows and 86000 tombstone cells for query SELECT * FROM kck.queue_log WHERE shard = 11 LIMIT 32; token -99 (see tombstone_warn_threshold)";
        assert_eq!(Warnings::kind(a), Warnings::kind(b));
        assert_ne!(Warnings::kind(a), Warnings::kind("Batch is too large"));
        let w = Warnings::default();
        w.note("x", [a, b, a].into_iter());
        w.note("y", std::iter::once("Batch is too large"));
        let totals = w.totals();
        assert_eq!(totals.len(), 2);
        assert!(totals.iter().any(|(_, n)| *n == 3), "{totals:?}");
    }
}
