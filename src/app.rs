//! The running process: wires the modules together and stops them in order.
//!
//! [`start`] opens the store, checks the source ([`replication::preflight`]), starts the replication
//! stream, the visibility prover, the refresh workers and the HTTP server, and returns once the slot is held
//! and the server listens, or with the first error. [`Running::shutdown`] stops taking requests (in-flight
//! ones finish), flushes and acknowledges what the stream read, and stops the workers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, StoreConfig};
use crate::deps::DepIndex;
use crate::http::{AppState, app};
use crate::jobs::Jobs;
use crate::lsn::Lsn;
use crate::ops::{self, Ops, Telemetry};
use crate::refresh::{Refresher, prove_visibility};
use crate::replication::{ReplicationError, Source, Stream, StreamLimits, StreamStats};
use crate::schedule;
use crate::store::embedded::EmbeddedStore;
use crate::store::{Store, StoreError};
use crate::visibility::VisibilityClock;

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
    #[error("a kck task failed: {0}")]
    Task(String),
}

/// Knobs that are not part of the user's config (tests and benchmarks set them).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// How long to wait for a slot another session holds before giving up.
    pub slot_wait: Duration,
    /// `max_queue` is lowered to `refresh.max_queue` of the config.
    pub limits: StreamLimits,
    /// Wraps the opened store (tests slow it down, for example).
    pub wrap_store: Option<StoreWrapper>,
    /// Start with the refresh workers paused ([`Refresher::pause`]).
    pub paused: bool,
    /// How often the slot monitor reads the slot (lag, retained WAL, wal_status).
    pub monitor_interval: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            slot_wait: Duration::from_secs(10),
            limits: StreamLimits::default(),
            wrap_store: None,
            paused: false,
            monitor_interval: Duration::from_secs(2),
        }
    }
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

/// A started kck.
pub struct Running {
    pub http_addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub stats: Arc<StreamStats>,
    pub clock: Arc<VisibilityClock>,
    /// The refresh workers' state: pause/resume, per-primer stats.
    pub refresher: Arc<Refresher>,
    /// The process worker's jobs and their status.
    pub jobs: Arc<Jobs>,
    /// Status, metrics and the slot monitor's readings.
    pub ops: Arc<Ops>,
    shutdown: watch::Sender<bool>,
    /// Becomes true when replication stopped with an error (kck cannot go on).
    failed: watch::Receiver<bool>,
    replication: JoinHandle<Result<(), ReplicationError>>,
    others: Vec<JoinHandle<()>>,
    http: JoinHandle<std::io::Result<()>>,
}

/// Open the configured store.
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    match &config.store {
        StoreConfig::Embedded { path } => Ok(Arc::new(EmbeddedStore::open(path)?)),
    }
}

/// Start kck. See the module docs.
pub async fn start(config: Config, options: RunOptions) -> Result<Running, AppError> {
    let mut store = open_store(&config)?;
    if let Some(wrap) = &options.wrap_store {
        store = (wrap.0)(store);
    }
    let source = Source::new(&config.source)?;
    let catalog = Arc::new(config.catalog.clone());
    let deps = Arc::new(DepIndex::new(catalog.clone()));
    let telemetry = Arc::new(Telemetry::default());
    let slot = ops::slot::prepare(&source, &deps, options.slot_wait, &telemetry).await?;
    if slot.created {
        // Changes made while no slot existed were not seen: refresh whatever is cached.
        store
            .enqueue(ops::slot::rebuild_tasks(&catalog, slot.confirmed_flush))
            .await?;
    }
    let clock = Arc::new(VisibilityClock::new(slot.confirmed_flush, 100_000));
    let stats = Arc::new(StreamStats::default());
    stats.acked.store(slot.confirmed_flush.0, Ordering::Relaxed);
    let (shutdown, shutdown_rx) = watch::channel(false);

    let workers = config.refresh.workers;
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
        .with_claim_batch(config.refresh.claim_batch),
    );
    if options.paused {
        refresher.pause();
    }
    let mut others = Vec::new();
    for worker in 0..workers {
        others.push(tokio::spawn(
            refresher.clone().work(worker, shutdown_rx.clone()),
        ));
    }
    others.push(tokio::spawn(schedule::run_intervals(
        refresher.clone(),
        shutdown_rx.clone(),
    )));
    others.push(tokio::spawn(schedule::sweep_expired(
        refresher.clone(),
        shutdown_rx.clone(),
    )));
    let (jobs, job_tasks) = crate::jobs::spawn(
        &config.jobs,
        source.clone(),
        store.clone(),
        crate::jobs::holder_id(),
        shutdown_rx.clone(),
    );
    others.extend(job_tasks);
    others.push(tokio::spawn(prove_visibility(
        source.clone(),
        clock.clone(),
        shutdown_rx.clone(),
    )));

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
    };
    let (started_tx, started_rx) = oneshot::channel();
    let (failed_tx, failed) = watch::channel(false);
    let supervised = supervise(
        stream,
        slot.confirmed_flush,
        options.slot_wait,
        started_tx,
        shutdown_rx.clone(),
        telemetry.clone(),
    );
    let mut replication = tokio::spawn(async move {
        let result = supervised.await;
        if result.is_err() {
            let _ = failed_tx.send(true);
        }
        result
    });
    tokio::select! {
        started = started_rx => {
            if started.is_err() {
                // The supervisor ended before the stream started: report its error.
                let _ = shutdown.send(true);
                return Err(match (&mut replication).await {
                    Ok(Err(e)) => e.into(),
                    Ok(Ok(())) => AppError::Task("replication ended before it started".into()),
                    Err(e) => AppError::Task(e.to_string()),
                });
            }
        }
    }

    // Warm before serving, so that the first requests hit (the stream runs meanwhile).
    schedule::warm(&refresher, workers).await;

    let listener = tokio::net::TcpListener::bind(config.http.bind)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.http.bind,
            source,
        });
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            let _ = shutdown.send(true);
            return Err(e);
        }
    };
    let http_addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: config.http.bind,
        source,
    })?;
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
        .with_jobs(jobs.clone()),
    );
    others.push(tokio::spawn(ops::monitor::run(
        ops.clone(),
        options.monitor_interval,
        shutdown_rx.clone(),
    )));
    let state = AppState {
        store: store.clone(),
        catalog,
        primer: config.prime_on_cache_miss.then(|| refresher.clone()),
        refresher: Some(refresher.clone()),
    };
    let router = ops::http::observe(app(state).merge(ops::http::router(ops.clone())), telemetry);
    let mut http_shutdown = shutdown_rx.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|stop| *stop).await;
            })
            .await
    });
    tracing::info!(%http_addr, "kck is serving.");
    Ok(Running {
        http_addr,
        store,
        stats,
        clock,
        refresher,
        jobs,
        ops,
        shutdown,
        failed,
        replication,
        others,
        http,
    })
}

/// Keep a replication session running: reconnect after transient failures, with backoff. Returns the
/// error of a first session that never started, or `Ok` on shutdown.
async fn supervise(
    stream: Stream,
    confirmed: Lsn,
    slot_wait: Duration,
    started: oneshot::Sender<()>,
    mut shutdown: watch::Receiver<bool>,
    telemetry: Arc<Telemetry>,
) -> Result<(), ReplicationError> {
    let mut started = Some(started);
    let mut failures = 0u32;
    loop {
        let start = Lsn(stream.stats.acked.load(Ordering::Relaxed)).max(confirmed);
        let result = stream.run(start, shutdown.clone(), &mut started).await;
        if *shutdown.borrow() {
            return result;
        }
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
            %error,
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
        }
        // The slot may have been dropped meanwhile: then changes were missed, and every key is rebuilt.
        match ops::slot::prepare(&stream.source, &stream.deps, slot_wait, &telemetry).await {
            Ok(slot) if slot.created => {
                let message = "The replication slot had disappeared (or was invalidated) and was created \
                               again: changes may have been missed, so every cached key is being refreshed.";
                tracing::error!(slot = %stream.source.config.slot, "{message}");
                telemetry.events.error("slot", message);
                let tasks = ops::slot::rebuild_tasks(stream.deps.catalog(), slot.confirmed_flush);
                if let Err(error) = stream.store.enqueue(tasks).await {
                    tracing::error!(
                        %error,
                        "Cannot queue the rebuild of the cache; restart kck once the store works again."
                    );
                }
                stream
                    .stats
                    .acked
                    .store(slot.confirmed_flush.0, Ordering::Relaxed);
            }
            Ok(_) => {}
            // An invalidated slot under `on_slot_lost: fail`: retrying cannot help.
            Err(error @ ReplicationError::SlotLost { .. }) => return Err(error),
            Err(error) => {
                tracing::error!(%error, "The source is not ready; retrying.");
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

    /// Wait until everything stopped (after [`Running::shutdown`], or after a fatal error).
    pub async fn wait(self) -> Result<(), AppError> {
        let replication = self.replication.await;
        let _ = self.shutdown.send(true);
        for task in self.others {
            let _ = task.await;
        }
        let http = self.http.await;
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
