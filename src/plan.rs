//! What a primer's query reads, from Postgres's own plan, so that no table it reads goes unwatched.
//!
//! For each primer, kck prepares the query and asks for its generic plan (`SET plan_cache_mode =
//! force_generic_plan`, then `EXPLAIN (VERBOSE, FORMAT JSON, COSTS OFF) EXECUTE` with null arguments). The
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
use crate::primer::{Catalog, Dependency, Mapping, Primer, TableName};

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
        "primer '{primer}' has no depends_on and its query reads from function {functions}, which may read \
         tables its plan does not show: give depends_on listing the tables the function reads"
    )]
    Function { primer: String, functions: String },
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
        walk(plan, &mut reads);
    }
    Ok(reads)
}

fn walk(node: &Value, reads: &mut Reads) {
    let text = |k: &str| node.get(k).and_then(Value::as_str);
    if let Some(name) = text("Relation Name") {
        let table = TableName {
            schema: text("Schema").unwrap_or("public").to_owned(),
            name: name.to_owned(),
        };
        if !reads.tables.contains(&table) {
            reads.tables.push(table);
        }
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
    for child in node
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        walk(child, reads);
    }
}

/// Ask Postgres what `primer`'s query reads. Uses (and leaves) a prepared statement on `client` only for the
/// duration of the call.
pub async fn reads(client: &Client, primer: &Primer) -> Result<Reads, PlanError> {
    let plan_error = |source| PlanError::Plan {
        primer: primer.name.clone(),
        source,
    };
    // The connection may be shared (`kck check`): touch only our own statement and setting, and put the
    // setting back whatever happens.
    client
        .batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .map_err(plan_error)?;
    if let Err(e) = client
        .batch_execute(&format!("PREPARE kck_plan AS {}", primer.query))
        .await
    {
        let _ = client.batch_execute("RESET plan_cache_mode").await;
        return Err(plan_error(e));
    }
    let args = vec!["NULL"; primer.template.params.len()].join(", ");
    let execute = if args.is_empty() {
        "EXECUTE kck_plan".to_owned()
    } else {
        format!("EXECUTE kck_plan({args})")
    };
    // The simple protocol answers in text: the plan's JSON as Postgres wrote it.
    let answer = client
        .simple_query(&format!(
            "EXPLAIN (VERBOSE, FORMAT JSON, COSTS OFF) {execute}"
        ))
        .await;
    let deallocate = client
        .batch_execute("DEALLOCATE kck_plan; RESET plan_cache_mode")
        .await;
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
    Ok(reads)
}

/// What [`complete`] did to one primer, for the log and `kck check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub primer: String,
    /// Tables added at table level (the primer gave no depends_on).
    pub added: Vec<TableName>,
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
        let added = apply(primer, &reads)?;
        if !added.is_empty() {
            followed.push(Followed {
                primer: primer.name.clone(),
                added,
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
pub fn apply(primer: &mut Primer, reads: &Reads) -> Result<Vec<TableName>, PlanError> {
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
    let mut added: Vec<TableName> = Vec::new();
    for table in &missing {
        for t in std::iter::once(table).chain(reads.ancestors_of(table).last()) {
            if !added.contains(t) {
                added.push(t.clone());
            }
        }
    }
    for table in &added {
        primer.dependencies.push(Dependency {
            table: table.clone(),
            mapping: Mapping::AllKeys,
        });
    }
    Ok(added)
}

fn display_table(t: &TableName) -> String {
    if t.schema == "public" {
        t.name.clone()
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
