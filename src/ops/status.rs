//! The status document: `GET /status` on a running kck, and what `kck status` prints.
//!
//! [`Status::live`] describes a running kck (its own view of the stream, the queue, the refreshes and the
//! slot monitor's last reading). [`Status::offline`] is what can be known without it: the slot from
//! Postgres, and the queue and key counts from the store when no process holds it. Both end with
//! `problems`: one sentence per thing that needs a person, each saying what to do.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::lsn::Lsn;
use crate::ops::Ops;
use crate::ops::monitor::{HistoryPoint, Reading};
use crate::ops::size::format_bytes;
use crate::pg::Source;
use crate::pg::SourceConfig;
use crate::primer::Primer;
use crate::refresh::PrimerHealth;
use crate::replication::{self, SlotInfo};
use crate::store::{QueueStats, Store};
use crate::telemetry::events::Event;

/// Queue age past which `problems` mentions it.
const QUEUE_AGE_PROBLEM: f64 = 60.0;
/// Replication lag past which `problems` mentions it.
const LAG_PROBLEM_SECONDS: f64 = 60.0;
/// How long key counts are reused.
const KEY_COUNT_TTL: Duration = Duration::from_secs(5);

/// See the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// `kck`: a running kck answered; `offline`: read from Postgres and the store alone.
    pub from: String,
    pub generated_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub slot: SlotStatus,
    /// The replication stream (a running kck only).
    pub stream: Option<StreamStatus>,
    pub queue: Option<QueueStatus>,
    /// How full the store is (a store with a capacity: the embedded one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::store::CapacityStats>,
    pub fetch: Option<FetchStatus>,
    /// Live keys (`/subscribe`) in this process (a running kck only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeStatus>,
    pub refresh: Option<RefreshStatus>,
    pub primers: Vec<PrimerStatus>,
    /// The process worker's jobs, as this process saw them.
    pub jobs: Vec<JobStatus>,
    /// Recent warnings and errors, newest first.
    pub recent_errors: Vec<Event>,
    /// What needs a person, each with what to do. Empty when all is well.
    pub problems: Vec<String>,
    /// The slot monitor's recent readings, oldest first (for the dashboard; `?history=false` omits it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryPoint>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub name: String,
    /// `None` when the slot could not be read (see `error`).
    pub exists: Option<bool>,
    pub error: Option<String>,
    pub read_at_ms: Option<i64>,
    /// A session holds the slot.
    pub active: Option<bool>,
    pub active_pid: Option<i32>,
    /// This kck's stream holds it (a running kck only).
    pub held_by_this_kck: Option<bool>,
    pub wal_status: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub current_wal_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub retained_wal_bytes: Option<u64>,
    pub max_retained_wal_bytes: u64,
    /// WAL that can still be written before Postgres may invalidate the slot (`None`: no limit).
    pub safe_wal_bytes: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub streaming: bool,
    /// This process's replication role: `off` (not this process's role), `standby`, `starting` or
    /// `streaming` (see [`crate::app::ReplicationState`]).
    #[serde(default)]
    pub replication: String,
    pub received_lsn: String,
    pub acked_lsn: String,
    pub visible_lsn: String,
    pub transactions: u64,
    pub events: u64,
    pub tasks_queued: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub depth: u64,
    pub claimed: u64,
    pub oldest_age_seconds: Option<f64>,
    /// Of `depth`, tasks parked after failing the same way `refresh.park_after` times: they no longer
    /// hold freshness waits and are retried every `refresh.parked_retry`.
    #[serde(default)]
    pub parked: u64,
    /// The first parked task ids (at most [`PARKED_LISTED`]), in id order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parked_tasks: Vec<String>,
    /// The figures are estimates (the scylla store keeps counters instead of scanning its queue).
    #[serde(default)]
    pub estimated: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FetchStatus {
    pub hits: u64,
    pub misses: u64,
    pub not_cached: u64,
    pub errors: u64,
    /// hits / (hits + misses + not_cached); `None` before the first fetch.
    pub hit_ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscribeStatus {
    /// Streams open now.
    pub subscribers: u64,
    /// Distinct keys they follow.
    pub keys: u64,
    /// Events sent since start (values, `resync`, `expired`, `end`, `error`; heartbeats not counted).
    pub events_sent: u64,
    /// Times a client too slow to read got `resync` instead of a growing buffer.
    pub resyncs: u64,
    /// Streams ended because their token expired.
    pub expired: u64,
}

impl SubscribeStatus {
    pub fn of(hub: &crate::freshness::Hub) -> SubscribeStatus {
        let s = &hub.live.stats;
        SubscribeStatus {
            subscribers: s.subscribers.load(Ordering::Relaxed) as u64,
            keys: hub.live.followed_keys() as u64,
            events_sent: s.events_sent.load(Ordering::Relaxed),
            resyncs: s.resyncs.load(Ordering::Relaxed),
            expired: s.expired.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefreshStatus {
    pub refreshes: u64,
    pub failures: u64,
    /// Over the last 512 key refreshes.
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimerStatus {
    pub name: String,
    pub key: String,
    /// Cached keys (`None` when the store could not be read).
    pub keys: Option<u64>,
    /// Refresh health (a running kck only).
    pub health: Option<PrimerHealth>,
    /// How a change to each table it follows maps to its keys (in a running kck, after the plan filled
    /// in what `depends_on` left out: see `kck explain` for the reasons).
    #[serde(default)]
    pub follows: Vec<Follows>,
}

/// One dependency of a primer, as kck runs it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Follows {
    /// `schema.table`.
    pub table: String,
    /// `columns` (the changed row's columns name the key), `lookup` (a query finds the keys) or
    /// `all_keys` (every cached key of the primer).
    pub how: String,
    /// The columns read from the changed row: `column → key parameter` pairs, or the lookup's arguments.
    #[serde(default)]
    pub columns: Vec<String>,
    /// The columns the primer's query reads from the table (column relevance: an UPDATE that changes none
    /// of them refreshes nothing); absent when kck cannot know them, and every UPDATE counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reads: Option<Vec<String>>,
}

impl Follows {
    pub fn of(primer: &Primer) -> Vec<Follows> {
        let reads = |table: &crate::primer::TableName| {
            primer
                .columns_read
                .iter()
                .find(|(t, _)| t == table)
                .map(|(_, c)| c.clone())
        };
        primer
            .dependencies
            .iter()
            .map(|d| match &d.mapping {
                crate::primer::Mapping::Columns(pairs) => Follows {
                    table: d.table.to_string(),
                    how: "columns".into(),
                    columns: pairs
                        .iter()
                        .map(|(i, c)| {
                            let param = primer.param_name(*i);
                            format!("{} → {param}", crate::primer::Ident(c))
                        })
                        .collect(),
                    reads: reads(&d.table),
                },
                crate::primer::Mapping::Lookup { args, .. } => Follows {
                    table: d.table.to_string(),
                    how: "lookup".into(),
                    columns: args.clone(),
                    reads: reads(&d.table),
                },
                crate::primer::Mapping::AllKeys => Follows {
                    table: d.table.to_string(),
                    how: "all_keys".into(),
                    columns: Vec::new(),
                    reads: reads(&d.table),
                },
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    /// `running`, `ok`, `failed` or `not run yet`.
    pub state: String,
    #[serde(default)]
    pub schedule: String,
    /// Runs by this process, and how many failed.
    #[serde(default)]
    pub runs: u64,
    #[serde(default)]
    pub failures: u64,
    /// Times it was due but another kck process held its lease.
    #[serde(default)]
    pub skipped_leased: u64,
    #[serde(default)]
    pub last_started_ms: Option<i64>,
    #[serde(default)]
    pub last_duration_ms: Option<u64>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub next_due_ms: Option<i64>,
}

impl From<crate::jobs::JobStatus> for JobStatus {
    fn from(j: crate::jobs::JobStatus) -> JobStatus {
        let state = if j.running {
            "running"
        } else if j.last_error.is_some() {
            "failed"
        } else if j.runs > 0 {
            "ok"
        } else {
            "not run yet"
        };
        JobStatus {
            name: j.name,
            state: state.into(),
            schedule: j.schedule,
            runs: j.runs,
            failures: j.failures,
            skipped_leased: j.skipped_leased,
            last_started_ms: j.last_started_ms,
            last_duration_ms: j.last_duration_ms,
            last_error: j.last_error,
            next_due_ms: j.next_due_ms,
        }
    }
}

/// Key counts, reused for [`KEY_COUNT_TTL`].
#[derive(Debug, Default)]
pub struct KeyCountCache {
    counts: Mutex<Option<(Instant, Vec<Option<u64>>)>>,
}

impl KeyCountCache {
    pub(crate) async fn get(&self, ops: &Ops) -> Vec<Option<u64>> {
        if let Some((at, counts)) = &*self.counts.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < KEY_COUNT_TTL
        {
            return counts.clone();
        }
        let counts = count_keys(ops.store.as_ref(), &ops.catalog.primers).await;
        for (primer, count) in ops.catalog.primers.iter().zip(&counts) {
            if let Some(count) = count {
                ops.telemetry.metrics.primer_keys(&primer.name, *count);
            }
        }
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), counts.clone()));
        counts
    }
}

async fn count_keys(store: &dyn Store, primers: &[crate::primer::Primer]) -> Vec<Option<u64>> {
    let mut counts = Vec::with_capacity(primers.len());
    for primer in primers {
        counts.push(store.key_count(&primer.name).await.ok());
    }
    counts
}

/// How many parked task ids `/status` lists.
pub const PARKED_LISTED: usize = 20;

fn queue_status(queue: &QueueStats) -> QueueStatus {
    QueueStatus {
        depth: queue.depth,
        claimed: queue.claimed,
        parked: queue.parked,
        parked_tasks: Vec::new(),
        oldest_age_seconds: queue
            .oldest_enqueued_at_ms
            .map(|t| (now_ms() - t).max(0) as f64 / 1000.0),
        estimated: queue.estimated,
    }
}

fn slot_status(name: &str, max: u64, info: Option<&SlotInfo>, error: Option<String>) -> SlotStatus {
    let lsn = |l: Option<Lsn>| l.map(|l| l.to_string());
    SlotStatus {
        name: name.to_string(),
        exists: error.is_none().then_some(info.is_some()),
        error,
        read_at_ms: Some(now_ms()),
        active: info.map(|i| i.active),
        active_pid: info.and_then(|i| i.active_pid),
        held_by_this_kck: None,
        wal_status: info.and_then(|i| i.wal_status.clone()),
        confirmed_flush_lsn: lsn(info.and_then(|i| i.confirmed_flush)),
        restart_lsn: lsn(info.and_then(|i| i.restart_lsn)),
        current_wal_lsn: lsn(info.and_then(|i| i.current_wal)),
        lag_bytes: info.and_then(SlotInfo::lag_bytes),
        lag_seconds: None,
        retained_wal_bytes: info.and_then(SlotInfo::retained_bytes),
        max_retained_wal_bytes: max,
        safe_wal_bytes: info.and_then(|i| i.safe_wal_size),
    }
}

impl Status {
    /// The status of a running kck. `history`: include the monitor's history.
    pub async fn live(ops: &Ops, history: bool) -> Status {
        let config = ops.source_config();
        let reading: Option<Reading> = ops.watch.reading();
        let mut slot = match &reading {
            Some(r) => {
                let mut s = slot_status(
                    &config.slot,
                    config.max_retained_wal,
                    r.slot.as_ref(),
                    r.error.clone(),
                );
                s.read_at_ms = Some(r.at_ms);
                s.lag_seconds = r.lag_seconds;
                s
            }
            None => SlotStatus {
                name: config.slot.clone(),
                max_retained_wal_bytes: config.max_retained_wal,
                error: Some("not read yet".into()),
                ..SlotStatus::default()
            },
        };
        let stats = &ops.stats;
        let streaming = stats.streaming.load(Ordering::Relaxed);
        slot.held_by_this_kck = Some(streaming);
        let stream = StreamStatus {
            streaming,
            replication: ops.replication.borrow().as_str().to_owned(),
            received_lsn: Lsn(stats.received.load(Ordering::Relaxed)).to_string(),
            acked_lsn: Lsn(stats.acked.load(Ordering::Relaxed)).to_string(),
            visible_lsn: ops.clock.visible().to_string(),
            transactions: stats.transactions.load(Ordering::Relaxed),
            events: stats.rows.load(Ordering::Relaxed),
            tasks_queued: stats.tasks_queued.load(Ordering::Relaxed),
        };
        let queue = ops.store.queue_stats().await;
        let queue_error = queue
            .as_ref()
            .err()
            .map(|e| crate::report::Chain(e).to_string());
        let mut queue = queue.ok().map(|q| queue_status(&q));
        if let Some(q) = queue.as_mut().filter(|q| q.parked > 0) {
            q.parked_tasks = ops.store.parked(PARKED_LISTED).await.unwrap_or_default();
        }
        let f = &ops.telemetry.fetches;
        let (hits, misses, not_cached, errors) = (
            f.hits.load(Ordering::Relaxed),
            f.misses.load(Ordering::Relaxed),
            f.not_cached.load(Ordering::Relaxed),
            f.errors.load(Ordering::Relaxed),
        );
        let looked_up = hits + misses + not_cached;
        let fetch = FetchStatus {
            hits,
            misses,
            not_cached,
            errors,
            hit_ratio: (looked_up > 0).then(|| hits as f64 / looked_up as f64),
        };
        let health = &ops.refresher.health;
        let (refreshes, failures) = health.totals();
        let latency = health.latency_ms();
        let refresh = RefreshStatus {
            refreshes,
            failures,
            latency_p50_ms: latency.map(|l| l.0),
            latency_p95_ms: latency.map(|l| l.1),
            latency_max_ms: latency.map(|l| l.2),
        };
        let counts = ops.key_counts.get(ops).await;
        let primers = ops
            .catalog
            .primers
            .iter()
            .zip(counts)
            .map(|(p, keys)| PrimerStatus {
                name: p.name.clone(),
                key: p.template.source.clone(),
                keys,
                health: Some(health.primer(&p.name)),
                follows: Follows::of(p),
            })
            .collect();
        let mut status = Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            from: "kck".into(),
            generated_at_ms: now_ms(),
            started_at_ms: Some(ops.started_at_ms),
            slot,
            stream: Some(stream),
            queue,
            capacity: ops.store.capacity(),
            fetch: Some(fetch),
            subscribe: Some(SubscribeStatus::of(&ops.refresher.hub)),
            refresh: Some(refresh),
            primers,
            jobs: ops.jobs.status().into_iter().map(JobStatus::from).collect(),
            recent_errors: ops.telemetry.events.recent(20),
            problems: Vec::new(),
            history: if history {
                ops.watch.history()
            } else {
                Vec::new()
            },
        };
        if let Some(e) = queue_error {
            status.problems.push(format!(
                "The store cannot be read ({e}); see kck's log. A full disk or a broken store directory \
                 are the usual causes."
            ));
        }
        status.problems.extend(problems(&status));
        for job in &status.jobs {
            if let Some(error) = &job.last_error {
                status.problems.push(format!(
                    "job '{}' failed its last run: {error}. Fix its SQL (jobs[].sql) or the database; it runs \
                     again at its next time.",
                    job.name
                ));
            }
        }
        if ops
            .stats
            .throttled
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            status.problems.push(
                "the refresh queue is at refresh.max_queue: reading changes waits for the workers (the slot \
                 keeps the WAL). Add refresh.workers, fix failing primers, or raise refresh.max_queue."
                    .into(),
            );
        }
        // What the stream found wrong with the primers' dependencies (a dependency on a dropped column).
        status.problems.extend(ops.stats.problems());
        status
    }

    /// What Postgres and the store say without a running kck. `note` explains why (kck did not answer);
    /// `store` is the store opened read-only, or why it could not be.
    pub async fn offline(
        source_config: &SourceConfig,
        primers: &[Primer],
        store: Result<Arc<dyn Store>, String>,
        note: Option<String>,
    ) -> Status {
        let source = Source::new(source_config);
        let (info, error) = match &source {
            Ok(source) => match read_slot(source).await {
                Ok(info) => (info, None),
                Err(e) => (None, Some(e)),
            },
            Err(e) => (None, Some(e.to_string())),
        };
        let slot = slot_status(
            &source_config.slot,
            source_config.max_retained_wal,
            info.as_ref(),
            error,
        );
        let mut problems_first = Vec::new();
        if let Some(note) = note {
            problems_first.push(note);
        }
        let counts = match store {
            Ok(store) => {
                let queue = store.queue_stats().await.ok().map(|q| queue_status(&q));
                let counts = count_keys(store.as_ref(), primers).await;
                (queue, counts)
            }
            Err(e) => {
                problems_first.push(format!(
                    "The store cannot be read, so queue depth and key counts are unknown: {e}"
                ));
                (None, vec![None; primers.len()])
            }
        };
        let (queue, counts) = counts;
        let primers = primers
            .iter()
            .zip(counts)
            .map(|(p, keys)| PrimerStatus {
                name: p.name.clone(),
                key: p.template.source.clone(),
                keys,
                health: None,
                follows: Follows::of(p),
            })
            .collect();
        let mut status = Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            from: "offline".into(),
            generated_at_ms: now_ms(),
            started_at_ms: None,
            slot,
            stream: None,
            queue,
            capacity: None,
            fetch: None,
            subscribe: None,
            refresh: None,
            primers,
            jobs: Vec::new(),
            recent_errors: Vec::new(),
            problems: problems_first,
            history: Vec::new(),
        };
        status.problems.extend(problems(&status));
        status
    }

    /// Human-readable, for `kck status`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let s = &self.slot;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        match self.from.as_str() {
            "kck" => out.push_str(&format!("kck {} (running)\n", self.version)),
            _ => out.push_str("kck is not answering; what Postgres and the store say:\n"),
        }
        out.push_str(&format!("slot {}\n", s.name));
        if let Some(e) = &s.error {
            out.push_str(&format!("  cannot read the slot: {e}\n"));
        } else if s.exists == Some(false) {
            out.push_str("  does not exist (kck creates it when it starts)\n");
        } else {
            let active = match (s.active, s.held_by_this_kck) {
                (_, Some(true)) => "held by this kck".to_string(),
                (Some(true), _) => format!(
                    "active (pid {})",
                    s.active_pid.map_or("?".into(), |p| p.to_string())
                ),
                (Some(false), _) => "inactive: nobody reads it, WAL accumulates".to_string(),
                _ => "-".to_string(),
            };
            out.push_str(&format!("  state          {active}\n"));
            out.push_str(&format!("  wal_status     {}\n", opt(s.wal_status.clone())));
            out.push_str(&format!(
                "  confirmed LSN  {} (server at {})\n",
                opt(s.confirmed_flush_lsn.clone()),
                opt(s.current_wal_lsn.clone())
            ));
            let lag_seconds = s
                .lag_seconds
                .map_or_else(|| "".to_string(), |l| format!(", {l:.1} s"));
            out.push_str(&format!(
                "  lag            {}{lag_seconds}\n",
                opt(s.lag_bytes.map(format_bytes))
            ));
            out.push_str(&format!(
                "  WAL retained   {} (warning above {})\n",
                opt(s.retained_wal_bytes.map(format_bytes)),
                format_bytes(s.max_retained_wal_bytes)
            ));
            if let Some(safe) = s.safe_wal_bytes {
                out.push_str(&format!(
                    "  safe_wal_size  {}\n",
                    format_bytes(safe.max(0) as u64)
                ));
            }
        }
        if let Some(stream) = &self.stream {
            out.push_str(&format!(
                "stream         {}; {} transactions, {} row changes decoded, acknowledged up to {}\n",
                match (stream.streaming, stream.replication.as_str()) {
                    (true, _) => "streaming",
                    (false, "off") => "not this process's role (no replication role)",
                    (false, "standby") => "standby (another kck streams; this one takes over if it dies)",
                    _ => "NOT streaming",
                },
                stream.transactions,
                stream.events,
                stream.acked_lsn
            ));
        }
        match &self.queue {
            Some(q) => out.push_str(&format!(
                "queue          {}{} ({} in progress), oldest {}{}\n",
                if q.estimated { "~" } else { "" },
                crate::report::count(q.depth, "task", "tasks"),
                q.claimed,
                q.oldest_age_seconds
                    .map_or_else(|| "-".to_string(), |a| format!("{a:.1} s old")),
                if q.estimated {
                    " (estimates: counted, not scanned)"
                } else {
                    ""
                }
            )),
            None => out.push_str("queue          unknown\n"),
        }
        if let Some(c) = &self.capacity {
            out.push_str(&format!(
                "store          {} of {}, {} of {} charged, file {}; {} evicted\n",
                c.keys,
                crate::report::count(c.max_keys, "key", "keys"),
                crate::ops::size::format_bytes(c.bytes),
                crate::ops::size::format_bytes(c.max_bytes),
                crate::ops::size::format_bytes(c.file_bytes),
                c.evictions,
            ));
        }
        if let Some(q) = self.queue.as_ref().filter(|q| q.parked > 0) {
            out.push_str(&format!(
                "parked         {} failing the same way, retried slowly, not holding freshness \
                 waits: {}{}\n",
                crate::report::count(q.parked, "task", "tasks"),
                q.parked_tasks.join(", "),
                if q.parked > q.parked_tasks.len() as u64 {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
        if let Some(f) = &self.fetch {
            out.push_str(&format!(
                "fetch          {} hits, {} misses, {} not cached, {} errors; hit ratio {}\n",
                f.hits,
                f.misses,
                f.not_cached,
                f.errors,
                f.hit_ratio
                    .map_or_else(|| "-".to_string(), |r| format!("{:.1}%", r * 100.0))
            ));
        }
        if let Some(l) = &self.subscribe {
            out.push_str(&format!(
                "subscribe      {} streams on {} keys; {} events sent, {} resyncs, {} expired\n",
                l.subscribers, l.keys, l.events_sent, l.resyncs, l.expired
            ));
        }
        if let Some(r) = &self.refresh {
            let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"));
            out.push_str(&format!(
                "refresh        {} done, {} failed; latency p50 {}, p95 {}, max {}\n",
                r.refreshes,
                r.failures,
                ms(r.latency_p50_ms),
                ms(r.latency_p95_ms),
                ms(r.latency_max_ms)
            ));
        }
        out.push_str("primers\n");
        for p in &self.primers {
            let keys = p.keys.map_or_else(|| "?".to_string(), |k| k.to_string());
            // "key " keeps the column of the templates where it is.
            let word = if p.keys == Some(1) { "key " } else { "keys" };
            let mut line = format!("  {:<24} {:>8} {word}  {}", p.name, keys, p.key);
            if let Some(h) = &p.health {
                if h.consecutive_failures > 0 {
                    line.push_str(&format!(
                        "  FAILING ({} in a row): {}",
                        h.consecutive_failures,
                        h.last_error.as_deref().unwrap_or("")
                    ));
                } else if let Some(ms) = h.mean_duration_ms {
                    line.push_str(&format!("  {} refreshes, mean {ms:.1} ms", h.refreshes));
                }
            }
            out.push_str(&line);
            out.push('\n');
            if !p.follows.is_empty() {
                let follows: Vec<String> = p
                    .follows
                    .iter()
                    .map(|f| match f.how.as_str() {
                        "all_keys" => format!("{} (every key)", f.table),
                        _ => format!("{} ({})", f.table, f.columns.join(", ")),
                    })
                    .collect();
                out.push_str(&format!("  {:<24} follows {}\n", "", follows.join("; ")));
            }
        }
        out.push_str(&format!(
            "jobs           {}\n",
            if self.jobs.is_empty() {
                "none".to_string()
            } else {
                self.jobs
                    .iter()
                    .map(|j| format!("{} ({})", j.name, j.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
        if !self.recent_errors.is_empty() {
            out.push_str("recent errors\n");
            for e in self.recent_errors.iter().take(5) {
                let repeated = if e.count > 1 {
                    format!(" (x{})", e.count)
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "  {} {} {}{repeated}: {}\n",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms.max(0) as u64)
                    ),
                    e.level,
                    e.source,
                    e.message
                ));
            }
        }
        if self.problems.is_empty() {
            out.push_str("no problems\n");
        } else {
            out.push_str("problems\n");
            for p in &self.problems {
                out.push_str(&format!("  - {p}\n"));
            }
        }
        out
    }
}

async fn read_slot(source: &Source) -> Result<Option<SlotInfo>, String> {
    let client = source.connect().await.map_err(|e| e.to_string())?;
    replication::read_slot(&client, &source.config.slot)
        .await
        .map_err(|e| e.to_string())
}

/// What in `status` needs a person.
fn problems(status: &Status) -> Vec<String> {
    let mut out = Vec::new();
    let s = &status.slot;
    let live = status.from == "kck";
    if let Some(e) = &s.error {
        out.push(format!(
            "The slot cannot be read from Postgres: {e}. Check that Postgres is up and source.url is right."
        ));
    }
    if s.exists == Some(false) {
        out.push(if live {
            format!(
                "Slot '{}' does not exist: someone dropped it. kck creates it again when its stream \
                 reconnects and then refreshes every cached key.",
                s.name
            )
        } else {
            format!(
                "Slot '{}' does not exist; kck creates it when it starts.",
                s.name
            )
        });
    }
    match s.wal_status.as_deref() {
        Some("lost") => out.push(format!(
            "Slot '{}' was invalidated (wal_status = lost): changes were missed. Run `kck slot drop --config \
             FILE --yes-drop-the-slot` and start kck again (it refreshes every cached key), or set \
             source.on_slot_lost: recreate.",
            s.name
        )),
        Some("unreserved") => out.push(format!(
            "Slot '{}' is about to be invalidated (wal_status = unreserved): kck must catch up before the \
             next checkpoint, or raise max_slot_wal_keep_size.",
            s.name
        )),
        _ => {}
    }
    if let Some(retained) = s.retained_wal_bytes
        && retained > s.max_retained_wal_bytes
    {
        out.push(format!(
            "Slot '{}' retains {} of WAL (more than source.max_retained_wal, {}). If kck is catching up \
             this shrinks; if the slot is abandoned, drop it: kck slot drop --config FILE \
             --yes-drop-the-slot.",
            s.name,
            format_bytes(retained),
            format_bytes(s.max_retained_wal_bytes)
        ));
    }
    if !live && s.active == Some(false) {
        out.push(format!(
            "Slot '{}' exists but nothing reads it: Postgres keeps WAL for it until kck runs again. Start \
             kck, or drop the slot if kck is retired (kck slot drop --config FILE --yes-drop-the-slot).",
            s.name
        ));
    }
    if let Some(stream) = &status.stream
        && !stream.streaming
        && !matches!(stream.replication.as_str(), "off" | "standby")
    {
        out.push(
            "The replication stream is not running: kck is reconnecting (see recent errors and kck's log)."
                .to_string(),
        );
    }
    if let Some(lag) = s.lag_seconds
        && lag > LAG_PROBLEM_SECONDS
    {
        out.push(format!(
            "kck is {lag:.0} s behind the database: the cache serves older data. Look at the queue and \
             failing primers below, and at kck's log."
        ));
    }
    if let Some(q) = &status.queue
        && let Some(age) = q.oldest_age_seconds
        && age > QUEUE_AGE_PROBLEM
    {
        out.push(format!(
            "The oldest refresh has waited {age:.0} s ({} queued): refreshes do not keep up. Raise \
             refresh.workers, or look for slow or failing primers.",
            q.depth
        ));
    }
    for p in &status.primers {
        if let Some(h) = &p.health
            && h.consecutive_failures > 0
        {
            out.push(format!(
                "Primer '{}' is failing ({} refreshes in a row): {}. Its cached keys are stale until it \
                 works again; fix its query or the database (kck check --config FILE helps).",
                p.name,
                h.consecutive_failures,
                h.last_error.as_deref().unwrap_or("see kck's log")
            ));
        }
    }
    out
}
