//! Operating kck: what an operator sees and does.
//!
//! People run CDC tools next to production databases; what they fear is silent lag, a forgotten slot that
//! fills the disk with WAL, and errors that show up hours later. This module makes those visible:
//!
//! - [`slot`]: the slot's life: the `on_slot_lost` policy, the retained-WAL warning, `kck slot drop`.
//! - [`monitor`]: a task that reads the slot every few seconds (lag, retained WAL, `wal_status`), keeps a
//!   short history for the dashboard, and says clearly when the slot is in danger or lost.
//! - Metrics and recent problems are `crate::telemetry`, which every layer reports into.
//! - [`status`]: the `/status` document, from a running kck or, when none answers, from Postgres and the
//!   store alone.
//! - [`http`]: `/status`, `/metrics`, `/readyz`, `/cache/keys/{primer}`, the dashboard at `/`, and the
//!   layer that counts every HTTP answer.
//!
//! The commands that read a config file (`kck check | status | slot drop | get | keys`) are `crate::cli`,
//! above this module.
//!
//! **Architecture invariant:** `ops` observes; the only thing it changes is the slot, and only when told to
//! (`kck slot drop`, or `source.on_slot_lost: recreate`).

pub mod check;
pub mod http;
pub mod invalidate;
pub mod monitor;
pub mod size;
pub mod slot;
pub mod status;

use std::sync::Arc;

use crate::pg::Source;
use crate::pg::SourceConfig;
use crate::primer::Catalog;
use crate::refresh::Refresher;
use crate::replication::StreamStats;
use crate::store::Store;
use crate::telemetry::Telemetry;

use crate::visibility::VisibilityClock;

/// A running kck as the operations surface sees it. Built by `app::start`.
pub struct Ops {
    pub source: Source,
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn Store>,
    pub stats: Arc<StreamStats>,
    pub clock: Arc<VisibilityClock>,
    pub refresher: Arc<Refresher>,
    pub telemetry: Arc<Telemetry>,
    /// The process worker's jobs.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// The slot monitor's readings.
    pub watch: monitor::SlotWatch,
    /// When this kck started (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// What this process's replication role does (off, standby, starting, streaming).
    pub replication: tokio::sync::watch::Receiver<crate::replication::ReplicationState>,
    key_counts: status::KeyCountCache,
}

impl Ops {
    pub fn new(
        source: Source,
        catalog: Arc<Catalog>,
        store: Arc<dyn Store>,
        stats: Arc<StreamStats>,
        clock: Arc<VisibilityClock>,
        refresher: Arc<Refresher>,
        telemetry: Arc<Telemetry>,
    ) -> Ops {
        for primer in &catalog.primers {
            telemetry.metrics.consecutive_failures(&primer.name, 0);
        }
        Ops {
            source,
            catalog,
            store,
            stats,
            clock,
            refresher,
            telemetry,
            jobs: Arc::default(),
            watch: monitor::SlotWatch::default(),
            started_at_ms: crate::clock::now_ms(),
            replication: tokio::sync::watch::channel(
                crate::replication::ReplicationState::Starting,
            )
            .1,
            key_counts: status::KeyCountCache::default(),
        }
    }

    /// The process worker's jobs to report.
    pub fn with_jobs(mut self, jobs: Arc<crate::jobs::Jobs>) -> Ops {
        self.jobs = jobs;
        self
    }

    /// Follow this process's replication role (see [`crate::app::ReplicationState`]).
    pub fn with_replication_state(
        mut self,
        state: tokio::sync::watch::Receiver<crate::replication::ReplicationState>,
    ) -> Ops {
        self.replication = state;
        self
    }

    pub fn source_config(&self) -> &SourceConfig {
        &self.source.config
    }
}
