//! The `kck` command. Only orchestration lives here: parse flags, set up logging, call the library, and
//! print errors with their chain (`{:#}`) before exiting non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use kck::app::{self, RunOptions};
use kck::config::{Config, Roles};

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
        Command::Run { config, roles } => {
            let mut config = Config::load(&config)?;
            if let Some(roles) = roles {
                config.roles = roles;
            }
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
        Command::Store {
            command: StoreCommand::Init { config },
        } => {
            let config = Config::load(&config)?;
            let done = app::init_store(&config).await?;
            println!("{done}");
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
