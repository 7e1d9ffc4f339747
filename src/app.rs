//! The running process: wires the modules together and stops them in order.
//!
//! [`start`] binds the HTTP port (first: a port in use must not leave a new slot behind), opens the
//! store, refuses primers `kck check` calls FAIL ([`crate::ops::check::primers`]: a query that does not
//! prepare, a column a dependency names that the table lacks), checks the source
//! ([`replication::preflight`]), starts the replication
//! stream, the visibility prover, the refresh workers and the HTTP server, and returns once the slot is held
//! and the server listens, or with the first error. [`Running::shutdown`] stops taking requests (in-flight
//! ones finish), flushes and acknowledges what the stream read, and stops the workers.
//!
//! # Roles
//! A process runs the roles in [`Config::roles`] (`kck run --roles`): `replication` (hold the slot, queue
//! refreshes), `refresh` (workers) and `http`. With a shared store (ScyllaDB) any number of processes
//! may run `refresh` and `http`; one at a time streams from the slot. With the embedded store, one process
//! opens the file, so it must run every role.
//!
//! # Owning the slot, and hot standby
//! A `replication` process first takes the slot's advisory lock ([`SlotLock`]) on a session of its own
//! and holds it while it streams. If another process holds it: without `source.standby` the process
//! waits `slot_wait` (a previous owner may just have died) and then stops with
//! [`ReplicationError::SlotInUse`]; with `source.standby: true` it starts its other roles, reports
//! [`ReplicationState::Standby`], and polls the lock every `standby_poll` until the owner's session ends,
//! then runs preflight and streams from where the owner acknowledged.
//!
//! # Visibility across processes
//! A refresh must see the change that asked for it ([`VisibilityClock`]). The streaming process proves
//! commits visible; with a shared store it publishes its watermark in the store's meta
//! ([`VISIBLE_META`]), and every process learns it from there, so refresh workers in other processes know
//! what their snapshots see.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::{Config, Roles, StoreConfig};
use crate::deps::DepIndex;
use crate::freshness::Progress;
use crate::http::{AppState, app};
use crate::jobs::Jobs;
use crate::lsn::Lsn;
use crate::ops::check::{Level, Report};
use crate::ops::{self, Ops};
use crate::pg::Source;
use crate::primer::Catalog;
use crate::refresh::{Refresher, prove_visibility};
pub use crate::replication::ReplicationState;
use crate::replication::{
    self, ReplicationError, SlotLock, SlotState, Stream, StreamLimits, StreamStats,
};
use crate::schedule;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Store, StoreError};
use crate::telemetry::Telemetry;
use crate::update::{UpdateError, Updates};
use crate::visibility::VisibilityClock;

/// The store meta name under which the streaming process publishes its visible watermark (LSN text).
pub const VISIBLE_META: &str = "kck.visible_lsn";

/// kck could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the refresh workers: {0}")]
    Refresh(#[from] crate::refresh::RefreshError),
    #[error("cannot set up updaters: {0}")]
    Update(#[from] UpdateError),
    #[error("write.url is not a valid connection string: {0}")]
    WriteUrl(String),
    #[error("{0}")]
    Roles(String),
    #[error("a kck task failed: {0}")]
    Task(String),
    /// A primer's dependencies could not be checked against its query, or would leave keys stale.
    #[error(transparent)]
    Dependencies(#[from] crate::plan::PlanError),
    /// `kck check` fails on a primer (its query does not prepare, a column it names is missing, ...):
    /// kck would serve errors or stale values, so it does not start.
    #[error(
        "kck does not start: these checks of kck check fail against the live database, so kck would \
         answer errors or serve stale values:\n{}Fix them and start again (`kck check --config FILE` runs \
         every check).",
        report.failures()
    )]
    Check { report: Report },
}

/// Knobs that are not part of the user's config (tests and benchmarks set them).
#[derive(Clone)]
pub struct RunOptions {
    /// How long to wait for a slot another session holds before giving up (without standby).
    pub slot_wait: Duration,
    pub limits: StreamLimits,
    /// How often a standby looks whether the slot's owner is gone.
    pub standby_poll: Duration,
    /// How often the visible watermark is published to, and read from, a shared store.
    pub watermark_poll: Duration,
    /// How often the slot monitor reads the slot (lag, retained WAL, wal_status).
    pub monitor_interval: Duration,
    /// Use this store instead of opening the configured one, as a store that several kck instances
    /// share (tests run split roles in one process this way).
    pub shared_store: Option<Arc<dyn Store>>,
    /// Wraps the opened store (tests slow it down, for example).
    pub wrap_store: Option<StoreWrapper>,
    /// Start with the refresh workers paused ([`Refresher::pause`]).
    pub paused: bool,
}

/// Wraps one store in another.
pub type WrapStore = dyn Fn(Arc<dyn Store>) -> Arc<dyn Store> + Send + Sync;

/// A function that wraps the store kck opens (see [`RunOptions::wrap_store`]).
#[derive(Clone)]
pub struct StoreWrapper(pub Arc<WrapStore>);

impl std::fmt::Debug for StoreWrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreWrapper")
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            slot_wait: Duration::from_secs(10),
            limits: StreamLimits::default(),
            standby_poll: Duration::from_secs(1),
            watermark_poll: Duration::from_millis(50),
            monitor_interval: Duration::from_secs(2),
            shared_store: None,
            wrap_store: None,
            paused: false,
        }
    }
}

/// A started kck.
pub struct Running {
    /// Where HTTP is served; `0.0.0.0:0` when this process does not have the `http` role.
    pub http_addr: SocketAddr,
    pub roles: Roles,
    pub store: Arc<dyn Store>,
    pub stats: Arc<StreamStats>,
    pub clock: Arc<VisibilityClock>,
    /// Status, metrics and the slot monitor's readings.
    pub ops: Arc<Ops>,
    /// The refresh workers' state: pause/resume, per-primer stats.
    pub refresher: Arc<Refresher>,
    /// The process worker's jobs and their status.
    pub jobs: Arc<Jobs>,
    replication_state: watch::Receiver<ReplicationState>,
    shutdown: watch::Sender<bool>,
    /// Becomes true when replication stopped with an error (kck cannot go on).
    failed: watch::Receiver<bool>,
    replication: JoinHandle<Result<(), ReplicationError>>,
    others: Vec<JoinHandle<()>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
}

/// Create the configured store if it is missing (`kck store init`): the keyspace and tables of a
/// scylla store (idempotent), or the file of an embedded store. Returns what was done, for people.
pub async fn init_store(config: &Config) -> Result<String, StoreError> {
    match &config.store {
        StoreConfig::Embedded { path, .. } => {
            let store = EmbeddedStore::open_with(path, 0)?;
            Ok(format!("embedded store ready: {}", store.path().display()))
        }
        #[cfg(feature = "scylla")]
        StoreConfig::Scylla(scylla) => {
            crate::store::scylla::init_schema(scylla).await?;
            Ok(format!(
                "scylla store ready: keyspace {} on {} ({} tables)",
                scylla.keyspace,
                scylla.nodes.join(", "),
                crate::store::cql::TABLES.len()
            ))
        }
        #[cfg(not(feature = "scylla"))]
        StoreConfig::Scylla(_) => Err(StoreError::failed(
            "this kck was built without the `scylla` feature: rebuild with `--features scylla` to use \
             store.kind: scylla",
        )),
    }
}

/// Open the configured store.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    match &config.store {
        StoreConfig::Embedded {
            path,
            memory_cache,
            capacity,
        } => Ok(Arc::new(EmbeddedStore::open_configured(
            path,
            *memory_cache,
            *capacity,
        )?)),
        #[cfg(feature = "scylla")]
        StoreConfig::Scylla(scylla) => Ok(Arc::new(
            crate::store::scylla::ScyllaStore::open(scylla).await?,
        )),
        #[cfg(not(feature = "scylla"))]
        StoreConfig::Scylla(_) => Err(StoreError::failed(
            "this kck was built without the `scylla` feature: rebuild with `--features scylla` to use \
             store.kind: scylla",
        )),
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("slot_wait", &self.slot_wait)
            .field("limits", &self.limits)
            .field("standby_poll", &self.standby_poll)
            .field("watermark_poll", &self.watermark_poll)
            .field("monitor_interval", &self.monitor_interval)
            .field("shared_store", &self.shared_store.is_some())
            .finish()
    }
}

/// Check that the roles can run on the configured store.
fn check_roles(config: &Config, options: &RunOptions) -> Result<(), AppError> {
    let embedded = matches!(config.store, StoreConfig::Embedded { .. });
    if embedded && options.shared_store.is_none() && config.roles != Roles::ALL {
        return Err(AppError::Roles(format!(
            "roles '{}' need a store that several processes share: the embedded store is one file that \
             only one process can open, so that process must run every role (replication, refresh, http). \
             Run kck without --roles, or use store.kind: scylla to split the roles across processes.",
            config.roles
        )));
    }
    Ok(())
}

/// What the replication role holds when [`start`] returns.
enum Slot {
    /// The lock and the slot, ready to stream.
    Owned(Box<SlotLock>, SlotState),
    /// Another process owns the slot; wait for it.
    Standby,
}

/// Refuse to start with a primer `kck check` calls FAIL ([`crate::ops::check::primers`]: a query or
/// lookup that does not prepare, a table or column its dependencies name that does not exist, ...), with
/// check's own words; log its warnings.
async fn refuse_failing_primers(
    client: &tokio_postgres::Client,
    catalog: &Catalog,
) -> Result<(), AppError> {
    let report = crate::ops::check::primers(client, catalog).await;
    for finding in report.findings.iter().filter(|f| f.level == Level::Warn) {
        tracing::warn!(topic = %finding.topic, "{}", finding.message);
    }
    if report.count(Level::Fail) > 0 {
        return Err(AppError::Check { report });
    }
    Ok(())
}

/// The catalog with every primer's dependencies checked against its query's plan: a primer without
/// `depends_on` follows every table it reads (at table level), and one whose `depends_on` misses a table
/// is an error (see [`crate::plan`]).
async fn follow_what_queries_read(
    client: &tokio_postgres::Client,
    catalog: &Catalog,
) -> Result<Catalog, AppError> {
    let (catalog, followed) = crate::plan::complete(client, catalog).await?;
    for f in followed {
        for warning in &f.warnings {
            tracing::warn!(primer = %f.primer, "{warning}");
        }
        if f.added.is_empty() {
            continue;
        }
        let Some(primer) = catalog.primers.iter().find(|p| p.name == f.primer) else {
            continue;
        };
        let tables: Vec<String> = f
            .added
            .iter()
            .map(|(t, how)| format!("{t}: {}", how.describe(primer)))
            .collect();
        tracing::info!(
            primer = %f.primer,
            tables = %tables.join("; "),
            "The primer has no depends_on: kck follows every table its query reads, inferred from its plan."
        );
    }
    Ok(catalog)
}

/// Take the slot's lock, waiting up to `slot_wait` (an owner that just died); then preflight. With
/// `standby`, a lock held by someone else is [`Slot::Standby`] rather than an error.
async fn take_slot(
    source: &Source,
    deps: &DepIndex,
    options: &RunOptions,
    standby: bool,
    telemetry: &Telemetry,
) -> Result<Slot, ReplicationError> {
    let lock = SlotLock::connect(source).await?;
    let deadline = tokio::time::Instant::now() + options.slot_wait;
    loop {
        if lock.try_lock().await? {
            break;
        }
        if standby {
            // Fail now on what would stop a takeover later (wal_level, privilege, publication).
            replication::check_source(source, deps).await?;
            return Ok(Slot::Standby);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ReplicationError::SlotInUse {
                slot: source.config.slot.clone(),
                pid: SlotLock::holder(source).await,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let slot = ops::slot::prepare(source, deps, options.slot_wait, telemetry).await?;
    Ok(Slot::Owned(Box::new(lock), slot))
}

/// Start kck. See the module docs.
pub async fn start(config: Config, options: RunOptions) -> Result<Running, AppError> {
    check_roles(&config, &options)?;
    let roles = config.roles;
    // The port first, before anything leaves a trace: a port in use must not leave behind a replication
    // slot just created (an inactive slot keeps WAL). Connections wait in the backlog until it serves.
    if roles.http
        && let Some(why) = crate::http::exposure_warning(config.http.bind, &config.auth)
    {
        tracing::warn!("{why}.");
    }
    let listener = if roles.http {
        let listener = tokio::net::TcpListener::bind(config.http.bind)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.http.bind,
                source,
            })?;
        Some(listener)
    } else {
        None
    };
    let shared_store =
        options.shared_store.is_some() || matches!(config.store, StoreConfig::Scylla(_));
    let mut store = match &options.shared_store {
        Some(store) => store.clone(),
        None => open_store(&config).await?,
    };
    if let Some(wrap) = &options.wrap_store {
        store = (wrap.0)(store);
    }
    let source = Source::new(&config.source).map_err(ReplicationError::from)?;
    let catalog = {
        let client = source.connect().await.map_err(ReplicationError::from)?;
        refuse_failing_primers(&client, &config.catalog).await?;
        Arc::new(if roles.replication {
            follow_what_queries_read(&client, &config.catalog).await?
        } else {
            config.catalog.clone()
        })
    };
    let deps = Arc::new(DepIndex::new(catalog.clone()));
    let telemetry = Arc::new(Telemetry::default());
    let stats = Arc::new(StreamStats::default());
    let (state_tx, state_rx) = watch::channel(if roles.replication {
        ReplicationState::Starting
    } else {
        ReplicationState::Off
    });
    let state_tx = Arc::new(state_tx);

    // The slot first: a plain start fails fast when another process holds it.
    let slot = if roles.replication {
        Some(take_slot(&source, &deps, &options, config.source.standby, &telemetry).await?)
    } else {
        None
    };
    let start_lsn = match &slot {
        Some(Slot::Owned(_, s)) => s.confirmed_flush,
        _ => Lsn::ZERO,
    };
    let clock = Arc::new(VisibilityClock::new(start_lsn, 100_000));
    stats.acked.store(start_lsn.0, Ordering::Relaxed);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut others = Vec::new();

    // Always made (its pool connects lazily): misses, `/readyz` and status use it in every role.
    let workers = if roles.refresh {
        config.refresh.workers
    } else {
        0
    };
    let refresher = Arc::new(
        Refresher::new(
            &source,
            config.refresh.pool_size,
            catalog.clone(),
            store.clone(),
            clock.clone(),
            config.refresh.visibility_timeout,
            telemetry.clone(),
        )?
        .with_local_stream(state_rx.clone())
        .with_claim_batch(config.refresh.claim_batch)
        .with_absent_rows(config.refresh.absent_rows)
        .with_parking(config.refresh.park_after, config.refresh.parked_retry)
        .with_miss_limit(config.http.max_concurrent_misses, config.http.miss_wait),
    );
    if options.paused {
        refresher.pause();
    }
    // Reads are seen (and remembered) by the process that serves them.
    refresher.access.set_sees_reads(roles.http);
    if roles.refresh
        && !roles.http
        && config
            .catalog
            .primers
            .iter()
            .any(|p| p.policy.cold_after.is_some())
    {
        tracing::warn!(
            "cold_after is set, but this process does not serve HTTP, so it cannot see which keys are read: \
             its workers recompute every key instead of dropping cold ones, and run them oldest first. Run \
             the refresh role with the http role for cold keys to be dropped and hot keys to go first."
        );
    }
    for worker in 0..workers {
        others.push(tokio::spawn(
            refresher.clone().work(worker, shutdown_rx.clone()),
        ));
    }
    // Schedules, expiry and jobs run where refreshes do (several such processes coalesce their
    // schedules in the queue, and take turns at jobs through the store's leases).
    let (jobs, job_tasks) = if roles.refresh {
        others.push(tokio::spawn(schedule::run_intervals(
            refresher.clone(),
            shutdown_rx.clone(),
        )));
        others.push(tokio::spawn(schedule::sweep_expired(
            refresher.clone(),
            shutdown_rx.clone(),
        )));
        crate::jobs::spawn(
            &config.jobs,
            source.clone(),
            store.clone(),
            crate::jobs::holder_id(),
            shutdown_rx.clone(),
        )
    } else {
        (Arc::new(Jobs::default()), Vec::new())
    };
    others.extend(job_tasks);
    if shared_store {
        others.push(tokio::spawn(follow_watermark(
            store.clone(),
            clock.clone(),
            options.watermark_poll,
            shutdown_rx.clone(),
        )));
    }

    let (failed_tx, failed) = watch::channel(false);
    let replication = match slot {
        None => {
            let mut stop = shutdown_rx.clone();
            tokio::spawn(async move {
                let _ = stop.wait_for(|s| *s).await;
                Ok(())
            })
        }
        Some(slot) => {
            others.push(tokio::spawn(prove_visibility(
                source.clone(),
                clock.clone(),
                shutdown_rx.clone(),
            )));
            if shared_store {
                others.push(tokio::spawn(publish_watermark(
                    store.clone(),
                    clock.clone(),
                    stats.clone(),
                    state_rx.clone(),
                    options.watermark_poll,
                    shutdown_rx.clone(),
                )));
            }
            let stream = Stream {
                source: source.clone(),
                deps: deps.clone(),
                store: store.clone(),
                clock: clock.clone(),
                stats: stats.clone(),
                limits: StreamLimits {
                    max_queue: options.limits.max_queue.min(config.refresh.max_queue),
                    ..options.limits
                },
                state: state_tx.clone(),
            };
            let owned = matches!(slot, Slot::Owned(..));
            let (started_tx, started_rx) = oneshot::channel();
            let replicated = replicate(
                stream,
                slot,
                config.source.standby,
                options.clone(),
                owned.then_some(started_tx),
                shutdown_rx.clone(),
                telemetry.clone(),
            );
            let task = tokio::spawn(async move {
                let result = replicated.await;
                if result.is_err() {
                    let _ = failed_tx.send(true);
                }
                result
            });
            if owned {
                // Report the first session's error from `start`.
                let mut task = task;
                if started_rx.await.is_err() {
                    let _ = shutdown.send(true);
                    return Err(match (&mut task).await {
                        Ok(Err(e)) => e.into(),
                        Ok(Ok(())) => AppError::Task("replication ended before it started".into()),
                        Err(e) => AppError::Task(e.to_string()),
                    });
                }
                task
            } else {
                state_tx.send_replace(ReplicationState::Standby);
                tracing::info!(
                    slot = %config.source.slot,
                    "Another kck owns the replication slot: waiting as a hot standby."
                );
                task
            }
        }
    };

    let ops = Arc::new(
        Ops::new(
            source.clone(),
            catalog.clone(),
            store.clone(),
            stats.clone(),
            clock.clone(),
            refresher.clone(),
            telemetry.clone(),
        )
        .with_replication_state(state_rx.clone())
        .with_jobs(jobs.clone()),
    );
    others.push(tokio::spawn(ops::monitor::run(
        ops.clone(),
        options.monitor_interval,
        shutdown_rx.clone(),
    )));
    let mut http = None;
    let mut http_addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    if let Some(listener) = listener {
        // Warm before serving, so that the first requests hit.
        schedule::warm(&refresher, config.refresh.workers).await;
        http_addr = listener.local_addr().map_err(|source| AppError::Bind {
            addr: config.http.bind,
            source,
        })?;
        let updates = if config.updaters.is_empty() {
            None
        } else {
            let writer = Source::new(&crate::pg::SourceConfig {
                url: config.write.url.clone(),
                ..config.source.clone()
            })
            .map_err(|e| AppError::WriteUrl(e.to_string()))?;
            Some(Arc::new(Updates::new(
                &writer,
                config.write.connections,
                config.updaters.clone(),
                config.http.request_timeout,
            )?))
        };
        let state = AppState {
            store: store.clone(),
            catalog,
            primer: config.prime_on_cache_miss.then(|| refresher.clone()),
            hub: refresher.hub.clone(),
            progress: Progress::new(store.clone(), stats.clone(), clock.clone(), shared_store),
            updates,
            auth: Authenticator::from_config(&config.auth).map(Arc::new),
            limits: config.http.clone(),
            shutdown: shutdown_rx.clone(),
            refresher: Some(refresher.clone()),
        };
        let router = ops::http::observe(
            app(state, ops::http::router(ops.clone())),
            telemetry.clone(),
        );
        let http_shutdown = shutdown_rx.clone();
        let limits = config.http.connection_limits();
        http = Some(tokio::spawn(async move {
            crate::listen::serve(listener, router, limits, http_shutdown).await
        }));
        tracing::info!(%http_addr, roles = %roles, "kck is serving.");
    } else {
        tracing::info!(roles = %roles, "kck is running.");
    }
    Ok(Running {
        http_addr,
        roles,
        store,
        stats,
        clock,
        ops,
        refresher,
        jobs,
        replication_state: state_rx,
        shutdown,
        failed,
        replication,
        others,
        http,
    })
}

/// Read the watermark the streaming process published and learn it, every `every`.
async fn follow_watermark(
    store: Arc<dyn Store>,
    clock: Arc<VisibilityClock>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut warned = false;
    loop {
        match store.get_meta(VISIBLE_META).await {
            Ok(Some(bytes)) => match std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.parse().ok())
            {
                Some(lsn) => clock.learn(lsn),
                None => tracing::warn!("The published visible watermark is unreadable; ignored."),
            },
            Ok(None) => {}
            Err(error) if !warned => {
                warned = true;
                tracing::warn!(error = %crate::report::Chain(&error), "Cannot read the published visible watermark; retrying.");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// While this process streams, publish its visible watermark, and its acknowledged position (for
/// freshness waits in other processes: [`crate::freshness::ACKED_META`]), whenever they move (at most every
/// `every`).
async fn publish_watermark(
    store: Arc<dyn Store>,
    clock: Arc<VisibilityClock>,
    stats: Arc<StreamStats>,
    state: watch::Receiver<ReplicationState>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut published = Lsn::ZERO;
    let mut published_acked = Lsn::ZERO;
    loop {
        let visible = clock.visible();
        let streaming = *state.borrow() == ReplicationState::Streaming;
        if streaming && visible > published {
            match store
                .put_meta(VISIBLE_META, Bytes::from(visible.to_string()))
                .await
            {
                Ok(()) => published = visible,
                Err(error) => {
                    tracing::warn!(error = %crate::report::Chain(&error), "Cannot publish the visible watermark; retrying.")
                }
            }
        }
        let acked = Lsn(stats.acked.load(Ordering::Acquire));
        if streaming && acked > published_acked {
            match store
                .put_meta(crate::freshness::ACKED_META, Bytes::from(acked.to_string()))
                .await
            {
                Ok(()) => published_acked = acked,
                Err(error) => {
                    tracing::warn!(error = %crate::report::Chain(&error), "Cannot publish the acknowledged position; retrying.")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The replication role for the life of the process: own the slot (or wait for it as a standby), stream,
/// and go back to waiting if ownership is lost. `started` (when `start` waits for the first session) is
/// signalled once the first session streams; an error before that is returned.
async fn replicate(
    stream: Stream,
    slot: Slot,
    standby: bool,
    options: RunOptions,
    mut started: Option<oneshot::Sender<()>>,
    shutdown: watch::Receiver<bool>,
    telemetry: Arc<Telemetry>,
) -> Result<(), ReplicationError> {
    let mut slot = Some(slot);
    loop {
        let (mut lock, state) = match slot.take() {
            Some(Slot::Owned(lock, state)) => (*lock, state),
            Some(Slot::Standby) | None => {
                match wait_for_slot(&stream, standby, &options, &shutdown, &telemetry).await? {
                    Some(owned) => owned,
                    None => return Ok(()),
                }
            }
        };
        stream.state.send_replace(ReplicationState::Starting);
        stream.clock.learn(state.confirmed_flush);
        stream
            .stats
            .acked
            .fetch_max(state.confirmed_flush.0, Ordering::Relaxed);
        if state.created {
            // Changes made while no slot existed were not seen: refresh whatever is cached.
            rebuild_after_lost_slot(&stream, state.confirmed_flush, &telemetry).await;
        }
        let result = supervise(
            &stream,
            state.confirmed_flush,
            options.slot_wait,
            &mut started,
            shutdown.clone(),
            &mut lock,
            &telemetry,
        )
        .await;
        match result {
            Err(ReplicationError::OwnershipLost { slot }) if !*shutdown.borrow() => {
                tracing::error!(%slot, "Lost ownership of the replication slot; taking it again.");
            }
            other => return other,
        }
    }
}

/// Wait until this process owns the slot: as a standby, poll the lock every `standby_poll` (one cheap
/// query on one session) for as long as it takes; otherwise for `slot_wait`, then fail. Once the lock is
/// held, preflight (which waits for the old owner's replication session to end). `None` on shutdown.
async fn wait_for_slot(
    stream: &Stream,
    standby: bool,
    options: &RunOptions,
    shutdown: &watch::Receiver<bool>,
    telemetry: &Telemetry,
) -> Result<Option<(SlotLock, SlotState)>, ReplicationError> {
    let mut shutdown = shutdown.clone();
    let source = &stream.source;
    let slot = &source.config.slot;
    let poll = if standby {
        stream.state.send_replace(ReplicationState::Standby);
        tracing::info!(%slot, "Standby: waiting for the replication slot's owner to go away.");
        options.standby_poll
    } else {
        Duration::from_millis(200)
    };
    let deadline = tokio::time::Instant::now() + options.slot_wait;
    let mut since_log = tokio::time::Instant::now();
    let mut lock: Option<SlotLock> = None;
    loop {
        let attempt = async {
            let held = match lock.take() {
                Some(l) if !l.is_lost() => l,
                _ => SlotLock::connect(source).await?,
            };
            let got = held.try_lock().await;
            lock = Some(held);
            if !got? {
                return Ok(None);
            }
            ops::slot::prepare(source, &stream.deps, options.slot_wait, telemetry)
                .await
                .map(Some)
        };
        let outcome = tokio::select! {
            r = attempt => r,
            _ = shutdown.wait_for(|s| *s) => return Ok(None),
        };
        match outcome {
            Ok(Some(state)) => {
                if let Some(lock) = lock.take() {
                    if standby {
                        tracing::info!(%slot, "Standby: took over the replication slot.");
                    }
                    return Ok(Some((lock, state)));
                }
            }
            Ok(None) if !standby && tokio::time::Instant::now() >= deadline => {
                return Err(ReplicationError::SlotInUse {
                    slot: slot.clone(),
                    pid: SlotLock::holder(source).await,
                });
            }
            Ok(None) => {
                if standby && since_log.elapsed() >= Duration::from_secs(60) {
                    since_log = tokio::time::Instant::now();
                    tracing::info!(%slot, "Standby: still waiting for the replication slot.");
                }
            }
            // Holding the lock, but the old owner's session still streams, or the source is unreachable:
            // keep the lock (this process is next) and try again.
            Err(e)
                if standby
                    && (e.is_transient() || matches!(e, ReplicationError::SlotInUse { .. })) =>
            {
                tracing::warn!(%slot, error = %crate::report::Chain(&e), "Standby: cannot take over the replication slot yet; retrying.");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(None),
        }
    }
}

/// The slot was created (it had never existed, disappeared, or was invalidated and created again):
/// changes may have been missed, so every cached key is refreshed.
async fn rebuild_after_lost_slot(stream: &Stream, at: Lsn, telemetry: &Telemetry) {
    if stream.deps.catalog().primers.is_empty() {
        return;
    }
    let tasks = ops::slot::rebuild_tasks(stream.deps.catalog(), at);
    if let Err(error) = stream.store.enqueue(tasks).await {
        tracing::error!(
            error = %crate::report::Chain(&error),
            "Cannot queue the rebuild of the cache; restart kck once the store works again."
        );
        telemetry.events.error(
            "slot",
            format!(
                "cannot queue the rebuild of the cache: {}",
                crate::report::Chain(&error)
            ),
        );
    }
    stream.stats.acked.fetch_max(at.0, Ordering::Relaxed);
}

/// Keep a replication session running while this process owns the slot: reconnect after transient
/// failures, with backoff. Returns the error of a first session that never started, `OwnershipLost`
/// when the slot lock's session ended (the stream is stopped first, what it read flushed), or `Ok` on
/// shutdown.
async fn supervise(
    stream: &Stream,
    confirmed: Lsn,
    slot_wait: Duration,
    started: &mut Option<oneshot::Sender<()>>,
    mut shutdown: watch::Receiver<bool>,
    lock: &mut SlotLock,
    telemetry: &Telemetry,
) -> Result<(), ReplicationError> {
    let mut failures = 0u32;
    loop {
        let start = Lsn(stream.stats.acked.load(Ordering::Relaxed)).max(confirmed);
        // The session stops on shutdown or when the lock's session ends.
        let (stop_tx, stop_rx) = watch::channel(false);
        let result = {
            let run = stream.run(start, stop_rx, started);
            tokio::pin!(run);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = &mut run => break r,
                    _ = shutdown.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        let _ = stop_tx.send(true);
                    }
                    _ = lock.lost(), if !stopping => {
                        stopping = true;
                        let _ = stop_tx.send(true);
                    }
                }
            }
        };
        if *shutdown.borrow() {
            return result;
        }
        if lock.is_lost() {
            return Err(ReplicationError::OwnershipLost {
                slot: lock.slot().to_owned(),
            });
        }
        stream.state.send_replace(ReplicationState::Starting);
        let error = match result {
            Ok(()) => ReplicationError::Protocol("the server ended the replication stream".into()),
            Err(e) => e,
        };
        if started.is_some() {
            return Err(error);
        }
        failures += 1;
        let delay = Duration::from_millis(500u64.saturating_mul(1 << failures.min(6)).min(30_000));
        tracing::error!(
            error = %crate::report::Chain(&error),
            retry_in = ?delay,
            "Replication stopped; reconnecting. If this repeats, check that Postgres is up and \
             reachable (kck status shows the slot)."
        );
        telemetry
            .events
            .error("replication", format!("stopped: {error}; reconnecting"));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(()),
            _ = lock.lost() => {
                return Err(ReplicationError::OwnershipLost { slot: lock.slot().to_owned() });
            }
        }
        // The slot may have been dropped meanwhile: then changes were missed, and every key is rebuilt.
        match ops::slot::prepare(&stream.source, &stream.deps, slot_wait, telemetry).await {
            Ok(slot) if slot.created => {
                let message = "The replication slot had disappeared (or was invalidated) and was created \
                               again: changes may have been missed, so every cached key is being refreshed.";
                tracing::error!(slot = %stream.source.config.slot, "{message}");
                telemetry.events.error("slot", message);
                rebuild_after_lost_slot(stream, slot.confirmed_flush, telemetry).await;
                stream
                    .stats
                    .acked
                    .store(slot.confirmed_flush.0, Ordering::Relaxed);
            }
            Ok(_) => {}
            // An invalidated slot under `on_slot_lost: fail`: retrying cannot help.
            Err(error @ ReplicationError::SlotLost { .. }) => return Err(error),
            Err(error) => {
                tracing::error!(error = %crate::report::Chain(&error), "The source is not ready; retrying.");
                telemetry
                    .events
                    .error("replication", format!("source not ready: {error}"));
            }
        }
        if failures > 0 && stream.stats.acked.load(Ordering::Relaxed) > start.0 {
            failures = 0;
        }
    }
}

impl Running {
    /// Resolves when replication stopped with an error that retrying cannot fix (then call
    /// [`Running::stop`] to get it). Never resolves otherwise.
    pub async fn failed(&self) {
        let mut failed = self.failed.clone();
        if failed.wait_for(|f| *f).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Ask every part to stop.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// What this process's replication role is doing (standby, streaming...).
    pub fn replication_state(&self) -> ReplicationState {
        *self.replication_state.borrow()
    }

    /// [`Running::replication_state`] as a watch, to follow changes.
    pub fn watch_replication_state(&self) -> watch::Receiver<ReplicationState> {
        self.replication_state.clone()
    }

    /// Wait until everything stopped (after [`Running::shutdown`], or after a fatal error).
    pub async fn wait(self) -> Result<(), AppError> {
        let replication = self.replication.await;
        let _ = self.shutdown.send(true);
        for task in self.others {
            let _ = task.await;
        }
        let http = match self.http {
            Some(http) => http.await,
            None => Ok(Ok(())),
        };
        match replication {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(AppError::Task(e.to_string())),
        }
        match http {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(AppError::Task(format!("HTTP server: {e}"))),
            Err(e) => Err(AppError::Task(e.to_string())),
        }
    }

    /// Stop and wait.
    pub async fn stop(self) -> Result<(), AppError> {
        self.shutdown();
        self.wait().await
    }
}
