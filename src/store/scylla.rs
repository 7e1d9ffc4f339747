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
//! - **Enqueue is durable** once every row is written at the configured consistency (`local_quorum` by
//!   default).
//! - **Claims are exclusive while their lease lasts**: a lightweight transaction (Paxos) takes each
//!   task's lease row; two workers cannot both win it.
//! - **Finish is ordered, not atomic**: the result is stored, follow-ups queued, then the finished rows
//!   deleted and the lease dropped. A crash in between leaves the task claimed until its lease runs out,
//!   and then it runs again (at-least-once); nothing is lost.
//! - **Waiting** for tasks polls the cluster ([`POLL`]) and wakes at once for this process's own writes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency as CqlConsistency, SerialConsistency, Statement};
use scylla::value::{CqlValue, Row};
use tokio::sync::Notify;

use super::cql::{
    self, Lease, MicrosClock, OrderRow, QUEUE_BUCKETS, SCHEMA_META, SCHEMA_VERSION, Statements,
    TABLES,
};
use super::{BoxError, Claim, Entry, QueueStats, Store, StoreError, StoreResult, Stored, Task};
use super::{Consistency, ScyllaConfig};
use crate::lsn::Lsn;

/// How often [`Store::wait_for_tasks`] looks at the cluster for work other processes queued.
pub const POLL: Duration = Duration::from_millis(200);
/// Rows of each bucket's `queue_order` a claim reads per round.
const HEAD: i32 = 32;
/// Rounds a claim reads before giving up (so at most `HEAD * ROUNDS` rows per bucket per claim).
const ROUNDS: usize = 16;
/// Rows per page of a scan.
const PAGE: i32 = 1000;
/// Statements run at once by one call (enqueue of a large batch, deletes).
const CONCURRENCY: usize = 64;
/// An order row with no task row is left alone this long (its enqueue may still be writing the task row),
/// then removed by the next claim that sees it.
const ORPHAN_GRACE_US: i64 = 60_000_000;
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
    insert_order: PreparedStatement,
    insert_task: PreparedStatement,
    delete_order: PreparedStatement,
    delete_task: PreparedStatement,
    order_head: PreparedStatement,
    order_after: PreparedStatement,
    task_versions: PreparedStatement,
    bucket_tasks: PreparedStatement,
    bucket_leases: PreparedStatement,
    lease_insert: PreparedStatement,
    lease_take: PreparedStatement,
    lease_release: PreparedStatement,
    lease_retry: PreparedStatement,
    lease_delete: PreparedStatement,
    get_meta: PreparedStatement,
    put_meta: PreparedStatement,
    named_lease_insert: PreparedStatement,
    named_lease_renew: PreparedStatement,
    named_lease_release: PreparedStatement,
}

/// The ScyllaDB / Cassandra [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    keyspace: String,
    st: Prepared,
    clock: MicrosClock,
    /// Woken by this process's enqueues, retries and releases.
    tasks_changed: Notify,
    /// Where claims start reading each bucket's `queue_order` (see [`cql::next_floor`]).
    floors: std::sync::Mutex<Floors>,
    /// Order rows a claim found without their task row, younger than [`ORPHAN_GRACE_US`] (an enqueue
    /// still writing, or one that died half-way): waiting ignores them, or workers would spin on them.
    orphans: std::sync::Mutex<std::collections::HashSet<OrderRow>>,
}

/// Per-bucket scan floors, forgotten every [`cql::FLOOR_RESET`].
struct Floors {
    at: [i64; QUEUE_BUCKETS as usize],
    since: std::time::Instant,
}

impl Floors {
    fn new() -> Floors {
        Floors {
            at: [i64::MIN; QUEUE_BUCKETS as usize],
            since: std::time::Instant::now(),
        }
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
                session,
                keyspace: ks.clone(),
                st,
                clock: MicrosClock::default(),
                tasks_changed: Notify::new(),
                floors: std::sync::Mutex::new(Floors::new()),
                orphans: std::sync::Mutex::new(std::collections::HashSet::new()),
            }),
        })
    }

    fn s(&self) -> &Session {
        &self.inner.session
    }

    fn st(&self) -> &Prepared {
        &self.inner.st
    }

    /// Every row (all pages) that `statement` answers for `values`; `op` names the read in errors.
    async fn all_rows<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow + Send,
        op: &'static str,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata> + Send + Unpin + 'static,
    {
        self.s()
            .execute_iter(statement.clone(), values)
            .await
            .map_err(cql_err(op))?
            .rows_stream::<R>()
            .map_err(cql_err(op))?
            .map_err(cql_err(op))
            .try_collect()
            .await
    }

    /// The keyspace this store uses.
    pub fn keyspace(&self) -> &str {
        &self.inner.keyspace
    }

    async fn index_key(&self, primer: &str, key: &str) -> StoreResult<()> {
        self.s()
            .batch(&self.st().index, ((primer, key), (primer, key)))
            .await
            .map_err(cql_err("indexing a key"))?;
        Ok(())
    }

    /// The LSN of `key`'s entry, from its write time (no value transferred).
    async fn stored_lsn(&self, key: &str) -> StoreResult<Option<Lsn>> {
        let r = self
            .s()
            .execute_unpaged(&self.st().entry_writetime, (key,))
            .await
            .map_err(cql_err("reading an entry's LSN"))?;
        let row = rows(r, "reading an entry's LSN")?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(cql_err("reading an entry's LSN"))?;
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
        self.s()
            .execute_unpaged(
                &self.st().put_entry,
                (key, cql::ENTRY_LAYOUT.encode(entry), ts, ttl),
            )
            .await
            .map_err(cql_err("storing an entry"))?;
        match self.stored_lsn(key).await? {
            Some(stored) if stored > entry.lsn => Ok(Stored::KeptNewer(stored)),
            _ => Ok(Stored::Written),
        }
    }

    /// Writes one row per task (order row first, then task row: a task row is never without its order
    /// row) and returns the rows written.
    async fn enqueue_rows(&self, tasks: &[Task]) -> StoreResult<Vec<OrderRow>> {
        let rows: Vec<OrderRow> = tasks
            .iter()
            .map(|t| OrderRow {
                enqueued_at_us: self.inner.clock.next(),
                id: t.id.clone(),
                lsn: cql::lsn_bigint(t.lsn),
                bucket: cql::bucket_of(&t.id),
            })
            .collect();
        self.for_rows(&rows, &self.st().insert_order, "queueing a task")
            .await?;
        self.for_rows(&rows, &self.st().insert_task, "queueing a task")
            .await?;
        Ok(rows)
    }

    /// Runs `statement` (which binds bucket, id, lsn, enqueued_at_us) for every row, some at once.
    async fn for_rows(
        &self,
        rows: &[OrderRow],
        statement: &PreparedStatement,
        op: &'static str,
    ) -> StoreResult<()> {
        let session = self.s();
        stream::iter(rows.iter().cloned())
            .map(|r: OrderRow| async move {
                session
                    .execute_unpaged(
                        statement,
                        (r.bucket, r.id.as_str(), r.lsn, r.enqueued_at_us),
                    )
                    .await
                    .map(drop)
            })
            .buffer_unordered(CONCURRENCY)
            .map_err(cql_err(op))
            .try_for_each(|_| async { Ok(()) })
            .await
    }

    /// The `queue_tasks` rows of a task: (lsn, enqueued_at_us).
    async fn versions(&self, bucket: i32, id: &str) -> StoreResult<Vec<(i64, i64)>> {
        self.all_rows(&self.st().task_versions, (bucket, id), "reading a task")
            .await
    }

    /// Every lease row of a bucket.
    async fn leases(&self, bucket: i32) -> StoreResult<HashMap<String, Lease>> {
        let rows: Vec<LeaseRow> = self
            .all_rows(&self.st().bucket_leases, (bucket,), "reading claims")
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, until, not_before, attempts, claim_lsn)| {
                (
                    id,
                    Lease {
                        lease_until_ms: until.unwrap_or(0),
                        not_before_ms: not_before.unwrap_or(0),
                        attempts: attempts.unwrap_or(0),
                        claim_lsn: claim_lsn.unwrap_or(0),
                    },
                )
            })
            .collect())
    }

    /// The scan floor of a bucket (all reset every [`cql::FLOOR_RESET`]).
    fn floor(&self, bucket: i32) -> i64 {
        let mut floors = self.inner.floors.lock().unwrap_or_else(|e| e.into_inner());
        if floors.since.elapsed() >= cql::FLOOR_RESET {
            *floors = Floors::new();
        }
        floors.at[bucket as usize]
    }

    /// Raise a bucket's floor after a scan from `floor` whose first row was `first`.
    fn raise_floor(&self, bucket: i32, floor: i64, first: Option<&OrderRow>) {
        let mut floors = self.inner.floors.lock().unwrap_or_else(|e| e.into_inner());
        let at = &mut floors.at[bucket as usize];
        // Only after a scan that started at the current floor (a reset may have happened meanwhile).
        if *at == floor {
            *at = cql::next_floor(floor, first.map(|r| r.enqueued_at_us), cql::now_us());
        }
    }

    /// One page of a bucket's `queue_order`: from the bucket's scan floor, or after `after`.
    async fn order_page(
        &self,
        bucket: i32,
        after: Option<&OrderRow>,
    ) -> StoreResult<Vec<OrderRow>> {
        let op = "reading the queue";
        let floor = self.floor(bucket);
        let result = match after {
            None => {
                self.s()
                    .execute_unpaged(&self.st().order_head, (bucket, floor, HEAD))
                    .await
            }
            Some(a) => {
                self.s()
                    .execute_unpaged(
                        &self.st().order_after,
                        (bucket, a.enqueued_at_us, a.id.as_str(), a.lsn, HEAD),
                    )
                    .await
            }
        }
        .map_err(cql_err(op))?;
        let rows = rows(result, op)?;
        let mut out = Vec::new();
        for row in rows.rows::<(i64, String, i64)>().map_err(cql_err(op))? {
            let (enqueued_at_us, id, lsn) = row.map_err(cql_err(op))?;
            out.push(OrderRow {
                enqueued_at_us,
                id,
                lsn,
                bucket,
            });
        }
        if after.is_none() {
            self.raise_floor(bucket, floor, out.first());
        }
        Ok(out)
    }

    /// Runs a lightweight transaction; returns whether it applied.
    async fn lwt(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        op: &'static str,
    ) -> StoreResult<bool> {
        let result = self
            .s()
            .execute_unpaged(statement, values)
            .await
            .map_err(cql_err(op))?;
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

    /// Delete the given rows of a task: task rows first, then their order rows (an order row without a
    /// task row is harmless and cleaned up; the reverse would hide a pending task).
    async fn delete_rows(&self, rows: &[OrderRow]) -> StoreResult<()> {
        self.for_rows(rows, &self.st().delete_task, "removing a task")
            .await?;
        self.for_rows(rows, &self.st().delete_order, "removing a task")
            .await
    }

    fn orphans(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<OrderRow>> {
        // A set of plain rows that no panic can leave half-updated.
        self.inner.orphans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether some task looks claimable now (for waiting; a claim may still lose the race for it).
    async fn looks_claimable(&self) -> StoreResult<bool> {
        let now = cql::now_ms();
        let buckets = stream::iter(0..QUEUE_BUCKETS)
            .map(|b| async move {
                let head = self.order_page(b, None).await?;
                if head.is_empty() {
                    return Ok::<bool, StoreError>(false);
                }
                let leases = self.leases(b).await?;
                let orphans = self.orphans();
                Ok(head.iter().any(|r| {
                    !orphans.contains(r) && leases.get(&r.id).is_none_or(|l| l.is_claimable(now))
                }))
            })
            .buffer_unordered(QUEUE_BUCKETS as usize)
            .try_collect::<Vec<bool>>()
            .await?;
        Ok(buckets.into_iter().any(|b| b))
    }
}

/// A `queue_leases` row as read: id, lease_until_ms, not_before_ms, attempts, claim_lsn.
type LeaseRow = (String, Option<i64>, Option<i64>, Option<i32>, Option<i64>);

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
    let r = session
        .query_unpaged(statements.get_meta, (SCHEMA_META,))
        .await
        .map_err(cql_err("reading the schema version"))?;
    let version = rows(r, "reading the schema version")?
        .maybe_first_row::<(Option<Vec<u8>>,)>()
        .map_err(cql_err("reading the schema version"))?
        .and_then(|(v,)| v);
    match version {
        Some(v) if v == SCHEMA_VERSION.as_bytes() => Ok(()),
        Some(v) => Err(StoreError::failed(format!(
            "the scylla store's keyspace '{ks}' was created for '{}', but this kck needs '{SCHEMA_VERSION}': \
             use another keyspace, or drop this one and run `kck store init`",
            String::from_utf8_lossy(&v)
        ))),
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
    let paged = |mut st: PreparedStatement| {
        st.set_page_size(PAGE);
        st
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
        insert_order: p(text.insert_order, true).await?,
        insert_task: p(text.insert_task, true).await?,
        delete_order: p(text.delete_order, true).await?,
        delete_task: p(text.delete_task, true).await?,
        order_head: p(text.order_head, true).await?,
        order_after: p(text.order_after, true).await?,
        task_versions: paged(p(text.task_versions, true).await?),
        bucket_tasks: paged(p(text.bucket_tasks, true).await?),
        bucket_leases: paged(p(text.bucket_leases, true).await?),
        // Lightweight transactions are not idempotent: a retried one may report the outcome of the first.
        lease_insert: p(text.lease_insert, false).await?,
        lease_take: p(text.lease_take, false).await?,
        lease_release: p(text.lease_release, false).await?,
        lease_retry: p(text.lease_retry, false).await?,
        lease_delete: p(text.lease_delete, false).await?,
        get_meta: p(text.get_meta, true).await?,
        put_meta: p(text.put_meta, true).await?,
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
        let r = self
            .s()
            .execute_unpaged(&self.st().get_entry, (key,))
            .await
            .map_err(cql_err("get"))?;
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
        let r = self
            .s()
            .execute_unpaged(&self.st().is_registered, (key,))
            .await
            .map_err(cql_err("is_registered"))?;
        Ok(rows(r, "is_registered")?.rows_num() > 0)
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
        // Deleted at the entry's own timestamp: shadows exactly what is stored, and any later entry with a
        // higher LSN is visible again.
        let r = self
            .s()
            .execute_unpaged(&self.st().entry_writetime, (key,))
            .await
            .map_err(cql_err("remove_key"))?;
        let ts = rows(r, "remove_key")?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(cql_err("remove_key"))?
            .and_then(|(ts,)| ts);
        if let Some(ts) = ts {
            self.s()
                .execute_unpaged(&self.st().delete_entry, (ts, key))
                .await
                .map_err(cql_err("remove_key"))?;
        }
        self.s()
            .batch(&self.st().unindex, ((primer, key), (primer, key)))
            .await
            .map_err(cql_err("remove_key"))?;
        Ok(())
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
                self.s()
                    .execute_unpaged(&self.st().keys_first, (primer, limit))
                    .await
            }
            Some(after) => {
                self.s()
                    .execute_unpaged(&self.st().keys_after, (primer, after, limit))
                    .await
            }
        }
        .map_err(cql_err("keys"))?;
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
        if tasks.is_empty() {
            return Ok(());
        }
        self.enqueue_rows(&tasks).await?;
        self.inner.tasks_changed.notify_waiters();
        Ok(())
    }

    async fn claim(&self, max: usize, lease: Duration) -> StoreResult<Vec<Claim>> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let now = cql::now_ms();
        let now_us = cql::now_us();
        let until = cql::lease_until(now, lease);
        let mut cursors: Vec<Option<OrderRow>> = vec![None; QUEUE_BUCKETS as usize];
        let mut open: Vec<i32> = (0..QUEUE_BUCKETS).collect();
        let mut leases: HashMap<i32, HashMap<String, Lease>> = HashMap::new();
        let mut tried = std::collections::HashSet::new();
        for _ in 0..ROUNDS {
            if open.is_empty() || out.len() >= max {
                break;
            }
            // The next page of every bucket that may hold more, and (once) its leases.
            let pages = stream::iter(open.clone())
                .map(|b| {
                    let cursor = cursors[b as usize].clone();
                    let need_leases = !leases.contains_key(&b);
                    async move {
                        let page = self.order_page(b, cursor.as_ref()).await?;
                        let l = if need_leases && !page.is_empty() {
                            Some(self.leases(b).await?)
                        } else {
                            None
                        };
                        Ok::<_, StoreError>((b, page, l))
                    }
                })
                .buffer_unordered(QUEUE_BUCKETS as usize)
                .try_collect::<Vec<_>>()
                .await?;
            let mut heads = Vec::new();
            open.clear();
            for (b, page, l) in pages {
                if let Some(l) = l {
                    leases.insert(b, l);
                }
                if page.len() == HEAD as usize {
                    open.push(b);
                }
                cursors[b as usize] = page.last().cloned();
                heads.push(page);
            }
            for row in cql::merge_heads(heads) {
                if out.len() >= max {
                    break;
                }
                if !tried.insert(row.id.clone()) {
                    continue;
                }
                let held = leases
                    .get(&row.bucket)
                    .and_then(|l| l.get(&row.id))
                    .copied();
                if held.is_some_and(|l| !l.is_claimable(now)) {
                    continue;
                }
                let versions = self.versions(row.bucket, &row.id).await?;
                let Some((lsn, first_us)) = cql::coalesce(&versions) else {
                    if now_us - row.enqueued_at_us > ORPHAN_GRACE_US {
                        self.for_rows(
                            std::slice::from_ref(&row),
                            &self.st().delete_order,
                            "cleaning the queue",
                        )
                        .await?;
                        self.orphans().remove(&row);
                    } else {
                        let mut orphans = self.orphans();
                        orphans.retain(|r| now_us - r.enqueued_at_us <= 2 * ORPHAN_GRACE_US);
                        orphans.insert(row.clone());
                    }
                    continue;
                };
                {
                    // Its task row has arrived: waiting may count it again.
                    let mut orphans = self.orphans();
                    if !orphans.is_empty() {
                        orphans.remove(&row);
                    }
                }
                let claim_lsn = cql::lsn_bigint(lsn);
                let (applied, attempts) = match held {
                    None => (
                        self.lwt(
                            &self.st().lease_insert,
                            (row.bucket, row.id.as_str(), until, claim_lsn),
                            "claiming a task",
                        )
                        .await?,
                        0,
                    ),
                    Some(l) => {
                        let attempts = l.next_attempts();
                        let applied = self
                            .lwt(
                                &self.st().lease_take,
                                (
                                    until,
                                    attempts,
                                    claim_lsn,
                                    row.bucket,
                                    row.id.as_str(),
                                    l.lease_until_ms,
                                    l.not_before_ms,
                                    l.attempts,
                                    l.claim_lsn,
                                ),
                                "claiming a task",
                            )
                            .await?;
                        (applied, attempts)
                    }
                };
                if applied {
                    out.push(Claim {
                        id: row.id.clone(),
                        lsn,
                        attempts: u32::try_from(attempts).unwrap_or(0),
                        enqueued_at_ms: first_us.div_euclid(1000),
                    });
                }
            }
        }
        Ok(out)
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
        // Follow-ups first, so that a crash after this point cannot lose them; their own rows are not
        // removed below even when one has the claim's id (it is then a new task).
        let added = self.enqueue_rows(&follow_up).await?;
        let bucket = cql::bucket_of(&claim.id);
        let versions = self.versions(bucket, &claim.id).await?;
        let fresh = |lsn: i64, enq: i64| {
            added
                .iter()
                .any(|r| r.id == claim.id && r.lsn == lsn && r.enqueued_at_us == enq)
        };
        let mut done = Vec::new();
        let mut raised = false;
        for (lsn, enq) in versions {
            if fresh(lsn, enq) {
                continue;
            }
            if cql::bigint_lsn(lsn) <= claim.lsn {
                done.push(OrderRow {
                    enqueued_at_us: enq,
                    id: claim.id.clone(),
                    lsn,
                    bucket,
                });
            } else {
                raised = true;
            }
        }
        let attempts = i32::try_from(claim.attempts).unwrap_or(i32::MAX);
        let claim_lsn = cql::lsn_bigint(claim.lsn);
        if raised {
            // Raised while claimed: it stays queued, whole (its older rows keep its place in line and its
            // enqueue time; the next finish removes them), and is released at once.
            self.lwt(
                &self.st().lease_release,
                (bucket, claim.id.as_str(), attempts, claim_lsn),
                "releasing a claim",
            )
            .await?;
        } else {
            self.delete_rows(&done).await?;
            self.lwt(
                &self.st().lease_delete,
                (bucket, claim.id.as_str(), attempts, claim_lsn),
                "releasing a claim",
            )
            .await?;
        }
        let left = raised;
        if left || !follow_up.is_empty() {
            self.inner.tasks_changed.notify_waiters();
        }
        Ok(stored)
    }

    async fn retry(&self, claim: &Claim, delay: Duration) -> StoreResult<()> {
        let bucket = cql::bucket_of(&claim.id);
        let not_before = cql::now_ms()
            .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
            .max(1);
        let attempts = i32::try_from(claim.attempts).unwrap_or(i32::MAX);
        self.lwt(
            &self.st().lease_retry,
            (
                not_before,
                attempts.saturating_add(1),
                bucket,
                claim.id.as_str(),
                attempts,
                cql::lsn_bigint(claim.lsn),
            ),
            "retrying a task",
        )
        .await?;
        self.inner.tasks_changed.notify_waiters();
        Ok(())
    }

    async fn wait_for_tasks(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so that an enqueue by this process after the look wakes us.
            let notified = self.inner.tasks_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.looks_claimable().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::report::Chain(&error), "Cannot look at the queue; waiting.")
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return;
            }
            let step = (deadline - now).min(POLL);
            tokio::select! {
                _ = &mut notified => return,
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        let now = cql::now_ms();
        let per_bucket = stream::iter(0..QUEUE_BUCKETS)
            .map(|b| async move {
                let tasks: Vec<(String, i64)> = self
                    .all_rows(&self.st().bucket_tasks, (b,), "queue_stats")
                    .await?;
                let mut pending: HashMap<String, i64> = HashMap::new();
                for (id, enq) in tasks {
                    let e = pending.entry(id).or_insert(enq);
                    *e = (*e).min(enq);
                }
                let claimed = if pending.is_empty() {
                    0
                } else {
                    self.leases(b)
                        .await?
                        .iter()
                        .filter(|(id, l)| l.is_live(now) && pending.contains_key(*id))
                        .count() as u64
                };
                let oldest = pending.values().min().copied();
                Ok::<_, StoreError>((pending.len() as u64, claimed, oldest))
            })
            .buffer_unordered(QUEUE_BUCKETS as usize)
            .try_collect::<Vec<_>>()
            .await?;
        let mut stats = QueueStats::default();
        for (depth, claimed, oldest) in per_bucket {
            stats.depth += depth;
            stats.claimed += claimed;
            stats.oldest_enqueued_at_ms = match (stats.oldest_enqueued_at_ms, oldest) {
                (a, None) => a,
                (None, Some(o)) => Some(o.div_euclid(1000)),
                (Some(a), Some(o)) => Some(a.min(o.div_euclid(1000))),
            };
        }
        Ok(stats)
    }

    async fn get_meta(&self, name: &str) -> StoreResult<Option<Bytes>> {
        let r = self
            .s()
            .execute_unpaged(&self.st().get_meta, (name,))
            .await
            .map_err(cql_err("get_meta"))?;
        let row = rows(r, "get_meta")?
            .maybe_first_row::<(Option<Vec<u8>>,)>()
            .map_err(cql_err("get_meta"))?;
        Ok(row.map(|(v,)| Bytes::from(v.unwrap_or_default())))
    }

    async fn put_meta(&self, name: &str, value: Bytes) -> StoreResult<()> {
        self.s()
            .execute_unpaged(&self.st().put_meta, (name, value.as_ref()))
            .await
            .map_err(cql_err("put_meta"))?;
        Ok(())
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        // CQL TTLs are whole seconds: round up, so a lease never ends before it was asked to.
        let ttl_s = i32::try_from(ttl.as_millis().div_ceil(1000).max(1)).unwrap_or(i32::MAX);
        let row = format!("lease:{name}");
        let holder = holder.as_bytes();
        if self
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
        self.lwt(
            &self.st().named_lease_renew,
            (ttl_s, holder, row.as_str(), holder),
            "renewing a lease",
        )
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        let row = format!("lease:{name}");
        self.lwt(
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

    /// The conformance suite on a real cluster, in a fresh keyspace (dropped afterwards); each property
    /// starts from empty tables. Skipped, and saying so, when no node is given: no CQL server can run on
    /// the machines the suite usually runs on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_conformance_suite() {
        let Some(node) = std::env::var(ENV).ok().filter(|v| !v.is_empty()) else {
            // Straight to stderr, past the test harness's capture, so that it shows in every run.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: set {ENV}=host:9042 to run the Scylla store conformance suite"
            );
            return;
        };
        let keyspace = format!("kck_test_{:x}", cql::now_us());
        let config = test_config(&node, &keyspace);
        init_schema(&config).await.expect("init the test keyspace");
        let admin = connect(&config).await.expect("connect");
        let opened = ScyllaStore::open(&ScyllaConfig {
            init: false,
            ..config.clone()
        })
        .await
        .expect("open the store");
        let run = conformance::run_all(|| {
            let admin = &admin;
            let keyspace = &keyspace;
            let store = opened.clone();
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
                store
            }
        });
        let outcome =
            futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run)).await;
        let _ = admin
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
            .await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
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
}
