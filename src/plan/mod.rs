//! What a primer's query reads, from Postgres's own plan, so that no table it reads goes unwatched.
//!
//! For each primer, kck asks for its generic plan: `EXPLAIN (GENERIC_PLAN, VERBOSE, FORMAT JSON, COSTS
//! OFF)` on Postgres 16+, before that a prepared statement with `SET plan_cache_mode = force_generic_plan`,
//! then `EXPLAIN (VERBOSE, FORMAT JSON, COSTS OFF) EXECUTE` with null arguments ([`GenericPlan`]). The
//! plan names every base relation the query reads, with views expanded and every CTE, subquery (`IN`,
//! `EXISTS`, scalar), `LATERAL` and `UNION` branch included. [`complete`] then makes the catalog safe:
//! - a primer without `depends_on` follows every table its plan reads at table level (any change refreshes
//!   every cached key of the primer), and kck says so;
//! - a primer whose `depends_on` omits a table its plan reads is an error that names the table and the
//!   entry to add. Never silently stale (invariant 4).
//!
//! A function scan in the plan (`FROM some_function()`) may read tables the plan cannot show: a primer
//! whose plan has one must give `depends_on` (and is told so).

use serde_json::Value;
use tokio_postgres::Client;

use crate::pg::error_text;
use crate::primer::{Catalog, Dependency, Mapping, ParamType, Primer, TableName};

pub mod expr;

/// One scan of a base relation in the plan: its alias and its conditions as Postgres printed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub table: TableName,
    pub alias: String,
    /// `Filter`, `Index Cond` and `Recheck Cond` of the scan (and of a bitmap index scan below it).
    pub conditions: Vec<String>,
    /// The indexes it scans (`Index Name`, its own or its bitmap index scans'): an index's order and a
    /// partial index's predicate are reads the plan's expressions do not show.
    pub indexes: Vec<String>,
}

/// A column's type and whether its equality is its text's (for inferring a column map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    pub name: String,
    /// `format_type` of the column: `integer`, `text`, `character varying(20)`, `uuid`...
    pub type_name: String,
    /// Whether its collation is deterministic (equal only when the bytes are).
    pub deterministic: bool,
}

/// How changes to one table reach a primer's keys, inferred from the plan (a primer without
/// `depends_on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inferred {
    /// Each scan of the table holds `column = $n` for every key parameter: a changed row refreshes the
    /// keys its columns name. One mapping per distinct scan.
    Columns(Vec<Vec<(usize, String)>>),
    /// Some scans hold a column map, the others reach a scan that does only through equality join
    /// conditions: a changed row runs each lookup (SQL with the changed row's columns, in `args` order, as
    /// `$1..$n`) to find the keys it affects.
    Lookups {
        columns: Vec<Vec<(usize, String)>>,
        lookups: Vec<(String, Vec<String>)>,
    },
    /// Every cached key of the primer, and why no column map holds.
    TableLevel(String),
}

/// What the plan of one query reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// Base relations, each once, in the order the plan names them.
    pub tables: Vec<TableName>,
    /// Functions scanned as relations (`FROM f()`), `schema.name`: they may read tables the plan hides.
    pub functions: Vec<String>,
    /// For a table that is a partition: its ancestors, the root last (filled by [`reads`]; empty for a
    /// table that is not a partition). A `depends_on` on an ancestor covers the partition.
    pub ancestors: Vec<(TableName, Vec<TableName>)>,
    /// Every scan of a base relation, with its conditions.
    pub scans: Vec<Scan>,
    /// Parameters the plan makes for itself (`InitPlan 1 (returns $0)`): printed like the key's `$n`.
    pub internal_params: Vec<usize>,
    /// The functions and SQL value keywords the plan's expressions use (`now`, `CURRENT_USER`...).
    pub calls: Vec<String>,
    /// For each table with a scan whose conditions name a key parameter: its columns' types.
    pub column_types: Vec<(TableName, Vec<ColumnType>)>,
    /// Every join node of the plan (nested loop, hash or merge join), with the aliases on each side.
    pub joins: Vec<Join>,
    /// Every column reference and parameter in the plan's expressions, all nodes together.
    pub refs: expr::Refs,
    /// A node whose result can depend on the order of rows among ties (`Limit`, `Unique`, `WindowAgg`):
    /// any UPDATE may move a row in that order, so column relevance does not apply.
    pub order_sensitive: Option<String>,
    /// For each index a scan uses (`schema.index`): its key columns, or `None` for a partial or
    /// expression index (filled by [`reads`]).
    pub index_columns: Vec<(String, Option<Vec<String>>)>,
    /// The columns of each table the plan scans (filled by [`reads`]).
    pub table_columns: Vec<(TableName, Vec<String>)>,
    /// Foreign tables the plan scans (`Foreign Scan`): Postgres cannot publish their changes.
    pub foreign: Vec<TableName>,
}

/// One join node of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// `Inner`, `Left`, `Right`, `Full`, `Semi`, `Anti`... as Postgres prints it.
    pub kind: String,
    /// Aliases of the scans below its outer and inner children.
    pub outer: Vec<String>,
    pub inner: Vec<String>,
    /// `Hash Cond`, `Merge Cond` and `Join Filter` of the node.
    pub conditions: Vec<String>,
}

impl Reads {
    /// `table`'s ancestors (see [`Reads::ancestors`]).
    fn ancestors_of(&self, table: &TableName) -> &[TableName] {
        self.ancestors
            .iter()
            .find(|(t, _)| t == table)
            .map_or(&[], |(_, a)| a.as_slice())
    }
}

/// Cannot find out, or what was found leaves a primer stale.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot plan the query of primer '{primer}': {}", error_text(source))]
    Plan {
        primer: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the plan of primer '{primer}' is not the JSON kck expects: {reason}")]
    Unreadable { primer: String, reason: String },
    #[error(
        "primer '{primer}' reads {tables} (its query's plan says so), but its depends_on does not list {them}: \
         a change there would leave its cached keys stale. Add to depends_on: {entries} (with `columns` or \
         a `lookup` to refresh fewer keys than all), or remove depends_on to let kck follow every table the \
         query reads (or, for a table that is not published, list it in `not_followed` and give the primer a \
         ttl or refresh_interval)"
    )]
    Missing {
        primer: String,
        tables: String,
        them: &'static str,
        entries: String,
    },
    #[error(
        "primer '{primer}' has no depends_on and its query calls function {functions}, which may read \
         tables its plan does not show: give depends_on listing the tables the function reads (or declare \
         the function IMMUTABLE if it reads none)"
    )]
    Function { primer: String, functions: String },
    #[error(
        "primer '{primer}' calls {functions}, whose result changes without any table changing (time, \
         randomness, the session), so the stream can never say when its keys are stale: give the primer a \
         `ttl` or a `refresh_interval` (or compute the value in the client)"
    )]
    Volatile { primer: String, functions: String },
    #[error(
        "primer '{primer}' reads foreign table {tables}: Postgres cannot publish a foreign table's changes, so \
         the stream would never say when its keys are stale. List it in the primer's `not_followed` and give \
         the primer a `ttl` or `refresh_interval` (or cache the remote data in a local table)"
    )]
    Foreign { primer: String, tables: String },
}

/// Collect what a plan (`EXPLAIN (FORMAT JSON)` output: `[{"Plan": {...}}]`) reads.
pub fn reads_of(explain: &Value) -> Result<Reads, String> {
    let plans = explain
        .as_array()
        .ok_or("not a JSON array")?
        .iter()
        .filter_map(|p| p.get("Plan"))
        .collect::<Vec<_>>();
    if plans.is_empty() {
        return Err("no \"Plan\" in the answer".into());
    }
    let mut reads = Reads::default();
    for plan in plans {
        walk(plan, &mut reads, 0, false)?;
    }
    Ok(reads)
}

/// The keys of a plan node whose values are expressions (strings, or arrays of strings).
const EXPRESSION_KEYS: &[&str] = &[
    "Output",
    "Filter",
    "Index Cond",
    "Recheck Cond",
    "Join Filter",
    "Hash Cond",
    "Merge Cond",
    "One-Time Filter",
    "Sort Key",
    "Presorted Key",
    "Group Key",
    "Hash Key",
    "Cache Key",
    "Run Condition",
    "Order By",
    "TID Cond",
    "Function Call",
    "Table Function Call",
];

/// Nodes that hand their input's rows up unchanged: their `Output` is their input's.
const PASS_THROUGH: &[&str] = &[
    "Sort",
    "Incremental Sort",
    "Hash",
    "Materialize",
    "Memoize",
    "Gather",
    "Gather Merge",
    "Limit",
    "Unique",
    "LockRows",
];

/// Nodes that compute their own output from their inputs' columns and print every column they use (in
/// their `Output`, conditions and keys). Not `Append` and `Merge Append`: what is printed above them names
/// only their first member's columns.
const CONSUMERS: &[&str] = &[
    "Aggregate",
    "Group",
    "Hash Join",
    "Merge Join",
    "Nested Loop",
    "Result",
    "ProjectSet",
];

/// Walk one plan node and those below it; the aliases of the scans below it. `consumed`: the nearest node
/// above that is not a pass-through one is a consumer, which names every column it takes from below, so this
/// node's `Output` (a scan's may be all of its table's columns, Postgres's "physical tlist") says nothing
/// about what the query reads when it is a scan or a pass-through node.
fn walk(
    node: &Value,
    reads: &mut Reads,
    depth: usize,
    consumed: bool,
) -> Result<Vec<String>, String> {
    if depth > 200 {
        return Err("the plan is nested too deep".into());
    }
    let text = |k: &str| node.get(k).and_then(Value::as_str);
    let mut aliases = Vec::new();
    if node
        .get("Subplans Removed")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        > 0
    {
        // Pruned partitions do not show in the plan: kck would not know it reads them.
        return Err(
            "the plan pruned partitions, so it does not name every table the query reads".into(),
        );
    }
    for key in EXPRESSION_KEYS {
        let values: Vec<&str> = match node.get(*key) {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let passed_up = *key == "Output"
            && consumed
            && (node.get("Relation Name").is_some()
                || text("Node Type").is_some_and(|t| PASS_THROUGH.contains(&t)));
        for v in values {
            if !passed_up {
                expr::refs(v, &mut reads.refs);
            }
            for f in expr::functions(v) {
                if !reads.calls.contains(&f) {
                    reads.calls.push(f);
                }
            }
        }
    }
    // `InitPlan 1 (returns $0)`, `SubPlan 2`: parameters the plan sets for itself.
    if let Some(name) = text("Subplan Name")
        && let Some(returns) = name.split("returns ").nth(1)
    {
        for p in returns.trim_end_matches(')').split(',') {
            if let Ok(n) = p.trim().trim_start_matches('$').parse::<usize>() {
                reads.internal_params.push(n);
            }
        }
    }
    if let Some(name) = text("Relation Name") {
        let table = TableName {
            schema: text("Schema").unwrap_or("public").to_owned(),
            name: name.to_owned(),
        };
        let mut conditions: Vec<String> = ["Filter", "Index Cond", "Recheck Cond"]
            .iter()
            .filter_map(|k| text(k).map(str::to_owned))
            .collect();
        // A bitmap heap scan's index conditions are on its bitmap index scans below.
        for child in node
            .get("Plans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if child.get("Node Type").and_then(Value::as_str) == Some("Bitmap Index Scan")
                && let Some(c) = child.get("Index Cond").and_then(Value::as_str)
            {
                conditions.push(c.to_owned());
            }
        }
        let mut indexes: Vec<String> = text("Index Name").map(str::to_owned).into_iter().collect();
        for child in node
            .get("Plans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(index) = child.get("Index Name").and_then(Value::as_str)
                && !indexes.iter().any(|i| i == index)
            {
                indexes.push(index.to_owned());
            }
        }
        if text("Node Type") == Some("Foreign Scan") && !reads.foreign.contains(&table) {
            reads.foreign.push(table.clone());
        }
        let alias = text("Alias").unwrap_or(name).to_owned();
        aliases.push(alias.clone());
        reads.scans.push(Scan {
            table: table.clone(),
            alias,
            conditions,
            indexes,
        });
        if !reads.tables.contains(&table) {
            reads.tables.push(table);
        }
    }
    if let Some(kind @ ("Limit" | "Unique" | "WindowAgg")) = text("Node Type")
        && reads.order_sensitive.is_none()
    {
        reads.order_sensitive = Some(kind.to_owned());
    }
    // Postgres's own functions (generate_series, unnest, jsonb_each...) read no tables.
    if text("Node Type") == Some("Function Scan")
        && let Some(name) = text("Function Name")
        && text("Schema") != Some("pg_catalog")
    {
        let f = format!("{}.{name}", text("Schema").unwrap_or("public"));
        if !reads.functions.contains(&f) {
            reads.functions.push(f);
        }
    }
    let (mut outer, mut inner) = (Vec::new(), Vec::new());
    for child in node
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let kind = text("Node Type").unwrap_or("");
        let child_consumed = match child.get("Parent Relationship").and_then(Value::as_str) {
            // A sub-plan's result is used by an expression that does not name its columns.
            Some("SubPlan" | "InitPlan") => false,
            _ if PASS_THROUGH.contains(&kind) => consumed,
            _ => CONSUMERS.contains(&kind),
        };
        let below = walk(child, reads, depth + 1, child_consumed)?;
        match child.get("Parent Relationship").and_then(Value::as_str) {
            Some("Outer") => outer.extend(below.iter().cloned()),
            Some("Inner") => inner.extend(below.iter().cloned()),
            _ => {}
        }
        aliases.extend(below);
    }
    if matches!(
        text("Node Type"),
        Some("Nested Loop" | "Hash Join" | "Merge Join")
    ) {
        reads.joins.push(Join {
            kind: text("Join Type").unwrap_or("").to_owned(),
            outer,
            inner,
            conditions: ["Hash Cond", "Merge Cond", "Join Filter"]
                .iter()
                .filter_map(|k| text(k).map(str::to_owned))
                .collect(),
        });
    }
    Ok(aliases)
}

/// Ask Postgres what `primer`'s query reads. Uses (and leaves) a prepared statement on `client` only for the
/// duration of the call.
pub async fn reads(client: &Client, primer: &Primer) -> Result<Reads, PlanError> {
    let plan_error = |source| PlanError::Plan {
        primer: primer.name.clone(),
        source,
    };
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(plan_error)?
        .get(0);
    let sql = GenericPlan::new(version, &primer.query, primer.template.params.len());
    // The connection may be shared (`kck check`): touch only our own statement and settings, and put them
    // back whatever happens.
    client.batch_execute(&sql.setup).await.map_err(plan_error)?;
    if let Some(prepare) = &sql.prepare
        && let Err(e) = client.batch_execute(prepare).await
    {
        let _ = client.batch_execute(&sql.reset).await;
        return Err(plan_error(e));
    }
    // The simple protocol answers in text: the plan's JSON as Postgres wrote it.
    let answer = client.simple_query(&sql.explain).await;
    let teardown = match &sql.deallocate {
        Some(deallocate) => format!("{deallocate}; {}", sql.reset),
        None => sql.reset.clone(),
    };
    let deallocate = client.batch_execute(&teardown).await;
    let messages = answer.map_err(plan_error)?;
    deallocate.map_err(plan_error)?;
    let text = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| PlanError::Unreadable {
            primer: primer.name.clone(),
            reason: "EXPLAIN returned no row".into(),
        })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| PlanError::Unreadable {
        primer: primer.name.clone(),
        reason: e.to_string(),
    })?;
    let mut reads = reads_of(&json).map_err(|reason| PlanError::Unreadable {
        primer: primer.name.clone(),
        reason,
    })?;
    // A partitioned table is planned as its partitions; know their parents.
    for table in &reads.tables {
        let ancestors = crate::pg::partition_ancestors(client, table)
            .await
            .map_err(plan_error)?;
        if !ancestors.is_empty() {
            reads.ancestors.push((table.clone(), ancestors));
        }
    }
    // Every scanned table's columns, and the key columns of the indexes its scans use (for column
    // relevance: `columns_read`).
    for table in &reads.tables {
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a \
                 WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass AND a.attnum > 0 \
                   AND NOT a.attisdropped ORDER BY a.attnum",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(plan_error)?;
        reads
            .table_columns
            .push((table.clone(), rows.iter().map(|r| r.get(0)).collect()));
    }
    let mut indexes: Vec<(String, String)> = Vec::new();
    for scan in &reads.scans {
        for index in &scan.indexes {
            let pair = (scan.table.schema.clone(), index.clone());
            if !indexes.contains(&pair) {
                indexes.push(pair);
            }
        }
    }
    for (schema, index) in indexes {
        let row = client
            .query_opt(
                "SELECT i.indpred IS NULL AND i.indexprs IS NULL, \
                        array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) k \
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k) \
                 FROM pg_index i WHERE i.indexrelid = to_regclass(format('%I.%I', $1::text, $2::text))",
                &[&schema, &index],
            )
            .await
            .map_err(plan_error)?;
        let columns = row.and_then(|r| r.get::<_, bool>(0).then(|| r.get::<_, Vec<String>>(1)));
        reads
            .index_columns
            .push((format!("{schema}.{index}"), columns));
    }
    // The types of the tables whose scans compare a column with a key parameter.
    let candidates: Vec<TableName> = reads
        .scans
        .iter()
        .filter(|s| {
            s.conditions
                .iter()
                .any(|c| !expr::equalities(c, &s.alias).is_empty())
        })
        .map(|s| s.table.clone())
        .collect();
    for table in candidates {
        if reads.column_types.iter().any(|(t, _)| *t == table) {
            continue;
        }
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), coalesce(co.collisdeterministic, true) \
                 FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation \
                 WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass AND a.attnum > 0 \
                   AND NOT a.attisdropped",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(plan_error)?;
        let types = rows
            .iter()
            .map(|r| ColumnType {
                name: r.get(0),
                type_name: r.get(1),
                deterministic: r.get(2),
            })
            .collect();
        reads.column_types.push((table, types));
    }
    // Volatility of the functions the plan calls, from pg_proc: see `volatile_calls`.
    // and functions of the application's own that may read tables the plan cannot show.
    let mut volatile = Vec::new();
    for call in &reads.calls {
        if is_volatile(client, call).await.map_err(plan_error)? {
            volatile.push(call.clone());
        }
        if let Some(f) = may_read_tables(client, call).await.map_err(plan_error)?
            && !reads.functions.contains(&f)
        {
            reads.functions.push(f);
        }
    }
    reads.calls = volatile;
    Ok(reads)
}

/// The statements that ask a server for a query's generic plan (the plan for any key, `$n` unknown): on
/// Postgres 16 and later `EXPLAIN (GENERIC_PLAN)` of the query itself; before, a prepared statement
/// planned with `plan_cache_mode = force_generic_plan` and explained with null arguments. Partition pruning
/// is off either way, so the plan names every partition the query may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenericPlan {
    pub setup: String,
    pub prepare: Option<String>,
    pub explain: String,
    pub deallocate: Option<String>,
    pub reset: String,
}

impl GenericPlan {
    /// For a server whose `server_version_num` is `version`, a query with `params` key parameters.
    pub fn new(version: i32, query: &str, params: usize) -> GenericPlan {
        const OPTIONS: &str = "VERBOSE, FORMAT JSON, COSTS OFF";
        if version >= 160_000 {
            return GenericPlan {
                setup: "SET enable_partition_pruning = off".into(),
                prepare: None,
                explain: format!("EXPLAIN (GENERIC_PLAN, {OPTIONS}) {query}"),
                deallocate: None,
                reset: "RESET enable_partition_pruning".into(),
            };
        }
        let args = vec!["NULL"; params].join(", ");
        let execute = if args.is_empty() {
            "EXECUTE kck_plan".to_owned()
        } else {
            format!("EXECUTE kck_plan({args})")
        };
        GenericPlan {
            setup: "SET plan_cache_mode = force_generic_plan; SET enable_partition_pruning = off"
                .into(),
            prepare: Some(format!("PREPARE kck_plan AS {query}")),
            explain: format!("EXPLAIN ({OPTIONS}) {execute}"),
            deallocate: Some("DEALLOCATE kck_plan".into()),
            reset: "RESET plan_cache_mode; RESET enable_partition_pruning".into(),
        }
    }
}

/// The SQL value keywords whose value is the session's or the clock's.
const VOLATILE_KEYWORDS: &[&str] = &[
    "CURRENT_USER",
    "SESSION_USER",
    "CURRENT_ROLE",
    "CURRENT_TIMESTAMP",
    "CURRENT_DATE",
    "CURRENT_TIME",
    "LOCALTIME",
    "LOCALTIMESTAMP",
];

/// Built-in stable functions whose value moves with the clock or the session, not with tables.
const CLOCK_AND_SESSION: &[&str] = &[
    "now",
    "statement_timestamp",
    "transaction_timestamp",
    "current_setting",
    "current_schema",
    "current_schemas",
    "current_user",
    "session_user",
    "inet_client_addr",
    "inet_client_port",
    "pg_backend_pid",
    // age(x) is measured from today (age(a, b) is not, but the name does not say which).
    "age",
];

/// Whether calling `name` (`name` or `schema.name`, or a SQL value keyword) can give another answer
/// while no table changes: a volatile function (`random`, `clock_timestamp`, `nextval`...), a built-in
/// that reads the clock or the session, or a keyword such as `CURRENT_USER`.
async fn is_volatile(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    if VOLATILE_KEYWORDS.contains(&name) {
        return Ok(true);
    }
    // Volatile, but returning void: they change no value (a query made slow on purpose).
    if matches!(
        name,
        "pg_sleep" | "pg_sleep_for" | "pg_sleep_until" | "pg_catalog.pg_sleep"
    ) {
        return Ok(false);
    }
    let (schema, func) = match name.split_once('.') {
        Some((s, f)) => (Some(s), f),
        None => (None, name),
    };
    if schema.is_none_or(|s| s == "pg_catalog") && CLOCK_AND_SESSION.contains(&func) {
        return Ok(true);
    }
    let row = client
        .query_one(
            "SELECT coalesce(bool_or(p.provolatile = 'v'), false) FROM pg_proc p \
             JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.proname = $1 AND ($2::text IS NULL OR n.nspname = $2)",
            &[&func, &schema],
        )
        .await?;
    Ok(row.get(0))
}

/// `schema.name` when `call` names a function outside pg_catalog that is not IMMUTABLE (a PL/pgSQL or
/// not-inlined SQL function may read tables its caller's plan does not show); None for built-ins and for
/// immutable functions (which promise to read no table).
async fn may_read_tables(
    client: &Client,
    call: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    if call.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return Ok(None);
    }
    let (schema, func) = match call.split_once('.') {
        Some((s, f)) => (Some(s), f),
        None => (None, call),
    };
    let row = client
        .query_opt(
            "SELECT n.nspname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.proname = $1 AND ($2::text IS NULL OR n.nspname = $2) \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND p.provolatile <> 'i' \
             ORDER BY 1 LIMIT 1",
            &[&func, &schema],
        )
        .await?;
    Ok(row.map(|r| format!("{}.{func}", r.get::<_, String>(0))))
}

/// How changes to `table` reach `primer`'s keys, from the plan's scans of it (see [`Inferred`]).
pub fn infer(primer: &Primer, reads: &Reads, table: &TableName) -> Inferred {
    let params = &primer.template.params;
    if params.is_empty() {
        return Inferred::TableLevel("the key has no parameters: its one key is refreshed".into());
    }
    if let Some(n) = reads
        .internal_params
        .iter()
        .find(|n| (1..=params.len()).contains(*n))
    {
        return Inferred::TableLevel(format!(
            "the plan's own parameter ${n} (a sub-plan's result) prints like the key's ${n}"
        ));
    }
    let mut mappings: Vec<Vec<(usize, String)>> = Vec::new();
    let mut lookups: Vec<(String, Vec<String>)> = Vec::new();
    for scan in reads.scans.iter().filter(|s| &s.table == table) {
        match scan_mapping(primer, reads, scan) {
            Ok(mapping) => {
                if !mappings.contains(&mapping) {
                    mappings.push(mapping);
                }
            }
            Err(why) => match lookup_for(primer, reads, scan) {
                Some(lookup) => {
                    if !lookups.contains(&lookup) {
                        lookups.push(lookup);
                    }
                }
                None => {
                    return Inferred::TableLevel(format!(
                        "{why}, and no equality join condition ties it to a scan that has one"
                    ));
                }
            },
        }
    }
    if mappings.is_empty() && lookups.is_empty() {
        return Inferred::TableLevel("the plan has no scan of it".into());
    }
    if lookups.is_empty() {
        return Inferred::Columns(mappings);
    }
    Inferred::Lookups {
        columns: mappings,
        lookups,
    }
}

/// The types of `table`'s columns, as [`reads`] found them.
fn types_of<'a>(reads: &'a Reads, table: &TableName) -> &'a [ColumnType] {
    reads
        .column_types
        .iter()
        .find(|(t, _)| t == table)
        .map(|(_, c)| c.as_slice())
        .unwrap_or(&[])
}

/// `scan`'s column map (`column = $n` for every key parameter), or why it has none.
fn scan_mapping(
    primer: &Primer,
    reads: &Reads,
    scan: &Scan,
) -> Result<Vec<(usize, String)>, String> {
    let params = &primer.template.params;
    let types = types_of(reads, &scan.table);
    let pairs: Vec<(String, usize)> = scan
        .conditions
        .iter()
        .flat_map(|c| expr::equalities(c, &scan.alias))
        .collect();
    let mut mapping = Vec::with_capacity(params.len());
    for (i, param) in params.iter().enumerate() {
        let Some((column, _)) = pairs.iter().find(|(column, n)| {
            *n == i + 1
                && types
                    .iter()
                    .any(|t| &t.name == column && equal_as_text(param.ty, t))
        }) else {
            return Err(match pairs.iter().find(|(_, n)| *n == i + 1) {
                Some((column, _)) => format!(
                    "its scan compares {column} with key parameter {}, but {column}'s type does not \
                     compare as the key's text does",
                    param.name
                ),
                None => format!(
                    "a scan of it ({}) has no condition `column = ${}` for key parameter {}",
                    scan.alias,
                    i + 1,
                    param.name
                ),
            });
        };
        mapping.push((i, column.clone()));
    }
    Ok(mapping)
}

/// One step of a lookup's path: the scan's alias, its predecessor's index, and the pairs (predecessor's
/// column, its column) that tie them.
type Step = (String, usize, Vec<(String, String)>);

/// How far a derived lookup may reach through the plan (tables joined between the changed one and the
/// keyed one, the keyed one included).
const MAX_HOPS: usize = 4;

/// Equality conditions that tie rows of `from` (an alias) to rows of other scans, where every row of `from`
/// that reaches the result matched such a row: `(other alias, [(column of from, column of other)])`.
/// - A join node with `from` on one side: an inner or semi join, or `from` on the side an outer or anti join
///   does not preserve; its own conditions and (a nested loop's parameters) those of the scans on its inner
///   side.
/// - `from`'s own scan conditions that name another scan's column (a correlated sub-plan's, or a nested
///   loop's parameter): a row of `from` that fails them takes no part in the outer row's result.
fn ties(reads: &Reads, from: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut add = |pairs: &[expr::ColumnPair], others: &dyn Fn(&str) -> bool| {
        for (a, b) in pairs {
            let (mine, theirs) = if a.0 == from && others(&b.0) {
                (&a.1, b)
            } else if b.0 == from && others(&a.0) {
                (&b.1, a)
            } else {
                continue;
            };
            let pair = (mine.clone(), theirs.1.clone());
            match out.iter_mut().find(|(alias, _)| *alias == theirs.0) {
                Some((_, all)) => {
                    if !all.contains(&pair) {
                        all.push(pair);
                    }
                }
                None => out.push((theirs.0.clone(), vec![pair])),
            }
        }
    };
    for join in &reads.joins {
        let mine_outer = join.outer.iter().any(|a| a == from);
        let mine_inner = join.inner.iter().any(|a| a == from);
        if mine_outer == mine_inner {
            continue;
        }
        let safe = match join.kind.as_str() {
            "Inner" | "Semi" => true,
            "Left" | "Anti" => mine_inner,
            "Right" | "Right Anti" => mine_outer,
            _ => false,
        };
        if !safe {
            continue;
        }
        let others = if mine_outer { &join.inner } else { &join.outer };
        let mut conditions: Vec<&str> = join.conditions.iter().map(String::as_str).collect();
        for s in reads.scans.iter().filter(|s| join.inner.contains(&s.alias)) {
            conditions.extend(s.conditions.iter().map(String::as_str));
        }
        let pairs: Vec<expr::ColumnPair> = conditions
            .iter()
            .flat_map(|c| expr::column_equalities(c))
            .collect();
        add(&pairs, &|alias| others.iter().any(|o| o == alias));
    }
    for scan in reads.scans.iter().filter(|s| s.alias == from) {
        let pairs: Vec<expr::ColumnPair> = scan
            .conditions
            .iter()
            .flat_map(|c| expr::column_equalities(c))
            .collect();
        add(&pairs, &|alias| {
            alias != from && reads.scans.iter().any(|s| s.alias == alias)
        });
    }
    out
}

/// A lookup for `scan` (which has no column map): a path of [`ties`] from it to a scan that has one, at
/// most [`MAX_HOPS`] long. The lookup selects, from the keyed scan's table joined along the path, the key
/// columns of the rows tied to the changed row's columns:
/// `SELECT DISTINCT b.user_id AS user_id FROM orders b WHERE b.id = $1` for one hop,
/// `... FROM orders b JOIN order_items b1 ON b1.order_id = b.id WHERE b1.product_id = $1` for two. It runs
/// after the change is visible, so it sees the other tables at or after the change's commit; a change to
/// one of them refreshes the keys of its old and new rows through its own mapping, so no key is missed in
/// between.
fn lookup_for(primer: &Primer, reads: &Reads, scan: &Scan) -> Option<(String, Vec<String>)> {
    let scan_of = |alias: &str| reads.scans.iter().find(|s| s.alias == alias);
    // Breadth first: the shortest path, so the cheapest lookup. Each step: (alias, its predecessor's
    // index, the pairs (predecessor's column, its column)).
    let mut steps: Vec<Step> = vec![(scan.alias.clone(), usize::MAX, Vec::new())];
    let mut depth_of: Vec<usize> = vec![0];
    let mut next = 0;
    while next < steps.len() {
        let (alias, depth) = (steps[next].0.clone(), depth_of[next]);
        if next > 0
            && let Some(keyed) = scan_of(&alias)
            && let Ok(mapping) = scan_mapping(primer, reads, keyed)
        {
            return Some(lookup_sql(primer, reads, &steps, next, &mapping));
        }
        if depth < MAX_HOPS {
            for (to, pairs) in ties(reads, &alias) {
                if !steps.iter().any(|(a, ..)| *a == to) && scan_of(&to).is_some() {
                    steps.push((to, next, pairs));
                    depth_of.push(depth + 1);
                }
            }
        }
        next += 1;
    }
    None
}

/// The SQL of the lookup along `steps` (see [`lookup_for`]) ending at `last` (the keyed scan), and the
/// changed row's columns it binds, in `$n` order.
fn lookup_sql(
    primer: &Primer,
    reads: &Reads,
    steps: &[Step],
    last: usize,
    mapping: &[(usize, String)],
) -> (String, Vec<String>) {
    use crate::primer::Ident;
    // The path from the keyed scan back to the changed one: keyed, ..., the step after the changed scan.
    let mut path = vec![last];
    while steps[*path.last().unwrap_or(&0)].1 != 0 {
        let before = steps[*path.last().unwrap_or(&0)].1;
        path.push(before);
    }
    let table_of = |i: usize| {
        let alias = &steps[i].0;
        reads
            .scans
            .iter()
            .find(|s| s.alias == *alias)
            .map(|s| format!("{}.{}", Ident(&s.table.schema), Ident(&s.table.name)))
            .unwrap_or_default()
    };
    // `b` for the keyed table, `b1`, `b2`... towards the changed one.
    let name = |n: usize| {
        if n == 0 {
            "b".to_owned()
        } else {
            format!("b{n}")
        }
    };
    let mut from = format!("{} b", table_of(path[0]));
    for n in 1..path.len() {
        // steps[path[n - 1]]'s pairs: (column of path[n], column of path[n - 1]).
        let on: Vec<String> = steps[path[n - 1]]
            .2
            .iter()
            .map(|(theirs, mine)| {
                format!(
                    "{}.{} = {}.{}",
                    name(n),
                    Ident(theirs),
                    name(n - 1),
                    Ident(mine)
                )
            })
            .collect();
        from.push_str(&format!(
            " JOIN {} {} ON {}",
            table_of(path[n]),
            name(n),
            on.join(" AND ")
        ));
    }
    // The first step's pairs: (column of the changed scan, column of the table next to it).
    let first = path.len() - 1;
    let mut args: Vec<String> = Vec::new();
    let mut wheres: Vec<String> = Vec::new();
    for (changed, theirs) in &steps[path[first]].2 {
        if args.contains(changed) {
            continue;
        }
        args.push(changed.clone());
        wheres.push(format!(
            "{}.{} = ${}",
            name(first),
            Ident(theirs),
            args.len()
        ));
    }
    let select: Vec<String> = mapping
        .iter()
        .map(|(i, c)| {
            format!(
                "b.{} AS {}",
                Ident(c),
                Ident(&primer.template.params[*i].name)
            )
        })
        .collect();
    (
        format!(
            "SELECT DISTINCT {} FROM {from} WHERE {}",
            select.join(", "),
            wheres.join(" AND ")
        ),
        args,
    )
}

/// The system columns: Postgres does not send them in the stream, and `xmin`/`ctid` change with every
/// UPDATE.
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"];

/// For each table the plan reads, the columns the query reads from it, or why kck cannot know them. An
/// UPDATE that changes none of them cannot change the query's result (column relevance; see
/// `deps`). Every reference in the plan counts (outputs, conditions, sort and group keys, sub-plans), and
/// so do the key columns of an index a scan uses (its order can decide a result without any expression
/// naming the column). Unknown, never guessed: whole-row references, system columns, partial and
/// expression indexes (a predicate the planner proved is not printed), functions that may read tables,
/// parameters the plan prints that are not the key's, and nodes whose result can depend on the order of
/// rows among ties.
pub fn columns_read(
    reads: &Reads,
    key_params: usize,
) -> Vec<(TableName, Result<Vec<String>, String>)> {
    let global: Option<String> = if !reads.functions.is_empty() {
        Some(format!(
            "the query calls {}, which may read what its plan does not show",
            reads.functions.join(", ")
        ))
    } else if let Some(node) = &reads.order_sensitive {
        Some(format!(
            "its plan has a {node} node, whose result can depend on the order of rows among ties, which \
             any UPDATE can change"
        ))
    } else if let Some(n) = reads
        .refs
        .params
        .iter()
        .find(|n| !(1..=key_params).contains(*n) && !reads.internal_params.contains(*n))
    {
        Some(format!(
            "its plan prints parameter ${n}, which may stand for a column"
        ))
    } else {
        let mut aliases: Vec<&str> = reads.scans.iter().map(|s| s.alias.as_str()).collect();
        aliases.dedup();
        (!reads.refs.bare.is_empty() && aliases.len() > 1)
            .then(|| "its plan prints a column without its table".to_owned())
    };
    let mut out = Vec::new();
    for table in &reads.tables {
        if let Some(why) = &global {
            out.push((table.clone(), Err(why.clone())));
            continue;
        }
        let known: &[String] = reads
            .table_columns
            .iter()
            .find(|(t, _)| t == table)
            .map_or(&[], |(_, c)| c.as_slice());
        let mut columns: Vec<String> = Vec::new();
        let mut unknown: Option<String> = None;
        for scan in reads.scans.iter().filter(|s| &s.table == table) {
            let mut named: Vec<&str> = reads
                .refs
                .qualified
                .iter()
                .filter(|(q, _)| *q == scan.alias)
                .map(|(_, c)| c.as_str())
                .collect();
            // One relation in the query: EXPLAIN prints its columns bare.
            if reads.scans.len() == 1 {
                named.extend(reads.refs.bare.iter().map(String::as_str));
            }
            for index in &scan.indexes {
                let name = format!("{}.{index}", scan.table.schema);
                match reads.index_columns.iter().find(|(i, _)| *i == name) {
                    Some((_, Some(keys))) => named.extend(keys.iter().map(String::as_str)),
                    _ => {
                        unknown = Some(format!(
                            "its scan uses index {index}, a partial or expression index whose \
                             condition the plan does not print"
                        ))
                    }
                }
            }
            for c in named {
                if c == "*" {
                    unknown = Some("the query reads its whole rows".into());
                } else if SYSTEM_COLUMNS.contains(&c) {
                    unknown = Some(format!("the query reads its system column {c}"));
                } else if known.iter().any(|k| k == c) {
                    if !columns.iter().any(|k| k == c) {
                        columns.push(c.to_owned());
                    }
                } else if reads
                    .refs
                    .qualified
                    .iter()
                    .any(|(q, n)| *q == scan.alias && n == c)
                {
                    unknown = Some(format!("the plan names a column {c} it does not have"));
                }
            }
        }
        out.push((
            table.clone(),
            match unknown {
                Some(why) => Err(why),
                None => {
                    // In the table's own order, for messages and tests.
                    columns.sort_by_key(|c| known.iter().position(|k| k == c));
                    Ok(columns)
                }
            },
        ));
    }
    out
}

impl Inferred {
    /// `per key (user_id → id)`, or `every cached key: WHY`, for messages.
    pub fn describe(&self, primer: &Primer) -> String {
        match self {
            Inferred::Columns(mappings) => {
                let each: Vec<String> = mappings
                    .iter()
                    .map(|m| {
                        m.iter()
                            .map(|(i, c)| {
                                let name = primer.param_name(*i);
                                format!("{} → {name}", crate::primer::Ident(c))
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .collect();
                format!("per key ({})", each.join("; "))
            }
            Inferred::Lookups { columns, lookups } => {
                let mut parts: Vec<String> = Vec::new();
                if !columns.is_empty() {
                    parts.push(Inferred::Columns(columns.clone()).describe(primer));
                }
                for (query, args) in lookups {
                    parts.push(format!("lookup `{query}` with {}", args.join(", ")));
                }
                parts.join("; ")
            }
            Inferred::TableLevel(why) => format!("every cached key ({why})"),
        }
    }

    pub fn is_table_level(&self) -> bool {
        matches!(self, Inferred::TableLevel(_))
    }
}

/// Whether two values of `column` are equal exactly when their text is, for a key parameter of type `ty`:
/// integers for an int parameter, uuid for a uuid one, text or varchar with a deterministic collation for a
/// text one. (A case-insensitive collation, citext or char(n) compare unequal texts as equal: a column map
/// would then miss keys.)
fn equal_as_text(ty: ParamType, column: &ColumnType) -> bool {
    let t = column.type_name.as_str();
    match ty {
        ParamType::Int => matches!(t, "smallint" | "integer" | "bigint"),
        ParamType::Uuid => t == "uuid",
        ParamType::Text => {
            column.deterministic && (t == "text" || t.starts_with("character varying"))
        }
    }
}

/// What [`complete`] did to one primer, for the log and `kck check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub primer: String,
    /// Tables added (the primer gave no depends_on), each with how its changes map to keys.
    pub added: Vec<(TableName, Inferred)>,
    /// Hand-written `columns` maps the plan contradicts ([`contradictions`]).
    pub warnings: Vec<String>,
}

/// Check each primer's dependencies against what its query reads, and give a primer without
/// `depends_on` a table-level dependency on every table it reads. Errors name the primer, the tables and
/// the fix; the catalog is unchanged on error.
pub async fn complete(
    client: &Client,
    catalog: &Catalog,
) -> Result<(Catalog, Vec<Followed>), PlanError> {
    let mut primers = catalog.primers.clone();
    let mut followed = Vec::new();
    for primer in &mut primers {
        resolve_names(client, primer).await?;
        let reads = reads(client, primer).await?;
        let warnings = contradictions(primer, &reads);
        let added = apply(primer, &reads)?;
        if !added.is_empty() || !warnings.is_empty() {
            followed.push(Followed {
                primer: primer.name.clone(),
                added,
                warnings,
            });
        }
    }
    let catalog = Catalog::new(primers).map_err(|reason| PlanError::Unreadable {
        primer: String::new(),
        reason,
    })?;
    Ok((catalog, followed))
}

/// Look up the tables `primer` names without a schema in the source's `search_path` (as its query's own
/// unqualified names resolve), and name them by the schema found. A name that resolves to nothing stays
/// `public.name` (`kck check` and the plan then say it does not exist).
pub async fn resolve_names(client: &Client, primer: &mut Primer) -> Result<(), PlanError> {
    for table in std::mem::take(&mut primer.unqualified) {
        let row = client
            .query_opt(
                "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass(quote_ident($1))",
                &[&table.name],
            )
            .await
            .map_err(|e| PlanError::Unreadable {
                primer: primer.name.clone(),
                reason: format!(
                    "cannot look up table {} in the search_path: {}",
                    table.name,
                    crate::pg::error_text(&e)
                ),
            })?;
        let Some(schema) = row.map(|r| r.get::<_, String>(0)) else {
            continue;
        };
        if schema == table.schema {
            continue;
        }
        let found = TableName {
            schema,
            name: table.name.clone(),
        };
        for d in &mut primer.dependencies {
            if d.table == table {
                d.table = found.clone();
            }
        }
        for t in &mut primer.not_followed {
            if *t == table {
                *t = found.clone();
            }
        }
    }
    Ok(())
}

/// [`complete`] for one primer, given what its plan reads: the tables added, or why it would be stale.
pub fn apply(primer: &mut Primer, reads: &Reads) -> Result<Vec<(TableName, Inferred)>, PlanError> {
    if !reads.calls.is_empty()
        && primer.policy.ttl.is_none()
        && primer.policy.refresh_interval.is_none()
    {
        return Err(PlanError::Volatile {
            primer: primer.name.clone(),
            functions: reads
                .calls
                .iter()
                .map(|c| {
                    if c.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                        c.clone()
                    } else {
                        format!("{c}()")
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    primer.columns_read = known_columns(reads, primer.template.params.len());
    let foreign: Vec<TableName> = reads
        .foreign
        .iter()
        .filter(|t| !primer.not_followed.contains(t))
        .cloned()
        .collect();
    if !foreign.is_empty() {
        return Err(PlanError::Foreign {
            primer: primer.name.clone(),
            tables: list(&foreign),
        });
    }
    let named = |t: &TableName| {
        primer.dependencies.iter().any(|d| &d.table == t) || primer.not_followed.contains(t)
    };
    // A partition is covered by a dependency on it or on one of its ancestors.
    let listed = |t: &TableName| named(t) || reads.ancestors_of(t).iter().any(named);
    let missing: Vec<TableName> = reads
        .tables
        .iter()
        .filter(|t| !listed(t))
        .cloned()
        .collect();
    if primer.depends_on_given {
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        return Err(PlanError::Missing {
            primer: primer.name.clone(),
            tables: list(&missing),
            them: if missing.len() == 1 { "it" } else { "them" },
            entries: missing
                .iter()
                // A partition: name its root, which covers every partition.
                .map(|t| {
                    let t = reads.ancestors_of(t).last().unwrap_or(t);
                    format!("`- table: {}`", display_table(t))
                })
                .fold(Vec::new(), |mut all: Vec<String>, e| {
                    if !all.contains(&e) {
                        all.push(e);
                    }
                    all
                })
                .join(", "),
        });
    }
    if !reads.functions.is_empty() {
        return Err(PlanError::Function {
            primer: primer.name.clone(),
            functions: reads.functions.join(", "),
        });
    }
    // A partition is followed under its own name and its root's: the stream names the partition, or the
    // root when the publication sets publish_via_partition_root; partitions attached later are found
    // through the root (`replication` asks for a partition's ancestors).
    // A table's scans hold `column = $n` for every key parameter: a column map; else table level.
    let mut added: Vec<(TableName, Inferred)> = Vec::new();
    for table in &missing {
        let inferred = infer(primer, reads, table);
        for t in std::iter::once(table).chain(reads.ancestors_of(table).last()) {
            let mappings = match &inferred {
                Inferred::Columns(mappings) => {
                    mappings.iter().cloned().map(Mapping::Columns).collect()
                }
                Inferred::Lookups { columns, lookups } => columns
                    .iter()
                    .cloned()
                    .map(Mapping::Columns)
                    .chain(lookups.iter().map(|(query, args)| Mapping::Lookup {
                        query: query.clone(),
                        args: args.clone(),
                    }))
                    .collect::<Vec<_>>(),
                Inferred::TableLevel(_) => vec![Mapping::AllKeys],
            };
            for mapping in mappings {
                let dependency = Dependency {
                    table: t.clone(),
                    mapping,
                };
                if !primer.dependencies.contains(&dependency) {
                    primer.dependencies.push(dependency);
                }
            }
            match added.iter_mut().find(|(a, _)| a == t) {
                None => added.push((t.clone(), inferred.clone())),
                // The root of several partitions: table level if any of them is.
                Some((_, seen)) => {
                    if let (Inferred::Columns(a), Inferred::Columns(b)) = (&mut *seen, &inferred) {
                        for m in b {
                            if !a.contains(m) {
                                a.push(m.clone());
                            }
                        }
                    } else if let Inferred::TableLevel(_) = inferred {
                        *seen = inferred.clone();
                    }
                }
            }
        }
    }
    Ok(added)
}

/// The hand-written `columns` maps of `primer`'s `depends_on` that its plan contradicts: the plan derives a
/// column map for the table (each scan of it holds `column = $n` for every key parameter) and the hand
/// map is not one of them, so a row moving between keys may refresh the wrong ones. A map the plan cannot
/// derive (the table is reached through a join, say) is not judged: the person may know more.
pub fn contradictions(primer: &Primer, reads: &Reads) -> Vec<String> {
    if !primer.depends_on_given {
        return Vec::new();
    }
    let describe = |m: &[(usize, String)]| {
        m.iter()
            .map(|(i, c)| {
                let name = primer.param_name(*i);
                format!("{name}: {}", crate::primer::Ident(c))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = Vec::new();
    for dep in &primer.dependencies {
        let Mapping::Columns(hand) = &dep.mapping else {
            continue;
        };
        let mut hand = hand.clone();
        hand.sort();
        // The table itself, or the partitions the plan scans of a root named in depends_on.
        let scanned: Vec<&TableName> = reads
            .tables
            .iter()
            .filter(|t| **t == dep.table || reads.ancestors_of(t).contains(&dep.table))
            .collect();
        for table in scanned {
            let Inferred::Columns(derived) = infer(primer, reads, table) else {
                continue;
            };
            let derived: Vec<Vec<(usize, String)>> = derived
                .into_iter()
                .map(|mut m| {
                    m.sort();
                    m
                })
                .collect();
            if !derived.contains(&hand) {
                let plan: Vec<String> = derived.iter().map(|m| describe(m)).collect();
                out.push(format!(
                    "primer '{}': depends_on maps table {} as `columns: {{ {} }}`, but its query's plan \
                     compares {} with the key: a row that moves between keys may refresh the wrong ones. \
                     Use `columns: {{ {} }}` (or remove depends_on to let kck infer it)",
                    primer.name,
                    dep.table,
                    describe(&hand),
                    plan.join(" / "),
                    plan.first().map_or("", String::as_str),
                ));
                break;
            }
        }
    }
    out
}

/// [`columns_read`] where it is known, under each table's name and its partition root's (the stream may
/// name either): a root is known only when every partition the plan reads is.
fn known_columns(reads: &Reads, key_params: usize) -> Vec<(TableName, Vec<String>)> {
    let all = columns_read(reads, key_params);
    let mut out: Vec<(TableName, Option<Vec<String>>)> = Vec::new();
    for (table, columns) in &all {
        for t in std::iter::once(table).chain(reads.ancestors_of(table).last()) {
            match out.iter_mut().find(|(o, _)| o == t) {
                None => out.push((t.clone(), columns.as_ref().ok().cloned())),
                Some((_, seen)) => match (seen.as_mut(), columns) {
                    (Some(seen), Ok(more)) => {
                        for c in more {
                            if !seen.contains(c) {
                                seen.push(c.clone());
                            }
                        }
                    }
                    _ => *seen = None,
                },
            }
        }
    }
    out.into_iter()
        .filter_map(|(t, c)| c.map(|c| (t, c)))
        .collect()
}

fn display_table(t: &TableName) -> String {
    if t.schema == "public" {
        crate::primer::Ident(&t.name).to_string()
    } else {
        t.to_string()
    }
}

fn list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(|t| format!("'{}'", display_table(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_generic_plan_is_asked_for_as_the_server_version_allows() {
        let q = "SELECT v FROM t WHERE id = $1 AND k = $2";
        let pg16 = GenericPlan::new(160_002, q, 2);
        assert_eq!(
            pg16.explain,
            "EXPLAIN (GENERIC_PLAN, VERBOSE, FORMAT JSON, COSTS OFF) SELECT v FROM t WHERE id = $1 AND k = $2"
        );
        assert!(pg16.prepare.is_none() && pg16.deallocate.is_none());
        assert!(!pg16.setup.contains("plan_cache_mode"));
        let pg15 = GenericPlan::new(150_018, q, 2);
        assert_eq!(
            pg15.prepare.as_deref(),
            Some(&*format!("PREPARE kck_plan AS {q}"))
        );
        assert_eq!(
            pg15.explain,
            "EXPLAIN (VERBOSE, FORMAT JSON, COSTS OFF) EXECUTE kck_plan(NULL, NULL)"
        );
        assert!(pg15.setup.contains("force_generic_plan"));
        assert_eq!(
            GenericPlan::new(140_000, "SELECT 1", 0).explain,
            "EXPLAIN (VERBOSE, FORMAT JSON, COSTS OFF) EXECUTE kck_plan"
        );
        for plan in [&pg16, &pg15] {
            assert!(plan.setup.contains("enable_partition_pruning = off"));
            assert!(plan.reset.contains("RESET enable_partition_pruning"));
        }
    }

    #[test]
    fn every_relation_of_the_plan_is_read_subplans_included() {
        let plan = json!([{"Plan": {
            "Node Type": "Nested Loop",
            "Plans": [
                {"Node Type": "Index Scan", "Relation Name": "t", "Schema": "public", "Alias": "t"},
                {"Node Type": "Seq Scan", "Relation Name": "t2", "Schema": "app", "Alias": "t2",
                 "Plans": [{"Node Type": "Seq Scan", "Parent Relationship": "SubPlan",
                            "Relation Name": "t", "Schema": "public"}]},
                {"Node Type": "Function Scan", "Function Name": "generate_series", "Schema": "pg_catalog"},
                {"Node Type": "Function Scan", "Function Name": "orders_of", "Schema": "app"}
            ]
        }}]);
        let reads = reads_of(&plan).unwrap();
        assert_eq!(
            reads.tables,
            vec![
                TableName {
                    schema: "public".into(),
                    name: "t".into()
                },
                TableName {
                    schema: "app".into(),
                    name: "t2".into()
                },
            ]
        );
        assert_eq!(reads.functions, vec!["app.orders_of".to_owned()]);
        assert!(reads_of(&json!({"Plan": {}})).is_err());
        assert!(reads_of(&json!([])).is_err());
    }
}

#[cfg(test)]
mod lookup_tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn primer() -> Primer {
        let yaml = r#"
source: { url: "postgres://u@localhost/db" }
primers:
  - name: by_user
    key: "by_user/{user_id:int}"
    query: "SELECT i.* FROM orders o JOIN items i ON i.order_id = o.id WHERE o.user_id = $1"
"#;
        let config = crate::config::Config::from_yaml_str(yaml, Path::new("t.yaml"), |_| None)
            .expect("config");
        config.catalog.primers[0].clone()
    }

    fn plan(kind: &str) -> Reads {
        let mut reads = reads_of(&json!([{"Plan": {
            "Node Type": "Hash Join", "Join Type": kind, "Hash Cond": "(i.order_id = o.id)",
            "Plans": [
                {"Node Type": "Seq Scan", "Parent Relationship": "Outer", "Relation Name": "items",
                 "Schema": "public", "Alias": "i"},
                {"Node Type": "Hash", "Parent Relationship": "Inner", "Plans": [
                    {"Node Type": "Seq Scan", "Parent Relationship": "Outer", "Relation Name": "orders",
                     "Schema": "public", "Alias": "o", "Filter": "(o.user_id = $1)"}]}
            ]
        }}]))
        .expect("plan");
        reads.column_types.push((
            TableName {
                schema: "public".into(),
                name: "orders".into(),
            },
            vec![ColumnType {
                name: "user_id".into(),
                type_name: "integer".into(),
                deterministic: true,
            }],
        ));
        reads
    }

    #[test]
    fn a_table_reached_through_a_join_gets_a_lookup() {
        let items = TableName {
            schema: "public".into(),
            name: "items".into(),
        };
        let primer = primer();
        assert_eq!(
            infer(&primer, &plan("Inner"), &items),
            Inferred::Lookups {
                columns: vec![],
                lookups: vec![(
                    "SELECT DISTINCT b.user_id AS user_id FROM public.orders b WHERE b.id = $1"
                        .into(),
                    vec!["order_id".into()]
                )],
            }
        );
        // items is the preserved side of a left join (every item row reaches every key): table level.
        assert!(infer(&primer, &plan("Left"), &items).is_table_level());
        assert!(infer(&primer, &plan("Full"), &items).is_table_level());
        assert!(infer(&primer, &plan("Anti"), &items).is_table_level());
        assert!(!infer(&primer, &plan("Right"), &items).is_table_level());
    }

    fn table(name: &str) -> TableName {
        TableName {
            schema: "public".into(),
            name: name.into(),
        }
    }

    fn int_columns(reads: &mut Reads, name: &str, columns: &[&str]) {
        reads.column_types.push((
            table(name),
            columns
                .iter()
                .map(|c| ColumnType {
                    name: (*c).into(),
                    type_name: "integer".into(),
                    deterministic: true,
                })
                .collect(),
        ));
    }

    #[test]
    fn a_table_two_joins_away_gets_a_lookup_along_the_chain() {
        let scan = |name: &str, alias: &str, filter: Option<&str>, rel: &str| {
            let mut node = json!({"Node Type": "Seq Scan", "Parent Relationship": rel,
                "Relation Name": name, "Schema": "public", "Alias": alias});
            if let Some(f) = filter {
                node["Filter"] = json!(f);
            }
            node
        };
        let chain = |kind: &str| {
            let mut reads = reads_of(&json!([{"Plan": {
                "Node Type": "Hash Join", "Join Type": kind, "Hash Cond": "(oi.product_id = p.id)",
                "Plans": [
                    {"Node Type": "Hash Join", "Join Type": "Inner", "Parent Relationship": "Outer",
                     "Hash Cond": "(oi.order_id = o.id)",
                     "Plans": [
                        scan("order_items", "oi", None, "Outer"),
                        {"Node Type": "Hash", "Parent Relationship": "Inner",
                         "Plans": [scan("orders", "o", Some("(o.user_id = $1)"), "Outer")]}]},
                    {"Node Type": "Hash", "Parent Relationship": "Inner",
                     "Plans": [scan("products", "p", None, "Outer")]}
                ]
            }}]))
            .expect("plan");
            int_columns(&mut reads, "orders", &["id", "user_id"]);
            reads
        };
        let primer = primer();
        assert_eq!(
            infer(&primer, &chain("Inner"), &table("products")),
            Inferred::Lookups {
                columns: vec![],
                lookups: vec![(
                    "SELECT DISTINCT b.user_id AS user_id FROM public.orders b \
                     JOIN public.order_items b1 ON b1.order_id = b.id WHERE b1.product_id = $1"
                        .into(),
                    vec!["id".into()]
                )],
            }
        );
        // products on the preserved side of the outer join: table level.
        assert!(infer(&primer, &chain("Right"), &table("products")).is_table_level());
    }

    #[test]
    fn a_correlated_sub_plan_ties_its_table_to_the_outer_scan() {
        let mut reads = reads_of(&json!([{"Plan": {
            "Node Type": "Index Scan", "Relation Name": "products", "Schema": "public", "Alias": "p",
            "Index Cond": "(p.id = $1)", "Output": ["p.name", "(SubPlan 1)"],
            "Plans": [{"Node Type": "Aggregate", "Parent Relationship": "SubPlan",
                       "Subplan Name": "SubPlan 1", "Output": ["avg(r.stars)"],
                       "Plans": [{"Node Type": "Seq Scan", "Parent Relationship": "Outer",
                                  "Relation Name": "reviews", "Schema": "public", "Alias": "r",
                                  "Filter": "(r.product_id = p.id)"}]}]
        }}]))
        .expect("plan");
        int_columns(&mut reads, "products", &["id"]);
        let yaml = r#"
source: { url: "postgres://u@localhost/db" }
primers:
  - name: product
    key: "product/{id:int}"
    query: "SELECT p.name, (SELECT avg(r.stars) FROM reviews r WHERE r.product_id = p.id) FROM products p WHERE p.id = $1"
"#;
        let config = crate::config::Config::from_yaml_str(yaml, Path::new("t.yaml"), |_| None)
            .expect("config");
        let primer = &config.catalog.primers[0];
        assert_eq!(
            infer(primer, &reads, &table("reviews")),
            Inferred::Lookups {
                columns: vec![],
                lookups: vec![(
                    "SELECT DISTINCT b.id AS id FROM public.products b WHERE b.id = $1".into(),
                    vec!["product_id".into()]
                )],
            }
        );
    }
}
