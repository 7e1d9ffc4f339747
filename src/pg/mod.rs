//! Postgres helpers every layer may use: the `source` settings, one parsed [`Source`] with its
//! connections and pool, how a Postgres error is told to a person, identifier quoting, and text parameters.
//!
//! Nothing here knows about replication, primers' queries or the store; [`crate::replication`],
//! [`crate::refresh`], [`crate::update`], the jobs and `kck check` build on it.

use std::fmt;
use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use postgres_types::{Format, IsNull, ToSql, Type};

use crate::primer::TableName;

pub mod conninfo;
pub mod tls;

pub use tls::{SslMode, Tls, TlsError};

// -----------------------------------------------------------------------------------------------------
// The `source` settings

/// Where the data comes from.
///
/// `Debug` hides the password of `url`; use [`SourceConfig::redacted_url`] to log the URL.
#[derive(Clone)]
pub struct SourceConfig {
    /// A libpq-style connection string or URL (`postgres://user:pass@host:5432/db`). `KCK_SOURCE_URL`.
    pub url: String,
    /// The publication kck subscribes to. Default `kck`.
    pub publication: String,
    /// Create the publication (for the tables the primers read) if it is missing. Default false.
    pub create_publication: bool,
    /// The logical replication slot kck owns. Default `kck`.
    pub slot: String,
    /// When another kck holds the slot: wait as a hot standby and take over when it dies (true), or stop
    /// with [`crate::replication::ReplicationError::SlotInUse`] (false, the default).
    pub standby: bool,
    /// Warn when the slot keeps more WAL than this many bytes (at start-up and while running). Default 1 GiB.
    pub max_retained_wal: u64,
    /// What to do when Postgres invalidated the slot (`wal_status = lost`). Default [`SlotLostPolicy::Fail`].
    pub on_slot_lost: SlotLostPolicy,
}

/// What kck does when its slot was invalidated (`source.on_slot_lost`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotLostPolicy {
    /// Stop with an error that says what to do.
    Fail,
    /// Drop the slot, create it again, and refresh every cached key.
    Recreate,
}

impl SourceConfig {
    /// `url` with any password replaced by `***`, for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &self.redacted_url())
            .field("publication", &self.publication)
            .field("create_publication", &self.create_publication)
            .field("slot", &self.slot)
            .field("standby", &self.standby)
            .field("max_retained_wal", &self.max_retained_wal)
            .field("on_slot_lost", &self.on_slot_lost)
            .finish()
    }
}

/// Replace the password of a `postgres://user:password@host/db` URL or of a `password=...` key/value
/// connection string with `***`.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@')
            && let Some(colon) = authority[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            let end = scheme_end + 3 + at;
            return format!("{}***{}", &url[..start], &url[end..]);
        }
        return url.to_owned();
    }
    // key=value form: `host=... password=secret` or `password='se cret'`.
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(i) = rest.find("password") {
        let (before, after) = rest.split_at(i);
        out.push_str(before);
        let at_word_start = before.is_empty() || before.ends_with(char::is_whitespace);
        let value = after["password".len()..].trim_start();
        if at_word_start && let Some(value) = value.strip_prefix('=') {
            let value = value.trim_start();
            let end = if let Some(quoted) = value.strip_prefix('\'') {
                let mut end = quoted.len();
                let mut chars = quoted.char_indices();
                while let Some((j, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '\'' => {
                            end = j + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                1 + end
            } else {
                value.find(char::is_whitespace).unwrap_or(value.len())
            };
            out.push_str("password=***");
            rest = &value[end..];
        } else {
            out.push_str("password");
            rest = &after["password".len()..];
        }
    }
    out.push_str(rest);
    out
}

// -----------------------------------------------------------------------------------------------------
// Connections

/// Cannot reach the source.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the source connection string is not valid: {0}")]
    BadUrl(String),
    #[error("source.url: {0}")]
    Tls(#[from] TlsError),
    #[error(
        "cannot connect to Postgres at {target}: {}. {fix}",
        error_text(source)
    )]
    Connect {
        target: String,
        /// What to change, for a person ([`connect_fix`]).
        fix: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Connection parameters of the source, parsed once from `source.url`.
#[derive(Clone)]
pub struct Source {
    /// Everything but TLS, for tokio-postgres (its `sslmode` set from [`Source::tls`]).
    pub pg: tokio_postgres::Config,
    /// The TLS decision every connection to the source follows.
    pub tls: Tls,
    pub config: SourceConfig,
    host: String,
    port: u16,
    /// Where the password came from when the URL gave none, for messages.
    password_from: Option<&'static str>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(f, "Source({})", self.display())
    }
}

/// What [`Source::with_env`] reads besides the connection string: libpq's environment variables and the
/// home directory (for `~/.pgpass` and `~/.postgresql/`).
pub struct Environment<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
    pub home: Option<std::path::PathBuf>,
}

impl Source {
    /// Parse `config.url` as libpq would, reading libpq's environment variables (`PGHOST`, `PGPORT`,
    /// `PGUSER`, `PGDATABASE`, `PGPASSWORD`, `PGPASSFILE`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
    /// `PGSSLKEY`) and files (`~/.pgpass`, `~/.postgresql/root.crt`, `postgresql.crt`, `postgresql.key`).
    pub fn new(config: &SourceConfig) -> Result<Source, ConnectError> {
        let var = |k: &str| std::env::var(k).ok();
        Source::with_env(
            config,
            &Environment {
                var: &var,
                home: std::env::var_os("HOME").map(std::path::PathBuf::from),
            },
        )
    }

    /// [`Source::new`] with the environment given (for tests).
    pub fn with_env(config: &SourceConfig, env: &Environment<'_>) -> Result<Source, ConnectError> {
        let split =
            conninfo::split(&config.url).map_err(|e| ConnectError::BadUrl(e.to_string()))?;
        if split.get("service").is_some() {
            return Err(ConnectError::BadUrl(
                "service=: kck does not read pg_service.conf; put the service's host, port, dbname and user in \
                 source.url"
                    .into(),
            ));
        }
        let mut pg = tokio_postgres::Config::from_str(&split.rest).map_err(|e| {
            ConnectError::BadUrl(format!(
                "{} (kck reads libpq's parameters; the TLS ones are sslmode, sslrootcert, sslcert and sslkey)",
                error_text(&e)
            ))
        })?;
        if pg.get_hosts().is_empty()
            && let Some(h) = (env.var)("PGHOST")
        {
            for h in h.split(',') {
                pg.host(h);
            }
        }
        if pg.get_ports().is_empty()
            && let Some(p) = (env.var)("PGPORT")
        {
            let port = p
                .parse()
                .map_err(|_| ConnectError::BadUrl(format!("PGPORT={p:?} is not a port number")))?;
            pg.port(port);
        }
        if pg.get_user().is_none()
            && let Some(u) = (env.var)("PGUSER")
        {
            pg.user(u);
        }
        if pg.get_dbname().is_none()
            && let Some(d) = (env.var)("PGDATABASE")
        {
            pg.dbname(d);
        }
        let get = |k: &str| split.get(k).map(str::to_owned);
        let tls = Tls::from_params(
            &get,
            &tls::Defaults {
                home: env.home.clone(),
                env: env.var,
            },
        )?;
        pg.ssl_mode(tls.tokio_mode());
        if pg.get_channel_binding() == tokio_postgres::config::ChannelBinding::Require {
            return Err(TlsError::Unsupported {
                param: "channel_binding",
                value: "require".into(),
                why: "the replication connection cannot bind SCRAM to the TLS channel; use channel_binding=prefer \
                      (the default: ordinary connections still bind when the server offers it)",
            }
            .into());
        }
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let mut source = Source {
            pg,
            tls,
            config: config.clone(),
            host,
            port,
            password_from: None,
        };
        if source.pg.get_password().is_none() {
            if let Some(p) = (env.var)("PGPASSWORD") {
                source.pg.password(p);
                source.password_from = Some("PGPASSWORD");
            } else {
                let file = split
                    .get("passfile")
                    .map(std::path::PathBuf::from)
                    .or_else(|| (env.var)("PGPASSFILE").map(std::path::PathBuf::from))
                    .or_else(|| env.home.as_ref().map(|h| h.join(".pgpass")));
                if let Some(file) = file {
                    // libpq matches a Unix socket's host as `localhost`.
                    let host = if source.host.starts_with('/') {
                        "localhost".to_string()
                    } else {
                        source.host.clone()
                    };
                    match conninfo::pgpass(
                        &file,
                        &host,
                        source.port,
                        &source.database(),
                        &source.user(),
                    ) {
                        conninfo::PassFile::Found(p) => {
                            source.pg.password(p);
                            source.password_from = Some("the password file");
                        }
                        conninfo::PassFile::Unsafe => tracing::warn!(
                            file = %file.display(),
                            "The password file is ignored: others can read it (libpq's rule). Fix: chmod 0600 it."
                        ),
                        conninfo::PassFile::Absent | conninfo::PassFile::NoMatch => {}
                    }
                }
            }
        }
        Ok(source)
    }

    /// `e`, from opening an ordinary connection, with what a person should change.
    pub fn connect_error(&self, e: tokio_postgres::Error) -> ConnectError {
        ConnectError::Connect {
            target: self.display(),
            fix: connect_fix(&error_text(&e), self),
            source: e,
        }
    }

    /// Whether `url` is one kck can connect with (its syntax, its TLS parameters and files), for the
    /// config loader.
    pub fn check_url(url: &str) -> Result<(), ConnectError> {
        Source::new(&SourceConfig {
            url: url.to_owned(),
            publication: String::new(),
            create_publication: false,
            slot: String::new(),
            standby: false,
            max_retained_wal: 0,
            on_slot_lost: SlotLostPolicy::Fail,
        })
        .map(drop)
    }

    /// The password to send, from the URL, `PGPASSWORD` or the password file (empty when none).
    pub fn password(&self) -> String {
        self.pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    }

    /// Where the password came from when the URL gave none (`PGPASSWORD`, the password file).
    pub fn password_from(&self) -> Option<&'static str> {
        self.password_from
    }

    pub fn user(&self) -> String {
        self.pg
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into())
    }

    pub fn database(&self) -> String {
        self.pg
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| self.user())
    }

    /// `user@host:port/db`, for messages.
    pub fn display(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.user(),
            self.host,
            self.port,
            self.database()
        )
    }

    /// An ordinary (non-replication) connection; its driver runs on a spawned task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ConnectError> {
        let (client, connection) = self
            .pg
            .connect(self.tls.connector())
            .await
            .map_err(|source| self.connect_error(source))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %crate::report::Chain(&error), "Postgres connection closed.");
            }
        });
        Ok(client)
    }
}

impl Source {
    /// The first host, for the replication connection and messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Where the replication connection goes: the first `hostaddr` when given (then [`Source::host`] is
    /// only the name TLS checks), else the first host.
    pub fn connect_host(&self) -> String {
        match self.pg.get_hostaddrs().first() {
            Some(addr) => addr.to_string(),
            None => self.host.clone(),
        }
    }

    /// The first port (5432 when the URL gives none).
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A pool of ordinary connections to `pg` (at least one) with `tls`, recycled cheaply. Connections are
/// made when first needed, so building the pool never fails on the network.
pub fn pool(
    pg: tokio_postgres::Config,
    tls: &Tls,
    size: usize,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager = Manager::from_config(
        pg,
        tls.connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(size.max(1)).build()
}

/// What a person should change when connecting to `source` failed with `text` (the server's message or
/// the TLS library's, as either client library tells it), on an ordinary or the replication connection.
pub fn connect_fix(text: &str, source: &Source) -> String {
    let user = source.user();
    let quoted = |after: &str| {
        text.split(after)
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(str::to_owned)
    };
    if text.contains("no pg_hba.conf entry") {
        let host = quoted("host \"").unwrap_or_else(|| "ADDRESS".into());
        let mask = if host.contains(':') { 128 } else { 32 };
        // A logical replication connection names its database, so the database's lines apply to it too.
        let database = source.database();
        let plain = text.contains("no encryption") || text.contains("SSL off");
        let mut fix = format!(
            "pg_hba.conf has no line that lets {user:?} in from {host}{}. Add, before any `reject` line: `{} {database} \
             {user} {host}/{mask} scram-sha-256`, then reload: SELECT pg_reload_conf();",
            if plain { " without TLS" } else { " over TLS" },
            if plain { "host" } else { "hostssl" },
        );
        if plain {
            fix.push_str(&format!(
                " If the server only takes TLS (hostssl lines; managed services), connect with TLS instead: \
                 sslmode=verify-full&sslrootcert=… (now sslmode={}).",
                source.tls.mode.as_str()
            ));
        }
        return fix;
    }
    if text.contains("password authentication failed") || text.contains("SQLSTATE 28P01") {
        let from = source.password_from().unwrap_or("source.url");
        return format!(
            "The server refused the password of role {user:?} (taken from {from}); check it."
        );
    }
    if text.contains("password missing") || text.contains("password is required") {
        return format!(
            "The server asks role {user:?} for a password and none was given: put it in source.url, PGPASSWORD \
             or ~/.pgpass (mode 0600)."
        );
    }
    if text.contains("not valid for name") || text.contains("NotValidForName") {
        return format!(
            "The server's certificate does not name {:?}: connect by a name (or IP address) the certificate lists, \
             or use sslmode=verify-ca to check the chain only.",
            source.host()
        );
    }
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        return "The server's certificate is not signed by the CA in sslrootcert: give the CA that signed it \
                (managed services publish theirs; see docs/managed-postgres.md), or sslrootcert=system for a \
                public CA."
            .into();
    }
    if text.contains("server does not support TLS") || text.contains("SSLRequest rejected") {
        return format!(
            "The server does not offer TLS, and sslmode={} insists on it: turn ssl on in the server, or use \
             sslmode=prefer.",
            source.tls.mode.as_str()
        );
    }
    if text.contains("TLS") || text.contains("tls") || text.contains("certificate") {
        return format!("TLS failed ({}).", source.tls.describe());
    }
    if text.contains("must be superuser or replication role")
        || text.contains("permission denied to start WAL sender")
    {
        return format!(
            "Give the role the REPLICATION attribute: ALTER ROLE \"{user}\" REPLICATION;"
        );
    }
    if text.contains("unsupported auth method code") || text.contains("unsupported authentication")
    {
        return format!(
            "pg_hba.conf asks for an authentication method kck does not speak; kck speaks trust, password, md5, \
             scram-sha-256 and cert. Use scram-sha-256 on the line for {user:?}."
        );
    }
    if text.contains("does not exist") && text.contains("database") {
        return "Check the database name in source.url.".into();
    }
    format!(
        "Check source.url (or KCK_SOURCE_URL), that Postgres listens at {}:{} and is reachable from here, and \
         that pg_hba.conf lets {user:?} in.",
        source.host(),
        source.port()
    )
}

/// A Postgres error as a person needs it: the server's message, SQLSTATE, detail and hint, or the
/// client-side cause (tokio-postgres's `Display` says only "db error" or "error connecting to server").
///
/// It goes into logs and `/status`, which never carry parameter or row values: for a data exception
/// (SQLSTATE class 22, whose message quotes the value it refused: `invalid input syntax for type
/// integer: "abc"`) quoted text is left out, and for classes 22 and 23 (integrity: `Key (id)=(1) already
/// exists`) the detail too.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return crate::report::db_error_text(db);
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// The ancestors of `table` when it is a partition, nearest first and the root last; empty for a table that
/// is not a partition.
pub async fn partition_ancestors(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text \
             FROM pg_partition_ancestors(format('%I.%I', $1::text, $2::text)::regclass) \
                  WITH ORDINALITY a(relid, i) \
             JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.relid <> format('%I.%I', $1::text, $2::text)::regclass ORDER BY a.i",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect())
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table`, both parts quoted.
pub fn quote_table(t: &TableName) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

/// A value bound as a query parameter in text form: Postgres parses it with the parameter's own type, so a
/// key's `42` binds to an `int4`, `int8` or `numeric` column alike. Never spliced into SQL.
#[derive(Debug)]
pub struct TextParam<'a>(pub Option<&'a str>);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    postgres_types::to_sql_checked!();
}
