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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use postgres_types::{Format, IsNull, ToSql, Type};
use tokio::sync::{OnceCell, watch};
use tokio_postgres::NoTls;

use crate::freshness::Hub;
use crate::lsn::Lsn;
use crate::ops::Telemetry;
use crate::primer::{Catalog, Key, Mapping, ParamValue, Shape};
use crate::queue::TaskKind;
use crate::replication::{ReplicationState, Source};
use crate::store::{Claim, Entry, Store, StoreError, Stored, Task};
use crate::visibility::{Snapshot, VisibilityClock};

/// A refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("no Postgres connection available: {0}")]
    Pool(String),
    #[error(
        "the query of primer '{primer}' failed: {}",
        crate::replication::pg_error_text(source)
    )]
    Query {
        primer: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the lookup query of primer '{primer}' (dependency {dependency}) failed: {}",
        crate::replication::pg_error_text(source)
    )]
    Lookup {
        primer: String,
        dependency: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("could not read a snapshot: {0}")]
    Snapshot(String),
    #[error("could not mark a position in the WAL for a cache miss: {0}")]
    Mark(String),
    #[error("the change at {needed} is not visible yet (visible up to {visible})")]
    NotVisible { needed: Lsn, visible: Lsn },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A value bound as a query parameter in text form: Postgres parses it with the parameter's own type, so a
/// key's `42` binds to an `int4`, `int8` or `numeric` column alike. Never spliced into SQL.
#[derive(Debug)]
pub struct TextParam<'a>(pub Option<&'a str>);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    postgres_types::to_sql_checked!();
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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

type PrimeCell = Arc<OnceCell<Entry>>;

/// How one primer's refreshes go, for `/status`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrimerHealth {
    /// Refreshes that worked (keys computed, lookups run, key pages listed; fetch misses included).
    pub refreshes: u64,
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

/// Runs primer queries. See the module docs.
pub struct Refresher {
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn Store>,
    pub clock: Arc<VisibilityClock>,
    /// Told about every entry this refresher writes and every task it finishes (freshness waits).
    pub hub: Arc<Hub>,
    pool: Pool,
    visibility_timeout: Duration,
    priming: Mutex<HashMap<String, PrimeCell>>,
    /// The state of this process's own replication stream, if it has the role.
    local_stream: Option<watch::Receiver<ReplicationState>>,
    /// Per-primer successes and failures.
    pub health: RefreshHealth,
    telemetry: Arc<Telemetry>,
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
        let manager = Manager::from_config(
            source.pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| RefreshError::Pool(e.to_string()))?;
        Ok(Refresher {
            catalog,
            store,
            clock,
            hub: Arc::new(Hub::default()),
            pool,
            visibility_timeout,
            priming: Mutex::new(HashMap::new()),
            local_stream: None,
            health: RefreshHealth::default(),
            telemetry,
        })
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
            .map_err(|e| RefreshError::Mark(e.to_string()))?
            .get(0);
        text.parse()
            .map_err(|e: crate::lsn::ParseLsnError| RefreshError::Mark(e.to_string()))
    }

    /// Whether Postgres answers on a pooled connection (for `/readyz`).
    pub async fn ping(&self) -> Result<(), RefreshError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| RefreshError::Pool(e.to_string()))?;
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

    async fn client(&self) -> Result<deadpool_postgres::Object, RefreshError> {
        self.pool
            .get()
            .await
            .map_err(|e| RefreshError::Pool(e.to_string()))
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
            .map_err(|e| RefreshError::Snapshot(e.to_string()))?
            .get(0);
        drop(client);
        let snapshot = Snapshot::parse(&text)
            .ok_or_else(|| RefreshError::Snapshot(format!("unreadable snapshot '{text}'")))?;
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
            expires_at_ms: None,
        })
    }

    /// Compute, store and return a key that a fetch missed. Concurrent calls for one key share one query.
    pub async fn prime(&self, key: &Key, text: &str) -> Result<Entry, RefreshError> {
        let cell = {
            let mut priming = self.priming.lock().unwrap_or_else(|e| e.into_inner());
            priming.entry(text.to_string()).or_default().clone()
        };
        let result = cell
            .get_or_try_init(|| async {
                let primer = &self.catalog.primers[key.primer].name;
                // Registered first: the stream queues refreshes only for registered keys, so a change it
                // decodes from now on is refreshed. Then the computation waits until everything the stream
                // decoded before is visible, so no change falls between the two.
                self.store.register_key(primer, text).await?;
                let needed = self.miss_position().await?;
                let entry = self.compute(key, needed).await?;
                match self.store.store_result(primer, text, entry.clone()).await? {
                    Stored::Written => {
                        self.hub.written(text);
                        Ok(entry)
                    }
                    Stored::KeptNewer(_) => Ok(self.store.get(text).await?.unwrap_or(entry)),
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
                let entry = self.compute(&key, claim.lsn).await?;
                let primer = self.catalog.primers[key.primer].name.clone();
                Ok(Outcome::Done(Some((primer, text, entry)), Vec::new()))
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
        let params: Vec<TextParam<'_>> = args.iter().map(|a| TextParam(a.as_deref())).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let lookup_error = |source| RefreshError::Lookup {
            primer: primer_name.to_string(),
            dependency,
            source,
        };
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&wrapped_lookup(query))
            .await
            .map_err(lookup_error)?;
        let rows = client
            .query(&statement, &refs)
            .await
            .map_err(lookup_error)?;
        let mut tasks = Vec::new();
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
                tasks.push(TaskKind::Key(self.catalog.render(&key)).task(needed));
            }
        }
        Ok(tasks)
    }

    /// Claim and run tasks until `shutdown`.
    pub async fn work(self: Arc<Self>, worker: usize, mut shutdown: watch::Receiver<bool>) {
        const LEASE: Duration = Duration::from_secs(60);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let claims = match self.store.claim(1, LEASE).await {
                Ok(claims) => claims,
                Err(error) => {
                    tracing::error!(worker, %error, "Cannot claim refresh tasks; retrying in 1 s.");
                    sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await;
                    continue;
                }
            };
            if claims.is_empty() {
                tokio::select! {
                    _ = self.store.wait_for_tasks(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            for claim in claims {
                self.settle(&claim).await;
            }
        }
    }

    async fn settle(&self, claim: &Claim) {
        let started = Instant::now();
        let outcome = self.run(claim).await;
        let elapsed = started.elapsed();
        let kind = TaskKind::parse(&claim.id).ok();
        let primer = kind
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |k| self.task_primer(k));
        let written = match outcome {
            Ok(Outcome::Done(result, follow_up)) => {
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
                match &error {
                    RefreshError::NotVisible { .. } => {
                        self.telemetry.metrics.refresh(&primer, "not_visible", None);
                        tracing::debug!(task = %claim.id, %error, "Retrying later.")
                    }
                    _ => {
                        self.telemetry.metrics.refresh(&primer, "failed", None);
                        self.record_failure(&primer, &error);
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
                self.store.retry(claim, delay).await
            }
        };
        if let Err(error) = written {
            tracing::error!(task = %claim.id, %error, "Cannot record a refresh; it will run again.");
        }
    }
}

enum Outcome {
    /// Store this result (primer, key, entry) and queue these tasks.
    Done(Option<(String, String, Entry)>, Vec<Task>),
}

/// 100 ms, doubling per attempt, at most 30 s.
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
                tracing::warn!(%error, "Visibility prover cannot connect; retrying in 1 s.");
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
                tracing::warn!(%error, "Visibility prover cannot prepare its query; retrying in 1 s.");
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
                    tracing::warn!(%error, "Visibility prover lost its connection; reconnecting.");
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
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(800));
        assert_eq!(backoff(40), Duration::from_secs(30));
    }
}
