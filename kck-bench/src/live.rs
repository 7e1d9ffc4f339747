//! Scenario 8: live keys (`/subscribe`). Memory per idle subscriber: kck's RSS before and after opening
//! 10,000 Server-Sent-Events streams (each on one `user` key, 1,000 distinct keys), each having received
//! its first value. Commit → event: 1,000 streams while a writer commits 1k tx/s of UPDATEs to their keys;
//! a probe stream's latency from its COMMIT to its event, beside a prober polling `/fetch` (as scenario 2)
//! in the same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::kck::Instance;
use crate::report::{Goal, Section, Table};
use crate::util::{percentile, proc_status_kib, thousands};
use crate::{Ctx, http, pg};

const SUBSCRIBERS: usize = 10_000;
const KEYS: i64 = 1_000;
/// The goal, per idle subscriber.
const GOAL_KIB: f64 = 4.0;

pub fn run(ctx: &Ctx) -> Result<Section> {
    let subscribers = SUBSCRIBERS;
    let mut section = Section::new(
        "8. Live keys",
        format!(
            "The kck release binary, embedded store. Idle subscribers: {n} `GET /subscribe` streams from \
             this driver (plain HTTP/1.1 over loopback, one connection each), each on one `user` key \
             ({k} distinct keys, cached first), each read up to its first `value` event, then left idle; \
             kck's RSS (VmRSS) before the first and 2 s after the last, divided by {n}. \
             http.max_connections and http.subscribe.max_subscriptions are raised above {n}; both \
             processes need an open-file limit above {n} (`ulimit -n`).",
            n = thousands(subscribers as f64),
            k = thousands(KEYS as f64),
        ),
    );
    let nofile = open_file_limit();
    anyhow::ensure!(
        nofile > subscribers as u64 + 256,
        "the open-file limit is {nofile}: raise it above {} (ulimit -n) for {subscribers} streams",
        subscribers + 256
    );
    let inst = Instance::new(&ctx.work, &ctx.cluster, "live", 2, pg::PRIMERS)?;
    // More connections and streams than the defaults allow.
    let text = std::fs::read_to_string(&inst.config)?;
    let limit = subscribers + 1000;
    let text = text.replacen(
        "http:\n",
        &format!(
            "http:\n  max_connections: {limit}\n  subscribe:\n    max_subscriptions: {limit}\n"
        ),
        1,
    );
    std::fs::write(&inst.config, text)?;
    let mut kck = inst.spawn(&ctx.kck_bin)?;
    let paths = inst.paths("user", 1..=KEYS);
    anyhow::ensure!(http::fetch_all(kck.addr, &paths, 8)? == 0, "warm-up failed");
    let pid = kck.pid();
    let before = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let started = Instant::now();
    let streams = ctx.rt.block_on(open_streams(kck.addr, subscribers))?;
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let per = after.saturating_sub(before) as f64 / subscribers as f64;
    let mut table = Table::new(&[
        "subscribers",
        "kck RSS before (MiB)",
        "kck RSS with them open (MiB)",
        "per idle subscriber (KiB)",
        "details",
    ]);
    table.row(vec![
        thousands(subscribers as f64),
        format!("{:.1}", before as f64 / 1024.0),
        format!("{:.1}", after as f64 / 1024.0),
        format!("{per:.2}"),
        format!(
            "opened and first value read in {:.1} s; each stream is a connection, a task, its \
             registry entry and hyper's buffers",
            opened.as_secs_f64()
        ),
    ]);
    section.tables.push(table);
    section.goals.push(Goal::new(
        format!(
            "memory per idle subscriber at {} ≤ 4 KiB",
            thousands(subscribers as f64)
        ),
        format!("{per:.2} KiB"),
        Some(per <= GOAL_KIB),
    ));
    drop(streams);
    std::thread::sleep(Duration::from_secs(1));
    latency(ctx, &mut section, kck.addr)?;
    kck.stop();
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(pg::DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;
    Ok(section)
}

/// The soft open-file limit of this process (inherited by kck).
fn open_file_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Open `n` streams, 200 at a time, each read up to its first `value` event.
async fn open_streams(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 200).min(n))
            .map(|j| tokio::spawn(open_one(addr, (j as i64 % KEYS) + 1)))
            .collect();
        for task in batch {
            out.push(task.await.context("a stream task")??);
        }
        i += 200;
    }
    Ok(out)
}

async fn open_one(addr: SocketAddr, id: i64) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /subscribe?key=user/{id} HTTP/1.1\r\nhost: kck\r\n\r\n").as_bytes())
        .await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.windows(12).any(|w| w == b"event: value") {
        anyhow::ensure!(Instant::now() < deadline, "no first value for user/{id}");
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await??;
        anyhow::ensure!(
            n > 0,
            "stream for user/{id} closed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(
        seen.starts_with(b"HTTP/1.1 200"),
        "answer: {}",
        String::from_utf8_lossy(&seen)
    );
    Ok(stream)
}

const LIVE_SUBSCRIBERS: usize = 1_000;
const RATE: u32 = 1_000;

/// Commit → event at 1k tx/s with 1,000 subscribers, beside `/fetch` polling.
fn latency(ctx: &Ctx, section: &mut Section, addr: SocketAddr) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (sse_id, poll_id) = (KEYS + 1, KEYS + 2);
    let warm: Vec<String> = [sse_id, poll_id]
        .iter()
        .map(|i| format!("/fetch/user/{i}"))
        .collect();
    anyhow::ensure!(http::fetch_all(addr, &warm, 2)? == 0, "warm-up failed");
    // 999 streams on the keys the writer changes, each read (and discarded) by its own task.
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let readers = ctx.rt.block_on(async {
        let streams = open_streams(addr, LIVE_SUBSCRIBERS - 1).await?;
        let mut readers = Vec::new();
        for mut stream in streams {
            let events = events.clone();
            let stop = stop.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(n)) => {
                            let k = buf[..n]
                                .windows(12)
                                .filter(|w| w == b"event: value")
                                .count();
                            events.fetch_add(k as u64, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
            }));
        }
        anyhow::Ok(readers)
    })?;
    let connections = 4;
    let written = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(AtomicBool::new(false));
    let writers = ctx.rt.block_on(async {
        let period = Duration::from_secs_f64(connections as f64 / f64::from(RATE));
        let start = tokio::time::Instant::now();
        let mut writers = Vec::new();
        for c in 0..connections {
            let client = ctx.cluster.connect(pg::DB).await?;
            let offset = period.mul_f64(c as f64 / connections as f64);
            writers.push(tokio::spawn(crate::fresh::write_at_rate(
                client,
                start + offset,
                period,
                KEYS,
                c as u64 + 100,
                stop.clone(),
                counting.clone(),
                written.clone(),
            )));
        }
        anyhow::Ok(writers)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let stop_probes = Arc::new(AtomicBool::new(false));
    let url = ctx.cluster.url(pg::DB);
    let (flag, u) = (stop_probes.clone(), url.clone());
    let sse = std::thread::spawn(move || probe_stream(&u, addr, sse_id, &flag));
    let (flag, u) = (stop_probes.clone(), url);
    let poll = std::thread::spawn(move || crate::fresh::probe(&u, addr, poll_id, &flag));
    std::thread::sleep(Duration::from_secs(ctx.sizes.fresh_secs));
    stop_probes.store(true, Ordering::Relaxed);
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (sse_ms, sse_lost) = sse
        .join()
        .map_err(|_| anyhow::anyhow!("probe panicked"))??;
    let (poll_ms, poll_lost) = poll
        .join()
        .map_err(|_| anyhow::anyhow!("probe panicked"))??;
    ctx.rt.block_on(async {
        for w in writers {
            w.await??;
        }
        for r in readers {
            let _ = r.await;
        }
        anyhow::Ok(())
    })?;
    let achieved = written.load(Ordering::Relaxed) as f64 / elapsed;
    let mut table = Table::new(&[
        "how the change is seen",
        "achieved tx/s",
        "probes",
        "p50 ms",
        "p99 ms",
        "max ms",
        "not seen in 10 s",
        "details",
    ]);
    let p = |v: &[f64], q| percentile(v, q).unwrap_or(f64::NAN);
    table.row(vec![
        "`/subscribe` event".into(),
        thousands(achieved),
        sse_ms.len().to_string(),
        format!("{:.2}", p(&sse_ms, 50.0)),
        format!("{:.2}", p(&sse_ms, 99.0)),
        format!("{:.2}", p(&sse_ms, 100.0)),
        sse_lost.to_string(),
        format!(
            "{} streams open; {} value events read by the other streams",
            thousands(LIVE_SUBSCRIBERS as f64),
            thousands(events.load(Ordering::Relaxed) as f64)
        ),
    ]);
    table.row(vec![
        "`/fetch` polled every 200 µs (baseline)".into(),
        thousands(achieved),
        poll_ms.len().to_string(),
        format!("{:.2}", p(&poll_ms, 50.0)),
        format!("{:.2}", p(&poll_ms, 99.0)),
        format!("{:.2}", p(&poll_ms, 100.0)),
        poll_lost.to_string(),
        "same run, same kck, another key".into(),
    ]);
    section.tables.push(table);
    let short = achieved < f64::from(RATE) * 0.95;
    section.goals.push(Goal::new(
        "commit → event p99 ≤ 20 ms at 1k tx/s with 1,000 subscribers",
        format!(
            "{:.2} ms (polling: {:.2} ms){}",
            p(&sse_ms, 99.0),
            p(&poll_ms, 99.0),
            if short {
                format!(" (writer reached only {} tx/s)", thousands(achieved))
            } else {
                String::new()
            }
        ),
        Some(p(&sse_ms, 99.0) <= 20.0 && sse_lost == 0),
    ));
    Ok(())
}

/// Update user `id`, time from its COMMIT to the event on a stream subscribed to it; 10 ms between probes.
fn probe_stream(
    url: &str,
    addr: SocketAddr,
    id: i64,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(Vec<f64>, usize)> {
    use std::sync::atomic::Ordering;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = pg::connect(url).await?;
        let statement = client
            .prepare("UPDATE users SET name = $1 WHERE id = $2")
            .await?;
        let mut stream = open_one(addr, id).await?;
        let mut latencies = Vec::new();
        let mut lost = 0;
        let nonce = std::process::id();
        let mut buf = vec![0u8; 8192];
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let value = format!("live-{nonce}-{n}");
            let needle = format!("\"{value}\"");
            let mut seen: Vec<u8> = Vec::new();
            client.execute(&statement, &[&value, &id]).await?;
            let committed = Instant::now();
            loop {
                if seen.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    latencies.push(committed.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                let left = Duration::from_secs(10).saturating_sub(committed.elapsed());
                match tokio::time::timeout(left, stream.read(&mut buf)).await {
                    Ok(Ok(0)) => anyhow::bail!("the probe stream closed"),
                    Ok(Ok(k)) => seen.extend_from_slice(&buf[..k]),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        lost += 1;
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok((latencies, lost))
    })
}
