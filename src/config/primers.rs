//! Builds a [`Primer`] (with its key template, dependencies and [`Policy`](crate::primer::Policy)) from its
//! raw form, checking the query's placeholders against the key.

use super::*;

/// Validate one primer. `line` is the line of the primer as a whole (its mapping, or 1 for a `.sql` file).
///
/// `query_is_literal_block`: the YAML `query` is a `|` block scalar, whose lines are the file's lines (then
/// a message about a placeholder names the placeholder's line).
pub(super) fn build_primer(
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
    let (name, name_line) = item_name(
        raw.name.as_ref(),
        sql.as_ref().map(|s| s.default_name.as_str()),
        line,
        "primer",
        "the primer's name, such as orders_by_user",
        &err,
    )?;
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
    // Without it, kck follows every table the query's plan reads (at start and in `kck check`).
    let depends_on_given = raw.depends_on.is_some();
    if let Some(deps) = &raw.depends_on
        && deps.value.is_empty()
    {
        return Err(err(
            line_of(deps),
            "depends_on",
            "must list at least one table: without dependencies the primer's cached keys would never be refreshed"
                .into(),
        ));
    }
    let deps = raw
        .depends_on
        .as_ref()
        .map_or(&[][..], |d| d.value.as_slice());
    let mut dependencies = Vec::with_capacity(deps.len());
    let mut unqualified = Vec::new();
    for (d, dep) in deps.iter().enumerate() {
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
        if !super::validators::has_schema(&table.value) {
            unqualified.push(table_name.clone());
        }
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

    // Tables the query reads whose changes the user chose not to follow (not published): they reach the
    // cache only through ttl, refresh_interval or invalidation.
    let mut not_followed = Vec::new();
    for (i, t) in raw
        .not_followed
        .iter()
        .flat_map(|l| l.value.iter())
        .enumerate()
    {
        let field = format!("not_followed[{i}]");
        let table = parse_table(&t.value).map_err(|m| err(line_of(t), &field, m))?;
        if !super::validators::has_schema(&t.value) {
            unqualified.push(table.clone());
        }
        if dependencies.iter().any(|d| d.table == table) {
            return Err(err(
                line_of(t),
                &field,
                format!(
                    "'{}' is also in depends_on: list it in one of the two",
                    t.value
                ),
            ));
        }
        not_followed.push(table);
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
            depends_on_given,
            not_followed,
            unqualified,
            columns_read: Vec::new(),
            policy,
            cache_control,
            access,
        },
        origin,
    ))
}

/// The refresh policy fields of a primer (`ttl`, `warm`, `batch`, ...). `cold_after` is the primer's own;
/// [`Loader::load`] falls back to `refresh.cold_after`.
pub(super) fn build_policy(
    raw: &RawPrimer,
    template: &KeyTemplate,
    err: &dyn Fn(usize, &str, String) -> ConfigError,
) -> Result<crate::primer::Policy, ConfigError> {
    use crate::primer::{BatchQuery, OnExpiry, Policy};
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
pub(super) fn check_cache_control(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!(
            "'{value}' is not a Cache-Control value: use printable ASCII such as \"max-age=5\", \
             \"no-cache\" or \"private, max-age=30\""
        ));
    }
    Ok(value.to_owned())
}
