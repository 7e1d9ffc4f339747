//! The process worker: named SQL statements (`jobs:` in the config) run on an interval or a cron schedule.
//!
//! Each job runs at most once at a time across every kck process that shares the store: before a run the
//! process takes the job's lease ([`Store::try_lease`]) and renews it while the statement runs; a process
//! that cannot take it skips that run. The time of the last run is kept in the store's meta
//! (`job:NAME:last_run_ms`), so that with several processes a job still runs once per period (or once per
//! cron occurrence), not once per process.
//!
//! [`Jobs::status`] tells, per job, its last run, duration and error, for status pages and metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::now_ms;
use crate::pg::Source;
use crate::store::Store;

/// One job of the process worker: a named SQL statement run on a schedule, at most once at a time
/// across all kck processes sharing the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConfig {
    pub name: String,
    /// Run with the simple query protocol: may hold several statements, and may be a statement that
    /// cannot run in a transaction block (`REFRESH MATERIALIZED VIEW CONCURRENTLY`, `VACUUM`).
    pub sql: String,
    pub schedule: JobSchedule,
}

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSchedule {
    /// Every period, counted from the end of the previous run's start.
    Interval(Duration),
    /// At the times a cron expression matches (5 fields, or 6 with seconds first), in UTC.
    Cron(String),
}

/// How long a lease lasts without renewal; a run renews it every third of that.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// Parse a cron expression: 5 fields (minute first) or 6 (seconds first), evaluated in UTC.
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(text.trim())
        .map_err(|e| {
            format!(
                "'{text}' is not a cron expression ({e}); write 5 fields (minute hour day-of-month month \
                 day-of-week, such as \"0 3 * * *\") or 6 with seconds first"
            )
        })
}

/// What one job did last, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobStatus {
    pub name: String,
    /// `interval 5m` or `cron 0 3 * * *`.
    pub schedule: String,
    /// Whether this process is running it now.
    pub running: bool,
    /// Runs this process started, finished and failed.
    pub runs: u64,
    pub failures: u64,
    /// Times this process found the job due but another holder had its lease.
    pub skipped_leased: u64,
    /// When this process last started it (ms since the Unix epoch).
    pub last_started_ms: Option<i64>,
    pub last_duration_ms: Option<u64>,
    /// The error of the last run, `None` if it succeeded.
    pub last_error: Option<String>,
    /// When it is due next in this process (ms since the Unix epoch).
    pub next_due_ms: Option<i64>,
}

/// The process worker's jobs and their status.
#[derive(Default)]
pub struct Jobs {
    status: Vec<Mutex<JobStatus>>,
    /// This process's lease holder id.
    pub holder: String,
}

impl Jobs {
    /// A snapshot of every job's status.
    pub fn status(&self) -> Vec<JobStatus> {
        self.status
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut JobStatus)) {
        f(&mut self.status[index].lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A unique lease holder id for this process.
pub fn holder_id() -> String {
    format!(
        "kck-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

/// Start one task per job. `holder` names this process in leases (see [`holder_id`]).
pub fn spawn(
    jobs: &[JobConfig],
    source: Source,
    store: Arc<dyn Store>,
    holder: String,
    shutdown: watch::Receiver<bool>,
) -> (Arc<Jobs>, Vec<JoinHandle<()>>) {
    let state = Arc::new(Jobs {
        status: jobs
            .iter()
            .map(|j| {
                Mutex::new(JobStatus {
                    name: j.name.clone(),
                    schedule: match &j.schedule {
                        JobSchedule::Interval(d) => {
                            format!("interval {}", humantime::format_duration(*d))
                        }
                        JobSchedule::Cron(c) => format!("cron {c}"),
                    },
                    ..JobStatus::default()
                })
            })
            .collect(),
        holder,
    });
    let handles = jobs
        .iter()
        .enumerate()
        .map(|(index, job)| {
            tokio::spawn(run_job(
                index,
                job.clone(),
                source.clone(),
                store.clone(),
                state.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    (state, handles)
}

fn last_run_meta(name: &str) -> String {
    format!("job:{name}:last_run_ms")
}

fn to_utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(Utc::now)
}

/// When the job is due next, given when it last ran (anywhere) and the time now, in ms since the epoch.
fn next_due(schedule: &JobSchedule, cron: Option<&Cron>, last_run: Option<i64>, now: i64) -> i64 {
    match (schedule, cron) {
        (JobSchedule::Interval(every), _) => {
            let every = every.as_millis() as i64;
            last_run.map_or(now, |last| last.saturating_add(every))
        }
        (JobSchedule::Cron(_), Some(cron)) => {
            // The first occurrence after the last run (or after now, on a first start).
            let from = to_utc(last_run.unwrap_or(now));
            cron.find_next_occurrence(&from, false)
                .map(|t| t.timestamp_millis())
                .unwrap_or(i64::MAX)
        }
        (JobSchedule::Cron(_), None) => i64::MAX,
    }
}

async fn read_last_run(store: &dyn Store, name: &str) -> Option<i64> {
    match store.get_meta(&last_run_meta(name)).await {
        Ok(Some(bytes)) => std::str::from_utf8(&bytes).ok()?.parse().ok(),
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(job = name, error = %crate::report::Chain(&error), "Cannot read the job's last run from the store.");
            None
        }
    }
}

async fn run_job(
    index: usize,
    job: JobConfig,
    source: Source,
    store: Arc<dyn Store>,
    jobs: Arc<Jobs>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cron = match &job.schedule {
        JobSchedule::Cron(text) => match parse_cron(text) {
            Ok(c) => Some(c),
            Err(m) => {
                tracing::error!(job = %job.name, "The job cannot be scheduled: {m}. Fix jobs[].cron.");
                return;
            }
        },
        JobSchedule::Interval(_) => None,
    };
    loop {
        let last = read_last_run(store.as_ref(), &job.name).await;
        let now = now_ms();
        let due = next_due(&job.schedule, cron.as_ref(), last, now);
        jobs.update(index, |s| s.next_due_ms = Some(due));
        let wait = Duration::from_millis(u64::try_from(due.saturating_sub(now)).unwrap_or(0));
        // Re-read the last run at least every minute: another process may have run it meanwhile.
        let nap = wait.min(Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if nap < wait {
            continue;
        }
        match store.try_lease(&job.name, &jobs.holder, LEASE_TTL).await {
            Ok(true) => {}
            Ok(false) => {
                jobs.update(index, |s| s.skipped_leased += 1);
                tracing::debug!(job = %job.name, "Another kck process is running this job; skipping.");
                // Wait a little, then look at the last run again.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
            Err(error) => {
                tracing::error!(job = %job.name, error = %crate::report::Chain(&error), "Cannot take the job's lease; retrying in 5 s. Check the store.");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
        }
        // Holding the lease: run unless someone else ran it since we looked.
        if read_last_run(store.as_ref(), &job.name).await == last {
            let stopped = tokio::select! {
                _ = run_once(index, &job, &source, store.as_ref(), &jobs) => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if stopped {
                // Closing its connection ends the statement (Postgres rolls it back).
                tracing::warn!(job = %job.name, "Stopping: the running job is abandoned.");
                jobs.update(index, |s| s.running = false);
                let _ = store.release_lease(&job.name, &jobs.holder).await;
                return;
            }
        }
        if let Err(error) = store.release_lease(&job.name, &jobs.holder).await {
            tracing::warn!(job = %job.name, error = %crate::report::Chain(&error), "Cannot release the job's lease; it runs out by itself.");
        }
    }
}

async fn run_once(index: usize, job: &JobConfig, source: &Source, store: &dyn Store, jobs: &Jobs) {
    let started_ms = now_ms();
    let started = Instant::now();
    jobs.update(index, |s| {
        s.running = true;
        s.last_started_ms = Some(started_ms);
    });
    // Recorded first: a crash mid-run does not make every process run it again at once.
    if let Err(error) = store
        .put_meta(
            &last_run_meta(&job.name),
            Bytes::from(started_ms.to_string()),
        )
        .await
    {
        tracing::warn!(job = %job.name, error = %crate::report::Chain(&error), "Cannot record the job's run in the store.");
    }
    tracing::info!(job = %job.name, "Running job.");
    let run = async {
        let client = source.connect().await.map_err(|e| e.to_string())?;
        client
            .batch_execute(&job.sql)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            })
    };
    tokio::pin!(run);
    // Renew the lease while the statement runs.
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            _ = tokio::time::sleep(LEASE_TTL / 3) => {
                if let Err(error) = store.try_lease(&job.name, &jobs.holder, LEASE_TTL).await {
                    tracing::warn!(job = %job.name, error = %crate::report::Chain(&error), "Cannot renew the job's lease.");
                }
            }
        }
    };
    let took = started.elapsed();
    match &result {
        Ok(()) => tracing::info!(job = %job.name, took = ?took, "Job finished."),
        Err(error) => tracing::error!(job = %job.name, took = ?took, error = %error,
            "Job failed; it runs again at its next time. Fix its SQL (jobs[].sql) or the database."),
    }
    jobs.update(index, |s| {
        s.running = false;
        s.runs += 1;
        s.last_duration_ms = Some(took.as_millis() as u64);
        s.last_error = result.err();
        if s.last_error.is_some() {
            s.failures += 1;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_accepts_five_or_six_fields_and_explains_errors() {
        assert!(parse_cron("0 3 * * *").is_ok());
        assert!(parse_cron("*/2 * * * * *").is_ok());
        let e = parse_cron("every day").unwrap_err();
        assert!(e.contains("not a cron expression"), "{e}");
    }

    #[test]
    fn next_due_follows_the_schedule() {
        let every = JobSchedule::Interval(Duration::from_secs(10));
        assert_eq!(next_due(&every, None, None, 1_000), 1_000);
        assert_eq!(next_due(&every, None, Some(5_000), 6_000), 15_000);
        let text = "0 * * * * *"; // every minute, at second 0
        let cron = parse_cron(text).unwrap();
        let schedule = JobSchedule::Cron(text.into());
        // 00:00:30 → next at 00:01:00.
        assert_eq!(next_due(&schedule, Some(&cron), None, 30_000), 60_000);
        assert_eq!(
            next_due(&schedule, Some(&cron), Some(60_000), 61_000),
            120_000
        );
    }
}
