//! Configuration: the YAML file, `.sql` primer files, and `KCK_*` environment overrides.
//!
//! Loading runs in two stages (as ripgrep's flags do): serde reads a raw form that mirrors the file
//! (`deny_unknown_fields`), then [`Config::load`] validates it once into [`Config`]. Every error names the
//! file, the line and the field, and says what would be right.
//!
//! `docs/config.md` is the user-facing reference of every field; keep the two in step.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_saphyr::Spanned;

use crate::auth::{Access, AccessRule, AuthConfig, JwtConfig};
pub use crate::http::subscribe::SubscribeConfig;
pub use crate::http::{
    DEFAULT_BODY_LIMIT, DEFAULT_CACHE_CONTROL, DEFAULT_HTTP_BIND, DEFAULT_MAX_BATCH_KEYS,
    DEFAULT_MAX_WAIT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_WAIT_TIMEOUT, HttpConfig,
};
pub use crate::jobs::{JobConfig, JobSchedule};
use crate::pg::redact_url;
pub use crate::pg::{SlotLostPolicy, SourceConfig};
use crate::primer::{Catalog, Dependency, KeyTemplate, Mapping, Primer, Shape, TableName};
pub use crate::refresh::{
    AbsentRows, DEFAULT_ABSENT_WINDOW, DEFAULT_CLAIM_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PARK_AFTER,
    DEFAULT_PARKED_RETRY, DEFAULT_VISIBILITY_TIMEOUT, DEFAULT_WORKERS, MAX_WORKERS, RefreshConfig,
};
pub use crate::store::{
    Capacity, Consistency, DEFAULT_CQL_PORT, DEFAULT_KEYSPACE, KeyspaceReplication, ScyllaConfig,
    StoreConfig,
};
use crate::update::{Statement, Updater, UpdaterParam, ValueType};

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub file: PathBuf,
    pub source: SourceConfig,
    pub store: StoreConfig,
    /// What this process does (`roles`, or `kck run --roles`). Default: everything.
    pub roles: Roles,
    pub http: HttpConfig,
    pub refresh: RefreshConfig,
    /// Named SQL statements run on a schedule (the process worker, [`crate::jobs`]).
    pub jobs: Vec<JobConfig>,
    /// On a `/fetch` miss: compute, store and return (true), or answer 404 (false). Default true.
    pub prime_on_cache_miss: bool,
    pub catalog: Catalog,
    /// `auth`: off by default.
    pub auth: AuthConfig,
    /// `write`: the connections updaters write through.
    pub write: WriteConfig,
    /// From `updaters` and `updaters_dir`, in that order; names are unique.
    pub updaters: Vec<Updater>,
}

/// Where updaters write.
///
/// `Debug` hides the password of `url`.
#[derive(Clone)]
pub struct WriteConfig {
    /// The Postgres connection updaters use: `write.url` (`KCK_WRITE_URL`), or else `source.url`. A role
    /// with just the privileges the updaters need is best.
    pub url: String,
    /// Connections in the updaters' pool. Default 4.
    pub connections: usize,
}

impl fmt::Debug for WriteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteConfig")
            .field("url", &redact_url(&self.url))
            .field("connections", &self.connections)
            .finish()
    }
}

/// What one kck process does. Several processes sharing a ScyllaDB store may split the roles; only one of
/// them streams from the slot at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Hold the replication slot and queue refreshes.
    pub replication: bool,
    /// Run refresh workers.
    pub refresh: bool,
    /// Serve HTTP.
    pub http: bool,
}

impl Default for Roles {
    fn default() -> Self {
        Roles::ALL
    }
}

impl Roles {
    pub const ALL: Roles = Roles {
        replication: true,
        refresh: true,
        http: true,
    };
    pub const NAMES: [&'static str; 3] = ["replication", "refresh", "http"];

    /// Parse a list of role names (`replication,refresh,http`, in any order, at least one).
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Roles, String> {
        let mut roles = Roles {
            replication: false,
            refresh: false,
            http: false,
        };
        let mut any = false;
        for name in names {
            let name = name.trim();
            let slot = match name {
                "replication" => &mut roles.replication,
                "refresh" => &mut roles.refresh,
                "http" => &mut roles.http,
                other => {
                    return Err(format!(
                        "unknown role '{other}': the roles are replication, refresh and http"
                    ));
                }
            };
            if *slot {
                return Err(format!("role '{name}' is given twice"));
            }
            *slot = true;
            any = true;
        }
        if !any {
            return Err(
                "no role given: name at least one of replication, refresh and http".to_owned(),
            );
        }
        Ok(roles)
    }

    /// Parse `replication,refresh,http` (the `--roles` flag and `KCK_ROLES`).
    pub fn parse_list(text: &str) -> Result<Roles, String> {
        Roles::parse(text.split(',').filter(|s| !s.trim().is_empty()))
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.replication {
            out.push("replication");
        }
        if self.refresh {
            out.push("refresh");
        }
        if self.http {
            out.push("http");
        }
        out
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// The configuration is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `field` is a dotted path such as `primers[2].key`. For a `.sql` primer file, `path` and `line` refer
    /// to that file and `field` is relative to its header (`key`, `depends_on[0].table`).
    #[error("{}:{line}: {field}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    /// An environment variable that overrides a field (`var`, e.g. `KCK_HTTP_BIND`) has a bad value.
    #[error("environment variable {var} (overrides {field} of {}): {message}", path.display())]
    Env {
        /// The config file whose field the variable overrides.
        path: PathBuf,
        var: String,
        field: String,
        message: String,
    },
}

/// The default of `source.publication` and `source.slot`.
pub const DEFAULT_PUBLICATION: &str = "kck";
pub const DEFAULT_SLOT: &str = "kck";
pub const DEFAULT_STORE_PATH: &str = "./kck-data";
pub const DEFAULT_MAX_RETAINED_WAL: u64 = 1 << 30;
pub const DEFAULT_WRITE_CONNECTIONS: usize = 4;
pub const MAX_WRITE_CONNECTIONS: usize = 256;
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);

/// The environment variables that override fields, with the field each overrides.
pub const ENV_OVERRIDES: [(&str, &str); 8] = [
    ("KCK_SOURCE_URL", "source.url"),
    ("KCK_SOURCE_PUBLICATION", "source.publication"),
    ("KCK_SOURCE_SLOT", "source.slot"),
    ("KCK_STORE_PATH", "store.path"),
    ("KCK_STORE_NODES", "store.nodes"),
    ("KCK_STORE_PASSWORD", "store.password"),
    ("KCK_HTTP_BIND", "http.bind"),
    ("KCK_WRITE_URL", "write.url"),
];

impl Config {
    /// Read, override from the environment (`KCK_*`), and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// [`Config::load`] with the environment given as a function (`env("KCK_SOURCE_URL")`), for tests.
    pub fn load_with_env(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = read_text(path)?;
        Config::from_yaml_str(&text, path, env)
    }

    /// Validate YAML text as if it had been read from `path` (which names the file in messages and anchors
    /// relative paths; `primers_dir` is read from disk).
    pub fn from_yaml_str(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = from_yaml(text, path)?;
        Loader {
            file: path,
            text,
            env: &env,
        }
        .load(raw)
    }
}

mod access;
mod diagnostics;
mod load;
mod primers;
mod raw;
mod sql_files;
#[cfg(test)]
mod tests;
mod updaters;
mod validators;

#[allow(unused_imports)]
use crate::sqlscan::*;
use access::*;
use diagnostics::*;
use load::*;
use primers::*;
use raw::*;
use sql_files::*;
use updaters::*;
use validators::*;
