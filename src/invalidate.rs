//! Invalidation and on-demand refresh, behind `DELETE /cache/{key}`, `POST /invalidate`, `POST /refresh`
//! and the `kck invalidate` and `kck refresh` commands.
//!
//! - **Invalidate, mode `refresh`** (the default): the entries are marked expired (their `expires_at` set
//!   to now, so `/fetch` no longer serves them as fresh; within the primer's `stale_while_revalidate`
//!   they are served marked stale) and their keys are queued for a refresh.
//! - **Invalidate, mode `drop`**: the entries and their keys are removed; the next fetch is a miss.
//! - **Refresh**: the keys are queued for a refresh; their current values are served meanwhile.
//!
//! A target is one key, every key of a primer, or every key starting with a prefix (`orders_by_user/`).
//! This module is the logic and the wire types; the routes are operations routes (`crate::ops::invalidate`,
//! behind `auth.operator` when authentication is on), and `crate::cli::invalidate` is the client: the CLI
//! cannot open the embedded store (the running kck holds its lock), so it asks the server.

use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::primer::KeyError;
use crate::queue::TaskKind;
use crate::refresh::Refresher;
use crate::store::{StoreError, Task};

/// What to invalidate or refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One key (any text `/fetch` accepts; made canonical).
    Key(String),
    /// Every cached key of a primer.
    Primer(String),
    /// Every cached key whose canonical text starts with this.
    Prefix(String),
}

/// What invalidation does to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Mark expired and queue a refresh.
    #[default]
    Refresh,
    /// Remove.
    Drop,
}

/// An invalidation or refresh could not be done.
#[derive(Debug, thiserror::Error)]
pub enum InvalidateError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("no primer is named '{0}' (primers: {1})")]
    UnknownPrimer(String, String),
    #[error(
        "give exactly one of \"key\", \"primer\" or \"prefix\" (a non-empty prefix), such as \
         {{\"primer\": \"orders_by_user\", \"mode\": \"drop\"}}"
    )]
    NoTarget,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The cached keys of a target, a page at a time.
struct KeyPages<'a> {
    refresher: &'a Refresher,
    /// Primers still to look at (the current one first).
    primers: Vec<String>,
    prefix: Option<String>,
    after: Option<String>,
    /// A single key, handed out once.
    single: Option<(String, String)>,
}

impl<'a> KeyPages<'a> {
    const PAGE: usize = 1000;

    async fn new(
        refresher: &'a Refresher,
        target: &Target,
    ) -> Result<KeyPages<'a>, InvalidateError> {
        let mut pages = KeyPages {
            refresher,
            primers: Vec::new(),
            prefix: None,
            after: None,
            single: None,
        };
        match target {
            Target::Key(text) => {
                let key = refresher.catalog.parse_key(text)?;
                let canonical = refresher.catalog.render(&key);
                if refresher.store.is_registered(&canonical).await? {
                    let primer = refresher.catalog.primers[key.primer].name.clone();
                    pages.single = Some((primer, canonical));
                }
            }
            Target::Primer(name) => match refresher.catalog.primer(name) {
                Some((_, p)) => pages.primers.push(p.name.clone()),
                None => {
                    let known: Vec<&str> = refresher
                        .catalog
                        .primers
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect();
                    return Err(InvalidateError::UnknownPrimer(
                        name.clone(),
                        known.join(", "),
                    ));
                }
            },
            Target::Prefix(prefix) => {
                pages.primers = refresher
                    .catalog
                    .primers
                    .iter()
                    .rev()
                    .map(|p| p.name.clone())
                    .collect();
                pages.prefix = Some(prefix.clone());
                pages.after = pages.start();
            }
        }
        if !pages.primers.is_empty() && pages.prefix.is_none() {
            pages.after = None;
        }
        Ok(pages)
    }

    /// Where a prefix scan starts: just before the prefix (keys are in order).
    fn start(&self) -> Option<String> {
        self.prefix.as_deref().and_then(|p| {
            let mut chars = p.chars();
            chars.next_back();
            let before = chars.as_str();
            (!before.is_empty()).then(|| before.to_owned())
        })
    }

    /// The next page: a primer's name and some of its keys; `None` when done.
    async fn next(&mut self) -> Result<Option<(String, Vec<String>)>, StoreError> {
        if let Some((primer, key)) = self.single.take() {
            return Ok(Some((primer, vec![key])));
        }
        while let Some(primer) = self.primers.last().cloned() {
            let keys = self
                .refresher
                .store
                .keys(&primer, self.after.as_deref(), Self::PAGE)
                .await?;
            let full = keys.len() == Self::PAGE;
            self.after = keys.last().cloned();
            let mut past = false;
            let selected: Vec<String> = match &self.prefix {
                None => keys,
                Some(p) => keys
                    .into_iter()
                    .filter(|k| {
                        let hit = k.starts_with(p.as_str());
                        past |= !hit && k.as_str() > p.as_str();
                        hit
                    })
                    .collect(),
            };
            if !full || past {
                self.primers.pop();
                self.after = self.start();
            }
            if !selected.is_empty() {
                return Ok(Some((primer, selected)));
            }
        }
        Ok(None)
    }
}

/// Mark `key`'s entry expired (unless a newer entry replaced it meanwhile). Returns whether it had one.
async fn mark_expired(refresher: &Refresher, primer: &str, key: &str) -> Result<bool, StoreError> {
    let Some(mut entry) = refresher.store.get(key).await? else {
        return Ok(false);
    };
    let now = now_ms();
    if entry.expires_at_ms.is_none_or(|at| at > now) {
        entry.expires_at_ms = Some(now);
        // The same LSN replaces; a newer entry (a refresh that just finished) is kept.
        // Not into a key evicted or removed since the read.
        refresher
            .store
            .store_if_registered(primer, key, entry)
            .await?;
    }
    Ok(true)
}

/// Invalidate a target. Returns how many keys it touched.
pub async fn invalidate(
    refresher: &Refresher,
    target: &Target,
    mode: Mode,
) -> Result<u64, InvalidateError> {
    let mut count = 0u64;
    let mut pages = KeyPages::new(refresher, target).await?;
    while let Some((primer, keys)) = pages.next().await? {
        count += keys.len() as u64;
        // Concurrent writes share the store's commits.
        for chunk in keys.chunks(64) {
            match mode {
                Mode::Drop => {
                    let mut writes = Vec::with_capacity(chunk.len());
                    for key in chunk {
                        writes.push(refresher.drop_key(&primer, key));
                    }
                    for result in futures_util::future::join_all(writes).await {
                        result?;
                    }
                }
                Mode::Refresh => {
                    let mut writes = Vec::with_capacity(chunk.len());
                    for key in chunk {
                        writes.push(mark_expired(refresher, &primer, key));
                    }
                    for result in futures_util::future::join_all(writes).await {
                        result?;
                    }
                }
            }
        }
        if mode == Mode::Refresh {
            let lsn = refresher.clock.visible();
            let tasks: Vec<Task> = keys
                .into_iter()
                .map(|k| TaskKind::Key(k).task(lsn))
                .collect();
            refresher.store.enqueue(tasks).await?;
        }
    }
    tracing::info!(?target, ?mode, keys = count, "Invalidated.");
    Ok(count)
}

/// Queue a refresh of every key of a target; their current values are served meanwhile. A key asked for
/// by name counts as read now, so it is recomputed even if it was cold; the keys of a primer or a prefix
/// follow the usual rule (cold ones are dropped). Returns how many keys were queued.
pub async fn refresh(refresher: &Refresher, target: &Target) -> Result<u64, InvalidateError> {
    let lsn = refresher.clock.visible();
    let mut count = 0u64;
    let mut pages = KeyPages::new(refresher, target).await?;
    while let Some((_, keys)) = pages.next().await? {
        count += keys.len() as u64;
        if let Target::Key(_) = target {
            for k in &keys {
                refresher.touch(k);
            }
        }
        let tasks: Vec<Task> = keys
            .into_iter()
            .map(|k| TaskKind::Key(k).task(lsn))
            .collect();
        refresher.store.enqueue(tasks).await?;
    }
    tracing::info!(?target, keys = count, "Refresh queued.");
    Ok(count)
}

// ---------------------------------------------------------------------------------------------------------
// Wire types (the HTTP routes and the CLI share them)

/// The body of `POST /invalidate` and `POST /refresh`: exactly one of `key`, `primer`, `prefix`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `refresh` (default) or `drop`; only for `/invalidate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

impl Request {
    pub fn target(&self) -> Result<Target, InvalidateError> {
        match (&self.key, &self.primer, &self.prefix) {
            (Some(k), None, None) => Ok(Target::Key(k.clone())),
            (None, Some(p), None) => Ok(Target::Primer(p.clone())),
            (None, None, Some(p)) if !p.is_empty() => Ok(Target::Prefix(p.clone())),
            _ => Err(InvalidateError::NoTarget),
        }
    }
}

/// The answer: how many keys were affected.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    pub keys: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_exactly_one_target() {
        let r: Request =
            serde_json::from_str(r#"{"prefix": "orders_by_user/", "mode": "drop"}"#).unwrap();
        assert_eq!(
            r.target().unwrap(),
            Target::Prefix("orders_by_user/".into())
        );
        assert_eq!(r.mode, Some(Mode::Drop));
        let r: Request = serde_json::from_str(r#"{"key": "a/1", "primer": "a"}"#).unwrap();
        assert!(r.target().is_err());
        assert!(serde_json::from_str::<Request>(r#"{"mode": "explode"}"#).is_err());
    }
}
