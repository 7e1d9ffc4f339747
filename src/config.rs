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
pub use crate::http::{
    DEFAULT_BODY_LIMIT, DEFAULT_CACHE_CONTROL, DEFAULT_HTTP_BIND, DEFAULT_MAX_BATCH_KEYS,
    DEFAULT_MAX_WAIT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_WAIT_TIMEOUT, HttpConfig,
};
pub use crate::jobs::{JobConfig, JobSchedule};
use crate::pg::redact_url;
pub use crate::pg::{SlotLostPolicy, SourceConfig};
use crate::primer::{Catalog, Dependency, KeyTemplate, Mapping, Primer, Shape, TableName};
pub use crate::refresh::{
    DEFAULT_CLAIM_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_VISIBILITY_TIMEOUT, DEFAULT_WORKERS,
    MAX_WORKERS, RefreshConfig,
};
pub use crate::store::{
    Consistency, DEFAULT_CQL_PORT, DEFAULT_KEYSPACE, KeyspaceReplication, ScyllaConfig, StoreConfig,
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

// ---------------------------------------------------------------------------------------------------------
// The raw form: mirrors the file. Every field is optional so that a missing one gets our own message (with
// the enclosing mapping's line); values that need checking are kept as text with their location.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: Option<Spanned<RawSource>>,
    store: Option<Spanned<RawStore>>,
    roles: Option<Spanned<Vec<Spanned<String>>>>,
    http: Option<Spanned<RawHttp>>,
    refresh: Option<Spanned<RawRefresh>>,
    jobs: Option<Spanned<Vec<Spanned<RawJob>>>>,
    prime_on_cache_miss: Option<Spanned<bool>>,
    primers_dir: Option<Spanned<String>>,
    primers: Option<Spanned<Vec<Spanned<RawPrimer>>>>,
    auth: Option<Spanned<RawAuth>>,
    write: Option<Spanned<RawWrite>>,
    updaters_dir: Option<Spanned<String>>,
    updaters: Option<Spanned<Vec<Spanned<RawUpdater>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: Option<Spanned<String>>,
    publication: Option<Spanned<String>>,
    create_publication: Option<Spanned<bool>>,
    slot: Option<Spanned<String>>,
    standby: Option<Spanned<bool>>,
    max_retained_wal: Option<Spanned<String>>,
    on_slot_lost: Option<Spanned<String>>,
}

/// One struct for every store kind: a field of another kind is rejected by validation, by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    memory_cache: Option<Spanned<ScalarText>>,
    nodes: Option<Spanned<Vec<Spanned<String>>>>,
    keyspace: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "present")]
    replication: Option<Spanned<ReplicationPairs>>,
    consistency: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "present")]
    tls: Option<Spanned<RawTls>>,
    init: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<Spanned<String>>,
}

/// A number or a word, as the values of `store.replication` are.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Int(i64),
    Text(String),
}

/// The `store.replication` mapping, in file order.
#[derive(Debug)]
struct ReplicationPairs(Vec<(String, Spanned<Scalar>)>);

impl<'de> Deserialize<'de> for ReplicationPairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ReplicationPairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a mapping such as { class: NetworkTopologyStrategy, dc1: 3 } or { class: SimpleStrategy, replication_factor: 1 }",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ReplicationPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value()?;
                    pairs.push((key, value));
                }
                Ok(ReplicationPairs(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    bind: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    body_limit: Option<Spanned<ScalarText>>,
    max_batch_keys: Option<Spanned<i64>>,
    wait_timeout: Option<Spanned<String>>,
    max_wait: Option<Spanned<String>>,
    cors_origins: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWrite {
    url: Option<Spanned<String>>,
    connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    jwt: Option<Spanned<RawJwt>>,
    public_paths: Option<Spanned<Vec<Spanned<String>>>>,
    operator: Option<Spanned<RawAccess>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    secret_env: Option<Spanned<String>>,
    public_key_file: Option<Spanned<String>>,
    jwks_file: Option<Spanned<String>>,
    issuer: Option<Spanned<OneOrMany>>,
    audience: Option<Spanned<OneOrMany>>,
    leeway: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdater {
    name: Option<Spanned<String>>,
    params: Option<Spanned<Vec<Spanned<RawParam>>>>,
    statements: Option<Spanned<Vec<Spanned<String>>>>,
    access: Option<Spanned<RawAccess>>,
}

/// An updater parameter: `name:type` (type default `text`), or `{ name, type, nullable }`.
#[derive(Debug)]
struct RawParam {
    name: String,
    ty: Option<String>,
    nullable: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParamFields {
    name: String,
    #[serde(rename = "type")]
    ty: Option<String>,
    #[serde(default)]
    nullable: bool,
}

impl<'de> Deserialize<'de> for RawParam {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawParam;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`name:type` (such as user_id:int) or { name: user_id, type: int, nullable: false }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawParam, E> {
                let (name, ty) = match v.split_once(':') {
                    Some((n, t)) => (n.trim(), Some(t.trim().to_owned())),
                    None => (v.trim(), None),
                };
                Ok(RawParam {
                    name: name.to_owned(),
                    ty,
                    nullable: false,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawParam, A::Error> {
                let f =
                    RawParamFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawParam {
                    name: f.name,
                    ty: f.ty,
                    nullable: f.nullable,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `access`: one rule (a mapping) or a list of rules, any of which grants access.
#[derive(Debug)]
struct RawAccess(Vec<Spanned<RawAccessRule>>, Option<RawAccessRule>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessRule {
    require: Option<Spanned<RequirePairs>>,
    #[serde(rename = "match")]
    matches: Option<Spanned<ColumnPairs>>,
}

impl<'de> Deserialize<'de> for RawAccess {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawAccess;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a rule such as { require: { role: admin }, match: { sub: user_id } }, or a list of rules",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawAccess, A::Error> {
                let rule =
                    RawAccessRule::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawAccess(Vec::new(), Some(rule)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<RawAccess, A::Error> {
                let rules = Vec::<Spanned<RawAccessRule>>::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                Ok(RawAccess(rules, None))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `require`: claim → accepted value (a scalar) or values (a list of scalars), in file order.
#[derive(Debug)]
struct RequirePairs(Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for RequirePairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RequirePairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping from claim to required value, such as { role: admin }")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RequirePairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(claim) = map.next_key::<String>()? {
                    let OneOrMany(values) = map.next_value::<OneOrMany>()?;
                    pairs.push((claim, values));
                }
                Ok(RequirePairs(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A scalar (string, number or boolean) as text, or a list of them.
#[derive(Debug)]
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(ScalarText(v)) = seq.next_element::<ScalarText>()? {
                    out.push(v);
                }
                Ok(OneOrMany(out))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A scalar (string, number or boolean) as text.
#[derive(Debug)]
struct ScalarText(String);

impl<'de> Deserialize<'de> for ScalarText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ScalarText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a number or true/false")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<ScalarText, E> {
                Ok(ScalarText(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    workers: Option<Spanned<i64>>,
    visibility_timeout: Option<Spanned<String>>,
    pool_size: Option<Spanned<i64>>,
    max_queue: Option<Spanned<i64>>,
    cold_after: Option<Spanned<String>>,
    claim_batch: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Option<Spanned<String>>,
    sql: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    cron: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    query: Option<Spanned<String>>,
    key_column: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrimer {
    name: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    shape: Option<Spanned<String>>,
    query: Option<Spanned<String>>,
    depends_on: Option<Spanned<Vec<Spanned<RawDependency>>>>,
    // Refresh policy (see `crate::schedule::Policy`).
    refresh_interval: Option<Spanned<String>>,
    ttl: Option<Spanned<String>>,
    on_expiry: Option<Spanned<String>>,
    stale_while_revalidate: Option<Spanned<String>>,
    cold_after: Option<Spanned<String>>,
    warm: Option<Spanned<String>>,
    concurrency: Option<Spanned<i64>>,
    batch: Option<Spanned<RawBatch>>,
    cache_control: Option<Spanned<String>>,
    access: Option<Spanned<RawAccess>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDependency {
    table: Option<Spanned<String>>,
    /// `columns:` with no value is an error rather than absent (which would mean "all keys").
    #[serde(default, deserialize_with = "present")]
    columns: Option<Spanned<ColumnPairs>>,
    #[serde(default, deserialize_with = "present")]
    lookup: Option<Spanned<RawLookup>>,
}

/// For a field whose explicit null must not read as "absent": deserialize the value as `T` even if null.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLookup {
    query: Option<Spanned<String>>,
    args: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A `columns` mapping (key parameter → column), in file order.
#[derive(Debug)]
struct ColumnPairs(Vec<(String, Spanned<String>)>);

impl<'de> Deserialize<'de> for ColumnPairs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ColumnPairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping from key parameter to column, such as { user_id: user_id }")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ColumnPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value()?;
                    pairs.push((key, value));
                }
                Ok(ColumnPairs(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Deserialization with locations.

fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Deserialize `text` (read from `file`) into `T`; a serde error becomes [`ConfigError::Invalid`] with its
/// line and the dotted path of the field.
fn from_yaml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let mut path = None;
    let options = serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
    };
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(e.path().clone());
            e.into_inner()
        })
    });
    result.map_err(|e| {
        let line = e.location().map_or(0, |l| l.line() as usize);
        let mut field = path.as_ref().map(field_path).unwrap_or_default();
        let e = e.without_snippet();
        let message = match e {
            serde_saphyr::Error::SerdeUnknownField {
                field: name,
                expected,
                ..
            } => {
                let known = expected.join(", ");
                match closest(name, expected) {
                    Some(best) => format!(
                        "unknown field `{name}`; did you mean `{best}`? (known fields: {known})"
                    ),
                    None => format!("unknown field `{name}` (known fields: {known})"),
                }
            }
            serde_saphyr::Error::DuplicateMappingKey { key, .. } => {
                if let Some(key) = key {
                    if field.is_empty() {
                        field = key.clone();
                    }
                    format!("`{key}` is given twice in the same mapping")
                } else {
                    "a key is given twice in the same mapping".to_owned()
                }
            }
            serde_saphyr::Error::InvalidScalar { ty, .. } => {
                format!("expected {}", friendly_type(ty))
            }
            serde_saphyr::Error::InvalidBooleanStrict { .. } => "expected true or false".to_owned(),
            serde_saphyr::Error::Unexpected { expected, .. } => {
                format!("expected {}", friendly_type(expected))
            }
            other => strip_location(&other.to_string()).to_owned(),
        };
        let field = if field.is_empty() {
            "(document)".to_owned()
        } else {
            field
        };
        ConfigError::Invalid {
            path: file.to_owned(),
            line,
            field,
            message,
        }
    })
}

/// The dotted field path of a serde error. `Spanned<T>` reads its value as a field named `value`, which is
/// dropped (no field of the file format is called `value`; a key parameter called `value` in a `columns`
/// mapping is dropped too, which only makes the path of such an error one segment shorter).
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
            }
            serde_path_to_error::Segment::Map { key } if key == "value" => {}
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            serde_path_to_error::Segment::Unknown => {}
        }
    }
    out
}

fn friendly_type(ty: &str) -> &str {
    match ty {
        "i64" | "i32" | "u64" | "u32" | "usize" => "an integer",
        "bool" => "true or false",
        "mapping start" | "mapping" => "a mapping (`key: value` entries)",
        "sequence start" | "sequence" => "a list (`- item` entries or `[a, b]`)",
        "string scalar" | "string" => "a string",
        other => other,
    }
}

/// Drop saphyr's " at line N, column M" (our messages carry the line themselves).
fn strip_location(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(", column ") => &message[..i],
        _ => message,
    }
}

/// The known name closest to `name`, if it is plausibly a misspelling of it.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let (best, distance) = known
        .iter()
        .map(|k| (*k, edit_distance(name, k)))
        .min_by_key(|(_, d)| *d)?;
    (distance <= 2.max(name.chars().count() / 3)).then_some(best)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

fn line_of<T>(s: &Spanned<T>) -> usize {
    s.referenced.line() as usize
}

/// The line of a top-level `key:` in YAML text (for errors about a section that is absent or null).
fn top_level_key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// Whether the scalar whose content starts on `line` is a literal block (`key: |`, `|-`, `|+`, `|2`): the
/// line before it ends with the indicator.
fn is_literal_block(text: &str, line: usize) -> bool {
    line >= 2
        && text.lines().nth(line - 2).is_some_and(|l| {
            let l = l.find(" #").map_or(l, |i| &l[..i]).trim_end();
            l.trim_end_matches(|c: char| c == '-' || c == '+' || c.is_ascii_digit())
                .ends_with('|')
        })
}

// ---------------------------------------------------------------------------------------------------------
// Validation.

struct Loader<'a> {
    file: &'a Path,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

/// Where a primer came from, for messages about it.
struct PrimerOrigin {
    file: PathBuf,
    /// `primers[2].` for YAML primers, empty for `.sql` files.
    prefix: String,
    name_line: usize,
    key_line: usize,
}

fn invalid(
    file: &Path,
    line: usize,
    field: impl Into<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        path: file.to_owned(),
        line,
        field: field.into(),
        message: message.into(),
    }
}

impl Loader<'_> {
    fn err(
        &self,
        line: usize,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        invalid(self.file, line, field, message)
    }

    fn env_err(&self, var: &str, message: impl Into<String>) -> ConfigError {
        let field = ENV_OVERRIDES
            .iter()
            .find(|(v, _)| *v == var)
            .map_or("", |(_, f)| f);
        ConfigError::Env {
            path: self.file.to_owned(),
            var: var.to_owned(),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// The line of a section: its mapping if present, else its key, else line 1.
    fn section_line<T>(&self, section: &Option<Spanned<T>>, key: &str) -> usize {
        section
            .as_ref()
            .map(line_of)
            .or_else(|| top_level_key_line(self.text, key))
            .unwrap_or(1)
    }

    /// The value of a string field: the environment variable `var` if set, else the file's value, parsed
    /// by `parse`. `None` if neither gives one.
    fn string_field<T>(
        &self,
        var: &str,
        field: &str,
        value: Option<&Spanned<String>>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        if let Some(v) = (self.env)(var) {
            return parse(&v).map(Some).map_err(|m| self.env_err(var, m));
        }
        match value {
            Some(v) => parse(&v.value)
                .map(Some)
                .map_err(|m| self.err(line_of(v), field, m)),
            None => Ok(None),
        }
    }

    fn load(&self, mut raw: RawConfig) -> Result<Config, ConfigError> {
        let source = self.source(&raw)?;
        let store = self.store(&raw)?;
        let roles = self.roles(&raw)?;
        let http = self.http(&raw)?;
        let refresh = self.refresh(&raw)?;
        let jobs = self.jobs(&raw)?;
        let auth = self.auth(&raw)?;
        let write = self.write(&raw, &source)?;
        let prime_on_cache_miss = raw.prime_on_cache_miss.as_ref().is_none_or(|s| s.value);
        let auth_on = auth.jwt.is_some();
        let updaters = self.updaters(raw.updaters.take(), raw.updaters_dir.take(), auth_on)?;
        let mut catalog = self.primers(raw, auth_on)?;
        for primer in &mut catalog.primers {
            primer.policy.cold_after = primer.policy.cold_after.or(refresh.cold_after);
        }
        Ok(Config {
            file: self.file.to_owned(),
            source,
            store,
            roles,
            http,
            refresh,
            jobs,
            prime_on_cache_miss,
            catalog,
            auth,
            write,
            updaters,
        })
    }

    fn source(&self, raw: &RawConfig) -> Result<SourceConfig, ConfigError> {
        let line = self.section_line(&raw.source, "source");
        let section = raw.source.as_ref().map(|s| &s.value);
        let url = self
            .string_field("KCK_SOURCE_URL", "source.url", section.and_then(|s| s.url.as_ref()), check_url)?
            .ok_or_else(|| {
                self.err(
                    line,
                    "source.url",
                    "required: the Postgres connection URL, such as postgres://kck:secret@127.0.0.1:5432/app \
                     (or set KCK_SOURCE_URL)",
                )
            })?;
        let publication = self
            .string_field(
                "KCK_SOURCE_PUBLICATION",
                "source.publication",
                section.and_then(|s| s.publication.as_ref()),
                |v| check_pg_name(v, "a publication name"),
            )?
            .unwrap_or_else(|| DEFAULT_PUBLICATION.to_owned());
        let slot = self
            .string_field(
                "KCK_SOURCE_SLOT",
                "source.slot",
                section.and_then(|s| s.slot.as_ref()),
                check_slot_name,
            )?
            .unwrap_or_else(|| DEFAULT_SLOT.to_owned());
        let create_publication = section
            .and_then(|s| s.create_publication.as_ref())
            .is_some_and(|s| s.value);
        let standby = section
            .and_then(|s| s.standby.as_ref())
            .is_some_and(|s| s.value);
        let max_retained_wal = match section.and_then(|s| s.max_retained_wal.as_ref()) {
            None => DEFAULT_MAX_RETAINED_WAL,
            Some(v) => crate::ops::size::parse_byte_size(&v.value)
                .map_err(|m| self.err(line_of(v), "source.max_retained_wal", m))?,
        };
        let on_slot_lost = match section.and_then(|s| s.on_slot_lost.as_ref()) {
            None => SlotLostPolicy::Fail,
            Some(v) => match v.value.as_str() {
                "fail" => SlotLostPolicy::Fail,
                "recreate" => SlotLostPolicy::Recreate,
                other => {
                    return Err(self.err(
                        line_of(v),
                        "source.on_slot_lost",
                        format!(
                            "'{other}' is not a policy: use 'fail' (stop and say what to do) or 'recreate' \
                             (drop and create the slot again, then refresh every cached key)"
                        ),
                    ));
                }
            },
        };
        Ok(SourceConfig {
            url,
            publication,
            create_publication,
            slot,
            standby,
            max_retained_wal,
            on_slot_lost,
        })
    }

    fn store(&self, raw: &RawConfig) -> Result<StoreConfig, ConfigError> {
        let section = raw.store.as_ref().map(|s| &s.value);
        let kind = section.and_then(|s| s.kind.as_ref());
        let is_scylla = match kind.map(|k| k.value.as_str()) {
            None | Some("embedded") => false,
            Some("scylla") => true,
            Some(other) => {
                return Err(self.err(
                    kind.map_or(0, line_of),
                    "store.kind",
                    format!("unknown store kind '{other}': the kinds are 'embedded' and 'scylla'"),
                ));
            }
        };
        if is_scylla {
            return self.scylla_store(raw).map(StoreConfig::Scylla);
        }
        // Fields of the other kind are named, not ignored.
        if let Some(s) = section {
            let scylla_fields: [(&str, Option<usize>); 8] = [
                ("nodes", s.nodes.as_ref().map(line_of)),
                ("keyspace", s.keyspace.as_ref().map(line_of)),
                ("replication", s.replication.as_ref().map(line_of)),
                ("consistency", s.consistency.as_ref().map(line_of)),
                ("username", s.username.as_ref().map(line_of)),
                ("password", s.password.as_ref().map(line_of)),
                ("tls", s.tls.as_ref().map(line_of)),
                ("init", s.init.as_ref().map(line_of)),
            ];
            if let Some((name, Some(line))) = scylla_fields.iter().find(|(_, l)| l.is_some()) {
                return Err(self.err(
                    *line,
                    format!("store.{name}"),
                    format!("`{name}` is a field of the scylla store; set `kind: scylla` to use it (the embedded store takes only `path` and `memory_cache`)"),
                ));
            }
        }
        let path = match (self.env)("KCK_STORE_PATH") {
            Some(v) => {
                if v.is_empty() {
                    return Err(self.env_err("KCK_STORE_PATH", "is empty: give a directory"));
                }
                // Relative to the working directory, like any path given to a command.
                PathBuf::from(v)
            }
            None => match section.and_then(|s| s.path.as_ref()) {
                Some(p) if p.value.is_empty() => {
                    return Err(self.err(line_of(p), "store.path", "is empty: give a directory"));
                }
                Some(p) => self.relative(&p.value),
                None => self.relative(DEFAULT_STORE_PATH),
            },
        };
        let memory_cache = match section.and_then(|s| s.memory_cache.as_ref()) {
            None => crate::store::embedded::DEFAULT_MEMORY_CACHE,
            Some(m) => crate::ops::size::parse_byte_size(&m.value.0)
                .and_then(|b| {
                    usize::try_from(b)
                        .map_err(|_| format!("'{}' is too large for this machine", m.value.0))
                })
                .map_err(|e| self.err(line_of(m), "store.memory_cache", e))?,
        };
        Ok(StoreConfig::Embedded { path, memory_cache })
    }

    fn scylla_store(&self, raw: &RawConfig) -> Result<ScyllaConfig, ConfigError> {
        let line = self.section_line(&raw.store, "store");
        let Some(s) = raw.store.as_ref().map(|s| &s.value) else {
            unreachable!("kind: scylla comes from the store section");
        };
        if let Some(p) = &s.path {
            return Err(self.err(
                line_of(p),
                "store.path",
                "`path` is a field of the embedded store; the scylla store keeps its data in the cluster \
                 named by `nodes`",
            ));
        }
        if let Some(m) = &s.memory_cache {
            return Err(self.err(
                line_of(m),
                "store.memory_cache",
                "`memory_cache` is a field of the embedded store; the scylla store reads every fetch \
                 from the cluster",
            ));
        }
        let nodes = match (self.env)("KCK_STORE_NODES") {
            Some(v) => {
                let list: Vec<&str> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .collect();
                if list.is_empty() {
                    return Err(self.env_err(
                        "KCK_STORE_NODES",
                        "is empty: give host:port contact points, separated by commas",
                    ));
                }
                list.into_iter()
                    .map(check_node)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| self.env_err("KCK_STORE_NODES", m))?
            }
            None => match &s.nodes {
                None => {
                    return Err(self.err(
                        line,
                        "store.nodes",
                        "required for the scylla store: contact points such as [\"10.0.0.1:9042\", \"10.0.0.2:9042\"] \
                         (or set KCK_STORE_NODES)",
                    ));
                }
                Some(list) if list.value.is_empty() => {
                    return Err(self.err(
                        line_of(list),
                        "store.nodes",
                        "is empty: give at least one host:port contact point",
                    ));
                }
                Some(list) => list
                    .value
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        check_node(&n.value)
                            .map_err(|m| self.err(line_of(n), format!("store.nodes[{i}]"), m))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            },
        };
        let keyspace = match &s.keyspace {
            Some(k) => {
                check_keyspace(&k.value).map_err(|m| self.err(line_of(k), "store.keyspace", m))?
            }
            None => DEFAULT_KEYSPACE.to_owned(),
        };
        let replication = match &s.replication {
            Some(r) => self.keyspace_replication(r)?,
            None => KeyspaceReplication::Simple {
                replication_factor: 1,
            },
        };
        let consistency = match &s.consistency {
            Some(c) => Consistency::NAMES
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(c.value.trim()))
                .map(|(_, c)| *c)
                .ok_or_else(|| {
                    let names: Vec<&str> = Consistency::NAMES.iter().map(|(n, _)| *n).collect();
                    self.err(
                        line_of(c),
                        "store.consistency",
                        format!(
                            "unknown consistency '{}': use one of {}",
                            c.value,
                            names.join(", ")
                        ),
                    )
                })?,
            None => Consistency::LocalQuorum,
        };
        let username = match &s.username {
            Some(u) if u.value.is_empty() => {
                return Err(self.err(
                    line_of(u),
                    "store.username",
                    "is empty: give a user name or remove the field",
                ));
            }
            Some(u) => Some(u.value.clone()),
            None => None,
        };
        let password = match (self.env)("KCK_STORE_PASSWORD") {
            Some(v) => Some(v),
            None => s.password.as_ref().map(|p| p.value.clone()),
        };
        if password.is_some() && username.is_none() {
            let (at, how) = match &s.password {
                Some(p) if (self.env)("KCK_STORE_PASSWORD").is_none() => {
                    (line_of(p), "store.password is set")
                }
                _ => (line, "KCK_STORE_PASSWORD is set"),
            };
            return Err(self.err(
                at,
                "store.username",
                format!("{how} but store.username is not: give the user name to log in with"),
            ));
        }
        let tls_ca_file = match &s.tls {
            None => None,
            Some(t) => match &t.value.ca_file {
                Some(f) if f.value.is_empty() => {
                    return Err(self.err(
                        line_of(f),
                        "store.tls.ca_file",
                        "is empty: give a PEM file",
                    ));
                }
                Some(f) => Some(self.relative(&f.value)),
                None => {
                    return Err(self.err(
                        line_of(t),
                        "store.tls.ca_file",
                        "required with `tls`: the PEM file of the certificate authority that signed the nodes' certificates",
                    ));
                }
            },
        };
        let init = s.init.as_ref().is_some_and(|i| i.value);
        Ok(ScyllaConfig {
            nodes,
            keyspace,
            replication,
            consistency,
            username,
            password,
            tls_ca_file,
            init,
        })
    }

    fn keyspace_replication(
        &self,
        raw: &Spanned<ReplicationPairs>,
    ) -> Result<KeyspaceReplication, ConfigError> {
        let pairs = &raw.value.0;
        let count = |name: &str, v: &Spanned<Scalar>| -> Result<u32, ConfigError> {
            match &v.value {
                Scalar::Int(n) if (1..=100).contains(n) => Ok(*n as u32),
                Scalar::Int(n) => Err(self.err(
                    line_of(v),
                    format!("store.replication.{name}"),
                    format!("must be a replica count between 1 and 100, got {n}"),
                )),
                Scalar::Text(t) => Err(self.err(
                    line_of(v),
                    format!("store.replication.{name}"),
                    format!("must be a replica count (a number), got '{t}'"),
                )),
            }
        };
        let class = pairs.iter().find(|(k, _)| k == "class");
        let class_name = match class.map(|(_, v)| &v.value) {
            Some(Scalar::Text(t)) => t.rsplit('.').next().unwrap_or(t).to_owned(),
            Some(Scalar::Int(n)) => {
                return Err(self.err(
                    class.map_or(line_of(raw), |(_, v)| line_of(v)),
                    "store.replication.class",
                    format!("must be SimpleStrategy or NetworkTopologyStrategy, got {n}"),
                ));
            }
            None => {
                return Err(self.err(
                    line_of(raw),
                    "store.replication.class",
                    "required: SimpleStrategy (with replication_factor) or NetworkTopologyStrategy (with a \
                     replica count per data centre, such as dc1: 3)",
                ));
            }
        };
        let others = pairs.iter().filter(|(k, _)| k != "class");
        match class_name.as_str() {
            "SimpleStrategy" => {
                let mut factor = None;
                for (k, v) in others {
                    if k != "replication_factor" {
                        return Err(self.err(
                            line_of(v),
                            format!("store.replication.{k}"),
                            "SimpleStrategy takes only replication_factor; use NetworkTopologyStrategy to give \
                             replicas per data centre",
                        ));
                    }
                    factor = Some(count(k, v)?);
                }
                let replication_factor = factor.ok_or_else(|| {
                    self.err(
                        line_of(raw),
                        "store.replication.replication_factor",
                        "required with SimpleStrategy, such as replication_factor: 3",
                    )
                })?;
                Ok(KeyspaceReplication::Simple { replication_factor })
            }
            "NetworkTopologyStrategy" => {
                let mut datacenters = Vec::new();
                for (k, v) in others {
                    if k.is_empty()
                        || !k
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                    {
                        return Err(self.err(
                            line_of(v),
                            format!("store.replication.{k}"),
                            "is not a data centre name: use letters, digits, '_', '-' and '.'",
                        ));
                    }
                    datacenters.push((k.clone(), count(k, v)?));
                }
                if datacenters.is_empty() {
                    return Err(self.err(
                        line_of(raw),
                        "store.replication",
                        "NetworkTopologyStrategy needs a replica count per data centre, such as dc1: 3",
                    ));
                }
                Ok(KeyspaceReplication::NetworkTopology { datacenters })
            }
            other => Err(self.err(
                class.map_or(line_of(raw), |(_, v)| line_of(v)),
                "store.replication.class",
                format!("unknown replication class '{other}': use SimpleStrategy or NetworkTopologyStrategy"),
            )),
        }
    }

    fn roles(&self, raw: &RawConfig) -> Result<Roles, ConfigError> {
        match &raw.roles {
            None => Ok(Roles::ALL),
            Some(list) => {
                for (i, r) in list.value.iter().enumerate() {
                    if let Err(m) = Roles::parse([r.value.as_str()]) {
                        return Err(self.err(line_of(r), format!("roles[{i}]"), m));
                    }
                }
                Roles::parse(list.value.iter().map(|r| r.value.as_str()))
                    .map_err(|m| self.err(line_of(list), "roles", m))
            }
        }
    }

    /// A path from the file, relative to the file's directory.
    fn relative(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    fn http(&self, raw: &RawConfig) -> Result<HttpConfig, ConfigError> {
        let section = raw.http.as_ref().map(|s| &s.value);
        let bind = self
            .string_field(
                "KCK_HTTP_BIND",
                "http.bind",
                section.and_then(|s| s.bind.as_ref()),
                parse_bind,
            )?
            .unwrap_or(DEFAULT_HTTP_BIND);
        let duration = |field: Option<&Spanned<String>>, name: &str, default: Duration| match field
        {
            None => Ok(default),
            Some(t) => parse_duration(&t.value).map_err(|m| self.err(line_of(t), name, m)),
        };
        let request_timeout = duration(
            section.and_then(|s| s.request_timeout.as_ref()),
            "http.request_timeout",
            DEFAULT_REQUEST_TIMEOUT,
        )?;
        let wait_timeout = duration(
            section.and_then(|s| s.wait_timeout.as_ref()),
            "http.wait_timeout",
            DEFAULT_WAIT_TIMEOUT,
        )?;
        let max_wait = duration(
            section.and_then(|s| s.max_wait.as_ref()),
            "http.max_wait",
            DEFAULT_MAX_WAIT,
        )?;
        if wait_timeout > max_wait {
            let line = section
                .and_then(|s| s.wait_timeout.as_ref())
                .map_or(1, line_of);
            return Err(self.err(
                line,
                "http.wait_timeout",
                format!(
                    "{} is longer than http.max_wait ({}): the default wait must be allowed",
                    humantime::format_duration(wait_timeout),
                    humantime::format_duration(max_wait)
                ),
            ));
        }
        let body_limit = match section.and_then(|s| s.body_limit.as_ref()) {
            None => DEFAULT_BODY_LIMIT,
            Some(b) => {
                parse_size(&b.value.0).map_err(|m| self.err(line_of(b), "http.body_limit", m))?
            }
        };
        let max_batch_keys = match section.and_then(|s| s.max_batch_keys.as_ref()) {
            None => DEFAULT_MAX_BATCH_KEYS,
            Some(n) => match usize::try_from(n.value) {
                Ok(n) if (1..=100_000).contains(&n) => n,
                _ => {
                    return Err(self.err(
                        line_of(n),
                        "http.max_batch_keys",
                        format!("must be between 1 and 100000, got {}", n.value),
                    ));
                }
            },
        };
        let mut cors_origins = Vec::new();
        if let Some(list) = section.and_then(|s| s.cors_origins.as_ref()) {
            for (i, o) in list.value.iter().enumerate() {
                let origin = check_origin(&o.value)
                    .map_err(|m| self.err(line_of(o), format!("http.cors_origins[{i}]"), m))?;
                cors_origins.push(origin);
            }
            if cors_origins.len() > 1 && cors_origins.iter().any(|o| o == "*") {
                return Err(self.err(
                    line_of(list),
                    "http.cors_origins",
                    "`*` allows every origin: give it alone, or list the origins",
                ));
            }
        }
        Ok(HttpConfig {
            bind,
            request_timeout,
            body_limit,
            max_batch_keys,
            wait_timeout,
            max_wait,
            cors_origins,
        })
    }

    fn write(&self, raw: &RawConfig, source: &SourceConfig) -> Result<WriteConfig, ConfigError> {
        let section = raw.write.as_ref().map(|s| &s.value);
        let url = self
            .string_field(
                "KCK_WRITE_URL",
                "write.url",
                section.and_then(|s| s.url.as_ref()),
                check_url,
            )?
            .unwrap_or_else(|| source.url.clone());
        let connections = match section.and_then(|s| s.connections.as_ref()) {
            None => DEFAULT_WRITE_CONNECTIONS,
            Some(c) => match usize::try_from(c.value) {
                Ok(n) if (1..=MAX_WRITE_CONNECTIONS).contains(&n) => n,
                _ => {
                    return Err(self.err(
                        line_of(c),
                        "write.connections",
                        format!(
                            "must be between 1 and {MAX_WRITE_CONNECTIONS}, got {}",
                            c.value
                        ),
                    ));
                }
            },
        };
        Ok(WriteConfig { url, connections })
    }

    fn auth(&self, raw: &RawConfig) -> Result<AuthConfig, ConfigError> {
        let mut auth = AuthConfig::default();
        let Some(section) = raw.auth.as_ref().map(|s| &s.value) else {
            return Ok(auth);
        };
        if let Some(paths) = &section.public_paths {
            auth.public_paths.clear();
            for (i, p) in paths.value.iter().enumerate() {
                if !p.value.starts_with('/') || p.value.contains(['?', '#', ' ']) {
                    return Err(self.err(
                        line_of(p),
                        format!("auth.public_paths[{i}]"),
                        format!(
                            "'{}' is not a request path: write it as it appears in the URL, starting with / \
                             (such as /healthz), without a query",
                            p.value
                        ),
                    ));
                }
                auth.public_paths.push(p.value.clone());
            }
        }
        if let Some(jwt) = &section.jwt {
            auth.jwt = Some(self.jwt(jwt)?);
        }
        if let Some(operator) = &section.operator {
            auth.operator = Some(build_access(
                operator,
                &[],
                self.file,
                "auth.operator",
                auth.jwt.is_some(),
            )?);
        }
        Ok(auth)
    }

    fn jwt(&self, section: &Spanned<RawJwt>) -> Result<JwtConfig, ConfigError> {
        let line = line_of(section);
        let jwt = &section.value;
        let Some(algorithms) = &jwt.algorithms else {
            return Err(self.err(
                line,
                "auth.jwt.algorithms",
                "required: the algorithms tokens may be signed with, such as [RS256] or [HS256]; kck \
                 never takes the algorithm from the token",
            ));
        };
        if algorithms.value.is_empty() {
            return Err(self.err(
                line_of(algorithms),
                "auth.jwt.algorithms",
                "list at least one algorithm",
            ));
        }
        let mut algs = Vec::with_capacity(algorithms.value.len());
        for (i, a) in algorithms.value.iter().enumerate() {
            let alg = crate::auth::parse_algorithm(a.value.trim())
                .map_err(|m| self.err(line_of(a), format!("auth.jwt.algorithms[{i}]"), m))?;
            if !algs.contains(&alg) {
                algs.push(alg);
            }
        }
        let sources = [
            ("secret_env", &jwt.secret_env),
            ("public_key_file", &jwt.public_key_file),
            ("jwks_file", &jwt.jwks_file),
        ];
        let given: Vec<_> = sources.iter().filter(|(_, v)| v.is_some()).collect();
        let (kind, value) = match given.as_slice() {
            [(kind, Some(value))] => (*kind, value),
            [] | [(_, None)] => {
                return Err(self.err(
                    line,
                    "auth.jwt",
                    "give the verification key: `secret_env` (the environment variable holding an HS* \
                     secret), `public_key_file` (a PEM public key) or `jwks_file` (a JWKS document)",
                ));
            }
            more => {
                return Err(self.err(
                    line,
                    "auth.jwt",
                    format!(
                        "give only one of secret_env, public_key_file and jwks_file (found {})",
                        more.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        };
        let field = format!("auth.jwt.{kind}");
        let value_line = line_of(value);
        let (keys, key_source) = match kind {
            "secret_env" => {
                let var = value.value.trim();
                let secret = (self.env)(var).ok_or_else(|| {
                    self.err(
                        value_line,
                        &field,
                        format!(
                            "the environment variable {var} is not set: it must hold the HS* secret"
                        ),
                    )
                })?;
                let keys = crate::auth::secret_key(secret.as_bytes())
                    .map_err(|m| self.err(value_line, &field, format!("{var}: {m}")))?;
                (keys, format!("secret_env {var}"))
            }
            _ => {
                let path = self.relative(&value.value);
                let bytes = std::fs::read(&path).map_err(|e| {
                    self.err(
                        value_line,
                        &field,
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let keys = if kind == "jwks_file" {
                    crate::auth::jwks_keys(&String::from_utf8_lossy(&bytes))
                } else {
                    crate::auth::pem_key(&bytes)
                }
                .map_err(|m| self.err(value_line, &field, format!("{}: {m}", path.display())))?;
                (keys, format!("{kind} {}", path.display()))
            }
        };
        let strings = |v: &Option<Spanned<OneOrMany>>,
                       name: &str|
         -> Result<Option<Vec<String>>, ConfigError> {
            match v {
                None => Ok(None),
                Some(v)
                    if v.value.0.is_empty() || v.value.0.iter().any(|s| s.trim().is_empty()) =>
                {
                    Err(self.err(line_of(v), name, "give a non-empty value or list of values"))
                }
                Some(v) => Ok(Some(v.value.0.clone())),
            }
        };
        let issuer = strings(&jwt.issuer, "auth.jwt.issuer")?;
        let audience = strings(&jwt.audience, "auth.jwt.audience")?;
        let leeway = match &jwt.leeway {
            None => DEFAULT_JWT_LEEWAY,
            Some(l) => {
                let d = humantime::parse_duration(l.value.trim()).map_err(|e| {
                    self.err(
                        line_of(l),
                        "auth.jwt.leeway",
                        format!("'{}' is not a duration ({e}); write e.g. 30s", l.value),
                    )
                })?;
                if d > Duration::from_secs(300) {
                    return Err(self.err(
                        line_of(l),
                        "auth.jwt.leeway",
                        "at most 5m: a longer leeway keeps expired tokens valid too long",
                    ));
                }
                d
            }
        };
        JwtConfig::new(algs, keys, key_source, issuer, audience, leeway)
            .map_err(|m| self.err(line, "auth.jwt", m))
    }

    fn updaters(
        &self,
        list: Option<Spanned<Vec<Spanned<RawUpdater>>>>,
        dir: Option<Spanned<String>>,
        auth_on: bool,
    ) -> Result<Vec<Updater>, ConfigError> {
        let mut updaters = Vec::new();
        // (file, line of the name, field prefix) per updater, for duplicate names.
        let mut origins: Vec<(PathBuf, usize, String)> = Vec::new();
        if let Some(list) = list {
            for (i, item) in list.value.into_iter().enumerate() {
                let line = line_of(&item);
                let prefix = format!("updaters[{i}].");
                let (updater, name_line) =
                    build_updater(item.value, line, self.file, &prefix, None, auth_on)?;
                updaters.push(updater);
                origins.push((self.file.to_owned(), name_line, prefix));
            }
        }
        if let Some(dir) = &dir {
            let path = self.relative(&dir.value);
            for file in sql_files(&path).map_err(|e| {
                self.err(
                    line_of(dir),
                    "updaters_dir",
                    format!("cannot read the directory {}: {e}", path.display()),
                )
            })? {
                let (updater, name_line) = load_sql_updater(&file, auth_on)?;
                updaters.push(updater);
                origins.push((file, name_line, String::new()));
            }
        }
        for i in 0..updaters.len() {
            if let Some(j) = (0..i).find(|&j| updaters[j].name == updaters[i].name) {
                let (file, line, prefix) = &origins[i];
                return Err(invalid(
                    file,
                    *line,
                    format!("{prefix}name"),
                    format!(
                        "the updater name '{}' is already used at {}:{}; updater names must be unique",
                        updaters[i].name,
                        origins[j].0.display(),
                        origins[j].1
                    ),
                ));
            }
        }
        Ok(updaters)
    }

    fn refresh(&self, raw: &RawConfig) -> Result<RefreshConfig, ConfigError> {
        let section = raw.refresh.as_ref().map(|s| &s.value);
        let workers = match section.and_then(|s| s.workers.as_ref()) {
            None => DEFAULT_WORKERS,
            Some(w) => match usize::try_from(w.value) {
                Ok(n) if (1..=MAX_WORKERS).contains(&n) => n,
                _ => {
                    return Err(self.err(
                        line_of(w),
                        "refresh.workers",
                        format!("must be between 1 and {MAX_WORKERS}, got {}", w.value),
                    ));
                }
            },
        };
        let visibility_timeout = match section.and_then(|s| s.visibility_timeout.as_ref()) {
            None => DEFAULT_VISIBILITY_TIMEOUT,
            Some(t) => parse_duration(&t.value)
                .map_err(|m| self.err(line_of(t), "refresh.visibility_timeout", m))?,
        };
        let count = |field: &str, value: Option<&Spanned<i64>>, min: i64, max: i64| {
            value
                .map(|v| {
                    if (min..=max).contains(&v.value) {
                        Ok(v.value)
                    } else {
                        Err(self.err(
                            line_of(v),
                            format!("refresh.{field}"),
                            format!("must be between {min} and {max}, got {}", v.value),
                        ))
                    }
                })
                .transpose()
        };
        let pool_size = count(
            "pool_size",
            section.and_then(|s| s.pool_size.as_ref()),
            1,
            1024,
        )?
        .map_or(workers + 4, |n| n as usize);
        let max_queue = count(
            "max_queue",
            section.and_then(|s| s.max_queue.as_ref()),
            1,
            i64::MAX,
        )?
        .map_or(DEFAULT_MAX_QUEUE, |n| n as u64);
        let claim_batch = count(
            "claim_batch",
            section.and_then(|s| s.claim_batch.as_ref()),
            1,
            1000,
        )?
        .map_or(DEFAULT_CLAIM_BATCH, |n| n as usize);
        let cold_after = section
            .and_then(|s| s.cold_after.as_ref())
            .map(|t| {
                parse_duration(&t.value).map_err(|m| self.err(line_of(t), "refresh.cold_after", m))
            })
            .transpose()?;
        Ok(RefreshConfig {
            workers,
            visibility_timeout,
            pool_size,
            max_queue,
            cold_after,
            claim_batch,
        })
    }

    fn jobs(&self, raw: &RawConfig) -> Result<Vec<JobConfig>, ConfigError> {
        let Some(list) = &raw.jobs else {
            return Ok(Vec::new());
        };
        let mut jobs: Vec<JobConfig> = Vec::new();
        for (i, item) in list.value.iter().enumerate() {
            let line = line_of(item);
            let field = |f: &str| format!("jobs[{i}].{f}");
            let job = &item.value;
            let Some(name) = &job.name else {
                return Err(self.err(
                    line,
                    field("name"),
                    "required: the job's name, such as refresh_totals",
                ));
            };
            if name.value.is_empty()
                || !name
                    .value
                    .chars()
                    .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
            {
                return Err(self.err(
                    line_of(name),
                    field("name"),
                    format!(
                        "'{}' is not a valid job name: use lower-case letters, digits and '_'",
                        name.value
                    ),
                ));
            }
            if jobs.iter().any(|j| j.name == name.value) {
                return Err(self.err(
                    line_of(name),
                    field("name"),
                    format!(
                        "the job name '{}' is used twice; job names must be unique",
                        name.value
                    ),
                ));
            }
            let sql = match &job.sql {
                Some(sql) if !sql.value.trim().is_empty() => sql.value.trim().to_owned(),
                Some(sql) => {
                    return Err(self.err(
                        line_of(sql),
                        field("sql"),
                        "is empty: give the SQL to run",
                    ));
                }
                None => {
                    return Err(self.err(
                        line,
                        field("sql"),
                        "required: the SQL to run, such as REFRESH MATERIALIZED VIEW CONCURRENTLY totals",
                    ));
                }
            };
            let schedule = match (&job.interval, &job.cron) {
                (Some(_), Some(c)) => {
                    return Err(self.err(
                        line_of(c),
                        field("cron"),
                        "give either `interval` or `cron`, not both",
                    ));
                }
                (None, None) => {
                    return Err(self.err(
                        line,
                        field("interval"),
                        "required: `interval` (such as 5m) or `cron` (such as \"0 3 * * *\")",
                    ));
                }
                (Some(t), None) => JobSchedule::Interval(
                    parse_duration(&t.value)
                        .map_err(|m| self.err(line_of(t), field("interval"), m))?,
                ),
                (None, Some(c)) => {
                    crate::jobs::parse_cron(&c.value)
                        .map_err(|m| self.err(line_of(c), field("cron"), m))?;
                    JobSchedule::Cron(c.value.trim().to_owned())
                }
            };
            jobs.push(JobConfig {
                name: name.value.clone(),
                sql,
                schedule,
            });
        }
        Ok(jobs)
    }

    fn primers(&self, raw: RawConfig, auth_on: bool) -> Result<Catalog, ConfigError> {
        let mut primers = Vec::new();
        let mut origins = Vec::new();
        let primers_line = self.section_line(&raw.primers, "primers");
        if let Some(list) = raw.primers {
            for (i, item) in list.value.into_iter().enumerate() {
                let origin = PrimerOrigin {
                    file: self.file.to_owned(),
                    prefix: format!("primers[{i}]."),
                    name_line: line_of(&item),
                    key_line: line_of(&item),
                };
                let line = line_of(&item);
                let query_is_literal_block = item
                    .value
                    .query
                    .as_ref()
                    .is_some_and(|q| is_literal_block(self.text, line_of(q)));
                let (primer, origin) = build_primer(
                    item.value,
                    line,
                    origin,
                    None,
                    query_is_literal_block,
                    auth_on,
                )?;
                primers.push(primer);
                origins.push(origin);
            }
        }
        if let Some(dir) = &raw.primers_dir {
            let line = line_of(dir);
            let path = self.relative(&dir.value);
            for file in sql_files(&path).map_err(|e| {
                self.err(
                    line,
                    "primers_dir",
                    format!("cannot read the directory {}: {e}", path.display()),
                )
            })? {
                let (primer, origin) = load_sql_primer(&file, auth_on)?;
                primers.push(primer);
                origins.push(origin);
            }
        }
        if primers.is_empty() {
            return Err(self.err(
                primers_line,
                "primers",
                "at least one primer is required: list them under `primers:` or put `.sql` primer files in \
                 the directory named by `primers_dir`",
            ));
        }
        // Names are unique across the file and the `.sql` files.
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, primer) in primers.iter().enumerate() {
            if let Some(&j) = seen.get(primer.name.as_str()) {
                let (here, there) = (&origins[i], &origins[j]);
                return Err(invalid(
                    &here.file,
                    here.name_line,
                    format!("{}name", here.prefix),
                    format!(
                        "the primer name '{}' is already used at {}:{}; primer names must be unique",
                        primer.name,
                        there.file.display(),
                        there.name_line
                    ),
                ));
            }
            seen.insert(&primer.name, i);
        }
        // No two templates may match the same key text.
        for i in 0..primers.len() {
            for j in 0..i {
                if primers[j].template.overlaps(&primers[i].template) {
                    let (here, there) = (&origins[i], &origins[j]);
                    return Err(invalid(
                        &here.file,
                        here.key_line,
                        format!("{}key", here.prefix),
                        format!(
                            "the key template '{}' can match the same key text as '{}' of primer '{}' ({}:{}): \
                             templates with the same number of segments need a different literal in some \
                             position",
                            primers[i].template.source,
                            primers[j].template.source,
                            primers[j].name,
                            there.file.display(),
                            there.key_line
                        ),
                    ));
                }
            }
        }
        Catalog::new(primers).map_err(|m| self.err(primers_line, "primers", m))
    }
}

fn check_url(url: &str) -> Result<String, String> {
    if url.trim().is_empty() {
        return Err("is empty: give a Postgres connection URL such as postgres://kck:secret@127.0.0.1:5432/app".into());
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| url.to_owned())
        .map_err(|e| format!("is not a valid Postgres connection string or URL: {e}"))
}

/// A name Postgres folds to itself when unquoted: `[a-z_][a-z0-9_$]*`, at most 63 bytes.
fn check_pg_name(name: &str, what: &str) -> Result<String, String> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '$'))
        && name.len() <= 63;
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "'{name}' is not valid as {what}: use lower-case letters, digits, '_' and '$' (not first), at most 63 characters"
        ))
    }
}

/// Postgres' rule for replication slot names.
fn check_slot_name(name: &str) -> Result<String, String> {
    if !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "'{name}' is not a valid replication slot name: use 1 to 63 lower-case letters, digits and '_'"
        ))
    }
}

/// A CQL contact point: `host:port`, or `host` (port 9042). IPv6 addresses in brackets: `[::1]:9042`.
fn check_node(text: &str) -> Result<String, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "'{text}' is not a contact point: write host:port, such as 10.0.0.1:9042 or scylla:9042"
        )
    };
    if text.is_empty() || text.contains(char::is_whitespace) || text.contains('/') {
        return Err(bad());
    }
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(text.to_owned());
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            port.parse::<u16>().map_err(|_| bad())?;
            Ok(text.to_owned())
        }
        Some(_) => Err(bad()),
        None => Ok(format!("{text}:{DEFAULT_CQL_PORT}")),
    }
}

/// Keyspace names kck accepts: what CQL takes unquoted, kept lower-case (CQL folds unquoted names).
fn check_keyspace(name: &str) -> Result<String, String> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= 48;
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "'{name}' is not a valid keyspace name: use a lower-case letter, then lower-case letters, digits and '_', at most 48 characters"
        ))
    }
}

fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("'{text}' is not an IP address and port, such as 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080")
    })
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(format!(
            "'{text}' is zero; give a positive duration such as 5s"
        )),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "'{text}' is not a duration ({e}); write a number with a unit, such as 200ms, 5s or 1m"
        )),
    }
}

/// The `*.sql` files of a directory, sorted by name.
fn sql_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "sql") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The first line of a `.sql` primer file.
const SQL_MARKER: &str = "-- kck:primer";
/// The first line of a `.sql` updater file.
const UPDATER_MARKER: &str = "-- kck:updater";

/// A `.sql` file split into its YAML header (line numbers kept: the marker line is blanked) and its body.
struct SqlFile {
    header: String,
    body: String,
    /// The line of the file where the body starts.
    body_line: usize,
}

/// Read a `.sql` file whose first line is `marker`, then `--` lines forming a YAML header, then SQL.
fn read_sql_file(file: &Path, marker: &str, what: &str) -> Result<SqlFile, ConfigError> {
    let text = read_text(file)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or("");
    if first.trim_end() != marker {
        let hint = match first.trim_end() {
            SQL_MARKER => ": this is a primer file; put it in `primers_dir`",
            UPDATER_MARKER => ": this is an updater file; put it in `updaters_dir`",
            _ => "",
        };
        return Err(invalid(
            file,
            1,
            "header",
            format!(
                "{what} file must start with the line `{marker}` (found `{}`){hint}",
                first.trim_end().chars().take(60).collect::<String>()
            ),
        ));
    }
    // The header as YAML, with the marker line blanked so that YAML line numbers are the file's.
    let mut header = String::from("\n");
    let mut offset = first.len();
    let mut line = 1;
    for l in lines {
        let Some(content) = l.strip_prefix("--") else {
            break;
        };
        header.push_str(
            content
                .strip_prefix(' ')
                .unwrap_or(content)
                .trim_end_matches(['\n', '\r']),
        );
        header.push('\n');
        offset += l.len();
        line += 1;
    }
    Ok(SqlFile {
        header,
        body: text[offset..].to_owned(),
        body_line: line + 1,
    })
}

/// Read a `.sql` primer: `-- kck:primer`, then `--` lines forming a YAML header, then the query.
fn load_sql_primer(file: &Path, auth_on: bool) -> Result<(Primer, PrimerOrigin), ConfigError> {
    let SqlFile {
        header,
        body,
        body_line,
    } = read_sql_file(file, SQL_MARKER, "a primer")?;
    let raw: RawPrimer = from_yaml(&header, file)?;
    if let Some(q) = &raw.query {
        return Err(invalid(
            file,
            line_of(q),
            "query",
            "the query of a .sql primer is the body of the file, after the header: remove `query` from the header",
        ));
    }
    let default_name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let origin = PrimerOrigin {
        file: file.to_owned(),
        prefix: String::new(),
        name_line: 1,
        key_line: 1,
    };
    build_primer(
        raw,
        1,
        origin,
        Some(SqlBody {
            default_name,
            query: body,
            line: body_line,
        }),
        false,
        auth_on,
    )
}

/// Read a `.sql` updater: `-- kck:updater`, a YAML header (`name`, `params`, `access`), then its
/// statements separated by `;`. Returns the updater and the line of its name.
fn load_sql_updater(file: &Path, auth_on: bool) -> Result<(Updater, usize), ConfigError> {
    let SqlFile {
        header,
        body,
        body_line,
    } = read_sql_file(file, UPDATER_MARKER, "an updater")?;
    let raw: RawUpdater = from_yaml(&header, file)?;
    if let Some(st) = &raw.statements {
        return Err(invalid(
            file,
            line_of(st),
            "statements",
            "the statements of a .sql updater are the body of the file, after the header: remove \
             `statements` from the header",
        ));
    }
    let default_name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    build_updater(
        raw,
        1,
        file,
        "",
        Some(SqlBody {
            default_name,
            query: body,
            line: body_line,
        }),
        auth_on,
    )
}

/// What a `.sql` file gives a primer besides its header.
struct SqlBody {
    default_name: String,
    query: String,
    /// The line of the file where the query starts (after the header).
    line: usize,
}

/// Validate one primer. `line` is the line of the primer as a whole (its mapping, or 1 for a `.sql` file).
///
/// `query_is_literal_block`: the YAML `query` is a `|` block scalar, whose lines are the file's lines (then
/// a message about a placeholder names the placeholder's line).
fn build_primer(
    raw: RawPrimer,
    line: usize,
    mut origin: PrimerOrigin,
    sql: Option<SqlBody>,
    query_is_literal_block: bool,
    auth_on: bool,
) -> Result<(Primer, PrimerOrigin), ConfigError> {
    let file = origin.file.clone();
    let prefix = origin.prefix.clone();
    let err = |line: usize, field: &str, message: String| {
        invalid(&file, line, format!("{prefix}{field}"), message)
    };

    // name
    let (name, name_line) = match (&raw.name, &sql) {
        (Some(n), _) => (n.value.clone(), line_of(n)),
        (None, Some(sql)) => (sql.default_name.clone(), 1),
        (None, None) => {
            return Err(err(
                line,
                "name",
                "required: the primer's name, such as orders_by_user".into(),
            ));
        }
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    {
        let hint = if raw.name.is_none() {
            " (the name comes from the file name; set `name` in the header)"
        } else {
            ""
        };
        return Err(err(
            name_line,
            "name",
            format!(
                "'{name}' is not a valid primer name: use lower-case letters, digits and '_'{hint}"
            ),
        ));
    }
    origin.name_line = name_line;

    // key
    let Some(key) = &raw.key else {
        return Err(err(
            line,
            "key",
            "required: the key template, such as orders_by_user/{user_id:int}".into(),
        ));
    };
    let key_line = line_of(key);
    origin.key_line = key_line;
    let template = KeyTemplate::parse(&key.value).map_err(|m| {
        err(
            key_line,
            "key",
            format!("invalid key template '{}': {m}", key.value),
        )
    })?;

    // shape
    let shape = match &raw.shape {
        None => Shape::Rows,
        Some(s) => match s.value.as_str() {
            "rows" => Shape::Rows,
            "row" => Shape::Row,
            "value" => Shape::Value,
            other => {
                return Err(err(
                    line_of(s),
                    "shape",
                    format!(
                        "unknown shape '{other}': expected rows (all rows as an array), row (the first row) or value (the first column of the first row)"
                    ),
                ));
            }
        },
    };

    // query
    let (query_text, query_line, exact_lines) = match (&raw.query, &sql) {
        (Some(q), _) => (q.value.as_str(), line_of(q), query_is_literal_block),
        (None, Some(sql)) => (sql.query.as_str(), sql.line, true),
        (None, None) => {
            return Err(err(
                line,
                "query",
                "required: the SQL query whose result is cached".into(),
            ));
        }
    };
    let scan = scan_sql(query_text).map_err(|(offset, m)| {
        let l = if exact_lines {
            line_at(query_text, offset, query_line)
        } else {
            query_line
        };
        err(l, "query", m)
    })?;
    let names: Vec<&str> = template.params.iter().map(|p| p.name.as_str()).collect();
    check_placeholders(&scan, &names, "the key template", "key parameter").map_err(
        |(offset, m)| {
            let first_token = query_text.len() - query_text.trim_start().len();
            let l = if exact_lines {
                line_at(query_text, offset.unwrap_or(first_token), query_line)
            } else {
                query_line
            };
            err(l, "query", m)
        },
    )?;
    let query = query_text[..scan.end].trim_start().to_owned();

    // depends_on
    let Some(deps) = &raw.depends_on else {
        return Err(err(
            line,
            "depends_on",
            "required: list the tables the query reads, e.g. `depends_on: [{ table: orders, columns: { user_id: user_id } }]`; \
             without dependencies the primer's cached keys would never be refreshed"
                .into(),
        ));
    };
    if deps.value.is_empty() {
        return Err(err(
            line_of(deps),
            "depends_on",
            "must list at least one table: without dependencies the primer's cached keys would never be refreshed"
                .into(),
        ));
    }
    let mut dependencies = Vec::with_capacity(deps.value.len());
    for (d, dep) in deps.value.iter().enumerate() {
        let field = |f: &str| format!("depends_on[{d}]{f}");
        let dep_line = line_of(dep);
        let dep = &dep.value;
        let Some(table) = &dep.table else {
            return Err(err(
                dep_line,
                &field(".table"),
                "required: the table, as `table` or `schema.table`".into(),
            ));
        };
        let table_name =
            parse_table(&table.value).map_err(|m| err(line_of(table), &field(".table"), m))?;
        let mapping = match (&dep.columns, &dep.lookup) {
            (Some(_), Some(l)) => {
                return Err(err(
                    line_of(l),
                    &field(""),
                    "give either `columns` or `lookup`, not both".into(),
                ));
            }
            (None, None) => Mapping::AllKeys,
            (Some(columns), None) => {
                let mut mapped: Vec<Option<(String, usize)>> = vec![None; template.params.len()];
                for (param, column) in &columns.value.0 {
                    let column_line = line_of(column);
                    let f = field(&format!(".columns.{param}"));
                    let Some(p) = template.param_index(param) else {
                        return Err(err(
                            column_line,
                            &f,
                            format!(
                                "'{param}' is not a parameter of the key template '{}' (its parameters: {}); \
                                 `columns` maps each key parameter to a column of the changed row",
                                template.source,
                                list_or_none(&names)
                            ),
                        ));
                    };
                    if let Some((_, first)) = &mapped[p] {
                        return Err(err(
                            column_line,
                            &f,
                            format!(
                                "key parameter '{param}' is mapped twice (first on line {first})"
                            ),
                        ));
                    }
                    let column_name = parse_identifier(&column.value, "a column name")
                        .map_err(|m| err(column_line, &f, m))?;
                    mapped[p] = Some((column_name, column_line));
                }
                let mut pairs = Vec::with_capacity(mapped.len());
                for (p, m) in mapped.into_iter().enumerate() {
                    match m {
                        Some((column, _)) => pairs.push((p, column)),
                        None => {
                            return Err(err(
                                line_of(columns),
                                &field(".columns"),
                                format!(
                                    "key parameter '{}' is not mapped: `columns` must give a column of the changed \
                                     row for every key parameter ({}); use `lookup` when the row does not hold them",
                                    names[p],
                                    names.join(", ")
                                ),
                            ));
                        }
                    }
                }
                Mapping::Columns(pairs)
            }
            (None, Some(lookup)) => {
                let lookup_line = line_of(lookup);
                let Some(q) = &lookup.value.query else {
                    return Err(err(
                        lookup_line,
                        &field(".lookup.query"),
                        "required: the query that turns the changed row into key parameters".into(),
                    ));
                };
                let Some(args) = &lookup.value.args else {
                    return Err(err(
                        lookup_line,
                        &field(".lookup.args"),
                        "required: the columns of the changed row bound as $1..$n".into(),
                    ));
                };
                if args.value.is_empty() {
                    return Err(err(
                        line_of(args),
                        &field(".lookup.args"),
                        "must list at least one column of the changed row (bound as $1..$n of the lookup query)".into(),
                    ));
                }
                let mut arg_names = Vec::with_capacity(args.value.len());
                for (a, arg) in args.value.iter().enumerate() {
                    arg_names.push(parse_identifier(&arg.value, "a column name").map_err(|m| {
                        err(line_of(arg), &field(&format!(".lookup.args[{a}]")), m)
                    })?);
                }
                let q_line = line_of(q);
                let scan =
                    scan_sql(&q.value).map_err(|(_, m)| err(q_line, &field(".lookup.query"), m))?;
                let arg_refs: Vec<&str> = arg_names.iter().map(String::as_str).collect();
                check_placeholders(&scan, &arg_refs, "`lookup.args`", "argument")
                    .map_err(|(_, m)| err(q_line, &field(".lookup.query"), m))?;
                Mapping::Lookup {
                    query: q.value[..scan.end].trim_start().to_owned(),
                    args: arg_names,
                }
            }
        };
        dependencies.push(Dependency {
            table: table_name,
            mapping,
        });
    }

    let policy = build_policy(&raw, &template, &err)?;
    let cache_control = match &raw.cache_control {
        None => None,
        Some(c) => {
            Some(check_cache_control(&c.value).map_err(|m| err(line_of(c), "cache_control", m))?)
        }
    };
    let access = match &raw.access {
        None => None,
        Some(a) => Some(build_access(
            a,
            &names,
            &file,
            &format!("{prefix}access"),
            auth_on,
        )?),
    };

    Ok((
        Primer {
            name,
            template,
            query,
            shape,
            dependencies,
            policy,
            cache_control,
            access,
        },
        origin,
    ))
}

/// The refresh policy fields of a primer (`ttl`, `warm`, `batch`, ...). `cold_after` is the primer's own;
/// [`Loader::load`] falls back to `refresh.cold_after`.
fn build_policy(
    raw: &RawPrimer,
    template: &KeyTemplate,
    err: &dyn Fn(usize, &str, String) -> ConfigError,
) -> Result<crate::schedule::Policy, ConfigError> {
    use crate::schedule::{BatchQuery, OnExpiry, Policy};
    let duration = |field: &str, value: &Option<Spanned<String>>| {
        value
            .as_ref()
            .map(|v| parse_duration(&v.value).map_err(|m| err(line_of(v), field, m)))
            .transpose()
    };
    let on_expiry = match &raw.on_expiry {
        None => OnExpiry::Refresh,
        Some(v) => match v.value.as_str() {
            "refresh" => OnExpiry::Refresh,
            "drop" => OnExpiry::Drop,
            other => {
                return Err(err(
                    line_of(v),
                    "on_expiry",
                    format!(
                        "unknown value '{other}': expected refresh (recompute hot keys, drop cold ones) or drop"
                    ),
                ));
            }
        },
    };
    let ttl = duration("ttl", &raw.ttl)?;
    if let (None, Some(v)) = (ttl, &raw.on_expiry) {
        return Err(err(
            line_of(v),
            "on_expiry",
            "has no effect without `ttl`: set a ttl or remove on_expiry".into(),
        ));
    }
    let concurrency = match &raw.concurrency {
        None => None,
        Some(c) => match usize::try_from(c.value) {
            Ok(n) if (1..=crate::config::MAX_WORKERS).contains(&n) => Some(n),
            _ => {
                return Err(err(
                    line_of(c),
                    "concurrency",
                    format!(
                        "must be between 1 and {}, got {}",
                        crate::config::MAX_WORKERS,
                        c.value
                    ),
                ));
            }
        },
    };
    let warm = match &raw.warm {
        None => None,
        Some(w) => {
            let scan = scan_sql(&w.value).map_err(|(_, m)| err(line_of(w), "warm", m))?;
            if scan.max() > 0 {
                return Err(err(
                    line_of(w),
                    "warm",
                    "the warm query takes no parameters: it lists key parameters, in columns named like the key's                      (such as SELECT id AS user_id FROM users WHERE active)"
                        .into(),
                ));
            }
            Some(w.value[..scan.end].trim_start().to_owned())
        }
    };
    let batch = match &raw.batch {
        None => None,
        Some(b) => {
            let line = line_of(b);
            if template.params.len() != 1 {
                return Err(err(
                    line,
                    "batch",
                    format!(
                        "a batch query needs a key template with exactly one parameter; '{}' has {}",
                        template.source,
                        template.params.len()
                    ),
                ));
            }
            let Some(q) = &b.value.query else {
                return Err(err(
                    line,
                    "batch.query",
                    "required: the query over $1, an array of key parameter values, such as                      SELECT user_id AS kck_key, id, total FROM orders WHERE user_id = ANY($1) ORDER BY user_id, id"
                        .into(),
                ));
            };
            let Some(column) = &b.value.key_column else {
                return Err(err(
                    line,
                    "batch.key_column",
                    "required: the name of the batch query's first column, which holds each row's key parameter".into(),
                ));
            };
            let scan = scan_sql(&q.value).map_err(|(_, m)| err(line_of(q), "batch.query", m))?;
            check_placeholders(
                &scan,
                &["array of key parameter values"],
                "a batch",
                "parameter",
            )
            .map_err(|(_, m)| err(line_of(q), "batch.query", m))?;
            let key_column = parse_identifier(&column.value, "a column name")
                .map_err(|m| err(line_of(column), "batch.key_column", m))?;
            Some(BatchQuery {
                query: q.value[..scan.end].trim_start().to_owned(),
                key_column,
            })
        }
    };
    Ok(Policy {
        refresh_interval: duration("refresh_interval", &raw.refresh_interval)?,
        ttl,
        on_expiry,
        stale_while_revalidate: duration("stale_while_revalidate", &raw.stale_while_revalidate)?,
        warm,
        cold_after: duration("cold_after", &raw.cold_after)?,
        concurrency,
        batch,
    })
}

/// A `Cache-Control` value: printable ASCII, not empty.
fn check_cache_control(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!(
            "'{value}' is not a Cache-Control value: use printable ASCII such as \"max-age=5\", \
             \"no-cache\" or \"private, max-age=30\""
        ));
    }
    Ok(value.to_owned())
}

/// Validate an `access` rule or list of rules; `params` are the names `match` may refer to (key
/// parameters of a primer, parameters of an updater). `field` is the dotted field of `access`.
fn build_access(
    access: &Spanned<RawAccess>,
    params: &[&str],
    file: &Path,
    field: &str,
    auth_on: bool,
) -> Result<Access, ConfigError> {
    let line = line_of(access);
    if !auth_on {
        return Err(invalid(
            file,
            line,
            field,
            "access rules need authentication: configure `auth.jwt` (without it every request is \
             anonymous, and an access rule would either refuse everything or protect nothing)",
        ));
    }
    let rules: Vec<(usize, String, &RawAccessRule)> = match &access.value {
        RawAccess(_, Some(rule)) => vec![(line, field.to_owned(), rule)],
        RawAccess(list, None) => list
            .iter()
            .enumerate()
            .map(|(i, r)| (line_of(r), format!("{field}[{i}]"), &r.value))
            .collect(),
    };
    if rules.is_empty() {
        return Err(invalid(file, line, field, "list at least one rule"));
    }
    let mut out = Vec::with_capacity(rules.len());
    for (rule_line, rule_field, rule) in rules {
        let mut require = Vec::new();
        if let Some(r) = &rule.require {
            for (claim, values) in &r.value.0 {
                if claim.is_empty() || values.is_empty() {
                    return Err(invalid(
                        file,
                        line_of(r),
                        format!("{rule_field}.require"),
                        "each entry names a claim and its required value (or a list of accepted values)",
                    ));
                }
                require.push((claim.clone(), values.clone()));
            }
        }
        let mut matches = Vec::new();
        if let Some(m) = &rule.matches {
            for (claim, param) in &m.value.0 {
                let Some(index) = params.iter().position(|p| *p == param.value) else {
                    return Err(invalid(
                        file,
                        line_of(param),
                        format!("{rule_field}.match.{claim}"),
                        format!(
                            "'{}' is not a parameter here (the parameters: {}); `match` maps a claim to the \
                             parameter it must equal, such as {{ sub: user_id }}",
                            param.value,
                            list_or_none(params)
                        ),
                    ));
                };
                matches.push((claim.clone(), index));
            }
        }
        if require.is_empty() && matches.is_empty() {
            return Err(invalid(
                file,
                rule_line,
                rule_field,
                "a rule needs `require` (claims and their values) or `match` (claims that must equal \
                 parameters), or both",
            ));
        }
        out.push(AccessRule { require, matches });
    }
    Ok(Access { rules: out })
}

/// SQL that controls the transaction itself: an updater's statements run inside kck's transaction.
const TRANSACTION_CONTROL: [&str; 9] = [
    "BEGIN",
    "START",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "SAVEPOINT",
    "RELEASE",
    "PREPARE",
];

/// Validate one updater. `line` is the line of the updater as a whole (its mapping, or 1 for a `.sql`
/// file); `prefix` is its field prefix (`updaters[2].`, empty for a `.sql` file). Returns it and the line
/// of its name.
fn build_updater(
    raw: RawUpdater,
    line: usize,
    file: &Path,
    prefix: &str,
    sql: Option<SqlBody>,
    auth_on: bool,
) -> Result<(Updater, usize), ConfigError> {
    let err = |line: usize, field: &str, message: String| {
        invalid(file, line, format!("{prefix}{field}"), message)
    };
    let (name, name_line) = match (&raw.name, &sql) {
        (Some(n), _) => (n.value.clone(), line_of(n)),
        (None, Some(sql)) => (sql.default_name.clone(), 1),
        (None, None) => {
            return Err(err(
                line,
                "name",
                "required: the updater's name, used as POST /update/<name>".into(),
            ));
        }
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
    {
        let hint = if raw.name.is_none() {
            " (the name comes from the file name; set `name` in the header)"
        } else {
            ""
        };
        return Err(err(
            name_line,
            "name",
            format!(
                "'{name}' is not a valid updater name: use lower-case letters, digits and '_'{hint}"
            ),
        ));
    }

    let mut params: Vec<UpdaterParam> = Vec::new();
    if let Some(list) = &raw.params {
        for (i, p) in list.value.iter().enumerate() {
            let field = format!("params[{i}]");
            let p_line = line_of(p);
            let name_ok = {
                let mut chars = p.value.name.chars();
                matches!(chars.next(), Some('a'..='z' | '_'))
                    && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
            };
            if !name_ok {
                return Err(err(
                    p_line,
                    &field,
                    format!(
                        "'{}' is not a valid parameter name: use lower-case letters, digits and '_', not \
                         starting with a digit",
                        p.value.name
                    ),
                ));
            }
            if params.iter().any(|q| q.name == p.value.name) {
                return Err(err(
                    p_line,
                    &field,
                    format!("parameter '{}' is declared twice", p.value.name),
                ));
            }
            let ty = match &p.value.ty {
                None => ValueType::Text,
                Some(t) => ValueType::parse(t.trim()).ok_or_else(|| {
                    err(
                        p_line,
                        &field,
                        format!(
                            "unknown type '{t}' for parameter '{}': use {}",
                            p.value.name,
                            ValueType::NAMES
                        ),
                    )
                })?,
            };
            params.push(UpdaterParam {
                name: p.value.name.clone(),
                ty,
                nullable: p.value.nullable,
            });
        }
    }
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();

    // Statements: (text, scan, line of the statement, field).
    let mut scanned: Vec<(String, SqlScan, usize, String)> = Vec::new();
    match (&raw.statements, &sql) {
        (Some(list), _) => {
            if list.value.is_empty() {
                return Err(err(
                    line_of(list),
                    "statements",
                    "list at least one SQL statement".into(),
                ));
            }
            for (i, st) in list.value.iter().enumerate() {
                let field = format!("statements[{i}]");
                let scan = scan_sql(&st.value).map_err(|(_, m)| {
                    err(line_of(st), &field, m.replace("the query", "the statement"))
                })?;
                let text = st.value[..scan.end].trim_start().to_owned();
                scanned.push((text, scan, line_of(st), field));
            }
        }
        (None, Some(sql)) => {
            let scans = scan_statements(&sql.query, true).map_err(|(offset, m)| {
                err(
                    line_at(&sql.query, offset, sql.line),
                    "statements",
                    m.replace(
                        "the query is empty",
                        "the file has no SQL statement after its header",
                    ),
                )
            })?;
            for (i, scan) in scans.into_iter().enumerate() {
                let text = sql.query[scan.start..scan.end].to_owned();
                let l = line_at(&sql.query, scan.start, sql.line);
                scanned.push((text, scan, l, format!("statements[{i}]")));
            }
        }
        (None, None) => {
            return Err(err(
                line,
                "statements",
                "required: the SQL statements to run, in one transaction, such as \
                 [\"UPDATE users SET name = $2 WHERE id = $1\"]"
                    .into(),
            ));
        }
    }
    let mut statements = Vec::with_capacity(scanned.len());
    let mut used = vec![false; params.len()];
    for (text, scan, st_line, field) in scanned {
        let first_word: String = text
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect::<String>()
            .to_ascii_uppercase();
        if TRANSACTION_CONTROL.contains(&first_word.as_str()) {
            return Err(err(
                st_line,
                &field,
                format!(
                    "`{first_word}` controls the transaction, which kck runs for you: all statements of an \
                     updater run in one transaction that kck commits, or rolls back on any error"
                ),
            ));
        }
        if scan.max() > params.len() {
            return Err(err(
                st_line,
                &field,
                format!(
                    "the statement uses ${} but the updater has {}: parameters are bound as $1..$n in \
                     the order they are declared",
                    scan.max(),
                    match params.len() {
                        0 => "no parameters".to_owned(),
                        1 => format!("1 parameter ({})", names.join(", ")),
                        n => format!("{n} parameters ({})", names.join(", ")),
                    }
                ),
            ));
        }
        for (i, u) in scan.used.iter().enumerate() {
            used[i] |= u;
        }
        statements.push(Statement {
            sql: text,
            uses: scan.used,
        });
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        let p_line = raw.params.as_ref().map_or(line, line_of);
        return Err(err(
            p_line,
            "params",
            format!(
                "parameter '{}' (${}) is not used by any statement: remove it, or use it",
                names[unused],
                unused + 1
            ),
        ));
    }
    let access = match &raw.access {
        None => None,
        Some(a) => Some(build_access(
            a,
            &names,
            file,
            &format!("{prefix}access"),
            auth_on,
        )?),
    };
    Ok((
        Updater {
            name,
            params,
            statements,
            access,
        },
        name_line,
    ))
}

/// A CORS origin: `*`, or `scheme://host[:port]` (no path), as browsers send it in `Origin`.
fn check_origin(text: &str) -> Result<String, String> {
    let origin = text.trim();
    if origin == "*" {
        return Ok(origin.to_owned());
    }
    let ok = origin.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
    });
    if ok {
        Ok(origin.to_owned())
    } else {
        Err(format!(
            "'{text}' is not an origin: write it as browsers send it, such as https://app.example.com or \
             http://localhost:3000 (no path), or *"
        ))
    }
}

/// `http.body_limit`: a size as [`crate::ops::size::parse_byte_size`] reads it (`1MB`, `512kB`: powers of
/// 1024, as in postgresql.conf), between 1 kB and 1 GB.
fn parse_size(text: &str) -> Result<usize, String> {
    let bytes = crate::ops::size::parse_byte_size(text)?;
    if !(1 << 10..=1 << 30).contains(&bytes) {
        return Err(format!(
            "'{text}' is out of range: give between 1kB and 1GB"
        ));
    }
    usize::try_from(bytes).map_err(|_| format!("'{text}' is too large for this machine"))
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The line of byte `offset` of `text`, whose first line is `first_line`.
fn line_at(text: &str, offset: usize, first_line: usize) -> usize {
    first_line
        + text[..offset.min(text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
}

/// `[A-Za-z_][A-Za-z0-9_$]*`, returned lower-case (as Postgres folds an unquoted identifier).
fn parse_identifier(text: &str, what: &str) -> Result<String, String> {
    let mut chars = text.chars();
    let ok = matches!(chars.next(), Some('a'..='z' | 'A'..='Z' | '_'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if ok {
        Ok(text.to_ascii_lowercase())
    } else if text.starts_with('"') {
        Err(format!(
            "'{text}' is not valid as {what}: quoted identifiers are not supported; write the name unquoted"
        ))
    } else {
        Err(format!(
            "'{text}' is not valid as {what}: use letters, digits, '_' and '$', not starting with a digit"
        ))
    }
}

/// `table` or `schema.table`; the schema defaults to `public`.
fn parse_table(text: &str) -> Result<TableName, String> {
    let parts: Vec<&str> = text.split('.').collect();
    let (schema, name) = match parts.as_slice() {
        [name] => ("public".to_owned(), *name),
        [schema, name] => (parse_identifier(schema, "a schema name")?, *name),
        _ => {
            return Err(format!(
                "'{text}' is not a table name: write `table` or `schema.table`"
            ));
        }
    };
    Ok(TableName {
        schema,
        name: parse_identifier(name, "a table name")?,
    })
}

// ---------------------------------------------------------------------------------------------------------
// SQL scanning: just enough lexing to find `$n` placeholders, a second statement and the end of the query.

/// What [`scan_sql`] found.
#[derive(Debug, Default, PartialEq, Eq)]
struct SqlScan {
    /// `used[n - 1]`: whether `$n` appears.
    used: Vec<bool>,
    /// Byte offset of the first occurrence of the highest placeholder.
    max_offset: usize,
    /// The start of the statement: its first token (leading whitespace and comments excluded).
    start: usize,
    /// The end of the statement: trailing whitespace, comments and `;` excluded.
    end: usize,
}

impl SqlScan {
    fn max(&self) -> usize {
        self.used.len()
    }
}

/// Scan a query: placeholders outside string literals, quoted identifiers, comments and dollar-quoted
/// strings. Errors (with a byte offset) for an empty query, a second statement, and unterminated quotes.
fn scan_sql(sql: &str) -> Result<SqlScan, (usize, String)> {
    let mut statements = scan_statements(sql, false)?;
    statements.pop().ok_or((0, "the query is empty".into()))
}

/// Scan SQL holding one statement (`many == false`: a second one is an error) or several separated by
/// `;` (each scanned like a query; empty statements are skipped). Offsets are into `sql`.
fn scan_statements(sql: &str, many: bool) -> Result<Vec<SqlScan>, (usize, String)> {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let mut statements = Vec::new();
    let mut scan = SqlScan::default();
    let mut in_statement = false;
    let mut i = 0;
    // Offset of the first `;` outside quotes and comments.
    let mut semicolon: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            loop {
                if i + 1 >= b.len() {
                    return Err((start, "unterminated /* comment */".into()));
                }
                if b[i] == b'/' && b[i + 1] == b'*' {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b[i + 1] == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if let Some(s) = semicolon {
            if c != b';' {
                return Err((
                    start,
                    format!(
                        "the query holds more than one statement (a `;` at byte {s} is followed by more SQL); a primer runs one query"
                    ),
                ));
            }
            i += 1;
            continue;
        }
        if c == b';' {
            if many {
                if in_statement {
                    statements.push(std::mem::take(&mut scan));
                    in_statement = false;
                }
            } else {
                semicolon = Some(i);
            }
            i += 1;
            continue;
        }
        if !in_statement {
            in_statement = true;
            scan.start = start;
        }
        match c {
            b'\'' => {
                let escapes =
                    i > 0 && matches!(b[i - 1], b'e' | b'E') && !(i > 1 && ident(b[i - 2]));
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err((start, "unterminated string literal ('...')".into())),
                        Some(b'\\') if escapes => i += 2,
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => {
                            return Err((start, "unterminated quoted identifier (\"...\")".into()));
                        }
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
            }
            b'$' if i > 0 && ident(b[i - 1]) => i += 1,
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                let digits = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let n: usize = sql[digits..i].parse().unwrap_or(usize::MAX);
                if n == 0 {
                    return Err((
                        start,
                        "$0 is not a parameter: parameters are numbered from $1".into(),
                    ));
                }
                if n > 65_535 {
                    return Err((
                        start,
                        format!(
                            "${} is beyond Postgres' limit of 65535 parameters",
                            &sql[digits..i]
                        ),
                    ));
                }
                if n > scan.used.len() {
                    scan.used.resize(n, false);
                    scan.max_offset = start;
                }
                scan.used[n - 1] = true;
            }
            b'$' => {
                // A dollar quote `$tag$...$tag$` (tag empty or an identifier without `$`), else a lone `$`.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if b[e] == b'$' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].find(tag) {
                            Some(p) => i = e + 1 + p + tag.len(),
                            None => {
                                return Err((
                                    start,
                                    format!("unterminated dollar-quoted string {tag}...{tag}"),
                                ));
                            }
                        }
                    }
                    _ => i += 1,
                }
            }
            _ => {
                i += 1;
                if ident(c) {
                    while i < b.len() && ident(b[i]) {
                        i += 1;
                    }
                }
            }
        }
        scan.end = i;
    }
    if in_statement {
        statements.push(scan);
    }
    if statements.is_empty() {
        return Err((0, "the query is empty".into()));
    }
    Ok(statements)
}

/// The rule: the highest `$n` equals the number of values bound (`names`), and each of `$1..$n` appears.
/// The error carries the offset of the offending placeholder when there is one.
fn check_placeholders(
    scan: &SqlScan,
    names: &[&str],
    bound_by: &str,
    kind: &str,
) -> Result<(), (Option<usize>, String)> {
    let n = names.len();
    let plural = |k: usize, word: &str| {
        if k == 1 {
            format!("1 {word}")
        } else {
            format!("{k} {word}s")
        }
    };
    if scan.max() != n {
        let uses = if scan.max() == 0 {
            "no $n placeholder".to_owned()
        } else {
            format!("${}", scan.max())
        };
        let offset = (scan.max() > n).then_some(scan.max_offset);
        let message = if n == 0 {
            format!(
                "the query uses {uses} but {bound_by} has no {kind}s, so the query cannot use $n placeholders"
            )
        } else {
            format!(
                "the query uses {uses} but {bound_by} has {} ({}): they are bound as $1..$n in order, so the \
                 highest placeholder must be ${n}",
                plural(n, kind),
                names.join(", ")
            )
        };
        return Err((offset, message));
    }
    if let Some(missing) = scan.used.iter().position(|u| !u) {
        return Err((
            None,
            format!(
                "the query does not use ${} ({kind} '{}'): each of $1..${n} must appear, as Postgres cannot infer the type of a parameter the query does not use",
                missing + 1,
                names[missing]
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/kck/kck.yaml";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_str(yaml, Path::new(FILE), no_env)
    }

    fn load_env(yaml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_yaml_str(yaml, Path::new(FILE), |name| vars.get(name).cloned())
    }

    /// Assert an `Invalid` error at `path:line` for `field` whose message contains `needle`.
    fn assert_invalid_at(
        result: Result<Config, ConfigError>,
        path: &Path,
        line: usize,
        field: &str,
        needle: &str,
    ) {
        let err = result.expect_err("expected an error");
        let text = err.to_string();
        match &err {
            ConfigError::Invalid {
                path: p,
                line: l,
                field: f,
                message,
            } => {
                assert_eq!((p.as_path(), *l, f.as_str()), (path, line, field), "{text}");
                assert!(message.contains(needle), "message lacks {needle:?}: {text}");
                assert!(
                    text.starts_with(&format!("{}:{line}: {field}: ", path.display())),
                    "{text}"
                );
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn assert_invalid(yaml: &str, line: usize, field: &str, needle: &str) {
        assert_invalid_at(load(yaml), Path::new(FILE), line, field, needle);
    }

    /// A valid config; tests replace parts of it. Lines:
    /// 1 source, 2 url, 3 primers, 4 - name, 5 key, 6 query, 7 depends_on, 8 - table, 9 columns.
    const BASE: &str = "\
source:
  url: postgres://kck:secret@127.0.0.1:5432/app
primers:
  - name: orders_by_user
    key: orders_by_user/{user_id:int}
    query: SELECT id, total FROM orders WHERE user_id = $1
    depends_on:
      - table: orders
        columns: { user_id: user_id }
";

    fn base_with(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from}");
        BASE.replacen(from, to, 1)
    }

    const FULL: &str = r#"
source:
  url: "postgres://kck:secret@127.0.0.1:5432/app"   # required; env KCK_SOURCE_URL overrides
  publication: kck_pub
  create_publication: true
  slot: kck_slot
store:
  kind: embedded
  path: data/cache
http:
  bind: 0.0.0.0:9090
refresh:
  workers: 8
  visibility_timeout: 200ms
prime_on_cache_miss: false
primers:
  - name: orders_by_user
    key: "orders_by_user/{user_id:int}"
    shape: rows
    query: |
      SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id;
    depends_on:
      - table: orders
        columns: { user_id: user_id }
      - table: Line_Items
        lookup:
          query: "SELECT o.user_id FROM orders o WHERE o.id = $1"
          args: [order_id]
      - table: app.users
  - name: user
    key: user/{id:uuid}/{lang}
    shape: row
    query: "SELECT * FROM users WHERE id = $1 AND lang = $2"
    depends_on:
      - table: users
        columns:
          lang: lang
          id: ID
  - name: order_count
    key: order_count
    shape: value
    query: SELECT count(*) FROM orders
    depends_on: [{ table: orders }]
"#;

    #[test]
    fn full_config() {
        let c = load(FULL).unwrap();
        assert_eq!(c.file, Path::new(FILE));
        assert_eq!(c.source.url, "postgres://kck:secret@127.0.0.1:5432/app");
        assert_eq!(c.source.publication, "kck_pub");
        assert!(c.source.create_publication);
        assert_eq!(c.source.slot, "kck_slot");
        let StoreConfig::Embedded { path, .. } = &c.store else {
            panic!("expected the embedded store, got {:?}", c.store)
        };
        assert_eq!(path, Path::new("/etc/kck/data/cache"));
        assert_eq!(c.http.bind, "0.0.0.0:9090".parse::<SocketAddr>().unwrap());
        assert_eq!(c.refresh.workers, 8);
        assert_eq!(c.refresh.visibility_timeout, Duration::from_millis(200));
        assert!(!c.prime_on_cache_miss);

        let primers = &c.catalog.primers;
        assert_eq!(primers.len(), 3);
        let p = &primers[0];
        assert_eq!(p.name, "orders_by_user");
        assert_eq!(p.template.source, "orders_by_user/{user_id:int}");
        assert_eq!(p.shape, Shape::Rows);
        assert_eq!(
            p.query,
            "SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id"
        );
        let public = |name: &str| TableName {
            schema: "public".into(),
            name: name.into(),
        };
        assert_eq!(
            p.dependencies,
            vec![
                Dependency {
                    table: public("orders"),
                    mapping: Mapping::Columns(vec![(0, "user_id".into())])
                },
                Dependency {
                    table: public("line_items"),
                    mapping: Mapping::Lookup {
                        query: "SELECT o.user_id FROM orders o WHERE o.id = $1".into(),
                        args: vec!["order_id".into()],
                    },
                },
                Dependency {
                    table: TableName {
                        schema: "app".into(),
                        name: "users".into()
                    },
                    mapping: Mapping::AllKeys,
                },
            ]
        );
        let p = &primers[1];
        assert_eq!(p.shape, Shape::Row);
        // Columns are ordered by key parameter and lower-cased.
        assert_eq!(
            p.dependencies[0].mapping,
            Mapping::Columns(vec![(0, "id".into()), (1, "lang".into())])
        );
        assert_eq!(primers[2].shape, Shape::Value);
        assert_eq!(primers[2].template.params.len(), 0);
        assert_eq!(c.catalog.primer("user").map(|(i, _)| i), Some(1));
        let key = c.catalog.parse_key("orders_by_user/7").unwrap();
        assert_eq!(c.catalog.render(&key), "orders_by_user/7");
        // The password does not show in Debug output.
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("secret") && debug.contains("kck:***@127.0.0.1"),
            "{debug}"
        );
    }

    #[test]
    fn example_config_is_valid() {
        let c = Config::from_yaml_str(
            include_str!("../config/example.yaml"),
            Path::new("config/example.yaml"),
            no_env,
        )
        .unwrap();
        assert_eq!(c.catalog.primers.len(), 3);
        assert_eq!(
            c.source.redacted_url(),
            "postgres://kck:***@127.0.0.1:5432/app"
        );
    }

    #[test]
    fn defaults() {
        let c = load(BASE).unwrap();
        assert_eq!(c.source.publication, "kck");
        assert_eq!(c.source.slot, "kck");
        assert!(!c.source.create_publication);
        let StoreConfig::Embedded { path, .. } = &c.store else {
            panic!("expected the embedded store, got {:?}", c.store)
        };
        assert_eq!(path, Path::new("/etc/kck/./kck-data"));
        assert_eq!(c.http.bind, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(c.refresh.workers, 4);
        assert_eq!(c.refresh.visibility_timeout, Duration::from_secs(5));
        assert!(c.prime_on_cache_miss);
        assert_eq!(c.catalog.primers[0].shape, Shape::Rows);
        // Sections given but empty take the defaults too.
        let c = load(&format!("{BASE}store:\nhttp:\nrefresh: {{}}\n")).unwrap();
        assert_eq!(c.refresh.workers, 4);
    }

    #[test]
    fn refresh_policy_and_jobs() {
        use crate::schedule::OnExpiry;
        let yaml = format!(
            "{BASE}    refresh_interval: 5m\n    ttl: 30s\n    on_expiry: drop\n    stale_while_revalidate: 10s\n    \
             cold_after: 1h\n    concurrency: 2\n    warm: SELECT DISTINCT user_id FROM orders\n    batch:\n      \
             key_column: kck_key\n      query: SELECT user_id AS kck_key, id FROM orders WHERE user_id = ANY($1)\n\
             refresh:\n  max_queue: 5000\n  cold_after: 2h\n  pool_size: 3\n  claim_batch: 8\n\
             jobs:\n  - name: totals\n    interval: 1m\n    sql: REFRESH MATERIALIZED VIEW CONCURRENTLY totals\n  \
             - name: nightly\n    cron: \"0 3 * * *\"\n    sql: DELETE FROM log WHERE at < now() - interval '7 days'\n"
        );
        let c = load(&yaml).unwrap();
        let p = &c.catalog.primers[0].policy;
        assert_eq!(p.refresh_interval, Some(Duration::from_secs(300)));
        assert_eq!(p.ttl, Some(Duration::from_secs(30)));
        assert_eq!(p.on_expiry, OnExpiry::Drop);
        assert_eq!(p.stale_while_revalidate, Some(Duration::from_secs(10)));
        assert_eq!(p.cold_after, Some(Duration::from_secs(3600)));
        assert_eq!(p.concurrency, Some(2));
        assert_eq!(
            p.warm.as_deref(),
            Some("SELECT DISTINCT user_id FROM orders")
        );
        let batch = p.batch.as_ref().unwrap();
        assert_eq!(batch.key_column, "kck_key");
        assert_eq!(c.refresh.max_queue, 5000);
        assert_eq!(c.refresh.cold_after, Some(Duration::from_secs(7200)));
        assert_eq!((c.refresh.pool_size, c.refresh.claim_batch), (3, 8));
        assert_eq!(c.jobs.len(), 2);
        assert_eq!(
            c.jobs[0].schedule,
            JobSchedule::Interval(Duration::from_secs(60))
        );
        assert_eq!(c.jobs[1].schedule, JobSchedule::Cron("0 3 * * *".into()));
        // Defaults, and the global cold_after for primers without their own.
        let c = load(&format!("{BASE}refresh:\n  cold_after: 2h\n")).unwrap();
        assert_eq!(
            c.catalog.primers[0].policy.cold_after,
            Some(Duration::from_secs(7200))
        );
        let c = load(BASE).unwrap();
        assert_eq!(
            c.catalog.primers[0].policy,
            crate::schedule::Policy::default()
        );
        assert_eq!(
            (
                c.refresh.max_queue,
                c.refresh.pool_size,
                c.refresh.claim_batch
            ),
            (1_000_000, 8, 16)
        );
        assert!(c.jobs.is_empty());
    }

    #[test]
    fn refresh_policy_and_job_errors() {
        let primer = |extra: &str| format!("{BASE}{extra}");
        assert_invalid(
            &primer("    on_expiry: drop\n"),
            10,
            "primers[0].on_expiry",
            "has no effect without `ttl`",
        );
        assert_invalid(
            &primer("    ttl: 1s\n    on_expiry: later\n"),
            11,
            "primers[0].on_expiry",
            "unknown value 'later'",
        );
        assert_invalid(
            &primer("    ttl: soon\n"),
            10,
            "primers[0].ttl",
            "not a duration",
        );
        assert_invalid(
            &primer("    concurrency: 0\n"),
            10,
            "primers[0].concurrency",
            "between 1 and",
        );
        assert_invalid(
            &primer("    warm: SELECT $1\n"),
            10,
            "primers[0].warm",
            "takes no parameters",
        );
        assert_invalid(
            &primer("    batch:\n      query: SELECT 1 AS k\n      key_column: k\n"),
            11,
            "primers[0].batch.query",
            "$1",
        );
        assert_invalid(
            &primer("    batch:\n      key_column: k\n"),
            11,
            "primers[0].batch.query",
            "required",
        );
        assert_invalid(
            &primer("    batch:\n      query: SELECT $1 AS k\n"),
            11,
            "primers[0].batch.key_column",
            "required",
        );
        assert_invalid(
            &format!("{BASE}refresh:\n  max_queue: 0\n"),
            11,
            "refresh.max_queue",
            "between 1 and",
        );
        let job = |body: &str| format!("{BASE}jobs:\n  - name: j\n{body}");
        assert_invalid(
            &job("    sql: SELECT 1\n"),
            11,
            "jobs[0].interval",
            "required",
        );
        assert_invalid(&job("    interval: 1m\n"), 11, "jobs[0].sql", "required");
        assert_invalid(
            &job("    sql: SELECT 1\n    interval: 1m\n    cron: \"* * * * *\"\n"),
            14,
            "jobs[0].cron",
            "not both",
        );
        assert_invalid(
            &job("    sql: SELECT 1\n    cron: daily\n"),
            13,
            "jobs[0].cron",
            "not a cron expression",
        );
        assert_invalid(
            &format!(
                "{BASE}jobs:\n  - name: j\n    sql: x\n    interval: 1s\n  - name: j\n    sql: y\n    interval: 1s\n"
            ),
            14,
            "jobs[1].name",
            "used twice",
        );
    }

    #[test]
    fn relative_paths() {
        let yaml = base_with("primers:", "store:\n  path: /var/lib/kck\nprimers:");
        let c = Config::from_yaml_str(&yaml, Path::new("kck.yaml"), no_env).unwrap();
        let StoreConfig::Embedded { path, .. } = &c.store else {
            panic!("expected the embedded store, got {:?}", c.store)
        };
        assert_eq!(path, Path::new("/var/lib/kck"));
        let yaml = base_with("primers:", "store:\n  path: ../data\nprimers:");
        let c = Config::from_yaml_str(&yaml, Path::new("conf/kck.yaml"), no_env).unwrap();
        let StoreConfig::Embedded { path, .. } = &c.store else {
            panic!("expected the embedded store, got {:?}", c.store)
        };
        assert_eq!(path, Path::new("conf/../data"));
        let c = Config::from_yaml_str(BASE, Path::new("kck.yaml"), no_env).unwrap();
        let StoreConfig::Embedded { path, .. } = &c.store else {
            panic!("expected the embedded store, got {:?}", c.store)
        };
        assert_eq!(path, Path::new("./kck-data"));
    }

    #[test]
    fn source_errors() {
        assert_invalid("primers: []\n", 1, "source.url", "required");
        assert_invalid(
            &BASE.replace(
                "  url: postgres://kck:secret@127.0.0.1:5432/app\n",
                "  slot: x\n",
            ),
            2,
            "source.url",
            "KCK_SOURCE_URL",
        );
        assert_invalid(
            &base_with("url: postgres://kck:secret@127.0.0.1:5432/app", "url: \"\""),
            2,
            "source.url",
            "is empty",
        );
        assert_invalid(
            &base_with(
                "url: postgres://kck:secret@127.0.0.1:5432/app",
                "url: \"postgres://h:99999999/db\"",
            ),
            2,
            "source.url",
            "not a valid Postgres connection",
        );
        assert_invalid(
            &base_with("  url:", "  publication: Kck-1\n  url:"),
            2,
            "source.publication",
            "'Kck-1' is not valid as a publication name",
        );
        assert_invalid(
            &base_with("  url:", "  slot: my-slot\n  url:"),
            2,
            "source.slot",
            "not a valid replication slot name",
        );
        assert_invalid(
            &base_with("  url:", "  create_publication: yes\n  url:"),
            2,
            "source.create_publication",
            "expected true or false",
        );
    }

    #[test]
    fn other_section_errors() {
        let at_end = |extra: &str| format!("{BASE}{extra}");
        assert_invalid(
            &at_end("store:\n  kind: redis\n"),
            11,
            "store.kind",
            "unknown store kind 'redis': the kinds are 'embedded' and 'scylla'",
        );
        assert_invalid(
            &at_end("store:\n  path: ''\n"),
            11,
            "store.path",
            "is empty",
        );
        assert_invalid(
            &at_end("store:\n  memory_cache: lots\n"),
            11,
            "store.memory_cache",
            "lots",
        );
        assert_invalid(
            &at_end("store:\n  kind: scylla\n  nodes: [db:9042]\n  memory_cache: 1MB\n"),
            13,
            "store.memory_cache",
            "is a field of the embedded store",
        );
        let memory = |yaml: &str| match load(yaml).unwrap().store {
            StoreConfig::Embedded { memory_cache, .. } => memory_cache,
            other => panic!("expected the embedded store, got {other:?}"),
        };
        assert_eq!(memory(BASE), 64 << 20);
        assert_eq!(memory(&at_end("store:\n  memory_cache: 16MiB\n")), 16 << 20);
        assert_eq!(memory(&at_end("store:\n  memory_cache: 0\n")), 0);
        assert_invalid(
            &at_end("http:\n  bind: localhost:8080\n"),
            11,
            "http.bind",
            "'localhost:8080' is not an IP address and port",
        );
        assert_invalid(
            &at_end("http:\n  bind: 127.0.0.1\n"),
            11,
            "http.bind",
            "not an IP address and port",
        );
        assert_invalid(
            &at_end("refresh:\n  workers: 0\n"),
            11,
            "refresh.workers",
            "between 1 and 256, got 0",
        );
        assert_invalid(
            &at_end("refresh:\n  workers: 257\n"),
            11,
            "refresh.workers",
            "got 257",
        );
        assert_invalid(
            &at_end("refresh:\n  workers: -3\n"),
            11,
            "refresh.workers",
            "got -3",
        );
        assert_invalid(
            &at_end("refresh:\n  workers: many\n"),
            11,
            "refresh.workers",
            "expected an integer",
        );
        assert_invalid(
            &at_end("refresh:\n  visibility_timeout: 5\n"),
            11,
            "refresh.visibility_timeout",
            "not a duration",
        );
        assert_invalid(
            &at_end("refresh:\n  visibility_timeout: 5 parsecs\n"),
            11,
            "refresh.visibility_timeout",
            "such as 200ms, 5s or 1m",
        );
        assert_invalid(
            &at_end("refresh:\n  visibility_timeout: 0s\n"),
            11,
            "refresh.visibility_timeout",
            "is zero",
        );
        assert_invalid(
            &at_end("prime_on_cache_miss: 1\n"),
            10,
            "prime_on_cache_miss",
            "expected true or false",
        );
        let c = load(&at_end(
            "refresh:\n  visibility_timeout: 1m 30s\n  workers: 256\n",
        ))
        .unwrap();
        assert_eq!(c.refresh.visibility_timeout, Duration::from_secs(90));
        assert_eq!(c.refresh.workers, 256);
    }

    #[test]
    fn scylla_store() {
        let at_end = |extra: &str| format!("{BASE}{extra}");
        let c = load(&at_end(
            "store:\n  kind: scylla\n  nodes: [\"10.0.0.1:9042\", scylla-2, \"[::1]:19042\"]\n  keyspace: kck_prod\n  replication: { class: NetworkTopologyStrategy, dc1: 3, eu-west: 2 }\n  consistency: LOCAL_QUORUM\n  username: kck\n  password: pw\n  tls: { ca_file: certs/ca.pem }\n  init: true\n",
        ))
        .unwrap();
        let StoreConfig::Scylla(s) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(
            s.nodes,
            vec!["10.0.0.1:9042", "scylla-2:9042", "[::1]:19042"]
        );
        assert_eq!(s.keyspace, "kck_prod");
        assert_eq!(
            s.replication,
            KeyspaceReplication::NetworkTopology {
                datacenters: vec![("dc1".into(), 3), ("eu-west".into(), 2)]
            }
        );
        assert_eq!(s.consistency, Consistency::LocalQuorum);
        assert_eq!(s.username.as_deref(), Some("kck"));
        assert_eq!(s.password.as_deref(), Some("pw"));
        assert!(!format!("{s:?}").contains("pw"), "Debug shows the password");
        assert_eq!(
            s.tls_ca_file.as_deref(),
            Some(Path::new("/etc/kck/certs/ca.pem"))
        );
        assert!(s.init);

        // Defaults, and the environment.
        let c = load_env(
            &at_end("store:\n  kind: scylla\n  nodes: [a:1]\n  username: u\n"),
            &[
                ("KCK_STORE_NODES", "n1:9042, n2"),
                ("KCK_STORE_PASSWORD", "secret"),
            ],
        )
        .unwrap();
        let StoreConfig::Scylla(s) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(s.nodes, vec!["n1:9042", "n2:9042"]);
        assert_eq!(s.keyspace, "kck");
        assert_eq!(
            s.replication,
            KeyspaceReplication::Simple {
                replication_factor: 1
            }
        );
        assert_eq!(s.consistency, Consistency::LocalQuorum);
        assert_eq!(s.password.as_deref(), Some("secret"));
        assert_eq!(s.tls_ca_file, None);
        assert!(!s.init);
        let c = load(&at_end(
            "store:\n  kind: scylla\n  nodes: [a]\n  replication: { class: org.apache.cassandra.locator.SimpleStrategy, replication_factor: 3 }\n  consistency: one\n",
        ))
        .unwrap();
        let StoreConfig::Scylla(s) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(
            s.replication,
            KeyspaceReplication::Simple {
                replication_factor: 3
            }
        );
        assert_eq!(s.consistency, Consistency::One);
    }

    #[test]
    fn scylla_store_errors() {
        let at_end = |extra: &str| format!("{BASE}{extra}");
        let scylla = |rest: &str| at_end(&format!("store:\n  kind: scylla\n  nodes: [a]\n{rest}"));
        assert_invalid(
            &at_end("store:\n  kind: scylla\n"),
            11,
            "store.nodes",
            "required for the scylla store",
        );
        assert_invalid(
            &at_end("store:\n  kind: scylla\n  nodes: []\n"),
            12,
            "store.nodes",
            "is empty",
        );
        assert_invalid(
            &at_end("store:\n  kind: scylla\n  nodes: [\"a:b\"]\n"),
            12,
            "store.nodes[0]",
            "'a:b' is not a contact point",
        );
        assert_invalid(
            &scylla("  path: x\n"),
            13,
            "store.path",
            "field of the embedded store",
        );
        assert_invalid(
            &at_end("store:\n  nodes: [a]\n"),
            11,
            "store.nodes",
            "set `kind: scylla`",
        );
        assert_invalid(
            &scylla("  keyspace: Kck\n"),
            13,
            "store.keyspace",
            "not a valid keyspace name",
        );
        assert_invalid(
            &scylla("  consistency: most\n"),
            13,
            "store.consistency",
            "use one of one, two",
        );
        assert_invalid(
            &scylla("  password: p\n"),
            13,
            "store.username",
            "store.password is set",
        );
        assert_invalid(
            &scylla("  username: ''\n"),
            13,
            "store.username",
            "is empty",
        );
        assert_invalid(
            &scylla("  tls: {}\n"),
            13,
            "store.tls.ca_file",
            "required with `tls`",
        );
        assert_invalid(
            &scylla("  tls: { ca: x }\n"),
            13,
            "store.tls.ca",
            "unknown field `ca`",
        );
        assert_invalid(
            &scylla("  replication: { dc1: 3 }\n"),
            13,
            "store.replication.class",
            "required",
        );
        assert_invalid(
            &scylla("  replication: { class: Everywhere }\n"),
            13,
            "store.replication.class",
            "unknown replication class 'Everywhere'",
        );
        assert_invalid(
            &scylla("  replication: { class: SimpleStrategy }\n"),
            13,
            "store.replication.replication_factor",
            "required with SimpleStrategy",
        );
        assert_invalid(
            &scylla("  replication: { class: SimpleStrategy, dc1: 3 }\n"),
            13,
            "store.replication.dc1",
            "SimpleStrategy takes only replication_factor",
        );
        assert_invalid(
            &scylla("  replication: { class: NetworkTopologyStrategy }\n"),
            13,
            "store.replication",
            "a replica count per data centre",
        );
        assert_invalid(
            &scylla("  replication: { class: NetworkTopologyStrategy, dc1: three }\n"),
            13,
            "store.replication.dc1",
            "got 'three'",
        );
        assert_invalid(
            &scylla("  replication: { class: NetworkTopologyStrategy, dc1: 0 }\n"),
            13,
            "store.replication.dc1",
            "between 1 and 100, got 0",
        );
        let err = load_env(&scylla(""), &[("KCK_STORE_NODES", " , ")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KCK_STORE_NODES") && err.contains("is empty"),
            "{err}"
        );
        let err = load_env(&scylla(""), &[("KCK_STORE_PASSWORD", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KCK_STORE_PASSWORD is set but store.username is not"),
            "{err}"
        );
    }

    #[test]
    fn roles_and_standby() {
        let at_end = |extra: &str| format!("{BASE}{extra}");
        let c = load(BASE).unwrap();
        assert_eq!(c.roles, Roles::ALL);
        assert!(!c.source.standby);
        let c = load(&at_end("roles: [http, refresh]\n")).unwrap();
        assert_eq!(
            c.roles,
            Roles {
                replication: false,
                refresh: true,
                http: true
            }
        );
        assert_eq!(c.roles.to_string(), "refresh,http");
        let c = load(&base_with("  url:", "  standby: true\n  url:")).unwrap();
        assert!(c.source.standby);
        assert_invalid(
            &at_end("roles: [http, cache]\n"),
            10,
            "roles[1]",
            "unknown role 'cache'",
        );
        assert_invalid(&at_end("roles: []\n"), 10, "roles", "no role given");
        assert_invalid(&at_end("roles: [http, http]\n"), 10, "roles", "given twice");
        assert_eq!(
            Roles::parse_list("replication,refresh,http"),
            Ok(Roles::ALL)
        );
        assert_eq!(
            Roles::parse_list(" replication "),
            Ok(Roles {
                replication: true,
                refresh: false,
                http: false
            })
        );
        assert!(Roles::parse_list("").unwrap_err().contains("no role given"));
        assert!(
            Roles::parse_list("http,web")
                .unwrap_err()
                .contains("unknown role 'web'")
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types() {
        assert_invalid(
            &base_with("  url:", "  create_publcation: true\n  url:"),
            2,
            "source.create_publcation",
            "unknown field `create_publcation`; did you mean `create_publication`?",
        );
        assert_invalid(
            &format!("{BASE}primer_dir: x\n"),
            10,
            "primer_dir",
            "did you mean `primers_dir`?",
        );
        assert_invalid(
            &format!("{BASE}zzz: 1\n"),
            10,
            "zzz",
            "unknown field `zzz` (known fields: source, store",
        );
        assert_invalid(
            &base_with("    query:", "    shap: row\n    query:"),
            6,
            "primers[0].shap",
            "did you mean `shape`?",
        );
        assert_invalid(
            &base_with("        columns:", "        column:"),
            9,
            "primers[0].depends_on[0].column",
            "did you mean `columns`?",
        );
        assert_invalid(
            &base_with("- name: orders_by_user", "- name: [a]"),
            4,
            "primers[0].name",
            "expected a string",
        );
        assert_invalid(
            &format!("{BASE}refresh: 3\n"),
            10,
            "refresh",
            "expected a mapping",
        );
        assert_invalid(
            &base_with("    depends_on:", "    depends_on: orders\n    x:"),
            7,
            "primers[0].depends_on",
            "expected a list",
        );
        assert_invalid(
            &format!("{BASE}source: {{}}\n"),
            10,
            "source",
            "`source` is given twice",
        );
        assert_invalid(
            &base_with("{ user_id: user_id }", "{ user_id: user_id, user_id: x }"),
            9,
            "primers[0].depends_on[0].columns",
            "`user_id` is given twice",
        );
        // YAML syntax errors carry their line too.
        assert_invalid(
            "source:\n  url: x\n - y\n",
            3,
            "(document)",
            "did not find expected key",
        );
        assert_invalid("source: {url: x\n", 1, "source", "unclosed bracket");
        assert_invalid("source:\n\turl: x\n", 2, "(document)", "tabs");
        assert_invalid("- a\n", 1, "(document)", "expected a mapping");
    }

    #[test]
    fn primer_errors() {
        assert_invalid(
            "source:\n  url: postgres://h/db\n",
            1,
            "primers",
            "at least one primer",
        );
        assert_invalid(
            "source:\n  url: postgres://h/db\nprimers: []\n",
            3,
            "primers",
            "at least one primer",
        );
        assert_invalid(
            &base_with("- name: orders_by_user", "- name: Orders"),
            4,
            "primers[0].name",
            "'Orders' is not a valid primer name",
        );
        assert_invalid(
            &base_with("- name: orders_by_user\n    key:", "- key:"),
            4,
            "primers[0].name",
            "required",
        );
        assert_invalid(
            &base_with("    key: orders_by_user/{user_id:int}\n", ""),
            4,
            "primers[0].key",
            "required",
        );
        assert_invalid(
            &base_with("{user_id:int}", "{user_id:integer}"),
            5,
            "primers[0].key",
            "invalid key template 'orders_by_user/{user_id:integer}': parameter 'user_id' has unknown type 'integer'",
        );
        assert_invalid(
            &base_with(
                "key: orders_by_user/{user_id:int}",
                "key: \"{user_id:int}\"",
            ),
            5,
            "primers[0].key",
            "first segment must be a literal",
        );
        assert_invalid(
            &base_with("    query:", "    shape: table\n    query:"),
            6,
            "primers[0].shape",
            "unknown shape 'table'",
        );
        assert_invalid(
            &base_with(
                "    query: SELECT id, total FROM orders WHERE user_id = $1\n",
                "",
            ),
            4,
            "primers[0].query",
            "required",
        );
        assert_invalid(
            &base_with(
                "SELECT id, total FROM orders WHERE user_id = $1",
                "\" ;  -- nothing\"",
            ),
            6,
            "primers[0].query",
            "the query is empty",
        );
        assert_invalid(
            &base_with("user_id = $1", "user_id = $1 AND x = $3"),
            6,
            "primers[0].query",
            "the query uses $3 but the key template has 1 key parameter (user_id)",
        );
        assert_invalid(
            &base_with("user_id = $1", "user_id = 1"),
            6,
            "primers[0].query",
            "the query uses no $n placeholder but the key template has 1 key parameter",
        );
        assert_invalid(
            &base_with(
                "key: orders_by_user/{user_id:int}",
                "key: orders_by_user/{user_id:int}/{a}/{b}",
            )
            .replace("user_id = $1", "user_id = $1 AND b = $3"),
            6,
            "primers[0].query",
            "the query does not use $2 (key parameter 'a')",
        );
        // A literal block's placeholder errors point at the placeholder's line; other scalars' at their first.
        let block = |style: &str| {
            base_with(
                "query: SELECT id, total FROM orders WHERE user_id = $1",
                &format!("query: {style}\n      SELECT id\n      FROM orders WHERE user_id = $2"),
            )
        };
        assert_invalid(&block("|"), 8, "primers[0].query", "uses $2");
        assert_invalid(&block("|-  # comment"), 8, "primers[0].query", "uses $2");
        assert_invalid(&block(">"), 7, "primers[0].query", "uses $2");
        assert_invalid(
            &base_with("user_id = $1", "user_id = $1 AND x = $2"),
            6,
            "primers[0].query",
            "the query uses $2 but the key template has 1 key parameter (user_id): they are bound as $1..$n in order, so the highest placeholder must be $1",
        );
        assert_invalid(
            &base_with("key: orders_by_user/{user_id:int}", "key: orders_by_user"),
            6,
            "primers[0].query",
            "the query uses $1 but the key template has no key parameters, so the query cannot use $n placeholders",
        );
        assert_invalid(
            &base_with("user_id = $1", "user_id = $1; DELETE FROM orders"),
            6,
            "primers[0].query",
            "more than one statement",
        );
        assert_invalid(
            &base_with("user_id = $1", "user_id = '$1"),
            6,
            "primers[0].query",
            "unterminated string literal",
        );
    }

    #[test]
    fn duplicate_and_ambiguous_primers() {
        let second = "  - name: orders_by_user\n    key: other/{x}\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
        assert_invalid(
            &format!("{BASE}{second}"),
            10,
            "primers[1].name",
            "the primer name 'orders_by_user' is already used at /etc/kck/kck.yaml:4",
        );
        let second = "  - name: other\n    key: orders_by_user/{name}\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
        assert_invalid(
            &format!("{BASE}{second}"),
            11,
            "primers[1].key",
            "the key template 'orders_by_user/{name}' can match the same key text as 'orders_by_user/{user_id:int}' of primer 'orders_by_user' (/etc/kck/kck.yaml:5)",
        );
        let second = "  - name: other\n    key: orders_by_user/{name}/x\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
        load(&format!("{BASE}{second}")).unwrap();
    }

    #[test]
    fn dependency_errors() {
        assert_invalid(
            &base_with(
                "    depends_on:\n      - table: orders\n        columns: { user_id: user_id }\n",
                "",
            ),
            4,
            "primers[0].depends_on",
            "required",
        );
        assert_invalid(
            &base_with(
                "    depends_on:\n      - table: orders\n        columns: { user_id: user_id }\n",
                "    depends_on: []\n",
            ),
            7,
            "primers[0].depends_on",
            "at least one table",
        );
        assert_invalid(
            &base_with("      - table: orders\n", "      - "),
            8,
            "primers[0].depends_on[0].table",
            "required",
        );
        assert_invalid(
            &base_with("table: orders", "table: a.b.c"),
            8,
            "primers[0].depends_on[0].table",
            "'a.b.c' is not a table name",
        );
        assert_invalid(
            &base_with("table: orders", "table: '\"Orders\"'"),
            8,
            "primers[0].depends_on[0].table",
            "quoted identifiers are not supported",
        );
        assert_invalid(
            &base_with("table: orders", "table: 1orders"),
            8,
            "primers[0].depends_on[0].table",
            "not valid as a table name",
        );
        assert_invalid(
            &base_with("{ user_id: user_id }", "{ user_id: user_id, uid: x }"),
            9,
            "primers[0].depends_on[0].columns.uid",
            "'uid' is not a parameter of the key template 'orders_by_user/{user_id:int}' (its parameters: user_id)",
        );
        assert_invalid(
            &base_with("{ user_id: user_id }", "{ user_id: user id }"),
            9,
            "primers[0].depends_on[0].columns.user_id",
            "'user id' is not valid as a column name",
        );
        assert_invalid(
            &base_with(" { user_id: user_id }", ""),
            9,
            "primers[0].depends_on[0].columns",
            "",
        );
        assert_invalid(
            &base_with("columns: { user_id: user_id }", "lookup:"),
            9,
            "primers[0].depends_on[0].lookup",
            "",
        );
        assert_invalid(
            &base_with("{ user_id: user_id }", "{}"),
            9,
            "primers[0].depends_on[0].columns",
            "key parameter 'user_id' is not mapped",
        );
        assert_invalid(
            &base_with(
                "        columns: { user_id: user_id }\n",
                "        columns: { user_id: user_id }\n        lookup: { query: SELECT 1, args: [] }\n",
            ),
            10,
            "primers[0].depends_on[0]",
            "either `columns` or `lookup`, not both",
        );
        let lookup = |body: &str| {
            base_with(
                "        columns: { user_id: user_id }\n",
                &format!("        lookup:\n{body}"),
            )
        };
        assert_invalid(
            &lookup("          args: [id]\n"),
            10,
            "primers[0].depends_on[0].lookup.query",
            "required",
        );
        assert_invalid(
            &lookup("          query: SELECT user_id FROM orders WHERE id = $1\n"),
            10,
            "primers[0].depends_on[0].lookup.args",
            "required",
        );
        assert_invalid(
            &lookup(
                "          query: SELECT user_id FROM orders WHERE id = $1\n          args: []\n",
            ),
            11,
            "primers[0].depends_on[0].lookup.args",
            "at least one column",
        );
        assert_invalid(
            &lookup(
                "          query: SELECT user_id FROM orders WHERE id = $2\n          args: [id, x]\n",
            ),
            10,
            "primers[0].depends_on[0].lookup.query",
            "the query does not use $1 (argument 'id')",
        );
        assert_invalid(
            &lookup(
                "          query: SELECT user_id FROM orders WHERE id = $1\n          args: [id, x]\n",
            ),
            10,
            "primers[0].depends_on[0].lookup.query",
            "the query uses $1 but `lookup.args` has 2 arguments (id, x)",
        );
        assert_invalid(
            &lookup("          query: SELECT 1\n          args: [\"a b\"]\n"),
            11,
            "primers[0].depends_on[0].lookup.args[0]",
            "'a b' is not valid as a column name",
        );
        let c = load(&lookup("          query: SELECT user_id FROM orders WHERE id = $1 AND v = $2;\n          args: [ID, version]\n")).unwrap();
        assert_eq!(
            c.catalog.primers[0].dependencies[0].mapping,
            Mapping::Lookup {
                query: "SELECT user_id FROM orders WHERE id = $1 AND v = $2".into(),
                args: vec!["id".into(), "version".into()],
            }
        );
    }

    #[test]
    fn env_overrides() {
        let vars = [
            ("KCK_SOURCE_URL", "host=db user=kck password=pw dbname=app"),
            ("KCK_SOURCE_PUBLICATION", "pub2"),
            ("KCK_SOURCE_SLOT", "slot2"),
            ("KCK_STORE_PATH", "rel/data"),
            ("KCK_HTTP_BIND", "[::1]:81"),
        ];
        let c = load_env(BASE, &vars).unwrap();
        assert_eq!(c.source.url, "host=db user=kck password=pw dbname=app");
        assert_eq!(
            c.source.redacted_url(),
            "host=db user=kck password=*** dbname=app"
        );
        assert_eq!(c.source.publication, "pub2");
        assert_eq!(c.source.slot, "slot2");
        // Relative to the working directory, not to the file.
        let StoreConfig::Embedded { path, .. } = &c.store else {
            panic!("expected the embedded store, got {:?}", c.store)
        };
        assert_eq!(path, Path::new("rel/data"));
        assert_eq!(c.http.bind, "[::1]:81".parse::<SocketAddr>().unwrap());
        // The URL may come from the environment alone; an override wins over a bad file value.
        let no_url = BASE.replace(
            "  url: postgres://kck:secret@127.0.0.1:5432/app\n",
            "  url: 'not a url'\n",
        );
        let c = load_env(&no_url, &[("KCK_SOURCE_URL", "postgres://h/db")]).unwrap();
        assert_eq!(c.source.url, "postgres://h/db");

        for (var, value, needle) in [
            ("KCK_SOURCE_URL", "", "is empty"),
            (
                "KCK_SOURCE_URL",
                "postgres://h:x/db",
                "not a valid Postgres connection",
            ),
            (
                "KCK_SOURCE_PUBLICATION",
                "a,b",
                "not valid as a publication name",
            ),
            (
                "KCK_SOURCE_SLOT",
                "Slot",
                "not a valid replication slot name",
            ),
            ("KCK_STORE_PATH", "", "is empty"),
            (
                "KCK_HTTP_BIND",
                "8080",
                "'8080' is not an IP address and port",
            ),
        ] {
            let err = load_env(BASE, &[(var, value)]).unwrap_err();
            let text = err.to_string();
            match &err {
                ConfigError::Env {
                    var: v,
                    field,
                    message,
                    ..
                } => {
                    assert_eq!(v, var);
                    let expected_field = ENV_OVERRIDES.iter().find(|(n, _)| *n == var).unwrap().1;
                    assert_eq!(field, expected_field);
                    assert!(message.contains(needle), "{text}");
                    assert!(
                        text.starts_with(&format!(
                            "environment variable {var} (overrides {expected_field} of {FILE}): "
                        )),
                        "{text}"
                    );
                }
                other => panic!("{var}: expected Env, got {other:?}"),
            }
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const SQL_PRIMER: &str = "\
-- kck:primer
-- key: orders_by_user/{user_id:int}
-- shape: rows
-- depends_on:
--   - table: orders
--     columns: { user_id: user_id }
SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id;
";

    #[test]
    fn sql_primers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("primers")).unwrap();
        write(
            &dir.path().join("primers"),
            "orders_by_user.sql",
            SQL_PRIMER,
        );
        write(
            &dir.path().join("primers"),
            "b.sql",
            "-- kck:primer\n--name: order_total\n--key: order_total/{id}\n--depends_on: [{table: orders}]\n\n\
             -- a SQL comment, not header\nSELECT total\n  FROM orders WHERE id = $1 -- the id\n;\n\n",
        );
        write(&dir.path().join("primers"), "notes.txt", "not a primer");
        let config = write(
            dir.path(),
            "kck.yaml",
            "source:\n  url: postgres://h/db\nprimers_dir: primers\n",
        );
        let c = Config::load_with_env(&config, no_env).unwrap();
        let primers = &c.catalog.primers;
        assert_eq!(primers.len(), 2);
        // Sorted by file name: b.sql first.
        assert_eq!(primers[0].name, "order_total");
        assert_eq!(
            primers[0].query,
            "-- a SQL comment, not header\nSELECT total\n  FROM orders WHERE id = $1"
        );
        assert_eq!(primers[1].name, "orders_by_user");
        assert_eq!(
            primers[1].query,
            "SELECT id, total FROM orders WHERE user_id = $1 ORDER BY id"
        );
        assert_eq!(
            primers[1].dependencies[0].mapping,
            Mapping::Columns(vec![(0, "user_id".into())])
        );

        // YAML primers and .sql primers together; names must be unique across both.
        let yaml = "source:\n  url: postgres://h/db\nprimers_dir: primers\nprimers:\n  - name: orders_by_user\n    key: x/{a}\n    query: SELECT $1\n    depends_on: [{ table: t }]\n";
        std::fs::write(&config, yaml).unwrap();
        assert_invalid_at(
            Config::load_with_env(&config, no_env),
            &dir.path().join("primers/orders_by_user.sql"),
            1,
            "name",
            &format!(
                "the primer name 'orders_by_user' is already used at {}:5",
                config.display()
            ),
        );
    }

    #[test]
    fn sql_primer_errors() {
        let dir = tempfile::tempdir().unwrap();
        let config = write(
            dir.path(),
            "kck.yaml",
            "source:\n  url: postgres://h/db\nprimers_dir: p\n",
        );
        let primers = dir.path().join("p");
        let load = || Config::load_with_env(&config, no_env);
        assert_invalid_at(
            load(),
            &config,
            3,
            "primers_dir",
            "cannot read the directory",
        );
        std::fs::create_dir(&primers).unwrap();
        assert_invalid_at(load(), &config, 1, "primers", "at least one primer");

        let file = write(&primers, "a.sql", "-- key: a/{x}\nSELECT $1\n");
        assert_invalid_at(
            load(),
            &file,
            1,
            "header",
            "must start with the line `-- kck:primer` (found `-- key: a/{x}`)",
        );
        std::fs::write(&file, "").unwrap();
        assert_invalid_at(load(), &file, 1, "header", "(found ``)");

        let bad_header = "-- kck:primer\n-- key: a/{x}\n-- depends_on:\n--   - table: t\n--     colums: { x: y }\nSELECT $1\n";
        std::fs::write(&file, bad_header).unwrap();
        assert_invalid_at(
            load(),
            &file,
            5,
            "depends_on[0].colums",
            "did you mean `columns`?",
        );
        std::fs::write(&file, "-- kck:primer\n-- key: [a\nSELECT 1\n").unwrap();
        let err = load().unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { path, .. } if path == &file),
            "{err}"
        );

        let header = "-- kck:primer\n-- key: a/{x}\n-- depends_on:\n--   - table: t\n--     columns: { x: y }\n";
        std::fs::write(&file, format!("{header}\nSELECT *\nFROM t\nWHERE x = $2\n")).unwrap();
        assert_invalid_at(
            load(),
            &file,
            9,
            "query",
            "the query uses $2 but the key template has 1 key parameter (x)",
        );
        std::fs::write(&file, format!("{header}\n\nSELECT 1\n")).unwrap();
        assert_invalid_at(
            load(),
            &file,
            8,
            "query",
            "the query uses no $n placeholder",
        );
        std::fs::write(&file, format!("{header}\n")).unwrap();
        assert_invalid_at(load(), &file, 6, "query", "the query is empty");
        std::fs::write(&file, format!("{header}-- query: SELECT 1\nSELECT $1\n")).unwrap();
        assert_invalid_at(load(), &file, 6, "query", "remove `query` from the header");
        std::fs::write(
            &file,
            format!("{header}--     lookup: {{ query: 'SELECT $1', args: [a] }}\nSELECT $1\n"),
        )
        .unwrap();
        assert_invalid_at(load(), &file, 6, "depends_on[0]", "not both");
        std::fs::write(&file, header.replace("key: a/{x}", "key: a/{x:int}/{x}")).unwrap();
        assert_invalid_at(load(), &file, 2, "key", "'x' appears more than once");
        // The name comes from the file stem, which must then be a valid name.
        let dashed = primers.join("my-primer.sql");
        std::fs::rename(&file, &dashed).unwrap();
        std::fs::write(&dashed, format!("{header}SELECT $1")).unwrap();
        assert_invalid_at(
            load(),
            &dashed,
            1,
            "name",
            "'my-primer' is not a valid primer name",
        );
        std::fs::write(
            &dashed,
            format!(
                "-- kck:primer\n-- name: mine\n{}SELECT $1",
                &header["-- kck:primer\n".len()..]
            ),
        )
        .unwrap();
        assert_eq!(load().unwrap().catalog.primers[0].name, "mine");
    }

    #[test]
    fn sql_scanner() {
        let used = |sql: &str| scan_sql(sql).map(|s| s.used).map_err(|(_, m)| m);
        assert_eq!(used("SELECT $1, $2"), Ok(vec![true, true]));
        assert_eq!(used("SELECT $2"), Ok(vec![false, true]));
        assert_eq!(used("SELECT 1"), Ok(vec![]));
        assert_eq!(used("SELECT '$1', 'it''s $2', $1"), Ok(vec![true]));
        assert_eq!(used("SELECT E'\\'$2', $1"), Ok(vec![true]));
        assert_eq!(used("SELECT '\\', $1"), Ok(vec![true]));
        assert_eq!(
            used("SELECT \"$2\", \"a\"\"$3\" FROM t WHERE x = $1"),
            Ok(vec![true])
        );
        assert_eq!(
            used("SELECT 1 -- $2\n, $1 /* $3 /* nested $4 */ $5 */"),
            Ok(vec![true])
        );
        assert_eq!(
            used("SELECT $$ $2 $$, $tag$ $3 $$ $tag$, $1"),
            Ok(vec![true])
        );
        assert_eq!(used("SELECT a$1 FROM t$2 WHERE x = $1"), Ok(vec![true]));
        assert_eq!(
            used("SELECT $10"),
            Ok(vec![false; 9].into_iter().chain([true]).collect())
        );
        assert_eq!(used("SELECT 'é', $1, ünï$2"), Ok(vec![true]));
        assert!(used("SELECT $0").unwrap_err().contains("$0"));
        assert!(used("SELECT $70000").unwrap_err().contains("65535"));
        assert!(
            used("SELECT 'x")
                .unwrap_err()
                .contains("unterminated string")
        );
        assert!(
            used("SELECT \"x")
                .unwrap_err()
                .contains("unterminated quoted identifier")
        );
        assert!(used("SELECT /* x").unwrap_err().contains("unterminated /*"));
        assert!(
            used("SELECT $a$ x")
                .unwrap_err()
                .contains("unterminated dollar-quoted string $a$")
        );
        assert!(
            used("SELECT 1; SELECT 2")
                .unwrap_err()
                .contains("more than one statement")
        );
        assert!(used("").unwrap_err().contains("empty"));
        assert!(used("  -- only a comment\n").unwrap_err().contains("empty"));
        fn end(sql: &str) -> &str {
            &sql[..scan_sql(sql).unwrap().end]
        }
        assert_eq!(end("SELECT 1;"), "SELECT 1");
        assert_eq!(end("SELECT 1 ; ;\n  -- done\n /* really */ \n"), "SELECT 1");
        assert_eq!(end("SELECT 1 -- trailing"), "SELECT 1");
        assert_eq!(end("SELECT ';' "), "SELECT ';'");
        assert_eq!(end("SELECT $$;$$;"), "SELECT $$;$$");
    }

    #[test]
    fn url_redaction() {
        assert_eq!(
            redact_url("postgres://kck:secret@host:5432/app"),
            "postgres://kck:***@host:5432/app"
        );
        assert_eq!(
            redact_url("postgres://kck:s@cr:et@host/app?x=1"),
            "postgres://kck:***@host/app?x=1"
        );
        assert_eq!(
            redact_url("postgres://kck@host/app"),
            "postgres://kck@host/app"
        );
        assert_eq!(redact_url("postgres://host/app"), "postgres://host/app");
        assert_eq!(
            redact_url("host=h password='a b\\'c' user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(redact_url("password = pw"), "password=***");
        assert_eq!(redact_url("user=mypassword"), "user=mypassword");
    }

    #[test]
    fn closest_field() {
        assert_eq!(closest("kind", &["kind", "path"]), Some("kind"));
        assert_eq!(closest("pth", &["kind", "path"]), Some("path"));
        assert_eq!(closest("zzzzzz", &["kind", "path"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    // ---------------------------------------------------------------------------------------------
    // HTTP, write, auth, updaters

    #[test]
    fn http_write_and_auth_defaults() {
        let c = load(BASE).unwrap();
        assert_eq!(c.http.request_timeout, Duration::from_secs(30));
        assert_eq!(c.http.body_limit, 1 << 20);
        assert_eq!(c.http.max_batch_keys, 1000);
        assert_eq!(c.http.wait_timeout, Duration::from_secs(5));
        assert_eq!(c.http.max_wait, Duration::from_secs(60));
        assert_eq!(c.write.url, c.source.url);
        assert_eq!(c.write.connections, 4);
        assert!(c.auth.jwt.is_none());
        assert_eq!(
            c.auth.public_paths,
            ["/healthz", "/readyz", "/openapi.json"]
        );
        assert!(c.updaters.is_empty());
        assert_eq!(c.catalog.primers[0].cache_control, None);
        assert_eq!(c.catalog.primers[0].access, None);
        // The write URL's password stays out of Debug.
        let c = load(&format!("{BASE}write:\n  url: postgres://w:hush@db/app\n")).unwrap();
        assert!(!format!("{:?}", c.write).contains("hush"));
    }

    #[test]
    fn http_and_write_fields() {
        let c = load(&format!(
            "{BASE}http:\n  request_timeout: 10s\n  body_limit: 64KiB\n  max_batch_keys: 50\n  \
             wait_timeout: 2s\n  max_wait: 20s\nwrite:\n  url: postgres://writer@db/app\n  connections: 2\n"
        ))
        .unwrap();
        assert_eq!(c.http.request_timeout, Duration::from_secs(10));
        assert_eq!(c.http.body_limit, 64 * 1024);
        assert_eq!(c.http.max_batch_keys, 50);
        assert_eq!(c.http.wait_timeout, Duration::from_secs(2));
        assert_eq!(c.http.max_wait, Duration::from_secs(20));
        assert!(c.http.cors_origins.is_empty());
        assert_eq!(c.write.url, "postgres://writer@db/app");
        assert_eq!(c.write.connections, 2);
        let c = load(&format!(
            "{BASE}http:\n  cors_origins: [\"https://app.example.com\", \"http://localhost:3000\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.http.cors_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        assert_invalid(
            &format!("{BASE}http:\n  cors_origins: [\"https://app.example.com/path\"]\n"),
            11,
            "http.cors_origins[0]",
            "not an origin",
        );
        assert_invalid(
            &format!("{BASE}http:\n  cors_origins: [\"*\", \"https://a.example\"]\n"),
            11,
            "http.cors_origins",
            "give it alone",
        );
        for (size, bytes) in [("1048576", 1 << 20), ("2MB", 2 << 20), ("1 MiB", 1 << 20)] {
            let c = load(&format!("{BASE}http:\n  body_limit: {size}\n")).unwrap();
            assert_eq!(c.http.body_limit, bytes, "{size}");
        }
        assert_invalid(
            &format!("{BASE}http:\n  body_limit: 12 parsecs\n"),
            11,
            "http.body_limit",
            "not a size",
        );
        assert_invalid(
            &format!("{BASE}http:\n  body_limit: 10\n"),
            11,
            "http.body_limit",
            "between 1kB and 1GB",
        );
        assert_invalid(
            &format!("{BASE}http:\n  wait_timeout: 2m\n"),
            11,
            "http.wait_timeout",
            "longer than http.max_wait",
        );
        assert_invalid(
            &format!("{BASE}http:\n  max_batch_keys: 0\n"),
            11,
            "http.max_batch_keys",
            "between 1 and 100000",
        );
        assert_invalid(
            &format!("{BASE}write:\n  connections: 0\n"),
            11,
            "write.connections",
            "between 1 and 256",
        );
        let c = load_env(BASE, &[("KCK_WRITE_URL", "postgres://env@db/app")]).unwrap();
        assert_eq!(c.write.url, "postgres://env@db/app");
    }

    #[test]
    fn primer_cache_control() {
        let yaml = base_with(
            "    depends_on:",
            "    cache_control: \"public, max-age=5\"\n    depends_on:",
        );
        let c = load(&yaml).unwrap();
        assert_eq!(
            c.catalog.primers[0].cache_control.as_deref(),
            Some("public, max-age=5")
        );
        let yaml = base_with(
            "    depends_on:",
            "    cache_control: \"a\\nb\"\n    depends_on:",
        );
        assert_invalid(
            &yaml,
            7,
            "primers[0].cache_control",
            "not a Cache-Control value",
        );
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn with_auth(auth: &str) -> String {
        format!("{BASE}auth:\n  jwt:\n    secret_env: KCK_JWT_SECRET\n{auth}")
    }

    #[test]
    fn jwt_settings() {
        let yaml = with_auth(
            "    algorithms: [HS256, HS512]\n    issuer: https://id.example/\n    audience: [kck, api]\n    leeway: 10s\n",
        );
        let c = load_env(&yaml, &[("KCK_JWT_SECRET", SECRET)]).unwrap();
        let jwt = c.auth.jwt.as_ref().unwrap();
        assert_eq!(
            jwt.algorithms,
            [
                jsonwebtoken::Algorithm::HS256,
                jsonwebtoken::Algorithm::HS512
            ]
        );
        assert_eq!(jwt.issuer, Some(vec!["https://id.example/".to_owned()]));
        assert_eq!(jwt.audience, Some(vec!["kck".to_owned(), "api".to_owned()]));
        assert_eq!(jwt.leeway, Duration::from_secs(10));
        assert!(
            !format!("{c:?}").contains(SECRET),
            "the secret stays out of Debug"
        );
        let c = load_env(
            &with_auth("    algorithms: [HS256]\n"),
            &[("KCK_JWT_SECRET", SECRET)],
        )
        .unwrap();
        assert_eq!(
            c.auth.jwt.as_ref().map(|j| j.leeway),
            Some(Duration::from_secs(30))
        );

        let env = [("KCK_JWT_SECRET", SECRET)];
        let invalid = |yaml: &str, env: &[(&str, &str)], line: usize, field: &str, needle: &str| {
            assert_invalid_at(load_env(yaml, env), Path::new(FILE), line, field, needle)
        };
        invalid(&with_auth(""), &env, 12, "auth.jwt.algorithms", "required");
        invalid(
            &with_auth("    algorithms: [none]\n"),
            &env,
            13,
            "auth.jwt.algorithms[0]",
            "never accepted",
        );
        invalid(
            &with_auth("    algorithms: [HS256]\n"),
            &[],
            12,
            "auth.jwt.secret_env",
            "KCK_JWT_SECRET is not set",
        );
        invalid(
            &with_auth("    algorithms: [HS256]\n"),
            &[("KCK_JWT_SECRET", "short")],
            12,
            "auth.jwt.secret_env",
            "at least 32",
        );
        invalid(
            &with_auth("    algorithms: [RS256]\n"),
            &env,
            12,
            "auth.jwt",
            "none of the algorithms",
        );
        invalid(
            &with_auth("    algorithms: [HS256]\n    jwks_file: keys.json\n"),
            &env,
            12,
            "auth.jwt",
            "only one of",
        );
        invalid(
            &format!("{BASE}auth:\n  jwt:\n    algorithms: [RS256]\n"),
            &env,
            12,
            "auth.jwt",
            "give the verification key",
        );
        invalid(
            &with_auth("    algorithms: [HS256]\n    leeway: 1h\n"),
            &env,
            14,
            "auth.jwt.leeway",
            "at most 5m",
        );
        invalid(
            &with_auth("    algorithms: [HS256]\n    public_key_file: /nonexistent/key.pem\n"),
            &env,
            12,
            "auth.jwt",
            "only one of",
        );
        invalid(
            &format!(
                "{BASE}auth:\n  jwt:\n    algorithms: [RS256]\n    public_key_file: /nonexistent/key.pem\n"
            ),
            &env,
            13,
            "auth.jwt.public_key_file",
            "cannot read /nonexistent/key.pem",
        );
        invalid(
            &format!("{BASE}auth:\n  public_paths: [healthz]\n"),
            &env,
            11,
            "auth.public_paths[0]",
            "starting with /",
        );
        // The operator rule: claims only (operations routes have no parameters), and it needs jwt.
        let c = load_env(
            &with_auth("    algorithms: [HS256]\n  operator: { require: { role: ops } }\n"),
            &env,
        )
        .unwrap();
        assert_eq!(
            c.auth.operator.map(|o| o.rules[0].require.clone()),
            Some(vec![("role".to_owned(), vec!["ops".to_owned()])])
        );
        invalid(
            &with_auth("    algorithms: [HS256]\n  operator: { match: { sub: id } }\n"),
            &env,
            14,
            "auth.operator.match.sub",
            "the parameters: none",
        );
        invalid(
            &format!("{BASE}auth:\n  operator: {{ require: {{ role: ops }} }}\n"),
            &env,
            11,
            "auth.operator",
            "configure `auth.jwt`",
        );
        // Public paths may be replaced, and auth may be off with only public_paths given.
        let c = load(&format!(
            "{BASE}auth:\n  public_paths: [/healthz, /metrics]\n"
        ))
        .unwrap();
        assert_eq!(c.auth.public_paths, ["/healthz", "/metrics"]);
        assert!(c.auth.jwt.is_none());
    }

    const UPDATERS: &str = "\
updaters:
  - name: place_order
    params: [id:int, user_id:int, total:numeric, { name: note, type: text, nullable: true }]
    statements:
      - INSERT INTO orders (id, user_id, total, note) VALUES ($1, $2, $3, $4);
      - UPDATE users SET orders = orders + 1 WHERE id = $2
  - name: ping
    statements: [SELECT 1]
";

    #[test]
    fn updaters_from_yaml() {
        use crate::update::{UpdaterParam, ValueType};
        let c = load(&format!("{BASE}{UPDATERS}")).unwrap();
        assert_eq!(c.updaters.len(), 2);
        let u = &c.updaters[0];
        assert_eq!(u.name, "place_order");
        let param = |name: &str, ty, nullable| UpdaterParam {
            name: name.into(),
            ty,
            nullable,
        };
        assert_eq!(
            u.params,
            vec![
                param("id", ValueType::Int, false),
                param("user_id", ValueType::Int, false),
                param("total", ValueType::Numeric, false),
                param("note", ValueType::Text, true),
            ]
        );
        assert_eq!(
            u.statements[0].sql,
            "INSERT INTO orders (id, user_id, total, note) VALUES ($1, $2, $3, $4)"
        );
        assert_eq!(u.statements[0].uses, vec![true; 4]);
        assert_eq!(u.statements[1].uses, vec![false, true]);
        assert!(c.updaters[1].params.is_empty());
        assert_eq!(c.updaters[1].statements[0].uses, Vec::<bool>::new());
    }

    #[test]
    fn updater_errors() {
        let u = |body: &str| format!("{BASE}updaters:\n  - name: u\n{body}");
        assert_invalid(
            &u("    params: [id:int]\n"),
            11,
            "updaters[0].statements",
            "required",
        );
        assert_invalid(
            &u("    params: [id:integer]\n    statements: [SELECT $1]\n"),
            12,
            "updaters[0].params[0]",
            "unknown type 'integer'",
        );
        assert_invalid(
            &u("    params: [id:int, id:text]\n    statements: [SELECT $1]\n"),
            12,
            "updaters[0].params[1]",
            "declared twice",
        );
        assert_invalid(
            &u("    params: [id:int]\n    statements: [\"SELECT $1, $2\"]\n"),
            13,
            "updaters[0].statements[0]",
            "uses $2 but the updater has 1 parameter (id)",
        );
        assert_invalid(
            &u("    params: [id:int, spare]\n    statements: [SELECT $1]\n"),
            12,
            "updaters[0].params",
            "'spare' ($2) is not used by any statement",
        );
        assert_invalid(
            &u("    statements: [SELECT 1, COMMIT]\n"),
            12,
            "updaters[0].statements[1]",
            "controls the transaction",
        );
        assert_invalid(
            &u("    statements: [\"SELECT 1; SELECT 2\"]\n"),
            12,
            "updaters[0].statements[0]",
            "more than one statement",
        );
        assert_invalid(
            &u("    statements: [SELECT 1]\n    access: { require: { role: admin } }\n"),
            13,
            "updaters[0].access",
            "configure `auth.jwt`",
        );
        assert_invalid(
            &format!("{BASE}updaters:\n  - name: Bad-Name\n    statements: [SELECT 1]\n"),
            11,
            "updaters[0].name",
            "not a valid updater name",
        );
        assert_invalid(
            &format!(
                "{BASE}updaters:\n  - name: a\n    statements: [SELECT 1]\n  - name: a\n    statements: [SELECT 2]\n"
            ),
            13,
            "updaters[1].name",
            "already used",
        );
    }

    #[test]
    fn access_rules() {
        let env = [("KCK_JWT_SECRET", SECRET)];
        let auth = "auth:\n  jwt:\n    algorithms: [HS256]\n    secret_env: KCK_JWT_SECRET\n";
        let yaml = format!(
            "{}{auth}",
            base_with(
                "    depends_on:",
                "    access:\n      - match: { sub: user_id }\n      - require: { role: [admin, ops], level: 3 }\n    depends_on:"
            )
        );
        let c = load_env(&yaml, &env).unwrap();
        let access = c.catalog.primers[0].access.as_ref().unwrap();
        assert_eq!(
            access.rules,
            vec![
                AccessRule {
                    require: vec![],
                    matches: vec![("sub".into(), 0)],
                },
                AccessRule {
                    require: vec![
                        ("role".into(), vec!["admin".into(), "ops".into()]),
                        ("level".into(), vec!["3".into()]),
                    ],
                    matches: vec![],
                },
            ]
        );
        // One rule as a mapping; an updater's parameters.
        let yaml = format!(
            "{BASE}{auth}updaters:\n  - name: u\n    params: [id:int]\n    statements: [SELECT $1]\n    access: {{ match: {{ sub: id }}, require: {{ role: user }} }}\n"
        );
        let c = load_env(&yaml, &env).unwrap();
        assert_eq!(c.updaters[0].access.as_ref().unwrap().rules.len(), 1);

        let bad = format!(
            "{}{auth}",
            base_with(
                "    depends_on:",
                "    access: { match: { sub: uid } }\n    depends_on:"
            )
        );
        assert_invalid_at(
            load_env(&bad, &env),
            Path::new(FILE),
            7,
            "primers[0].access.match.sub",
            "'uid' is not a parameter here (the parameters: user_id)",
        );
        let bad = format!(
            "{}{auth}",
            base_with("    depends_on:", "    access: {}\n    depends_on:")
        );
        assert_invalid_at(
            load_env(&bad, &env),
            Path::new(FILE),
            7,
            "primers[0].access",
            "a rule needs `require`",
        );
        let no_auth = base_with(
            "    depends_on:",
            "    access: { require: { role: admin } }\n    depends_on:",
        );
        assert_invalid(&no_auth, 7, "primers[0].access", "configure `auth.jwt`");
    }

    #[test]
    fn sql_updaters() {
        let dir = tempfile::tempdir().unwrap();
        let updaters = dir.path().join("updaters");
        std::fs::create_dir(&updaters).unwrap();
        write(
            &updaters,
            "place_order.sql",
            "-- kck:updater\n-- params: [id:int, user_id:int]\nINSERT INTO orders (id, user_id) VALUES ($1, $2);\n\n\
             -- then count it\nUPDATE users SET orders = orders + 1\n WHERE id = $2;\n",
        );
        let config = write(
            dir.path(),
            "kck.yaml",
            &format!("{BASE}updaters_dir: updaters\n"),
        );
        let c = Config::load_with_env(&config, no_env).unwrap();
        assert_eq!(c.updaters.len(), 1);
        let u = &c.updaters[0];
        assert_eq!(u.name, "place_order");
        assert_eq!(
            u.statements
                .iter()
                .map(|s| s.sql.as_str())
                .collect::<Vec<_>>(),
            [
                "INSERT INTO orders (id, user_id) VALUES ($1, $2)",
                "UPDATE users SET orders = orders + 1\n WHERE id = $2"
            ]
        );
        // Errors name the file and the line of the statement.
        let file = write(
            &updaters,
            "place_order.sql",
            "-- kck:updater\n-- params: [id:int]\nSELECT $1;\nSELECT $2;\n",
        );
        assert_invalid_at(
            Config::load_with_env(&config, no_env),
            &file,
            4,
            "statements[1]",
            "uses $2",
        );
        let file = write(&updaters, "place_order.sql", SQL_PRIMER);
        assert_invalid_at(
            Config::load_with_env(&config, no_env),
            &file,
            1,
            "header",
            "this is a primer file; put it in `primers_dir`",
        );
        let file = write(
            &updaters,
            "place_order.sql",
            "-- kck:updater\n-- statements: [SELECT 1]\nSELECT 1\n",
        );
        assert_invalid_at(
            Config::load_with_env(&config, no_env),
            &file,
            2,
            "statements",
            "body of the file",
        );
        let file = write(
            &updaters,
            "place_order.sql",
            "-- kck:updater\n-- params: []\n\n",
        );
        assert_invalid_at(
            Config::load_with_env(&config, no_env),
            &file,
            3,
            "statements",
            "no SQL statement",
        );
    }

    #[test]
    fn scanning_several_statements() {
        let sql =
            "INSERT INTO t VALUES ($1, ';');;\n-- c; d\nUPDATE t SET x = $$a;b$$ WHERE y = $2;  ";
        let scans = scan_statements(sql, true).unwrap();
        assert_eq!(scans.len(), 2);
        assert_eq!(
            &sql[scans[0].start..scans[0].end],
            "INSERT INTO t VALUES ($1, ';')"
        );
        assert_eq!(
            &sql[scans[1].start..scans[1].end],
            "UPDATE t SET x = $$a;b$$ WHERE y = $2"
        );
        assert_eq!(scans[0].used, vec![true]);
        assert_eq!(scans[1].used, vec![false, true]);
        assert!(scan_statements(" ; -- nothing\n", true).is_err());
        assert!(scan_statements("SELECT 1; SELECT 2", false).is_err());
    }
}
