//! The operator commands behind `kck check`, `kck status`, `kck slot drop`, `kck get` and `kck keys`.
//! `main` parses the flags and calls these; each prints its answer and returns whether all is well (the
//! exit code), or an error that says what to do.

use std::io::Write;

use crate::config::Config;
pub mod client;

/// `kck check` for a config file: the checks themselves live in [`crate::ops::check`], where `kck run`
/// reaches them too.
pub mod check {
    pub use crate::ops::check::{Finding, Level, Report, TableFacts, pg_message, primers};

    /// Every check against the database of `config`.
    pub async fn run(config: &crate::config::Config) -> Report {
        let mut report =
            crate::ops::check::run(&config.source, &config.catalog, config.roles.replication).await;
        if config.roles.http {
            crate::ops::check::exposure(&mut report, config.http.bind, &config.auth);
        }
        report
    }
}
pub mod explain;
pub mod invalidate;

use crate::ops::http::EntryDocument;
use crate::ops::size::format_bytes;
use crate::ops::slot::{Dropped, drop_configured_slot};
use crate::ops::status::Status;
use client::{ClientError, KckClient};

use crate::pg::Source;
use crate::replication::{self, ReplicationError};
use crate::store::StoreError;

/// An operator command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Explain(String),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "{0}. If a running kck holds the store, make sure it answers over HTTP (pass --url http://HOST:PORT \
         if it listens elsewhere than http.bind)."
    )]
    Store(StoreError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Open the store of `config` for reading, without creating it: a missing store means kck never ran
/// with this config (or `store.path` differs from the running kck's).
pub async fn open_existing_store(
    config: &Config,
) -> Result<std::sync::Arc<dyn crate::store::Store>, CliError> {
    if let crate::config::StoreConfig::Embedded { path, .. } = &config.store
        && !path.exists()
    {
        return Err(CliError::Refused(format!(
            "no kck answers over HTTP and there is no store at {}: kck has not run with this config, or it              runs with another store.path (KCK_STORE_PATH) or http.bind (pass --url http://HOST:PORT)",
            path.display()
        )));
    }
    crate::app::open_store(config)
        .await
        .map_err(CliError::Store)
}

/// `kck check`: true when there are no problems (or only warnings, with `warnings_ok`).
pub async fn check(config: &Config, json: bool, warnings_ok: bool) -> Result<bool, CliError> {
    let report = check::run(config).await;
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        writeln!(out, "{text}")?;
    } else {
        write!(out, "{}", report.to_text())?;
    }
    let fails = report.count(check::Level::Fail);
    Ok(fails == 0 && (warnings_ok || report.problems() == 0))
}

/// `kck status`: true when there are no problems.
pub async fn status(config: &Config, url: Option<&str>, json: bool) -> Result<bool, CliError> {
    let client = KckClient::new(config, url);
    let status = match client.status().await {
        Ok(status) => status,
        Err(e @ ClientError::Unreachable { .. }) => {
            let note = format!(
                "kck is not running, or not at {} ({e}): this is what Postgres and the store say.",
                client.base
            );
            let store = open_existing_store(config)
                .await
                .map_err(|e| crate::report::Chain(&e).to_string());
            Status::offline(&config.source, &config.catalog.primers, store, Some(note)).await
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string_pretty(&status).unwrap_or_default();
        writeln!(out, "{text}")?;
    } else {
        write!(out, "{}", status.to_text())?;
    }
    Ok(status.problems.is_empty())
}

/// `kck slot drop`: refuses without `yes`, explaining what dropping does.
pub async fn slot_drop(config: &Config, yes: bool) -> Result<(), CliError> {
    let source = Source::new(&config.source).map_err(ReplicationError::from)?;
    let slot = &config.source.slot;
    if !yes {
        let state = match source.connect().await {
            Ok(client) => match replication::read_slot(&client, slot).await {
                Ok(Some(info)) => format!(
                    " It exists now, {}, and retains {} of WAL.",
                    if info.active {
                        "held by a running session"
                    } else {
                        "not held by anyone"
                    },
                    info.retained_bytes().map_or("?".into(), format_bytes)
                ),
                Ok(None) => " (It does not exist now.)".to_string(),
                Err(_) => String::new(),
            },
            Err(_) => String::new(),
        };
        return Err(CliError::Refused(format!(
            "refusing to drop replication slot '{slot}' without --yes-drop-the-slot.{state} Dropping it frees \
             the WAL Postgres keeps for kck and makes Postgres forget kck's position: changes made until \
             kck starts again are never streamed to it, so its next start creates a new slot and refreshes \
             every cached key. Stop kck first (a slot a running kck holds cannot be dropped). Drop it when \
             kck is retired, or when the slot was invalidated (wal_status = lost)."
        )));
    }
    match drop_configured_slot(&source).await? {
        Dropped::Dropped { retained } => println!(
            "dropped replication slot '{slot}'{}; the next `kck run` creates a new one and refreshes every \
             cached key",
            retained.map_or_else(String::new, |r| format!(
                " (it retained {})",
                format_bytes(r)
            ))
        ),
        Dropped::NoSuchSlot => {
            println!("replication slot '{slot}' does not exist; nothing to drop")
        }
    }
    Ok(())
}

/// `kck get KEY`: prints the cached entry as JSON; false when the key is not cached.
pub async fn get(config: &Config, key: &str, url: Option<&str>) -> Result<bool, CliError> {
    let parsed = config
        .catalog
        .parse_key(key)
        .map_err(|e| CliError::Refused(e.to_string()))?;
    let canonical = config.catalog.render(&parsed);
    let client = KckClient::new(config, url);
    let entry = match client.entry(&canonical).await {
        Ok(entry) => entry,
        Err(ClientError::Unreachable { .. }) => {
            let store = open_existing_store(config).await?;
            store
                .get(&canonical)
                .await
                .map_err(CliError::Store)?
                .map(|entry| EntryDocument::new(canonical.clone(), &entry))
        }
        Err(e) => return Err(e.into()),
    };
    match entry {
        Some(entry) => {
            writeln!(std::io::stdout().lock(), "{}", entry.to_pretty())?;
            Ok(true)
        }
        None => {
            eprintln!("kck: '{canonical}' is not in the cache");
            Ok(false)
        }
    }
}

/// `kck keys PRIMER`: prints every cached key of the primer, one per line.
pub async fn keys(config: &Config, primer: &str, url: Option<&str>) -> Result<(), CliError> {
    if config.catalog.primer(primer).is_none() {
        let known: Vec<&str> = config
            .catalog
            .primers
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        return Err(CliError::Refused(format!(
            "no primer is named '{primer}' in {} (primers: {})",
            config.file.display(),
            known.join(", ")
        )));
    }
    const PAGE: usize = 1000;
    let client = KckClient::new(config, url);
    let mut out = std::io::stdout().lock();
    let mut after: Option<String> = None;
    match client.keys(primer, None, PAGE).await {
        Ok((keys, next)) => {
            for key in &keys {
                writeln!(out, "{key}")?;
            }
            after = next;
            while let Some(from) = after.take() {
                let (keys, next) = client.keys(primer, Some(&from), PAGE).await?;
                for key in &keys {
                    writeln!(out, "{key}")?;
                }
                after = next;
            }
        }
        Err(ClientError::Unreachable { .. }) => {
            let store = open_existing_store(config).await?;
            loop {
                let keys = store
                    .keys(primer, after.as_deref(), PAGE)
                    .await
                    .map_err(CliError::Store)?;
                for key in &keys {
                    writeln!(out, "{key}")?;
                }
                if keys.len() < PAGE {
                    break;
                }
                after = keys.last().cloned();
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// `kck explain [PRIMER]`: what each primer's query reads and how kck follows each table. False when a
/// primer's dependencies would leave it stale or its plan cannot be read.
pub async fn explain(config: &Config, primer: Option<&str>) -> Result<bool, CliError> {
    let source = Source::new(&config.source).map_err(ReplicationError::from)?;
    let text = explain::run(&source, &config.catalog, primer)
        .await
        .map_err(CliError::Explain)?;
    print!("{text}");
    Ok(!text.contains("  PROBLEM: ") && !text.contains("  cannot read its plan: "))
}
