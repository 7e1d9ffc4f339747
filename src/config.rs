//! Configuration: the YAML file, `.sql` primer files, and `KCK_*` environment overrides.
//!
//! Loading runs in two stages (as ripgrep's flags do): serde reads a raw form that mirrors the file
//! (`deny_unknown_fields`), then [`Config::load`] validates it once into [`Config`]. Every error names the
//! file, the line and the field, and says what would be right.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::primer::Catalog;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (for messages).
    pub file: PathBuf,
    pub source: SourceConfig,
    pub store: StoreConfig,
    pub http: HttpConfig,
    pub refresh: RefreshConfig,
    /// On a `/fetch` miss: compute, store and return (true), or answer 404 (false). Default true.
    pub prime_on_cache_miss: bool,
    pub catalog: Catalog,
}

/// Where the data comes from.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// A libpq-style connection string or URL (`postgres://user:pass@host:5432/db`). `KCK_SOURCE_URL`.
    pub url: String,
    /// The publication kck subscribes to. Default `kck`.
    pub publication: String,
    /// Create the publication (for the tables the primers read) if it is missing. Default false.
    pub create_publication: bool,
    /// The logical replication slot kck owns. Default `kck`.
    pub slot: String,
}

/// Where cache entries and the refresh queue live.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// redb in one file under `path` (a directory; created if missing).
    Embedded { path: PathBuf },
}

/// The HTTP server.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Default `127.0.0.1:8080`. `KCK_HTTP_BIND`.
    pub bind: SocketAddr,
}

/// Refresh workers.
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    /// Concurrent refreshes, each with its own Postgres connection. Default 4.
    pub workers: usize,
    /// How long a refresh waits for its triggering transaction to become visible before giving up and
    /// retrying later. Default 5 s.
    pub visibility_timeout: Duration,
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
    /// `field` is a dotted path such as `primers[2].key`.
    #[error("{}:{line}: {field}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
}

impl Config {
    /// Read, override from the environment (`KCK_*`), and validate.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let _ = path;
        todo!()
    }
}
