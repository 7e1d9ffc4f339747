//! Scenario 2: freshness, commit to visible through `/fetch`, while a writer commits at a steady rate.
//!
//! kck runs in this process (on its own runtime) so that the refresh queue can be sampled. A load
//! generator (tokio-postgres, several connections) commits single-row UPDATEs of cached `user/{id}` keys
//! at a fixed rate. A prober thread, on its own connection, updates one more cached user, notes when its
//! COMMIT returned, and polls `/fetch/user/{id}` (every 200 µs, over a kept-alive connection) until the new
//! value shows; then waits 10 ms and probes again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kck::app::Running;
use kck::lsn::Lsn;
use tokio_postgres::Client;

use crate::Ctx;
use crate::http::{self, Http};
use crate::kck::Instance;
use crate::pg::{self, DB};
use crate::report::{Goal, Section, Table};
use crate::util::{Rng, mean, percentile, thousands};

const POLL: Duration = Duration::from_micros(200);
const GAP: Duration = Duration::from_millis(10);
const WARMUP: Duration = Duration::from_secs(1);

pub fn run(ctx: &Ctx) -> Result<Section> {
    let s = &ctx.sizes;
    let mut section = Section::new(
        "2. Freshness",
        format!(
            "kck in process (4 refresh workers, 2 runtime threads). A writer commits single-row UPDATEs of \
             random cached `user/{{id}}` keys (point primer; {} cached) at a steady rate over several \
             connections; a prober updates one more cached user, takes the time its COMMIT returned, and \
             polls `/fetch` every 200 µs until the new value is served (10 ms between probes). {} s per \
             rate after 1 s of warm-up. Queue depth sampled every 50 ms.",
            thousands(s.warm_users as f64),
            s.fresh_secs
        ),
    );
    let inst = Instance::new(&ctx.work, &ctx.cluster, "fresh", 4, pg::PRIMERS)?;
    let kck = inst.start_in_process(2)?;
    let addr = kck.addr();
    let probe_id = s.warm_users + 1;
    let paths = inst.paths("user", 1..=probe_id);
    let bad = http::fetch_all(addr, &paths, 8)?;
    anyhow::ensure!(bad == 0, "{bad} warm-up fetches failed");
    ctx.rt.block_on(wait_drained(ctx, kck.running()))?;

    let mut table = Table::new(&[
        "target tx/s",
        "achieved tx/s",
        "probes",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "not seen in 10 s",
        "queue depth mean / max",
        "claimed max",
    ]);
    for &rate in &s.fresh_rates {
        eprintln!("kck-bench: freshness at {rate} tx/s");
        let r = measure(ctx, kck.running(), addr, rate, probe_id)?;
        let p = |q| percentile(&r.latencies_ms, q).unwrap_or(f64::NAN);
        table.row(vec![
            thousands(f64::from(rate)),
            thousands(r.achieved),
            r.latencies_ms.len().to_string(),
            format!("{:.2}", p(50.0)),
            format!("{:.2}", p(90.0)),
            format!("{:.2}", p(99.0)),
            format!("{:.2}", p(100.0)),
            r.timeouts.to_string(),
            format!(
                "{:.1} / {}",
                mean(&r.depth).unwrap_or(0.0),
                r.depth.iter().copied().fold(0.0, f64::max)
            ),
            r.claimed_max.to_string(),
        ]);
        let short = r.achieved < f64::from(rate) * 0.95;
        let achieved = if short {
            format!(" (writer reached only {} tx/s)", thousands(r.achieved))
        } else {
            String::new()
        };
        if rate == 1_000 {
            section.goals.push(Goal::new(
                "p50 ≤ 2 ms at 1k tx/s",
                format!("{:.2} ms{achieved}", p(50.0)),
                Some(p(50.0) <= 2.0 && r.timeouts == 0),
            ));
            section.goals.push(Goal::new(
                "p99 ≤ 10 ms at 1k tx/s",
                format!("{:.2} ms{achieved}", p(99.0)),
                Some(p(99.0) <= 10.0 && r.timeouts == 0),
            ));
        }
        if rate == 5_000 {
            section.goals.push(Goal::new(
                "p99 ≤ 50 ms at 5k tx/s",
                format!("{:.2} ms{achieved}", p(99.0)),
                Some(p(99.0) <= 50.0 && !short && r.timeouts == 0),
            ));
        }
        ctx.rt.block_on(wait_drained(ctx, kck.running()))?;
    }
    section.tables.push(table);
    section.notes.push(
        "Latency is from the probe's COMMIT returning to the first poll that saw the value, so it includes \
         up to one poll interval (about 0.2 ms plus one request) of polling granularity."
            .into(),
    );
    kck.stop()?;
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;
    Ok(section)
}

pub struct Measured {
    pub achieved: f64,
    pub latencies_ms: Vec<f64>,
    pub timeouts: usize,
    pub depth: Vec<f64>,
    pub claimed_max: u64,
}

pub fn measure(
    ctx: &Ctx,
    running: &Running,
    addr: SocketAddr,
    rate: u32,
    probe_id: i64,
) -> Result<Measured> {
    let s = &ctx.sizes;
    let connections = (rate as usize / 250).clamp(4, 24);
    let duration = Duration::from_secs(s.fresh_secs);
    let stop_writers = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let store = running.store.clone();

    // Writers and the queue sampler on the bench runtime.
    let (writers, sampler) = ctx.rt.block_on(async {
        let mut writers = Vec::new();
        let period = Duration::from_secs_f64(connections as f64 / f64::from(rate));
        let start = tokio::time::Instant::now();
        for c in 0..connections {
            let client = ctx.cluster.connect(DB).await?;
            let stop = stop_writers.clone();
            let counting = counting.clone();
            let written = written.clone();
            let max_id = s.warm_users;
            let offset = period.mul_f64(c as f64 / connections as f64);
            writers.push(tokio::spawn(async move {
                write_at_rate(
                    client,
                    start + offset,
                    period,
                    max_id,
                    c as u64,
                    stop,
                    counting,
                    written,
                )
                .await
            }));
        }
        let stop = stop_writers.clone();
        let sampler = tokio::spawn(async move {
            let mut depth = Vec::new();
            let mut claimed_max = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(q) = store.queue_stats().await {
                    depth.push(q.depth as f64);
                    claimed_max = claimed_max.max(q.claimed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (depth, claimed_max)
        });
        anyhow::Ok((writers, sampler))
    })?;

    std::thread::sleep(WARMUP);
    counting.store(true, Ordering::Relaxed);
    let measure_start = Instant::now();
    let stop_probe = Arc::new(AtomicBool::new(false));
    let url = ctx.cluster.url(DB);
    let flag = stop_probe.clone();
    let prober = std::thread::spawn(move || probe(&url, addr, probe_id, &flag));
    std::thread::sleep(duration);
    stop_probe.store(true, Ordering::Relaxed);
    counting.store(false, Ordering::Relaxed);
    let elapsed = measure_start.elapsed().as_secs_f64();
    stop_writers.store(true, Ordering::Relaxed);
    let (latencies_ms, timeouts) = prober
        .join()
        .map_err(|_| anyhow::anyhow!("prober panicked"))??;
    let (depth, claimed_max) = ctx.rt.block_on(async {
        for w in writers {
            w.await??;
        }
        anyhow::Ok(sampler.await?)
    })?;
    Ok(Measured {
        achieved: written.load(Ordering::Relaxed) as f64 / elapsed,
        latencies_ms,
        timeouts,
        depth,
        claimed_max,
    })
}

#[allow(clippy::too_many_arguments)]
pub async fn write_at_rate(
    client: Client,
    start: tokio::time::Instant,
    period: Duration,
    max_id: i64,
    seed: u64,
    stop: Arc<AtomicBool>,
    counting: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> Result<()> {
    let statement = client
        .prepare("UPDATE users SET name = $1 WHERE id = $2")
        .await?;
    let mut rng = Rng::new(seed * 7919 + 1);
    let mut next = start;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next).await;
        next += period;
        n += 1;
        let id = rng.range(1, max_id);
        let name = format!("w{seed}-{n}");
        client.execute(&statement, &[&name, &id]).await?;
        if counting.load(Ordering::Relaxed) {
            written.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Probe until `stop`: (latencies in ms, probes not seen within 10 s).
pub fn probe(url: &str, addr: SocketAddr, id: i64, stop: &AtomicBool) -> Result<(Vec<f64>, usize)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(pg::connect(url))?;
    let statement = rt.block_on(client.prepare("UPDATE users SET name = $1 WHERE id = $2"))?;
    let mut http = Http::new(addr);
    let path = format!("/fetch/user/{id}");
    let mut latencies = Vec::new();
    let mut timeouts = 0;
    let nonce = std::process::id();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let value = format!("probe-{nonce}-{n}");
        let needle = format!("\"{value}\"");
        rt.block_on(client.execute(&statement, &[&value, &id]))
            .context("probe update")?;
        let committed = Instant::now();
        loop {
            let response = http.get(&path)?;
            if response.status == 200 && contains(&response.body, needle.as_bytes()) {
                latencies.push(committed.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if committed.elapsed() > Duration::from_secs(10) {
                timeouts += 1;
                break;
            }
            std::thread::sleep(POLL);
        }
        std::thread::sleep(GAP);
    }
    Ok((latencies, timeouts))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Wait until kck has read everything committed so far and its queue is empty (as the tests do).
pub async fn wait_drained(ctx: &Ctx, running: &Running) -> Result<Duration> {
    let started = Instant::now();
    let client = ctx.cluster.connect(DB).await?;
    let mark = pg::emit_mark(&client).await?;
    loop {
        let received = Lsn(running.stats.received.load(Ordering::Relaxed));
        let acked = Lsn(running.stats.acked.load(Ordering::Relaxed));
        let q = running.store.queue_stats().await?;
        if received >= mark && acked >= mark && q.depth == 0 && q.claimed == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("kck did not drain within 600 s (queue {q:?})");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
