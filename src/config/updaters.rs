//! Builds an [`Updater`] from its raw form: parameters, statements, and what a statement may not do.

use super::*;

/// SQL that controls the transaction itself: an updater's statements run inside kck's transaction.
pub(super) const TRANSACTION_CONTROL: [&str; 9] = [
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
pub(super) fn build_updater(
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
    let (name, name_line) = item_name(
        raw.name.as_ref(),
        sql.as_ref().map(|s| s.default_name.as_str()),
        line,
        "updater",
        "the updater's name, used as POST /update/<name>",
        &err,
    )?;

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
