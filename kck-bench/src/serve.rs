//! Scenario 3: serving. `/fetch` of cached keys (wrk, from a second process) against the primer's query run
//! directly on Postgres (pgbench, prepared statements) and against Redis GET of the same bytes
//! (redis-benchmark), all at the same concurrency, one after the other.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::Ctx;
use crate::http::{self, Http};
use crate::kck::Instance;
use crate::pg::{self, DB};
use crate::report::{Goal, Section, Table};
use crate::util::{ChildGuard, free_port, percentile, proc_cpu_secs, run as exec, thousands};

#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// The server's CPU time per request, in µs (kck and Redis: the process's threads, measured around
    /// the run; not measured for Postgres, whose backends come and go).
    pub server_us: Option<f64>,
}

/// `run` (a load generator returning its [`Load`]) with the CPU time of process `pid` measured around it.
fn with_server_cpu(pid: u32, run: impl FnOnce() -> Result<Load>) -> Result<Load> {
    let before = proc_cpu_secs(pid);
    let started = std::time::Instant::now();
    let mut load = run()?;
    let wall = started.elapsed().as_secs_f64();
    if let (Some(before), Some(after)) = (before, proc_cpu_secs(pid)) {
        // Requests ≈ rate × wall time (the generator's start-up makes this a slight overestimate).
        let requests = load.rate * wall;
        if requests > 0.0 {
            load.server_us = Some((after - before) * 1e6 / requests);
        }
    }
    Ok(load)
}

pub fn run(ctx: &Ctx) -> Result<Section> {
    let s = &ctx.sizes;
    let c = s.concurrency;
    let mut section = Section::new(
        "3. Serving",
        format!(
            "kck (release binary) with every `group_stats` key ({} groups) and {} `user` keys cached. \
             Each target is driven for {} s at {c} connections (and, for latency without queueing, kck \
             and Redis at 1), the load generator in its own process: wrk (2 threads, random cached key \
             per request) for kck; pgbench (prepared, {c} clients, 2 \
             threads, random parameter) running the primer's query as an application would; \
             redis-benchmark (2 threads, random key, no pipelining) GETting the very bytes kck serves; \
             and, driven by wrk like kck, a bare axum server (the same axum, hyper, tokio and \
             allocator, no middleware) answering the same paths with the same bytes from a hash map: \
             what HTTP costs in this stack before kck does anything.",
            thousands(s.groups as f64),
            thousands(s.warm_users as f64),
            s.serve_secs
        ),
    );
    let inst = Instance::new(&ctx.work, &ctx.cluster, "serve", 4, pg::PRIMERS)?;
    let mut kck = inst.spawn(&ctx.kck_bin)?;
    let groups = inst.paths("group_stats", 1..=s.groups);
    let users = inst.paths("user", 1..=s.warm_users);
    anyhow::ensure!(
        http::fetch_all(kck.addr, &groups, 8)? == 0,
        "warm-up failed"
    );
    anyhow::ensure!(http::fetch_all(kck.addr, &users, 8)? == 0, "warm-up failed");
    // The bytes kck serves, for Redis.
    let mut client = Http::new(kck.addr);
    let group_bytes: Vec<Vec<u8>> = groups
        .iter()
        .map(|p| client.get(p).map(|r| r.body))
        .collect::<Result<_>>()?;
    let user_bytes: Vec<Vec<u8>> = users
        .iter()
        .map(|p| client.get(p).map(|r| r.body))
        .collect::<Result<_>>()?;
    drop(client);

    let redis_port = free_port()?;
    let mut redis = ChildGuard::spawn(
        "redis-server",
        Command::new(&ctx.tools.redis_server)
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    redis_load(redis_port, "gs:", &group_bytes)?;
    redis_load(redis_port, "u:", &user_bytes)?;

    let dir = ctx.work.join("serve");
    std::fs::create_dir_all(&dir)?;
    // The HTTP floor: bare axum answering the same paths with the same bytes.
    let floor_file = dir.join("floor.tsv");
    let mut lines = String::new();
    for (path, body) in groups
        .iter()
        .zip(&group_bytes)
        .chain(users.iter().zip(&user_bytes))
    {
        lines.push_str(path);
        lines.push('\t');
        lines.push_str(&String::from_utf8_lossy(body));
        lines.push('\n');
    }
    std::fs::write(&floor_file, lines)?;
    let floor_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut floor = ChildGuard::spawn(
        "HTTP floor",
        Command::new(std::env::current_exe()?)
            .env(
                crate::floor::FLOOR_ENV,
                format!("{floor_addr} {}", floor_file.display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )?;
    http::wait_answers(
        "the HTTP floor server",
        floor_addr,
        &groups[0],
        Duration::from_secs(30),
    )?;
    let mut table = Table::new(&[
        "primer",
        "target",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU µs / request",
        "kck ÷ target",
    ]);
    let mut results = Vec::new();
    for (primer, n, bytes_avg, pgbench_sql, redis_prefix) in [
        (
            "group_stats (aggregate of ~1k rows)",
            s.groups,
            avg_len(&group_bytes),
            format!("\\set g random(1, {})\n{}\n", s.groups, pg::AGGREGATE_SQL),
            "gs:",
        ),
        (
            "user (point lookup)",
            s.warm_users,
            avg_len(&user_bytes),
            format!("\\set id random(1, {})\n{}\n", s.warm_users, pg::POINT_SQL),
            "u:",
        ),
    ] {
        let name = primer.split_whitespace().next().unwrap_or(primer);
        eprintln!("kck-bench: serving {name}: kck");
        let kck_load = with_server_cpu(kck.pid(), || wrk(ctx, &dir, kck.addr, name, n, c))?;
        eprintln!("kck-bench: serving {name}: HTTP floor");
        let floor_load = with_server_cpu(floor.pid(), || wrk(ctx, &dir, floor_addr, name, n, c))?;
        eprintln!("kck-bench: serving {name}: pgbench");
        let pg_load = pgbench(ctx, &dir, name, &pgbench_sql)?;
        eprintln!("kck-bench: serving {name}: redis");
        let redis_load = with_server_cpu(redis.pid(), || {
            redis_benchmark(ctx, redis_port, redis_prefix, n, c)
        })?;
        for (target, load) in [
            (format!("kck /fetch ({bytes_avg} B)"), kck_load),
            ("Postgres direct (pgbench)".to_string(), pg_load),
            (format!("Redis GET ({bytes_avg} B)"), redis_load),
            ("HTTP floor: bare axum, same bytes".to_string(), floor_load),
        ] {
            table.row(vec![
                primer.to_string(),
                target,
                thousands(load.rate),
                format!("{:.3}", load.p50_ms),
                format!("{:.3}", load.p99_ms),
                load.errors.to_string(),
                cpu_us(&load),
                format!("{:.2}", kck_load.rate / load.rate),
            ]);
        }
        results.push((name.to_string(), kck_load, pg_load, redis_load, floor_load));
    }
    // Latency without queueing: one connection, one request at a time.
    eprintln!("kck-bench: serving group_stats at 1 connection");
    let kck_one = with_server_cpu(kck.pid(), || {
        wrk(ctx, &dir, kck.addr, "group_stats", s.groups, 1)
    })?;
    let redis_one = with_server_cpu(redis.pid(), || {
        redis_benchmark(ctx, redis_port, "gs:", s.groups, 1)
    })?;
    for (target, load) in [
        ("kck /fetch, 1 connection", kck_one),
        ("Redis GET, 1 connection", redis_one),
    ] {
        table.row(vec![
            "group_stats (aggregate of ~1k rows)".into(),
            target.into(),
            thousands(load.rate),
            format!("{:.3}", load.p50_ms),
            format!("{:.3}", load.p99_ms),
            load.errors.to_string(),
            cpu_us(&load),
            format!("{:.2}", kck_one.rate / load.rate),
        ]);
    }
    section.tables.push(table);
    if let Some((_, k, p, r, f)) = results.iter().find(|(n, ..)| n == "group_stats") {
        section.goals.push(Goal::new(
            "kck ≥ 25 × the direct aggregate query's rate",
            format!(
                "{:.1} × ({} vs {}/s)",
                k.rate / p.rate,
                thousands(k.rate),
                thousands(p.rate)
            ),
            Some(k.rate >= 25.0 * p.rate),
        ));
        section.goals.push(Goal::new(
            "kck ≥ 1.0 × Redis GET of the same bytes",
            format!(
                "{:.2} × ({} vs {}/s)",
                k.rate / r.rate,
                thousands(k.rate),
                thousands(r.rate)
            ),
            Some(k.rate >= r.rate),
        ));
        section.goals.push(Goal::new(
            "kck p99 < 1 ms, one connection (no queueing)",
            format!(
                "{:.3} ms (Redis {:.3} ms)",
                kck_one.p99_ms, redis_one.p99_ms
            ),
            Some(kck_one.p99_ms < 1.0),
        ));
        section.goals.push(Goal::new(
            format!("kck p99 < 1 ms at {c} connections"),
            format!(
                "{:.3} ms (Redis {:.3} ms at the same concurrency)",
                k.p99_ms, r.p99_ms
            ),
            Some(k.p99_ms < 1.0),
        ));
        if let (Some(kus), Some(rus), Some(fus)) = (k.server_us, r.server_us, f.server_us) {
            section.notes.push(format!(
                "Server CPU per request at {c} connections: kck {kus:.1} µs, Redis {rus:.1} µs, the \
                 bare axum floor {fus:.1} µs. HTTP/1.1 through hyper and axum costs {:.2} × a Redis GET \
                 before kck does anything; kck adds {:.1} µs (authentication check, key parsing, the \
                 store read, metrics, its headers). The throughput ratios also depend on each load \
                 generator's own cost per request, since the generators share the cores with the \
                 servers.",
                fus / rus,
                kus - fus
            ));
        }
    }
    section.notes.push(format!(
        "Load generators share the {} cores with the server they drive, so every target pays for its \
         client; at {c} connections, Little's law puts the mean latency at {c} ÷ rate, so a p99 under \
         1 ms at this concurrency needs well over {} requests/s.",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        thousands(c as f64 * 1000.0)
    ));
    section.notes.push(
        "pgbench latencies come from its per-transaction log, sampled (10 % for the aggregate, 1 % for \
         the point query) so that logging costs it little."
            .into(),
    );
    redis.kill9();
    floor.kill9();
    kck.stop();
    ctx.rt.block_on(async {
        let client = ctx.cluster.connect(DB).await?;
        pg::drop_slot(&client, &inst.slot).await
    })?;
    Ok(section)
}

fn cpu_us(load: &Load) -> String {
    load.server_us
        .map_or_else(|| "-".into(), |us| format!("{us:.1}"))
}

fn avg_len(values: &[Vec<u8>]) -> usize {
    values.iter().map(Vec::len).sum::<usize>() / values.len().max(1)
}

pub fn wrk(
    ctx: &Ctx,
    dir: &Path,
    addr: std::net::SocketAddr,
    primer: &str,
    n: i64,
    connections: usize,
) -> Result<Load> {
    let script = dir.join(format!("{primer}.lua"));
    std::fs::write(
        &script,
        format!(
            "local counter = 1\n\
             function setup(thread) thread:set(\"id\", counter); counter = counter + 1 end\n\
             function init(args) math.randomseed(id * 7919) end\n\
             request = function()\n  return wrk.format(\"GET\", \"/fetch/{primer}/\" .. math.random(1, {n}))\nend\n"
        ),
    )?;
    let out = exec(
        "wrk",
        Command::new(&ctx.tools.wrk)
            .arg(format!("-t{}", connections.min(2)))
            .arg(format!("-c{connections}"))
            .arg(format!("-d{}s", ctx.sizes.serve_secs))
            .arg("--latency")
            .arg("-s")
            .arg(&script)
            .arg(format!("http://{addr}")),
    )?;
    parse_wrk(&out).with_context(|| format!("reading wrk's output:\n{out}"))
}

/// Requests/s, p50, p99 and non-2xx answers from `wrk --latency` output.
pub fn parse_wrk(out: &str) -> Result<Load> {
    let mut load = Load::default();
    let mut seen = 0;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            load.rate = v.trim().parse()?;
            seen += 1;
        } else if let Some(v) = t.strip_prefix("50%") {
            load.p50_ms = wrk_ms(v.trim())?;
            seen += 1;
        } else if let Some(v) = t.strip_prefix("99%") {
            load.p99_ms = wrk_ms(v.trim())?;
            seen += 1;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            load.errors += v.trim().parse::<u64>()?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            load.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if seen < 3 {
        bail!("no Requests/sec or latency distribution in wrk's output");
    }
    Ok(load)
}

fn wrk_ms(v: &str) -> Result<f64> {
    let (number, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown wrk duration {v:?}")
    };
    Ok(number.trim().parse::<f64>()? * factor)
}

fn pgbench(ctx: &Ctx, dir: &Path, primer: &str, sql: &str) -> Result<Load> {
    let script = dir.join(format!("{primer}.sql"));
    std::fs::write(&script, sql)?;
    let log_dir = dir.join(format!("pgbench-{primer}"));
    let _ = std::fs::remove_dir_all(&log_dir);
    std::fs::create_dir_all(&log_dir)?;
    let sampling = if primer == "group_stats" {
        "0.1"
    } else {
        "0.01"
    };
    let c = ctx.sizes.concurrency.to_string();
    let out = exec(
        "pgbench",
        Command::new(ctx.cluster.bin.join("pgbench"))
            .args(["-n", "-M", "prepared", "-c", &c, "-j", "2"])
            .args(["-T", &ctx.sizes.serve_secs.to_string()])
            .arg("-f")
            .arg(&script)
            .args(["--log", "--sampling-rate", sampling])
            .arg(format!("--log-prefix={}", log_dir.join("tx").display()))
            .args(["-h", "127.0.0.1", "-p", &ctx.cluster.port.to_string()])
            .args(["-U", "postgres", DB]),
    )?;
    let mut load = Load::default();
    for line in out.lines() {
        if let Some(v) = line.trim().strip_prefix("tps = ") {
            load.rate = v.split_whitespace().next().unwrap_or("0").parse()?;
        }
        if let Some(v) = line.trim().strip_prefix("number of failed transactions: ") {
            load.errors = v.split_whitespace().next().unwrap_or("0").parse()?;
        }
    }
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&log_dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        latencies.extend(parse_pgbench_log(&text));
    }
    load.p50_ms = percentile(&latencies, 50.0).unwrap_or(f64::NAN);
    load.p99_ms = percentile(&latencies, 99.0).unwrap_or(f64::NAN);
    if load.rate == 0.0 {
        bail!("no tps in pgbench's output:\n{out}");
    }
    Ok(load)
}

/// Latencies in ms from a pgbench per-transaction log (`client tx latency_us script epoch us`).
pub fn parse_pgbench_log(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect()
}

/// SET `prefix{i:012}` to each value (redis-benchmark's `__rand_int__` is 12 digits from 0).
fn redis_load(port: u16, prefix: &str, values: &[Vec<u8>]) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).context("connecting to redis-server"),
        }
    };
    let mut writer = stream.try_clone()?;
    let mut buf = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let key = format!("{prefix}{i:012}");
        buf.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
                key.len(),
                v.len()
            )
            .as_bytes(),
        );
        buf.extend_from_slice(v);
        buf.extend_from_slice(b"\r\n");
    }
    writer.write_all(&buf)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    for _ in values {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim_end() != "+OK" {
            bail!("redis SET answered {line:?}");
        }
    }
    Ok(())
}

fn redis_benchmark(ctx: &Ctx, port: u16, prefix: &str, n: i64, connections: usize) -> Result<Load> {
    // redis-benchmark takes a request count, not a duration: aim at serve_secs (at about 60k/s with
    // many connections, 15k/s with one).
    let per_sec = if connections > 1 { 60_000 } else { 15_000 };
    let requests = per_sec * ctx.sizes.serve_secs;
    let out = exec(
        "redis-benchmark",
        Command::new(&ctx.tools.redis_benchmark)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-c", &connections.to_string()])
            .args(["-n", &requests.to_string(), "-r", &n.to_string()])
            .args(["--threads", &connections.min(2).to_string(), "--csv", "GET"])
            .arg(format!("{prefix}__rand_int__")),
    )?;
    parse_redis_csv(&out).with_context(|| format!("reading redis-benchmark's output:\n{out}"))
}

/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...`
pub fn parse_redis_csv(out: &str) -> Result<Load> {
    let mut lines = out.lines().filter(|l| l.starts_with('"'));
    let header: Vec<String> = lines
        .next()
        .context("no CSV header")?
        .split(',')
        .map(|f| f.trim_matches('"').to_string())
        .collect();
    let values: Vec<String> = lines
        .next()
        .context("no CSV row")?
        .split("\",\"")
        .map(|f| f.trim_matches('"').to_string())
        .collect();
    let field = |name: &str| -> Result<f64> {
        let i = header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column"))?;
        Ok(values.get(i).context("short row")?.parse()?)
    };
    Ok(Load {
        rate: field("rps")?,
        p50_ms: field("p50_latency_ms")?,
        p99_ms: field("p99_latency_ms")?,
        errors: 0,
        server_us: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let out = "Running 3s test @ http://127.0.0.1:1234\n  2 threads and 50 connections\n\
                   Latency Distribution\n     50%  405.00us\n     75%  600.00us\n     90%    1.10ms\n\
                   \x20    99%    2.50ms\n  12345 requests in 3.00s, 3.00MB read\n\
                   \x20 Non-2xx or 3xx responses: 5\nRequests/sec:  41150.50\nTransfer/sec:      1.00MB\n";
        let load = parse_wrk(out).unwrap();
        assert_eq!(load.rate, 41150.5);
        assert!((load.p50_ms - 0.405).abs() < 1e-9);
        assert!((load.p99_ms - 2.5).abs() < 1e-9);
        assert_eq!(load.errors, 5);
        assert!(parse_wrk("nothing").is_err());
        assert_eq!(wrk_ms("1.5s").unwrap(), 1500.0);
    }

    #[test]
    fn redis_csv_parses() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"GET gs:__rand_int__\",\"55555.56\",\"0.500\",\"0.100\",\"0.479\",\"0.700\",\"0.900\",\"2.000\"\n";
        let load = parse_redis_csv(out).unwrap();
        assert_eq!(load.rate, 55555.56);
        assert_eq!(load.p50_ms, 0.479);
        assert_eq!(load.p99_ms, 0.9);
    }

    #[test]
    fn pgbench_log_parses() {
        let log = "0 1 1523 0 1700000000 123\n3 7 250 0 1700000000 456\n";
        assert_eq!(parse_pgbench_log(log), vec![1.523, 0.25]);
    }
}
