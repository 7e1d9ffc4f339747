//! Refresh: recompute cached keys from Postgres and store them with the LSN they reflect.
//!
//! [`Refresher`] owns the Postgres pool and runs primer queries. Workers ([`run_workers`]) claim tasks from
//! the queue and carry them out:
//! - a key task recomputes one key, if it is cached (registered); a key nobody cached is dropped, since
//!   computing values nobody asked for is waste;
//! - a lookup task runs a dependency's lookup query and queues the keys it returns;
//! - a primer task lists one page of the primer's cached keys and queues them (and the next page).
//!
//! Every computation first makes sure the change that triggered it is visible ([`VisibilityClock`]), then
//! runs the primer query as one statement, and labels the result with the visible watermark read before the
//! statement started. The store keeps the newest label. A fetch miss uses [`Refresher::prime`], which runs
//! the query once however many requests miss on the same key at once.
//!
//! The primer query is wrapped so that Postgres builds the JSON (`row_to_json`, `string_agg`): kck stores
//! and serves those bytes as they are.
//!
//! # Choosing what to refresh
//! - **Coalescing.** The queue holds one task per key (see [`crate::queue`]): however many changes hit a
//!   key while its task waits, it is refreshed once, seeing the newest.
//! - **Hot first.** A worker claims up to `refresh.claim_batch` tasks and starts them in order, a few at a
//!   time (`UNITS_AT_ONCE`: queries overlap, and the store records several results in one commit): keys read
//!   recently (most recent first, from [`AccessLog`]), then lookups and primer pages, then keys never read
//!   since boot.
//! - **Cold keys are dropped.** A key nobody read for its primer's `cold_after` is removed instead of
//!   recomputed; its next fetch is a miss.
//! - **Bounded concurrency.** `refresh.workers` workers share a pool of `refresh.pool_size` connections
//!   (their queries hold at most all but two of them, so that fetch misses always find one);
//!   a primer's `concurrency` caps how many of them run its queries at once (a unit waiting for its
//!   primer's permit does not hold up the worker's other units).
//! - **Failures.** A failed task is retried with backoff (100 ms doubling to 30 s) and does not hold a
//!   worker meanwhile, so a primer whose query keeps failing does not block the others; its failures and
//!   last error are kept per primer ([`Refresher::primer_health`]) and logged. A task whose query
//!   Postgres refused `refresh.park_after` times in a row is parked ([`Store::park`]): it stops holding
//!   freshness waits and is tried every `refresh.parked_retry`, or at once when a change to it is queued.
//!   Connection, resource, cancel and timeout errors never park (during an outage every key is behind).
//! - **Batching.** Key tasks of a primer with a `batch` query that are claimed together are computed in
//!   one query ([`Refresher::compute_batch`]), each labelled with the watermark read before it started.

mod access_log;

pub use access_log::AccessLog;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use postgres_types::ToSql;
use tokio::sync::{OnceCell, Semaphore, watch};

use crate::freshness::Hub;
use crate::lsn::Lsn;

use crate::pg::{Source, TextParam, error_text};
use crate::primer::{Catalog, Key, Mapping, ParamValue, Shape};
use crate::queue::TaskKind;
use crate::replication::ReplicationState;
use crate::store::{Claim, Entry, Store, StoreError, Stored, Task};
use crate::telemetry::Telemetry;
use crate::visibility::{Snapshot, VisibilityClock};

/// A refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("no Postgres connection available: {source}")]
    Pool {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the query of primer '{primer}' failed: {}", error_text(source))]
    Query {
        primer: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// Postgres refused the key's own value (SQLSTATE class 22: out of range, bad input): the key is not
    /// kept, since every refresh of it would fail the same way.
    #[error(
        "the query of primer '{primer}' refused this key's values (a value out of range or not valid input, \
         usually the key's own): {}; the key is not cached",
        error_text(source)
    )]
    BadKeyValue {
        primer: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the lookup query of primer '{primer}' (dependency {dependency}) failed: {}",
        error_text(source)
    )]
    Lookup {
        primer: String,
        dependency: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the batch query of primer '{primer}' failed: {}", error_text(source))]
    Batch {
        primer: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the batch query of primer '{primer}' returned a row whose first column is not '{key_column}': \
         make batch.key_column the query's first column"
    )]
    BatchShape { primer: String, key_column: String },
    #[error("could not read a snapshot: {}", error_text(source))]
    Snapshot {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("could not read a snapshot: Postgres answered '{0}'")]
    UnreadableSnapshot(String),
    #[error(
        "could not mark a position in the WAL for a cache miss: {}",
        error_text(source)
    )]
    Mark {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("could not mark a position in the WAL for a cache miss: Postgres answered '{text}'")]
    UnreadableMark {
        text: String,
        #[source]
        source: crate::lsn::ParseLsnError,
    },
    #[error("the change at {needed} is not visible yet (visible up to {visible})")]
    NotVisible { needed: Lsn, visible: Lsn },
    /// Every miss slot (`http.max_concurrent_misses`) stayed taken for `waited`: Postgres is not asked.
    #[error(
        "{limit} misses were being computed and none finished within {}: this one was not \
         (http.max_concurrent_misses, http.miss_wait)", humantime::format_duration(*waited)
    )]
    TooManyMisses { limit: usize, waited: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The SQL kck runs for a primer: the user's query wrapped to produce the cached JSON as text.
pub fn wrapped_query(query: &str, shape: Shape) -> String {
    match shape {
        // string_agg keeps the rows compact and in the query's order.
        Shape::Rows => format!(
            "SELECT coalesce('[' || string_agg(row_to_json(q)::text, ',') || ']', '[]') FROM ({query}\n) q"
        ),
        Shape::Row => format!("SELECT (SELECT row_to_json(q) FROM ({query}\n) q LIMIT 1)::text"),
        Shape::Value => format!(
            "SELECT (SELECT value FROM json_each((SELECT row_to_json(q) FROM ({query}\n) q LIMIT 1)) LIMIT 1)::text"
        ),
    }
}

/// The SQL kck runs for a dependency's lookup query.
pub fn wrapped_lookup(query: &str) -> String {
    format!("SELECT row_to_json(q)::text FROM ({query}\n) q")
}

/// A key parameter in Postgres's text input form.
pub fn param_text(value: &ParamValue) -> String {
    match value {
        ParamValue::Int(i) => i.to_string(),
        ParamValue::Text(s) | ParamValue::Uuid(s) => s.clone(),
    }
}

use crate::clock::now_ms;

// ---------------------------------------------------------------------------------------------------------
// Settings (`refresh` in the config)

pub const DEFAULT_WORKERS: usize = 4;
pub const MAX_WORKERS: usize = 256;
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_QUEUE: u64 = 1_000_000;
pub const DEFAULT_CLAIM_BATCH: usize = 16;
pub const DEFAULT_PARK_AFTER: u32 = 5;
pub const DEFAULT_PARKED_RETRY: Duration = Duration::from_secs(300);
/// `http.max_concurrent_misses` and `http.miss_wait` (the HTTP section's, applied here, where misses run).
pub const DEFAULT_MAX_CONCURRENT_MISSES: usize = 32;
pub const DEFAULT_MISS_WAIT: Duration = Duration::from_secs(5);

/// Refresh workers.
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    /// Concurrent refreshes, each with its own Postgres connection. Default 4.
    pub workers: usize,
    /// How long a refresh waits for its triggering transaction to become visible before giving up and
    /// retrying later. Default 5 s.
    pub visibility_timeout: Duration,
    /// Postgres connections for refreshes and fetch misses. Default `workers + 4`.
    pub pool_size: usize,
    /// The replication reader waits while the queue holds more tasks than this. Default 1,000,000.
    pub max_queue: u64,
    /// A key nobody fetched for this long is dropped instead of recomputed, for primers that do not set
    /// their own `cold_after`. Default: never.
    pub cold_after: Option<Duration>,
    /// How many tasks a worker claims at once and runs hottest first (and batches). Default 16.
    pub claim_batch: usize,
    /// What a fetch miss whose primer finds no row (`null`) keeps. Default: kept from its second miss.
    pub absent_rows: AbsentRows,
    /// A task whose refresh failed this many times in a row, each time with an error of the query itself
    /// (not a lost connection), is parked: it stops holding freshness waits and is retried every
    /// `parked_retry`. Default 5.
    pub park_after: u32,
    /// How often a parked task is tried again. Default 5 min.
    pub parked_retry: Duration,
}

/// `refresh.absent_window` unless set.
pub const DEFAULT_ABSENT_WINDOW: Duration = Duration::from_secs(60);
/// How many absent keys `AbsentRows::SecondMiss` remembers (bounded; the older half is forgotten when
/// full, and a forgotten key counts as a first miss again).
const ABSENT_LOG_CAPACITY: usize = 100_000;

/// What a fetch miss whose primer finds no row (the value `null`) leaves in the store
/// (`refresh.absent_rows`), so that fetches of random ids cannot fill the store or the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbsentRows {
    /// Kept like any other result (registered and refreshed).
    Keep,
    /// Answered (`null`) but not kept, unless the same key missed with `null` within `window` before:
    /// a key fetched often while absent is kept (and refreshed) from its second miss.
    SecondMiss { window: Duration },
}

impl Default for AbsentRows {
    fn default() -> AbsentRows {
        AbsentRows::SecondMiss {
            window: DEFAULT_ABSENT_WINDOW,
        }
    }
}

type PrimeCell = Arc<OnceCell<Entry>>;

/// How one primer's refreshes go, since the process started: for `/status`, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrimerHealth {
    /// Refreshes that worked (keys computed, lookups run, key pages listed; fetch misses included).
    pub refreshes: u64,
    /// Of those, keys recomputed and stored by the workers (fetch misses and warming not included).
    #[serde(default)]
    pub keys_refreshed: u64,
    /// Misses computed for fetches (and warming).
    #[serde(default)]
    pub primes: u64,
    /// Batch queries run (each refreshing several keys).
    #[serde(default)]
    pub batch_queries: u64,
    /// Keys dropped rather than recomputed because nobody read them for `cold_after`.
    #[serde(default)]
    pub dropped_cold: u64,
    /// Misses that found no row and were answered but not kept (`refresh.absent_rows`).
    #[serde(default)]
    pub absent_not_kept: u64,
    /// Refreshes that failed (each is retried with backoff).
    pub failures: u64,
    /// Failures since the last refresh that worked: a primer with some is failing now.
    pub consecutive_failures: u32,
    /// When a refresh of it last worked (ms since the Unix epoch).
    pub last_refresh_at_ms: Option<i64>,
    /// The last error and when (ms since the Unix epoch).
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    /// Time of the last key computation and the mean of all, in milliseconds.
    pub last_duration_ms: Option<f64>,
    pub mean_duration_ms: Option<f64>,
    #[serde(skip)]
    timed: u64,
}

/// Per-primer refresh health and recent key refresh durations. Kept by the [`Refresher`]; read by
/// `crate::ops::status`.
#[derive(Debug, Default)]
pub struct RefreshHealth {
    primers: Mutex<HashMap<String, PrimerHealth>>,
    /// The last key refresh durations (ms), for percentiles.
    recent_ms: Mutex<VecDeque<f64>>,
}

const RECENT_DURATIONS: usize = 512;

impl RefreshHealth {
    fn succeeded(&self, primer: &str, duration: Option<Duration>) -> bool {
        let mut primers = self.primers.lock().unwrap_or_else(|e| e.into_inner());
        let health = primers.entry(primer.to_string()).or_default();
        let was_failing = health.consecutive_failures > 0;
        health.refreshes += 1;
        health.consecutive_failures = 0;
        health.last_refresh_at_ms = Some(now_ms());
        if let Some(duration) = duration {
            let ms = duration.as_secs_f64() * 1000.0;
            health.timed += 1;
            let mean = health.mean_duration_ms.unwrap_or(0.0);
            health.mean_duration_ms = Some(mean + (ms - mean) / health.timed as f64);
            health.last_duration_ms = Some(ms);
            drop(primers);
            let mut recent = self.recent_ms.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_DURATIONS {
                recent.pop_front();
            }
            recent.push_back(ms);
        }
        was_failing
    }

    /// Returns the consecutive failures now.
    fn failed(&self, primer: &str, error: &str) -> u32 {
        let mut primers = self.primers.lock().unwrap_or_else(|e| e.into_inner());
        let health = primers.entry(primer.to_string()).or_default();
        health.failures += 1;
        health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        health.last_error = Some(error.to_string());
        health.last_error_at_ms = Some(now_ms());
        health.consecutive_failures
    }

    fn update(&self, primer: &str, f: impl FnOnce(&mut PrimerHealth)) {
        let mut primers = self.primers.lock().unwrap_or_else(|e| e.into_inner());
        f(primers.entry(primer.to_string()).or_default());
    }

    /// `(refreshes, failures)` of all primers.
    pub fn totals(&self) -> (u64, u64) {
        let primers = self.primers.lock().unwrap_or_else(|e| e.into_inner());
        primers
            .values()
            .fold((0, 0), |(r, f), h| (r + h.refreshes, f + h.failures))
    }

    /// The health of `primer` (default when it never ran).
    pub fn primer(&self, primer: &str) -> PrimerHealth {
        let primers = self.primers.lock().unwrap_or_else(|e| e.into_inner());
        primers.get(primer).cloned().unwrap_or_default()
    }

    /// `(p50, p95, max)` of the recent key refresh durations, in milliseconds.
    pub fn latency_ms(&self) -> Option<(f64, f64, f64)> {
        let recent = self.recent_ms.lock().unwrap_or_else(|e| e.into_inner());
        if recent.is_empty() {
            return None;
        }
        let mut sorted: Vec<f64> = recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.95), sorted[sorted.len() - 1]))
    }
}

/// How many recently refreshed keys [`Refresher::recent_refreshes`] remembers.
const RECENT: usize = 1024;

/// Pool connections the workers leave to fetch misses (at most half the pool).
const MISS_RESERVE: usize = 2;

/// How many of its claimed units (a key, or a primer's batch) one worker has under way at once.
const UNITS_AT_ONCE: usize = 4;

/// A claim with its rank (class, then most recently read first), key and primer.
type Ranked = (
    u8,
    std::cmp::Reverse<Option<Instant>>,
    Claim,
    Option<Key>,
    Option<usize>,
);

/// One unit of work of a worker: a claim, or key claims of one primer computed with its batch query.
enum Unit {
    One(Claim, Option<usize>),
    Batch(usize, Vec<(Claim, Key, String)>),
}

impl Unit {
    fn primer(&self) -> Option<usize> {
        match self {
            Unit::One(_, primer) => *primer,
            Unit::Batch(primer, _) => Some(*primer),
        }
    }
}

/// Runs primer queries. See the module docs.
pub struct Refresher {
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<VisibilityClock>,
    /// When each key was last fetched (hot keys first, cold keys dropped).
    pub access: AccessLog,
    /// `refresh.absent_rows`, and the keys whose last miss found no row, and when.
    absent_rows: AbsentRows,
    absent: AccessLog,
    /// Told about every entry this refresher writes and every task it finishes (freshness waits).
    pub hub: Arc<Hub>,
    pool: Pool,
    visibility_timeout: Duration,
    priming: Mutex<HashMap<String, PrimeCell>>,
    /// The state of this process's own replication stream, if it has the role.
    local_stream: Option<watch::Receiver<ReplicationState>>,
    paused: watch::Sender<bool>,
    claim_batch: usize,
    /// `refresh.park_after` and `refresh.parked_retry`.
    park_after: u32,
    parked_retry: Duration,
    /// Misses computed at once (`http.max_concurrent_misses`), and how long a miss waits for a slot.
    misses: Semaphore,
    miss_limit: usize,
    miss_wait: Duration,
    /// Per primer: its `concurrency` limit.
    limits: Vec<Option<Arc<Semaphore>>>,
    /// How many of the workers' queries may hold a pool connection at once: all but
    /// [`MISS_RESERVE`] of the pool, so that fetch misses find a connection however busy the workers are.
    worker_queries: Semaphore,
    recent: Mutex<VecDeque<String>>,
    /// Per-primer successes and failures, for `/status`.
    pub health: RefreshHealth,
    telemetry: Arc<Telemetry>,
    /// Per primer without a `batch` query: whether its keys are computed many at once through an
    /// automatic batch ([`auto_batch_sql`]); `Some(false)` once Postgres refused the rewritten query.
    auto_batch: Vec<Mutex<Option<AutoBatch>>>,
}

/// The automatic batch of one primer: its SQL once the parameters' types are known, or why not.
#[derive(Clone)]
enum AutoBatch {
    /// Not tried yet.
    Untried,
    Ready(Arc<str>),
    Refused,
}

/// The types Postgres gives the parameters of `primer`'s one-key query, as SQL type names
/// (`integer`, `public.mood`), in parameter order.
async fn param_types(
    client: &deadpool_postgres::Object,
    primer: &crate::primer::Primer,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let statement = client
        .prepare_cached(&wrapped_query(&primer.query, primer.shape))
        .await?;
    let mut types = Vec::with_capacity(statement.params().len());
    for ty in statement.params() {
        let row = client
            .query_one("SELECT format_type($1::oid, NULL)", &[&ty.oid()])
            .await?;
        types.push(row.get::<_, String>(0));
    }
    Ok(types)
}

/// The SQL that computes many keys of a primer at once, each exactly as the one-key query would: the
/// wrapped one-key query as a scalar subquery, its `$n` replaced by the `n`th array's element cast to the
/// parameter's own type (`types`, as Postgres typed the one-key query), over `unnest` of one text array per
/// parameter `WITH ORDINALITY`. The same expression per key, so the same bytes; the subquery sees the same
/// snapshot for every key.
pub fn auto_batch_sql(query: &str, shape: Shape, types: &[String]) -> Option<String> {
    let replaced = crate::sqlscan::replace_placeholders(query, |n| match types.get(n - 1) {
        Some(ty) => format!("(k.p{n})::{ty}"),
        None => format!("${n}"),
    })
    .ok()?;
    let arrays: Vec<String> = (1..=types.len()).map(|n| format!("${n}::text[]")).collect();
    let columns: Vec<String> = (1..=types.len()).map(|n| format!("p{n}")).collect();
    Some(format!(
        "SELECT ({}) FROM unnest({}) WITH ORDINALITY AS k({}, ord) ORDER BY k.ord",
        wrapped_query(&replaced, shape),
        arrays.join(", "),
        columns.join(", ")
    ))
}

impl Refresher {
    pub fn new(
        source: &Source,
        pool_size: usize,
        catalog: Arc<Catalog>,
        store: Arc<dyn Store>,
        clock: Arc<VisibilityClock>,
        visibility_timeout: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Result<Refresher, RefreshError> {
        let pool = crate::pg::pool(source.pg.clone(), &source.tls, pool_size)
            .map_err(|e| RefreshError::Pool { source: e.into() })?;
        let limits = catalog
            .primers
            .iter()
            .map(|p| p.policy.concurrency.map(|n| Arc::new(Semaphore::new(n))))
            .collect();
        let auto_batch = catalog
            .primers
            .iter()
            .map(|p| {
                Mutex::new(
                    (p.policy.batch.is_none() && !p.template.params.is_empty())
                        .then_some(AutoBatch::Untried),
                )
            })
            .collect();
        let pool_size = pool_size.max(1);
        let worker_queries = Semaphore::new(
            pool_size
                .saturating_sub(MISS_RESERVE.min(pool_size / 2))
                .max(1),
        );
        Ok(Refresher {
            catalog,
            store,
            clock,
            worker_queries,
            access: AccessLog::new(ACCESS_LOG_CAPACITY),
            absent_rows: AbsentRows::default(),
            absent: AccessLog::new(ABSENT_LOG_CAPACITY),
            hub: Arc::new(Hub::default()),
            pool,
            visibility_timeout,
            priming: Mutex::new(HashMap::new()),
            local_stream: None,
            paused: watch::Sender::new(false),
            claim_batch: DEFAULT_CLAIM_BATCH,
            park_after: DEFAULT_PARK_AFTER,
            parked_retry: DEFAULT_PARKED_RETRY,
            misses: Semaphore::new(DEFAULT_MAX_CONCURRENT_MISSES),
            miss_limit: DEFAULT_MAX_CONCURRENT_MISSES,
            miss_wait: DEFAULT_MISS_WAIT,
            limits,
            recent: Mutex::new(VecDeque::new()),
            health: RefreshHealth::default(),
            auto_batch,
            telemetry,
        })
    }

    /// Whether key tasks of primer `index` claimed together are computed in one query (its `batch`, or
    /// the automatic batch unless Postgres refused it).
    fn batchable(&self, index: usize) -> bool {
        self.catalog.primers[index].policy.batch.is_some()
            || self.auto_batch.get(index).is_some_and(|a| {
                !matches!(
                    *a.lock().unwrap_or_else(|e| e.into_inner()),
                    None | Some(AutoBatch::Refused)
                )
            })
    }

    /// Whether primer `index`'s keys are computed through the automatic batch (known once tried).
    pub fn batches_automatically(&self, index: usize) -> bool {
        self.auto_batch.get(index).is_some_and(|a| {
            matches!(
                *a.lock().unwrap_or_else(|e| e.into_inner()),
                Some(AutoBatch::Ready(_))
            )
        })
    }

    /// The automatic batch SQL of primer `index`, typed on first use from the one-key query's prepared
    /// parameters; None (for good) when Postgres cannot run the rewrite (a parameter in `LIMIT`, say).
    async fn auto_batch(&self, index: usize) -> Result<Option<Arc<str>>, RefreshError> {
        let Some(cell) = self.auto_batch.get(index) else {
            return Ok(None);
        };
        let state = cell.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match state {
            None | Some(AutoBatch::Refused) => return Ok(None),
            Some(AutoBatch::Ready(sql)) => return Ok(Some(sql)),
            Some(AutoBatch::Untried) => {}
        }
        let primer = &self.catalog.primers[index];
        let client = self.client().await?;
        let query_error = |source| RefreshError::Query {
            primer: primer.name.clone(),
            source,
        };
        let types = param_types(&client, primer).await.map_err(query_error)?;
        let next = match auto_batch_sql(&primer.query, primer.shape, &types) {
            Some(sql) => match client.prepare_cached(&sql).await {
                Ok(_) => AutoBatch::Ready(sql.into()),
                // Not the server refusing the SQL (a lost connection): try again next time.
                Err(e) if e.as_db_error().is_none() => return Err(query_error(e)),
                Err(e) => {
                    tracing::info!(primer = %primer.name, reason = %error_text(&e),
                        "The primer's keys are computed one query each: Postgres cannot run them as one batch.");
                    AutoBatch::Refused
                }
            },
            None => AutoBatch::Refused,
        };
        *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(next.clone());
        Ok(match next {
            AutoBatch::Ready(sql) => Some(sql),
            _ => None,
        })
    }

    /// [`Refresher::compute_batch`] through the automatic batch: one query for all `keys`, each entry the
    /// bytes the one-key query gives.
    async fn compute_auto_batch(
        &self,
        index: usize,
        sql: &str,
        keys: &[&Key],
        label: Lsn,
    ) -> Result<Vec<Entry>, RefreshError> {
        let primer = &self.catalog.primers[index];
        let arrays: Vec<String> = (0..primer.template.params.len())
            .map(|i| {
                let values: Vec<String> = keys
                    .iter()
                    .map(|k| k.params.get(i).map(param_text).unwrap_or_default())
                    .collect();
                pg_text_array(&values)
            })
            .collect();
        let params: Vec<TextParam<'_>> = arrays.iter().map(|a| TextParam(Some(a))).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let batch_error = |source| RefreshError::Batch {
            primer: primer.name.clone(),
            source,
        };
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await.map_err(batch_error)?;
        let rows = client.query(&statement, &refs).await.map_err(batch_error)?;
        drop(client);
        if rows.len() != keys.len() {
            return Err(RefreshError::BatchShape {
                primer: primer.name.clone(),
                key_column: "ord".into(),
            });
        }
        let computed_at_ms = now_ms();
        let expires_at_ms = self.expiry(index);
        Ok(rows
            .iter()
            .map(|row| {
                let json: Option<String> = row.get(0);
                Entry {
                    value: Bytes::from(json.unwrap_or_else(|| "null".to_string())),
                    lsn: label,
                    computed_at_ms,
                    expires_at_ms,
                }
            })
            .collect())
    }

    /// Tell the refresher about this process's own replication stream: while it streams, a miss waits
    /// for what it decoded; otherwise for a position marked in the WAL (see [`Refresher::prime`]).
    pub fn with_local_stream(mut self, state: watch::Receiver<ReplicationState>) -> Refresher {
        self.local_stream = Some(state);
        self
    }

    /// A position such that every change a stream may have read before now (and so may have skipped for a
    /// key that was not registered yet) is at or before it.
    async fn miss_position(&self) -> Result<Lsn, RefreshError> {
        let streaming = self
            .local_stream
            .as_ref()
            .is_some_and(|s| *s.borrow() == ReplicationState::Streaming);
        if streaming {
            return Ok(self.clock.decoded());
        }
        // The stream runs in another process (or is reconnecting): mark the WAL now. Whatever it read
        // before was flushed before this mark, and once it reads the mark the watermark passes it.
        let client = self.client().await?;
        let text: String = client
            .query_one(
                "SELECT pg_logical_emit_message(false, 'kck-sync', '')::text",
                &[],
            )
            .await
            .map_err(|source| RefreshError::Mark { source })?
            .get(0);
        text.parse()
            .map_err(|source| RefreshError::UnreadableMark { text, source })
    }

    /// Whether Postgres answers on a pooled connection (for `/readyz`).
    pub async fn ping(&self) -> Result<(), RefreshError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| RefreshError::Pool { source: e.into() })?;
        Ok(())
    }

    /// Record a refresh of `primer` that worked.
    fn record_success(&self, primer: &str, duration: Option<Duration>) {
        if self.health.succeeded(primer, duration) {
            self.telemetry.metrics.consecutive_failures(primer, 0);
            tracing::info!(%primer, "Primer refreshes work again.");
        }
    }

    /// Record a failed refresh of `primer`.
    fn record_failure(&self, primer: &str, error: &RefreshError) {
        let message = error.to_string();
        let failures = self.health.failed(primer, &message);
        self.telemetry
            .metrics
            .consecutive_failures(primer, failures);
        self.telemetry
            .events
            .error(format!("primer {primer}"), message);
    }

    /// The primer a task belongs to, for metrics and health.
    fn task_primer(&self, kind: &TaskKind) -> String {
        match kind {
            TaskKind::Key(text) => self
                .catalog
                .parse_key(text)
                .map(|k| self.catalog.primers[k.primer].name.clone())
                .unwrap_or_else(|_| "unknown".into()),
            TaskKind::Lookup { primer, .. } | TaskKind::Primer { primer, .. } => primer.clone(),
        }
    }

    /// What a miss that finds no row keeps (`refresh.absent_rows`).
    pub fn with_absent_rows(mut self, policy: AbsentRows) -> Refresher {
        self.absent_rows = policy;
        self
    }

    /// How many tasks a worker claims at once (`refresh.claim_batch`).
    pub fn with_claim_batch(mut self, n: usize) -> Refresher {
        self.claim_batch = n.max(1);
        self
    }

    /// How many misses run their queries at once, and how long one more waits for a slot before it is
    /// refused ([`RefreshError::TooManyMisses`]).
    pub fn with_miss_limit(mut self, limit: usize, wait: Duration) -> Refresher {
        let limit = limit.max(1);
        self.misses = Semaphore::new(limit);
        self.miss_limit = limit;
        self.miss_wait = wait;
        self
    }

    /// When a failing task is parked, and how often it is tried then (`refresh.park_after`,
    /// `refresh.parked_retry`).
    pub fn with_parking(mut self, after: u32, retry: Duration) -> Refresher {
        self.park_after = after.max(1);
        self.parked_retry = retry;
        self
    }

    /// Stop the workers from claiming tasks (those running finish). Changes keep being queued, and
    /// coalesce. For tests and maintenance.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Record a fetch of `key` (canonical text).
    pub fn touch(&self, key: &str) {
        self.access.touch(key);
    }

    /// How `primer`'s refreshes go (the default when it never ran).
    pub fn primer_health(&self, primer: &str) -> PrimerHealth {
        self.health.primer(primer)
    }

    /// The keys the workers stored most recently, oldest first (at most 1,024).
    pub fn recent_refreshes(&self) -> Vec<String> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn stat(&self, primer: usize, f: impl FnOnce(&mut PrimerHealth)) {
        if let Some(p) = self.catalog.primers.get(primer) {
            self.health.update(&p.name, f);
        }
    }

    /// A worker stored a key of `primer` (its success is recorded by `record_success`).
    fn refreshed(&self, primer: usize, key: &str) {
        self.stat(primer, |s| s.keys_refreshed += 1);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(key.to_owned());
    }

    /// A worker's query of `primer` failed (counted by `record_failure`): say it loudly when it keeps failing.
    fn failed(&self, primer: usize, error: &RefreshError) {
        let mut consecutive = 0;
        self.stat(primer, |s| consecutive = s.consecutive_failures);
        // Say it loudly when a primer keeps failing: at 5 failures in a row, then at every power of ten.
        if consecutive == 5 || (consecutive >= 10 && consecutive.is_power_of_two()) {
            tracing::error!(
                primer = %self.catalog.primers[primer].name,
                consecutive_failures = consecutive,
                error = %crate::report::Chain(error),
                "A primer keeps failing; its keys keep their last value and are retried with backoff \
                 (other primers are not held up). Fix the primer's query or the database."
            );
        }
    }

    /// The primer a task is about, if any.
    fn primer_of(&self, id: &str) -> Option<usize> {
        match TaskKind::parse(id).ok()? {
            TaskKind::Key(text) => self.catalog.parse_key(&text).ok().map(|k| k.primer),
            TaskKind::Lookup { primer, .. } | TaskKind::Primer { primer, .. } => {
                self.catalog.primer(&primer).map(|(i, _)| i)
            }
        }
    }

    /// Remove a key (entry and index): its next fetch is a miss. Its subscribers (`/subscribe`) are told,
    /// so that they compute it again (and it stays followed by the stream) instead of waiting on a key
    /// nothing refreshes any more.
    pub async fn drop_key(&self, primer: &str, key: &str) -> Result<(), StoreError> {
        self.store.remove_key(primer, key).await?;
        self.hub.written(key);
        Ok(())
    }

    /// Recompute `key` in the background (single flight with fetch misses), for a stale entry served
    /// meanwhile.
    pub fn revalidate(self: &Arc<Self>, key: Key, text: String) {
        if self
            .priming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&text)
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(error) = this.prime(&key, &text).await {
                tracing::warn!(key = %text, error = %crate::report::Chain(&error), "Cannot revalidate a stale entry; the next fetch tries again.");
            }
        });
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, RefreshError> {
        self.pool
            .get()
            .await
            .map_err(|e| RefreshError::Pool { source: e.into() })
    }

    /// Make sure every change up to `needed` is visible to statements started from now on; returns the
    /// watermark to label results with.
    pub async fn ensure_visible(&self, needed: Lsn) -> Result<Lsn, RefreshError> {
        let visible = self.clock.visible();
        if visible >= needed {
            return Ok(visible);
        }
        let client = self.client().await?;
        let text: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(|source| RefreshError::Snapshot { source })?
            .get(0);
        drop(client);
        let snapshot =
            Snapshot::parse(&text).ok_or_else(|| RefreshError::UnreadableSnapshot(text.clone()))?;
        let visible = self.clock.observe(&snapshot);
        if visible >= needed {
            return Ok(visible);
        }
        let visible = self
            .clock
            .wait_visible(needed, self.visibility_timeout)
            .await;
        if visible >= needed {
            Ok(visible)
        } else {
            Err(RefreshError::NotVisible { needed, visible })
        }
    }

    /// The expiry of an entry of `primer` computed now (its `ttl`).
    fn expiry(&self, primer: usize) -> Option<i64> {
        self.catalog.primers[primer]
            .policy
            .ttl
            .map(|ttl| now_ms().saturating_add(ttl.as_millis() as i64))
    }

    /// Compute `key` now, seeing at least every change up to `needed`.
    pub async fn compute(&self, key: &Key, needed: Lsn) -> Result<Entry, RefreshError> {
        let label = self.ensure_visible(needed).await?;
        let primer = &self.catalog.primers[key.primer];
        let texts: Vec<String> = key.params.iter().map(param_text).collect();
        let params: Vec<TextParam<'_>> = texts.iter().map(|t| TextParam(Some(t))).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let query_error = |source| RefreshError::Query {
            primer: primer.name.clone(),
            source,
        };
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&wrapped_query(&primer.query, primer.shape))
            .await
            .map_err(query_error)?;
        let row = client
            .query_one(&statement, &refs)
            .await
            .map_err(query_error)?;
        let json: Option<String> = row.get(0);
        Ok(Entry {
            value: Bytes::from(json.unwrap_or_else(|| "null".to_string())),
            lsn: label,
            computed_at_ms: now_ms(),
            expires_at_ms: self.expiry(key.primer),
        })
    }

    /// Compute many keys of primer `index` with its batch query, seeing every change up to `needed`.
    /// Returns an entry per key, in the order given.
    pub async fn compute_batch(
        &self,
        index: usize,
        keys: &[&Key],
        needed: Lsn,
    ) -> Result<Vec<Entry>, RefreshError> {
        let primer = &self.catalog.primers[index];
        let Some(batch) = &primer.policy.batch else {
            if keys.len() > 1
                && let Some(sql) = self.auto_batch(index).await?
            {
                let label = self.ensure_visible(needed).await?;
                return self.compute_auto_batch(index, &sql, keys, label).await;
            }
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                out.push(self.compute(key, needed).await?);
            }
            return Ok(out);
        };
        let label = self.ensure_visible(needed).await?;
        let values: Vec<String> = keys
            .iter()
            .map(|k| k.params.first().map(param_text).unwrap_or_default())
            .collect();
        let array = pg_text_array(&values);
        let param = TextParam(Some(&array));
        let batch_error = |source| RefreshError::Batch {
            primer: primer.name.clone(),
            source,
        };
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT row_to_json(q)::text FROM ({}\n) q",
                batch.query
            ))
            .await
            .map_err(batch_error)?;
        let rows = client
            .query(&statement, &[&param as &(dyn ToSql + Sync)])
            .await
            .map_err(batch_error)?;
        drop(client);
        // Rows per key parameter value, in the query's order.
        let mut by_value: HashMap<String, Vec<String>> = HashMap::new();
        for row in rows {
            let text: Option<String> = row.get(0);
            let Some(text) = text else { continue };
            let Some((value, rest)) = split_first_field(&text, &batch.key_column) else {
                return Err(RefreshError::BatchShape {
                    primer: primer.name.clone(),
                    key_column: batch.key_column.clone(),
                });
            };
            by_value.entry(value).or_default().push(rest);
        }
        let computed_at_ms = now_ms();
        let expires_at_ms = self.expiry(index);
        Ok(values
            .iter()
            .map(|value| {
                let rows = by_value.get(value).map(Vec::as_slice).unwrap_or_default();
                let json = match primer.shape {
                    crate::primer::Shape::Rows => format!("[{}]", rows.join(",")),
                    crate::primer::Shape::Row => {
                        rows.first().cloned().unwrap_or_else(|| "null".into())
                    }
                    crate::primer::Shape::Value => rows
                        .first()
                        .and_then(|r| first_field_value(r))
                        .unwrap_or_else(|| "null".into()),
                };
                Entry {
                    value: Bytes::from(json),
                    lsn: label,
                    computed_at_ms,
                    expires_at_ms,
                }
            })
            .collect())
    }

    /// Whether Postgres accepts each of `key`'s values as the type it gave the parameter in the primer's
    /// query (`'99999999999'::int4` does not): tells a key that can never compute from data that fails.
    async fn key_values_fit(&self, key: &Key) -> Result<bool, RefreshError> {
        let primer = &self.catalog.primers[key.primer];
        let query_error = |source| RefreshError::Query {
            primer: primer.name.clone(),
            source,
        };
        let client = self.client().await?;
        let types = param_types(&client, primer).await.map_err(query_error)?;
        for (name, value) in types.iter().zip(&key.params) {
            let text = param_text(value);
            // The cast Postgres applies to a text parameter of that type (its input function).
            if client
                .query_one(&format!("SELECT $1::text::{name}"), &[&text])
                .await
                .is_err()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Compute, store and return a key that a fetch missed. Concurrent calls for one key share one query.
    pub async fn prime(&self, key: &Key, text: &str) -> Result<Entry, RefreshError> {
        let cell = {
            let mut priming = self.priming.lock().unwrap_or_else(|e| e.into_inner());
            priming.entry(text.to_string()).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| async {
                // One slot per key computed (requests for the same key share it): a flood of distinct
                // misses waits here, not in Postgres, and past `miss_wait` is refused.
                let _slot = match tokio::time::timeout(self.miss_wait, self.misses.acquire()).await
                {
                    Ok(Ok(slot)) => slot,
                    _ => {
                        return Err(RefreshError::TooManyMisses {
                            limit: self.miss_limit,
                            waited: self.miss_wait,
                        });
                    }
                };
                let primer = &self.catalog.primers[key.primer].name;
                // Registered first: the stream queues refreshes only for registered keys, so a change it
                // decodes from now on is refreshed. Then the computation waits until everything the stream
                // decoded before is visible, so no change falls between the two.
                self.store.register_key(primer, text).await?;
                let needed = self.miss_position().await?;
                let entry = match self.compute(key, needed).await {
                    Ok(entry) => entry,
                    Err(RefreshError::Query { primer, source })
                        if source.code().is_some_and(|c| c.code().starts_with("22")) =>
                    {
                        // The data (a division by zero) rather than the key: an ordinary failure.
                        if self.key_values_fit(key).await? {
                            return Err(RefreshError::Query { primer, source });
                        }
                        // Not kept: its refreshes would fail forever and hold every freshness wait.
                        self.store.remove_key(&primer, text).await?;
                        return Err(RefreshError::BadKeyValue { primer, source });
                    }
                    Err(e) => return Err(e),
                };
                self.stat(key.primer, |s| s.primes += 1);
                if let AbsentRows::SecondMiss { window } = self.absent_rows
                    && entry.value.as_ref() == b"null"
                {
                    let again = self
                        .absent
                        .was_read(text)
                        .is_some_and(|at| at.elapsed() < window);
                    self.absent.touch(text);
                    if !again {
                        // No row, first miss: answered, not kept. Its registration goes (with any
                        // entry a refresh stored meanwhile, which a later fetch computes again), so a
                        // queued refresh of it finds it unregistered and does nothing: the next fetch
                        // computes it fresh, and sees a row inserted since.
                        self.store.remove_key(primer, text).await?;
                        self.stat(key.primer, |s| s.absent_not_kept += 1);
                        return Ok(entry);
                    }
                }
                // Only while still registered: a key evicted (or removed) since it was registered is
                // answered, not kept (the stream stopped queueing its changes when it left the index).
                match self
                    .store
                    .store_if_registered(primer, text, entry.clone())
                    .await?
                {
                    Some(Stored::Written) => {
                        self.hub.written(text);
                        Ok(entry)
                    }
                    Some(Stored::KeptNewer(_)) => Ok(self.store.get(text).await?.unwrap_or(entry)),
                    None => Ok(entry),
                }
            })
            .await
            .cloned();
        let primer = &self.catalog.primers[key.primer].name;
        match &result {
            Ok(_) => self.record_success(primer, None),
            Err(e @ RefreshError::Query { .. }) => self.record_failure(primer, e),
            Err(_) => {}
        }
        let mut priming = self.priming.lock().unwrap_or_else(|e| e.into_inner());
        if priming.get(text).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            priming.remove(text);
        }
        result
    }

    /// Carry out one claimed task. Returns what to tell the store.
    async fn run(&self, claim: &Claim) -> Result<Outcome, RefreshError> {
        let kind = match TaskKind::parse(&claim.id) {
            Ok(kind) => kind,
            Err(e) => {
                tracing::warn!(task = %claim.id, "Dropping a task kck cannot read: {e}.");
                return Ok(Outcome::Done(None, Vec::new()));
            }
        };
        match kind {
            TaskKind::Key(text) => {
                let key = match self.catalog.parse_key(&text) {
                    Ok(key) => key,
                    Err(e) => {
                        tracing::warn!(key = %text, "Dropping a refresh for a key no primer matches now: {e}.");
                        return Ok(Outcome::Done(None, Vec::new()));
                    }
                };
                // Visible first, then the registration check: a key registered after this point computes
                // its first value from a snapshot that sees the change.
                self.ensure_visible(claim.lsn).await?;
                if !self.store.is_registered(&text).await? {
                    return Ok(Outcome::Done(None, Vec::new()));
                }
                let primer = &self.catalog.primers[key.primer];
                if self.access.is_cold(&text, primer.policy.cold_after) {
                    self.drop_key(&primer.name, &text).await?;
                    self.stat(key.primer, |s| s.dropped_cold += 1);
                    tracing::debug!(key = %text, "Dropped a cold key instead of recomputing it.");
                    return Ok(Outcome::Done(None, Vec::new()));
                }
                let entry = self.compute(&key, claim.lsn).await?;
                Ok(Outcome::Done(
                    Some((primer.name.clone(), text, entry)),
                    Vec::new(),
                ))
            }
            TaskKind::Lookup {
                primer,
                dependency,
                args,
            } => {
                let follow_up = self.lookup(&primer, dependency, &args, claim.lsn).await?;
                Ok(Outcome::Done(None, follow_up))
            }
            TaskKind::Primer { primer, after } => {
                const PAGE: usize = 1000;
                if self.catalog.primer(&primer).is_none() {
                    return Ok(Outcome::Done(None, Vec::new()));
                }
                let keys = self.store.keys(&primer, after.as_deref(), PAGE).await?;
                let mut follow_up: Vec<Task> = keys
                    .iter()
                    .map(|k| TaskKind::Key(k.clone()).task(claim.lsn))
                    .collect();
                if keys.len() == PAGE {
                    let next = TaskKind::Primer {
                        primer,
                        after: keys.last().cloned(),
                    };
                    follow_up.push(next.task(claim.lsn));
                }
                Ok(Outcome::Done(None, follow_up))
            }
        }
    }

    async fn lookup(
        &self,
        primer_name: &str,
        dependency: usize,
        args: &[Option<String>],
        needed: Lsn,
    ) -> Result<Vec<Task>, RefreshError> {
        let Some((index, primer)) = self.catalog.primer(primer_name) else {
            return Ok(Vec::new());
        };
        let Some(Mapping::Lookup { query, .. }) =
            primer.dependencies.get(dependency).map(|d| &d.mapping)
        else {
            return Ok(Vec::new());
        };
        self.ensure_visible(needed).await?;
        let keys = self
            .list_keys(index, query, args)
            .await
            .map_err(|e| match e {
                RefreshError::Query { primer, source } => RefreshError::Lookup {
                    primer,
                    dependency,
                    source,
                },
                other => other,
            })?;
        Ok(keys
            .into_iter()
            .map(|(_, text)| TaskKind::Key(text).task(needed))
            .collect())
    }

    /// Run `query` (a lookup or warm query: its columns are named like the key parameters of primer
    /// `index`) with `args` bound as `$1..$n` in text form, and return the keys its rows name. Rows that
    /// do not make a valid key are skipped.
    pub async fn list_keys(
        &self,
        index: usize,
        query: &str,
        args: &[Option<String>],
    ) -> Result<Vec<(Key, String)>, RefreshError> {
        let primer = &self.catalog.primers[index];
        let params: Vec<TextParam<'_>> = args.iter().map(|a| TextParam(a.as_deref())).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let query_error = |source| RefreshError::Query {
            primer: primer.name.clone(),
            source,
        };
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&wrapped_lookup(query))
            .await
            .map_err(query_error)?;
        let rows = client.query(&statement, &refs).await.map_err(query_error)?;
        let mut keys = Vec::new();
        for row in rows {
            let json: Option<String> = row.get(0);
            let Some(Ok(serde_json::Value::Object(object))) =
                json.map(|j| serde_json::from_str(&j))
            else {
                continue;
            };
            let texts: Vec<Option<String>> = primer
                .template
                .params
                .iter()
                .map(|p| match object.get(&p.name) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                    Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
                    _ => None,
                })
                .collect();
            let values: Vec<Option<&str>> = texts.iter().map(|t| t.as_deref()).collect();
            if let Some(key) = self.catalog.key_from_text(index, &values) {
                let text = self.catalog.render(&key);
                keys.push((key, text));
            }
        }
        Ok(keys)
    }

    /// Claim and run tasks until `shutdown`. See the module docs for the order.
    pub async fn work(self: Arc<Self>, worker: usize, mut shutdown: watch::Receiver<bool>) {
        const LEASE: Duration = Duration::from_secs(60);
        let mut paused = self.paused.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            if *paused.borrow_and_update() {
                tokio::select! {
                    _ = paused.wait_for(|p| !*p) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
            let claims = match self.store.claim(self.claim_batch, LEASE).await {
                Ok(claims) => claims,
                Err(error) => {
                    tracing::error!(worker, error = %crate::report::Chain(&error), "Cannot claim refresh tasks; retrying in 1 s. Check the store.");
                    sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await;
                    continue;
                }
            };
            if claims.is_empty() {
                tokio::select! {
                    _ = self.store.wait_for_tasks(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => {}
                    _ = paused.changed() => {}
                }
                continue;
            }
            // A few units at a time, started in the plan's order (hottest first). One at a time, a
            // worker recorded each result (a store commit) before starting the next query, and that
            // capped kck at a few thousand refreshes a second on two cores: now the store's writer puts
            // several finishes in one commit, and queries overlap. A unit whose primer is at its
            // concurrency limit waits for a permit (fairly, in order) without holding up the others.
            let units = self.plan(claims);
            let this: &Refresher = &self;
            futures_util::stream::iter(units)
                .for_each_concurrent(UNITS_AT_ONCE, |unit| async move {
                    let limit = unit.primer().and_then(|p| this.limits[p].clone());
                    let _permit = match limit {
                        None => None,
                        Some(limit) => limit.acquire_owned().await.ok(),
                    };
                    match unit {
                        Unit::One(claim, primer) => this.settle(&claim, primer).await,
                        Unit::Batch(primer, claims) => this.settle_batch(primer, claims).await,
                    }
                })
                .await;
        }
    }

    /// Order claimed tasks (hot keys, then lookups and primer pages, then keys never read) and group key
    /// tasks of primers with a batch query.
    fn plan(&self, claims: Vec<Claim>) -> Vec<Unit> {
        let mut ranked: Vec<Ranked> = claims
            .into_iter()
            .map(|claim| match TaskKind::parse(&claim.id) {
                Ok(TaskKind::Key(text)) => {
                    let key = self.catalog.parse_key(&text).ok();
                    let primer = key.as_ref().map(|k| k.primer);
                    match self.access.was_read(&text) {
                        Some(at) => (0, std::cmp::Reverse(Some(at)), claim, key, primer),
                        None => (2, std::cmp::Reverse(None), claim, key, primer),
                    }
                }
                _ => {
                    let primer = self.primer_of(&claim.id);
                    (1, std::cmp::Reverse(None), claim, None, primer)
                }
            })
            .collect();
        // Stable: equal ranks keep the queue's order (oldest first).
        ranked.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut units: Vec<Unit> = Vec::with_capacity(ranked.len());
        let mut batch_at: HashMap<usize, usize> = HashMap::new();
        for (_, _, claim, key, primer) in ranked {
            if let (Some(key), Some(p)) = (key, primer)
                && self.batchable(p)
            {
                let text = match TaskKind::parse(&claim.id) {
                    Ok(TaskKind::Key(text)) => text,
                    _ => continue,
                };
                match batch_at.get(&p) {
                    Some(&at) => {
                        if let Unit::Batch(_, items) = &mut units[at] {
                            items.push((claim, key, text));
                        }
                    }
                    None => {
                        batch_at.insert(p, units.len());
                        units.push(Unit::Batch(p, vec![(claim, key, text)]));
                    }
                }
                continue;
            }
            units.push(Unit::One(claim, primer));
        }
        // A batch of one is an ordinary refresh.
        units
            .into_iter()
            .map(|u| match u {
                Unit::Batch(p, mut items) if items.len() == 1 => match items.pop() {
                    Some((claim, _, _)) => Unit::One(claim, Some(p)),
                    None => Unit::Batch(p, items),
                },
                other => other,
            })
            .collect()
    }

    async fn settle(&self, claim: &Claim, index: Option<usize>) {
        let (outcome, elapsed) = {
            // Only the query holds the slot: recording the result overlaps the next query.
            let _slot = self.worker_queries.acquire().await;
            let started = Instant::now();
            (self.run(claim).await, started.elapsed())
        };
        let kind = TaskKind::parse(&claim.id).ok();
        let primer = match index {
            Some(i) => self.catalog.primers[i].name.clone(),
            None => kind
                .as_ref()
                .map_or_else(|| "unknown".to_string(), |k| self.task_primer(k)),
        };
        let written = match outcome {
            Ok(Outcome::Done(result, follow_up)) => {
                if let (Some(p), Some((_, key, _))) = (index, &result) {
                    self.refreshed(p, key);
                }
                let computed = result.is_some();
                let written = result
                    .as_ref()
                    .map(|(primer, key, entry)| (primer.as_str(), key.as_str(), entry.clone()));
                let finished = self.store.finish(claim, written, follow_up).await;
                match (&finished, &result) {
                    (Ok(Some(Stored::Written)), Some((_, key, _))) => self.hub.written(key),
                    (Ok(_), _) => self.hub.progressed(),
                    (Err(_), _) => {}
                }
                let label = match (&finished, computed, &kind) {
                    (Err(_), _, _) => None,
                    (Ok(Some(Stored::KeptNewer(_))), _, _) => Some("kept_newer"),
                    (Ok(_), true, _) => Some("ok"),
                    (Ok(_), false, Some(TaskKind::Key(_))) => Some("not_cached"),
                    (Ok(_), false, _) => Some("ok"),
                };
                if let Some(label) = label {
                    let timed = computed.then_some(elapsed);
                    self.telemetry.metrics.refresh(&primer, label, timed);
                    if label != "not_cached" {
                        self.record_success(&primer, timed);
                    }
                }
                finished.map(|_| ())
            }
            Err(error) => {
                let delay = backoff(claim.attempts);
                let park =
                    persistent(&error) && claim.attempts.saturating_add(1) >= self.park_after;
                match &error {
                    _ if park => {
                        self.telemetry.metrics.refresh(&primer, "parked", None);
                        self.record_failure(&primer, &error);
                        if let Some(p) = index {
                            self.failed(p, &error);
                        }
                        tracing::warn!(
                            task = %claim.id,
                            %primer,
                            attempts = claim.attempts + 1,
                            retry_in = ?self.parked_retry,
                            "Refresh parked: it failed the same way every time, so it no longer holds \
                             freshness waits (kck status lists parked tasks). Fix the primer's query or the \
                             data; a change to the key, or the slow retry, refreshes it again: {}",
                            crate::report::Chain(&error)
                        )
                    }
                    RefreshError::NotVisible { .. } => {
                        self.telemetry.metrics.refresh(&primer, "not_visible", None);
                        tracing::debug!(task = %claim.id, error = %crate::report::Chain(&error), "Retrying later.")
                    }
                    _ => {
                        self.telemetry.metrics.refresh(&primer, "failed", None);
                        self.record_failure(&primer, &error);
                        if let (Some(p), RefreshError::Query { .. } | RefreshError::Lookup { .. }) =
                            (index, &error)
                        {
                            self.failed(p, &error);
                        }
                        tracing::warn!(
                            task = %claim.id,
                            %primer,
                            attempts = claim.attempts + 1,
                            retry_in = ?delay,
                            "Refresh failed; retrying with backoff. Fix the primer's query (or the \
                             database) and it recovers on its own: {error}"
                        )
                    }
                }
                if park {
                    self.store.park(claim, self.parked_retry).await
                } else {
                    self.store.retry(claim, delay).await
                }
            }
        };
        if let Err(error) = written {
            tracing::error!(task = %claim.id, error = %crate::report::Chain(&error), "Cannot record a refresh; it will run again.");
        }
    }

    /// Refresh key tasks of one primer with its batch query; on failure, each key on its own (with its
    /// own retries).
    async fn settle_batch(&self, index: usize, items: Vec<(Claim, Key, String)>) {
        let (batch, took) = {
            let _slot = self.worker_queries.acquire().await;
            let started = Instant::now();
            (self.run_batch(index, &items).await, started.elapsed())
        };
        match batch {
            Ok(results) => {
                // Each key's share of the batch query's time.
                let each = took / items.len().max(1) as u32;
                self.stat(index, |s| s.batch_queries += 1);
                let primer = self.catalog.primers[index].name.as_str();
                // All at once: the store's writer puts them in one commit.
                let finishes = items.iter().zip(results).map(|((claim, _, text), entry)| {
                    let computed = entry.is_some();
                    let result = entry.map(|e| (primer, text.as_str(), e));
                    async move {
                        let finished = self.store.finish(claim, result, Vec::new()).await;
                        (computed, finished)
                    }
                });
                let finished = futures_util::future::join_all(finishes).await;
                for ((claim, _, text), (computed, finished)) in items.iter().zip(finished) {
                    match finished {
                        Ok(stored) => {
                            // As for one key: waiters and live-key subscribers of a written key are
                            // woken (they would otherwise learn it only by polling, or never).
                            match stored {
                                Some(Stored::Written) => self.hub.written(text),
                                _ => self.hub.progressed(),
                            }
                            if computed {
                                self.refreshed(index, text);
                                let label = match stored {
                                    Some(Stored::KeptNewer(_)) => "kept_newer",
                                    _ => "ok",
                                };
                                self.telemetry.metrics.refresh(primer, label, Some(each));
                                self.record_success(primer, Some(each));
                            } else {
                                self.telemetry.metrics.refresh(primer, "not_cached", None);
                            }
                        }
                        Err(error) => {
                            tracing::error!(task = %claim.id, error = %crate::report::Chain(&error),
                            "Cannot record a refresh; it will run again.")
                        }
                    }
                }
            }
            Err(error) => {
                if matches!(
                    error,
                    RefreshError::Batch { .. } | RefreshError::BatchShape { .. }
                ) {
                    self.record_failure(&self.catalog.primers[index].name, &error);
                    self.failed(index, &error);
                }
                tracing::warn!(primer = %self.catalog.primers[index].name, error = %crate::report::Chain(&error),
                    "Batch refresh failed; refreshing the keys one by one.");
                for (claim, _, _) in &items {
                    self.settle(claim, Some(index)).await;
                }
            }
        }
    }

    /// The entries to store for a batch (`None`: the key is not cached, or was cold and is dropped).
    async fn run_batch(
        &self,
        index: usize,
        items: &[(Claim, Key, String)],
    ) -> Result<Vec<Option<Entry>>, RefreshError> {
        let needed = items.iter().map(|i| i.0.lsn).max().unwrap_or_default();
        self.ensure_visible(needed).await?;
        let primer = &self.catalog.primers[index];
        let mut wanted = Vec::with_capacity(items.len());
        for (_, key, text) in items {
            if !self.store.is_registered(text).await? {
                wanted.push(None);
            } else if self.access.is_cold(text, primer.policy.cold_after) {
                self.drop_key(&primer.name, text).await?;
                self.stat(index, |s| s.dropped_cold += 1);
                wanted.push(None);
            } else {
                wanted.push(Some(key));
            }
        }
        let keys: Vec<&Key> = wanted.iter().flatten().copied().collect();
        let mut entries = if keys.is_empty() {
            Vec::new()
        } else {
            self.compute_batch(index, &keys, needed).await?
        }
        .into_iter();
        Ok(wanted
            .iter()
            .map(|w| w.and_then(|_| entries.next()))
            .collect())
    }
}

enum Outcome {
    /// Store this result (primer, key, entry) and queue these tasks.
    Done(Option<(String, String, Entry)>, Vec<Task>),
}

/// How many keys' last fetch the access log remembers (about 100 bytes each).
pub const ACCESS_LOG_CAPACITY: usize = 1_000_000;

/// A Postgres array literal of text elements (`{"1","a\"b"}`), parsed by Postgres with the parameter's
/// own array type.
fn pg_text_array(values: &[String]) -> String {
    let mut out = String::from("{");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in v.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// One JSON value at the start of `text`: the value and the rest of `text` after it.
fn leading_json(text: &str) -> Option<(serde_json::Value, &str)> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    let value = values.next()?.ok()?;
    let end = values.byte_offset();
    Some((value, &text[end..]))
}

/// Split a `row_to_json` object whose first field is `column` into that field's value (as key parameter
/// text) and the object without it.
fn split_first_field(row: &str, column: &str) -> Option<(String, String)> {
    let rest = row.strip_prefix('{')?;
    let (name, rest) = leading_json(rest)?;
    if name.as_str()? != column {
        return None;
    }
    let rest = rest.strip_prefix(':')?;
    let (value, rest) = leading_json(rest)?;
    let value = match value {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    let object = match rest.strip_prefix(',') {
        Some(fields) => format!("{{{fields}"),
        None if rest == "}" => "{}".to_owned(),
        None => return None,
    };
    Some((value, object))
}

/// The text of the first field's value of a `row_to_json` object, as Postgres wrote it.
fn first_field_value(row: &str) -> Option<String> {
    let rest = row.strip_prefix('{')?;
    let (_, rest) = leading_json(rest)?;
    let rest = rest.strip_prefix(':')?;
    let (_, after) = leading_json(rest)?;
    Some(rest[..rest.len() - after.len()].to_owned())
}

/// 100 ms, doubling per attempt, at most 30 s.
/// Whether a failed refresh would fail again the same way: Postgres refused the query itself (a data
/// exception, an undefined column, a constraint), not the connection, the server's resources or a
/// conflict with other sessions. Only those are parked after `refresh.park_after` attempts: an outage
/// must keep holding freshness waits, since every key is behind then.
fn persistent(error: &RefreshError) -> bool {
    let source = match error {
        RefreshError::Query { source, .. }
        | RefreshError::BadKeyValue { source, .. }
        | RefreshError::Lookup { source, .. }
        | RefreshError::Batch { source, .. } => source,
        RefreshError::BatchShape { .. } => return true,
        _ => return false,
    };
    let Some(code) = source.code() else {
        return false;
    };
    // 08 connection, 40 rollback (serialization, deadlock), 53 resources, 55 object in use (lock not
    // available), 57 operator intervention (cancel, shutdown, statement timeout), 58 system, XX internal.
    let class = code.code().get(..2).unwrap_or("");
    !matches!(class, "08" | "40" | "53" | "55" | "57" | "58" | "XX")
}

fn backoff(attempts: u32) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << attempts.min(16));
    Duration::from_millis(ms.min(30_000))
}

async fn sleep_or_shutdown(duration: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = shutdown.changed() => {}
    }
}

/// Prove commits visible as they are decoded, so refreshes rarely wait: one `pg_current_snapshot()` per
/// batch of commits.
pub async fn prove_visibility(
    source: Source,
    clock: Arc<VisibilityClock>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let client = match source.connect().await {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(error = %crate::report::Chain(&error), "Visibility prover cannot connect; retrying in 1 s.");
                sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await;
                if *shutdown.borrow() {
                    return;
                }
                continue;
            }
        };
        let statement = match client.prepare("SELECT pg_current_snapshot()::text").await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(error = %crate::report::Chain(&error), "Visibility prover cannot prepare its query; retrying in 1 s.");
                sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = clock.wait_recorded() => {}
                _ = shutdown.changed() => return,
            }
            let before = clock.visible();
            let text: String = match client.query_one(&statement, &[]).await {
                Ok(row) => row.get(0),
                Err(error) => {
                    tracing::warn!(error = %crate::report::Chain(&error), "Visibility prover lost its connection; reconnecting.");
                    break;
                }
            };
            if let Some(snapshot) = Snapshot::parse(&text)
                && clock.observe(&snapshot) == before
            {
                // Decoded but not visible yet: it will be within moments.
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_rows_are_split_by_their_first_column() {
        assert_eq!(
            split_first_field(r#"{"kck_key":42,"id":1,"t":"a,b"}"#, "kck_key"),
            Some(("42".into(), r#"{"id":1,"t":"a,b"}"#.into()))
        );
        assert_eq!(
            split_first_field(r#"{"kck_key":"x\"y","n":null}"#, "kck_key"),
            Some(("x\"y".into(), r#"{"n":null}"#.into()))
        );
        assert_eq!(
            split_first_field(r#"{"kck_key":7}"#, "kck_key"),
            Some(("7".into(), "{}".into()))
        );
        assert_eq!(
            split_first_field(r#"{"id":1,"kck_key":7}"#, "kck_key"),
            None
        );
        assert_eq!(
            first_field_value(r#"{"n":12.50,"m":1}"#).as_deref(),
            Some("12.50")
        );
        assert_eq!(first_field_value("{}"), None);
        assert_eq!(
            pg_text_array(&["1".into(), "a\"b\\".into()]),
            r#"{"1","a\"b\\"}"#
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(40), Duration::from_secs(30));
    }
}
