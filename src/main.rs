//! The `kck` command. Only orchestration lives here: parse flags, set up logging, call the library, and
//! print errors with their chain (`{:#}`) before exiting non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use kck::app::{self, RunOptions};
use kck::cli;
use kck::config::{Config, Roles, StoreConfig};
use kck::invalidate::{self, Mode};
use kck::report::count;

/// kck: a cache that Postgres logical replication keeps fresh, served over HTTP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "KCK_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Create the store's keyspace and tables if they are missing (scylla), or the store file
    /// (embedded). Safe to run again.
    Init {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream changes, refresh the cache, and serve it over HTTP until SIGINT or SIGTERM.
    Run {
        /// The config file (YAML).
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        /// What this process does, comma-separated: replication (hold the slot), refresh (workers), http.
        /// Overrides `roles` in the config; default: all three. Splitting roles needs store.kind: scylla.
        #[arg(long, env = "KCK_ROLES", value_parser = Roles::parse_list)]
        roles: Option<Roles>,
    },
    /// Manage the store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Read and validate a config file, then print a summary of its primers.
    Validate {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
    },
    /// Invalidate cached keys in a running kck: mark them expired and refresh them (or --drop them).
    ///
    /// The running kck holds the store's lock, so this asks it over HTTP, at the config's http.bind
    /// (KCK_HTTP_BIND overrides it; a wildcard address is reached on loopback).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["key", "primer", "prefix"])))]
    Invalidate {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        /// One key, such as orders_by_user/42.
        key: Option<String>,
        /// Every cached key of this primer.
        #[arg(long)]
        primer: Option<String>,
        /// Every cached key starting with this, such as orders_by_user/.
        #[arg(long)]
        prefix: Option<String>,
        /// Remove the keys instead (their next fetch is a miss).
        #[arg(long)]
        drop: bool,
        /// The running kck's base URL (default: from http.bind).
        #[arg(long, env = "KCK_URL")]
        url: Option<String>,
        /// A bearer token for the server, if it asks for one.
        #[arg(long, env = "KCK_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Queue a refresh of a key, or of every cached key of a primer, in a running kck.
    ///
    /// The running kck holds the store's lock, so this asks it over HTTP, at the config's http.bind
    /// (KCK_HTTP_BIND overrides it; a wildcard address is reached on loopback).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["key", "primer"])))]
    Refresh {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        /// One key, such as orders_by_user/42.
        key: Option<String>,
        /// Every cached key of this primer.
        #[arg(long)]
        primer: Option<String>,
        /// The running kck's base URL (default: from http.bind).
        #[arg(long, env = "KCK_URL")]
        url: Option<String>,
        /// A bearer token for the server, if it asks for one.
        #[arg(long, env = "KCK_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Check the config against the live database: one line per finding, each problem with its fix.
    /// Exits 1 when there are problems.
    Check {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 0 when there are warnings but no failures.
        #[arg(long)]
        warnings_ok: bool,
    },
    /// For each primer: the tables its query reads (from Postgres's plan of it) and how a change in each
    /// maps to cached keys, with the replica identity that needs. Exits 1 when a primer would be stale.
    Explain {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        /// Only this primer.
        primer: Option<String>,
    },
    /// Show the slot, lag, queue, primers and recent errors of a running kck (over HTTP), or what
    /// Postgres and the store say when none answers. Exits 1 when there are problems.
    Status {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        /// The running kck's base URL (default: from http.bind).
        #[arg(long, env = "KCK_URL")]
        url: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Manage kck's replication slot.
    Slot {
        #[command(subcommand)]
        command: SlotCommand,
    },
    /// Print a cached entry (value, LSN, time) without computing it. Exits 1 when it is not cached.
    Get {
        /// The key, as in /fetch/KEY.
        key: String,
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        #[arg(long, env = "KCK_URL")]
        url: Option<String>,
    },
    /// Print the cached keys of a primer, one per line.
    Keys {
        primer: String,
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        #[arg(long, env = "KCK_URL")]
        url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SlotCommand {
    /// Drop the replication slot (stop kck first). Frees the WAL it retains; the next start creates a new
    /// slot and refreshes every cached key.
    Drop {
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
        /// Confirm: without it, nothing is dropped.
        #[arg(long)]
        yes_drop_the_slot: bool,
    },
}

/// mimalloc: the `/fetch` hot path allocates a few small buffers per request, and glibc's malloc was
/// about a tenth of kck's CPU time under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kck: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kck: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once: kck's messages often already include their cause's text.
fn error_text(e: &anyhow::Error) -> String {
    kck::report::Chain(e.as_ref()).to_string()
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: a log file or a pipe gets plain text (and NO_COLOR is
    // honoured).
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // Never bound parameter values (tokio-postgres at debug), nor the CQL driver's per-response warnings:
    // see `telemetry::log_keeps`.
    let kept = tracing_subscriber::filter::filter_fn(kck::log_keeps);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(kept);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
}

/// Run a command; `Ok(false)` exits 1 without an error message (the command printed why).
async fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Run { config, roles } => {
            let mut config = Config::load(&config)?;
            if let Some(roles) = roles {
                config.roles = roles;
            }
            let running = app::start(config, RunOptions::default()).await?;
            tokio::select! {
                stop = running_signal() => tracing::info!(
                    signal = stop,
                    "Stopping: finishing requests and flushing the stream."
                ),
                () = running.failed() => tracing::error!("Replication failed; stopping."),
            }
            running.stop().await?;
            tracing::info!("Stopped.");
            Ok(true)
        }
        Command::Check {
            config,
            json,
            warnings_ok,
        } => {
            let config = Config::load(&config)?;
            Ok(cli::check(&config, json, warnings_ok).await?)
        }
        Command::Explain { config, primer } => {
            let config = Config::load(&config)?;
            Ok(cli::explain(&config, primer.as_deref()).await?)
        }
        Command::Status { config, url, json } => {
            let config = Config::load(&config)?;
            Ok(cli::status(&config, url.as_deref(), json).await?)
        }
        Command::Slot {
            command:
                SlotCommand::Drop {
                    config,
                    yes_drop_the_slot,
                },
        } => {
            let config = Config::load(&config)?;
            cli::slot_drop(&config, yes_drop_the_slot).await?;
            Ok(true)
        }
        Command::Get { key, config, url } => {
            let config = Config::load(&config)?;
            Ok(cli::get(&config, &key, url.as_deref()).await?)
        }
        Command::Keys {
            primer,
            config,
            url,
        } => {
            let config = Config::load(&config)?;
            cli::keys(&config, &primer, url.as_deref()).await?;
            Ok(true)
        }
        Command::Store {
            command: StoreCommand::Init { config },
        } => {
            let config = Config::load(&config)?;
            let done = app::init_store(&config).await?;
            println!("{done}");
            Ok(true)
        }
        Command::Validate { config } => {
            let config = Config::load(&config)?;
            for primer in &config.catalog.primers {
                println!(
                    "primer {}: key {}, {}",
                    primer.name,
                    primer.template.source,
                    count(
                        primer.dependencies.len() as u64,
                        "dependency",
                        "dependencies"
                    )
                );
            }
            for updater in &config.updaters {
                println!(
                    "updater {}: {}, {}",
                    updater.name,
                    count(updater.params.len() as u64, "parameter", "parameters"),
                    count(updater.statements.len() as u64, "statement", "statements")
                );
            }
            if let Some(jwt) = &config.auth.jwt {
                println!("auth: JWT {:?} from {}", jwt.algorithms, jwt.key_source);
            }
            match &config.store {
                StoreConfig::Embedded { path, .. } => {
                    println!("store: embedded, {}", path.display())
                }
                StoreConfig::Scylla(s) => println!(
                    "store: scylla, keyspace {} on {} ({})",
                    s.keyspace,
                    s.nodes.join(", "),
                    s.consistency.name()
                ),
            }
            println!("roles: {}", config.roles);
            println!("{}: ok", config.file.display());
            Ok(true)
        }
        Command::Invalidate {
            config,
            key,
            primer,
            prefix,
            drop,
            url,
            token,
        } => {
            let config = Config::load(&config)?;
            let mode = if drop { Mode::Drop } else { Mode::Refresh };
            let request = invalidate::Request {
                key,
                primer,
                prefix,
                mode: Some(mode),
            };
            let base = url.unwrap_or_else(|| cli::invalidate::base_url(config.http.bind));
            let answer =
                cli::invalidate::call(&base, "/invalidate", &request, token.as_deref()).await?;
            let done = if drop { "dropped" } else { "invalidated" };
            let keys = count(answer.keys, "key", "keys");
            if answer.keys == 0 {
                println!("{done} {keys}: nothing matching was cached");
            } else {
                println!("{done} {keys}");
            }
            Ok(true)
        }
        Command::Refresh {
            config,
            key,
            primer,
            url,
            token,
        } => {
            let config = Config::load(&config)?;
            let request = invalidate::Request {
                key,
                primer,
                ..Default::default()
            };
            let base = url.unwrap_or_else(|| cli::invalidate::base_url(config.http.bind));
            let answer =
                cli::invalidate::call(&base, "/refresh", &request, token.as_deref()).await?;
            if answer.keys == 0 {
                // Nothing was queued: say why, and fail, so that a script notices.
                let what = match (&request.key, &request.primer) {
                    (Some(key), _) => format!(
                        "'{key}' is not cached (a fetch computes it; only cached keys are refreshed)"
                    ),
                    (_, Some(primer)) => format!("primer '{primer}' has no cached keys"),
                    _ => "nothing matching is cached".to_owned(),
                };
                eprintln!("kck: nothing to refresh: {what}");
                return Ok(false);
            }
            println!("queued a refresh of {}", count(answer.keys, "key", "keys"));
            Ok(true)
        }
    }
}

/// Wait for SIGINT or SIGTERM; returns its name.
async fn running_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler");
        match term {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                tracing::warn!("{e:#}");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
