//! The `kck` command. Only orchestration lives here: parse flags, set up logging, call the library, and
//! print errors with their chain (`{:#}`) before exiting non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use kck::app::{self, RunOptions};
use kck::config::Config;
use kck::invalidate::{self, Mode};

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
enum Command {
    /// Stream changes, refresh the cache, and serve it over HTTP until SIGINT or SIGTERM.
    Run {
        /// The config file (YAML).
        #[arg(long, short, env = "KCK_CONFIG")]
        config: PathBuf,
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
        /// A bearer token for the server, if it asks for one.
        #[arg(long, env = "KCK_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kck: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KCK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            let running = app::start(config, RunOptions::default()).await?;
            let stop = running_signal().await;
            tracing::info!(
                signal = stop,
                "Stopping: finishing requests and flushing the stream."
            );
            running.stop().await?;
            tracing::info!("Stopped.");
            Ok(())
        }
        Command::Validate { config } => {
            let config = Config::load(&config)?;
            for primer in &config.catalog.primers {
                println!(
                    "primer {}: key {}, {} dependencies",
                    primer.name,
                    primer.template.source,
                    primer.dependencies.len()
                );
            }
            println!("{}: ok", config.file.display());
            Ok(())
        }
        Command::Invalidate {
            config,
            key,
            primer,
            prefix,
            drop,
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
            let base = invalidate::base_url(config.http.bind);
            let answer = invalidate::call(&base, "/invalidate", &request, token.as_deref()).await?;
            let done = if drop { "dropped" } else { "invalidated" };
            println!("{done} {} key(s)", answer.keys);
            Ok(())
        }
        Command::Refresh {
            config,
            key,
            primer,
            token,
        } => {
            let config = Config::load(&config)?;
            let request = invalidate::Request {
                key,
                primer,
                ..Default::default()
            };
            let base = invalidate::base_url(config.http.bind);
            let answer = invalidate::call(&base, "/refresh", &request, token.as_deref()).await?;
            println!("queued a refresh of {} key(s)", answer.keys);
            Ok(())
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
