//! The [`Loader`]: validates the raw form into [`Config`], section by section, with the source's,
//! store's, HTTP, refresh, jobs, auth and write settings; the primers and updaters are built by their own
//! modules.

use super::*;

pub(super) struct Loader<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
}

/// Where a primer came from, for messages about it.
pub(super) struct PrimerOrigin {
    pub(super) file: PathBuf,
    /// `primers[2].` for YAML primers, empty for `.sql` files.
    pub(super) prefix: String,
    pub(super) name_line: usize,
    pub(super) key_line: usize,
}

pub(super) fn invalid(
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
    pub(super) fn err(
        &self,
        line: usize,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        invalid(self.file, line, field, message)
    }

    pub(super) fn env_err(&self, var: &str, message: impl Into<String>) -> ConfigError {
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
    pub(super) fn section_line<T>(&self, section: &Option<Spanned<T>>, key: &str) -> usize {
        section
            .as_ref()
            .map(line_of)
            .or_else(|| top_level_key_line(self.text, key))
            .unwrap_or(1)
    }

    /// The value of a string field: the environment variable `var` if set, else the file's value, parsed
    /// by `parse`. `None` if neither gives one.
    pub(super) fn string_field<T>(
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

    pub(super) fn load(&self, mut raw: RawConfig) -> Result<Config, ConfigError> {
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

    pub(super) fn source(&self, raw: &RawConfig) -> Result<SourceConfig, ConfigError> {
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

    pub(super) fn store(&self, raw: &RawConfig) -> Result<StoreConfig, ConfigError> {
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
                    format!("`{name}` is a field of the scylla store; set `kind: scylla` to use it (the embedded store takes only `path`, `memory_cache`, `max_entries` and `max_bytes`)"),
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
        let mut capacity = crate::store::Capacity::default();
        if let Some(m) = section.and_then(|s| s.max_entries.as_ref()) {
            capacity.max_entries = m
                .value
                .0
                .trim()
                .replace('_', "")
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    self.err(
                        line_of(m),
                        "store.max_entries",
                        format!(
                            "'{}' is not a number of keys: give a whole number, at least 1 (e.g. 100000)",
                            m.value.0
                        ),
                    )
                })?;
        }
        if let Some(m) = section.and_then(|s| s.max_bytes.as_ref()) {
            capacity.max_bytes = crate::ops::size::parse_byte_size(&m.value.0)
                .and_then(|b| {
                    if b == 0 {
                        Err(
                            "must be at least 1 byte (e.g. 512MB): the store is always bounded"
                                .into(),
                        )
                    } else {
                        Ok(b)
                    }
                })
                .map_err(|e| self.err(line_of(m), "store.max_bytes", e))?;
        }
        Ok(StoreConfig::Embedded {
            path,
            memory_cache,
            capacity,
        })
    }

    pub(super) fn scylla_store(&self, raw: &RawConfig) -> Result<ScyllaConfig, ConfigError> {
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
        for (name, field) in [("max_entries", &s.max_entries), ("max_bytes", &s.max_bytes)] {
            if let Some(m) = field {
                return Err(self.err(
                    line_of(m),
                    format!("store.{name}"),
                    format!(
                        "`{name}` is not supported by the scylla store (it keeps no global count to evict \
                         by): remove it, and bound the cluster's data with the primers' `ttl` and \
                         `cold_after` instead"
                    ),
                ));
            }
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

    pub(super) fn keyspace_replication(
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

    pub(super) fn roles(&self, raw: &RawConfig) -> Result<Roles, ConfigError> {
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
    pub(super) fn relative(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    pub(super) fn http(&self, raw: &RawConfig) -> Result<HttpConfig, ConfigError> {
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
        let max_connections = match section.and_then(|s| s.max_connections.as_ref()) {
            None => crate::http::DEFAULT_MAX_CONNECTIONS,
            Some(n) => match usize::try_from(n.value) {
                Ok(n) if (16..=1_000_000).contains(&n) => n,
                _ => {
                    return Err(self.err(
                        line_of(n),
                        "http.max_connections",
                        format!("must be between 16 and 1000000, got {} (keep it below the process's open-file limit, `ulimit -n`)", n.value),
                    ));
                }
            },
        };
        let header_read_timeout = duration(
            section.and_then(|s| s.header_read_timeout.as_ref()),
            "http.header_read_timeout",
            crate::http::DEFAULT_HEADER_READ_TIMEOUT,
        )?;
        if header_read_timeout.is_zero() {
            let line = section
                .and_then(|s| s.header_read_timeout.as_ref())
                .map_or(1, line_of);
            return Err(self.err(
                line,
                "http.header_read_timeout",
                "must be more than 0: without it one slow client holds a connection forever"
                    .to_string(),
            ));
        }
        let max_header_bytes = match section.and_then(|s| s.max_header_bytes.as_ref()) {
            None => crate::http::DEFAULT_MAX_HEADER_BYTES,
            Some(b) => parse_size(&b.value.0)
                .map_err(|m| self.err(line_of(b), "http.max_header_bytes", m))?
                .max(8 << 10),
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
        let bounded =
            |field: Option<&Spanned<i64>>, name: &str, default: usize, max: usize| match field {
                None => Ok(default),
                Some(n) => match usize::try_from(n.value) {
                    Ok(v) if (1..=max).contains(&v) => Ok(v),
                    _ => Err(self.err(
                        line_of(n),
                        name,
                        format!("must be between 1 and {max}, got {}", n.value),
                    )),
                },
            };
        let max_batch_misses = bounded(
            section.and_then(|s| s.max_batch_misses.as_ref()),
            "http.max_batch_misses",
            crate::http::DEFAULT_MAX_BATCH_MISSES,
            100_000,
        )?;
        let max_concurrent_misses = bounded(
            section.and_then(|s| s.max_concurrent_misses.as_ref()),
            "http.max_concurrent_misses",
            crate::refresh::DEFAULT_MAX_CONCURRENT_MISSES,
            10_000,
        )?;
        let miss_wait = duration(
            section.and_then(|s| s.miss_wait.as_ref()),
            "http.miss_wait",
            crate::refresh::DEFAULT_MISS_WAIT,
        )?;
        let mut allowed_hosts = Vec::new();
        if let Some(list) = section.and_then(|s| s.allowed_hosts.as_ref()) {
            for (i, h) in list.value.iter().enumerate() {
                let host = h.value.trim().to_ascii_lowercase();
                if host.is_empty()
                    || host.contains("://")
                    || host.contains('/')
                    || host.contains(char::is_whitespace)
                {
                    return Err(self.err(
                        line_of(h),
                        format!("http.allowed_hosts[{i}]"),
                        format!(
                            "'{}' is not a host name: give the name a Host header carries, such as \
                             localhost, 127.0.0.1, kck.example.com or kck.example.com:8080 (no scheme, no path; \
                             IPv6 without brackets)",
                            h.value
                        ),
                    ));
                }
                allowed_hosts.push(host);
            }
            if allowed_hosts.is_empty() {
                return Err(self.err(
                    line_of(list),
                    "http.allowed_hosts",
                    "is empty, so no request could be answered: list the host names kck is reached by, or \
                     leave the setting out to answer any",
                ));
            }
        }
        let subscribe = self.subscribe(section.and_then(|s| s.subscribe.as_ref()))?;
        Ok(HttpConfig {
            bind,
            request_timeout,
            body_limit,
            max_batch_keys,
            wait_timeout,
            max_wait,
            cors_origins,
            max_connections,
            header_read_timeout,
            max_header_bytes,
            max_batch_misses,
            max_concurrent_misses,
            miss_wait,
            allowed_hosts,
            subscribe,
        })
    }

    /// `http.subscribe`: live keys.
    fn subscribe(
        &self,
        section: Option<&Spanned<RawSubscribe>>,
    ) -> Result<crate::http::subscribe::SubscribeConfig, ConfigError> {
        use crate::http::subscribe as d;
        let raw = section.map(|s| &s.value);
        let count = |field: Option<&Spanned<i64>>,
                     name: &str,
                     range: std::ops::RangeInclusive<usize>,
                     default: usize|
         -> Result<usize, ConfigError> {
            match field {
                None => Ok(default),
                Some(n) => match usize::try_from(n.value) {
                    Ok(v) if range.contains(&v) => Ok(v),
                    _ => Err(self.err(
                        line_of(n),
                        name,
                        format!(
                            "must be between {} and {}, got {}",
                            range.start(),
                            range.end(),
                            n.value
                        ),
                    )),
                },
            }
        };
        let duration = |field: Option<&Spanned<String>>,
                        name: &str,
                        min: Duration,
                        default: Duration|
         -> Result<Duration, ConfigError> {
            match field {
                None => Ok(default),
                Some(t) => {
                    let d = parse_duration(&t.value).map_err(|m| self.err(line_of(t), name, m))?;
                    if d < min {
                        return Err(self.err(
                            line_of(t),
                            name,
                            format!(
                                "must be at least {}, got {}",
                                humantime::format_duration(min),
                                humantime::format_duration(d)
                            ),
                        ));
                    }
                    Ok(d)
                }
            }
        };
        let max_subscriptions = count(
            raw.and_then(|s| s.max_subscriptions.as_ref()),
            "http.subscribe.max_subscriptions",
            1..=1_000_000,
            d::DEFAULT_MAX_SUBSCRIPTIONS,
        )?;
        Ok(crate::http::subscribe::SubscribeConfig {
            heartbeat: duration(
                raw.and_then(|s| s.heartbeat.as_ref()),
                "http.subscribe.heartbeat",
                Duration::from_secs(1),
                d::DEFAULT_HEARTBEAT,
            )?,
            max_subscriptions,
            max_keys: count(
                raw.and_then(|s| s.max_keys.as_ref()),
                "http.subscribe.max_keys",
                1..=100_000,
                d::DEFAULT_MAX_KEYS,
            )?,
            buffer: count(
                raw.and_then(|s| s.buffer.as_ref()),
                "http.subscribe.buffer",
                1..=1_000_000,
                d::DEFAULT_BUFFER,
            )?,
            poll: duration(
                raw.and_then(|s| s.poll.as_ref()),
                "http.subscribe.poll",
                Duration::from_millis(10),
                d::DEFAULT_POLL,
            )?,
        })
    }

    pub(super) fn write(
        &self,
        raw: &RawConfig,
        source: &SourceConfig,
    ) -> Result<WriteConfig, ConfigError> {
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

    pub(super) fn auth(&self, raw: &RawConfig) -> Result<AuthConfig, ConfigError> {
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

    pub(super) fn jwt(&self, section: &Spanned<RawJwt>) -> Result<JwtConfig, ConfigError> {
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

    pub(super) fn updaters(
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

    pub(super) fn refresh(&self, raw: &RawConfig) -> Result<RefreshConfig, ConfigError> {
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
        let window = section
            .and_then(|s| s.absent_window.as_ref())
            .map(|t| {
                parse_duration(&t.value)
                    .map_err(|m| self.err(line_of(t), "refresh.absent_window", m))
            })
            .transpose()?;
        let absent_rows = match section.and_then(|s| s.absent_rows.as_ref()) {
            Some(t) if t.value == "keep" => {
                if let Some(w) = section.and_then(|s| s.absent_window.as_ref()) {
                    return Err(self.err(
                        line_of(w),
                        "refresh.absent_window",
                        "applies to `absent_rows: second_miss`; remove it, or set `absent_rows: second_miss`",
                    ));
                }
                AbsentRows::Keep
            }
            None => AbsentRows::SecondMiss {
                window: window.unwrap_or(DEFAULT_ABSENT_WINDOW),
            },
            Some(t) if t.value == "second_miss" => AbsentRows::SecondMiss {
                window: window.unwrap_or(DEFAULT_ABSENT_WINDOW),
            },
            Some(t) => {
                return Err(self.err(
                    line_of(t),
                    "refresh.absent_rows",
                    format!(
                        "unknown policy '{}': the policies are 'second_miss' (a key whose row does not exist \
                         is kept from its second miss within absent_window) and 'keep' (kept at once)",
                        t.value
                    ),
                ));
            }
        };
        let park_after = count(
            "park_after",
            section.and_then(|s| s.park_after.as_ref()),
            1,
            1000,
        )?
        .map_or(DEFAULT_PARK_AFTER, |n| n as u32);
        let parked_retry = match section.and_then(|s| s.parked_retry.as_ref()) {
            None => DEFAULT_PARKED_RETRY,
            Some(t) => parse_duration(&t.value)
                .map_err(|m| self.err(line_of(t), "refresh.parked_retry", m))?,
        };
        Ok(RefreshConfig {
            workers,
            visibility_timeout,
            pool_size,
            max_queue,
            cold_after,
            claim_batch,
            absent_rows,
            park_after,
            parked_retry,
        })
    }

    pub(super) fn jobs(&self, raw: &RawConfig) -> Result<Vec<JobConfig>, ConfigError> {
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

    pub(super) fn primers(&self, raw: RawConfig, auth_on: bool) -> Result<Catalog, ConfigError> {
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

pub(super) fn check_url(url: &str) -> Result<String, String> {
    if url.trim().is_empty() {
        return Err("is empty: give a Postgres connection URL such as postgres://kck:secret@127.0.0.1:5432/app".into());
    }
    // Parsed as kck will connect: libpq's parameters, TLS files read and checked.
    crate::pg::Source::check_url(url)
        .map(|()| url.to_owned())
        .map_err(|e| match e {
            crate::pg::ConnectError::BadUrl(m) => {
                format!("is not a valid Postgres connection string or URL: {m}")
            }
            e => e.to_string().trim_start_matches("source.url: ").to_owned(),
        })
}

/// A name Postgres folds to itself when unquoted: `[a-z_][a-z0-9_$]*`, at most 63 bytes.
pub(super) fn check_pg_name(name: &str, what: &str) -> Result<String, String> {
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
pub(super) fn check_slot_name(name: &str) -> Result<String, String> {
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
pub(super) fn check_node(text: &str) -> Result<String, String> {
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
pub(super) fn check_keyspace(name: &str) -> Result<String, String> {
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

pub(super) fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("'{text}' is not an IP address and port, such as 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080")
    })
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
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
