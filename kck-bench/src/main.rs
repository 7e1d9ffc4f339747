//! `kck-bench`: kck against the baselines a user would compare it with, in one run (issue 6).
//!
//! Run it through `scripts/bench [--quick]`, which builds kck in release and passes the paths. The driver
//! starts its own Postgres (`scripts/pg-temp`, fsync on, `wal_level=logical`, pg_stat_statements), loads
//! a fixed data set, runs each scenario with its baseline, prints the tables and rewrites the generated
//! block of `BENCHMARKS.md`. Every figure that matters is a ratio against a baseline measured in the same
//! run: the machines are shared and noisy. Timings are never asserted.
//!
//! Scenarios (one module each): [`decode`], [`fresh`], [`serve`], [`coalesce`], [`memory`],
//! [`recovery`], and with `--store scylla`, [`scylla`].

mod child;
mod coalesce;
mod decode;
mod floor;
mod fresh;
mod http;
mod kck;
mod live;
mod memory;
mod pg;
mod recovery;
mod report;
mod scylla;
mod serve;
mod util;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;

use report::{RunInfo, Section};

/// Benchmarks of kck against pg_recvlogical, Postgres and Redis (run through scripts/bench).
#[derive(Debug, Parser)]
struct Cli {
    /// A smaller data set and shorter runs (about a minute); a smoke check, not figures to publish.
    #[arg(long)]
    quick: bool,
    /// A scratch directory (Postgres, stores, logs); scripts/bench makes a fresh one.
    #[arg(long)]
    work: PathBuf,
    /// The kck binary (release build).
    #[arg(long)]
    kck: PathBuf,
    /// scripts/pg-temp.
    #[arg(long)]
    pg_temp: PathBuf,
    /// The Postgres 15 binaries (initdb, pg_ctl, postgres, pgbench, pg_recvlogical).
    #[arg(long, env = "PG_BIN", default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin: PathBuf,
    /// Write the report here (its generated block). Default: BENCHMARKS.md in full mode, none in --quick.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The kck commit measured, for the report.
    #[arg(long, default_value = "unknown")]
    commit: String,
    /// Run only these scenarios (comma-separated: decode, serve, fresh, coalesce, memory, recovery, live).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// A line added to the report (for example what else ran on the machine).
    #[arg(long)]
    note: Option<String>,
    /// Rounds per decode consumer (default: 3, or 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Decode workloads to run: big, small (default: both).
    #[arg(long, value_delimiter = ',')]
    decode_workloads: Vec<String>,
    /// Freshness write rates in tx/s (default: 1000,5000, or 1000 with --quick).
    #[arg(long, value_delimiter = ',')]
    fresh_rates: Vec<u32>,
    /// Decode consumers to run (for profiling): recvlogical, pgwire, kck, kck-no-prover, replay (default:
    /// all).
    #[arg(long, value_delimiter = ',')]
    decode_consumers: Vec<String>,
    /// `scylla`: also run the scylla store beside the embedded one (scenario `scylla`), on `--scylla-node`.
    #[arg(long)]
    store: Option<String>,
    /// The ScyllaDB or Cassandra node for `--store scylla` (host:port).
    #[arg(long, env = "KCK_TEST_SCYLLA")]
    scylla_node: Option<String>,
}

/// The size of everything, by mode.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub users: i64,
    pub groups: i64,
    pub orders: i64,
    pub decode_small_txs: i64,
    pub rounds: usize,
    pub fresh_rates: Vec<u32>,
    pub fresh_secs: u64,
    pub serve_secs: u64,
    pub concurrency: usize,
    pub coalesce_updates: i64,
    pub hot_keys: i64,
    /// Keys of each of user and orders_by_user fetched (cached) before a scenario.
    pub warm_users: i64,
    pub slow_keys: i64,
    pub recovery_changes: i64,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            users: 100_000,
            groups: 1_000,
            orders: 1_000_000,
            decode_small_txs: 100_000,
            rounds: 3,
            fresh_rates: vec![1_000, 5_000],
            fresh_secs: 15,
            serve_secs: 10,
            concurrency: 50,
            coalesce_updates: 100_000,
            hot_keys: 1_000,
            warm_users: 10_000,
            slow_keys: 20_000,
            recovery_changes: 100_000,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            users: 10_000,
            groups: 100,
            orders: 100_000,
            decode_small_txs: 10_000,
            rounds: 1,
            fresh_rates: vec![1_000],
            fresh_secs: 4,
            serve_secs: 3,
            concurrency: 50,
            coalesce_updates: 10_000,
            hot_keys: 1_000,
            warm_users: 2_000,
            slow_keys: 2_000,
            recovery_changes: 10_000,
        }
    }
}

/// What every scenario gets.
pub struct Ctx {
    /// The bench's own runtime (load generators, SQL); in-process kck runs on a runtime of its own.
    pub rt: tokio::runtime::Runtime,
    pub cluster: pg::Cluster,
    pub sizes: Sizes,
    pub work: PathBuf,
    pub kck_bin: PathBuf,
    pub tools: Tools,
    pub decode_workloads: Vec<decode::Workload>,
    pub decode_consumers: Vec<String>,
    /// The node of `--store scylla`.
    pub scylla: Option<String>,
}

/// External programs the scenarios run.
pub struct Tools {
    pub wrk: PathBuf,
    pub redis_server: PathBuf,
    pub redis_benchmark: PathBuf,
}

const SCENARIOS: [&str; 8] = [
    "decode", "fresh", "serve", "coalesce", "memory", "recovery", "scylla", "live",
];

/// The same allocator as the kck binary: the in-process decode figures and the HTTP floor measure what
/// kck ships.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let (Ok(config), Ok(flag)) = (
        std::env::var(child::CHILD_ENV),
        std::env::var(child::FLAG_ENV),
    ) {
        if let Err(e) = child::run(Path::new(&config), Path::new(&flag)) {
            eprintln!("kck-bench (kck with a slowed store): {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Ok(spec) = std::env::var(floor::FLOOR_ENV) {
        if let Err(e) = floor::run(&spec) {
            eprintln!("kck-bench (HTTP floor): {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("kck-bench: {e:#}");
        std::process::exit(1);
    }
}

fn version(bin: &Path, arg: &str) -> String {
    std::process::Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

fn run(cli: Cli) -> Result<()> {
    for s in &cli.only {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!(
                "unknown scenario '{s}' in --only (known: {})",
                SCENARIOS.join(", ")
            );
        }
    }
    let scylla = match cli.store.as_deref() {
        None | Some("embedded") => None,
        Some("scylla") => match cli.scylla_node.clone().filter(|n| !n.is_empty()) {
            Some(node) => Some(node),
            None => bail!(
                "--store scylla needs a node: set KCK_TEST_SCYLLA=host:9042 (or --scylla-node)"
            ),
        },
        Some(other) => bail!("unknown --store '{other}' (embedded, scylla)"),
    };
    let has_scylla = scylla.is_some();
    let only = &cli.only;
    let wanted = move |name: &str| {
        let listed = only.is_empty() || only.iter().any(|s| s == name);
        listed && (name != "scylla" || has_scylla)
    };
    let pg_bin = cli.pg_bin.clone();
    let pg_dirs = [pg_bin.as_path()];
    let mut missing = Vec::new();
    for tool in ["initdb", "pg_ctl", "postgres", "pgbench", "pg_recvlogical"] {
        if !pg_bin.join(tool).is_file() {
            missing.push(format!(
                "{} (apt-get install -y postgresql-15, or set PG_BIN)",
                pg_bin.join(tool).display()
            ));
        }
    }
    let find = |name: &str, package: &str, needed: bool, missing: &mut Vec<String>| {
        let found = util::find_tool(name, &pg_dirs);
        if found.is_none() && needed {
            missing.push(format!("{name} (apt-get install -y {package})"));
        }
        found.unwrap_or_else(|| PathBuf::from(name))
    };
    let tools = Tools {
        wrk: find("wrk", "wrk", wanted("serve"), &mut missing),
        redis_server: find(
            "redis-server",
            "redis-server",
            wanted("serve"),
            &mut missing,
        ),
        redis_benchmark: find(
            "redis-benchmark",
            "redis-tools",
            wanted("serve"),
            &mut missing,
        ),
    };
    if !cli.kck.is_file() {
        missing.push(format!("the kck binary {}", cli.kck.display()));
    }
    if !missing.is_empty() {
        bail!("missing: {}", missing.join("; "));
    }

    let started = Instant::now();
    let load_before = util::loadavg();
    std::fs::create_dir_all(&cli.work)?;
    util::set_pids_file(cli.work.join("pids"));
    let mut sizes = if cli.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(rounds) = cli.rounds {
        sizes.rounds = rounds.max(1);
    }
    if !cli.fresh_rates.is_empty() {
        sizes.fresh_rates = cli.fresh_rates.clone();
    }
    let mut decode_workloads = Vec::new();
    for w in &cli.decode_workloads {
        decode_workloads.push(match w.as_str() {
            "big" => decode::Workload::Big,
            "small" => decode::Workload::Small,
            _ => bail!("unknown decode workload '{w}' (big, small)"),
        });
    }
    if decode_workloads.is_empty() {
        decode_workloads = vec![decode::Workload::Big, decode::Workload::Small];
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench")
        .enable_all()
        .build()?;
    let port = util::free_port()?;
    eprintln!(
        "kck-bench: starting Postgres in {} on port {port}",
        cli.work.join("pg").display()
    );
    let cluster = rt.block_on(pg::Cluster::start(
        &cli.pg_temp,
        &cli.work.join("pg"),
        port,
        &pg_bin,
    ))?;
    let ctx = Ctx {
        rt,
        cluster,
        sizes,
        work: cli.work.clone(),
        kck_bin: cli.kck.clone(),
        tools,
        decode_workloads,
        decode_consumers: cli.decode_consumers.clone(),
        scylla,
    };
    let result = run_scenarios(&ctx, &cli, &wanted, started, load_before);
    ctx.cluster.destroy();
    result
}

fn run_scenarios(
    ctx: &Ctx,
    cli: &Cli,
    wanted: &dyn Fn(&str) -> bool,
    started: Instant,
    load_before: f64,
) -> Result<()> {
    let s = &ctx.sizes;
    let (postgres, data) = ctx.rt.block_on(async {
        let client = ctx.cluster.connect(pg::DB).await?;
        eprintln!(
            "kck-bench: loading {} users, {} groups, {} orders",
            s.users, s.groups, s.orders
        );
        let took = pg::load(&client, s).await?;
        eprintln!("kck-bench: loaded in {:.1} s", took.as_secs_f64());
        let version: String = client.query_one("SELECT version()", &[]).await?.get(0);
        let version = version.split(" on ").next().unwrap_or(&version).to_string();
        anyhow::Ok((
            format!("{version} (local, fsync on, wal_level=logical, shared_buffers 128MB)"),
            format!(
                "data set: {} users, {} groups, {} orders ({} orders per user, {} per group)",
                util::thousands(s.users as f64),
                util::thousands(s.groups as f64),
                util::thousands(s.orders as f64),
                s.orders / s.users,
                s.orders / s.groups
            ),
        ))
    })?;

    // Order of execution: the decode scenario first (it writes the most WAL, and no kck slot exists yet),
    // serving next (on a quiet table); the report keeps the order.
    let mut sections: Vec<(usize, Section)> = Vec::new();
    type Scenario = fn(&Ctx) -> Result<Section>;
    let plan: [(usize, &str, Scenario); 8] = [
        (1, "decode", decode::run),
        (3, "serve", serve::run),
        (2, "fresh", fresh::run),
        (4, "coalesce", coalesce::run),
        (5, "memory", memory::run),
        (6, "recovery", recovery::run),
        (7, "scylla", scylla::run),
        (8, "live", live::run),
    ];
    for (index, name, scenario) in plan {
        if !wanted(name) {
            continue;
        }
        eprintln!("kck-bench: scenario {name}");
        let t = Instant::now();
        let section = scenario(ctx).with_context(|| format!("scenario {name}"))?;
        eprintln!(
            "kck-bench: scenario {name} took {:.0} s",
            t.elapsed().as_secs_f64()
        );
        print!("{}", section.text());
        sections.push((index, section));
    }
    sections.sort_by_key(|(i, _)| *i);
    let sections: Vec<Section> = sections.into_iter().map(|(_, s)| s).collect();

    let tools = vec![
        ("wrk".to_string(), version(&ctx.tools.wrk, "--version")),
        (
            "redis".to_string(),
            version(&ctx.tools.redis_server, "--version"),
        ),
    ];
    let tools = tools
        .into_iter()
        .map(|(n, v)| {
            let short = match n.as_str() {
                "wrk" => v.split_whitespace().nth(1).unwrap_or("?").to_string(),
                _ => v
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("v="))
                    .unwrap_or("?")
                    .to_string(),
            };
            (n, short)
        })
        .collect();
    let info = RunInfo {
        mode: if cli.quick { "quick" } else { "full" }.to_string(),
        date: util::now_utc(),
        commit: cli.commit.clone(),
        machine: util::machine(),
        load_before,
        load_after: util::loadavg(),
        postgres,
        tools,
        duration_s: started.elapsed().as_secs_f64(),
        data,
        note: cli.note.clone(),
    };
    let generated = report::generated_markdown(&info, &sections);
    let copy = ctx.work.join("report.md");
    std::fs::write(&copy, &generated)?;
    let out = cli
        .out
        .clone()
        .or_else(|| (!cli.quick).then(|| PathBuf::from("BENCHMARKS.md")));
    match out {
        Some(path) => {
            report::write_benchmarks(&path, &generated)?;
            eprintln!("kck-bench: wrote {}", path.display());
        }
        None => eprintln!(
            "kck-bench: --quick does not touch BENCHMARKS.md; the report is in {}",
            copy.display()
        ),
    }
    Ok(())
}
