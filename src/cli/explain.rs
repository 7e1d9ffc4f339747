//! `kck explain [PRIMER]`: for each primer, the tables its query reads (from its plan) and, for each, how a
//! change there maps to cached keys, the replica identity that needs, and the `ALTER TABLE` that gives it.

use std::fmt::Write as _;

use tokio_postgres::Client;

use crate::pg::{Source, quote_table};
use crate::plan;
use crate::primer::{Catalog, Mapping, Primer, TableName};

/// What one primer reads and how kck follows it, as text.
pub async fn explain(
    client: &Client,
    catalog: &Catalog,
    only: Option<&str>,
) -> Result<String, String> {
    let mut out = String::new();
    let primers: Vec<&Primer> = catalog
        .primers
        .iter()
        .filter(|p| only.is_none_or(|name| p.name == name))
        .collect();
    if primers.is_empty()
        && let Some(name) = only
    {
        let names: Vec<&str> = catalog.primers.iter().map(|p| p.name.as_str()).collect();
        return Err(format!(
            "no primer is named '{name}' (the primers: {})",
            names.join(", ")
        ));
    }
    for primer in primers {
        explain_one(client, primer, &mut out).await;
    }
    Ok(out)
}

async fn explain_one(client: &Client, primer: &Primer, out: &mut String) {
    let _ = writeln!(
        out,
        "primer {} (key {})",
        primer.name, primer.template.source
    );
    let mut primer = primer.clone();
    if let Err(e) = plan::resolve_names(client, &mut primer).await {
        let _ = writeln!(out, "  {e}\n");
        return;
    }
    let primer = &primer;
    let reads = match plan::reads(client, primer).await {
        Ok(reads) => reads,
        Err(e) => {
            let _ = writeln!(out, "  cannot read its plan: {e}\n");
            return;
        }
    };
    let names: Vec<String> = reads.tables.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "  reads (from its plan): {}", names.join(", "));
    for warning in plan::contradictions(primer, &reads) {
        let _ = writeln!(out, "  WARNING: {warning}");
    }
    let mut completed = primer.clone();
    let added = match plan::apply(&mut completed, &reads) {
        Ok(added) => added,
        Err(e) => {
            let _ = writeln!(out, "  PROBLEM: {e}");
            Vec::new()
        }
    };
    let inferred = |table: &TableName| added.iter().find(|(t, _)| t == table).map(|(_, how)| how);
    let read = plan::columns_read(&reads, primer.template.params.len());
    let mut told: Vec<&TableName> = Vec::new();
    for dep in &completed.dependencies {
        let how = match &dep.mapping {
            Mapping::Columns(columns) => {
                let pairs: Vec<String> = columns
                    .iter()
                    .map(|(param, column)| {
                        let name = completed.param_name(*param);
                        format!("{column} → {name}")
                    })
                    .collect();
                format!(
                    "a changed row refreshes the key its columns name ({}), and an UPDATE also the key of its \
                     old values{}",
                    pairs.join(", "),
                    if inferred(&dep.table).is_some() {
                        " (inferred: each scan of it in the plan holds `column = $n` for the key's parameters)"
                    } else {
                        ""
                    }
                )
            }
            Mapping::Lookup { query, args } => format!(
                "a changed row runs the lookup `{query}` with {} to find the keys it affects",
                args.join(", ")
            ),
            Mapping::AllKeys => {
                if primer.depends_on_given {
                    "every cached key of the primer (depends_on gives no columns or lookup)"
                        .to_owned()
                } else {
                    match inferred(&dep.table) {
                        Some(plan::Inferred::TableLevel(why)) => format!(
                            "every cached key of the primer (no depends_on: followed at table level, because {why})"
                        ),
                        _ => "every cached key of the primer (no depends_on: followed at table level)"
                            .to_owned(),
                    }
                }
            }
        };
        let _ = writeln!(out, "  {}: {how}", dep.table);
        if let Some(line) = identity(client, &dep.table, &dep.mapping).await {
            let _ = writeln!(out, "    {line}");
        }
        if !told.contains(&&dep.table) {
            told.push(&dep.table);
            let _ = writeln!(out, "    {}", columns_line(&completed, &read, &dep.table));
        }
    }
    for table in &completed.not_followed {
        let _ = writeln!(
            out,
            "  {table}: not followed (not_followed): its changes reach the cache through ttl, \
             refresh_interval or invalidation only"
        );
    }
    out.push('\n');
}

/// Which columns of `table` the primer reads, and what an UPDATE of the others does.
fn columns_line(
    primer: &Primer,
    read: &[(TableName, Result<Vec<String>, String>)],
    table: &TableName,
) -> String {
    let known = primer.columns_read.iter().find(|(t, _)| t == table);
    match (known, read.iter().find(|(t, _)| t == table)) {
        (Some((_, columns)), _) if columns.is_empty() => {
            "reads no column of it (an UPDATE of it refreshes nothing, once the old row is sent: \
             REPLICA IDENTITY FULL)"
                .to_owned()
        }
        (Some((_, columns)), _) => format!(
            "reads columns {}: an UPDATE that changes none of them refreshes nothing (when the old row \
             is sent: REPLICA IDENTITY FULL)",
            columns.join(", ")
        ),
        (None, Some((_, Err(why)))) => {
            format!("which columns it reads is not known ({why}): every UPDATE counts")
        }
        (None, _) => "which columns it reads is not known (its plan does not scan it): every \
                      UPDATE counts"
            .to_owned(),
    }
}

/// The table's replica identity, and the `ALTER TABLE` when the mapping needs old values it does not send.
async fn identity(client: &Client, table: &TableName, mapping: &Mapping) -> Option<String> {
    let facts = crate::ops::check::table_facts(client, table).await.ok()??;
    let name = match facts.identity {
        'f' => "FULL",
        'd' => "DEFAULT (the primary key)",
        'i' => "USING INDEX",
        _ => "NOTHING",
    };
    // The columns whose old values the mapping reads (an UPDATE's old key, a DELETE's row).
    let needed: Vec<&str> = match mapping {
        Mapping::Columns(columns) => columns.iter().map(|(_, c)| c.as_str()).collect(),
        Mapping::Lookup { args, .. } => args.iter().map(String::as_str).collect(),
        Mapping::AllKeys => Vec::new(),
    };
    let outside: Vec<&str> = needed
        .into_iter()
        .filter(|c| facts.identity != 'f' && !facts.identity_columns.contains(*c))
        .collect();
    Some(if outside.is_empty() {
        format!("replica identity {name}: enough")
    } else {
        format!(
            "replica identity {name}: Postgres does not send the old {} of an UPDATE or DELETE, so those \
             refresh every cached key; ALTER TABLE {} REPLICA IDENTITY FULL; refreshes only the affected ones",
            outside.join(", "),
            quote_table(table)
        )
    })
}

/// Connect to the config's source and explain.
pub async fn run(source: &Source, catalog: &Catalog, only: Option<&str>) -> Result<String, String> {
    let client = source.connect().await.map_err(|e| e.to_string())?;
    explain(&client, catalog, only).await
}
