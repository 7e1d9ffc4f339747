//! `kck check`: everything about the live database that would stop kck, make it wrong or make it costly,
//! reported at once before anything runs, one line per finding, each problem with its fix.
//!
//! It lives in `ops` (not in `cli`) because `kck run` runs part of it too: [`primers`], the checks of
//! each primer against the live database, whose failures `app::start` refuses to serve with (a query that
//! does not prepare, a `depends_on` naming a column the table does not have).
//!
//! It uses the same checks as start-up ([`crate::replication`]'s `check_*` and `read_*` functions), and
//! adds what start-up only finds out later: tables and columns named in dependencies, SELECT privilege,
//! whether each primer's query and each lookup prepares and how Postgres types its parameters, replica
//! identity, what the publication publishes, and the slot's WAL.

use std::collections::BTreeSet;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::deps::DepIndex;
use crate::ops::size::format_bytes;
use crate::pg::quote_table;
use crate::pg::{Source, SourceConfig};
use crate::primer::{Catalog, Mapping, ParamType, Primer, TableName};
use crate::refresh::{wrapped_lookup, wrapped_query};
use crate::replication;
use crate::report::count;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// As it should be.
    Ok,
    /// Worth knowing; not a problem.
    Note,
    /// kck works, but wrongly costly or at risk: a problem.
    Warn,
    /// kck will not start, or will be wrong: a problem.
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Note => "note",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked: `wal_level`, `publication`, `primer user`, `table public.orders`, `slot`...
    pub topic: String,
    /// What was found and, for a problem, what to do.
    pub message: String,
}

/// Everything `kck check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, level: Level, topic: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            topic: topic.into(),
            message: message.into(),
        });
    }

    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// Failures and warnings.
    pub fn problems(&self) -> usize {
        self.count(Level::Fail) + self.count(Level::Warn)
    }

    /// The failures, one line each as [`Report::to_text`] writes them.
    pub fn failures(&self) -> String {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Fail)
            .map(|f| format!("{} {}: {}\n", f.level.label(), f.topic, f.message))
            .collect()
    }

    /// One line per finding and a summary line.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&format!("{} {}: {}\n", f.level.label(), f.topic, f.message));
        }
        let (fails, warns, notes) = (
            self.count(Level::Fail),
            self.count(Level::Warn),
            self.count(Level::Note),
        );
        if fails + warns == 0 {
            out.push_str(&format!(
                "check: no problems ({} passed, {})\n",
                count(self.count(Level::Ok) as u64, "check", "checks"),
                count(notes as u64, "note", "notes"),
            ));
        } else {
            out.push_str(&format!(
                "check: {}: {}, {} ({})\n",
                count((fails + warns) as u64, "problem", "problems"),
                count(fails as u64, "failure", "failures"),
                count(warns as u64, "warning", "warnings"),
                count(notes as u64, "note", "notes"),
            ));
        }
        out
    }
}

/// The server's message for a Postgres error, with its detail and hint.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    crate::pg::error_text(e)
}

/// Run every check against the database of `source` (with `replication_role`: the replication
/// connection too).
pub async fn run(source: &SourceConfig, catalog: &Catalog, replication_role: bool) -> Report {
    let mut report = Report::default();
    let source = match Source::new(source) {
        Ok(source) => source,
        Err(e) => {
            report.push(
                Level::Fail,
                "connection",
                format!("{e}. Fix source.url (or KCK_SOURCE_URL)."),
            );
            return report;
        }
    };
    let client = match source.connect().await {
        Ok(client) => client,
        Err(e) => {
            report.push(Level::Fail, "connection", e.to_string());
            return report;
        }
    };
    report.push(Level::Ok, "tls", source.tls.describe());
    if replication_role {
        replication_connection(&mut report, &source).await;
    }
    server(&mut report, &client, &source).await;
    // What each primer's query reads, from its plan; the checks below see the inferred dependencies.
    let catalog = dependencies(&mut report, &client, catalog).await;
    let deps = DepIndex::new(std::sync::Arc::new(catalog.clone()));
    let published_ok = publication(&mut report, &client, &source, &deps).await;
    let _ = published_ok;
    tables(&mut report, &client, &catalog).await;
    for primer in &catalog.primers {
        primer_query(&mut report, &client, primer).await;
        lookups(&mut report, &client, primer).await;
    }
    slot(&mut report, &client, &source).await;
    report
}

/// The HTTP exposure check ([`crate::http::exposure_warning`]): a WARN when kck would serve every key to
/// anyone on the network.
pub fn exposure(report: &mut Report, bind: std::net::SocketAddr, auth: &crate::auth::AuthConfig) {
    match crate::http::exposure_warning(bind, auth) {
        Some(why) => report.push(Level::Warn, "exposure", why),
        None => report.push(
            Level::Ok,
            "exposure",
            if auth.jwt.is_some() {
                format!("http.bind {bind}, authentication on")
            } else {
                format!("http.bind {bind} is loopback only (authentication off)")
            },
        ),
    }
}

/// The checks of the primers alone (what `kck run` runs before it serves): each primer's dependencies
/// against its query's plan, the tables and columns they name, and that each query and lookup prepares as
/// kck runs it. The same findings, in the same words, as [`run`] gives for them.
pub async fn primers(client: &Client, catalog: &Catalog) -> Report {
    let mut report = Report::default();
    let catalog = dependencies(&mut report, client, catalog).await;
    tables(&mut report, client, &catalog).await;
    for primer in &catalog.primers {
        primer_query(&mut report, client, primer).await;
        lookups(&mut report, client, primer).await;
    }
    report
}

/// Open the replication connection as `kck run` does and run IDENTIFY_SYSTEM on it: its pg_hba line, auth
/// method and TLS are not the ordinary connection's.
async fn replication_connection(report: &mut Report, source: &Source) {
    match replication::probe(source).await {
        Ok(system) => report.push(
            Level::Ok,
            "replication connection",
            format!(
                "IDENTIFY_SYSTEM answered (system {}, timeline {}, WAL at {})",
                system.system_id, system.timeline, system.xlogpos
            ),
        ),
        Err(e) => report.push(Level::Fail, "replication connection", e.to_string()),
    }
}

/// Check every primer's dependencies against its query's plan (`crate::plan`); the catalog as kck would
/// run it (a primer without `depends_on` follows every table its query reads).
async fn dependencies(report: &mut Report, client: &Client, catalog: &Catalog) -> Catalog {
    let mut primers = catalog.primers.clone();
    for primer in &mut primers {
        let topic = format!("primer {}", primer.name);
        if let Err(e) = crate::plan::resolve_names(client, primer).await {
            report.push(Level::Fail, &topic, e.to_string());
            continue;
        }
        let reads = match crate::plan::reads(client, primer).await {
            Ok(reads) => reads,
            Err(e) => {
                report.push(Level::Fail, &topic, e.to_string());
                continue;
            }
        };
        for warning in crate::plan::contradictions(primer, &reads) {
            report.push(Level::Warn, &topic, warning);
        }
        match crate::plan::apply(primer, &reads) {
            Ok(added) if !added.is_empty() => {
                let tables: Vec<String> = added
                    .iter()
                    .map(|(t, how)| format!("{t}: {}", how.describe(primer)))
                    .collect();
                let level = if added.iter().any(|(_, how)| how.is_table_level()) {
                    " A table followed at table level refreshes every cached key on each change: give \
                     depends_on with columns or a lookup for it to refresh fewer."
                } else {
                    ""
                };
                report.push(
                    Level::Note,
                    &topic,
                    format!(
                        "no depends_on: kck follows what its plan reads: {}.{level}",
                        tables.join("; ")
                    ),
                );
            }
            Ok(_) => report.push(
                Level::Ok,
                &topic,
                "depends_on lists every table the query reads".to_owned(),
            ),
            Err(e) => report.push(Level::Fail, &topic, e.to_string()),
        }
    }
    Catalog::new(primers).unwrap_or_else(|_| catalog.clone())
}

async fn server(report: &mut Report, client: &Client, source: &Source) {
    let version = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int",
            &[],
        )
        .await;
    match version {
        Ok(row) => {
            let (version, num): (String, i32) = (row.get(0), row.get(1));
            if num < 140000 {
                report.push(
                    Level::Fail,
                    "connection",
                    format!(
                        "connected to {}, but it runs PostgreSQL {version}; kck needs 14 or newer. Upgrade \
                         Postgres.",
                        source.display()
                    ),
                );
            } else {
                report.push(
                    Level::Ok,
                    "connection",
                    format!("connected to {} (PostgreSQL {version})", source.display()),
                );
            }
        }
        Err(e) => report.push(
            Level::Fail,
            "connection",
            format!("cannot read the server version: {}", pg_message(&e)),
        ),
    }
    match replication::read_wal_level(client).await {
        Ok(level) => match replication::check_wal_level(&level) {
            Ok(()) => report.push(Level::Ok, "wal_level", "logical"),
            Err(e) => report.push(Level::Fail, "wal_level", e.to_string()),
        },
        Err(e) => report.push(Level::Fail, "wal_level", e.to_string()),
    }
    match replication::read_role(client).await {
        Ok(role) => match role.check() {
            Ok(()) => report.push(
                Level::Ok,
                "privilege",
                format!(
                    "role '{}' may stream changes ({})",
                    role.role,
                    if role.superuser {
                        "superuser"
                    } else {
                        "REPLICATION"
                    }
                ),
            ),
            Err(e) => report.push(Level::Fail, "privilege", e.to_string()),
        },
        Err(e) => report.push(Level::Fail, "privilege", e.to_string()),
    }
    match client
        .query_one("SELECT current_setting('max_slot_wal_keep_size')", &[])
        .await
    {
        Ok(row) => {
            let value: String = row.get(0);
            if value == "-1" {
                report.push(
                    Level::Note,
                    "max_slot_wal_keep_size",
                    "-1: a slot whose reader stops (kck down, or stuck) keeps WAL without limit and can fill \
                     the database server's disk. Consider a cap, e.g. ALTER SYSTEM SET \
                     max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf(); (past it Postgres \
                     invalidates the slot, and kck follows source.on_slot_lost)",
                );
            } else {
                report.push(
                    Level::Ok,
                    "max_slot_wal_keep_size",
                    format!(
                        "{value}: a slot that falls further behind is invalidated (kck then follows \
                         source.on_slot_lost)"
                    ),
                );
            }
        }
        Err(e) => report.push(
            Level::Note,
            "max_slot_wal_keep_size",
            format!("cannot read it: {}", pg_message(&e)),
        ),
    }
}

/// The publication exists, covers the tables, and publishes every kind of change.
async fn publication(
    report: &mut Report,
    client: &Client,
    source: &Source,
    deps: &DepIndex,
) -> bool {
    let name = &source.config.publication;
    let topic = format!("publication {name}");
    let tables = replication::needed_tables(deps);
    let exists = match replication::publication_exists(client, name).await {
        Ok(exists) => exists,
        Err(e) => {
            report.push(Level::Fail, topic, e.to_string());
            return false;
        }
    };
    if !exists {
        if source.config.create_publication {
            report.push(
                Level::Note,
                topic,
                format!(
                    "does not exist; kck creates it at start (source.create_publication: true) FOR TABLE {} \
                     (this needs a role that owns those tables)",
                    replication::table_list(&tables)
                ),
            );
            return true;
        }
        let database = replication::read_role(client)
            .await
            .map(|r| r.database)
            .unwrap_or_default();
        let error = replication::ReplicationError::PublicationMissing {
            publication: name.clone(),
            database,
            tables: replication::table_list(&tables),
        };
        report.push(Level::Fail, topic, error.to_string());
        return false;
    }
    let published = match replication::published_tables(client, name).await {
        Ok(published) => published,
        Err(e) => {
            report.push(Level::Fail, topic, e.to_string());
            return false;
        }
    };
    match replication::check_published(name, &tables, &published) {
        Ok(()) => report.push(
            Level::Ok,
            topic.clone(),
            format!(
                "publishes every table the primers read ({})",
                tables
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Err(e) => report.push(Level::Fail, topic.clone(), e.to_string()),
    }
    let kinds = client
        .query_one(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[name],
        )
        .await;
    if let Ok(row) = kinds {
        let missing: Vec<&str> = ["insert", "update", "delete", "truncate"]
            .iter()
            .enumerate()
            .filter(|(i, _)| !row.get::<_, bool>(*i))
            .map(|(_, k)| *k)
            .collect();
        if !missing.is_empty() {
            report.push(
                Level::Fail,
                topic,
                format!(
                    "does not publish {}: kck never hears of those changes and serves stale values. Run: \
                     ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                    missing.join(", "),
                    crate::pg::quote_ident(name)
                ),
            );
        }
    }
    partitions(report, client, name, &tables).await;
    true
}

/// For each partitioned table primers read: how the publication streams its changes (the two modes of
/// `publish_via_partition_root`) and that kck follows either.
async fn partitions(
    report: &mut Report,
    client: &Client,
    publication: &str,
    tables: &[&TableName],
) {
    let via_root = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, bool>(0));
    let Some(via_root) = via_root else { return };
    for table in tables {
        let leaves = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_partition_tree(format('%I.%I', $1::text, $2::text)::regclass) t \
                 JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE t.isleaf AND t.level > 0 ORDER BY 1, 2",
                &[&table.schema, &table.name],
            )
            .await;
        let Ok(leaves) = leaves else { continue };
        if leaves.is_empty() {
            continue;
        }
        let leaves: Vec<String> = leaves
            .iter()
            .map(|r| {
                TableName {
                    schema: r.get(0),
                    name: r.get(1),
                }
                .to_string()
            })
            .collect();
        let how = if via_root {
            format!(
                "publish_via_partition_root = true: Postgres streams changes to its partitions ({}) as {table}'s",
                leaves.join(", ")
            )
        } else {
            format!(
                "publish_via_partition_root = false (the default): Postgres streams changes as its leaf \
                 partitions' ({}); kck maps each to {table}'s dependencies",
                leaves.join(", ")
            )
        };
        report.push(
            Level::Ok,
            format!("partitioned table {table}"),
            format!(
                "{how}. Partitions attached later are followed the same way; either mode works."
            ),
        );
    }
}

/// What `pg_class`/`pg_attribute` say about one table.
pub struct TableFacts {
    pub columns: Vec<String>,
    /// `d` default, `f` full, `i` index, `n` nothing.
    pub identity: char,
    /// The columns Postgres sends in an old row image.
    pub identity_columns: BTreeSet<String>,
    /// Generated columns: Postgres (15) leaves them out of the replication stream.
    pub generated: BTreeSet<String>,
    pub may_select: bool,
}

pub async fn table_facts(client: &Client, table: &TableName) -> Result<Option<TableFacts>, String> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, has_table_privilege(c.oid, 'SELECT') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(|e| pg_message(&e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    let identity = identity.chars().next().unwrap_or('d');
    let may_select: bool = row.get(2);
    let rows = client
        .query(
            "SELECT attname::text, attgenerated <> '' FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(|e| pg_message(&e))?;
    let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let generated: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    let index_filter = match identity {
        'd' => "i.indisprimary",
        'i' => "i.indisreplident",
        _ => "false",
    };
    let identity_columns = client
        .query(
            &format!(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND {index_filter}"
            ),
            &[&oid],
        )
        .await
        .map_err(|e| pg_message(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Some(TableFacts {
        columns,
        identity,
        identity_columns,
        generated,
        may_select,
    }))
}

/// Tables exist, the role may read them, the columns dependencies name exist, and replica identity gives
/// the old values the mappings need.
async fn tables(report: &mut Report, client: &Client, catalog: &Catalog) {
    let mut tables: Vec<&TableName> = catalog
        .primers
        .iter()
        .flat_map(|p| p.dependencies.iter().map(|d| &d.table))
        .collect();
    tables.sort();
    tables.dedup();
    for table in tables {
        let topic = format!("table {table}");
        let facts = match table_facts(client, table).await {
            Ok(Some(facts)) => facts,
            Ok(None) => {
                let users: Vec<&str> = catalog
                    .primers
                    .iter()
                    .filter(|p| p.dependencies.iter().any(|d| &d.table == table))
                    .map(|p| p.name.as_str())
                    .collect();
                report.push(
                    Level::Fail,
                    topic,
                    format!(
                        "does not exist (named in depends_on of {}). Create it, or fix the table name \
                         (schema.table; unquoted names fold to lower case, quote mixed-case ones: '\"Orders\"').",
                        users.join(", ")
                    ),
                );
                continue;
            }
            Err(e) => {
                report.push(Level::Fail, topic, format!("cannot read it: {e}"));
                continue;
            }
        };
        let mut problems = false;
        if !facts.may_select {
            problems = true;
            report.push(
                Level::Fail,
                topic.clone(),
                format!(
                    "kck's role may not read it: every refresh of its primers fails. Run: GRANT SELECT ON {} \
                     TO <kck's role>;",
                    quote_table(table)
                ),
            );
        }
        let no_identity =
            facts.identity == 'n' || (facts.identity != 'f' && facts.identity_columns.is_empty());
        if no_identity {
            problems = true;
            report.push(
                Level::Fail,
                topic.clone(),
                format!(
                    "has no replica identity ({}): once it is in a publication that publishes updates and \
                     deletes, Postgres rejects every UPDATE and DELETE on it. Add a primary key, or run: \
                     ALTER TABLE {} REPLICA IDENTITY FULL;",
                    if facts.identity == 'n' {
                        "REPLICA IDENTITY NOTHING"
                    } else {
                        "no primary key"
                    },
                    quote_table(table)
                ),
            );
        }
        for primer in &catalog.primers {
            for dep in primer.dependencies.iter().filter(|d| &d.table == table) {
                let (kind, named): (&str, Vec<&str>) = match &dep.mapping {
                    Mapping::Columns(pairs) => {
                        ("columns", pairs.iter().map(|(_, c)| c.as_str()).collect())
                    }
                    Mapping::Lookup { args, .. } => {
                        ("lookup args", args.iter().map(String::as_str).collect())
                    }
                    Mapping::AllKeys => continue,
                };
                let missing: Vec<&str> = named
                    .iter()
                    .filter(|c| !facts.columns.iter().any(|have| have == *c))
                    .copied()
                    .collect();
                if !missing.is_empty() {
                    problems = true;
                    report.push(
                        Level::Fail,
                        topic.clone(),
                        format!(
                            "primer '{}' maps {kind} {} of it, but it has no such column (its columns: {}). \
                             Fix the primer's depends_on.",
                            primer.name,
                            missing.join(", "),
                            facts.columns.join(", ")
                        ),
                    );
                    continue;
                }
                let generated: Vec<&str> = named
                    .iter()
                    .filter(|c| facts.generated.contains(**c))
                    .copied()
                    .collect();
                if !generated.is_empty() {
                    problems = true;
                    report.push(
                        Level::Warn,
                        topic.clone(),
                        format!(
                            "primer '{}' maps generated column(s) {}: Postgres does not send generated columns \
                             in the replication stream, so every change to it refreshes all of the primer's \
                             cached keys (correct, but costly). Map the stored columns they are computed from \
                             instead (a lookup can compute the key from them).",
                            primer.name,
                            generated.join(", ")
                        ),
                    );
                    continue;
                }
                let outside: Vec<&str> = named
                    .iter()
                    .filter(|c| !facts.identity_columns.contains(**c))
                    .copied()
                    .collect();
                if facts.identity != 'f' && !outside.is_empty() && !no_identity {
                    problems = true;
                    report.push(
                        Level::Warn,
                        topic.clone(),
                        format!(
                            "primer '{}' maps {} outside its replica identity ({}): Postgres does not send \
                             their old values, so every UPDATE and DELETE of it refreshes all of the \
                             primer's cached keys (correct, but costly). To refresh only the affected keys, \
                             run: ALTER TABLE {} REPLICA IDENTITY FULL;",
                            primer.name,
                            outside.join(", "),
                            if facts.identity_columns.is_empty() {
                                "none".to_string()
                            } else {
                                facts
                                    .identity_columns
                                    .iter()
                                    .cloned()
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            },
                            quote_table(table)
                        ),
                    );
                }
            }
        }
        if !problems {
            let identity = match facts.identity {
                'f' => "FULL".to_string(),
                'i' => "USING INDEX".to_string(),
                _ => format!(
                    "DEFAULT (key: {})",
                    facts
                        .identity_columns
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            report.push(
                Level::Ok,
                topic,
                format!("exists, readable, columns named by dependencies exist, replica identity {identity} is enough"),
            );
        }
    }
}

/// Postgres type names a key parameter of `ty` binds to without trouble, and the note or warning otherwise.
fn param_fit(param: &str, ty: ParamType, pg: &Type) -> Option<(Level, String)> {
    let name = pg.name();
    let textual = matches!(name, "text" | "varchar" | "bpchar" | "name" | "citext");
    match ty {
        ParamType::Int => match name {
            "int8" | "numeric" | "float8" | "float4" | "oid" => None,
            _ if textual => None,
            "int4" | "int2" => Some((
                Level::Note,
                format!(
                    "Postgres reads it as {name}: a key value outside {name}'s range answers 502 \
                     (value out of range)"
                ),
            )),
            _ => Some((
                Level::Warn,
                format!(
                    "it is an int key parameter but Postgres reads it as {name}: an integer is not valid \
                     {name} input, so fetches fail. Change the key parameter's type or cast in the query"
                ),
            )),
        },
        ParamType::Uuid => match name {
            "uuid" => None,
            _ if textual => None,
            _ => Some((
                Level::Warn,
                format!(
                    "it is a uuid key parameter but Postgres reads it as {name}: fetches fail. Change the key \
                     parameter's type or cast in the query"
                ),
            )),
        },
        ParamType::Text => match name {
            _ if textual => None,
            "int2" | "int4" | "int8" | "numeric" => Some((
                Level::Warn,
                format!(
                    "it is a text key parameter but Postgres reads it as {name}: a key whose value is not a \
                     number answers 502. Declare it as {{{param}:int}} in the key template"
                ),
            )),
            "uuid" => Some((
                Level::Warn,
                format!(
                    "it is a text key parameter but Postgres reads it as uuid: a key whose value is not a \
                     UUID answers 502. Declare it as {{{param}:uuid}} in the key template"
                ),
            )),
            _ => Some((
                Level::Note,
                format!("Postgres reads it as {name}: key values must be valid {name} input"),
            )),
        },
    }
}

/// The primer's query (as kck runs it, wrapped) prepares, with the template's parameters.
async fn primer_query(report: &mut Report, client: &Client, primer: &Primer) {
    let topic = format!("primer {}", primer.name);
    let sql = wrapped_query(&primer.query, primer.shape);
    let statement = match client.prepare(&sql).await {
        Ok(statement) => statement,
        Err(e) => {
            report.push(
                Level::Fail,
                topic,
                format!(
                    "its query does not prepare: {}. Fix the primer's query (kck wraps it as a subquery to \
                     build the JSON, so it must be a single SELECT whose columns have distinct names).",
                    pg_message(&e)
                ),
            );
            return;
        }
    };
    let params = statement.params();
    let template = &primer.template.params;
    if params.len() != template.len() {
        report.push(
            Level::Fail,
            topic,
            format!(
                "its query takes {} but the key template {} has {}: kck binds the key's \
                 parameters as $1..$n in template order.",
                count(params.len() as u64, "parameter", "parameters"),
                primer.template.source,
                template.len()
            ),
        );
        return;
    }
    let mut worst = Level::Ok;
    let mut parts = Vec::new();
    for (i, (param, pg)) in template.iter().zip(params).enumerate() {
        let mut part = format!("${} {}:{} as {}", i + 1, param.name, param.ty, pg.name());
        if let Some((level, why)) = param_fit(&param.name, param.ty, pg) {
            worst = worst.max(level);
            part.push_str(&format!(" ({why})"));
        }
        parts.push(part);
    }
    let message = if parts.is_empty() {
        "its query prepares (no parameters)".to_string()
    } else {
        format!(
            "its query prepares; Postgres types the parameters: {}",
            parts.join("; ")
        )
    };
    report.push(worst, topic, message);
}

/// Each lookup prepares, takes its args, and returns a column per key parameter.
async fn lookups(report: &mut Report, client: &Client, primer: &Primer) {
    for (i, dep) in primer.dependencies.iter().enumerate() {
        let Mapping::Lookup { query, args } = &dep.mapping else {
            continue;
        };
        let topic = format!("primer {} depends_on[{i}] lookup", primer.name);
        let raw = match client.prepare(query).await {
            Ok(s) => s,
            Err(e) => {
                report.push(
                    Level::Fail,
                    topic,
                    format!(
                        "does not prepare: {}. Fix the lookup query.",
                        pg_message(&e)
                    ),
                );
                continue;
            }
        };
        if let Err(e) = client.prepare(&wrapped_lookup(query)).await {
            report.push(
                Level::Fail,
                topic,
                format!(
                    "does not prepare as kck runs it (wrapped in row_to_json): {}",
                    pg_message(&e)
                ),
            );
            continue;
        }
        if raw.params().len() != args.len() {
            report.push(
                Level::Fail,
                topic,
                format!(
                    "takes {} but lists {} ({}): each arg is bound as $1..$n in order.",
                    count(raw.params().len() as u64, "parameter", "parameters"),
                    count(args.len() as u64, "arg", "args"),
                    args.join(", ")
                ),
            );
            continue;
        }
        let columns: Vec<&str> = raw.columns().iter().map(|c| c.name()).collect();
        let missing: Vec<&str> = primer
            .template
            .params
            .iter()
            .map(|p| p.name.as_str())
            .filter(|p| !columns.contains(p))
            .collect();
        if !missing.is_empty() {
            report.push(
                Level::Fail,
                topic,
                format!(
                    "returns columns ({}) but must return one named like each key parameter; missing: {}. \
                     Alias them (SELECT o.user_id AS user_id ...).",
                    columns.join(", "),
                    missing.join(", ")
                ),
            );
            continue;
        }
        let typed: Vec<String> = args
            .iter()
            .zip(raw.params())
            .enumerate()
            .map(|(i, (a, t))| format!("${} {a} as {}", i + 1, t.name()))
            .collect();
        report.push(
            Level::Ok,
            topic,
            format!(
                "prepares on table {}; args {}; returns {}",
                dep.table,
                typed.join(", "),
                columns.join(", ")
            ),
        );
    }
}

async fn slot(report: &mut Report, client: &Client, source: &Source) {
    let name = &source.config.slot;
    let topic = format!("slot {name}");
    let info = match replication::read_slot(client, name).await {
        Ok(info) => info,
        Err(e) => {
            report.push(Level::Fail, topic, e.to_string());
            return;
        }
    };
    let Some(info) = info else {
        let room = client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots)::int8, \
                 current_setting('max_replication_slots')::int8",
                &[],
            )
            .await;
        match room {
            Ok(row) if row.get::<_, i64>(0) >= row.get::<_, i64>(1) => report.push(
                Level::Fail,
                topic,
                format!(
                    "does not exist, and all {} replication slots of the server are taken: kck cannot create \
                     it. Drop an unused slot (SELECT slot_name, active FROM pg_replication_slots) or raise \
                     max_replication_slots (needs a restart).",
                    row.get::<_, i64>(1)
                ),
            ),
            _ => report.push(
                Level::Note,
                topic,
                "does not exist yet; kck creates it (pgoutput) when it starts",
            ),
        }
        return;
    };
    let database = replication::read_role(client)
        .await
        .map(|r| r.database)
        .unwrap_or_default();
    if let Err(e) = info.check(&database) {
        report.push(Level::Fail, topic, e.to_string());
        return;
    }
    let holder = if info.active {
        let app = match info.active_pid {
            Some(pid) => client
                .query_opt(
                    "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get::<_, String>(0)),
            None => None,
        };
        format!(
            "held by pid {} (application_name '{}'; a running kck shows as 'kck')",
            info.active_pid.map_or("?".into(), |p| p.to_string()),
            app.unwrap_or_default()
        )
    } else {
        "not held by any session: Postgres keeps WAL for it until kck reads it".to_string()
    };
    let confirmed = info
        .confirmed_flush
        .map_or_else(|| "-".to_string(), |l| l.to_string());
    report.push(
        Level::Ok,
        topic.clone(),
        format!("pgoutput slot of this database, {holder}; confirmed up to {confirmed}"),
    );
    match info.wal_status.as_deref() {
        Some("unreserved") => report.push(
            Level::Fail,
            topic.clone(),
            "wal_status = unreserved: it retains more WAL than max_slot_wal_keep_size and Postgres \
             invalidates it at the next checkpoint unless its reader catches up. Start kck (or see why it \
             is behind: kck status), or raise max_slot_wal_keep_size.",
        ),
        Some("extended") => report.push(
            Level::Note,
            topic.clone(),
            "wal_status = extended: it retains more WAL than max_wal_size (still safe)",
        ),
        _ => {}
    }
    if let Some(retained) = info.retained_bytes() {
        let max = source.config.max_retained_wal;
        if retained > max {
            report.push(
                Level::Warn,
                topic,
                crate::ops::slot::retained_message(&info, retained, max),
            );
        } else {
            report.push(
                Level::Ok,
                topic,
                format!(
                    "retains {} of WAL (source.max_retained_wal: {})",
                    format_bytes(retained),
                    format_bytes(max)
                ),
            );
        }
    }
}
