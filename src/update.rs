//! Updaters: named, parameterised writes that `POST /update/{name}` runs in one transaction.
//!
//! An [`Updater`] comes from the config (`updaters:` or `.sql` files in `updaters_dir`): typed parameters and
//! one or more statements whose `$1..$n` are the parameters in declared order. [`parse_args`] turns a JSON
//! body into parameter values, checking each against its [`ValueType`] so that a bad value is named before
//! Postgres sees it. [`Updates::run`] binds them (in text form, never spliced into SQL, like primer keys),
//! runs every statement in one transaction on its own small pool, commits, and reports each statement's
//! row count and an LSN at or after the commit. The commit is durable when kck answers: a session with
//! `synchronous_commit = off` gets `local` for updater transactions.
//!
//! Updaters do not refresh anything: the replication stream sees the commit like any other write and
//! refreshes the dependent keys, so an application writing through kck and one writing to Postgres directly
//! get the same freshness. The LSN lets a client wait for it (`?wait=fresh`, or `min_lsn` on a fetch).
//!
//! A transaction runs in a task of its own: a client that disconnects, or a request that times out, does
//! not cut it off between statements; it commits or rolls back cleanly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use postgres_types::{ToSql, Type};
use serde_json::value::RawValue;
use tokio::sync::OnceCell;
use tokio_postgres::error::{DbError, SqlState};

use crate::lsn::Lsn;
use crate::pg::TextParam;
use crate::primer::Access;
use crate::primer::ParamType;

/// The type of an updater parameter, and what JSON it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// A 64-bit integer: a JSON integer, or a string holding one.
    Int,
    /// A JSON number (or `"NaN"`, `"Infinity"`, `"-Infinity"`), sent as written.
    Float,
    /// An exact decimal: a JSON number or a string holding one, sent as written (no float rounding).
    Numeric,
    /// A JSON string.
    Text,
    /// A UUID string, any case, with or without hyphens.
    Uuid,
    /// `true` or `false`.
    Bool,
    /// Any JSON value, sent as its JSON text.
    Json,
}

impl ValueType {
    pub const NAMES: &'static str = "int, float, numeric, text, uuid, bool or json";

    pub fn parse(name: &str) -> Option<ValueType> {
        Some(match name {
            "int" => ValueType::Int,
            "float" => ValueType::Float,
            "numeric" => ValueType::Numeric,
            "text" => ValueType::Text,
            "uuid" => ValueType::Uuid,
            "bool" => ValueType::Bool,
            "json" => ValueType::Json,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Int => "int",
            ValueType::Float => "float",
            ValueType::Numeric => "numeric",
            ValueType::Text => "text",
            ValueType::Uuid => "uuid",
            ValueType::Bool => "bool",
            ValueType::Json => "json",
        }
    }

    /// What a value must look like (for messages).
    pub fn expected(self) -> &'static str {
        match self {
            ValueType::Int => "an integer between -9223372036854775808 and 9223372036854775807",
            ValueType::Float => "a number",
            ValueType::Numeric => "a decimal number (a JSON number or a string such as \"12.50\")",
            ValueType::Text => "a string",
            ValueType::Uuid => "a UUID string",
            ValueType::Bool => "true or false",
            ValueType::Json => "any JSON value",
        }
    }

    /// The Postgres text form of a JSON value of this type, or `None` if it is not one. `raw` is the
    /// value's JSON text (never `null`: the caller handles it).
    fn text_of(self, raw: &str) -> Option<String> {
        let string = || serde_json::from_str::<String>(raw).ok();
        let number = raw.starts_with(|c: char| c == '-' || c.is_ascii_digit());
        match self {
            ValueType::Int => {
                let text = if number { raw.to_owned() } else { string()? };
                text.parse::<i64>().ok().map(|n| n.to_string())
            }
            ValueType::Float => {
                if number {
                    Some(raw.to_owned())
                } else {
                    let s = string()?;
                    matches!(s.as_str(), "NaN" | "Infinity" | "-Infinity").then_some(s)
                }
            }
            ValueType::Numeric => {
                if number {
                    Some(raw.to_owned())
                } else {
                    let s = string()?;
                    (is_decimal(&s) || s == "NaN").then_some(s)
                }
            }
            ValueType::Text => string(),
            ValueType::Uuid => match ParamType::Uuid.parse_value(&string()?) {
                Some(crate::primer::ParamValue::Uuid(u)) => Some(u),
                _ => None,
            },
            ValueType::Bool => match raw {
                "true" | "false" => Some(raw.to_owned()),
                _ => None,
            },
            ValueType::Json => Some(raw.to_owned()),
        }
    }
}

/// `[+-]digits[.digits][e[+-]digits]` (or `.digits`): what Postgres' numeric input takes.
fn is_decimal(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int) && digits(frac) && !(int.is_empty() && frac.is_empty());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdaterParam {
    pub name: String,
    pub ty: ValueType,
    /// May be `null` or left out (then SQL `NULL`). Default false.
    pub nullable: bool,
}

/// One statement of an updater.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    /// `uses[i]`: whether `$i+1` appears; its length is the highest placeholder (at most the parameter
    /// count). Parameters below the highest that the statement does not use are declared `text`, since
    /// Postgres cannot infer their type.
    pub uses: Vec<bool>,
}

/// A named write. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updater {
    pub name: String,
    pub params: Vec<UpdaterParam>,
    pub statements: Vec<Statement>,
    /// Who may run it when authentication is on (`None`: any valid token).
    pub access: Option<Access>,
}

/// The request body does not fit the updater's parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("the body must be a JSON object of parameters, such as {{\"user_id\": 42}}")]
    NotAnObject,
    #[error("missing parameter '{name}' ({expected})")]
    Missing {
        name: String,
        expected: &'static str,
    },
    #[error("unknown parameter '{name}': updater '{updater}' takes {known}")]
    Unknown {
        name: String,
        updater: String,
        known: String,
    },
    #[error("parameter '{name}' must be {expected}")]
    BadValue {
        name: String,
        expected: &'static str,
    },
    #[error("parameter '{name}' may not be null ({expected})")]
    Null {
        name: String,
        expected: &'static str,
    },
}

impl ArgError {
    /// The parameter the error is about.
    pub fn param(&self) -> Option<&str> {
        match self {
            ArgError::NotAnObject => None,
            ArgError::Missing { name, .. }
            | ArgError::Unknown { name, .. }
            | ArgError::BadValue { name, .. }
            | ArgError::Null { name, .. } => Some(name),
        }
    }
}

/// The Postgres text form of each parameter (`None`: SQL `NULL`), in declared order, from a JSON body.
/// An empty body counts as `{}`.
pub fn parse_args(updater: &Updater, body: &[u8]) -> Result<Vec<Option<String>>, ArgError> {
    let trimmed = body.trim_ascii();
    let given: BTreeMap<String, Box<RawValue>> = if trimmed.is_empty() {
        BTreeMap::new()
    } else {
        if !trimmed.starts_with(b"{") {
            return Err(ArgError::NotAnObject);
        }
        serde_json::from_slice(trimmed).map_err(|_| ArgError::NotAnObject)?
    };
    if let Some(name) = given
        .keys()
        .find(|k| !updater.params.iter().any(|p| &p.name == *k))
    {
        let known = if updater.params.is_empty() {
            "no parameters".to_owned()
        } else {
            updater
                .params
                .iter()
                .map(|p| format!("{} ({})", p.name, p.ty))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(ArgError::Unknown {
            name: name.clone(),
            updater: updater.name.clone(),
            known,
        });
    }
    let mut args = Vec::with_capacity(updater.params.len());
    for p in &updater.params {
        let expected = p.ty.expected();
        let raw = match given.get(&p.name) {
            None if p.nullable => {
                args.push(None);
                continue;
            }
            None => {
                return Err(ArgError::Missing {
                    name: p.name.clone(),
                    expected,
                });
            }
            Some(raw) => raw.get(),
        };
        if raw == "null" {
            if p.nullable {
                args.push(None);
                continue;
            }
            if p.ty != ValueType::Json {
                return Err(ArgError::Null {
                    name: p.name.clone(),
                    expected,
                });
            }
        }
        match p.ty.text_of(raw) {
            Some(text) => args.push(Some(text)),
            None => {
                return Err(ArgError::BadValue {
                    name: p.name.clone(),
                    expected,
                });
            }
        }
    }
    Ok(args)
}

/// An update failed. Nothing was written, except where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("no Postgres connection for updates: {source}")]
    Pool {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("statement {statement} of updater '{updater}' failed: {source}")]
    Statement {
        updater: String,
        /// 1-based.
        statement: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The transaction could not start (or set its timeout).
    #[error("updater '{updater}' could not start its transaction: {source}")]
    Begin {
        updater: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// COMMIT failed. With a database error (a deferred constraint, a serialization failure) nothing was
    /// written; when the connection failed instead, the outcome is unknown.
    #[error("committing updater '{updater}' failed: {source}")]
    Commit {
        updater: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the update task failed: {0}")]
    Task(String),
}

impl UpdateError {
    /// The Postgres error behind this one, if the server reported one.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            UpdateError::Statement { source, .. }
            | UpdateError::Begin { source, .. }
            | UpdateError::Commit { source, .. } => source.as_db_error(),
            _ => None,
        }
    }

    /// Whether running the transaction again may succeed (serialization failure, deadlock).
    fn is_retryable(&self) -> bool {
        self.db_error().is_some_and(|db| {
            *db.code() == SqlState::T_R_SERIALIZATION_FAILURE
                || *db.code() == SqlState::T_R_DEADLOCK_DETECTED
        })
    }
}

/// A committed update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Rows each statement affected, in order.
    pub rows: Vec<u64>,
    /// A WAL position at or after the end of the commit (see [`commit_lsn_bound`]); `None` if it could not
    /// be read after the commit (the write is committed all the same).
    pub lsn: Option<Lsn>,
}

/// Runs updaters. See the module docs.
pub struct Updates {
    by_name: HashMap<String, Arc<Updater>>,
    pool: Pool,
    statement_timeout: Duration,
    /// (`wal_block_size`, `wal_segment_size`), read once.
    wal_geometry: OnceCell<(u64, u64)>,
}

/// Attempts of a transaction that fails with a serialization failure or a deadlock.
const ATTEMPTS: usize = 3;

impl Updates {
    pub fn new(
        source: &crate::pg::Source,
        pool_size: usize,
        updaters: Vec<Updater>,
        statement_timeout: Duration,
    ) -> Result<Updates, UpdateError> {
        let pool = crate::pg::pool(source.pg.clone(), &source.tls, pool_size)
            .map_err(|e| UpdateError::Pool { source: e.into() })?;
        Ok(Updates {
            by_name: updaters
                .into_iter()
                .map(|u| (u.name.clone(), Arc::new(u)))
                .collect(),
            pool,
            statement_timeout,
            wal_geometry: OnceCell::new(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Updater>> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Run `updater` with `args` (from [`parse_args`]) in one transaction, retried on serialization
    /// failures and deadlocks. Runs to completion even if the caller stops waiting.
    pub async fn run(
        self: &Arc<Self>,
        updater: Arc<Updater>,
        args: Vec<Option<String>>,
    ) -> Result<Outcome, UpdateError> {
        let this = self.clone();
        let task = tokio::spawn(async move {
            let mut attempt = 1;
            loop {
                match this.run_once(&updater, &args).await {
                    Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                        tracing::debug!(updater = %updater.name, attempt, error = %crate::report::Chain(&e), "Retrying the update.");
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(10 * attempt as u64)).await;
                    }
                    result => return result,
                }
            }
        });
        task.await.map_err(|e| UpdateError::Task(e.to_string()))?
    }

    async fn run_once(
        &self,
        updater: &Updater,
        args: &[Option<String>],
    ) -> Result<Outcome, UpdateError> {
        let name = || updater.name.clone();
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| UpdateError::Pool { source: e.into() })?;
        let geometry = self
            .wal_geometry
            .get_or_try_init(|| async {
                let row = client
                    .query_one(
                        "SELECT current_setting('wal_block_size')::bigint, \
                         pg_size_bytes(current_setting('wal_segment_size'))",
                        &[],
                    )
                    .await?;
                let (block, segment): (i64, i64) = (row.get(0), row.get(1));
                Ok::<_, tokio_postgres::Error>((block.max(1) as u64, segment.max(1) as u64))
            })
            .await
            .map_err(|source| UpdateError::Begin {
                updater: name(),
                source,
            })
            .copied()?;
        let params: Vec<TextParam<'_>> = args.iter().map(|a| TextParam(a.as_deref())).collect();
        let mut rows = Vec::with_capacity(updater.statements.len());
        let tx = client
            .transaction()
            .await
            .map_err(|source| UpdateError::Begin {
                updater: name(),
                source,
            })?;
        // A commit kck reports must survive a crash, and the replication stream only sees flushed WAL:
        // `synchronous_commit = off` becomes `local` for this transaction (stronger settings are kept).
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}; \
             SELECT set_config('synchronous_commit', 'local', true) \
             WHERE current_setting('synchronous_commit') = 'off'",
            self.statement_timeout.as_millis().max(1)
        ))
        .await
        .map_err(|source| UpdateError::Begin {
            updater: name(),
            source,
        })?;
        for (i, statement) in updater.statements.iter().enumerate() {
            let failed = |source| UpdateError::Statement {
                updater: name(),
                statement: i + 1,
                source,
            };
            // Used parameters get their type from the statement; unused ones below the highest must be
            // declared, or Postgres cannot type them.
            let types: Vec<Type> = statement
                .uses
                .iter()
                .map(|&used| if used { Type::UNKNOWN } else { Type::TEXT })
                .collect();
            let prepared = tx
                .prepare_typed_cached(&statement.sql, &types)
                .await
                .map_err(failed)?;
            let refs: Vec<&(dyn ToSql + Sync)> = params[..statement.uses.len()]
                .iter()
                .map(|p| p as &(dyn ToSql + Sync))
                .collect();
            rows.push(tx.execute(&prepared, &refs).await.map_err(failed)?);
        }
        tx.commit().await.map_err(|source| UpdateError::Commit {
            updater: name(),
            source,
        })?;
        // Committed: from here on, nothing may turn this into an error.
        let lsn = match client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
        {
            Ok(row) => row
                .get::<_, String>(0)
                .parse::<Lsn>()
                .ok()
                .map(|l| commit_lsn_bound(l, geometry.0, geometry.1)),
            Err(error) => {
                tracing::warn!(updater = %updater.name, error = %crate::report::Chain(&error), "Committed, but cannot read the WAL position.");
                None
            }
        };
        Ok(Outcome { rows, lsn })
    }
}

/// The LSN kck reports for a commit, from `pg_current_wal_insert_lsn()` read on the same connection right
/// after COMMIT returned (`insert`): an upper bound of the commit record's end, exact when no other session
/// wrote WAL in between, except that an insert position just past a page header (the commit ended exactly
/// at a page boundary) is moved back to the boundary. No record can end inside a page header, so the
/// result is still at or after the commit's end, and it is a position the replication stream reports (a
/// commit's end), so a wait for it does not hang until the next, unrelated WAL record.
pub fn commit_lsn_bound(insert: Lsn, block_size: u64, segment_size: u64) -> Lsn {
    /// `SizeOfXLogLongPHD` (first page of a segment) and `SizeOfXLogShortPHD`.
    const LONG_HEADER: u64 = 40;
    const SHORT_HEADER: u64 = 24;
    let at = insert.0;
    if segment_size > LONG_HEADER && at % segment_size == LONG_HEADER {
        Lsn(at - LONG_HEADER)
    } else if block_size > SHORT_HEADER && at % block_size == SHORT_HEADER {
        Lsn(at - SHORT_HEADER)
    } else {
        insert
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/updater_args.rs`): the first byte of `data` picks how many
/// parameters (0-4, named `a` to `d`) the updater declares, the next one per parameter its type and
/// whether it is nullable; the rest is the request body. [`parse_args`] must never panic, and what it
/// accepts has one value per parameter, `None` only for nullable ones, in each type's Postgres text form.
#[doc(hidden)]
pub fn fuzz_args(data: &[u8]) {
    const TYPES: [ValueType; 7] = [
        ValueType::Int,
        ValueType::Float,
        ValueType::Numeric,
        ValueType::Text,
        ValueType::Uuid,
        ValueType::Bool,
        ValueType::Json,
    ];
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 5).min(rest.len());
    let (types, body) = rest.split_at(count);
    let updater = Updater {
        name: "fuzz".to_owned(),
        params: types
            .iter()
            .zip(["a", "b", "c", "d"])
            .map(|(&t, name)| UpdaterParam {
                name: name.to_owned(),
                ty: TYPES[usize::from(t) % TYPES.len()],
                nullable: t & 0x80 != 0,
            })
            .collect(),
        statements: Vec::new(),
        access: None,
    };
    let Ok(args) = parse_args(&updater, body) else {
        return;
    };
    assert_eq!(args.len(), updater.params.len());
    for (p, arg) in updater.params.iter().zip(&args) {
        let Some(text) = arg else {
            assert!(p.nullable, "NULL for a parameter that is not nullable");
            continue;
        };
        match p.ty {
            ValueType::Int => assert!(text.parse::<i64>().is_ok(), "{text:?}"),
            ValueType::Uuid => assert_eq!(text.len(), 36, "{text:?}"),
            ValueType::Bool => assert!(text == "true" || text == "false"),
            ValueType::Numeric => assert!(text == "NaN" || !text.is_empty()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn updater(params: &[(&str, ValueType, bool)]) -> Updater {
        Updater {
            name: "u".into(),
            params: params
                .iter()
                .map(|(n, ty, nullable)| UpdaterParam {
                    name: n.to_string(),
                    ty: *ty,
                    nullable: *nullable,
                })
                .collect(),
            statements: vec![],
            access: None,
        }
    }

    fn args(u: &Updater, body: &str) -> Result<Vec<Option<String>>, ArgError> {
        parse_args(u, body.as_bytes())
    }

    fn some(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|s| Some(s.to_string())).collect()
    }

    #[test]
    fn arguments_are_typed_and_named_in_errors() {
        use ValueType::*;
        let u = updater(&[
            ("id", Int, false),
            ("price", Numeric, false),
            ("name", Text, false),
            ("ref", Uuid, false),
            ("ok", Bool, false),
            ("doc", Json, false),
            ("ratio", Float, false),
        ]);
        let body = r#"{"id": 42, "price": 12345678901234567890.125, "name": "ada", "ok": true,
            "ref": "0F8FAD5BD9CB469FA16570867728950E", "doc": {"a": [1, 2]}, "ratio": 1.5e3}"#;
        assert_eq!(
            args(&u, body).unwrap(),
            some(&[
                "42",
                "12345678901234567890.125",
                "ada",
                "0f8fad5b-d9cb-469f-a165-70867728950e",
                "true",
                r#"{"a": [1, 2]}"#,
                "1.5e3"
            ])
        );
        let with = |field: &str, value: &str| {
            let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
            v[field] = serde_json::from_str(value).unwrap();
            args(&u, &v.to_string())
        };
        assert_eq!(with("id", r#""-7""#).unwrap()[0].as_deref(), Some("-7"));
        assert_eq!(
            with("price", r#""-0.50""#).unwrap()[1].as_deref(),
            Some("-0.50")
        );
        for (field, bad) in [
            ("id", "1.5"),
            ("id", r#""x""#),
            ("id", "99999999999999999999"),
            ("price", r#""12,5""#),
            ("price", "true"),
            ("name", "42"),
            ("ref", r#""not-a-uuid""#),
            ("ok", r#""true""#),
            ("ratio", r#""fast""#),
        ] {
            let err = with(field, bad).unwrap_err();
            assert_eq!(err.param(), Some(field), "{field}: {bad}: {err}");
            assert!(matches!(err, ArgError::BadValue { .. }), "{err}");
        }
        assert!(matches!(with("name", "null"), Err(ArgError::Null { .. })));
        assert_eq!(with("doc", "null").unwrap()[5].as_deref(), Some("null"));
        let err = args(&u, r#"{"id": 1}"#).unwrap_err();
        assert_eq!(err.param(), Some("price"));
        assert!(
            err.to_string().contains("missing parameter 'price'"),
            "{err}"
        );
        let err = with("nme", r#""x""#).unwrap_err();
        assert!(matches!(err, ArgError::Unknown { .. }), "{err}");
        assert!(err.to_string().contains("'nme'") && err.to_string().contains("name (text)"));
        assert_eq!(args(&u, "[1]"), Err(ArgError::NotAnObject));
        assert_eq!(args(&u, "{"), Err(ArgError::NotAnObject));
    }

    #[test]
    fn nullable_parameters_may_be_null_or_absent() {
        let u = updater(&[
            ("id", ValueType::Int, false),
            ("note", ValueType::Text, true),
        ]);
        assert_eq!(
            args(&u, r#"{"id": 1}"#).unwrap(),
            vec![Some("1".into()), None]
        );
        assert_eq!(
            args(&u, r#"{"id": 1, "note": null}"#).unwrap(),
            vec![Some("1".into()), None]
        );
        let none = updater(&[]);
        assert_eq!(args(&none, "").unwrap(), Vec::<Option<String>>::new());
        assert_eq!(args(&none, " {} ").unwrap(), Vec::<Option<String>>::new());
    }

    #[test]
    fn decimals() {
        for ok in ["1", "-1", "+1.5", ".5", "5.", "1e10", "1.5E-3"] {
            assert!(is_decimal(ok), "{ok}");
        }
        for bad in ["", ".", "e5", "1e", "1.2.3", "0x10", "1 ", "--1"] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }

    #[test]
    fn commit_lsn_bound_steps_back_over_page_headers_only() {
        let (block, segment) = (8192, 16 << 20);
        assert_eq!(
            commit_lsn_bound(Lsn(8192 * 3 + 24), block, segment),
            Lsn(8192 * 3)
        );
        assert_eq!(
            commit_lsn_bound(Lsn(segment * 2 + 40), block, segment),
            Lsn(segment * 2)
        );
        for at in [8192 * 3 + 32, 8192 * 3, segment + 48, 1000] {
            assert_eq!(commit_lsn_bound(Lsn(at), block, segment), Lsn(at));
        }
    }
}
