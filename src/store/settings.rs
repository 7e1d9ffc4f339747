//! The store's settings (`store` in the config): which kind, and each kind's own fields.

use std::fmt;
use std::path::PathBuf;

pub const DEFAULT_KEYSPACE: &str = "kck";
pub const DEFAULT_CQL_PORT: u16 = 9042;

/// Where cache entries and the refresh queue live.
///
/// Chosen by `store.kind`; each kind has its own fields in the `store` section.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// redb in one file under `path` (a directory; created if missing). One process at a time.
    /// `memory_cache`: bytes of entries kept in memory in front of redb (`store.memory_cache`, default
    /// 64 MiB; 0 turns it off). `capacity`: how many keys and bytes it holds at most (the coldest keys
    /// are evicted past it).
    Embedded {
        path: PathBuf,
        memory_cache: usize,
        capacity: Capacity,
    },
    /// A ScyllaDB or Cassandra cluster, shared by any number of kck processes.
    Scylla(ScyllaConfig),
}

/// How much the embedded store holds at most (`store.max_entries`, `store.max_bytes`): past either, the
/// keys read or written least recently are evicted (entry and registration), so that a later fetch of
/// one is a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Keys (registered or stored). At least 1.
    pub max_entries: u64,
    /// Bytes of keys and encoded entries (what the store charges for them, not the file's size, which is
    /// larger: indexes and free pages). At least 1.
    pub max_bytes: u64,
}

impl Capacity {
    /// `store.max_entries` unless set.
    pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
    /// `store.max_bytes` unless set: 1 GiB.
    pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
}

impl Default for Capacity {
    fn default() -> Capacity {
        Capacity {
            max_entries: Capacity::DEFAULT_MAX_ENTRIES,
            max_bytes: Capacity::DEFAULT_MAX_BYTES,
        }
    }
}

/// `store.kind: scylla`.
///
/// `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// Contact points, `host:port` (the port defaults to 9042). `KCK_STORE_NODES` (comma-separated).
    pub nodes: Vec<String>,
    /// The keyspace holding kck's tables. Default `kck`.
    pub keyspace: String,
    /// How the keyspace is replicated when kck creates it (`kck store init`, or `init: true`).
    pub replication: KeyspaceReplication,
    /// Consistency of every read and write. Default `local_quorum`.
    pub consistency: Consistency,
    pub username: Option<String>,
    /// `KCK_STORE_PASSWORD` overrides it.
    pub password: Option<String>,
    /// Connect with TLS, trusting the certificate authorities in this PEM file.
    pub tls_ca_file: Option<PathBuf>,
    /// Create the keyspace and tables (if missing) at start-up. Default false.
    pub init: bool,
}

impl fmt::Debug for ScyllaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScyllaConfig")
            .field("nodes", &self.nodes)
            .field("keyspace", &self.keyspace)
            .field("replication", &self.replication)
            .field("consistency", &self.consistency)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("init", &self.init)
            .finish()
    }
}

/// The replication of kck's keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyspaceReplication {
    /// `{'class': 'SimpleStrategy', 'replication_factor': N}`: one data centre (development).
    Simple { replication_factor: u32 },
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3, ...}`: replicas per data centre.
    NetworkTopology { datacenters: Vec<(String, u32)> },
}

/// A CQL consistency level (`store.consistency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalOne,
    LocalQuorum,
    EachQuorum,
}

impl Consistency {
    pub const NAMES: [(&'static str, Consistency); 8] = [
        ("one", Consistency::One),
        ("two", Consistency::Two),
        ("three", Consistency::Three),
        ("quorum", Consistency::Quorum),
        ("all", Consistency::All),
        ("local_one", Consistency::LocalOne),
        ("local_quorum", Consistency::LocalQuorum),
        ("each_quorum", Consistency::EachQuorum),
    ];

    pub fn name(self) -> &'static str {
        Consistency::NAMES
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("?", |(n, _)| n)
    }

    /// Whether lightweight transactions should use `LOCAL_SERIAL` (the data centre's replicas) rather
    /// than `SERIAL`.
    pub fn is_local(self) -> bool {
        matches!(self, Consistency::LocalOne | Consistency::LocalQuorum)
    }
}
