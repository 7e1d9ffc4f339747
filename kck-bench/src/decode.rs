//! Scenario 1: decode throughput. The same WAL read by `pg_recvlogical` (pgoutput, into /dev/null), by
//! pgwire-replication alone (the transport kck uses, counting rows), and by kck's replication reader
//! (`kck::replication::Stream::run`, the production loop: decode, map to keys through `DepIndex`, batch,
//! visibility clock and its prover), with a store that accepts everything and writes nothing.
//!
//! Every consumer reads its own slot; all the slots of a workload are created at the same position before
//! the workload runs, so they read identical WAL. Each stops at the first commit or keepalive at or past
//! the position taken right after the workload committed (`pg_recvlogical --endpos` does the same).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use kck::config::Config;
use kck::deps::DepIndex;
use kck::lsn::Lsn;
use kck::pg::Source;
use kck::refresh::prove_visibility;
use kck::replication::{ReplicationState, Stream, StreamLimits, StreamStats};
use kck::store::{Claim, Entry, QueueStats, Store, StoreResult, Stored, Task};
use kck::visibility::VisibilityClock;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::watch;

use crate::Ctx;
use crate::pg::{self, DB, PUBLICATION};
use crate::report::{Goal, Section, Table};
use crate::util::{percentile, proc_cpu, record_pid, self_cpu, thousands};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Consumer {
    Recvlogical,
    Pgwire,
    Kck,
    /// kck's reader without the visibility prover (its snapshot queries), to show what the prover costs.
    KckNoProver,
    /// kck's decode, map and batch over messages held in memory, on one thread: the CPU cost of kck's own
    /// per-row work, without the network, the runtime or the server.
    Replay,
}

impl Consumer {
    fn label(self) -> &'static str {
        match self {
            Consumer::Recvlogical => "pg_recvlogical (pgoutput → /dev/null)",
            Consumer::Pgwire => "pgwire-replication alone (count rows)",
            Consumer::Kck => "kck reader (decode + map + batch + prover)",
            Consumer::KckNoProver => "kck reader without the visibility prover",
            Consumer::Replay => "kck decode + map + batch in memory (rows per CPU-second)",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Consumer::Recvlogical => "recvlogical",
            Consumer::Pgwire => "pgwire",
            Consumer::Kck => "kck",
            Consumer::KckNoProver => "kck-no-prover",
            Consumer::Replay => "replay",
        }
    }

    /// The consumers of a workload (the prover only matters when there are many commits), or those
    /// `--decode-consumers` names.
    fn of(workload: Workload, only: &[String]) -> Vec<Consumer> {
        let all: &[Consumer] = match workload {
            Workload::Big => &[
                Consumer::Recvlogical,
                Consumer::Pgwire,
                Consumer::Kck,
                Consumer::Replay,
            ],
            Workload::Small => &[
                Consumer::Recvlogical,
                Consumer::Pgwire,
                Consumer::Kck,
                Consumer::KckNoProver,
            ],
        };
        all.iter()
            .copied()
            .filter(|c| only.is_empty() || only.iter().any(|o| o == c.name()))
            .collect()
    }
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    rows: u64,
    secs: f64,
    /// CPU seconds of the consumer process (for the in-process ones: this whole process).
    client_cpu: f64,
    /// CPU seconds of the walsender that served it.
    walsender_cpu: f64,
    /// Batches kck's reader handed to the (null) store.
    batches: u64,
    /// Snapshot queries (`pg_current_snapshot()`) the visibility prover ran.
    snapshots: i64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let s = &ctx.sizes;
    let mut section = Section::new(
        "1. Decode throughput",
        format!(
            "The same WAL read by each consumer from its own slot (all created at one position before the \
             workload). Workloads: one UPDATE of {} rows of `orders` (REPLICA IDENTITY FULL: old and new row \
             in every message), and {} single-row UPDATE transactions. Rows/s from connecting to reaching \
             the end position; {} round(s) per consumer, the order rotating between rounds; the figure is \
             the median of the rounds. \
             kck's reader is `replication::Stream::run` with a store that keeps nothing (every mapped key \
             counts as cached, so every row's keys go into the batch) and the visibility prover running.",
            thousands(s.orders as f64),
            thousands(s.decode_small_txs as f64),
            s.rounds
        ),
    );
    let mut table = Table::new(&[
        "workload",
        "consumer",
        "rows/s",
        "× pg_recvlogical",
        "client CPU s / 1M rows",
        "walsender CPU (% of wall)",
        "store writes / 1k rows",
        "snapshot queries / 1k rows",
        "runs (rows/s)",
    ]);
    for &workload in &ctx.decode_workloads {
        let label = match workload {
            Workload::Big => format!("one {}-row transaction", thousands(s.orders as f64)),
            Workload::Small => format!(
                "{} single-row transactions",
                thousands(s.decode_small_txs as f64)
            ),
        };
        eprintln!("kck-bench: decode: {label}");
        let results = ctx.rt.block_on(measure_workload(ctx, workload))?;
        let recv = results
            .get(&Consumer::Recvlogical)
            .map(|v| median(&v.iter().map(Measured::rate).collect::<Vec<_>>()))
            .unwrap_or(0.0);
        for consumer in Consumer::of(workload, &ctx.decode_consumers) {
            let runs = &results[&consumer];
            let rates: Vec<f64> = runs.iter().map(Measured::rate).collect();
            let rate = median(&rates);
            let rows: u64 = runs.iter().map(|m| m.rows).sum();
            let cpu: f64 = runs.iter().map(|m| m.client_cpu).sum();
            let wall: f64 = runs.iter().map(|m| m.secs).sum();
            let ws: f64 = runs.iter().map(|m| m.walsender_cpu).sum();
            let walsender = if consumer == Consumer::Replay {
                "-".to_string()
            } else {
                format!("{:.0} %", ws / wall * 100.0)
            };
            table.row(vec![
                label.clone(),
                consumer.label().to_string(),
                thousands(rate),
                if recv > 0.0 {
                    format!("{:.2}", rate / recv)
                } else {
                    "-".into()
                },
                format!("{:.2}", cpu / rows as f64 * 1e6),
                walsender,
                if matches!(consumer, Consumer::Kck | Consumer::KckNoProver) {
                    format!(
                        "{:.1}",
                        runs.iter().map(|m| m.batches).sum::<u64>() as f64 / rows as f64 * 1000.0
                    )
                } else {
                    "-".into()
                },
                if consumer == Consumer::Kck {
                    format!(
                        "{:.1}",
                        runs.iter().map(|m| m.snapshots).sum::<i64>() as f64 / rows as f64 * 1000.0
                    )
                } else {
                    "-".into()
                },
                rates
                    .iter()
                    .map(|r| thousands(*r))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
            if consumer == Consumer::Kck && recv > 0.0 {
                let ratio = rate / recv;
                section.goals.push(Goal::new(
                    format!("kck reader ≥ 0.9 × pg_recvlogical rows/s ({label})"),
                    format!(
                        "{ratio:.2} × ({} vs {} rows/s)",
                        thousands(rate),
                        thousands(recv)
                    ),
                    Some(ratio >= 0.9),
                ));
            }
            let expected = workload.rows(s);
            if !matches!(consumer, Consumer::Recvlogical | Consumer::Replay)
                && let Some(bad) = runs.iter().find(|m| m.rows != expected)
            {
                section.notes.push(format!(
                    "{}: read {} rows of {label}, expected {expected}",
                    consumer.label(),
                    bad.rows
                ));
            }
        }
    }
    section.tables.push(table);
    section.notes.push(
        "pg_recvlogical's rows are the rows the workload changed (it prints nothing to count); the other \
         consumers count the row messages they received and are checked against the same number."
            .into(),
    );
    section.notes.push(
        "Client CPU of the two in-process consumers is this whole bench process; for pg_recvlogical it is \
         the child's. A walsender near 100 % of wall time means the server side is what limits every consumer."
            .into(),
    );
    Ok(section)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Big,
    Small,
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0).unwrap_or(0.0)
}

impl Workload {
    fn rows(self, s: &crate::Sizes) -> u64 {
        match self {
            Workload::Big => s.orders as u64,
            Workload::Small => s.decode_small_txs as u64,
        }
    }
}

async fn measure_workload(
    ctx: &Ctx,
    workload: Workload,
) -> Result<HashMap<Consumer, Vec<Measured>>> {
    let s = &ctx.sizes;
    let client = ctx.cluster.connect(DB).await?;
    let tag = match workload {
        Workload::Big => "big",
        Workload::Small => "small",
    };
    let consumers = Consumer::of(workload, &ctx.decode_consumers);
    let slot = |round: usize, c: Consumer| format!("dec_{tag}_{round}_{c:?}").to_lowercase();
    for round in 0..s.rounds {
        for &c in &consumers {
            pg::create_slot(&client, &slot(round, c)).await?;
        }
    }
    let started = Instant::now();
    match workload {
        Workload::Big => {
            client
                .batch_execute("UPDATE orders SET amount = amount + 1")
                .await?
        }
        Workload::Small => {
            client.batch_execute("SET synchronous_commit = off").await?;
            client
                .batch_execute(&format!(
                    "DO $$ BEGIN FOR i IN 1..{} LOOP \
                     UPDATE orders SET amount = amount + 1 WHERE id = i; COMMIT; END LOOP; END $$",
                    s.decode_small_txs
                ))
                .await?;
            client.batch_execute("SET synchronous_commit = on").await?;
        }
    }
    let end = pg::insert_lsn(&client).await?;
    eprintln!(
        "kck-bench: decode: workload written in {:.1} s, end position {end}",
        started.elapsed().as_secs_f64()
    );
    let mut results: HashMap<Consumer, Vec<Measured>> = HashMap::new();
    for round in 0..s.rounds {
        let mut order = consumers.to_vec();
        order.rotate_left(round % consumers.len());
        for c in order {
            let name = slot(round, c);
            let sampler = WalsenderSampler::start(ctx.cluster.url(DB), name.clone());
            let m = match c {
                Consumer::Recvlogical => recvlogical(ctx, &name, end, workload.rows(s)).await?,
                Consumer::Pgwire => pgwire_only(ctx, &name, end).await?,
                Consumer::Kck => kck_reader(ctx, &name, end, true).await?,
                Consumer::KckNoProver => kck_reader(ctx, &name, end, false).await?,
                Consumer::Replay => replay(ctx, &name, end).await?,
            };
            let m = Measured {
                walsender_cpu: sampler.stop().await,
                ..m
            };
            eprintln!(
                "kck-bench: decode: {:<40} {:>10} rows/s ({} rows in {:.2} s)",
                c.label(),
                thousands(m.rate()),
                m.rows,
                m.secs
            );
            results.entry(c).or_default().push(m);
            pg::drop_slot(&client, &name).await?;
        }
    }
    client.batch_execute("VACUUM ANALYZE orders").await?;
    Ok(results)
}

async fn recvlogical(ctx: &Ctx, slot: &str, end: Lsn, rows: u64) -> Result<Measured> {
    let bin = ctx.cluster.bin.join("pg_recvlogical");
    let (_, children_before) = self_cpu();
    let started = Instant::now();
    let child = tokio::process::Command::new(&bin)
        .args(["-d", &ctx.cluster.conninfo(DB), "--slot", slot, "--start"])
        .arg(format!("--endpos={end}"))
        .args(["-f", "/dev/null", "--no-loop", "-s", "1"])
        .args(["-o", "proto_version=1"])
        .arg("-o")
        .arg(format!("publication_names={PUBLICATION}"))
        .args(["-o", "messages=true"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting pg_recvlogical")?;
    if let Some(pid) = child.id() {
        record_pid(pid);
    }
    let output = child.wait_with_output().await?;
    let secs = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let (_, children_after) = self_cpu();
    Ok(Measured {
        rows,
        secs,
        client_cpu: children_after - children_before,
        walsender_cpu: 0.0,
        batches: 0,
        snapshots: 0,
    })
}

async fn pgwire_only(ctx: &Ctx, slot: &str, end: Lsn) -> Result<Measured> {
    let config = ReplicationConfig::new("127.0.0.1", "postgres", "", DB, slot, PUBLICATION)
        .with_port(ctx.cluster.port)
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_buffer_size(1024);
    let (cpu_before, _) = self_cpu();
    let started = Instant::now();
    let mut client = ReplicationClient::connect(config).await?;
    client.wait_started().await?;
    let mut rows = 0u64;
    loop {
        match client.recv().await? {
            Some(ReplicationEvent::XLogData { data, .. }) => {
                if matches!(data.first(), Some(b'I' | b'U' | b'D')) {
                    rows += 1;
                }
            }
            Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                client.update_applied_lsn(end_lsn);
                if Lsn::from(end_lsn) >= end {
                    break;
                }
            }
            Some(ReplicationEvent::KeepAlive { wal_end, .. }) => {
                if Lsn::from(wal_end) >= end {
                    break;
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (cpu_after, _) = self_cpu();
    client.abort();
    Ok(Measured {
        rows,
        secs,
        client_cpu: cpu_after - cpu_before,
        walsender_cpu: 0.0,
        batches: 0,
        snapshots: 0,
    })
}

async fn kck_reader(ctx: &Ctx, slot: &str, end: Lsn, prover: bool) -> Result<Measured> {
    let text = format!(
        "source:\n  url: \"{}\"\n  publication: {PUBLICATION}\n  slot: {slot}\nprimers:\n{}",
        ctx.cluster.url(DB),
        pg::PRIMERS
    );
    let config = Config::from_yaml_str(&text, Path::new("decode.yaml"), |_| None)
        .map_err(|e| anyhow::anyhow!("decode config: {e}"))?;
    let source = Source::new(&config.source)?;
    let client = ctx.cluster.connect(DB).await?;
    let start = pg::slot_confirmed(&client, slot)
        .await?
        .context("slot has no position")?;
    // Without a prover nothing proves commits visible: room for all of them, so the stream never waits.
    let capacity = if prover { 100_000 } else { 100_000_000 };
    let clock = Arc::new(VisibilityClock::new(start, capacity));
    let stats = Arc::new(StreamStats::default());
    let store = Arc::new(NullStore::default());
    let stream = Stream {
        source: source.clone(),
        deps: Arc::new(DepIndex::new(Arc::new(config.catalog.clone()))),
        store: store.clone(),
        clock: clock.clone(),
        stats: stats.clone(),
        limits: StreamLimits::default(),
        state: Arc::new(watch::channel(ReplicationState::Starting).0),
    };
    pg::reset_statements(&client).await?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let prover = prover.then(|| tokio::spawn(prove_visibility(source, clock, shutdown_rx.clone())));
    let (cpu_before, _) = self_cpu();
    let started = Instant::now();
    let mut task = tokio::spawn(async move {
        let mut started = None;
        stream.run(start, shutdown_rx, &mut started).await
    });
    let secs = loop {
        if Lsn(stats.received.load(Ordering::Relaxed)) >= end {
            break started.elapsed().as_secs_f64();
        }
        if task.is_finished() {
            let result = (&mut task).await?;
            bail!("kck's stream ended before the end position: {result:?}");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    let (cpu_after, _) = self_cpu();
    let _ = shutdown.send(true);
    task.await?.context("kck's stream")?;
    if let Some(prover) = prover {
        let _ = prover.await;
    }
    Ok(Measured {
        rows: stats.rows.load(Ordering::Relaxed),
        secs,
        client_cpu: cpu_after - cpu_before,
        walsender_cpu: 0.0,
        batches: store.batches.load(Ordering::Relaxed),
        snapshots: pg::statement_calls(&client, "pg_current_snapshot").await?,
    })
}

/// Most messages [`replay`] keeps in memory (about 250 bytes each for the `orders` UPDATE).
const REPLAY_MAX: usize = 200_000;

/// Read the slot into memory (up to [`REPLAY_MAX`] messages), then run kck's per-row work over it on
/// this thread: decode, resolve relations, map rows to keys, add them to a batch. `secs` is the CPU time
/// of that loop, so the rate is rows per CPU-second.
async fn replay(ctx: &Ctx, slot: &str, end: Lsn) -> Result<Measured> {
    let config = ReplicationConfig::new("127.0.0.1", "postgres", "", DB, slot, PUBLICATION)
        .with_port(ctx.cluster.port)
        .with_status_interval(Duration::from_secs(1))
        .with_buffer_size(1024);
    let mut client = ReplicationClient::connect(config).await?;
    client.wait_started().await?;
    let mut messages = Vec::new();
    loop {
        match client.recv().await? {
            Some(ReplicationEvent::XLogData { data, .. }) => {
                if messages.len() < REPLAY_MAX {
                    messages.push(data);
                }
            }
            Some(ReplicationEvent::Commit { end_lsn, .. }) => {
                client.update_applied_lsn(end_lsn);
                if Lsn::from(end_lsn) >= end {
                    break;
                }
            }
            Some(ReplicationEvent::KeepAlive { wal_end, .. }) if Lsn::from(wal_end) >= end => break,
            Some(_) => {}
            None => break,
        }
    }
    client.abort();
    let text = format!(
        "source:\n  url: \"{}\"\n  publication: {PUBLICATION}\n  slot: {slot}\nprimers:\n{}",
        ctx.cluster.url(DB),
        pg::PRIMERS
    );
    let config = Config::from_yaml_str(&text, Path::new("replay.yaml"), |_| None)
        .map_err(|e| anyhow::anyhow!("replay config: {e}"))?;
    let deps = DepIndex::new(Arc::new(config.catalog));
    // Best of three passes of at least 1M rows each (CPU time is counted in 10 ms ticks): the least
    // disturbed by the other work on the machine.
    let repeat = 1_000_000usize.div_ceil(messages.len().max(1));
    let mut best: Option<Measured> = None;
    for _ in 0..3 {
        let m = replay_pass(&deps, &messages, repeat, end)?;
        if best.is_none_or(|b| m.secs < b.secs) {
            best = Some(m);
        }
    }
    best.context("no replay pass")
}

fn replay_pass(deps: &DepIndex, messages: &[Bytes], repeat: usize, lsn: Lsn) -> Result<Measured> {
    use kck::deps::{ResolvedTable, RowChange};
    use kck::queue::{TaskBatch, TaskKind};
    use kck::replication::pgoutput::{self, Message};

    let cpu = || proc_cpu("thread-self").map_or(0.0, |(own, _)| own);
    let started = cpu();
    let mut relations: HashMap<u32, ResolvedTable> = HashMap::new();
    let mut batch = TaskBatch::new(StreamLimits::default().batch_tasks);
    let mut kinds: Vec<TaskKind> = Vec::new();
    let mut rows = 0u64;
    for data in std::iter::repeat_n(messages, repeat).flatten() {
        let message = pgoutput::decode(data)?;
        let (relation_id, change) = match &message {
            Message::Relation(r) => {
                relations.insert(r.id, deps.resolve(r));
                continue;
            }
            Message::Insert { relation_id, new } => (*relation_id, RowChange::Insert { new }),
            Message::Update {
                relation_id,
                old,
                old_is_key,
                new,
            } => (
                *relation_id,
                RowChange::Update {
                    old: old.as_ref(),
                    old_is_key: *old_is_key,
                    new,
                },
            ),
            Message::Delete {
                relation_id,
                old,
                old_is_key,
            } => (
                *relation_id,
                RowChange::Delete {
                    old,
                    old_is_key: *old_is_key,
                },
            ),
            _ => continue,
        };
        rows += 1;
        let Some(table) = relations.get(&relation_id) else {
            continue;
        };
        if !table.is_relevant() {
            continue;
        }
        deps.map_row(table, change, &mut |k| kinds.push(k));
        for kind in kinds.drain(..) {
            batch.add(&kind, lsn);
        }
        if batch.is_full() {
            drop(batch.take());
        }
    }
    drop(batch.take());
    let secs = (cpu() - started).max(0.01);
    Ok(Measured {
        rows,
        secs,
        client_cpu: secs,
        walsender_cpu: 0.0,
        batches: 0,
        snapshots: 0,
    })
}

/// Samples the CPU time of the walsender serving a slot while it runs.
struct WalsenderSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<f64>,
}

impl WalsenderSampler {
    fn start(url: String, slot: String) -> WalsenderSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let Ok(client) = pg::connect(&url).await else {
                return 0.0;
            };
            let mut cpu = 0.0f64;
            while !flag.load(Ordering::Relaxed) {
                if let Ok(Some(pid)) = pg::slot_pid(&client, &slot).await
                    && let Some((own, _)) = proc_cpu(&pid.to_string())
                {
                    cpu = cpu.max(own);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cpu
        });
        WalsenderSampler { stop, task }
    }

    async fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(0.0)
    }
}

/// A store that takes every task and keeps nothing: the decode benchmark measures the reader, not the
/// store. Every key counts as cached, so every mapped key goes through the batch.
#[derive(Debug, Default)]
pub struct NullStore {
    pub tasks: AtomicU64,
    pub batches: AtomicU64,
}

#[async_trait]
impl Store for NullStore {
    async fn get(&self, _key: &str) -> StoreResult<Option<Entry>> {
        Ok(None)
    }
    async fn try_lease(
        &self,
        _name: &str,
        _holder: &str,
        _ttl: std::time::Duration,
    ) -> StoreResult<bool> {
        Ok(true)
    }
    async fn release_lease(&self, _name: &str, _holder: &str) -> StoreResult<()> {
        Ok(())
    }
    async fn is_registered(&self, _key: &str) -> StoreResult<bool> {
        Ok(true)
    }
    async fn register_key(&self, _primer: &str, _key: &str) -> StoreResult<()> {
        Ok(())
    }
    async fn store_result(&self, _primer: &str, _key: &str, _entry: Entry) -> StoreResult<Stored> {
        Ok(Stored::Written)
    }
    async fn remove_key(&self, _primer: &str, _key: &str) -> StoreResult<()> {
        Ok(())
    }
    async fn keys(
        &self,
        _primer: &str,
        _after: Option<&str>,
        _limit: usize,
    ) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }
    async fn enqueue(&self, tasks: Vec<Task>) -> StoreResult<()> {
        self.tasks.fetch_add(tasks.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn claim(&self, _max: usize, _lease: Duration) -> StoreResult<Vec<Claim>> {
        Ok(Vec::new())
    }
    async fn finish(
        &self,
        _claim: &Claim,
        _result: Option<(&str, &str, Entry)>,
        _follow_up: Vec<Task>,
    ) -> StoreResult<Option<Stored>> {
        Ok(None)
    }
    async fn retry(&self, _claim: &Claim, _delay: Duration) -> StoreResult<()> {
        Ok(())
    }
    async fn wait_for_tasks(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }
    async fn queue_stats(&self) -> StoreResult<QueueStats> {
        Ok(QueueStats::default())
    }
    async fn get_meta(&self, _name: &str) -> StoreResult<Option<Bytes>> {
        Ok(None)
    }
    async fn put_meta(&self, _name: &str, _value: Bytes) -> StoreResult<()> {
        Ok(())
    }
}
