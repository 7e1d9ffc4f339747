//! Scenario 5: memory. Peak RSS (VmHWM) of the kck binary through a large transaction, and while its
//! refresh queue is full.
//!
//! The "full queue" phase slows the refreshes: one worker and a primer whose query sleeps 10 ms (a knob
//! table read by `bench_slow()`, switched on after the keys are cached), then every cached key changes at
//! once. The "slow store" phase runs kck with its store slowed (see `child`): the stream must wait for
//! the store rather than buffer what it reads.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::Ctx;
use crate::http;
use crate::kck::Instance;
use crate::pg::{self, DB};
use crate::report::{Goal, Section, Table};
use crate::util::{ChildGuard, proc_status_kib, thousands};

const LIMIT_MIB: f64 = 150.0;

const SLOW_PRIMER: &str = r#"
  - name: slow_user
    key: "slow_user/{id:int}"
    shape: row
    query: "SELECT id, name, bench_slow() AS slow FROM users WHERE id = $1"
    depends_on:
      - table: users
        columns: { id: id }
"#;

pub fn run(ctx: &Ctx) -> Result<Section> {
    let s = &ctx.sizes;
    let mut section = Section::new(
        "5. Memory",
        format!(
            "Peak RSS (VmHWM from /proc) of the kck release binary, which starts fresh for each phase; RSS \
             also sampled every 100 ms. Big transaction: {w} `user`, {w} `orders_by_user` and every \
             `group_stats` key cached, then one UPDATE of all {o} orders (each row maps to a cached \
             group key, and to a cached user list for {w} of the users), until the slot has acknowledged \
             it and the refreshes have stopped. Full queue: the refreshes are slowed: 1 worker, a primer whose query \
             sleeps 10 ms, {k} of its keys cached, then one UPDATE changes all {k} rows and {k} more \
             single-row transactions change them again while the queue holds them. Slow store: kck (the \
             library, in a child process) with its store wrapped to answer late, the keys of the big \
             transaction phase cached.",
            w = thousands(s.warm_users as f64),
            o = thousands(s.orders as f64),
            k = thousands(s.slow_keys as f64),
        ),
    );
    let mut table = Table::new(&[
        "phase",
        "RSS before (MiB)",
        "peak RSS, VmHWM (MiB)",
        "RSS after (MiB)",
        "details",
    ]);

    // Phase 1: a large transaction.
    let inst = Instance::new(&ctx.work, &ctx.cluster, "memory", 4, pg::PRIMERS)?;
    let mut kck = inst.spawn(&ctx.kck_bin)?;
    let paths = big_transaction_keys(&inst, s);
    anyhow::ensure!(http::fetch_all(kck.addr, &paths, 8)? == 0, "warm-up failed");
    let before = rss_mib(kck.pid());
    let sampler = Sampler::start(kck.pid());
    let (ingest, quiet) = ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        let started = Instant::now();
        client
            .batch_execute("UPDATE orders SET amount = amount + 1")
            .await?;
        let end = pg::insert_lsn(&client).await?;
        pg::wait_slot_confirmed(&client, &inst.slot, end, Duration::from_secs(900)).await?;
        let ingest = started.elapsed();
        pg::wait_refreshes_quiet(&client, Duration::from_secs(2), Duration::from_secs(900)).await?;
        let quiet = started.elapsed();
        client.batch_execute("VACUUM ANALYZE orders").await?;
        anyhow::Ok((ingest, quiet))
    })?;
    let sampled = sampler.stop();
    let peak = hwm_mib(kck.pid());
    let after = rss_mib(kck.pid());
    table.row(vec![
        format!("one {}-row transaction", thousands(s.orders as f64)),
        format!("{before:.0}"),
        format!("{peak:.0}"),
        format!("{after:.0}"),
        format!(
            "{} keys cached; transaction acknowledged {:.1} s after it was sent (commit included), \
             refreshes done after {:.1} s; highest sampled RSS {sampled:.0} MiB",
            thousands(paths.len() as f64),
            ingest.as_secs_f64(),
            quiet.as_secs_f64()
        ),
    ]);
    section.goals.push(Goal::new(
        "peak RSS < 150 MB during the big transaction",
        format!("{peak:.0} MiB"),
        Some(peak < LIMIT_MIB),
    ));
    kck.stop();
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;

    // Phase 2: a full queue.
    let primers = format!("{}{SLOW_PRIMER}", pg::PRIMERS);
    let inst = Instance::new(&ctx.work, &ctx.cluster, "memory_queue", 1, &primers)?;
    let mut kck = inst.spawn(&ctx.kck_bin)?;
    let k = s.slow_keys;
    let paths = inst.paths("slow_user", 1..=k);
    anyhow::ensure!(http::fetch_all(kck.addr, &paths, 8)? == 0, "warm-up failed");
    let before = rss_mib(kck.pid());
    let sampler = Sampler::start(kck.pid());
    let (done, held) = ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::reset_statements(&client).await?;
        client
            .batch_execute("UPDATE bench_knobs SET delay = 0.01")
            .await?;
        client
            .batch_execute(&format!(
                "UPDATE users SET name = name || '.' WHERE id <= {k}"
            ))
            .await?;
        client.batch_execute("SET synchronous_commit = off").await?;
        client
            .batch_execute(&format!(
                "DO $$ BEGIN FOR i IN 1..{k} LOOP \
                 UPDATE users SET name = name || '+' WHERE id = (i * 7919) % {k} + 1; COMMIT; \
                 END LOOP; END $$"
            ))
            .await?;
        let end = pg::insert_lsn(&client).await?;
        let started = Instant::now();
        pg::wait_slot_confirmed(&client, &inst.slot, end, Duration::from_secs(600)).await?;
        // Hold the full queue a little longer, then see how far the worker got.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let held = started.elapsed();
        let done = pg::statement_calls(&client, "bench_slow").await?;
        client
            .batch_execute("UPDATE bench_knobs SET delay = 0")
            .await?;
        anyhow::Ok((done, held))
    })?;
    let sampled = sampler.stop();
    let peak = hwm_mib(kck.pid());
    let after = rss_mib(kck.pid());
    kck.child.kill9();
    table.row(vec![
        "full refresh queue".into(),
        format!("{before:.0}"),
        format!("{peak:.0}"),
        format!("{after:.0}"),
        format!(
            "{} keys changed, then changed again; the one worker had refreshed {} of them when the \
             stream had acknowledged everything ({:.1} s later), so about {} tasks were queued; \
             highest sampled RSS {sampled:.0} MiB",
            thousands(k as f64),
            thousands(done as f64),
            held.as_secs_f64(),
            thousands((k - done).max(0) as f64)
        ),
    ]);
    section.goals.push(Goal::new(
        "peak RSS < 150 MB with a full queue (slow refreshes)",
        format!("{peak:.0} MiB"),
        Some(peak < LIMIT_MIB),
    ));
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;
    // Phase 3: a slow store.
    let (row, peak) = slow_store(ctx)?;
    table.row(row);
    section.goals.push(Goal::new(
        "peak RSS < 150 MB while the store is slow",
        format!("{peak:.0} MiB"),
        Some(peak < LIMIT_MIB),
    ));
    section.tables.push(table);
    Ok(section)
}

/// kck (the library, in a child process of this driver: see `child`) whose store answers every enqueue
/// 200 ms late and every finish 50 ms late, through the big transaction of phase 1 and a burst of
/// single-row transactions: the stream must wait for the store instead of buffering.
fn slow_store(ctx: &Ctx) -> Result<(Vec<String>, f64)> {
    let s = &ctx.sizes;
    let inst = Instance::new(&ctx.work, &ctx.cluster, "memory_slow", 4, pg::PRIMERS)?;
    let flag = inst.dir.join("flag");
    let out_path = inst.dir.join("child.out");
    let log = std::fs::File::create(inst.dir.join("kck.log"))?;
    let mut child = ChildGuard::spawn(
        "kck (slowed store)",
        Command::new(std::env::current_exe()?)
            .env(crate::child::CHILD_ENV, &inst.config)
            .env(crate::child::FLAG_ENV, &flag)
            .env("KCK_LOG", std::env::var("KCK_LOG").unwrap_or("warn".into()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(log),
    )?;
    http::wait_healthy(inst.addr, Duration::from_secs(60))?;
    let paths = big_transaction_keys(&inst, s);
    anyhow::ensure!(
        http::fetch_all(inst.addr, &paths, 8)? == 0,
        "warm-up failed"
    );
    let pid = child.pid();
    let before = rss_mib(pid);
    let sampler = Sampler::start(pid);
    std::fs::write(crate::child::slow_path(&flag), b"")?;
    let burst = s.slow_keys;
    let (acked, quiet) = ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        let started = Instant::now();
        client
            .batch_execute("UPDATE orders SET amount = amount + 1")
            .await?;
        client.batch_execute("SET synchronous_commit = off").await?;
        client
            .batch_execute(&format!(
                "DO $$ BEGIN FOR i IN 1..{burst} LOOP \
                 UPDATE users SET name = name || '+' WHERE id = (i * 7919) % {w} + 1; COMMIT; \
                 END LOOP; END $$",
                w = s.warm_users
            ))
            .await?;
        let end = pg::insert_lsn(&client).await?;
        pg::wait_slot_confirmed(&client, &inst.slot, end, Duration::from_secs(1800)).await?;
        let acked = started.elapsed();
        // The store at full speed again; the queue drains.
        std::fs::remove_file(crate::child::slow_path(&flag))?;
        pg::wait_refreshes_quiet(&client, Duration::from_secs(2), Duration::from_secs(900)).await?;
        let quiet = started.elapsed();
        client.batch_execute("VACUUM ANALYZE orders").await?;
        anyhow::Ok((acked, quiet))
    })?;
    let sampled = sampler.stop();
    let peak = hwm_mib(pid);
    let after = rss_mib(pid);
    std::fs::write(crate::child::stop_path(&flag), b"")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill9();
    // The child's `depth=N waits=M` lines: the deepest queue and the last count of waits.
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let (mut depth, mut waits) = (0u64, 0u64);
    for line in out.lines() {
        for field in line.split_whitespace() {
            match field.split_once('=') {
                Some(("depth", v)) => depth = depth.max(v.parse().unwrap_or(0)),
                Some(("waits", v)) => waits = waits.max(v.parse().unwrap_or(0)),
                _ => {}
            }
        }
    }
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;
    let row = vec![
        "slow store".into(),
        format!("{before:.0}"),
        format!("{peak:.0}"),
        format!("{after:.0}"),
        format!(
            "every enqueue 200 ms late, every finish 50 ms late; one UPDATE of all {o} orders, then \
             {b} single-row transactions; the queue held at most {d} tasks (the stream paused {w} \
             times for a full queue, `refresh.max_queue`); acknowledged after {a:.1} s, refreshes done {q:.1} s after the first \
             write (store at full speed again from the acknowledgement); highest sampled RSS \
             {sampled:.0} MiB",
            o = thousands(s.orders as f64),
            b = thousands(burst as f64),
            w = thousands(waits as f64),
            d = thousands(depth as f64),
            a = acked.as_secs_f64(),
            q = quiet.as_secs_f64(),
        ),
    ];
    Ok((row, peak))
}

/// The keys cached before the big transaction (and the slow store's run of it).
fn big_transaction_keys(inst: &Instance, s: &crate::Sizes) -> Vec<String> {
    let mut paths = inst.paths("user", 1..=s.warm_users);
    paths.extend(inst.paths("orders_by_user", 1..=s.warm_users));
    paths.extend(inst.paths("group_stats", 1..=s.groups));
    paths
}

fn rss_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmRSS").unwrap_or(0) as f64 / 1024.0
}

fn hwm_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmHWM").unwrap_or(0) as f64 / 1024.0
}

/// Samples a process's RSS every 100 ms; returns the highest, in MiB.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = proc_status_kib(pid, "VmRSS") {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler { stop, peak, thread }
    }

    fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed) as f64 / 1024.0
    }
}
